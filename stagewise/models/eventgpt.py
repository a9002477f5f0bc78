"""EventGPT as a family of the LLaVA composition (:mod:`stagewise.models.family`).

What differs from LLaVA (``../shared/spec/EVENTGPT.md``; the released code XduSyL/EventGPT):

- stage 1 reads an event stream (or pre-rendered event PNGs); streams of 100 ms or more are refused
  (``check_EventStream_length``) unless windowed;
- stage 2 cuts the stream into 5 parts of equal event count and renders each as an event image
  (:mod:`stagewise.preprocess.render`), then CLIP's 336-px pixels;
- the prompt is split on ``<event>`` (:data:`stagewise.preprocess.prompt.EVENTGPT_FORMAT`);
- stage 3 uses the tower's ``last_hidden_state`` (CLS kept), a projector
  ``Linear(1024, 4096) -> GELU -> Linear(4096, 4096)``, the feature adaptor ``Linear(4096, 4096)``
  per frame, then spatio-temporal pooling to ``T + 577 = 582`` tokens.

A released checkpoint folder (``model_type: "EventChat_llama"``) loads unchanged: its keys
``model.*``/``lm_head.*`` go to the LLaMA, ``model.visual_projector.*``, ``model.feature_adaptor.*``
and ``model.visual_tower.visual_tower.vision_model.*`` to the vision side
(:func:`checkpoint_key_to_module_key`); ``mm_visual_tower`` names the CLIP folder (its config,
processor settings and, when the checkpoint lacks them, tower weights), resolved against the
checkpoint folder when relative. The reference builds the tower and projector in bf16 whatever
dtype is asked; here every weight takes the requested dtype (an exact upcast of bf16 weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)
from transformers.image_processing_utils import BaseImageProcessor

from stagewise.errors import InputError
from stagewise.models.base import Loaded, Prepared, Sample
from stagewise.models.checkpoint import read_config, read_shard, weight_files
from stagewise.models.family import VisionLanguageModel
from stagewise.models.presets import Preset
from stagewise.models.vision import Projector, VisionStage
from stagewise.preprocess.prompt import (
    EVENTGPT_FORMAT,
    eventgpt_added_tokens,
    load_tokenizer,
)

N_FRAMES = 5
"""Event images per sample (EventGPT cuts the stream into 5 parts of equal event count)."""

MAX_DURATION_US = 100_000
"""The released model refuses streams of 100 ms or more (``t.max - t.min``)."""

TOWER_CKPT_PREFIX = "model.visual_tower.visual_tower.vision_model."
"""Where EventGPT's released checkpoints keep the CLIP tower weights."""

CLIP_L14_336_NAME = "clip-vit-large-patch14-336"


class EventGPTWeights(nn.Module):
    """EventGPT's weights in one module (``lm``, ``visual_tower``, ``visual_projector``,
    ``feature_adaptor``), the layout :func:`checkpoint_key_to_module_key` maps to."""

    def __init__(self, llama: LlamaConfig, vision: CLIPVisionConfig) -> None:
        super().__init__()
        llama._attn_implementation = "sdpa"
        vision._attn_implementation = "sdpa"
        self.lm = LlamaForCausalLM(llama)
        self.visual_tower = CLIPVisionModel(vision)
        d_v, d = vision.hidden_size, llama.hidden_size
        self.visual_projector = nn.Sequential(nn.Linear(d_v, d), nn.GELU(), nn.Linear(d, d))
        self.feature_adaptor = nn.Linear(d, d)


