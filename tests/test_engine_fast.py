"""The fast engine against the reference HF engine, on tiny random LLaMAs (fp32, CPU).

Greedy token ids must be EQUAL: in fp32 the two engines differ only by summation order
(~1e-6 on logits), and the tiny models are initialized with a large std (0.2) so that the gap
between the top two logits is far larger than that on every step these tests take.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stagewise.engine import make_engine
from stagewise.engine.base import padding_mask, stack_left_padded
from stagewise.engine.fast import FastEngine, FastOptions
from stagewise.engine.hf import HFEngine, HFOptions
from stagewise.engine.sampling import SamplingParams

HIDDEN = 64


def tiny_lm(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    kw = {
        "vocab_size": 101, "hidden_size": HIDDEN, "intermediate_size": 112, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128,
        "initializer_range": 0.2, "rms_norm_eps": 1e-5,
    }
    kw.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()


def prompts(lengths, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, HIDDEN, generator=g) for n in lengths]


def fast_engine(lm, **options) -> FastEngine:
    return FastEngine(lm, FastOptions(**options))


def run(engine, rows, new_tokens: int = 12, eos: int | None = None):
    embeds, lengths = stack_left_padded(rows)
    pre = engine.prefill(embeds, lengths)
    return pre, engine.decode(pre, new_tokens, eos)


def assert_logits_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    diff = (a - b).abs()
    assert diff.max() <= tol, f"prefill logits: max |diff| {diff.max():.3g}, mean {diff.mean():.3g} (tol {tol})"


GQA = {"num_key_value_heads": 2}
VARIANTS = {
    "mha": {},
    "gqa": GQA,
    "mqa": {"num_key_value_heads": 1},
    "head_dim_32": {"head_dim": 32, "num_attention_heads": 4, "num_key_value_heads": 1},  # H*hd != hidden
    "bias": {"attention_bias": True, "mlp_bias": True},
    "rope_linear": {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}},
    "rope_llama3": {"rope_parameters": {
        "rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
    }},
    "tied": {"tie_word_embeddings": True},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batch1_matches_hf(variant):
    lm = tiny_lm(**VARIANTS[variant])
    hf_pre, hf_out = run(HFEngine(lm), prompts([9]))
    fast = fast_engine(lm, max_seq=64, kv_bucket=8)
    fast_pre, fast_out = run(fast, prompts([9]))
    assert_logits_close(fast_pre.logits, hf_pre.logits)
    assert fast_out.tokens.tolist() == hf_out.tokens.tolist()
    assert fast_out.n_tokens == hf_out.n_tokens == [12]
    assert len(fast_out.step_ms) == 11
    assert fast_out.tokens.dtype == torch.int64 and fast_out.tokens.device.type == "cpu"


@pytest.mark.parametrize("variant", ["mha", "gqa"])
def test_left_padded_batch_matches_hf_and_batch1(variant):
    lm = tiny_lm(**VARIANTS[variant])
    rows = prompts([7, 12, 3])
    hf_pre, hf_out = run(HFEngine(lm), rows)
    fast = fast_engine(lm, max_batch=4, max_seq=40, kv_bucket=8)
    fast_pre, fast_out = run(fast, rows)
    assert_logits_close(fast_pre.logits, hf_pre.logits)
    assert fast_out.tokens.tolist() == hf_out.tokens.tolist()
    for b, row in enumerate(rows):  # a row's output does not depend on its batch mates
        _, single = run(fast, [row])
        assert single.tokens[0].tolist() == fast_out.tokens[b].tolist(), f"row {b}"


def first_index_plus_one(row: list[int], eos: int, n: int) -> int:
    return row.index(eos) + 1 if eos in row else n


@pytest.mark.parametrize("everyone_stops", [True, False])
def test_eos_rows_stop_at_different_times(everyone_stops):
    lm = tiny_lm(**GQA)
    rows = prompts([5, 8, 6], seed=4)
    fast = fast_engine(lm, max_batch=3, max_seq=48, kv_bucket=8)
    _, free = run(fast, rows, new_tokens=16)
    table = free.tokens.tolist()
    # EOS: a token that is no row's first token, and that either every row produces (all stop
    # early: the output is trimmed) or only some do (one row runs to the end)
    candidates = [t for t in table[0][1:] if t not in free.tokens[:, 0].tolist()]
    eos = next(t for t in candidates if all(t in r for r in table) == everyone_stops)
    expected = [first_index_plus_one(r, eos, 16) for r in table]
    assert len(set(expected)) > 1, f"rows should stop at different times: {expected}"
    assert (max(expected) < 16) == everyone_stops

    _, hf_out = run(HFEngine(lm), rows, new_tokens=16, eos=eos)
    for check_every in (1, 4, 16):  # host looks at the flags rarely: same result, trimmed
        fast.check_every = check_every  # (an attribute the tests may set between runs)
        _, out = run(fast, rows, new_tokens=16, eos=eos)
        assert out.n_tokens == expected == hf_out.n_tokens
        assert out.tokens.tolist() == hf_out.tokens.tolist()
        assert out.tokens.shape[1] == max(expected)
        assert len(out.step_ms) == max(expected) - 1
        for b, n in enumerate(out.n_tokens):  # a row that stopped holds EOS from there on
            if n < out.tokens.shape[1] or eos in table[b]:
                assert set(out.tokens[b, n - 1:].tolist()) == {eos}


def test_eos_as_first_token_and_single_token():
    lm = tiny_lm()
    fast = fast_engine(lm, max_seq=32, kv_bucket=8)
    _, out = run(fast, prompts([6]), new_tokens=1)
    assert out.tokens.shape == (1, 1) and out.n_tokens == [1] and out.step_ms == []
    first = int(out.tokens[0, 0])
    _, out = run(fast, prompts([6]), new_tokens=10, eos=first)
    assert out.tokens.tolist() == [[first]] and out.n_tokens == [1]


def test_hf_model_unchanged_and_weights_shared():
    lm = tiny_lm(**GQA)
    embeds, lengths = stack_left_padded(prompts([6, 9]))
    mask = padding_mask(lengths, embeds.shape[1], "cpu")
    before = lm(inputs_embeds=embeds, attention_mask=mask).logits
    storages = {p.untyped_storage().data_ptr() for p in lm.parameters()}
    param_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    ptr_before_o = lm.model.layers[0].self_attn.o_proj.weight.data_ptr()

    fast = fast_engine(lm, max_batch=2, max_seq=32)
    after = lm(inputs_embeds=embeds, attention_mask=mask).logits
    assert torch.equal(before, after), f"HF output changed: max |diff| {(before - after).abs().max():.3g}"

    attn, mlp = lm.model.layers[0].self_attn, lm.model.layers[0].mlp
    w = fast.layers[0]
    # q/k/v and gate/up are now views of the engine's fused buffers; the rest is untouched
    assert attn.q_proj.weight.data_ptr() == w.wqkv.data_ptr()
    assert attn.k_proj.weight.data_ptr() == w.wqkv[attn.q_proj.weight.shape[0]:].data_ptr()
    assert mlp.gate_proj.weight.data_ptr() == w.w_gate_up.data_ptr()
    assert mlp.up_proj.weight.data_ptr() == w.w_gate_up[mlp.gate_proj.weight.shape[0]:].data_ptr()
    assert attn.o_proj.weight.data_ptr() == w.wo.data_ptr() == ptr_before_o
    assert fast.embed.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    # no parameter memory added: fused buffers replace the old storages, which are gone
    new_storages = {p.untyped_storage().data_ptr() for p in lm.parameters()}
    assert len(new_storages) < len(storages)
    unique = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in lm.parameters()}
    assert sum(unique.values()) == param_bytes

    # a second engine over the same model fuses nothing again (idempotent)
    fast2 = fast_engine(lm, max_batch=2, max_seq=32)
    assert fast2.layers[0].wqkv.data_ptr() == w.wqkv.data_ptr()
    again = lm(inputs_embeds=embeds, attention_mask=mask).logits
    assert torch.equal(before, again)


def test_tied_embeddings_share_one_tensor():
    lm = tiny_lm(tie_word_embeddings=True)
    fast = fast_engine(lm, max_seq=32)
    assert fast.lm_head.data_ptr() == fast.embed.data_ptr()


def test_score_is_teacher_forcing_of_the_decode_step():
    lm = tiny_lm(**GQA)
    fast = fast_engine(lm, max_seq=40, kv_bucket=8)
    _, out = run(fast, prompts([7]), new_tokens=10)
    embeds, lengths = stack_left_padded(prompts([7]))
    logits = fast.score(fast.prefill(embeds, lengths), out.tokens[:, :-1])
    assert logits.shape == (1, 10, lm.config.vocab_size)
    assert logits.argmax(-1).tolist() == out.tokens.tolist()
    # and against one HF forward over prompt + forced tokens
    full = torch.cat([embeds, lm.model.embed_tokens(out.tokens[:, :-1])], dim=1).detach()
    ref = lm(inputs_embeds=full).logits[:, -10:].float().detach()
    diff = (ref - logits).abs().max()
    assert diff < 1e-4, f"teacher-forced logits vs one HF forward: max |diff| {diff:.3g}"


def test_make_engine_builds_fast():
    engine = make_engine("fast", tiny_lm(), FastOptions(max_seq=32))
    assert isinstance(engine, FastEngine) and engine.name == "fast" and engine.warmup_ms == 0.0
    with pytest.raises(ValueError, match="takes FastOptions"):
        make_engine("fast", tiny_lm(), HFOptions())
    with pytest.raises(ValueError, match="unknown engine"):
        make_engine("vllm", tiny_lm())


def test_warmup_is_counted_and_leaves_engine_usable():
    lm = tiny_lm()
    fast = fast_engine(lm, max_batch=2, max_seq=32, kv_bucket=8)
    fast.warmup(6, 5, batch_sizes=[1, 2])
    assert fast.warmup_ms > 0
    _, hf_out = run(HFEngine(lm), prompts([6]), new_tokens=5)
    _, out = run(fast, prompts([6]), new_tokens=5)
    assert out.tokens.tolist() == hf_out.tokens.tolist()


def test_works_under_inference_mode():
    lm = tiny_lm()
    fast = fast_engine(lm, max_seq=32)
    _, ref = run(fast, prompts([6]))
    with torch.inference_mode():
        _, out = run(fast, prompts([6]))
    assert out.tokens.tolist() == ref.tokens.tolist()


def test_bad_arguments_raise_value_error():
    lm = tiny_lm()
    fast = fast_engine(lm, max_batch=2, max_seq=16)
    with pytest.raises(ValueError, match="exceeds max_seq=16"):
        run(fast, prompts([17]))
    with pytest.raises(ValueError, match="exceeds max_batch=2"):
        run(fast, prompts([4, 4, 4]))
    embeds, lengths = stack_left_padded(prompts([10]))
    with pytest.raises(ValueError, match="more than max_seq=16"):
        fast.decode(fast.prefill(embeds, lengths), 8, None)
    with pytest.raises(ValueError, match=r"must be \[B, S, 64\]"):
        fast.prefill(torch.zeros(1, 4, 32), [4])
    with pytest.raises(ValueError, match="2 lengths for a batch of 1"):
        fast.prefill(torch.zeros(1, 4, HIDDEN), [4, 4])
    with pytest.raises(ValueError, match="float32"):
        fast.prefill(torch.zeros(1, 4, HIDDEN, dtype=torch.float64), [4])
    pre = fast.prefill(embeds, lengths)
    with pytest.raises(ValueError, match="max_new_tokens"):
        fast.decode(pre, 0, None)
    fast.decode(pre, 3, None)
    with pytest.raises(ValueError, match="stale"):
        fast.decode(pre, 3, None)
    with pytest.raises(ValueError, match="kv_bucket"):
        fast_engine(lm, kv_bucket=0)
    with pytest.raises(TypeError):
        FastOptions(kv_buckets=8)  # a typo is an error, never silently ignored


def test_unsupported_models_raise_value_error():
    with pytest.raises(ValueError, match="rope type 'dynamic'"):
        FastEngine(tiny_lm(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}))
    with pytest.raises(ValueError, match="hidden_act"):
        fast_engine(tiny_lm(hidden_act="gelu"))


@pytest.mark.slow
def test_compiled_path_on_cpu_matches_hf():
    """The torch.compile path (matvec reductions included) without CUDA graphs."""
    lm = tiny_lm(**GQA)
    rows = prompts([7, 12])
    _, hf_out = run(HFEngine(lm), rows)
    fast = fast_engine(lm, max_batch=2, max_seq=40, kv_bucket=8, compile=True, matvec=True)
    _, out = run(fast, rows)
    assert out.tokens.tolist() == hf_out.tokens.tolist()
    _, hf1 = run(HFEngine(lm), rows[:1])
    _, out1 = run(fast, rows[:1])  # batch 1: the matvec path
    assert out1.tokens.tolist() == hf1.tokens.tolist()
    # extend (a verify step) through the compiled functions equals the eager engine
    eager = fast_engine(lm, max_batch=2, max_seq=40, kv_bucket=8)
    embeds, lengths = stack_left_padded(rows[:1])
    fast.prefill(embeds, lengths)
    eager.prefill(embeds, lengths)
    diff = (fast.extend(out1.tokens[:, :4]) - eager.extend(out1.tokens[:, :4])).abs().max()
    assert diff < 1e-4, f"compiled extend: max |diff| {diff:.3g}"
    # sampling on the device traces through the compiler and is reproducible
    sampler = fast_engine(lm, max_seq=40, kv_bucket=8, compile=True, matvec=True,
                          sampling=SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=3))
    a = sampler.decode(sampler.prefill(embeds, lengths), 8, None).tokens
    b = sampler.decode(sampler.prefill(embeds, lengths), 8, None).tokens
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# CUDA: compile + CUDA graphs


@pytest.mark.gpu
@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["mha", "gqa"])
def test_cuda_graph_engine_matches_hf_fp32(variant):
    torch.backends.cuda.matmul.allow_tf32 = False
    lm = tiny_lm(**VARIANTS[variant]).cuda()
    rows = [r.cuda() for r in prompts([7, 30, 3])]
    hf_pre, hf_out = run(HFEngine(lm), rows, new_tokens=24)
    fast = fast_engine(lm, max_batch=4, max_seq=64, kv_bucket=16)  # crosses bucket 32 -> 48 -> 64
    fast.warmup(30, 24, batch_sizes=[3, 1])
    assert len(fast._graphs) >= 3, fast._graphs.keys()
    # prefill graphs: [3, 30] plain and left-padded, [1, 30]; other shapes run uncaptured
    assert set(fast._prefill_graphs) == {(3, 30, False), (3, 30, True), (1, 30, False)}
    fast_pre, fast_out = run(fast, rows, new_tokens=24)
    assert_logits_close(fast_pre.logits, hf_pre.logits, tol=1e-3)
    assert fast_out.tokens.tolist() == hf_out.tokens.tolist()
    for b, row in enumerate(rows):
        _, single = run(fast, [row], new_tokens=24)
        _, hf_single = run(HFEngine(lm), [row], new_tokens=24)
        assert single.tokens.tolist() == hf_single.tokens.tolist(), f"row {b}"
    assert len(fast_out.step_ms) == 23 and all(ms > 0 for ms in fast_out.step_ms)


@pytest.mark.gpu
@pytest.mark.gpu
def test_cuda_engine_adds_no_weight_memory():
    lm = tiny_lm(hidden_size=256, intermediate_size=512).cuda().to(torch.bfloat16)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    fast = fast_engine(lm, max_batch=1, max_seq=32, compile=False, cuda_graphs=False)
    cache = 2 * fast.k_cache.numel() * fast.k_cache.element_size()
    buffers = sum(t.numel() * t.element_size() for t in fast.buf) + sum(
        t.numel() * t.element_size() for t in fast.rope_table)
    extra = torch.cuda.memory_allocated() - before - cache - buffers
    assert extra <= 64 * 1024, f"engine added {extra} bytes beyond its cache and buffers"


@pytest.mark.parametrize("variant", ["gqa", "bias"])
def test_extend_feeds_many_tokens_and_rolls_back_by_position(variant):
    """``extend`` (a speculative verify step) equals teacher-forced decode steps, and ``advance``
    keeps only what was accepted: stale K/V of dropped tokens is never seen."""
    lm = tiny_lm(**VARIANTS[variant])
    fast = fast_engine(lm, max_batch=2, max_seq=48, kv_bucket=8)
    rows = prompts([7, 4])
    _, out = run(fast, rows, new_tokens=10)  # greedy ids t0..t9 per row
    embeds, lengths = stack_left_padded(rows)
    ref = fast.score(fast.prefill(embeds, lengths), out.tokens[:, :-1])  # [2, 10, V]

    def close(a, b, what):
        diff = (a - b).abs().max()
        assert diff < 1e-4, f"{what}: max |diff| {diff:.3g}"

    fast.prefill(embeds, lengths)
    close(fast.extend(out.tokens[:, :5]), ref[:, 1:6], "5 tokens at once")
    fast.advance(2)  # keep t0, t1
    fast.extend((out.tokens[:, 2:5] + 1) % lm.config.vocab_size)  # wrong drafts, all rejected
    fast.advance(0)
    close(fast.extend(out.tokens[:, 2:6]), ref[:, 3:7], "after a rollback")
    fast.advance(4)
    assert fast.position == 7 + 2 + 4  # prompt slots + kept tokens
    close(fast.extend(out.tokens[:, 6:7]), ref[:, 7:8], "one token")
    with pytest.raises(ValueError, match="live batch"):
        fast.extend(out.tokens[:1, :2])
    with pytest.raises(ValueError, match="1..16"):
        fast.extend(torch.zeros(2, 17, dtype=torch.long))
