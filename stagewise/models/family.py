"""One LLaVA-family composition for every model: tokenizer + vision stage + LLaMA decoder.

EventGPT, LLaVA-1.5 and Video-LLaVA are the same machine (``../shared/spec/EVENTGPT.md``, the
llava-hf model cards): a prompt with one vision placeholder, a CLIP tower whose selected features
are projected into the LM's embedding space (:class:`stagewise.models.vision.VisionStage`), spliced
where the placeholder stood, and a ``transformers`` ``LlamaForCausalLM`` that the engines drive. A
family (:mod:`~stagewise.models.eventgpt`, :mod:`~stagewise.models.llava`,
:mod:`~stagewise.models.video_llava`) only says what differs: its stage-1 inputs, how events become
frames, its prompt format, its feature selection and pooling, and its fused reference path.

Why the stages cost what they cost: the tower is compute-bound (~0.4 TFLOP per 336-px image); the
prefill is compute-bound too (~600-2,000 tokens through 6.7e9 parameters); decode is
bandwidth-bound (13.5 GB of bf16 weights per token). Stage 3 runs ONCE per sample: its output is
spliced in stage 4 and never recomputed.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase
from transformers.image_processing_utils import BaseImageProcessor

from stagewise.models.base import Loaded, Prepared, Sample
from stagewise.models.vision import VisionOptions, VisionStage
from stagewise.preprocess.prompt import PromptFormat, decode_ids, tokenize_prompt


@dataclass(frozen=True)
class StageOptions:
    """Run options of stages 1-3 (each a speed path computing the same function, or an input rule).

    Attributes:
        gpu_preprocess: stage 2 with torch on the model's device (event rendering and the CLIP
            resize/normalize, pixel-exact with the CPU path).
        vision: stage 3's speed paths (:class:`~stagewise.models.vision.VisionOptions`).
        window: EventGPT: keep the first 100 ms of a longer stream instead of refusing it.
        sensor_size: ``(height, width)`` of the event sensor when the files do not say.

    Raises:
        ValueError: a sensor size below 1 pixel.
    """

    gpu_preprocess: bool = False
    vision: VisionOptions = field(default_factory=VisionOptions)
    window: bool = False
    sensor_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.sensor_size is not None and min(self.sensor_size) < 1:
            raise ValueError(f"sensor_size: (height, width) must both be >= 1, got {self.sensor_size}")


class VisionLanguageModel:
    """A multimodal LLM as five stages (implements :class:`stagewise.models.base.MultimodalModel`).

    Subclasses (the families) set ``name``, ``n_frames``, ``prompt`` and implement :meth:`load`
    and :meth:`generate_fused`; EventGPT also overrides :meth:`frames` (events -> event images).

    Args:
        lm: the ``LlamaForCausalLM`` the engines drive.
        vision: the family's :class:`~stagewise.models.vision.VisionStage`.
        tokenizer: ``transformers`` LLaMA tokenizer with the family's added tokens.
        image_processor: the ``transformers`` CLIP image processor of the checkpoint (CPU stage 2).
        weights: the module holding every weight in the checkpoint's own layout (for saving,
            ``state_dict`` and parameter counts).
        preset: preset name, or ``None`` for a checkpoint; source: ``"random"`` or the folder.

    Attributes:
        options: the :class:`StageOptions` applied (see :meth:`configure`).
    """

    name: str = ""
    n_frames: int = 1
    prompt: PromptFormat

    def __init__(self, *, lm: LlamaForCausalLM, vision: VisionStage, tokenizer: PreTrainedTokenizerBase,
                 image_processor: BaseImageProcessor, weights: nn.Module,
                 preset: str | None, source: str) -> None:
        self.lm, self.vision, self.tokenizer = lm, vision, tokenizer
        self.image_processor, self.weights = image_processor, weights
        self.preset, self.source = preset, source
        self.options = StageOptions()
        self.eos_token_id: int = int(tokenizer.eos_token_id)

    # -- identity ----------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.lm.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the weights."""
        return self.lm.lm_head.weight.dtype

    @property
    def n_vision_tokens(self) -> int:
        """Vision embeddings per sample (EventGPT: T + 577 = 582; Video-LLaVA: 8 x 257; LLaVA: 576)."""
        return self.vision.n_tokens(self.n_frames)

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prefill the LM accepts (its RoPE positions)."""
        return int(self.lm.config.max_position_embeddings)

    # -- options -------------------------------------------------------------------------

    def configure(self, options: StageOptions) -> StageOptions:
        """Apply ``options``; returns what was applied.

        Raises:
            ValueError: a speed path this family or device cannot serve (``fuse`` without pooling,
                ``graph`` without CUDA), naming it and why.
        """
        v = options.vision
        if v.fuse and not self.vision.projector.pool:
            raise ValueError(f"fuse_vision: {self.name} has no pooling after its projector; pool-before-linear applies to EventGPT only")
        if v.graph and self.device.type != "cuda":
            raise ValueError("vision_graph: CUDA graphs need a CUDA device")
        if v.per_frame and (v.compile or v.graph):
            raise ValueError("per_frame vision (the seeds' loop) excludes vision_compile and vision_graph")
        self.options = options
        self.vision.configure(v)
        return options

    def applicable(self, options: StageOptions) -> StageOptions:
        """``options`` minus the speed paths this family or device cannot serve (for ``--fast-stages``)."""
        v = options.vision
        v = replace(v, fuse=v.fuse and self.vision.projector.pool, graph=v.graph and self.device.type == "cuda")
        return replace(options, vision=v)

    # -- stage 1 -------------------------------------------------------------------------

    def load(self, sample: Sample) -> Loaded:
        """Stage 1: the sample's inputs from disk into host memory.

        Raises:
            InputError: the sample has no input this family reads, or a file cannot be read.
        """
        raise NotImplementedError

    # -- stage 2 -------------------------------------------------------------------------

    def frames(self, loaded: Loaded) -> list[np.ndarray] | list[torch.Tensor]:
        """The images of a loaded sample (EventGPT renders its events here). Frames models: as loaded."""
        return list(loaded.frames)

    def preprocess(self, loaded: Loaded, query: str) -> Prepared:
        """Stage 2: images -> CLIP pixels ``[N, 3, S, S]`` on the device (model dtype); prompt -> ids
        ``[S_text]`` (int64 on the device) with the placeholder's position known on the host.

        Raises:
            InputError: the query holds the placeholder text.
            ValueError: a malformed image.
        """
        images = self.frames(loaded)
        size = self.vision.tower.config.image_size
        if self.options.gpu_preprocess:
            pixels = _torch_pixels(images, size, self.device, self.dtype)
        else:
            pixels = self._cpu_pixels(images)
        pixels = pixels.to(self.device, self.dtype, non_blocking=True)
        ids, index = tokenize_prompt(self.prompt, self.tokenizer, query)
        input_ids = torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True)
        shapes = dict(loaded.shapes)
        shapes["preprocess.pixel_values"] = list(pixels.shape)
        shapes["preprocess.input_ids"] = [len(ids)]
        return Prepared(pixels, input_ids, shapes, placeholder_index=index, notes=list(loaded.notes))

    def _cpu_pixels(self, images: Sequence[Any]) -> torch.Tensor:
        """``transformers``' image processor on the host (the reference)."""
        frames = [np.asarray(f) for f in images]
        for i, f in enumerate(frames):
            if f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3:
                raise ValueError(f"preprocess: frame {i} must be an [H, W, 3] uint8 image, got {f.dtype} {f.shape}")
        kwargs: dict[str, Any] = {"return_tensors": "pt"}
        params = inspect.signature(self.image_processor.preprocess).parameters
        if "return_legacy_image_output" in params:  # VideoLlavaImageProcessor: plain pixel_values
            kwargs["return_legacy_image_output"] = False
        if "input_data_format" in params:
            kwargs["input_data_format"] = "channels_last"
        out = self.image_processor(images=frames, **kwargs)
        pv = out["pixel_values"] if "pixel_values" in out else out["pixel_values_images"]
        return pv.to(torch.float32)

    # -- stage 3 -------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_vision(self, prepared: Prepared) -> torch.Tensor:
        """Stage 3: ``[N_vision, d]`` embeddings in LM space (model dtype), computed once."""
        return self.vision(prepared.pixel_values)

    def vision_flops(self, n_images: int) -> float:
        """FLOPs of stage 3 for ``n_images`` images, as the applied options run it."""
        return self.vision.flops(n_images)

    # -- stage 4 (splice) ----------------------------------------------------------------

    @torch.inference_mode()
    def build_inputs_embeds(self, prepared: Prepared, vision: torch.Tensor) -> torch.Tensor:
        """Splice ``vision`` ``[N_v, d]`` at ``prepared.placeholder_index`` (known on the host).

        Returns:
            ``[S_text - 1 + N_v, d]`` LM input embeddings (model dtype), cut at the family's
            ``max_embeds`` as its reference cuts them.

        Raises:
            ValueError: the prompt is longer than the LM's positions (and the family does not cut).
        """
        ids, k = prepared.input_ids, prepared.placeholder_index
        text = self.lm.get_input_embeddings()(ids.clamp_min(0))  # [S_text, d]
        embeds = torch.cat([text[:k], vision.to(text.dtype), text[k + 1:]], dim=0)
        limit = self.prompt.max_embeds
        if limit is not None and embeds.shape[0] > limit:
            prepared.notes.append(f"prompt cut from {embeds.shape[0]} to {limit} positions, as the reference does")
            embeds = embeds[:limit]
        if embeds.shape[0] > self.max_prompt_tokens:
            raise ValueError(f"prompt: {embeds.shape[0]} positions exceed the LM's {self.max_prompt_tokens}")
        return embeds

    # -- the fused reference ------------------------------------------------------------

    def generate_fused(self, prepared: Prepared, max_new_tokens: int, eos_token_id: int | None) -> list[int]:
        """The family's reference path: pixels in, vision computed inside, one ``generate``, greedy."""
        raise NotImplementedError

    def decode_text(self, ids: Sequence[int]) -> str:
        """Generated ids -> text (``transformers``' decoding, special tokens skipped)."""
        return decode_ids(self.tokenizer, ids)

    # -- facts ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight, in the checkpoint's own key layout."""
        return self.weights.state_dict()

    def describe(self) -> dict[str, Any]:
        """Architecture and option facts recorded in ``config.json``."""
        lc, vc = self.lm.config, self.vision.tower.config
        tok = self.tokenizer
        return {
            "family": self.name,
            "preset": self.preset,
            "source": self.source,
            "lm_params": _count(self.lm),
            "vision_params": _count(self.vision.tower) + _count(self.vision.projector),
            "total_params": _count(self.weights),
            "lm": {"vocab_size": lc.vocab_size, "hidden_size": lc.hidden_size, "intermediate_size": lc.intermediate_size,
                   "num_hidden_layers": lc.num_hidden_layers, "num_attention_heads": lc.num_attention_heads,
                   "num_key_value_heads": lc.num_key_value_heads, "max_position_embeddings": lc.max_position_embeddings},
            "vision": {"hidden_size": vc.hidden_size, "num_hidden_layers": vc.num_hidden_layers,
                       "image_size": vc.image_size, "patch_size": vc.patch_size,
                       "feature_layer": self.vision.feature_layer, "cls_kept": self.vision.keep_cls,
                       "layers_run": self.vision.layers_run if self.options.vision.compile else vc.num_hidden_layers,
                       "tokens_per_image": self.vision.tokens_per_image, "pooling": self.vision.projector.pool},
            "n_frames": self.n_frames,
            "n_vision_tokens": self.n_vision_tokens,
            "prompt": {"template": self.prompt.template, "marker": self.prompt.marker, "split": self.prompt.split,
                       "max_embeds": self.prompt.max_embeds},
            "tokenizer": {"class": type(tok).__name__, "len": len(tok), "legacy": getattr(tok, "legacy", None),
                          "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                          "added_tokens": {t.content: i for i, t in tok.added_tokens_decoder.items() if i >= 3}},
            "applied": {"gpu_preprocess": self.options.gpu_preprocess, "fuse_vision": self.options.vision.fuse,
                        "vision_graph": self.options.vision.graph, "vision_fast_tower": self.options.vision.compile,
                        "vision_compile": self.vision.compiled,
                        "per_frame_vision": self.options.vision.per_frame, "window": self.options.window,
                        "sensor_size": self.options.sensor_size},
        }


def _count(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def _torch_pixels(images: Sequence[Any], size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """CLIP pixels with torch on ``device`` (:func:`stagewise.preprocess.clip.clip_preprocess_torch`):
    one call per group of images of one size, in order."""
    from stagewise.preprocess.clip import clip_preprocess_torch

    tensors = [img if isinstance(img, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(img)) for img in images]
    tensors = [t.to(device, non_blocking=True) for t in tensors]
    if len({tuple(t.shape) for t in tensors}) == 1:
        return clip_preprocess_torch(torch.stack(tensors), size, dtype=dtype)
    return torch.cat([clip_preprocess_torch(t[None], size, dtype=dtype) for t in tensors])
