"""LLaVA-1.5 as a family of the composition (:mod:`stagewise.models.family`), and the parts the
llava-hf families share (:class:`LlavaHFModel`, also used by :mod:`stagewise.models.video_llava`).

A llava-hf checkpoint is a ``transformers`` multimodal model (``LlavaForConditionalGeneration``);
its parts are composed as-is (shared, not copied): the CLIP tower, the projector
``linear_1 -> GELU -> linear_2``, and a ``LlamaForCausalLM`` view of its decoder and head
(:func:`stagewise.models.checkpoint.lm_view`). ``transformers`` computes the vision features inside
``forward``/``generate``; here stage 3 computes the very same function once (layer
``vision_feature_layer``, CLS per ``vision_feature_select_strategy``, the projector) and stage 4
splices it, so the decoupled path reproduces the fused ``generate`` token for token (tests,
``stagewise verify``); the fused path stays available as the reference.

Facts of ``llava-hf/llava-1.5-7b-hf`` (its ``config.json``): ``image_token_index`` 32000,
``pad_token_id`` 32001, ``vocab_size`` 32064, ``vision_feature_layer`` -2 (the output of the 23rd of
24 CLIP layers), ``vision_feature_select_strategy`` ``"default"`` (CLS dropped) -> (336/14)^2 = 576
image tokens; image processor: shortest edge 336 (bicubic), center crop 336, rescale 1/255, OpenAI
CLIP mean/std. Prompt ``"USER: <image>\\n{query} ASSISTANT:"``, tokenized whole with ``<image>`` an
added special token (the llava-hf processor's way).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    CLIPVisionModel,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.image_processing_utils import BaseImageProcessor

from stagewise.errors import InputError
from stagewise.models.base import Loaded, Prepared, Sample
from stagewise.models.checkpoint import (
    build_random_hf,
    check_hf_folder,
    lm_view,
    load_hf,
)
from stagewise.models.family import VisionLanguageModel
from stagewise.models.presets import Preset
from stagewise.models.vision import Projector, VisionStage
from stagewise.preprocess.clip import CLIP_MEAN, CLIP_STD
from stagewise.preprocess.prompt import PromptFormat, load_tokenizer

LLAVA_FORMAT = PromptFormat("USER: <image>\n{query} ASSISTANT:", "<image>", split=False)
"""The llava-hf model card's prompt for LLaVA-1.5 (one image, before the question)."""


