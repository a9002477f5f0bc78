"""Where a step's device time goes: a per-kernel table from ``torch.profiler``.

The benchmarks use it to explain a miss from a profile rather than from arithmetic: run a step
(usually a CUDA-graph replay of the decode step) ``steps`` times under the profiler, then sum each
kernel's device time and divide by ``steps``. CUPTI records the kernels a graph replay launches, so
the table of a replayed step lists the same kernels as an eagerly launched one.

``busy_fraction`` (kernel time / wall time of the profiled region) separates the two kinds of loss:
kernels that run slower than their floor (a fraction near 1) and a device left idle between kernels
or between replays (launch gaps, host stalls: a fraction well below 1).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

# Kernel name -> coarse class. First match wins; names are the ones CUDA reports (cuBLAS/CUTLASS
# GEMMs, PyTorch's SDPA kernels, Inductor's generated Triton kernels, stagewise's Triton kernels).
CLASSES: tuple[tuple[str, str], ...] = (
    ("nccl|all_reduce|allreduce|one_shot", "collective"),
    ("flash|fmha|attention|sdpa|softmax", "attention"),  # before matmul: fmha_cutlass* is SDPA's
    ("_gemv_|_gemm_kernel|gemv|gemm|cutlass|nvjet|sm90_xmma|cublas|scaled_mm|matmul|splitk", "matmul"),
    ("^triton_", "fused elementwise/reduction (compiled)"),
    ("copy|memcpy|memset|fill", "copy/fill"),
)


def kernel_class(name: str) -> str:
    """The coarse class of a CUDA kernel by its name (:data:`CLASSES`; ``"other"`` if none matches)."""
    low = name.lower()
    for pattern, cls in CLASSES:
        if re.search(pattern, low):
            return cls
    return "other"


@dataclass(frozen=True)
class KernelRow:
    """One kernel name's share of a step.

    Attributes:
        name: the kernel name as CUDA reports it (cut to 120 characters).
        cls: :func:`kernel_class` of it.
        calls_per_step: launches per step (float: a kernel may run every other step).
        us_per_step: device time per step, microseconds.
    """

    name: str
    cls: str
    calls_per_step: float
    us_per_step: float


def kernel_table(fn: Callable[[], object], steps: int, device: torch.device, *, setup: Callable[[], object] | None = None,
                 top: int = 25) -> dict:
    """Profile ``fn()`` (which runs ``steps`` steps) once and return where the device time went.

    Args:
        fn: runs the steps (e.g. ``steps`` graph replays); called once, after one unprofiled call
            that warms it up. Called as ``fn(setup())`` when ``setup`` is given.
        setup: run before each call of ``fn``, outside the profiled region (e.g. the prefill that
            a decode consumes); its result is passed to ``fn``.
        steps: how many steps one call runs (the divisor of every per-step figure).
        device: where they run; on a CPU no kernels are recorded and the table is empty.
        top: rows kept, by device time.

    Returns:
        ``{"wall_us_per_step", "kernel_us_per_step", "busy_fraction", "by_class": {class: us per
        step}, "kernels": [KernelRow as dict, ...]}``; ``busy_fraction`` is ``None`` when no
        kernel was recorded (CPU).
    """
    from torch.profiler import ProfilerActivity, profile

    call = (lambda arg: fn(arg)) if setup is not None else (lambda arg: fn())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    call(setup() if setup is not None else None)
    arg = setup() if setup is not None else None
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        call(arg)
        sync()
        wall_us = (time.perf_counter() - t0) * 1e6
    rows = []
    for e in prof.key_averages():
        if e.device_type != torch.autograd.DeviceType.CUDA or e.self_device_time_total <= 0:
            continue
        rows.append(KernelRow(e.key[:120], kernel_class(e.key), e.count / steps, e.self_device_time_total / steps))
    rows.sort(key=lambda r: -r.us_per_step)
    kernel_us = sum(r.us_per_step for r in rows)
    by_class: dict[str, float] = {}
    for r in rows:
        by_class[r.cls] = by_class.get(r.cls, 0.0) + r.us_per_step
    return {"wall_us_per_step": wall_us / steps, "kernel_us_per_step": kernel_us,
            "busy_fraction": kernel_us / (wall_us / steps) if rows else None,
            "by_class": dict(sorted(by_class.items(), key=lambda kv: -kv[1])),
            "kernels": [asdict(r) for r in rows[:top]]}


def format_table(table: dict, title: str) -> str:
    """A plain-text rendering of :func:`kernel_table`'s result (the rows and the class totals)."""
    lines = [f"{title}: wall {table['wall_us_per_step']:.1f} us/step, kernels {table['kernel_us_per_step']:.1f} us/step"
             + (f", busy {table['busy_fraction']:.1%}" if table["busy_fraction"] is not None else " (no device kernels recorded)")]
    for cls, us in table["by_class"].items():
        lines.append(f"    {cls:42s} {us:9.1f} us/step")
    for r in table["kernels"]:
        lines.append(f"      {r['us_per_step']:9.1f} us  {r['calls_per_step']:6.1f}x  {r['cls'][:12]:12s} {r['name'][:90]}")
    return "\n".join(lines)
