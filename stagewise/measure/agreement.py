"""How closely one model's logits follow another's on the same inputs (e.g. int8 vs bf16).

With random weights the logits carry no task, so only numerical agreement with a reference
means anything: feed the SAME tokens to both (teacher forcing) and compare the logits position
by position.
"""

from __future__ import annotations

import torch


def logit_agreement(ref: torch.Tensor, test: torch.Tensor) -> dict[str, float | int]:
    """Compare two sets of next-token logits taken at the same ``T`` positions.

    Args:
        ref: ``[T, V]`` reference logits (e.g. the bf16 engine), any float dtype.
        test: ``[T, V]`` logits under test (e.g. the quantized engine), same shape.

    Returns:
        ``{"n_positions": T,
        "top1_agreement": fraction of positions where argmax(ref) == argmax(test) (ties: the
        first maximal index, as ``torch.argmax``),
        "max_abs_logit_diff": max |ref - test| over all T x V entries,
        "mean_abs_logit_diff": mean |ref - test| over all T x V entries,
        "mean_kl": mean over positions of KL(softmax(ref) || softmax(test)) in nats,
        "max_kl": the largest per-position KL}``. Computed in float64.
        KL(p || q) = sum_v p_v (log p_v - log q_v) with log-softmax on both sides; it is 0
        exactly when the two rows differ by a constant, and finite for finite logits.

    Raises:
        ValueError: shapes differ, are not 2-D, or are empty; non-finite logits.
    """
    if ref.ndim != 2 or tuple(ref.shape) != tuple(test.shape) or ref.numel() == 0:
        raise ValueError(
            f"logit_agreement: ref and test must be the same non-empty [T, V], got {list(ref.shape)} and {list(test.shape)}"
        )
    r = ref.detach().to(device="cpu", dtype=torch.float64)
    t = test.detach().to(device="cpu", dtype=torch.float64)
    if not (torch.isfinite(r).all() and torch.isfinite(t).all()):
        raise ValueError("logit_agreement: logits must be finite")
    diff = (r - t).abs()
    log_p = torch.log_softmax(r, dim=-1)
    log_q = torch.log_softmax(t, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_(min=0.0)  # [T]; clamp: rounding below 0
    return {
        "n_positions": int(r.shape[0]),
        "top1_agreement": float((r.argmax(-1) == t.argmax(-1)).double().mean()),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
    }
