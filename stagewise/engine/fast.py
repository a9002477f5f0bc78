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
  in slots ``[0, pad_b)``; an additive key mask ``pad_bias`` hides those slots, and each step masks
  the slots past its own position, so the cache is rolled back by position only (what a
  speculative verify step needs: :meth:`FastEngine.extend` / :meth:`FastEngine.advance`).
* The layer math lives in :mod:`stagewise.engine.layers` as pure functions: one transformer layer
  is two small functions around attention (``decode_in``: RMSNorm, fused QKV, RoPE, cache write;
  ``decode_out``: o-proj, residual, RMSNorm, fused gate/up, SiLU, down, residual). They take the
  weights as arguments, so ONE compiled artifact serves all layers (short compile), and
  ``torch.compile`` fuses the norm, RoPE and SiLU into few kernels. This module holds the state:
  weight views, cache, step buffers, graph capture.
* The whole decode step (embedding, all layers, LM head, token choice (greedy, or sampling on the
  device: :mod:`stagewise.engine.sampling`), EOS bookkeeping,
  position/slot/step counters) reads and writes only static device buffers, so it is captured
  in one CUDA graph per (batch, KV-length bucket). The bucket ``L`` (a multiple of
  ``kv_bucket``) bounds the cache slice that attention reads: a step streams the cache in use,
  not a ``max_seq``-sized one.
* No host synchronization per token: EOS is tracked on the device; the host looks at the
  ``done`` flags every ``check_every`` steps and once at the end.
* Batch-1 decode computes each projection as one multiply-and-sum (``matvec``), which the
  compiler emits as a single weight-streaming reduction kernel with the RMSNorm scale and the
  SiLU-gating folded into its loads; larger batches use cuBLAS. ``matvec_kernel="triton"``
  replaces those reductions by a hand-written Triton GEMV with launch parameters fixed by the
  shape (:mod:`stagewise.engine.dense`): the same kernels in every compile and on every rank.
* Prefill uses the same layer structure, compiled once with batch and prompt length dynamic;
  SDPA takes its flash path with ``is_causal`` when the batch has no padding, an explicit mask
  otherwise. Each prompt shape that :meth:`FastEngine.warmup` sees is captured whole in one CUDA
  graph (no per-layer host work left); other shapes run the compiled functions one by one.

* Tensor parallelism (``FastOptions.tensor_parallel``, :mod:`stagewise.engine.parallel`): each
  rank holds its shard of every layer (heads and MLP width split, Megatron-style) and a KV cache
  of its KV heads; the row-parallel projections end in an all-reduce (``self.reduce``, a custom
  op that the decode-step graph captures with the rest). Every rank computes the full logits and
  the same tokens, so the ranks run prefill, decode and extend in lockstep with no host
  coordination beyond the prompt broadcast in :meth:`FastEngine.prefill`.

On CPU everything runs eagerly (no compile, no graphs, fp32 in the tests) through the same
functions, so CI checks it against :class:`stagewise.engine.hf.HFEngine` (and tensor
parallelism over gloo against one process).

Measured on an H100 (LLaMA-7B shapes, bf16, 641-token prompt): 5.24 ms per token at batch 1
(86 % of the copy bandwidth), prefill 13.9 ms, 2,016 tok/s decoding at batch 16, 27 s of
compile + warm-up; see ``docs/results/decode_engines_notes.md`` for the profile and what is left.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from stagewise.engine.base import (
    DecodeOutput,
    PrefillOutput,
    count_until_eos,
    left_pad_positions,
    padding_mask,
)
from stagewise.engine.dense import TritonDenseWeight, triton_gemv_usable
from stagewise.engine.layers import (
    STATIC_ROPE_TYPES,
    Dims,
    LayerWeights,
    Reduce,
    attend_decode,
    attend_decode_math,
    attend_prefill,
    decode_in,
    decode_out,
    head,
    no_reduce,
    prefill_head,
    prefill_in,
    prefill_out,
    step_in,
)
from stagewise.engine.parallel import (
    TensorParallel,
    TPCollectives,
    make_collectives,
    shard_layer,
)
from stagewise.engine.quant import (
    QuantizedWeight,
    QuantOptions,
    quantize_cached,
    streamed_bytes,
)
from stagewise.engine.sampling import (
    GREEDY,
    SamplingParams,
    draw_tokens,
    gumbel_noise,
    select_tokens,
)
from stagewise.measure.timing import StepTimer
from stagewise.models.weights import fuse_linears

MAX_EXTEND = 16
"""The most tokens one :meth:`FastEngine.extend` call feeds per row (``k + 1`` of a verify step)."""

MATVEC_KERNELS = ("inductor", "triton")
"""Values of :attr:`FastOptions.matvec_kernel`."""


