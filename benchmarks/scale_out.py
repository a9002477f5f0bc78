"""Tensor-parallel decode and prefill of the fast engine, and the all-reduce it depends on.

EventGPT-7B's language model shapes (LLaMA-7B / Vicuna-7B: 32 layers, hidden 4096, 32 heads,
MLP 11008, vocabulary 32003 as in benchmarks/decode_engines.py), RANDOM weights (bf16, built on
the GPU with one seed and broadcast from rank 0 so every rank holds the same model), batch 1, a
641-token prompt of random token embeddings, greedy decode. Under ``torchrun --nproc-per-node T`` it measures, in one job:

* ``all_reduce``: an 8 KiB all-reduce (one decode step's partial o-proj / down-proj output,
  ``hidden x 2`` bytes) with each implementation: eager (``n`` calls back to back, CUDA events)
  and replayed from a CUDA graph that holds ``n`` calls; mean per call in us, the median of
  ``--repeats`` runs. Also checks the sum (inputs ``rank + 1``: exact), that the ranks hold the same
  bits on random inputs, and that the sum equals ``torch.distributed.all_reduce``'s (NCCL) bit for bit.
* ``tp1``: the engine on one GPU (rank 0; the others wait): decode step (median of the per-step
  CUDA-event times of ``--repeats`` decodes of ``--new-tokens``, graph-replayed) and prefill
  (host clock around ``prefill`` with device syncs, graph-replayed, median).
* ``tp[impl]``: the same on all ``T`` ranks for each all-reduce implementation, with
  ``ratio_to_tp1``, whether every rank produced the same tokens, and how many leading tokens
  match TP=1 (bf16: TP changes the summation order, so long random-weight decodes may drift;
  informative, not a check).
* ``compute_only``: TP=T with the all-reduce replaced by the identity (a timing device only: the
  numbers it computes are partial sums), so ``collective_ms_per_step = step - compute_only step``
  and ``collective_share = that / step``; also the microbenchmark's estimate
  ``2 x layers x in-graph all-reduce time``.

Targets (issue 12, 2 H200): TP=2 decode step and 641-token prefill <= 0.75x TP=1.

``--dp`` measures instead why data parallel scales below T: every rank holds the whole model (TP=1)
on its own GPU, and the same decode is timed in phases separated by CPU-only (gloo) barriers:
each rank alone while the others sleep, then all ranks at once (``--warmup-in-turns``: the ranks
compile and tune one at a time instead of together). Per phase and rank: the median
decode step (CUDA events), a per-kernel profile of 20 graph-replayed steps
(:func:`stagewise.measure.profile.kernel_table`: kernel time vs wall, so a slower kernel and an idle
GPU read differently), and the GPU's SM / memory clocks, power and clock-event reasons sampled
through NVML every 20 ms while it runs. Same step alone and together: no run-time contention;
slower kernels together with lower clocks: the GPUs share a power or thermal budget; the same
kernel slower on one rank at the same clocks: the ranks compiled different kernels.

``--profile STEPS`` adds a per-kernel profile of each engine's decode step (rank 0's tables are
printed): what halves under TP and what does not; ``--profile-prefill N`` the same for N prefills.

``--matvec-kernel triton`` builds every engine (TP=1, TP=T, compute-only, DP, ``--check``) with
``FastOptions(matvec_kernel="triton")``: the dense decode projections run the hand-written Triton
GEMV with launch parameters fixed by the shape instead of the compiled, timing-tuned reductions
(the candidate fix for kernels that differ per compile and per rank); the JSON records it.

Usage (GPU, from the repository root; the package is imported normally, so make it importable)::

    PYTHONPATH=$PWD torchrun --nproc-per-node 2 benchmarks/scale_out.py --out $OUT/tp.json
    PYTHONPATH=$PWD python3 benchmarks/scale_out.py --out $OUT/tp1.json        # TP=1 only
    PYTHONPATH=$PWD torchrun --nproc-per-node 2 benchmarks/scale_out.py --dp --out $OUT/dp.json

Smoke test (CPU, gloo, tiny shapes)::

    PYTHONPATH=$PWD torchrun --nproc-per-node 2 benchmarks/scale_out.py --smoke --out /tmp/tp.json

Correctness on the device first (fp32 tiny models, compiled and graph-captured: TP=T ids must equal
TP=1 ids with every all-reduce; not timed on a GPU yet, estimated 1-2 min)::

    PYTHONPATH=$PWD torchrun --nproc-per-node 2 benchmarks/scale_out.py --check --out $OUT/check.json

NVLink multicast stays off: this script sets ``NCCL_NVLS_ENABLE=0``,
``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` and ``NVSHMEM_DISABLE_NVLS=1`` before torch is imported, and
the one-shot all-reduce uses no multimem operation. The table is printed last; rank 0 writes the
JSON.
"""

