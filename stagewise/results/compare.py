"""``stagewise compare``: runs side by side, stage by stage, on the samples they share.

Why paired: two models (or engines) run on the same samples differ per sample in input
length and output length; comparing each sample with itself removes that variation
from the ratio, so a small number of samples gives a tight interval.

Method:

- samples are paired by ``sample_id`` over the ids that ran successfully in EVERY run
  (failed samples are dropped from all runs); a run that holds an id several times
  (repeats: the same id, or ``<id>@<r>`` when its config has ``repeats`` > 1) contributes
  the mean of its successful repeats;
- the first run is the baseline; for each stage, e2e, TTFT and TPOT, each run's mean and
  p50 over the common samples, and the per-sample ratio run / baseline summarized by its
  geometric mean with a percentile bootstrap 95 % confidence interval (the paired samples
  are resampled with replacement; one common sample gives no interval);
- "which stage explains the difference": each stage's mean difference (run - baseline)
  as a share of the e2e mean difference; the stage with the largest share explains it.
  The decode difference is further split, exactly, into a part from the output length
  and a part from the time per token;
- config differences: ``config.json`` flattened to dotted keys (``env.gpu``), the keys
  whose values differ.

Units: times in ms, memory in MiB (2**20 bytes); ratios are plain numbers (> 1: the run
is slower than the baseline for a time).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from stagewise import STAGES
from stagewise.errors import InputError
from stagewise.results.records import SampleRecord, write_json
from stagewise.results.report import (
    MIB,
    flatten_config,
    fmt_count,
    fmt_num,
    fmt_pct,
    load_run,
    md_table,
    plot_stage_shares,
    requested,
)

COMPARE_MD = "compare.md"
COMPARE_JSON = "compare.json"
COMPARE_PNG = "compare_stages.png"

TIME_METRICS: tuple[str, ...] = tuple(f"{s}_ms" for s in STAGES) + ("e2el_ms", "ttft_ms", "tpot_ms")
"""Metrics compared with paired ratios (all ms)."""

LENGTH_FIELDS: tuple[str, ...] = ("n_vision_tokens", "n_text_tokens", "n_prefill_tokens", "n_output_tokens",
                                  "kv_cache_bytes", "peak_gpu_mem_bytes")
"""Per-run means over the common samples (bytes fields are reported in MiB)."""

_METRIC_LABEL = {**{f"{s}_ms": s for s in STAGES}, "e2el_ms": "E2EL", "ttft_ms": "TTFT", "tpot_ms": "TPOT (per token)"}


def _ok_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def base_sample_id(sample_id: str, repeats: int) -> str:
    """The sample's id without the runner's repeat suffix: ``"s1@2"`` -> ``"s1"`` when the
    run measured each sample ``repeats`` > 1 times (ids ``<id>@<r>``); unchanged otherwise."""
    if repeats > 1:
        head, sep, tail = sample_id.rpartition("@")
        if sep and tail.isdigit():
            return head
    return sample_id


def _per_sample(records: list[SampleRecord], fields: tuple[str, ...], repeats: int = 1) -> dict[str, dict[str, float]]:
    """``{sample_id: {field: value}}`` over OK records; repeats of an id (the same id, or
    ``<id>@<r>`` when ``repeats`` > 1) are averaged (a field missing in every repeat is absent)."""
    groups: dict[str, list[SampleRecord]] = {}
    for r in records:
        if r.ok:
            groups.setdefault(base_sample_id(r.sample_id, repeats), []).append(r)
    out: dict[str, dict[str, float]] = {}
    for sid, rs in groups.items():
        vals = {}
        for f in fields:
            xs = [getattr(r, f) for r in rs if _ok_number(getattr(r, f))]
            if xs:
                vals[f] = float(np.mean(xs))
        out[sid] = vals
    return out


def bootstrap_geomean_ratio(ratios: np.ndarray, *, n_boot: int, seed: int, level: float = 0.95) -> dict[str, Any]:
    """Geometric mean of per-sample ratios and its percentile bootstrap interval.

    Args:
        ratios: positive finite per-sample ratios (one per paired sample).
        n_boot: bootstrap resamples.
        seed: seed of the resampling generator (same seed, same interval).
        level: interval coverage (0.95: the 2.5th and 97.5th percentiles).

    Returns:
        ``{"n", "geomean", "ci95": [lo, hi] or None}``; ``geomean`` is ``None`` for no
        ratios, ``ci95`` is ``None`` for fewer than two.
    """
    r = np.asarray(ratios, dtype=np.float64)
    n = int(r.size)
    if n == 0:
        return {"n": 0, "geomean": None, "ci95": None}
    logs = np.log(r)
    out: dict[str, Any] = {"n": n, "geomean": float(np.exp(logs.mean())), "ci95": None}
    if n < 2:
        return out
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, 1_000_000 // n)  # bounded memory: at most ~1e6 indices at a time
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(m, n))
        boot[start:start + m] = logs[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.exp(np.quantile(boot, [alpha, 1.0 - alpha]))
    out["ci95"] = [float(lo), float(hi)]
    return out


def _values_equal(vals: list[Any]) -> bool:
    dumped = {json.dumps(v, sort_keys=True, default=str) for v in vals}
    return len(dumped) == 1


def config_diff(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keys (dotted, ``env`` included) whose values differ between the configs.

    Returns:
        ``[{"key", "values": [one per config; None when absent]}]`` sorted by key.
    """
    flat = [flatten_config(c) for c in configs]
    keys = sorted(set().union(*flat))
    out = []
    for k in keys:
        present = [k in f for f in flat]
        vals = [f.get(k) for f in flat]
        if not all(present) or not _values_equal(vals):
            out.append({"key": k, "values": vals})
    return out


