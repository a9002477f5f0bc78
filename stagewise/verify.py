"""Decoupled == fused: the proof that stage 3 is computed once and reused faithfully.

The fused path is the model's own reference: pixels in, vision encoded inside, one
``generate`` call (``model.generate_fused``). The decoupled path is stagewise's: vision
features computed once in stage 3, spliced in stage 4, then the engine's prefill and
decode. Both are greedy; the token ids must be identical.

In bf16 on a GPU, two mathematically equal paths can still part at a near-tie of the top
two logits (different kernels round differently). On a mismatch we therefore report the
first differing position and the fused path's top-2 logit margin there: a margin of a few
bf16 ulps is a rounding tie, a large one is a bug.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stagewise.engine.base import Engine, stack_left_padded
from stagewise.models.base import MultimodalModel, Sample


@dataclass
class VerifyResult:
    """Outcome for one sample.

    Attributes:
        fused / decoupled: greedy token ids of each path.
        first_diff: index of the first differing token, or None when identical.
        margin: at ``first_diff``, the fused path's top-1 minus top-2 logit (float32), or None.
    """

    sample_id: str
    fused: list[int]
    decoupled: list[int]
    first_diff: int | None
    margin: float | None = None

    @property
    def ok(self) -> bool:
        """Both paths produced the same ids, of the same length."""
        return self.first_diff is None and len(self.fused) == len(self.decoupled)


def _first_diff(a: list[int], b: list[int]) -> int | None:
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return k
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.inference_mode()
def _margin_at(model: MultimodalModel, embeds: torch.Tensor, fused: list[int], pos: int) -> float:
    """Top-1 minus top-2 logit at generated position ``pos``, teacher-forcing the fused ids."""
    emb = model.lm.get_input_embeddings()
    prefix = torch.tensor(fused[:pos], dtype=torch.long, device=embeds.device)
    x = torch.cat([embeds, emb(prefix)], dim=0)[None] if pos else embeds[None]
    logits = model.lm(inputs_embeds=x, logits_to_keep=1).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def verify_sample(model: MultimodalModel, engine: Engine, sample: Sample, max_new_tokens: int, eos_token_id: int | None) -> VerifyResult:
    """Run both paths on ``sample`` and compare their greedy ids."""
    prep = model.preprocess(model.load(sample), sample.query)
    fused = model.generate_fused(prep, max_new_tokens, eos_token_id)
    vision = model.encode_vision(prep)  # stage 3, once
    row = model.build_inputs_embeds(prep, vision)
    embeds, lengths = stack_left_padded([row])
    out = engine.decode(engine.prefill(embeds, lengths), max_new_tokens, eos_token_id)
    dec = out.tokens[0, : out.n_tokens[0]].tolist()
    k = _first_diff(fused, dec)
    margin = _margin_at(model, row, fused, k) if k is not None and k < len(fused) else None
    return VerifyResult(sample.sample_id, fused, dec, k, margin)


@dataclass
class QuantAgreement:
    """Quantized vs model-dtype fast engine on one sample, teacher-forced on the reference's ids.

    Attributes:
        ref_ids: the model-dtype engine's greedy ids (the forced continuation).
        agreement: :func:`stagewise.measure.agreement.logit_agreement` of the two engines' logits
            at every forced position (``top1_agreement``, ``max_abs_logit_diff``, ``mean_abs_logit_diff``,
            ``mean_kl``, ...).
    """

    sample_id: str
    ref_ids: list[int]
    agreement: dict[str, float]


def quant_agreement(model: MultimodalModel, ref: Engine, quant: Engine, sample: Sample, max_new_tokens: int) -> QuantAgreement:
    """Numerical agreement of a quantized engine with the model-dtype one on ``sample``: both prefill
    the same embeddings; the reference decodes greedily; both are teacher-forced on its ids
    (``FastEngine.score``), and their logits compared position by position.

    With random weights only this agreement means anything (not the text); on a real checkpoint it
    is the quality cost of the quantization on the user's own data.
    """
    from stagewise.measure.agreement import logit_agreement

    prep = model.preprocess(model.load(sample), sample.query)
    row = model.build_inputs_embeds(prep, model.encode_vision(prep))
    embeds, lengths = stack_left_padded([row])
    ids = ref.decode(ref.prefill(embeds, lengths), max_new_tokens, None).tokens  # [1, T]
    forced = ids[:, :-1].to(model.device)
    a = ref.score(ref.prefill(embeds, lengths), forced)[0]  # [T, V]
    b = quant.score(quant.prefill(embeds, lengths), forced)[0]
    return QuantAgreement(sample.sample_id, ids[0].tolist(), logit_agreement(a, b))
