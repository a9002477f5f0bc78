"""The dense Triton GEMV (``stagewise::dense_gemv``), its weight wrapper and ``FastOptions.matvec_kernel``.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py switches it on before
triton is first imported); with one, compiled.

Tolerance of the kernel tests, against the float64 product of the same (exactly converted) inputs:
with fp32 accumulation a length-K dot product has error <= K u sum_k |x_k||w_k| (u = 2^-24; Higham,
"Accuracy and Stability of Numerical Algorithms", 2nd ed., eq. 3.5); we allow 2 K u sum|x||w|.
fp16 outputs add their rounding, 2^-11 |y| (half an ulp at 11 significant bits, taken whole).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import cuda_graph_of
from test_engine_fast import GQA
from test_engine_fast import tiny_lm as engine_tiny_lm
from transformers import LlamaForCausalLM

from stagewise.engine import dense as D
from stagewise.engine import quant as Q
from stagewise.engine.dense import TritonDenseWeight, dense_gemv_config, triton_gemv_usable
from stagewise.engine.fast import FastEngine, FastOptions
from stagewise.engine.quant import GEMV_MAX_M, QuantOptions

U = 2.0**-24


@pytest.fixture
def gemv_calls(monkeypatch):
    """Counts the GEMV launches of :meth:`TritonDenseWeight.linear` (each asks for its config once)."""
    calls: list[tuple[int, int, int]] = []

    def counted(n, k, m, dtype):
        calls.append((n, k, m))
        return dense_gemv_config(n, k, m, dtype)

    monkeypatch.setattr(D, "dense_gemv_config", counted)
    return calls


def assert_close_to_product(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias=None, what: str = "") -> None:
    """``y`` equals ``x @ w.T (+ bias)`` within the bound of the module docstring."""
    K = w.shape[1]
    xd, wd = x.double().cpu().reshape(-1, K), w.double().cpu()
    ref = xd @ wd.T
    if bias is not None:
        ref = ref + bias.double().cpu()
    tol = 2 * K * U * (xd.abs() @ wd.abs().T) + 1e-30
    if y.dtype == torch.float16:
        tol = tol + 2.0**-11 * ref.abs()
    diff = (y.double().cpu().reshape(ref.shape) - ref).abs()
    assert y.dtype == x.dtype and tuple(y.shape) == (*x.shape[:-1], w.shape[0]), f"{what}: {y.dtype} {tuple(y.shape)}"
    bad = diff > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} of {diff.numel()} outputs beyond the bound; max |diff| {diff.max():.3g}"


# ---------------------------------------------------------------------------------------------
# The kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 2, 3, 4])
def test_dense_gemv_equals_the_fp32_product(dtype, M, triton_device):
    # N = 45: not a multiple of 4, 8 or 16 output rows; K = 300: not a multiple of any K block, and
    # several K steps with block_k = 64 (the last one partial)
    g = torch.Generator().manual_seed(M)
    N, K = 45, 300
    x = torch.randn(M, K, generator=g).to(triton_device, dtype)
    w = torch.randn(N, K, generator=g).to(triton_device, dtype)
    for block_n, block_k in [(8, 512 if dtype != torch.float32 else 256), (16, 64), (4, 128)]:
        y = torch.ops.stagewise.dense_gemv(x, w, block_n=block_n, block_k=block_k, num_warps=4, num_stages=3)
        assert_close_to_product(y, x, w, what=f"{dtype} M={M} blocks {block_n}x{block_k}")
        again = torch.ops.stagewise.dense_gemv(x, w, block_n=block_n, block_k=block_k, num_warps=4, num_stages=3)
        assert torch.equal(y, again), "not deterministic"


def test_dense_gemv_reads_a_bf16_weight(triton_device):
    """The weight is loaded in its own dtype (the engine's bf16 weights); fp32 activations keep the
    CPU interpreter away from bf16 arithmetic."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 200, generator=g).to(triton_device)
    w = torch.randn(37, 200, generator=g).to(triton_device, torch.bfloat16)
    y = torch.ops.stagewise.dense_gemv(x, w, block_n=8, block_k=64, num_warps=4, num_stages=3)
    assert_close_to_product(y, x, w, what="bf16 weight")


def test_default_configs_are_fixed_by_shape_and_dtype(monkeypatch):
    assert dense_gemv_config(1000, 4096, 1, torch.bfloat16) == (8, 512, 4, 3)  # a shape outside the table
    assert dense_gemv_config(4096, 4096, 4, torch.float16) == (8, 512, 4, 3)  # the table is bf16 only
    assert dense_gemv_config(4096, 4096, 1, torch.float32) == (8, 256, 4, 3)  # 1 KiB of weight per row per step
    assert dense_gemv_config(4096, 4096, 1, torch.bfloat16) == D.DENSE_GEMV_CONFIGS[(4096, 4096, torch.bfloat16)]
    monkeypatch.setitem(D.DENSE_GEMV_CONFIGS, (4096, 11008, torch.bfloat16), (16, 1024, 8, 2))
    assert dense_gemv_config(4096, 11008, 1, torch.bfloat16) == (16, 1024, 8, 2)
    assert dense_gemv_config(4096, 11008, 1, torch.float16) == (8, 512, 4, 3)


# ---------------------------------------------------------------------------------------------
# The weight wrapper


def test_linear_runs_the_gemv_for_few_decode_rows_only(triton_device, gemv_calls):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(45, 96, generator=g).to(triton_device)
    bias = torch.randn(45, generator=g).to(triton_device)
    dw = TritonDenseWeight(w)
    assert dw.shape == (45, 96) and dw.nbytes == 45 * 96 * 4 and dw.dtype == torch.float32
    for M in range(1, GEMV_MAX_M + 1):  # decode rows as the engine shapes them: [B, S, K]
        x = torch.randn(1, M, 96, generator=g).to(triton_device)
        y = dw.linear(x, bias, decode=True)
        assert_close_to_product(y, x, w, bias, f"gemv M={M}")
    assert [m for _, _, m in gemv_calls] == [1, 2, 3, 4]
    gemv_calls.clear()
    x5 = torch.randn(5, 1, 96, generator=g).to(triton_device)  # more rows than the GEMV takes
    assert torch.equal(dw.linear(x5, bias, decode=True), F.linear(x5, w) + bias)
    xp = torch.randn(2, 3, 96, generator=g).to(triton_device)  # prefill: always cuBLAS / F.linear
    assert torch.equal(dw.linear(xp, decode=False), F.linear(xp, w))
    assert torch.equal(dw.linear(xp[:1, :1], decode=False), F.linear(xp[:1, :1], w))
    assert gemv_calls == []
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 96\]"):
        dw.linear(torch.randn(1, 95).to(triton_device), decode=True)


