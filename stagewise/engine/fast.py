"""stagewise's own decode engine for LLaMA-family decoders (``--engine fast``).

Why it looks like this: decoding one token at batch 1 is bound by memory bandwidth, not
arithmetic. Each step must stream every weight once (13.5 GB for LLaMA-7B in bf16: ~4.5 ms at
3 TB/s) plus the part of the KV cache in use; anything else (Python, kernel launches, host
syncs, re-reading a max-length cache) is overhead on top of that floor. Prefill, by contrast,
is compute-bound (641 tokens x 2 x 6.7e9 FLOPs), so it only needs big GEMMs, flash attention
and few small kernels.

The design, after gpt-fast (pytorch-labs/gpt-fast), in plain PyTorch:

* The weights are the ``LlamaForCausalLM``'s own tensors, never copied. q/k/v and gate/up are
  fused into one buffer each (one GEMV instead of three/two) and the HF parameters are
  re-pointed to views of those buffers, so memory is not doubled and the HF model still works.
* A static KV cache ``[layers, max_batch, kv_heads, max_seq, head_dim]`` is allocated once
  (``setup``) and written in place by slot. Row ``b`` of a batch keeps the prompt's left padding
  in slots ``[0, pad_b)``; an additive key mask ``kv_bias`` hides those slots and the unused tail.
* One transformer layer is two small functions around attention (``decode_in``: RMSNorm, fused
  QKV, RoPE, cache write; ``decode_out``: o-proj, residual, RMSNorm, fused gate/up, SiLU, down,
  residual). They take the weights as arguments, so ONE compiled artifact serves all layers
  (short compile), and ``torch.compile`` fuses the norm, RoPE and SiLU into few kernels.
* The whole decode step (embedding, all layers, LM head, greedy argmax, EOS bookkeeping,
  position/slot/step counters) reads and writes only static device buffers, so it is captured
  in one CUDA graph per (batch, KV-length bucket). The bucket ``L`` (a multiple of
  ``kv_bucket``) bounds the cache slice that attention reads: a step streams the cache in use,
  not a ``max_seq``-sized one.
* No host synchronization per token: EOS is tracked on the device; the host looks at the
  ``done`` flags every ``check_every`` steps and once at the end.
* Batch-1 decode computes each projection as one multiply-and-sum (``matvec``), which the
  compiler emits as a single weight-streaming reduction kernel with the RMSNorm scale and the
  SiLU-gating folded into its loads; larger batches use cuBLAS.
* Prefill uses the same layer structure, compiled once with batch and prompt length dynamic;
  SDPA takes its flash path with ``is_causal`` when the batch has no padding, an explicit mask
  otherwise. Each prompt shape that :meth:`FastEngine.warmup` sees is captured whole in one CUDA
  graph (no per-layer host work left); other shapes run the compiled functions one by one.

On CPU everything runs eagerly (no compile, no graphs, fp32 in the tests) through the same
functions, so CI checks it against :class:`stagewise.engine.hf.HFEngine`.

Measured on an H100 (LLaMA-7B shapes, bf16, 641-token prompt): 5.24 ms per token at batch 1
(86 % of the copy bandwidth), prefill 13.9 ms, 2,016 tok/s decoding at batch 16, 27 s of
compile + warm-up; see ``docs/results/decode_engines_notes.md`` for the profile and what is left.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from stagewise.engine.base import DecodeOutput, PrefillOutput, left_pad_positions
from stagewise.engine.hf import count_until_eos
from stagewise.models.weights import fuse_linears
from stagewise.measure.timing import StepTimer

# RoPE variants whose frequencies do not depend on the sequence length: the HF module's
# ``inv_freq`` and ``attention_scaling`` describe them completely.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class Dims:
    """The shapes a layer function needs (read from the HF config)."""

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
        return (self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim)


class LayerWeights(NamedTuple):
    """One decoder layer's tensors (aliases of the HF parameters; biases may be ``None``)."""

    ln1: torch.Tensor  # [D]
    wqkv: torch.Tensor  # [(H + 2 Hkv) hd, D]
    bqkv: torch.Tensor | None
    wo: torch.Tensor  # [D, H hd]
    bo: torch.Tensor | None
    ln2: torch.Tensor  # [D]
    w_gate_up: torch.Tensor  # [2 I, D]
    b_gate_up: torch.Tensor | None
    w_down: torch.Tensor  # [D, I]
    b_down: torch.Tensor | None


class PrefillGraph(NamedTuple):
    """A captured prefill: copy the prompt into ``embeds`` / ``mask``, replay, read ``logits``."""

    graph: Any  # torch.cuda.CUDAGraph
    embeds: torch.Tensor  # [B, S, D]
    mask: torch.Tensor  # [B, S] bool
    logits: torch.Tensor  # [B, V] fp32


