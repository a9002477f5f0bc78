"""Stage 1: event streams from disk into one structured array.

Why one dtype: every reader (EventGPT's pickled ``.npy`` dict, structured ``.npy``,
``.npz``, DSEC ``events.h5``, and the camera formats of :mod:`stagewise.inputs.camera`) ends
in the same ``EVENT_DTYPE`` array, so stage 2 and the report never care where the events
came from. Timestamps are integer microseconds (``t``), coordinates are pixel columns/rows
(``x``/``y``), polarity is 0 (OFF) or 1 (ON).

Time windows are half-open everywhere: ``[t0_us, t1_us)`` holds the events with
``t0_us <= t < t1_us``.

Safety: EventGPT's own sample format is a *pickle*, and unpickling an untrusted file can run
arbitrary code. By default ``read_events`` unpickles through the allow-list of
:mod:`stagewise.inputs.safe_pickle` (NumPy arrays and plain containers only; anything else is
refused with a line saying how to opt in or convert); ``trust_pickle=True`` (``--trust-pickle``)
restores plain ``np.load(allow_pickle=True)``. ``write_events`` writes the safe formats
(``.npz``, structured ``.npy``, DSEC-layout ``.h5``) that need no pickle.

Robustness: whatever goes wrong while reading one file (a corrupt HDF5 block, a truncated
pickle, a decoder panic, an allocation that fails) comes out of :func:`read_events` as
:class:`stagewise.errors.InputError`, whose text is one line ``"<file>: <problem>"``; memory is
bounded by the validated sensor size (at most :data:`MAX_SENSOR_SIDE` per side) and the number
of events one read may hold (:data:`MAX_EVENTS_PER_READ`).
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from stagewise.errors import InputError
from stagewise.inputs.camera import CAMERA_FORMATS, FORMAT_NAMES, UNSUPPORTED_FORMATS

EVENT_DTYPE = np.dtype([("t", "<i8"), ("x", "<u2"), ("y", "<u2"), ("p", "u1")])
"""One event: ``t`` int64 microseconds, ``x``/``y`` uint16 pixel column/row, ``p`` uint8 0/1."""

EVENT_KEYS: tuple[str, ...] = ("x", "y", "t", "p")
"""The arrays every event file must provide (EventGPT's dict keys)."""

NATIVE_SUFFIXES: tuple[str, ...] = (".npy", ".npz", ".h5", ".hdf5")
"""Formats read with NumPy / h5py (always available)."""

CAMERA_SUFFIXES: tuple[str, ...] = tuple(CAMERA_FORMATS)
"""Camera formats read with the optional faery package (:mod:`stagewise.inputs.camera`)."""

EVENT_SUFFIXES: tuple[str, ...] = NATIVE_SUFFIXES + CAMERA_SUFFIXES
"""Every suffix :func:`read_events` reads."""

EVENTGPT_MAX_DURATION_US = 100_000
"""The released EventGPT refuses streams with ``t.max - t.min >= 100000`` us."""

MAX_SENSOR_SIDE = 4096
"""Largest sensor width/height accepted (pixels), from the file, the argument or, when neither
gives a size, the largest coordinate. The largest event sensors sold have 1280 columns (Sony
IMX636 1280x720, Samsung DVS Gen4 1280x960); 4096 leaves room and bounds stage 2's event
images to 4096 x 4096 pixels."""

MAX_EVENTS_PER_READ = 1 << 28
"""Most events one read may return (268 M events, 3.5 GB as ``EVENT_DTYPE``): a longer
recording is read in windows (``t0_us``/``t1_us``, ``--window-ms``)."""

_SAFE_FORMATS = ".npz (arrays x, y, t, p), a structured .npy (fields t, x, y, p) or a DSEC-layout .h5"
_UINT16_MAX = np.iinfo(np.uint16).max


@dataclass(frozen=True)
class EventStream:
    """An event stream in memory.

    Attributes:
        events: ``[N]`` array of ``EVENT_DTYPE``; the readers return it sorted by ``t``
            (stably sorted, with a note, when the file was not).
        height: sensor height in pixels when known, else ``None``.
        width: sensor width in pixels when known, else ``None``.
        source: where the events came from (a file path, or a description such as
            ``"simulated:moving_edge(seed=0)"``); used in error messages.
        t_offset_us: absolute time of ``t == 0`` in microseconds (DSEC's ``t_offset``; the
            first event's camera time for camera formats; 0 when the file has none).
        notes: what the reader changed or decided, one line each (e.g. that it sorted the
            events); the runner copies them into the sample's record.

    Raises:
        ValueError: ``events`` is not a 1-D ``EVENT_DTYPE`` array, or a size is < 1.
    """

    events: np.ndarray
    height: int | None
    width: int | None
    source: str
    t_offset_us: int = 0
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.events, np.ndarray) or self.events.dtype != EVENT_DTYPE:
            raise ValueError(f"events: expected a numpy array of EVENT_DTYPE, got {_describe(self.events)}")
        if self.events.ndim != 1:
            raise ValueError(f"events: expected a 1-D array, got shape {self.events.shape}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: must be >= 1 or None, got {value}")
        if not isinstance(self.notes, tuple) or not all(isinstance(n, str) for n in self.notes):
            raise ValueError(f"notes: expected a tuple of str, got {self.notes!r}")

    def __len__(self) -> int:
        return int(self.events.shape[0])

    @property
    def duration_us(self) -> int:
        """``t.max() - t.min()`` in microseconds; 0 for an empty stream."""
        if len(self) == 0:
            return 0
        t = self.events["t"]
        return int(t.max()) - int(t.min())

    @property
    def sensor_size(self) -> tuple[int, int] | None:
        """``(height, width)`` when both are known, else ``None``."""
        if self.height is None or self.width is None:
            return None
        return (self.height, self.width)


