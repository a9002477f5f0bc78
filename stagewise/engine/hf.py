"""The reference engine: ``transformers``' own LLaMA forward with a ``DynamicCache``.

This is the seeds' method (a prefill forward, then one Python-level forward per token
with a growing cache and a host read of each token), kept for parity checks and for
side-by-side numbers with the ``fast`` engine. Sampling uses ``transformers``' own warpers and
``torch.multinomial`` on the global RNG, seeded at prefill, so a sampled run equals
``generate(do_sample=True, ...)`` after ``torch.manual_seed`` with the same seed, token for token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, LlamaForCausalLM

from stagewise.engine.base import (
    DecodeOutput,
    PrefillOutput,
    count_until_eos,
    left_pad_positions,
    padding_mask,
)
from stagewise.engine.sampling import GREEDY, SamplingParams, hf_warpers
from stagewise.measure.timing import StepTimer


@dataclass(frozen=True)
class HFOptions:
    """Options of the reference engine.

    Attributes:
        sampling: greedy (default) or ``generate``-style sampling.
        time_steps: record per-step times (CUDA events; no extra sync).
    """

    sampling: SamplingParams = field(default_factory=lambda: GREEDY)
    time_steps: bool = True


class HFEngine:
    """Generation through ``LlamaForCausalLM.forward`` and a ``DynamicCache``.

    Args:
        lm: a ``transformers`` ``LlamaForCausalLM`` (weights used as they are).
        options: :class:`HFOptions`.
    """

    name = "hf"

    def __init__(self, lm: LlamaForCausalLM, options: HFOptions = HFOptions()) -> None:
        self.lm = lm
        self.options = options
        self.sampling = options.sampling
        self.warmup_ms = 0.0
        self.device = next(lm.parameters()).device
        self._warpers = None if options.sampling.greedy else hf_warpers(options.sampling)

    def warmup(self, prompt_len: int, max_new_tokens: int | None, batch_sizes: Sequence[int]) -> None:
        """Nothing to compile or capture (the reference runs eagerly)."""

    @property
    def weight_bytes_per_step(self) -> int:
        """Weight bytes a decode step streams: every weight but the embedding, in the model dtype
        (:func:`stagewise.measure.costmodel.llama_decode_weight_bytes`)."""
        from stagewise.measure.costmodel import llama_decode_weight_bytes

        return llama_decode_weight_bytes(self.lm.config, self.lm.lm_head.weight.element_size())

    def _pick(self, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``generate``'s token selection: argmax, or warp + softmax + ``torch.multinomial``."""
        if self._warpers is None:
            return logits.argmax(-1)
        probs = torch.softmax(self._warpers(ids, logits), dim=-1)
        return torch.multinomial(probs, num_samples=1).squeeze(1)

    @torch.inference_mode()
    def prefill(self, inputs_embeds: torch.Tensor, lengths: Sequence[int], seeds: Sequence[int] | None = None) -> PrefillOutput:
        """See :class:`stagewise.engine.base.Engine`. ``inputs_embeds`` ``[B, S, D]``.

        When sampling, the global RNG is seeded with ``seeds[0]`` (default: the sampling seed) here,
        as a caller of ``generate`` seeds it before the call."""
        B, S = inputs_embeds.shape[:2]
        mask = padding_mask(lengths, S, inputs_embeds.device)
        pos = left_pad_positions(mask)
        cache = DynamicCache(config=self.lm.config)
        out = self.lm(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=pos,
                      past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].float()  # [B, V]
        if self._warpers is not None:
            torch.manual_seed(seeds[0] if seeds else self.sampling.seed)
        ids = torch.empty(B, 0, dtype=torch.long, device=logits.device)  # the warpers ignore the ids
        nxt = self._pick(ids, logits)
        return PrefillOutput(nxt, logits, B, S, handle=(out.past_key_values, mask, pos[:, -1]))

    @torch.inference_mode()
    def decode(self, prefill: PrefillOutput, max_new_tokens: int, eos_token_id: int | None) -> DecodeOutput:
        """See :class:`stagewise.engine.base.Engine`; reads each token on the host (seeds' loop)."""
        cache, mask, pos = prefill.handle
        tok = prefill.next_token
        toks = [tok]
        finished = tok == eos_token_id if eos_token_id is not None else None
        timer = StepTimer(self.device, self.options.time_steps)
        timer.mark()
        for _ in range(max_new_tokens - 1):
            if finished is not None and bool(finished.all()):
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            pos = pos + 1
            out = self.lm(input_ids=tok[:, None], attention_mask=mask, position_ids=pos[:, None],
                          past_key_values=cache, use_cache=True)
            tok = self._pick(torch.stack(toks, dim=1), out.logits[:, -1].float())
            if finished is not None:
                tok = torch.where(finished, torch.full_like(tok, eos_token_id), tok)
                finished = finished | (tok == eos_token_id)
            toks.append(tok)
            timer.mark()
        tokens = torch.stack(toks, dim=1).cpu()  # [B, T]; the .cpu() syncs
        return DecodeOutput(tokens, count_until_eos(tokens, eos_token_id), timer.intervals_ms())