def _labels(run_dirs: list[Path]) -> list[str]:
    names = [p.name or str(p) for p in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{n} ({i + 1})" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _explain(base: dict[str, dict[str, float]], run: dict[str, dict[str, float]],
             ids: list[str]) -> dict[str, Any] | None:
    """Stage differences (run - baseline, ms) as shares of the e2e difference, over ``ids``
    where every stage and e2e were measured in both runs; ``None`` when there is none."""
    need = [f"{s}_ms" for s in STAGES] + ["e2el_ms"]
    use = [i for i in ids if all(k in base[i] and k in run[i] for k in need)]
    if not use:
        return None
    def mean(d: dict[str, dict[str, float]], k: str) -> float:
        return float(np.mean([d[i][k] for i in use]))

    d_stage = {s: mean(run, f"{s}_ms") - mean(base, f"{s}_ms") for s in STAGES}
    e2e_base = mean(base, "e2el_ms")
    d_e2e = mean(run, "e2el_ms") - e2e_base
    if abs(d_e2e) <= 1e-12 * max(1.0, abs(e2e_base)):
        d_e2e = 0.0  # identical runs: no difference to explain
    unattributed = d_e2e - sum(d_stage.values())
    if abs(unattributed) < 1e-9 * max(1.0, abs(d_e2e), *(abs(d) for d in d_stage.values())):
        unattributed = 0.0  # rounding noise of the subtraction, not time
    if d_e2e != 0.0:
        shares = {s: d / d_e2e for s, d in d_stage.items()}
        stage = max(STAGES, key=lambda s: shares[s])
    else:
        shares = {s: None for s in STAGES}
        stage = max(STAGES, key=lambda s: abs(d_stage[s]))
    out: dict[str, Any] = {
        "n": len(use),
        "e2el_diff_ms": d_e2e,
        "stage_diff_ms": d_stage,
        "shares": shares,
        "unattributed_ms": unattributed,
        "stage": stage,
        "decode_split": None,
    }
    # decode = steps x time per step, with steps = output tokens - 1 (the first comes from prefill).
    # Aggregate N = mean steps, T = mean decode / N, so mean decode = N * T exactly, and
    # N1 T1 - N0 T0 = (N1 - N0)(T0 + T1)/2 + (T1 - T0)(N0 + N1)/2 exactly.
    use_n = [i for i in use if "n_output_tokens" in base[i] and "n_output_tokens" in run[i]]
    if use_n:
        n0 = float(np.mean([base[i]["n_output_tokens"] - 1 for i in use_n]))
        n1 = float(np.mean([run[i]["n_output_tokens"] - 1 for i in use_n]))
        if n0 > 0 and n1 > 0:
            t0 = float(np.mean([base[i]["decode_ms"] for i in use_n])) / n0
            t1 = float(np.mean([run[i]["decode_ms"] for i in use_n])) / n1
            out["decode_split"] = {
                "n": len(use_n),
                "steps": [n0, n1],
                "ms_per_step": [t0, t1],
                "from_output_len_ms": (n1 - n0) * (t0 + t1) / 2,
                "from_time_per_token_ms": (t1 - t0) * (n0 + n1) / 2,
            }
    return out


