"""Sampling with ``generate``'s semantics: the reference engine equals ``generate`` token for token,
the fast engine's on-device sampler equals it in distribution (statistical tests, reasoning stated)."""

from __future__ import annotations

import math

import pytest
import torch
from test_engine_fast import GQA, fast_engine, prompts, run, tiny_lm

from stagewise.engine.base import stack_left_padded
from stagewise.engine.hf import HFEngine, HFOptions
from stagewise.engine.sampling import (
    SamplingParams,
    _splitmix64,
    draw_tokens,
    hf_warpers,
    row_seed,
    uniform,
    warp_logits,
)

PARAMS = [
    SamplingParams(temperature=0.4, top_k=50, top_p=1.0),  # the EventGPT authors' script
    SamplingParams(temperature=0.7, top_k=20, top_p=0.9),
    SamplingParams(temperature=1.0, top_k=0, top_p=0.8),
    SamplingParams(temperature=1.3, top_k=5, top_p=1.0),
]


def chi2_sf(x: float, df: int) -> float:
    """Upper tail of the chi-square distribution (regularized upper incomplete gamma Q(df/2, x/2)),
    by the series of the lower one; exact enough for the thresholds used here."""
    a, z = df / 2.0, x / 2.0
    term = total = 1.0 / a
    n = 0
    while term > 1e-15 * total and n < 100000:
        n += 1
        term *= z / (a + n)
        total += term
    lower = math.exp(-z + a * math.log(z) - math.lgamma(a)) * total
    return max(0.0, 1.0 - lower)


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}")
def test_warping_equals_transformers_warpers(params):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 1000, generator=g) * 3
    logits[0, :10] = logits[0, 10]  # ties at the top-k boundary are kept, as transformers keeps them
    ref = hf_warpers(params)(torch.empty(4, 0, dtype=torch.long), logits.clone())
    got = warp_logits(logits, params)
    assert torch.equal(torch.isinf(ref), torch.isinf(got)), "different tokens filtered"
    keep = ~torch.isinf(ref)
    diff = (ref[keep] - got[keep]).abs().max()
    assert diff == 0, f"kept scores differ: max |diff| {diff:.3g}"


def test_uniforms_are_reproducible_and_in_range():
    seeds = torch.tensor([0, 1, 2**62], dtype=torch.long)
    u = uniform(seeds, torch.tensor([5]), 1000)
    assert u.shape == (3, 1000) and u.dtype == torch.float64
    assert 0 < u.min() and u.max() < 1
    assert torch.equal(u, uniform(seeds, torch.tensor([5]), 1000))
    assert not torch.equal(u, uniform(seeds, torch.tensor([6]), 1000))
    assert not torch.equal(u, uniform(seeds, torch.tensor([5]), 1000, stream=1))
    # 3000 uniforms: mean 0.5 +- 0.0053 (1 sigma); 6 sigma is a failure probability < 1e-8
    assert abs(float(u.mean()) - 0.5) < 6 * math.sqrt(1 / 12 / u.numel())


def test_splitmix64_matches_its_definition():
    """The int64 hash equals splitmix64 computed with Python's unbounded integers mod 2^64."""

    def ref(x: int) -> int:
        m = (1 << 64) - 1
        z = (x + 0x9E3779B97F4A7C15) & m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    xs = [0, 1, 12345, 2**62 + 7, 2**63 - 1, -1, -(2**63)]
    got = _splitmix64(torch.tensor(xs, dtype=torch.long)).tolist()
    assert [g & ((1 << 64) - 1) for g in got] == [ref(x & ((1 << 64) - 1)) for x in xs]


def test_row_seed_is_stable_and_distinct():
    assert row_seed(0, "a") == row_seed(0, "a") and row_seed(0, "a") != row_seed(1, "a") != row_seed(0, "b")
    assert 0 <= row_seed(123, "sample@4") < 2**63


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}")
def test_gumbel_sampler_draws_from_the_warped_distribution(params):
    """Goodness of fit of the fast engine's sampler against softmax(warped logits).

    Reasoning: ``select_tokens`` draws ``argmax(scores + Gumbel)``; if it samples from
    ``p = softmax(warp_logits(logits))`` (which the previous test shows equal to ``generate``'s warped
    distribution), the counts of N independent draws are multinomial(N, p), and Pearson's statistic
    over the tokens with expected count >= 5 (the rest pooled) follows a chi-square distribution
    with (cells - 1) degrees of freedom. The draws are a fixed function of the seeds, so the test
    is deterministic; a correct sampler would fail it for a fraction 1e-6 of seed choices (the
    threshold on the p-value), a sampler off by a few percent on a likely token fails it for all.
    Tokens outside the kept set must never be drawn (exact)."""
    n = 20000
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(1, 400, generator=g) * 2.5
    p = torch.softmax(warp_logits(logits, params), dim=-1)[0].double()  # [V]
    seeds = torch.arange(n, dtype=torch.long) * 7919 + 1
    draws = draw_tokens(logits.expand(n, -1), params, seeds, torch.tensor([3]))  # [n]
    assert bool((p[draws] > 0).all()), "a filtered token was drawn"
    counts = torch.bincount(draws, minlength=p.numel()).double()
    expected = p * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if exp[-1] < 5:  # pool too small to be its own cell: merge it into the last big one
        obs = torch.cat([obs[:-2], obs[-2:].sum()[None]])
        exp = torch.cat([exp[:-2], exp[-2:].sum()[None]])
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = obs.numel() - 1
    pval = chi2_sf(stat, df) if df > 0 else 1.0
    assert pval > 1e-6, f"chi2 {stat:.1f} on {df} df, p = {pval:.2e}"


