"""Tensor parallelism (weight sharding, the engine over gloo) and the data-parallel building blocks.

The multi-process tests start real torchrun jobs on CPU (gloo) running ``tests/parallel_worker.py``
and are marked slow (each job pays two interpreter starts with torch; ~10-60 s here). Greedy ids
must be EQUAL between tensor parallel 2 and one process: in fp32 the two differ only by summation
order (~1e-6 on logits), and the tiny models' std of 0.2 keeps the gap between the top two logits
far above that on every step (the argument of tests/test_engine_fast.py). Logits must be bitwise
equal ACROSS ranks (the property that keeps the ranks in lockstep, see stagewise/engine/parallel.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from parallel_worker import VARIANTS, run_cases, tiny_lm

from stagewise.distributed import (
    DistContext,
    Layout,
    RankReport,
    completed_ids,
    data_parallel_summary,
    launch,
    layout,
    merge_rank_files,
    rank_samples_file,
    rank_todo,
    read_rank_reports,
    shard,
    shard_indices,
    torchrun_command,
    write_rank_report,
)
from stagewise.engine.fast import FastEngine, FastOptions, _layer_weights
from stagewise.engine.layers import Dims
from stagewise.engine.parallel import TensorParallel, shard_layer
from stagewise.errors import InputError
from stagewise.results.records import SampleRecord, SampleWriter, read_samples

ROOT = Path(__file__).resolve().parents[1]


def full_dims(lm) -> Dims:
    return FastEngine(lm, FastOptions(max_seq=8)).dims


# ----------------------------------------------------------------------------------------------
# Sharding (in process)


@pytest.mark.parametrize(("variant", "size"), [("mha", 2), ("gqa", 2), ("bias", 2), ("mha", 4)])
def test_shards_concatenate_to_the_original_layer(variant, size):
    lm = tiny_lm(**VARIANTS[variant])
    d = full_dims(lm)
    full = _layer_weights(lm.model.layers[1])
    shards = [shard_layer(full, d, TensorParallel(size=size, rank=r)) for r in range(size)]
    rd = TensorParallel(size=size, rank=0).rank_dims(d)

    def cat_sections(name: str, split: tuple[int, ...]):
        parts = [getattr(s, name).split(split, dim=0) for s in shards]  # per rank: its sections
        return torch.cat([torch.cat([p[i] for p in parts]) for i in range(len(split))])

    checks = {
        "wqkv": (cat_sections("wqkv", rd.qkv_split), full.wqkv),
        "w_gate_up": (cat_sections("w_gate_up", (rd.intermediate,) * 2), full.w_gate_up),
        "wo": (torch.cat([s.wo for s in shards], dim=1), full.wo),
        "w_down": (torch.cat([s.w_down for s in shards], dim=1), full.w_down),
    }
    if full.bqkv is not None:
        checks["bqkv"] = (cat_sections("bqkv", rd.qkv_split), full.bqkv)
        checks["b_gate_up"] = (cat_sections("b_gate_up", (rd.intermediate,) * 2), full.b_gate_up)
    for name, (got, want) in checks.items():
        assert torch.equal(got, want), f"{name}: shards do not concatenate to the original"
    for s in shards:
        assert s.wqkv.shape == ((rd.n_heads + 2 * rd.n_kv_heads) * d.head_dim, d.hidden)
        assert s.wo.is_contiguous() and s.w_down.is_contiguous()
        # replicated: norms, and the row-parallel biases (added once, after the all-reduce)
        assert s.ln1 is full.ln1 and s.ln2 is full.ln2 and s.bo is full.bo and s.b_down is full.b_down


def test_rank_dims_and_validation():
    d = full_dims(tiny_lm(**VARIANTS["gqa"]))  # 4 heads, 2 KV heads, MLP 112
    rd = TensorParallel(size=2, rank=1).rank_dims(d)
    assert (rd.n_heads, rd.n_kv_heads, rd.intermediate, rd.hidden, rd.vocab, rd.group) == (2, 1, 56, d.hidden, d.vocab, d.group)
    with pytest.raises(ValueError, match="num_key_value_heads = 2"):
        TensorParallel(size=4, rank=0).rank_dims(d)
    with pytest.raises(ValueError, match="num_attention_heads = 4.*intermediate_size = 112"):
        TensorParallel(size=3, rank=0).rank_dims(d)
    for kw, field in (({"size": 0, "rank": 0}, "size"), ({"size": 2, "rank": 2}, "rank"),
                      ({"size": 2, "rank": 0, "all_reduce": "mpi"}, "all_reduce"),
                      ({"size": 2, "rank": 0, "one_shot_max_bytes": 0}, "one_shot_max_bytes")):
        with pytest.raises(ValueError, match=f"tensor_parallel.{field}"):
            TensorParallel(**kw)


def test_quantized_weights_and_missing_process_group_are_refused():
    lm = tiny_lm()
    d = full_dims(lm)

    class FakeQuantized:
        def linear(self, x, bias=None, *, decode):
            raise AssertionError("not called")

    w = _layer_weights(lm.model.layers[0])._replace(w_down=FakeQuantized())
    with pytest.raises(ValueError, match="w_down is a quantized weight"):
        shard_layer(w, d, TensorParallel(size=2, rank=0))
    with pytest.raises(ValueError, match="not initialized"):
        FastEngine(lm, FastOptions(max_seq=16, tensor_parallel=TensorParallel(size=2, rank=0)))
    with pytest.raises(ValueError, match="not initialized"):
        TensorParallel.from_group()
    from stagewise.engine.quant import QuantOptions

    with pytest.raises(ValueError, match="tensor_parallel: quantized weights are not sharded yet"):
        FastOptions(quantize=QuantOptions(kind="int8"), tensor_parallel=TensorParallel(size=2, rank=0))
    FastOptions(quantize=QuantOptions(kind="int8"), tensor_parallel=TensorParallel(size=1, rank=0))  # no split: fine


# ----------------------------------------------------------------------------------------------
# Data-parallel building blocks (in process)


def test_dist_context_from_env():
    assert DistContext.from_env({}) == DistContext()
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h0", "MASTER_PORT": "29500"}
    ctx = DistContext.from_env(env)
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size, ctx.master_addr, ctx.master_port) == (3, 4, 1, 2, "h0", 29500)
    assert ctx.distributed and not ctx.is_main
    with pytest.raises(ValueError, match="RANK and WORLD_SIZE"):
        DistContext.from_env({"RANK": "0"})
    with pytest.raises(ValueError, match="WORLD_SIZE: expected an integer"):
        DistContext.from_env({"RANK": "0", "WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="RANK/WORLD_SIZE"):
        DistContext.from_env({"RANK": "4", "WORLD_SIZE": "4"})


@pytest.mark.parametrize("n", [0, 1, 6, 7, 64])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_sharding_is_a_deterministic_balanced_partition(n, world):
    parts = [shard_indices(n, r, world) for r in range(world)]
    assert sorted(i for p in parts for i in p) == list(range(n)), "every sample exactly once"
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts == [shard_indices(n, r, world) for r in range(world)], "same answer every call"
    items = [f"s{i}" for i in range(n)]
    for r in range(world):
        assert shard(items, r, world) == items[r::world]  # round-robin, dataset order kept
    with pytest.raises(ValueError, match="rank"):
        shard_indices(n, world, world)


def test_layout_of_data_and_tensor_parallel_ranks():
    ctx = DistContext(rank=5, world_size=8, local_rank=1, local_world_size=4)
    assert layout(ctx) == Layout(dp_rank=5, dp_size=8, tp_rank=0, tensor_parallel_size=1)
    lay = layout(ctx, 2)
    assert (lay.dp_rank, lay.dp_size, lay.tp_rank, lay.writes_records) == (2, 4, 1, False)
    with pytest.raises(ValueError, match="divide the world size 8"):
        layout(ctx, 3)
    with pytest.raises(ValueError, match="one host"):
        layout(ctx, 8)  # 4 processes per node


def record(sid: str, rank: int = 0, **kw) -> SampleRecord:
    return SampleRecord(sample_id=sid, model="tiny", engine="fast", output_ids=[int(sid[1:]), rank], **kw)


def write_rank(run_dir: Path, rank: int, ids: list[str], torn: bool = False) -> None:
    with SampleWriter(rank_samples_file(run_dir, rank)) as w:
        for sid in ids:
            w.write(record(sid, rank))
        if torn:
            w._fh.write('{"sample_id": "s9", "mod')


def test_merge_puts_each_sample_once_in_dataset_order(tmp_path):
    ids = [f"s{i}" for i in range(7)]
    write_rank(tmp_path, 1, ["s5", "s1", "s3"])  # out of order within a file, too
    write_rank(tmp_path, 0, ["s0", "s2", "s4", "s6"])
    rep = merge_rank_files(tmp_path, ids, world_size=2)
    merged = read_samples(tmp_path / "samples.jsonl")
    assert [r.sample_id for r in merged] == ids
    assert [r.output_ids[1] for r in merged] == [i % 2 for i in range(7)]  # each from its rank's file
    assert rep.complete and rep.per_rank == {0: 4, 1: 3} and rep.n_records == 7
    again = merge_rank_files(tmp_path, ids, world_size=2)  # idempotent: the old samples.jsonl is no source of duplicates
    assert again.n_records == 7 and (tmp_path / "samples.jsonl").read_text() == "".join(r.to_json() + "\n" for r in merged)


def test_merge_reports_a_missing_rank_and_a_torn_record(tmp_path):
    ids = [f"s{i}" for i in range(6)]
    write_rank(tmp_path, 0, ["s0", "s2", "s4"])
    write_rank(tmp_path, 1, ["s1"], torn=True)  # rank 1 killed mid-write
    write_rank(tmp_path, 2, [])  # a third file changes nothing
    rep = merge_rank_files(tmp_path, ids, world_size=2)
    assert rep.missing == ["s3", "s5"] and rep.missing_by_rank == {1: ["s3", "s5"]} and not rep.complete
    assert "2 sample(s) have no record (rank 1: 2)" in rep.describe() and "--resume" in rep.describe()
    assert [r.sample_id for r in read_samples(tmp_path / "samples.jsonl")] == ["s0", "s1", "s2", "s4"]
    (tmp_path / "samples.rank0.jsonl").unlink()  # a rank file lost entirely
    rep = merge_rank_files(tmp_path, ids, world_size=2)
    assert rep.missing == ["s3", "s5"], "s0, s2, s4 survive in the earlier samples.jsonl"


def test_merge_refuses_a_sample_recorded_twice(tmp_path):
    write_rank(tmp_path, 0, ["s0", "s2"])
    write_rank(tmp_path, 1, ["s1", "s2"])
    with pytest.raises(InputError, match=r"1 sample\(s\) recorded twice.*s2 \(samples.rank0.jsonl, samples.rank1.jsonl\)"):
        merge_rank_files(tmp_path, ["s0", "s1", "s2"])
    assert not (tmp_path / "samples.jsonl").exists()


def test_merge_keeps_records_of_other_samples_at_the_end(tmp_path):
    write_rank(tmp_path, 0, ["s9", "s0"])
    rep = merge_rank_files(tmp_path, ["s0", "s1"], world_size=1)
    assert [r.sample_id for r in read_samples(tmp_path / "samples.jsonl")] == ["s0", "s9"]
    assert rep.unexpected == ["s9"] and rep.missing == ["s1"]
    with pytest.raises(ValueError, match="sample_ids"):
        merge_rank_files(tmp_path, ["s0", "s0"])


def test_rank_todo_skips_what_any_file_holds_and_repairs_a_torn_line(tmp_path):
    ids = [f"s{i}" for i in range(8)]
    write_rank(tmp_path, 1, ["s1", "s3"], torn=True)
    write_rank(tmp_path, 0, ["s0"])
    assert completed_ids(tmp_path) == {"s0", "s1", "s3"}
    ctx1 = DistContext(rank=1, world_size=2, local_rank=1, local_world_size=2)
    assert rank_todo(ids, tmp_path, ctx1, key=lambda s: s) == ["s5", "s7"]
    assert rank_samples_file(tmp_path, 1).read_text().endswith("}\n"), "torn line dropped before appending"
    write_rank(tmp_path, 1, ["s5"])
    assert [r.sample_id for r in read_samples(rank_samples_file(tmp_path, 1))] == ["s1", "s3", "s5"]
    # resumed with another world size: still nothing twice
    ctx0of3 = DistContext(rank=0, world_size=3, local_rank=0, local_world_size=3)
    assert rank_todo(ids, tmp_path, ctx0of3, key=lambda s: s) == ["s6"]  # s0, s3 done


def test_rank_reports_and_throughput(tmp_path):
    write_rank_report(tmp_path, RankReport(rank=0, device="cuda:0 (H200)", n_samples=32, n_ok=32, n_failed=0, wall_s=16.0))
    write_rank_report(tmp_path, RankReport(rank=1, device="cuda:1 (H200)", n_samples=32, n_ok=30, n_failed=1, wall_s=20.0,
                                           error="stopped: CUDA error"))
    reports = read_rank_reports(tmp_path, 3)
    assert reports[2] is None
    s = data_parallel_summary(reports, 3)
    assert s["per_rank"][0]["samples_per_s"] == pytest.approx(32 / 16.0)
    assert s["per_rank"][1]["samples_per_s"] == pytest.approx(30 / 20.0)
    assert s["samples_per_s"] == pytest.approx((32 + 30) / 20.0) and s["makespan_s"] == 20.0  # over the slowest rank
    assert s["failed_ranks"] == [1, 2] and "died" in s["per_rank"][2]["error"]
    (tmp_path / "status.rank2.json").write_text("{}")
    with pytest.raises(InputError, match="not a rank report"):
        read_rank_reports(tmp_path, 3)
    with pytest.raises(ValueError, match="negative"):
        RankReport(rank=0, device="cpu", n_samples=1, n_ok=-1, n_failed=0, wall_s=1.0)


def test_torchrun_command_and_launch_guard(monkeypatch):
    cmd = torchrun_command(2, ["run", "--nproc", "2", "--preset", "eventgpt-tiny", "--nproc=2"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", "-m", "stagewise",
                       "run", "--preset", "eventgpt-tiny"]
    multi = torchrun_command(8, ["run"], nnodes=2, rdzv_endpoint="node0:29400", rdzv_id="job7")
    assert multi[3:8] == ["--nproc-per-node=8", "--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29400", "--rdzv-id=job7"]
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        torchrun_command(8, ["run"], nnodes=2)
    with pytest.raises(ValueError, match="nproc"):
        torchrun_command(0, ["run"])
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    with pytest.raises(ValueError, match="inside a torchrun worker"):
        launch(2, ["run"])


# ----------------------------------------------------------------------------------------------
# Multi-process (torchrun, gloo on CPU)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")  # this checkout's stagewise
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)
    return env


def torchrun(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = torchrun_command(2, args, module="tests.parallel_worker")
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def worker_results(out: Path, scenario: str) -> list[dict]:
    return [torch.load(out / f"{scenario}.rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    proc = torchrun(["tp", str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return worker_results(out, "tp")


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tensor_parallel_2_equals_one_process(tp_results, variant):
    from stagewise.engine.sampling import SamplingParams

    lm = tiny_lm(**VARIANTS[variant])
    ref = run_cases(lm, FastOptions(max_batch=4, max_seq=64, kv_bucket=8), rank=0)
    r0, r1 = tp_results[0][variant], tp_results[1][variant]
    assert r0["all_reduce"] == "gloo"
    for key, want in ref.items():
        got = r0[key]
        if key.endswith("tokens"):
            assert got.tolist() == want.tolist(), f"{variant} {key}: TP=2 ids differ from TP=1"
        else:
            diff = (got - want).abs()
            assert diff.max() <= 1e-4, f"{variant} {key}: max |diff| {diff.max():.3g}, mean {diff.mean():.3g}"
        assert torch.equal(r0[key], r1[key]), f"{variant} {key}: ranks disagree (max |diff| {(r0[key] - r1[key]).abs().max():.3g})"
    # sampling: the same seeds give the same tokens on both ranks and as one process
    from parallel_worker import prompts

    from stagewise.engine.base import stack_left_padded

    eng = FastEngine(lm, FastOptions(max_batch=4, max_seq=64, kv_bucket=8,
                                     sampling=SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=5)))
    embeds, lens = stack_left_padded(prompts([6, 10]))
    want = eng.decode(eng.prefill(embeds, lens, seeds=[11, 12]), 10, None).tokens
    assert r0["sampled.tokens"].tolist() == r1["sampled.tokens"].tolist() == want.tolist()


@pytest.mark.slow
def test_speculative_decoding_on_a_tensor_parallel_target(tp_results):
    """Greedy speculative decoding (prompt lookup; a draft LM replicated on each rank) over a TP=2
    target gives plain greedy ids, the same on both ranks and as one process."""
    from parallel_worker import speculative_tokens

    ref = speculative_tokens(None)
    r0, r1 = (res["spec"] for res in tp_results)
    assert r0 == r1, "ranks disagree"
    for name in ("plain", "ngram", "draft_model"):
        assert r0[name] == ref["plain"], f"{name}: TP=2 ids differ from plain one-process greedy ids"
    assert 0 < r0["draft_model.acceptance_rate"] < 1, "both branches of the rollback ran"


@pytest.mark.slow
def test_all_reduce_op_traces_under_torch_compile(tp_results):
    """The custom op through dynamo (fullgraph) and AOT functionalization gives the eager result."""
    for res in tp_results:
        for key in ("aot_eager_max_diff", "aot_eager_functional_max_diff"):  # in-place (NCCL/gloo) and functional (one-shot) ops
            assert res[key] <= 1e-6, f"{key}: max |diff| {res[key]:.3g}"


@pytest.mark.slow
def test_lockstep_guards(tp_results):
    """The collective EOS look and the end-of-decode agreement check see a disagreement."""
    for rank, res in enumerate(tp_results):
        assert res["all_true_mixed"] is False and res["all_true_all"] is True
        assert res["check_same_error"] == f"tensor parallel: ranks disagree on the decoded tokens at index [0, 2] (rank {rank} holds {7 + rank})"
    # the one-shot all-reduce is given up on every rank alike (else the ranks would mix algorithms and hang)
    r0, r1 = (res["one_shot_setup"] for res in tp_results)
    assert r0["rank1_setup_fails"] == "setup failed on another rank"
    assert r1["rank1_setup_fails"] == "setup failed: no peer access"
    for r in (r0, r1):
        assert r["self_test_fails"].startswith("self-test failed: "), r["self_test_fails"]


@pytest.mark.slow
def test_tensor_parallel_groups(tp_results):
    for res in tp_results:
        assert res["tp_group_sizes"] == {1: 1, 2: None}


@pytest.mark.slow
def test_tensor_parallel_compiled_by_inductor(tmp_path):
    """Inductor (matvec decode at batch 1, GEMM at batch 2) with the all-reduce ops inside the
    compiled layer functions: same ids as the eager TP engine, logits within fp32 noise."""
    proc = torchrun(["tp_compiled", str(tmp_path)], timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = worker_results(tmp_path, "tp_compiled")
    for name in ("compiled", "functional"):  # the in-place op (gloo) and the one-shot op's fallback path
        for case in ("b1", "b2"):
            assert r0[f"{name}.{case}.tokens"].tolist() == r0[f"eager.{case}.tokens"].tolist(), f"{name} {case}"
            diff = (r0[f"{name}.{case}.logits"] - r0[f"eager.{case}.logits"]).abs()
            assert diff.max() <= 1e-4, f"{name} {case}: max |diff| {diff.max():.3g}, mean {diff.mean():.3g}"
            assert torch.equal(r0[f"{name}.{case}.logits"], r1[f"{name}.{case}.logits"]), f"{name} {case}: ranks disagree"


@pytest.mark.slow
def test_killed_rank_is_reported_and_resumes(tmp_path):
    ids = [f"s{i}" for i in range(6)]
    proc = torchrun(["dp", str(tmp_path), "--die-after", "1"])  # rank 1 writes s1, half of s3, dies
    assert proc.returncode != 0
    rep = merge_rank_files(tmp_path, ids, world_size=2)
    assert rep.missing_by_rank == {1: ["s3", "s5"]}, rep.describe()
    # resume through launch() (what --nproc runs): rank 1 runs only what it lacks
    rc = launch(2, ["dp", str(tmp_path)], module="tests.parallel_worker", env=_env())
    assert rc == 0
    r0, r1 = worker_results(tmp_path, "dp")
    assert r0["todo"] == [] and r1["todo"] == ["s3", "s5"]
    assert r0["devices"] == ["cpu", "cpu"]
    assert r0["merge"]["missing"] == []
    merged = read_samples(tmp_path / "samples.jsonl")
    assert [r.sample_id for r in merged] == ids, "each sample exactly once, in dataset order"
    assert [r.output_ids for r in merged] == [[i, i % 2] for i in range(6)]


@pytest.mark.slow
def test_scale_out_benchmark_smoke(tmp_path):
    """benchmarks/scale_out.py --smoke under torchrun (gloo, tiny shapes): it runs and its JSON
    holds every section (the figures are CPU timings and mean nothing); its --check passes."""
    out = tmp_path / "tp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
           str(ROOT / "benchmarks" / "scale_out.py"), "--smoke", "--profile", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["world_size"] == 2
    assert res["tp1"]["decode_step_ms"] > 0 and res["tp"]["gloo"]["decode_step_ms"] > 0
    assert res["tp"]["gloo"]["ranks_agree"] is True
    assert res["all_reduce"]["gloo"]["eager_us"] > 0 and res["all_reduce"]["gloo"]["correct"] is True
    assert "collective_share" in res["tp"]["gloo"]
    assert all(r["profile"]["wall_us_per_step"] > 0 for r in (res["tp1"], res["tp"]["gloo"], res["compute_only"]))
    # --check: TP=2 ids == TP=1 ids through the benchmark's own device check
    proc = subprocess.run(cmd + ["--check"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["check_ok"] is True and set(res["check"]) == {"mha.gloo", "gqa.gloo"}, res["check"]
    # --dp: each rank alone, then both; every rank reports every phase it took part in
    proc = subprocess.run(cmd + ["--dp", "--repeats", "1"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert set(res["dp"]) == {"0", "1"}
    for r in ("0", "1"):
        assert set(res["dp"][r]["phases"]) == {f"rank {r} alone", "all ranks"}, res["dp"][r]
        assert all(ph["decode_step_ms"] > 0 for ph in res["dp"][r]["phases"].values())


def test_cost_model_counts_what_one_rank_holds():
    """Per-GPU bytes of the cost model = the bytes of the tensors one rank's engine reads per step,
    counted from real shards (tiny GQA model with biases off; T = 1 is the existing formula)."""
    from stagewise.measure.costmodel import (
        kv_cache_bytes,
        llama_decode_step_bytes,
        llama_prefill_flops,
        llama_tp_all_reduces,
        llama_tp_decode_step_bytes,
        llama_tp_prefill_flops,
    )

    lm = tiny_lm(**VARIANTS["gqa"])
    cfg, d = lm.config, full_dims(lm)
    assert llama_tp_decode_step_bytes(cfg, 33, batch=2, elem_bytes=4) == llama_decode_step_bytes(cfg, 33, 2, 4)
    assert llama_tp_prefill_flops(cfg, 17, batch=2) == llama_prefill_flops(cfg, 17, 2)
    layers = [shard_layer(_layer_weights(layer), d, TensorParallel(size=2, rank=1)) for layer in lm.model.layers]
    held = sum(t.numel() for w in layers for t in w if t is not None)
    held += lm.model.norm.weight.numel() + lm.lm_head.weight.numel()
    kv = kv_cache_bytes(cfg, 33, 2, 4) // 2  # this rank's KV heads
    assert llama_tp_decode_step_bytes(cfg, 33, batch=2, elem_bytes=4, tensor_parallel_size=2) == held * 4 + kv
    assert llama_tp_all_reduces(cfg, 3, elem_bytes=4) == {"n_all_reduces": 2 * d.n_layers, "bytes_each": 3 * d.hidden * 4}
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        llama_tp_decode_step_bytes(cfg, 1, tensor_parallel_size=0)


def _torchrun(args: list[str], tmp_path, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "stagewise", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_torchrun_data_parallel_run_merges_to_the_single_process_run(tmp_path):
    """``torchrun --nproc-per-node 2 -m stagewise run --preset eventgpt-tiny --num-samples 6``: each sample
    once, in dataset order, with the ids and tokens of the single-process run; per-rank throughput in
    the summary; the world size and rank devices in config.json; the --nproc launcher does the same."""
    from stagewise.cli import main
    from stagewise.results.records import read_samples

    common = ["run", "--preset", "eventgpt-tiny", "--num-samples", "6", "--output-len", "fixed:4", "--no-ceilings", "--warmup", "0"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    one = read_samples(tmp_path / "one" / "samples.jsonl")
    r = _torchrun([*common, "--out", str(tmp_path / "dp")], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    dp = read_samples(tmp_path / "dp" / "samples.jsonl")
    assert [x.sample_id for x in dp] == [x.sample_id for x in one] == [f"sim{i:03d}" for i in range(6)]
    assert [x.output_ids for x in dp] == [x.output_ids for x in one]
    assert sorted(p.name for p in (tmp_path / "dp").glob("samples.rank*.jsonl")) == ["samples.rank0.jsonl", "samples.rank1.jsonl"]
    summary = json.loads((tmp_path / "dp" / "summary.json").read_text())
    assert summary["data_parallel"]["world_size"] == 2 and summary["data_parallel"]["failed_ranks"] == []
    assert [row["n_ok"] for row in summary["data_parallel"]["per_rank"]] == [3, 3]
    assert summary["loop_s"] == summary["data_parallel"]["makespan_s"]  # the slowest rank's loop
    assert summary["loop_request_throughput_req_s"] == summary["data_parallel"]["samples_per_s"]
    cfg = json.loads((tmp_path / "dp" / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["rank_devices"] == ["cpu", "cpu"]
    env_backup = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        assert main([*common, "--nproc", "2", "--out", str(tmp_path / "launched")]) == 0
    finally:
        if env_backup is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES")
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = env_backup
    assert [x.output_ids for x in read_samples(tmp_path / "launched" / "samples.jsonl")] == [x.output_ids for x in one]


@pytest.mark.slow
def test_torchrun_tensor_parallel_run_gives_the_single_process_ids(tmp_path):
    """``--tensor-parallel-size 2`` through the runner (gloo on CPU, fp32): the fast engine's decoder
    split over two ranks gives the greedy ids of one process; one record per sample."""
    from stagewise.cli import main
    from stagewise.results.records import read_samples

    common = ["run", "--preset", "eventgpt-tiny", "--engine", "fast", "--num-samples", "2", "--output-len", "fixed:6",
              "--no-ceilings", "--warmup", "0", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    r = _torchrun([*common, "--tensor-parallel-size", "2", "--out", str(tmp_path / "tp")], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    one = read_samples(tmp_path / "one" / "samples.jsonl")
    tp = read_samples(tmp_path / "tp" / "samples.jsonl")
    assert [x.output_ids for x in tp] == [x.output_ids for x in one] and len(tp) == 2
    cfg = json.loads((tmp_path / "tp" / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["data_parallel_size"] == 1
