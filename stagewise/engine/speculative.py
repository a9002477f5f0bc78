"""Speculative decoding on the fast engine: drafters, one verify step per round, lossless acceptance.

Why it can pay: at batch 1 a decode step is bound by memory bandwidth (each step streams all 13.5 GB
of a 7B model's bf16 weights to produce one token), so a forward over ``k + 1`` tokens streams the
same bytes and costs about one step. If something cheap proposes ``k`` tokens ("drafts") and the
target model checks them all in one forward (a verify step), every step yields the accepted
drafts plus one token of the target's own: ``1 + accepted`` tokens for about the price of one
(Leviathan, Kalman & Matias 2023, "Fast Inference from Transformers via Speculative Decoding";
Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling").

One round (batch 1; ``c`` tokens emitted so far, the last of them, ``last``, not yet fed to the
target):

1. the drafter proposes ``d_1..d_k`` for output positions ``c..c+k-1`` (:meth:`Drafter.propose`);
2. the target runs ONE forward over ``[last, d_1..d_k]`` at the next ``k + 1`` cache slots
   (:meth:`FastEngine.extend`, a CUDA graph per (k + 1, KV bucket)); row ``i`` of its logits is
   the target's distribution for position ``c + i``;
3. acceptance on the device (:func:`accept_greedy` / :func:`accept_sampled`) gives ``n`` accepted
   drafts and the ``n + 1`` emitted tokens (the accepted drafts, then the target's own token at
   row ``n``: the correction of the first rejected draft, or the bonus token when all ``k`` passed);
4. ONE host read of ``[n, emitted]`` (the only host synchronization of a round: the host needs
   ``n`` to move the cache position and to stop at EOS / ``max_new_tokens``), then
   :meth:`FastEngine.advance` ``(n + 1)``: ``last`` and the accepted drafts stay in the cache, the
   rejected drafts' K/V stay in their slots but are hidden by position and overwritten next round
   (the "rollback by position only"); the drafter is told ``n`` (:meth:`Drafter.accept`).

Greedy acceptance keeps the longest prefix of drafts equal to the target's argmax, so the ids are
exactly those of plain greedy decoding whatever the drafter proposes (tests check it for every
drafter). Sampling (temperature > 0) uses speculative sampling: accept ``d_i`` with probability
``min(1, p(d_i) / q(d_i))``, on rejection draw from ``norm(max(0, p - q))``, after ``k`` acceptances
draw the bonus from ``p``; ``p`` is the target's warped distribution (:func:`warp_logits`, the one
plain sampling draws from) and ``q`` the drafter's (a one-hot for a deterministic drafter). The
emitted tokens are then distributed exactly as plain sampling's (Leviathan et al., Theorem 3.5;
Chen et al., Theorem 1), not equal token for token.

Random numbers are the counter-based uniforms of :mod:`stagewise.engine.sampling`, keyed by (row
seed, output position, stream), so runs are reproducible and nothing needs RNG state: stream 0 for
the target's own draws (the prefill's first token, corrections and bonus tokens),
:data:`ACCEPT_STREAM` for the acceptance tests, :data:`DRAFT_STREAM` for a draft model's samples.
Each output position is decided once (accepted, corrected or bonus), so each acceptance uniform
and each correction/bonus draw is used at most once; a draft drawn for a position that is not
tested is thrown away, so redrawing it with the same noise next round stays independent of
everything emitted.

Timing: a :class:`~stagewise.measure.timing.StepTimer` marks the start of each round, the end of
its draft phase and the end of the round (CUDA events, read once at the end). ``draft_ms`` sums
the draft phases; ``verify_ms`` the rest of each round (the verify forward, acceptance, the host
read and the bookkeeping after it), so ``draft_ms + verify_ms`` tiles the decode loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from stagewise.engine.base import DecodeOutput, PrefillOutput
from stagewise.engine.fast import MAX_EXTEND, FastEngine, FastOptions, _plain_no_grad
from stagewise.engine.sampling import SamplingParams, uniform, warp_logits
from stagewise.measure.timing import StepTimer

ACCEPT_STREAM = 1
"""Counter-based uniform stream of the acceptance tests (stream 0 is the target's own draws)."""

DRAFT_STREAM = 2
"""Counter-based uniform stream of a draft model's sampled drafts."""

METHODS = ("ngram", "draft_model", "replay")
"""Drafter names, as ``--speculate`` spells them (vLLM's method names where vLLM has one)."""


# ----------------------------------------------------------------------------------------------
# The drafter interface


@dataclass(frozen=True)
class DraftStart:
    """What a drafter is told when a speculative decode begins.

    Attributes:
        first_token: ``[B]`` int64 on the device: the target's first generated token (output
            position 0), not yet fed to the target.
        prompt_ids: ``[B, S_text]`` int64 on the device: the prompt's text ids (vision positions
            have no ids and are left out, see :func:`prompt_text_ids`), or ``None``.
        max_new_tokens: tokens the decode may emit (the first included).
        num_speculative_tokens: ``k``, drafts per round.
        sampling: the target's sampling parameters (greedy or not).
        seeds: ``[B]`` int64 on the device: the per-row seeds of the target's draws.
        vocab_size: the target's vocabulary size ``V`` (draft probabilities are ``[B, k, V]``).
    """

    first_token: torch.Tensor
    prompt_ids: torch.Tensor | None
    max_new_tokens: int
    num_speculative_tokens: int
    sampling: SamplingParams
    seeds: torch.Tensor
    vocab_size: int


@dataclass
class Draft:
    """A drafter's proposal for one round.

    Attributes:
        tokens: ``[B, k]`` int64 on the device.
        probs: ``[B, k, V]`` fp32 on the device: the distribution each token was drawn from, over
            the target's vocabulary; ``None`` for a deterministic drafter (a one-hot at the token).
    """

    tokens: torch.Tensor
    probs: torch.Tensor | None = None


@runtime_checkable
class Drafter(Protocol):
    """Proposes draft tokens; told after each verify step how many were accepted.

    Attributes:
        name: one of :data:`METHODS`.
    """

    name: str

    def start(self, ctx: DraftStart) -> None:
        """Begin a decode (called once, before the first :meth:`propose`)."""
        ...

    def propose(self, k: int) -> Draft:
        """``k`` drafts continuing the accepted sequence (no host synchronization)."""
        ...

    def accept(self, n_accepted: int, tokens: torch.Tensor) -> None:
        """After a verify step: the first ``n_accepted`` drafts were accepted; ``tokens`` ``[B, k + 1]``
        (device) holds the emitted tokens in its first ``n_accepted + 1`` columns (the accepted drafts,
        then the target's correction or bonus token); the rest is garbage."""
        ...


def prompt_text_ids(input_ids: torch.Tensor, placeholder_index: int | None = None, *,
                    placeholder_id: int | None = None) -> torch.Tensor:
    """The prompt's text ids without its vision placeholder, as ``[1, S_text - 1]`` (what the
    n-gram drafter looks up and what a text-only draft model is prefilled with).

    Args:
        input_ids: ``[S_text]`` int64 (``Prepared.input_ids``).
        placeholder_index: the placeholder's position when known on the host
            (``Prepared.placeholder_index``, EventGPT); dropped without reading the device.
        placeholder_id: otherwise, the placeholder's id (LLaVA's ``<image>``, Video-LLaVA's
            ``<video>``): every position holding it is dropped (a boolean mask: one host read,
            so call it outside timed stages). Neither given: ``input_ids`` as they are.

    Raises:
        ValueError: ``input_ids`` not 1-D, or the index outside it.
    """
    if input_ids.ndim != 1:
        raise ValueError(f"prompt_text_ids: input_ids must be [S_text], got {list(input_ids.shape)}")
    if placeholder_index is not None:
        if not 0 <= placeholder_index < input_ids.shape[0]:
            raise ValueError(f"prompt_text_ids: placeholder_index {placeholder_index} outside [0, {input_ids.shape[0]})")
        return torch.cat([input_ids[:placeholder_index], input_ids[placeholder_index + 1:]])[None]
    if placeholder_id is not None:
        return input_ids[input_ids != placeholder_id][None]
    return input_ids[None]


# ----------------------------------------------------------------------------------------------
# Acceptance (pure functions on the device; no host synchronization)


def accept_greedy(logits: torch.Tensor, draft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification: the longest prefix of drafts equal to the target's argmax, plus the
    target's own next token.

    Args:
        logits: ``[B, k + 1, V]`` fp32: the verify step's logits (row ``i`` after ``[last, d_1..d_i]``).
        draft: ``[B, k]`` int64.

    Returns:
        ``(n [B] int64, tokens [B, k + 1] int64)``: ``n`` accepted drafts; ``tokens[:, :n + 1]`` are
        the emitted tokens. Where a draft was accepted it equals the argmax, so the emitted tokens
        are simply the argmax of rows ``0..n`` (the last one is the correction or the bonus).
    """
    g = logits.argmax(-1)  # [B, k + 1]
    n = (draft == g[:, :-1]).long().cumprod(-1).sum(-1)  # [B]
    return n, g


def gumbel(seeds: torch.Tensor, counter: torch.Tensor, n: int, stream: int) -> torch.Tensor:
    """``[B, n]`` float64 standard Gumbel noise ``-log(-log U)`` from the counter-based uniforms of
    (``seeds [B]``, ``counter`` broadcastable to ``[B]``, ``stream``)."""
    return -torch.log(-torch.log(uniform(seeds, counter, n, stream)))


def accept_sampled(logits: torch.Tensor, draft: Draft, params: SamplingParams, seeds: torch.Tensor,
                   position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023, Algorithm 2).

    Draft ``d_{i+1}`` (row ``i``) is accepted iff ``u_i * q_i(d) < p_i(d)``, i.e. with probability
    ``min(1, p/q)``; the token at the first rejected row ``n`` is drawn from ``norm(max(0, p_n -
    q_n))`` (from ``p_n`` itself if that is numerically all zero), and when all ``k`` drafts pass,
    the bonus is drawn from ``p_k``. Every row's candidate is drawn (fixed shapes); the first
    ``n + 1`` are kept.

    Args:
        logits: ``[B, k + 1, V]`` fp32 verify logits; ``p = softmax(warp_logits(logits))``.
        draft: the proposal; ``draft.probs`` ``[B, k, V]`` or ``None`` (one-hot ``q``).
        params: sampling parameters (temperature > 0).
        seeds: ``[B]`` int64 row seeds.
        position: ``[B]`` or ``[1]`` int64: output position of row 0 (``c``); row ``i`` decides
            position ``c + i``. Acceptance uniforms use :data:`ACCEPT_STREAM`, draws stream 0.

    Returns:
        ``(n [B] int64, tokens [B, k + 1] int64)`` as :func:`accept_greedy`.
    """
    B, S, V = logits.shape
    k = S - 1
    d = draft.tokens  # [B, k]
    p = torch.softmax(warp_logits(logits.reshape(B * S, V), params), dim=-1).view(B, S, V)  # fp32
    if draft.probs is None:
        q = torch.zeros(B, k, V, device=logits.device, dtype=p.dtype).scatter_(2, d[..., None], 1.0)
    else:
        q = draft.probs
    pos = position.expand(B)[:, None] + torch.arange(S, device=logits.device)  # [B, S]
    p_d = p[:, :k].gather(2, d[..., None])[..., 0].double()  # [B, k]
    q_d = q.gather(2, d[..., None])[..., 0].double()
    u = uniform(seeds.repeat_interleave(k), pos[:, :k].reshape(-1), 1, ACCEPT_STREAM).view(B, k)
    n = (u * q_d < p_d).long().cumprod(-1).sum(-1)  # [B]
    resid = torch.cat([(p[:, :k] - q).clamp_min(0.0), p[:, k:]], dim=1)  # [B, S, V]
    resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, p)
    noise = gumbel(seeds.repeat_interleave(S), pos.reshape(-1), V, 0).view(B, S, V)
    cand = (resid.double().log() + noise).argmax(-1)  # [B, S]: a draw from each row's residual
    keep = torch.arange(S, device=logits.device)[None] < n[:, None]  # [B, S]
    return n, torch.where(keep, F.pad(d, (0, 1)), cand)


def expected_accepted_length(alpha: float, k: int) -> float:
    """Expected tokens per verify step (bonus included) when each draft is accepted independently
    with probability ``alpha``: ``(1 - alpha^(k+1)) / (1 - alpha)`` (Leviathan et al. 2023, eq. 1).

    Raises:
        ValueError: ``alpha`` outside ``[0, 1]`` or ``k < 0``.
    """
    if not 0.0 <= alpha <= 1.0 or k < 0:
        raise ValueError(f"expected_accepted_length: alpha must be in [0, 1] and k >= 0, got {alpha}, {k}")
    return float(k + 1) if alpha == 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def alpha_for_accepted_length(mean_length: float, k: int) -> float:
    """The per-draft acceptance ``alpha`` at which :func:`expected_accepted_length` is ``mean_length``
    (bisection; the function increases with ``alpha``).

    Raises:
        ValueError: ``mean_length`` outside ``[1, k + 1]``.
    """
    if not 1.0 <= mean_length <= k + 1:
        raise ValueError(f"alpha_for_accepted_length: mean length {mean_length} outside [1, {k + 1}] for k = {k}")
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_accepted_length(mid, k) < mean_length else (lo, mid)
    return (lo + hi) / 2


# ----------------------------------------------------------------------------------------------
# Results


@dataclass
class SpecStats:
    """What one speculative decode did (per sample at batch 1).

    Attributes:
        method: the drafter (:data:`METHODS`).
        num_speculative_tokens: ``k`` applied.
        n_verify_steps: target forwards over ``[last, drafts]`` (one per round).
        n_drafted_tokens: drafts fed to the target (``k`` per verify step).
        n_accepted_tokens: drafts the verification accepted (as verified: the last step's may be
            cut off at EOS / ``max_new_tokens`` afterwards).
        n_emitted_tokens: tokens the verify steps emitted (the prefill's first token excluded),
            after stopping at EOS / ``max_new_tokens``.
        draft_ms: time in the drafter's propose phases (ms; CUDA events, ``perf_counter`` on CPU).
        verify_ms: the rest of the rounds: verify forward, acceptance, the host read, bookkeeping (ms).
        n_host_syncs: host reads of device values (the first token, then one per verify step).

    Raises:
        ValueError: a negative count, more accepted than drafted tokens, or more emitted tokens
            than the verify steps can produce.
    """

    method: str
    num_speculative_tokens: int
    n_verify_steps: int = 0
    n_drafted_tokens: int = 0
    n_accepted_tokens: int = 0
    n_emitted_tokens: int = 0
    draft_ms: float = 0.0
    verify_ms: float = 0.0
    n_host_syncs: int = 0

    def __post_init__(self) -> None:
        counts = ("n_verify_steps", "n_drafted_tokens", "n_accepted_tokens", "n_emitted_tokens", "n_host_syncs")
        for name in counts:
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.n_accepted_tokens > self.n_drafted_tokens:
            raise ValueError(f"n_accepted_tokens: {self.n_accepted_tokens} > n_drafted_tokens {self.n_drafted_tokens}")
        if self.n_emitted_tokens > self.n_accepted_tokens + self.n_verify_steps:
            raise ValueError(f"n_emitted_tokens: {self.n_emitted_tokens} > accepted + verify steps "
                             f"({self.n_accepted_tokens} + {self.n_verify_steps})")

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / drafted tokens (``None`` when nothing was drafted)."""
        return self.n_accepted_tokens / self.n_drafted_tokens if self.n_drafted_tokens else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Emitted tokens per verify step, the bonus included (Spec-Bench's "mean accepted tokens";
        vLLM's ``1 + accepted / drafts`` is the same number unless the last step was cut off at EOS
        or ``max_new_tokens``). ``None`` without a verify step."""
        return self.n_emitted_tokens / self.n_verify_steps if self.n_verify_steps else None

    def as_record(self) -> dict[str, object]:
        """The fields a sample record carries (names as issue 10 spells them; ``acceptance_rate`` and
        ``mean_accepted_length`` are vLLM's acceptance rate and mean acceptance length)."""
        return {
            "speculative_method": self.method,
            "num_speculative_tokens": self.num_speculative_tokens,
            "n_verify_steps": self.n_verify_steps,
            "n_drafted_tokens": self.n_drafted_tokens,
            "n_accepted_tokens": self.n_accepted_tokens,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "draft_ms": self.draft_ms,
            "verify_ms": self.verify_ms,
            "n_host_syncs": self.n_host_syncs,
        }


@dataclass
class SpeculativeOutput(DecodeOutput):
    """:class:`DecodeOutput` of a speculative decode, with its statistics.

    ``tokens`` / ``n_tokens`` mean what they mean for plain decoding (the first token included,
    EOS included, nothing after it). ``step_ms`` has ONE entry per verify step (draft phase +
    verify + acceptance: the time between two bursts of tokens, what vLLM's benchmarks record as
    the inter-token latency of a streamed chunk), not one per token; ``len = stats.n_verify_steps``.
    """

    stats: SpecStats | None = None


# ----------------------------------------------------------------------------------------------
# The decoder


class SpeculativeDecoder:
    """Runs speculative decoding on a :class:`FastEngine` with a :class:`Drafter`.

    Args:
        engine: the target engine (its cache must hold ``prompt + max_new_tokens + k - 1`` slots:
            the last verify step may feed up to ``k`` slots past the last emitted token).
        drafter: the proposer.
        num_speculative_tokens: ``k`` in ``1..MAX_EXTEND - 1``.

    Raises:
        ValueError: ``k`` out of range.
    """

    def __init__(self, engine: FastEngine, drafter: Drafter, num_speculative_tokens: int) -> None:
        if not 1 <= num_speculative_tokens <= MAX_EXTEND - 1:
            raise ValueError(f"num_speculative_tokens: must be in 1..{MAX_EXTEND - 1}, got {num_speculative_tokens}")
        self.engine = engine
        self.drafter = drafter
        self.k = num_speculative_tokens

    @_plain_no_grad
    def warmup(self, prompt_len: int, max_new_tokens: int) -> None:
        """Capture the target's verify graphs (``k + 1`` tokens, every KV bucket a run of
        ``prompt_len`` + ``max_new_tokens`` reaches) and run the acceptance once (time goes to the
        engine's ``warmup_ms``). A draft model warms up on its own (:meth:`DraftModelDrafter.warmup`)."""
        eng = self.engine
        eng.warmup_extend(prompt_len, max_new_tokens, [self.k + 1])
        t0 = _now(eng.device)
        logits = torch.zeros(1, self.k + 1, eng.dims.vocab, device=eng.device)
        draft = Draft(torch.zeros(1, self.k, dtype=torch.long, device=eng.device))
        if eng.sampling.greedy:
            accept_greedy(logits, draft.tokens)
        else:
            accept_sampled(logits, draft, eng.sampling, eng.buf.seeds[:1], torch.ones(1, dtype=torch.long, device=eng.device))
        eng.warmup_ms += _now(eng.device) - t0

    @_plain_no_grad
    def decode(self, prefill: PrefillOutput, max_new_tokens: int, eos_token_id: int | None, *,
               prompt_ids: torch.Tensor | None = None) -> SpeculativeOutput:
        """Generate like :meth:`FastEngine.decode` (same ids when greedy; same distribution when
        sampling), one verify step per round.

        Args:
            prefill: the live prefill of ``engine`` (batch 1).
            max_new_tokens: tokens to emit, the first included; never more.
            eos_token_id: stop after emitting it (``None``: never).
            prompt_ids: ``[1, S_text]`` (or ``[S_text]``) prompt text ids for the drafter.

        Returns:
            :class:`SpeculativeOutput` (tokens on the host).

        Raises:
            ValueError: a batch other than 1, a stale prefill, or a cache too small for
                ``prompt + max_new_tokens + k - 1`` slots.
        """
        eng, k = self.engine, self.k
        if prefill.batch != 1:
            raise ValueError(f"speculative decoding: batch 1 only for now, got a batch of {prefill.batch}")
        S = prefill.prompt_len
        if S + max_new_tokens - 1 + k > eng.max_seq:
            raise ValueError(f"speculative decoding: prompt of {S} + {max_new_tokens} new tokens + k = {k} needs "
                             f"{S + max_new_tokens - 1 + k} cache slots, more than max_seq={eng.max_seq}")
        eng.claim(prefill, max_new_tokens)
        if prompt_ids is not None and prompt_ids.ndim == 1:
            prompt_ids = prompt_ids[None]
        timer = StepTimer(eng.device)
        first = prefill.next_token[:1]  # [1] on the device
        tokens = [int(first[0])]  # host read: is the first token already EOS?
        n_syncs, n_steps, n_accepted = 1, 0, 0
        done = len(tokens) >= max_new_tokens or tokens[0] == eos_token_id
        sampling = eng.sampling
        if not done:
            self.drafter.start(DraftStart(first, prompt_ids, max_new_tokens, k, sampling, eng.buf.seeds[:1], eng.dims.vocab))
        last = first[:, None]  # [1, 1]: the emitted token not yet fed to the target
        position = torch.ones(1, dtype=torch.long, device=eng.device)  # output position of row 0
        timer.mark()
        while not done:
            draft = self.drafter.propose(k)
            timer.mark()
            logits = eng.extend(torch.cat([last, draft.tokens], dim=1))  # [1, k + 1, V]
            if sampling.greedy:
                n_dev, emitted = accept_greedy(logits, draft.tokens)
            else:
                n_dev, emitted = accept_sampled(logits, draft, sampling, eng.buf.seeds[:1], position)
            host = torch.cat([n_dev[:, None], emitted], dim=1)[0].tolist()  # the round's one host read
            n_syncs += 1
            n = host[0]
            eng.advance(n + 1)
            self.drafter.accept(n, emitted)
            last = emitted[:, n:n + 1]  # a view: emitted is a fresh tensor every round
            if not sampling.greedy:
                position.add_(n + 1)
            timer.mark()
            n_steps += 1
            n_accepted += n
            for tok in host[1:n + 2]:
                tokens.append(tok)
                if tok == eos_token_id or len(tokens) >= max_new_tokens:
                    done = True
                    break
        _sync(eng.device)  # (already idle after the last host read; makes the event times readable)
        phases = timer.intervals_ms()  # draft, verify, draft, verify, ...
        stats = SpecStats(self.drafter.name, k, n_verify_steps=n_steps, n_drafted_tokens=k * n_steps,
                          n_accepted_tokens=n_accepted, n_emitted_tokens=len(tokens) - 1,
                          draft_ms=sum(phases[0::2]), verify_ms=sum(phases[1::2]), n_host_syncs=n_syncs)
        step_ms = [a + b for a, b in zip(phases[0::2], phases[1::2])]
        return SpeculativeOutput(torch.tensor([tokens], dtype=torch.long), [len(tokens)], step_ms, stats=stats)


def speculative_decode(engine: FastEngine, prefill: PrefillOutput, drafter: Drafter, k: int,
                       max_new_tokens: int, eos_token_id: int | None, *,
                       prompt_ids: torch.Tensor | None = None) -> SpeculativeOutput:
    """One speculative decode: ``SpeculativeDecoder(engine, drafter, k).decode(...)`` (see there)."""
    return SpeculativeDecoder(engine, drafter, k).decode(prefill, max_new_tokens, eos_token_id, prompt_ids=prompt_ids)


# ----------------------------------------------------------------------------------------------
# Drafters


class NgramDrafter:
    """Prompt lookup (``--speculate ngram``): propose what followed the last time the context's
    suffix occurred, with no model, on the device, no host synchronization.

    The history is a static buffer ``[B, H]`` of the prompt's text ids followed by the emitted ids,
    with its length on the device. A round searches it with fixed shapes: for every end position
    ``e`` and every ``j < prompt_lookup_max`` it compares ``hist[e - j]`` with ``hist[len - 1 - j]``
    (a ``[B, max, H]`` comparison), so the run of equal tokens ending at ``e`` is the length of the
    n-gram that matches the suffix there. As vLLM's ``NgramProposer``: the longest match with
    ``prompt_lookup_min <= n <= prompt_lookup_max`` wins, the earliest occurrence among equals, an
    occurrence must end before the last token (it may overlap the suffix), and the drafts are the
    tokens that followed it. Unlike vLLM, a round always proposes ``k`` tokens (the verify step has
    a fixed shape, so extra drafts cost nothing): where the continuation runs into the end of the
    history, the match's period (the distance between the occurrence and the suffix) repeats,
    which is how a repeating pattern continues; with no match, the last token ``k`` times.
    Verification rejects whatever is wrong.

    Args:
        prompt_lookup_max / prompt_lookup_min: n-gram lengths tried (vLLM's defaults: both 5 when
            neither is given, else the one given for both).

    Raises:
        ValueError: a length < 1, or min > max.
    """

    name = "ngram"

    def __init__(self, prompt_lookup_max: int | None = None, prompt_lookup_min: int | None = None) -> None:
        if prompt_lookup_max is None and prompt_lookup_min is None:
            prompt_lookup_max = prompt_lookup_min = 5
        prompt_lookup_max = prompt_lookup_min if prompt_lookup_max is None else prompt_lookup_max
        prompt_lookup_min = prompt_lookup_max if prompt_lookup_min is None else prompt_lookup_min
        if prompt_lookup_min < 1 or prompt_lookup_max < 1:
            raise ValueError(f"prompt_lookup_min/max: must be >= 1, got {prompt_lookup_min}/{prompt_lookup_max}")
        if prompt_lookup_min > prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min: {prompt_lookup_min} > prompt_lookup_max {prompt_lookup_max}")
        self.prompt_lookup_max = prompt_lookup_max
        self.prompt_lookup_min = prompt_lookup_min
        self.hist: torch.Tensor | None = None  # [B, H] int64
        self.length: torch.Tensor | None = None  # [B] int64

    def describe(self) -> dict[str, object]:
        """The settings applied (for the records)."""
        return {"prompt_lookup_max": self.prompt_lookup_max, "prompt_lookup_min": self.prompt_lookup_min}

    @_plain_no_grad
    def start(self, ctx: DraftStart) -> None:
        """History = prompt text ids (if any) + the first token."""
        B, dev = ctx.first_token.shape[0], ctx.first_token.device
        n_prompt = 0 if ctx.prompt_ids is None else ctx.prompt_ids.shape[1]
        H = n_prompt + ctx.max_new_tokens + ctx.num_speculative_tokens + 1
        if self.hist is None or self.hist.shape[0] != B or self.hist.shape[1] < H or self.hist.device != dev:
            self.hist = torch.zeros(B, H, dtype=torch.long, device=dev)
            self.length = torch.zeros(B, dtype=torch.long, device=dev)
        if n_prompt:
            self.hist[:, :n_prompt].copy_(ctx.prompt_ids)
        self.hist[:, n_prompt].copy_(ctx.first_token)
        self.length.fill_(n_prompt + 1)

    @_plain_no_grad
    def propose(self, k: int) -> Draft:
        """The lookup above (fixed shapes; see the class docstring)."""
        hist, length = self.hist, self.length  # [B, H], [B]
        B, H = hist.shape
        dev = hist.device
        j = torch.arange(self.prompt_lookup_max, device=dev)  # [N]: offset from the end of an n-gram
        e = torch.arange(H, device=dev)  # [H]: candidate end positions of an earlier occurrence
        suffix_idx = length[:, None] - 1 - j  # [B, N]
        suffix = hist.gather(1, suffix_idx.clamp_min(0))  # [B, N]
        cand_idx = e[None, :] - j[:, None]  # [N, H]
        cand = hist[:, cand_idx.clamp_min(0)]  # [B, N, H]
        eq = (cand == suffix[:, :, None]) & (cand_idx >= 0)[None] & (suffix_idx >= 0)[:, :, None]
        run = eq.long().cumprod(1).sum(1)  # [B, H]: matched length ending at e (<= max)
        run = run * (e[None, :] <= length[:, None] - 2)  # the occurrence ends before the last token
        best = run.max(-1).values  # [B]
        found = best >= self.prompt_lookup_min  # [B]
        at = (run == best[:, None]).long().argmax(-1)  # [B]: earliest end of a longest match
        period = (length - 1 - at).clamp_min(1)  # [B]
        i = torch.arange(k, device=dev)
        idx = at[:, None] + 1 + i[None, :] % period[:, None]  # [B, k]
        idx = torch.where(found[:, None], idx, length[:, None] - 1)
        return Draft(hist.gather(1, idx))

    @_plain_no_grad
    def accept(self, n_accepted: int, tokens: torch.Tensor) -> None:
        """Append the emitted tokens to the history (fixed shape: all ``k + 1`` columns are written,
        the length grows by ``n_accepted + 1``)."""
        idx = self.length[:, None] + torch.arange(tokens.shape[1], device=tokens.device)  # [B, k + 1]
        self.hist.scatter_(1, idx, tokens)
        self.length.add_(n_accepted + 1)


class ReplayDrafter:
    """Benchmark-only drafter: proposes a known continuation with errors injected at a set rate,
    so that acceptance is controlled. Figures measured with it are the ENGINE's cost at that
    acceptance, never a speed-up of a model.

    Args:
        reference: ``[T]`` int64: the target's own greedy output (``DecodeOutput.tokens[0]``,
            position 0 = the first token), on the device the drafts should live on.
        error_rate: probability that the draft for a position is wrong (``(ref + 1) mod V``),
            drawn once per output position from ``seed`` (a position is tested at most once, so the
            tested drafts are accepted independently with probability ``1 - error_rate`` when the
            reference is what the target computes).
        vocab_size: the target's vocabulary size.
        seed: seeds the error pattern.

    Raises:
        ValueError: a bad ``error_rate``, ``vocab_size`` or reference shape.
    """

    name = "replay"

    def __init__(self, reference: torch.Tensor, *, error_rate: float, vocab_size: int, seed: int = 0) -> None:
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate: must be in [0, 1], got {error_rate}")
        if vocab_size < 2:
            raise ValueError(f"vocab_size: must be >= 2, got {vocab_size}")
        if reference.ndim != 1 or reference.numel() < 1:
            raise ValueError(f"reference: must be a non-empty [T] id tensor, got {list(reference.shape)}")
        self.error_rate, self.seed, self.vocab_size = error_rate, seed, vocab_size
        ref = torch.cat([reference.long().cpu(), torch.zeros(MAX_EXTEND, dtype=torch.long)])  # room past the end
        g = torch.Generator().manual_seed(seed)
        wrong = torch.rand(ref.shape[0], generator=g, dtype=torch.float64) < error_rate
        self.n_reference = reference.numel()
        self.proposals = torch.where(wrong, (ref + 1) % vocab_size, ref).to(reference.device)[None]  # [1, T + 16]
        self._c = 1

    def start(self, ctx: DraftStart) -> None:
        """Begin at output position 1.

        Raises:
            ValueError: a batch other than 1, or a reference shorter than ``max_new_tokens``.
        """
        if ctx.first_token.shape[0] != 1:
            raise ValueError("replay drafter: batch 1 only")
        if self.n_reference < ctx.max_new_tokens:
            raise ValueError(f"replay drafter: reference of {self.n_reference} tokens, decode of {ctx.max_new_tokens}")
        self._c = 1

    def propose(self, k: int) -> Draft:
        """The (possibly corrupted) reference at output positions ``c..c+k-1`` (a view; no kernel)."""
        if self._c + k > self.proposals.shape[1]:
            raise ValueError(f"replay drafter: position {self._c} + {k} past the reference")
        return Draft(self.proposals[:, self._c:self._c + k])

    def accept(self, n_accepted: int, tokens: torch.Tensor) -> None:
        """Move past the emitted tokens."""
        self._c += n_accepted + 1


class DraftModelDrafter:
    """A draft language model run by its own :class:`FastEngine` (own static KV cache, own CUDA
    graphs): a text-only LLaMA (``--speculate draft_model``), or another registry model that shares
    the tokenizer, prefilled with its own multimodal prompt embeddings.

    Per round it runs ``k`` one-token forwards through :meth:`FastEngine.extend` (graph-replayed per
    KV bucket): the first feeds the tokens accepted since the last round that its cache lacks, and
    yields ``d_1``; each next one feeds ``d_i`` and yields ``d_{i+1}``. So after a round it has fed
    ``d_1..d_{k-1}`` but not ``d_k``. After verification with ``n`` accepted drafts:

    * ``n < k``: ``d_1..d_n`` are right, ``d_{n+1}..d_{k-1}`` are not: :meth:`FastEngine.rewind` by
      ``k - 1 - n`` slots; next round feeds ``[correction]`` (1 token);
    * ``n = k``: everything fed is right; next round feeds ``[d_k, bonus]`` (2 tokens).

    The draft's own prediction after its prompt is never used: the first round feeds the target's
    first token. Drafts are restricted to the first ``shared_vocab`` ids (the base vocabulary the two
    tokenizers share, :func:`stagewise.models.draft.check_vocab`); when sampling, ``q`` is the draft's
    warped distribution over them (zero elsewhere) and drafts are drawn with :data:`DRAFT_STREAM`
    noise at their output positions.

    Args:
        engine: the draft's engine (batch 1; ``max_seq`` >= draft prompt + ``max_new_tokens`` + ``k`` + 1).
        shared_vocab: ids ``[0, shared_vocab)`` mean the same in both vocabularies (default: the
            smaller vocabulary).

    Raises:
        ValueError: ``shared_vocab`` < 1.
    """

    name = "draft_model"

    def __init__(self, engine: FastEngine, *, shared_vocab: int | None = None) -> None:
        if shared_vocab is not None and shared_vocab < 1:
            raise ValueError(f"shared_vocab: must be >= 1, got {shared_vocab}")
        self.engine = engine
        self.shared_vocab = shared_vocab
        self._prefilled = False
        self._pending = torch.zeros(1, 2, dtype=torch.long, device=engine.device)  # tokens to feed next
        self._n_pending = 1
        self._k_round = 0

    @classmethod
    def from_lm(cls, lm, *, max_seq: int, shared_vocab: int | None = None, compile: bool | None = None,
                cuda_graphs: bool | None = None) -> DraftModelDrafter:
        """A drafter over the ``LlamaForCausalLM`` ``lm`` with a batch-1 engine of ``max_seq`` slots."""
        return cls(FastEngine(lm, FastOptions(max_batch=1, max_seq=max_seq, compile=compile, cuda_graphs=cuda_graphs)),
                   shared_vocab=shared_vocab)

    @_plain_no_grad
    def prefill(self, *, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> PrefillOutput:
        """Fill the draft's cache with its prompt: text ids (embedded with the draft's own table) or
        its own prompt embeddings (a multimodal draft: vision spliced in by its model). Time it as
        its own stage; the next :meth:`start` uses it.

        Args:
            input_ids: ``[S]`` or ``[1, S]`` int64 (ids must be < the draft's vocabulary).
            inputs_embeds: ``[S, D]`` or ``[1, S, D]`` in the draft's dtype, on its device.

        Raises:
            ValueError: neither or both given, or a batch other than 1 (and the engine's own checks).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("draft model: prefill takes exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            ids = input_ids[None] if input_ids.ndim == 1 else input_ids
            if ids.ndim != 2 or ids.shape[0] != 1:
                raise ValueError(f"draft model: input_ids must be [S] or [1, S], got {list(input_ids.shape)}")
            inputs_embeds = F.embedding(ids.to(self.engine.device), self.engine.embed)  # [1, S, D]
        elif inputs_embeds.ndim == 2:
            inputs_embeds = inputs_embeds[None]
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[0] != 1:
            raise ValueError(f"draft model: inputs_embeds must be [S, D] or [1, S, D], got {list(inputs_embeds.shape)}")
        out = self.engine.prefill(inputs_embeds, [inputs_embeds.shape[1]])
        self._prefilled = True
        return out

    def warmup(self, prompt_len: int, max_new_tokens: int, k: int) -> None:
        """Compile/capture the draft engine for a ``prompt_len``-token draft prompt: its prefill graph
        and the 1- and 2-token extend graphs of every KV bucket a decode of ``max_new_tokens`` with
        ``k`` drafts per round reaches (time in the draft engine's ``warmup_ms``)."""
        self.engine.warmup(prompt_len, 2, batch_sizes=[1])
        self.engine.warmup_extend(prompt_len, max_new_tokens + k, [1, 2])

    @_plain_no_grad
    def start(self, ctx: DraftStart) -> None:
        """Prefill from ``ctx.prompt_ids`` unless :meth:`prefill` ran since the last decode; queue the
        target's first token.

        Raises:
            ValueError: no prompt, a batch other than 1, or a draft cache too small.
        """
        eng = self.engine
        if ctx.first_token.shape[0] != 1:
            raise ValueError("draft model: batch 1 only")
        if not self._prefilled:
            if ctx.prompt_ids is None:
                raise ValueError("draft model: no prompt (call prefill() or pass prompt_ids to the decoder)")
            self.prefill(input_ids=ctx.prompt_ids)
        self._prefilled = False  # this prefill is consumed by this decode
        if eng.position + ctx.max_new_tokens + ctx.num_speculative_tokens + 1 > eng.max_seq:
            raise ValueError(f"draft model: prompt of {eng.position} + {ctx.max_new_tokens} new tokens + k = "
                             f"{ctx.num_speculative_tokens} exceeds the draft's max_seq={eng.max_seq}")
        V = ctx.vocab_size
        self._vs = min(self.shared_vocab or V, V, eng.dims.vocab)
        self._sampling, self._seeds = ctx.sampling, ctx.seeds
        k = ctx.num_speculative_tokens
        self._draft = torch.zeros(1, k, dtype=torch.long, device=eng.device)
        self._probs = None if ctx.sampling.greedy else torch.zeros(1, k, V, device=eng.device)
        self._position = torch.ones(1, dtype=torch.long, device=eng.device)  # output position of d_1
        self._pending[:, 0].copy_(ctx.first_token)
        self._n_pending = 1

    @_plain_no_grad
    def propose(self, k: int) -> Draft:
        """``k`` draft forwards (see the class docstring); returns views of static buffers."""
        eng = self.engine
        if k > self._draft.shape[1]:
            raise ValueError(f"draft model: started for k = {self._draft.shape[1]}, asked for {k}")
        fed = self._pending[:, :self._n_pending]
        for i in range(k):
            logits = eng.extend(fed)[:, -1, :self._vs]  # [1, Vs]
            eng.advance(fed.shape[1])
            self._pick(logits, i)
            fed = self._draft[:, i:i + 1]
        self._k_round = k
        return Draft(self._draft[:, :k], None if self._probs is None else self._probs[:, :k])

    def _pick(self, logits: torch.Tensor, i: int) -> None:
        """Draft ``i`` from the draft's logits ``[1, Vs]``: argmax, or a draw from its warped
        distribution (probabilities kept in ``_probs[:, i]``)."""
        if self._probs is None:
            self._draft[:, i] = logits.argmax(-1)
            return
        scores = warp_logits(logits, self._sampling)  # [1, Vs]
        self._probs[:, i, :self._vs] = torch.softmax(scores, dim=-1)
        noise = gumbel(self._seeds, self._position + i, self._vs, DRAFT_STREAM)
        self._draft[:, i] = (scores.double() + noise).argmax(-1)

    @_plain_no_grad
    def accept(self, n_accepted: int, tokens: torch.Tensor) -> None:
        """Roll back what was not accepted and queue what the cache lacks (see the class docstring)."""
        k = self._k_round
        if n_accepted < k:
            self.engine.rewind(k - 1 - n_accepted)
            self._n_pending = 1
        else:
            self._n_pending = 2
        self._pending[:, :self._n_pending].copy_(tokens[:, n_accepted + 1 - self._n_pending:n_accepted + 1])
        self._position.add_(n_accepted + 1)


# ----------------------------------------------------------------------------------------------


def _now(device: torch.device) -> float:
    """Wall clock in ms after the device is idle (for warm-up accounting)."""
    _sync(device)
    return time.perf_counter() * 1e3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = [
    "ACCEPT_STREAM", "DRAFT_STREAM", "METHODS", "Draft", "DraftModelDrafter", "DraftStart", "Drafter",
    "NgramDrafter", "ReplayDrafter", "SpecStats", "SpeculativeDecoder", "SpeculativeOutput",
    "accept_greedy", "accept_sampled", "alpha_for_accepted_length", "expected_accepted_length",
    "prompt_text_ids", "speculative_decode",
]
