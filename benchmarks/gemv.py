"""The dense Triton GEMV (``torch.ops.stagewise.dense_gemv``) against Inductor's reduction and cuBLAS.

Why: the fast engine's batch-1 decode projections are Inductor reductions tuned by timing, and
the tuned kernels differed per compile and per rank (docs/scale_out.md); ``--matvec-kernel
triton`` runs a hand-written GEMV with launch parameters fixed by the shape instead
(:mod:`stagewise.engine.dense`). This script measures, one GPU process, bf16, M = 1 (``--m``):

* shapes: the EventGPT-7B (LLaMA-7B) decode projections, fused qkv 12288x4096, o 4096x4096,
  fused gate_up 22016x4096, down 4096x11008, lm_head 32000x4096, and their tensor-parallel-2
  shards qkv 6144x4096, o 4096x2048, gate_up 11008x4096, down 4096x5504 (the LM head is
  replicated under TP);
* variants: ``triton`` for each launch config of a sweep of 28 (``block_n`` 4/8/16 x ``block_k``
  256/512/1024 at 4 and at 8 warps with 3 stages, plus 2 and 4 stages for a few tiles; the engine's
  default, :func:`stagewise.engine.dense.dense_gemv_config`, is among them and marked), the
  engine's Inductor form ``(x.unsqueeze(-2).float() * w.float()).sum(-1).to(x.dtype)``
  compiled as the engine compiles it (static shapes, fullgraph) with and without
  ``coordinate_descent_tuning`` (``inductor tuned`` / ``inductor``), and ``F.linear`` (``cublas``).

Method: each variant is timed inside one CUDA graph that calls it 64+ times, rotating through
enough copies of the weight (>= 200 MB in all, 4x the 50 MB L2) that every call streams its
weight from HBM; median of ``--repeats`` graph replays (CUDA events) / calls per replay. ``GB/s``
= weight bytes / time; ``%copy`` = that / the device-to-device copy bandwidth measured first
(a 1 GiB ``copy_``, bytes read + written / time: :func:`stagewise.measure.costmodel.measure_ceilings`).
Each row also records ``max_abs_diff`` against ``x.float() @ w.float().T``, whether it lies within
the bf16 bound (``2^-8 (|y| + sum|x||w|)``), and ``deterministic`` (two calls, same bits).
``projected`` sums, per variant, the time of one decode step's weight stream
(32 x (qkv + o + gate_up + down) + lm_head) at TP=1 and per rank at TP=2: a weight-streaming
estimate, not an engine measurement.

Usage (GPU; the package imported normally, e.g. ``PYTHONPATH=.``)::

    PYTHONPATH=. python3 benchmarks/gemv.py --out gemv_h100.json [--shapes qkv,o] [--repeats 10]

``--smoke``: tiny shapes and three configs on whatever device there is (CPU: Triton's interpreter,
the Inductor form run eagerly, host timing; the figures mean nothing): a test of this script. It
skips the Triton rows cleanly when Triton is not installed.

Run time on an H100: not measured yet; estimated 60-90 s with cold caches: 28 Triton compiles
(~0.5 s each, shared by all shapes: every N, K here is a multiple of 16, so one specialization),
18 Inductor compiles (the 9 tuned ones the longest: coordinate descent compiles and times its
candidates), ~300 timings of 10 graph replays. ``--shapes`` narrows the run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # --smoke on CPU: Triton's interpreter (must precede the first triton import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from stagewise.engine.dense import dense_gemv_config, triton_gemv_usable  # noqa: E402
from stagewise.engine.quant import ensure_triton  # noqa: E402
from stagewise.measure.env import environment  # noqa: E402
from stagewise.measure.timing import graph_replay_times  # noqa: E402

SHAPES = {  # name -> (N, K, tensor-parallel size it belongs to)
    "qkv": (12288, 4096, 1), "o": (4096, 4096, 1), "gate_up": (22016, 4096, 1), "down": (4096, 11008, 1),
    "lm_head": (32000, 4096, 1),
    "qkv/2": (6144, 4096, 2), "o/2": (4096, 2048, 2), "gate_up/2": (11008, 4096, 2), "down/2": (4096, 5504, 2),
}
SMOKE_SHAPES = {"qkv": (96, 64, 1), "down": (64, 176, 1), "o/2": (64, 32, 2)}
PER_STEP = {"qkv": 32, "o": 32, "gate_up": 32, "down": 32, "lm_head": 1}  # uses per LLaMA-7B decode step
L2_BYTES = 50 * 2**20  # H100 / H200 L2
ROTATE_BYTES = 4 * L2_BYTES
MIN_CALLS = 64

Config = tuple[int, int, int, int]  # (block_n, block_k, num_warps, num_stages)


def sweep_configs() -> list[Config]:
    """28 launch configs: every tile (``block_n`` 4/8/16 x ``block_k`` 256/512/1024) at 4 and at 8
    warps with 3 stages; 2 and 4 stages for the three tiles of 4096 elements at 4 warps and for
    the two largest tiles at 8 warps."""
    tiles = [(bn, bk) for bn in (4, 8, 16) for bk in (256, 512, 1024)]
    out = [(bn, bk, nw, 3) for nw in (4, 8) for bn, bk in tiles]
    out += [(bn, bk, 4, ns) for bn, bk in ((4, 1024), (8, 512), (16, 256)) for ns in (2, 4)]
    out += [(bn, bk, 8, ns) for bn, bk in ((8, 1024), (16, 512)) for ns in (2, 4)]
    return out


def smoke_configs(dtype: torch.dtype) -> list[Config]:
    return [dense_gemv_config(64, 64, 1, dtype), (4, 32, 4, 2), (16, 128, 4, 3)]


# ----------------------------------------------------------------------------------------------
# Variants


def _reduce_untuned(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.unsqueeze(-2).float() * w.float()).sum(-1).to(x.dtype)


def _reduce_tuned(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # the same formula; a separate function (own code object) so its compiled code is its own
    return (x.unsqueeze(-2).float() * w.float()).sum(-1).to(x.dtype)


def inductor_variant(tune: bool, compile_it: bool) -> Callable:
    """The engine's matvec form compiled as the engine compiles its decode functions (static
    shapes, fullgraph), with or without coordinate-descent tuning; eager when not ``compile_it``."""
    fn = _reduce_tuned if tune else _reduce_untuned
    if not compile_it:
        return fn
    return torch.compile(fn, fullgraph=True, dynamic=False, options={"coordinate_descent_tuning": tune})


def triton_variant(cfg: Config) -> Callable:
    bn, bk, nw, ns = cfg
    return lambda x, w: torch.ops.stagewise.dense_gemv(x, w, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)


# ----------------------------------------------------------------------------------------------
# Timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_us(fn: Callable, x: torch.Tensor, weights: list[torch.Tensor], repeats: int) -> float:
    """Median time of one call in us: CUDA-graph replays over the rotating weight copies (CUDA);
    a host-timed loop on CPU (the smoke test)."""
    rounds = max(1, math.ceil(MIN_CALLS / len(weights)))
    for w in weights[:2]:  # compiles, JITs, tunes, initializes cuBLAS
        fn(x, w)
    sync(x.device)
    if x.device.type != "cuda":
        t0 = time.perf_counter()
        for w in weights:
            fn(x, w)
        return (time.perf_counter() - t0) * 1e6 / len(weights)

    def every_copy() -> None:
        for _ in range(rounds):
            for w in weights:
                fn(x, w)

    times, _ = graph_replay_times(every_copy, repeats, warmup=1)
    return statistics.median(times) * 1e3 / (rounds * len(weights))


def measure(name: str, fn: Callable, x: torch.Tensor, weights: list[torch.Tensor], ref: torch.Tensor,
            bound: torch.Tensor, args, extra: dict | None = None) -> dict:
    """One row: time, bandwidth, error against the fp32 product, determinism."""
    w = weights[0]
    nbytes = w.numel() * w.element_size()
    row: dict[str, Any] = {"variant": name, **(extra or {})}
    try:
        y1, y2 = fn(x, w), fn(x, w)
        sync(x.device)
        diff = (y1.float() - ref).abs()
        row.update(max_abs_diff=float(diff.max()), within_bound=bool((diff <= bound).all()),
                   deterministic=bool(torch.equal(y1, y2)))
        us = time_us(fn, x, weights, args.repeats)
    except Exception as e:  # a config that fails to compile or launch: report it and go on
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        return row
    row.update(us=us, gb_s=nbytes / us * 1e-3)
    if args.copy_bw:
        row["copy_fraction"] = nbytes / (us * 1e-6) / args.copy_bw
    return row


# ----------------------------------------------------------------------------------------------
# Report


def best_triton(rows: list[dict]) -> dict | None:
    ok = [r for r in rows if r["variant"] == "triton" and "us" in r and r["within_bound"]]
    return min(ok, key=lambda r: r["us"]) if ok else None


def summarize(results: dict[str, dict]) -> dict[str, dict]:
    """Per shape: the time of cublas, inductor, inductor tuned, the default triton config and the
    fastest triton config (with that config)."""
    out = {}
    for name, res in results.items():
        rows = res["rows"]
        s: dict[str, Any] = {}
        for r in rows:
            if "us" in r and r["variant"] != "triton":
                s[r["variant"]] = r["us"]
            if "us" in r and r.get("default"):
                s["triton default"] = r["us"]
        b = best_triton(rows)
        if b is not None:
            s["triton best"] = b["us"]
            s["best_config"] = b["config"]
        out[name] = s
    return out


def projected(summary: dict[str, dict], shapes: dict) -> dict[str, dict]:
    """Per tensor-parallel size (1, 2) and variant: ms of one decode step's weight stream (per rank;
    the LM head replicated), when every shape of that size was measured."""
    out: dict[str, dict] = {}
    for tp in (1, 2):
        names = {base: (f"{base}/{tp}" if tp > 1 and base != "lm_head" else base) for base in PER_STEP}
        if not all(n in summary and n in shapes for n in names.values()):
            continue
        variants = set.intersection(*(set(k for k in summary[n] if k != "best_config") for n in names.values()))
        out[f"tp{tp}"] = {v: sum(PER_STEP[b] * summary[n][v] for b, n in names.items()) / 1e3 for v in sorted(variants)}
    return out


def print_report(res: dict) -> None:
    print(f"\n{'shape':>10} {'N':>6} {'K':>6} {'variant':<15} {'config (bn,bk,w,s)':<20} {'us':>8} {'GB/s':>7} "
          f"{'%copy':>6} {'max|diff|':>9} {'ok':>3} {'det':>4}")
    for name, r in res["shapes"].items():
        for row in r["rows"]:
            cfg = "-" if "config" not in row else ",".join(map(str, row["config"])) + (" *" if row.get("default") else "")
            if "error" in row:
                print(f"{name:>10} {r['N']:>6} {r['K']:>6} {row['variant']:<15} {cfg:<20} failed: {row['error']}")
                continue
            pct = "-" if row.get("copy_fraction") is None else f"{100 * row['copy_fraction']:.0f}"
            print(f"{name:>10} {r['N']:>6} {r['K']:>6} {row['variant']:<15} {cfg:<20} {row['us']:>8.2f} {row['gb_s']:>7.0f} "
                  f"{pct:>6} {row['max_abs_diff']:>9.2e} {'yes' if row['within_bound'] else 'NO':>3} "
                  f"{'yes' if row['deterministic'] else 'NO':>4}")
    cols = ["cublas", "inductor", "inductor tuned", "triton default", "triton best"]
    print("\nus per call (* = the engine's default config; best = fastest config within the bound)")
    print(f"{'shape':>10} " + " ".join(f"{c:>15}" for c in cols) + "  best config")
    for name, s in res["summary"].items():
        cells = " ".join(f"{s[c]:>15.2f}" if c in s else f"{'-':>15}" for c in cols)
        print(f"{name:>10} {cells}  {s.get('best_config', '-')}")
    for tp, row in res["projected"].items():
        print(f"projected weight stream of one decode step, {tp} (ms/step per rank): "
              + ", ".join(f"{v} {ms:.3f}" for v, ms in row.items()))
    print(f"copy bandwidth {res['copy_bw_bytes_s'] / 1e9 if res['copy_bw_bytes_s'] else float('nan'):.0f} GB/s; "
          f"elapsed {res['elapsed_s']:.1f} s")


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here")
    ap.add_argument("--shapes", default=None, help=f"comma-separated subset of {', '.join(SHAPES)} (default all)")
    ap.add_argument("--m", type=int, default=1, help="rows of x (1..4: what the engine sends to the GEMV; default 1)")
    ap.add_argument("--repeats", type=int, default=10, help="graph replays per timing (median)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 3 configs, any device (a test of this script)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("gemv: needs a CUDA device (or --smoke for a CPU test of the script)")
    pool = SMOKE_SHAPES if args.smoke else SHAPES
    names = [s for s in (args.shapes or ",".join(pool)).split(",") if s]
    unknown = [s for s in names if s not in pool]
    if unknown:
        raise SystemExit(f"gemv: unknown shapes {unknown}; choose among {', '.join(pool)}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU: the interpreter mishandles bf16
    why = triton_gemv_usable(device)
    if why is None:
        ensure_triton()
    else:
        print(f"gemv: Triton rows skipped: {why}")
    configs = smoke_configs(dtype) if args.smoke else sweep_configs()
    for name in ("recompile_limit", "cache_size_limit"):  # one Inductor compile per (shape, variant)
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    from stagewise.measure.costmodel import measure_ceilings

    args.copy_bw = measure_ceilings(device).get("copy_bw_bytes_s")  # None on CPU
    res: dict[str, Any] = {
        "env": environment(device), "dtype": str(dtype).removeprefix("torch."), "m": args.m,
        "copy_bw_bytes_s": args.copy_bw, "rotate_bytes": ROTATE_BYTES, "repeats": args.repeats,
        "triton": None if why is not None else __import__("triton").__version__, "triton_skipped": why,
        "configs": [list(c) for c in configs], "shapes": {},
    }
    print(json.dumps({k: res[k] for k in ("dtype", "m", "copy_bw_bytes_s", "triton")}), flush=True)
    g = torch.Generator(device=device).manual_seed(0)
    for name in names:
        t_shape = time.perf_counter()
        N, K, tp = pool[name]
        w = (torch.randn(N, K, device=device, generator=g) * 0.02).to(dtype)
        x = torch.randn(args.m, K, device=device, generator=g).to(dtype)
        nbytes = w.numel() * w.element_size()
        n_copies = max(2, min(64, math.ceil(ROTATE_BYTES / nbytes))) if device.type == "cuda" else 2
        weights = [w] + [w.clone() for _ in range(n_copies - 1)]
        ref = x.float() @ w.float().T  # [M, N]
        bound = 2.0**-8 * (ref.abs() + x.float().abs() @ w.float().abs().T)  # bf16 output rounding + fp32 sums
        rows = [measure("cublas", lambda x, w: F.linear(x, w), x, weights, ref, bound, args)]
        for tune in (False, True):
            rows.append(measure("inductor tuned" if tune else "inductor", inductor_variant(tune, device.type == "cuda"),
                                x, weights, ref, bound, args, {"compiled": device.type == "cuda"}))
        if why is None:
            default = dense_gemv_config(N, K, args.m, dtype)
            for cfg in configs:
                rows.append(measure("triton", triton_variant(cfg), x, weights, ref, bound, args,
                                    {"config": list(cfg), "default": cfg == default}))
        res["shapes"][name] = {"N": N, "K": K, "tensor_parallel": tp, "weight_bytes": nbytes, "copies": n_copies, "rows": rows}
        del weights, w
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"  {name} {N}x{K}: {time.perf_counter() - t_shape:.1f} s", flush=True)
    res["summary"] = summarize(res["shapes"])
    res["projected"] = projected(res["summary"], {n: pool[n] for n in names})
    res["elapsed_s"] = time.perf_counter() - t_start
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    print_report(res)
    return res


if __name__ == "__main__":
    main()