def test_hf_engine_equals_generate_when_seeded():
    lm = tiny_lm(**GQA)
    embeds = prompts([9])[0][None]
    for params in PARAMS[:2]:
        torch.manual_seed(params.seed)
        ref = lm.generate(inputs_embeds=embeds, attention_mask=torch.ones(1, 9, dtype=torch.long), do_sample=True,
                          temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                          max_new_tokens=20, min_new_tokens=20, pad_token_id=0)[0].tolist()
        engine = HFEngine(lm, HFOptions(sampling=params))
        out = engine.decode(engine.prefill(embeds, [9]), 20, None).tokens[0].tolist()
        assert out == ref, f"{params}: {out} vs generate {ref}"


def test_fast_engine_sampling_is_reproducible_and_batch_independent():
    lm = tiny_lm(**GQA)
    params = SamplingParams(temperature=0.9, top_k=30, top_p=0.95, seed=5)
    fast = fast_engine(lm, max_batch=3, max_seq=48, kv_bucket=8, sampling=params)
    rows = prompts([7, 9, 4])
    embeds, lengths = stack_left_padded(rows)
    a = fast.decode(fast.prefill(embeds, lengths, seeds=[11, 12, 13]), 16, None).tokens
    b = fast.decode(fast.prefill(embeds, lengths, seeds=[11, 12, 13]), 16, None).tokens
    assert torch.equal(a, b), "same seeds, different tokens"
    c = fast.decode(fast.prefill(embeds, lengths, seeds=[21, 22, 23]), 16, None).tokens
    assert not torch.equal(a, c)
    e1, l1 = stack_left_padded(rows[1:2])
    single = fast.decode(fast.prefill(e1, l1, seeds=[12]), 16, None).tokens
    assert single[0].tolist() == a[1].tolist(), "a row's draws depend on its batch mates"


def test_fast_engine_matches_generate_in_distribution():
    """Two-sample test: the fast engine's first two sampled tokens vs the reference engine's
    (= ``generate``, previous test), over 600 seeds each.

    Reasoning: both draw (token1, token2) from the same joint distribution if the fast engine's
    logits equal HF's (fp32: they agree to ~1e-6, far below what moves a probability) and its
    sampler is correct. Under that hypothesis Pearson's homogeneity statistic over the joint
    outcomes (cells with fewer than 10 pooled counts merged) is chi-square with (cells - 1)
    degrees of freedom; we fail at p < 1e-6. Deterministic: both sides use fixed seeds."""
    lm = tiny_lm(**GQA)
    params = SamplingParams(temperature=1.5, top_k=8, top_p=0.95)
    n = 600
    row = prompts([6], seed=9)[0]
    fast = fast_engine(lm, max_batch=n, max_seq=16, kv_bucket=8, sampling=params)
    embeds, lengths = stack_left_padded([row] * n)
    fast_tok = fast.decode(fast.prefill(embeds, lengths, seeds=list(range(n))), 2, None).tokens
    ref = HFEngine(lm, HFOptions(sampling=params))
    hf_tok = torch.cat([ref.decode(ref.prefill(row[None], [6], seeds=[s]), 2, None).tokens for s in range(n)])
    keys_f = (fast_tok[:, 0] * 1000 + fast_tok[:, 1]).tolist()
    keys_h = (hf_tok[:, 0] * 1000 + hf_tok[:, 1]).tolist()
    cells = sorted(set(keys_f) | set(keys_h))
    cf = torch.tensor([keys_f.count(k) for k in cells], dtype=torch.float64)
    ch = torch.tensor([keys_h.count(k) for k in cells], dtype=torch.float64)
    big = (cf + ch) >= 10
    cf = torch.cat([cf[big], cf[~big].sum()[None]])
    ch = torch.cat([ch[big], ch[~big].sum()[None]])
    keep = (cf + ch) > 0
    cf, ch = cf[keep], ch[keep]
    tot = cf + ch
    ef, eh = tot * cf.sum() / tot.sum(), tot * ch.sum() / tot.sum()  # expected counts under homogeneity
    stat = float((((cf - ef) ** 2) / ef + ((ch - eh) ** 2) / eh).sum())
    df = cf.numel() - 1
    assert df >= 3, f"too few outcomes to test ({df + 1})"
    pval = chi2_sf(stat, df)
    assert pval > 1e-6, f"homogeneity chi2 {stat:.1f} on {df} df, p = {pval:.2e}"


