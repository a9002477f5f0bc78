"""The engine contract shared by ``hf`` and ``fast``.

Prefill and decode are separate calls so that the runner can put a stage boundary
(one device synchronization) between them: TTFT ends when ``prefill`` returns and the
first token is on the device.

Batches are LEFT-padded: row ``b`` of ``inputs_embeds`` holds ``S - lengths[b]`` padding
positions followed by its ``lengths[b]`` real tokens. The lengths are known on the host (the
runner built the rows), so no engine reads a mask back from the device to find out whether a
batch is padded. Positions (RoPE) count real tokens only, so a row's logits do not depend on
how much padding it carries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from stagewise.engine.sampling import SamplingParams


@dataclass
class PrefillOutput:
    """What ``prefill`` returns.

    Attributes:
        next_token: ``[B]`` int64 on the device: the first generated token (greedy or sampled).
        logits: ``[B, vocab]`` fp32 logits at the last prompt position (device).
        batch: ``B``; prompt_len: ``S`` (padded length).
        handle: engine-private decode state (the KV cache it filled, positions), opaque to callers.
    """

    next_token: torch.Tensor
    logits: torch.Tensor
    batch: int
    prompt_len: int
    handle: object = None


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
        sampling: how tokens are chosen (greedy by default).
    """

    name: str
    warmup_ms: float
    sampling: SamplingParams

    @property
    def weight_bytes_per_step(self) -> int:
        """Bytes of weights one decode step streams on this device (MBU is computed on it)."""
        ...

    def prefill(self, inputs_embeds: torch.Tensor, lengths: Sequence[int], seeds: Sequence[int] | None = None) -> PrefillOutput:
        """Run the LM over ``inputs_embeds`` ``[B, S, D]`` (model dtype, left-padded; row ``b``
        holds ``lengths[b]`` real tokens), fill the KV cache, return the first token. ``seeds``:
        one per row when sampling (default: the sampling seed for every row)."""
        ...

    def decode(self, prefill: PrefillOutput, max_new_tokens: int, eos_token_id: int | None) -> DecodeOutput:
        """Generate until ``max_new_tokens`` tokens (the first included) or, when
        ``eos_token_id`` is set, until every row has produced it."""
        ...

    def warmup(self, prompt_len: int, max_new_tokens: int | None, batch_sizes: Sequence[int]) -> None:
        """Compile / capture everything a run of ``prompt_len``-token prompts needs for these
        batch sizes (time goes to ``warmup_ms``; a no-op for engines with nothing to prepare)."""
        ...


def padding_mask(lengths: Sequence[int], seq_len: int, device: torch.device | str) -> torch.Tensor:
    """``[B, S]`` int64 attention mask of a left-padded batch: 0 on each row's padding, 1 elsewhere.

    Raises:
        ValueError: a length outside ``[1, seq_len]``.
    """
    if any(not 1 <= n <= seq_len for n in lengths):
        raise ValueError(f"lengths must be in [1, {seq_len}], got {list(lengths)}")
    pos = torch.arange(seq_len, device=device)
    start = torch.tensor([seq_len - n for n in lengths], device=device)
    return (pos[None, :] >= start[:, None]).long()


def left_pad_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions for a left-padded batch.

    Args:
        attention_mask: ``[B, S]`` 0/1 (padding first).

    Returns:
        ``[B, S]`` int64: ``cumsum(mask) - 1``, clamped at 0 on padding.
    """
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_min(0)


def stack_left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Left-pad a list of ``[S_i, D]`` embedding rows into one batch.

    Returns:
        ``(embeds [B, S_max, D], lengths [S_i])``; padding rows are zeros.

    Raises:
        ValueError: empty list, or rows with different ``D``/dtype.
    """
    if not rows:
        raise ValueError("stack_left_padded: no rows")
    d = rows[0].shape[-1]
    if any(r.ndim != 2 or r.shape[-1] != d or r.dtype != rows[0].dtype for r in rows):
        raise ValueError("stack_left_padded: rows must all be [S_i, D] with one D and dtype")
    lengths = [int(r.shape[0]) for r in rows]
    if len(rows) == 1:
        return rows[0][None], lengths
    s_max = max(lengths)
    embeds = rows[0].new_zeros(len(rows), s_max, d)
    for b, r in enumerate(rows):
        embeds[b, s_max - r.shape[0]:] = r
    return embeds, lengths


def count_until_eos(tokens: torch.Tensor, eos_token_id: int | None) -> list[int]:
    """Per row of ``tokens`` ``[B, T]``: tokens up to and including the first EOS (T if none)."""
    if eos_token_id is None:
        return [tokens.shape[1]] * tokens.shape[0]
    out = []
    for row in tokens.tolist():
        out.append(row.index(eos_token_id) + 1 if eos_token_id in row else len(row))
    return out
