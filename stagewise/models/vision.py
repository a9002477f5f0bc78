"""Stage 3, shared by every family: a CLIP vision tower, feature selection, and the projector.

All three families are LLaVA-style: pixels ``[T, 3, S, S]`` go through a CLIP ViT; one layer's
hidden states are selected (EventGPT: the last, ``last_hidden_state``; LLaVA-1.5 and Video-LLaVA: the
second to last, ``vision_feature_layer = -2``), CLS kept or dropped; a projector
``Linear -> GELU -> Linear`` maps them into the LM's embedding space; EventGPT adds a feature adaptor
``Linear`` and spatio-temporal pooling to ``T + 577`` tokens.

Why the tower costs what it costs: ~0.4 TFLOP per 336-px image (577 tokens x 24 layers), compute-
bound. Speed paths, each the same function as the ``transformers`` tower:

* ``compile``: the encoder as ONE compiled pre-LN layer function (:func:`clip_block`) reused by all
  layers (short compile; the compiler fuses quick-GELU, LayerNorms and residual adds, which are about
  a third of the eager tower's time), q/k/v fused into one GEMM over the tower's own weights. It also
  stops at the selected layer: with ``vision_feature_layer = -2``, ``transformers`` runs all 24
  layers and discards the last; this path runs 23.
* ``graph``: the whole stage (tower + projector + pooling) replayed from a CUDA graph captured per
  input shape (no launch gaps; capture time belongs to warm-up).
* ``fuse`` (families with pooling): mean pooling is linear, so pooling right after the projector's
  GELU and applying the second linear and the adaptor to the ``T + 577`` pooled tokens instead of
  ``T x 577`` is the same function in exact arithmetic with ``2 x 4096^2 x (2885 - 582) x 2`` fewer
  FLOPs per EventGPT sample (not bit-identical in bf16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from stagewise.models.weights import fuse_linears


@dataclass(frozen=True)
class VisionOptions:
    """How stage 3 runs (all are the same function as the eager ``transformers`` tower).

    Attributes:
        compile: the tower through one compiled layer function (:class:`FastClipTower`).
        graph: replay the stage from a CUDA graph (CUDA only).
        fuse: pool before the projector's second linear (families with pooling only).
        per_frame: one tower call per frame (the seeds' loop; for side-by-side numbers).
    """

    compile: bool = False
    graph: bool = False
    fuse: bool = False
    per_frame: bool = False


def spatio_temporal_pool(h: torch.Tensor) -> torch.Tensor:
    """EventGPT's pooling of per-frame features (``get_spatio_temporal_features``).

    Args:
        h: ``[T, S, c]`` (T frames, S tokens per frame).

    Returns:
        ``[T + S, c]``: temporal tokens (mean over S) first, then spatial tokens (mean over T).
    """
    return torch.cat([h.mean(dim=1), h.mean(dim=0)], dim=0)


class Projector(nn.Module):
    """``Linear -> act -> Linear`` (+ EventGPT's adaptor ``Linear`` and spatio-temporal pooling).

    The modules are the checkpoint's own (shared, not copied).

    Args:
        linear1, act, linear2: the projector's layers.
        adaptor: EventGPT's feature adaptor, or ``None``.
        pool: apply :func:`spatio_temporal_pool` over frames (EventGPT) instead of concatenating them.
    """

    def __init__(self, linear1: nn.Linear, act: nn.Module, linear2: nn.Linear, adaptor: nn.Linear | None = None, *, pool: bool = False) -> None:
        super().__init__()
        self.linear1, self.act, self.linear2, self.adaptor = linear1, act, linear2, adaptor
        self.pool = pool

    def forward(self, feats: torch.Tensor, fuse: bool = False) -> torch.Tensor:
        """``[T, N, d_v]`` selected features -> ``[T + N, d]`` (pooled) or ``[T * N, d]``."""
        h = self.act(self.linear1(feats))  # [T, N, d]
        if self.pool and fuse:  # pool first: the rest is linear
            return self._tail(spatio_temporal_pool(h))
        h = self._tail(h)
        return spatio_temporal_pool(h) if self.pool else h.flatten(0, 1)

    def _tail(self, h: torch.Tensor) -> torch.Tensor:
        h = self.linear2(h)
        return self.adaptor(h) if self.adaptor is not None else h

    def flops(self, n_images: int, tokens_per_image: int, fuse: bool) -> float:
        """FLOPs (multiply-add = 2) for ``n_images`` x ``tokens_per_image`` selected tokens; the tail
        (second linear and adaptor) runs on ``T + N`` pooled tokens when ``fuse``."""
        d_v, d = self.linear1.in_features, self.linear1.out_features
        tokens = n_images * tokens_per_image
        tail_tokens = n_images + tokens_per_image if (self.pool and fuse) else tokens
        n_tail = 1 + (self.adaptor is not None)
        return 2.0 * tokens * d_v * d + 2.0 * tail_tokens * n_tail * d * d


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
    """One pre-LN CLIP encoder layer (non-causal attention, scale ``head_dim ** -0.5``, quick-GELU
    ``x * sigmoid(1.702 x)``), as ``transformers``' ``CLIPEncoderLayer``.

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
    """Hidden states of a ``CLIPVisionModel`` after ``n_layers`` encoder layers, through :func:`clip_block`.

    Args:
        tower: the HF ``CLIPVisionModel`` (quick-GELU activation).
        n_layers: encoder layers to run (the selected feature layer; default all).
        compile: ``torch.compile`` the layer function (default: on CUDA).
        compile_mode: ``torch.compile`` mode (default: the default mode).
        sdpa_backend: force one SDPA backend (``"flash"``, ``"efficient"``, ``"cudnn"``, ``"math"``).

    Raises:
        ValueError: the tower's activation is not quick-GELU, or ``n_layers`` out of range.
    """

    def __init__(self, tower: CLIPVisionModel, n_layers: int | None = None, compile: bool | None = None,
                 compile_mode: str | None = None, sdpa_backend: str | None = None) -> None:
        vm = getattr(tower, "vision_model", tower)  # transformers 4.x nests, 5.x does not
        cfg = tower.config
        if cfg.hidden_act != "quick_gelu":
            raise ValueError(f"fast CLIP tower: hidden_act {cfg.hidden_act!r} is not supported (only quick_gelu)")
        layers = list(vm.encoder.layers)
        n_layers = len(layers) if n_layers is None else n_layers
        if not 0 <= n_layers <= len(layers):
            raise ValueError(f"fast CLIP tower: n_layers must be in [0, {len(layers)}], got {n_layers}")
        self.embeddings, self.pre_ln = vm.embeddings, vm.pre_layrnorm
        self.heads, self.eps = cfg.num_attention_heads, cfg.layer_norm_eps
        self.layers = [_clip_layer_weights(layer) for layer in layers[:n_layers]]
        on_cuda = vm.pre_layrnorm.weight.is_cuda
        do_compile = on_cuda if compile is None else compile
        self.compiled = bool(do_compile)
        self.block = torch.compile(clip_block, fullgraph=True, dynamic=False, mode=compile_mode) if do_compile else clip_block
        self.sdpa_backend = sdpa_backend

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[T, 3, H, W]`` pixels -> ``[T, S, d]`` hidden states (model dtype)."""
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

        names = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
        return sdpa_kernel([names[self.sdpa_backend]])


def _clip_layer_weights(layer: CLIPEncoderLayer) -> ClipLayerWeights:
    a, m = layer.self_attn, layer.mlp
    wqkv, bqkv = fuse_linears([a.q_proj, a.k_proj, a.v_proj])
    return ClipLayerWeights(
        layer.layer_norm1.weight.detach(), layer.layer_norm1.bias.detach(), wqkv, bqkv,
        a.out_proj.weight.detach(), a.out_proj.bias.detach(),
        layer.layer_norm2.weight.detach(), layer.layer_norm2.bias.detach(),
        m.fc1.weight.detach(), m.fc1.bias.detach(), m.fc2.weight.detach(), m.fc2.bias.detach(),
    )


class VisionStage:
    """Stage 3 of a family: tower, feature selection, projector (+ adaptor, pooling), in one call.

    Args:
        tower: ``transformers``' ``CLIPVisionModel`` (the checkpoint's own).
        projector: :class:`Projector`.
        feature_layer: which hidden state is used, ``transformers``' indexing (-1: the last, as
            ``last_hidden_state``; -2: the second to last).
        keep_cls: keep the CLS token of each frame.

    Attributes:
        options: :class:`VisionOptions` in use (set with :meth:`configure`).
    """

    def __init__(self, tower: CLIPVisionModel, projector: Projector, *, feature_layer: int, keep_cls: bool) -> None:
        n = tower.config.num_hidden_layers
        if not -n - 1 <= feature_layer <= -1:
            raise ValueError(f"feature_layer: must be in [-{n + 1}, -1], got {feature_layer}")
        self.tower, self.projector = tower, projector
        self.feature_layer, self.keep_cls = feature_layer, keep_cls
        self.layers_run = n + 1 + feature_layer  # encoder layers whose output is used
        self.options = VisionOptions()
        self._fast: FastClipTower | None = None
        self._graphs: dict[tuple, tuple] = {}

    def configure(self, options: VisionOptions) -> None:
        """Set the speed paths (drops captured graphs; builds the fast tower when asked)."""
        self.options = options
        self._graphs = {}
        if options.compile and self._fast is None:
            self._fast = FastClipTower(self.tower, n_layers=self.layers_run)

    @property
    def compiled(self) -> bool:
        """True when the tower runs through a ``torch.compile``-d layer function (CUDA)."""
        return self.options.compile and self._fast is not None and self._fast.compiled

    @property
    def tokens_per_image(self) -> int:
        """Selected tokens per image: ``(S / patch)^2`` patches (+ CLS when kept)."""
        cfg = self.tower.config
        return (cfg.image_size // cfg.patch_size) ** 2 + (1 if self.keep_cls else 0)

    def n_tokens(self, n_images: int) -> int:
        """Vision embeddings for ``n_images`` images (after pooling when the projector pools)."""
        return n_images + self.tokens_per_image if self.projector.pool else n_images * self.tokens_per_image

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[T, 3, S, S]`` pixels (model dtype, device) -> ``[N_vision, d]`` embeddings in LM space."""
        if self.options.graph and pixels.is_cuda:
            return self._replay(pixels)
        return self._run(pixels)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The selected tower features ``[T, N, d_v]`` (before the projector)."""
        if self.options.compile and self._fast is not None:
            h = self._fast(pixels)
        elif self.options.per_frame:  # the seeds' loop: one tower call per frame
            h = torch.cat([self._hf_hidden(pixels[t: t + 1]) for t in range(pixels.shape[0])])
        else:
            h = self._hf_hidden(pixels)
        return h if self.keep_cls else h[:, 1:]

    def _hf_hidden(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.feature_layer == -1:
            return self.tower(pixel_values=pixels).last_hidden_state
        return self.tower(pixel_values=pixels, output_hidden_states=True).hidden_states[self.feature_layer]

    def _run(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projector(self.features(pixels), fuse=self.options.fuse)

    def _replay(self, px: torch.Tensor) -> torch.Tensor:
        """The stage from a CUDA graph keyed by the input shape: one launch, no gaps."""
        key = (tuple(px.shape), px.dtype)
        entry = self._graphs.get(key)
        if entry is None:
            static_in = px.clone()
            side = torch.cuda.Stream(px.device)
            side.wait_stream(torch.cuda.current_stream(px.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm the kernels (cuBLAS/cuDNN handles, autotuning) off-graph
                    self._run(static_in)
            torch.cuda.current_stream(px.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._run(static_in)
            entry = self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = entry
        static_in.copy_(px)
        graph.replay()
        return static_out.clone()

    def flops(self, n_images: int) -> float:
        """FLOPs of the stage for ``n_images`` (tower layers actually run + projector; pooling and
        norms not counted), see :func:`stagewise.measure.costmodel.clip_vision_flops`."""
        from stagewise.measure.costmodel import clip_vision_flops

        layers = self.layers_run if self.options.compile else self.tower.config.num_hidden_layers
        tower = clip_vision_flops(self.tower.config, n_images, layers=layers)
        return tower + self.projector.flops(n_images, self.tokens_per_image, self.options.fuse)