@dataclass(frozen=True)
class FastOptions:
    """Options of the fast engine (each one reachable from the CLI through ``RunConfig``).

    Attributes:
        max_batch: rows the cache holds.
        max_seq: cache length (prompt + generated tokens); ``None``: the model's
            ``max_position_embeddings``.
        compile: ``torch.compile`` the layer functions (``None``: on CUDA).
        cuda_graphs: capture the decode step in CUDA graphs (``None``: on CUDA).
        prefill_graphs: capture the prefill of each shape :meth:`FastEngine.warmup` sees in a
            CUDA graph (``None``: as ``cuda_graphs``).
        kv_bucket: KV-length granularity (slots) of the captured decode graphs.
        check_every: decode steps between host looks at the EOS flags.
        matvec: batch-1 decode projections as compiler-generated reductions instead of cuBLAS
            (``None``: when compiling).
        autotune: coordinate-descent tuning of the decode kernels (``None``: when compiling on
            CUDA; adds ~15 s of compile, saved ~1.1 ms/token at batch 1 on an H100).
        time_steps: record per-step CUDA events (ITL).
        sampling: greedy (default) or sampling on the device.
        quantize: weight-only quantization of the decoder's linear layers
            (:class:`~stagewise.engine.quant.QuantOptions`), or ``None``.
        deterministic: attention kernels whose results do not vary run to run (CUDA: SDPA restricted
            to the memory-efficient and math backends, both deterministic in the forward pass; the
            cuDNN backend, which PyTorch may pick for the decode step on an H100, is not, and made
            two seeded 7B decodes differ after ~30 tokens on an H100). ``None``: on when sampling
            (a seed must reproduce its tokens), off when greedy.
        deterministic_step_attention: how decode / verify steps attend when ``deterministic``:
            ``"compiled"`` (:func:`~stagewise.engine.layers.attend_decode_math`, compiled into
            fixed-order reductions) or ``"sdpa"`` (SDPA's memory-efficient backend, which cost
            ~20 % of a 7B decode step on an H200: docs/results/determinism/NOTES.md). The prefill
            always uses SDPA restricted to the memory-efficient and math backends.
        extend_matvec: batch-1 :meth:`FastEngine.extend` projections (a speculative verify step's
            ``k + 1`` rows) as compiler-generated reductions that stream each weight row once for
            all rows (:func:`stagewise.engine.layers.linear`) instead of cuBLAS; meant with
            ``compile`` (eagerly it materializes ``[N, rows, K]``). Off by default until measured
            faster on the GPU (``benchmarks/speculative.py`` times both).
        tensor_parallel: split the decoder over the ranks of a process group
            (:class:`~stagewise.engine.parallel.TensorParallel`); ``None``: one device. Every
            rank builds the engine and makes the same calls in the same order. Not with
            ``quantize`` yet.
        matvec_kernel: what computes the dense decode projections with few rows (at most
            ``GEMV_MAX_M`` = 4: decode at batch <= 4, a batch-1 verify step of <= 4 tokens):
            ``"inductor"`` (default: the compiler-generated reductions of ``matvec`` /
            ``extend_matvec``, tuned by timing when ``autotune``, or cuBLAS where those are off)
            or ``"triton"``: every layer's q/k/v, o, gate/up and down weights and the LM head
            (after tensor-parallel sharding) run the hand-written Triton GEMV with launch
            parameters fixed by the shape (:class:`~stagewise.engine.dense.TritonDenseWeight`),
            so every compile and every rank runs the same kernels; prefill and steps with more
            rows keep cuBLAS. ``"triton"`` needs Triton and CUDA with ``compile`` on (or CPU
            under ``TRITON_INTERPRET=1``, eager: the tests); not with ``quantize``.

    Raises:
        ValueError: a field out of range (named); ``matvec_kernel="triton"`` with ``quantize``.
    """

    max_batch: int = 1
    max_seq: int | None = None
    compile: bool | None = None
    cuda_graphs: bool | None = None
    prefill_graphs: bool | None = None
    kv_bucket: int = 64
    check_every: int = 16
    matvec: bool | None = None
    autotune: bool | None = None
    time_steps: bool = True
    sampling: SamplingParams = field(default_factory=lambda: GREEDY)
    quantize: QuantOptions | None = None
    extend_matvec: bool = False
    deterministic: bool | None = None
    deterministic_step_attention: str = "compiled"
    tensor_parallel: TensorParallel | None = None
    matvec_kernel: str = "inductor"

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch: must be >= 1, got {self.max_batch}")
        if self.max_seq is not None and self.max_seq < 2:
            raise ValueError(f"max_seq: must be >= 2, got {self.max_seq}")
        if self.kv_bucket < 1 or self.check_every < 1:
            raise ValueError(f"kv_bucket ({self.kv_bucket}) and check_every ({self.check_every}) must be >= 1")
        if self.quantize is not None and self.tensor_parallel is not None and self.tensor_parallel.size > 1:
            raise ValueError("tensor_parallel: quantized weights are not sharded yet; use one of quantize or tensor parallelism")
        if self.matvec_kernel not in MATVEC_KERNELS:
            raise ValueError(f"matvec_kernel: expected one of {', '.join(MATVEC_KERNELS)}, got {self.matvec_kernel!r}")
        if self.matvec_kernel == "triton" and self.quantize is not None:
            raise ValueError("matvec_kernel: 'triton' is the dense-weight GEMV; quantized weights have their own "
                             "kernels (quantize.decode_impl): use one of matvec_kernel='triton' and quantize")


class PrefillGraph(NamedTuple):
    """A captured prefill: copy the prompt into ``embeds`` / ``mask``, replay, read ``logits``."""

    graph: torch.cuda.CUDAGraph
    embeds: torch.Tensor  # [B, S, D]
    mask: torch.Tensor  # [B, S] bool
    logits: torch.Tensor  # [B, V] fp32


