"""Speculative decoding on the fast engine (CPU, fp32, tiny LLaMAs).

Greedy: for every drafter the ids with speculation must EQUAL plain greedy decoding's (the verify
step computes the same logits as decode steps up to summation order, ~1e-6 in fp32, far below the
top-2 gaps of these tiny models initialized with std 0.2; see tests/test_engine_fast.py).
Sampling: speculative sampling must draw from the same distribution as plain sampling
(statistical tests, reasoning in their docstrings).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_engine_fast import GQA, fast_engine, prompts, tiny_lm
from test_sampling import chi2_sf

from stagewise.engine.base import stack_left_padded
from stagewise.engine.sampling import SamplingParams
from stagewise.engine.speculative import (
    DRAFT_STREAM,
    Draft,
    DraftModelDrafter,
    NgramDrafter,
    ReplayDrafter,
    SpecStats,
    SpeculativeDecoder,
    accept_greedy,
    accept_sampled,
    alpha_for_accepted_length,
    expected_accepted_length,
    gumbel,
    prompt_text_ids,
    speculative_decode,
)
from stagewise.models.draft import build_random as build_draft

VOCAB = 101
NEW = 20
KS = (1, 3, 5)


def perturbed_head(lm_seed: int = 0, scale: float = 0.02, seed: int = 5):
    """The target's weights with noise on the LM head only: the same hidden states, so the draft
    agrees with the target on most tokens but not all (acceptance ~0.8 here): both the
    all-accepted and the rejected branches of the drafter's rollback run."""
    lm = tiny_lm(lm_seed, **GQA)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lm.lm_head.weight.add_(scale * torch.randn(lm.lm_head.weight.shape, generator=g))
    return lm


class Setup:
    """One target and its plain greedy references, for an embeddings prompt (a multimodal target:
    no ids) and a text prompt (ids embedded by the target's own table)."""

    def __init__(self) -> None:
        self.lm = tiny_lm(**GQA)
        self.engine = fast_engine(self.lm, max_seq=64, kv_bucket=8)
        self.ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
        self.embeds = {"embeds": prompts([9])[0][None], "text": self.lm.model.embed_tokens.weight[self.ids].detach()}
        self.ref = {}
        for kind, e in self.embeds.items():
            self.ref[kind] = self.engine.decode(self.engine.prefill(e, [9]), NEW, None).tokens

    def eos_for(self, kind: str) -> tuple[int, int]:
        """An EOS id that plain decoding emits mid-sequence for the first time at index j >= 4:
        (eos, expected n_tokens = j + 1)."""
        row = self.ref[kind][0].tolist()
        j = next(j for j in range(4, NEW - 2) if row[j] not in row[:j])
        return row[j], j + 1


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module: the tensors are tiny, and on a loaded 2-core machine
    OpenMP's spin-waiting made each op ~20x slower with two threads (measured: 4.0 s vs 0.18 s
    for one decode)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(one_thread) -> Setup:
    return Setup()


def make_drafter(name: str, s: Setup, kind: str):
    """(drafter, prompt ids for the decoder, a callable run before each decode)."""
    ref = s.ref[kind][0]
    if name == "ngram-answer":  # prompt lookup when the answer is in the prompt: long matches
        return NgramDrafter(3, 1), ref[None], None
    if name == "ngram-random":
        return NgramDrafter(), s.ids, None
    if name == "replay-high":
        return ReplayDrafter(ref, error_rate=0.2, vocab_size=VOCAB, seed=1), None, None
    if name == "replay-zero":
        return ReplayDrafter(ref, error_rate=1.0, vocab_size=VOCAB), None, None
    if name == "draft-text":  # a text-only draft prefilled from the prompt ids by start()
        return DraftModelDrafter.from_lm(perturbed_head(), max_seq=64), s.ids, None
    if name == "draft-small":  # a different, smaller LLaMA (the tiny draft preset)
        lm = build_draft("llama-draft-tiny", vocab_size=VOCAB, seed=2).lm
        return DraftModelDrafter.from_lm(lm, max_seq=64), s.ids, None
    if name == "draft-embeds":  # cross-model: the draft prefilled with its own prompt embeddings
        d = DraftModelDrafter.from_lm(perturbed_head(), max_seq=64)
        return d, None, lambda: d.prefill(inputs_embeds=s.embeds[kind])
    raise AssertionError(name)


DRAFTERS = ["ngram-answer", "ngram-random", "replay-high", "replay-zero", "draft-text", "draft-small", "draft-embeds"]


def spec_run(s: Setup, drafter, kind: str, k: int, *, new: int = NEW, eos: int | None = None, prompt_ids=None, before=None):
    if before is not None:
        before()
    pre = s.engine.prefill(s.embeds[kind], [9])
    return speculative_decode(s.engine, pre, drafter, k, new, eos, prompt_ids=prompt_ids)


def check_stats(out, k: int) -> None:
    st = out.stats
    assert st.num_speculative_tokens == k
    assert st.n_drafted_tokens == k * st.n_verify_steps
    assert 0 <= st.n_accepted_tokens <= st.n_drafted_tokens
    assert st.n_emitted_tokens == out.n_tokens[0] - 1
    # tokens per verify step (bonus included): at most what the steps verified, and all of it
    # unless the last step was cut off at EOS / max_new_tokens (then by less than k + 1)
    assert st.n_accepted_tokens + st.n_verify_steps - k - 1 < st.n_emitted_tokens <= st.n_accepted_tokens + st.n_verify_steps
    if st.n_verify_steps:
        assert st.mean_accepted_length == pytest.approx(st.n_emitted_tokens / st.n_verify_steps)
        assert st.acceptance_rate == pytest.approx(st.n_accepted_tokens / st.n_drafted_tokens)
    assert st.n_host_syncs == st.n_verify_steps + 1  # the first token, then one read per verify step
    assert len(out.step_ms) == st.n_verify_steps
    assert st.draft_ms >= 0 and (st.verify_ms > 0) == (st.n_verify_steps > 0)
    assert sum(out.step_ms) == pytest.approx(st.draft_ms + st.verify_ms)


