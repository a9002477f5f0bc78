"""Video-LLaVA as a family of the composition (``transformers``' ``VideoLlavaForConditionalGeneration``).

The seeds timed Video-LLaVA with vision fused inside ``generate()`` (stage 3 = 0.0 ms). Here stage 3
computes the function ``get_video_features`` computes, once, and stage 4 splices it, so vision is
timed on its own, never runs twice, and the decoupled tokens equal the fused ones.

Facts of ``LanguageBind/Video-LLaVA-7B-hf`` (its ``config.json``; ``transformers`` 5.17-5.23
``modeling_video_llava.py``):

- tokens: ``<image>`` 32000, ``<video>`` 32001, ``<pad>`` 32002; ``vocab_size`` 32064; LM = Vicuna-7B
  v1.5.
- towers: two CLIP ViT-L/14 at 224 px (``video_tower``, ``image_tower``); one projector.
- ``vision_feature_layer`` -2; for VIDEOS the CLS token is KEPT: 8 frames x ((224/14)^2 + 1) = 2056
  video tokens (``video_seq_length`` 2056).
- frames: 8 sampled evenly; each resized (shortest edge 224, bicubic), center-cropped to 224,
  rescaled 1/255, normalised with the OpenAI CLIP mean/std (``VideoLlavaImageProcessor``).
- prompt ``"USER: <video>\\n{query} ASSISTANT:"`` (model card).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from stagewise.errors import InputError
from stagewise.inputs.video import DEFAULT_N_FRAMES
from stagewise.models.base import Loaded, Sample
from stagewise.models.checkpoint import build_random_hf, check_hf_folder, load_hf
from stagewise.models.llava import (
    LlavaHFModel,
    clip_processor_kwargs,
    frames_of_scene,
    tokenizer_with,
)
from stagewise.models.presets import Preset
from stagewise.preprocess.prompt import PromptFormat

VIDEO_LLAVA_FORMAT = PromptFormat("USER: <video>\n{query} ASSISTANT:", "<video>", split=False)
"""The Video-LLaVA-7B-hf model card's prompt for a video question."""


def video_llava_image_processor(image_size: int = 224) -> Any:
    """``VideoLlavaImageProcessor`` with Video-LLaVA-7B-hf's settings (see the module docstring)."""
    from transformers.models.video_llava.image_processing_video_llava import (
        VideoLlavaImageProcessor,
    )

    return VideoLlavaImageProcessor(**clip_processor_kwargs(image_size))


class VideoLlavaModel(LlavaHFModel):
    """Video-LLaVA: 8 frames -> 8 x 257 = 2056 embeddings (video tower, layer -2, CLS kept)."""

    name = "video-llava"
    n_frames = DEFAULT_N_FRAMES
    prompt = VIDEO_LLAVA_FORMAT

    def _config_placeholder_id(self) -> int:
        return int(self.hf.config.video_token_id)

    def _pixel_kwargs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixel_values_videos": pixel_values[None]}  # [1, F, 3, H, W]

    def load(self, sample: Sample) -> Loaded:
        """Stage 1: ``[8, H, W, 3]`` uint8 RGB frames sampled evenly, from ``sample.video_path`` (MP4 or
        frame folder); else from ``sample.event_image_paths`` (the fairness switch: the very PNGs
        EventGPT reads, 5 frames -> indices 0,1,1,2,2,3,3,4); else from the built-in event scene.

        Raises:
            InputError: none set, or a file cannot be read/decoded.
        """
        from stagewise.inputs.video import read_frame_files, read_video_frames

        if sample.video_path is not None:
            frames = read_video_frames(sample.video_path, self.n_frames)
        elif sample.event_image_paths:
            frames = read_frame_files(list(sample.event_image_paths), self.n_frames)
        elif sample.events is not None:
            frames = frames_of_scene(sample, self.n_frames)
        else:
            raise InputError(None, f"sample {sample.sample_id!r}: Video-LLaVA needs a video, event images or events")
        return Loaded(frames=list(frames), source=str(sample.video_path or sample.sample_id),
                      shapes={"load.frames": list(np.asarray(frames).shape)})


def _video_llava_config(preset: Preset, tok: PreTrainedTokenizerBase) -> PretrainedConfig:
    from transformers import VideoLlavaConfig

    v = preset.vision
    n_img = (v.image_size // v.patch) ** 2
    ids = tok.convert_tokens_to_ids(["<image>", "<video>", "<pad>"])
    return VideoLlavaConfig(
        vision_config=v.clip_config(), text_config=preset.lm.llama_config(preset.lm.vocab_for(len(tok)), pad=0),
        image_token_index=ids[0], video_token_index=ids[1], projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=n_img, video_seq_length=(n_img + 1) * DEFAULT_N_FRAMES, pad_token_id=ids[2],
        tie_word_embeddings=False,
    )


def build(preset: Preset, *, tokenizer: str | Path | None, device: torch.device, dtype: torch.dtype, seed: int) -> VideoLlavaModel:
    """Video-LLaVA with random weights and a preset's exact shapes (``<image>``, ``<video>``, ``<pad>``
    added: 32000-32002 with LLaMA-2's tokenizer).

    Raises:
        InputError: no tokenizer.
    """
    from transformers import VideoLlavaForConditionalGeneration

    tok = tokenizer_with(tokenizer, ["<image>", "<video>", "<pad>"], preset)
    hf = build_random_hf(VideoLlavaForConditionalGeneration, _video_llava_config(preset, tok), device, dtype, seed)
    return VideoLlavaModel(hf, tok, video_llava_image_processor(preset.vision.image_size), tower=hf.model.video_tower,
                           keep_cls=True, preset=preset.name, source="random")


def from_pretrained(path: str | Path, *, device: torch.device, dtype: torch.dtype,
                    tokenizer: str | Path | None = None, vision_tower: str | Path | None = None) -> VideoLlavaModel:
    """Video-LLaVA from a local Hugging Face folder (e.g. a download of ``LanguageBind/Video-LLaVA-7B-hf``).

    Raises:
        InputError: missing folder or files, another model type, a tokenizer whose ``<video>`` id
            differs from the config's.
        ValueError: ``vision_tower`` given (EventGPT checkpoints only).
    """
    from transformers import VideoLlavaForConditionalGeneration
    from transformers.models.video_llava.image_processing_video_llava import (
        VideoLlavaImageProcessor,
    )

    if vision_tower is not None:
        raise ValueError("vision_tower: applies to EventGPT checkpoints only (llava-hf folders hold their tower)")
    path = Path(path)
    check_hf_folder(path, "video_llava")
    tok = tokenizer_with(tokenizer or path, ["<image>", "<video>"], None)
    hf = load_hf(VideoLlavaForConditionalGeneration, path, torch.device(device), dtype)
    return VideoLlavaModel(hf, tok, VideoLlavaImageProcessor.from_pretrained(path), tower=hf.model.video_tower,
                           keep_cls=True, preset=None, source=str(path))
