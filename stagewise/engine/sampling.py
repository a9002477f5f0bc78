"""Token selection: greedy, or sampling with ``transformers``' ``generate`` semantics.

``generate(do_sample=True, temperature=T, top_k=K, top_p=P)`` turns the fp32 logits of a step into
a distribution in this order (``GenerationMixin._get_logits_processor``): divide by ``T``
(``TemperatureLogitsWarper``), keep the tokens whose score is at least the K-th largest
(``TopKLogitsWarper``, ties kept), keep the smallest set of top tokens whose probability reaches
``P`` (``TopPLogitsWarper``: sort ascending, drop the prefix whose cumulative probability is
``<= 1 - P``, always keep the top token), then ``softmax`` and ``torch.multinomial``. Temperature 0
means greedy (``argmax``), which is stagewise's default. ``generate``'s defaults when sampling are
``top_k = 50`` and ``top_p = 1.0``; the EventGPT authors' script samples with ``T = 0.4``.

Two samplers draw from that distribution:

* the reference engine calls ``transformers``' own warpers and ``torch.multinomial`` on the global
  RNG, so a seeded run equals ``generate(do_sample=True)`` seeded the same way, token for token;
* the fast engine draws on the device inside its CUDA graph with no host synchronization: it
  applies the same warping (:func:`warp_logits`, equal to ``transformers``' warpers) and picks
  ``argmax(scores + Gumbel noise)`` (the Gumbel-max trick: the argmax of ``log p_i + G_i`` with
  i.i.d. standard Gumbel ``G_i`` is distributed as ``p``; Gumbel 1954, used this way by
  Maddison et al. 2014). The noise comes from a counter-based hash of (row seed, token index,
  vocabulary index) (:func:`uniform`), not from a generator state: the same seed gives the same
  ids run to run, whatever the batch composition, and a graph replay needs no RNG bookkeeping.
  It is equal to ``generate`` in distribution, not token for token (different random numbers).
  The noise is computed by eager PyTorch kernels (captured in the same CUDA graph), never by
  ``torch.compile``: the hash relies on int64 wrap-around, which inductor's CPU code generation
  was seen to miscompile (wrong values, heap corruption; torch 2.13).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GENERATE_TOP_K = 50
"""``generate``'s default ``top_k`` when sampling (``GenerationConfig`` defaults)."""


@dataclass(frozen=True)
class SamplingParams:
    """How a token is chosen from a step's logits.

    Attributes:
        temperature: 0 = greedy (the default); > 0 samples with ``generate``'s semantics.
        top_p: nucleus mass in ``(0, 1]``; 1 disables it.
        top_k: keep the ``top_k`` best tokens; 0 disables it (``generate``'s default is 50).
        seed: the base seed; each sample's seed is derived from it (:func:`row_seed`).

    Raises:
        ValueError: a field out of range (named).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = GENERATE_TOP_K
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (0 = off), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        """True when tokens are chosen by ``argmax`` (temperature 0)."""
        return self.temperature == 0.0

    def describe(self) -> dict[str, object]:
        """What the records and the report say about decoding."""
        if self.greedy:
            return {"decoding": "greedy"}
        return {"decoding": "sampling", "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "seed": self.seed}


GREEDY = SamplingParams()


def row_seed(base: int, sample_id: str) -> int:
    """A sample's seed: a stable 63-bit hash of ``(base, sample_id)`` (FNV-1a 64, Fowler-Noll-Vo),
    so that a sample draws the same tokens in any run, batch or rank that uses the same base seed."""
    h = 0xCBF29CE484222325
    for byte in f"{base}:{sample_id}".encode():
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


# ----------------------------------------------------------------------------------------------
# Warping (what generate's warpers compute), on any device, no host sync


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p as ``transformers``' warpers apply them.

    Args:
        logits: ``[B, V]`` fp32.

    Returns:
        ``[B, V]`` fp32 scores: ``logits / T`` where kept, ``-inf`` where filtered; softmax of it is
        the distribution ``generate(do_sample=True)`` draws from.
    """
    scores = logits / params.temperature if params.temperature != 1.0 else logits
    k = min(params.top_k, scores.shape[-1])
    if k > 0:
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]  # [B, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        srt, idx = torch.sort(scores, descending=False)  # [B, V] ascending
        cum = srt.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1.0 - params.top_p)
        drop[..., -1:] = False  # always keep the top token
        scores = scores.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return scores


