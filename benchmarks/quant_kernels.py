"""Weight-only quantized linear kernels against bf16 and the peers, one GPU process.

For the LLaMA-7B projections a decode step runs (fused qkv 12288x4096, o 4096x4096, fused
gate_up 22016x4096, down 4096x11008, lm_head 32000x4096) at M = 1 (batch-1 decode), 5 (a
speculative verify step of 4 drafts) and 16 (batch-16 decode), and at M = 641 (prefill):

* ``bf16 cublas``: ``F.linear`` on the bf16 weight; ``bf16 matvec``: the engine's compiled
  multiply-and-sum (M = 1, what ``--engine fast`` runs at batch 1 today);
* per kind (int8, int4 group 128, fp8 e4m3): ``torch`` (the compiled multiply-and-sum with the
  dequantization inside; by default at M = 1 only, ``--compiled-ms`` for more), ``triton gemv``
  and ``triton gemm`` (both kernels at every decode M, whatever ``GEMV_MAX_M`` says), and for
  prefill ``dequant`` (compiled dequantize + cuBLAS), ``triton gemm``, fp8 ``scaled_mm``;
* peers where present: tinygemm (``aten._weight_int4pack_mm``, what gpt-fast's int4 runs, fed
  the SAME int4 codes), ``aten._weight_int8pack_mm``, gpt-fast's int8 formulation (compiled
  ``F.linear(x, w.to(bf16)) * scales``), and torchao (``quantize_`` on an ``nn.Linear``, its own
  quantization; imported lazily, skipped if absent).

Method. Each variant is timed inside one CUDA graph that calls it 64+ times, rotating through
enough copies of its weights (>= 4x the 50 MB L2 in total) that no call finds its weights in L2;
median of 10 graph replays (CUDA events) / calls per replay. ``GB/s`` counts the bytes the
variant must move: its weights in its own format + x + y. ``%bw`` divides by the device-to-device
copy bandwidth measured first (bytes read + written, as ``costmodel.measure_ceilings``).
``kern_err`` (JSON ``max_abs_diff_kernel``) = max |y - x @ W_q^T| with ``W_q`` the fp32
dequantized weight of the SAME codes (kernel error only; tinygemm's includes its bf16 scales);
``quant_err`` (``max_abs_diff_vs_bf16``) = max |y - x @ W^T| with the original bf16 weight
(kernel + quantization error); ``ref_rms`` the RMS of that product for scale. ``det``: two calls
give bit-identical outputs. Triton rows record the tile config they ran (``triton_config``).

The last table ``projected`` sums, per kind, the fastest variant of each projection at M = 1
over one decode step of LLaMA-7B (32 x (qkv + o + gate_up + down) + lm_head): the weight-streaming
time of a step, NOT an engine measurement (attention, norms, RoPE and launch gaps, ~0.5 ms in the
bf16 engine's profile, come on top).

Usage (repository root; the package imported normally, e.g. installed or ``PYTHONPATH=.``)::

    PYTHONPATH=. python3 benchmarks/quant_kernels.py --out quant_kernels_h100.json
        [--kinds int8,int4,fp8] [--shapes qkv,o,gate_up,down,lm_head] [--ms 1,5,16]
        [--prefill-m 641] [--group-size 128] [--compiled-ms 1] [--no-tuning] [--no-peers]
        [--sweep]   # time a grid of Triton tile configs instead, print the best as TRITON_CONFIGS
        [--tiny]    # tiny shapes; runs on CPU too (Triton interpreter): a smoke test of this script

Run time on an H100 (estimate, not measured): ~3 min with cold compile caches (about 40
Inductor compiles with coordinate-descent tuning + ~20 Triton compiles), less on a second run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # the --tiny smoke test on CPU: Triton's interpreter (before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from stagewise.engine import quant as Q  # noqa: E402
from stagewise.engine.layers import linear as engine_linear  # noqa: E402
from stagewise.engine.quant import QuantizedWeight, quantize_weight, unpack_int4  # noqa: E402
from stagewise.measure.timing import graph_replay_times  # noqa: E402

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008), "lm_head": (32000, 4096)}
PER_STEP = {"qkv": 32, "o": 32, "gate_up": 32, "down": 32, "lm_head": 1}  # uses per LLaMA-7B decode step
TINY_SHAPES = {"qkv": (96, 64), "o": (64, 64), "down": (64, 176)}
L2_BYTES = 50 * 2**20  # H100 L2
ROTATE_BYTES = 4 * L2_BYTES
MIN_CALLS = 64


@dataclass
class Variant:
    """One way to compute ``x @ W^T``: ``fn(x, weight)``; ``weight`` is cloned for rotation."""

    name: str  # e.g. "triton gemv"
    kind: str  # "bf16", "int8", "int4", "fp8"
    fn: Callable[[torch.Tensor, Any], torch.Tensor]
    weight: Any
    nbytes: int  # weight bytes one call streams
    ref_q: torch.Tensor | None = None  # [M, N] fp32 product with the same quantized weights
    note: str = ""


# ----------------------------------------------------------------------------------------------
# Timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clone_weight(obj: Any) -> Any:
    """An independent copy in memory (same values) of a variant's weight argument."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, QuantizedWeight):
        return dataclasses.replace(obj, data=obj.data.clone(), scale=obj.scale.clone(),
                                   zero=None if obj.zero is None else obj.zero.clone())
    if isinstance(obj, tuple):
        return tuple(clone_weight(o) for o in obj)
    if isinstance(obj, torch.nn.Module):
        return copy.deepcopy(obj)
    return obj