class StepBuffers(NamedTuple):
    """The static device state one decode step reads and advances (rows sliced to the batch)."""

    tokens: torch.Tensor  # [B] int64: the token this step feeds in
    pos: torch.Tensor  # [B] int64: its RoPE position (real tokens only)
    slot: torch.Tensor  # [1] int64: the cache slot this step writes (same for every row)
    step: torch.Tensor  # [1] int64: index into ``out`` of the token this step produces
    done: torch.Tensor  # [B] bool: row has produced EOS
    eos: torch.Tensor  # [1] int64: EOS id, -1 for none
    out: torch.Tensor  # [B, max_seq] int64: generated tokens
    logits: torch.Tensor  # [B, V] float32: logits of the last step
    kv_bias: torch.Tensor  # [B, max_seq] model dtype: 0 on visible slots, -inf elsewhere


# ----------------------------------------------------------------------------------------------
# The hot path: pure functions of tensors. Each public one is compiled on CUDA.


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA RMSNorm, computed as HF does: statistics in fp32, scale in the model dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, matvec: bool) -> torch.Tensor:
    """``x @ w.T (+ b)`` with ``x: [..., K]``, ``w: [N, K]``.

    ``matvec`` writes it as a multiply-and-sum that the compiler turns into one reduction kernel
    streaming ``w`` row by row, with the producer of ``x`` (SiLU gating, say) fused into its
    loads; only for batch-1 decode under ``torch.compile`` (eagerly it would materialize
    ``[N, K]``). Otherwise cuBLAS. (Folding the RMSNorm statistics into the same reduction, as
    ``rsqrt(mean(x^2)) * (w @ (ln * x))``, removes a kernel per norm but measured slower: the
    compiler then inlines the rescaling into the next projection's loads.)
    """
    if matvec:
        y = (x.unsqueeze(-2).float() * w.float()).sum(-1).to(x.dtype)
    else:
        y = F.linear(x, w)
    return y if b is None else y + b


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (HF's half-split layout). x: ``[B, heads, S, hd]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _project_qkv(x: torch.Tensor, w: LayerWeights, dims: Dims, matvec: bool):
    # x: [B, S, D] -> q: [B, S, H, hd], k, v: [B, S, Hkv, hd]
    B, S, _ = x.shape
    h = rms_norm(x, w.ln1, dims.eps)
    q, k, v = linear(h, w.wqkv, w.bqkv, matvec).split(dims.qkv_split, dim=-1)
    return (
        q.view(B, S, dims.n_heads, dims.head_dim),
        k.view(B, S, dims.n_kv_heads, dims.head_dim),
        v.view(B, S, dims.n_kv_heads, dims.head_dim),
    )


def _out_and_mlp(x: torch.Tensor, attn: torch.Tensor, w: LayerWeights, dims: Dims, matvec: bool) -> torch.Tensor:
    # x: [B, S, D] residual stream; attn: [B, S, H hd]
    x = x + linear(attn, w.wo, w.bo, matvec)
    h = rms_norm(x, w.ln2, dims.eps)
    gate, up = linear(h, w.w_gate_up, w.b_gate_up, matvec).chunk(2, dim=-1)  # [B, S, I] each
    return x + linear(F.silu(gate) * up, w.w_down, w.b_down, matvec)


def prefill_in(x, w: LayerWeights, rope, kv, *, dims: Dims) -> torch.Tensor:
    """Attention input of one layer over a prompt; writes its K/V into the cache.

    Args:
        x: ``[B, S, D]`` residual stream.
        rope: ``(cos, sin)``, each ``[B, 1, S, hd]``.
        kv: ``(k, v)`` cache views ``[B, Hkv, S, hd]`` (slots ``[0, S)``), written in place.

    Returns:
        q: ``[B, H, S, hd]``.
    """
    q, k, v = _project_qkv(x, w, dims, matvec=False)
    cos, sin = rope
    kv[0].copy_(apply_rope(k.transpose(1, 2), cos, sin))
    kv[1].copy_(v.transpose(1, 2))
    return apply_rope(q.transpose(1, 2), cos, sin)


def prefill_out(x, attn, w: LayerWeights, *, dims: Dims) -> torch.Tensor:
    """Rest of the layer over a prompt. attn: ``[B, H, S, hd]`` -> new x ``[B, S, D]``."""
    B, _, S, _ = attn.shape
    return _out_and_mlp(x, attn.transpose(1, 2).reshape(B, S, -1), w, dims, matvec=False)


def prefill_head(x, norm_w, lm_head, *, dims: Dims) -> torch.Tensor:
    """Final norm and LM head at the last prompt position. x: ``[B, S, D]`` -> ``[B, V]`` fp32."""
    return F.linear(rms_norm(x[:, -1], norm_w, dims.eps), lm_head).float()


def decode_in(x, w: LayerWeights, rope, kv, slot, *, dims: Dims, matvec: bool) -> torch.Tensor:
    """Attention input of one layer for one new token per row; writes K/V at ``slot``.

    Args:
        x: ``[B, 1, D]`` residual stream.
        rope: ``(cos, sin)``, each ``[B, 1, 1, hd]``.
        kv: ``(k, v)`` full cache rows ``[B, Hkv, max_seq, hd]``, written at ``slot``.
        slot: ``[1]`` int64 on the device.

    Returns:
        q: ``[B, Hkv, G, hd]``: the G query heads that share a KV head stand in the query-length
        axis, so attention needs neither ``enable_gqa`` nor a repeated cache.
    """
    B = x.shape[0]
    q, k, v = _project_qkv(x, w, dims, matvec)
    cos, sin = rope
    kv[0].index_copy_(2, slot, apply_rope(k.transpose(1, 2), cos, sin))  # [B, Hkv, 1, hd]
    kv[1].index_copy_(2, slot, v.transpose(1, 2))
    q = q.view(B, dims.n_kv_heads, dims.group, dims.head_dim)  # S == 1
    return apply_rope(q, cos, sin)


def decode_out(x, attn, w: LayerWeights, *, dims: Dims, matvec: bool) -> torch.Tensor:
    """Rest of the layer for one token. attn: ``[B, Hkv, G, hd]`` -> new x ``[B, 1, D]``."""
    B = attn.shape[0]
    return _out_and_mlp(x, attn.reshape(B, 1, -1), w, dims, matvec)


def step_in(buf: StepBuffers, embed: torch.Tensor, rope_table):
    """Start of a decode step: embed the fed tokens, look up RoPE, unmask this step's slot.

    Returns:
        ``x [B, 1, D]`` and ``(cos, sin)``, each ``[B, 1, 1, hd]``.
    """
    buf.kv_bias.index_fill_(1, buf.slot, 0.0)
    x = F.embedding(buf.tokens, embed)[:, None]
    cos = rope_table[0][buf.pos][:, None, None]
    sin = rope_table[1][buf.pos][:, None, None]
    return x, (cos, sin)


def step_out(x, norm_w, lm_head, buf: StepBuffers, *, dims: Dims, matvec: bool) -> None:
    """End of a decode step: LM head, greedy token, EOS bookkeeping, advance the counters."""
    logits = linear(rms_norm(x[:, 0], norm_w, dims.eps), lm_head, None, matvec).float()  # [B, V]
    nxt = logits.argmax(-1)
    nxt = torch.where(buf.done, buf.eos, nxt)  # finished rows repeat EOS
    buf.done.logical_or_(nxt == buf.eos)
    buf.out.index_copy_(1, buf.step, nxt[:, None])
    buf.tokens.copy_(nxt)
    buf.logits.copy_(logits)
    buf.pos.add_(1)
    buf.slot.add_(1)
    buf.step.add_(1)


def attend_prefill(q, kv, mask: torch.Tensor | None, group: int) -> torch.Tensor:
    """Causal attention over the prompt. q: ``[B, H, S, hd]``; mask ``[B, 1, S, S]`` bool or
    ``None`` (no padding: SDPA's flash path with ``is_causal``)."""
    k, v = kv
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attend_decode(q, k, v, bias) -> torch.Tensor:
    """One query position per row against the cache slots in use (SDPA: on an H100, cuDNN's
    split-KV kernel; a compiled multiply-and-sum + softmax measured twice as slow).

    q: ``[B, Hkv, G, hd]``; k, v: ``[B, Hkv, L, hd]`` (the first L slots); bias ``[B, L]``
    (0 visible, -inf hidden). Returns ``[B, Hkv, G, hd]``.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :])


def _plain_no_grad(fn):
    """Run ``fn`` with autograd off and inference mode off, whatever mode the caller is in: the
    compiled functions are keyed on the tensors' dispatch keys (an outer ``inference_mode`` would
    recompile them all), and the cache must stay made of ordinary tensors."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------------------------


