"""Stage 1: event readers, writers, windows, the equal-count split and bad-input errors."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import DSEC_H5, SAMPLE_NPY  # noqa: F401

from stagewise.errors import InputError
from stagewise.inputs.events import (
    EVENT_DTYPE,
    EventStream,
    check_duration,
    empty_events,
    read_event_frames,
    read_events,
    slice_time,
    split_equal_count,
    write_events,
)
from stagewise.inputs.simulate import moving_edge_events


def make_events(t, x=None, y=None, p=None) -> np.ndarray:
    t = np.asarray(t, dtype=np.int64)
    n = t.size
    ev = np.zeros(n, dtype=EVENT_DTYPE)
    ev["t"] = t
    ev["x"] = np.arange(n) % 7 if x is None else x
    ev["y"] = np.arange(n) % 5 if y is None else y
    ev["p"] = np.arange(n) % 2 if p is None else p
    return ev


def assert_one_line_naming(err: pytest.ExceptionInfo, path: Path, *fragments: str) -> None:
    text = str(err.value)
    assert "\n" not in text, text
    assert text.startswith(f"{path}: ") and text.count(str(path)) == 1, text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"


def save_pickled_dict(path: Path, d: dict) -> Path:
    np.save(path, np.array(d, dtype=object), allow_pickle=True)
    return path


@pytest.fixture
def scene() -> EventStream:
    return moving_edge_events(n_events=5_000, duration_us=20_000, seed=3)


# --------------------------------------------------------------------------- readers


def test_pickled_dict_npy(tmp_path, scene):
    ev = scene.events
    path = save_pickled_dict(tmp_path / "s.npy", {k: ev[k] for k in ("x", "y", "t", "p")})
    got = read_events(path)
    assert got.events.dtype == EVENT_DTYPE
    np.testing.assert_array_equal(got.events, ev)
    assert (got.height, got.width, got.t_offset_us, got.source) == (None, None, 0, str(path))


def test_pickled_dict_polarity_minus_one_maps_to_zero(tmp_path):
    d = {"x": np.array([1, 2, 3]), "y": np.array([0, 0, 1]), "t": np.array([0, 5, 9]), "p": np.array([-1, 1, -1])}
    got = read_events(save_pickled_dict(tmp_path / "pm.npy", d))
    np.testing.assert_array_equal(got.events["p"], [0, 1, 0])
    assert got.events["p"].dtype == np.uint8


def test_pickled_dict_safe_by_default_equals_trusted_load(tmp_path, scene):
    path = save_pickled_dict(tmp_path / "s.npy", {k: scene.events[k] for k in ("x", "y", "t", "p")})
    safe, trusted = read_events(path), read_events(path, trust_pickle=True)
    np.testing.assert_array_equal(safe.events, trusted.events)
    np.testing.assert_array_equal(safe.events, scene.events)


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".h5", ".hdf5"])
def test_safe_writers_round_trip(tmp_path, scene, suffix):
    stream = EventStream(scene.events, 480, 640, "x", t_offset_us=123_456)
    path = write_events(tmp_path / f"s{suffix}", stream)
    got = read_events(path)
    np.testing.assert_array_equal(got.events, scene.events)
    if suffix == ".npy":  # a bare structured array stores no metadata
        assert (got.height, got.width, got.t_offset_us) == (None, None, 0)
    else:
        assert (got.height, got.width, got.t_offset_us) == (480, 640, 123_456)


def test_sensor_size_argument_wins(tmp_path, scene):
    path = write_events(tmp_path / "s.npz", scene)
    got = read_events(path, sensor_size=(500, 700))
    assert got.sensor_size == (500, 700)


def test_structured_npy_with_other_field_order_and_widths(tmp_path):
    arr = np.zeros(4, dtype=[("x", "<i4"), ("y", "<i4"), ("p", "<i1"), ("t", "<f8")])
    arr["x"], arr["y"], arr["p"], arr["t"] = [1, 2, 3, 4], [0, 1, 2, 3], [1, -1, 1, -1], [10.0, 11.0, 12.0, 13.0]
    np.save(tmp_path / "o.npy", arr)
    got = read_events(tmp_path / "o.npy")
    np.testing.assert_array_equal(got.events["t"], [10, 11, 12, 13])
    np.testing.assert_array_equal(got.events["p"], [1, 0, 1, 0])


def test_h5_window_matches_slice_and_reads_only_the_window(tmp_path, monkeypatch):
    import h5py

    stream = moving_edge_events(n_events=20_000, duration_us=30_000, seed=1)
    path = write_events(tmp_path / "w.h5", stream)
    full = read_events(path).events
    windows = [(0, 1000), (999, 1001), (5000, 12_000), (12_345, 12_346), (-50, 10), (29_000, 10**9), (None, 7000), (7000, None)]
    for t0, t1 in windows:
        want = slice_time(full, -(2**62) if t0 is None else t0, 2**62 if t1 is None else t1)
        if len(want) == 0:
            with pytest.raises(InputError):
                read_events(path, t0_us=t0, t1_us=t1)
            continue
        got = read_events(path, t0_us=t0, t1_us=t1).events
        np.testing.assert_array_equal(got, want, err_msg=f"window [{t0}, {t1})")

    # Windows that start / end exactly on an event's timestamp (and on a ms boundary).
    t_e = int(full["t"][len(full) // 2])
    at = read_events(path, t0_us=t_e, t1_us=t_e + 1).events["t"]
    assert len(at) == int(np.sum(full["t"] == t_e)) and np.all(at == t_e)
    before = read_events(path, t0_us=t_e - 300, t1_us=t_e).events["t"]
    assert before.max() < t_e and len(before) == int(np.sum((full["t"] >= t_e - 300) & (full["t"] < t_e)))
    t_ms = int(full["t"][full["t"] >= 15_000][0])  # first event at or after 15 ms
    assert read_events(path, t0_us=15_000, t1_us=t_ms + 1).events["t"][0] == t_ms

    # Spy on dataset reads: a 2 ms window must not read events/t (or x) in full.
    n = len(full)
    reads: list[tuple[str, object]] = []
    original = h5py.Dataset.__getitem__

    def spy(self, key):
        reads.append((self.name, key))
        return original(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    got = read_events(path, t0_us=10_000, t1_us=12_000)
    assert len(got) > 0
    event_reads = [(name, key) for name, key in reads if name.startswith("/events/")]
    assert event_reads, reads
    for name, key in event_reads:
        assert isinstance(key, slice) and (key.stop - key.start) < n // 5, f"{name} read {key} of {n} rows"


def test_h5_without_hdf5plugin_reads_uncompressed(tmp_path, scene, monkeypatch):
    import stagewise.inputs.events as events_mod

    monkeypatch.setattr(events_mod, "_import_hdf5plugin", lambda: False)
    path = write_events(tmp_path / "u.h5", scene)
    np.testing.assert_array_equal(read_events(path).events, scene.events)


def test_npy_window(tmp_path, scene):
    path = write_events(tmp_path / "s.npz", scene)
    got = read_events(path, t0_us=5000, t1_us=6000).events
    t = got["t"]
    assert t.min() >= 5000 and t.max() < 6000
    np.testing.assert_array_equal(got, scene.events[(scene.events["t"] >= 5000) & (scene.events["t"] < 6000)])


def test_real_eventgpt_sample():
    if not SAMPLE_NPY.is_file():
        pytest.skip(f"{SAMPLE_NPY} absent")
    s = read_events(SAMPLE_NPY, sensor_size=(480, 640))
    assert len(s) == 132_268
    ev = s.events
    assert int(ev["x"].max()) == 639 and int(ev["y"].max()) == 479
    assert set(np.unique(ev["p"]).tolist()) == {0, 1}
    assert s.duration_us == 49_595 and s.duration_us < 100_000
    assert np.all(np.diff(ev["t"]) >= 0)
    assert check_duration(s) is s


def test_real_dsec_h5():
    pytest.importorskip("hdf5plugin")
    if not DSEC_H5.is_file():
        pytest.skip(f"{DSEC_H5} absent")
    full = read_events(DSEC_H5, sensor_size=(480, 640))
    assert len(full) == 293_355
    assert full.t_offset_us == 51_835_949_000
    assert int(full.events["x"].max()) < 640 and int(full.events["y"].max()) < 480
    win = read_events(DSEC_H5, t0_us=10_000, t1_us=20_000)
    np.testing.assert_array_equal(win.events, slice_time(full.events, 10_000, 20_000))
    assert win.events["t"].min() >= 10_000 and win.events["t"].max() < 20_000


# --------------------------------------------------------------------------- windows and parts


def test_slice_time_half_open_edges():
    ev = make_events([0, 10, 10, 20, 30])
    np.testing.assert_array_equal(slice_time(ev, 10, 20)["t"], [10, 10])
    np.testing.assert_array_equal(slice_time(ev, 10, 21)["t"], [10, 10, 20])
    np.testing.assert_array_equal(slice_time(ev, 0, 1)["t"], [0])
    np.testing.assert_array_equal(slice_time(ev, 30, 31)["t"], [30])
    np.testing.assert_array_equal(slice_time(ev, 31, 100)["t"], [])
    for t0, t1 in ((5, 5), (7, 3)):
        out = slice_time(ev, t0, t1)
        assert out.dtype == EVENT_DTYPE and out.shape == (0,)


def test_slice_time_unsorted_keeps_stream_order():
    t = np.array([5, 1, 9, 3, 3, 7, 0])
    ev = make_events(t)
    want = [v for v in t.tolist() if 3 <= v < 7]
    np.testing.assert_array_equal(slice_time(ev, 3, 7)["t"], want)


def test_empty_layout_is_the_same():
    e = empty_events()
    assert e.dtype == EVENT_DTYPE and e.shape == (0,)
    assert slice_time(e, 0, 10).dtype == EVENT_DTYPE
    stream = EventStream(e, None, None, "empty")
    assert len(stream) == 0 and stream.duration_us == 0


def test_split_equal_count_last_takes_remainder():
    ev = make_events(np.arange(13))
    parts = split_equal_count(ev, 5)
    assert [len(p) for p in parts] == [2, 2, 2, 2, 5]
    np.testing.assert_array_equal(np.concatenate(parts), ev)
    assert [len(p) for p in split_equal_count(ev, 1)] == [13]
    assert [len(p) for p in split_equal_count(ev, 13)] == [1] * 13
    with pytest.raises(ValueError):
        split_equal_count(ev, 0)
    with pytest.raises(ValueError):
        split_equal_count(ev, 14)


def test_check_duration_refuses_and_windows():
    ev = make_events([1000, 50_000, 100_999, 101_000, 150_000])  # 149,000 us long
    stream = EventStream(ev, None, None, "/data/long.npy")
    with pytest.raises(InputError) as err:
        check_duration(stream)
    assert_one_line_naming(err, Path("/data/long.npy"), "149000 us", "100000", "--window")
    windowed = check_duration(stream, window=True)
    np.testing.assert_array_equal(windowed.events["t"], [1000, 50_000, 100_999])  # [1000, 101000)
    assert windowed.duration_us < 100_000 and windowed.source == stream.source

    exactly = EventStream(make_events([0, 100_000]), None, None, "edge")
    with pytest.raises(InputError):  # t.max - t.min >= 100000 is refused
        check_duration(exactly)
    ok = EventStream(make_events([0, 99_999]), None, None, "ok")
    assert check_duration(ok) is ok


def test_event_stream_rejects_wrong_dtype():
    with pytest.raises(ValueError):
        EventStream(np.zeros(3), None, None, "bad")


# --------------------------------------------------------------------------- bad input


def test_missing_keys_are_all_listed(tmp_path):
    path = save_pickled_dict(tmp_path / "m.npy", {"y": np.arange(3), "p": np.zeros(3, np.uint8)})
    with pytest.raises(InputError) as err:
        read_events(path)
    assert_one_line_naming(err, path, "missing", "x, t")

    npz = tmp_path / "m.npz"
    np.savez(npz, x=np.arange(3), t=np.arange(3))
    with pytest.raises(InputError) as err:
        read_events(npz)
    assert_one_line_naming(err, npz, "y, p")


def test_missing_h5_datasets_listed(tmp_path):
    import h5py

    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("events/x", data=np.arange(3))
        f.create_dataset("events/t", data=np.arange(3))
    with pytest.raises(InputError) as err:
        read_events(path)
    assert_one_line_naming(err, path, "events/y, events/p")


def test_different_lengths(tmp_path):
    path = tmp_path / "l.npz"
    np.savez(path, x=np.arange(3), y=np.arange(3), t=np.arange(4), p=np.zeros(3))
    with pytest.raises(InputError) as err:
        read_events(path)
    assert_one_line_naming(err, path, "different lengths", "t 4")


@pytest.mark.parametrize("suffix", [".npz", ".npy", ".h5"])
def test_empty_stream(tmp_path, suffix):
    path = write_events(tmp_path / f"e{suffix}", EventStream(empty_events(), None, None, "e"))
    with pytest.raises(InputError) as err:
        read_events(path)
    assert_one_line_naming(err, path, "no events")


def test_empty_window(tmp_path, scene):
    path = write_events(tmp_path / "s.h5", scene)
    with pytest.raises(InputError) as err:
        read_events(path, t0_us=10**9, t1_us=10**9 + 5)
    assert_one_line_naming(err, path, "no events in the time window")
    with pytest.raises(InputError) as err:
        read_events(path, t0_us=10, t1_us=10)
    assert_one_line_naming(err, path, "t0_us must be < t1_us")


def test_negative_coordinates(tmp_path):
    path = tmp_path / "n.npz"
    np.savez(path, x=np.array([3, -1, 2]), y=np.array([0, 0, 1]), t=np.arange(3), p=np.zeros(3))
    with pytest.raises(InputError) as err:
        read_events(path)
    assert_one_line_naming(err, path, "negative coordinates", "min x -1")


def test_out_of_range_coordinates(tmp_path, scene):
    path = write_events(tmp_path / "o.npz", scene)  # 480x640 scene
    with pytest.raises(InputError) as err:
        read_events(path, sensor_size=(240, 320))
    assert_one_line_naming(err, path, "out of range", "320x240 (width x height)")


def test_bad_polarity(tmp_path):
    path = tmp_path / "p.npz"
    np.savez(path, x=np.arange(3), y=np.arange(3), t=np.arange(3), p=np.array([0, 1, 2]))
    with pytest.raises(InputError) as err:
        read_events(path)
    assert_one_line_naming(err, path, "polarity", "2")


def test_non_integer_coordinates(tmp_path):
    path = tmp_path / "f.npz"
    np.savez(path, x=np.array([0.5, 1.0]), y=np.arange(2), t=np.arange(2), p=np.zeros(2))
    with pytest.raises(InputError) as err:
        read_events(path)
    assert_one_line_naming(err, path, "non-integer")


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".h5"])
def test_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"c{suffix}"
    path.write_bytes(b"\x93NUMPY garbage" + os.urandom(64))
    with pytest.raises(InputError) as err:
        read_events(path)
    assert_one_line_naming(err, path, "not a readable")


def test_truncated_pickle(tmp_path, scene):
    path = save_pickled_dict(tmp_path / "t.npy", {k: scene.events[k] for k in ("x", "y", "t", "p")})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(InputError) as err:
        read_events(path)
    assert_one_line_naming(err, path, "not a readable")


def test_pickled_non_dict(tmp_path):
    path = tmp_path / "l.npy"
    np.save(path, np.array([[1, 2], "x"], dtype=object), allow_pickle=True)
    with pytest.raises(InputError) as err:
        read_events(path)
    assert_one_line_naming(err, path, "object array", "--trust-pickle")
    with pytest.raises(InputError) as err:  # trusted, it unpickles, and is still not a dict
        read_events(path, trust_pickle=True)
    assert_one_line_naming(err, path, "pickled dict", "dtype object")
    lst = tmp_path / "list.npy"
    lst.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(InputError) as err:
        read_events(lst)
    assert_one_line_naming(err, lst, "expected a dict")


def test_plain_npy_array(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.zeros((5, 4)))
    with pytest.raises(InputError) as err:
        read_events(path)
    assert_one_line_naming(err, path, "structured array")


def test_swapped_npy_npz_and_raw_pickle(tmp_path):
    npz_named_npy = tmp_path / "a.npy"
    with open(npz_named_npy, "wb") as fh:
        np.savez(fh, x=np.arange(2), y=np.arange(2), t=np.arange(2), p=np.zeros(2))
    with pytest.raises(InputError) as err:
        read_events(npz_named_npy)
    assert_one_line_naming(err, npz_named_npy, ".npz archive")

    npy_named_npz = tmp_path / "b.npz"
    with open(npy_named_npz, "wb") as fh:
        np.save(fh, np.zeros(3))
    with pytest.raises(InputError) as err:
        read_events(npy_named_npz)
    assert_one_line_naming(err, npy_named_npz, "not a .npz archive")

    raw = tmp_path / "raw.npy"  # a bare pickle of the dict, without the .npy header
    raw.write_bytes(pickle.dumps({"x": np.arange(3), "y": np.arange(3), "t": np.arange(3), "p": np.ones(3)}))
    assert len(read_events(raw)) == 3
    assert len(read_events(raw, trust_pickle=True)) == 3


def test_unknown_suffix_and_missing_file(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("t,x,y,p\n")
    with pytest.raises(InputError) as err:
        read_events(path)
    assert_one_line_naming(err, path, "unsupported event file type '.txt'")
    with pytest.raises(InputError) as err:
        read_events(tmp_path / "nope.npy")
    assert_one_line_naming(err, tmp_path / "nope.npy", "no such file")


def test_write_h5_needs_sorted_nonnegative_t(tmp_path):
    with pytest.raises(ValueError):
        write_events(tmp_path / "u.h5", EventStream(make_events([5, 3]), None, None, "u"))
    with pytest.raises(ValueError):
        write_events(tmp_path / "n.h5", EventStream(make_events([-5, 3]), None, None, "n"))


# --------------------------------------------------------------------------- PNG frames


def test_read_event_frames(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (6, 9), dtype=np.uint8)
    rgba = rng.integers(0, 256, (6, 9, 4), dtype=np.uint8)
    paths = [tmp_path / "rgb.png", tmp_path / "grey.png", tmp_path / "rgba.png"]
    Image.fromarray(rgb).save(paths[0])
    Image.fromarray(grey).save(paths[1])
    Image.fromarray(rgba).save(paths[2])
    frames = read_event_frames(paths)
    assert [f.shape for f in frames] == [(6, 9, 3)] * 3 and all(f.dtype == np.uint8 for f in frames)
    np.testing.assert_array_equal(frames[0], rgb)
    np.testing.assert_array_equal(frames[1], np.repeat(grey[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(frames[2], rgba[:, :, :3])
    assert read_event_frames([]) == []


def test_unreadable_png(tmp_path):
    from PIL import Image

    not_png = tmp_path / "text.png"
    not_png.write_text("this is not an image")
    with pytest.raises(InputError) as err:
        read_event_frames([not_png])
    assert_one_line_naming(err, not_png, "unreadable image")

    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(InputError) as err:
        read_event_frames([good, truncated])
    assert_one_line_naming(err, truncated, "unreadable image")

    with pytest.raises(InputError) as err:
        read_event_frames([tmp_path / "missing.png"])
    assert_one_line_naming(err, tmp_path / "missing.png", "no such image file")


def test_pickle_module_is_not_needed_for_safe_formats(tmp_path, scene, monkeypatch):
    # The safe formats must never unpickle: make any unpickling fail loudly.
    from stagewise.inputs.safe_pickle import SafeUnpickler

    def boom(*args, **kwargs):
        raise AssertionError("unpickled")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(SafeUnpickler, "load", boom)
    for suffix in (".npy", ".npz", ".h5"):
        path = write_events(tmp_path / f"s{suffix}", scene)
        assert len(read_events(path)) == len(scene)