class StepBuffers(NamedTuple):
    """The static device state a decode / extend step reads and advances (rows sliced to the batch)."""

    tokens: torch.Tensor  # [B] int64: the token a decode step feeds in
    pos: torch.Tensor  # [B] int64: RoPE position of the next fed token (real tokens only)
    slot: torch.Tensor  # [1] int64: the cache slot of the next fed token (same for every row)
    step: torch.Tensor  # [1] int64: index into ``out`` of the token the next decode step produces
    done: torch.Tensor  # [B] bool: row has produced EOS
    eos: torch.Tensor  # [1] int64: EOS id, -1 for none
    seeds: torch.Tensor  # [B] int64: per-row sampling seeds
    out: torch.Tensor  # [B, max_seq] int64: generated tokens
    logits: torch.Tensor  # [B, V] float32: logits of the last decode step
    pad_bias: torch.Tensor  # [B, max_seq] model dtype: -inf on a row's left padding, 0 elsewhere
    ext_tokens: torch.Tensor  # [B, MAX_EXTEND] int64: tokens an extend step feeds
    ext_logits: torch.Tensor  # [B, MAX_EXTEND, V] float32: their logits


def step_out(x, norm_w, lm_head, buf: StepBuffers, noise, *, dims: Dims, matvec: bool, sampling: SamplingParams) -> None:
    """End of a decode step: LM head, the next token (``noise``: ``[B, V]`` Gumbel noise when
    sampling, else ``None``), EOS bookkeeping, advance the counters."""
    logits = head(x, norm_w, lm_head, dims=dims, matvec=matvec)[:, -1]  # [B, V]
    nxt = select_tokens(logits, sampling, noise)
    nxt = torch.where(buf.done, buf.eos, nxt)  # finished rows repeat EOS
    buf.done.logical_or_(nxt == buf.eos)
    buf.out.index_copy_(1, buf.step, nxt[:, None])
    buf.tokens.copy_(nxt)
    buf.logits.copy_(logits)
    buf.pos.add_(1)
    buf.slot.add_(1)
    buf.step.add_(1)


def _plain_no_grad(fn):
    """Run ``fn`` with autograd off and inference mode off, whatever mode the caller is in: the
    compiled functions are keyed on the tensors' dispatch keys (an outer ``inference_mode`` would
    recompile them all), and the cache must stay made of ordinary tensors."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


def _raise_recompile_limit(n: int = 64) -> None:
    """One compiled function serves decode (per batch size), extend (per k) and prefill shapes:
    allow that many specializations (dynamo's default of 8 would silently fall back to eager)."""
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, n)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * n)  # 256 by default


# ----------------------------------------------------------------------------------------------