@pytest.mark.parametrize("name", DRAFTERS)
def test_greedy_ids_equal_plain_decoding(setup, name):
    """Every drafter, k in {1, 3, 5}, with and without EOS: the ids of plain greedy decoding."""
    kind = "embeds" if name in ("ngram-answer", "replay-high", "replay-zero", "draft-embeds") else "text"
    drafter, prompt_ids, before = make_drafter(name, setup, kind)
    eos, n_eos = setup.eos_for(kind)
    rates = []
    for k in KS:
        out = spec_run(setup, drafter, kind, k, prompt_ids=prompt_ids, before=before)
        assert out.tokens.tolist() == setup.ref[kind].tolist(), f"{name}, k = {k}"
        assert out.n_tokens == [NEW] and out.tokens.dtype == torch.int64
        check_stats(out, k)
        rates.append(out.stats.acceptance_rate)
        out = spec_run(setup, drafter, kind, k, eos=eos, prompt_ids=prompt_ids, before=before)
        assert out.tokens.tolist() == setup.ref[kind][:, :n_eos].tolist(), f"{name}, k = {k}, EOS {eos}"
        assert out.n_tokens == [n_eos]
        check_stats(out, k)
    if name == "replay-zero":
        assert rates == [0.0, 0.0, 0.0]
    if name in ("ngram-answer", "draft-embeds"):
        assert all(0.5 < r for r in rates), f"{name}: acceptance {rates} (the drafter should mostly agree)"
    if name in ("draft-text", "draft-embeds", "replay-high"):  # both branches of the rollback ran
        assert all(0 < r for r in rates) and any(r < 1 for r in rates), f"{name}: acceptance {rates}"


def test_exact_replay_accepts_everything_and_emits_k_plus_1_per_step(setup):
    ref = setup.ref["embeds"][0]
    for k in KS:
        out = spec_run(setup, ReplayDrafter(ref, error_rate=0.0, vocab_size=VOCAB), "embeds", k)
        assert out.tokens.tolist() == setup.ref["embeds"].tolist()
        steps = math.ceil((NEW - 1) / (k + 1))
        assert out.stats.n_verify_steps == steps
        # every step accepts all k drafts, except that the last one may draft past the reference
        assert out.stats.n_accepted_tokens >= k * (steps - 1)


def test_self_draft_accepts_everything(setup):
    """The target drafting for itself (same weights, same prompt) agrees on every token."""
    d = DraftModelDrafter.from_lm(setup.lm, max_seq=64)
    for k in KS:
        d.prefill(inputs_embeds=setup.embeds["embeds"])
        out = spec_run(setup, d, "embeds", k)
        assert out.tokens.tolist() == setup.ref["embeds"].tolist()
        assert out.stats.acceptance_rate == 1.0, out.stats


@pytest.mark.parametrize("new", [1, 2, 3])
def test_short_decodes_and_eos_as_first_token(setup, new):
    ref = setup.ref["embeds"]
    for k in (1, 5):
        out = spec_run(setup, ReplayDrafter(ref[0], error_rate=0.0, vocab_size=VOCAB), "embeds", k, new=new)
        assert out.tokens.tolist() == ref[:, :new].tolist() and out.n_tokens == [new]
        check_stats(out, k)
    first = int(ref[0, 0])
    out = spec_run(setup, NgramDrafter(), "embeds", 3, eos=first, new=new)
    assert out.tokens.tolist() == [[first]] and out.n_tokens == [1]
    assert out.stats.n_verify_steps == 0 and out.step_ms == [] and out.stats.mean_accepted_length is None