def test_wrapper_validates_its_weight(triton_device, monkeypatch):
    with pytest.raises(ValueError, match="2-D"):
        TritonDenseWeight(torch.randn(8))
    with pytest.raises(ValueError, match="dtype"):
        TritonDenseWeight(torch.ones(4, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="contiguous"):
        TritonDenseWeight(torch.randn(8, 4).t())
    assert triton_gemv_usable("cuda") is None and triton_gemv_usable(triton_device) is None
    assert "not on meta" in triton_gemv_usable("meta")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in triton_gemv_usable("cpu")
    if triton_device == "cpu":
        with pytest.raises(ValueError, match="cannot run here"):
            TritonDenseWeight(torch.randn(4, 8))
    monkeypatch.setattr(Q, "triton_available", lambda: False)
    monkeypatch.setattr(D, "triton_available", lambda: False)
    assert "triton package" in triton_gemv_usable("cuda")


# ---------------------------------------------------------------------------------------------
# The engine option


def tiny_lm(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """test_engine_fast's tiny LLaMA with grouped-query attention (2 KV heads for 4 query heads)."""
    return engine_tiny_lm(seed, **{**GQA, **overrides})


def test_fast_options_validate_matvec_kernel():
    assert FastOptions().matvec_kernel == "inductor"
    with pytest.raises(ValueError, match="matvec_kernel: expected one of inductor, triton"):
        FastOptions(matvec_kernel="cublas")
    with pytest.raises(ValueError, match="use one of matvec_kernel='triton' and quantize"):
        FastOptions(matvec_kernel="triton", quantize=QuantOptions("int8"))


def test_engine_refuses_triton_where_its_kernels_cannot_run(triton_device, monkeypatch):
    lm = tiny_lm()
    if triton_device == "cpu":
        with pytest.raises(ValueError, match="matvec_kernel 'triton' cannot be used: on CPU .* compile is on"):
            FastEngine(lm, FastOptions(max_seq=32, compile=True, matvec_kernel="triton"))
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="matvec_kernel 'triton' cannot be used: .*TRITON_INTERPRET=1"):
            FastEngine(lm, FastOptions(max_seq=32, matvec_kernel="triton"))
    else:
        with pytest.raises(ValueError, match="matvec_kernel 'triton' cannot be used: on CUDA .* compile is off"):
            FastEngine(lm.cuda(), FastOptions(max_seq=32, compile=False, matvec_kernel="triton"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the eager CPU engine (the GPU test below compiles)")
@pytest.mark.parametrize("variant", [pytest.param({}, marks=pytest.mark.slow),
                                     {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}])
def test_engine_with_triton_gemv_gives_the_same_greedy_ids(triton_device, monkeypatch, variant):
    """A tiny fp32 LLaMA through the eager engine: ``matvec_kernel="triton"`` decodes the same
    greedy ids as ``"inductor"`` (here: the plain eager path), at batch 1 and in a left-padded
    batch of 3 (M = 3 rows: the GEMV too); every decode projection went through the GEMV (9 per
    step: 4 per layer + the LM head), the prefill through none; verify steps of 3 rows (GEMV) and
    6 rows (``F.linear``) give the same logits; the bytes per step and the record are right."""
    from stagewise.engine.base import stack_left_padded
    from stagewise.runner import engine_facts

    gemv_calls: list[tuple[int, int, int]] = []

    def counted(n, k, m, dtype):  # 32-row tiles: a quarter of the default's programs for the interpreter to
        gemv_calls.append((n, k, m))  # run one by one (the default tiles are tested above)
        return (32, 256, 4, 3)

    monkeypatch.setattr(D, "dense_gemv_config", counted)

    lm = tiny_lm(**variant)
    ref = FastEngine(lm, FastOptions(max_batch=3, max_seq=48, kv_bucket=8))
    tri = FastEngine(lm, FastOptions(max_batch=3, max_seq=48, kv_bucket=8, matvec_kernel="triton"))
    assert isinstance(tri.lm_head, TritonDenseWeight) and isinstance(tri.layers[1].w_down, TritonDenseWeight)
    assert tri.lm_head.weight.data_ptr() == lm.lm_head.weight.data_ptr()  # wrapped, not copied
    assert tri.weight_bytes_per_step == ref.weight_bytes_per_step
    assert engine_facts(tri)["matvec_kernel"] == "triton" and engine_facts(ref)["matvec_kernel"] == "inductor"
    g = torch.Generator().manual_seed(1)
    rows = [torch.randn(n, 64, generator=g) for n in (9, 7, 12, 3)]
    for sel in (rows[:1], rows[1:]):
        embeds, lengths = stack_left_padded(sel)
        gemv_calls.clear()
        pre = tri.prefill(embeds, lengths)
        assert gemv_calls == [], "the prefill must not run the GEMV"
        out = tri.decode(pre, 10, None)
        assert len(gemv_calls) == 9 * 9 and {m for _, _, m in gemv_calls} == {len(sel)}
        ref_pre = ref.prefill(embeds, lengths)
        assert torch.equal(pre.logits, ref_pre.logits)  # same kernels in prefill
        assert out.tokens.tolist() == ref.decode(ref_pre, 10, None).tokens.tolist()
    embeds, lengths = stack_left_padded(rows[:1])
    for eng in (tri, ref):
        eng.prefill(embeds, lengths)
    forced = torch.tensor([[5, 17, 42, 8, 99, 3]])
    for S in (3, 6):
        gemv_calls.clear()
        a, b = tri.extend(forced[:, :S]), ref.extend(forced[:, :S])
        assert (len(gemv_calls) > 0) == (S <= GEMV_MAX_M)
        assert (a - b).abs().max() <= 1e-4, f"extend of {S}: max |diff| {(a - b).abs().max():.3g}"


# ---------------------------------------------------------------------------------------------
# GPU: compiled, in CUDA graphs


@pytest.mark.gpu
def test_gpu_compiled_dense_gemv_in_a_cuda_graph_is_exact_and_deterministic():
    torch._dynamo.reset()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(17)
    N, K = 1000, 2048  # N not a multiple of any block
    w = torch.randn(N, K, device=dev, generator=g, dtype=torch.bfloat16) * 0.02
    dw = TritonDenseWeight(w)
    for M in (1, 3, 4):
        fn = torch.compile(lambda x, w: w.linear(torch.nn.functional.silu(x), decode=True), fullgraph=True, dynamic=False)
        x = torch.randn(M, K, device=dev, generator=g, dtype=torch.bfloat16)
        y0 = fn(x, dw)
        graph, static_y = cuda_graph_of(fn, x, dw)
        graph.replay()
        assert torch.equal(static_y, y0), f"M={M}: graph replay differs from the compiled call"
        h = torch.nn.functional.silu(x)
        ref = h.double() @ w.double().T
        tol = 2.0**-8 * (ref.abs() + h.double().abs() @ w.double().abs().T)  # bf16 rounding of silu(x) and y
        assert ((static_y.double() - ref).abs() <= tol).all(), f"M={M}"
    torch._dynamo.reset()


@pytest.mark.gpu
def test_gpu_compiled_engine_with_triton_gemv_matches_inductor():
    torch.backends.cuda.matmul.allow_tf32 = False
    from stagewise.engine.base import stack_left_padded

    lm = tiny_lm().cuda()
    g = torch.Generator().manual_seed(1)
    embeds, lengths = stack_left_padded([torch.randn(9, 64, generator=g)])
    embeds = embeds.cuda()
    outs = {}
    for kernel in ("inductor", "triton"):
        eng = FastEngine(lm, FastOptions(max_seq=48, kv_bucket=16, matvec_kernel=kernel))
        assert eng.compiled and eng.matvec_kernel == kernel
        outs[kernel] = eng.decode(eng.prefill(embeds, lengths), 24, None).tokens.tolist()
    assert outs["triton"] == outs["inductor"]


TRACE_SCRIPT = r"""
import torch
from stagewise.engine import dense as D
D.triton_gemv_usable = lambda device: None  # a CPU weight: traced here, never launched
import stagewise.engine.quant_triton  # noqa: F401  (compiled kernels: no interpreter in this process)
graphs = []
def capture(gm, example_inputs):
    graphs.append(gm.code)
    raise RuntimeError("captured")
f = torch.compile(lambda x, w: w.linear(torch.nn.functional.silu(x), decode=True) * 2, fullgraph=True, dynamic=False,
                  backend=capture)
try:
    f(torch.randn(1, 1, 96), D.TritonDenseWeight(torch.randn(40, 96)))
except Exception as e:
    assert "captured" in str(e), e
assert len(graphs) == 1, graphs
print(graphs[0])
"""


@pytest.mark.slow
def test_linear_traces_in_one_graph_under_torch_compile(tmp_path):
    """``torch.compile(fullgraph=True)`` traces TritonDenseWeight.linear, with its producer and
    consumer, into one graph calling ``stagewise.dense_gemv`` with the fixed config (Dynamo only:
    run without the interpreter, which cannot take fake tensors; the GPU tests run it compiled)."""
    import subprocess
    import sys
    from pathlib import Path

    if not Q.triton_available():
        pytest.skip("triton not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", TRACE_SCRIPT], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = proc.stdout
    assert "silu" in code and "mul" in code
    assert "torch.ops.stagewise.dense_gemv(" in code and "block_n = 8, block_k = 256, num_warps = 4, num_stages = 3" in code
