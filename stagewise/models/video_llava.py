"""Video-LLaVA (``transformers``' ``VideoLlavaForConditionalGeneration``) as five stages.

The seeds timed Video-LLaVA with vision fused inside ``generate()`` (stage 3 = 0.0 ms).
Here stage 3 calls ``get_video_features`` -- the method ``forward`` itself uses -- once,
and stage 4 splices its output into the text embeddings, so vision is timed on its own,
never runs twice, and the decoupled tokens equal the fused ones (tests, ``stagewise verify``).

Facts of ``LanguageBind/Video-LLaVA-7B-hf`` (its ``config.json``; ``transformers``
5.17-5.23 ``modeling_video_llava.py``):

- tokens: ``<image>`` 32000, ``<video>`` 32001, ``<pad>`` 32002; ``vocab_size`` 32064;
  LM = Vicuna-7B v1.5 (LLaMA, hidden 4096, 32 layers, 32 heads, MLP 11008).
- towers: two CLIP ViT-L/14 at 224 px (``video_tower``, ``image_tower``; hidden 1024, 24
  layers, 16 heads, MLP 4096); one projector Linear(1024, 4096) -> GELU -> Linear(4096, 4096).
- ``vision_feature_layer`` -2; for VIDEOS the CLS token is KEPT (``get_video_features``
  ignores ``vision_feature_select_strategy``, which only crops images): 8 frames x
  ((224/14)^2 + 1) = 8 x 257 = 2056 video tokens (``video_seq_length`` 2056 in the config).
- frames: 8 sampled evenly over the clip; each resized (shortest edge 224, bicubic),
  center-cropped to 224, rescaled 1/255, normalised with the OpenAI CLIP mean/std
  (``VideoLlavaImageProcessor``, numpy/PIL; the torchvision-only video processor is not used,
  so the pixels are the same with or without torchvision).
- prompt ``"USER: <video>\\n{query} ASSISTANT:"`` (model card).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from stagewise.errors import InputError
from stagewise.models.base import Prepared, Sample
from stagewise.models.llava import (
    _TINY_LM,
    _TINY_VISION,
    LlavaFamilyModel,
    LlavaPreset,
    as_dtype,
    build_llama_tokenizer,
    build_random_hf,
    check_checkpoint_folder,
    clip_processor_kwargs,
    get_preset,
    load_pretrained_hf,
    text_config,
    vision_config,
)
from stagewise.inputs.video import DEFAULT_N_FRAMES, read_frame_files, read_video_frames

VIDEO_LLAVA_PROMPT = "USER: <video>\n{query} ASSISTANT:"
"""The Video-LLaVA-7B-hf model card's prompt for a video question."""

IMAGE_TOKEN_ID = 32000
VIDEO_TOKEN_ID = 32001
PAD_TOKEN_ID = 32002

PRESETS: dict[str, LlavaPreset] = {
    "video-llava-7b": LlavaPreset("video-llava-7b", image_size=224),
    # Same frames, image size, 2056 video tokens, vocabulary and processor; tiny towers and LM.
    "video-llava-tiny": LlavaPreset("video-llava-tiny", image_size=224, **_TINY_LM, **_TINY_VISION),
}
"""Video-LLaVA presets: ``video-llava-7b`` (exact shapes) and ``video-llava-tiny`` (CPU tests)."""


def video_llava_image_processor(image_size: int = 224) -> Any:
    """``VideoLlavaImageProcessor`` with Video-LLaVA-7B-hf's settings (see the module docstring)."""
    from transformers.models.video_llava.image_processing_video_llava import (
        VideoLlavaImageProcessor,
    )

    return VideoLlavaImageProcessor(**clip_processor_kwargs(image_size))


