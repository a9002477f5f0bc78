"""The ``stagewise`` command end to end on CPU, and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import SAMPLE_NPY, require

from stagewise.cli import main


def test_run_report_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--num-samples", "2", "--output-len", "fixed:4", "--out", str(out), "--no-ceilings"]) == 0
    text = capsys.readouterr().out
    assert "random weights" in text and "prefill" in text
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").is_file()
    assert main(["run", "--num-samples", "3", "--output-len", "fixed:4", "--out", str(out), "--resume", "--no-ceilings"]) == 0
    assert len((out / "samples.jsonl").read_text().splitlines()) == 3


def test_run_real_sample_with_repeats(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--events", str(require(SAMPLE_NPY)), "--repeats", "2", "--output-len", "fixed:3", "--out", str(out), "--no-ceilings"]) == 0
    recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["sample_id"] for r in recs] == ["eventgpt_sample1@0", "eventgpt_sample1@1"]
    assert recs[0]["shapes"]["load.events"] == [132268]


def test_verify_passes_on_tiny(tmp_path, capsys):
    assert main(["verify", "--num-samples", "2", "--max-new-tokens", "8", "--out", str(tmp_path / "v.json")]) == 0
    assert "2/2 samples identical" in capsys.readouterr().out
    res = json.loads((tmp_path / "v.json").read_text())
    assert all(r["ok"] for r in res) and len(res[0]["fused"]) == 8


def test_render_writes_pngs(tmp_path):
    from PIL import Image

    npy = tmp_path / "ev.npz"
    rng = np.random.default_rng(0)
    n = 500
    np.savez(npy, x=rng.integers(0, 64, n).astype(np.uint16), y=rng.integers(0, 48, n).astype(np.uint16), t=np.sort(rng.integers(0, 40_000, n)).astype(np.int64), p=rng.integers(0, 2, n).astype(np.uint8))
    assert main(["render", "--events", str(npy), "--out", str(tmp_path / "png"), "--sensor-size", "64x48"]) == 0
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert len(pngs) == 5 and Image.open(pngs[0]).size == (64, 48)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["run", "--events", "/nonexistent/ev.npy"], "/nonexistent/ev.npy"),
        (["run", "--output-len", "fixed:0"], "output-len"),
        (["run", "--weights", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
        (["run", "--preset", "gpt-5"], "preset"),
        (["report", "/nonexistent/run"], "/nonexistent/run"),
        (["run", "--matvec-kernel", "triton"], "--matvec-kernel triton needs --engine fast"),  # the default engine is hf
        (["run", "--engine", "fast", "--matvec-kernel", "triton", "--quantize", "int8"], "use one of it and --quantize"),
    ],
)
def test_bad_input_is_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stagewise: error:") and needle in err and "\n" not in err, err


def test_long_stream_refused_then_windowed(tmp_path, capsys):
    f = tmp_path / "long.npz"
    t = np.arange(0, 300_000, 100, dtype=np.int64)
    np.savez(f, x=(t % 64).astype(np.uint16), y=(t % 48).astype(np.uint16), t=t, p=(t % 2).astype(np.uint8))
    assert main(["run", "--events", str(f), "--out", str(tmp_path / "r1"), "--no-ceilings", "--output-len", "fixed:2"]) == 1
    recs = [json.loads(x) for x in (tmp_path / "r1" / "samples.jsonl").read_text().splitlines()]
    assert "long.npz" in recs[0]["error"] and "--window" in recs[0]["error"]
    assert main(["run", "--events", str(f), "--window", "--out", str(tmp_path / "r2"), "--no-ceilings", "--output-len", "fixed:2"]) == 0


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "stagewise", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "verify" in r.stdout and "compare" in r.stdout


def test_fast_engine_and_fast_stages_end_to_end(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--engine", "fast", "--fast-stages", "--num-samples", "2", "--batch-size", "2", "--output-len", "fixed:3", "--out", str(out), "--no-ceilings"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    applied = cfg["applied"]["stages"]
    assert cfg["requested"]["engine"] == "fast" and cfg["requested"]["fast_stages"]
    # on CPU: every stage speed path but the CUDA graph, and the fast tower runs eagerly (not compiled)
    assert applied["gpu_preprocess"] and applied["fuse_vision"] and applied["vision_fast_tower"]
    assert not applied["vision_graph"] and not applied["vision_compile"]
    assert cfg["applied"]["engine"]["compiled"] is False and cfg["applied"]["engine"]["cuda_graphs"] is False
    assert cfg["applied"]["engine"]["autotune"] is False  # nothing compiled, nothing tuned
    assert cfg["requested"]["matvec_kernel"] == cfg["applied"]["engine"]["matvec_kernel"] == "inductor"


def test_no_autotune_reaches_the_engine_options():
    """--no-autotune: the fast engine gets autotune=False (recorded as applied); by default the
    engine decides (on when it compiles on CUDA)."""
    from stagewise.cli import build_parser
    from stagewise.config import RunConfig

    args = build_parser().parse_args(["run", "--engine", "fast", "--no-autotune"])
    off = RunConfig.from_args(args, preset="eventgpt-tiny", inputs={})
    assert off.autotune is False and off.engine_options(max_batch=1, max_seq=64).autotune is False
    assert RunConfig(engine="fast").engine_options(max_batch=1, max_seq=64).autotune is None


def test_matvec_kernel_reaches_the_engine_options():
    """--matvec-kernel triton: the fast engine gets matvec_kernel="triton"; the default stays inductor."""
    from stagewise.cli import build_parser
    from stagewise.config import RunConfig

    args = build_parser().parse_args(["run", "--engine", "fast", "--matvec-kernel", "triton"])
    cfg = RunConfig.from_args(args, preset="eventgpt-tiny", inputs={})
    assert cfg.matvec_kernel == "triton" and cfg.engine_options(max_batch=1, max_seq=64).matvec_kernel == "triton"
    assert RunConfig(engine="fast").engine_options(max_batch=1, max_seq=64).matvec_kernel == "inductor"
    with pytest.raises(ValueError, match="matvec_kernel: expected inductor or triton"):
        RunConfig(engine="fast", matvec_kernel="cublas")


@pytest.mark.slow
def test_matvec_kernel_triton_end_to_end_is_recorded_as_applied(tmp_path):
    """On CPU under Triton's interpreter (tests/conftest.py), eagerly: the run records the kernel."""
    from stagewise.engine.dense import triton_gemv_usable

    if triton_gemv_usable("cuda" if __import__("torch").cuda.is_available() else "cpu") is not None:
        pytest.skip("the Triton GEMV cannot run here")
    out = tmp_path / "run"
    assert main(["run", "--engine", "fast", "--matvec-kernel", "triton", "--num-samples", "1", "--output-len", "fixed:3",
                 "--warmup", "0", "--out", str(out), "--no-ceilings"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["requested"]["matvec_kernel"] == cfg["applied"]["engine"]["matvec_kernel"] == "triton"