class FastEngine:
    """Static-cache, CUDA-graph decode engine over a ``transformers`` ``LlamaForCausalLM``.

    Args:
        lm: the model; its weights are used in place (q/k/v and gate/up re-pointed into fused
            buffers, see :func:`stagewise.models.weights.fuse_linears`).
        options: :class:`FastOptions`.

    Attributes:
        warmup_ms: wall time spent compiling, capturing and warming up (ms).
        n_host_syncs: host reads of device state made by :meth:`decode` (EOS looks, the final copy).
        matvec_kernel: :attr:`FastOptions.matvec_kernel` as applied (``"triton"``: the projection
            weights in ``layers`` and ``lm_head`` are :class:`~stagewise.engine.dense.TritonDenseWeight`).

    Raises:
        ValueError: an unsupported model (activation, RoPE type, head counts), head counts /
            MLP width not divisible by the tensor-parallel size, an unknown
            ``deterministic_step_attention``, or ``matvec_kernel="triton"`` where its kernels cannot
            run (no Triton; CUDA without ``compile``; CPU without ``TRITON_INTERPRET=1`` or with
            ``compile``).
    """

    name = "fast"

    @_plain_no_grad
    def __init__(self, lm: LlamaForCausalLM, options: FastOptions = FastOptions()) -> None:
        cfg = lm.config
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"fast engine: hidden_act {cfg.hidden_act!r} is not supported (only 'silu')")
        self.lm = lm
        self.options = options
        self.sampling = options.sampling
        self.device = lm.lm_head.weight.device
        wants = (not options.sampling.greedy) if options.deterministic is None else options.deterministic
        self.deterministic = bool(wants) and self.device.type == "cuda"  # CPU kernels are deterministic already
        if options.deterministic_step_attention not in ("compiled", "sdpa"):
            raise ValueError(f"fast engine: deterministic_step_attention must be 'compiled' or 'sdpa', got {options.deterministic_step_attention!r}")
        self.dtype = lm.lm_head.weight.dtype
        on_cuda = self.device.type == "cuda"
        self.compiled = on_cuda if options.compile is None else options.compile
        self.use_graphs = on_cuda if options.cuda_graphs is None else options.cuda_graphs and on_cuda
        self.prefill_graphs = self.use_graphs if options.prefill_graphs is None else options.prefill_graphs and on_cuda
        self.matvec = self.compiled if options.matvec is None else options.matvec
        autotune = self.compiled and on_cuda if options.autotune is None else options.autotune
        self.autotune = bool(autotune) and self.compiled
        self.kv_bucket = options.kv_bucket
        self.check_every = options.check_every
        self.warmup_ms = 0.0
        self.n_host_syncs = 0
        self._warming = False
        self.reduce: Reduce = no_reduce  # an all-reduce under tensor parallelism
        self.tp: TPCollectives | None = None

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
        full_dims, tp = self.dims, options.tensor_parallel
        if tp is not None:
            self.dims = tp.rank_dims(full_dims)  # per rank: heads, KV heads, MLP width (ValueError if indivisible)

        rotary = lm.model.rotary_emb
        rope_type = getattr(rotary, "rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise ValueError(
                f"fast engine: rope type {rope_type!r} is not supported (its frequencies depend on the "
                f"sequence length); supported: {', '.join(STATIC_ROPE_TYPES)}"
            )
        self._inv_freq = rotary.inv_freq.detach().float().to(self.device)  # the HF buffer, as HF uses it
        self._rope_scale = float(rotary.attention_scaling)

        self.layers = [_layer_weights(layer) for layer in lm.model.layers]
        if tp is not None:  # this rank's shards (copies); embedding, norms and LM head stay replicated
            self.layers = [shard_layer(w, full_dims, tp) for w in self.layers]
            self.tp = make_collectives(tp, self.device, self.dtype)
            self.reduce = self.tp.reduce
        self.embed = lm.model.embed_tokens.weight.detach()
        self.norm_w = lm.model.norm.weight.detach()
        self.lm_head: torch.Tensor | QuantizedWeight | TritonDenseWeight = lm.lm_head.weight.detach()  # the embedding itself when tied
        self.quant_info: dict[str, object] | None = None
        if options.quantize is not None:
            self._quantize(options.quantize)
        self.matvec_kernel = options.matvec_kernel
        if self.matvec_kernel == "triton":
            self._use_triton_gemv()

        if self.compiled:
            _raise_recompile_limit()
            # prefill: batch and prompt length are marked dynamic on the first call (one artifact
            # for any prompt; the other sizes stay constants, which keeps the index math cheap)
            self._prefill_in = torch.compile(prefill_in, fullgraph=True)
            self._prefill_out = torch.compile(prefill_out, fullgraph=True)
            self._prefill_head = torch.compile(prefill_head, fullgraph=True)
            # decode / extend: static shapes per (batch, new tokens), captured in CUDA graphs
            static = {"fullgraph": True, "dynamic": False, "options": {"coordinate_descent_tuning": autotune}}
            self._decode_in = torch.compile(decode_in, **static)
            self._decode_out = torch.compile(decode_out, **static)
            self._step_in = torch.compile(step_in, **static)
            # tensor parallel: every rank must pick the same token from the same residual stream,
            # so the LM head's kernels must not be autotuned (timing-based, so per-rank) choices
            head_static = static if tp is None else {**static, "options": {"coordinate_descent_tuning": False}}
            self._step_out = torch.compile(step_out, **head_static)
            self._head = torch.compile(head, **head_static)
        else:
            self._prefill_in, self._prefill_out, self._prefill_head = prefill_in, prefill_out, prefill_head
            self._decode_in, self._decode_out = decode_in, decode_out
            self._step_in, self._step_out, self._head = step_in, step_out, head
        # decode / verify attention: SDPA, or (deterministic) the written-out form, one compiled
        # artifact for every cache length
        self.step_attention = "compiled" if self.deterministic and options.deterministic_step_attention == "compiled" else "sdpa"
        self._attend_step = attend_decode
        if self.step_attention == "compiled":
            self._attend_step = torch.compile(attend_decode_math, fullgraph=True, dynamic=True) if self.compiled else attend_decode_math

        self.max_batch = 0
        self.max_seq = 0
        self.setup(options.max_batch, options.max_seq or cfg.max_position_embeddings)

    def _use_triton_gemv(self) -> None:
        """``matvec_kernel="triton"``: wrap every layer's dense projections (this rank's shards) and
        the LM head in :class:`TritonDenseWeight` (the tensors are shared, not copied).

        Raises:
            ValueError: no Triton, a device its kernels do not run on, or CUDA without ``compile``.
        """
        why = triton_gemv_usable(self.device)
        if why is None and self.device.type == "cuda" and not self.compiled:
            why = "on CUDA it is a kernel of the compiled decode step; compile is off"
        if why is None and self.device.type != "cuda" and self.compiled:
            why = "on CPU it runs in Triton's interpreter, eagerly only; compile is on"
        if why is not None:
            raise ValueError(f"fast engine: matvec_kernel 'triton' cannot be used: {why}")
        names = ("wqkv", "wo", "w_gate_up", "w_down")
        self.layers = [w._replace(**{n: TritonDenseWeight(getattr(w, n)) for n in names}) for w in self.layers]
        self.lm_head = TritonDenseWeight(self.lm_head)

    def _quantize(self, q: QuantOptions) -> None:
        """Replace the decoder's projection weights (and the LM head) by quantized copies; the HF
        model keeps its own weights. Records what was applied in ``quant_info``."""
        q = q.resolved(self.device)
        names = ("wqkv", "wo", "w_gate_up", "w_down")
        dense = {f"layers.{i}.{n}": getattr(w, n) for i, w in enumerate(self.layers) for n in names}
        if q.lm_head:
            dense["lm_head"] = self.lm_head
        qw, info = quantize_cached(dense, q.kind, group_size=q.group_size, cache_dir=q.cache_dir,
                                   decode_impl=q.decode_impl, prefill_impl=q.prefill_impl)
        self.layers = [w._replace(**{n: qw[f"layers.{i}.{n}"] for n in names}) for i, w in enumerate(self.layers)]
        if q.lm_head:
            self.lm_head = qw["lm_head"]
        sample = qw["layers.0.wqkv"]
        info["decode_kernel"] = sample.effective_impl(self.device, decode=True, compiling=self.compiled)
        info["prefill_kernel"] = sample.effective_impl(self.device, decode=False, compiling=self.compiled)
        info["lm_head"] = q.lm_head
        self.quant_info = info

    @property
    def weight_bytes_per_step(self) -> int:
        """Bytes of weights one decode step streams: every layer's norms and projections (packed
        codes and scales when quantized), the final norm and the LM head (the embedding lookup reads
        one row per token and is not counted), as stored on this rank."""
        tensors: list[torch.Tensor | QuantizedWeight | TritonDenseWeight | None] = [self.norm_w, self.lm_head]
        for w in self.layers:
            tensors += list(w)
        return streamed_bytes(tensors)

    # ------------------------------------------------------------------------------------------
    # Allocation and warm-up

    @_plain_no_grad
    def setup(self, max_batch: int, max_seq: int) -> None:
        """Allocate the KV cache and the step buffers for ``max_batch`` rows of ``max_seq`` slots
        (drops captured graphs; a previous ``PrefillOutput`` becomes unusable).

        Raises:
            ValueError: ``max_batch < 1`` or ``max_seq < 2``.
        """
        if max_batch < 1 or max_seq < 2:
            raise ValueError(f"fast engine: max_batch ({max_batch}) must be >= 1 and max_seq ({max_seq}) >= 2")
        d, dev = self.dims, self.device
        self.max_batch, self.max_seq = int(max_batch), int(max_seq)
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}  # ("decode", B, L) / ("extend", B, S, L)
        self._prefill_graphs: dict[tuple[int, int, bool], PrefillGraph] = {}  # by (batch, length, padded)
        self._prefill_seen: set[bool] = set()  # compiled prefill for batch 1 / batch > 1
        self._views: dict[int, tuple[StepBuffers, list]] = {}
        self._graph_pool = None
        self._prefill_id = 0  # which prefill the cache holds
        self._decoded_id = 0  # which prefill was last decoded (each can be decoded once)
        self._live_batch = 0  # rows of the live prefill
        self._cur = 0  # host copy of buf.slot: the next free cache slot
        self._prompt_end = 0  # slots the live prompt fills (rewind stops there)
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
            seeds=torch.zeros(B, dtype=torch.long, device=dev),
            out=torch.zeros(B, S, dtype=torch.long, device=dev),
            logits=torch.zeros(B, d.vocab, dtype=torch.float32, device=dev),
            pad_bias=torch.zeros(B, S, dtype=self.dtype, device=dev),
            ext_tokens=torch.zeros(B, MAX_EXTEND, dtype=torch.long, device=dev),
            ext_logits=torch.zeros(B, MAX_EXTEND, d.vocab, dtype=torch.float32, device=dev),
        )

    @_plain_no_grad
    def warmup(self, prompt_len: int, max_new_tokens: int | None = None, batch_sizes: Sequence[int] | None = None) -> None:
        """Compile and capture everything a run of ``prompt_len``-token prompts and
        ``max_new_tokens`` new tokens (default: up to ``max_seq``) needs, for each batch size
        (default ``[max_batch]``): the prefill graph of that shape (plus its left-padded variant
        for batches), and the decode graphs of every KV bucket it reaches. Call it once per prompt
        length a run will see; the time goes to ``warmup_ms``. Leaves no live prefill."""
        new = self.max_seq - prompt_len + 1 if max_new_tokens is None else max_new_tokens
        with _counted(self):
            for B in batch_sizes or [self.max_batch]:
                embeds = 0.02 * torch.randn(B, prompt_len, self.dims.hidden, device=self.device, dtype=self.dtype)
                full = [prompt_len] * B
                self._capture_prefill(B, prompt_len, padded=False)  # compiles the prefill functions
                if B > 1:  # a left-padded batch takes the explicit-mask path
                    self._capture_prefill(B, prompt_len, padded=True)
                if prompt_len > 2:  # the uncaptured path at another length: a recompile, if any, happens now
                    mask = torch.ones(B, prompt_len - 1, dtype=torch.bool, device=self.device)
                    self._prefill_layers(embeds[:, 1:].contiguous(), mask, padded=False)
                    self._prefill_id += 1
                prefill = self.prefill(embeds, full)
                self._capture(B, prompt_len, new)  # compiles the decode step; one graph per reachable bucket
                self.decode(prefill, min(new, 3), None)
                if B > 1:
                    self.decode(self.prefill(embeds, [prompt_len // 2] + full[1:]), min(new, 3), None)

    # ------------------------------------------------------------------------------------------
    # Prefill

    @_plain_no_grad
    def prefill(self, inputs_embeds: torch.Tensor, lengths: Sequence[int], seeds: Sequence[int] | None = None) -> PrefillOutput:
        """See :class:`stagewise.engine.base.Engine`. ``inputs_embeds`` ``[B, S, D]``, left-padded.

        A (batch, length, padded) shape that :meth:`warmup` captured replays one CUDA graph; any
        other runs the compiled layer functions one by one (same result, more host work). Nothing
        is read back from the device. Under tensor parallelism every rank calls it with a prompt of
        the same shape, lengths and seeds, and the group's rank 0 prompt is used (broadcast), so
        the vision stage may run on rank 0 only.

        Raises:
            ValueError: wrong shape, dtype or device; a batch or prompt larger than the cache.
        """
        B, S = self._check_prompt(inputs_embeds, lengths)
        if self.tp is not None:  # tensor parallel: group rank 0's prompt is every rank's
            inputs_embeds = self.tp.broadcast_(inputs_embeds.clone(memory_format=torch.contiguous_format))
        padded = min(lengths) < S
        mask = padding_mask(lengths, S, self.device).bool()  # [B, S]
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

        b = self.buf  # decode state: slots [0, S) hold the prompt, padding masked out
        if seeds is not None and len(seeds) != B:
            raise ValueError(f"fast engine: {len(seeds)} seeds for a batch of {B}")
        b.seeds[:B].copy_(torch.tensor(list(seeds) if seeds is not None else [self.sampling.seed] * B, dtype=torch.long))
        b.step.fill_(0)
        nxt = draw_tokens(logits, self.sampling, b.seeds[:B], b.step)
        b.pad_bias[:B].zero_()
        b.pad_bias[:B, :S].masked_fill_(~mask, -math.inf)
        b.tokens[:B].copy_(nxt)
        b.pos[:B].copy_(left_pad_positions(mask)[:, -1] + 1)
        b.slot.fill_(S)
        b.step.fill_(1)
        b.out[:B, 0].copy_(nxt)
        b.logits[:B].copy_(logits)
        self._prefill_id += 1
        self._live_batch, self._cur = B, S
        self._prompt_end = S
        return PrefillOutput(nxt, logits, B, S, handle=self._prefill_id)

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
            with self._attention_backends():
                attn = dyn(attend_prefill(q, kv, causal, d.group), 0, 2)
            x = dyn(self._prefill_out(x, attn, w, dims=d, reduce=self.reduce), 0, 1)
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
            with torch.cuda.graph(graph, pool=self._pool(), capture_error_mode=self._capture_mode):
                logits = self._prefill_layers(embeds, mask, padded)
            self._prefill_graphs[key] = PrefillGraph(graph, embeds, mask, logits)
            self._prefill_id += 1  # whatever prefill was live, its cache is gone

    # ------------------------------------------------------------------------------------------
    # Decode

    @_plain_no_grad
    def decode(self, prefill: PrefillOutput, max_new_tokens: int, eos_token_id: int | None) -> DecodeOutput:
        """See :class:`stagewise.engine.base.Engine`. The host reads the EOS flags every
        ``check_every`` steps; steps run past the last EOS before that look are not reported.

        Raises:
            ValueError: a stale ``prefill`` (already decoded, or another prefill ran since), or
                more tokens than the cache holds.
        """
        B, S = self._claim(prefill, max_new_tokens)
        b = self.buf
        b.eos.fill_(-1 if eos_token_id is None else eos_token_id)
        b.done[:B].copy_(b.tokens[:B] == b.eos)
        n_steps = max_new_tokens - 1
        self._capture(B, S, max_new_tokens)

        timer = StepTimer(self.device, self.options.time_steps)
        timer.mark()
        ran = 0
        for t in range(n_steps):
            self._step(("decode", B, self._bucket(S + t)))
            timer.mark()
            ran += 1
            if eos_token_id is not None and ran % self.check_every == 0:
                self.n_host_syncs += 1
                if self._all_done(B):
                    break
        self._cur = S + ran
        if self.tp is not None:  # ranks that disagree would fail silently: check (two tiny collectives)
            self.tp.check_same(b.out[:B, : ran + 1], "decoded tokens")
        tokens = b.out[:B, : ran + 1].cpu()  # [B, T]; the one sync at the end
        self.n_host_syncs += 1
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
            self._step(("decode", B, self._bucket(S + t)))
            out.append(b.logits[:B].clone())
        self._cur = S + forced.shape[1]
        return torch.stack(out, dim=1)

    # ------------------------------------------------------------------------------------------
    # Extend (a speculative verify step) and position-only rollback

    @_plain_no_grad
    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` ``[B, S]`` (``S <= MAX_EXTEND``) at the next ``S`` cache slots of the live
        sequence, in one forward, and return their logits. Positions do not advance: call
        :meth:`advance` with how many of them to keep (the rest is dropped by position only).

        Returns:
            ``[B, S, V]`` fp32, a view of a static buffer valid until the next ``extend``.

        Raises:
            ValueError: no live sequence, a batch other than the live one, ``S`` out of range, or
                past the end of the cache.
        """
        B, S = tokens.shape
        if self._live_batch == 0 or B != self._live_batch:
            raise ValueError(f"fast engine: extend needs the live batch of {self._live_batch} rows, got {B}")
        if not 1 <= S <= MAX_EXTEND:
            raise ValueError(f"fast engine: extend feeds 1..{MAX_EXTEND} tokens per row, got {S}")
        if self._cur + S > self.max_seq:
            raise ValueError(f"fast engine: {self._cur} + {S} slots exceed max_seq={self.max_seq}")
        self.buf.ext_tokens[:B, :S].copy_(tokens)
        key = ("extend", B, S, self._bucket(self._cur + S - 1))
        if self.use_graphs and key not in self._graphs:
            self._capture_key(key)
        self._step(key)
        return self.buf.ext_logits[:B, :S]

    @_plain_no_grad
    def advance(self, n: int) -> None:
        """Keep the first ``n`` tokens the last :meth:`extend` fed (their K/V stay; slots past them
        are hidden by position until overwritten).

        Raises:
            ValueError: ``n`` negative or past the end of the cache.
        """
        if n < 0 or self._cur + n > self.max_seq:
            raise ValueError(f"fast engine: cannot advance {n} slots from {self._cur} (max_seq {self.max_seq})")
        self.buf.pos.add_(n)
        self.buf.slot.add_(n)
        self._cur += n

    @property
    def position(self) -> int:
        """The next free cache slot of the live sequence (host-side; no sync)."""
        return self._cur

    # ------------------------------------------------------------------------------------------
    # Speculative decoding support (driven by stagewise.engine.speculative): claim a prefill for
    # an extend/advance loop, roll a draft model back, capture the extend graphs ahead of time

    def claim(self, prefill: PrefillOutput, max_new_tokens: int) -> tuple[int, int]:
        """Take ``prefill`` for a decode driven through :meth:`extend` / :meth:`advance` (what
        :meth:`decode` does first): it is then consumed like a decoded one.

        Returns:
            ``(B, S)``: its batch and padded prompt length.

        Raises:
            ValueError: a stale ``prefill``, ``max_new_tokens < 1``, or more tokens than the cache holds.
        """
        return self._claim(prefill, max_new_tokens)

    @_plain_no_grad
    def rewind(self, n: int) -> None:
        """Drop the last ``n`` kept tokens by position (the inverse of :meth:`advance`; their K/V
        stays, hidden until overwritten): a draft model's rollback after a verify step.

        Raises:
            ValueError: ``n`` negative or reaching into the prompt.
        """
        if n < 0 or self._cur - n < self._prompt_end:
            raise ValueError(f"fast engine: cannot rewind {n} slots from {self._cur} (prompt ends at {self._prompt_end})")
        self.buf.pos.sub_(n)
        self.buf.slot.sub_(n)
        self._cur -= n

    @_plain_no_grad
    def warmup_extend(self, prompt_len: int, max_new_tokens: int, sizes: Sequence[int]) -> None:
        """Compile and capture the batch-1 :meth:`extend` steps of ``sizes`` fed tokens for every
        KV bucket a run of ``prompt_len`` prompt slots and ``max_new_tokens`` new tokens reaches
        (a speculative verify step feeds ``k + 1``; a draft model 1 or 2). Time goes to
        ``warmup_ms``; leaves no live prefill. A no-op when neither compiling nor capturing.

        Raises:
            ValueError: a size outside ``1..MAX_EXTEND``, or a prompt that leaves no room for it.
        """
        if any(not 1 <= S <= MAX_EXTEND for S in sizes):
            raise ValueError(f"fast engine: extend sizes must be in 1..{MAX_EXTEND}, got {list(sizes)}")
        if prompt_len + max(sizes, default=0) > self.max_seq:
            raise ValueError(f"fast engine: a prompt of {prompt_len} slots leaves no room for extend sizes {list(sizes)}")
        if not (self.compiled or self.use_graphs):
            return
        with _counted(self):
            embeds = 0.02 * torch.randn(1, prompt_len, self.dims.hidden, device=self.device, dtype=self.dtype)
            self.prefill(embeds, [prompt_len])
            top = min(prompt_len + max_new_tokens + max(sizes), self.max_seq)  # slots a run can touch
            for S in sizes:
                for L in sorted({self._bucket(cur + S - 1) for cur in range(prompt_len, top - S + 1)}):
                    key = ("extend", 1, S, L)
                    if not self.use_graphs:
                        self._extend_step(1, S, L)  # compiles this shape
                    elif key not in self._graphs:
                        self._capture_key(key)
            self._prefill_id += 1  # the warm-up prefill is gone
            self._live_batch = 0

    # ------------------------------------------------------------------------------------------
    # Steps and their graphs

    def _step(self, key: tuple) -> None:
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
        elif key[0] == "decode":
            self._decode_step(key[1], key[2])
        else:
            self._extend_step(key[1], key[2], key[3])

    def _decode_step(self, B: int, length: int) -> None:
        """``decode_one_token``: one token for each of ``B`` rows, attending to ``length`` slots.
        Touches only static buffers, so it can be captured in a CUDA graph."""
        d, mv = self.dims, self.matvec and B == 1
        buf, kvs = self._batch_views(B)
        x, rope, bias = self._step_in(buf.tokens[:, None], buf.pos, buf.slot, buf.pad_bias[:, :length],
                                      self.embed, self.rope_table, group=d.group)
        for w, kv in zip(self.layers, kvs):
            q = self._decode_in(x, w, rope, kv, buf.slot, dims=d, matvec=mv)
            with self._attention_backends(step=True):
                attn = self._attend_step(q, kv[0][:, :, :length], kv[1][:, :, :length], bias)  # slots in use
            x = self._decode_out(x, attn, w, dims=d, matvec=mv, reduce=self.reduce)
        noise = None if self.sampling.greedy else gumbel_noise(buf.seeds, buf.step, d.vocab)  # eager kernels
        self._step_out(x, self.norm_w, self.lm_head, buf, noise, dims=d, matvec=mv, sampling=self.sampling)

    def _extend_step(self, B: int, S: int, length: int) -> None:
        """``S`` fed tokens per row at slots ``[slot, slot + S)``, attending to ``length`` slots;
        logits into ``ext_logits``. Static buffers only (graph-capturable)."""
        d, mv = self.dims, self.options.extend_matvec and B == 1
        buf, kvs = self._batch_views(B)
        x, rope, bias = self._step_in(buf.ext_tokens[:, :S], buf.pos, buf.slot, buf.pad_bias[:, :length],
                                      self.embed, self.rope_table, group=d.group)
        slots = buf.slot + self._arange[:S]  # [S]
        for w, kv in zip(self.layers, kvs):
            q = self._decode_in(x, w, rope, kv, slots, dims=d, matvec=mv)
            with self._attention_backends(step=True):
                attn = self._attend_step(q, kv[0][:, :, :length], kv[1][:, :, :length], bias)
            x = self._decode_out(x, attn, w, dims=d, matvec=mv, reduce=self.reduce)
        buf.ext_logits[:, :S].copy_(self._head(x, self.norm_w, self.lm_head, dims=d, matvec=mv))

    def _all_done(self, B: int) -> bool:
        """Every row has produced EOS (one host read); under tensor parallelism on every rank, so
        that the ranks leave the decode loop at the same step whatever they computed."""
        done = self.buf.done[:B].all()
        return bool(done) if self.tp is None else self.tp.all_true(done)

    @functools.cached_property
    def _arange(self) -> torch.Tensor:
        return torch.arange(MAX_EXTEND, device=self.device)

    def _batch_views(self, B: int) -> tuple[StepBuffers, list]:
        """Step buffers and per-layer cache rows sliced to ``B`` rows (made once per ``B``)."""
        if B not in self._views:
            rows = StepBuffers(*(t if name in ("slot", "step", "eos") else t[:B] for name, t in zip(StepBuffers._fields, self.buf)))
            kvs = [(self.k_cache[i, :B], self.v_cache[i, :B]) for i in range(self.dims.n_layers)]
            self._views[B] = (rows, kvs)
        return self._views[B]

    def _pool(self):
        """One memory pool for all graphs: they never run concurrently, and every result a
        graph leaves is copied out (or lives in a static buffer) before another one runs."""
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        return self._graph_pool

    def _attention_backends(self, step: bool = False) -> contextlib.AbstractContextManager:
        """The SDPA backends attention may use (:attr:`FastOptions.deterministic`); a decode or
        verify ``step`` that attends without SDPA needs none."""
        if not self.deterministic or (step and self.step_attention != "sdpa"):
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    @property
    def _capture_mode(self) -> str:
        """CUDA-graph capture mode: under tensor parallelism "thread_local", so that the process
        group's watchdog thread, which queries CUDA events, does not invalidate the capture."""
        return "global" if self.tp is None else "thread_local"

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
        """Capture a decode graph for every bucket a decode of ``max_new_tokens`` after
        ``prompt_len`` reaches and does not have yet (time counted in ``warmup_ms``)."""
        if not self.use_graphs:
            return
        for L in sorted({self._bucket(prompt_len + t) for t in range(max_new_tokens - 1)}):
            if ("decode", B, L) not in self._graphs:
                self._capture_key(("decode", B, L))

    def _capture_key(self, key: tuple) -> None:
        """Capture the step ``key`` in a CUDA graph, preceded by one eager warm-up step (compiles
        for a new shape, autotunes, initializes cuBLAS) at the current slot, with the step state
        saved and put back; the K/V it writes there is overwritten before anyone reads it."""
        with _counted(self):
            saved = [t.clone() for t in self.buf]
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            run = (lambda: self._decode_step(key[1], key[2])) if key[0] == "decode" else (lambda: self._extend_step(*key[1:]))
            with torch.cuda.stream(stream):
                run()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for t, s in zip(self.buf, saved):
                t.copy_(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool(), capture_error_mode=self._capture_mode):
                run()
            self._graphs[key] = graph  # (capturing records the kernels without running them)

    # ------------------------------------------------------------------------------------------
    # Argument checks (user input: ValueError, never assert)

    def _check_prompt(self, embeds: torch.Tensor, lengths: Sequence[int]) -> tuple[int, int]:
        if embeds.ndim != 3 or embeds.shape[-1] != self.dims.hidden:
            raise ValueError(f"fast engine: inputs_embeds must be [B, S, {self.dims.hidden}], got {list(embeds.shape)}")
        B, S, _ = embeds.shape
        if len(lengths) != B:
            raise ValueError(f"fast engine: {len(lengths)} lengths for a batch of {B}")
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
        if prefill.handle != self._prefill_id or self._decoded_id == self._prefill_id:
            raise ValueError("fast engine: this PrefillOutput is stale (already decoded, or another prefill ran since)")
        B, S = prefill.batch, prefill.prompt_len
        if max_new_tokens < 1:
            raise ValueError(f"fast engine: max_new_tokens must be >= 1, got {max_new_tokens}")
        if S + max_new_tokens - 1 > self.max_seq:
            raise ValueError(
                f"fast engine: prompt of {S} + {max_new_tokens} new tokens needs {S + max_new_tokens - 1} cache "
                f"slots, more than max_seq={self.max_seq}"
            )
        self._decoded_id = self._prefill_id
        return B, S


def _layer_weights(layer: LlamaDecoderLayer) -> LayerWeights:
    """One HF decoder layer's weights as :class:`LayerWeights` (q/k/v and gate/up fused in place)."""
    a, m = layer.self_attn, layer.mlp
    wqkv, bqkv = fuse_linears([a.q_proj, a.k_proj, a.v_proj])
    wgu, bgu = fuse_linears([m.gate_proj, m.up_proj])
    return LayerWeights(
        ln1=layer.input_layernorm.weight.detach(),
        wqkv=wqkv, bqkv=bqkv,
        wo=a.o_proj.weight.detach(), bo=_detach(a.o_proj.bias),
        ln2=layer.post_attention_layernorm.weight.detach(),
        w_gate_up=wgu, b_gate_up=bgu,
        w_down=m.down_proj.weight.detach(), b_down=_detach(m.down_proj.bias),
    )


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