from __future__ import annotations

import os

for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_name] = _value  # before torch and NCCL read them

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from stagewise.distributed import DistContext, barrier, gather_devices, init  # noqa: E402
from stagewise.engine.fast import FastEngine, FastOptions  # noqa: E402
from stagewise.engine.layers import no_reduce  # noqa: E402
from stagewise.engine.parallel import (  # noqa: E402
    TensorParallel,
    make_collectives,
    time_all_reduce_us,
)
from stagewise.measure.profile import format_table, kernel_table  # noqa: E402

LLAMA_7B = {
    "vocab_size": 32003, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}
TINY = {
    "vocab_size": 101, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6, "initializer_range": 0.2,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_lm(shapes: dict, device: torch.device, dtype: torch.dtype, ctx: DistContext):
    """The random model, identical on every rank (seeded, then rank 0's parameters broadcast)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        lm = LlamaForCausalLM(LlamaConfig(**shapes)).eval()
    torch.set_default_dtype(prev)
    if ctx.distributed:
        with torch.no_grad():
            for p in lm.parameters():
                dist.broadcast(p.data, src=0)
    sync(device)
    return lm


# ----------------------------------------------------------------------------------------------
# All-reduce microbenchmark


def bench_all_reduce(tp: TensorParallel, ctx: DistContext, *, numel: int, dtype: torch.dtype, calls: int, repeats: int) -> dict:
    device = torch.device(ctx.device)
    coll = make_collectives(tp, device, dtype)
    out: dict[str, Any] = {"applied": coll.describe(), "bytes": numel * torch.empty((), dtype=dtype).element_size()}
    try:
        x = torch.full((1, numel), float(ctx.rank + 1), dtype=dtype, device=device)
        y = coll.reduce(x)
        out["correct"] = bool((y == ctx.world_size * (ctx.world_size + 1) / 2).all())
        g = torch.Generator(device="cpu").manual_seed(100 + ctx.rank)
        r = torch.randn(1, numel, generator=g).to(device=device, dtype=dtype)
        y = coll.reduce(r.clone()).clone()
        ref = r.clone()
        dist.all_reduce(ref)
        out["equals_dist_all_reduce"] = bool(torch.equal(y, ref))
        gathered = [torch.empty_like(y) for _ in range(ctx.world_size)]
        dist.all_gather(gathered, y)
        out["ranks_agree"] = all(torch.equal(gathered[0], t) for t in gathered)

        out["eager_us"] = time_all_reduce_us(coll, numel, device=device, dtype=dtype, calls=calls, repeats=repeats, in_graph=False)
        if device.type == "cuda":
            out["graph_us"] = time_all_reduce_us(coll, numel, device=device, dtype=dtype, calls=calls, repeats=repeats, in_graph=True)
    finally:
        coll.close()
    return out


# ----------------------------------------------------------------------------------------------
# Engine measurements


def measure_engine(eng: FastEngine, embeds: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """decode step (median of all per-step times), prefill (median), the last tokens."""
    device = embeds.device
    S = embeds.shape[1]
    steps, prefill_ms, tokens = [], [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        pre = eng.prefill(embeds, [S])
        sync(device)
        prefill_ms.append((time.perf_counter() - t0) * 1e3)
        out = eng.decode(pre, new_tokens, None)
        steps.extend(out.step_ms)
        tokens = out.tokens[0].tolist()
    return {"decode_step_ms": statistics.median(steps), "prefill_ms": statistics.median(prefill_ms), "tokens": tokens}


def run_engine(lm, opts: FastOptions, embeds: torch.Tensor, args, *, compute_only: bool = False) -> dict:
    eng = FastEngine(lm, opts)
    try:
        if compute_only:  # a timing device: the partial sums are not added up, so the ranks'
            eng.reduce = no_reduce  # tokens differ; the engine's agreement check is switched off
            eng.tp.check_same = lambda t, what: None
        t0 = time.perf_counter()
        eng.warmup(embeds.shape[1], args.new_tokens)
        res = measure_engine(eng, embeds, args.new_tokens, args.repeats)
        res["warmup_s"] = time.perf_counter() - t0
        res["matvec_kernel"] = eng.matvec_kernel  # as applied
        if args.profile:  # where this rank's decode step goes, kernel by kernel (collectives included)
            S, P = embeds.shape[1], args.profile
            res["profile"] = kernel_table(lambda pre, e=eng: e.decode(pre, P + 1, None), P, embeds.device,
                                          setup=lambda e=eng: e.prefill(embeds, [S]), top=15)
        if args.profile_prefill:  # the same for the prefill (its all-reduces run after their matmuls)
            S, P = embeds.shape[1], args.profile_prefill
            res["prefill_profile"] = kernel_table(lambda e=eng: [e.prefill(embeds, [S]) for _ in range(P)], P, embeds.device, top=15)
        if eng.tp is not None:
            res["applied"] = eng.tp.describe()
        return res
    finally:
        if eng.tp is not None:
            eng.tp.close()
        del eng
        gc.collect()
        if embeds.device.type == "cuda":
            torch.cuda.empty_cache()


def ranks_agree(tokens: list[int], ctx: DistContext) -> bool:
    if not ctx.distributed:
        return True
    got: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(got, tokens)
    return all(t == got[0] for t in got)


def leading_match(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def guarded(fn: Callable[[], dict], what: str) -> dict:
    """Run one section; a failure is recorded, not fatal (it happens on every rank alike)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the benchmark reports what broke and goes on
        print(f"[scale_out] {what} failed: {type(e).__name__}: {e}", flush=True)
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0]}


