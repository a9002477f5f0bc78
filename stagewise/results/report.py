"""A run's report: ``report.md``, ``stage_shares.png`` and the terminal table.

The report answers "where did each millisecond go" for one run directory:

- the five stages (mean/p50/p90/p99 ms and their share of the summed stage means);
- end to end: e2e, TTFT, TPOT, ITL, decode tok/s, samples/s, output tok/s;
- token counts (vision / text / prefill / output), KV cache and peak GPU memory (MiB);
- the tensor shapes at each stage (like the seeds' data-flow analysis);
- when the run measured them, each stage's time against its physical floor: MFU for
  vision and prefill (compute-bound: FLOPs / peak bf16 matmul rate), MBU for decode
  (bandwidth-bound: bytes streamed / copy bandwidth). Utilisation = floor / measured;
- compile / warm-up time on its own line: it is never inside a stage time;
- the failed samples and their errors.

Units: times in ms, memory in MiB (2**20 bytes), rates in tokens/s or samples/s.
The summary is always recomputed from ``samples.jsonl`` so that an edited or resumed
run never shows stale numbers; only the measured extras (``floors``, ``ceilings``,
``warmup_ms``) are taken from ``summary.json``.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any, Iterable, Sequence

from stagewise import STAGES
from stagewise.errors import InputError
from stagewise.results.records import SampleRecord, read_samples
from stagewise.results.summary import summarize

REPORT_NAME = "report.md"
PLOT_NAME = "stage_shares.png"
SUMMARY_EXTRAS: tuple[str, ...] = ("floors", "ceilings", "warmup_ms", "engine_warmup_ms", "model_build_ms")
"""Keys of ``summary.json`` measured by the runner, not derivable from the records (any other
key that ``summarize`` does not produce is kept as well)."""

RANDOM_WEIGHTS_WARNING = "random weights: output text is meaningless; timings are what this run is for"

MIB = float(2**20)

_STAGE_COLORS = {
    "load": "#4C72B0",
    "preprocess": "#55A868",
    "vision": "#C44E52",
    "prefill": "#8172B2",
    "decode": "#CCB974",
}

# Floor entries are keyed by stage; "decode_step" (one token) compares with TPOT.
_FLOOR_MEASURED = {**{s: f"{s}_ms" for s in STAGES}, "decode_step": "tpot_ms"}
_FLOOR_DEFAULT_KIND = {"vision": "MFU", "prefill": "MFU", "decode": "MBU", "decode_step": "MBU"}


# --------------------------------------------------------------------------- formatting


def _finite(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def fmt_num(x: Any) -> str:
    """A number for a table cell: ``–`` for missing/non-finite; integers with thousands
    separators; floats with 1 decimal from 100 up (``1,008.2``), 2 from 1 (``28.50``),
    3 from 0.01 (``0.476``), 2 significant digits below (``0.00028``)."""
    if not _finite(x):
        return "–"
    if isinstance(x, numbers.Integral):
        return f"{x:,}"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.1f}"
    if a >= 100:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    if a == 0:
        return "0"
    if a >= 0.01:
        return f"{x:.3f}"
    return f"{x:.2g}"


def fmt_count(x: Any) -> str:
    """A token count or its mean: integral values without decimals (``582``), others with one."""
    if not _finite(x):
        return "–"
    return f"{int(round(x)):,}" if float(x).is_integer() else f"{x:,.1f}"


def fmt_pct(frac: Any) -> str:
    """A fraction (0.5) as a percentage cell (``50.0``); ``–`` when missing."""
    return f"{100.0 * frac:.1f}" if _finite(frac) else "–"


def fmt_mib(n_bytes: Any) -> str:
    """Bytes as MiB (2**20), formatted like :func:`fmt_num`; ``–`` when missing."""
    return fmt_num(n_bytes / MIB) if _finite(n_bytes) else "–"


def cell(x: Any) -> str:
    """Any value as one Markdown table cell (pipes escaped, one line)."""
    s = x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)
    return s.replace("\r", " ").replace("\n", " ").replace("|", "\\|")


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> list[str]:
    """Lines of a GitHub Markdown table.

    Args:
        align: one letter per column, ``l`` or ``r`` (default: first column left, the rest
            right, for numbers).
    """
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header):
        raise ValueError(f"md_table: align {align!r} for {len(header)} columns")
    out = ["| " + " | ".join(cell(h) for h in header) + " |"]
    out.append("|" + "|".join(" ---: " if a == "r" else " --- " for a in align) + "|")
    for r in rows:
        out.append("| " + " | ".join(cell(c) for c in r) + " |")
    return out


def flatten_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys (``{"env": {"gpu": x}}`` -> ``{"env.gpu": x}``);
    lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = v
    return out


# --------------------------------------------------------------------------- loading


def _read_json_dict(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(path, f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise InputError(path, "expected a JSON object")
    return obj


def load_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any], list[SampleRecord]]:
    """Read a run directory.

    Returns:
        ``(config, summary, records)``: ``config.json``; the summary recomputed from the
        records with ``summarize`` plus the runner's measured extras (``floors``,
        ``ceilings``, ``warmup_ms``, ... : every key ``summarize`` does not produce) copied
        from ``summary.json`` when it exists; the records of ``samples.jsonl`` (failed
        ones included).

    Raises:
        InputError: the folder, ``config.json`` or ``samples.jsonl`` is missing, or a
            JSON file is unreadable.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(run_dir, "no such run directory")
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise InputError(cfg_path, "missing: not a stagewise run directory (no config.json)")
    config = _read_json_dict(cfg_path)
    records = read_samples(run_dir / "samples.jsonl")
    summary = summarize(records)
    sum_path = run_dir / "summary.json"
    if sum_path.is_file():
        old = _read_json_dict(sum_path)
        for k, v in old.items():
            if k not in summary:  # measured by the runner; everything else is recomputed
                summary[k] = v
    return config, summary, records


