"""The benchmark scenario: drive any model through the five stages, sample by sample.

Flow: discover samples -> build model + engine -> timed cold start (engine warm-up,
compile, graph capture: ``warmup_ms``) -> warm-up samples (run, not recorded) -> the
measured loop, one batch at a time, each record appended to ``samples.jsonl`` as soon as
its batch finishes -> ``summary.json`` (+ floors) -> ``report.md``.

The loop never knows which model it drives (``stagewise.models.base.MultimodalModel``).
A sample that fails (bad file, corrupt video) gets a record with ``error`` set and the
run goes on. ``--resume`` skips the samples already in ``samples.jsonl``.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from stagewise import STAGES
from stagewise.measure.costmodel import kv_cache_bytes, measure_ceilings, stage_floors
from stagewise.engine import make_engine
from stagewise.engine.fast import FastOptions
from stagewise.engine.base import stack_left_padded
from stagewise.errors import InputError
from stagewise.models.base import Sample
from stagewise.config import OutputLenPolicy, parse_output_len
from stagewise.results.records import SampleRecord, SampleWriter, read_samples, write_json
from stagewise.results.summary import summarize
from stagewise.measure.timing import StageClock, device_sync

STAGE_SUM_TOLERANCE = 0.02
"""Stage times must add up to the independently measured end-to-end time within 2 %."""


@dataclass
class RunConfig:
    """Everything a run needs; validated in ``__post_init__`` (ValueError naming the field).

    Attributes:
        preset: model preset (``eventgpt-tiny``, ``eventgpt-7b``, ``video-llava-7b``, ...).
        weights: ``"random"`` or a checkpoint folder.
        engine: ``"hf"`` or ``"fast"``.
        device / dtype: torch names (``"cuda"``, ``"bfloat16"``).
        batch_size: samples per prefill/decode batch.
        output_len: ``fixed:N`` / ``mean:X`` / ``trace:FILE`` (random weights only).
        max_new_tokens: the cap with real weights (stop at EOS before it).
        warmup: warm-up passes over the first sample(s), not recorded.
        repeats: each sample is measured this many times (ids ``<id>@<r>``).
        window: window streams of >= 100 ms to their first 100 ms instead of refusing them.
        gpu_preprocess: stage 2 with torch on the device.
        fuse_vision: EventGPT's pool-before-linear vision path.
        vision_graph: EventGPT's stage 3 replayed from a CUDA graph (CUDA only).
        vision_compile: EventGPT's tower through one compiled layer function.
        measure_ceilings: measure copy bandwidth and bf16 matmul rate (CUDA) for the floors.
    """

    preset: str | None = "eventgpt-tiny"
    weights: str = "random"
    engine: str = "hf"
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 1
    output_len: str = "fixed:46"
    max_new_tokens: int = 512
    warmup: int = 1
    repeats: int = 1
    window: bool = False
    gpu_preprocess: bool = False
    fuse_vision: bool = False
    vision_graph: bool = False
    vision_compile: bool = False
    measure_ceilings: bool = True
    tokenizer: str | None = None
    vision_tower: str | None = None
    seed: int = 0
    input_format: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.engine not in ("hf", "fast"):
            raise ValueError(f"engine: expected hf or fast, got {self.engine!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.warmup < 0 or self.repeats < 1:
            raise ValueError("warmup must be >= 0 and repeats >= 1")
        if not hasattr(torch, self.dtype) or not isinstance(getattr(torch, self.dtype), torch.dtype):
            raise ValueError(f"dtype: unknown torch dtype {self.dtype!r}")
        if self.weights == "random":
            parse_output_len(self.output_len)

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a ``torch.dtype``."""
        return getattr(torch, self.dtype)


@dataclass
class BatchResult:
    """One measured batch: its records (in sample order)."""

    records: list[SampleRecord]


def configure_model(model: Any, cfg: RunConfig) -> None:
    """Apply run options the model family understands (EventGPT: window, GPU stage 2, fused vision)."""
    for name in ("window", "gpu_preprocess", "fuse_vision", "vision_graph", "vision_compile"):
        if hasattr(model, name):
            setattr(model, name, getattr(cfg, name))