def test_decoder_refuses_what_it_cannot_do(setup):
    eng = setup.engine
    lm = setup.lm
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeDecoder(eng, NgramDrafter(), 16)
    big = fast_engine(lm, max_batch=2, max_seq=64, kv_bucket=8)
    embeds, lengths = stack_left_padded(prompts([5, 7]))
    with pytest.raises(ValueError, match="batch 1 only"):
        speculative_decode(big, big.prefill(embeds, lengths), NgramDrafter(), 3, 8, None)
    small = fast_engine(lm, max_seq=24, kv_bucket=8)
    with pytest.raises(ValueError, match="cache slots"):  # 9 + 12 - 1 + 5 = 25 > 24
        speculative_decode(small, small.prefill(setup.embeds["embeds"], [9]), NgramDrafter(), 5, 12, None)
    pre = eng.prefill(setup.embeds["embeds"], [9])
    speculative_decode(eng, pre, NgramDrafter(), 2, 4, None)
    with pytest.raises(ValueError, match="stale"):
        speculative_decode(eng, pre, NgramDrafter(), 2, 4, None)
    d = DraftModelDrafter.from_lm(perturbed_head(), max_seq=64)
    with pytest.raises(ValueError, match="no prompt"):
        spec_run(setup, d, "embeds", 2)
    with pytest.raises(ValueError, match="exactly one"):
        d.prefill()
    with pytest.raises(ValueError, match="max_seq"):
        tight = DraftModelDrafter.from_lm(perturbed_head(), max_seq=30)
        tight.prefill(inputs_embeds=setup.embeds["embeds"])
        spec_run(setup, tight, "embeds", 3)
    with pytest.raises(ValueError, match="error_rate"):
        ReplayDrafter(setup.ref["embeds"][0], error_rate=1.5, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        NgramDrafter(2, 3)
    with pytest.raises(ValueError, match=">= 1"):
        NgramDrafter(0)


def test_extend_matvec_variant_computes_the_same_logits(setup):
    """The weight-major reduction for a verify step's rows (FastOptions.extend_matvec) equals the
    cuBLAS path (eagerly here; compiled in the slow test below)."""
    ref_eng = fast_engine(setup.lm, max_seq=40, kv_bucket=8)
    mv_eng = fast_engine(setup.lm, max_seq=40, kv_bucket=8, extend_matvec=True)
    tokens = setup.ref["embeds"][:, :5]
    outs = []
    for eng in (ref_eng, mv_eng):
        eng.prefill(setup.embeds["embeds"], [9])
        outs.append(eng.extend(tokens).clone())
    diff = (outs[0] - outs[1]).abs()
    assert diff.max() < 1e-4, f"extend_matvec logits: max |diff| {diff.max():.3g}, mean {diff.mean():.3g}"


def test_engine_rewind_and_extend_warmup(setup):
    eng = fast_engine(setup.lm, max_seq=40, kv_bucket=8)
    eng.prefill(setup.embeds["embeds"], [9])
    eng.advance(3)
    eng.rewind(2)
    assert eng.position == 10
    with pytest.raises(ValueError, match="cannot rewind"):
        eng.rewind(2)  # into the prompt
    eng.warmup_extend(9, 8, [1, 4])  # eager engine: nothing to compile, no error
    with pytest.raises(ValueError, match="1..16"):
        eng.warmup_extend(9, 8, [17])


# ---------------------------------------------------------------------------------------------
# Prompt lookup: the fixed-shape search equals a direct implementation of vLLM's rule


def ngram_reference(hist: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    """vLLM's NgramProposer rule, written directly: the longest n in [n_min, n_max] whose last-n
    suffix occurs earlier (ending before the last token), its earliest occurrence, the tokens
    after it; past the end of the history the period (suffix end - occurrence end) repeats; no
    match: the last token k times."""
    L = len(hist)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        suffix = hist[L - n:]
        for e in range(n - 1, L - 1):
            if hist[e - n + 1:e + 1] == suffix:
                period = L - 1 - e
                return [hist[e + 1 + i % period] for i in range(k)]
    return [hist[-1]] * k


def test_ngram_lookup_matches_a_direct_implementation():
    # vLLM's docstring example: [1,2,3,4,2,3], min 2, max 3 -> the tokens after the match [2, 3]: 4, 2, 3
    d = NgramDrafter(3, 2)
    hist = [1, 2, 3, 4, 2, 3]
    d.start(_ctx(torch.tensor([hist[:-1]]), hist[-1], k=4))
    assert d.propose(4).tokens.tolist() == [[4, 2, 3, 4]]
    g = torch.Generator().manual_seed(0)
    checked = found = 0
    for trial in range(300):
        vocab = int(torch.randint(2, 6, (1,), generator=g))  # small vocabularies: many matches
        L = int(torch.randint(2, 30, (1,), generator=g))
        hist = torch.randint(0, vocab, (L,), generator=g).tolist()
        n_max = int(torch.randint(1, 5, (1,), generator=g))
        n_min = int(torch.randint(1, n_max + 1, (1,), generator=g))
        k = int(torch.randint(1, 8, (1,), generator=g))
        d = NgramDrafter(n_max, n_min)
        d.start(_ctx(torch.tensor([hist[:-1]]) if L > 1 else None, hist[-1], k=k))
        got = d.propose(k).tokens[0].tolist()
        want = ngram_reference(hist, k, n_max, n_min)
        assert got == want, f"trial {trial}: hist {hist}, n {n_min}..{n_max}, k {k}: {got} != {want}"
        checked += 1
        found += want != [hist[-1]] * k
    assert checked == 300 and found > 50  # the search found real matches, not only fallbacks


def test_ngram_history_grows_with_the_emitted_tokens():
    d = NgramDrafter(2, 1)
    d.start(_ctx(torch.tensor([[5, 6, 7]]), 8, k=3))
    d.accept(1, torch.tensor([[9, 5, 0, 0]]))  # one draft accepted + a correction; the rest garbage
    assert int(d.length) == 6 and d.hist[0, :6].tolist() == [5, 6, 7, 8, 9, 5]
    assert d.propose(3).tokens.tolist() == [[6, 7, 8]]  # "5" occurred at 0: what followed it


def _ctx(prompt_ids, first: int, *, k: int, new: int = 40):
    from stagewise.engine.speculative import DraftStart

    return DraftStart(torch.tensor([first]), prompt_ids, new, k, SamplingParams(), torch.zeros(1, dtype=torch.long), VOCAB)


def test_prompt_text_ids_drops_the_placeholder():
    ids = torch.tensor([1, 5, -200, 7, 8])
    assert prompt_text_ids(ids, 2).tolist() == [[1, 5, 7, 8]]
    assert prompt_text_ids(ids[:2], None).tolist() == [[1, 5]]
    assert prompt_text_ids(torch.tensor([1, 32000, 7]), placeholder_id=32000).tolist() == [[1, 7]]
    with pytest.raises(ValueError, match="placeholder_index"):
        prompt_text_ids(ids, 9)


# ---------------------------------------------------------------------------------------------
# Acceptance rules and their statistics


def test_greedy_acceptance_is_the_longest_matching_prefix():
    V = 7
    logits = torch.full((3, 4, V), -1.0)
    argmax = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    logits.scatter_(2, argmax[..., None], 1.0)
    draft = torch.tensor([[1, 2, 3], [1, 5, 3], [0, 2, 3]])
    n, tokens = accept_greedy(logits, draft)
    assert n.tolist() == [3, 1, 0]
    assert [tokens[b, :n[b] + 1].tolist() for b in range(3)] == [[1, 2, 3, 4], [1, 2], [1]]


def test_sampling_with_an_exact_draft_accepts_everything():
    """q = p exactly: the test u * q < p is u < 1, always true (u is in (0, 1))."""
    g = torch.Generator().manual_seed(0)
    B, k, V = 500, 4, 50
    logits = torch.randn(B, k + 1, V, generator=g) * 2
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9)
    p = torch.softmax(torch.stack([_warp(logits[:, i], params) for i in range(k + 1)], 1), -1)
    seeds = torch.arange(B) * 31 + 7
    draft = (p[:, :k].double().log() + gumbel(seeds.repeat_interleave(k), torch.arange(k).repeat(B) + 1, V, DRAFT_STREAM).view(B, k, V)).argmax(-1)
    n, tokens = accept_sampled(logits, Draft(draft, p[:, :k].clone()), params, seeds, torch.ones(1, dtype=torch.long))
    assert n.tolist() == [k] * B
    assert torch.equal(tokens[:, :k], draft)
    assert bool((p[:, k].gather(1, tokens[:, k:]) > 0).all()), "the bonus token must be drawn from p"


def _warp(logits, params):
    from stagewise.engine.sampling import warp_logits

    return warp_logits(logits, params)


def test_expected_accepted_length_and_its_inverse():
    assert expected_accepted_length(0.0, 4) == 1.0 and expected_accepted_length(1.0, 4) == 5.0
    assert expected_accepted_length(0.5, 2) == pytest.approx(1.75)
    for k, m in ((4, 3.0), (8, 4.3), (2, 1.5)):
        assert expected_accepted_length(alpha_for_accepted_length(m, k), k) == pytest.approx(m, abs=1e-9)
    with pytest.raises(ValueError):
        alpha_for_accepted_length(6.0, 4)


def test_stats_validate_their_counts():
    with pytest.raises(ValueError, match="n_accepted_tokens"):
        SpecStats("ngram", 3, n_verify_steps=1, n_drafted_tokens=3, n_accepted_tokens=4)
    with pytest.raises(ValueError, match="n_emitted_tokens"):
        SpecStats("ngram", 3, n_verify_steps=1, n_drafted_tokens=3, n_accepted_tokens=1, n_emitted_tokens=3)
    st = SpecStats("ngram", 3, n_verify_steps=2, n_drafted_tokens=6, n_accepted_tokens=3, n_emitted_tokens=5)
    rec = st.as_record()
    assert rec["acceptance_rate"] == 0.5 and rec["mean_accepted_length"] == 2.5 and rec["n_drafted_tokens"] == 6


def _chi2_gof(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of ``counts`` against ``probs`` (cells with expected count < 5 pooled)."""
    n = float(counts.sum())
    exp = probs.double() * n
    big = exp >= 5
    obs = torch.cat([counts[big].double(), counts[~big].double().sum()[None]])
    ex = torch.cat([exp[big], exp[~big].sum()[None]])
    keep = ex > 0
    obs, ex = obs[keep], ex[keep]
    return float(((obs - ex) ** 2 / ex).sum()), obs.numel() - 1


def test_speculative_sampling_loop_draws_from_the_target_distribution():
    """The whole round structure (drafts from q with the draft stream, accept_sampled with the
    acceptance stream, corrections and bonus tokens from stream 0, positions advancing by n + 1)
    on N independent rows of a context-free "model": the token at output position t has law P_t
    whatever came before, the draft's law is Q_t != P_t.

    Reasoning: speculative sampling emits exactly plain sampling's distribution (Leviathan et al.
    2023, Theorem 3.5), so each emitted position t must follow P_t, and positions must be
    independent (any reuse of a random number between two decisions would correlate them).
    Pearson's statistic of N draws against the exact law is chi-square with (cells - 1) degrees of
    freedom; each check fails at p < 1e-6, so a correct implementation fails one of the 6 checks
    for a fraction < 6e-6 of seed choices. Power: with N = 100,000 a bias of ~6 % on a token of
    probability ~0.2 fails (an acceptance test of min(1, 1.05 p / q) instead of min(1, p / q) was
    seen to fail at p = 8.5e-7; a residual of p instead of max(0, p - q) at p ~ 0). Deterministic:
    fixed seeds. The first-round acceptance fraction must also
    match sum_x min(P_1, Q_1) (the acceptance probability, Leviathan et al. section 3.3) within
    6 binomial standard deviations (failure probability < 1e-8)."""
    N, V, k, T = 100000, 6, 3, 5
    g = torch.Generator().manual_seed(4)
    P = torch.softmax(torch.randn(T + k + 1, V, generator=g) * 1.5, -1)  # positions 0 .. T + k
    Q = torch.softmax(torch.randn(T + k + 1, V, generator=g) * 1.5, -1)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)  # p = softmax(log P) = P
    seeds = torch.arange(N, dtype=torch.long) * 7919 + 1
    out = torch.full((N, T + k + 1), -1, dtype=torch.long)
    out[:, 0] = (P[0].log().double() + gumbel(seeds, torch.zeros(1, dtype=torch.long), V, 0)).argmax(-1)
    c = torch.ones(N, dtype=torch.long)  # next output position of each row
    first_round_accepts = None
    while bool((c < T).any()):
        live = c < T  # rows that still have positions to fill (the others idle at position 0)
        c = torch.where(live, c, 0)
        pos = c[:, None] + torch.arange(k)  # [N, k]
        noise = gumbel(seeds.repeat_interleave(k), pos.reshape(-1), V, DRAFT_STREAM).view(N, k, V)
        draft = (Q[pos].log().double() + noise).argmax(-1)  # [N, k] drafts from Q
        logits = P[c[:, None] + torch.arange(k + 1)].log()  # [N, k + 1, V]
        n, emitted = accept_sampled(logits, Draft(draft, Q[pos]), params, seeds, c)
        if first_round_accepts is None:
            first_round_accepts = int((n >= 1).sum())
        cols = c[:, None] + torch.arange(k + 1)  # [N, k + 1]
        write = (torch.arange(k + 1)[None] <= n[:, None]) & (cols < out.shape[1]) & live[:, None]
        out[write.nonzero(as_tuple=True)[0], cols[write]] = emitted[write]
        c = torch.where(live, c + n + 1, T)
    assert bool((out[:, :T] >= 0).all())
    for t in range(1, T):
        stat, df = _chi2_gof(torch.bincount(out[:, t], minlength=V), P[t])
        assert chi2_sf(stat, df) > 1e-6, f"position {t}: chi2 {stat:.1f} on {df} df"
    joint = torch.bincount(out[:, 1] * V + out[:, 2], minlength=V * V)
    stat, df = _chi2_gof(joint, (P[1][:, None] * P[2][None, :]).reshape(-1))
    assert chi2_sf(stat, df) > 1e-6, f"positions 1, 2 jointly: chi2 {stat:.1f} on {df} df"
    alpha = float(torch.minimum(P[1], Q[1]).sum())
    sd = math.sqrt(N * alpha * (1 - alpha))
    assert abs(first_round_accepts - N * alpha) < 6 * sd, f"accepted {first_round_accepts} of {N}, expected {N * alpha:.0f}"


def test_speculative_sampling_engine_matches_plain_sampling():
    """Two-sample test on the real engines: the first three tokens of speculative sampling (a
    perturbed-head draft model, k = 2) vs plain on-device sampling, 150 seeds each (disjoint seeds,
    so the samples are independent); top-k 3 keeps the joint outcomes few (<= 9).

    Reasoning: if both draw from the same law, Pearson's homogeneity statistic over the joint
    outcomes of (token 1, token 2) (cells with fewer than 10 pooled counts merged) is chi-square
    with (cells - 1) degrees of freedom; we fail at p < 1e-6 (a correct implementation fails for a
    fraction 1e-6 of seed choices). Deterministic: fixed seeds. The precise check of the rule is
    the previous test; this one ties the decoder's bookkeeping to the engine's sampler."""
    lm = tiny_lm(**GQA)
    params = SamplingParams(temperature=1.0, top_k=3, top_p=1.0)
    n = 150
    row = prompts([6], seed=9)[0][None]
    plain = fast_engine(lm, max_batch=n, max_seq=16, kv_bucket=8, sampling=params)
    plain_tok = plain.decode(plain.prefill(row.expand(n, -1, -1).contiguous(), [6] * n, seeds=list(range(n))), 3, None).tokens
    target = fast_engine(lm, max_seq=16, kv_bucket=8, sampling=params)
    draft = DraftModelDrafter.from_lm(perturbed_head(scale=0.3), max_seq=16)
    spec = []
    accepted = drafted = 0
    for s in range(n, 2 * n):
        pre = target.prefill(row, [6], seeds=[s])
        draft.prefill(inputs_embeds=row)
        out = speculative_decode(target, pre, draft, 2, 3, None)
        spec.append(out.tokens[0].tolist())
        accepted += out.stats.n_accepted_tokens
        drafted += out.stats.n_drafted_tokens
    assert 0 < accepted < drafted, "the test needs both accepted and rejected drafts"
    spec_tok = torch.tensor(spec)
    keys_p = (plain_tok[:, 1] * 1000 + plain_tok[:, 2]).tolist()
    keys_s = (spec_tok[:, 1] * 1000 + spec_tok[:, 2]).tolist()
    cells = sorted(set(keys_p) | set(keys_s))
    cp = torch.tensor([keys_p.count(c) for c in cells], dtype=torch.float64)
    cs = torch.tensor([keys_s.count(c) for c in cells], dtype=torch.float64)
    big = (cp + cs) >= 10
    cp = torch.cat([cp[big], cp[~big].sum()[None]])
    cs = torch.cat([cs[big], cs[~big].sum()[None]])
    keep = (cp + cs) > 0
    cp, cs = cp[keep], cs[keep]
    tot = cp + cs
    ep, es = tot * cp.sum() / tot.sum(), tot * cs.sum() / tot.sum()
    stat = float((((cp - ep) ** 2) / ep + ((cs - es) ** 2) / es).sum())
    df = cp.numel() - 1
    assert df >= 3, f"too few outcomes to test ({df + 1})"
    assert chi2_sf(stat, df) > 1e-6, f"homogeneity chi2 {stat:.1f} on {df} df"


def test_speculative_sampling_is_reproducible_and_exact_draft_accepts_all(setup):
    params = SamplingParams(temperature=0.9, top_k=20, seed=3)
    target = fast_engine(setup.lm, max_seq=64, kv_bucket=8, sampling=params)
    row = setup.embeds["embeds"]
    outs = []
    for drafter in (DraftModelDrafter.from_lm(setup.lm, max_seq=64), DraftModelDrafter.from_lm(setup.lm, max_seq=64)):
        drafter.prefill(inputs_embeds=row)
        out = speculative_decode(target, target.prefill(row, [9], seeds=[11]), drafter, 3, 16, None)
        # the target as its own draft: q equals p up to fp32 summation order (~1e-7 relative), so a
        # rejection needs u > 1 - 1e-7: negligible over 16 tokens
        assert out.stats.acceptance_rate == 1.0, out.stats
        outs.append(out.tokens)
    assert torch.equal(outs[0], outs[1])
    ngram = [speculative_decode(target, target.prefill(row, [9], seeds=[11]), NgramDrafter(2, 1), 3, 16, None,
                                prompt_ids=setup.ids).tokens for _ in range(2)]
    assert torch.equal(*ngram)


# ---------------------------------------------------------------------------------------------
# Draft models: the llama-68m preset, checkpoint folders, vocabulary checks


def test_llama_68m_preset_has_the_published_shapes():
    d = build_draft("llama-68m", device="meta")
    cfg = d.lm.config
    shapes = (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size,
              cfg.vocab_size, cfg.max_position_embeddings)
    assert shapes == (768, 2, 12, 3072, 32000, 2048)
    n = sum(p.numel() for p in d.lm.parameters())
    assert 68.0e6 < n < 68.1e6, n  # "68M": 2 x 24.6M (embedding, head) + 2 layers x 9.4M
    assert d.tokenizer is None and d.vocab_size == 32000
    with pytest.raises(ValueError, match="vocab_size"):
        build_draft("llama-draft-tiny")
    with pytest.raises(ValueError, match="unknown"):
        build_draft("llama-7b")


def _save_checkpoint(folder, vocab: int, tokenizer_file) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    if tokenizer_file is not None:
        (folder / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())


def test_draft_checkpoint_loads_and_its_vocabulary_is_checked(tmp_path):
    from stagewise.errors import InputError
    from stagewise.models.draft import check_vocab, from_pretrained, load_draft
    from stagewise.preprocess.prompt import TINY_TOKENIZER, load_tokenizer

    folder = tmp_path / "draft"
    _save_checkpoint(folder, 1000, TINY_TOKENIZER)
    d = load_draft(str(folder), device="cpu", dtype=torch.float32)
    assert d.source == folder and d.vocab_size == 1000 and d.lm.config.num_hidden_layers == 1
    target_tok = load_tokenizer(TINY_TOKENIZER, ["<ev_patch>"])  # 977 pieces + an added token
    assert check_vocab(d.tokenizer, target_tok, draft_vocab=d.vocab_size, target_vocab=978, where=folder) == 977
    assert check_vocab(None, None, draft_vocab=32000, target_vocab=32003) == 32000  # random presets
    from conftest import LLAMA_TOKENIZER

    if LLAMA_TOKENIZER.is_file():  # a draft with another tokenizer is refused, naming an id
        with pytest.raises(InputError, match=r"draft.*tokenizer differs.*id \d+"):
            check_vocab(d.tokenizer, LLAMA_TOKENIZER, draft_vocab=1000, target_vocab=32000, where=folder)
    with pytest.raises(InputError, match="not found"):
        from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        from_pretrained(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(InputError, match="must be a LLaMA"):
        from_pretrained(bad)
    (bad / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(InputError, match="no weights"):
        from_pretrained(bad)
    with pytest.raises(ValueError, match="neither a preset"):
        load_draft("llama-9000", device="cpu", dtype=torch.float32)


def test_a_draft_with_a_larger_vocabulary_proposes_shared_ids_only(setup):
    """Ids past the shared vocabulary mean something else to the target (added tokens): the draft
    never proposes them, and the greedy ids stay those of plain decoding."""
    lm = build_draft("llama-draft-tiny", vocab_size=VOCAB + 40, seed=3).lm
    with torch.no_grad():
        lm.lm_head.weight[VOCAB:] += 5.0  # make the extra ids the draft's favourites
    d = DraftModelDrafter.from_lm(lm, max_seq=64, shared_vocab=VOCAB)
    proposed = []
    real_propose = d.propose

    def spy(k):
        draft = real_propose(k)
        proposed.append(draft.tokens.clone())
        return draft

    d.propose = spy
    out = spec_run(setup, d, "text", 3, prompt_ids=setup.ids)
    assert out.tokens.tolist() == setup.ref["text"].tolist()
    assert proposed and int(torch.cat(proposed, 1).max()) < VOCAB


@pytest.mark.slow
def test_benchmark_smoke_runs_on_cpu(tmp_path):
    """benchmarks/speculative.py end to end on tiny shapes (its figures mean nothing on CPU)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "spec.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.speculative", "--smoke", "--repeats", "1",
                           "--new-tokens", "12", "--out", str(out)], cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert set(doc["verify"]["verify_step_ms"]) == {str(k) for k in range(1, 9)}
    assert all(r["calibrated"] for r in doc["replay"]["sweep"])  # fp32: the reference is exact at once
    assert "engine cost at controlled acceptance" in doc["what"]
    assert doc["stage_options"]["gpu_preprocess"] and doc["stage_options"]["vision"]["fuse"]  # the fast stages, applied
    assert doc["agreement"]["ngram_k4"]["same_ids"] and doc["agreement"]["ngram_k8"]["same_ids"]  # fp32: exact
    assert any("ms/token at m=3.0, replay drafter" in line for line in proc.stdout.splitlines()[-10:])  # table last