def clip_processor_kwargs(image_size: int) -> dict[str, Any]:
    """The CLIP preprocessing settings the llava-hf processors use: shortest edge ``image_size``
    (bicubic), center crop, rescale 1/255, OpenAI CLIP mean/std, RGB."""
    return dict(
        do_resize=True, size={"shortest_edge": image_size}, resample=3, do_center_crop=True,
        crop_size={"height": image_size, "width": image_size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True,
    )


class LlavaHFModel(VisionLanguageModel):
    """A llava-hf model composed from its parts (see the module docstring).

    Args:
        hf: the ``transformers`` multimodal model (kept: the fused reference and saving use it).
        tower: the CLIP tower stage 3 runs (``vision_tower``, or Video-LLaVA's ``video_tower``).
        keep_cls: keep each frame's CLS token.

    Raises:
        InputError: the tokenizer's placeholder id differs from the config's.
    """

    def __init__(self, hf: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, image_processor: BaseImageProcessor, *,
                 tower: CLIPVisionModel, keep_cls: bool,
                 preset: str | None, source: str) -> None:
        mmp = hf.model.multi_modal_projector
        vision = VisionStage(tower, Projector(mmp.linear_1, mmp.act, mmp.linear_2),
                             feature_layer=int(hf.config.vision_feature_layer), keep_cls=keep_cls)
        super().__init__(lm=lm_view(hf), vision=vision, tokenizer=tokenizer, image_processor=image_processor,
                         weights=hf, preset=preset, source=source)
        self.hf = hf
        self.placeholder_id = int(tokenizer.convert_tokens_to_ids(self.prompt.marker))
        if self.placeholder_id != self._config_placeholder_id():
            raise InputError(None if source == "random" else source,
                             f"tokenizer maps {self.prompt.marker} to {self.placeholder_id}, but the model "
                             f"config expects {self._config_placeholder_id()}")

    def _config_placeholder_id(self) -> int:
        raise NotImplementedError

    def _pixel_kwargs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """``generate`` keyword for the pixels ``[N, 3, H, W]``."""
        raise NotImplementedError

    def expanded_input_ids(self, prepared: Prepared) -> torch.Tensor:
        """``input_ids`` with the placeholder repeated once per vision token (``transformers``' layout).

        Returns:
            ``[S_text - 1 + N_vision]`` int64 on the device.
        """
        ids, p = prepared.input_ids, prepared.placeholder_index
        n = self.vision.n_tokens(prepared.pixel_values.shape[0])
        return torch.cat([ids[:p], ids.new_full((n,), self.placeholder_id), ids[p + 1:]])

    @torch.inference_mode()
    def generate_fused(self, prepared: Prepared, max_new_tokens: int, eos_token_id: int | None) -> list[int]:
        """The fused reference: ONE ``hf.generate`` call from pixels and the expanded prompt, greedy.

        Args:
            eos_token_id: stop after this token; None: exactly ``max_new_tokens`` tokens (the
                model's default EOS is switched off too).

        Raises:
            ValueError: ``max_new_tokens < 1``.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids = self.expanded_input_ids(prepared)  # [S_prefill]
        gc = copy.deepcopy(self.hf.generation_config)
        gc.max_new_tokens, gc.max_length, gc.min_new_tokens, gc.min_length = max_new_tokens, None, None, 0
        gc.do_sample, gc.num_beams = False, 1
        gc.temperature = gc.top_p = gc.top_k = None
        gc.eos_token_id = eos_token_id
        saved = self.hf.generation_config
        self.hf.generation_config = gc  # generate() fills unset (None) fields from here
        try:
            out = self.hf.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None],
                                   generation_config=gc, **self._pixel_kwargs(prepared.pixel_values))
        finally:
            self.hf.generation_config = saved
        return out[0, ids.numel():].tolist()

    def describe(self) -> dict[str, Any]:
        """:meth:`VisionLanguageModel.describe` plus the ``transformers`` class and its vision settings."""
        d = super().describe()
        d["hf_class"] = type(self.hf).__name__
        d["vision"]["feature_select_strategy"] = self.hf.config.vision_feature_select_strategy
        d["placeholder_token_id"] = self.placeholder_id
        return d

    def save_pretrained(self, path: str | Path) -> Path:
        """Write model, tokenizer and image processor as a Hugging Face folder (what this family's
        ``from_pretrained`` reads). Returns the folder."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        return path


def frames_of_scene(sample: Sample, n: int) -> np.ndarray | None:
    """The built-in event scene rendered as frames for the frame models: the 5 event images of
    ``sample.events`` (EventGPT's renderer, sensor size), sampled evenly to ``n`` frames."""
    if sample.events is None:
        return None
    from stagewise.inputs.video import sample_indices
    from stagewise.preprocess.render import render_event_images

    images = render_event_images(sample.events.events, 5, sample.events.sensor_size)
    return np.stack([images[i] for i in sample_indices(len(images), n)])


class LlavaModel(LlavaHFModel):
    """LLaVA-1.5: one image -> 576 embeddings (layer -2, CLS dropped)."""

    name = "llava-1.5"
    n_frames = 1
    prompt = LLAVA_FORMAT

    def _config_placeholder_id(self) -> int:
        return int(self.hf.config.image_token_id)

    def _pixel_kwargs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixel_values": pixel_values}

    def load(self, sample: Sample) -> Loaded:
        """Stage 1: one ``[H, W, 3]`` uint8 RGB image: ``sample.image_path``; else the middle frame of
        ``sample.video_path`` (MP4 or folder), of ``sample.event_image_paths``, or of the built-in scene.

        Raises:
            InputError: none of them set, or the file cannot be read.
        """
        from stagewise.inputs.video import read_image, read_middle_frame

        if sample.image_path is not None:
            frames = read_image(sample.image_path)[None]
        elif sample.video_path is not None:
            frames = read_middle_frame(sample.video_path)
        elif sample.event_image_paths:
            paths = list(sample.event_image_paths)
            frames = read_image(paths[(len(paths) - 1) // 2])[None]
        elif sample.events is not None:
            frames = frames_of_scene(sample, 1)
        else:
            raise InputError(None, f"sample {sample.sample_id!r}: LLaVA-1.5 needs an image, a video, event images or events")
        return Loaded(frames=list(frames), source=str(sample.image_path or sample.video_path or sample.sample_id),
                      shapes={"load.frames": list(np.asarray(frames).shape)})


def llava_image_processor(image_size: int) -> Any:
    """CLIP image processor with llava-1.5-7b-hf's settings, PIL backend (the same pixels with or
    without torchvision installed)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(**clip_processor_kwargs(image_size))


def _llava_config(preset: Preset, tok: PreTrainedTokenizerBase) -> PretrainedConfig:
    from transformers import LlavaConfig

    image_id, pad_id = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<pad>")
    v = preset.vision
    return LlavaConfig(
        vision_config=v.clip_config(), text_config=preset.lm.llama_config(preset.lm.vocab_for(len(tok)), pad=None),
        image_token_index=image_id, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=(v.image_size // v.patch) ** 2,
        pad_token_id=pad_id, tie_word_embeddings=False,
    )


def tokenizer_with(tokenizer: str | Path | None, added: list[str], preset: Preset | None) -> Any:
    """The family's tokenizer: ``added`` special tokens (``<pad>`` becomes the pad token)."""
    tok = load_tokenizer(tokenizer, added, fallback=preset.tokenizer if preset else None)
    if "<pad>" in added:
        tok.pad_token = "<pad>"
    return tok


def build(preset: Preset, *, tokenizer: str | Path | None, device: torch.device, dtype: torch.dtype, seed: int) -> LlavaModel:
    """LLaVA-1.5 with random weights and a preset's exact shapes (``<image>`` and ``<pad>`` added to
    the tokenizer: 32000 and 32001 with LLaMA-2's).

    Raises:
        InputError: no tokenizer.
    """
    from transformers import LlavaForConditionalGeneration

    tok = tokenizer_with(tokenizer, ["<image>", "<pad>"], preset)
    hf = build_random_hf(LlavaForConditionalGeneration, _llava_config(preset, tok), device, dtype, seed)
    return LlavaModel(hf, tok, llava_image_processor(preset.vision.image_size), tower=hf.model.vision_tower,
                      keep_cls=False, preset=preset.name, source="random")


def from_pretrained(path: str | Path, *, device: torch.device, dtype: torch.dtype,
                    tokenizer: str | Path | None = None, vision_tower: str | Path | None = None) -> LlavaModel:
    """LLaVA-1.5 from a local Hugging Face folder (e.g. a download of ``llava-hf/llava-1.5-7b-hf``):
    ``LlavaForConditionalGeneration``, the folder's tokenizer (or ``tokenizer``) and processor settings.

    Raises:
        InputError: missing folder or files, another model type, a tokenizer whose ``<image>`` id
            differs from the config's.
        ValueError: ``vision_tower`` given (EventGPT checkpoints only).
    """
    from transformers import LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if vision_tower is not None:
        raise ValueError("vision_tower: applies to EventGPT checkpoints only (llava-hf folders hold their tower)")
    path = Path(path)
    check_hf_folder(path, "llava")
    tok = tokenizer_with(tokenizer or path, ["<image>"], None)
    hf = load_hf(LlavaForConditionalGeneration, path, torch.device(device), dtype)
    keep = hf.config.vision_feature_select_strategy == "full"
    return LlavaModel(hf, tok, CLIPImageProcessorPil.from_pretrained(path), tower=hf.model.vision_tower,
                      keep_cls=keep, preset=None, source=str(path))