def empty_events() -> np.ndarray:
    """A ``[0]`` array of ``EVENT_DTYPE`` (the layout every function returns for no events)."""
    return np.zeros(0, dtype=EVENT_DTYPE)


def parse_sensor_size(text: str) -> tuple[int, int]:
    """``"WxH"`` (camera order, e.g. ``"640x480"``) -> ``(height, width)`` (stagewise's order).

    Raises:
        ValueError: not two positive integers joined by ``x``, or a side above
            :data:`MAX_SENSOR_SIDE` (the message names ``sensor-size``).
    """
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"sensor-size: expected WxH (width x height) such as 640x480, got {text!r}") from None
    if min(w, h) < 1 or max(w, h) > MAX_SENSOR_SIDE:
        raise ValueError(f"sensor-size: width and height must be in 1..{MAX_SENSOR_SIDE}, got {text!r}")
    return (h, w)


# --------------------------------------------------------------------------- readers


def read_events(
    path: str | Path,
    *,
    trust_pickle: bool = False,
    sensor_size: tuple[int, int] | None = None,
    t0_us: int | None = None,
    t1_us: int | None = None,
) -> EventStream:
    """Read an event file into an :class:`EventStream`.

    Formats, by suffix:

    - ``.npy``: EventGPT's sample format, a **pickled** dict ``{x, y, t, p}`` (an object
      ``.npy``, or a bare pickle without the ``.npy`` header). Unpickled through the
      allow-list of :mod:`stagewise.inputs.safe_pickle` unless ``trust_pickle``. A ``.npy``
      holding a structured array with fields ``t, x, y, p`` needs no pickle.
    - ``.npz``: arrays ``x, y, t, p`` (optional scalars ``height``, ``width``,
      ``t_offset``); never unpickled.
    - ``.h5`` / ``.hdf5``: DSEC layout ``events/{x,y,t,p}``, ``ms_to_idx``, ``t_offset``.
      With a window, ``ms_to_idx`` (``ms_to_idx[k]`` = index of the first event with
      ``t >= 1000 k``) locates the rows, so only the window is read from disk. Times are
      the file's ``events/t`` (microseconds since ``t_offset``), which goes to
      ``EventStream.t_offset_us``. Blosc-compressed files (as DSEC ships them) need the
      ``hdf5plugin`` package, imported only when an HDF5 file is opened.
    - ``.raw``/``.evt`` (Prophesee EVT 2.0/2.1/3.0), ``.dat``, ``.aedat4``, ``.es``, ``.csv``:
      camera formats through faery (:mod:`stagewise.inputs.camera`); times from the first
      event; a window decodes only up to its end.

    Validation: polarity ``{0, 1}`` is kept, ``{-1, 1}`` is accepted and ``-1`` is mapped to
    0; coordinates must be integers inside the sensor size (the argument, else the file's,
    else at most ``MAX_SENSOR_SIDE - 1``); timestamps must be integers >= 0 (negative times
    are refused: a window ``[t0, t1)`` is only meaningful on one time base, so stagewise
    does not shift it); events not sorted by ``t`` are sorted stably, which is said in
    ``EventStream.notes``.

    Args:
        path: the event file.
        trust_pickle: unpickle with plain ``np.load(allow_pickle=True)``, which runs
            whatever the pickle names; only for files you trust.
        sensor_size: ``(height, width)`` of the sensor; coordinates are checked against
            it and it becomes the stream's ``height``/``width`` (a different size stored in
            the file is noted). When ``None`` the size is taken from the file if stored
            there, else unknown.
        t0_us: keep events with ``t >= t0_us`` (``None``: from the start).
        t1_us: keep events with ``t < t1_us`` (``None``: to the end). Window ``[t0, t1)``.

    Returns:
        An :class:`EventStream` of ``N >= 1`` events sorted by ``t``.

    Raises:
        InputError: anything wrong with the file, in one line naming it: missing file,
            unsupported suffix, unreadable or corrupt file (any exception of the underlying
            reader, with its type), refused pickle, missing keys (all listed), arrays of
            different lengths or not 1-D, non-integer values, no events (in the window),
            negative timestamps, coordinates out of range, polarity outside ``{0, 1}`` /
            ``{-1, 1}``, more than ``MAX_EVENTS_PER_READ`` events, a camera format without
            faery installed or without a sensor size; also an empty window
            (``t0_us >= t1_us``) and a bad ``sensor_size``.
    """
    path = Path(path)
    if t0_us is not None and t1_us is not None and t0_us >= t1_us:
        raise InputError(path, f"empty time window [{t0_us}, {t1_us}) us: t0_us must be < t1_us")
    if sensor_size is not None:
        _check_sensor_size(sensor_size)
    try:
        return _read_events(path, trust_pickle=trust_pickle, sensor_size=sensor_size, t0_us=t0_us, t1_us=t1_us)
    except InputError:
        raise
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as err:  # noqa: BLE001  the reader boundary: h5py/faery/zlib/pickle/MemoryError/Rust panics
        raise InputError(path, f"could not be read as {_kind(path)} ({_one_line(err)})") from None


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in CAMERA_FORMATS:
        return f"a {FORMAT_NAMES[CAMERA_FORMATS[suffix]]} file"
    return {".npy": "a .npy file", ".npz": "a .npz file", ".h5": "an HDF5 file", ".hdf5": "an HDF5 file"}.get(suffix, "an event file")


