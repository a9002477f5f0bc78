"""Issue 10: the speculative-decoding ENGINE's costs, one process, EventGPT-7B shapes.

With random weights a drafter's acceptance means nothing (and random-weight outputs are
repetitive, so prompt lookup would look good for no reason), so this measures the engine, not a
model. Every acceptance-dependent figure below is the engine's cost AT A CONTROLLED ACCEPTANCE,
never a speed-up of EventGPT. With real weights (``--weights``, ``--draft-model``) the same
command also reports the real acceptance of prompt lookup and of the draft LM.

Sections (bf16, batch 1, the prompt of one real sample through EventGPT's own stages 1-4:
582 vision + the text tokens; 46 new tokens; medians):

(a) verify step: one forward of ``k + 1`` tokens (``FastEngine.extend``, CUDA-graph replay) for
    k = 1..8, against one decode step (the plain engine's per-step CUDA-event time), at the middle
    of the generation's KV length.
(b) the replay drafter (the target's own greedy continuation with errors injected per position
    with probability ``1 - alpha``, seeded): ms per output token and the sample end to end at mean
    accepted lengths 3.0 and 4.3 and a sweep, plain decoding alongside. The reference is made
    self-consistent first: bf16 verify steps (GEMMs over k + 1 rows) and decode steps (GEMVs) round
    differently, and these flat random-weight logits have near-ties, so plain decoding's ids are not
    exactly what verification computes. The reference is replaced by the speculative run's own
    output until a run reproduces it (a fixed point; each pass moves the first disagreement later),
    so that every draft that is not an injected error is accepted and the acceptance is the one set.
(c) the 68M draft LM (``llama-68m`` preset, its own engine and CUDA graphs): its step time
    (graph replay of one token) and per draft token inside a round; the ms per output token with
    it doing its real work while the proposals come from the replay drafter (controlled
    acceptance), and the cost model ``(draft round + verify round) / E[tokens per step](alpha, k)``.
(d) prompt lookup (``ngram``): its cost per round.
(e) agreement: prompt lookup's greedy ids against plain greedy ids in this dtype, and where they
    part, the plain engine's top-2 logit margin (a near-tie, or not).

Usage (GPU): ``python3 benchmarks/speculative.py --out $OUT/spec.json``
Smoke test (CPU, tiny shapes): ``python3 benchmarks/speculative.py --smoke``
Prints the target table last; writes the JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from stagewise.engine.fast import FastEngine, FastOptions
from stagewise.engine.speculative import (
    Draft,
    DraftModelDrafter,
    DraftStart,
    NgramDrafter,
    ReplayDrafter,
    SpeculativeOutput,
    alpha_for_accepted_length,
    expected_accepted_length,
    prompt_text_ids,
    speculative_decode,
)
from stagewise.measure.env import environment
from stagewise.measure.timing import StageClock, StepTimer, device_sync
from stagewise.models.base import Sample
from stagewise.models.draft import check_vocab, load_draft
from stagewise.models.family import StageOptions
from stagewise.models.registry import SHARED_DATA_ENV as TOKENIZER_ENV
from stagewise.models.registry import load_model
from stagewise.models.vision import VisionOptions
from stagewise.preprocess.prompt import DEFAULT_QUERY

K_MAX = 8
HEADLINE = {3.0: (4, 8), 4.3: (6, 8)}  # mean accepted length -> the k values measured there
SWEEP = {1.5: 2, 2.0: 3, 2.5: 3, 3.0: 4, 3.5: 5, 4.3: 6, 5.0: 7}  # mean accepted length -> k
SMOKE_SWEEP = {2.0: 3}
TARGETS = {
    "verify_k4_over_decode": ("verify step k=4 / decode step", "<= 1.08x"),
    "verify_k8_over_decode": ("verify step k=8 / decode step", "<= 1.15x"),
    "replay_m3.0_ms_per_token": ("ms/token at m=3.0, replay drafter", "<= 2.0"),
    "draft_lm_m3.0_ms_per_token": ("ms/token at m=3.0, {draft} drafting", "<= 2.3"),
    "draft_lm_m3.0_cost_model_ms_per_token": ("  same, cost model from (a)+(c)", "<= 2.3"),
    "replay_m4.3_ms_per_token": ("ms/token at m=4.3, replay drafter", "<= 1.45"),
    "draft_lm_step_ms": ("{draft} draft step, graph replay (ms)", "<= 0.15"),
    "e2e_m3.0_ms": ("one sample, {new} tokens, m=3.0, e2e (ms)", "<= 120"),
    "e2e_plain_ms": ("  same, plain decoding (ms)", "(today 260)"),
    "e2e_draft_lm_m3.0_ms": ("  same, {draft} drafting (ms)", ""),
}


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def wall(fn, device: torch.device) -> tuple[float, Any]:
    """Wall ms of ``fn()`` with the device synchronized on both sides."""
    device_sync(device)
    t0 = time.perf_counter()
    out = fn()
    device_sync(device)
    return (time.perf_counter() - t0) * 1e3, out


def shared_file(relative: str) -> Path | None:
    """A file of the shared data: ``$STAGEWISE_SHARED_DATA``, ``<repo>/shared/data`` or
    ``<repo>/../shared/data``, the first that has it."""
    here = Path(__file__).resolve().parents
    roots = [Path(os.environ[TOKENIZER_ENV])] if os.environ.get(TOKENIZER_ENV) else []
    roots += [here[1] / "shared" / "data", here[2] / "shared" / "data"]
    return next((r / relative for r in roots if (r / relative).is_file()), None)


def default_sample(path: Path | None) -> Sample:
    """The real EventGPT sample when present (``--events`` or the shared data), else a simulated one."""
    for p in (path, shared_file("events/eventgpt_sample1.npy")):
        if p is not None and p.is_file():
            return Sample(p.stem, DEFAULT_QUERY, events_path=p)
    from stagewise.inputs.simulate import moving_edge_events

    return Sample("sim000", DEFAULT_QUERY, events=moving_edge_events(seed=0))


def fast_stages(model) -> StageOptions:
    """Apply stagewise's fast stage 2/3 paths (as ``--fast-stages``: every one the model and device
    can serve) and return what was applied."""
    applied = model.applicable(StageOptions(gpu_preprocess=True, vision=VisionOptions(compile=True, graph=True, fuse=True)))
    model.configure(applied)
    return applied


class Bench:
    """The target, its engine and the sample's prompt, shared by all sections."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.smoke = args.smoke
        self.device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
        self.dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        self.new = args.new_tokens
        self.repeats = args.repeats
        preset = "eventgpt-tiny" if args.smoke else "eventgpt-7b"
        tok = args.tokenizer or (None if args.smoke else shared_file("tokenizers/llama2/tokenizer.model"))
        self.random_weights = args.weights is None
        self.model = load_model(preset if self.random_weights else None, args.weights or "random", device=self.device,
                                dtype=self.dtype, tokenizer=None if tok is None else str(tok))
        self.stage_options = fast_stages(self.model)
        self.sample = default_sample(args.events)
        self.stages()  # the first call compiles / captures stage 3; the prompt is the steady-state one
        prep, row = self.stages()
        self.prompt_ids = prompt_text_ids(prep.input_ids, prep.placeholder_index)  # [1, S_text]
        self.row = row[None]  # [1, S, D]
        self.S = row.shape[0]
        self.max_seq = self.S + self.new + K_MAX + 64
        t0 = time.perf_counter()
        self.engine = FastEngine(self.model.lm, FastOptions(max_batch=1, max_seq=self.max_seq))
        self.engine.warmup(self.S, self.new, batch_sizes=[1])
        self.engine.warmup_extend(self.S, self.new, [k + 1 for k in range(1, K_MAX + 1)])
        self.warmup_s = time.perf_counter() - t0
        self.vocab = self.engine.dims.vocab
        self._references: dict[tuple, tuple] = {}

    def stages(self):
        """Stages 1-3 and the splice of stage 4 for the sample: ``(Prepared, row [S, D])``."""
        m = self.model
        prep = m.preprocess(m.load(self.sample), self.sample.query)
        return prep, m.build_inputs_embeds(prep, m.encode_vision(prep))

    def prefill(self):
        return self.engine.prefill(self.row, [self.S])

    def plain(self):
        return self.engine.decode(self.prefill(), self.new, None)

    def spec(self, drafter, k: int, before=None) -> tuple[SpeculativeOutput, float]:
        """One speculative decode after a fresh prefill; returns it and its decode wall time (ms)."""
        if before is not None:
            before()
        pre = self.prefill()
        ms, out = wall(lambda: speculative_decode(self.engine, pre, drafter, k, self.new, None, prompt_ids=self.prompt_ids), self.device)
        return out, ms

    def e2e(self, run, draft_prefill=None) -> tuple[float, dict[str, float]]:
        """One sample through stages 1-5 (``StageClock``, as the runner times them): ``run(prefill)``
        is stage 5; ``draft_prefill(prepared)``, if given, a stage of its own after the prefill."""
        m, clock = self.model, StageClock(self.device)
        clock.start()
        with clock.stage("load"):
            loaded = m.load(self.sample)
        with clock.stage("preprocess"):
            prep = m.preprocess(loaded, self.sample.query)
        with clock.stage("vision"):
            vision = m.encode_vision(prep)
        with clock.stage("prefill"):
            pre = self.engine.prefill(m.build_inputs_embeds(prep, vision)[None], [self.S])
        if draft_prefill is not None:
            with clock.stage("draft_prefill"):
                draft_prefill(prep)
        with clock.stage("decode"):
            run(pre)
        return clock.elapsed_ms(), dict(clock.stage_ms)