# --------------------------------------------------------------------------- sections


def _metric(summary: dict[str, Any], name: str) -> dict[str, Any]:
    """``{"mean", "p50", "p90", "p99", "min", "max"}`` of one metric from the flat summary."""
    return {k: summary.get(f"{'median' if k == 'p50' else k}_{name}") for k in ("mean", "p50", "p90", "p99", "min", "max")}


def _stage_means(summary_or_stage_ms: dict[str, Any]) -> dict[str, float]:
    """``{stage: mean ms}`` from a summary or a plain ``{stage: ms}`` dict."""
    if "mean_load_ms" in summary_or_stage_ms:
        vals = {s: _metric(summary_or_stage_ms, f"{s}_ms").get("mean") for s in STAGES}
    else:
        vals = {s: summary_or_stage_ms.get(s) for s in STAGES}
    return {s: (float(v) if _finite(v) else 0.0) for s, v in vals.items()}


def requested(config: dict[str, Any]) -> dict[str, Any]:
    """The run's requested configuration (``config.json``'s ``requested``; older runs: the top level)."""
    return config.get("requested", config)


def _title(config: dict[str, Any]) -> list[str]:
    g = requested(config).get
    out = [f"# stagewise run: {config.get('model', '?')} · preset {g('preset', '?')} · engine {g('engine', '?')}", ""]
    out.append(
        f"weights: `{g('weights', '?')}` · dtype {g('dtype', '?')} · device {g('device', '?')} · "
        f"batch size {g('batch_size', '?')} · output length {g('output_len', '?')}"
    )
    applied = config.get("applied")
    if isinstance(applied, dict):
        dec = applied.get("decoding") or {}
        text = "greedy" if dec.get("decoding") == "greedy" else ", ".join(f"{k} {v}" for k, v in dec.items())
        out += ["", f"decoding: {text} · applied stage options: "
                + ", ".join(k for k, v in (applied.get("stages") or {}).items() if v is True) or "none"]
        eng = dict(applied.get("engine") or {})
        q = eng.pop("quantization", None)
        if eng:
            out.append("engine applied: " + " · ".join(f"{k} {v}" for k, v in eng.items()))
        if q:
            group = f" (group {q['group_size']})" if q.get("group_size") else ""
            head = " and LM head" if q.get("lm_head") else ""
            out += ["", f"quantization: {q['kind']}{group} weight-only, the decoder's linear layers{head}; "
                        f"the CLIP tower, projector, embeddings and norms stay {requested(config).get('dtype', '?')}; "
                        f"decode kernel {q.get('decode_kernel')}, prefill kernel {q.get('prefill_kernel')}; "
                        f"{fmt_num(eng.get('weight_bytes_per_step', 0) / 1e9)} GB of weights per decode step (MBU is computed on it)."]
    env = config.get("env")
    if isinstance(env, dict) and env:
        out.append("")
        out.append("environment: " + " · ".join(f"{k} {v}" for k, v in env.items()))
    if g("weights") == "random":
        out += ["", f"> **{RANDOM_WEIGHTS_WARNING}**"]
    return out


