"""What one torchrun rank does for tests/test_parallel.py (CPU, gloo): not a test module.

Usage: ``torchrun --nproc-per-node 2 -m tests.parallel_worker SCENARIO OUT_DIR [options]``.
Each rank writes ``OUT_DIR/rank<R>.pt`` (``tp*``) or rank files of records (``dp``).

Scenarios:

* ``tp``: tensor parallel over the group, fp32 tiny LLaMAs (MHA and GQA): greedy ids and logits
  of batch 1, of a left-padded batch, of ``extend`` steps, and of sampling; the custom-op
  all-reduce traced by ``torch.compile(fullgraph=True, backend="aot_eager")``.
* ``tp_compiled``: the same engine compiled by inductor (matvec decode at batch 1), eager vs compiled.
* ``dp``: data-parallel building blocks: shard 6 sample ids, write one record per sample to this
  rank's file (``--die-after K``: rank 1 writes K records and a torn line, then exits with 3),
  gather devices, and rank 0 merges.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from stagewise.distributed import (
    DistContext,
    barrier,
    gather_devices,
    init,
    merge_rank_files,
    rank_samples_file,
    rank_todo,
)
from stagewise.results.records import SampleRecord, SampleWriter

# the engine scenarios import transformers and the engine lazily (the dp scenario starts faster)

HIDDEN = 64
VARIANTS = {"mha": {}, "gqa": {"num_key_value_heads": 2}, "bias": {"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 2}}


def tiny_lm(seed: int = 0, **overrides):
    """The tests' tiny random LLaMA (tests/test_engine_fast.py), fp32, CPU."""
    from tests.test_engine_fast import tiny_lm as make

    return make(seed, **overrides)


def prompts(lengths, seed: int = 1) -> list[torch.Tensor]:
    """The tests' random prompt embeddings ``[n, HIDDEN]`` (tests/test_engine_fast.py)."""
    from tests.test_engine_fast import prompts as make

    return make(lengths, seed)


def run_cases(lm, options, *, rank: int) -> dict[str, torch.Tensor]:
    """Every case the TP test compares, on one engine (TP or not). Non-zero ranks feed a zero
    prompt: the engine must use rank 0's (broadcast)."""
    from stagewise.engine.base import stack_left_padded
    from stagewise.engine.fast import FastEngine

    eng = FastEngine(lm, options)
    out: dict[str, torch.Tensor] = {}

    def feed(rows):
        embeds, lengths = stack_left_padded(rows)
        if rank > 0 and eng.tp is not None:
            embeds = torch.zeros_like(embeds)
        return embeds, lengths

    for name, lengths in (("b1", [9]), ("padded", [7, 12, 3])):
        embeds, lens = feed(prompts(lengths))
        pre = eng.prefill(embeds, lens)
        dec = eng.decode(pre, 12, None)
        out[f"{name}.logits"] = pre.logits.clone()
        out[f"{name}.tokens"] = dec.tokens
    # extend: 5 tokens, keep 2, a rejected draft, 4 more, then one
    embeds, lens = feed(prompts([7, 4]))
    eng.prefill(embeds, lens)
    t = out["padded.tokens"][:2, :8]
    ext = [eng.extend(t[:, :5]).clone()]
    eng.advance(2)
    eng.extend((t[:, 2:5] + 1) % lm.config.vocab_size)
    eng.advance(0)
    ext.append(eng.extend(t[:, 2:6]).clone())
    eng.advance(4)
    ext.append(eng.extend(t[:, 6:7]).clone())
    out["extend.logits"] = torch.cat(ext, dim=1)
    if eng.tp is not None:
        out["all_reduce"] = eng.tp.name
    return out