class EventGPT(VisionLanguageModel):
    """EventGPT: events -> 5 event images -> CLIP -> projector -> adaptor -> pooling -> LLaMA.

    Attributes:
        use_start_end / use_patch_token: the checkpoint's ``mm_use_im_start_end`` /
            ``mm_use_im_patch_token`` (which tokens the tokenizer adds; the prompt text is the same).
    """

    name = "eventgpt"
    n_frames = N_FRAMES
    prompt = EVENTGPT_FORMAT

    def __init__(self, weights: EventGPTWeights, tokenizer: PreTrainedTokenizerBase, image_processor: BaseImageProcessor, *, preset: str | None,
                 source: str, use_start_end: bool = False, use_patch_token: bool = True) -> None:
        vp = weights.visual_projector
        vision = VisionStage(weights.visual_tower, Projector(vp[0], vp[1], vp[2], weights.feature_adaptor, pool=True),
                             feature_layer=-1, keep_cls=True)
        super().__init__(lm=weights.lm, vision=vision, tokenizer=tokenizer, image_processor=image_processor,
                         weights=weights, preset=preset, source=source)
        self.use_start_end, self.use_patch_token = use_start_end, use_patch_token

    def load(self, sample: Sample) -> Loaded:
        """Stage 1: the event stream (file or in-memory) or the pre-rendered PNG frames.

        A sample with ``window_us`` (``--window-ms``) reads only that window of its file
        (:func:`stagewise.inputs.samples.read_sample_events`); its ``trust_pickle`` and
        ``input_error`` are honoured there.

        Raises:
            InputError: no input, an unreadable file (any reader failure, one line), a bad stream,
                a stream of 100 ms or more without ``window``.
        """
        from stagewise.inputs import events as ev
        from stagewise.inputs.samples import read_sample_events

        if sample.input_error:
            raise InputError(None, sample.input_error)
        if sample.events is not None:
            stream = sample.events
        elif sample.events_path is not None:
            stream = read_sample_events(sample, self.options.sensor_size)
        elif sample.event_image_paths:
            frames = ev.read_event_frames(sample.event_image_paths)
            return Loaded(frames=frames, source=str(sample.event_image_paths[0]),
                          shapes={"load.frames": [len(frames), *frames[0].shape]})
        else:
            raise InputError(None, f"sample {sample.sample_id}: EventGPT needs events, an event file or event images")
        stream = ev.check_duration(stream, max_duration_us=MAX_DURATION_US, window=self.options.window)
        return Loaded(stream=stream, source=stream.source, shapes={"load.events": [len(stream.events)]},
                      notes=list(stream.notes))

    def frames(self, loaded: Loaded) -> list[np.ndarray] | list[torch.Tensor]:
        """The 5 event images: each part's extent or the sensor size (one rule for both paths)."""
        from stagewise.preprocess import render

        if loaded.stream is None:
            return list(loaded.frames)
        stream = loaded.stream
        size = self.options.sensor_size or stream.sensor_size
        if self.options.gpu_preprocess:
            images = render.render_event_images_torch(stream.events, self.n_frames, size, device=self.device)
        else:
            images = render.render_event_images(stream.events, self.n_frames, size)
        loaded.shapes["preprocess.event_images"] = [len(images), *images[0].shape]
        return images

    @torch.inference_mode()
    def generate_fused(self, prepared: Prepared, max_new_tokens: int, eos_token_id: int | None) -> list[int]:
        """The reference's ``generate``: embeddings spliced from pixels, one ``lm.generate``, greedy."""
        embeds = self.build_inputs_embeds(prepared, self.encode_vision(prepared))[None]
        return hf_generate(self.lm, embeds, max_new_tokens, eos_token_id)


def hf_generate(lm: LlamaForCausalLM, inputs_embeds: torch.Tensor, max_new_tokens: int, eos_token_id: int | None) -> list[int]:
    """``lm.generate`` from ``inputs_embeds`` ``[1, S, d]``: greedy, KV cache, new ids only.

    With ``eos_token_id=None`` it generates exactly ``max_new_tokens`` tokens.
    """
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens if eos_token_id is None else 0,
        do_sample=False, num_beams=1, eos_token_id=eos_token_id, pad_token_id=0, use_cache=True,
    )
    mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
    ids = lm.generate(inputs_embeds=inputs_embeds, attention_mask=mask, generation_config=cfg)[0].tolist()
    if eos_token_id is not None and eos_token_id in ids:
        ids = ids[: ids.index(eos_token_id) + 1]
    return ids


# -- the released checkpoint layout ----------------------------------------------------------


def checkpoint_key_to_module_key(key: str, tower_prefix: str = "vision_model.") -> str | None:
    """Map a released EventGPT weight key to :class:`EventGPTWeights`' parameter name.

    Args:
        tower_prefix: the prefix of ``CLIPVisionModel``'s own keys in the installed
            ``transformers`` (``"vision_model."`` in 4.x, ``""`` in 5.x where the wrapper
            was flattened); :func:`tower_key_prefix` reads it off a model.

    Returns ``None`` for keys with no parameter here (e.g. ``rotary_emb.inv_freq``).
    """
    if key.endswith("rotary_emb.inv_freq") or key.endswith("position_ids"):
        return None
    if key.startswith(TOWER_CKPT_PREFIX):
        return "visual_tower." + tower_prefix + key[len(TOWER_CKPT_PREFIX):]
    for src, dst in (("model.visual_projector.", "visual_projector."), ("model.feature_adaptor.", "feature_adaptor.")):
        if key.startswith(src):
            return dst + key[len(src):]
    if key.startswith("model.visual_tower."):
        return None  # EventGPT's tower wrapper holds no other weights
    if key.startswith(("model.", "lm_head.")):
        return "lm." + key
    return None