def _stage_section(summary: dict[str, Any], config: dict[str, Any]) -> list[str]:
    share = summary.get("stage_share") or {}
    rows = []
    for i, s in enumerate(STAGES, 1):
        m = _metric(summary, f"{s}_ms")
        rows.append([f"{i} {s}", fmt_num(m.get("mean")), fmt_num(m.get("p50")), fmt_num(m.get("p90")),
                     fmt_num(m.get("p99")), fmt_pct(share.get(s))])
    means = [_metric(summary, f"{s}_ms").get("mean") for s in STAGES]
    total = sum(v for v in means if _finite(v))
    rows.append(["sum of stages", fmt_num(total), "", "", "", "100.0" if total > 0 else "–"])
    out = ["## Stage breakdown", ""]
    out += md_table(["stage", "mean (ms)", "p50 (ms)", "p90 (ms)", "p99 (ms)", "share of stage sum (%)"], rows)
    e2e = _metric(summary, "e2el_ms").get("mean")
    if _finite(e2e) and e2e > 0 and total > 0:
        out += ["", f"Stages sum to {fmt_num(total)} ms against a measured end-to-end mean of "
                    f"{fmt_num(e2e)} ms ({100.0 * (total - e2e) / e2e:+.2f} %)."]
    b = requested(config).get("batch_size")
    if isinstance(b, int) and b > 1:
        out += ["", f"Batch size {b}: stage times are those of the whole batch (every sample of a batch "
                    "carries its batch's times)."]
    return out


def _loop_throughput(summary: dict[str, Any]) -> str:
    """`` · loop X samples/s`` (the run's wall clock; under data parallelism all ranks over the
    slowest rank's loop), or ``""`` when the summary has none."""
    rate = summary.get("loop_request_throughput_req_s")
    if not _finite(rate):
        return ""
    dp = summary.get("data_parallel") or {}
    where = f" over {dp['world_size']} data-parallel ranks" if dp.get("world_size", 1) > 1 else ""
    return f" · loop {fmt_num(rate)} samples/s{where}"


def _e2e_section(summary: dict[str, Any]) -> list[str]:
    names = [("E2EL (ms)", "e2el_ms"), ("TTFT (ms)", "ttft_ms"), ("TPOT (ms/token)", "tpot_ms"),
             ("ITL (ms)", "itl_ms"), ("decode (tok/s)", "decode_throughput_tok_s")]
    rows = []
    for label, key in names:
        m = _metric(summary, key)
        rows.append([label, fmt_num(m.get("mean")), fmt_num(m.get("p50")), fmt_num(m.get("p90")),
                     fmt_num(m.get("p99"))])
    out = ["## End to end", ""]
    out += md_table(["metric", "mean", "p50", "p90", "p99"], rows)
    out += ["", f"Throughput: {fmt_num(summary.get('request_throughput_req_s'))} samples/s · "
                f"{fmt_num(summary.get('output_throughput_tok_s'))} output tok/s (each batch counted once)."
                + _loop_throughput(summary)]
    out += ["", "TTFT = load + preprocess + vision + prefill; TPOT = (E2EL - TTFT) / (output tokens - 1); "
                "ITL rows pool every decode step of every sample (docs/metrics.md)."]
    return out