def speculative_tokens(tp) -> dict[str, list[int]]:
    """Speculative decoding (greedy) on a tensor-parallel target: prompt lookup, and a draft LM
    (the target with noise on its LM head: accepts most drafts, rejects some) replicated on every
    rank; greedy ids must be plain greedy decoding's. ``tp=None``: the one-process reference."""
    from stagewise.engine.base import stack_left_padded
    from stagewise.engine.fast import FastEngine, FastOptions
    from stagewise.engine.speculative import (
        DraftModelDrafter,
        NgramDrafter,
        speculative_decode,
    )

    lm = tiny_lm(**VARIANTS["gqa"])
    draft_lm = tiny_lm(**VARIANTS["gqa"])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        draft_lm.lm_head.weight.add_(0.02 * torch.randn(draft_lm.lm_head.weight.shape, generator=g))
    eng = FastEngine(lm, FastOptions(max_seq=64, kv_bucket=8, tensor_parallel=tp))
    embeds, lens = stack_left_padded(prompts([9]))
    out = {"plain": eng.decode(eng.prefill(embeds, lens), 16, None).tokens[0].tolist()}
    for name, drafter in (("ngram", NgramDrafter(2, 1)), ("draft_model", DraftModelDrafter.from_lm(draft_lm, max_seq=64))):
        if name == "draft_model":
            drafter.prefill(inputs_embeds=embeds)
        spec = speculative_decode(eng, eng.prefill(embeds, lens), drafter, 3, 16, None)
        out[name] = spec.tokens[0].tolist()
        out[f"{name}.acceptance_rate"] = spec.stats.acceptance_rate
    return out


def functional_reduce():
    """The one-shot op's Reduce with no symmetric buffer: on CPU it takes its fallback (copy, then
    all_reduce), which exercises the functional custom op under torch.compile without a GPU."""
    import functools

    from stagewise.engine.parallel import _IMPLS, _Impl, _reduce_one_shot

    _IMPLS["test_functional"] = _Impl(name="symm_mem", group=None)
    return functools.partial(_reduce_one_shot, key="test_functional")


def scenario_tp(ctx: DistContext, args) -> dict:
    from stagewise.engine.base import stack_left_padded
    from stagewise.engine.fast import FastEngine, FastOptions
    from stagewise.engine.layers import decode_out
    from stagewise.engine.parallel import TensorParallel
    from stagewise.engine.sampling import SamplingParams

    tp = TensorParallel.from_group(all_reduce="auto")
    res: dict = {"world_size": ctx.world_size}
    for variant, kw in VARIANTS.items():
        lm = tiny_lm(**kw)
        opts = dict(max_batch=4, max_seq=64, kv_bucket=8)
        res[variant] = run_cases(lm, FastOptions(**opts, tensor_parallel=tp), rank=ctx.rank)
        sampling = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=5)
        eng = FastEngine(lm, FastOptions(**opts, sampling=sampling, tensor_parallel=tp))
        embeds, lens = stack_left_padded(prompts([6, 10]))
        res[variant]["sampled.tokens"] = eng.decode(eng.prefill(embeds, lens, seeds=[11, 12]), 10, None).tokens
    res["spec"] = speculative_tokens(tp)
    # the reduce custom op under torch.compile(fullgraph): traced, functionalized, same numbers
    lm = tiny_lm(**VARIANTS["gqa"])
    eng = FastEngine(lm, FastOptions(max_seq=32, tensor_parallel=tp))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, HIDDEN, generator=g)
    attn = torch.randn(2, eng.dims.n_kv_heads, eng.dims.group * 3, eng.dims.head_dim, generator=g)
    with torch.no_grad():
        eager = decode_out(x, attn, eng.layers[0], dims=eng.dims, matvec=False, reduce=eng.reduce)
        traced = torch.compile(decode_out, backend="aot_eager", fullgraph=True)(x, attn, eng.layers[0], dims=eng.dims, matvec=False, reduce=eng.reduce)
        functional = torch.compile(decode_out, backend="aot_eager", fullgraph=True)(x, attn, eng.layers[0], dims=eng.dims, matvec=False,
                                                                                      reduce=functional_reduce())
    res["aot_eager_max_diff"] = float((eager - traced).abs().max())
    res["aot_eager_functional_max_diff"] = float((eager - functional).abs().max())
    # the lockstep guards: a flag true on one rank only is not true everywhere; differing tokens raise
    res["all_true_mixed"] = eng.tp.all_true(torch.tensor(ctx.rank == 0))
    res["all_true_all"] = eng.tp.all_true(torch.tensor(True))
    try:
        eng.tp.check_same(torch.tensor([[5, 6, 7 + ctx.rank]]), "decoded tokens")
        res["check_same_error"] = None
    except RuntimeError as e:
        res["check_same_error"] = str(e)
    eng.tp.check_same(torch.tensor([[5, 6, 7]]), "decoded tokens")  # equal: no error
    res["one_shot_setup"] = one_shot_setup_outcomes(ctx, tp)
    import torch.distributed as dist

    from stagewise.distributed import layout, tensor_parallel_group

    res["tp_group_sizes"] = {}
    for t in (1, 2):  # T = 1: one group of one rank per rank; T = 2: the whole world (None)
        g = tensor_parallel_group(ctx, layout(ctx, t))
        res["tp_group_sizes"][t] = None if g is None else dist.get_world_size(g)
    return res


