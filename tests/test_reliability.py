"""Runs behave like tools people script: exit codes, failures recorded, resume after SIGKILL, a
changed configuration refused, every preset runnable with no other argument."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import LLAMA_TOKENIZER, SAMPLE_NPY, require

from stagewise.cli import EXIT_SOME_FAILED, EXIT_USAGE, main
from stagewise.results.records import read_samples

FAST = ["--no-ceilings", "--output-len", "fixed:2", "--warmup", "0"]


def _last_json_line(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.mark.parametrize("preset", ["eventgpt-tiny", "llava-1.5-tiny", "video-llava-tiny"])
def test_every_tiny_preset_runs_with_no_other_argument(preset, tmp_path, capsys):
    """The built-in scene is rendered to frames for the frame models; the tiny presets carry a tokenizer."""
    assert main(["run", "--preset", preset, "--num-samples", "1", *FAST, "--out", str(tmp_path / "r")]) == 0
    head = _last_json_line(capsys.readouterr().out)
    assert head["n_samples"] == 1 and head["n_failed"] == 0 and head["exit_code"] == 0
    assert head["mean_ttft_ms"] > 0 and head["run_dir"] == str(tmp_path / "r")


def test_the_seeds_641_token_prefill(tmp_path):
    """The issue's command on the real sample: 60 prompt ids (-200 included), 641 prefill tokens."""
    out = tmp_path / "r"
    argv = ["run", "--preset", "eventgpt-tiny", "--tokenizer", str(require(LLAMA_TOKENIZER)),
            "--events", str(require(SAMPLE_NPY)), *FAST, "--out", str(out)]
    assert main(argv) == 0
    rec = read_samples(out / "samples.jsonl")[0]
    assert rec.n_text_tokens == 59 and rec.n_vision_tokens == 582 and rec.n_prefill_tokens == 641
    assert rec.shapes["preprocess.input_ids"] == [60]


def test_mixed_folder_records_each_failure_and_exits_3(tmp_path, capsys):
    """Good files, a corrupt .h5, a truncated .npy and an unsupported file: every sample is recorded,
    the report lists each failure, exit code 3."""
    folder = tmp_path / "events"
    folder.mkdir()
    rng = np.random.default_rng(0)
    n = 400
    np.savez(folder / "good.npz", x=rng.integers(0, 64, n).astype(np.uint16), y=rng.integers(0, 48, n).astype(np.uint16),
             t=np.sort(rng.integers(0, 40_000, n)).astype(np.int64), p=rng.integers(0, 2, n).astype(np.uint8))
    (folder / "corrupt.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 4)
    good = (folder / "good.npz").read_bytes()
    np.save(folder / "truncated.npy", np.zeros(1000, dtype=[("t", "<i8"), ("x", "<u2"), ("y", "<u2"), ("p", "u1")]))
    data = (folder / "truncated.npy").read_bytes()
    (folder / "truncated.npy").write_bytes(data[: len(data) // 2])
    (folder / "notes.txt").write_text("not events")
    assert good
    out = tmp_path / "r"
    assert main(["run", "--events", str(folder), *FAST, "--out", str(out)]) == EXIT_SOME_FAILED
    recs = {r.sample_id: r for r in read_samples(out / "samples.jsonl")}
    assert set(recs) == {"good", "corrupt", "truncated", "notes"}
    assert recs["good"].ok and not any(recs[k].ok for k in ("corrupt", "truncated", "notes"))
    for k in ("corrupt", "truncated", "notes"):
        assert "\n" not in recs[k].error and k in recs[k].error, recs[k].error
    report = (out / "report.md").read_text()
    for k in ("corrupt", "truncated", "notes"):
        assert k in report
    assert _last_json_line(capsys.readouterr().out)["exit_code"] == EXIT_SOME_FAILED


def _run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "stagewise", *args], cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


@pytest.mark.slow
def test_resume_after_sigkill_loses_nothing_and_refuses_a_changed_config(tmp_path):
    out = tmp_path / "r"
    args = ["run", "--num-samples", "12", "--output-len", "fixed:24", "--no-ceilings", "--warmup", "0", "--out", str(out)]
    proc = _run_cli(args)
    samples = out / "samples.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not samples.is_file() or len(samples.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = read_samples(samples)
    assert 3 <= len(before) < 12, "the kill should land mid-run"
    changed = _run_cli([("fixed:8" if a == "fixed:24" else a) for a in args] + ["--resume"])
    _, err = changed.communicate(timeout=240)
    assert changed.returncode == EXIT_USAGE and "output_len" in err and "Traceback" not in err
    again = _run_cli([*args, "--resume"])
    stdout, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    after = read_samples(samples)
    ids = [r.sample_id for r in after]
    assert sorted(ids) == sorted(f"sim{i:03d}" for i in range(12)) and len(set(ids)) == 12
    assert [r.output_ids for r in after[: len(before)]] == [r.output_ids for r in before]  # kept as recorded


def test_errors_before_any_model_is_built(tmp_path, capsys):
    """Bad arguments, inputs, tokenizer and output folder: one line, exit 2, no model built."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [
        (["run", "--device", "tpu"], "device"),
        (["run", "--dtype", "int8"], "dtype"),
        (["run", "--tokenizer", str(tmp_path / "none.model")], "none.model"),
        (["run", "--out", str(blocker)], "not a folder"),
        (["run", "--temperature", "-1"], "temperature"),
        (["run", "--window-ms", "50"], "window-ms"),
        (["run", "--preset", "video-llava-tiny", "--fuse-vision", "--out", str(tmp_path / "f")], "fuse_vision"),
    ]
    for argv, needle in cases:
        t0 = time.perf_counter()
        assert main(argv) == EXIT_USAGE, argv
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and err.count("\n") == 1, (argv, err)
        if "fuse" not in needle:
            assert time.perf_counter() - t0 < 5, f"{argv}: the error should come before any model is built"
