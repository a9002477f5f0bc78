"""A bounded, seeded fuzz of the event readers: only ``InputError`` (or a good read) may come out.

Small files of every format stagewise reads (cut from the real EventGPT sample and the real
DSEC file, as the project's writers and faery's writers write them) are mutated
``N_MUTATIONS`` times each by a seeded generator: bytes overwritten, the file truncated,
garbage inserted, a range zeroed or duplicated. Each mutant is read whole, as a time window,
and scanned for windows. Any exception other than ``InputError`` fails the test, with the
format, the mutation index and the exception listed (rerun with the same seed to reproduce).

Deterministic by construction (fixed seeds, no timing); the mutants are few thousand bytes
each so a run takes a few seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DSEC_H5, SAMPLE_NPY

from stagewise.errors import InputError
from stagewise.inputs import camera
from stagewise.inputs.events import EventStream, read_events, write_events
from stagewise.inputs.windows import plan_windows

N_MUTATIONS = 150
N_EVENTS = 1500


def _eventgpt_dict() -> dict[str, np.ndarray]:
    if SAMPLE_NPY.is_file():
        d = np.load(SAMPLE_NPY, allow_pickle=True).item()  # our own test data: trusted
        return {k: np.asarray(v)[:N_EVENTS] for k, v in d.items()}
    from stagewise.inputs.simulate import moving_edge_events

    ev = moving_edge_events(n_events=N_EVENTS, duration_us=20_000, seed=5).events
    return {"x": ev["x"], "y": ev["y"], "t": ev["t"].astype(np.uint16), "p": ev["p"]}


def _stream() -> EventStream:
    d = _eventgpt_dict()
    ev = np.zeros(len(d["t"]), dtype=[("t", "<i8"), ("x", "<u2"), ("y", "<u2"), ("p", "u1")])
    for k in ("t", "x", "y", "p"):
        ev[k] = d[k]
    return EventStream(ev[np.argsort(ev["t"], kind="stable")], 480, 640, "fuzz", t_offset_us=51_835_949_000)


def _dsec_h5(path) -> None:
    """DSEC's own layout and compression (Blosc zstd), cut from the real file when present."""
    import h5py
    import hdf5plugin

    if DSEC_H5.is_file():
        with h5py.File(DSEC_H5, "r") as f:
            arrays = {k: f[f"events/{k}"][:N_EVENTS] for k in ("x", "y", "t", "p")}
    else:
        ev = _stream().events
        arrays = {"x": ev["x"], "y": ev["y"], "t": ev["t"].astype(np.uint32), "p": ev["p"]}
    t = arrays["t"].astype(np.int64)
    ms_to_idx = np.searchsorted(t, np.arange(int(t.max()) // 1000 + 1) * 1000).astype(np.uint64)
    blosc = hdf5plugin.Blosc(cname="zstd", clevel=1, shuffle=hdf5plugin.Blosc.SHUFFLE)
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(f"events/{k}", data=v, chunks=(512,), **blosc)
        f.create_dataset("ms_to_idx", data=ms_to_idx)
        f.create_dataset("t_offset", data=np.int64(51_835_949_000))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """name -> a small valid file of that format."""
    folder = tmp_path_factory.mktemp("fuzz_seeds")
    files = {}
    files["eventgpt.npy"] = folder / "eventgpt.npy"
    np.save(files["eventgpt.npy"], np.array(_eventgpt_dict(), dtype=object), allow_pickle=True)
    files["dsec.h5"] = folder / "dsec.h5"
    _dsec_h5(files["dsec.h5"])
    stream = _stream()
    for name in ("plain.h5", "s.npz", "struct.npy"):
        files[name] = write_events(folder / name, stream)
    try:
        import faery
    except ImportError:
        faery = None
    if faery is not None:
        ev = np.zeros(len(stream), dtype=faery.EVENTS_DTYPE)
        ev["t"] = stream.events["t"].astype(np.uint64) + 1000
        ev["x"], ev["y"], ev["on"] = stream.events["x"], stream.events["y"], stream.events["p"].astype(bool)
        for name, kw in (("evt3.raw", {"version": "evt3"}), ("evt2.raw", {"version": "evt2"}), ("rec.dat", {}), ("rec.aedat4", {}), ("rec.es", {}), ("rec.csv", {})):
            files[name] = folder / name
            faery.events_stream_from_array(ev, dimensions=(640, 480)).to_file(files[name], **kw)
    for name, path in files.items():
        read_events(path)  # every seed is valid before mutation
    return files


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One seeded mutation of ``data`` (module doc)."""
    buf = bytearray(data)
    kind = int(rng.integers(0, 5))
    n = len(buf)
    if kind == 0:  # overwrite 1..8 bytes
        for _ in range(int(rng.integers(1, 9))):
            buf[int(rng.integers(0, n))] = int(rng.integers(0, 256))
    elif kind == 1:  # truncate
        del buf[int(rng.integers(0, n)) :]
    elif kind == 2:  # insert 1..64 random bytes
        at = int(rng.integers(0, n + 1))
        buf[at:at] = rng.integers(0, 256, int(rng.integers(1, 65)), dtype=np.uint8).tobytes()
    elif kind == 3:  # zero a range
        a = int(rng.integers(0, n))
        buf[a : a + int(rng.integers(1, 256))] = bytes(min(n - a, 255))
    else:  # duplicate a range
        a = int(rng.integers(0, n))
        buf[a:a] = buf[a : a + int(rng.integers(1, 512))]
    return bytes(buf)


def test_mutated_files_give_only_input_errors(seeds, tmp_path, monkeypatch):
    monkeypatch.setenv("RUST_BACKTRACE", "0")  # faery's Rust panics must become InputError, quietly
    rng_master = np.random.default_rng(20240611)
    bad: list[str] = []
    n_ok = n_input_error = 0
    for name, seed_path in sorted(seeds.items()):
        data = seed_path.read_bytes()
        rng = np.random.default_rng(rng_master.integers(2**63))
        for i in range(N_MUTATIONS):
            path = tmp_path / f"m{i:03d}_{name}"  # a new name each time: no reader caches a stale file
            path.write_bytes(mutate(data, rng))
            calls = [lambda p=path: read_events(p), lambda p=path: read_events(p, t0_us=2000, t1_us=9000)]
            if i % 3 == 0:
                calls.append(lambda p=path: plan_windows(p, 5000, max_windows=3))
            for call in calls:
                try:
                    call()
                    n_ok += 1
                except InputError as e:
                    n_input_error += 1
                    text = str(e)
                    if "\n" in text or not text.startswith(f"{path}: "):
                        bad.append(f"{name} #{i}: InputError not one line naming the file: {text[:200]!r}")
                except BaseException as e:  # noqa: BLE001  what the test is looking for
                    bad.append(f"{name} #{i}: {type(e).__module__}.{type(e).__name__}: {' '.join(str(e).split())[:200]}")
            path.unlink()
        camera.close_cursors()
    assert not bad, f"{len(bad)} reads raised something other than InputError:\n" + "\n".join(bad[:30])
    assert n_input_error > N_MUTATIONS and n_ok > N_MUTATIONS, (n_ok, n_input_error)  # the mutations do bite, and not always