@pytest.mark.slow
def test_compiled_engines_give_the_same_speculative_ids():
    """The torch.compile path (verify steps and draft steps through the compiled layer functions,
    warmed by warmup_extend) without CUDA graphs: the same ids as the eager engine's plain decode."""
    lm = tiny_lm(**GQA)
    row = prompts([9])[0][None]
    eager = fast_engine(lm, max_seq=64, kv_bucket=8)
    ref = eager.decode(eager.prefill(row, [9]), NEW, None).tokens
    target = fast_engine(lm, max_seq=64, kv_bucket=8, compile=True, matvec=True)
    dec = SpeculativeDecoder(target, ReplayDrafter(ref[0], error_rate=0.3, vocab_size=VOCAB, seed=2), 3)
    dec.warmup(9, NEW)
    assert target.warmup_ms > 0
    out = dec.decode(target.prefill(row, [9]), NEW, None)
    assert out.tokens.tolist() == ref.tolist()
    variant = fast_engine(lm, max_seq=64, kv_bucket=8, compile=True, matvec=True, extend_matvec=True)
    out = speculative_decode(variant, variant.prefill(row, [9]), ReplayDrafter(ref[0], error_rate=0.3, vocab_size=VOCAB, seed=2), 3, NEW, None)
    assert out.tokens.tolist() == ref.tolist()
    draft = DraftModelDrafter(fast_engine(perturbed_head(), max_seq=64, kv_bucket=8, compile=True, matvec=True))
    draft.warmup(9, NEW, 3)
    draft.prefill(inputs_embeds=row)
    out = speculative_decode(target, target.prefill(row, [9]), draft, 3, NEW, None)
    assert out.tokens.tolist() == ref.tolist()
    assert 0 < out.stats.acceptance_rate < 1