def _spec_section(summary: dict[str, Any], records: list[SampleRecord], config: dict[str, Any]) -> list[str]:
    """Speculative decoding: acceptance and the decode split into draft and verify (when used)."""
    spec = [r for r in records if r.ok and r.speculative_method]
    if not spec:
        return []
    r0 = spec[0]
    rows = []
    for label, key in [("acceptance rate", "acceptance_rate"), ("mean accepted length (tokens / verify step)", "mean_accepted_length"),
                       ("draft (ms, in decode)", "draft_ms"), ("verify (ms, in decode)", "verify_ms"), ("decode (ms)", "decode_ms")]:
        m = _metric(summary, key)
        rows.append([label, fmt_num(m.get("mean")), fmt_num(m.get("p50")), fmt_num(m.get("min")), fmt_num(m.get("max"))])
    steps = sum(r.n_verify_steps or 0 for r in spec)
    syncs = sum(r.n_host_syncs or 0 for r in spec)
    out = ["## Speculative decoding", "",
           f"method `{r0.speculative_method}`, {r0.num_speculative_tokens} speculative tokens per verify step; "
           f"{steps} verify steps over {len(spec)} samples, {syncs} host reads in all (one per step, plus the first token)."]
    draft = {}
    for r in spec:
        for k, v in (r.draft_stage_ms or {}).items():
            draft.setdefault(k, []).append(v)
    if draft:
        out += ["", "Draft model stages (timed between prefill and decode): "
                + ", ".join(f"{k} {fmt_num(sum(v) / len(v))} ms" for k, v in draft.items()) + "."]
    out += [""] + md_table(["figure", "mean", "p50", "min", "max"], rows)
    if requested(config).get("weights") == "random":
        out += ["", "> **Random weights: the acceptance figures say nothing about a real model; the engine "
                    "cost (verify and draft time) is what this run measures.**"]
    return out


def _tokens_section(summary: dict[str, Any]) -> list[str]:
    rows = []
    for label, key in [("vision tokens", "n_vision_tokens"), ("text tokens", "n_text_tokens"),
                       ("prefill tokens", "n_prefill_tokens"), ("output tokens", "n_output_tokens")]:
        m = _metric(summary, key)
        rows.append([label, fmt_count(m.get("mean")), fmt_count(m.get("min")), fmt_count(m.get("max"))])
    for label, key in [("KV cache (MiB)", "kv_cache_bytes"), ("peak GPU memory (MiB)", "peak_gpu_mem_bytes")]:
        m = _metric(summary, key)
        rows.append([label, fmt_mib(m.get("mean")), fmt_mib(m.get("min")), fmt_mib(m.get("max"))])
    out = ["## Tokens and memory", ""]
    out += md_table(["quantity", "mean", "min", "max"], rows)
    return out


def _shape_str(shape: Any) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]" if isinstance(shape, (list, tuple)) else str(shape)


def _shape_range(shapes: list[list[int]]) -> str:
    """``[1, 597–641, 4096]`` for same-rank shapes, else the distinct shapes joined by ``/``."""
    ranks = {len(s) for s in shapes}
    if len(ranks) != 1:
        distinct = sorted({tuple(s) for s in shapes})
        return " / ".join(_shape_str(list(s)) for s in distinct)
    dims = []
    for i in range(len(shapes[0])):
        lo, hi = min(s[i] for s in shapes), max(s[i] for s in shapes)
        dims.append(str(lo) if lo == hi else f"{lo}–{hi}")
    return "[" + ", ".join(dims) + "]"


