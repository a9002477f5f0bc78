"""Small camera recordings written with faery's own encoders, for the camera-format tests.

``make_recordings(folder)`` writes the same events in every format faery writes (EVT 3.0,
EVT 2.0, DAT, AEDAT 4, Event Stream, CSV), plus EVT files whose header lacks the sensor size
or the format version, and returns the reference events. No file is committed: the tests
build them in a temporary folder (faery is the ``camera`` extra; tests skip without it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WIDTH, HEIGHT = 64, 48
T_START_US = 1_000_000
"""Absolute camera time of the first event; the readers report times from it."""


def reference_events(n: int = 3000, duration_us: int = 240_000, seed: int = 0, gap: tuple[int, int] | None = (100_000, 160_000)) -> np.ndarray:
    """``[n]`` events in faery's dtype (``t`` uint64 absolute, sorted, first at ``T_START_US``);
    no event in the relative time range ``gap`` (so 20 ms windows there are empty)."""
    import faery

    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(0, duration_us, n))
    if gap is not None:
        t = t[(t < gap[0]) | (t >= gap[1])]
    t[0] = 0
    ev = np.zeros(t.size, dtype=faery.EVENTS_DTYPE)
    ev["t"] = t.astype(np.uint64) + T_START_US
    ev["x"] = rng.integers(0, WIDTH, t.size)
    ev["y"] = rng.integers(0, HEIGHT, t.size)
    ev["on"] = rng.integers(0, 2, t.size).astype(bool)
    return ev


def _split_header(raw: bytes) -> tuple[bytes, bytes]:
    i = 0
    while raw.startswith(b"%", i):
        i = raw.index(b"\n", i) + 1
    return raw[:i], raw[i:]


def make_recordings(folder: Path) -> tuple[dict[str, Path], np.ndarray]:
    """Write the recordings under ``folder``; returns ``(name -> path, reference events)``."""
    import faery

    folder.mkdir(parents=True, exist_ok=True)
    ev = reference_events()
    files = {
        "evt3": folder / "rec_evt3.raw",
        "evt2": folder / "rec_evt2.raw",
        "dat": folder / "rec.dat",
        "aedat4": folder / "rec.aedat4",
        "es": folder / "rec.es",
        "csv": folder / "rec.csv",
    }
    versions = {"evt3": "evt3", "evt2": "evt2", "dat": "dat2"}
    for name, path in files.items():
        kw = {"version": versions[name]} if name in versions else {}
        faery.events_stream_from_array(ev, dimensions=(WIDTH, HEIGHT)).to_file(path, **kw)
    _, body = _split_header(files["evt3"].read_bytes())
    files["evt3_nosize"] = folder / "nosize_evt3.raw"
    files["evt3_nosize"].write_bytes(b"% evt 3.0\n% end\n" + body)
    files["evt3_noversion"] = folder / "noversion_evt3.raw"
    files["evt3_noversion"].write_bytes(b"% geometry 64x48\n" + body)
    return files, ev