def time_us(v: Variant, x: torch.Tensor, repeats: int) -> float:
    """Median time of one call in us: CUDA-graph replays over rotating weight copies (CUDA);
    a host-timed loop on CPU (the --tiny smoke test)."""
    device = x.device
    n_copies = max(2, min(64, math.ceil(ROTATE_BYTES / max(v.nbytes, 1)))) if device.type == "cuda" else 2
    weights = [v.weight] + [clone_weight(v.weight) for _ in range(n_copies - 1)]
    rounds = max(1, math.ceil(MIN_CALLS / n_copies))
    for w in weights:  # compiles, JITs, autotunes, initializes cuBLAS
        v.fn(x, w)
    sync(device)
    if device.type != "cuda":
        t0 = time.perf_counter()
        for w in weights:
            v.fn(x, w)
        return (time.perf_counter() - t0) * 1e6 / len(weights)

    def every_copy() -> None:
        for _ in range(rounds):
            for w in weights:
                v.fn(x, w)

    times, _ = graph_replay_times(every_copy, repeats, warmup=1)
    return statistics.median(times) * 1e3 / (rounds * n_copies)  # us


def copy_bandwidth(device: torch.device) -> float | None:
    """Bytes read + written per second of a 1 GiB device-to-device copy (CUDA only)."""
    if device.type != "cuda":
        return None
    from stagewise.measure.costmodel import measure_ceilings

    return measure_ceilings(device)["copy_bw_bytes_s"]


# ----------------------------------------------------------------------------------------------
# Variants


def compiled(fn: Callable, tune: bool) -> Callable:
    """``torch.compile`` as the engine compiles its decode functions (static shapes, fullgraph)."""
    return torch.compile(fn, fullgraph=True, dynamic=False, options={"coordinate_descent_tuning": tune})


def triton_fn(path: str) -> Callable:
    """Call one Triton kernel directly (``path`` "gemv", "gemm_decode" or "gemm_prefill"),
    with the config :func:`stagewise.engine.quant.triton_config` gives."""

    def fn(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
        N, K = w.shape
        return Q.triton_call(x, w, path, Q.triton_config(w.kind, path, N, K, x.shape[0], x.dtype))

    fn.triton_path = path  # recorded with the config it ran
    return fn


def tinygemm_int4(q: QuantizedWeight) -> tuple[Any, str] | None:
    """The same int4 codes in tinygemm's layout: ``(packed, scales_and_zeros)`` or ``None``.

    tinygemm computes ``(q - 8) * scale + zero'`` with bf16 ``scale`` / ``zero'``
    ``[K/G, N, 2]``; ours is ``q * scale + zero``, so ``zero' = zero + 8 scale``.
    """
    if q.data.device.type != "cuda":
        return None
    codes = unpack_int4(q.data)  # [N, K] 0..15
    sz = torch.stack([q.scale.float(), q.zero.float() + 8 * q.scale.float()], dim=-1)  # [N, K/G, 2]
    sz = sz.transpose(0, 1).contiguous().to(torch.bfloat16)
    try:  # torch >= 2.5: uint8 [N, K/2] with k even in the HIGH nibble
        packed = torch.ops.aten._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), 8)
    except Exception:  # older torch: int32 [N, K]
        packed = torch.ops.aten._convert_weight_to_int4pack(codes.to(torch.int32), 8)
    return (packed, sz), ""


