"""Weight-only quantization for the fast decode engine: formats, kernels, and a weight cache.

Why: at batch 1 a decode step streams every weight once, so its floor is weight bytes / HBM
bandwidth (LLaMA-7B: 13.5 GB in bf16, ~4.5 ms at 3 TB/s). Storing the linear layers' weights
in 8 or 4 bits (activations stay bf16) cuts the bytes to ~1/2 or ~1/4, if the kernels stream
the packed codes once and dequantize in registers.

Formats (``W [N, K]`` = out x in features, as ``nn.Linear.weight``):

========  =====================  ==============================  =========================
kind      data                   scales                          w = ...
========  =====================  ==============================  =========================
int8      ``[N, K]`` int8         ``scale [N]`` fp32               ``q * scale[n]``,
          symmetric, q in         (``amax(|W[n]|) / 127``)         |error| <= scale / 2
          -127..127
int4      ``[N, K/2]`` uint8      ``scale, zero [N, K/G]`` fp16    ``q * scale + zero``,
          asymmetric, q in        (``zero`` <= group min,          |error| <= scale / 2
          0..15, k=2j low         ``scale`` >= (max-zero)/15,
          nibble, 2j+1 high       both rounded outward to fp16)
fp8       ``[N, K]`` e4m3fn       ``scale [N]`` fp32               ``q * scale[n]``,
                                  (``amax(|W[n]|) / 448``)         rel. error <= 2^-4
========  =====================  ==============================  =========================

int4 is asymmetric (min/max, 16 levels) like gpt-fast's and torchao's int4 weight-only (tinygemm),
so the bytes streamed are the same as theirs (0.5 B per weight + 4 B per group of G); fp16 rather
than bf16 for the group parameters because they carry 3 more mantissa bits at the same cost.
Per-channel kinds keep fp32 scales (4 B per row: negligible).

Kernels (:meth:`QuantizedWeight.linear`): ``decode=True`` is the memory-bound path (M = 1..16
rows: a decode step's batch, or the k+1 rows of a speculative verify step); ``decode=False`` is
prefill (M = hundreds). Candidates, chosen per weight by ``decode_impl`` / ``prefill_impl``:

* ``"dequant"``: dequantize to the activation dtype, then ``F.linear`` (cuBLAS). The reference
  and the CPU path. For prefill it reads the codes and writes and re-reads a bf16 copy of each
  weight: 2.5-3 B per weight, i.e. an estimated (not measured) 5.5-6.6 ms per 7B prefill at
  3 TB/s against a budget of 2.8 ms (20 % of bf16's 13.9 ms) -- hence the Triton GEMM.
* ``"torch"`` (decode): the engine's ``matvec`` formulation with the dequantization inside the
  multiply-and-sum; under ``torch.compile`` Inductor emits one reduction kernel that streams the
  packed codes once. Eagerly it would materialize ``[M, N, K]`` products, so outside
  ``torch.compile`` it runs ``"dequant"`` instead (see :meth:`QuantizedWeight.effective_impl`).
* ``"triton"``: the kernels of :mod:`stagewise.engine.quant_triton` (few-row GEMV for
  ``M <= GEMV_MAX_M``, a fused-dequantization tensor-core GEMM otherwise and for prefill),
  registered as ``torch.library.triton_op`` so ``torch.compile(fullgraph=True)`` traces them.
* ``"scaled_mm"`` (fp8 prefill, CUDA): ``torch._scaled_mm`` with row-wise scales; the
  activations are quantized to e4m3 per row on the fly, so it is NOT weight-only numerics.

All candidates are deterministic (no atomics, no split-K) and capturable in CUDA graphs (no
host sync; allocations depend on shapes only). Which is fastest on the H100 is measured by
``benchmarks/quant_kernels.py``; the defaults (``"torch"`` / ``"dequant"``) are the ones that
need no Triton, not a measured choice.

Cache: :func:`save_quantized` / :func:`load_quantized` store a dict of weights in one
safetensors file with the source weights' :func:`weights_fingerprint`, so a stale cache is
refused; :func:`quantize_cached` is the load-or-quantize-and-save step for ``--quantized-cache``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from stagewise.errors import InputError

KINDS = ("int8", "int4", "fp8")
DECODE_IMPLS = ("dequant", "torch", "triton")
PREFILL_IMPLS = ("dequant", "triton", "scaled_mm")
DEFAULT_GROUP_SIZE = 128

INT8_QMAX = 127  # symmetric: codes -127..127 (-128 unused, so +-amax are both exact)
INT4_LEVELS = 15  # asymmetric: codes 0..15
FP8_MAX = 448.0  # largest finite float8_e4m3fn (torch.finfo(torch.float8_e4m3fn).max)
FP16_MAX = 65504.0  # largest finite fp16: the int4 scale / zero storage

# Decode with at most this many rows uses the GEMV kernel; more rows use the tensor-core GEMM.
# A default, not a measurement: benchmarks/quant_kernels.py times both at M = 1, 5, 16.
GEMV_MAX_M = 4

CACHE_FORMAT = "stagewise.quant/1"


# ----------------------------------------------------------------------------------------------
# The weight


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A weight-only quantized ``[N, K]`` linear weight (in place of a bf16 tensor).

    Attributes:
        kind: ``"int8"``, ``"int4"`` or ``"fp8"`` (formats in the module docstring).
        shape: ``(N, K)``, out x in features of the original weight.
        data: the codes: int8 ``[N, K]`` int8; int4 ``[N, K/2]`` uint8 (element ``k = 2j`` in
            the low nibble of byte ``j``, ``2j + 1`` in the high one); fp8 ``[N, K]``
            float8_e4m3fn.
        scale: int8 / fp8 ``[N]`` fp32; int4 ``[N, K/G]`` fp16.
        zero: int4 ``[N, K/G]`` fp16, the value of code 0 (``w = q * scale + zero``); else
            ``None``.
        group_size: int4 ``G`` (a power of two dividing K); ``None`` for per-channel kinds.
        decode_impl: kernel for ``linear(..., decode=True)``: one of :data:`DECODE_IMPLS`.
        prefill_impl: kernel for ``linear(..., decode=False)``: one of :data:`PREFILL_IMPLS`.

    Construct with :func:`quantize_weight` (or :func:`load_quantized`); change kernels with
    :meth:`with_impl`. Frozen and hashed by identity: ``torch.compile`` guards on the
    attributes a compiled function reads (the tensors' metadata, the strings and ints), so one
    compiled layer function serves every layer's weights.

    Raises:
        ValueError: inconsistent fields (dtype, shape, device), an unknown kind or kernel, or
            ``"triton"`` requested while Triton cannot be imported.
    """

    kind: str
    shape: tuple[int, int]
    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    group_size: int | None = None
    decode_impl: str = "torch"
    prefill_impl: str = "dequant"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"QuantizedWeight.kind: unknown kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise ValueError(f"QuantizedWeight.shape: must be (N, K) with N, K >= 1, got {self.shape}")
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))
        N, K = self.shape
        if self.kind == "int4":
            G = self.group_size
            _check_group(G, K, "QuantizedWeight.group_size")
            want = {"data": ((N, K // 2), torch.uint8), "scale": ((N, K // G), torch.float16),
                    "zero": ((N, K // G), torch.float16)}
        else:
            if self.group_size is not None:
                raise ValueError(f"QuantizedWeight.group_size: must be None for per-channel {self.kind}")
            code = torch.int8 if self.kind == "int8" else torch.float8_e4m3fn
            want = {"data": ((N, K), code), "scale": ((N,), torch.float32)}
            if self.zero is not None:
                raise ValueError(f"QuantizedWeight.zero: must be None for {self.kind}")
        for name, (shape, dtype) in want.items():
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
                got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"QuantizedWeight.{name}: {self.kind} needs {shape} {dtype}, got {got}")
            if not t.is_contiguous():
                raise ValueError(f"QuantizedWeight.{name}: must be contiguous")
            if t.device != self.data.device:
                raise ValueError(f"QuantizedWeight.{name}: on {t.device}, data on {self.data.device}")
        if self.decode_impl not in DECODE_IMPLS:
            raise ValueError(f"QuantizedWeight.decode_impl: {self.decode_impl!r} is not one of {', '.join(DECODE_IMPLS)}")
        if self.prefill_impl not in PREFILL_IMPLS:
            raise ValueError(f"QuantizedWeight.prefill_impl: {self.prefill_impl!r} is not one of {', '.join(PREFILL_IMPLS)}")
        if self.prefill_impl == "scaled_mm" and self.kind != "fp8":
            raise ValueError(f"QuantizedWeight.prefill_impl: 'scaled_mm' needs fp8 weights, not {self.kind}")
        if "triton" in (self.decode_impl, self.prefill_impl):
            ensure_triton()  # register the ops now: torch.compile cannot import them mid-trace

    # -- facts ------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes one use streams from memory: codes + scales (+ zeros). Equals
        :func:`quantized_nbytes` of the same shape and kind."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero) if t is not None)

    def with_impl(self, *, decode: str | None = None, prefill: str | None = None) -> QuantizedWeight:
        """The same weight (tensors shared, not copied) with other kernels."""
        return dataclasses.replace(
            self, decode_impl=decode or self.decode_impl, prefill_impl=prefill or self.prefill_impl
        )

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """A copy on ``device`` (tensors moved; kernels kept)."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(self, data=mv(self.data), scale=mv(self.scale), zero=mv(self.zero))

    # -- math -------------------------------------------------------------------------------

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the codes stand for: ``[N, K]`` in ``dtype`` (computed in fp32, rounded once)."""
        N, K = self.shape
        if self.kind == "int4":
            G = self.group_size
            q = unpack_int4(self.data).float().view(N, K // G, G)  # [N, K/G, G]
            w = q * self.scale.float()[..., None] + self.zero.float()[..., None]
            return w.view(N, K).to(dtype)
        return (self.data.float() * self.scale[:, None]).to(dtype)

    def effective_impl(self, device: torch.device | str, *, decode: bool, compiling: bool) -> str:
        """The kernel :meth:`linear` runs for activations on ``device`` (what a run should record).

        Not CUDA: ``"dequant"`` (the CPU path). CUDA: ``decode_impl`` / ``prefill_impl``, except
        that ``"torch"`` outside ``torch.compile`` runs ``"dequant"`` (eagerly the fused
        formulation would materialize ``[M, N, K]`` products).
        """
        if torch.device(device).type != "cuda":
            return "dequant"
        if not decode:
            if self.prefill_impl == "scaled_mm" and (self.shape[0] % 16 or self.shape[1] % 16):
                return "dequant"  # _scaled_mm needs both dims of the weight divisible by 16 (LM head: 32001 rows)
            return self.prefill_impl
        if self.decode_impl == "torch" and not compiling:
            return "dequant"
        return self.decode_impl

    def linear(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, *, decode: bool, impl: str | None = None
    ) -> torch.Tensor:
        """``x @ W^T (+ bias)`` with ``W`` the dequantized weight.

        Args:
            x: ``[..., K]`` activations (bf16 / fp16 / fp32); the result has x's dtype.
            bias: ``[N]`` or ``None``, added in x's dtype.
            decode: ``True`` for the memory-bound path (few rows: a decode or verify step),
                ``False`` for prefill.
            impl: run this kernel instead of :meth:`effective_impl`'s choice (tests and
                benchmarks; one of :data:`DECODE_IMPLS` / :data:`PREFILL_IMPLS`).

        Returns:
            ``[..., N]``.

        Raises:
            ValueError: ``x``'s last dim is not K, or ``impl`` is unknown / unusable here.
        """
        N, K = self.shape
        if x.shape[-1] != K:
            raise ValueError(f"QuantizedWeight.linear: x must be [..., {K}], got {list(x.shape)}")
        if impl is None:
            impl = self.effective_impl(x.device, decode=decode, compiling=torch.compiler.is_compiling())
        lead = x.shape[:-1]
        if impl == "dequant":
            y = F.linear(x, self.dequantize(x.dtype))
        else:
            x2 = x.reshape(-1, K)
            if impl == "torch":
                y2 = matvec_torch(x2, self)
            elif impl == "triton":
                y2 = triton_linear(x2.contiguous(), self, decode=decode)
            elif impl == "scaled_mm":
                y2 = scaled_mm_fp8(x2, self)
            else:
                raise ValueError(f"QuantizedWeight.linear: unknown impl {impl!r}")
            y = y2.view(*lead, N)
        return y if bias is None else y + bias.to(y.dtype)


# ----------------------------------------------------------------------------------------------
# Quantization


def quantize_weight(
    w: torch.Tensor,
    kind: str,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    decode_impl: str = "torch",
    prefill_impl: str = "dequant",
) -> QuantizedWeight:
    """Quantize a ``[N, K]`` floating weight (on its own device; deterministic).

    int8: symmetric per output channel, ``scale = amax(|W[n]|) / 127`` (fp32),
    ``q = round(w / scale)`` (half to even). Round-trip: ``|w - q scale| <= scale (1/2 + 2^-15)``
    (1/2 from rounding, the rest fp32 rounding of ``w / scale`` and ``q * scale``).

    int4: asymmetric per group of ``group_size`` along K. ``zero`` = the group minimum rounded
    DOWN to fp16, ``scale`` = ``(max - zero) / 15`` rounded UP to fp16, so every code
    ``round((w - zero) / scale)`` lies in 0..15 without clamping and
    ``|w - (q scale + zero)| <= scale (1/2 + 2^-18) + 2^-23 |w|`` (the extra terms: fp32
    rounding of the subtraction, division and final add).

    fp8: e4m3fn codes with a per-channel fp32 ``scale = amax(|W[n]|) / 448`` (the row maximum
    maps to +-448). Round-trip (e4m3 has 3 mantissa bits, round to nearest even): for
    ``|w| >= 2^-6 scale`` (normal codes) ``|w - deq| <= (2^-4 + 2^-20) |w|``; below that
    (subnormal codes, step ``2^-9 scale``) ``|w - deq| <= 2^-10 scale (1 + 2^-10)``, values under
    ``2^-10 scale`` become 0; zeros stay exactly 0.

    A row (int8, fp8) or group (int4) of zeros gets ``scale = 0`` and dequantizes to exact 0.

    Args:
        w: ``[N, K]`` float tensor (any float dtype; quantized from its fp32 value).
        kind: one of :data:`KINDS`.
        group_size: int4 group size G: a power of two >= 2 dividing K (ignored otherwise).
        decode_impl, prefill_impl: the kernels :meth:`QuantizedWeight.linear` will use.

    Raises:
        ValueError: unknown kind, ``w`` not a 2-D float tensor, non-finite values, a bad group
            size, int4 values beyond fp16 range, or fp8 on a CUDA device without fp8 support
            (compute capability < 8.9).
    """
    if kind not in KINDS:
        raise ValueError(f"quantize_weight: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not isinstance(w, torch.Tensor) or w.ndim != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_weight: w must be a 2-D float tensor [N, K], got {getattr(w, 'shape', type(w))}")
    N, K = w.shape
    wf = w.detach().float()
    if not bool(torch.isfinite(wf).all()):
        raise ValueError("quantize_weight: w has non-finite values (inf / nan)")
    impls = {"decode_impl": decode_impl, "prefill_impl": prefill_impl}
    if kind == "int8":
        scale = wf.abs().amax(dim=1) / INT8_QMAX  # [N]
        q = (wf / _nonzero(scale)[:, None]).round_().clamp_(-INT8_QMAX, INT8_QMAX).to(torch.int8)
        return QuantizedWeight("int8", (N, K), q.contiguous(), scale.contiguous(), **impls)
    if kind == "fp8":
        if not fp8_supported(w.device):
            raise ValueError(
                f"quantize_weight: fp8 needs a GPU with compute capability >= 8.9 (Ada / Hopper); {w.device} has not"
            )
        scale = wf.abs().amax(dim=1) / FP8_MAX  # [N]
        q = (wf / _nonzero(scale)[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return QuantizedWeight("fp8", (N, K), q.contiguous(), scale.contiguous(), **impls)
    # int4
    _check_group(group_size, K, "quantize_weight: group_size")
    if float(wf.abs().max()) > FP16_MAX:
        raise ValueError(f"quantize_weight: int4 stores fp16 group parameters; |w| must be <= {FP16_MAX}")
    G = group_size
    wg = wf.view(N, K // G, G)  # [N, K/G, G]
    zero = _fp16_round_down(wg.amin(dim=-1))  # [N, K/G] fp16, <= group min
    span = wg.amax(dim=-1) - zero.float()  # >= 0
    scale = _fp16_round_up(span / INT4_LEVELS)  # [N, K/G] fp16, 15 * scale >= span
    s = scale.float()[..., None]
    q = ((wg - zero.float()[..., None]) / _nonzero(s)).round_().clamp_(0, INT4_LEVELS).to(torch.uint8)
    return QuantizedWeight(
        "int4", (N, K), pack_int4(q.view(N, K)), scale.contiguous(), zero.contiguous(), group_size=G, **impls
    )


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` codes 0..15 (any int dtype) -> ``[N, K/2]`` uint8, ``k = 2j`` in the low nibble."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """``[N, K/2]`` uint8 -> ``[N, K]`` uint8 codes 0..15 (inverse of :func:`pack_int4`)."""
    N = p.shape[0]
    return torch.stack((p & 15, p >> 4), dim=-1).view(N, -1)


def quantized_nbytes(n: int, k: int, kind: str, group_size: int | None = DEFAULT_GROUP_SIZE) -> int:
    """Bytes a ``[n, k]`` weight streams per use in format ``kind``.

    ``"none"``/``"bf16"``: ``2 n k``; int8 / fp8: ``n k + 4 n``; int4: ``n k / 2 + 4 n k / G``
    (fp16 scale and zero per group).

    Raises:
        ValueError: unknown kind or bad group size.
    """
    if kind in ("none", "bf16"):
        return 2 * n * k
    if kind in ("int8", "fp8"):
        return n * k + 4 * n
    if kind == "int4":
        _check_group(group_size, k, "quantized_nbytes: group_size")
        return n * k // 2 + 4 * n * (k // group_size)
    raise ValueError(f"quantized_nbytes: unknown kind {kind!r}")


def streamed_bytes(weights: Iterable[Any]) -> int:
    """Total bytes of a collection of weights as one use streams them (``None`` entries skipped):
    a tensor's ``numel x element size``; any other weight's ``nbytes`` (:class:`QuantizedWeight`,
    :class:`stagewise.engine.dense.TritonDenseWeight`)."""
    total = 0
    for w in weights:
        if isinstance(w, torch.Tensor):
            total += w.numel() * w.element_size()
        elif w is not None:
            total += w.nbytes
    return total


def fp8_supported(device: torch.device | str) -> bool:
    """Whether fp8 weights can be used on ``device``: CPU (torch converts e4m3fn in software) or
    a CUDA GPU of compute capability >= 8.9 (e4m3 conversion and fp8 tensor cores)."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return False


def _check_group(G: int | None, K: int, field: str) -> None:
    if not isinstance(G, int) or G < 2 or G & (G - 1):
        raise ValueError(f"{field}: must be a power of two >= 2, got {G!r}")
    if K % G:
        raise ValueError(f"{field}: {G} does not divide K = {K}")


def _nonzero(s: torch.Tensor) -> torch.Tensor:
    """``s`` with zeros replaced by 1 (a zero scale belongs to an all-zero row/group: code 0)."""
    return torch.where(s > 0, s, torch.ones_like(s))


def _fp16_round_up(v: torch.Tensor) -> torch.Tensor:
    """fp32 ``v >= 0`` -> the smallest fp16 ``h >= v`` (bit arithmetic: works on any device)."""
    h = v.half()
    bits = h.view(torch.int16)
    bits = torch.where(h.float() < v, bits + 1, bits)  # non-negative: next bit pattern is next value up
    return bits.view(torch.float16)


def _fp16_round_down(v: torch.Tensor) -> torch.Tensor:
    """fp32 ``v`` -> the largest fp16 ``h <= v`` (bit arithmetic: works on any device)."""
    h = v.half()
    bits = h.view(torch.int16)
    down = torch.where(h > 0, bits - 1, torch.where(h == 0, torch.full_like(bits, -32767), bits + 1))
    bits = torch.where(h.float() > v, down, bits)  # -32767 = 0x8001: -2^-24, just below 0
    return bits.view(torch.float16)


# ----------------------------------------------------------------------------------------------
# Kernels


def matvec_torch(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """``x @ W^T`` as one multiply-and-sum with the dequantization inside (``"torch"`` decode).

    Under ``torch.compile`` Inductor turns it into one reduction kernel per projection that
    streams the codes once (as the engine's bf16 ``matvec``); eagerly it materializes the
    ``[M, N, K]`` products (fine for tests on tiny shapes only).

    Args:
        x: ``[M, K]``; w: the weight. Returns ``[M, N]`` in x's dtype (fp32 accumulation).
    """
    N, K = w.shape
    M = x.shape[0]
    xf = x.float()
    if w.kind == "int4":
        G = w.group_size
        p = w.data.view(N, K // G, G // 2)  # [N, K/G, G/2] bytes
        s = w.scale.float()[..., None]  # [N, K/G, 1]
        z = w.zero.float()[..., None]
        xp = xf.view(M, 1, K // G, G // 2, 2)  # even / odd k of each byte
        even = xp[..., 0] * ((p & 15).float() * s + z)  # [M, N, K/G, G/2]
        odd = xp[..., 1] * ((p >> 4).float() * s + z)
        y = (even + odd).sum((-1, -2))
    else:
        y = (xf.unsqueeze(-2) * w.data.float()).sum(-1) * w.scale  # [M, N]
    return y.to(x.dtype)


@dataclass(frozen=True)
class TritonConfig:
    """Launch parameters of one Triton kernel (``block_m`` unused by the GEMV)."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    block_m: int = 16
    group_m: int = 8

    def __post_init__(self) -> None:
        for f in ("block_n", "block_k", "num_warps", "block_m"):
            v = getattr(self, f)
            if v < 1 or v & (v - 1):
                raise ValueError(f"TritonConfig.{f}: must be a power of two, got {v}")
        if self.num_stages < 1 or self.group_m < 1:
            raise ValueError("TritonConfig: num_stages and group_m must be >= 1")


# (kind, path, N, K) -> config, path in {"gemv", "gemm_decode", "gemm_prefill"}; filled from the
# output of ``benchmarks/quant_kernels.py --sweep`` (empty: the defaults of triton_config apply).
TRITON_CONFIGS: dict[tuple[str, str, int, int], TritonConfig] = {}


def triton_config(kind: str, path: str, n: int, k: int, m: int, dtype: torch.dtype) -> TritonConfig:
    """Launch parameters for ``path`` (``"gemv"``, ``"gemm_decode"``, ``"gemm_prefill"``).

    Read when ``torch.compile`` traces the caller (change :data:`TRITON_CONFIGS` or
    :data:`GEMV_MAX_M` before compiling). An entry of :data:`TRITON_CONFIGS` wins; otherwise
    defaults reasoned from the H100, not measured: GEMV 8 rows x 512 bytes of codes per program per step (a 4096-row weight is then
    512 programs, ~4 per SM of 132); decode GEMM 16 x 32 tiles (at M <= 16 the MMA is idle
    anyway: the tile count is what matters); prefill GEMM 128 x 128 x 64 tiles, 8 warps.
    """
    cfg = TRITON_CONFIGS.get((kind, path, n, k))
    if cfg is not None:
        return cfg
    if path == "gemv":
        return TritonConfig(block_n=8, block_k=1024 if kind == "int4" else 512, num_warps=4, num_stages=2)
    fp32 = dtype == torch.float32  # twice the shared memory per A tile
    if path == "gemm_decode":
        bm = min(64, max(16, 1 << max(m - 1, 0).bit_length()))
        return TritonConfig(block_m=bm, block_n=32, block_k=64 if fp32 else 128, num_warps=4, num_stages=3)
    if path == "gemm_prefill":
        return TritonConfig(block_m=128, block_n=128, block_k=32 if fp32 else 64, num_warps=8,
                            num_stages=2 if fp32 else 3, group_m=8)
    raise ValueError(f"triton_config: unknown path {path!r}")


_TRITON_READY = False


def triton_available() -> bool:
    """Whether Triton can be imported (the ``"triton"`` kernels are usable)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def ensure_triton() -> None:
    """Import :mod:`stagewise.engine.quant_triton` (registers ``torch.ops.stagewise.wq_gemv`` /
    ``wq_gemm`` / ``dense_gemv``). Call before ``torch.compile`` traces a ``"triton"`` weight
    (constructing one, quantized or :class:`~stagewise.engine.dense.TritonDenseWeight`, does it). Under ``TRITON_INTERPRET=1``, set the variable before the first call.

    Raises:
        ValueError: Triton is not installed.
    """
    global _TRITON_READY
    if _TRITON_READY:
        return
    if not triton_available():
        raise ValueError("quant: the 'triton' kernels need the triton package (pip install triton)")
    import stagewise.engine.quant_triton  # noqa: F401  (registers the ops)

    _TRITON_READY = True


def triton_linear(x: torch.Tensor, w: QuantizedWeight, *, decode: bool) -> torch.Tensor:
    """``x @ W^T`` through the Triton kernels. ``x [M, K]`` contiguous -> ``[M, N]`` in x's dtype.

    ``decode`` and ``M <= GEMV_MAX_M``: the GEMV; ``decode``: the GEMM with decode tiles;
    otherwise the GEMM with prefill tiles.

    Raises:
        ValueError: int4 with a group size < 16 (``tl.dot`` needs K tiles of >= 16) on the GEMM path.
    """
    if not torch.compiler.is_compiling():
        ensure_triton()
    N, K = w.shape
    M = x.shape[0]
    G = w.group_size or 0
    path = triton_path(M, decode=decode)
    if path != "gemv" and w.kind == "int4" and G < 16:
        raise ValueError(f"quant: the Triton GEMM needs int4 group_size >= 16, got {G}")
    return triton_call(x, w, path, triton_config(w.kind, path, N, K, M, x.dtype))


def triton_path(m: int, *, decode: bool) -> str:
    """Which Triton kernel :func:`triton_linear` runs for ``m`` rows: ``"gemv"`` (decode,
    ``m <= GEMV_MAX_M``), ``"gemm_decode"`` (other decode) or ``"gemm_prefill"``."""
    if not decode:
        return "gemm_prefill"
    return "gemv" if m <= GEMV_MAX_M else "gemm_decode"


def triton_call(x: torch.Tensor, w: QuantizedWeight, path: str, cfg: TritonConfig) -> torch.Tensor:
    """Launch the Triton kernel of ``path`` with ``cfg`` (no dispatch). ``x [M, K]`` contiguous."""
    G = w.group_size or 0
    if path == "gemv":
        return torch.ops.stagewise.wq_gemv(
            x, w.data, w.scale, w.zero, kind=w.kind, group_size=G, block_n=cfg.block_n, block_k=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return torch.ops.stagewise.wq_gemm(
        x, w.data, w.scale, w.zero, kind=w.kind, group_size=G, block_m=cfg.block_m, block_n=cfg.block_n,
        block_k=cfg.block_k, group_m=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def scaled_mm_fp8(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """fp8 prefill on fp8 tensor cores: ``torch._scaled_mm`` with row-wise scales.

    The activations are quantized per row on the fly (``x ~ a * sa``, ``sa = amax(|x_m|) / 448``,
    ``a`` e4m3), so the result is ``(a @ q^T) * sa * scale`` -- W8A8 numerics, not weight-only.
    ``x [M, K]`` bf16 on CUDA -> ``[M, N]`` bf16.

    Raises:
        ValueError: not fp8 weights, not a bf16 CUDA tensor.
    """
    if w.kind != "fp8" or x.device.type != "cuda" or x.dtype != torch.bfloat16:
        raise ValueError("quant: 'scaled_mm' needs fp8 weights and bf16 activations on CUDA")
    xf = x.float()
    sa = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_(min=1e-12)  # [M, 1] fp32
    a = (xf / sa).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)  # [M, K] row-major
    return torch._scaled_mm(a, w.data.t(), scale_a=sa, scale_b=w.scale.view(1, -1), out_dtype=x.dtype)


# ----------------------------------------------------------------------------------------------
# Cache


def weights_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """A fingerprint (hex sha256) of source weights, to tell a stale quantized cache.

    Covers, per tensor (sorted by name): name, dtype, shape, the exact int64 sum of its raw
    element bits (computed on the tensor's device: one read; integer, so order independent) and
    the raw bytes of up to 4096 evenly spaced elements (integer index arithmetic), so the same
    weights give the same fingerprint on CPU and GPU. A different checkpoint,
    seed, dtype or shape changes it; it is not a digest of every byte (an edit that keeps the
    bit sum and misses the sampled positions would pass).
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.reshape(-1)
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        bits = flat.view(ints) if t.dtype != torch.bool else flat.to(torch.uint8)
        h.update(str(int(bits.sum(dtype=torch.int64))).encode())
        n, m = flat.numel(), min(flat.numel(), 4096)
        idx = torch.arange(m, dtype=torch.int64) * max(n - 1, 0) // max(m - 1, 1)  # exact: same on any device
        h.update(bits[idx.to(t.device)].cpu().numpy().tobytes())
    return h.hexdigest()


def save_quantized(path: str | Path, weights: Mapping[str, QuantizedWeight], meta: Mapping[str, str]) -> Path:
    """Write ``weights`` to one safetensors file (written to a temporary name, then renamed).

    Args:
        path: the file.
        weights: name -> weight (the kernels, ``decode_impl`` / ``prefill_impl``, are not stored).
        meta: string metadata; must contain ``"fingerprint"`` (:func:`weights_fingerprint` of
            the source weights). ``kind`` and ``group_size`` are added from the weights.

    Returns:
        The path written.

    Raises:
        ValueError: no ``fingerprint`` in ``meta``, non-string metadata, mixed kinds or group sizes.
    """
    from safetensors.torch import save_file

    if "fingerprint" not in meta:
        raise ValueError("save_quantized: meta must contain 'fingerprint' (weights_fingerprint of the source)")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError("save_quantized: meta keys and values must be strings")
    kinds = {w.kind for w in weights.values()}
    groups = {w.group_size for w in weights.values()}
    if len(kinds) > 1 or len(groups) > 1:
        raise ValueError(f"save_quantized: one kind and group size per file, got {sorted(kinds)} / {groups}")
    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, Any] = {}
    for name, w in weights.items():
        index[name] = {"kind": w.kind, "shape": list(w.shape), "group_size": w.group_size}
        for field in ("data", "scale", "zero"):
            t = getattr(w, field)
            if t is not None:
                tensors[f"{name}:{field}"] = t.detach().cpu().contiguous()
    header = dict(meta)
    header.update({
        "format": CACHE_FORMAT,
        "kind": next(iter(kinds), ""),
        "group_size": str(next(iter(groups), None)),
        "index": json.dumps(index),
    })
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    os.replace(tmp, path)
    return path


def read_quantized_meta(path: str | Path) -> dict[str, str]:
    """The metadata of a quantized cache file (without loading its tensors).

    Raises:
        InputError: the file is missing, not safetensors, or not a stagewise quantized cache.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "quantized cache file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise InputError(path, f"not a readable safetensors file ({type(e).__name__}: {e})") from None
    if meta.get("format") != CACHE_FORMAT:
        raise InputError(path, f"not a stagewise quantized cache (format {meta.get('format')!r}, want {CACHE_FORMAT!r})")
    return meta


def load_quantized(
    path: str | Path,
    device: torch.device | str,
    *,
    fingerprint: str | None = None,
    kind: str | None = None,
    group_size: int | None = None,
    decode_impl: str = "torch",
    prefill_impl: str = "dequant",
) -> dict[str, QuantizedWeight]:
    """Load a file written by :func:`save_quantized` onto ``device``.

    Args:
        fingerprint: if given, the source weights' :func:`weights_fingerprint`; a cache made
            from other weights is refused.
        kind, group_size: if given, what the run asks for; a cache of another format is refused.
        decode_impl, prefill_impl: kernels of the returned weights.

    Raises:
        InputError: missing / unreadable / foreign file, a stale fingerprint, another kind or
            group size, or inconsistent tensors (one line naming the file and the problem).
    """
    from safetensors import safe_open

    path = Path(path)
    meta = read_quantized_meta(path)
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise InputError(
            path,
            f"stale quantized cache: made from other weights (fingerprint {meta.get('fingerprint', '')[:12]}..., "
            f"these weights {fingerprint[:12]}...); delete it or choose another --quantized-cache",
        )
    if kind is not None and meta["kind"] != kind:
        raise InputError(path, f"quantized cache holds {meta['kind']} weights, this run asks for {kind}")
    if kind == "int4" and group_size is not None and meta["group_size"] != str(group_size):
        raise InputError(path, f"quantized cache has group size {meta['group_size']}, this run asks for {group_size}")
    index = json.loads(meta["index"])
    out: dict[str, QuantizedWeight] = {}
    with safe_open(str(path), framework="pt", device=str(torch.device(device))) as f:
        keys = set(f.keys())
        for name, info in index.items():
            get = lambda field: f.get_tensor(f"{name}:{field}") if f"{name}:{field}" in keys else None  # noqa: E731
            try:
                out[name] = QuantizedWeight(
                    info["kind"], tuple(info["shape"]), get("data"), get("scale"), get("zero"),
                    group_size=info["group_size"], decode_impl=decode_impl, prefill_impl=prefill_impl,
                )
            except ValueError as e:
                raise InputError(path, f"weight {name!r} is inconsistent: {e}") from None
    return out


def quantize_cached(
    weights: Mapping[str, torch.Tensor],
    kind: str,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    cache_dir: str | Path | None = None,
    decode_impl: str = "torch",
    prefill_impl: str = "dequant",
) -> tuple[dict[str, QuantizedWeight], dict[str, Any]]:
    """Quantize ``weights`` (name -> ``[N, K]``), or load them from ``cache_dir`` when a cache of
    the same source fingerprint, kind and group size is there (then write it if it was not).

    The file is ``<cache_dir>/<fingerprint[:16]>-<kind>[-g<G>].safetensors``, so caches of other
    weights or formats never collide.

    Returns:
        ``(quantized weights on the source device, info)`` with info ``{"kind", "group_size"
        (None for per-channel), "fingerprint", "cache_path" (or None), "loaded_from_cache"
        (bool), "bytes" (streamed per use, all weights)}`` -- what was applied, for the record.
    """
    if not weights:
        raise ValueError("quantize_cached: no weights given")
    device = next(iter(weights.values())).device
    fp = weights_fingerprint(weights)
    G = group_size if kind == "int4" else None
    path = None
    out = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{fp[:16]}-{kind}{f'-g{G}' if G else ''}.safetensors"
        if path.is_file():
            out = load_quantized(path, device, fingerprint=fp, kind=kind, group_size=G,
                                 decode_impl=decode_impl, prefill_impl=prefill_impl)
    loaded = out is not None
    if out is None:
        out = {name: quantize_weight(w, kind, group_size=group_size, decode_impl=decode_impl, prefill_impl=prefill_impl)
               for name, w in weights.items()}
        if path is not None:
            save_quantized(path, out, {"fingerprint": fp})
    info = {"kind": kind, "group_size": G, "fingerprint": fp, "cache_path": None if path is None else str(path),
            "loaded_from_cache": loaded, "bytes": streamed_bytes(out.values())}
    return out, info


@dataclasses.dataclass(frozen=True)
class QuantOptions:
    """What the fast engine quantizes, and how (``--quantize``).

    Attributes:
        kind: ``"int8"``, ``"int4"`` or ``"fp8"`` (:data:`KINDS`).
        group_size: int4's group along K (a power of two dividing K; default 128).
        cache_dir: load / save the quantized weights here (safetensors, keyed by a fingerprint of
            the source weights), or ``None``.
        lm_head: quantize the LM head too (the token embedding stays in the model dtype).
        decode_impl / prefill_impl: the kernels (:data:`DECODE_IMPLS`, :data:`PREFILL_IMPLS`), or
            ``"auto"`` (default): :meth:`resolved` picks them for the device.

    Raises:
        ValueError: an unknown kind or kernel, a group size that is not a power of two.
    """

    kind: str
    group_size: int = DEFAULT_GROUP_SIZE
    cache_dir: str | None = None
    lm_head: bool = True
    decode_impl: str = "auto"
    prefill_impl: str = "auto"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"quantize: expected one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.decode_impl not in (*DECODE_IMPLS, "auto") or self.prefill_impl not in (*PREFILL_IMPLS, "auto"):
            raise ValueError(f"quantize: decode_impl in {DECODE_IMPLS}, prefill_impl in {PREFILL_IMPLS}; "
                             f"got {self.decode_impl!r}, {self.prefill_impl!r}")
        if self.group_size < 1 or self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size: must be a power of two, got {self.group_size}")

    def resolved(self, device: torch.device | str) -> QuantOptions:
        """These options with ``"auto"`` kernels replaced by the device's choice.

        CUDA with Triton importable: the Triton GEMV for decode and the Triton GEMM for prefill
        (fp8: ``_scaled_mm``), the fastest per projection on an H100 in
        ``docs/results/quantization/`` (e.g. int4 decode 0.119 ms vs 0.256 ms for the compiled
        multiply-and-sum on layer 0; int8 prefill 0.93 ms vs 2.04 ms for dequantize + cuBLAS).
        Otherwise ``"torch"`` / ``"dequant"`` (what runs on CPU anyway).
        """
        fast = torch.device(device).type == "cuda" and triton_available()
        decode = self.decode_impl if self.decode_impl != "auto" else ("triton" if fast else "torch")
        prefill = self.prefill_impl
        if prefill == "auto":
            prefill = ("scaled_mm" if self.kind == "fp8" else "triton") if fast else "dequant"
        return dataclasses.replace(self, decode_impl=decode, prefill_impl=prefill)