def shape_rows(records: list[SampleRecord]) -> tuple[str | None, list[dict[str, Any]]]:
    """The data-shape table's rows.

    Returns:
        ``(first_ok_sample_id, rows)``; each row ``{"stage", "name", "shape", "numel",
        "varies": range string or None}``; ``shape`` is the first OK sample's (``None``
        when it lacks that tensor). Rows are in pipeline order (unknown stage prefixes last).
    """
    ok = [r for r in records if r.ok]
    if not ok:
        return None, []
    keys: list[str] = []
    for r in ok:
        keys += [k for k in r.shapes if k not in keys]
    order = {s: i for i, s in enumerate(STAGES)}
    keys.sort(key=lambda k: order.get(k.split(".", 1)[0], len(STAGES)))  # stable: keeps first-seen order
    first = ok[0]
    rows = []
    for k in keys:
        stage, _, name = k.partition(".")
        seen = [list(r.shapes[k]) for r in ok if k in r.shapes]
        shape = first.shapes.get(k)
        varies = None
        if len({tuple(s) for s in seen}) > 1 or len(seen) < len(ok):
            varies = _shape_range(seen) + ("" if len(seen) == len(ok) else f" (in {len(seen)} of {len(ok)} samples)")
        numel = math.prod(shape) if isinstance(shape, list) else None
        rows.append({"stage": stage, "name": name or stage, "shape": shape, "numel": numel, "varies": varies})
    return first.sample_id, rows


def _shape_section(records: list[SampleRecord]) -> list[str]:
    sid, rows = shape_rows(records)
    out = ["## Data shapes per stage", ""]
    if sid is None:
        return out + ["No sample ran to the end: no shapes to show."]
    if not rows:
        return out + ["The samples recorded no tensor shapes."]
    table = [[r["stage"], r["name"], "–" if r["shape"] is None else _shape_str(r["shape"]), fmt_num(r["numel"]),
              r["varies"] or "same in all"] for r in rows]
    out.append(f"Shapes of sample `{sid}` (the first successful one); the last column says whether they vary.")
    out.append("")
    out += md_table(["stage", "tensor", "shape", "elements", "across samples"], table, align="lllrl")
    if any(r["varies"] for r in rows):
        out += ["", "Shapes vary across samples (ranges in the last column)."]
    return out