# ---------------------------------------------------------------------------------------------
# The three model families, through their own stages 1-4


@pytest.fixture(scope="module")
def families(tmp_path_factory, one_thread):
    """The tiny EventGPT, LLaVA-1.5 and Video-LLaVA (LLaMA-2 tokenizer, random weights), each with
    its prepared prompt: ``{name: (model, Prepared, prompt embeddings [1, S, D])}``."""
    import numpy as np
    from conftest import LLAMA_TOKENIZER, require
    from PIL import Image

    from stagewise.inputs.simulate import moving_edge_events
    from stagewise.models.base import Sample
    from stagewise.models.registry import load_model
    from stagewise.preprocess.prompt import DEFAULT_QUERY

    tok = str(require(LLAMA_TOKENIZER))
    root = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    samples = {
        "eventgpt": Sample("ev", DEFAULT_QUERY, events=moving_edge_events(seed=0)),
        "llava-1.5": Sample("im", DEFAULT_QUERY, image_path=root / "000.png"),
        "video-llava": Sample("vid", DEFAULT_QUERY, video_path=root),
    }
    out = {}
    for fam, preset in (("eventgpt", "eventgpt-tiny"), ("llava-1.5", "llava-1.5-tiny"), ("video-llava", "video-llava-tiny")):
        model = load_model(preset, "random", device=torch.device("cpu"), dtype=torch.float32, tokenizer=tok)
        s = samples[fam]
        prep = model.preprocess(model.load(s), s.query)
        with torch.inference_mode():
            row = model.build_inputs_embeds(prep, model.encode_vision(prep))
        out[fam] = (model, prep, row[None].clone())
    return out


