"""Weight-only quantization (``stagewise.engine.quant``): formats, kernels, cache, agreement.

Tolerances, derived once and used throughout:

* Round trips: the bounds stated in :func:`quantize_weight`'s docstring (rounding to the code
  grid contributes half a step; fp32 arithmetic a few units of 2^-24 on top).
* Kernel equality: every kernel is compared with ``x @ dequantize().T`` computed in float64.
  With fp32 arithmetic a length-n dot product has error <= n u sum|x_k||w_k| (u = 2^-24; Higham,
  "Accuracy and Stability of Numerical Algorithms", 2nd ed., eq. 3.5); we allow n = 2K to cover
  the extra products and partial-sum additions of the int4 kernels, which sum
  ``scale * sum(q x) + zero * sum(x)`` (so their magnitude term is sum|x|(|q| scale + |zero|)).
  fp16 activations add the output rounding (2^-11 relative) and, in the int4 GEMM, the rounding
  of the dequantized weight to fp16 (2^-11 relative per product).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import cuda_graph_of
from transformers import LlamaConfig, LlamaForCausalLM

from stagewise.engine import quant as Q
from stagewise.engine.quant import (
    KINDS,
    QuantizedWeight,
    QuantOptions,
    TritonConfig,
    load_quantized,
    pack_int4,
    quantize_cached,
    quantize_weight,
    quantized_nbytes,
    read_quantized_meta,
    save_quantized,
    unpack_int4,
    weights_fingerprint,
)
from stagewise.errors import InputError
from stagewise.measure.agreement import logit_agreement

U = 2.0**-24  # fp32 unit roundoff


def random_weight(n: int = 48, k: int = 256, seed: int = 0) -> torch.Tensor:
    """Rows over three decades of scale, plus the cases quantizers get wrong: an all-zero row,
    an outlier (its row's other values fall into fp8's subnormal range), a constant row, and
    scattered exact zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 0, n)[:, None]
    w[0] = 0.0
    w[1, 5] = 40.0
    w[2] = 0.25
    w[3, ::7] = 0.0
    w[4] += 3.0  # far from zero: int4's zero point matters
    return w


def magnitude(w: QuantizedWeight) -> torch.Tensor:
    """``[N, K]`` float64 per-element magnitude the kernels' rounding is proportional to."""
    if w.kind == "int4":
        N, K = w.shape
        G = w.group_size
        q = unpack_int4(w.data).double().view(N, K // G, G)
        return (q * w.scale.double()[..., None] + w.zero.double().abs()[..., None]).view(N, K)
    return w.dequantize(torch.float64).abs()


def assert_matches_reference(y: torch.Tensor, x: torch.Tensor, w: QuantizedWeight, bias=None, what: str = "") -> None:
    """``y`` equals ``x @ dequantize().T (+ bias)`` within the bounds of the module docstring."""
    K = w.shape[1]
    xd = x.double().reshape(-1, K)
    ref = xd @ w.dequantize(torch.float64).T
    if bias is not None:
        ref = ref + bias.double()
    scale = xd.abs() @ magnitude(w).T  # sum_k |x_k| |w_k|
    tol = 2 * K * U * scale + 1e-30
    if x.dtype == torch.float16:
        tol = tol + 2.0**-11 * (ref.abs() + scale) + 2.0**-11 * (0 if bias is None else bias.double().abs())
    diff = (y.double().reshape(ref.shape) - ref).abs()
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0]), f"{what}: {y.dtype} {tuple(y.shape)}"
    bad = diff > tol
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {diff.numel()} outputs beyond the bound; max |diff| {diff.max():.3g}, "
        f"mean {diff.mean():.3g}, worst diff/tol {(diff / tol).max():.3g}"
    )


# ---------------------------------------------------------------------------------------------
# Round trips


def test_int8_round_trip_within_half_a_step():
    w = random_weight()
    q = quantize_weight(w, "int8")
    assert q.data.dtype == torch.int8 and q.data.abs().max() <= 127 and q.scale.dtype == torch.float32
    s = q.scale[:, None].double()
    err = (w.double() - q.dequantize(torch.float64)).abs()
    assert (err <= s * (0.5 + 2.0**-15)).all(), f"max err/scale {(err / s.clamp(min=1e-30)).max():.6f}"
    assert err[0].max() == 0 and q.scale[0] == 0  # all-zero row: exact
    ratio = (err[5:] / s[5:]).max()  # rounding to nearest uses the whole half step, no more
    assert 0.45 < ratio <= 0.5 + 2.0**-15, f"max err/scale {ratio:.4f}"
    assert (q.dequantize().abs().amax(1) - w.abs().amax(1)).abs().max() <= 1e-6  # the row max is exact