# ----------------------------------------------------------------------------------------------
# Counter-based random numbers (graph-safe, reproducible)

_GOLDEN = -0x61C8864680B583EB  # 0x9E3779B97F4A7C15 as int64 (splitmix64's increment)
_MIX1 = -0x40A7B892E31B1A47  # 0xBF58476D1CE4E5B9
_MIX2 = -0x6B2FB644ECCEEE15  # 0x94D049BB133111EB


def _lsr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _splitmix64(z: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finalizer (Steele, Lea & Flood 2014), on int64 with wrap-around arithmetic."""
    z = z + _GOLDEN
    z = (z ^ _lsr(z, 30)) * _MIX1
    z = (z ^ _lsr(z, 27)) * _MIX2
    return z ^ _lsr(z, 31)


def uniform(seeds: torch.Tensor, counter: torch.Tensor, n: int, stream: int = 0) -> torch.Tensor:
    """``[B, n]`` float64 uniforms in ``(0, 1)``, a pure function of (seed, counter, index, stream).

    Args:
        seeds: ``[B]`` int64 per-row seeds.
        counter: int64 broadcastable to ``[B]`` (the index of the token being drawn).
        n: numbers per row (the vocabulary size for a token draw).
        stream: separates independent uses of one (seed, counter) (draw vs. acceptance test).

    Returns:
        ``(m + 0.5) / 2^53`` for a 53-bit hash ``m``: never 0 or 1.
    """
    key = _splitmix64(seeds ^ _splitmix64(counter * 0x2545F491 + stream))  # [B]
    idx = torch.arange(n, device=seeds.device, dtype=torch.int64)
    bits = _lsr(_splitmix64(key[:, None] + idx[None, :] * _GOLDEN), 11)  # [B, n], 53 bits
    return (bits.double() + 0.5) * (2.0 ** -53)


@torch.compiler.disable
def gumbel_noise(seeds: torch.Tensor, counter: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, n]`` float64 standard Gumbel noise ``-log(-log(U))`` for the draw ``counter`` of each row
    (eager kernels only, see the module docstring)."""
    return -torch.log(-torch.log(uniform(seeds, counter, n)))


def select_tokens(logits: torch.Tensor, params: SamplingParams, noise: torch.Tensor | None) -> torch.Tensor:
    """The next token of each row, on the device, graph-capturable.

    Args:
        logits: ``[B, V]`` fp32.
        noise: ``[B, V]`` float64 Gumbel noise (:func:`gumbel_noise`); ``None`` when greedy.

    Returns:
        ``[B]`` int64: ``argmax`` when greedy, else a draw from ``softmax(warp_logits(logits))`` by the
        Gumbel-max trick.

    Raises:
        ValueError: sampling without noise.
    """
    if params.greedy:
        return logits.argmax(-1)
    if noise is None:
        raise ValueError("select_tokens: sampling needs Gumbel noise")
    return (warp_logits(logits, params).double() + noise).argmax(-1)


def draw_tokens(logits: torch.Tensor, params: SamplingParams, seeds: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """:func:`select_tokens` with its noise drawn for ``(seeds [B], counter)``: the eager entry point."""
    noise = None if params.greedy else gumbel_noise(seeds, counter, logits.shape[-1])
    return select_tokens(logits, params, noise)


def hf_warpers(params: SamplingParams):
    """``transformers``' own warpers for ``params``, in ``generate``'s order (the reference sampler)."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    out = LogitsProcessorList()
    if params.temperature != 1.0:
        out.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        out.append(TopKLogitsWarper(top_k=params.top_k))
    if params.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=params.top_p))
    return out
