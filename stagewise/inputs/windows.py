"""Long recordings cut into consecutive time windows, each a sample of its own.

Window ``k`` of a recording is the half-open interval ``[k * window_us, (k + 1) * window_us)``
on the recording's time base (``t`` of :func:`stagewise.inputs.events.read_events`:
microseconds since DSEC's ``t_offset``, since the first event for camera formats, as stored
for ``.npy``/``.npz``). Windows are aligned to ``t = 0``, so 50 ms windows of a DSEC
sequence fall on its ``ms_to_idx`` grid, as the seeds' datasets (50 ms windows cut from DSEC
sequences) do. Windows start with the one holding the first event; empty windows are
skipped and counted.

Finding the non-empty windows reads only timestamps, in chunks, where the format allows it
(DSEC ``events/t`` 1 M rows at a time; camera files through faery's chunked decoder); a
``.npy``/``.npz`` is read whole (those formats have no partial read). Reading a window later
(stage 1) reads only that window for DSEC (``ms_to_idx``) and, for camera files, decodes up to
its end, continuing from the previous window of the same recording.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stagewise.errors import InputError
from stagewise.inputs.events import EventStream, read_events

H5_SCAN_ROWS = 1 << 20
"""Rows of ``events/t`` read at a time while scanning an HDF5 file (8 MiB as int64)."""


@dataclass(frozen=True)
class WindowPlan:
    """The non-empty windows of one recording.

    Attributes:
        path: the recording.
        window_us: window length in microseconds.
        starts_us: ``t0`` of each non-empty window kept, ascending (window ``[t0, t0 + window_us)``).
        n_empty: empty windows skipped between the first and the last kept window.

    Raises:
        ValueError: ``window_us < 1``, ``starts_us`` not ascending multiples of ``window_us``,
            or ``n_empty < 0``.
    """

    path: Path
    window_us: int
    starts_us: tuple[int, ...]
    n_empty: int

    def __post_init__(self) -> None:
        if self.window_us < 1:
            raise ValueError(f"window_us: must be >= 1, got {self.window_us}")
        if any(s % self.window_us for s in self.starts_us) or any(b <= a for a, b in zip(self.starts_us, self.starts_us[1:])):
            raise ValueError(f"starts_us: must be ascending multiples of window_us={self.window_us}")
        if self.n_empty < 0:
            raise ValueError(f"n_empty: must be >= 0, got {self.n_empty}")


def plan_windows(
    path: str | Path,
    window_us: int,
    *,
    max_windows: int | None = None,
    sensor_size: tuple[int, int] | None = None,
    trust_pickle: bool = False,
) -> WindowPlan:
    """Find the non-empty windows of a recording (module doc), streaming where possible.

    Args:
        path: an event file (any suffix :func:`read_events` reads).
        window_us: window length in microseconds (>= 1).
        max_windows: keep only the first this many non-empty windows (``None``: all); the
            scan stops once they are known to be complete.
        sensor_size: ``(height, width)``, for camera files without one in the header.
        trust_pickle: as :func:`read_events`.

    Returns:
        A :class:`WindowPlan` with at least one window.

    Raises:
        InputError: the file cannot be read (any reader failure, one line), holds no
            events, or has negative timestamps.
        ValueError: ``window_us < 1`` or ``max_windows < 1``.
    """
    if window_us < 1:
        raise ValueError(f"window-ms: the window must be >= 1 us, got {window_us} us")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max-windows: must be >= 1, got {max_windows}")
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".h5", ".hdf5"):
            ks = _scan_h5(path, window_us, max_windows)
        elif suffix in _camera_suffixes():
            from stagewise.inputs.camera import scan_camera_windows

            ks, _ = scan_camera_windows(path, sensor_size, window_us, max_windows)
        else:
            t = read_events(path, trust_pickle=trust_pickle, sensor_size=sensor_size).events["t"]
            ks = np.unique(t // window_us).tolist()
    except InputError:
        raise
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as err:  # noqa: BLE001  the reader boundary, as in read_events
        from stagewise.inputs.events import _kind, _one_line

        raise InputError(path, f"could not be read as {_kind(path)} ({_one_line(err)})") from None
    if not ks:
        raise InputError(path, "holds no events (empty stream)")
    if ks[0] < 0:
        raise InputError(path, "negative timestamps; stagewise needs microseconds >= 0 from the recording start")
    if max_windows is not None:
        ks = ks[:max_windows]
    return WindowPlan(path=path, window_us=window_us, starts_us=tuple(int(k) * window_us for k in ks), n_empty=int(ks[-1] - ks[0] + 1 - len(ks)))


def iter_windows(
    path: str | Path,
    window_us: int,
    *,
    max_windows: int | None = None,
    sensor_size: tuple[int, int] | None = None,
    trust_pickle: bool = False,
) -> Iterator[EventStream]:
    """The non-empty windows of a recording, one :class:`EventStream` each, in time order.

    Each window holds the events with ``t0 <= t < t0 + window_us`` (times on the recording's
    time base, not shifted); it is read as stage 1 reads it (:func:`read_events` with
    ``t0_us``/``t1_us``), so at most one window is in memory at a time.

    Raises:
        InputError / ValueError: as :func:`plan_windows` and :func:`read_events`.
    """
    plan = plan_windows(path, window_us, max_windows=max_windows, sensor_size=sensor_size, trust_pickle=trust_pickle)
    for t0 in plan.starts_us:
        yield read_events(plan.path, trust_pickle=trust_pickle, sensor_size=sensor_size, t0_us=t0, t1_us=t0 + window_us)


def _camera_suffixes() -> tuple[str, ...]:
    from stagewise.inputs.camera import CAMERA_FORMATS

    return tuple(CAMERA_FORMATS)


def _scan_h5(path: Path, window_us: int, max_windows: int | None) -> list[int]:
    """Window indices holding events of a DSEC-layout file, reading ``events/t`` in chunks."""
    import h5py

    from stagewise.inputs.events import _check_h5_stored, _import_hdf5plugin

    _import_hdf5plugin()
    found: set[int] = set()
    with h5py.File(path, "r") as f:
        if "events/t" not in f or not isinstance(f["events/t"], h5py.Dataset) or len(f["events/t"].shape) != 1:
            raise InputError(path, "missing dataset events/t (a 1-D array); an event file needs x, y, t, p")
        ds = f["events/t"]
        _check_h5_stored(path, "events/t", ds)
        n = int(ds.shape[0])
        ordered, last = True, None
        for i in range(0, n, H5_SCAN_ROWS):
            t = np.asarray(ds[i : i + H5_SCAN_ROWS])
            if not (np.issubdtype(t.dtype, np.integer) or np.issubdtype(t.dtype, np.floating)):
                raise InputError(path, f"events/t must hold numbers, got dtype {t.dtype}")
            if t.size and np.issubdtype(t.dtype, np.floating) and not np.all(np.isfinite(t)):
                raise InputError(path, "events/t has non-finite values")
            if t.size and t.min() < 0:
                raise InputError(path, f"negative timestamps (min t {t.min()} us); stagewise needs microseconds >= 0 from the recording start")
            t = t.astype(np.int64)
            found.update(np.unique(t // window_us).tolist())
            if t.size:
                ordered = ordered and (last is None or t[0] >= last) and not np.any(t[1:] < t[:-1])
                last = int(t[-1])
            if ordered and max_windows is not None and len(found) > max_windows:
                break  # time-ordered so far and a later window has started: the first max_windows are complete
    return sorted(found)
