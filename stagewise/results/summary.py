"""Aggregate statistics over a run's sample records (``summary.json``).

One vocabulary (vLLM's benchmark spelling, ``docs/metrics.md``): a flat dict with the statistic as a
prefix and the unit as a suffix -- ``mean_ttft_ms``, ``median_tpot_ms``, ``p99_itl_ms``,
``std_e2el_ms`` -- for every metric of :data:`METRICS`; throughputs ``request_throughput_req_s`` and
``output_throughput_tok_s``; ``stage_share`` per stage.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stagewise import STAGES
from stagewise.results.records import SampleRecord

METRICS: tuple[str, ...] = tuple(f"{s}_ms" for s in STAGES) + (
    "e2el_ms",
    "ttft_ms",
    "tpot_ms",
    "itl_ms",
    "decode_throughput_tok_s",
    "n_vision_tokens",
    "n_text_tokens",
    "n_prefill_tokens",
    "n_output_tokens",
    "kv_cache_bytes",
    "peak_gpu_mem_bytes",
    "acceptance_rate",
    "mean_accepted_length",
    "draft_ms",
    "verify_ms",
)
"""Record fields aggregated in ``summary.json`` (``itl_ms`` pools every decode step of every sample)."""

STATS: tuple[str, ...] = ("mean", "median", "std", "p90", "p99", "min", "max")
"""The statistic prefixes (``median`` is the 50th percentile; percentiles linearly interpolated)."""


def describe(values: list[float]) -> dict[str, float | None]:
    """``{mean, median, std, p90, p99, min, max}`` of ``values`` (``None`` each for no values)."""
    if not values:
        return {k: None for k in STATS}
    a = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"mean": float(a.mean()), "median": float(p50), "std": float(a.std()), "p90": float(p90),
            "p99": float(p99), "min": float(a.min()), "max": float(a.max())}


def stat(summary: dict[str, Any], metric: str, which: str = "mean") -> float | None:
    """``summary[f"{which}_{metric}"]``: e.g. ``stat(s, "ttft_ms", "p99")``."""
    return summary.get(f"{which}_{metric}")


def _values(records: list[SampleRecord], metric: str) -> list[float]:
    if metric == "itl_ms":
        return [x for r in records for x in (r.itl_ms or [])]
    return [getattr(r, metric) for r in records if getattr(r, metric) is not None]


def summarize(records: list[SampleRecord]) -> dict[str, Any]:
    """The run summary.

    Returns:
        ``{"n_samples", "n_failed", "<stat>_<metric>"..., "stage_share": {stage: fraction of the
        summed mean stage times}, "request_throughput_req_s", "output_throughput_tok_s"}``.
        Throughputs count each batch once (the samples and tokens of a batch over the batch's
        end-to-end time).
    """
    ok = [r for r in records if r.ok]
    out: dict[str, Any] = {"n_samples": len(records), "n_failed": len(records) - len(ok)}
    for m in METRICS:
        for k, v in describe(_values(ok, m)).items():
            out[f"{k}_{m}"] = v
    means = {s: out[f"mean_{s}_ms"] or 0.0 for s in STAGES}
    total = sum(means.values())
    out["stage_share"] = {s: (means[s] / total if total > 0 else None) for s in STAGES}
    wall_ms = sum((r.e2el_ms or 0.0) / max(r.batch_size, 1) for r in ok)
    n_out = sum(r.n_output_tokens or 0 for r in ok)
    out["request_throughput_req_s"] = (len(ok) / (wall_ms / 1e3)) if wall_ms > 0 else None
    out["output_throughput_tok_s"] = (n_out / (wall_ms / 1e3)) if wall_ms > 0 else None
    return out