def _read_events(
    path: Path, *, trust_pickle: bool, sensor_size: tuple[int, int] | None, t0_us: int | None, t1_us: int | None
) -> EventStream:
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a folder, not an event file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arrays, meta = _load_npy(path, trust_pickle=trust_pickle)
        arrays = _window_in_memory(path, arrays, t0_us, t1_us)
    elif suffix == ".npz":
        arrays, meta = _load_npz(path)
        arrays = _window_in_memory(path, arrays, t0_us, t1_us)
    elif suffix in (".h5", ".hdf5"):
        arrays, meta = _load_h5(path, t0_us, t1_us)
    elif suffix in CAMERA_FORMATS:
        from stagewise.inputs.camera import read_camera

        arrays, meta = read_camera(path, sensor_size, t0_us, t1_us)
    elif suffix in UNSUPPORTED_FORMATS:
        raise InputError(path, UNSUPPORTED_FORMATS[suffix])
    else:
        raise InputError(path, f"unsupported event file type {suffix or '(no suffix)'!r}; expected one of {', '.join(EVENT_SUFFIXES)}")

    notes: list[str] = []
    file_size = (meta.get("height"), meta.get("width"))
    if sensor_size is not None:
        height, width = int(sensor_size[0]), int(sensor_size[1])
        if None not in file_size and file_size != (height, width):
            notes.append(f"sensor size {width}x{height} (WxH) as given; the file states {file_size[1]}x{file_size[0]}")
    else:
        height, width = meta.get("height"), meta.get("width")
        if height is not None and width is not None:
            _check_sensor_size((height, width), path)
    events = _pack(path, arrays, height, width, window=(t0_us, t1_us), notes=notes)
    return EventStream(
        events=events, height=height, width=width, source=str(path), t_offset_us=int(meta.get("t_offset", 0)), notes=tuple(notes)
    )


def _load_npy(path: Path, *, trust_pickle: bool) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from stagewise.inputs.safe_pickle import load_pickle

    with open(path, "rb") as fh:
        magic = fh.read(6)
        if magic.startswith(b"PK\x03\x04"):
            raise InputError(path, "is a .npz archive, not a .npy file; rename it to .npz")
        if magic != b"\x93NUMPY":  # a bare pickle named .npy (or garbage)
            if trust_pickle:
                obj = _trusted_load(path)
            else:
                fh.seek(0)
                obj = load_pickle(fh.read(), path)
        else:
            fh.seek(0)
            try:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    _, _, dtype = np.lib.format.read_array_header_1_0(fh)
                else:
                    _, _, dtype = np.lib.format.read_array_header_2_0(fh)
            except Exception as err:  # noqa: BLE001  ValueError, tokenize/SyntaxError from a mangled header dict, ...
                raise InputError(path, f"not a readable .npy file ({_one_line(err)})") from None
            if dtype.hasobject:  # the payload is a pickle: EventGPT's dict
                obj = _trusted_load(path) if trust_pickle else load_pickle(fh.read(), path)
            else:
                try:
                    obj = np.load(path, allow_pickle=False)
                except Exception as err:  # noqa: BLE001  any corrupt payload is this file's problem
                    raise InputError(path, f"not a readable .npy file ({_one_line(err)})") from None

    if isinstance(obj, dict):
        return _pick_keys(path, obj, "key"), {}
    if isinstance(obj, np.ndarray) and obj.dtype.names:
        fields = {name: obj[name] for name in obj.dtype.names}
        return _pick_keys(path, fields, "field"), {}
    if isinstance(obj, np.ndarray):
        raise InputError(
            path, f"expected a structured array with fields t, x, y, p (or EventGPT's pickled dict), got {_describe(obj)}"
        )
    raise InputError(path, f"expected a dict with keys x, y, t, p in the pickled .npy, got {_describe(obj)}")


