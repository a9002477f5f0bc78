"""Stage-3 variants of the compiled CLIP tower (SDPA backend, compile mode), each timed as a
CUDA-graph replay of the whole tower on 5 frames (EventGPT-7B shapes, bf16). Median of 50.

Usage (GPU): ``python benchmarks/vision_variants.py``
"""

from __future__ import annotations

import time

import torch

from stagewise.measure.timing import graph_replay_times
from stagewise.models.registry import build_random
from stagewise.models.vision import FastClipTower

VARIANTS = [
    ("hf eager (reference)", None),
    ("compiled, default SDPA", dict()),
    ("compiled, flash SDPA", dict(sdpa_backend="flash")),
    ("compiled, efficient SDPA", dict(sdpa_backend="efficient")),
    ("compiled, cudnn SDPA", dict(sdpa_backend="cudnn")),
    ("compiled max-autotune-no-cudagraphs", dict(compile_mode="max-autotune-no-cudagraphs")),
]


def graph_time_ms(fn, x: torch.Tensor, reps: int = 50) -> tuple[float, torch.Tensor]:
    times, out = graph_replay_times(lambda: fn(x), reps)
    return sorted(times)[reps // 2], out.clone()


def main() -> None:
    model = build_random("eventgpt-7b", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(5, 3, 336, 336, device="cuda", dtype=torch.bfloat16)
    ref = None
    for name, kw in VARIANTS:
        t0 = time.perf_counter()
        try:
            if kw is None:
                fn = lambda px: model.vision.tower(pixel_values=px).last_hidden_state  # noqa: E731
            else:
                fn = FastClipTower(model.vision.tower, **kw)
            ms, out = graph_time_ms(fn, x)
        except Exception as e:  # noqa: BLE001 - a variant may not run here; report and go on
            print(f"{name:40s} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        ref = out.float() if ref is None else ref
        rel = ((out.float() - ref).norm() / ref.norm()).item()
        print(f"{name:40s} {ms:7.3f} ms   rel diff vs hf {rel:.2e}   (setup+compile {time.perf_counter() - t0:5.1f} s)", flush=True)


if __name__ == "__main__":
    main()