def module_key_to_checkpoint_key(key: str, tower_prefix: str = "vision_model.") -> str:
    """Inverse of :func:`checkpoint_key_to_module_key` (used to save the released layout)."""
    if key.startswith("visual_tower."):
        rest = key[len("visual_tower."):]
        return TOWER_CKPT_PREFIX + (rest[len(tower_prefix):] if tower_prefix and rest.startswith(tower_prefix) else rest)
    for src, dst in (("visual_projector.", "model.visual_projector."), ("feature_adaptor.", "model.feature_adaptor."), ("lm.", "")):
        if key.startswith(src):
            return dst + key[len(src):]
    raise KeyError(key)


def tower_key_prefix(tower: nn.Module) -> str:
    """``"vision_model."`` when the installed ``CLIPVisionModel`` nests its weights under it, else ``""``."""
    return "vision_model." if any(k.startswith("vision_model.") for k in tower.state_dict()) else ""


class _default_dtype:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __enter__(self) -> None:
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc: object) -> None:
        torch.set_default_dtype(self.old)


def _image_processor(folder: Path | None, image_size: int) -> Any:
    """The CLIP processor of the tower folder (``preprocessor_config.json``), else CLIP-L/14-336's settings."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from stagewise.preprocess.clip import clip_image_processor

    if folder is not None and (folder / "preprocessor_config.json").is_file():
        return CLIPImageProcessorPil.from_pretrained(str(folder))
    return clip_image_processor(image_size)


def build(preset: Preset, *, tokenizer: str | Path | None, device: torch.device, dtype: torch.dtype, seed: int) -> EventGPT:
    """An EventGPT preset with random weights, built directly on ``device`` in ``dtype``, mirroring
    the released configuration (``mm_use_im_start_end`` false, ``mm_use_im_patch_token`` true).

    Raises:
        InputError: no tokenizer.
    """
    tok = load_tokenizer(tokenizer, eventgpt_added_tokens(True, False), fallback=preset.tokenizer)
    llama = preset.lm.llama_config(preset.lm.vocab_for(len(tok)), bos=tok.bos_token_id, eos=tok.eos_token_id)
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        weights = EventGPTWeights(llama, preset.vision.clip_config())
    weights.eval().requires_grad_(False)
    return EventGPT(weights, tok, _image_processor(None, preset.vision.image_size), preset=preset.name, source="random")


def _vision_config(cfg: dict[str, Any], folder: Path, vision_tower: str | Path | None) -> tuple[CLIPVisionConfig, Path | None]:
    name = str(vision_tower or cfg.get("mm_visual_tower") or cfg.get("mm_vision_tower") or "")
    local = Path(name) if name else None
    if local is not None and not local.is_absolute():
        local = folder / name  # the reference resolves it against its working directory: the checkpoint
    if local is not None and (local / "config.json").is_file():
        return CLIPVisionConfig.from_pretrained(local), local
    if CLIP_L14_336_NAME in name:
        from stagewise.models.presets import CLIP_L14_336

        return CLIP_L14_336.clip_config(), None
    raise InputError(folder / "config.json", f"mm_visual_tower {name!r} is neither a local CLIP folder nor {CLIP_L14_336_NAME}; pass --vision-tower PATH")


def from_pretrained(folder: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                    vision_tower: str | Path | None = None, tokenizer: str | Path | None = None) -> EventGPT:
    """Load a released EventGPT checkpoint folder, unchanged.

    Reads ``config.json`` (``model_type: "EventChat_llama"``), the weight shards (``.safetensors`` or
    ``.bin``, single or indexed), the tokenizer (``transformers``' ``LlamaTokenizer`` from the folder,
    or ``tokenizer``) with the added tokens the config implies, and the CLIP tower: from the
    checkpoint's ``model.visual_tower.*`` keys when saved there, else from ``mm_visual_tower`` (or
    ``vision_tower``) when it is a local CLIP folder.

    Raises:
        InputError: missing folder/config/shards, wrong ``model_type``, unreadable shard, a weight
            whose shape disagrees with the config, or weights missing for some parameters (listed).
    """
    folder = Path(folder)
    cfg = read_config(folder, "EventChat_llama")
    use_start_end = bool(cfg.get("mm_use_im_start_end", False))
    use_patch = bool(cfg.get("mm_use_im_patch_token", True))
    tok = load_tokenizer(tokenizer or folder, eventgpt_added_tokens(use_patch, use_start_end))
    llama_fields = {k: v for k, v in cfg.items() if not k.startswith("mm_") and k not in (
        "model_type", "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "event_feature_adaptor")}
    llama = LlamaConfig(**llama_fields)
    vcfg, tower_dir = _vision_config(cfg, folder, vision_tower)
    device = torch.device(device)
    with torch.device(device), _default_dtype(dtype):
        weights = EventGPTWeights(llama, vcfg)
    expected = set(weights.state_dict())
    if llama.tie_word_embeddings:
        expected.discard("lm.lm_head.weight")
    loaded: set[str] = set()
    params = dict(weights.named_parameters())
    params.update(dict(weights.named_buffers()))
    prefix = tower_key_prefix(weights.visual_tower)
    for shard in weight_files(folder):
        for key, tensor in read_shard(shard, device).items():
            mk = checkpoint_key_to_module_key(key, prefix)
            if mk is None or mk not in params:
                continue
            if params[mk].shape != tensor.shape:
                raise InputError(shard, f"{key}: shape {list(tensor.shape)} does not match the config's {list(params[mk].shape)}")
            with torch.no_grad():
                params[mk].copy_(tensor)
            loaded.add(mk)
    missing_tower = sorted(k for k in expected - loaded if k.startswith("visual_tower."))
    if missing_tower and tower_dir is not None:
        tower = CLIPVisionModel.from_pretrained(tower_dir, dtype=dtype).to(device)
        weights.visual_tower.load_state_dict(tower.state_dict(), strict=False)
        loaded |= {"visual_tower." + k for k in tower.state_dict()}
    buffers = {k for k, _ in weights.named_buffers()}
    missing = sorted(k for k in expected - loaded if k not in buffers)
    if missing:
        shown = [module_key_to_checkpoint_key(k, prefix) for k in missing[:8]]
        more = f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""
        raise InputError(folder, f"checkpoint is missing {len(missing)} weights: {', '.join(shown)}{more}")
    if len(tok) > llama.vocab_size:
        raise InputError(folder, f"the tokenizer has {len(tok)} tokens but the LM only {llama.vocab_size} embedding rows")
    weights.eval().requires_grad_(False)
    return EventGPT(weights, tok, _image_processor(tower_dir, vcfg.image_size), preset=None, source=str(folder),
                    use_start_end=use_start_end, use_patch_token=use_patch)


def save_checkpoint(model: EventGPT, folder: str | Path, *, safetensors: bool = True, max_shard_bytes: int = 2**30) -> Path:
    """Write ``model`` in EventGPT's released layout (config, shards + index, tokenizer files, the
    tower's config in ``visual_tower/``). Used by the tests to build tiny checkpoints that load
    through :func:`from_pretrained`. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = model.weights
    lc = model.lm.config.to_dict()
    cfg = {k: v for k, v in lc.items() if not k.startswith("_") and k not in ("architectures", "transformers_version", "model_type")}
    cfg.update(model_type="EventChat_llama", architectures=["EventChatModel"], mm_visual_tower="visual_tower",
               mm_use_im_start_end=model.use_start_end, mm_use_im_patch_token=model.use_patch_token,
               event_feature_adaptor=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    model.vision.tower.config.save_pretrained(folder / "visual_tower")
    model.image_processor.save_pretrained(folder / "visual_tower")
    prefix = tower_key_prefix(weights.visual_tower)
    state = {module_key_to_checkpoint_key(k, prefix): v.detach().contiguous().cpu() for k, v in weights.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    ext, stem = ("safetensors", "model") if safetensors else ("bin", "pytorch_model")
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}"
        if safetensors:
            from safetensors.torch import save_file

            save_file(shard, str(folder / name), metadata={"format": "pt"})
        else:
            torch.save(shard, folder / name)
        weight_map.update({k: name for k in shard})
    index = f"{stem}.{ext}.index.json" if safetensors else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    model.tokenizer.save_pretrained(folder)
    return folder