# ----------------------------------------------------------------------------------------------
# Data parallel (--dp): the same TP=1 decode on each rank, alone and all at once


class GpuSampler:
    """Samples one GPU's SM and memory clocks (MHz), power (W) and clock-event reasons through NVML
    (``pynvml``, from the nvidia-ml-py package) every ``period_s`` in a thread, between
    :meth:`start` and :meth:`stop`. Without NVML (or on a CPU) it records nothing."""

    def __init__(self, device: torch.device, period_s: float = 0.02):
        self.period_s, self.samples, self._stop = period_s, [], threading.Event()
        self._nvml = self._handle = self._thread = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            # the NVML index of a CUDA device (CUDA_VISIBLE_DEVICES honoured), as torch.cuda.power_draw finds it
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda._get_nvml_device_index(device))
            self._nvml = pynvml
        except Exception as e:  # noqa: BLE001 - no NVML here: the phases are still timed
            print(f"[scale_out] NVML unavailable ({type(e).__name__}: {e}); no clock samples", flush=True)

    def _run(self) -> None:
        n, h = self._nvml, self._handle
        while not self._stop.is_set():
            try:
                reasons = n.nvmlDeviceGetCurrentClocksEventReasons(h) if hasattr(n, "nvmlDeviceGetCurrentClocksEventReasons") \
                    else n.nvmlDeviceGetCurrentClocksThrottleReasons(h)
                self.samples.append((n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM), n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM),
                                     n.nvmlDeviceGetPowerUsage(h) / 1e3, int(reasons)))
            except Exception:  # noqa: BLE001 - a failed sample is skipped
                pass
            self._stop.wait(self.period_s)

    def start(self) -> None:
        if self._nvml is None:
            return
        self.samples, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> dict:
        """Median SM / memory clock (MHz), mean and max power (W), the OR of the clock-event
        reason bits seen (NVML's ``nvmlClocksEventReason*`` flags), and the sample count."""
        if self._thread is None:
            return {}
        self._stop.set()
        self._thread.join()
        self._thread = None
        if not self.samples:
            return {"n_samples": 0}
        sm, mem, pw, rs = zip(*self.samples)
        bits = 0
        for r in rs:
            bits |= r
        return {"n_samples": len(sm), "sm_clock_mhz_median": statistics.median(sm), "mem_clock_mhz_median": statistics.median(mem),
                "power_w_mean": statistics.fmean(pw), "power_w_max": max(pw), "clock_event_reasons": hex(bits)}