def floor_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The floors table's rows: ``{"stage", "kind", "measured_ms", "floor_ms", "utilisation",
    "achieved": (value, unit) or None}``.

    ``measured_ms`` is the stage's mean time (``decode_step`` compares with the mean TPOT);
    utilisation = floor / measured (a fraction); achieved = FLOPs / s (TFLOP/s) for MFU rows,
    bytes / s (GB/s) for MBU rows.
    """
    floors = summary.get("floors") or {}
    order = {s: i for i, s in enumerate(_FLOOR_MEASURED)}
    rows = []
    for stage in sorted(floors, key=lambda s: order.get(s, len(order))):
        f = floors[stage] or {}
        key = _FLOOR_MEASURED.get(stage)
        measured = _metric(summary, key).get("mean") if key else None
        floor_ms = f.get("floor_ms")
        kind = f.get("kind") or _FLOOR_DEFAULT_KIND.get(stage, "floor")
        util = floor_ms / measured if _finite(floor_ms) and _finite(measured) and measured > 0 else None
        achieved = None
        if _finite(measured) and measured > 0:
            if kind == "MFU" and _finite(f.get("flops")):
                achieved = (f["flops"] / (measured / 1e3) / 1e12, "TFLOP/s")
            elif kind == "MBU" and _finite(f.get("bytes")):
                achieved = (f["bytes"] / (measured / 1e3) / 1e9, "GB/s")
        rows.append({"stage": stage, "kind": kind, "measured_ms": measured, "floor_ms": floor_ms,
                     "utilisation": util, "achieved": achieved})
    return rows


def _floor_section(summary: dict[str, Any]) -> list[str]:
    out: list[str] = []
    if summary.get("floors"):
        out += ["## Against the floor", ""]
        table = []
        for r in floor_rows(summary):
            ach = f"{fmt_num(r['achieved'][0])} {r['achieved'][1]}" if r["achieved"] else "–"
            table.append([r["stage"], r["kind"], fmt_num(r["measured_ms"]), fmt_num(r["floor_ms"]),
                          fmt_pct(r["utilisation"]), ach])
        out += md_table(["stage", "kind", "measured mean (ms)", "floor (ms)", "utilisation (%)", "achieved"], table,
                        align="llrrrr")
        out += ["", "Utilisation = floor / measured. MFU: the stage's FLOPs at the measured peak bf16 matmul "
                    "rate (compute-bound); MBU: the bytes it must stream at the measured copy bandwidth "
                    "(bandwidth-bound)."]
        c = summary.get("ceilings") or {}
        parts = []
        if _finite(c.get("copy_bw_bytes_s")):
            parts.append(f"copy bandwidth {fmt_num(c['copy_bw_bytes_s'] / 1e9)} GB/s")
        if _finite(c.get("bf16_flops_s")):
            parts.append(f"bf16 matmul {fmt_num(c['bf16_flops_s'] / 1e12)} TFLOP/s")
        if parts:
            out += ["", "Ceilings measured on this device: " + " · ".join(parts) + "."]
    return out


def _warmup_lines(summary: dict[str, Any]) -> list[str]:
    w = summary.get("warmup_ms")
    if not _finite(w):
        return []
    line = f"Compile / warm-up: {fmt_num(w)} ms ({w / 1e3:.1f} s)"
    if _finite(summary.get("engine_warmup_ms")) and summary["engine_warmup_ms"] > 0:
        line += f", of which engine compile / capture {fmt_num(summary['engine_warmup_ms'])} ms"
    if _finite(summary.get("model_build_ms")):
        line += f"; model build {fmt_num(summary['model_build_ms'])} ms"
    return ["", line + ". Own phases, not inside any stage time."]


def _failed_section(records: list[SampleRecord]) -> list[str]:
    bad = [r for r in records if not r.ok]
    if not bad:
        return []
    out = [f"## Failed samples ({len(bad)})", ""]
    out += md_table(["sample", "error"], [[r.sample_id, r.error] for r in bad], align="ll")
    return out


def render_markdown(config: dict[str, Any], summary: dict[str, Any], records: list[SampleRecord], *,
                    plot_name: str | None = PLOT_NAME) -> str:
    """The run report as Markdown.

    Args:
        config: ``config.json`` (model, preset, engine, weights, dtype, device, batch_size,
            output_len, env); missing keys show as ``?``.
        summary: ``summarize(records)`` plus optional ``floors``/``ceilings``/``warmup_ms``.
        records: all sample records (failed ones are listed with their error).
        plot_name: file name of the stacked-bar PNG to link (``None``: no link).

    Returns:
        The document (times in ms, memory in MiB, rates per second).
    """
    n, n_failed = summary.get("n_samples", len(records)), summary.get("n_failed", 0)
    lines = _title(config)
    lines += ["", f"Samples: {n} ({n - n_failed} ok, {n_failed} failed); statistics over the successful ones."]
    lines += _warmup_lines(summary)
    sections = [_stage_section(summary, config), _e2e_section(summary), _spec_section(summary, records, config),
                _tokens_section(summary), _shape_section(records), _floor_section(summary), _failed_section(records)]
    if plot_name:
        sections.append(["## Stage shares", "", f"![mean time per stage]({plot_name})"])
    for sec in sections:
        if sec:
            lines += [""] + sec
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plot


def plot_stage_shares(summary_or_list: dict[str, Any] | Sequence[dict[str, Any]], path: Path,
                      labels: Sequence[str] | None = None) -> Path:
    """Stacked horizontal bars of the mean time per stage (ms), one bar per run.

    Args:
        summary_or_list: one summary (with ``metrics``) or a list of them; a plain
            ``{stage: mean ms}`` dict is accepted in place of a summary.
        path: PNG to write (parent folders are created).
        labels: one per bar (default ``run 1``, ``run 2``, ...).

    Returns:
        ``path``.

    Raises:
        ValueError: no summaries, or ``labels`` of the wrong length.
    """
    from matplotlib.figure import (
        Figure,  # no pyplot: no global state, no display needed
    )

    items = [summary_or_list] if isinstance(summary_or_list, dict) else list(summary_or_list)
    if not items:
        raise ValueError("plot_stage_shares: no summaries to plot")
    labels = list(labels) if labels is not None else [f"run {i + 1}" for i in range(len(items))]
    if len(labels) != len(items):
        raise ValueError(f"plot_stage_shares: {len(labels)} labels for {len(items)} summaries")
    means = [_stage_means(it) for it in items]
    fig = Figure(figsize=(9.0, 1.6 + 0.6 * len(items)), dpi=110, layout="constrained")
    ax = fig.subplots()
    ys = list(range(len(items)))[::-1]  # first run on top
    left = [0.0] * len(items)
    longest = max((sum(m.values()) for m in means), default=0.0) or 1.0
    for s in STAGES:
        widths = [m[s] for m in means]
        ax.barh(ys, widths, left=left, height=0.6, color=_STAGE_COLORS[s], label=s)
        for y, x0, w, m in zip(ys, left, widths, means):
            total = sum(m.values())
            if total > 0 and w / longest > 0.06:  # label only segments wide enough to hold it
                ax.text(x0 + w / 2, y, f"{100 * w / total:.0f}%", ha="center", va="center", fontsize=8, color="white")
        left = [a + b for a, b in zip(left, widths)]
    for y, m in zip(ys, means):
        ax.text(sum(m.values()) + 0.01 * longest, y, f"{fmt_num(sum(m.values()))} ms", va="center", fontsize=8)
    ax.set_xlim(0, 1.14 * longest)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels)
    ax.set_xlabel("mean time per sample (ms)")
    ax.set_title("where the time goes, by stage")
    fig.legend(loc="outside lower center", ncols=len(STAGES), frameon=False, fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# --------------------------------------------------------------------------- entry points


def write_report(run_dir: Path) -> Path:
    """Re-render a run's ``report.md`` and ``stage_shares.png`` from its files.

    Returns:
        The path of ``report.md``.

    Raises:
        InputError: the run directory, ``config.json`` or ``samples.jsonl`` is missing or unreadable.
    """
    run_dir = Path(run_dir)
    config, summary, records = load_run(run_dir)
    plot_stage_shares(summary, run_dir / PLOT_NAME, labels=[str(config.get("model", run_dir.name))])
    out = run_dir / REPORT_NAME
    out.write_text(render_markdown(config, summary, records, plot_name=PLOT_NAME), encoding="utf-8")
    return out


def print_summary_table(summary: dict[str, Any], config: dict[str, Any], console: Any = None) -> Any:
    """Print the stage breakdown and TTFT / TPOT / tok/s as a rich table.

    Args:
        console: a ``rich.console.Console`` (default: a new one on stdout).

    Returns:
        The ``rich.table.Table`` printed.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    req = requested(config)
    title = f"{config.get('model', '?')} · {req.get('preset', '?')} · engine {req.get('engine', '?')}"
    t = Table(title=escape(title))
    t.add_column("stage / metric")
    for h in ("mean", "p50", "p90", "p99", "share (%)"):
        t.add_column(h, justify="right")
    share = summary.get("stage_share") or {}
    for s in STAGES:
        m = _metric(summary, f"{s}_ms")
        t.add_row(f"{s} (ms)", fmt_num(m.get("mean")), fmt_num(m.get("p50")), fmt_num(m.get("p90")),
                  fmt_num(m.get("p99")), fmt_pct(share.get(s)))
    t.add_section()
    for label, key in [("E2EL (ms)", "e2el_ms"), ("TTFT (ms)", "ttft_ms"), ("TPOT (ms/token)", "tpot_ms"),
                       ("ITL (ms)", "itl_ms"), ("decode (tok/s)", "decode_throughput_tok_s")]:
        m = _metric(summary, key)
        t.add_row(label, *(fmt_num(m.get(k)) for k in ("mean", "p50", "p90", "p99")), "")
    console.print(t)
    n, n_failed = summary.get("n_samples", 0), summary.get("n_failed", 0)
    line = (f"{n - n_failed} ok / {n} samples · {fmt_num(summary.get('request_throughput_req_s'))} samples/s · "
            f"{fmt_num(summary.get('output_throughput_tok_s'))} output tok/s" + _loop_throughput(summary))
    if _finite(summary.get("warmup_ms")):
        line += f" · warm-up {fmt_num(summary['warmup_ms'])} ms"
    console.print(line)
    if req.get("weights") == "random":
        console.print(escape(RANDOM_WEIGHTS_WARNING))
    return t
