"""Camera formats through faery (EVT 2/3, DAT, AEDAT 4, Event Stream, CSV), windows of long
recordings, and the run over them."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from recordings import HEIGHT, T_START_US, WIDTH, make_recordings

from stagewise.errors import InputError
from stagewise.inputs import camera
from stagewise.inputs.events import read_events, slice_time, write_events
from stagewise.inputs.windows import iter_windows, plan_windows

pytest.importorskip("faery")

FORMATS = ("evt3", "evt2", "dat", "aedat4", "es", "csv")


@pytest.fixture(scope="session")
def recs(tmp_path_factory):
    files, ev = make_recordings(tmp_path_factory.mktemp("recordings"))
    return files, ev


def assert_one_line(err, path, *fragments):
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{path}: "), text
    for f in fragments:
        assert f in text, f"{f!r} not in {text!r}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_the_written_events(recs, fmt):
    files, ref = recs
    s = read_events(files[fmt])
    assert s.sensor_size == (HEIGHT, WIDTH), "the size comes from the file"
    np.testing.assert_array_equal(s.events["t"], ref["t"].astype(np.int64) - T_START_US)  # from the first event
    np.testing.assert_array_equal(s.events["x"], ref["x"])
    np.testing.assert_array_equal(s.events["y"], ref["y"])
    np.testing.assert_array_equal(s.events["p"], ref["on"].astype(np.uint8))
    # faery drops the absolute origin of Event Stream files (it writes them from t = 0)
    assert s.t_offset_us == (0 if fmt == "es" else T_START_US)
    assert s.notes == ()


def test_sensor_size_missing_from_header(recs):
    files, ref = recs
    path = files["evt3_nosize"]
    with pytest.raises(InputError) as err:
        read_events(path)
    assert_one_line(err, path, "without a sensor size", "--sensor-size WxH")
    s = read_events(path, sensor_size=(HEIGHT, WIDTH))
    assert s.sensor_size == (HEIGHT, WIDTH) and len(s) == len(ref)
    with pytest.raises(InputError) as err:  # every event is checked against the size given
        read_events(path, sensor_size=(HEIGHT - 10, WIDTH))
    assert_one_line(err, path, "overflow")


def test_sensor_size_argument_overrides_header_with_a_note(recs):
    files, _ = recs
    s = read_events(files["evt3"], sensor_size=(100, 200))
    assert s.sensor_size == (100, 200)
    assert any("200x100" in n and "64x48" in n for n in s.notes), s.notes


def test_version_missing_from_header(recs):
    files, _ = recs
    with pytest.raises(InputError) as err:
        read_events(files["evt3_noversion"])
    assert_one_line(err, files["evt3_noversion"], "format version", "does not guess")


def test_faery_missing_gives_the_install_line(recs, monkeypatch):
    files, _ = recs
    monkeypatch.setitem(sys.modules, "faery", None)  # import faery -> ImportError
    with pytest.raises(InputError) as err:
        read_events(files["evt3"])
    assert_one_line(err, files["evt3"], "Prophesee EVT", "pip install 'stagewise[camera]'")


def test_unsupported_and_mislabelled_formats(tmp_path):
    nmnist = tmp_path / "00002.bin"
    nmnist.write_bytes(bytes(range(40)))
    with pytest.raises(InputError) as err:
        read_events(nmnist)
    assert_one_line(err, nmnist, "N-MNIST", "not supported", ".npz")
    old = tmp_path / "jaer.aedat"
    old.write_bytes(b"#!AER-DAT2.0\r\n" + bytes(64))
    with pytest.raises(InputError) as err:
        read_events(old)
    assert_one_line(err, old, "not an AEDAT 4 file", "AER-DAT2.0")


@pytest.mark.parametrize("fmt", ["evt3", "aedat4", "csv"])
def test_windows_equal_slices_of_the_whole(recs, fmt):
    files, _ = recs
    path = files[fmt]
    full = read_events(path).events
    plan = plan_windows(path, 20_000)
    # 240 ms of events with none in [100, 160) ms: windows 5, 6, 7 are empty
    assert plan.starts_us == tuple(k * 20_000 for k in (0, 1, 2, 3, 4, 8, 9, 10, 11)) and plan.n_empty == 3
    got = list(iter_windows(path, 20_000))
    assert len(got) == len(plan.starts_us)
    for t0, w in zip(plan.starts_us, got):
        np.testing.assert_array_equal(w.events, slice_time(full, t0, t0 + 20_000), err_msg=f"window at {t0}")
    assert sum(len(w) for w in got) == len(full)
    assert plan_windows(path, 20_000, max_windows=2).starts_us == (0, 20_000)


def test_sequential_windows_decode_the_recording_once(recs, monkeypatch):
    files, _ = recs
    path = files["evt2"]
    camera.close_cursors()
    opens = []
    original = camera.CameraFile.chunks

    def counting(self):
        opens.append(self.path)
        return original(self)

    monkeypatch.setattr(camera.CameraFile, "chunks", counting)
    full = read_events(path).events
    opens.clear()
    starts = [0, 20_000, 40_000, 60_000, 160_000, 220_000]
    for t0 in starts:
        w = read_events(path, t0_us=t0, t1_us=t0 + 20_000)
        np.testing.assert_array_equal(w.events, slice_time(full, t0, t0 + 20_000))
    assert len(opens) == 1, "windows read in order continue one decoder"
    back = read_events(path, t0_us=20_000, t1_us=25_000)  # going back starts over, and is still right
    np.testing.assert_array_equal(back.events, slice_time(full, 20_000, 25_000))
    assert len(opens) == 2
    with pytest.raises(InputError) as err:  # an empty window is an error of that sample
        read_events(path, t0_us=120_000, t1_us=140_000)
    assert_one_line(err, path, "no events in the time window")
    camera.close_cursors()


def test_any_sequence_of_window_reads_equals_slices(recs, monkeypatch):
    # Forward steps, repeats (--repeats reads a window twice), small and large jumps back:
    # the cursor must return exactly the slice of the whole recording every time.
    files, _ = recs
    path = files["evt3"]
    camera.close_cursors()
    full = read_events(path).events
    opens = []
    original = camera.CameraFile.chunks
    monkeypatch.setattr(camera.CameraFile, "chunks", lambda self: (opens.append(1), original(self))[1])
    rng = np.random.default_rng(7)
    t0, n_repeats = 0, 0
    for step in range(300):
        r = rng.random()
        if r < 0.5:
            t0 += int(rng.integers(0, 30_000))
        elif r < 0.8:
            n_repeats += 1  # the same window again
        elif r < 0.9:
            t0 = max(0, t0 - int(rng.integers(0, 30_000)))
        else:
            t0 = int(rng.integers(0, 240_000))
        t0 = t0 if t0 < 250_000 else 0
        t1 = t0 + int(rng.integers(1, 40_000))
        want = slice_time(full, t0, t1)
        if len(want) == 0:
            with pytest.raises(InputError):
                read_events(path, t0_us=t0, t1_us=t1)
            continue
        got = read_events(path, t0_us=t0, t1_us=t1).events
        np.testing.assert_array_equal(got, want, err_msg=f"step {step}: [{t0}, {t1})")
    assert n_repeats > 50 and len(opens) < 100, "repeats replay the window instead of decoding from the start"
    camera.close_cursors()


def test_h5_windows_match_and_read_only_their_window(tmp_path):
    from stagewise.inputs.simulate import moving_edge_events

    stream = moving_edge_events(n_events=20_000, duration_us=230_000, seed=2)
    path = write_events(tmp_path / "long.h5", stream)
    plan = plan_windows(path, 50_000)
    assert plan.starts_us == (0, 50_000, 100_000, 150_000, 200_000) and plan.n_empty == 0
    for t0, w in zip(plan.starts_us, iter_windows(path, 50_000)):
        np.testing.assert_array_equal(w.events, slice_time(stream.events, t0, t0 + 50_000))


def _run(argv):
    from stagewise.cli import main

    return main(argv)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["evt3", "aedat4"])
def test_run_windows_of_a_camera_recording(recs, tmp_path, fmt):
    # The command: a recording with no size in its header needs --sensor-size.
    files, _ = recs
    path = files["evt3_nosize"] if fmt == "evt3" else files["aedat4"]
    out = tmp_path / "run"
    argv = ["run", "--preset", "eventgpt-tiny", "--events", str(path), "--window-ms", "50", "--output-len", "fixed:2", "--no-ceilings", "--warmup", "0", "--out", str(out)]
    if fmt == "evt3":
        argv[5:5] = ["--sensor-size", f"{WIDTH}x{HEIGHT}"]
    assert _run(argv) == 0
    recs_ = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    stem = path.stem
    assert [r["sample_id"] for r in recs_] == [f"{stem}@{t0}" for t0 in (0, 50_000, 150_000, 200_000)]  # [100, 150) ms is empty
    assert all(r["error"] is None for r in recs_), [r["error"] for r in recs_]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["requested"]["window_ms"] == 50 and cfg["requested"]["inputs"]["events"] == str(path)