# ----------------------------------------------------------------------------------------------
# (a) verify step vs decode step


def median_call_ms(device: torch.device, fn, calls: int) -> float:
    """Median ms of ``calls`` back-to-back calls of ``fn`` (``StepTimer``: CUDA events between calls,
    one sync at the end)."""
    timer = StepTimer(device)
    timer.mark()
    for _ in range(calls):
        fn()
        timer.mark()
    device_sync(device)
    return median(timer.intervals_ms())


def verify_times(b: Bench, eng: FastEngine, ks: list[int]) -> dict[int, float]:
    """Median CUDA-event time of one verify step (``extend`` of ``k + 1`` tokens, graph replay)
    per ``k``, at the middle of the generation's KV length."""
    out = {}
    for k in ks:
        eng.prefill(b.row, [b.S])
        eng.advance(b.new // 2)  # (the K/V there is stale: timing only)
        tokens = torch.zeros(1, k + 1, dtype=torch.long, device=b.device)
        out[k] = median_call_ms(b.device, lambda t=tokens: eng.extend(t), max(10, 4 * b.repeats))
    return out


def section_verify(b: Bench, matvec_ks: list[int]) -> dict:
    steps = []
    for _ in range(max(2, b.repeats // 2)):
        steps += b.plain().step_ms
    decode_ms = median(steps)
    verify = verify_times(b, b.engine, list(range(1, K_MAX + 1)))
    out = {"decode_step_ms": decode_ms, "verify_step_ms": verify, "at_kv_slot": b.S + b.new // 2,
           "verify_over_decode": {k: ms / decode_ms for k, ms in verify.items()}}
    if matvec_ks:  # the variant: weight-major compiled reductions instead of cuBLAS (FastOptions.extend_matvec)
        t0 = time.perf_counter()
        eng = FastEngine(b.model.lm, FastOptions(max_batch=1, max_seq=b.max_seq, extend_matvec=True))
        eng.warmup_extend(b.S, b.new, [k + 1 for k in matvec_ks])
        warm_s = time.perf_counter() - t0
        mv = verify_times(b, eng, matvec_ks)
        out["extend_matvec"] = {"verify_step_ms": mv, "verify_over_decode": {k: ms / decode_ms for k, ms in mv.items()},
                                "warmup_s": warm_s}
        del eng
        if b.device.type == "cuda":
            torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------------------------
# (b) replay drafter at controlled acceptance


def calibrated_reference(b: Bench, k: int, error_rate: float, seed: int, max_passes: int = 12) -> tuple[torch.Tensor, int, bool]:
    """The fixed point described in the module docstring: ``(reference [T], passes, converged)``
    (cached per configuration)."""
    key = (k, error_rate, seed)
    if key not in b._references:
        b._references[key] = _calibrate(b, k, error_rate, seed, max_passes)
    return b._references[key]


def _calibrate(b: Bench, k: int, error_rate: float, seed: int, max_passes: int) -> tuple[torch.Tensor, int, bool]:
    ref = b.plain().tokens[0].to(b.device)
    for p in range(1, max_passes + 1):
        out, _ = b.spec(ReplayDrafter(ref, error_rate=error_rate, vocab_size=b.vocab, seed=seed), k)
        got = out.tokens[0].to(b.device)
        if torch.equal(got, ref):
            return ref, p, True
        ref = got
    return ref, max_passes, False


def replay_point(b: Bench, m: float, k: int, *, e2e: bool = False) -> dict:
    """ms per output token (and optionally the sample end to end) at mean accepted length ``m``."""
    alpha = alpha_for_accepted_length(m, k)
    ms_tok, lengths, rates, passes, converged, rounds, e2es, e2e_lengths = [], [], [], [], [], [], [], []
    for seed in range(b.repeats):
        ref, n_pass, ok = calibrated_reference(b, k, 1.0 - alpha, seed)
        passes.append(n_pass)
        converged.append(ok)
        drafter = ReplayDrafter(ref, error_rate=1.0 - alpha, vocab_size=b.vocab, seed=seed)
        out, ms = b.spec(drafter, k)
        ms_tok.append(ms / (out.n_tokens[0] - 1))
        lengths.append(out.stats.mean_accepted_length)
        rates.append(out.stats.acceptance_rate)
        rounds.append((out.stats.draft_ms + out.stats.verify_ms) / out.stats.n_verify_steps)
        if e2e:
            def run(pre, ref=ref, seed=seed):
                d = ReplayDrafter(ref, error_rate=1.0 - alpha, vocab_size=b.vocab, seed=seed)
                e2e_lengths.append(speculative_decode(b.engine, pre, d, k, b.new, None).stats.mean_accepted_length)

            e2es.append(b.e2e(run)[0])
    res = {
        "k": k, "alpha": alpha, "target_mean_accepted_length": m,
        "mean_accepted_length": statistics.mean(lengths), "acceptance_rate": statistics.mean(rates),
        "ms_per_token": median(ms_tok), "ms_per_token_at_target_length": median(rounds) / m,
        "round_ms": median(rounds), "calibration_passes": passes, "calibrated": all(converged),
    }
    if e2e:  # (the sample's prompt through stages 1-4 again: the same ids only if bit-identical)
        res["e2e_ms"] = median(e2es)
        res["e2e_mean_accepted_length"] = statistics.mean(e2e_lengths)
    return res


def section_replay(b: Bench, sweep: bool = True) -> dict:
    plain_tpot = median([median(b.plain().step_ms) for _ in range(b.repeats)])
    out: dict = {"plain_tpot_ms": plain_tpot, "headline": {}, "sweep": []}
    for m, ks in HEADLINE.items():
        out["headline"][m] = [replay_point(b, m, k, e2e=(m == 3.0 and k == ks[0])) for k in ks]
    for m, k in ({} if not sweep else SMOKE_SWEEP if b.smoke else SWEEP).items():
        out["sweep"].append(replay_point(b, m, k))
    out["e2e_plain_ms"] = median([b.e2e(lambda pre: b.engine.decode(pre, b.new, None))[0] for _ in range(b.repeats)])
    return out


# ----------------------------------------------------------------------------------------------
# (c) the 68M draft LM


class DraftCostReplay:
    """Drafter for (c): the draft LM does its full work every round (its drafts are computed and
    its cache rolled back), but the proposals handed to the target are the replay drafter's, so
    acceptance is controlled while the draft's cost is real."""

    name = "draft_model"

    def __init__(self, model: DraftModelDrafter, replay: ReplayDrafter) -> None:
        self.model, self.replay = model, replay

    def start(self, ctx: DraftStart) -> None:
        self.model.start(ctx)
        self.replay.start(ctx)

    def propose(self, k: int) -> Draft:
        self.model.propose(k)
        return self.replay.propose(k)

    def accept(self, n_accepted: int, tokens: torch.Tensor) -> None:
        self.model.accept(n_accepted, tokens)
        self.replay.accept(n_accepted, tokens)


def section_draft_lm(b: Bench, args: argparse.Namespace, replay: dict) -> dict:
    spec = args.draft_model or ("llama-draft-tiny" if args.smoke else "llama-68m")
    draft = load_draft(spec, device=b.device, dtype=b.dtype, vocab_size=b.vocab if spec == "llama-draft-tiny" else None)
    shared = check_vocab(draft.tokenizer, getattr(b.model, "tokenizer", None), draft_vocab=draft.vocab_size,
                         target_vocab=b.vocab, where=draft.source)
    ids = b.prompt_ids.to(b.device)
    t0 = time.perf_counter()
    drafter = DraftModelDrafter.from_lm(draft.lm, max_seq=ids.shape[1] + b.new + K_MAX + 64, shared_vocab=shared)
    drafter.warmup(ids.shape[1], b.new, K_MAX)
    warm_s = time.perf_counter() - t0
    eng = drafter.engine
    # graph-replayed draft step: one token against the draft's cache
    drafter.prefill(input_ids=ids)
    tok = torch.zeros(1, 1, dtype=torch.long, device=b.device)
    step_ms = median_call_ms(b.device, lambda: eng.extend(tok), max(20, 10 * b.repeats))
    draft_prefill_ms = median([wall(lambda: drafter.prefill(input_ids=ids), b.device)[0] for _ in range(b.repeats)])
    res: dict = {"model": draft.name, "params": sum(p.numel() for p in draft.lm.parameters()), "shared_vocab": shared,
                 "warmup_s": warm_s, "step_ms": step_ms, "draft_prefill_ms": draft_prefill_ms, "controlled": {}, "cost_model": {}}
    for m, ks in HEADLINE.items():
        for k in ks:
            alpha = alpha_for_accepted_length(m, k)
            ms_tok, lengths, per_draft, draft_round = [], [], [], []
            for seed in range(b.repeats):
                ref, _, _ = calibrated_reference(b, k, 1.0 - alpha, seed)
                d = DraftCostReplay(drafter, ReplayDrafter(ref, error_rate=1.0 - alpha, vocab_size=b.vocab, seed=seed))
                out, ms = b.spec(d, k, before=lambda: drafter.prefill(input_ids=ids))
                ms_tok.append(ms / (out.n_tokens[0] - 1))
                lengths.append(out.stats.mean_accepted_length)
                draft_round.append(out.stats.draft_ms / out.stats.n_verify_steps)
                per_draft.append(out.stats.draft_ms / out.stats.n_drafted_tokens)
            verify_round = next(r["round_ms"] for r in replay["headline"][m] if r["k"] == k)  # replay: ~no draft cost
            res["controlled"][f"m{m}_k{k}"] = {
                "k": k, "alpha": alpha, "mean_accepted_length": statistics.mean(lengths), "ms_per_token": median(ms_tok),
                "draft_round_ms": median(draft_round), "ms_per_draft_token": median(per_draft),
            }
            res["cost_model"][f"m{m}_k{k}"] = (median(draft_round) + verify_round) / expected_accepted_length(alpha, k)
    # its real acceptance (meaningful with real weights only)
    out, ms = b.spec(drafter, 4, before=lambda: drafter.prefill(input_ids=ids))
    res["own_proposals_k4"] = {"acceptance_rate": out.stats.acceptance_rate, "mean_accepted_length": out.stats.mean_accepted_length,
                               "ms_per_token": ms / (out.n_tokens[0] - 1), "meaningful": not b.random_weights}
    # end to end with the draft LM at m = 3.0 (its prefill as its own stage)
    k = HEADLINE[3.0][0]
    alpha = alpha_for_accepted_length(3.0, k)
    ref, _, _ = calibrated_reference(b, k, 1.0 - alpha, 0)

    e2e_lengths = []

    def run(pre):
        d = DraftCostReplay(drafter, ReplayDrafter(ref, error_rate=1.0 - alpha, vocab_size=b.vocab, seed=0))
        e2e_lengths.append(speculative_decode(b.engine, pre, d, k, b.new, None).stats.mean_accepted_length)

    def draft_prefill(prep):
        drafter.prefill(input_ids=prompt_text_ids(prep.input_ids, prep.placeholder_index))

    e2es = [b.e2e(run, draft_prefill) for _ in range(b.repeats)]
    res["e2e_m3.0_ms"] = median([t for t, _ in e2es])
    res["e2e_m3.0_mean_accepted_length"] = statistics.mean(e2e_lengths)
    res["e2e_m3.0_stage_ms"] = {s: median([st[s] for _, st in e2es]) for s in e2es[0][1]}
    return res


# ----------------------------------------------------------------------------------------------
# (d) prompt lookup


def section_ngram(b: Bench, args: argparse.Namespace) -> dict:
    res = {}
    for k in (4, 8):
        d = NgramDrafter(args.prompt_lookup_max)
        runs = [b.spec(d, k) for _ in range(b.repeats)]
        res[k] = {
            "propose_ms_per_round": median([o.stats.draft_ms / o.stats.n_verify_steps for o, _ in runs]),
            "round_ms": median([(o.stats.draft_ms + o.stats.verify_ms) / o.stats.n_verify_steps for o, _ in runs]),
            "prompt_lookup_max": d.prompt_lookup_max, "prompt_lookup_min": d.prompt_lookup_min,
        }
        if not b.random_weights:  # real acceptance only with real weights
            o, ms = runs[0]
            res[k].update(acceptance_rate=o.stats.acceptance_rate, mean_accepted_length=o.stats.mean_accepted_length,
                          ms_per_token=ms / (o.n_tokens[0] - 1))
    return res


# ----------------------------------------------------------------------------------------------
# (e) agreement of speculative with plain greedy ids in this dtype


def section_agreement(b: Bench, args: argparse.Namespace) -> dict:
    """Greedy ids of prompt-lookup speculative decoding against plain greedy decoding, and where
    they part, the plain engine's top-2 logit margin there (teacher-forced on its own ids).

    In fp32 the two are equal (CPU tests); in bf16 a verify step (GEMMs over ``k + 1`` rows) and a
    decode step (GEMVs) round differently, so on the flat logits of random weights a near-tie can
    break the other way. The margin says whether a parting is such a tie (a few bf16 ulps) or a bug.
    """
    plain = b.plain().tokens[0].tolist()  # [T]
    logits = b.engine.score(b.prefill(), torch.tensor([plain[:-1]], device=b.device))[0].float()  # [T, V]
    top2 = logits.topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()  # margins[i]: the plain engine's choice of plain[i]
    res: dict[str, Any] = {"plain_median_top2_margin": statistics.median(margins), "plain_min_top2_margin": min(margins)}
    for k in (4, 8):
        out, _ = b.spec(NgramDrafter(args.prompt_lookup_max), k)
        ids = out.tokens[0].tolist()
        n = min(len(ids), len(plain))
        first = next((i for i in range(n) if ids[i] != plain[i]), None)
        res[f"ngram_k{k}"] = {"tokens_compared": n, "same_ids": first is None, "first_diff": first,
                              "plain_top2_margin_at_first_diff": None if first is None else margins[first]}
    return res


# ----------------------------------------------------------------------------------------------


def fmt(x: Any, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3f}{unit}" if isinstance(x, float) else str(x)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (a test of the script)")
    ap.add_argument("--repeats", type=int, default=None, help="medians over this many runs (default 5; smoke 2)")
    ap.add_argument("--new-tokens", type=int, default=46)
    ap.add_argument("--events", type=Path, default=None, help="event file (default: the shared EventGPT sample)")
    ap.add_argument("--tokenizer", type=Path, default=None, help="LLaMA tokenizer.model (default: the shared one)")
    ap.add_argument("--weights", default=None, help="an EventGPT checkpoint folder (default: random weights)")
    ap.add_argument("--draft-model", default=None, help="draft preset or checkpoint folder (default llama-68m)")
    ap.add_argument("--prompt-lookup-max", type=int, default=None)
    ap.add_argument("--no-sweep", action="store_true", help="(b): only the headline points, not the sweep over m")
    ap.add_argument("--extend-matvec-ks", default="4,8", help="k values to time the extend_matvec variant at ('' = skip)")
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.smoke else 5

    t_start = time.perf_counter()
    b = Bench(args)
    def done(name: str, section: dict) -> dict:  # each section as it ends: a run cut short keeps what it measured
        print(f"[speculative] {name} done at {time.perf_counter() - t_start:.0f} s: {json.dumps(section, default=str)}", flush=True)
        return section

    verify = done("(a) verify", section_verify(b, [int(k) for k in args.extend_matvec_ks.split(",") if k]))
    replay = done("(b) replay", section_replay(b, sweep=not args.no_sweep))
    draft = done("(c) draft LM", section_draft_lm(b, args, replay))
    ngram = done("(d) prompt lookup", section_ngram(b, args))
    agreement = done("(e) agreement", section_agreement(b, args))

    m3 = replay["headline"][3.0][0]
    m43 = replay["headline"][4.3][0]
    k4 = HEADLINE[3.0][0]
    figures = {
        "verify_k4_over_decode": verify["verify_over_decode"][4],
        "verify_k8_over_decode": verify["verify_over_decode"][8],
        "replay_m3.0_ms_per_token": m3["ms_per_token"],
        "draft_lm_m3.0_ms_per_token": draft["controlled"][f"m3.0_k{k4}"]["ms_per_token"],
        "draft_lm_m3.0_cost_model_ms_per_token": draft["cost_model"][f"m3.0_k{k4}"],
        "replay_m4.3_ms_per_token": m43["ms_per_token"],
        "draft_lm_step_ms": draft["step_ms"],
        "e2e_m3.0_ms": m3.get("e2e_ms"),
        "e2e_plain_ms": replay["e2e_plain_ms"],
        "e2e_draft_lm_m3.0_ms": draft["e2e_m3.0_ms"],
    }
    doc = {
        "what": "engine cost at controlled acceptance (replay drafter), never a speed-up of EventGPT; random weights"
                if b.random_weights else "real weights: acceptance figures are the models' own",
        "device": environment(b.device).get("gpu", "cpu"),
        "env": environment(b.device),
        "dtype": str(b.dtype),
        "stage_options": dataclasses.asdict(b.stage_options),
        "prompt_tokens": b.S,
        "new_tokens": b.new,
        "repeats": b.repeats,
        "warmup_s": b.warmup_s,
        "figures": figures,
        "verify": verify,
        "replay": replay,
        "draft_lm": draft,
        "ngram": ngram,
        "agreement": agreement,
        "total_s": time.perf_counter() - t_start,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2, default=str))

    print(f"\nspeculative decoding, {doc['device']}, {b.dtype}, prompt {b.S} tokens, {b.new} new tokens, batch 1, "
          f"medians of {b.repeats}; warm-up {b.warmup_s:.1f} s, total {doc['total_s']:.0f} s")
    print("Acceptance below is CONTROLLED (replay drafter): engine cost at that acceptance, not a speed-up of EventGPT.")
    print(f"\n(a) decode step {verify['decode_step_ms']:.3f} ms; verify step (k+1 tokens) by k:")
    print("    " + "  ".join(f"k={k}: {verify['verify_step_ms'][k]:.3f} ms ({verify['verify_over_decode'][k]:.3f}x)" for k in range(1, K_MAX + 1)))
    if "extend_matvec" in verify:
        mv = verify["extend_matvec"]
        print("    variant extend_matvec (compiled reductions, not cuBLAS): " + "  ".join(
            f"k={k}: {ms:.3f} ms ({mv['verify_over_decode'][k]:.3f}x)" for k, ms in mv["verify_step_ms"].items()))
    print(f"\n(b) replay drafter sweep (plain TPOT {replay['plain_tpot_ms']:.3f} ms):")
    print(f"    {'target m':>8s} {'k':>3s} {'alpha':>6s} {'meas. m':>8s} {'ms/token':>9s} {'round ms':>9s} {'calibrated':>10s}")
    for r in [*replay["headline"][3.0], *replay["headline"][4.3], *replay["sweep"]]:
        print(f"    {r['target_mean_accepted_length']:8.2f} {r['k']:3d} {r['alpha']:6.3f} {r['mean_accepted_length']:8.2f} "
              f"{r['ms_per_token']:9.3f} {r['round_ms']:9.3f} {str(r['calibrated']):>10s}")
    print(f"\n(c) draft LM {draft['model']} ({draft['params'] / 1e6:.1f}M params): step {draft['step_ms']:.3f} ms (graph replay), "
          f"prefill {draft['draft_prefill_ms']:.3f} ms; per draft token in a round: "
          + ", ".join(f"{key} {v['ms_per_draft_token']:.3f} ms" for key, v in draft["controlled"].items()))
    own = draft["own_proposals_k4"]
    print(f"    its own proposals, k=4: acceptance {fmt(own['acceptance_rate'])}, m {fmt(own['mean_accepted_length'])} "
          f"({'real weights' if own['meaningful'] else 'random weights: meaningless'})")
    print("\n(d) prompt lookup, cost per round: " + ", ".join(
        f"k={k}: propose {v['propose_ms_per_round']:.3f} ms, round {v['round_ms']:.3f} ms" for k, v in ngram.items()))
    agr = ", ".join(f"k={k}: " + ("same ids" if a["same_ids"] else f"part at token {a['first_diff']} (plain top-2 margin there "
                                   f"{a['plain_top2_margin_at_first_diff']:.4f})")
                    for k, a in ((k, agreement[f"ngram_k{k}"]) for k in (4, 8)))
    print(f"\n(e) prompt lookup vs plain greedy ids, {b.dtype}: {agr}; plain top-2 margins: median "
          f"{agreement['plain_median_top2_margin']:.4f}, min {agreement['plain_min_top2_margin']:.4f}")
    print(f"\n(e2e at m=3.0: measured mean accepted length {fmt(m3.get('e2e_mean_accepted_length'))} with the replay drafter, "
          f"{fmt(draft['e2e_m3.0_mean_accepted_length'])} with the draft LM; stages of the latter: "
          + ", ".join(f"{s} {v:.2f}" for s, v in draft["e2e_m3.0_stage_ms"].items()) + " ms)")
    print(f"\n{'figure':44s} {'target':>12s} {'measured':>10s}")
    for key, (label, target) in TARGETS.items():
        label = label.format(draft=draft["model"], new=b.new)
        print(f"{label:44s} {target:>12s} {fmt(figures[key]):>10s}")
    return doc


if __name__ == "__main__":
    main()
