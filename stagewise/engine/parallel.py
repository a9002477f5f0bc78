"""Tensor parallelism for the fast engine: which rank holds which weights, and the all-reduce.

The split is Megatron-LM's (Shoeybi et al. 2019, sec. 3): in each decoder layer the projections
that read the residual stream are split by output rows ("column-parallel": fused q/k/v by heads,
fused gate/up by MLP width), the projections that write back to it by input columns
("row-parallel": o-proj, down-proj), so each rank computes a partial sum of the row-parallel
output and ONE all-reduce per row-parallel projection (two per layer) makes it whole. Attention
needs no communication: a rank holds ``H / T`` query heads and the ``Hkv / T`` KV heads they
read (query head ``h`` reads KV head ``h // G``, and ``H / T = G * Hkv / T``), so its KV cache is
``Hkv / T`` heads wide. Norms, the embedding and the LM head are replicated.

Why every rank computes the full logits (replicated LM head, no gather), and why the ranks then
pick the same token: the residual stream is bitwise identical on every rank. It starts from the
same embedding rows (rank 0's prompt, broadcast by the engine's prefill); each update is
``x + all_reduce(partial)``, where the all-reduce returns the same bits on every rank (the
summation orders below) and the add is elementwise, so it is exact whatever kernel does it. The
per-rank work in between (RMSNorm, projections of this rank's heads) only feeds the partial sums,
so it may differ between ranks (autotuned kernels) without breaking this. The final RMSNorm and
the LM head then run the same kernels on the same input on every rank (the engine compiles them
WITHOUT autotuning under tensor parallelism: a timing-based choice could differ per rank and
change the summation order), so every rank computes the same logits bit for bit; greedy
``argmax`` picks the same token, and sampling picks the same token too because its noise is a
pure function of (row seed, step, vocabulary index) (:mod:`stagewise.engine.sampling`). Each rank
feeds that token to its next step without a broadcast, so the ranks stay in lockstep with no
communication beyond the all-reduces. Belt and braces, because a disagreement would otherwise hang
the group or pass unnoticed: the engine's EOS looks are made collectively
(:meth:`TPCollectives.all_true`), and each decode ends by checking that the ranks hold the same
tokens (:meth:`TPCollectives.check_same`, two tiny all-reduces).

The all-reduce implementations (``TensorParallel.all_reduce``), each behind the engine's
:data:`~stagewise.engine.layers.Reduce` signature, each capturable in a CUDA graph, and each
returning the same bits on every rank:

* ``"nccl"`` / ``"gloo"``: ``torch.distributed.all_reduce`` on the process group (NCCL on
  CUDA, gloo on CPU). NCCL's ring and tree algorithms reduce each element once and then
  broadcast the result (ring: reduce-scatter then all-gather; tree: reduce up, broadcast down),
  so every rank receives the same bits (by construction of those algorithms; NCCL does not
  promise a summation order). gloo's ring all-reduce is built the same way.
* ``"symm_mem"``: a one-shot all-reduce over NVLink peer memory, PyTorch's symmetric memory
  (``torch.ops.symm_mem.one_shot_all_reduce_copy_out``, the CUDA backend, WITHOUT multicast:
  this module sets ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` before allocating, and never calls a
  ``multimem`` op). Each rank writes its partial sum into its own registered buffer; after a
  barrier over signal pads, every rank reads all ``T`` buffers and adds them in rank order
  ``0, 1, ..., T - 1`` in the buffer dtype (PyTorch, ``CUDASymmetricMemory-inl.h``,
  ``load_and_reduce``), so every rank computes the same sum in the same order; a second barrier
  keeps a rank from overwriting its buffer while a peer still reads it. One kernel, one hop: for
  the 8 KiB of a batch-1 decode step this is latency-bound, where NCCL's ring pays per-step
  protocol overhead. Tensors larger than the buffer (``one_shot_max_bytes``: prefill) or in a
  dtype the kernel lacks take the NCCL path.
* ``"auto"``: ``symm_mem`` on CUDA, ``gloo`` on CPU.

The collective runs inside a ``torch.library`` custom op, opaque to ``torch.compile``: the
compiled layer functions call it like any extern kernel, and the engine's CUDA-graph capture
records whatever kernels it launches (the NCCL kernel, or the one-shot kernel).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from stagewise.engine.layers import Dims, LayerWeights, Reduce

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

ALL_REDUCES = ("auto", "nccl", "gloo", "symm_mem")
"""Names accepted by :attr:`TensorParallel.all_reduce`."""

DEFAULT_ONE_SHOT_MAX_BYTES = 1 << 20
"""Largest tensor (bytes) the one-shot all-reduce handles (its buffer size); larger ones go to
NCCL. A choice, not a measurement: it sends every decode step's all-reduce (``batch x hidden x 2``
bytes: 8 KiB at batch 1 for LLaMA-7B, 128 KiB at batch 16) to the latency-bound one-shot kernel
and a prefill's (5,251,072 B for 641 tokens) to NCCL's bandwidth-tuned algorithms
(``benchmarks/scale_out.py --one-shot-max-bytes`` measures another split)."""


@dataclass(frozen=True)
class TensorParallel:
    """Tensor parallelism of one model over the ranks of a process group.

    Attributes:
        size: ranks the model is split over (``T``; 1 = no split).
        rank: this rank's index in the group, ``0 <= rank < size``.
        group: the ``torch.distributed`` process group (``None``: the default group).
        all_reduce: one of :data:`ALL_REDUCES` (see the module docstring); what was applied is
            :attr:`TPCollectives.name`.
        one_shot_max_bytes: the one-shot all-reduce's buffer size in bytes.

    Raises:
        ValueError: a field out of range (named).
    """

    size: int
    rank: int
    group: ProcessGroup | None = None
    all_reduce: str = "auto"
    one_shot_max_bytes: int = DEFAULT_ONE_SHOT_MAX_BYTES

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"tensor_parallel.size: must be >= 1, got {self.size}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor_parallel.rank: must be in [0, {self.size}), got {self.rank}")
        if self.all_reduce not in ALL_REDUCES:
            raise ValueError(f"tensor_parallel.all_reduce: expected one of {', '.join(ALL_REDUCES)}, got {self.all_reduce!r}")
        if self.one_shot_max_bytes < 1:
            raise ValueError(f"tensor_parallel.one_shot_max_bytes: must be >= 1, got {self.one_shot_max_bytes}")

    @classmethod
    def from_group(cls, group: ProcessGroup | None = None, *, all_reduce: str = "auto", one_shot_max_bytes: int = DEFAULT_ONE_SHOT_MAX_BYTES) -> "TensorParallel":
        """Split over all ranks of ``group`` (default: the default group), which must be initialized.

        Raises:
            ValueError: ``torch.distributed`` is not initialized.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("tensor_parallel: torch.distributed is not initialized (launch with torchrun)")
        return cls(size=dist.get_world_size(group), rank=dist.get_rank(group), group=group,
                   all_reduce=all_reduce, one_shot_max_bytes=one_shot_max_bytes)

    def rank_dims(self, full: Dims) -> Dims:
        """The per-rank :class:`Dims` of a model whose full shapes are ``full``: ``H / T`` query
        heads, ``Hkv / T`` KV heads, ``I / T`` MLP width; hidden size and vocabulary unchanged.

        Raises:
            ValueError: heads, KV heads or the MLP width not divisible by ``size``.
        """
        bad = [f"{name} = {n}" for name, n in (("num_attention_heads", full.n_heads), ("num_key_value_heads", full.n_kv_heads),
                                                ("intermediate_size", full.intermediate)) if n % self.size]
        if bad:
            raise ValueError(f"tensor parallel size {self.size} must divide the model's {', '.join(bad)}")
        return dataclasses.replace(full, n_heads=full.n_heads // self.size, n_kv_heads=full.n_kv_heads // self.size,
                                   intermediate=full.intermediate // self.size)


# ----------------------------------------------------------------------------------------------
# Weight sharding


def shard_layer(w: LayerWeights, full: Dims, tp: TensorParallel) -> LayerWeights:
    """Rank ``tp.rank``'s part of one decoder layer (copies, the input left untouched; ``w`` itself
    when ``tp.size == 1``).

    * fused q/k/v ``[(H + 2 Hkv) hd, D]``: rows of this rank's ``H / T`` query heads, then of its
      ``Hkv / T`` key heads, then of its value heads -> ``[(H + 2 Hkv) hd / T, D]`` (bias alike);
    * fused gate/up ``[2 I, D]``: this rank's ``I / T`` gate rows, then its up rows (bias alike);
    * o-proj ``[D, H hd]`` and down-proj ``[D, I]``: this rank's input columns; their biases stay
      whole, added once after the all-reduce (:func:`stagewise.engine.layers._row_parallel`);
    * the two RMSNorm weights: replicated (the same tensors).

    Args:
        w: the full layer (dense tensors).
        full: the model's full :class:`Dims`.

    Raises:
        ValueError: shapes not divisible by ``tp.size`` (:meth:`TensorParallel.rank_dims`), or a
            quantized weight (sharding one is not supported yet).
    """
    rd = tp.rank_dims(full)
    if tp.size == 1:
        return w
    for name in ("wqkv", "wo", "w_gate_up", "w_down"):
        if not isinstance(getattr(w, name), torch.Tensor):
            raise ValueError(f"tensor parallel: {name} is a quantized weight; quantization and tensor parallelism do not compose yet")
    r, hd = tp.rank, full.head_dim
    q_rows, kv_rows = rd.n_heads * hd, rd.n_kv_heads * hd  # this rank's rows of q and of k (= of v)

    def qkv(t: torch.Tensor) -> torch.Tensor:  # [(H + 2 Hkv) hd, ...] -> this rank's rows
        q, k, v = t.split(full.qkv_split, dim=0)
        return torch.cat([q[r * q_rows:(r + 1) * q_rows], k[r * kv_rows:(r + 1) * kv_rows], v[r * kv_rows:(r + 1) * kv_rows]])

    def gate_up(t: torch.Tensor) -> torch.Tensor:  # [2 I, ...] -> this rank's gate rows, then up rows
        gate, up = t.split(full.intermediate, dim=0)
        i = rd.intermediate
        return torch.cat([gate[r * i:(r + 1) * i], up[r * i:(r + 1) * i]])

    i = rd.intermediate
    return w._replace(
        wqkv=qkv(w.wqkv), bqkv=None if w.bqkv is None else qkv(w.bqkv),
        wo=w.wo[:, r * q_rows:(r + 1) * q_rows].contiguous(),  # [D, H hd / T]
        w_gate_up=gate_up(w.w_gate_up), b_gate_up=None if w.b_gate_up is None else gate_up(w.b_gate_up),
        w_down=w.w_down[:, r * i:(r + 1) * i].contiguous(),  # [D, I / T]
    )


# ----------------------------------------------------------------------------------------------
# All-reduce: custom ops (opaque to torch.compile, captured by CUDA graphs) and their state


@dataclass
class _Impl:
    """What a custom-op call needs (looked up by key: an op argument must be a plain value)."""

    name: str
    group: ProcessGroup | None
    buffer: torch.Tensor | None = None  # symm_mem: this rank's registered buffer, 1-D
    group_name: str = ""
    copy_fused: bool = False  # one_shot_all_reduce_copy_out available (copy into the buffer in-kernel)


_IMPLS: dict[str, _Impl] = {}
_KEYS = itertools.count()


@torch.library.custom_op("stagewise::tp_all_reduce_", mutates_args=("x",))
def _all_reduce_(x: torch.Tensor, key: str) -> None:
    """``x`` += the other ranks' ``x``, in place (``torch.distributed.all_reduce``)."""
    import torch.distributed as dist

    dist.all_reduce(x, group=_IMPLS[key].group)


@_all_reduce_.register_fake
def _(x: torch.Tensor, key: str) -> None:
    return None


@torch.library.custom_op("stagewise::tp_one_shot_all_reduce", mutates_args=())
def _one_shot_all_reduce(x: torch.Tensor, key: str) -> torch.Tensor:
    """The sum of ``x`` over the ranks, as a new tensor: one-shot over symmetric memory when ``x``
    fits the buffer (and its dtype and alignment suit the kernel), else ``all_reduce`` on a copy."""
    import torch.distributed as dist

    impl = _IMPLS[key]
    x = x.contiguous()
    out = torch.empty_like(x)
    n, esize = x.numel(), x.element_size()
    buf = impl.buffer
    fits = buf is not None and x.dtype == buf.dtype and n <= buf.numel() and (n * esize) % 4 == 0
    if not fits:
        out.copy_(x)
        dist.all_reduce(out, group=impl.group)
        return out
    # The fused copy needs x and the buffer slice equally aligned: a 16-byte-aligned start suffices
    # (the buffer slice starts at offset 0; both then share the alignment of n * esize).
    if impl.copy_fused and (x.storage_offset() * esize) % 16 == 0:
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(buf[:n], x.view(-1), "sum", impl.group_name, out.view(-1))
    else:
        buf[:n].copy_(x.view(-1))
        torch.ops.symm_mem.one_shot_all_reduce_out(buf[:n], "sum", impl.group_name, out.view(-1))
    return out


@_one_shot_all_reduce.register_fake
def _(x: torch.Tensor, key: str) -> torch.Tensor:
    return torch.empty_like(x.contiguous())


def _reduce_in_place(x: torch.Tensor, *, key: str) -> torch.Tensor:
    torch.ops.stagewise.tp_all_reduce_(x, key)
    return x


def _reduce_one_shot(x: torch.Tensor, *, key: str) -> torch.Tensor:
    return torch.ops.stagewise.tp_one_shot_all_reduce(x, key)


@dataclass
class TPCollectives:
    """The collectives one engine uses under tensor parallelism (made by :func:`make_collectives`).

    Attributes:
        tp: the description it was made from.
        name: the all-reduce applied (``"nccl"``, ``"gloo"`` or ``"symm_mem"``), never ``"auto"``.
        reduce: the :data:`~stagewise.engine.layers.Reduce` to pass to the layer functions.
        one_shot_max_bytes: the one-shot buffer size (``symm_mem`` only, else ``None``).
        fallback_reason: why ``"auto"`` did not get ``symm_mem`` (``None`` otherwise).
    """

    tp: TensorParallel
    name: str
    reduce: Reduce
    key: str
    one_shot_max_bytes: int | None = None
    fallback_reason: str | None = None

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        """Overwrite ``t`` (in place) with group rank 0's ``t``; returns ``t``."""
        import torch.distributed as dist

        src = dist.get_global_rank(self.tp.group, 0) if self.tp.group is not None else 0
        dist.broadcast(t, src=src, group=self.tp.group)
        return t

    def all_true(self, flag: torch.Tensor) -> bool:
        """``flag`` (a 0-d bool tensor on this rank's device) is true on every rank (one host read)."""
        import torch.distributed as dist

        t = flag.reshape(1).to(torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.tp.group)
        return bool(t.item())

    def check_same(self, t: torch.Tensor, what: str) -> None:
        """Raise unless the integer tensor ``t`` holds the same values on every rank.

        Raises:
            RuntimeError: the ranks disagree (they computed different tokens: their kernels
                differ, which this module's lockstep argument excludes; the first differing
                position is named).
        """
        import torch.distributed as dist

        lo, hi = t.clone(), t.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.tp.group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.tp.group)
        if not torch.equal(lo, hi):
            where = (lo != hi).nonzero()[0].tolist()
            raise RuntimeError(f"tensor parallel: ranks disagree on the {what} at index {where} "
                               f"(rank {self.tp.rank} holds {t[tuple(where)].item()})")

    def describe(self) -> dict[str, Any]:
        """What a run records: ``{"tensor_parallel_size", "all_reduce", ...}`` as applied."""
        out: dict[str, Any] = {"tensor_parallel_size": self.tp.size, "all_reduce": self.name}
        if self.name == "symm_mem":
            out.update(one_shot_max_bytes=self.one_shot_max_bytes, above_one_shot_max="nccl",
                       symm_mem_multicast=False, TORCH_SYMM_MEM_DISABLE_MULTICAST=os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST"))
        if self.name == "nccl" or self.name == "symm_mem":
            out["NCCL_NVLS_ENABLE"] = os.environ.get("NCCL_NVLS_ENABLE")
        if self.fallback_reason:
            out["fallback_reason"] = self.fallback_reason
        return out

    def close(self) -> None:
        """Drop the state the custom ops look up (the engine is being discarded)."""
        _IMPLS.pop(self.key, None)


def make_collectives(tp: TensorParallel, device: torch.device, dtype: torch.dtype) -> TPCollectives:
    """Set up the all-reduce ``tp.all_reduce`` names for tensors of ``dtype`` on ``device``.

    Collective: every rank of the group calls it, in the same order (``symm_mem`` allocates and
    registers a buffer with all peers).

    Raises:
        ValueError: ``torch.distributed`` is not initialized, the group's size or rank disagree
            with ``tp``, or the named all-reduce does not suit the device (``nccl``/``symm_mem`` on
            CPU, ``gloo`` on CUDA).
        RuntimeError: ``symm_mem`` named explicitly and its setup failed (``auto`` falls back to
            NCCL instead and records why).
    """
    import torch.distributed as dist

    device = torch.device(device)
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("tensor_parallel: torch.distributed is not initialized (launch with torchrun)")
    if (dist.get_world_size(tp.group), dist.get_rank(tp.group)) != (tp.size, tp.rank):
        raise ValueError(f"tensor_parallel: size/rank {tp.size}/{tp.rank} disagree with the process group's "
                         f"{dist.get_world_size(tp.group)}/{dist.get_rank(tp.group)}")
    on_cuda = device.type == "cuda"
    name = tp.all_reduce if tp.all_reduce != "auto" else ("symm_mem" if on_cuda else "gloo")
    if on_cuda and name == "gloo" or not on_cuda and name in ("nccl", "symm_mem"):
        raise ValueError(f"tensor_parallel.all_reduce: {name!r} does not run on {device.type}")
    key = f"tp{next(_KEYS)}"
    impl = _Impl(name=name, group=tp.group)
    fallback = None
    if name == "symm_mem":
        _IMPLS[key] = impl
        fallback = _setup_one_shot(impl, key, tp, device, dtype)
        if fallback is not None:
            if tp.all_reduce == "symm_mem":
                _IMPLS.pop(key, None)
                raise RuntimeError(f"tensor_parallel: symmetric-memory all-reduce unavailable: {fallback}")
            name, impl.name, impl.buffer = "nccl", "nccl", None
    _IMPLS[key] = impl
    fn = _reduce_one_shot if name == "symm_mem" else _reduce_in_place
    return TPCollectives(tp=tp, name=name, reduce=functools.partial(fn, key=key), key=key,
                         one_shot_max_bytes=tp.one_shot_max_bytes if name == "symm_mem" else None, fallback_reason=fallback)


def _setup_one_shot(impl: _Impl, key: str, tp: TensorParallel, device: torch.device, dtype: torch.dtype) -> str | None:
    """Register the symmetric buffer, then all-reduce a known tensor through the one-shot op
    (``rank + 1`` everywhere: the sum ``T (T + 1) / 2`` is exact). Each step's success is agreed on
    by all ranks (a MIN all-reduce over NCCL), so every rank makes the same choice. Returns
    ``None`` when the one-shot path works, else why not."""
    import torch.distributed as dist

    def agreed(ok: bool) -> bool:
        t = torch.tensor([int(ok)], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=tp.group)
        return bool(t.item())

    why = None
    try:
        impl.buffer, impl.group_name, impl.copy_fused = _symm_mem_buffer(tp, device, dtype)
    except Exception as e:  # noqa: BLE001 - any setup failure is reported (or falls back under "auto")
        why = f"setup failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if not agreed(why is None):
        return why or "setup failed on another rank"
    try:
        n = max(1, min(1024, impl.buffer.numel()))  # within the buffer: the one-shot path itself
        probe = torch.full((1, n), float(tp.rank + 1), dtype=dtype, device=device)
        got = _reduce_one_shot(probe, key=key)
        if not bool((got == tp.size * (tp.size + 1) / 2).all()):
            why = "self-test gave a wrong sum"
    except Exception as e:  # noqa: BLE001
        why = f"self-test failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if not agreed(why is None):
        return why or "self-test failed on another rank"
    return None


def _symm_mem_buffer(tp: TensorParallel, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, str, bool]:
    """Allocate and register the one-shot buffer (multicast off). Returns (buffer, group name,
    whether the fused copy-and-reduce op exists)."""
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"the one-shot kernel supports bfloat16 and float32, not {dtype}")
    # Never create an NVLink multicast object: this module uses no multimem op, and on shared
    # hosts a multicast object can take the GPUs out of service. Set before the first allocation.
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    os.environ["NVSHMEM_DISABLE_NVLS"] = "1"
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    group = tp.group if tp.group is not None else dist.group.WORLD
    group_name = group.group_name
    try:  # the CUDA backend (whose one-shot kernel the module docstring describes), if selectable
        if symm_mem.get_backend(device) not in (None, "CUDA"):
            symm_mem.set_backend("CUDA")
    except (AttributeError, RuntimeError):
        pass
    if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed by older torch, deprecated (unneeded) in newer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                symm_mem.enable_symm_mem_for_group(group_name)
            except RuntimeError:  # the group is registered already: what this call would do
                pass
    numel = max(tp.one_shot_max_bytes // torch.empty((), dtype=dtype).element_size(), 1)
    buf = symm_mem.empty(numel, dtype=dtype, device=device)
    buf.zero_()
    handle = symm_mem.rendezvous(buf, group_name)
    if getattr(handle, "multicast_ptr", 0):
        raise RuntimeError("symmetric memory created a multicast object although TORCH_SYMM_MEM_DISABLE_MULTICAST=1")
    handle.barrier()
    return buf, group_name, hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out")


def time_all_reduce_us(coll: TPCollectives, numel: int, *, device: torch.device, dtype: torch.dtype, calls: int = 100,
                       repeats: int = 5, in_graph: bool = True) -> float:
    """Time one all-reduce of ``numel`` elements the way a decode step runs it, in us per call.

    ``calls`` all-reduces of a zero tensor (zero stays zero: no overflow) back to back, timed
    with CUDA events; ``in_graph`` (CUDA only) captures them in one CUDA graph and times its
    replay, as the decode-step graph replays them. The median of ``repeats`` timings over
    ``calls``. On CPU, the host clock around eager calls. Collective: every rank calls it.

    What it is for: a decode step's collective time cannot be read from inside its graph, so the
    report estimates it as ``n_all_reduces`` (:func:`stagewise.measure.costmodel.llama_tp_all_reduces`)
    x this figure; ``benchmarks/scale_out.py`` checks the estimate against the step time without
    collectives.

    Raises:
        ValueError: ``numel``, ``calls`` or ``repeats`` < 1.
    """
    import statistics
    import time

    if min(numel, calls, repeats) < 1:
        raise ValueError(f"numel, calls and repeats must be >= 1, got {numel}, {calls}, {repeats}")
    device = torch.device(device)
    z = torch.zeros(1, numel, dtype=dtype, device=device)

    def once() -> None:
        coll.reduce(z)

    for _ in range(3):  # warm-up (NCCL connects on first use)
        once()
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                once()
            times.append((time.perf_counter() - t0) * 1e6 / calls)
        return statistics.median(times)
    run = once
    if in_graph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            for _ in range(calls):
                once()
        run, calls_per_run = graph.replay, calls
    else:
        calls_per_run = 1
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls // calls_per_run):
            run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times)