@pytest.mark.parametrize("fam", ["eventgpt", "llava-1.5", "video-llava"])
def test_three_families_greedy_ids_equal_plain(families, fam):
    """Each family's own prompt (vision spliced in): prompt lookup over its text ids and the tiny
    text-only draft LLaMA (vocabulary checked against the family's tokenizer) give plain greedy ids;
    for Video-LLaVA also the cross-model draft: EventGPT on its event stream (its own multimodal
    prompt), ids shared through the common LLaMA-2 pieces."""
    from stagewise.models.draft import check_vocab

    model, prep, row = families[fam]
    S, new = row.shape[1], 12
    target = fast_engine(model.lm, max_seq=S + new + 16, kv_bucket=64)
    ref = target.decode(target.prefill(row, [S]), new, None).tokens
    if fam == "eventgpt":
        text = prompt_text_ids(prep.input_ids, prep.placeholder_index)
    else:
        text = prompt_text_ids(prep.input_ids, placeholder_id=model.placeholder_id)
    assert text.shape[1] == prep.input_ids.shape[0] - 1
    vocab = model.lm.lm_head.weight.shape[0]
    drafters = [(NgramDrafter(3, 1), None)]
    draft = build_draft("llama-draft-tiny", vocab_size=vocab, seed=1)
    shared = check_vocab(None, model.tokenizer, draft_vocab=draft.vocab_size, target_vocab=vocab)
    assert shared == 32000
    drafters.append((DraftModelDrafter.from_lm(draft.lm, max_seq=text.shape[1] + new + 16, shared_vocab=shared), None))
    if fam == "video-llava":
        ev_model, ev_prep, ev_row = families["eventgpt"]
        shared = check_vocab(ev_model.tokenizer, model.tokenizer, draft_vocab=ev_model.lm.lm_head.weight.shape[0], target_vocab=vocab)
        assert shared == 32000  # the added tokens (<ev_patch>... vs <image>...) are not shared
        cross = DraftModelDrafter.from_lm(ev_model.lm, max_seq=ev_row.shape[1] + new + 16, shared_vocab=shared)
        drafters.append((cross, lambda: cross.prefill(inputs_embeds=ev_row)))
    for drafter, before in drafters:
        for k in (1, 3):
            if before is not None:
                before()
            out = speculative_decode(target, target.prefill(row, [S]), drafter, k, new, None, prompt_ids=text)
            assert out.tokens.tolist() == ref.tolist(), f"{fam}, {drafter.name}, k = {k}"
            check_stats(out, k)