def compare_runs(run_dirs: list[Path], *, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Compare runs on the samples common to all of them; the first run is the baseline.

    Args:
        run_dirs: two or more run directories (``config.json`` + ``samples.jsonl``).
        n_boot: bootstrap resamples for the ratio intervals.
        seed: bootstrap seed (the result is deterministic for a fixed seed).

    Returns:
        A JSON-ready dict: ``runs`` (label, dir, model, preset, engine, weights, record/OK
        counts), ``baseline``, ``n_common``, ``common_ids``, ``metrics`` (per time metric,
        ms: per-run ``mean``/``p50`` and per-run ``ratio`` vs the baseline: ``n``,
        ``geomean``, ``ci95``, ``ratio_of_means``; ``None`` for the baseline), ``lengths``
        (per run: token counts and ``kv_cache_mib``/``peak_gpu_mem_mib`` means),
        ``explain`` (per run vs the baseline, ``None`` for the baseline), ``config_diff``,
        ``bootstrap`` (the method's settings).

    Raises:
        InputError: fewer than two runs, ``n_boot`` < 1, a missing or unreadable run
            directory, a run with no (successful) samples, or no sample id common to all runs.
    """
    run_dirs = [Path(p) for p in run_dirs]
    if len(run_dirs) < 2:
        raise InputError(None, f"compare needs at least two run directories (got {len(run_dirs)})")
    if n_boot < 1:
        raise InputError(None, f"n_boot must be >= 1 (got {n_boot})")
    labels = _labels(run_dirs)
    fields = TIME_METRICS + LENGTH_FIELDS
    configs, per_sample, runs = [], [], []
    for d, label in zip(run_dirs, labels):
        config, _summary, records = load_run(d)
        samples_path = d / "samples.jsonl"
        if not records:
            raise InputError(samples_path, "no samples in this run")
        try:
            repeats = int(requested(config).get("repeats") or 1)
        except (TypeError, ValueError):
            raise InputError(d / "config.json", f"repeats is not an integer: {config.get('repeats')!r}") from None
        ps = _per_sample(records, fields, repeats)
        if not ps:
            raise InputError(samples_path, f"no successful samples (all {len(records)} failed)")
        configs.append(config)
        per_sample.append(ps)
        n_ok = sum(r.ok for r in records)
        req = requested(config)
        runs.append({"label": label, "run_dir": str(d), "model": config.get("model"), "preset": req.get("preset"),
                     "engine": req.get("engine"), "weights": req.get("weights"), "n_records": len(records),
                     "n_ok": n_ok, "n_failed": len(records) - n_ok, "n_ids": len(ps),
                     "speculative": _spec_summary(records), "quantization": _first(r.quantization for r in records if r.ok)})
    common_set = set(per_sample[0]).intersection(*per_sample[1:])
    if not common_set:
        counts = ", ".join(f"{r['label']}: {r['n_ids']}" for r in runs)
        raise InputError(None, f"no sample id ran successfully in all runs (successful ids per run: {counts})")
    common = [sid for sid in per_sample[0] if sid in common_set]  # baseline order
    for r in runs:
        r["n_common"] = len(common)

    base = per_sample[0]
    metrics: dict[str, Any] = {}
    for m in TIME_METRICS:
        entry_runs = []
        for k, ps in enumerate(per_sample):
            xs = [ps[i][m] for i in common if m in ps[i]]
            stat = {"n": len(xs), "mean": float(np.mean(xs)) if xs else None,
                    "p50": float(np.median(xs)) if xs else None, "ratio": None}
            if k > 0:
                pairs = [(ps[i][m], base[i][m]) for i in common if m in ps[i] and m in base[i]]
                ratios = np.array([a / b for a, b in pairs if a > 0 and b > 0])
                ratio = bootstrap_geomean_ratio(ratios, n_boot=n_boot, seed=seed)
                mb = float(np.mean([b for _, b in pairs])) if pairs else 0.0
                ratio["ratio_of_means"] = float(np.mean([a for a, _ in pairs])) / mb if pairs and mb > 0 else None
                ratio["n_excluded"] = len(pairs) - int(ratios.size)  # zero times: no ratio
                stat["ratio"] = ratio
            entry_runs.append(stat)
        metrics[m] = {"unit": "ms", "runs": entry_runs}

    lengths = []
    for ps in per_sample:
        row: dict[str, Any] = {}
        for f in LENGTH_FIELDS:
            xs = [ps[i][f] for i in common if f in ps[i]]
            v = float(np.mean(xs)) if xs else None
            if f.endswith("_bytes"):
                row[f.replace("_bytes", "_mib")] = v / MIB if v is not None else None
            else:
                row[f] = v
        lengths.append(row)

    explain = [None] + [_explain(base, ps, common) for ps in per_sample[1:]]
    return {
        "baseline": labels[0],
        "runs": runs,
        "n_common": len(common),
        "common_ids": common,
        "metrics": metrics,
        "lengths": lengths,
        "explain": explain,
        "config_diff": config_diff(configs),
        "bootstrap": {"n_boot": n_boot, "seed": seed, "level": 0.95,
                      "statistic": "geometric mean of per-sample ratios run / baseline, percentile interval"},
    }


# --------------------------------------------------------------------------- rendering


def _fmt_ratio(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.3f}"


def _ratio_cell(ratio: dict[str, Any] | None) -> str:
    if not ratio or ratio.get("geomean") is None:
        return "–"
    s = f"{_fmt_ratio(ratio['geomean'])}×"
    ci = ratio.get("ci95")
    s += f" [{_fmt_ratio(ci[0])}, {_fmt_ratio(ci[1])}]" if ci else " (no CI: n=1)"
    return s


def _config_cell(v: Any) -> str:
    return "–" if v is None else (v if isinstance(v, str) else json.dumps(v))


def _signed_ms(x: Any) -> str:
    return "–" if not _ok_number(x) else ("+" if x > 0 else "") + fmt_num(x)


def _first(values: Any) -> Any:
    return next(iter(values), None)


def _spec_summary(records: list[SampleRecord]) -> dict[str, Any] | None:
    """A run's speculative decoding in brief (method, k, mean acceptance), or ``None`` for plain decoding."""
    spec = [r for r in records if r.ok and r.speculative_method]
    if not spec:
        return None

    def mean(key: str) -> float | None:
        xs = [getattr(r, key) for r in spec if getattr(r, key) is not None]
        return float(np.mean(xs)) if xs else None

    return {"method": spec[0].speculative_method, "num_speculative_tokens": spec[0].num_speculative_tokens,
            "acceptance_rate": mean("acceptance_rate"), "mean_accepted_length": mean("mean_accepted_length"),
            "draft_ms": mean("draft_ms"), "verify_ms": mean("verify_ms")}


def render_compare_markdown(result: dict[str, Any]) -> str:
    """``compare_runs``'s result as Markdown (times in ms, memory in MiB)."""
    runs = result["runs"]
    labels = [r["label"] for r in runs]
    base = result["baseline"]
    L = [f"# stagewise compare: {' vs '.join(labels)}", ""]
    L.append(f"Baseline: **{base}**. Paired on the **{result['n_common']}** sample(s) that ran successfully in "
             "every run; ratios are run / baseline per sample (geometric mean, bootstrap "
             f"{int(100 * result['bootstrap']['level'])} % CI over {result['bootstrap']['n_boot']} resamples, "
             f"seed {result['bootstrap']['seed']}).")
    L += ["", "## Runs", ""]
    L += md_table(["run", "model", "preset", "engine", "weights", "samples", "ok", "distinct ok ids", "common"],
                  [[r["label"], str(r["model"]), str(r["preset"]), str(r["engine"]), str(r["weights"]),
                    r["n_records"], r["n_ok"], r["n_ids"], r["n_common"]] for r in runs], align="lllllrrrr")
    if any(r.get("weights") == "random" for r in runs):
        L += ["", "> random weights in at least one run: output text is meaningless; timings are what it is for."]
    if any(r.get("speculative") or (r.get("quantization") not in (None, "none")) for r in runs):
        L += ["", "Decoding per run (a speculative or quantized run is paired with the plain one on the same sample ids):", ""]
        rows = []
        for r in runs:
            sp = r.get("speculative")
            rows.append([r["label"], str(r.get("quantization") or "none"), "plain" if not sp else f"{sp['method']}, k = {sp['num_speculative_tokens']}",
                         fmt_num(sp["acceptance_rate"]) if sp else "–", fmt_num(sp["mean_accepted_length"]) if sp else "–",
                         fmt_num(sp["draft_ms"]) if sp else "–", fmt_num(sp["verify_ms"]) if sp else "–"])
        L += md_table(["run", "quantization", "decoding", "acceptance rate", "mean accepted length", "draft (ms)", "verify (ms)"], rows)

    L += ["", "## Per stage and end to end (common samples)", ""]
    header = ["metric"] + [f"{lab} mean / p50 (ms)" for lab in labels] + [f"{lab} / {base}" for lab in labels[1:]]
    rows = []
    for m, entry in result["metrics"].items():
        er = entry["runs"]
        row = [_METRIC_LABEL.get(m, m)] + [f"{fmt_num(e['mean'])} / {fmt_num(e['p50'])}" for e in er]
        row += [_ratio_cell(e["ratio"]) for e in er[1:]]
        rows.append(row)
    L += md_table(header, rows)
    L += ["", "Ratio cells: geometric mean of per-sample ratios [95 % CI]; > 1 means slower than the baseline."]

    L += ["", "## Prefill length, output length, memory (means over common samples)", ""]
    qty = [("vision tokens", "n_vision_tokens"), ("text tokens", "n_text_tokens"),
           ("prefill tokens", "n_prefill_tokens"), ("output tokens", "n_output_tokens"),
           ("KV cache (MiB)", "kv_cache_mib"), ("peak GPU memory (MiB)", "peak_gpu_mem_mib")]
    L += md_table(["quantity"] + labels,
                  [[q] + [(fmt_num if k.endswith("_mib") else fmt_count)(ln.get(k)) for ln in result["lengths"]]
                   for q, k in qty])

    L += ["", "## Which stage explains the difference", ""]
    exps = result["explain"][1:]
    for lab, ex in zip(labels[1:], exps):
        if ex is None:
            L.append(f"- {lab} vs {base}: no sample with all stage times in both runs.")
            continue
        share = ex["shares"][ex["stage"]]
        why = f"{fmt_pct(share)} % of the difference" if share is not None else "the largest stage difference"
        s = (f"- **{lab} vs {base}**: end to end {_signed_ms(ex['e2el_diff_ms'])} ms per sample; "
             f"**{ex['stage']}** explains it ({_signed_ms(ex['stage_diff_ms'][ex['stage']])} ms, {why}).")
        ds = ex.get("decode_split")
        if ds:
            s += (f" Decode: {_signed_ms(ds['from_output_len_ms'])} ms from output length "
                  f"({fmt_count(ds['steps'][0] + 1)} -> {fmt_count(ds['steps'][1] + 1)} tokens), "
                  f"{_signed_ms(ds['from_time_per_token_ms'])} ms from time per token "
                  f"({fmt_num(ds['ms_per_step'][0])} -> {fmt_num(ds['ms_per_step'][1])} ms).")
        L.append(s)
    header = ["stage"]
    for lab in labels[1:]:
        header += [f"Δ {lab} − {base} (ms)", f"share of Δ E2EL, {lab} (%)"]
    rows = []
    for s in list(STAGES) + ["unattributed", "E2EL"]:
        row = [s]
        for ex in exps:
            if ex is None:
                row += ["–", "–"]
            elif s == "E2EL":
                row += [_signed_ms(ex["e2el_diff_ms"]), "100.0" if ex["e2el_diff_ms"] else "–"]
            elif s == "unattributed":
                d = ex["unattributed_ms"]
                row += [_signed_ms(d), fmt_pct(d / ex["e2el_diff_ms"]) if ex["e2el_diff_ms"] else "–"]
            else:
                row += [_signed_ms(ex["stage_diff_ms"][s]), fmt_pct(ex["shares"][s])]
        rows.append(row)
    L += [""] + md_table(header, rows)

    L += ["", "## Config differences", ""]
    diffs = result["config_diff"]
    if diffs:
        L += md_table(["key"] + labels, [[d["key"]] + [_config_cell(v) for v in d["values"]] for d in diffs],
                      align="l" * (len(labels) + 1))
    else:
        L.append("The runs' configs are identical.")
    L += ["", "## Stage shares", "", f"![mean time per stage, per run]({COMPARE_PNG})"]
    return "\n".join(L) + "\n"


def write_compare(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path, Path]:
    """Write ``compare.md``, ``compare.json`` and ``compare_stages.png`` into ``out_dir``
    (created if needed).

    Returns:
        ``(md_path, json_path, png_path)``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, json_path, png_path = out_dir / COMPARE_MD, out_dir / COMPARE_JSON, out_dir / COMPARE_PNG
    write_json(json_path, result)
    stage_means = [{s: result["metrics"][f"{s}_ms"]["runs"][k]["mean"] for s in STAGES}
                   for k in range(len(result["runs"]))]
    plot_stage_shares(stage_means, png_path, labels=[r["label"] for r in result["runs"]])
    md_path.write_text(render_compare_markdown(result), encoding="utf-8")
    return md_path, json_path, png_path
