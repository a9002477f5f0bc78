"""Stage 3's fast path: CLIP's vision encoder with ONE compiled layer function for all layers.

Why: the tower's matrix products already run near the bf16 matmul rate, but ``transformers``'
eager layers spend about a third of stage 3 in separate element-wise kernels (quick-GELU alone
is three of them per layer, plus LayerNorms and residual adds; see
``docs/results/engine/vision_profile.txt``). Written as a plain function of (activations,
weights), one ``torch.compile`` artifact serves every layer (they share shapes, so compile
time stays small) and the compiler fuses the element-wise work.

The weights are the ``CLIPVisionModel``'s own (q/k/v re-pointed into one fused buffer with
:func:`stagewise.models.weights.fuse_linears`, so nothing is copied and the HF tower still works).
The function is the same computation as ``transformers``' pre-LN CLIP encoder layer
(non-causal attention, scale ``head_dim ** -0.5``, quick-GELU ``x * sigmoid(1.702 x)``);
``last_hidden_state`` is the encoder output (no post-LayerNorm), as EventGPT uses it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from stagewise.models.weights import fuse_linears


class ClipLayerWeights(NamedTuple):
    """One encoder layer's tensors (views of the HF module's parameters)."""

    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    wqkv: torch.Tensor  # [3 d, d]
    bqkv: torch.Tensor  # [3 d]
    wo: torch.Tensor
    bo: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    w1: torch.Tensor  # [inter, d]
    b1: torch.Tensor
    w2: torch.Tensor  # [d, inter]
    b2: torch.Tensor


def clip_block(x: torch.Tensor, w: ClipLayerWeights, heads: int, eps: float) -> torch.Tensor:
    """One pre-LN CLIP encoder layer.

    Args:
        x: ``[T, S, d]`` activations (T images, S = patches + 1 tokens).

    Returns:
        ``[T, S, d]``.
    """
    t, s, d = x.shape
    hd = d // heads
    h = F.layer_norm(x, (d,), w.ln1_w, w.ln1_b, eps)
    qkv = F.linear(h, w.wqkv, w.bqkv).view(t, s, 3, heads, hd).permute(2, 0, 3, 1, 4)  # [3, T, H, S, hd]
    a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # non-causal, scale hd^-0.5
    x = x + F.linear(a.transpose(1, 2).reshape(t, s, d), w.wo, w.bo)
    h = F.linear(F.layer_norm(x, (d,), w.ln2_w, w.ln2_b, eps), w.w1, w.b1)  # [T, S, inter]
    h = h * torch.sigmoid(1.702 * h)  # quick-GELU
    return x + F.linear(h, w.w2, w.b2)


class FastClipTower:
    """``last_hidden_state`` of a ``CLIPVisionModel`` through :func:`clip_block`.

    Args:
        tower: the HF ``CLIPVisionModel`` (quick-GELU activation).
        compile: ``torch.compile`` the layer function (default: on CUDA).
        compile_mode: ``torch.compile`` mode (default: the default mode).
        sdpa_backend: force one SDPA backend (``"flash"``, ``"efficient"``, ``"cudnn"``,
            ``"math"``); default: PyTorch's choice.

    Raises:
        ValueError: the tower's activation is not quick-GELU.
    """

    def __init__(self, tower: Any, compile: bool | None = None, compile_mode: str | None = None, sdpa_backend: str | None = None) -> None:
        vm = getattr(tower, "vision_model", tower)  # transformers 4.x nests, 5.x does not
        cfg = tower.config
        if cfg.hidden_act != "quick_gelu":
            raise ValueError(f"fast CLIP tower: hidden_act {cfg.hidden_act!r} is not supported (only quick_gelu)")
        self.embeddings, self.pre_ln = vm.embeddings, vm.pre_layrnorm
        self.heads, self.eps = cfg.num_attention_heads, cfg.layer_norm_eps
        self.layers = []
        for layer in vm.encoder.layers:
            a, m = layer.self_attn, layer.mlp
            wqkv, bqkv = fuse_linears([a.q_proj, a.k_proj, a.v_proj])
            self.layers.append(ClipLayerWeights(
                layer.layer_norm1.weight.detach(), layer.layer_norm1.bias.detach(), wqkv, bqkv,
                a.out_proj.weight.detach(), a.out_proj.bias.detach(),
                layer.layer_norm2.weight.detach(), layer.layer_norm2.bias.detach(),
                m.fc1.weight.detach(), m.fc1.bias.detach(), m.fc2.weight.detach(), m.fc2.bias.detach(),
            ))
        on_cuda = self.layers[0].wqkv.is_cuda
        do_compile = on_cuda if compile is None else compile
        self.block = torch.compile(clip_block, fullgraph=True, dynamic=False, mode=compile_mode) if do_compile else clip_block
        self.sdpa_backend = sdpa_backend

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[T, 3, H, W]`` pixels -> ``[T, S, d]`` encoder output (model dtype)."""
        # Compiled artifacts are keyed on inference mode: always run outside it, without autograd.
        with torch.inference_mode(False), torch.no_grad(), self._backend():
            x = self.pre_ln(self.embeddings(pixel_values.clone()))
            for w in self.layers:
                x = self.block(x, w, self.heads, self.eps)
        return x

    def _backend(self) -> Any:
        from contextlib import nullcontext

        if self.sdpa_backend is None:
            return nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        names = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
        return sdpa_kernel([names[self.sdpa_backend]])