def _trusted_load(path: Path) -> Any:
    """Plain ``np.load(allow_pickle=True)``: runs whatever the pickle says. The caller opted in."""
    try:
        obj = np.load(path, allow_pickle=True)
    except Exception as err:  # noqa: BLE001  whatever the trusted pickle raises
        raise InputError(path, f"not a readable pickled .npy file ({_one_line(err)})") from None
    if isinstance(obj, np.ndarray) and obj.shape == () and obj.dtype == object:
        obj = obj.item()
    return obj


def _load_npz(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with open(path, "rb") as fh:
        if fh.read(6) == b"\x93NUMPY":
            raise InputError(path, "not a readable .npz file: not a .npz archive (it starts like a .npy array; rename it to .npy)")
    try:
        with zipfile.ZipFile(path) as zf:
            declared = sum(info.file_size for info in zf.infolist())
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise InputError(path, f"not a readable .npz file ({_one_line(err)})") from None
    if declared > MAX_EVENTS_PER_READ * 16:
        raise InputError(path, f"its arrays unpack to {declared} bytes, more than one read may hold ({MAX_EVENTS_PER_READ} events); split it or convert it to .h5 and read it in windows")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise InputError(path, f"not a readable .npz file ({_one_line(err)})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise InputError(path, f"not a .npz archive (it holds {_describe(npz)}, as a .npy would)")
    try:
        names = set(npz.files)
        missing = [k for k in EVENT_KEYS if k not in names]
        if missing:
            raise InputError(path, _missing_text("array", missing, sorted(names)))
        arrays = {k: npz[k] for k in EVENT_KEYS}
        meta = {k: _scalar(path, k, npz[k]) for k in ("height", "width", "t_offset") if k in names}
    except InputError:
        raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, KeyError) as err:
        raise InputError(path, f"not a readable .npz file ({_one_line(err)})") from None
    finally:
        npz.close()
    return arrays, meta


def _load_h5(path: Path, t0_us: int | None, t1_us: int | None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    import h5py

    have_plugin = _import_hdf5plugin()
    try:
        with h5py.File(path, "r") as f:
            missing = [f"events/{k}" for k in EVENT_KEYS if f"events/{k}" not in f]
            if missing:
                raise InputError(path, _missing_text("dataset", missing, _h5_names(f)))
            ds = {k: f[f"events/{k}"] for k in EVENT_KEYS}
            lengths = {k: d.shape for k, d in ds.items()}
            if any(len(s) != 1 for s in lengths.values()) or len({s[0] for s in lengths.values()}) != 1:
                shown = ", ".join(f"{k} {s}" for k, s in lengths.items())
                raise InputError(path, f"events/x, y, t, p must be 1-D of one length, got shapes {shown}")
            n = int(lengths["t"][0])
            for k, d in ds.items():
                _check_h5_stored(path, f"events/{k}", d)
            ms_ds = f.get("ms_to_idx")
            if ms_ds is not None and (not isinstance(ms_ds, h5py.Dataset) or len(ms_ds.shape) != 1):
                raise InputError(path, f"ms_to_idx must be a 1-D dataset, got {ms_ds!r}")
            meta: dict[str, Any] = {}
            if "t_offset" in f:
                meta["t_offset"] = _scalar(path, "t_offset", f["t_offset"][()])
            for key in ("height", "width"):
                if key in f.attrs:
                    meta[key] = _scalar(path, key, f.attrs[key])

            if t0_us is None and t1_us is None:
                _check_count(path, n)
                arrays = {k: d[()] for k, d in ds.items()}
            elif ms_ds is None or ms_ds.shape[0] == 0:
                _check_count(path, n)
                t = ds["t"][()]
                keep = _window_mask_or_slice(t, t0_us, t1_us)
                arrays = {k: (t if k == "t" else d[()])[keep] for k, d in ds.items()}
            else:
                i0, i1 = _h5_rows(path, ms_ds, n, t0_us, t1_us)
                _check_count(path, i1 - i0)
                t = ds["t"][i0:i1]
                if t.size > 1 and np.any(t[1:] < t[:-1]):
                    raise InputError(path, "events/t is not sorted, so ms_to_idx cannot locate a time window")
                # ms_to_idx must bracket the window: the row before i0 is earlier, the row at i1 later.
                before_ok = i0 == 0 or t0_us is None or int(ds["t"][i0 - 1 : i0][0]) < t0_us
                after_ok = i1 >= n or t1_us is None or int(ds["t"][i1 : i1 + 1][0]) >= t1_us
                if not (before_ok and after_ok):
                    raise InputError(path, "ms_to_idx does not match events/t (a time window would miss events)")
                j0 = 0 if t0_us is None else int(np.searchsorted(t, t0_us, side="left"))
                j1 = t.size if t1_us is None else int(np.searchsorted(t, t1_us, side="left"))
                arrays = {k: (t[j0:j1] if k == "t" else d[i0 + j0 : i0 + j1]) for k, d in ds.items()}
    except InputError:
        raise
    except OSError as err:
        text = _one_line(err)
        if not have_plugin and ("filter" in text.lower() or "plugin" in text.lower()):
            raise InputError(
                path, f"uses an HDF5 compression filter that needs the hdf5plugin package (pip install hdf5plugin): {text}"
            ) from None
        raise InputError(path, f"not a readable HDF5 file ({text})") from None
    return arrays, meta


def _import_hdf5plugin() -> bool:
    """Register the Blosc & co. HDF5 filters if the package is there (DSEC needs it)."""
    try:
        import hdf5plugin  # noqa: F401  (importing registers the filters)
    except ImportError:
        return False
    return True


def _h5_rows(path: Path, ms_ds: Any, n: int, t0_us: int | None, t1_us: int | None) -> tuple[int, int]:
    """Rows ``[i0, i1)`` that contain every event of ``[t0_us, t1_us)`` (a superset), from the
    two entries of DSEC's ``ms_to_idx`` that bracket the window (only those are read)."""
    size = int(ms_ds.shape[0])

    def entry(k: int) -> int:
        value = int(np.asarray(ms_ds[k : k + 1]).astype(np.int64)[0])
        if not 0 <= value <= n:
            raise InputError(path, f"ms_to_idx[{k}] = {value} is not a row of the {n} events")
        return value

    i0, i1 = 0, n
    if t0_us is not None and t0_us > 0:
        k0 = t0_us // 1000  # ms_to_idx[k0] is the first event with t >= 1000*k0 <= t0_us
        i0 = entry(min(k0, size - 1))
    if t1_us is not None:
        k1 = -(-t1_us // 1000)  # ceil: the first event with t >= 1000*k1 >= t1_us
        if k1 <= 0:
            i1 = entry(0)
        elif k1 < size:
            i1 = entry(k1)
    if i1 < i0 and t1_us is not None and (t0_us is None or t1_us > t0_us):
        raise InputError(path, "ms_to_idx is not sorted (a later millisecond points to an earlier row)")
    return i0, max(i0, i1)


H5_MAX_RATIO = 1024
"""A dataset may declare at most this many bytes per byte it stores (DSEC's Blosc files store
about 1 byte per 4): beyond, its shape is corrupt and reading it would only allocate fill values."""


def _check_h5_stored(path: Path, name: str, ds: Any) -> None:
    """Refuse a dataset whose declared size is far beyond what the file stores for it."""
    import h5py

    if not isinstance(ds, h5py.Dataset):
        raise InputError(path, f"{name} must be a dataset, got {type(ds).__name__}")
    declared = int(np.prod(ds.shape, dtype=np.float64)) * int(ds.dtype.itemsize) if ds.shape else int(ds.dtype.itemsize)
    stored = int(ds.id.get_storage_size())
    if declared > H5_MAX_RATIO * max(stored, 1 << 16):
        raise InputError(path, f"{name} declares {declared} bytes but the file stores {stored} for it (corrupt shape)")


def _check_count(path: Path, n: int) -> None:
    if n > MAX_EVENTS_PER_READ:
        raise InputError(path, f"holds {n} events, more than one read may hold ({MAX_EVENTS_PER_READ}); read it in windows (--window-ms)")


def _h5_names(f: Any) -> list[str]:
    names: list[str] = []
    f.visit(names.append)
    return sorted(names)


def _pick_keys(path: Path, mapping: dict[Any, Any], what: str) -> dict[str, np.ndarray]:
    names = [str(k) for k in mapping]
    missing = [k for k in EVENT_KEYS if k not in mapping]
    if missing:
        raise InputError(path, _missing_text(what, missing, names))
    return {k: np.asarray(mapping[k]) for k in EVENT_KEYS}


def _missing_text(what: str, missing: list[str], present: Sequence[str]) -> str:
    have = ", ".join(present) if present else "none"
    return f"missing {what}(s) {', '.join(missing)} (found: {have}); an event file needs x, y, t, p"


def _scalar(path: Path, name: str, value: Any) -> int:
    arr = np.asarray(value)
    if arr.size != 1 or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(path, f"{name} must be one number, got {_describe(arr)}")
    return int(arr.reshape(()))


def _window_in_memory(
    path: Path, arrays: dict[str, np.ndarray], t0_us: int | None, t1_us: int | None
) -> dict[str, np.ndarray]:
    if t0_us is None and t1_us is None:
        return arrays
    _check_shapes(path, arrays)
    t = _as_int(path, "t", arrays["t"])
    keep = _window_mask_or_slice(t, t0_us, t1_us)
    return {k: (t if k == "t" else v)[keep] for k, v in arrays.items()}


def _window_mask_or_slice(t: np.ndarray, t0_us: int | None, t1_us: int | None) -> slice | np.ndarray:
    lo = np.iinfo(np.int64).min if t0_us is None else t0_us
    hi = np.iinfo(np.int64).max if t1_us is None else t1_us
    if t.size < 2 or not np.any(t[1:] < t[:-1]):
        return slice(int(np.searchsorted(t, lo, side="left")), int(np.searchsorted(t, hi, side="left")))
    return (t >= lo) & (t < hi)


def _check_shapes(path: Path, arrays: dict[str, np.ndarray]) -> None:
    for k in EVENT_KEYS:
        if arrays[k].ndim != 1:
            raise InputError(path, f"{k} must be a 1-D array, got shape {arrays[k].shape}")
    lengths = {k: int(arrays[k].shape[0]) for k in EVENT_KEYS}
    if len(set(lengths.values())) != 1:
        shown = ", ".join(f"{k} {n}" for k, n in lengths.items())
        raise InputError(path, f"arrays have different lengths: {shown}")


def _as_int(path: Path, name: str, arr: np.ndarray) -> np.ndarray:
    """``arr`` as an integer array (integers and bools as they are, no copy; integral floats
    converted to int64)."""
    if arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer):
        if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
            raise InputError(path, f"{name} has values beyond the int64 range")
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
            raise InputError(path, f"{name} has non-integer values (dtype {arr.dtype})")
        return arr.astype(np.int64)
    raise InputError(path, f"{name} must hold integers, got dtype {arr.dtype}")


def _pack(
    path: Path,
    arrays: dict[str, np.ndarray],
    height: int | None,
    width: int | None,
    *,
    window: tuple[int | None, int | None],
    notes: list[str],
) -> np.ndarray:
    """Validate the four arrays and pack them into ``EVENT_DTYPE``, sorted by ``t``.

    Appends to ``notes`` what it changed (a stable sort of out-of-order events).
    """
    _check_shapes(path, arrays)
    n = int(arrays["t"].shape[0])
    if n == 0:
        if window == (None, None):
            raise InputError(path, "holds no events (empty stream)")
        lo = "-inf" if window[0] is None else window[0]
        hi = "inf" if window[1] is None else window[1]
        raise InputError(path, f"no events in the time window [{lo}, {hi}) us")
    _check_count(path, n)
    x = _as_int(path, "x", arrays["x"])
    y = _as_int(path, "y", arrays["y"])
    t = _as_int(path, "t", arrays["t"])
    p = _as_int(path, "p", arrays["p"])

    t_min = int(t.min())
    if t_min < 0:
        raise InputError(
            path,
            f"negative timestamps (min t {t_min} us); stagewise needs microseconds >= 0 from the recording start "
            "(it does not shift times, so that time windows keep their meaning)",
        )
    x_min, x_max, y_min, y_max = int(x.min()), int(x.max()), int(y.min()), int(y.max())
    if x_min < 0 or y_min < 0:
        raise InputError(path, f"negative coordinates (min x {x_min}, min y {y_min})")
    if x_max > _UINT16_MAX or y_max > _UINT16_MAX:
        raise InputError(path, f"coordinates beyond {_UINT16_MAX} (max x {x_max}, max y {y_max})")
    if height is not None and width is not None:
        if x_max >= width or y_max >= height:
            raise InputError(
                path,
                f"coordinates out of range for sensor size {width}x{height} (width x height): "
                f"max x {x_max} (must be < {width}), max y {y_max} (must be < {height})",
            )
    elif max(x_max, y_max) >= MAX_SENSOR_SIDE:
        raise InputError(
            path,
            f"coordinates up to x {x_max}, y {y_max} with no sensor size known; stagewise accepts at most "
            f"{MAX_SENSOR_SIDE} pixels per side unless told the size: pass --sensor-size WxH",
        )

    # min/max instead of np.unique: this runs on every sample (stage 1), unique only for the message.
    p_min, p_max = int(p.min()), int(p.max())
    if p_min >= 0 and p_max <= 1:
        p8 = p.astype(np.uint8, copy=False)
    elif p_min >= -1 and p_max <= 1 and not np.any(p == 0):
        p8 = (p > 0).astype(np.uint8)  # -1 -> 0 (OFF), 1 -> 1 (ON)
    else:
        values = np.unique(p)
        shown = ", ".join(str(v) for v in values[:8]) + (", ..." if values.size > 8 else "")
        raise InputError(path, f"polarity must be 0/1 (or -1/1), found values {shown}")

    events = np.empty(n, dtype=EVENT_DTYPE)
    events["t"] = t
    events["x"] = x
    events["y"] = y
    events["p"] = p8
    backward = int(np.count_nonzero(events["t"][1:] < events["t"][:-1])) if n > 1 else 0
    if backward:
        events = events[np.argsort(events["t"], kind="stable")]
        notes.append(f"timestamps were out of order at {backward} place(s): events sorted stably by t")
    return events


def _check_sensor_size(sensor_size: tuple[int, int], path: Path | None = None) -> None:
    """``(height, width)`` must be two integers in ``1 .. MAX_SENSOR_SIDE``."""
    try:
        h, w = (int(v) for v in sensor_size)
    except (TypeError, ValueError):
        raise InputError(path, f"sensor size must be (height, width), got {sensor_size!r}") from None
    if min(h, w) < 1 or max(h, w) > MAX_SENSOR_SIDE:
        where = "states" if path is not None else "given as"
        raise InputError(path, f"sensor size {where} {w}x{h} (WxH); each side must be in 1..{MAX_SENSOR_SIDE}")


def _describe(obj: Any) -> str:
    if isinstance(obj, np.ndarray):
        return f"an array of dtype {obj.dtype} and shape {obj.shape}"
    return f"a {type(obj).__name__}"


def _one_line(err: BaseException, limit: int = 300) -> str:
    """``"<Type>: <message>"`` on one line, at most ``limit`` characters of message."""
    text = " ".join(str(err).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# --------------------------------------------------------------------------- writers


def write_events(path: str | Path, stream: EventStream) -> Path:
    """Write ``stream`` in a safe (pickle-free) format chosen by the suffix.

    - ``.npz``: arrays ``x`` (uint16), ``y`` (uint16), ``t`` (int64 us), ``p`` (uint8), plus
      ``t_offset`` and, when known, ``height``/``width`` scalars. Uncompressed.
    - ``.npy``: one structured array of ``EVENT_DTYPE`` (sensor size and ``t_offset`` are
      not stored).
    - ``.h5`` / ``.hdf5``: DSEC layout, uncompressed: ``events/{x,y,t,p}`` (uint16,
      uint16, uint32 when it fits else int64, uint8), ``ms_to_idx`` (uint64,
      ``ms_to_idx[k]`` = first row with ``t >= 1000 k``, for ``k = 0 .. t.max() // 1000``),
      ``t_offset`` (int64 scalar) and, when known, ``height``/``width`` file attributes.

    Args:
        path: the output file; its suffix picks the format. Overwritten if present.
        stream: the events to write (empty streams are written as empty arrays).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        InputError: unknown suffix.
        ValueError: for ``.h5``, ``t`` is negative or not sorted (``ms_to_idx`` needs both).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    ev = stream.events
    if suffix == ".npz":
        extra: dict[str, np.ndarray] = {"t_offset": np.int64(stream.t_offset_us)}
        if stream.height is not None:
            extra["height"] = np.int64(stream.height)
        if stream.width is not None:
            extra["width"] = np.int64(stream.width)
        with open(path, "wb") as fh:
            np.savez(fh, x=ev["x"], y=ev["y"], t=ev["t"], p=ev["p"], **extra)
    elif suffix == ".npy":
        with open(path, "wb") as fh:
            np.save(fh, np.ascontiguousarray(ev), allow_pickle=False)
    elif suffix in (".h5", ".hdf5"):
        _write_h5(path, stream)
    else:
        raise InputError(path, f"unknown event file type {suffix or '(no suffix)'!r}; expected one of {', '.join(EVENT_SUFFIXES)}")
    return path


def _write_h5(path: Path, stream: EventStream) -> None:
    import h5py

    t = stream.events["t"]
    if t.size and t.min() < 0:
        raise ValueError(f"{path}: DSEC layout needs t >= 0 (relative to t_offset), got min t {int(t.min())}")
    if t.size > 1 and np.any(t[1:] < t[:-1]):
        raise ValueError(f"{path}: DSEC layout needs events sorted by t (ms_to_idx indexes sorted rows)")
    t_dtype = np.uint32 if (t.size == 0 or t.max() <= np.iinfo(np.uint32).max) else np.int64
    if t.size:
        edges = np.arange(int(t.max()) // 1000 + 1, dtype=np.int64) * 1000
        ms_to_idx = np.searchsorted(t, edges, side="left").astype(np.uint64)
    else:
        ms_to_idx = np.zeros(0, dtype=np.uint64)
    with h5py.File(path, "w") as f:
        g = f.create_group("events")
        g.create_dataset("x", data=stream.events["x"].astype(np.uint16))
        g.create_dataset("y", data=stream.events["y"].astype(np.uint16))
        g.create_dataset("t", data=t.astype(t_dtype))
        g.create_dataset("p", data=stream.events["p"].astype(np.uint8))
        f.create_dataset("ms_to_idx", data=ms_to_idx)
        f.create_dataset("t_offset", data=np.int64(stream.t_offset_us))
        if stream.height is not None:
            f.attrs["height"] = np.int64(stream.height)
        if stream.width is not None:
            f.attrs["width"] = np.int64(stream.width)


# --------------------------------------------------------------------------- windows and parts


def check_duration(
    stream: EventStream, *, max_duration_us: int = EVENTGPT_MAX_DURATION_US, window: bool = False
) -> EventStream:
    """Enforce EventGPT's limit ``t.max - t.min < max_duration_us`` (default 100 ms).

    Args:
        stream: the stream to check.
        max_duration_us: the exclusive limit in microseconds.
        window: when the stream is too long, return its first window
            ``[t_min, t_min + max_duration_us)`` instead of raising.

    Returns:
        ``stream`` itself when short enough, else (``window=True``) a new stream holding
        the events of the first window, in stream order.

    Raises:
        InputError: the stream is too long and ``window`` is False; the message gives the
            duration and says to pass ``--window``.
        ValueError: ``max_duration_us < 1``.
    """
    if max_duration_us < 1:
        raise ValueError(f"max_duration_us: must be >= 1, got {max_duration_us}")
    duration = stream.duration_us
    if duration < max_duration_us:
        return stream
    if not window:
        raise InputError(
            stream.source,
            f"stream lasts {duration} us (t.max - t.min) but EventGPT accepts less than {max_duration_us} us; "
            f"pass --window to keep only the first window [t_min, t_min + {max_duration_us}) us",
        )
    t_min = int(stream.events["t"].min())
    return replace(stream, events=slice_time(stream.events, t_min, t_min + max_duration_us))


def slice_time(events: np.ndarray, t0_us: int, t1_us: int) -> np.ndarray:
    """The events with ``t0_us <= t < t1_us`` (half-open window), in stream order.

    Uses two binary searches when ``t`` is sorted (the result is then a view), a boolean
    mask otherwise (a copy).

    Args:
        events: ``[N]`` ``EVENT_DTYPE`` array.
        t0_us: window start, inclusive, microseconds.
        t1_us: window end, exclusive, microseconds.

    Returns:
        ``[M]`` ``EVENT_DTYPE`` array, ``M >= 0`` (``M == 0`` when ``t0_us >= t1_us``).
    """
    if t0_us >= t1_us:
        return events[:0]
    return events[_window_mask_or_slice(events["t"], t0_us, t1_us)]


def split_equal_count(events: np.ndarray, n: int) -> list[np.ndarray]:
    """Cut ``events`` into ``n`` consecutive parts of ``len(events) // n`` events; the last
    part also takes the remainder (EventGPT's rule).

    Args:
        events: ``[N]`` array (any dtype; ``EVENT_DTYPE`` in practice).
        n: number of parts, ``1 <= n <= N``.

    Returns:
        ``n`` views into ``events``: parts ``0 .. n-2`` have ``N // n`` events, the last
        ``N - (n - 1) * (N // n)``.

    Raises:
        ValueError: ``n < 1`` or ``N < n``.
    """
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    total = int(events.shape[0])
    if total < n:
        raise ValueError(f"cannot split {total} events into {n} parts of equal count (need at least {n})")
    per = total // n
    return [events[i * per : (i + 1) * per] for i in range(n - 1)] + [events[(n - 1) * per :]]


# --------------------------------------------------------------------------- pre-rendered frames


def read_event_frames(paths: Sequence[str | Path]) -> list[np.ndarray]:
    """Read pre-rendered event images (PNG or any Pillow format) as RGB.

    Args:
        paths: image files, in temporal order.

    Returns:
        One ``[H, W, 3]`` uint8 RGB array per path (``[]`` for no paths); grey or RGBA
        images are converted to RGB by Pillow.

    Raises:
        InputError: a file is missing, not an image, truncated or otherwise unreadable.
    """
    from PIL import Image, UnidentifiedImageError

    frames: list[np.ndarray] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise InputError(path, "no such image file")
        try:
            with Image.open(path) as im:
                im.load()
                frames.append(np.array(im.convert("RGB"), dtype=np.uint8))
        except UnidentifiedImageError:
            raise InputError(path, "unreadable image (not a PNG or other image Pillow can identify)") from None
        except (OSError, ValueError, SyntaxError) as err:
            raise InputError(path, f"unreadable image ({_one_line(err)})") from None
    return frames