def run_dp(lm, opts: FastOptions, embeds: torch.Tensor, args, ctx: DistContext) -> dict:
    """Phases ``rank r alone`` (r = 0..T-1) and ``all ranks``: this rank's decode step (median of
    ``--repeats`` decodes' per-step times), a kernel profile of 20 replayed steps, and NVML samples.
    Phases are separated by gloo barriers, so a waiting rank leaves its GPU idle."""
    device = embeds.device
    gloo = dist.new_group(backend="gloo") if ctx.distributed else None
    wait = (lambda: dist.barrier(group=gloo)) if gloo is not None else (lambda: None)
    eng = FastEngine(lm, opts)

    def warm() -> float:
        t0 = time.perf_counter()
        eng.warmup(embeds.shape[1], args.new_tokens)
        return (time.perf_counter() - t0) * 1e3

    if args.warmup_in_turns:  # one rank at a time (a tried fix: it did not make the ranks' kernels equal)
        warm_ms = 0.0
        for turn in range(ctx.world_size):
            if turn == ctx.rank:
                warm_ms = warm()
            wait()
    else:
        warm_ms = warm()
    out: dict[str, Any] = {"warmup_s": warm_ms / 1e3, "warmup": "in turns" if args.warmup_in_turns else "at once",
                           "matvec_kernel": eng.matvec_kernel, "phases": {}}
    sampler = GpuSampler(device)
    S = embeds.shape[1]
    phases = [(f"rank {r} alone", {r}) for r in range(ctx.world_size)] + ([("all ranks", set(range(ctx.world_size)))] if ctx.world_size > 1 else [])
    for name, active in phases:
        wait()
        if ctx.rank in active:
            sampler.start()
            t_phase = time.time()
            steps = []
            for _ in range(args.repeats):
                steps += eng.decode(eng.prefill(embeds, [S]), args.new_tokens, None).step_ms
            prof = kernel_table(lambda pre: eng.decode(pre, 21, None), 20, device, setup=lambda: eng.prefill(embeds, [S]), top=12)
            out["phases"][name] = {"decode_step_ms": statistics.median(steps), "decode_step_ms_p90": sorted(steps)[int(0.9 * (len(steps) - 1))],
                                   "wall_start_unix_s": t_phase, "wall_end_unix_s": time.time(), "gpu": sampler.stop(), "profile": prof}
        wait()
    return out


def main_dp(args, ctx: DistContext, lm, embeds: torch.Tensor, base: dict, res: dict) -> dict:
    """``--dp``: :func:`run_dp` on every rank, gathered to rank 0 (``res["dp"][rank]``)."""
    mine = guarded(lambda: run_dp(lm, FastOptions(**base), embeds, args, ctx), "DP phases")
    if ctx.distributed:
        got: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(got, mine)
    else:
        got = [mine]
    res["dp"] = {str(r): g for r, g in enumerate(got)}
    return res