def one_shot_setup_outcomes(ctx: DistContext, tp) -> dict:
    """The one-shot path's setup decision is collective: a setup failing on one rank only, and a
    self-test failing (a CPU buffer: the one-shot kernel has no CPU implementation), make every
    rank give up (the symmetric-memory allocation itself is replaced: there is no GPU here)."""
    import stagewise.engine.parallel as P

    orig = P._symm_mem_buffer
    out = {}
    try:
        for case in ("rank1_setup_fails", "self_test_fails"):
            def fake(tp_, device, dtype, case=case):
                if case == "rank1_setup_fails" and tp_.rank == 1:
                    raise RuntimeError("no peer access")
                return torch.zeros(16), "fake-group", True
            P._symm_mem_buffer = fake
            impl = P._Impl(name="symm_mem", group=None)
            P._IMPLS["probe"] = impl
            out[case] = P._setup_one_shot(impl, "probe", tp, torch.device("cpu"), torch.float32)
    finally:
        P._symm_mem_buffer = orig
        P._IMPLS.pop("probe", None)
    return out


def scenario_tp_compiled(ctx: DistContext, args) -> dict:
    from stagewise.engine.base import stack_left_padded
    from stagewise.engine.fast import FastEngine, FastOptions
    from stagewise.engine.parallel import TensorParallel

    tp = TensorParallel.from_group(all_reduce="auto")
    lm = tiny_lm(**VARIANTS["gqa"])
    rows = prompts([7, 12])
    res = {}
    for name, extra in (("eager", {}), ("compiled", {"compile": True, "matvec": True}), ("functional", {"compile": True, "matvec": True})):
        eng = FastEngine(lm, FastOptions(max_batch=2, max_seq=40, kv_bucket=8, tensor_parallel=tp, **extra))
        if name == "functional":  # the one-shot op's Reduce (its CPU fallback) inside inductor's code
            eng.reduce = functional_reduce()
        for case, sel in (("b2", rows), ("b1", rows[:1])):
            embeds, lens = stack_left_padded(sel)
            pre = eng.prefill(embeds, lens)
            res[f"{name}.{case}.logits"] = pre.logits.clone()
            res[f"{name}.{case}.tokens"] = eng.decode(pre, 10, None).tokens
    return res


def scenario_dp(ctx: DistContext, args) -> dict:
    run_dir = Path(args.out)
    ids = [f"s{i}" for i in range(6)]
    todo = rank_todo(ids, run_dir, ctx, key=lambda s: s)
    devices = gather_devices(ctx)
    written = []
    with SampleWriter(rank_samples_file(run_dir, ctx.rank)) as w:
        for k, sid in enumerate(todo):
            if ctx.rank == 1 and args.die_after is not None and k == args.die_after:
                w._fh.write('{"sample_id": "torn')  # a record cut by the kill
                w._fh.flush()
                barrier(ctx)  # let rank 0 finish its shard first (a deterministic test)
                os._exit(3)
            w.write(SampleRecord(sample_id=sid, model="tiny", engine="fast", output_ids=[int(sid[1:]), ctx.rank]))
            written.append(sid)
    barrier(ctx)
    res = {"todo": todo, "written": written, "devices": devices}
    if ctx.rank == 0:
        rep = merge_rank_files(run_dir, ids, world_size=ctx.world_size)
        res["merge"] = {"missing": rep.missing, "per_rank": rep.per_rank}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=["tp", "tp_compiled", "dp"])
    ap.add_argument("out")
    ap.add_argument("--die-after", type=int, default=None)
    args = ap.parse_args(argv)
    ctx = init(DistContext.from_env(), "cpu")
    torch.set_num_threads(1)
    res = {"tp": scenario_tp, "tp_compiled": scenario_tp_compiled, "dp": scenario_dp}[args.scenario](ctx, args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    torch.save(res, Path(args.out) / f"{args.scenario}.rank{ctx.rank}.pt")
    barrier(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
