"""The decoder's math as pure functions of tensors: what the fast engine compiles and captures.

Why pure functions: one LLaMA layer is written once, as functions of (activations, weights,
cache views), so ONE compiled artifact serves all layers (short compile) and the same code runs
eagerly on CPU (the tests check it against ``transformers``). The engine
(:mod:`stagewise.engine.fast`) owns the buffers, the weight views and the CUDA graphs; nothing
here allocates state or reads anything back to the host.

Three shapes of work go through these functions:

* prefill: ``S`` prompt tokens per row, causal attention among themselves (compute-bound);
* decode: one new token per row against the KV cache (bandwidth-bound: every weight is read once);
* extend: ``S`` new tokens per row against the cache (a speculative verify step feeds the last
  accepted token plus ``k`` draft tokens): like decode, with a causal mask among the new tokens.
  Decode is extend with ``S = 1``.

Layouts: the residual stream is ``[B, S, D]``; the KV cache of one layer ``[B, Hkv, max_seq, hd]``.
In decode/extend the ``G = H / Hkv`` query heads that share a KV head are folded with the ``S`` new
positions into the query-length axis (``[B, Hkv, G * S, hd]``), so attention needs neither
``enable_gqa`` nor a repeated cache.

Projections go through :func:`linear`, which takes either a dense ``[N, K]`` tensor or a weight
with its own kernels (:class:`QuantizedLinear`: quantized, :mod:`stagewise.engine.quant`, or dense
through the Triton GEMV, :mod:`stagewise.engine.dense`); row-parallel projections (o-proj and
down-proj under tensor parallelism) are followed by the ``reduce`` callable the engine passes in
(an all-reduce; the identity on one GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

# RoPE variants whose frequencies do not depend on the sequence length: the HF module's
# ``inv_freq`` and ``attention_scaling`` describe them completely.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

Reduce = Callable[[torch.Tensor], torch.Tensor]
"""An in-place sum over tensor-parallel ranks of a partial projection output (identity on one GPU)."""


def no_reduce(x: torch.Tensor) -> torch.Tensor:
    """The :data:`Reduce` of a single device: returns ``x`` unchanged."""
    return x


@runtime_checkable
class QuantizedLinear(Protocol):
    """An ``[N, K]`` weight that computes its own products: weight-only quantized
    (:class:`stagewise.engine.quant.QuantizedWeight`) or dense through the Triton GEMV
    (:class:`stagewise.engine.dense.TritonDenseWeight`)."""

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None, *, decode: bool) -> torch.Tensor:
        """``x @ W^T (+ bias)`` for ``x: [..., K]``; ``decode`` picks the memory-bound kernel."""
        ...


Weight = torch.Tensor | QuantizedLinear


@dataclass(frozen=True)
class Dims:
    """The shapes a layer function needs (from the HF config; per rank under tensor parallelism).

    Attributes:
        n_layers: decoder layers.
        hidden: model width ``D``.
        n_heads / n_kv_heads: query and key/value heads held by this rank.
        head_dim: ``hd``.
        intermediate: MLP width held by this rank.
        vocab: LM-head rows.
        eps: RMSNorm epsilon.
    """

    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA); 1 for multi-head attention."""
        return self.n_heads // self.n_kv_heads

    @property
    def qkv_split(self) -> tuple[int, int, int]:
        """Rows of q, k and v in the fused QKV weight."""
        return (self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim)


class LayerWeights(NamedTuple):
    """One decoder layer's weights (views of the HF parameters, or quantized; biases may be ``None``)."""

    ln1: torch.Tensor  # [D]
    wqkv: Weight  # [(H + 2 Hkv) hd, D]
    bqkv: torch.Tensor | None
    wo: Weight  # [D, H hd]
    bo: torch.Tensor | None
    ln2: torch.Tensor  # [D]
    w_gate_up: Weight  # [2 I, D]: gate rows first, then up
    b_gate_up: torch.Tensor | None
    w_down: Weight  # [D, I]
    b_down: torch.Tensor | None


