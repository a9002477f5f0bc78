"""Stage 1: event streams from disk into one structured array.

Why one dtype: every reader (EventGPT's pickled ``.npy`` dict, structured ``.npy``,
``.npz``, DSEC ``events.h5``) ends in the same ``EVENT_DTYPE`` array, so stage 2 and the
report never care where the events came from. Timestamps are integer microseconds
(``t``), coordinates are pixel columns/rows (``x``/``y``), polarity is 0 (OFF) or 1 (ON).

Time windows are half-open everywhere: ``[t0_us, t1_us)`` holds the events with
``t0_us <= t < t1_us``.

Safety: EventGPT's own sample format is a *pickle* (``np.load(allow_pickle=True)``), and
unpickling an untrusted file can run arbitrary code. ``read_events(...,
allow_pickle=False)`` refuses it; ``write_events`` writes the safe formats (``.npz``,
structured ``.npy``, DSEC-layout ``.h5``) that need no pickle.

Bad input raises :class:`stagewise.errors.InputError` whose text is one line:
``"<file>: <problem>"``.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stagewise.errors import InputError

EVENT_DTYPE = np.dtype([("t", "<i8"), ("x", "<u2"), ("y", "<u2"), ("p", "u1")])
"""One event: ``t`` int64 microseconds, ``x``/``y`` uint16 pixel column/row, ``p`` uint8 0/1."""

EVENT_KEYS: tuple[str, ...] = ("x", "y", "t", "p")
"""The arrays every event file must provide (EventGPT's dict keys)."""

EVENT_SUFFIXES: tuple[str, ...] = (".npy", ".npz", ".h5", ".hdf5")

EVENTGPT_MAX_DURATION_US = 100_000
"""The released EventGPT refuses streams with ``t.max - t.min >= 100000`` us."""

_SAFE_FORMATS = ".npz (arrays x, y, t, p), a structured .npy (fields t, x, y, p) or a DSEC-layout .h5"
_UINT16_MAX = np.iinfo(np.uint16).max


@dataclass(frozen=True)
class EventStream:
    """An event stream in memory.

    Attributes:
        events: ``[N]`` array of ``EVENT_DTYPE`` in stream order (as stored; usually
            sorted by ``t``, which is not enforced).
        height: sensor height in pixels when known, else ``None``.
        width: sensor width in pixels when known, else ``None``.
        source: where the events came from (a file path, or a description such as
            ``"simulated:moving_edge(seed=0)"``); used in error messages.
        t_offset_us: absolute time of ``t == 0`` in microseconds (DSEC's ``t_offset``;
            0 when the file has none).

    Raises:
        ValueError: ``events`` is not a 1-D ``EVENT_DTYPE`` array, or a size is < 1.
    """

    events: np.ndarray
    height: int | None
    width: int | None
    source: str
    t_offset_us: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.events, np.ndarray) or self.events.dtype != EVENT_DTYPE:
            raise ValueError(f"events: expected a numpy array of EVENT_DTYPE, got {_describe(self.events)}")
        if self.events.ndim != 1:
            raise ValueError(f"events: expected a 1-D array, got shape {self.events.shape}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: must be >= 1 or None, got {value}")

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


# --------------------------------------------------------------------------- readers


