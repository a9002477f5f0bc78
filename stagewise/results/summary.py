"""Aggregate statistics over a run's sample records (``summary.json``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from stagewise import STAGES
from stagewise.results.records import SampleRecord

METRICS: tuple[str, ...] = tuple(f"{s}_ms" for s in STAGES) + (
    "e2e_ms",
    "ttft_ms",
    "tpot_ms",
    "itl_p50_ms",
    "itl_p99_ms",
    "decode_tok_s",
    "n_vision_tokens",
    "n_text_tokens",
    "n_prefill_tokens",
    "n_output_tokens",
    "kv_cache_bytes",
    "peak_gpu_mem_bytes",
)
"""Record fields aggregated in ``summary.json`` (units in the names; counts and bytes plain)."""


def describe(values: list[float]) -> dict[str, float | int | None]:
    """``{n, mean, p50, p90, p99, min, max}`` of ``values`` (linear-interpolated percentiles).

    Empty input gives ``n = 0`` and ``None`` elsewhere (same keys either way).
    """
    if not values:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None, "min": None, "max": None}
    a = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "n": int(a.size),
        "mean": float(a.mean()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "min": float(a.min()),
        "max": float(a.max()),
    }


def summarize(records: list[SampleRecord]) -> dict[str, Any]:
    """The run summary.

    Returns:
        ``{"n_samples", "n_failed", "metrics": {field: describe(...)},
        "stage_share": {stage: fraction of the summed mean stage times},
        "samples_per_s", "output_tok_s"}``. Throughputs count each batch once
        (samples and tokens of a batch over the batch's end-to-end time).
    """
    ok = [r for r in records if r.ok]
    metrics = {m: describe([getattr(r, m) for r in ok if getattr(r, m) is not None]) for m in METRICS}
    means = {s: metrics[f"{s}_ms"]["mean"] or 0.0 for s in STAGES}
    total = sum(means.values())
    share = {s: (means[s] / total if total > 0 else None) for s in STAGES}
    # Throughput: samples in one batch share one e2e time; count it once per batch.
    wall_ms = sum((r.e2e_ms or 0.0) / max(r.batch_size, 1) for r in ok)
    n_out = sum(r.n_output_tokens or 0 for r in ok)
    return {
        "n_samples": len(records),
        "n_failed": len(records) - len(ok),
        "metrics": metrics,
        "stage_share": share,
        "samples_per_s": (len(ok) / (wall_ms / 1e3)) if wall_ms > 0 else None,
        "output_tok_s": (n_out / (wall_ms / 1e3)) if wall_ms > 0 else None,
    }