# ----------------------------------------------------------------------------------------------
# Building blocks


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA RMSNorm, computed as HF does: statistics in fp32, scale in the model dtype. x: ``[..., D]``."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def linear(x: torch.Tensor, w: Weight, b: torch.Tensor | None, *, matvec: bool, decode: bool) -> torch.Tensor:
    """``x @ w.T (+ b)`` with ``x: [..., K]``, ``w: [N, K]`` dense or quantized.

    ``matvec`` (dense weights) marks the memory-bound case under ``torch.compile``: the weight is
    then written as a multiply-and-sum that the compiler turns into one reduction kernel streaming
    ``w`` row by row, with the producer of ``x`` (SiLU gating, say) fused into its loads (eagerly it
    would materialize ``[N, K]``); with a few rows (``FastOptions.extend_matvec``, a verify step) the
    same reduction is written weight-major so each weight row is read once for all rows; otherwise
    cuBLAS. ``decode`` (weights with their own kernels) picks the memory-bound kernel (a decode or
    verify step: few rows) over the prefill GEMM: fused dequantization
    (:meth:`stagewise.engine.quant.QuantizedWeight.linear`) or the dense Triton GEMV
    (:meth:`stagewise.engine.dense.TritonDenseWeight.linear`); ``matvec`` does not apply to them. (Folding the RMSNorm
    statistics into the same reduction, as ``rsqrt(mean(x^2)) * (w @ (ln * x))``, removes a kernel
    per norm but measured slower: the compiler then inlines the rescaling into the next projection's
    loads.)
    """
    if not isinstance(w, torch.Tensor):
        return w.linear(x, b, decode=decode)
    if matvec and x.shape[:-1].numel() > 1:
        # a few rows (a verify step): built weight-major, [N, M], so that consecutive outputs share a
        # weight row and the kernel streams each row once for all M rows; then transposed
        rows = x.reshape(-1, x.shape[-1])  # [M, K]
        y = (w.float()[:, None, :] * rows.float()[None]).sum(-1)  # [N, M]
        y = y.t().reshape(*x.shape[:-1], -1).to(x.dtype)
    elif matvec:
        y = (x.unsqueeze(-2).float() * w.float()).sum(-1).to(x.dtype)
    else:
        y = F.linear(x, w)
    return y if b is None else y + b


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (HF's half-split layout). x: ``[B, heads, S, hd]``;
    cos, sin broadcastable to it (``[B, 1, S, hd]``)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _project_qkv(x: torch.Tensor, w: LayerWeights, dims: Dims, matvec: bool, decode: bool):
    # x: [B, S, D] -> q: [B, S, H, hd], k, v: [B, S, Hkv, hd]
    B, S, _ = x.shape
    h = rms_norm(x, w.ln1, dims.eps)
    q, k, v = linear(h, w.wqkv, w.bqkv, matvec=matvec, decode=decode).split(dims.qkv_split, dim=-1)
    return (
        q.view(B, S, dims.n_heads, dims.head_dim),
        k.view(B, S, dims.n_kv_heads, dims.head_dim),
        v.view(B, S, dims.n_kv_heads, dims.head_dim),
    )


def _out_and_mlp(x, attn, w: LayerWeights, dims: Dims, matvec: bool, decode: bool, reduce: Reduce) -> torch.Tensor:
    # x: [B, S, D] residual stream; attn: [B, S, H hd]. Row-parallel projections end in ``reduce``;
    # a bias is added once, after the reduction.
    x = x + _row_parallel(attn, w.wo, w.bo, matvec, decode, reduce)
    h = rms_norm(x, w.ln2, dims.eps)
    gate, up = linear(h, w.w_gate_up, w.b_gate_up, matvec=matvec, decode=decode).chunk(2, dim=-1)  # [B, S, I] each
    return x + _row_parallel(F.silu(gate) * up, w.w_down, w.b_down, matvec, decode, reduce)


def _row_parallel(x, w: Weight, b: torch.Tensor | None, matvec: bool, decode: bool, reduce: Reduce) -> torch.Tensor:
    y = reduce(linear(x, w, None, matvec=matvec, decode=decode))
    return y if b is None else y + b


# ----------------------------------------------------------------------------------------------
# Prefill


def prefill_in(x, w: LayerWeights, rope, kv, *, dims: Dims) -> torch.Tensor:
    """Attention input of one layer over a prompt; writes its K/V into the cache.

    Args:
        x: ``[B, S, D]`` residual stream.
        rope: ``(cos, sin)``, each ``[B, 1, S, hd]``.
        kv: ``(k, v)`` cache views ``[B, Hkv, S, hd]`` (slots ``[0, S)``), written in place.

    Returns:
        q: ``[B, H, S, hd]``.
    """
    q, k, v = _project_qkv(x, w, dims, matvec=False, decode=False)
    cos, sin = rope
    kv[0].copy_(apply_rope(k.transpose(1, 2), cos, sin))
    kv[1].copy_(v.transpose(1, 2))
    return apply_rope(q.transpose(1, 2), cos, sin)


def prefill_out(x, attn, w: LayerWeights, *, dims: Dims, reduce: Reduce = no_reduce) -> torch.Tensor:
    """Rest of the layer over a prompt. attn: ``[B, H, S, hd]`` -> new x ``[B, S, D]``."""
    B, _, S, _ = attn.shape
    return _out_and_mlp(x, attn.transpose(1, 2).reshape(B, S, -1), w, dims, False, False, reduce)


def prefill_head(x, norm_w, lm_head: Weight, *, dims: Dims) -> torch.Tensor:
    """Final norm and LM head at the last prompt position. x: ``[B, S, D]`` -> ``[B, V]`` fp32."""
    return linear(rms_norm(x[:, -1], norm_w, dims.eps), lm_head, None, matvec=False, decode=False).float()


def attend_prefill(q, kv, mask: torch.Tensor | None, group: int) -> torch.Tensor:
    """Causal attention over the prompt. q: ``[B, H, S, hd]``; mask ``[B, 1, S, S]`` bool or
    ``None`` (no padding: SDPA's flash path with ``is_causal``). Returns ``[B, H, S, hd]``."""
    k, v = kv
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ----------------------------------------------------------------------------------------------
# Decode and extend (S new tokens per row against the cache; decode is S = 1)


def decode_in(x, w: LayerWeights, rope, kv, slots, *, dims: Dims, matvec: bool) -> torch.Tensor:
    """Attention input of one layer for ``S`` new tokens per row; writes their K/V at ``slots``.

    Args:
        x: ``[B, S, D]`` residual stream.
        rope: ``(cos, sin)``, each ``[B, 1, S, hd]``.
        kv: ``(k, v)`` full cache rows ``[B, Hkv, max_seq, hd]``, written at ``slots``.
        slots: ``[S]`` int64 on the device: the cache slots of the new tokens.

    Returns:
        q: ``[B, Hkv, G * S, hd]`` (query head ``h = kv * G + g`` at position ``s`` is row
        ``g * S + s`` of KV head ``kv``).
    """
    B, S, _ = x.shape
    q, k, v = _project_qkv(x, w, dims, matvec, True)
    cos, sin = rope
    kv[0].index_copy_(2, slots, apply_rope(k.transpose(1, 2), cos, sin))  # [B, Hkv, S, hd]
    kv[1].index_copy_(2, slots, v.transpose(1, 2))
    q = apply_rope(q.transpose(1, 2), cos, sin)  # [B, H, S, hd] = [B, Hkv, G, S, hd]
    return q.reshape(B, dims.n_kv_heads, dims.group * S, dims.head_dim)


def attend_decode(q, k, v, bias) -> torch.Tensor:
    """New tokens against the cache slots in use (SDPA: on an H100, cuDNN's split-KV kernel; a
    compiled multiply-and-sum + softmax measured twice as slow).

    q: ``[B, Hkv, G * S, hd]``; k, v: ``[B, Hkv, L, hd]`` (the first L slots); bias ``[B, 1, 1 or
    G * S, L]`` (0 visible, -inf hidden). Returns ``[B, Hkv, G * S, hd]``.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def attend_decode_math(q, k, v, bias) -> torch.Tensor:
    """:func:`attend_decode` written out (scores, softmax, weighted sum of values; fp32 inside),
    for :attr:`~stagewise.engine.fast.FastOptions.deterministic`: compiled, every reduction is a
    generated kernel with a fixed order (no split-KV, no atomics), so the result is bit-for-bit the
    same run to run, unlike cuDNN's SDPA kernel; the same function as SDPA up to rounding.

    q: ``[B, Hkv, G * S, hd]``; k, v: ``[B, Hkv, L, hd]``; bias ``[B, 1, 1 or G * S, L]``.
    Returns ``[B, Hkv, G * S, hd]`` in ``q``'s dtype.
    """
    scores = (q.float()[:, :, :, None, :] * k.float()[:, :, None, :, :]).sum(-1) * q.shape[-1] ** -0.5 + bias.float()  # [B, Hkv, GS, L]
    p = torch.softmax(scores, dim=-1)
    return (p[..., None] * v.float()[:, :, None, :, :]).sum(-2).to(q.dtype)


def decode_out(x, attn, w: LayerWeights, *, dims: Dims, matvec: bool, reduce: Reduce = no_reduce) -> torch.Tensor:
    """Rest of the layer for ``S`` new tokens. attn: ``[B, Hkv, G * S, hd]`` -> new x ``[B, S, D]``."""
    B, S = x.shape[:2]
    a = attn.view(B, dims.n_kv_heads, dims.group, S, dims.head_dim).permute(0, 3, 1, 2, 4)  # [B, S, Hkv, G, hd]
    return _out_and_mlp(x, a.reshape(B, S, -1), w, dims, matvec, True, reduce)


def step_in(tokens, pos, slot, pad_bias, embed, rope_table, *, group: int):
    """Start of a decode/extend step: embed the fed tokens, look up RoPE, build the attention bias.

    Args:
        tokens: ``[B, S]`` int64 fed tokens; pos: ``[B]`` RoPE position of the first of them;
        slot: ``[1]`` int64 cache slot of the first of them (same for every row).
        pad_bias: ``[B, L]`` 0 on real slots, -inf on a row's left padding (the first L slots).
        embed: ``[V, D]``; rope_table: ``(cos, sin)``, each ``[max_seq, hd]``.

    Returns:
        ``x [B, S, D]``, ``(cos, sin)`` each ``[B, 1, S, hd]``, ``bias [B, 1, 1 or G * S, L]``:
        query ``s`` sees slot ``j`` iff ``j <= slot + s`` and ``j`` is not padding. Slots past the
        current position hold stale K/V of rejected draft tokens; this mask is what makes a
        rollback "by position only" exact.
    """
    B, S = tokens.shape
    L = pad_bias.shape[1]
    x = F.embedding(tokens, embed)  # [B, S, D]
    p = pos[:, None] + torch.arange(S, device=pos.device)  # [B, S]
    cos = rope_table[0][p][:, None]  # [B, 1, S, hd]
    sin = rope_table[1][p][:, None]
    j = torch.arange(L, device=slot.device)  # [L]
    last = slot + torch.arange(S, device=slot.device)  # [S]: the last slot query s may see
    future = torch.where(j[None, :] > last[:, None], float("-inf"), 0.0).to(pad_bias.dtype)  # [S, L]
    if S == 1:
        bias = (pad_bias + future)[:, None, None, :]  # [B, 1, 1, L]
    else:
        bias = (pad_bias[:, None, :] + future[None]).repeat(1, group, 1)[:, None]  # [B, 1, G * S, L]
    return x, (cos, sin), bias


def head(x, norm_w, lm_head: Weight, *, dims: Dims, matvec: bool) -> torch.Tensor:
    """Final norm and LM head over new tokens. x: ``[B, S, D]`` -> logits ``[B, S, V]`` fp32."""
    return linear(rms_norm(x, norm_w, dims.eps), lm_head, None, matvec=matvec, decode=True).float()
