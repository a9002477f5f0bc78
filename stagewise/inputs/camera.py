"""Stage 1 for the files event cameras write: Prophesee EVT 2.0 / 2.1 / 3.0 (``.raw``) and
DAT (``.dat``), iniVation AEDAT 4 (``.aedat4``), Event Stream (``.es``) and CSV (``.csv``).

All of them are decoded by `faery <https://github.com/aestream/faery>`_ (Rust, NumPy its only
dependency), an optional extra: ``pip install 'stagewise[camera]'``. It is imported only when
such a file is opened; without it the reader says how to install it in one line. Why faery:
it is the one maintained package that reads every format above (the others read one
format each), decodes a generated 10 s, 20 M-event recording correctly in every format at
30-40 M events/s on one CPU core, and yields the stream in chunks of a few thousand events,
so a window of a long recording is read without holding the recording in memory (notes and
numbers: ``docs/camera_readers.md``).

What comes out is what every stagewise reader returns (``stagewise.inputs.events``):

- ``t``: int64 microseconds from the **recording start**, which is the first event of the
  file (its absolute camera time goes to ``EventStream.t_offset_us``);
- ``x``/``y``: pixel column/row (faery's own conventions: Event Stream rows are flipped to
  top-down, as faery does);
- ``p``: 1 for ON, 0 for OFF.

Sensor size: from the file where it has one (EVT/DAT headers usually, AEDAT 4 and Event
Stream always, a faery-written CSV header ``t,x@W,y@H,on``), else the ``sensor_size``
argument (``--sensor-size WxH``); a format that needs a size and gets none is refused with a
line saying so. faery checks every event against the size it decodes with.

N-MNIST / N-Caltech101 ``.bin`` files are not read: the maintained reader (tonic's
``read_mnist_file``) comes with librosa, numba and scikit-learn; the refusal says how to
convert instead.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stagewise.errors import InputError

CAMERA_FORMATS: dict[str, str] = {
    ".raw": "evt",
    ".evt": "evt",
    ".dat": "dat",
    ".aedat4": "aedat",
    ".aedat": "aedat",
    ".es": "es",
    ".csv": "csv",
}
"""Suffix -> faery file type."""

FORMAT_NAMES: dict[str, str] = {
    "evt": "Prophesee EVT",
    "dat": "Prophesee DAT",
    "aedat": "AEDAT 4",
    "es": "Event Stream",
    "csv": "CSV",
}

UNSUPPORTED_FORMATS: dict[str, str] = {
    ".bin": (
        "N-MNIST / N-Caltech101 .bin files are not supported: the maintained reader (tonic.io.read_mnist_file) "
        "needs librosa, numba and scikit-learn; read it there and save x, y, t, p with numpy.savez (a .npz)"
    ),
    ".aedat2": "AEDAT 2 (jAER) files are not supported; only AEDAT 4 (.aedat4)",
    ".aedat3": "AEDAT 3.1 files are not supported; only AEDAT 4 (.aedat4)",
}
"""Event formats people have that stagewise refuses, with the reason."""

INSTALL_HINT = "pip install 'stagewise[camera]' (or pip install faery)"

_CURSORS_MAX = 4
"""Open decoders kept for sequential window reads (one per recording being windowed)."""

MAX_EVENTS_PER_READ = 1 << 28
"""As ``stagewise.inputs.events.MAX_EVENTS_PER_READ`` (repeated here: events imports this module)."""


def faery_module(path: str | Path | None = None, kind: str = "evt") -> Any:
    """Import faery lazily.

    Raises:
        InputError: faery is not installed; the message names the file's format and the
            install line.
    """
    try:
        import faery
    except ImportError:
        raise InputError(path, f"is a {FORMAT_NAMES.get(kind, kind)} file; reading it needs the optional faery package: {INSTALL_HINT}") from None
    return faery


@dataclass
class CameraFile:
    """An opened camera recording: what its header says and how to decode it.

    Attributes:
        path: the file.
        kind: faery's file type (``"evt"``, ``"dat"``, ``"aedat"``, ``"es"``, ``"csv"``).
        header_size: ``(height, width)`` stored in the file, or ``None``.
        decode_size: ``(height, width)`` faery decodes with (and checks events against): the
            file's, else the caller's ``sensor_size``.
    """

    path: Path
    kind: str
    header_size: tuple[int, int] | None
    decode_size: tuple[int, int]

    def chunks(self) -> Iterator[np.ndarray]:
        """The events in file order, as faery's chunks (structured ``t`` uint64 absolute
        microseconds, ``x``/``y`` uint16, ``on`` bool), a few thousand events each."""
        faery = faery_module(self.path, self.kind)
        h, w = self.decode_size
        stream = faery.events_stream_from_file(self.path, dimensions_fallback=(w, h), file_type=self.kind)
        for chunk in stream:
            if len(chunk):
                yield chunk


def open_camera(path: str | Path, sensor_size: tuple[int, int] | None) -> CameraFile:
    """Read a camera file's header and settle the sensor size.

    Args:
        path: a file whose suffix is in :data:`CAMERA_FORMATS`.
        sensor_size: ``(height, width)`` for files whose header has none.

    Returns:
        A :class:`CameraFile`.

    Raises:
        InputError: faery missing, not a file of that format, no sensor size in the file and
            none given, an EVT/DAT file with no format version in its header.
        Anything faery raises on a corrupt header (the caller, ``read_events``, turns it into
        an ``InputError``).
    """
    path = Path(path)
    kind = CAMERA_FORMATS[path.suffix.lower()]
    faery = faery_module(path, kind)
    header_size: tuple[int, int] | None
    if kind in ("evt", "dat"):
        header_size = _probe_evt_dat(faery, path, kind, sensor_size)
    elif kind == "aedat":
        _check_magic(path, b"#!AER-DAT4.0", "an AEDAT 4 file (AEDAT 2/3 from jAER are not supported)")
        header_size = None
        with faery.aedat.Decoder(path) as decoder:
            for track in decoder.tracks():
                if track.data_type == "events" and track.dimensions is not None:
                    header_size = (int(track.dimensions[1]), int(track.dimensions[0]))
                    break
        if header_size is None:
            raise InputError(path, "AEDAT 4 file with no event track")
    elif kind == "es":
        _check_magic(path, b"Event Stream", "an Event Stream file")
        with faery.es.Decoder(path, 0) as decoder:
            if decoder.event_type not in ("dvs", "atis") or decoder.dimensions is None:
                raise InputError(path, f"Event Stream of type {decoder.event_type!r}; only dvs and atis streams hold camera events")
            header_size = (int(decoder.dimensions[1]), int(decoder.dimensions[0]))
    else:
        header_size = _csv_header_size(path)
    size = header_size or sensor_size
    if size is None:
        raise InputError(path, f"{FORMAT_NAMES[kind]} file without a sensor size in its header; pass --sensor-size WxH (e.g. 640x480)")
    return CameraFile(path=path, kind=kind, header_size=header_size, decode_size=(int(size[0]), int(size[1])))


def _probe_evt_dat(faery: Any, path: Path, kind: str, sensor_size: tuple[int, int] | None) -> tuple[int, int] | None:
    """The header's ``(height, width)`` of an EVT/DAT file, or ``None`` when it has none."""
    module = faery.evt if kind == "evt" else faery.dat
    fallback = None if sensor_size is None else (int(sensor_size[1]), int(sensor_size[0]))
    for attempt in (None, fallback):
        try:
            with module.Decoder(path, attempt, None) as decoder:
                dims = decoder.dimensions
        except RuntimeError as err:
            text = str(err)
            if "no version information" in text:
                raise InputError(
                    path,
                    f"{FORMAT_NAMES[kind]} file without a format version in its header (a line such as "
                    + ("'% evt 3.0' or '% format EVT3'" if kind == "evt" else "'% Version 2'")
                    + "); stagewise does not guess it",
                ) from None
            if "no size information" in text:
                if attempt is None and fallback is not None:
                    continue
                raise InputError(path, f"{FORMAT_NAMES[kind]} file without a sensor size in its header; pass --sensor-size WxH (e.g. 1280x720)") from None
            raise
        if attempt is None:
            return (int(dims[1]), int(dims[0]))
        return None
    return None