@pytest.mark.parametrize("G", [16, 64, 128])
def test_int4_round_trip_within_half_a_step_of_its_group(G):
    w = random_weight()
    q = quantize_weight(w, "int4", group_size=G)
    N, K = w.shape
    assert q.data.shape == (N, K // 2) and q.scale.shape == q.zero.shape == (N, K // G)
    assert q.scale.dtype == q.zero.dtype == torch.float16
    wg = w.view(N, K // G, G).double()
    s, z = q.scale.double(), q.zero.double()
    # outward rounding of the fp16 parameters: the grid [zero, zero + 15 scale] covers the group
    assert (z <= wg.amin(-1)).all() and (z + 15 * s >= wg.amax(-1)).all()
    err = (wg - q.dequantize(torch.float64).view(N, K // G, G)).abs()
    bound = s[..., None] * (0.5 + 2.0**-18) + 2.0**-23 * wg.abs()
    assert (err <= bound).all(), f"max err - bound {(err - bound).max():.3g}"
    codes = unpack_int4(q.data)
    assert codes.max() <= 15
    assert err[0].max() == 0  # all-zero row: scale 0, zero 0
    ratio = (err[5:] / s[5:, :, None]).max()
    assert 0.45 < ratio <= 0.5 + 2.0**-17, f"max err/scale {ratio:.4f}"


def test_fp8_round_trip_relative_bound_subnormals_and_zeros():
    w = random_weight()
    q = quantize_weight(w, "fp8")
    assert q.data.dtype == torch.float8_e4m3fn and q.scale.dtype == torch.float32
    deq = q.dequantize(torch.float64)
    wd = w.double()
    s = q.scale.double()[:, None]
    err = (wd - deq).abs()
    normal = (wd != 0) & (wd.abs() >= 2.0**-6 * s * (1 + 2.0**-20))
    sub = (wd != 0) & ~normal
    assert normal.sum() > 1000 and sub.sum() > 10, "the weights must exercise both ranges"
    rel = err[normal] / wd.abs()[normal]
    assert rel.max() <= 2.0**-4 + 2.0**-20, f"normal range: max relative error {rel.max():.5f}"
    assert rel.max() > 2.0**-4 * 0.8  # the bound is reached, i.e. 3 mantissa bits (not more)
    assert (err[sub] <= (2.0**-10 * (1 + 2.0**-10) * s.expand_as(wd))[sub]).all()
    assert (deq[(wd.abs() < 2.0**-10 * s * (1 - 2.0**-10))] == 0).all()  # below half the smallest step: 0
    assert (deq[wd == 0] == 0).all()
    assert (deq.abs().amax(1) <= wd.abs().amax(1) * (1 + 2.0**-22)).all()  # the row max maps to +-448


def test_pack_int4_layout_and_inverse():
    assert pack_int4(torch.tensor([[1, 2, 3, 4]])).tolist() == [[0x21, 0x43]]  # k even: low nibble
    codes = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)


def test_quantize_deterministic():
    w = random_weight()
    for kind in KINDS:
        a, b = quantize_weight(w, kind, group_size=32), quantize_weight(w.clone(), kind, group_size=32)
        for f in ("data", "scale", "zero"):
            ta, tb = getattr(a, f), getattr(b, f)
            assert (ta is None and tb is None) or torch.equal(ta.view(torch.uint8), tb.view(torch.uint8)), (kind, f)


# ---------------------------------------------------------------------------------------------
# Argument checks


@pytest.mark.parametrize(
    "w, kind, kw, match",
    [
        (torch.randn(4, 8), "int3", {}, "unknown kind"),
        (torch.randn(8), "int8", {}, "2-D float"),
        (torch.ones(4, 8, dtype=torch.int32), "int8", {}, "2-D float"),
        (torch.tensor([[1.0, float("nan")]]), "int8", {}, "non-finite"),
        (torch.randn(4, 96), "int4", {"group_size": 48}, "power of two"),
        (torch.randn(4, 96), "int4", {"group_size": 64}, "does not divide"),
        (torch.randn(4, 96), "int4", {"group_size": 1}, "power of two"),
        (torch.full((2, 8), 7e4), "int4", {"group_size": 8}, "fp16"),
        (torch.randn(4, 8), "int8", {"decode_impl": "cublas"}, "decode_impl"),
        (torch.randn(4, 8), "int8", {"prefill_impl": "scaled_mm"}, "needs fp8"),
    ],
)
def test_quantize_rejects_bad_arguments(w, kind, kw, match):
    with pytest.raises(ValueError, match=match):
        quantize_weight(w, kind, **kw)


def test_fp8_refused_where_unsupported(monkeypatch):
    monkeypatch.setattr(Q, "fp8_supported", lambda device: False)
    with pytest.raises(ValueError, match="compute capability >= 8.9"):
        quantize_weight(torch.randn(4, 8), "fp8")


def test_quantized_weight_validates_its_fields():
    good = quantize_weight(torch.randn(6, 32), "int4", group_size=16)
    fields = {"kind": "int4", "shape": (6, 32), "data": good.data, "scale": good.scale, "zero": good.zero, "group_size": 16}
    QuantizedWeight(**fields)  # consistent: accepted
    for change, match in [
        ({"data": good.data.to(torch.int8)}, "data"),
        ({"scale": good.scale.float()}, "scale"),
        ({"zero": None}, "zero"),
        ({"group_size": 8}, "scale"),
        ({"shape": (6, 64)}, "data"),
        ({"data": good.data.t().contiguous().t()}, "data"),
        ({"kind": "int8", "zero": None}, "group_size"),
    ]:
        with pytest.raises(ValueError, match=match):
            QuantizedWeight(**{**fields, **change})
    i8 = quantize_weight(torch.randn(6, 32), "int8")
    with pytest.raises(ValueError, match="zero"):
        QuantizedWeight("int8", (6, 32), i8.data, i8.scale, zero=good.zero)
    with pytest.raises(ValueError, match="x must be"):
        i8.linear(torch.randn(2, 31), decode=True)
    with pytest.raises(ValueError, match="unknown impl"):
        i8.linear(torch.randn(2, 32), decode=True, impl="magic")


def test_nbytes_formula_and_cost_model():
    from stagewise.measure.costmodel import (
        llama_decode_weight_bytes,
        llama_quantized_weight_bytes,
    )

    for kind, G in [("int8", None), ("fp8", None), ("int4", 16), ("int4", 64)]:
        q = quantize_weight(torch.randn(24, 128), kind, group_size=G or 128)
        assert q.nbytes == quantized_nbytes(24, 128, kind, G)
    assert quantized_nbytes(24, 128, "int4", 64) == 24 * 64 + 4 * 24 * 2
    assert quantized_nbytes(24, 128, "int8") == 24 * 128 + 4 * 24

    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    lm = LlamaForCausalLM(cfg)
    assert llama_quantized_weight_bytes(cfg, "none") == llama_decode_weight_bytes(cfg)
    linears = [m.weight for m in lm.modules() if isinstance(m, torch.nn.Linear)]  # 7 per layer + LM head
    norms = [p for n, p in lm.named_parameters() if "norm" in n]
    for kind, G in [("int8", 32), ("int4", 32), ("fp8", 32)]:
        qs = [quantize_weight(p.detach(), kind, group_size=G) for p in linears]
        want = Q.streamed_bytes(qs) + Q.streamed_bytes(p.detach().bfloat16() for p in norms)
        assert llama_quantized_weight_bytes(cfg, kind, G) == want, kind
    head = quantized_nbytes(101, 64, "int8") - 101 * 64 * 2
    assert llama_quantized_weight_bytes(cfg, "int8", lm_head=False) == llama_quantized_weight_bytes(cfg, "int8") - head


# ---------------------------------------------------------------------------------------------
# linear == x @ dequantize().T: the CPU path and the compiled-PyTorch formulation


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(  # "torch" is a decode kernel only
    "impl, rows", [("dequant", 1), ("dequant", 5), ("dequant", "prefill"), ("torch", 1), ("torch", 5), ("torch", 16)]
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_equals_dequantized_matmul(kind, impl, rows, with_bias):
    w = random_weight(seed=1)
    q = quantize_weight(w, kind, group_size=64)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 19, 256, generator=g) if rows == "prefill" else torch.randn(rows, 1, 256, generator=g)
    bias = torch.randn(48, generator=g) if with_bias else None
    decode = rows != "prefill"
    y = q.linear(x, bias, decode=decode, impl=impl)
    assert_matches_reference(y, x, q, bias, f"{kind} {impl} rows={rows}")


def test_cpu_runs_the_dequant_path_and_says_so():
    q = quantize_weight(torch.randn(8, 32), "int4", group_size=16, decode_impl="torch")
    for decode in (True, False):
        assert q.effective_impl(torch.device("cpu"), decode=decode, compiling=False) == "dequant"
    assert q.effective_impl("cuda", decode=True, compiling=True) == "torch"
    assert q.effective_impl("cuda", decode=True, compiling=False) == "dequant"  # eager: no [M, N, K] products
    assert q.effective_impl("cuda", decode=False, compiling=True) == "dequant"
    x = torch.randn(3, 32)
    assert torch.equal(q.linear(x, decode=True), torch.nn.functional.linear(x, q.dequantize()))


def test_compiled_formulation_traces_fullgraph_once_for_all_weights():
    """``torch.compile(fullgraph=True)`` traces through ``linear`` with the weight as an argument,
    and one compiled artifact serves different weights of the same shape (as the engine's layers)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def layer(x, w, b):
        return w.linear(torch.nn.functional.silu(x), b, decode=True, impl="torch") * 2

    for kind in KINDS:
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(layer, fullgraph=True, dynamic=False, backend=counter)
        x, b = torch.randn(1, 1, 256), torch.randn(48)
        for seed in (3, 4):
            q = quantize_weight(random_weight(seed=seed), kind, group_size=64)
            y = compiled(x, q, b)
            assert torch.equal(y, layer(x, q, b)), kind
            assert_matches_reference(y / 2, torch.nn.functional.silu(x), q, b, f"compiled {kind}")
        assert counter.frame_count == 1, f"{kind}: {counter.frame_count} compiles for two weights"
    # the default dispatch (effective_impl: "dequant" on CPU) traces too
    torch._dynamo.reset()
    q = quantize_weight(random_weight(seed=3), "int4", group_size=64)
    for decode in (True, False):
        f = torch.compile(lambda x, w: w.linear(x, decode=decode), fullgraph=True, backend="aot_eager")
        x = torch.randn(3, 256)
        assert torch.equal(f(x, q), torch.nn.functional.linear(x, q.dequantize()))
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_compiles_the_formulation_on_cpu():
    """Inductor (C++ codegen on CPU) lowers the bit unpacking, fp8 conversion and reduction."""
    for kind in KINDS:
        torch._dynamo.reset()
        q = quantize_weight(random_weight(seed=5), kind, group_size=64)
        f = torch.compile(lambda x, w: w.linear(x, decode=True, impl="torch"), fullgraph=True, dynamic=False)
        x = torch.randn(5, 256)
        assert_matches_reference(f(x, q), x, q, None, f"inductor {kind}")
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# Triton kernels: the interpreter on CPU (real hardware in the gpu tests below)


TRITON_CASES = [  # (rows, decode): the GEMV (rows <= GEMV_MAX_M), the decode GEMM, the prefill GEMM
    (1, True), (3, True), (5, True), (16, True), (37, False),
]


@pytest.mark.parametrize("kind", KINDS)
def test_triton_kernels_equal_dequantized_matmul(kind, triton_device):
    # N = 44: not a multiple of the 8- or 32-row tiles; K = 320: not a multiple of the GEMV's
    # 512 / 1024 or the GEMM's 128 K-tiles; G = 64 < the int4 GEMV tile (several groups per tile)
    g = torch.Generator().manual_seed(6)
    q = quantize_weight(random_weight(44, 320, seed=7), kind, group_size=64).to(triton_device)
    bias = torch.randn(44, generator=g).to(triton_device)
    for rows, decode in TRITON_CASES:
        for dtype in (torch.float32, torch.float16):
            if dtype == torch.float16 and rows in (3, 5):
                continue  # keeps the interpreter run short; both dtypes run at 1, 16, 37 rows
            x = torch.randn(rows, 320, generator=g).to(triton_device, dtype)
            y = q.linear(x, bias if rows == 16 else None, decode=decode, impl="triton")
            assert_matches_reference(y.cpu(), x.cpu(), q.to("cpu"), bias.cpu() if rows == 16 else None,
                                     f"triton {kind} rows={rows} {dtype}")


def test_triton_configs_override_and_small_tiles(triton_device, monkeypatch):
    """Other tile shapes compute the same function: several K steps per group (int4 GEMV and GEMM
    tiles of 32 < G = 64) and many N tiles; a config entry overrides the default."""
    g = torch.Generator().manual_seed(8)
    for kind in KINDS:
        q = quantize_weight(random_weight(40, 192, seed=9), kind, group_size=64).to(triton_device)
        monkeypatch.setitem(Q.TRITON_CONFIGS, (kind, "gemv", 40, 192), TritonConfig(block_n=16, block_k=32))
        monkeypatch.setitem(Q.TRITON_CONFIGS, (kind, "gemm_prefill", 40, 192),
                            TritonConfig(block_m=16, block_n=16, block_k=32, group_m=2))
        for rows, decode in [(2, True), (33, False)]:
            x = torch.randn(rows, 192, generator=g).to(triton_device)
            assert_matches_reference(q.linear(x, decode=decode, impl="triton").cpu(), x.cpu(), q.to("cpu"),
                                     None, f"{kind} small tiles rows={rows}")


def test_triton_gemm_refuses_tiny_int4_groups(triton_device):
    q = quantize_weight(torch.randn(16, 64), "int4", group_size=8).to(triton_device)
    x = torch.randn(20, 64).to(triton_device)
    with pytest.raises(ValueError, match="group_size >= 16"):
        q.linear(x, decode=False, impl="triton")
    assert_matches_reference(q.linear(x[:1], decode=True, impl="triton").cpu(), x[:1].cpu(), q.to("cpu"))  # GEMV: fine


# ---------------------------------------------------------------------------------------------
# Through the fast engine (the integration the lead wires into fast.py, done here by a patch)


def _tiny_lm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.2, rms_norm_eps=1e-5)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind, G", [("int8", None), ("int4", 16), ("fp8", None)])
def test_fast_engine_with_quantized_layers_equals_hf_on_dequantized_weights(kind, G, tmp_path):
    """``FastOptions(quantize=...)``: the fast engine quantizes its fused projections and LM head; it
    gives the same greedy ids (and logits within fp32 rounding) as the HF reference whose Linears hold
    the dequantized weights (row-wise scales and K-groups make fused and per-module quantization
    identical), different logits from the unquantized model (the quantization took effect), records
    what it applied, and a second engine loads the same weights from the cache."""
    from stagewise.engine.base import stack_left_padded
    from stagewise.engine.fast import FastEngine, FastOptions
    from stagewise.engine.hf import HFEngine

    ref_lm, fast_lm, bf_lm = _tiny_lm(), _tiny_lm(), _tiny_lm()
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    with torch.no_grad():
        for layer in ref_lm.model.layers:
            for mod in (layer.self_attn, layer.mlp):
                for name in names:
                    if hasattr(mod, name):
                        lin = getattr(mod, name)
                        lin.weight.copy_(quantize_weight(lin.weight, kind, group_size=G or 128).dequantize())
        ref_lm.lm_head.weight.copy_(quantize_weight(ref_lm.lm_head.weight, kind, group_size=G or 128).dequantize())
    q = QuantOptions(kind, group_size=G or 128, cache_dir=str(tmp_path))
    engine = FastEngine(fast_lm, FastOptions(max_seq=48, kv_bucket=8, quantize=q))
    assert engine.quant_info["kind"] == kind and not engine.quant_info["loaded_from_cache"]
    assert engine.quant_info["decode_kernel"] == "dequant"  # CPU
    dense_bytes = FastEngine(_tiny_lm(), FastOptions(max_seq=48)).weight_bytes_per_step
    assert engine.weight_bytes_per_step < dense_bytes
    rows = [torch.randn(9, 64, generator=torch.Generator().manual_seed(1))]
    embeds, lengths = stack_left_padded(rows)
    outs = {}
    for name, eng in [("fast", engine), ("hf", HFEngine(ref_lm)), ("bf", HFEngine(bf_lm))]:
        pre = eng.prefill(embeds, lengths)
        outs[name] = (pre.logits, eng.decode(pre, 10, None).tokens.tolist())
    diff = (outs["fast"][0] - outs["hf"][0]).abs().max()
    assert diff <= 1e-4, f"prefill logits vs HF on dequantized weights: max |diff| {diff:.3g}"
    assert outs["fast"][1] == outs["hf"][1]
    assert (outs["fast"][0] - outs["bf"][0]).abs().max() > 1e-4, "quantization had no effect"
    again = FastEngine(_tiny_lm(), FastOptions(max_seq=48, kv_bucket=8, quantize=q))
    assert again.quant_info["loaded_from_cache"]
    pre = again.prefill(embeds, lengths)
    assert again.decode(pre, 10, None).tokens.tolist() == outs["fast"][1]


# ---------------------------------------------------------------------------------------------
# Cache


def test_cache_round_trip_each_kind(tmp_path):
    src = {"a": random_weight(16, 64, seed=10), "b": random_weight(8, 64, seed=11)}
    fp = weights_fingerprint(src)
    for kind in KINDS:
        qs = {n: quantize_weight(w, kind, group_size=32) for n, w in src.items()}
        path = save_quantized(tmp_path / f"{kind}.safetensors", qs, {"fingerprint": fp, "model": "tiny"})
        meta = read_quantized_meta(path)
        assert meta["fingerprint"] == fp and meta["model"] == "tiny" and meta["kind"] == kind
        back = load_quantized(path, "cpu", fingerprint=fp, kind=kind, group_size=32, decode_impl="dequant")
        assert set(back) == set(qs)
        for n in qs:
            a, b = qs[n], back[n]
            assert (a.kind, a.shape, a.group_size) == (b.kind, b.shape, b.group_size) and b.decode_impl == "dequant"
            for f in ("data", "scale", "zero"):
                ta, tb = getattr(a, f), getattr(b, f)
                assert (ta is None) == (tb is None)
                if ta is not None:
                    assert ta.dtype == tb.dtype and torch.equal(ta.view(torch.uint8), tb.view(torch.uint8)), (kind, n, f)
        assert not list(tmp_path.glob("*.tmp"))


def test_cache_refuses_stale_or_foreign_files(tmp_path):
    from safetensors.torch import save_file

    src = {"a": random_weight(16, 64, seed=12)}
    qs = {"a": quantize_weight(src["a"], "int4", group_size=32)}
    path = save_quantized(tmp_path / "c.safetensors", qs, {"fingerprint": weights_fingerprint(src)})
    other = {"a": src["a"].clone()}
    other["a"][3, 3] += 1.0
    with pytest.raises(InputError, match="stale quantized cache") as err:
        load_quantized(path, "cpu", fingerprint=weights_fingerprint(other))
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError, match="holds int4 weights, this run asks for int8"):
        load_quantized(path, "cpu", kind="int8")
    with pytest.raises(InputError, match="group size 32, this run asks for 64"):
        load_quantized(path, "cpu", kind="int4", group_size=64)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(InputError, match="not a stagewise quantized cache"):
        load_quantized(tmp_path / "plain.safetensors", "cpu")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(InputError, match="not a readable safetensors"):
        load_quantized(tmp_path / "junk.safetensors", "cpu")
    with pytest.raises(InputError, match="not found"):
        load_quantized(tmp_path / "missing.safetensors", "cpu")
    with pytest.raises(ValueError, match="fingerprint"):
        save_quantized(tmp_path / "d.safetensors", qs, {})
    with pytest.raises(ValueError, match="one kind"):
        save_quantized(tmp_path / "e.safetensors", {**qs, "b": quantize_weight(src["a"], "int8")}, {"fingerprint": "f"})


def test_fingerprint_sees_values_dtype_and_shape():
    src = {"a": random_weight(16, 64, seed=13), "b": torch.randn(5, 7)}
    fp = weights_fingerprint(src)
    assert fp == weights_fingerprint({k: v.clone() for k, v in src.items()}) and len(fp) == 64
    edited = {k: v.clone() for k, v in src.items()}
    edited["b"][2, 3] += 1e-3  # one element, not necessarily at a sampled position
    assert weights_fingerprint(edited) != fp
    assert weights_fingerprint({**src, "b": src["b"].double()}) != fp
    assert weights_fingerprint({**src, "b": src["b"].reshape(7, 5)}) != fp
    assert weights_fingerprint({"c": src["a"], "b": src["b"]}) != fp


def test_quantize_cached_writes_then_loads(tmp_path):
    src = {"l0": random_weight(16, 64, seed=14), "l1": random_weight(32, 64, seed=15)}
    first, info1 = quantize_cached(src, "int4", group_size=32, cache_dir=tmp_path)
    assert not info1["loaded_from_cache"] and info1["group_size"] == 32
    assert info1["bytes"] == quantized_nbytes(16, 64, "int4", 32) + quantized_nbytes(32, 64, "int4", 32)
    second, info2 = quantize_cached(src, "int4", group_size=32, cache_dir=tmp_path)
    assert info2["loaded_from_cache"] and info2["cache_path"] == info1["cache_path"]
    for n in src:
        assert torch.equal(first[n].data, second[n].data) and torch.equal(first[n].scale, second[n].scale)
    _, info3 = quantize_cached(src, "int8", cache_dir=tmp_path)  # another format: another file
    assert not info3["loaded_from_cache"] and info3["cache_path"] != info1["cache_path"]
    _, info4 = quantize_cached(src, "int8")
    assert info4["cache_path"] is None and not info4["loaded_from_cache"]


# ---------------------------------------------------------------------------------------------
# Agreement


def test_logit_agreement_identical_and_shifted():
    ref = torch.randn(6, 50, generator=torch.Generator().manual_seed(16))
    same = logit_agreement(ref, ref.clone())
    assert same == {"n_positions": 6, "top1_agreement": 1.0, "max_abs_logit_diff": 0.0,
                    "mean_abs_logit_diff": 0.0, "mean_kl": 0.0, "max_kl": 0.0}
    shifted = logit_agreement(ref, ref + 5.0)  # softmax is shift invariant
    assert shifted["top1_agreement"] == 1.0 and shifted["mean_kl"] < 1e-12
    assert shifted["max_abs_logit_diff"] == pytest.approx(5.0) and shifted["mean_abs_logit_diff"] == pytest.approx(5.0)


def test_logit_agreement_hand_computed():
    ref = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
    test = torch.tensor([[math.log(3.0), 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    out = logit_agreement(ref, test)
    # position 0: p = (1/2, 1/2), q = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    # position 2: p = softmax(0, 1), q = softmax(1, 0) (the argmax flips): KL computed below
    p = torch.softmax(torch.tensor([0.0, 1.0], dtype=torch.float64), 0)
    kl2 = float((p * (p.log() - p.flip(0).log())).sum())
    assert out["n_positions"] == 4
    assert out["top1_agreement"] == 0.75  # position 2 flips; position 0 ties -> first index in both
    assert out["mean_kl"] == pytest.approx((0.5 * math.log(4 / 3) + kl2) / 4, rel=1e-12)
    assert out["max_kl"] == pytest.approx(kl2, rel=1e-12)
    assert out["max_abs_logit_diff"] == pytest.approx(math.log(3.0), rel=1e-12)
    assert out["mean_abs_logit_diff"] == pytest.approx((math.log(3.0) + 2.0) / 8, rel=1e-12)


def test_logit_agreement_rejects_bad_input():
    with pytest.raises(ValueError, match="same non-empty"):
        logit_agreement(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="same non-empty"):
        logit_agreement(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="finite"):
        logit_agreement(torch.zeros(2, 3), torch.tensor([[0.0, float("nan"), 0.0], [0, 0, 0]]))


# ---------------------------------------------------------------------------------------------
# GPU: compiled + CUDA graphs + determinism on real hardware (run by the lead: pytest -m gpu)


def _gpu_tol(x: torch.Tensor, q: QuantizedWeight, ref: torch.Tensor) -> torch.Tensor:
    """bf16 bound: the output and (int4 GEMM) the dequantized weights are rounded to bf16 (8
    significant bits: <= 2^-9 relative each); fp32 accumulation adds far less."""
    scale = x.double().abs() @ magnitude(q.to("cpu")).to(x.device).T
    return 2.0**-8 * (ref.abs() + scale) + 2 * q.shape[1] * U * scale


@pytest.mark.gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_gpu_compiled_kernels_in_cuda_graphs_are_exact_and_deterministic(kind, impl):
    if kind == "fp8" and not Q.fp8_supported("cuda"):
        pytest.skip("GPU without fp8")
    if impl == "triton" and not Q.triton_available():
        pytest.skip("triton not installed")
    torch._dynamo.reset()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(17)
    N, K = 1000, 2048  # N not a multiple of any tile
    w = torch.randn(N, K, device=dev, generator=g, dtype=torch.bfloat16) * 0.02
    q = quantize_weight(w, kind, decode_impl=impl, prefill_impl="triton" if impl == "triton" else "dequant")
    for rows, decode in [(1, True), (5, True), (16, True), (257, False)]:
        fn = torch.compile(lambda x, w: w.linear(x, decode=decode), fullgraph=True, dynamic=False)
        x = torch.randn(rows, K, device=dev, generator=g, dtype=torch.bfloat16)
        static_x = x.clone()
        y0 = fn(static_x, q)
        graph, static_y = cuda_graph_of(fn, static_x, q)
        graph.replay()
        assert torch.equal(static_y, y0), f"{kind} {impl} rows={rows}: graph replay differs from eager"
        graph.replay()
        assert torch.equal(static_y, y0), f"{kind} {impl} rows={rows}: not deterministic"
        ref = x.double() @ q.dequantize(torch.float64).T
        diff = (static_y.double() - ref).abs()
        tol = _gpu_tol(x, q, ref)
        assert (diff <= tol).all(), f"{kind} {impl} rows={rows}: max |diff| {diff.max():.3g}, worst diff/tol {(diff / tol).max():.3g}"
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.gpu
def test_gpu_fp8_scaled_mm_prefill():
    if not Q.fp8_supported("cuda"):
        pytest.skip("GPU without fp8")
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(18)
    w = torch.randn(512, 1024, device=dev, generator=g, dtype=torch.bfloat16) * 0.02
    q = quantize_weight(w, "fp8", prefill_impl="scaled_mm")
    x = torch.randn(77, 1024, device=dev, generator=g, dtype=torch.bfloat16)
    y = q.linear(x, decode=False)
    ref = x.double() @ q.dequantize(torch.float64).T
    # W8A8: each activation is rounded to e4m3 (<= 2^-4 relative, normal range; rows are scaled to
    # their max so almost all are normal), plus the bf16 output rounding
    scale = x.double().abs() @ q.dequantize(torch.float64).abs().T
    tol = 2.0**-4 * scale + 2.0**-8 * ref.abs() + 1e-3 * scale
    diff = (y.double() - ref).abs()
    assert (diff <= tol).all(), f"max |diff| {diff.max():.3g}, worst diff/tol {(diff / tol).max():.3g}"


@pytest.mark.gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_triton_prefill_with_dynamic_rows(kind):
    """The engine compiles prefill with the row count dynamic: one compiled artifact must serve
    several prompt lengths through the Triton GEMM."""
    from torch._dynamo.testing import CompileCounterWithBackend

    if kind == "fp8" and not Q.fp8_supported("cuda"):
        pytest.skip("GPU without fp8")
    if not Q.triton_available():
        pytest.skip("triton not installed")
    torch._dynamo.reset()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(19)
    w = torch.randn(768, 1024, device=dev, generator=g, dtype=torch.bfloat16) * 0.02
    q = quantize_weight(w, kind, decode_impl="triton", prefill_impl="triton")
    counter = CompileCounterWithBackend("inductor")
    fn = torch.compile(lambda x, w: w.linear(x, decode=False), fullgraph=True, backend=counter)
    for rows in (257, 300, 641):
        x = torch.randn(rows, 1024, device=dev, generator=g, dtype=torch.bfloat16)
        torch._dynamo.maybe_mark_dynamic(x, 0)
        y = fn(x, q)
        ref = x.double() @ q.dequantize(torch.float64).T
        diff = (y.double() - ref).abs()
        tol = _gpu_tol(x, q, ref)
        assert (diff <= tol).all(), f"{kind} rows={rows}: max |diff| {diff.max():.3g}"
    assert counter.frame_count == 1, f"{counter.frame_count} compiles for three prompt lengths"
    torch._dynamo.reset()


def test_cli_run_records_the_quantization_and_verify_reports_agreement(tmp_path, capsys):
    import json

    from stagewise.cli import EXIT_USAGE, main
    from stagewise.results.records import read_samples

    common = ["--num-samples", "1", "--no-ceilings", "--warmup", "0"]
    assert main(["run", "--engine", "fast", "--quantize", "int8", "--output-len", "fixed:3", *common, "--out", str(tmp_path / "q")]) == 0
    assert main(["run", "--engine", "fast", "--output-len", "fixed:3", *common, "--out", str(tmp_path / "d")]) == 0
    q, d = read_samples(tmp_path / "q" / "samples.jsonl")[0], read_samples(tmp_path / "d" / "samples.jsonl")[0]
    assert q.quantization == "int8" and d.quantization == "none"
    assert q.weight_bytes_per_step < 0.6 * d.weight_bytes_per_step
    assert "quantization: int8" in (tmp_path / "q" / "report.md").read_text()
    assert main(["verify", "--engine", "fast", "--quantize", "int4", "--quant-group-size", "32", "--max-new-tokens", "6",
                 "--num-samples", "1", "--out", str(tmp_path / "v.json")]) == 0
    v = json.loads((tmp_path / "v.json").read_text())
    s = v["samples"][0]
    assert s["n_positions"] == 6 and 0 <= s["top1_agreement"] <= 1 and s["mean_kl"] >= 0
    assert v["quantization"]["kind"] == "int4" and v["weight_bytes_per_step"]["quantized"] < v["weight_bytes_per_step"]["reference"]
    capsys.readouterr()
    assert main(["run", "--quantize", "int8"]) == EXIT_USAGE
    assert "needs --engine fast" in capsys.readouterr().err


def test_auto_kernels_resolve_per_device(monkeypatch):
    cpu = QuantOptions("int4").resolved("cpu")
    assert (cpu.decode_impl, cpu.prefill_impl) == ("torch", "dequant")
    monkeypatch.setattr(Q, "triton_available", lambda: True)
    assert (QuantOptions("int8").resolved("cuda").decode_impl, QuantOptions("int8").resolved("cuda").prefill_impl) == ("triton", "triton")
    assert QuantOptions("fp8").resolved("cuda").prefill_impl == "scaled_mm"
    assert QuantOptions("int8", decode_impl="dequant").resolved("cuda").decode_impl == "dequant"  # asked: kept
    monkeypatch.setattr(Q, "triton_available", lambda: False)
    assert QuantOptions("int8").resolved("cuda").decode_impl == "torch"
    with pytest.raises(ValueError, match="decode_impl"):
        QuantOptions("int8", decode_impl="fastest")