def run_batch(model: Any, engine: Any, samples: list[Sample], lengths: list[int], *, random_weights: bool, max_new_tokens: int, engine_name: str) -> BatchResult:
    """Run ``samples`` as one batch through the five stages and measure it.

    Samples whose stage 1 or 2 fails get an error record; the others go on.

    Args:
        lengths: tokens to generate per sample (random weights; ignored otherwise).

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
            except (InputError, ValueError, OSError) as e:
                failed[i] = str(e)
    with clock.stage("preprocess"):
        preps = {}
        for i, ld in loaded.items():
            try:
                preps[i] = model.preprocess(ld, samples[i].query)
            except (InputError, ValueError, OSError) as e:
                failed[i] = str(e)
    ok = sorted(preps)
    records = [SampleRecord(sample_id=s.sample_id, model=model.name, engine=engine_name, batch_size=len(ok), error=failed.get(i)) for i, s in enumerate(samples)]
    if not ok:
        return BatchResult(records)
    n_new = max(lengths[i] for i in ok) if random_weights else max_new_tokens
    eos = None if random_weights else model.eos_token_id
    with clock.stage("vision"):
        vision = {i: model.encode_vision(preps[i]) for i in ok}
    with clock.stage("prefill"):
        rows = [model.build_inputs_embeds(preps[i], vision[i]) for i in ok]
        embeds, prompt_lens = stack_left_padded(rows)
        pf = engine.prefill(embeds, prompt_lens)
    with clock.stage("decode"):
        out = engine.decode(pf, n_new, eos)
    e2e_ms = (time.perf_counter() - t0) * 1e3
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    stage_ms = clock.stage_ms
    gap = abs(sum(stage_ms.values()) - e2e_ms) / e2e_ms
    steps = sorted(out.step_ms)
    cfg = model.lm.config
    elem = torch.finfo(model.dtype).bits // 8
    for b, i in enumerate(ok):
        n_out = min(lengths[i], out.tokens.shape[1]) if random_weights else out.n_tokens[b]
        ids = out.tokens[b, :n_out].tolist()
        n_text = int((preps[i].input_ids >= 0).sum())
        n_vis = int(vision[i].shape[0])
        rec = records[i]
        for s in STAGES:
            setattr(rec, f"{s}_ms", stage_ms[s])
        rec.e2e_ms = e2e_ms
        rec.stage_gap = gap
        rec.ttft_ms = sum(stage_ms[s] for s in STAGES[:4])
        rec.tpot_ms = stage_ms["decode"] / (out.tokens.shape[1] - 1) if out.tokens.shape[1] > 1 else None
        rec.itl_p50_ms = steps[len(steps) // 2] if steps else None
        rec.itl_p99_ms = steps[min(len(steps) - 1, int(0.99 * len(steps)))] if steps else None
        rec.decode_tok_s = (n_out - 1) / (stage_ms["decode"] / 1e3) if n_out > 1 and stage_ms["decode"] > 0 else None
        rec.n_images = int(preps[i].pixel_values.shape[0])
        rec.n_vision_tokens, rec.n_text_tokens = n_vis, n_text
        rec.n_prefill_tokens = int(rows[b].shape[0])
        rec.n_output_tokens = n_out
        rec.kv_cache_bytes = kv_cache_bytes(cfg, rec.n_prefill_tokens + n_out - 1, 1, elem)
        rec.peak_gpu_mem_bytes = peak
        rec.output_ids = ids
        rec.output_text = model.decode_text(ids)
        rec.shapes = {
            **preps[i].shapes,
            "vision.features": list(vision[i].shape),
            "prefill.inputs_embeds": [len(ok), *embeds.shape[1:]],
            "prefill.kv_cache": [cfg.num_hidden_layers, 2, len(ok), cfg.num_key_value_heads, int(embeds.shape[1]), cfg.hidden_size // cfg.num_attention_heads],
            "decode.output_ids": [n_out],
        }
    return BatchResult(records)


def _batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def execute(cfg: RunConfig, samples: list[Sample], run_dir: Path, *, resume: bool = False, progress: Callable[[int, int], None] | None = None, model: Any = None) -> dict[str, Any]:
    """Run the benchmark and write the run directory.

    Args:
        samples: the samples to measure (before repeats).
        run_dir: output folder (``config.json``, ``samples.jsonl``, ``summary.json``, ``report.md``).
        resume: keep the records already in ``samples.jsonl`` and run only the rest.
        progress: called with ``(done, total)`` after each batch.
        model: an already built model (tests); built from ``cfg`` otherwise.

    Returns:
        the summary dict (also written to ``summary.json``).

    Raises:
        InputError / ValueError: bad configuration or inputs (before anything runs).
        FileExistsError: ``run_dir`` holds samples and ``resume`` is False.
    """
    from stagewise.measure.env import environment
    from stagewise.models.registry import load_model

    run_dir = Path(run_dir)
    samples_file = run_dir / "samples.jsonl"
    if samples_file.exists() and not resume and samples_file.stat().st_size > 0:
        raise FileExistsError(f"{run_dir}: holds a run already (samples.jsonl); pass --resume to continue it or choose another --out")
    if not samples:
        raise InputError(None, "no samples to run")
    device = torch.device(cfg.device)
    random_weights = cfg.weights == "random"
    policy: OutputLenPolicy | None = parse_output_len(cfg.output_len) if random_weights else None
    expanded = [Sample(**{**s.__dict__, "sample_id": f"{s.sample_id}@{r}" if cfg.repeats > 1 else s.sample_id}) for s in samples for r in range(cfg.repeats)]
    ids = [s.sample_id for s in expanded]
    if len(set(ids)) != len(ids):
        raise InputError(None, "sample ids are not unique: " + ", ".join(sorted({i for i in ids if ids.count(i) > 1})[:5]))
    lengths = {s.sample_id: (policy.length(s.sample_id, k) if policy else cfg.max_new_tokens) for k, s in enumerate(expanded)}

    t_build = time.perf_counter()
    if model is None:
        model = load_model(cfg.preset, cfg.weights, device=device, dtype=cfg.torch_dtype, tokenizer=cfg.tokenizer, vision_tower=cfg.vision_tower, seed=cfg.seed)
    configure_model(model, cfg)
    build_ms = (time.perf_counter() - t_build) * 1e3
    max_seq = max(1024, _round_up(model_prompt_bound(model) + max(lengths.values()) + 8, 64))
    engine = make_engine(cfg.engine, model.lm, FastOptions(max_batch=cfg.batch_size, max_seq=max_seq) if cfg.engine == "fast" else None)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {**asdict(cfg), "model": model.name, "architecture": model.describe(), "env": environment(device), "n_samples": len(expanded), "max_seq": max_seq}
    write_json(run_dir / "config.json", config)

    done: set[str] = set()
    if resume and samples_file.exists():
        kept = read_samples(samples_file)  # drops a line torn by a crash mid-write
        samples_file.write_text("".join(r.to_json() + "\n" for r in kept), encoding="utf-8")
        done = {r.sample_id for r in kept}
    todo = [s for s in expanded if s.sample_id not in done]

    # Timed cold start: engine warm-up (compile, CUDA-graph capture for every batch size the
    # run will use and every KV-length bucket from the shortest possible prefill), then
    # warm-up batches of the real samples. None of it is recorded.
    device_sync(device)
    t_warm = time.perf_counter()
    warm_src = todo or expanded
    sizes = {min(cfg.batch_size, len(warm_src))}
    if len(warm_src) % cfg.batch_size:
        sizes.add(len(warm_src) % cfg.batch_size)
    if hasattr(engine, "warmup"):
        # Decode graphs for every KV bucket from the shortest possible prefill (the vision
        # tokens alone) up, then the prefill graph of the first sample's real length.
        engine.warmup(max(1, int(getattr(model, "n_vision_tokens", 1) or 1)), None, batch_sizes=sorted(sizes))
        s0 = warm_src[0]
        try:
            prep = model.preprocess(model.load(s0), s0.query)
            engine.warmup(int(model.build_inputs_embeds(prep, model.encode_vision(prep)).shape[0]), None, batch_sizes=sorted(sizes))
        except (InputError, ValueError, OSError):
            pass  # a bad first sample is recorded by the measured loop
    for _ in range(cfg.warmup):
        for size in sorted(sizes):
            batch = warm_src[:size]
            run_batch(model, engine, batch, [lengths[s.sample_id] for s in batch], random_weights=random_weights, max_new_tokens=cfg.max_new_tokens, engine_name=cfg.engine)
    device_sync(device)
    warmup_ms = (time.perf_counter() - t_warm) * 1e3

    with SampleWriter(samples_file) as writer:
        n_done = 0
        for batch in _batches(todo, cfg.batch_size):
            try:
                res = run_batch(model, engine, batch, [lengths[s.sample_id] for s in batch], random_weights=random_weights, max_new_tokens=cfg.max_new_tokens, engine_name=cfg.engine)
            except (InputError, ValueError) as e:
                res = BatchResult([SampleRecord(sample_id=s.sample_id, model=model.name, engine=cfg.engine, error=str(e)) for s in batch])
            except torch.cuda.OutOfMemoryError as e:  # record and go on
                res = BatchResult([SampleRecord(sample_id=s.sample_id, model=model.name, engine=cfg.engine, error=f"CUDA out of memory: {e}".splitlines()[0]) for s in batch])
            for rec in res.records:
                writer.write(rec)
            n_done += len(batch)
            if progress:
                progress(n_done, len(todo))

    records = read_samples(samples_file)
    summary = summarize(records)
    summary["warmup_ms"] = warmup_ms
    summary["engine_warmup_ms"] = getattr(engine, "warmup_ms", 0.0)
    summary["model_build_ms"] = build_ms
    ceilings = measure_ceilings(device) if cfg.measure_ceilings else {}
    summary["ceilings"] = ceilings
    ok = [r for r in records if r.ok]
    if ok and ceilings:
        means = {k: sum(getattr(r, k) or 0 for r in ok) / len(ok) for k in ("n_prefill_tokens", "n_output_tokens", "batch_size", "n_images")}
        summary["floors"] = stage_floors(model, means, ceilings)
    write_json(run_dir / "summary.json", summary)
    from stagewise.results.report import write_report

    write_report(run_dir)
    return summary


def model_prompt_bound(model: Any) -> int:
    """An upper bound of the prefill length: vision tokens + a generous text budget."""
    n_vis = getattr(model, "n_vision_tokens", 0) or 0
    return int(n_vis) + 256


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def format_exception(e: BaseException) -> str:
    """One line for a user-facing failure (InputError / ValueError), else the traceback."""
    if isinstance(e, (InputError, ValueError, FileExistsError)):
        return str(e)
    return "".join(traceback.format_exception(e))