def dp_table(res: dict) -> str:
    """Decode step per phase (rows) and rank (columns), with the SM clock and power."""
    dp = res["dp"]
    ranks = sorted(dp, key=int)
    names = [f"rank {r} alone" for r in ranks] + (["all ranks"] if len(ranks) > 1 else [])
    lines = ["| phase | " + " | ".join(f"rank {r}: step ms, busy, SM MHz, W" for r in ranks) + " |",
             "| --- |" + " ---: |" * len(ranks)]
    for n in names:
        cells = []
        for r in ranks:
            ph = dp[r].get("phases", {}).get(n)
            if ph is None:
                cells.append("idle")
                continue
            g, busy = ph.get("gpu", {}), ph["profile"].get("busy_fraction")
            cells.append(f"{ph['decode_step_ms']:.3f}, {'-' if busy is None else f'{busy:.0%}'}, "
                         f"{g.get('sm_clock_mhz_median', '-')}, {g.get('power_w_mean', float('nan')):.0f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Correctness on the device (--check): fp32, tiny models, compiled and graph-captured


CHECK_MODELS = {
    "mha": {**TINY, "num_key_value_heads": 4, "intermediate_size": 112},
    "gqa": {**TINY, "num_key_value_heads": 2, "intermediate_size": 112},
}


def check_cases(eng: FastEngine, device: torch.device, rank: int) -> dict[str, torch.Tensor]:
    """Greedy ids and prefill logits of batch 1 and of a left-padded batch of 3 (as in the CPU
    tests), after a warm-up that captures the padded batch's prefill graphs and the decode graphs."""
    from stagewise.engine.base import stack_left_padded

    g = torch.Generator(device="cpu").manual_seed(1)
    rows = [torch.randn(n, TINY["hidden_size"], generator=g) for n in (9, 7, 12, 3)]
    eng.warmup(12, 16, batch_sizes=[3])
    out = {}
    for name, sel in (("b1", rows[:1]), ("padded", rows[1:])):
        embeds, lengths = stack_left_padded(sel)
        embeds = embeds.to(device)
        if rank > 0 and eng.tp is not None:
            embeds = torch.zeros_like(embeds)  # the engine must use rank 0's prompt
        pre = eng.prefill(embeds, lengths)
        out[f"{name}.logits"] = pre.logits.float().cpu()
        out[f"{name}.tokens"] = eng.decode(pre, 16, None).tokens
    return out


def run_check(ctx: DistContext, impls: list[str], tp_of: Callable[[str], TensorParallel], matvec_kernel: str = "inductor") -> dict:
    """TP=T ids must EQUAL TP=1 ids in fp32 (as tests/test_parallel.py argues for CPU), here with
    torch.compile, CUDA graphs and each all-reduce; logits within 1e-3 (TF32 off)."""
    device = torch.device(ctx.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    out: dict[str, Any] = {}
    for variant, shapes in CHECK_MODELS.items():
        lm = build_lm(shapes, device, torch.float32, ctx)
        opts = {"max_batch": 3, "max_seq": 64, "kv_bucket": 16, "matvec_kernel": matvec_kernel}
        ref = None
        if ctx.rank == 0:
            ref = check_cases(FastEngine(lm, FastOptions(**opts)), device, 0)
        barrier(ctx)
        for impl in impls:
            def one(lm=lm, impl=impl) -> dict:
                eng = FastEngine(lm, FastOptions(**opts, tensor_parallel=tp_of(impl)))
                try:
                    got = check_cases(eng, device, ctx.rank)
                    res: dict[str, Any] = {"applied": eng.tp.describe()}
                finally:
                    eng.tp.close()
                if ref is not None:
                    res["ids_equal_tp1"] = all(torch.equal(got[k], ref[k]) for k in ref if k.endswith("tokens"))
                    res["max_abs_logit_diff"] = max(float((got[k] - ref[k]).abs().max()) for k in ref if k.endswith("logits"))
                    res["ok"] = res["ids_equal_tp1"] and res["max_abs_logit_diff"] <= 1e-3
                return res
            out[f"{variant}.{impl}"] = guarded(one, f"check {variant} {impl}")
        del lm
        gc.collect()
    return out


def table(res: dict) -> str:
    tp1 = res.get("tp1", {})
    T = res["world_size"]
    impls = list(res.get("tp", {}))
    head = ["", "TP=1"] + [f"TP={T} {i}" for i in impls] + ["target"]
    rows = [head, ["---"] * len(head)]

    def cell(d: dict, key: str, ref: float | None = None) -> str:
        if "error" in d:
            return "failed"
        v = d.get(key)
        if v is None:
            return "-"
        return f"{v:.3f}" + (f" ({v / ref:.2f}x)" if ref else "")

    for key, name, target in (("decode_step_ms", "decode step, batch 1 (ms)", "<= 0.75x TP=1"),
                              ("prefill_ms", f"prefill {res['prompt_len']} tokens (ms)", "<= 0.75x TP=1")):
        ref = tp1.get(key)
        rows.append([name, cell(tp1, key)] + [cell(res["tp"][i], key, ref) for i in impls] + [target])
    rows.append([f"all-reduce {res['all_reduce_bytes']} B eager (us)", "-"]
                + [cell(res["all_reduce"].get(i, {}), "eager_us") for i in impls] + [""])
    rows.append([f"all-reduce {res['all_reduce_bytes']} B in a CUDA graph (us)", "-"]
                + [cell(res["all_reduce"].get(i, {}), "graph_us") for i in impls] + [""])
    rows.append(["collectives per decode step (ms)", "-"] + [cell(res["tp"][i], "collective_ms_per_step") for i in impls] + [""])
    rows.append(["collective share of the step", "-"] + [cell(res["tp"][i], "collective_share") for i in impls] + [""])
    rows.append(["ranks produce the same tokens", "-"] + [str(res["tp"][i].get("ranks_agree", "-")) for i in impls] + ["True"])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def finish(res: dict, args, ctx: DistContext, report: Callable[[], str]) -> dict:
    """End of a run, on every rank: rank 0 writes the JSON (``--out``) and prints it, then the
    text ``report()`` returns; the ranks meet and leave the process group."""
    if ctx.rank == 0:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(res))
        print(report(), flush=True)
    barrier(ctx)
    if ctx.distributed:
        dist.destroy_process_group()
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="JSON output (rank 0)")
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny shapes")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 641 (smoke 20)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 64 (smoke 8)")
    ap.add_argument("--impls", default=None, help="all-reduces to compare (default nccl,symm_mem; smoke gloo)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calls", type=int, default=100, help="all-reduces per timed run")
    ap.add_argument("--autotune", type=int, choices=[0, 1], default=None, help="coordinate-descent tuning (default: engine's)")
    ap.add_argument("--matvec-kernel", choices=["inductor", "triton"], default="inductor",
                    help="dense decode projections of every engine built: compiled reductions (default) or the Triton GEMV "
                         "with fixed launch parameters (FastOptions.matvec_kernel; --smoke on CPU needs TRITON_INTERPRET=1)")
    ap.add_argument("--one-shot-max-bytes", type=int, default=None, help="symm_mem buffer size (default: the engine's)")
    ap.add_argument("--check", action="store_true",
                    help="only the correctness check: fp32 tiny models, TP=T ids == TP=1 ids with each all-reduce (~1-2 min)")
    ap.add_argument("--dp", action="store_true",
                    help="only the data-parallel contention phases: every rank's TP=1 decode alone and all at once")
    ap.add_argument("--warmup-in-turns", action="store_true",
                    help="--dp: the ranks compile and tune one at a time (default: all at once, as stagewise run does)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="also a per-kernel profile of STEPS decode steps of every engine (TP=1, TP=T, compute-only)")
    ap.add_argument("--profile-prefill", type=int, default=0, metavar="N",
                    help="also a per-kernel profile of N prefills of every engine (TP=1, TP=T, compute-only)")
    ap.add_argument("--no-tp1", action="store_true")
    ap.add_argument("--no-compute-only", action="store_true")
    args = ap.parse_args(argv)

    device_type = "cpu" if args.smoke else "cuda"
    if device_type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("scale_out: no CUDA device (use --smoke on CPU)")
    ctx = init(DistContext.from_env(), device_type)
    device = torch.device(ctx.device)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shapes = TINY if args.smoke else LLAMA_7B
    S = args.prompt_len or (20 if args.smoke else 641)
    args.new_tokens = args.new_tokens or (8 if args.smoke else 64)
    impls = (args.impls or ("gloo" if args.smoke else "nccl,symm_mem")).split(",")
    T = ctx.world_size
    res: dict[str, Any] = {
        "world_size": T, "devices": gather_devices(ctx), "model": "tiny" if args.smoke else "llama-7b shapes (EventGPT-7B LM), random weights",
        "dtype": str(dtype).removeprefix("torch."), "batch": 1, "prompt_len": S, "new_tokens": args.new_tokens,
        "matvec_kernel": args.matvec_kernel, "autotune": args.autotune,
        "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")},
        "torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None,
    }
    def tp_of(impl: str) -> TensorParallel:
        extra = {} if args.one_shot_max_bytes is None else {"one_shot_max_bytes": args.one_shot_max_bytes}
        return TensorParallel.from_group(all_reduce=impl, **extra)

    if args.check:
        if T < 2:
            raise SystemExit("scale_out --check: run it under torchrun with 2 or more processes")
        res.update(model="tiny (mha, gqa), fp32, compiled and graph-captured on CUDA", dtype="float32", prompt_len=None, new_tokens=16)
        res["check"] = run_check(ctx, impls, tp_of, args.matvec_kernel)
        res["check_ok"] = all(r.get("ok") for r in res["check"].values()) if ctx.rank == 0 else None
        return finish(res, args, ctx, lambda: "\n".join(
            f"| {name} | {r.get('applied', {}).get('all_reduce', '-')} | ids equal TP=1: {r.get('ids_equal_tp1')} | "
            f"max |logit diff| {r.get('max_abs_logit_diff')} | {'ok' if r.get('ok') else 'FAILED ' + r.get('error', '')} |"
            for name, r in res["check"].items()))

    t_start = time.perf_counter()
    lm = build_lm(shapes, device, dtype, ctx)
    res["model_init_s"] = time.perf_counter() - t_start
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, shapes["vocab_size"], (1, S), generator=g).to(device)
    with torch.no_grad():
        embeds = lm.model.embed_tokens(ids).detach().clone()
    base = {"max_batch": 1, "max_seq": -(-(S + args.new_tokens) // 64) * 64, "kv_bucket": 64, "matvec_kernel": args.matvec_kernel}
    if args.autotune is not None:
        base["autotune"] = bool(args.autotune)

    if args.dp:
        main_dp(args, ctx, lm, embeds, base, res)
        res["total_s"] = time.perf_counter() - t_start
        return finish(res, args, ctx, lambda: "\n".join(
            [format_table(ph["profile"], f"rank {r}, {n}") for r, d in res["dp"].items() for n, ph in d.get("phases", {}).items()]
            + [dp_table(res)]))

    # 1. the all-reduce alone
    numel = shapes["hidden_size"]
    res["all_reduce_bytes"] = numel * torch.empty((), dtype=dtype).element_size()
    res["all_reduce"] = {}
    if T > 1:
        for impl in impls:
            res["all_reduce"][impl] = guarded(lambda: bench_all_reduce(tp_of(impl), ctx, numel=numel, dtype=dtype, calls=args.calls,
                                                                       repeats=args.repeats), f"all-reduce {impl}")
    # 2. TP=1 on rank 0
    if not args.no_tp1:
        if ctx.rank == 0:
            res["tp1"] = guarded(lambda: run_engine(lm, FastOptions(**base), embeds, args), "TP=1")
        barrier(ctx)
    # 3. TP=T per implementation, and the compute-only step
    res["tp"] = {}
    if T > 1:
        n_layers = shapes["num_hidden_layers"]
        nocoll = None
        if not args.no_compute_only:
            nocoll = guarded(lambda: run_engine(lm, FastOptions(**base, tensor_parallel=tp_of(impls[0])),
                                                embeds, args, compute_only=True), "compute-only TP")
            nocoll.pop("tokens", None)
            res["compute_only"] = nocoll
        for impl in impls:
            r = guarded(lambda: run_engine(lm, FastOptions(**base, tensor_parallel=tp_of(impl)),
                                           embeds, args), f"TP={T} {impl}")
            if "error" not in r:
                r["ranks_agree"] = ranks_agree(r["tokens"], ctx)
                tp1 = res.get("tp1", {})
                if "tokens" in tp1:
                    r["leading_tokens_equal_tp1"] = leading_match(r["tokens"], tp1["tokens"])
                    for key in ("decode_step_ms", "prefill_ms"):
                        r[f"{key.removesuffix('_ms')}_ratio_to_tp1"] = r[key] / tp1[key]
                if nocoll and "error" not in nocoll:
                    r["collective_ms_per_step"] = r["decode_step_ms"] - nocoll["decode_step_ms"]
                    r["collective_share"] = r["collective_ms_per_step"] / r["decode_step_ms"]
                ar = res["all_reduce"].get(impl, {})
                if "graph_us" in ar or "eager_us" in ar:
                    r["collective_ms_per_step_from_microbench"] = 2 * n_layers * ar.get("graph_us", ar.get("eager_us")) / 1e3
                r.pop("tokens")
            res["tp"][impl] = r
    if "tp1" in res:
        res["tp1"].pop("tokens", None)
    res["total_s"] = time.perf_counter() - t_start
    engines = [("TP=1", res.get("tp1", {})), ("compute-only", res.get("compute_only", {}))] + [(f"TP={T} {i}", r) for i, r in res["tp"].items()]
    return finish(res, args, ctx, lambda: "\n".join(
        [format_table(r["profile"], f"rank 0, {name} decode step") for name, r in engines if "profile" in r]
        + [format_table(r["prefill_profile"], f"rank 0, {name} prefill") for name, r in engines if "prefill_profile" in r]
        + [table(res)]))


if __name__ == "__main__":
    main()
