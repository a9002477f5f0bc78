"""Dense decode projections through a hand-written Triton GEMV with fixed launch parameters.

Why: at batch 1 the fast engine's decode projections are, by default, reductions that Inductor
generates from ``(x * w).sum(-1)`` (:func:`stagewise.engine.layers.linear` with ``matvec``) and
tunes by timing (``coordinate_descent_tuning``). On the GPU that choice varied per compilation:
the same norm + gate/up reduction took 2248 us per step in one compile and ~1400 us in another
(H200), data-parallel ranks ran kernels 11 % apart, and without tuning the kernels were equal
but slow. :class:`TritonDenseWeight` replaces every dense decode projection by
``torch.ops.stagewise.dense_gemv`` (:mod:`stagewise.engine.quant_triton`) whose launch
parameters depend on the shape only (:func:`dense_gemv_config`): every process, rank and
compile runs the same kernel. The fast engine applies it with
``FastOptions(matvec_kernel="triton")``.

Where it runs: CUDA; or CPU under Triton's interpreter (``TRITON_INTERPRET=1`` set before
``triton`` is first imported: the tests). Triton is imported lazily (on the first
:class:`TritonDenseWeight`), so this module imports without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stagewise.engine.quant import GEMV_MAX_M, ensure_triton, triton_available

DENSE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
"""Weight dtypes the dense GEMV loads (converted to fp32 in registers)."""

GemvConfig = tuple[int, int, int, int]
"""``(block_n, block_k, num_warps, num_stages)`` of one :func:`dense_gemv` launch."""

DENSE_GEMV_CONFIGS: dict[tuple[int, int, torch.dtype], GemvConfig] = {
    # LLaMA-7B decode projections (EventGPT-7B, LLaVA-1.5-7B, Video-LLaVA-7B) and their TP=2
    # shards, bf16, M = 1: the fastest config of benchmarks/gemv.py's 28-config sweep on an H200
    # (docs/results/scale-out/fixed-kernels/gemv_h200.json; us per call vs the default config:
    # qkv 25.5 vs 27.8, o 10.7 vs 12.0, gate_up 43.7 vs 44.7, down 23.3 vs 28.3, lm_head 61.0 vs
    # 61.9; shards 14.5 vs 14.6, 6.0 vs 7.1, 23.3 vs 26.3, 13.6 vs 15.6). Not swept on an H100.
    (12288, 4096, torch.bfloat16): (8, 256, 4, 3),  # fused q/k/v
    (4096, 4096, torch.bfloat16): (8, 1024, 8, 4),  # o-proj
    (22016, 4096, torch.bfloat16): (4, 1024, 4, 2),  # fused gate/up
    (4096, 11008, torch.bfloat16): (8, 1024, 8, 3),  # down-proj
    (32000, 4096, torch.bfloat16): (4, 1024, 4, 4),  # LM head
    (6144, 4096, torch.bfloat16): (4, 512, 4, 3),  # TP=2 shards
    (4096, 2048, torch.bfloat16): (8, 1024, 8, 3),
    (11008, 4096, torch.bfloat16): (8, 256, 4, 3),
    (4096, 5504, torch.bfloat16): (8, 1024, 8, 2),
}
"""``(N, K, weight dtype) -> config`` overriding :func:`dense_gemv_config`'s defaults, measured
with ``benchmarks/gemv.py`` (other shapes take the defaults)."""


def dense_gemv_config(n: int, k: int, m: int, dtype: torch.dtype) -> GemvConfig:
    """Launch parameters of the dense GEMV for a ``[n, k]`` weight in ``dtype`` and ``m`` rows.

    Fixed by the shape and dtype (an entry of :data:`DENSE_GEMV_CONFIGS`, else the defaults), never
    by timing, so every process that compiles the engine compiles identical kernels. The defaults
    are chosen a priori, not measured (``benchmarks/gemv.py`` times a sweep on the GPU): 8 output
    rows per program (a 4096-row weight gives 512 programs, ~4 per SM of an H100's 132),
    K steps of 1 KiB of weight per row (``block_k`` 512 for 2-byte dtypes, 256 for fp32), 4 warps,
    3 pipeline stages. ``m`` is accepted for a future per-``m`` choice; it does not change the
    defaults.

    Returns:
        ``(block_n, block_k, num_warps, num_stages)``.
    """
    cfg = DENSE_GEMV_CONFIGS.get((int(n), int(k), dtype))
    if cfg is not None:
        return cfg
    return (8, 256 if dtype == torch.float32 else 512, 4, 3)


def triton_gemv_usable(device: torch.device | str) -> str | None:
    """Why the dense Triton GEMV cannot run on ``device``, or ``None`` when it can.

    It can on CUDA with Triton installed, and on CPU under Triton's interpreter
    (``TRITON_INTERPRET=1`` in the environment).
    """
    device = torch.device(device)
    if not triton_available():
        return "it needs the triton package (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"its kernels run on CUDA (or on CPU under TRITON_INTERPRET=1, for tests), not on {device}"


@dataclass(frozen=True, eq=False)
class TritonDenseWeight:
    """A dense ``[N, K]`` linear weight whose few-row decode products run the Triton GEMV.

    Satisfies :class:`stagewise.engine.layers.QuantizedLinear` (a ``linear`` method), so the layer
    functions take it in place of the tensor. The tensor is held, not copied.

    Attributes:
        weight: ``[N, K]`` contiguous, bf16 / fp16 / fp32, on CUDA (or CPU under the interpreter).

    Frozen and hashed by identity, like :class:`~stagewise.engine.quant.QuantizedWeight`:
    ``torch.compile`` guards on the tensor's metadata, so one compiled layer function serves every
    layer's weights of the same shape.

    Raises:
        ValueError: ``weight`` not a 2-D contiguous tensor of a dtype in :data:`DENSE_DTYPES`, or the
            GEMV cannot run on its device (:func:`triton_gemv_usable`).
    """

    weight: torch.Tensor

    def __post_init__(self) -> None:
        w = self.weight
        if not isinstance(w, torch.Tensor) or w.ndim != 2 or min(w.shape) < 1:
            raise ValueError(f"TritonDenseWeight: weight must be a 2-D [N, K] tensor, got {getattr(w, 'shape', type(w).__name__)}")
        if w.dtype not in DENSE_DTYPES:
            raise ValueError(f"TritonDenseWeight: weight dtype must be bf16, fp16 or fp32, got {w.dtype}")
        if not w.is_contiguous():
            raise ValueError("TritonDenseWeight: weight must be contiguous (the kernel reads rows of K elements)")
        why = triton_gemv_usable(w.device)
        if why is not None:
            raise ValueError(f"TritonDenseWeight: the Triton GEMV cannot run here: {why}")
        ensure_triton()  # register the ops now: torch.compile cannot import them mid-trace

    # -- facts: what the engine and its cost model read from a weight ------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, K)``: out x in features."""
        return (int(self.weight.shape[0]), int(self.weight.shape[1]))

    @property
    def dtype(self) -> torch.dtype:
        """The weight's dtype (bf16, fp16 or fp32); the GEMV accumulates in fp32."""
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        """The weight's device (CUDA; CPU only under Triton's interpreter)."""
        return self.weight.device

    @property
    def nbytes(self) -> int:
        """Bytes one use streams from memory: the whole weight (``N K`` x element size)."""
        return self.weight.numel() * self.weight.element_size()

    # -- math --------------------------------------------------------------------------------------

    def uses_gemv(self, rows: int, *, decode: bool) -> bool:
        """Whether :meth:`linear` runs the Triton GEMV for ``rows`` rows of x (decode and
        ``1 <= rows <= GEMV_MAX_M``); otherwise it runs ``F.linear`` (cuBLAS on CUDA)."""
        return decode and 1 <= rows <= GEMV_MAX_M

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None, *, decode: bool) -> torch.Tensor:
        """``x @ W^T (+ bias)``.

        Args:
            x: ``[..., K]`` activations (bf16 / fp16 / fp32); the result has x's dtype.
            bias: ``[N]`` or ``None``, added after the product (as the dense path of
                :func:`stagewise.engine.layers.linear`).
            decode: ``True`` for a decode / verify step: with at most ``GEMV_MAX_M`` rows the
                Triton GEMV (fp32 accumulation, deterministic); more rows, or ``False`` (prefill),
                ``F.linear`` on the same tensor.

        Returns:
            ``[..., N]``.

        Raises:
            ValueError: x's last dimension is not K.
        """
        N, K = self.shape
        if x.shape[-1] != K:
            raise ValueError(f"TritonDenseWeight.linear: x must be [..., {K}], got {list(x.shape)}")
        x2 = x.reshape(-1, K)
        M = x2.shape[0]
        if self.uses_gemv(M, decode=decode):
            if not torch.compiler.is_compiling():
                ensure_triton()
            block_n, block_k, num_warps, num_stages = dense_gemv_config(N, K, M, self.weight.dtype)
            y = torch.ops.stagewise.dense_gemv(x2.contiguous(), self.weight, block_n=block_n, block_k=block_k,
                                               num_warps=num_warps, num_stages=num_stages)
            y = y.view(*x.shape[:-1], N)
        else:
            y = F.linear(x, self.weight)
        return y if bias is None else y + bias