class VideoLlavaModel(LlavaFamilyModel):
    """Video-LLaVA as five stages: 8 frames -> 8 x 257 = 2056 embeddings (CLS kept, layer -2)."""

    name = "video-llava"
    prompt_template = VIDEO_LLAVA_PROMPT
    placeholder_token = "<video>"
    n_frames = DEFAULT_N_FRAMES

    def _config_placeholder_id(self) -> int:
        return int(self.hf.config.video_token_id)

    def cls_kept(self) -> bool:
        """Always: ``get_video_features`` keeps the CLS token of every frame."""
        return True

    def _pixel_kwargs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixel_values_videos": pixel_values[None]}  # [1, F, 3, H, W]

    def _vision_tower_params(self) -> int:
        """The video tower only (the image tower is loaded but idle for videos)."""
        return self._param_count(self.hf.model.video_tower)

    def load(self, sample: Sample) -> np.ndarray:
        """Stage 1: ``[8, H, W, 3]`` uint8 RGB, frames sampled evenly.

        From ``sample.video_path`` (MP4 or frame folder); when it is None, from
        ``sample.event_image_paths`` (the fairness switch: the very PNGs EventGPT reads,
        e.g. 5 event frames -> indices 0,1,1,2,2,3,3,4).

        Raises:
            InputError: neither set, or a file cannot be read/decoded.
        """
        if sample.video_path is not None:
            return read_video_frames(sample.video_path, self.n_frames)
        if sample.event_image_paths:
            return read_frame_files(list(sample.event_image_paths), self.n_frames)
        raise InputError(None, f"sample {sample.sample_id!r}: Video-LLaVA needs video_path or "
                         "event_image_paths")

    @torch.inference_mode()
    def encode_vision(self, prepared: Prepared) -> torch.Tensor:
        """Stage 3: ``[F * 257, hidden]`` -- ``hf.model.get_video_features`` on the ``F`` frames
        (video tower, ``vision_feature_layer``, CLS kept, projector), the call ``forward``
        makes inside ``generate``; frame-major order, as ``masked_scatter`` fills it."""
        out = self.hf.model.get_video_features(
            pixel_values_videos=prepared.pixel_values[None],  # [1, F, 3, H, W]
            vision_feature_layer=self.hf.config.vision_feature_layer,
        )
        feats = out.pooler_output if hasattr(out, "pooler_output") else out  # [F, 257, D]
        return feats.flatten(0, 1)  # [F * 257, D]


def _video_llava_config(p: LlavaPreset) -> Any:
    from transformers import VideoLlavaConfig

    n_img = (p.image_size // p.vision_patch_size) ** 2
    return VideoLlavaConfig(
        vision_config=vision_config(p), text_config=text_config(p, pad_token_id=0),
        image_token_index=IMAGE_TOKEN_ID, video_token_index=VIDEO_TOKEN_ID, projector_hidden_act="gelu",
        vision_feature_layer=p.vision_feature_layer,
        vision_feature_select_strategy=p.vision_feature_select_strategy,
        image_seq_length=n_img, video_seq_length=(n_img + 1) * DEFAULT_N_FRAMES,
        pad_token_id=PAD_TOKEN_ID, tie_word_embeddings=False,
    )


def build_random(preset: str, *, device: str | torch.device, dtype: torch.dtype | str, seed: int = 0,
                 tokenizer_path: str | Path | None = None) -> VideoLlavaModel:
    """Video-LLaVA with random weights and a preset's exact shapes.

    Args:
        preset: a key of :data:`PRESETS` (``"video-llava-7b"``, ``"video-llava-tiny"``).
        device: where the weights are created (directly; ``"meta"`` for shapes only).
        dtype: weight dtype (``torch.bfloat16`` or a name such as ``"bf16"``).
        seed: ``torch.manual_seed`` before initialisation.
        tokenizer_path: LLaMA-2 ``tokenizer.model`` (or its folder); None: the shared one.

    Returns:
        :class:`VideoLlavaModel` with ``<image>`` 32000, ``<video>`` 32001, ``<pad>`` 32002
        added to the tokenizer and the real frame processor.

    Raises:
        ValueError: unknown preset or dtype.
        InputError: no tokenizer.
    """
    from transformers import VideoLlavaForConditionalGeneration

    p = get_preset(PRESETS, preset)
    tok = build_llama_tokenizer(
        tokenizer_path, [("<image>", IMAGE_TOKEN_ID), ("<video>", VIDEO_TOKEN_ID), ("<pad>", PAD_TOKEN_ID)])
    hf = build_random_hf(VideoLlavaForConditionalGeneration, _video_llava_config(p), torch.device(device),
                         as_dtype(dtype), seed)
    return VideoLlavaModel(hf, tok, video_llava_image_processor(p.image_size), preset=p.name, source="random")


def from_pretrained(path: str | Path, *, device: str | torch.device,
                    dtype: torch.dtype | str) -> VideoLlavaModel:
    """Video-LLaVA from a local Hugging Face folder (e.g. a download of ``LanguageBind/Video-LLaVA-7B-hf``).

    Reads ``config.json`` (``model_type: "video_llava"``) and the weights
    (``VideoLlavaForConditionalGeneration``), the tokenizer (``AutoTokenizer``) and
    ``preprocessor_config.json`` (``VideoLlavaImageProcessor``).

    Raises:
        InputError: missing folder or files, a config of another model type, or a tokenizer
            whose ``<video>`` id differs from the config's.
    """
    from transformers import AutoTokenizer, VideoLlavaForConditionalGeneration
    from transformers.models.video_llava.image_processing_video_llava import (
        VideoLlavaImageProcessor,
    )

    path = Path(path)
    check_checkpoint_folder(path, "video_llava")
    tok = AutoTokenizer.from_pretrained(path)
    improc = VideoLlavaImageProcessor.from_pretrained(path)
    hf = load_pretrained_hf(VideoLlavaForConditionalGeneration, path, torch.device(device), as_dtype(dtype))
    return VideoLlavaModel(hf, tok, improc, preset=None, source=str(path))