def torchao_variant(kind: str, w: torch.Tensor, group: int) -> tuple[Any, str] | None:
    """An ``nn.Linear`` quantized by torchao's own ``quantize_`` (its format), or ``None``."""
    try:
        import torchao.quantization as tq
    except Exception:
        return None
    N, K = w.shape
    lin = torch.nn.Linear(K, N, bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    make = {
        "int8": ("Int8WeightOnlyConfig", {}, "int8_weight_only", {}),
        "int4": ("Int4WeightOnlyConfig", {"group_size": group}, "int4_weight_only", {"group_size": group}),
        "fp8": ("Float8WeightOnlyConfig", {}, "float8_weight_only", {}),
    }[kind]
    cfg = getattr(tq, make[0], None)
    cfg = cfg(**make[1]) if cfg is not None else getattr(tq, make[2])(**make[3])
    tq.quantize_(lin, cfg)
    return lin, f"torchao {getattr(__import__('torchao'), '__version__', '?')}"


def decode_variants(kind: str, w: torch.Tensor, q: QuantizedWeight | None, M: int, args) -> list[Variant]:
    """The variants of one (kind, shape) at decode row count ``M``."""
    N, K = w.shape
    tune = not args.no_tuning
    out: list[Variant] = []
    if kind == "bf16":
        out.append(Variant("cublas", "bf16", lambda x, w: F.linear(x, w), w, w.numel() * 2))
        if M == 1:
            out.append(Variant("matvec", "bf16", compiled(lambda x, w: engine_linear(x, w, None, matvec=True, decode=True), tune), w,
                               w.numel() * 2, note="the engine's batch-1 formulation"))
        return out
    if M in args.compiled_ms:
        out.append(Variant("torch", kind, compiled(lambda x, w: w.linear(x, decode=True, impl="torch"), tune), q, q.nbytes))
    if not args.no_triton:
        out.append(Variant("triton gemv", kind, triton_fn("gemv"), q, q.nbytes))
        if kind != "int4" or q.group_size >= 16:
            out.append(Variant("triton gemm", kind, triton_fn("gemm_decode"), q, q.nbytes))
    if args.no_peers:
        return out
    if kind == "int4":
        tg = tinygemm_int4(q)
        if tg is not None:
            G = q.group_size
            out.append(Variant("tinygemm", kind, lambda x, w: torch.ops.aten._weight_int4pack_mm(x, w[0], G, w[1]),
                               tg[0], q.nbytes, note="aten._weight_int4pack_mm on the same codes"))
    if kind == "int8":
        s16 = q.scale.to(torch.bfloat16)
        out.append(Variant("int8pack_mm", kind, lambda x, w: torch.ops.aten._weight_int8pack_mm(x, w[0], w[1]),
                           (q.data, s16), N * K + 2 * N, note="aten._weight_int8pack_mm"))
        if M == 1:
            out.append(Variant("gpt-fast", kind, compiled(lambda x, w: F.linear(x, w[0].to(x.dtype)) * w[1], tune),
                               (q.data, s16), N * K + 2 * N, note="F.linear(x, w.to(bf16)) * scales, compiled"))
    ao = torchao_variant(kind, w, args.group_size) if w.device.type == "cuda" else None
    if ao is not None:
        out.append(Variant("torchao", kind, compiled(lambda x, m: m(x), tune), ao[0], q.nbytes,
                           note=ao[1] + " (own quantization; bytes assumed = ours)"))
    return out


def prefill_variants(kind: str, w: torch.Tensor, q: QuantizedWeight | None, args) -> list[Variant]:
    out: list[Variant] = []
    if kind == "bf16":
        return [Variant("cublas", "bf16", lambda x, w: F.linear(x, w), w, w.numel() * 2)]
    # prefill compiles without coordinate-descent tuning, as the engine's prefill functions
    out.append(Variant("dequant", kind, compiled(lambda x, w: w.linear(x, decode=False, impl="dequant"), False), q, q.nbytes,
                       note="compiled dequantize + cuBLAS"))
    if not args.no_triton and (kind != "int4" or q.group_size >= 16):
        out.append(Variant("triton gemm", kind, triton_fn("gemm_prefill"), q, q.nbytes))
    if kind == "fp8" and w.device.type == "cuda":
        out.append(Variant("scaled_mm", kind, lambda x, w: w.linear(x, decode=False, impl="scaled_mm"), q, q.nbytes,
                           note="W8A8: activations quantized per row (not weight-only numerics)"))
    if kind == "int4" and not args.no_peers:
        tg = tinygemm_int4(q)
        if tg is not None:
            G = q.group_size
            out.append(Variant("tinygemm", kind, lambda x, w: torch.ops.aten._weight_int4pack_mm(x, w[0], G, w[1]),
                               tg[0], q.nbytes))
    return out


# ----------------------------------------------------------------------------------------------
# Measuring one variant


def measure(v: Variant, x: torch.Tensor, ref_w: torch.Tensor, args) -> dict:
    """Time, bandwidth and error of one variant at input ``x`` (``ref_w``: fp32 product with the
    unquantized weight)."""
    row = {"kind": v.kind, "variant": v.name, "M": x.shape[0], "weight_bytes": v.nbytes, "note": v.note}
    path = getattr(v.fn, "triton_path", None)
    if path is not None:
        N, K = v.weight.shape
        row["triton_config"] = dataclasses.asdict(Q.triton_config(v.kind, path, N, K, x.shape[0], x.dtype))
    try:
        y = v.fn(x, v.weight)
        y2 = v.fn(x, v.weight)
        sync(x.device)
        row["deterministic"] = bool(torch.equal(y, y2))
        yf = y.float()
        row["max_abs_diff_kernel"] = None if v.ref_q is None else float((yf - v.ref_q).abs().max())
        row["max_abs_diff_vs_bf16"] = float((yf - ref_w).abs().max())
        row["ref_rms"] = float(ref_w.pow(2).mean().sqrt())
        us = time_us(v, x, args.repeats)
    except Exception as e:  # a peer op missing on this torch, an unsupported shape...: report, go on
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        return row
    moved = v.nbytes + x.numel() * x.element_size() + y.numel() * y.element_size()
    row.update({"median_us": us, "achieved_gb_s": moved / us * 1e-3, "bytes_moved": moved})
    if args.copy_bw:
        row["bw_fraction"] = moved / (us * 1e-6) / args.copy_bw
    if x.shape[0] > 16:
        N, K = ref_w.shape[1], x.shape[1]
        row["achieved_tflop_s"] = 2.0 * x.shape[0] * N * K / (us * 1e-6) / 1e12
    return row


# ----------------------------------------------------------------------------------------------
# Sweep of Triton configs


def sweep_configs(kind: str, path: str, M: int, fp32: bool) -> list[Q.TritonConfig]:
    """The grid ``--sweep`` tries (kept small: each entry is a Triton compile)."""
    TC = Q.TritonConfig
    if path == "gemv":
        ks = (512, 1024, 2048) if kind == "int4" else (256, 512, 1024)
        return [TC(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
                for bn in (4, 8, 16) for bk in ks for nw in (4, 8) for ns in (1, 3)]
    if path == "gemm_decode":
        bm = min(64, max(16, 1 << max(M - 1, 0).bit_length()))
        return [TC(block_m=bm, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
                for bn in (16, 32, 64) for bk in (64, 128, 256) for nw in (4,) for ns in (3, 4)]
    return [TC(block_m=bm, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns, group_m=8)
            for bm, bn, bk, nw, ns in [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3),
                                       (64, 128, 64, 4, 4), (128, 128, 128, 8, 3), (128, 64, 64, 4, 4)]]


def run_sweep(args, device: torch.device, shapes: dict) -> list[dict]:
    """Time each config of :func:`sweep_configs`; print the best per (kind, path, N, K).

    A config counts only if its result is as exact as the default config's (max |diff| vs the
    fp32 product of the same codes within 4x the default's, or 1e-3 of the output RMS)."""
    rows, best = [], {}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    for sname, (N, K) in shapes.items():
        w = (torch.randn(N, K, device=device, generator=g) * 0.02).to(dtype)
        for kind in args.kinds:
            q = quantize_weight(w, kind, group_size=args.group_size)
            deq = q.dequantize(torch.float32)
            cases = [("gemv", m) for m in args.ms if m <= 16] + [("gemm_decode", m) for m in args.ms if m > 1]
            cases.append(("gemm_prefill", args.prefill_m))
            for path, M in cases:
                x = torch.randn(M, K, device=device, generator=g).to(dtype)
                ref = x.float() @ deq.T
                limit = max(4 * float((triton_fn(path)(x, q).float() - ref).abs().max()),
                            1e-3 * float(ref.pow(2).mean().sqrt()))
                for cfg in sweep_configs(kind, path, M, False):
                    fn = lambda x, w, path=path, cfg=cfg: Q.triton_call(x, w, path, cfg)  # noqa: E731
                    v = Variant(f"{path} {cfg}", kind, fn, q, q.nbytes)
                    try:
                        err = float((v.fn(x, q).float() - ref).abs().max())
                        us = time_us(v, x, args.repeats)
                    except Exception as e:
                        rows.append({"shape": sname, "kind": kind, "path": path, "M": M, "config": str(cfg),
                                     "error": f"{type(e).__name__}: {str(e)[:120]}"})
                        continue
                    ok = err <= limit
                    rows.append({"shape": sname, "kind": kind, "path": path, "M": M, "config": dataclasses.asdict(cfg),
                                 "median_us": us, "max_abs_diff_kernel": err, "exact_enough": ok})
                    if not ok:
                        print(f"  WRONG RESULT {sname} {kind} {path} M={M} {cfg}: max |diff| {err:.3g} > {limit:.3g}")
                        continue
                    key = (kind, path, N, K, M)
                    if key not in best or us < best[key][0]:
                        best[key] = (us, cfg)
                print(f"  swept {sname} {kind} {path} M={M}: best {best.get((kind, path, N, K, M), (None,))[0]}", flush=True)
    print("\n# best Triton configs (paste into stagewise/engine/quant.py TRITON_CONFIGS; gemv keyed by the M swept first)")
    seen = set()
    for (kind, path, N, K, M), (us, cfg) in sorted(best.items()):
        if (kind, path, N, K) in seen:
            continue
        seen.add((kind, path, N, K))
        print(f"    ({kind!r}, {path!r}, {N}, {K}): TritonConfig(block_m={cfg.block_m}, block_n={cfg.block_n}, "
              f"block_k={cfg.block_k}, num_warps={cfg.num_warps}, num_stages={cfg.num_stages}, group_m={cfg.group_m}),"
              f"  # M={M}: {us:.1f} us")
    return rows


# ----------------------------------------------------------------------------------------------


def fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    print(f"{'shape':>8} {'M':>4} {'kind':>5} {'variant':<12} {'us':>8} {'GB/s':>7} {'%bw':>5} {'TFLOP/s':>8} "
          f"{'kern_err':>9} {'quant_err':>9} {'ref_rms':>8} {'det':>4}  note")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:>8} {r['M']:>4} {r['kind']:>5} {r['variant']:<12} unavailable: {r['error']}")
            continue
        bw = fmt(None if r.get("bw_fraction") is None else 100 * r["bw_fraction"], ".0f")
        print(f"{r['shape']:>8} {r['M']:>4} {r['kind']:>5} {r['variant']:<12} {r['median_us']:>8.2f} "
              f"{r['achieved_gb_s']:>7.0f} {bw:>5} {fmt(r.get('achieved_tflop_s'), '.0f'):>8} "
              f"{fmt(r['max_abs_diff_kernel'], '.2e'):>9} {r['max_abs_diff_vs_bf16']:>9.2e} "
              f"{r['ref_rms']:>8.2e} {'yes' if r['deterministic'] else 'NO':>4}  {r['note']}")


def projected(rows: list[dict], shapes: dict) -> list[dict]:
    """Per kind: the fastest variant of each projection at M = 1, summed over a decode step."""
    out = []
    kinds = sorted({r["kind"] for r in rows if r["M"] == 1 and "median_us" in r})
    for kind in kinds:
        total, picks = 0.0, {}
        for s in shapes:
            cands = [r for r in rows if r["kind"] == kind and r["M"] == 1 and r["shape"] == s and "median_us" in r
                     and r["variant"] not in ("torchao",)]
            if not cands:
                break
            best = min(cands, key=lambda r: r["median_us"])
            picks[s] = best["variant"]
            total += PER_STEP[s] * best["median_us"]
        else:
            out.append({"kind": kind, "weight_stream_ms_per_step": total / 1e3, "variants": picks})
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here")
    ap.add_argument("--kinds", default="int8,int4,fp8")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--ms", default="1,5,16", help="decode row counts")
    ap.add_argument("--prefill-m", type=int, default=641)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--compiled-ms", default="1", help="decode M at which to compile the 'torch' formulation")
    ap.add_argument("--no-tuning", action="store_true", help="compile without coordinate-descent tuning")
    ap.add_argument("--no-triton", action="store_true")
    ap.add_argument("--no-peers", action="store_true", help="skip tinygemm / int8pack / gpt-fast / torchao")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--sweep", action="store_true", help="sweep Triton tile configs instead")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test of this script)")
    args = ap.parse_args(argv)
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.ms = [int(m) for m in args.ms.split(",") if m]
    args.compiled_ms = {int(m) for m in args.compiled_ms.split(",") if m}
    pool = TINY_SHAPES if args.tiny else SHAPES
    names = [s for s in args.shapes.split(",") if s]
    if not args.tiny and not set(names) <= set(SHAPES):
        raise SystemExit(f"quant_kernels: --shapes must be among {', '.join(SHAPES)}")
    shapes = {s: pool[s] for s in names if s in pool} or dict(pool)
    if args.tiny:
        args.group_size, args.prefill_m = 16, 37

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("quant_kernels: needs a CUDA device (or --tiny for a CPU smoke test)")
    if args.no_triton is False and not Q.triton_available():
        print("triton not installed: Triton variants skipped")
        args.no_triton = True
    if not args.no_triton:
        Q.ensure_triton()
    if "fp8" in args.kinds and not Q.fp8_supported(device):
        print(f"fp8 not supported on {device}: skipped")
        args.kinds.remove("fp8")
    for name in ("cache_size_limit", "recompile_limit"):  # one compile per (shape, M, variant)
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 1024)
    for name in ("accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 4096)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t_start = time.perf_counter()
    args.copy_bw = copy_bandwidth(device)

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__ if Q.triton_available() else None,
        "copy_bw_bytes_s": args.copy_bw,
        "group_size": args.group_size,
        "gemv_max_m": Q.GEMV_MAX_M,
        "dtype": str(dtype),
    }
    print(json.dumps(env))
    if args.sweep:
        sweep_rows = run_sweep(args, device, shapes)
        result = {"env": env, "sweep": sweep_rows, "elapsed_s": time.perf_counter() - t_start}
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
        return result

    decode_rows, prefill_rows = [], []
    g = torch.Generator(device=device).manual_seed(0)
    for sname, (N, K) in shapes.items():
        t_shape = time.perf_counter()
        w = (torch.randn(N, K, device=device, generator=g) * 0.02).to(dtype)
        xs = {M: torch.randn(M, K, device=device, generator=g).to(dtype) for M in [*args.ms, args.prefill_m]}
        ref_w = {M: x.float() @ w.float().T for M, x in xs.items()}
        for kind in ["bf16", *args.kinds]:
            q = None if kind == "bf16" else quantize_weight(w, kind, group_size=args.group_size)
            deq = w.float() if q is None else q.dequantize(torch.float32)
            for M in args.ms:
                for v in decode_variants(kind, w, q, M, args):
                    if v.ref_q is None and v.name != "torchao":
                        v.ref_q = xs[M].float() @ deq.T
                    decode_rows.append({"shape": sname, "N": N, "K": K, **measure(v, xs[M], ref_w[M], args)})
            x = xs[args.prefill_m]
            for v in prefill_variants(kind, w, q, args):
                v.ref_q = x.float() @ deq.T
                prefill_rows.append({"shape": sname, "N": N, "K": K, **measure(v, x, ref_w[args.prefill_m], args)})
            del q, deq
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"  {sname} {N}x{K}: {time.perf_counter() - t_shape:.1f} s", flush=True)

    proj = projected(decode_rows, shapes) if set(shapes) == set(SHAPES) else []
    result = {"env": env, "decode": decode_rows, "prefill": prefill_rows, "projected_decode_step": proj,
              "elapsed_s": time.perf_counter() - t_start}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(f"\nelapsed {result['elapsed_s']:.0f} s (compiles included)")
    print_table(decode_rows, f"decode (M = {args.ms}), median us per call, weights rotated beyond L2")
    print_table(prefill_rows, f"prefill (M = {args.prefill_m})")
    if proj:
        print("\nprojected weight-stream time of one LLaMA-7B decode step at M = 1 (sum of the fastest variant per "
              "projection x uses per step; attention, norms, gaps not included)")
        for p in proj:
            print(f"  {p['kind']:>5}: {p['weight_stream_ms_per_step']:.3f} ms  {p['variants']}")
    return result


if __name__ == "__main__":
    main()