def read_events(
    path: str | Path,
    *,
    allow_pickle: bool = True,
    sensor_size: tuple[int, int] | None = None,
    t0_us: int | None = None,
    t1_us: int | None = None,
) -> EventStream:
    """Read an event file into an :class:`EventStream`.

    Formats, by suffix:

    - ``.npy``: EventGPT's sample format, a **pickled** dict ``{x, y, t, p}`` loaded with
      ``np.load(allow_pickle=True).item()``. A pickle can run arbitrary code when loaded:
      only read files you trust, or pass ``allow_pickle=False`` to refuse pickles. A
      ``.npy`` holding a structured array with fields ``t, x, y, p`` is read without
      pickle in either case.
    - ``.npz``: arrays ``x, y, t, p`` (optional scalars ``height``, ``width``,
      ``t_offset``); never unpickled.
    - ``.h5`` / ``.hdf5``: DSEC layout ``events/{x,y,t,p}``, ``ms_to_idx``, ``t_offset``.
      With a window, ``ms_to_idx`` (``ms_to_idx[k]`` = index of the first event with
      ``t >= 1000 k``) locates the rows, so only the window is read from disk. Times are
      the file's ``events/t`` (microseconds since ``t_offset``), which goes to
      ``EventStream.t_offset_us``. Blosc-compressed files (as DSEC ships them) need the
      ``hdf5plugin`` package, imported only when an HDF5 file is opened.

    Polarity: ``{0, 1}`` is kept; ``{-1, 1}`` is accepted and ``-1`` is mapped to 0.
    Coordinates must be integers in ``[0, 65535]``, and inside ``sensor_size`` when given.

    Args:
        path: the event file.
        allow_pickle: allow EventGPT's pickled ``.npy`` dict (default ``True``, as the
            reference does). ``False`` refuses it with an error that names the safe formats.
        sensor_size: ``(height, width)`` of the sensor; coordinates are checked against
            it and it becomes the stream's ``height``/``width``. When ``None`` the size is
            taken from the file if stored there (``.npz``/``.h5`` written by
            :func:`write_events`), else unknown.
        t0_us: keep events with ``t >= t0_us`` (``None``: from the start).
        t1_us: keep events with ``t < t1_us`` (``None``: to the end). Window ``[t0, t1)``.

    Returns:
        An :class:`EventStream` of ``N >= 1`` events in file order.

    Raises:
        InputError: missing file, unknown suffix, unreadable or corrupt file, refused
            pickle, missing keys (all listed), arrays of different lengths or not 1-D,
            non-integer values, no events (in the window), negative or out-of-range
            coordinates, polarity outside ``{0, 1}`` / ``{-1, 1}``, or an empty window
            (``t0_us >= t1_us``).
    """
    path = Path(path)
    if t0_us is not None and t1_us is not None and t0_us >= t1_us:
        raise InputError(path, f"empty time window [{t0_us}, {t1_us}) us: t0_us must be < t1_us")
    if sensor_size is not None:
        _check_sensor_size(sensor_size)
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a folder, not an event file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arrays, meta = _load_npy(path, allow_pickle=allow_pickle)
        arrays = _window_in_memory(path, arrays, t0_us, t1_us)
    elif suffix == ".npz":
        arrays, meta = _load_npz(path)
        arrays = _window_in_memory(path, arrays, t0_us, t1_us)
    elif suffix in (".h5", ".hdf5"):
        arrays, meta = _load_h5(path, t0_us, t1_us)
    else:
        raise InputError(path, f"unknown event file type {suffix or '(no suffix)'!r}; expected one of {', '.join(EVENT_SUFFIXES)}")

    if sensor_size is not None:
        height, width = int(sensor_size[0]), int(sensor_size[1])
    else:
        height, width = meta.get("height"), meta.get("width")
    events = _pack(path, arrays, height, width, window=(t0_us, t1_us))
    return EventStream(events=events, height=height, width=width, source=str(path), t_offset_us=int(meta.get("t_offset", 0)))


def _load_npy(path: Path, *, allow_pickle: bool) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "allow_pickle" not in str(err):
            raise InputError(path, f"not a readable .npy file ({_one_line(err)})") from None
        arr = None  # an object array: EventGPT's pickled dict
    except (OSError, EOFError) as err:
        raise InputError(path, f"not a readable .npy file ({_one_line(err)})") from None
    if isinstance(arr, np.lib.npyio.NpzFile):
        arr.close()
        raise InputError(path, "is a .npz archive, not a .npy file; rename it to .npz")

    if arr is None:
        if not allow_pickle:
            raise InputError(
                path,
                "is a pickled .npy (EventGPT's dict format); a pickle can run arbitrary code when loaded, "
                f"so it is refused with allow_pickle=False; use {_SAFE_FORMATS} instead "
                "(stagewise.inputs.events.write_events writes them)",
            )
        try:  # A pickle: this runs whatever the file says. The caller opted in.
            obj = np.load(path, allow_pickle=True)
            if isinstance(obj, np.ndarray) and obj.shape == () and obj.dtype == object:
                obj = obj.item()
        except (OSError, EOFError, ValueError, TypeError, AttributeError, ImportError, pickle.UnpicklingError) as err:
            raise InputError(path, f"not a readable pickled .npy file ({_one_line(err)})") from None
        if isinstance(obj, np.ndarray) and obj.dtype.names:
            arr = obj
        elif isinstance(obj, dict):
            return _pick_keys(path, obj, "key"), {}
        else:
            raise InputError(path, f"expected a dict with keys x, y, t, p in the pickled .npy, got {_describe(obj)}")

    if arr.dtype.names is None:
        raise InputError(
            path, f"expected a structured array with fields t, x, y, p (or EventGPT's pickled dict), got {_describe(arr)}"
        )
    fields = {name: arr[name] for name in arr.dtype.names}
    return _pick_keys(path, fields, "field"), {}


