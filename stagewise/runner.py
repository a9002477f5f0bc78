"""The benchmark scenario: drive any model through the five stages, sample by sample.

Flow: samples -> build model + engine -> timed cold start (engine warm-up, compile, graph capture:
``engine_warmup_ms``) -> warm-up samples (run, not recorded) -> the measured loop, one batch at a
time, each record appended to ``samples.jsonl`` as soon as its batch finishes -> ``summary.json``
(+ floors) -> ``report.md``.

The loop never knows which model it drives (:class:`stagewise.models.base.MultimodalModel`) nor
which engine (:class:`stagewise.engine.base.Engine`). Any exception while reading, rendering or
running a sample becomes that sample's recorded failure (type and one-line message) and the run
goes on; ``--resume`` skips the samples already in ``samples.jsonl`` and refuses a run directory
whose configuration differs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from stagewise import STAGES
from stagewise.config import OutputLenPolicy, RunConfig, _jsonable, parse_output_len
from stagewise.distributed import DistContext
from stagewise.engine import make_engine
from stagewise.engine.base import Engine, stack_left_padded
from stagewise.engine.sampling import row_seed
from stagewise.engine.speculative import Drafter, SpeculativeDecoder, prompt_text_ids
from stagewise.errors import InputError
from stagewise.measure.costmodel import kv_cache_bytes, measure_ceilings, stage_floors
from stagewise.measure.timing import StageClock, device_sync
from stagewise.models.base import MultimodalModel, Sample
from stagewise.models.family import StageOptions
from stagewise.models.vision import VisionOptions
from stagewise.results.records import (
    SampleRecord,
    SampleWriter,
    read_samples,
    write_json,
)
from stagewise.results.summary import summarize

STAGE_SUM_TOLERANCE = 0.02
"""Stage times must add up to the independently measured end-to-end time within 2 %."""

PROMPT_TEXT_BUDGET = 256
"""Text tokens the static KV cache reserves beside the vision tokens (the prompts here are ~20-60)."""


@dataclass
class BatchResult:
    """One measured batch: its records (in sample order)."""

    records: list[SampleRecord]


@dataclass
class Speculation:
    """Speculative decoding of a run: the decoder over the target engine, its drafter, and the
    multimodal draft model whose stages 1-4 run per sample (``multimodal_draft``), if any."""

    decoder: SpeculativeDecoder
    drafter: Drafter
    draft_model: MultimodalModel | None = None
    text_draft: bool = False  # a text-only draft LM: prefilled with the prompt's text ids


def build_speculation(cfg: RunConfig, model: MultimodalModel, engine: Engine, *, max_new_tokens: int,
                      prompt_bound: int) -> Speculation | None:
    """The run's :class:`Speculation` for ``cfg.speculate`` (``None`` for ``none``).

    Raises:
        ValueError / InputError: an unknown or unusable draft model, a draft whose tokenizer
            differs from the target's.
    """
    from stagewise.engine.fast import FastEngine
    from stagewise.engine.speculative import DraftModelDrafter, NgramDrafter
    from stagewise.models.draft import check_vocab, load_draft
    from stagewise.models.registry import load_model

    if cfg.speculate == "none":
        return None
    if not isinstance(engine, FastEngine):
        raise ValueError("speculate: needs --engine fast")
    k = cfg.num_speculative_tokens
    target_vocab = int(model.lm.lm_head.weight.shape[0])
    draft_seq = _round_up(prompt_bound + max_new_tokens + k + 8, 64)
    if cfg.speculate == "ngram":
        drafter = NgramDrafter(cfg.prompt_lookup_max, cfg.prompt_lookup_min)
        return Speculation(SpeculativeDecoder(engine, drafter, k), drafter)
    if cfg.speculate == "draft_model":
        from stagewise.models.draft import PRESETS as DRAFT_PRESETS

        own_vocab = DRAFT_PRESETS.get(cfg.draft_model, {}).get("vocab_size", 1)
        d = load_draft(cfg.draft_model, device=model.device, dtype=model.dtype, seed=cfg.seed,
                       vocab_size=None if own_vocab else target_vocab)  # a tiny draft takes the target's
        shared = check_vocab(d.tokenizer, model.tokenizer, draft_vocab=d.vocab_size, target_vocab=target_vocab,
                             where=d.source)
        drafter = DraftModelDrafter.from_lm(d.lm, max_seq=draft_seq, shared_vocab=shared)
        return Speculation(SpeculativeDecoder(engine, drafter, k), drafter, text_draft=True)
    weights = "random" if cfg.draft_model in _preset_names() else cfg.draft_model
    preset = cfg.draft_model if weights == "random" else None
    dm = load_model(preset, weights, device=model.device, dtype=model.dtype, seed=cfg.seed)
    dm.configure(dm.applicable(model.options))
    shared = check_vocab(dm.tokenizer, model.tokenizer, draft_vocab=int(dm.lm.lm_head.weight.shape[0]),
                         target_vocab=target_vocab, where=cfg.draft_model)
    drafter = DraftModelDrafter.from_lm(dm.lm, max_seq=_round_up(dm.n_vision_tokens + PROMPT_TEXT_BUDGET + max_new_tokens + k + 8, 64),
                                        shared_vocab=shared)
    return Speculation(SpeculativeDecoder(engine, drafter, k), drafter, draft_model=dm)


def _preset_names() -> list[str]:
    from stagewise.models.registry import all_presets

    return all_presets()


def failure(e: BaseException) -> str:
    """A sample's recorded failure: the user-facing line for bad input, else ``Type: message``
    (one line either way)."""
    if isinstance(e, InputError):
        return str(e)
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:500] if text else type(e).__name__


def resolve_stage_options(model: MultimodalModel, cfg: RunConfig) -> StageOptions:
    """The stage options to apply: the explicit flags (refused with the reason when the family or
    device cannot serve them), plus, with ``fast_stages``, every speed path it can serve.

    Raises:
        ValueError: an explicit flag this model cannot serve.
    """
    asked = cfg.stage_options()
    if cfg.fast_stages:
        every = replace(asked, gpu_preprocess=True, vision=VisionOptions(compile=True, graph=True, fuse=True))
        serve = model.applicable(every)
        v = serve.vision
        asked = replace(asked, gpu_preprocess=True, vision=VisionOptions(
            compile=True, graph=v.graph or asked.vision.graph, fuse=v.fuse or asked.vision.fuse))
    return asked


def run_batch(model: MultimodalModel, engine: Engine, samples: list[Sample], lengths: list[int], *,
              random_weights: bool, max_new_tokens: int, seeds: list[int], engine_name: str,
              spec: Speculation | None = None) -> BatchResult:
    """Run ``samples`` as one batch through the five stages and measure it.

    A sample whose stage 1 or 2 fails gets an error record; the others go on. A failure in stages
    3-5 fails the whole batch (its records carry the error).

    Args:
        lengths: tokens to generate per sample (random weights; ignored otherwise).
        seeds: per-sample sampling seeds.
        spec: speculative decoding (batch 1): a draft model's stages run between prefill and decode
            as their own timed stages; decode runs the verify loop.

    Returns:
        records in the order of ``samples``.
    """
    device = model.device
    failed: dict[int, str] = {}
    clock = StageClock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    device_sync(device)
    t0 = time.perf_counter()
    clock.start()
    with clock.stage("load"):
        loaded = {}
        for i, s in enumerate(samples):
            try:
                loaded[i] = model.load(s)
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                failed[i] = failure(e)
    with clock.stage("preprocess"):
        preps = {}
        for i, ld in loaded.items():
            try:
                preps[i] = model.preprocess(ld, samples[i].query)
            except Exception as e:  # noqa: BLE001
                failed[i] = failure(e)
    ok = sorted(preps)
    decoding = engine.sampling.describe()
    quant = quantization_label(engine)
    records = [SampleRecord(sample_id=s.sample_id, model=model.name, engine=engine_name, batch_size=len(ok),
                            error=failed.get(i), decoding=decoding["decoding"], quantization=quant,
                            weight_bytes_per_step=engine.weight_bytes_per_step) for i, s in enumerate(samples)]
    if not ok:
        return BatchResult(records)
    n_new = max(lengths[i] for i in ok) if random_weights else max_new_tokens
    eos = None if random_weights else model.eos_token_id
    with clock.stage("vision"):
        vision = {i: model.encode_vision(preps[i]) for i in ok}
    with clock.stage("prefill"):
        rows = [model.build_inputs_embeds(preps[i], vision[i]) for i in ok]
        embeds, prompt_lens = stack_left_padded(rows)
        pf = engine.prefill(embeds, prompt_lens, [seeds[i] for i in ok])
    spec_stats = None
    if spec is None:
        with clock.stage("decode"):
            out = engine.decode(pf, n_new, eos)
    else:
        prep0 = preps[ok[0]]
        text_ids = prompt_text_ids(prep0.input_ids, prep0.placeholder_index)
        if spec.draft_model is not None:
            dm, ds = spec.draft_model, samples[ok[0]].draft or samples[ok[0]]
            with clock.stage("draft_load"):
                d_loaded = dm.load(ds)
            with clock.stage("draft_preprocess"):
                d_prep = dm.preprocess(d_loaded, ds.query)
            with clock.stage("draft_vision"):
                d_vision = dm.encode_vision(d_prep)
            with clock.stage("draft_prefill"):
                spec.drafter.prefill(inputs_embeds=dm.build_inputs_embeds(d_prep, d_vision))
        elif spec.text_draft:
            with clock.stage("draft_prefill"):
                spec.drafter.prefill(input_ids=text_ids)
        with clock.stage("decode"):
            out = spec.decoder.decode(pf, n_new, eos, prompt_ids=text_ids)
        spec_stats = out.stats
    e2e_ms = (time.perf_counter() - t0) * 1e3
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    stage_ms = clock.stage_ms
    gap = abs(sum(stage_ms.values()) - e2e_ms) / e2e_ms
    ttft_ms = sum(stage_ms[s] for s in STAGES[:4])
    cfg = model.lm.config
    elem = torch.finfo(model.dtype).bits // 8
    for b, i in enumerate(ok):
        n_out = min(lengths[i], out.tokens.shape[1]) if random_weights else out.n_tokens[b]
        ids = out.tokens[b, :n_out].tolist()
        rec = records[i]
        rec.load_ms, rec.preprocess_ms, rec.vision_ms, rec.prefill_ms, rec.decode_ms = (stage_ms[s] for s in STAGES)
        rec.draft_stage_ms = {s: ms for s, ms in stage_ms.items() if s.startswith("draft_")}
        rec.e2el_ms = e2e_ms
        rec.stage_gap = gap
        rec.ttft_ms = ttft_ms
        rec.tpot_ms = (e2e_ms - ttft_ms) / (n_out - 1) if n_out > 1 else None
        rec.itl_ms = list(out.step_ms[: n_out - 1])
        rec.decode_throughput_tok_s = (n_out - 1) / (stage_ms["decode"] / 1e3) if n_out > 1 and stage_ms["decode"] > 0 else None
        rec.n_images = int(preps[i].pixel_values.shape[0])
        rec.n_vision_tokens = int(vision[i].shape[0])
        rec.n_text_tokens = int(preps[i].input_ids.shape[0]) - 1
        rec.n_prefill_tokens = int(rows[b].shape[0])
        rec.n_output_tokens = n_out
        rec.kv_cache_bytes = kv_cache_bytes(cfg, rec.n_prefill_tokens + n_out - 1, 1, elem)
        rec.peak_gpu_mem_bytes = peak
        rec.output_ids = ids
        rec.output_text = model.decode_text(ids)
        rec.seed = seeds[i] if decoding["decoding"] == "sampling" else None
        rec.notes = list(preps[i].notes)
        rec.shapes = {
            **preps[i].shapes,
            "vision.features": list(vision[i].shape),
            "prefill.inputs_embeds": [len(ok), *embeds.shape[1:]],
            "prefill.kv_cache": [cfg.num_hidden_layers, 2, len(ok), cfg.num_key_value_heads, int(embeds.shape[1]), cfg.hidden_size // cfg.num_attention_heads],
            "decode.output_ids": [n_out],
        }
        if spec_stats is not None:
            records[i] = replace(rec, **spec_stats.as_record())
    return BatchResult(records)


def _batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def check_run_dir(cfg: RunConfig, run_dir: Path, resume: bool) -> None:
    """Refuse a run directory that holds another run: without ``resume``, or with a different configuration.

    Raises:
        FileExistsError: records exist and ``resume`` is False.
        InputError: ``resume`` and the recorded configuration differs (the fields named).
    """
    samples_file = run_dir / "samples.jsonl"
    if samples_file.exists() and samples_file.stat().st_size > 0 and not resume:
        raise FileExistsError(f"{run_dir}: holds a run already (samples.jsonl); pass --resume to continue it or choose another --out")
    cfg_file = run_dir / "config.json"
    if resume and cfg_file.is_file():
        try:
            recorded = json.loads(cfg_file.read_text()).get("requested", {})
        except (OSError, ValueError) as e:
            raise InputError(cfg_file, f"unreadable ({e}); cannot check that --resume continues the same run") from None
        diff = cfg.resume_diff(recorded)
        if diff:
            shown = ", ".join(f"{k} ({recorded.get(k)!r} -> {getattr(cfg, k)!r})" for k in diff)
            raise InputError(run_dir, f"--resume with a different configuration: {shown}; use another --out")


def execute(cfg: RunConfig, samples: list[Sample], run_dir: Path, *, resume: bool = False,
            progress: Callable[[int, int], None] | None = None, model: MultimodalModel | None = None,
            ctx: DistContext | None = None) -> dict[str, Any] | None:
    """Run the benchmark and write the run directory.

    Under torchrun (``ctx`` distributed) every rank runs this: the samples are sharded over the
    data-parallel ranks (round-robin, :mod:`stagewise.distributed`), each writes
    ``samples.rank<R>.jsonl`` as samples finish, and rank 0 merges them into ``samples.jsonl``
    (each sample once, in dataset order) and writes the one summary and report, with per-rank and
    total samples/s. With ``tensor_parallel_size`` > 1 the ranks of a model copy split its decoder.

    Args:
        samples: the samples to measure (before repeats).
        run_dir: output folder (``config.json``, ``samples.jsonl``, ``summary.json``, ``report.md``).
        resume: keep the records already written and run only the rest (per rank).
        progress: called with ``(done, total)`` after each batch.
        model: an already built model (tests); built from ``cfg`` otherwise.
        ctx: this process among torchrun's (:func:`stagewise.distributed.init`); default one process.

    Returns:
        the summary dict (also written to ``summary.json``); ``None`` on ranks other than 0.

    Raises:
        InputError / ValueError: bad configuration or inputs (before anything runs).
        FileExistsError: ``run_dir`` holds samples and ``resume`` is False.
    """
    from stagewise.distributed import (
        RankReport,
        barrier,
        data_parallel_summary,
        gather_devices,
        layout,
        merge_rank_files,
        rank_samples_file,
        rank_todo,
        read_rank_reports,
        tensor_parallel_group,
        write_rank_report,
    )
    from stagewise.measure.env import environment
    from stagewise.models.registry import load_model

    ctx = ctx or DistContext()
    lay = layout(ctx, cfg.tensor_parallel_size)
    run_dir = Path(run_dir)
    samples_file = run_dir / "samples.jsonl"
    check_run_dir(cfg, run_dir, resume)
    if not samples:
        raise InputError(None, "no samples to run")
    device = torch.device(ctx.device) if ctx.distributed else torch.device(cfg.device)
    random_weights = cfg.weights == "random"
    policy: OutputLenPolicy | None = parse_output_len(cfg.output_len) if random_weights else None
    expanded = [replace(s, sample_id=f"{s.sample_id}@{r}" if cfg.repeats > 1 else s.sample_id) for s in samples for r in range(cfg.repeats)]
    ids = [s.sample_id for s in expanded]
    if len(set(ids)) != len(ids):
        raise InputError(None, "sample ids are not unique: " + ", ".join(sorted({i for i in ids if ids.count(i) > 1})[:5]))
    # lengths and seeds by a sample's place in the whole run, whichever rank runs it
    lengths = {s.sample_id: (policy.length(s.sample_id, k) if policy else cfg.max_new_tokens) for k, s in enumerate(expanded)}
    seeds = {s.sample_id: row_seed(cfg.seed, s.sample_id) for s in expanded}

    t_build = time.perf_counter()
    if model is None:
        model = load_model(cfg.preset, cfg.weights, device=device, dtype=cfg.torch_dtype, tokenizer=cfg.tokenizer,
                           vision_tower=cfg.vision_tower, seed=cfg.seed)
    model.configure(resolve_stage_options(model, cfg))
    build_ms = (time.perf_counter() - t_build) * 1e3
    max_seq = min(model.max_prompt_tokens, max(1024, _round_up(model.n_vision_tokens + PROMPT_TEXT_BUDGET + max(lengths.values()) + 8, 64)))
    options = cfg.engine_options(max_batch=cfg.batch_size, max_seq=max_seq)
    if lay.tensor_parallel_size > 1:
        from stagewise.engine.parallel import TensorParallel

        tp = TensorParallel.from_group(tensor_parallel_group(ctx, lay), all_reduce=cfg.all_reduce)
        options = replace(options, tensor_parallel=tp)
    engine = make_engine(cfg.engine, model.lm, options)
    spec = build_speculation(cfg, model, engine, max_new_tokens=max(lengths.values()),
                             prompt_bound=model.n_vision_tokens + PROMPT_TEXT_BUDGET)
    devices = gather_devices(ctx)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "requested": _jsonable(asdict(cfg)),
            "applied": {"stages": model.describe()["applied"], "engine": engine_facts(engine), "decoding": engine.sampling.describe(),
                        "speculative": None if spec is None else speculation_facts(spec)},
            "model": model.name, "architecture": model.describe(), "env": environment(device),
            "world_size": ctx.world_size, "data_parallel_size": lay.dp_size, "rank_devices": devices,
            "n_samples": len(expanded), "max_seq": max_seq,
        }
        write_json(run_dir / "config.json", config)
    barrier(ctx)

    if ctx.distributed:
        todo = rank_todo(expanded, run_dir, ctx, layout=lay)
        out_file = rank_samples_file(run_dir, lay.dp_rank)
    else:
        done: set[str] = set()
        if resume and samples_file.exists():
            kept = read_samples(samples_file)  # drops a line torn by a crash mid-write
            samples_file.write_text("".join(r.to_json() + "\n" for r in kept), encoding="utf-8")
            done = {r.sample_id for r in kept}
        todo = [s for s in expanded if s.sample_id not in done]
        out_file = samples_file

    def batch_of(batch: list[Sample]) -> BatchResult:
        return run_batch(model, engine, batch, [lengths[s.sample_id] for s in batch], random_weights=random_weights,
                         max_new_tokens=cfg.max_new_tokens, seeds=[seeds[s.sample_id] for s in batch], engine_name=cfg.engine,
                         spec=spec)

    # Timed cold start: engine warm-up (compile, CUDA-graph capture for every batch size the run
    # will use and every KV-length bucket from the shortest possible prefill), then warm-up
    # batches of the real samples. None of it is recorded.
    device_sync(device)
    t_warm = time.perf_counter()
    warm_src = todo or expanded
    sizes = {min(cfg.batch_size, len(warm_src))}
    if len(warm_src) % cfg.batch_size:
        sizes.add(len(warm_src) % cfg.batch_size)
    engine.warmup(max(1, model.n_vision_tokens), None, sorted(sizes))
    s0 = warm_src[0]
    try:
        prep = model.preprocess(model.load(s0), s0.query)
        s_len = int(model.build_inputs_embeds(prep, model.encode_vision(prep)).shape[0])
        engine.warmup(s_len, None, sorted(sizes))
        if spec is not None:
            warm_speculation(spec, s0, prep, s_len, max(lengths.values()), cfg.num_speculative_tokens)
    except Exception:  # noqa: BLE001 - a bad first sample is recorded by the measured loop
        pass
    for _ in range(cfg.warmup):
        for size in sorted(sizes):
            batch_of(warm_src[:size])
    device_sync(device)
    warmup_ms = (time.perf_counter() - t_warm) * 1e3

    barrier(ctx)  # the measured loops start together
    t_loop = time.perf_counter()
    n_ok = n_failed = 0
    rank_error: str | None = None
    writer = SampleWriter(out_file) if lay.writes_records else None
    try:
        n_done = 0
        for batch in _batches(todo, cfg.batch_size):
            try:
                res = batch_of(batch)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001 - stages 3-5 failed for the batch: recorded, go on
                msg = failure(e)
                res = BatchResult([SampleRecord(sample_id=s.sample_id, model=model.name, engine=cfg.engine, error=msg) for s in batch])
            for rec in res.records:
                if writer is not None:
                    writer.write(rec)
                n_ok, n_failed = n_ok + rec.ok, n_failed + (not rec.ok)
            n_done += len(batch)
            if progress:
                progress(n_done, len(todo))
    except BaseException as e:
        rank_error = failure(e)
        raise
    finally:
        if writer is not None:
            writer.close()
        if ctx.distributed and lay.writes_records:
            write_rank_report(run_dir, RankReport(rank=lay.dp_rank, device=str(device), n_samples=len(todo), n_ok=n_ok,
                                                  n_failed=n_failed, wall_s=time.perf_counter() - t_loop, error=rank_error))
    loop_s = time.perf_counter() - t_loop
    barrier(ctx)
    if not ctx.is_main:
        return None

    dp = None
    if ctx.distributed:
        report = merge_rank_files(run_dir, ids, world_size=lay.dp_size)
        dp = data_parallel_summary(read_rank_reports(run_dir, lay.dp_size), lay.dp_size)
        dp["merge"] = report.describe()
    records = read_samples(samples_file)
    summary = summarize(records)
    if dp is not None:
        summary["data_parallel"] = dp
    if dp is None:  # the measured loop, wall clock (records written included)
        summary["loop_s"] = loop_s
        summary["loop_request_throughput_req_s"] = (n_ok / loop_s) if loop_s > 0 else None
    else:  # data parallel: the slowest rank's loop (the makespan), all ranks' samples over it
        summary["loop_s"] = dp.get("makespan_s")
        summary["loop_request_throughput_req_s"] = dp.get("samples_per_s")
    summary["warmup_ms"] = warmup_ms
    summary["engine_warmup_ms"] = engine.warmup_ms
    summary["model_build_ms"] = build_ms
    ceilings = measure_ceilings(device) if cfg.measure_ceilings else {}
    summary["ceilings"] = ceilings
    ok = [r for r in records if r.ok]
    if ok and ceilings:
        means = {k: sum(getattr(r, k) or 0 for r in ok) / len(ok) for k in ("n_prefill_tokens", "n_output_tokens", "batch_size", "n_images")}
        summary["floors"] = stage_floors(model, means, ceilings, weight_bytes=engine.weight_bytes_per_step)
    write_json(run_dir / "summary.json", summary)
    from stagewise.results.report import write_report

    write_report(run_dir)
    return summary


def warm_speculation(spec: Speculation, sample: Sample, prep: Any, prompt_len: int, max_new_tokens: int, k: int) -> None:
    """Capture the verify graphs of the target and the draft engine's graphs for this run's
    lengths (the time goes to the engines' ``warmup_ms``)."""
    from stagewise.engine.speculative import DraftModelDrafter

    spec.decoder.warmup(prompt_len, max_new_tokens)
    if not isinstance(spec.drafter, DraftModelDrafter):
        return
    if spec.draft_model is not None:
        dm, ds = spec.draft_model, sample.draft or sample
        d_prep = dm.preprocess(dm.load(ds), ds.query)
        d_len = int(dm.build_inputs_embeds(d_prep, dm.encode_vision(d_prep)).shape[0])
    else:
        d_len = int(prompt_text_ids(prep.input_ids, prep.placeholder_index).shape[1])
    spec.drafter.warmup(d_len, max_new_tokens, k)


def speculation_facts(spec: Speculation) -> dict[str, Any]:
    """What speculative decoding applied (method, k, drafter settings), for ``config.json``."""
    facts: dict[str, Any] = {"method": spec.drafter.name, "num_speculative_tokens": spec.decoder.k}
    describe = getattr(spec.drafter, "describe", None)
    if describe is not None:
        facts.update(describe())
    if spec.draft_model is not None:
        facts["draft_model"] = spec.draft_model.describe()["preset"] or spec.draft_model.describe()["source"]
    return facts


def engine_facts(engine: Engine) -> dict[str, Any]:
    """What the engine applied on this device (compile, graphs, matvec, quantization...), for ``config.json``."""
    from stagewise.engine.fast import FastEngine

    facts: dict[str, Any] = {"name": engine.name, "weight_bytes_per_step": engine.weight_bytes_per_step}
    if isinstance(engine, FastEngine):
        facts.update(compiled=engine.compiled, cuda_graphs=engine.use_graphs, prefill_graphs=engine.prefill_graphs,
                     deterministic_attention=engine.deterministic, step_attention=engine.step_attention, autotune=engine.autotune,
                     matvec=engine.matvec, matvec_kernel=engine.matvec_kernel, kv_bucket=engine.kv_bucket, check_every=engine.check_every,
                     max_batch=engine.max_batch, max_seq=engine.max_seq, quantization=engine.quant_info)
    return facts


def quantization_label(engine: Engine) -> str:
    """``"none"``, or ``"int4-g128"`` / ``"int8"`` / ``"fp8"`` (what the engine applied)."""
    from stagewise.engine.fast import FastEngine

    if not isinstance(engine, FastEngine) or engine.quant_info is None:
        return "none"
    q = engine.quant_info
    return f"{q['kind']}-g{q['group_size']}" if q.get("group_size") else str(q["kind"])
