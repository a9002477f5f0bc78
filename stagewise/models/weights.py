"""Weight views shared by the fast paths: Linears that read one input fused into one buffer.

Both the decode engine (q/k/v and gate/up of every LLaMA layer) and the fast CLIP tower (q/k/v)
run one GEMM where ``transformers`` runs two or three. The fused buffer is made once and the
modules' own parameters are re-pointed to row views of it, so memory is not doubled and the
``transformers`` modules still compute exactly what they did.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def fuse_linears(linears: Sequence[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One ``[sum N_i, K]`` weight (and bias) for Linears that read the same input.

    The Linears' parameters are re-pointed to row views of the fused buffer, so the old
    storage is freed (memory is not doubled) and the HF modules compute exactly what they did.
    Idempotent: Linears that are already adjacent views of one buffer are not copied again.
    """

    def fuse(params: list[torch.Tensor]) -> torch.Tensor:
        fused = _adjacent_rows(params)
        if fused is None:
            fused = torch.cat([p.detach() for p in params], dim=0)
            start = 0
            for p in params:
                p.data = fused[start:start + p.shape[0]]
                start += p.shape[0]
        return fused

    weight = fuse([lin.weight for lin in linears])
    biases = [lin.bias for lin in linears]
    if all(b is None for b in biases):
        return weight, None
    if any(b is None for b in biases):
        raise ValueError("fast engine: cannot fuse Linears where only some have a bias")
    return weight, fuse(biases)


def _adjacent_rows(params: list[torch.Tensor]) -> torch.Tensor | None:
    """The fused view if ``params`` already lie back to back in one storage, else ``None``."""
    first = params[0]
    if not all(p.is_contiguous() for p in params):
        return None
    offset = first.storage_offset()
    for p in params:
        if p.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or p.storage_offset() != offset:
            return None
        offset += p.numel()
    rows = sum(p.shape[0] for p in params)
    return first.detach().as_strided((rows, *first.shape[1:]), first.stride())
