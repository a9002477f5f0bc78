"""Where stage 3 (EventGPT vision, 5 frames) spends its device time: a kernel table.

Runs the fused, batched vision path eagerly under ``torch.profiler`` (a CUDA graph would hide
the kernels), sums device time per kernel and per class (matmul, attention, other), and
prints the FLOPs floor next to it.

Usage (GPU): ``python benchmarks/vision_profile.py --events eventgpt_sample1.npy``
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from stagewise.measure.costmodel import measure_ceilings
from stagewise.models.base import Sample
from stagewise.models.family import StageOptions
from stagewise.models.registry import build_random
from stagewise.models.vision import VisionOptions
from stagewise.preprocess.prompt import DEFAULT_QUERY


def kernel_class(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "sm90_xmma", "matmul")):
        return "matmul"
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    return "other (norms, activations, adds, copies)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=Path, default=Path(".carry/data/eventgpt_sample1.npy"))
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    model = build_random("eventgpt-7b", device="cuda", dtype=torch.bfloat16)
    model.configure(StageOptions(gpu_preprocess=True, vision=VisionOptions(fuse=True)))
    sample = Sample(args.events.stem, DEFAULT_QUERY, events_path=args.events)
    prep = model.preprocess(model.load(sample), DEFAULT_QUERY)
    for _ in range(3):
        model.encode_vision(prep)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.repeats):
            model.encode_vision(prep)
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if t:
            per_kernel[ev.key] += t / args.repeats
    classes: dict[str, float] = defaultdict(float)
    for k, us in per_kernel.items():
        classes[kernel_class(k)] += us
    total = sum(per_kernel.values())
    flops = model.vision_flops(5)
    ceil = measure_ceilings(torch.device("cuda"))
    print(f"vision (5 frames, fused, eager) device time per call: {total / 1e3:.2f} ms; floor {1e3 * flops / ceil['bf16_flops_s']:.2f} ms ({flops / 1e12:.2f} TFLOP at {ceil['bf16_flops_s'] / 1e12:.0f} TFLOP/s)")
    for c, us in sorted(classes.items(), key=lambda kv: -kv[1]):
        print(f"  {c:42s} {us / 1e3:7.3f} ms  {100 * us / total:5.1f} %")
    mm = classes["matmul"]
    print(f"  matmul rate: {flops / (mm / 1e6) / 1e12:.0f} TFLOP/s over the matmul kernels")
    print("top kernels (us per call):")
    for k, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:14]:
        print(f"  {us:8.1f}  {k[:110]}")


if __name__ == "__main__":
    main()