class FastEngine:
    """Static-cache, CUDA-graph decode engine over a ``transformers`` ``LlamaForCausalLM``.

    Args:
        lm: the model; its weights are used in place (q/k/v and gate/up re-pointed into fused
            buffers, see :func:`fuse_linears`).
        max_batch: rows the cache holds.
        max_seq: cache length (prompt + generated tokens); default the model's
            ``max_position_embeddings``.
        compile: ``torch.compile`` the layer functions (default: on CUDA).
        cuda_graphs: capture the decode step in CUDA graphs (default: on CUDA).
        prefill_graphs: capture the prefill of each shape :meth:`warmup` sees in a CUDA graph
            (default: ``cuda_graphs``).
        kv_bucket: KV-length granularity of the captured decode graphs.
        check_every: decode steps between host looks at the EOS flags.
        matvec: batch-1 decode projections as compiler-generated reductions instead of cuBLAS
            (default: when compiling).
        autotune: let the compiler coordinate-descent-tune the decode kernels (default: when
            compiling on CUDA; adds ~15 s of compile, saves ~1.1 ms/token at batch 1 on an H100).
        time_steps: record per-step CUDA events.

    Attributes:
        warmup_ms: wall time spent compiling, capturing and warming up (ms).

    Raises:
        ValueError: an unsupported model (activation, RoPE type) or bad arguments.
    """

    name = "fast"

    @_plain_no_grad
    def __init__(
        self,
        lm: Any,
        *,
        max_batch: int = 1,
        max_seq: int | None = None,
        compile: bool | None = None,
        cuda_graphs: bool | None = None,
        prefill_graphs: bool | None = None,
        kv_bucket: int = 64,
        check_every: int = 16,
        matvec: bool | None = None,
        autotune: bool | None = None,
        time_steps: bool = True,
        **_: Any,
    ) -> None:
        cfg = lm.config
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"fast engine: hidden_act {cfg.hidden_act!r} is not supported (only 'silu')")
        if kv_bucket < 1 or check_every < 1:
            raise ValueError(f"fast engine: kv_bucket ({kv_bucket}) and check_every ({check_every}) must be >= 1")
        self.lm = lm
        self.device = lm.lm_head.weight.device
        self.dtype = lm.lm_head.weight.dtype
        on_cuda = self.device.type == "cuda"
        self.compiled = on_cuda if compile is None else bool(compile)
        self.use_graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs) and on_cuda
        self.prefill_graphs = self.use_graphs if prefill_graphs is None else bool(prefill_graphs) and on_cuda
        self.matvec = self.compiled if matvec is None else bool(matvec)
        autotune = self.compiled and on_cuda if autotune is None else bool(autotune)
        self.kv_bucket = int(kv_bucket)
        self.check_every = int(check_every)
        self.time_steps = time_steps
        self.warmup_ms = 0.0
        self._warming = False

        attn0 = lm.model.layers[0].self_attn
        self.dims = Dims(
            n_layers=cfg.num_hidden_layers,
            hidden=cfg.hidden_size,
            n_heads=cfg.num_attention_heads,
            n_kv_heads=cfg.num_key_value_heads,
            head_dim=attn0.head_dim,
            intermediate=cfg.intermediate_size,
            vocab=lm.lm_head.weight.shape[0],
            eps=lm.model.norm.variance_epsilon,
        )
        if self.dims.n_heads % self.dims.n_kv_heads:
            raise ValueError("fast engine: num_attention_heads must be a multiple of num_key_value_heads")

        rotary = lm.model.rotary_emb
        rope_type = getattr(rotary, "rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise ValueError(
                f"fast engine: rope type {rope_type!r} is not supported (its frequencies depend on the "
                f"sequence length); supported: {', '.join(STATIC_ROPE_TYPES)}"
            )
        self._inv_freq = rotary.inv_freq.detach().float().to(self.device)  # the HF buffer, as HF uses it
        self._rope_scale = float(rotary.attention_scaling)

        self.layers = []
        for layer in lm.model.layers:
            a, m = layer.self_attn, layer.mlp
            wqkv, bqkv = fuse_linears([a.q_proj, a.k_proj, a.v_proj])
            wgu, bgu = fuse_linears([m.gate_proj, m.up_proj])
            self.layers.append(LayerWeights(
                ln1=layer.input_layernorm.weight.detach(),
                wqkv=wqkv, bqkv=bqkv,
                wo=a.o_proj.weight.detach(), bo=_detach(a.o_proj.bias),
                ln2=layer.post_attention_layernorm.weight.detach(),
                w_gate_up=wgu, b_gate_up=bgu,
                w_down=m.down_proj.weight.detach(), b_down=_detach(m.down_proj.bias),
            ))
        self.embed = lm.model.embed_tokens.weight.detach()
        self.norm_w = lm.model.norm.weight.detach()
        self.lm_head = lm.lm_head.weight.detach()  # the embedding itself when tied

        if self.compiled:
            # prefill: batch and prompt length are marked dynamic on the first call (one artifact
            # for any prompt; the other sizes stay constants, which keeps the index math cheap)
            self._prefill_in = torch.compile(prefill_in, fullgraph=True)
            self._prefill_out = torch.compile(prefill_out, fullgraph=True)
            self._prefill_head = torch.compile(prefill_head, fullgraph=True)
            # decode: static shapes per batch size, captured in CUDA graphs
            static = {"fullgraph": True, "dynamic": False, "options": {"coordinate_descent_tuning": autotune}}
            self._decode_in = torch.compile(decode_in, **static)
            self._decode_out = torch.compile(decode_out, **static)
            self._step_in = torch.compile(step_in, **static)
            self._step_out = torch.compile(step_out, **static)
        else:
            self._prefill_in, self._prefill_out, self._prefill_head = prefill_in, prefill_out, prefill_head
            self._decode_in, self._decode_out = decode_in, decode_out
            self._step_in, self._step_out = step_in, step_out

        self.max_batch = 0
        self.max_seq = 0
        self.setup(max_batch, max_seq or cfg.max_position_embeddings)

    # ------------------------------------------------------------------------------------------
    # Allocation and warm-up

    @_plain_no_grad
    def setup(self, max_batch: int, max_seq: int) -> None:
        """Allocate the KV cache and the step buffers for ``max_batch`` rows of ``max_seq`` slots
        (drops captured graphs; a previous ``PrefillOutput`` becomes unusable)."""
        if max_batch < 1 or max_seq < 2:
            raise ValueError(f"fast engine: max_batch ({max_batch}) must be >= 1 and max_seq ({max_seq}) >= 2")
        d, dev = self.dims, self.device
        self.max_batch, self.max_seq = int(max_batch), int(max_seq)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # decode, by (batch, KV length)
        self._prefill_graphs: dict[tuple[int, int, bool], PrefillGraph] = {}  # by (batch, length, padded)
        self._prefill_seen: set[bool] = set()  # compiled prefill for batch 1 / batch > 1
        self._views: dict[int, tuple[StepBuffers, list]] = {}
        self._graph_pool = None
        self._prefill_id = 0  # which prefill the cache holds
        self._decoded_id = 0  # which prefill was last decoded (each can be decoded once)
        cache_shape = (d.n_layers, max_batch, d.n_kv_heads, max_seq, d.head_dim)
        self.k_cache = self.v_cache = None  # free the old cache first
        self.k_cache = torch.zeros(cache_shape, dtype=self.dtype, device=dev)
        self.v_cache = torch.zeros(cache_shape, dtype=self.dtype, device=dev)

        freqs = torch.arange(max_seq, device=dev, dtype=torch.float32)[:, None] * self._inv_freq  # [S, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.rope_table = (
            (emb.cos() * self._rope_scale).to(self.dtype),  # [max_seq, hd]
            (emb.sin() * self._rope_scale).to(self.dtype),
        )

        B, S = max_batch, max_seq
        self.buf = StepBuffers(
            tokens=torch.zeros(B, dtype=torch.long, device=dev),
            pos=torch.zeros(B, dtype=torch.long, device=dev),
            slot=torch.zeros(1, dtype=torch.long, device=dev),
            step=torch.zeros(1, dtype=torch.long, device=dev),
            done=torch.zeros(B, dtype=torch.bool, device=dev),
            eos=torch.full((1,), -1, dtype=torch.long, device=dev),
            out=torch.zeros(B, S, dtype=torch.long, device=dev),
            logits=torch.zeros(B, d.vocab, dtype=torch.float32, device=dev),
            kv_bias=torch.full((B, S), -math.inf, dtype=self.dtype, device=dev),
        )

    @_plain_no_grad
    def warmup(
        self, prompt_len: int, max_new_tokens: int | None = None, batch_sizes: Sequence[int] | None = None
    ) -> None:
        """Compile and capture everything a run of ``prompt_len``-token prompts and
        ``max_new_tokens`` new tokens (default: up to ``max_seq``) needs, for each batch size
        (default ``[max_batch]``): the prefill graph of that shape (plus its left-padded variant
        for batches), and the decode graphs of every KV bucket it reaches. Call it once per prompt
        length a run will see; the time goes to ``warmup_ms``. Leaves no live prefill."""
        new = self.max_seq - prompt_len + 1 if max_new_tokens is None else max_new_tokens
        with _counted(self):
            for B in batch_sizes or [self.max_batch]:
                embeds = 0.02 * torch.randn(B, prompt_len, self.dims.hidden, device=self.device, dtype=self.dtype)
                mask = torch.ones(B, prompt_len, dtype=torch.long, device=self.device)
                self._capture_prefill(B, prompt_len, padded=False)  # compiles the prefill functions
                if B > 1:  # a left-padded batch takes the explicit-mask path
                    self._capture_prefill(B, prompt_len, padded=True)
                if prompt_len > 2:  # the uncaptured path at another length: a recompile, if any, happens now
                    self._prefill_layers(embeds[:, 1:].contiguous(), mask[:, 1:].bool(), padded=False)
                    self._prefill_id += 1
                prefill = self.prefill(embeds, mask)
                self._capture(B, prompt_len, new)  # compiles the decode step; one graph per reachable bucket
                self.decode(prefill, min(new, 3), None)
                if B > 1:
                    mask[0, : prompt_len // 2] = 0
                self.decode(self.prefill(embeds, mask), min(new, 3), None)

    # ------------------------------------------------------------------------------------------
    # Prefill

    @_plain_no_grad
    def prefill(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> PrefillOutput:
        """See :class:`stagewise.engine.base.Engine`. ``inputs_embeds`` ``[B, S, D]``, left-padded.

        A (batch, length) shape that :meth:`warmup` captured replays one CUDA graph; any other
        runs the compiled layer functions one by one (same result, more host work)."""
        B, S = self._check_prompt(inputs_embeds, attention_mask)
        mask = attention_mask.to(device=self.device, dtype=torch.bool)
        padded = not bool(mask.all())
        graph = self._prefill_graphs.get((B, S, padded))
        if graph is not None:
            graph.embeds.copy_(inputs_embeds)
            graph.mask.copy_(mask)
            graph.graph.replay()
            logits = graph.logits.clone()
        else:
            if inputs_embeds.is_inference():  # inference tensors cannot enter compiled graphs
                inputs_embeds = inputs_embeds.clone()
            logits = self._prefill_layers(inputs_embeds.contiguous(), mask, padded)
        nxt = logits.argmax(-1)

        b = self.buf  # decode state: slots [0, S) hold the prompt, padding masked out
        b.kv_bias[:B].fill_(-math.inf)
        b.kv_bias[:B, :S].masked_fill_(mask, 0.0)
        b.tokens[:B].copy_(nxt)
        b.pos[:B].copy_(left_pad_positions(mask)[:, -1] + 1)
        b.slot.fill_(S)
        b.step.fill_(1)
        b.out[:B, 0].copy_(nxt)
        b.logits[:B].copy_(logits)
        self._prefill_id += 1
        return PrefillOutput(nxt, logits, state={"id": self._prefill_id, "batch": B, "prompt_len": S})

    def _prefill_layers(self, x: torch.Tensor, mask: torch.Tensor, padded: bool) -> torch.Tensor:
        """All layers over the prompt ``x`` ``[B, S, D]``; fills cache slots ``[0, S)``.
        Returns the last position's logits ``[B, V]`` fp32. No host sync (graph-capturable)."""
        B, S, _ = x.shape
        d = self.dims
        # batch and prompt length are dynamic for the compiler: marked on the first call only
        # (one artifact then serves every length; marking every call costs host time in guards)
        first = self.compiled and (B > 1) not in self._prefill_seen
        self._prefill_seen.add(B > 1)
        dyn = self._mark_dynamic if first else _unmarked
        pos = left_pad_positions(mask)  # [B, S]
        rope = (dyn(self.rope_table[0][pos][:, None], 0, 2), dyn(self.rope_table[1][pos][:, None], 0, 2))
        causal = None  # [B, 1, S, S] when padded: causal AND key is real; a padding query sees itself
        if padded:
            tri = torch.ones(S, S, dtype=torch.bool, device=self.device).tril()
            causal = (tri & mask[:, None, None, :]) | torch.eye(S, dtype=torch.bool, device=self.device)
        x = dyn(x, 0, 1)
        for i, w in enumerate(self.layers):
            kv = (dyn(self.k_cache[i, :B, :, :S], 0, 2), dyn(self.v_cache[i, :B, :, :S], 0, 2))
            q = self._prefill_in(x, w, rope, kv, dims=d)
            attn = dyn(attend_prefill(q, kv, causal, d.group), 0, 2)
            x = dyn(self._prefill_out(x, attn, w, dims=d), 0, 1)
        return self._prefill_head(x, self.norm_w, self.lm_head, dims=d)

    def _capture_prefill(self, B: int, S: int, padded: bool) -> None:
        """Capture the prefill of a ``[B, S]`` prompt (left-padded or not) in one CUDA graph that
        reads static input buffers (time counted in ``warmup_ms``; the cache is overwritten)."""
        key = (B, S, padded)
        if not self.prefill_graphs or key in self._prefill_graphs or (padded and S < 2):
            return
        with _counted(self):
            embeds = 0.02 * torch.randn(B, S, self.dims.hidden, device=self.device, dtype=self.dtype)
            mask = torch.ones(B, S, dtype=torch.bool, device=self.device)
            if padded:
                mask[0, : S // 2] = False
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm-up: compiles (dims marked), then as captured (unmarked)
                for _ in range(2):
                    self._prefill_layers(embeds, mask, padded)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool()):
                logits = self._prefill_layers(embeds, mask, padded)
            self._prefill_graphs[key] = PrefillGraph(graph, embeds, mask, logits)
            self._prefill_id += 1  # whatever prefill was live, its cache is gone

    # ------------------------------------------------------------------------------------------
    # Decode

    @_plain_no_grad
    def decode(self, prefill: PrefillOutput, max_new_tokens: int, eos_token_id: int | None) -> DecodeOutput:
        """See :class:`stagewise.engine.base.Engine`. The host reads the EOS flags every
        ``check_every`` steps; steps run past the last EOS before that look are not reported."""
        B, S = self._claim(prefill, max_new_tokens)
        b = self.buf
        b.eos.fill_(-1 if eos_token_id is None else eos_token_id)
        b.done[:B].copy_(b.tokens[:B] == b.eos)
        n_steps = max_new_tokens - 1
        self._capture(B, S, max_new_tokens)

        timer = StepTimer(self.device, self.time_steps)
        timer.mark()
        ran = 0
        for t in range(n_steps):
            self._step(B, self._bucket(S + t))
            timer.mark()
            ran += 1
            if eos_token_id is not None and ran % self.check_every == 0 and bool(b.done[:B].all()):
                break
        tokens = b.out[:B, : ran + 1].cpu()  # [B, T]; the one sync at the end
        n_tokens = count_until_eos(tokens, eos_token_id)
        T = max(n_tokens)
        return DecodeOutput(tokens[:, :T].clone(), n_tokens, timer.intervals_ms()[: T - 1])

    @_plain_no_grad
    def score(self, prefill: PrefillOutput, forced: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: feed ``forced`` ``[B, T]`` token by token through the decode step.

        Returns:
            ``[B, T + 1, V]`` fp32 logits: the prefill's, then the logits after each forced token.
        """
        B, S = self._claim(prefill, forced.shape[1] + 1)
        b = self.buf
        b.eos.fill_(-1)
        b.done[:B].fill_(False)
        self._capture(B, S, forced.shape[1] + 1)
        out = [b.logits[:B].clone()]
        for t in range(forced.shape[1]):
            b.tokens[:B].copy_(forced[:, t])
            self._step(B, self._bucket(S + t))
            out.append(b.logits[:B].clone())
        return torch.stack(out, dim=1)

    def _step(self, B: int, length: int) -> None:
        graph = self._graphs.get((B, length))
        if graph is not None:
            graph.replay()
        else:
            self._decode_step(B, length)

    def _decode_step(self, B: int, length: int) -> None:
        """``decode_one_token``: one token for each of ``B`` rows, attending to ``length`` slots.
        Touches only static buffers, so it can be captured in a CUDA graph."""
        d, mv = self.dims, self.matvec and B == 1
        buf, kvs = self._batch_views(B)
        bias = buf.kv_bias[:, :length]
        x, rope = self._step_in(buf, self.embed, self.rope_table)
        for w, kv in zip(self.layers, kvs):
            q = self._decode_in(x, w, rope, kv, buf.slot, dims=d, matvec=mv)
            attn = attend_decode(q, kv[0][:, :, :length], kv[1][:, :, :length], bias)  # slots in use
            x = self._decode_out(x, attn, w, dims=d, matvec=mv)
        self._step_out(x, self.norm_w, self.lm_head, buf, dims=d, matvec=mv)

    def _batch_views(self, B: int) -> tuple[StepBuffers, list]:
        """Step buffers and per-layer cache rows sliced to ``B`` rows (made once per ``B``)."""
        if B not in self._views:
            b = self.buf
            rows = StepBuffers(
                tokens=b.tokens[:B], pos=b.pos[:B], slot=b.slot, step=b.step, done=b.done[:B],
                eos=b.eos, out=b.out[:B], logits=b.logits[:B], kv_bias=b.kv_bias[:B],
            )
            kvs = [(self.k_cache[i, :B], self.v_cache[i, :B]) for i in range(self.dims.n_layers)]
            self._views[B] = (rows, kvs)
        return self._views[B]

    def _pool(self):
        """One memory pool for all graphs: they never run concurrently, and every result a
        graph leaves is copied out (or lives in a static buffer) before another one runs."""
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        return self._graph_pool

    def _mark_dynamic(self, t: torch.Tensor, *dims: int) -> torch.Tensor:
        """Tell the compiler that ``t``'s ``dims`` vary between calls (no-op when not compiling)."""
        if self.compiled:
            for dim in dims:
                torch._dynamo.maybe_mark_dynamic(t, dim)
        return t

    def _bucket(self, slot: int) -> int:
        """Cache slots a step writing ``slot`` attends to: ``slot + 1`` rounded up to the bucket."""
        return min(-(-(slot + 1) // self.kv_bucket) * self.kv_bucket, self.max_seq)

    def _capture(self, B: int, prompt_len: int, max_new_tokens: int) -> None:
        """Capture a graph for every bucket a decode of ``max_new_tokens`` after ``prompt_len``
        reaches and does not have yet (time counted in ``warmup_ms``).

        Each capture is preceded by one eager warm-up step (compiles for a new batch size,
        autotunes, initializes cuBLAS) at the current slot, with the step state saved and put
        back; the K/V it writes there is overwritten by the real step before anyone reads it.
        """
        if not self.use_graphs:
            return
        lengths = sorted({self._bucket(prompt_len + t) for t in range(max_new_tokens - 1)})
        missing = [L for L in lengths if (B, L) not in self._graphs]
        if not missing:
            return
        with _counted(self):
            saved = [t.clone() for t in self.buf]
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            for L in missing:
                with torch.cuda.stream(stream):
                    self._decode_step(B, L)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                for t, s in zip(self.buf, saved):
                    t.copy_(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool()):
                    self._decode_step(B, L)
                self._graphs[(B, L)] = graph
                stream.wait_stream(torch.cuda.current_stream(self.device))

    # ------------------------------------------------------------------------------------------
    # Argument checks (user input: ValueError, never assert)

    def _check_prompt(self, embeds: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
        if embeds.ndim != 3 or embeds.shape[-1] != self.dims.hidden:
            raise ValueError(f"fast engine: inputs_embeds must be [B, S, {self.dims.hidden}], got {list(embeds.shape)}")
        B, S, _ = embeds.shape
        if tuple(mask.shape) != (B, S):
            raise ValueError(f"fast engine: attention_mask must be [{B}, {S}], got {list(mask.shape)}")
        if embeds.dtype != self.dtype or embeds.device != self.device:
            raise ValueError(
                f"fast engine: inputs_embeds must be {self.dtype} on {self.device}, "
                f"got {embeds.dtype} on {embeds.device}"
            )
        if B < 1 or S < 1:
            raise ValueError(f"fast engine: empty prompt batch {list(embeds.shape)}")
        if B > self.max_batch:
            raise ValueError(f"fast engine: batch of {B} rows exceeds max_batch={self.max_batch}; call setup() first")
        if S > self.max_seq:
            raise ValueError(f"fast engine: prompt of {S} tokens exceeds max_seq={self.max_seq}; call setup() first")
        return B, S

    def _claim(self, prefill: PrefillOutput, max_new_tokens: int) -> tuple[int, int]:
        """Check that ``prefill`` is the live one (not yet decoded) and that the tokens fit."""
        st = prefill.state
        if not isinstance(st, dict) or st.get("id") != self._prefill_id or self._decoded_id == self._prefill_id:
            raise ValueError("fast engine: this PrefillOutput is stale (already decoded, or another prefill ran since)")
        B, S = st["batch"], st["prompt_len"]
        if max_new_tokens < 1:
            raise ValueError(f"fast engine: max_new_tokens must be >= 1, got {max_new_tokens}")
        if S + max_new_tokens - 1 > self.max_seq:
            raise ValueError(
                f"fast engine: prompt of {S} + {max_new_tokens} new tokens needs {S + max_new_tokens - 1} cache "
                f"slots, more than max_seq={self.max_seq}"
            )
        self._decoded_id = self._prefill_id
        return B, S


@contextmanager
def _counted(engine: FastEngine) -> Iterator[None]:
    """Add the wall time of the block (device work included) to ``engine.warmup_ms``; nested
    blocks are counted once, by the outermost."""
    if engine._warming:
        yield
        return
    engine._warming = True
    t0 = time.perf_counter()
    try:
        yield
        _sync(engine.device)
    finally:
        engine._warming = False
        engine.warmup_ms += (time.perf_counter() - t0) * 1e3


def _unmarked(t: torch.Tensor, *_: int) -> torch.Tensor:
    return t


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