def test_greedy_is_the_default_and_equals_argmax():
    lm = tiny_lm()
    fast = fast_engine(lm, max_seq=32, kv_bucket=8)
    assert fast.sampling.greedy and fast.sampling.describe() == {"decoding": "greedy"}
    _, out = run(fast, prompts([6]), new_tokens=6)
    _, ref = run(HFEngine(lm), prompts([6]), new_tokens=6)
    assert out.tokens.tolist() == ref.tokens.tolist()


def test_bad_sampling_params_name_the_field():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(temperature=1, top_p=0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(temperature=1, top_k=-2)


def test_deterministic_attention_is_asked_for_when_sampling_and_recorded_as_applied():
    from stagewise.config import RunConfig
    from stagewise.runner import engine_facts

    sampling = SamplingParams(temperature=0.8, top_p=0.9, seed=3)
    assert RunConfig(engine="fast", deterministic=True).engine_options(max_batch=1, max_seq=32).deterministic is True
    assert RunConfig(engine="fast").engine_options(max_batch=1, max_seq=32).deterministic is None  # decided by the engine
    lm = tiny_lm()
    sampled = fast_engine(lm, max_seq=32, sampling=sampling)
    greedy = fast_engine(lm, max_seq=32)
    on_cuda = sampled.device.type == "cuda"
    # Applied, not asked: CPU attention is deterministic already, so the option is a no-op there.
    assert engine_facts(sampled)["deterministic_attention"] is on_cuda
    assert engine_facts(greedy)["deterministic_attention"] is False
    assert engine_facts(fast_engine(lm, max_seq=32, deterministic=True))["deterministic_attention"] is on_cuda


@pytest.mark.gpu
def test_seeded_sampling_repeats_its_ids_on_cuda():
    lm = tiny_lm(**GQA).cuda().to(torch.bfloat16)
    sampling = SamplingParams(temperature=1.0, top_p=0.95, seed=11)
    rows = [p.cuda().to(torch.bfloat16) for p in prompts([9, 5])]
    outs = []
    for _ in range(2):
        engine = fast_engine(lm, max_batch=2, max_seq=64, sampling=sampling)
        outs.append(run(engine, rows, new_tokens=24)[1].tokens.tolist())
    assert engine.deterministic and outs[0] == outs[1]


@pytest.mark.parametrize("rows,group", [(1, 1), (5, 1), (4, 4), (12, 4)])  # decode / verify steps, MHA and GQA
def test_written_out_decode_attention_equals_sdpa(rows, group):
    """attend_decode_math (the deterministic engine's step attention) is SDPA's function: fp32, the
    same bias (hidden slots at -inf), rows = G * S query rows per KV head."""
    from stagewise.engine.layers import attend_decode, attend_decode_math

    g = torch.Generator().manual_seed(3)
    B, Hkv, L, hd = 2, 2, 37, 16
    q = torch.randn(B, Hkv, rows, hd, generator=g)
    k, v = torch.randn(B, Hkv, L, hd, generator=g), torch.randn(B, Hkv, L, hd, generator=g)
    bias = torch.zeros(B, 1, 1, L)
    bias[0, ..., :5] = float("-inf")  # a left-padded row
    bias[:, ..., -3:] = float("-inf")  # slots not yet written
    torch.testing.assert_close(attend_decode_math(q, k, v, bias), attend_decode(q, k, v, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["compiled", "sdpa"])
def test_deterministic_greedy_repeats_its_logits_on_cuda(impl):
    """With FastOptions.deterministic, two engines give the same greedy ids (bf16), whichever step
    attention they use; the engine records the one it applied."""
    lm = tiny_lm(**GQA).cuda().to(torch.bfloat16)
    rows = [p.cuda().to(torch.bfloat16) for p in prompts([9, 5])]
    outs = []
    for _ in range(2):
        engine = fast_engine(lm, max_batch=2, max_seq=64, deterministic=True, deterministic_step_attention=impl)
        outs.append(run(engine, rows, new_tokens=24)[1].tokens.tolist())
    assert engine.deterministic and engine.step_attention == impl and outs[0] == outs[1]
