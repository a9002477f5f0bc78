"""Triton kernels for the fast engine's linears, registered as ``torch.library.triton_op``.

Weight-only quantized weights (:mod:`stagewise.engine.quant`) and dense bf16 / fp16 / fp32 weights
(:mod:`stagewise.engine.dense`). Imported lazily by those modules (Triton is optional: CI has
none); importing this module registers three operators that ``torch.compile(fullgraph=True)``
traces through and Inductor inlines into its own generated code, so they sit inside the engine's
CUDA graphs:

``torch.ops.stagewise.wq_gemv(x, data, scale, zero, *, kind, group_size, block_n, block_k,
num_warps, num_stages) -> y``
    Decode with few rows (``M = 1..GEMV_MAX_M``): one program per ``block_n`` output channels
    streams those weight rows once, dequantizes in registers and reduces on the CUDA cores
    (``sum(q * x)``); the ``M`` rows of ``x`` reuse each loaded weight tile (``M`` is a
    compile-time constant, the loop over rows is unrolled). No split-K: with ``block_n = 8`` a
    4096-row weight already gives 512 programs (~4 per SM on an H100), and without split-K
    there is no cross-program reduction, so results are bit-for-bit deterministic.

``torch.ops.stagewise.wq_gemm(x, data, scale, zero, *, kind, group_size, block_m, block_n,
block_k, group_m, num_warps, num_stages) -> y``
    Everything else (decode at larger ``M``, speculative verify, prefill): a tiled tensor-core
    GEMM (``tl.dot``) that dequantizes each weight tile in registers before the dot (int4) or
    multiplies the per-channel scale in the epilogue (int8, fp8: their codes are exact in
    bf16/fp16, so the dot runs on the raw codes). Grouped program order (``group_m``) keeps a
    band of weight tiles in L2 while the ``M`` blocks that use them run (prefill).

``torch.ops.stagewise.dense_gemv(x, w, *, block_n, block_k, num_warps, num_stages) -> y``
    The same few-row GEMV for a dense ``w [N, K]`` (bf16, fp16 or fp32, loaded in its own dtype
    and converted to fp32 in registers): the fast engine's ``matvec_kernel="triton"``. Its launch
    parameters are fixed by the caller from the shape (no timing-based choice), so every process
    that runs it compiles the same kernel.

Formats (see :class:`stagewise.engine.quant.QuantizedWeight`): int8 ``data [N, K]`` int8,
``scale [N]`` fp32, ``w = q * scale``; fp8 ``data [N, K]`` float8_e4m3fn, same scale; int4
``data [N, K/2]`` uint8 (element ``2j`` in the low nibble of byte ``j``, ``2j+1`` in the high
nibble), ``scale, zero [N, K/G]`` fp16, ``w = q * scale + zero`` with ``q in 0..15``; dense
``w [N, K]`` in any of bf16, fp16, fp32 (independent of x's dtype).

Only Triton APIs present in both 3.6 (the GPU machine) and 3.9 are used (``tl.static_range``,
``tl.interleave``, ``tl.dot(input_precision=...)``). Under ``TRITON_INTERPRET=1`` (set before
this module is imported) the kernels run on CPU tensors; the interpreter cannot ``tl.dot``
bf16 (it multiplies the raw uint16 bits), so the CPU tests use fp32 and fp16 activations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

KIND_CODES = {"int8": 0, "fp8": 0, "int4": 1}  # 0: per-channel scale, 1: grouped scale + zero


@triton.jit
def _gemv_per_channel_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_xm, stride_ym,
    M: tl.constexpr, M_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[m, n] = scale[n] * sum_k q[n, k] x[m, k] for int8 / fp8 codes (fp32 accumulation)."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output channels of this program
    n_ok = rn < N
    rk = tl.arange(0, BLOCK_K)  # [BK]
    rm = tl.arange(0, M_P2)  # [M_P2] rows of x (padded to a power of two)
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * K  # [BN, 1]
    acc = tl.zeros([M_P2, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        w_ok = n_ok[:, None] & k_ok[None, :]
        # no `other=`: Triton cannot cast an int fill to fp8; masked lanes are zeroed after conversion
        q = tl.where(w_ok, tl.load(w_rows + kk[None, :], mask=w_ok).to(tl.float32), 0.0)  # [BN, BK]
        for mi in tl.static_range(M):
            xv = tl.load(x_ptr + mi * stride_xm + kk, mask=k_ok, other=0).to(tl.float32)  # [BK]
            part = tl.sum(q * xv[None, :], axis=1)  # [BN]
            acc = tl.where(rm[:, None] == mi, acc + part[None, :], acc)
    s = tl.load(s_ptr + rn, mask=n_ok, other=0)  # [BN] fp32
    acc = acc * s[None, :]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & n_ok[None, :])


@triton.jit
def _gemv_int4_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, K, stride_xm, stride_ym,
    M: tl.constexpr, M_P2: tl.constexpr, GROUP: tl.constexpr, SUB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[m, n] = sum_g scale[n, g] sum_{k in g} q[n, k] x[m, k] + zero[n, g] sum_{k in g} x[m, k].

    A K-tile of ``BLOCK_K`` is ``BLOCK_K / SUB`` sub-blocks of ``SUB = min(GROUP, BLOCK_K)``
    elements; each sub-block lies in one group, so its scale and zero apply to the whole
    sub-block sum (two FMAs per weight element, the dequantization factored out of the sum).
    """
    SUBS: tl.constexpr = BLOCK_K // SUB
    HALF: tl.constexpr = SUB // 2
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_ok = rn < N
    rs = tl.arange(0, SUBS)  # [SUBS] sub-block index within the tile
    rj = tl.arange(0, HALF)  # [HALF] byte within a sub-block
    rm = tl.arange(0, M_P2)
    n_groups = K // GROUP
    w_rows = w_ptr + rn.to(tl.int64)[:, None, None] * (K // 2)  # [BN, 1, 1]
    sz_rows = rn.to(tl.int64)[:, None] * n_groups  # [BN, 1]
    acc = tl.zeros([M_P2, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + rs * SUB  # [SUBS] first k of each sub-block (K % SUB == 0: all or nothing)
        s_ok = ks < K
        kb = ks[:, None] // 2 + rj[None, :]  # [SUBS, HALF] byte column
        p = tl.load(w_rows + kb[None, :, :], mask=n_ok[:, None, None] & s_ok[None, :, None], other=0)  # [BN, SUBS, HALF] u8
        lo = (p & 15).to(tl.float32)  # codes of even k
        hi = (p >> 4).to(tl.float32)  # codes of odd k
        g = ks // GROUP  # [SUBS]
        sz_mask = n_ok[:, None] & s_ok[None, :]
        sc = tl.load(s_ptr + sz_rows + g[None, :], mask=sz_mask, other=0).to(tl.float32)  # [BN, SUBS]
        zp = tl.load(z_ptr + sz_rows + g[None, :], mask=sz_mask, other=0).to(tl.float32)  # [BN, SUBS]
        for mi in tl.static_range(M):
            xb = x_ptr + mi * stride_xm + ks[:, None] + 2 * rj[None, :]  # [SUBS, HALF]
            xe = tl.load(xb, mask=s_ok[:, None], other=0).to(tl.float32)  # x at even k
            xo = tl.load(xb + 1, mask=s_ok[:, None], other=0).to(tl.float32)  # x at odd k
            qx = tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2)  # [BN, SUBS]
            xs = tl.sum(xe + xo, axis=1)  # [SUBS]
            part = tl.sum(qx * sc + zp * xs[None, :], axis=1)  # [BN]
            acc = tl.where(rm[:, None] == mi, acc + part[None, :], acc)
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & n_ok[None, :])


@triton.jit
def _gemv_dense_kernel(
    x_ptr, w_ptr, y_ptr, N, K, stride_xm, stride_ym,
    M: tl.constexpr, M_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[m, n] = sum_k w[n, k] x[m, k] for a dense weight in its own dtype (fp32 accumulation).

    As :func:`_gemv_per_channel_kernel` without the scale: each program streams ``BLOCK_N``
    weight rows once, in K steps of ``BLOCK_K``, for all ``M`` rows of x.
    """
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output channels of this program
    n_ok = rn < N
    rk = tl.arange(0, BLOCK_K)  # [BK]
    rm = tl.arange(0, M_P2)  # [M_P2] rows of x (padded to a power of two)
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * K  # [BN, 1]
    acc = tl.zeros([M_P2, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # [BN, BK]
        for mi in tl.static_range(M):
            xv = tl.load(x_ptr + mi * stride_xm + kk, mask=k_ok, other=0.0).to(tl.float32)  # [BK]
            part = tl.sum(w * xv[None, :], axis=1)  # [BN]
            acc = tl.where(rm[:, None] == mi, acc + part[None, :], acc)
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & n_ok[None, :])


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
    INT4: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, IEEE: tl.constexpr,
):
    """y = x @ dequant(W)^T on tensor cores, fp32 accumulation.

    int4: each ``[BLOCK_N, BLOCK_K]`` tile lies in one group (``GROUP % BLOCK_K == 0``) and is
    dequantized to the activation dtype before the dot (``q * scale + zero``, rounded once).
    int8 / fp8: the raw codes (exact in bf16/fp16) go into the dot; the scale is applied to the
    fp32 accumulator at the end. ``IEEE``: full-precision fp32 dot (fp32 activations only).
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n  # programs per band of GROUP_M row blocks
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    rk = tl.arange(0, BLOCK_K)  # [BK]
    m_ok = rm < M
    n_ok = rn < N
    rn64 = rn.to(tl.int64)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)  # [BM, BK]
        if INT4:
            rh = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # [BK/2] byte columns (K % BLOCK_K == 0)
            p = tl.load(w_ptr + rn64[:, None] * (K // 2) + rh[None, :], mask=n_ok[:, None], other=0)  # [BN, BK/2]
            g = k0 // GROUP
            sc = tl.load(s_ptr + rn64 * (K // GROUP) + g, mask=n_ok, other=0).to(tl.float32)  # [BN]
            zp = tl.load(z_ptr + rn64 * (K // GROUP) + g, mask=n_ok, other=0).to(tl.float32)  # [BN]
            lo = (p & 15).to(tl.float32) * sc[:, None] + zp[:, None]
            hi = (p >> 4).to(tl.float32) * sc[:, None] + zp[:, None]
            w = tl.interleave(lo, hi).to(a.dtype)  # [BN, BK] in k order
        else:
            w_ok = n_ok[:, None] & k_ok[None, :]
            q = tl.load(w_ptr + rn64[:, None] * K + kk[None, :], mask=w_ok)  # no `other=`: see the GEMV
            w = tl.where(w_ok, q.to(tl.float32), 0.0).to(a.dtype)  # [BN, BK] codes, exact in bf16 / fp16
        if IEEE:
            acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(w), acc)
    if not INT4:
        s = tl.load(s_ptr + rn, mask=n_ok, other=0)  # [BN] fp32
        acc = acc * s[None, :]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _check(x: torch.Tensor, data: torch.Tensor, kind: str) -> None:
    assert x.ndim == 2 and x.is_contiguous(), "x must be a contiguous [M, K] tensor"
    assert kind in KIND_CODES, kind


@triton_op(
    "stagewise::wq_gemv",
    mutates_args=(),
    schema="(Tensor x, Tensor data, Tensor scale, Tensor? zero, *, str kind, int group_size, int block_n, "
    "int block_k, int num_warps, int num_stages) -> Tensor",
)
def wq_gemv(
    x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, *, kind: str,
    group_size: int, block_n: int, block_k: int, num_warps: int, num_stages: int,
) -> torch.Tensor:
    """Few-row weight-streaming GEMV. ``x [M, K]`` (contiguous, M small) -> ``y [M, N]`` in x's dtype.

    ``block_k`` must be a multiple of ``min(group_size, block_k)`` (int4) -- powers of two are.
    """
    _check(x, data, kind)
    M, K = x.shape
    N = data.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(N, block_n),)
    if kind == "int4":
        wrap_triton(_gemv_int4_kernel)[grid](
            x, data, scale, zero, y, N, K, x.stride(0), y.stride(0),
            M=M, M_P2=_next_pow2(M), GROUP=group_size, SUB=min(group_size, block_k),
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
        )
    else:
        wrap_triton(_gemv_per_channel_kernel)[grid](
            x, data, scale, y, N, K, x.stride(0), y.stride(0),
            M=M, M_P2=_next_pow2(M), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
        )
    return y


@triton_op(
    "stagewise::dense_gemv",
    mutates_args=(),
    schema="(Tensor x, Tensor w, *, int block_n, int block_k, int num_warps, int num_stages) -> Tensor",
)
def dense_gemv(x: torch.Tensor, w: torch.Tensor, *, block_n: int, block_k: int, num_warps: int, num_stages: int) -> torch.Tensor:
    """Few-row GEMV of a dense weight: ``x [M, K]`` (contiguous, M small) times ``w [N, K]``
    (contiguous; bf16, fp16 or fp32) transposed -> ``y [M, N]`` in x's dtype, fp32 accumulation.

    Deterministic (no split-K: each output is reduced by one program in a fixed order).
    ``block_n``, ``block_k``: powers of two; ``M`` is unrolled in the kernel (one compile per M).

    Raises:
        AssertionError: x or w not 2-D and contiguous, or their K differ (callers check first:
            :meth:`stagewise.engine.dense.TritonDenseWeight.linear`).
    """
    assert x.ndim == 2 and x.is_contiguous(), "x must be a contiguous [M, K] tensor"
    assert w.ndim == 2 and w.is_contiguous() and w.shape[1] == x.shape[1], "w must be a contiguous [N, K] tensor"
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    wrap_triton(_gemv_dense_kernel)[(triton.cdiv(N, block_n),)](
        x, w, y, N, K, x.stride(0), y.stride(0),
        M=M, M_P2=_next_pow2(M), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )
    return y


@triton_op(
    "stagewise::wq_gemm",
    mutates_args=(),
    schema="(Tensor x, Tensor data, Tensor scale, Tensor? zero, *, str kind, int group_size, int block_m, "
    "int block_n, int block_k, int group_m, int num_warps, int num_stages) -> Tensor",
)
def wq_gemm(
    x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, *, kind: str,
    group_size: int, block_m: int, block_n: int, block_k: int, group_m: int, num_warps: int, num_stages: int,
) -> torch.Tensor:
    """Tensor-core GEMM with fused dequantization. ``x [M, K]`` contiguous -> ``y [M, N]`` in x's dtype.

    For int4, ``block_k`` is clipped to ``group_size`` (a tile must not straddle two groups).
    """
    _check(x, data, kind)
    M, K = x.shape
    N = data.shape[0]
    int4 = kind == "int4"
    if int4:
        block_k = min(block_k, group_size)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    wrap_triton(_gemm_kernel)[grid](
        x, data, scale, zero if int4 else scale, y, M, N, K, x.stride(0), y.stride(0),
        INT4=int4, GROUP=group_size if int4 else 1, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_M=group_m, IEEE=x.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages,
    )
    return y