# ---------------------------------------------------------------------------------------------
# CUDA: compiled layer functions + CUDA graphs (verify and draft steps replayed)


@pytest.mark.gpu
@pytest.mark.gpu
@pytest.mark.parametrize("extend_matvec", [False, True])
def test_cuda_graph_speculative_ids_equal_plain_fp32(extend_matvec):
    torch.backends.cuda.matmul.allow_tf32 = False
    lm = tiny_lm(**GQA).cuda()
    row = prompts([30])[0][None].cuda()
    new, k = 24, 4
    target = fast_engine(lm, max_seq=64, kv_bucket=16, extend_matvec=extend_matvec)  # crosses buckets 32 -> 48 -> 64
    target.warmup(30, new, batch_sizes=[1])
    ref = target.decode(target.prefill(row, [30]), new, None).tokens
    dec = SpeculativeDecoder(target, ReplayDrafter(ref[0].cuda(), error_rate=0.3, vocab_size=VOCAB, seed=1), k)
    dec.warmup(30, new)
    assert {key for key in target._graphs if key[0] == "extend"} == {("extend", 1, k + 1, L) for L in (48, 64)}
    captured = set(target._graphs)
    out = dec.decode(target.prefill(row, [30]), new, None)
    assert out.tokens.tolist() == ref.tolist()
    assert set(target._graphs) == captured, "a verify step was captured outside warm-up"
    assert 0 < out.stats.acceptance_rate < 1 and all(ms > 0 for ms in out.step_ms)
    draft = DraftModelDrafter(fast_engine(perturbed_head().cuda(), max_seq=64, kv_bucket=16))
    draft.warmup(30, new, k)
    n_graphs = len(draft.engine._graphs)
    draft.prefill(inputs_embeds=row)
    out = speculative_decode(target, target.prefill(row, [30]), draft, k, new, None)
    assert out.tokens.tolist() == ref.tolist()
    assert len(draft.engine._graphs) == n_graphs, "a draft step was captured outside warm-up"
    ngram = speculative_decode(target, target.prefill(row, [30]), NgramDrafter(3, 1), k, new, None, prompt_ids=ref.cuda())
    assert ngram.tokens.tolist() == ref.tolist() and ngram.stats.acceptance_rate > 0.5


