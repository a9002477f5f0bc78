"""The one timer everything uses.

Stage boundaries: ``StageClock`` synchronizes the device at each boundary (and only
there) and reads ``time.perf_counter``; the intervals between consecutive boundaries
tile the sample, so stage times add up to the end-to-end time by construction, and the
runner checks that against an independent end-to-end clock.

Steps inside a stage (decode tokens): ``StepTimer`` records CUDA events without
synchronizing (elapsed times are read once, after the stage's closing sync); on CPU
it reads ``perf_counter``.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch


def device_sync(device: torch.device) -> None:
    """Block until all queued work on ``device`` is done (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageClock:
    """Times named, back-to-back stages of one sample (or one batch).

    Usage::

        clock = StageClock(device)
        clock.start()
        with clock.stage("load"):
            ...
        clock.stage_ms  # {"load": 1.23, ...}  (ms)
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.stage_ms: dict[str, float] = {}
        self._last: float | None = None
        self._t0: float | None = None

    def start(self) -> None:
        """Open the first stage: sync, then read the clock."""
        device_sync(self.device)
        self._t0 = self._last = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage ``name``; the block's device work is included (sync at exit).

        Raises:
            RuntimeError: ``start()`` was not called.
        """
        if self._last is None:
            raise RuntimeError("StageClock.stage() before start()")
        yield
        device_sync(self.device)
        now = time.perf_counter()
        self.stage_ms[name] = self.stage_ms.get(name, 0.0) + (now - self._last) * 1e3
        self._last = now

    def elapsed_ms(self) -> float:
        """ms from ``start()`` to the end of the last closed stage."""
        if self._t0 is None or self._last is None:
            return 0.0
        return (self._last - self._t0) * 1e3


class StepTimer:
    """Per-step times with no host synchronization.

    Call ``mark()`` before the first step and after every step; after the device is
    synchronized, ``intervals_ms()`` gives ``len(marks) - 1`` step times in ms.
    On CUDA the marks are CUDA events (device time); on CPU, ``perf_counter``.
    """

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.device = torch.device(device)
        self.enabled = enabled
        self._marks: list = []

    def mark(self) -> None:
        """Record a step boundary now (a CUDA event on the current stream; no sync)."""
        if not self.enabled:
            return
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._marks.append(ev)
        else:
            self._marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        """Step times in ms (call after the device is synchronized)."""
        m = self._marks
        if len(m) < 2:
            return []
        if self.device.type == "cuda":
            return [a.elapsed_time(b) for a, b in zip(m[:-1], m[1:])]
        return [(b - a) * 1e3 for a, b in zip(m[:-1], m[1:])]


def time_ms(fn, device: torch.device, repeats: int, warmup: int = 1) -> tuple[float, list[float], object]:
    """Wall time of ``fn()`` with a device synchronization on both sides (benchmarks).

    Args:
        fn: the work; its result of the last call is returned.
        device: the device whose queued work is included.
        repeats: measured calls; warmup: unmeasured calls first.

    Returns:
        ``(median ms, every ms, last result)``.
    """
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        device_sync(device)
        t0 = time.perf_counter()
        out = fn()
        device_sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2], times, out


def graph_replay_times(fn, repeats: int, *, warmup: int = 3) -> tuple[list[float], object]:
    """Time ``fn`` replayed from a CUDA graph (benchmarks of kernels and short stages).

    ``fn()`` runs ``warmup`` times on a side stream (compiles, autotunes, initializes cuBLAS, as
    PyTorch's CUDA-graph notes ask before a capture), is captured once on the current device, the
    graph is replayed once unmeasured, then ``repeats`` times, each between two CUDA events.

    Args:
        fn: the work, on tensors that stay alive (the graph reuses their memory); no host syncs.
        repeats: measured replays.

    Returns:
        ``(ms of each replay, the captured call's result)``; the result's tensors are the graph's
        static outputs, overwritten by every replay (clone to keep one).

    Raises:
        ValueError: CUDA is not available.
    """
    if not torch.cuda.is_available():
        raise ValueError("graph_replay_times: needs CUDA")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times, out
