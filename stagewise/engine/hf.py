"""The reference engine: ``transformers``' own LLaMA forward with a ``DynamicCache``.

This is the seeds' method (a prefill forward, then one Python-level forward per token
with a growing cache and a host read of each token), kept for parity checks and for
side-by-side numbers with the ``fast`` engine.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from stagewise.engine.base import DecodeOutput, PrefillOutput, left_pad_positions
from stagewise.measure.timing import StepTimer


def count_until_eos(tokens: torch.Tensor, eos_token_id: int | None) -> list[int]:
    """Per row of ``tokens`` ``[B, T]``: tokens up to and including the first EOS (T if none)."""
    if eos_token_id is None:
        return [tokens.shape[1]] * tokens.shape[0]
    out = []
    for row in tokens.tolist():
        out.append(row.index(eos_token_id) + 1 if eos_token_id in row else len(row))
    return out


class HFEngine:
    """Greedy generation through ``LlamaForCausalLM.forward`` and a ``DynamicCache``.

    Args:
        lm: a ``transformers`` ``LlamaForCausalLM`` (weights used as they are).
        time_steps: record per-step times (CUDA events; no extra sync).
    """

    name = "hf"

    def __init__(self, lm: Any, time_steps: bool = True, **_: Any) -> None:
        self.lm = lm
        self.time_steps = time_steps
        self.warmup_ms = 0.0
        self.device = next(lm.parameters()).device

    @torch.inference_mode()
    def prefill(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> PrefillOutput:
        """See :class:`stagewise.engine.base.Engine`. ``inputs_embeds`` ``[B, S, D]``."""
        pos = left_pad_positions(attention_mask)
        cache = DynamicCache(config=self.lm.config)
        out = self.lm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1].float()  # [B, V]
        nxt = logits.argmax(-1)
        return PrefillOutput(nxt, logits, state=(out.past_key_values, attention_mask, pos[:, -1]))

    @torch.inference_mode()
    def decode(self, prefill: PrefillOutput, max_new_tokens: int, eos_token_id: int | None) -> DecodeOutput:
        """See :class:`stagewise.engine.base.Engine`; reads each token on the host (seeds' loop)."""
        cache, mask, pos = prefill.state
        tok = prefill.next_token
        toks = [tok]
        finished = tok == eos_token_id if eos_token_id is not None else None
        timer = StepTimer(self.device, self.time_steps)
        timer.mark()
        for _ in range(max_new_tokens - 1):
            if finished is not None and bool(finished.all()):
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            pos = pos + 1
            out = self.lm(
                input_ids=tok[:, None],
                attention_mask=mask,
                position_ids=pos[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            tok = out.logits[:, -1].argmax(-1)
            if finished is not None:
                tok = torch.where(finished, torch.full_like(tok, eos_token_id), tok)
                finished = finished | (tok == eos_token_id)
            toks.append(tok)
            timer.mark()
        tokens = torch.stack(toks, dim=1).cpu()  # [B, T]; the .cpu() syncs
        return DecodeOutput(tokens, count_until_eos(tokens, eos_token_id), timer.intervals_ms())
