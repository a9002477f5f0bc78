"""The benchmarks: every script imports against the package as it is now, the CPU smoke runs of
the quantization scripts, and their CUDA-graph timer (stagewise.measure.timing.graph_replay_times)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stagewise.measure.timing import graph_replay_times


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_graph_replay_times_refuses_without_cuda():
    with pytest.raises(ValueError, match="needs CUDA"):
        graph_replay_times(lambda: None, 3)


@pytest.mark.gpu
def test_graph_replay_times_replays_the_captured_work():
    x = torch.arange(1024, device="cuda", dtype=torch.float32)
    acc = torch.zeros_like(x)
    times, out = graph_replay_times(lambda: acc.add_(x), 5, warmup=2)
    # 2 warm-up calls + the capture (not run) + 1 unmeasured replay + 5 measured ones = 8 additions
    assert len(times) == 5 and all(t > 0 for t in times) and out is acc
    assert torch.equal(acc, 8 * x)


ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_imports(name):
    """A benchmark that no longer imports (a moved or renamed library function) fails here, on CPU."""
    importlib.import_module(f"benchmarks.{name}")


@pytest.mark.slow
@pytest.mark.parametrize("script", ["quantization", "quant_kernels"])
def test_quantization_benchmarks_smoke_on_cpu(script):
    """Their ``--tiny`` runs end to end (figures mean nothing on CPU)."""
    extra = ["--kinds", "int8,int4", "--profile", "3"] if script == "quantization" else []
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{script}", "--tiny", *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if script == "quantization":
        doc = json.loads(proc.stdout.strip().splitlines()[-1])
        assert all(r["profile"]["wall_us_per_step"] > 0 for r in doc["results"].values())


def test_verify_profile_smoke_on_cpu():
    """benchmarks/verify_profile.py --tiny runs the decode and verify profiles end to end (CPU: the
    tables hold wall times only; figures mean nothing)."""
    from benchmarks.verify_profile import main

    res = main(["--tiny", "--steps", "2", "--ks", "2"])
    assert res["decode"]["wall_us_per_step"] > 0 and res["verify"][2]["wall_us_per_step"] > 0


def test_gemv_benchmark_smoke(tmp_path):
    """benchmarks/gemv.py --smoke: tiny shapes, three Triton configs (the interpreter on CPU, or
    skipped without Triton) against the Inductor form and F.linear; every row is within its error
    bound and deterministic, the engine's default config is marked, the JSON is written."""
    from benchmarks.gemv import main

    out = tmp_path / "gemv.json"
    res = main(["--smoke", "--shapes", "qkv", "--repeats", "2", "--out", str(out)])
    rows = res["shapes"]["qkv"]["rows"]
    assert [r["variant"] for r in rows[:3]] == ["cublas", "inductor", "inductor tuned"]
    if res["triton_skipped"] is None:
        tri = [r for r in rows if r["variant"] == "triton"]
        assert len(tri) == 3 and sum(r["default"] for r in tri) == 1
        assert "triton best" in res["summary"]["qkv"] and "triton default" in res["summary"]["qkv"]
    assert all("error" not in r and r["within_bound"] and r["deterministic"] and r["us"] > 0 for r in rows)
    assert json.loads(out.read_text())["shapes"]["qkv"]["N"] == 96
