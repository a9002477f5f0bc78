"""The engine contract shared by ``hf`` and ``fast``.

Prefill and decode are separate calls so that the runner can put a stage boundary
(one device synchronization) between them: TTFT ends when ``prefill`` returns and the
first token is on the device.

Batches are LEFT-padded: row ``b`` of ``inputs_embeds`` holds ``pad_b`` padding
positions followed by its real tokens, and ``attention_mask[b]`` is 0 on the padding,
1 elsewhere. Positions (RoPE) count real tokens only, so a row's logits do not depend
on how much padding it carries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class PrefillOutput:
    """What ``prefill`` returns.

    Attributes:
        next_token: ``[B]`` int64 on the device: the greedy first generated token.
        logits: ``[B, vocab]`` float logits at the last prompt position (device).
        state: engine-private decode state (KV cache, positions, mask).
    """

    next_token: torch.Tensor
    logits: torch.Tensor
    state: Any = None


@dataclass
class DecodeOutput:
    """What ``decode`` returns.

    Attributes:
        tokens: ``[B, T]`` int64 on the host: all generated tokens, the prefill's first
            token included (``T`` = the longest row; rows that stopped early hold EOS then
            padding from there on).
        n_tokens: per row, tokens generated including the first and an EOS if one was hit.
        step_ms: device time of each decode step in ms (CUDA events; ``perf_counter`` on
            CPU), ``len = T - 1``: the inter-token latencies (ITL) of the batch.
    """

    tokens: torch.Tensor
    n_tokens: list[int]
    step_ms: list[float] = field(default_factory=list)


class Engine(Protocol):
    """A LLaMA-family decoder runner.

    Attributes:
        name: ``"hf"`` or ``"fast"``.
        warmup_ms: wall time spent compiling / capturing / warming up (ms), reported on
            its own and never inside a stage.
    """

    name: str
    warmup_ms: float

    def prefill(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> PrefillOutput:
        """Run the LM over ``inputs_embeds`` ``[B, S, D]`` (model dtype) with ``attention_mask``
        ``[B, S]`` (int/bool, left padding), fill the KV cache, return the first token."""

    def decode(self, prefill: PrefillOutput, max_new_tokens: int, eos_token_id: int | None) -> DecodeOutput:
        """Generate until ``max_new_tokens`` tokens (the first included) or, when
        ``eos_token_id`` is set, until every row has produced it. Greedy."""


def left_pad_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions for a left-padded batch.

    Args:
        attention_mask: ``[B, S]`` 0/1 (padding first).

    Returns:
        ``[B, S]`` int64: ``cumsum(mask) - 1``, clamped at 0 on padding.
    """
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_min(0)


def stack_left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad a list of ``[S_i, D]`` embedding rows into one batch.

    Returns:
        ``(embeds [B, S_max, D], attention_mask [B, S_max] int64)``; padding rows are zeros.

    Raises:
        ValueError: empty list, or rows with different ``D``/dtype/device.
    """
    if not rows:
        raise ValueError("stack_left_padded: no rows")
    d = rows[0].shape[-1]
    if any(r.ndim != 2 or r.shape[-1] != d or r.dtype != rows[0].dtype for r in rows):
        raise ValueError("stack_left_padded: rows must all be [S_i, D] with one D and dtype")
    s_max = max(r.shape[0] for r in rows)
    embeds = rows[0].new_zeros(len(rows), s_max, d)
    mask = torch.zeros(len(rows), s_max, dtype=torch.long, device=rows[0].device)
    for b, r in enumerate(rows):
        embeds[b, s_max - r.shape[0]:] = r
        mask[b, s_max - r.shape[0]:] = 1
    return embeds, mask
