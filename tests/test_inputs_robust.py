"""Nothing lost, nothing crashes the run: bad files become one sample's failure, memory is
bounded, time order is repaired or refused with the reason, malformed dataset entries are named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import DSEC_H5, SAMPLE_NPY

from stagewise.cli import main
from stagewise.errors import InputError
from stagewise.inputs.events import (
    MAX_SENSOR_SIDE,
    EventStream,
    parse_sensor_size,
    read_events,
    write_events,
)
from stagewise.inputs.samples import (
    dataset_samples,
    discover_event_samples,
    read_sample_events,
)
from stagewise.inputs.simulate import moving_edge_events
from stagewise.inputs.windows import plan_windows
from stagewise.models.base import Sample


def one_line(err: pytest.ExceptionInfo | BaseException, *fragments: str) -> str:
    text = str(err.value if isinstance(err, pytest.ExceptionInfo) else err)
    assert "\n" not in text, text
    for f in fragments:
        assert f in text, f"{f!r} not in {text!r}"
    return text


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    """Two good files, a corrupt .h5, a truncated pickled .npy, an unsupported file, a dotfile."""
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    scene = moving_edge_events(n_events=4000, duration_us=30_000, seed=1)
    write_events(folder / "good.npz", scene)
    write_events(folder / "sub" / "good.h5", scene)
    corrupt = folder / "corrupt.h5"
    data = bytearray((folder / "sub" / "good.h5").read_bytes())
    data[800:1600] = bytes(800)  # wipe the object headers
    corrupt.write_bytes(bytes(data))
    truncated = folder / "truncated.npy"
    d = {k: scene.events[k] for k in ("x", "y", "t", "p")}
    np.save(truncated, np.array(d, dtype=object), allow_pickle=True)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    (folder / "notes.txt").write_text("not events")
    (folder / ".DS_Store").write_bytes(b"\x00\x01")
    return folder


def test_folder_every_file_is_a_sample_and_bad_ones_fail_at_stage_1(mixed_folder, tiny_eventgpt):
    found = discover_event_samples(mixed_folder)
    ids = sorted(s.sample_id for s in found.samples)
    assert ids == ["corrupt", "good", "notes", "sub/good", "truncated"]  # the dotfile is ignored
    assert found.n_files == 5 and [p.name for p in found.unsupported] == ["notes.txt"]
    assert "1 unsupported file(s)" in found.summary() and "notes.txt" in found.summary()
    by_id = {s.sample_id: s for s in found.samples}
    for sid in ("good", "sub/good"):
        assert len(tiny_eventgpt.load(by_id[sid]).stream) == 4000
    for sid, fragment in (("corrupt", "corrupt.h5"), ("truncated", "truncated.npy"), ("notes", "unsupported event file type '.txt'")):
        with pytest.raises(InputError) as err:
            tiny_eventgpt.load(by_id[sid])
        one_line(err, fragment)


@pytest.mark.slow
def test_folder_run_records_each_failure_and_goes_on(mixed_folder, tmp_path, capsys):
    out = tmp_path / "run"
    main(["run", "--events", str(mixed_folder), "--out", str(out), "--output-len", "fixed:2", "--no-ceilings", "--warmup", "0"])
    recs = {r["sample_id"]: r for r in map(json.loads, (out / "samples.jsonl").read_text().splitlines())}
    assert sorted(recs) == ["corrupt", "good", "notes", "sub/good", "truncated"]
    assert recs["good"]["error"] is None and recs["sub/good"]["error"] is None
    for sid in ("corrupt", "notes", "truncated"):
        assert recs[sid]["error"] and "\n" not in recs[sid]["error"], recs[sid]["error"]
    assert "unsupported" in capsys.readouterr().err


def test_windowed_folder_turns_unreadable_files_into_one_failing_sample(mixed_folder):
    found = discover_event_samples(mixed_folder, window_us=10_000, max_windows=2)
    ids = [s.sample_id for s in found.samples]
    assert ids == ["corrupt", "good@0", "good@10000", "notes", "sub/good@0", "sub/good@10000", "truncated"]
    assert found.n_windows == 4 and {p.name for p, _ in found.unreadable} == {"corrupt.h5", "truncated.npy"}
    bad = next(s for s in found.samples if s.sample_id == "corrupt")
    with pytest.raises(InputError) as err:
        read_sample_events(bad)
    one_line(err, "corrupt.h5")
    w = read_sample_events(next(s for s in found.samples if s.sample_id == "good@10000"))
    assert w.events["t"].min() >= 10_000 and w.events["t"].max() < 20_000


def test_window_ids_empty_windows_and_max_windows(tmp_path):
    ev = np.zeros(6, dtype=[("t", "<i8"), ("x", "<u2"), ("y", "<u2"), ("p", "u1")])
    ev["t"] = [120_000, 130_000, 149_999, 150_000, 400_000, 410_000]  # windows 2, 3, 8 of 50 ms
    path = write_events(tmp_path / "rec.h5", EventStream(ev, 10, 10, "x"))
    plan = plan_windows(path, 50_000)
    assert plan.starts_us == (100_000, 150_000, 400_000) and plan.n_empty == 4
    found = discover_event_samples(path, window_us=50_000)
    assert [s.sample_id for s in found.samples] == ["rec@100000", "rec@150000", "rec@400000"]
    assert [s.window_us for s in found.samples] == [(100_000, 150_000), (150_000, 200_000), (400_000, 450_000)]
    assert found.n_empty_windows == 4 and "4 empty windows skipped" in found.summary()
    assert [len(read_sample_events(s)) for s in found.samples] == [3, 1, 2]
    two = discover_event_samples(path, window_us=50_000, max_windows=2)
    assert [s.sample_id for s in two.samples] == ["rec@100000", "rec@150000"] and two.n_empty_windows == 0
    with pytest.raises(ValueError):
        discover_event_samples(path, max_windows=2)  # needs a window
    with pytest.raises(ValueError):
        Sample("s", "q", window_us=(5, 5))


def test_real_dsec_windows_are_the_ms_grid():
    pytest.importorskip("hdf5plugin")
    if not DSEC_H5.is_file():
        pytest.skip(f"{DSEC_H5} absent")
    plan = plan_windows(DSEC_H5, 50_000)
    assert plan.starts_us == (0, 50_000)  # 50.8 ms of events from t = 776 us
    full = read_events(DSEC_H5).events
    w = read_events(DSEC_H5, t0_us=50_000, t1_us=100_000)
    assert len(w) == int(np.sum(full["t"] >= 50_000))


@pytest.mark.slow
def test_run_windows_of_the_real_sample(tmp_path):
    if not SAMPLE_NPY.is_file():
        pytest.skip(f"{SAMPLE_NPY} absent")
    out = tmp_path / "run"
    assert main(["run", "--events", str(SAMPLE_NPY), "--window-ms", "20", "--max-windows", "2", "--out", str(out), "--output-len", "fixed:2", "--no-ceilings", "--warmup", "0"]) == 0
    recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["sample_id"] for r in recs] == ["eventgpt_sample1@0", "eventgpt_sample1@20000"]
    n_total = len(read_events(SAMPLE_NPY).events)
    assert 0 < recs[0]["shapes"]["load.events"][0] < n_total


# --------------------------------------------------------------------------- memory bounds


def test_one_far_event_without_a_size_is_refused(tmp_path):
    path = tmp_path / "far.npz"
    np.savez(path, x=np.array([3, 65535]), y=np.array([0, 65535]), t=np.array([0, 5]), p=np.array([0, 1]))
    with pytest.raises(InputError) as err:
        read_events(path)
    one_line(err, "no sensor size known", f"at most {MAX_SENSOR_SIDE}", "--sensor-size WxH")
    with pytest.raises(InputError) as err:
        read_events(path, sensor_size=(480, 640))
    one_line(err, "out of range for sensor size 640x480")


def test_sensor_sizes_are_bounded(tmp_path):
    assert parse_sensor_size("640x480") == (480, 640)
    for bad in ("480", "640x", "0x10", "65535x65535", "axb"):
        with pytest.raises(ValueError, match="sensor-size"):
            parse_sensor_size(bad)
    with pytest.raises(InputError):
        read_events(tmp_path / "any.npz", sensor_size=(65535, 65535))
    huge = tmp_path / "huge.h5"  # a file that claims a 65535 x 65535 sensor
    write_events(huge, EventStream(moving_edge_events(n_events=10, duration_us=100, seed=0).events, 65535, 65535, "x"))
    with pytest.raises(InputError) as err:
        read_events(huge)
    one_line(err, "65535x65535", str(MAX_SENSOR_SIDE))


def test_cli_sensor_size_is_width_by_height(tmp_path, capsys):
    path = tmp_path / "wide.npz"
    np.savez(path, x=np.arange(0, 601, 100), y=np.arange(0, 401, 400 // 6)[:7], t=np.arange(7), p=np.arange(7) % 2)
    assert main(["render", "--events", str(path), "--out", str(tmp_path / "ok"), "--sensor-size", "640x480"]) == 0
    assert main(["render", "--events", str(path), "--out", str(tmp_path / "no"), "--sensor-size", "480x640"]) == 2
    one_line(capsys.readouterr().err.strip(), "out of range")


def test_h5_with_a_corrupt_declared_length_is_refused_without_allocating(tmp_path):
    import h5py

    path = tmp_path / "liar.h5"
    with h5py.File(path, "w") as f:  # chunked datasets that declare 2^27 rows but store 4
        for k in ("x", "y", "t", "p"):
            ds = f.create_dataset(f"events/{k}", shape=(1 << 27,), dtype="u4", chunks=(1024,))
            ds[:4] = [0, 1, 2, 3]
    with pytest.raises(InputError) as err:
        read_events(path)
    one_line(err, "declares", "corrupt shape")
    with pytest.raises(InputError):
        plan_windows(path, 50_000)


# --------------------------------------------------------------------------- time order


def test_unsorted_timestamps_are_sorted_stably_with_a_note(tmp_path):
    path = tmp_path / "u.npz"
    t = np.array([5, 3, 3, 9, 1])
    x = np.array([0, 1, 2, 3, 4])  # tells the events apart
    np.savez(path, x=x, y=np.zeros(5, int), t=t, p=np.zeros(5, int))
    s = read_events(path)
    np.testing.assert_array_equal(s.events["t"], [1, 3, 3, 5, 9])
    np.testing.assert_array_equal(s.events["x"], [4, 1, 2, 0, 3])  # the two t=3 events keep their order
    assert len(s.notes) == 1 and "sorted stably" in s.notes[0] and "2 place(s)" in s.notes[0]
    assert read_events(write_events(tmp_path / "sorted.npz", s)).notes == ()


def test_negative_timestamps_are_refused_with_the_reason(tmp_path):
    path = tmp_path / "neg.npz"
    np.savez(path, x=np.arange(3), y=np.arange(3), t=np.array([-5, 0, 7]), p=np.zeros(3, int))
    with pytest.raises(InputError) as err:
        read_events(path)
    one_line(err, "negative timestamps", "min t -5 us")
    with pytest.raises(InputError):
        plan_windows(path, 1000)


def test_event_stream_notes_are_validated():
    ev = moving_edge_events(n_events=10, duration_us=100, seed=0).events
    assert EventStream(ev, None, None, "s", notes=("a",)).notes == ("a",)
    with pytest.raises(ValueError):
        EventStream(ev, None, None, "s", notes=["a"])


# --------------------------------------------------------------------------- dataset JSON


@pytest.mark.parametrize(
    "entry, fragment",
    [
        (None, "entry 1: must be an object"),
        ("a.npy", "entry 1: must be an object"),
        ({"event_data": "a.npy", "conversations": "hello"}, "entry 1: 'conversations' must be a list"),
        ({"event_data": "a.npy", "conversations": ["hello"]}, "entry 1: conversations[0] must be an object"),
        ({"event_data": "a.npy", "conversations": [{"from": "human", "value": 3}]}, "entry 1: conversations[0].value must be a string"),
        ({"event_data": 7}, "entry 1: 'event_data' must be a file name"),
        ({"event_data": "a.npy", "id": {"x": 1}}, "entry 1: 'id' must be"),
        ({"conversations": []}, "entry 1 has no 'event_data'"),
    ],
)
def test_malformed_dataset_entries_name_their_index(tmp_path, entry, fragment):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps([{"event_data": "ok.npy"}, entry]))
    with pytest.raises(InputError) as err:
        dataset_samples(path, "events")
    text = one_line(err, fragment)
    assert text.startswith(f"{path}: ")


def test_dataset_samples_carry_size_and_trust(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps([{"event_data": "a.raw", "conversations": [{"from": "human", "value": "<event>\nWhat?"}]}, {"event_data": "b.npy", "video_data": 3}]))
    s = dataset_samples(path, "events", sensor_size=(480, 640), trust_pickle=True)[0]
    assert (s.sample_id, s.query, s.sensor_size, s.trust_pickle) == ("a", "What?", (480, 640), True)
    with pytest.raises(InputError) as err:
        dataset_samples(path, "mp4")
    one_line(err, "entry 0 has no 'video_data'")
    path.write_text("[1, 2")
    with pytest.raises(InputError) as err:
        dataset_samples(path, "events")
    one_line(err, "not JSON")