def _load_npz(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
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
            n = lengths["t"][0]
            ms_to_idx = f["ms_to_idx"][()] if "ms_to_idx" in f else None
            meta: dict[str, Any] = {}
            if "t_offset" in f:
                meta["t_offset"] = _scalar(path, "t_offset", f["t_offset"][()])
            for key in ("height", "width"):
                if key in f.attrs:
                    meta[key] = _scalar(path, key, f.attrs[key])

            if t0_us is None and t1_us is None:
                arrays = {k: d[()] for k, d in ds.items()}
            elif ms_to_idx is None:
                t = ds["t"][()]
                keep = _window_mask_or_slice(t, t0_us, t1_us)
                arrays = {k: (t if k == "t" else d[()])[keep] for k, d in ds.items()}
            else:
                i0, i1 = _h5_rows(path, ms_to_idx, n, t0_us, t1_us)
                t = ds["t"][i0:i1]
                if t.size > 1 and np.any(t[1:] < t[:-1]):
                    raise InputError(path, "events/t is not sorted, so ms_to_idx cannot locate a time window")
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


def _h5_rows(path: Path, ms_to_idx: np.ndarray, n: int, t0_us: int | None, t1_us: int | None) -> tuple[int, int]:
    """Rows ``[i0, i1)`` that contain every event of ``[t0_us, t1_us)`` (a superset)."""
    ms = np.asarray(ms_to_idx).astype(np.int64).ravel()
    if ms.size and (ms.min() < 0 or ms.max() > n or np.any(ms[1:] < ms[:-1])):
        raise InputError(path, f"ms_to_idx is not a sorted index into the {n} events")
    i0, i1 = 0, n
    if t0_us is not None and t0_us > 0 and ms.size:
        k0 = t0_us // 1000  # ms_to_idx[k0] is the first event with t >= 1000*k0 <= t0_us
        i0 = int(ms[min(k0, ms.size - 1)])
    if t1_us is not None and ms.size:
        k1 = -(-t1_us // 1000)  # ceil: the first event with t >= 1000*k1 >= t1_us
        if k1 <= 0:
            i1 = int(ms[0])
        elif k1 < ms.size:
            i1 = int(ms[k1])
    return i0, max(i0, i1)


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
) -> np.ndarray:
    """Validate the four arrays and pack them into ``EVENT_DTYPE``."""
    _check_shapes(path, arrays)
    n = int(arrays["t"].shape[0])
    if n == 0:
        if window == (None, None):
            raise InputError(path, "holds no events (empty stream)")
        lo = "-inf" if window[0] is None else window[0]
        hi = "inf" if window[1] is None else window[1]
        raise InputError(path, f"no events in the time window [{lo}, {hi}) us")
    x = _as_int(path, "x", arrays["x"])
    y = _as_int(path, "y", arrays["y"])
    t = _as_int(path, "t", arrays["t"])
    p = _as_int(path, "p", arrays["p"])

    x_min, x_max, y_min, y_max = int(x.min()), int(x.max()), int(y.min()), int(y.max())
    if x_min < 0 or y_min < 0:
        raise InputError(path, f"negative coordinates (min x {x_min}, min y {y_min})")
    if x_max > _UINT16_MAX or y_max > _UINT16_MAX:
        raise InputError(path, f"coordinates beyond {_UINT16_MAX} (max x {x_max}, max y {y_max})")
    if height is not None and width is not None and (x_max >= width or y_max >= height):
        raise InputError(
            path,
            f"coordinates out of range for sensor size {height}x{width} (height x width): "
            f"max x {x_max} (must be < {width}), max y {y_max} (must be < {height})",
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
    return events


def _check_sensor_size(sensor_size: tuple[int, int]) -> None:
    if len(sensor_size) != 2 or min(int(sensor_size[0]), int(sensor_size[1])) < 1:
        raise InputError(None, f"sensor size must be (height, width) with both >= 1, got {tuple(sensor_size)}")


def _describe(obj: Any) -> str:
    if isinstance(obj, np.ndarray):
        return f"an array of dtype {obj.dtype} and shape {obj.shape}"
    return f"a {type(obj).__name__}"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
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