def _check_magic(path: Path, magic: bytes, what: str) -> None:
    with open(path, "rb") as fh:
        head = fh.read(len(magic))
    if head != magic:
        raise InputError(path, f"not {what} (it starts with {head[:16]!r})")


def _csv_header_size(path: Path) -> tuple[int, int] | None:
    """``(height, width)`` from a faery-style CSV header ``t,x@W,y@H,on``, else ``None``."""
    with open(path, "rb") as fh:
        first = fh.readline(4096).decode("latin-1").strip()
    width = height = None
    for col in first.split(","):
        name, _, value = col.strip().partition("@")
        if value.isdigit() and name in ("x", "y"):
            if name == "x":
                width = int(value)
            else:
                height = int(value)
    if width and height:
        return (height, width)
    return None


# --------------------------------------------------------------------------- whole-file and windowed reads


def read_camera(
    path: Path, sensor_size: tuple[int, int] | None, t0_us: int | None, t1_us: int | None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Decode a camera file, or the window ``[t0_us, t1_us)`` of it, into the four arrays.

    Times are microseconds from the file's first event (module doc). A window is read by
    decoding chunks up to its end only; consecutive windows of one recording continue from
    where the previous one stopped (a cursor kept per recording), so windowing a recording
    decodes it once.

    Args:
        path: the camera file.
        sensor_size: ``(height, width)`` for files without one in the header.
        t0_us: window start (inclusive), ``None`` for the start of the recording.
        t1_us: window end (exclusive), ``None`` for its end.

    Returns:
        ``(arrays, meta)``: arrays ``x``, ``y`` (uint16), ``t`` (int64, relative), ``p``
        (uint8); meta ``t_offset`` (absolute time of the first event, us) and, when the
        file states it, ``height``/``width``.

    Raises:
        InputError: see :func:`open_camera`; a file with no events; a windowed read of a file
            whose timestamps go backwards (faery's decoders never produce that from a
            well-formed file).
    """
    cam = open_camera(path, sensor_size)
    meta: dict[str, Any] = {}
    if cam.header_size is not None:
        meta["height"], meta["width"] = cam.header_size
    if t0_us is None and t1_us is None:
        parts, total = [], 0
        for chunk in cam.chunks():
            total += len(chunk)
            if total > MAX_EVENTS_PER_READ:
                raise InputError(path, f"holds more than {MAX_EVENTS_PER_READ} events, more than one read may hold; read it in windows (--window-ms)")
            parts.append(chunk)
        if not parts:
            raise InputError(path, "holds no events (empty stream)")
        ev = np.concatenate(parts)
        origin = int(ev["t"][0])
    else:
        ev, origin = _CURSORS.window(cam, t0_us, t1_us)
    meta["t_offset"] = origin
    t = ev["t"].astype(np.int64) - origin
    return {"x": ev["x"], "y": ev["y"], "t": t, "p": ev["on"].astype(np.uint8)}, meta


def scan_camera_windows(
    path: Path, sensor_size: tuple[int, int] | None, window_us: int, max_windows: int | None
) -> tuple[list[int], int]:
    """The non-empty windows of a camera recording, decoding it once, chunk by chunk.

    Args:
        window_us: window length; window ``k`` is ``[k * window_us, (k + 1) * window_us)``
            in microseconds from the first event.
        max_windows: stop after this many non-empty windows (the rest is not decoded).

    Returns:
        ``(ks, n_empty)``: the sorted indices of the non-empty windows and the number of
        empty windows between the first and the last of them.

    Raises:
        InputError / faery's errors (turned into ``InputError`` by the caller).
    """
    cam = open_camera(path, sensor_size)
    origin: int | None = None
    last = -1
    found: set[int] = set()
    for chunk in cam.chunks():
        t = chunk["t"].astype(np.int64)
        if origin is None:
            origin = int(t[0])
        if t[0] < last or np.any(t[1:] < t[:-1]):
            raise InputError(path, "timestamps go backwards; a windowed read needs a time-ordered camera file")
        last = int(t[-1])
        ks = np.unique((t - origin) // window_us)
        found.update(int(k) for k in ks)
        if max_windows is not None and len(found) > max_windows:
            break  # the first max_windows windows are complete: a later window has started
    if origin is None:
        raise InputError(path, "holds no events (empty stream)")
    ks_sorted = sorted(found)
    if max_windows is not None:
        ks_sorted = ks_sorted[:max_windows]
    n_empty = (ks_sorted[-1] - ks_sorted[0] + 1 - len(ks_sorted)) if ks_sorted else 0
    return ks_sorted, n_empty


@dataclass
class _Cursor:
    """A live decoder positioned inside a recording.

    ``pending`` holds decoded chunks not yet consumed (the first may be the tail of a chunk
    the previous window ended in); ``replay`` the chunks the last window read, in full, so
    that reading that window again (``--repeats``) replays them instead of decoding the
    recording from its start.
    """

    key: tuple[Any, ...]
    chunks: Iterator[np.ndarray]
    origin: int
    pending: list[np.ndarray]
    pos: int  # every event with absolute t < pos has been consumed
    last_t: int
    replay: list[np.ndarray] = field(default_factory=list)
    replay_lo: int | None = None
    split: bool = False  # pending[0] is the tail of replay[-1]


_FAR = 2**62


@dataclass
class _CursorCache:
    """Cursors by recording, least recently used dropped first (at most ``_CURSORS_MAX``)."""

    cursors: OrderedDict[str, _Cursor] = field(default_factory=OrderedDict)

    def clear(self) -> None:
        self.cursors.clear()

    def window(self, cam: CameraFile, t0_us: int | None, t1_us: int | None) -> tuple[np.ndarray, int]:
        """Events with ``t0_us <= t - origin < t1_us`` (absolute ``t``) and the origin."""
        st = os.stat(cam.path)
        key = (str(cam.path.resolve()), st.st_ino, st.st_mtime_ns, st.st_size, cam.decode_size)
        name = key[0]
        cur = self.cursors.get(name)
        if cur is not None and cur.key != key:
            cur = None
        if cur is not None:
            lo = -_FAR if t0_us is None else cur.origin + t0_us
            if lo < cur.pos:  # going back
                if cur.replay_lo is not None and lo >= cur.replay_lo:
                    rest = cur.pending[1:] if cur.split else cur.pending
                    cur.pending, cur.pos = list(cur.replay) + rest, cur.replay_lo
                else:
                    cur = None  # before the last window: start over
        if cur is None:
            cur = self._open(cam, key)
        self.cursors[name] = cur
        self.cursors.move_to_end(name)
        while len(self.cursors) > _CURSORS_MAX:
            self.cursors.popitem(last=False)
        lo = -_FAR if t0_us is None else cur.origin + t0_us
        hi = _FAR if t1_us is None else cur.origin + t1_us
        out: list[np.ndarray] = []
        used: list[np.ndarray] = []
        split = False
        try:
            while True:
                if cur.pending:
                    chunk = cur.pending.pop(0)
                else:
                    chunk = next(cur.chunks, None)
                    if chunk is None:  # end of the recording
                        cur.pos = hi
                        break
                    t_new = chunk["t"].astype(np.int64)
                    if t_new[0] < cur.last_t or (t_new.size > 1 and np.any(t_new[1:] < t_new[:-1])):
                        raise InputError(cam.path, "timestamps go backwards; a windowed read needs a time-ordered camera file")
                    cur.last_t = int(t_new[-1])
                used.append(chunk)
                t = chunk["t"].astype(np.int64)
                i0 = int(np.searchsorted(t, lo, side="left"))
                i1 = int(np.searchsorted(t, hi, side="left"))
                if i1 > i0:
                    out.append(chunk[i0:i1])
                if i1 < len(chunk):  # the window ends inside this chunk: keep the rest for the next window
                    cur.pending.insert(0, chunk[i1:])
                    cur.pos, split = hi, True
                    break
        except BaseException:
            self.cursors.pop(name, None)  # a decoder that failed is not resumed
            raise
        cur.replay, cur.replay_lo, cur.split = used, lo, split
        dtype = out[0].dtype if out else np.dtype([("t", "<u8"), ("x", "<u2"), ("y", "<u2"), ("on", "?")])
        ev = np.concatenate(out) if out else np.zeros(0, dtype=dtype)
        return ev, cur.origin

    @staticmethod
    def _open(cam: CameraFile, key: tuple[Any, ...]) -> _Cursor:
        chunks = cam.chunks()
        first = next(chunks, None)
        if first is None:
            raise InputError(cam.path, "holds no events (empty stream)")
        t = first["t"].astype(np.int64)
        if t.size > 1 and np.any(t[1:] < t[:-1]):
            raise InputError(cam.path, "timestamps go backwards; a windowed read needs a time-ordered camera file")
        return _Cursor(key=key, chunks=chunks, origin=int(t[0]), pending=[first], pos=-_FAR, last_t=int(t[-1]))


_CURSORS = _CursorCache()


def close_cursors() -> None:
    """Drop the decoders kept for sequential window reads (they hold open files)."""
    _CURSORS.clear()
