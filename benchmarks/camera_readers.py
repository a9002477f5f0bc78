"""Camera-format readers compared: read speed and correctness on a generated recording.

Writes one recording (default 10 s, 20 M events, 640x480, uniform random events, sorted) in
EVT 3.0, EVT 2.0, DAT, AEDAT 4 and Event Stream with faery's encoders, then reads each back
with faery (what stagewise uses) and, where installed, the single-format alternatives
(expelliarmus: EVT 2/3 and DAT; aedat: AEDAT 4; event_stream: Event Stream). Prints, per
reader and file, the best of 3 wall times in ms, M events/s, and whether every event matches
what was written (times compared from the first event, Event Stream rows flipped as faery
does).

Usage (CPU): ``python benchmarks/camera_readers.py [--events N] [--seconds S] [--dir DIR]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def best_of(fn, reps: int = 3) -> tuple[float, object]:
    """``(best wall time in s, last result)`` of ``reps`` calls."""
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    import faery

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20_000_000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the recordings (default: a temporary folder)")
    args = ap.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="camera_readers_"))
    folder.mkdir(parents=True, exist_ok=True)
    width, height, n = 640, 480, args.events
    rng = np.random.default_rng(1)
    ref = np.zeros(n, dtype=faery.EVENTS_DTYPE)
    ref["t"] = np.sort(rng.integers(0, int(args.seconds * 1e6), n)).astype(np.uint64) + 5_000_000
    ref["x"], ref["y"] = rng.integers(0, width, n), rng.integers(0, height, n)
    ref["on"] = rng.integers(0, 2, n).astype(bool)
    rel_t = ref["t"].astype(np.int64) - int(ref["t"][0])

    def matches(got, flip_y: bool = False) -> bool:
        t = got["t"].astype(np.int64)
        y = (height - 1 - got["y"]) if flip_y else got["y"]
        p = got["on"] if "on" in got.dtype.names else got["p"]
        return bool(len(got) == n and np.array_equal(t - t[0], rel_t) and np.array_equal(got["x"], ref["x"]) and np.array_equal(y, ref["y"]) and np.array_equal(p.astype(bool), ref["on"]))

    files = {"evt3": folder / "rec3.raw", "evt2": folder / "rec2.raw", "dat": folder / "rec.dat", "aedat4": folder / "rec.aedat4", "es": folder / "rec.es"}
    for name, path in files.items():
        kw = {"version": {"evt3": "evt3", "evt2": "evt2", "dat": "dat2"}[name]} if name in ("evt3", "evt2", "dat") else {}
        faery.events_stream_from_array(ref, dimensions=(width, height)).to_file(path, **kw)
    print(f"{n} events over {args.seconds} s, {width}x{height}, in {folder}")
    print(f"{'reader':14} {'file':8} {'MB':>7} {'ms':>8} {'Mev/s':>7}  correct")

    def row(reader: str, name: str, fn, flip_y: bool = False) -> None:
        try:
            s, got = best_of(fn)
            ok = matches(got, flip_y)
            print(f"{reader:14} {name:8} {files[name].stat().st_size / 1e6:7.1f} {s * 1e3:8.0f} {n / s / 1e6:7.1f}  {ok}")
        except Exception as e:  # noqa: BLE001  a reader that fails is a result too
            print(f"{reader:14} {name:8} failed: {type(e).__name__}: {e}")

    for name, path in files.items():
        row("faery", name, lambda p=path: np.concatenate(list(faery.events_stream_from_file(p))))
    try:
        import expelliarmus

        for name, enc in (("evt3", "evt3"), ("evt2", "evt2"), ("dat", "dat")):
            row("expelliarmus", name, lambda p=files[name], e=enc: expelliarmus.Wizard(encoding=e).read(p))
    except ImportError:
        print("expelliarmus   not installed")
    try:
        import aedat

        row("aedat", "aedat4", lambda: np.concatenate([pk["events"] for pk in aedat.Decoder(files["aedat4"]) if "events" in pk]))
    except ImportError:
        print("aedat          not installed")
    try:
        import event_stream

        row("event_stream", "es", lambda: np.concatenate(list(event_stream.Decoder(files["es"]))), flip_y=True)
    except ImportError:
        print("event_stream   not installed")


if __name__ == "__main__":
    main()