@pytest.mark.parametrize("preset", ["eventgpt-tiny", "llava-1.5-tiny", "video-llava-tiny"])
def test_runs_with_speculate_give_the_plain_greedy_ids_and_record_acceptance(preset, tmp_path):
    """``stagewise run --speculate ...`` through the runner for each family: the same greedy ids as the
    plain fast engine, acceptance fields in the records, the draft model's stages timed on their own;
    Video-LLaVA also with EventGPT on the event stream as its multimodal draft."""
    from stagewise.cli import main
    from stagewise.results.records import read_samples

    common = ["run", "--preset", preset, "--engine", "fast", "--num-samples", "2", "--output-len", "fixed:10", "--no-ceilings", "--warmup", "0"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    plain = [r.output_ids for r in read_samples(tmp_path / "plain" / "samples.jsonl")]
    variants = {"ngram": ["--speculate", "ngram", "--num-speculative-tokens", "3"],
                "draft": ["--speculate", "draft_model", "--draft-model", "llama-draft-tiny", "--num-speculative-tokens", "2"]}
    if preset == "video-llava-tiny":
        variants["mm"] = ["--speculate", "multimodal_draft", "--draft-model", "eventgpt-tiny"]
    for name, flags in variants.items():
        assert main([*common, *flags, "--out", str(tmp_path / name)]) == 0, name
        recs = read_samples(tmp_path / name / "samples.jsonl")
        assert [r.output_ids for r in recs] == plain, name
        for r in recs:
            assert r.speculative_method in ("ngram", "draft_model") and r.n_verify_steps >= 1
            assert 0 <= r.n_accepted_tokens <= r.n_drafted_tokens and r.mean_accepted_length >= 1
            assert r.draft_ms >= 0 and r.verify_ms > 0 and r.draft_ms + r.verify_ms <= r.decode_ms * 1.05
            if name == "ngram":
                assert r.draft_stage_ms == {}
            else:
                assert "draft_prefill" in r.draft_stage_ms and r.stage_gap < 0.02
        if name == "mm":
            assert set(recs[0].draft_stage_ms) == {"draft_load", "draft_preprocess", "draft_vision", "draft_prefill"}
