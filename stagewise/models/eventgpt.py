"""EventGPT: CLIP ViT-L/14-336 -> projector -> feature adaptor -> spatio-temporal pooling -> LLaMA.

Faithful to ``../shared/spec/EVENTGPT.md``:

- vision tower: ``CLIPVisionModel``; ``last_hidden_state`` ``[T, 577, 1024]`` per sample
  (576 patches + CLS, no layer selection);
- projector ``Linear(1024, 4096) -> GELU -> Linear(4096, 4096)``, then the feature adaptor
  ``Linear(4096, 4096)``, per frame;
- pooling over the T frames ``F[t, s, c]``: temporal tokens ``mean_s`` ``[T, c]`` then
  spatial tokens ``mean_t`` ``[577, c]``, concatenated: ``[T + 577, c]`` (582 for T = 5);
- the 582 embeddings replace the ``-200`` placeholder in the prompt embeddings;
- LLaMA decoder (``transformers``' ``LlamaForCausalLM``).

A released checkpoint folder (``model_type: "EventChat_llama"``) loads unchanged: its keys
``model.*``/``lm_head.*`` go to the LLaMA, ``model.visual_projector.*``,
``model.feature_adaptor.*`` and ``model.visual_tower.visual_tower.vision_model.*`` to the
vision side (:func:`checkpoint_key_to_module_key`).

``fuse_vision=True`` pools right after the projector's GELU and applies the projector's
second linear and the adaptor to the 582 pooled tokens instead of 5 x 577: mean pooling is
linear, so this is the same function in exact arithmetic, with 2 x 4096^2 x (2885 - 582)
fewer FLOPs per sample (not bit-identical in bf16).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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
)

from stagewise.errors import InputError
from stagewise.models.base import Prepared, Sample
from stagewise.preprocess.prompt import (
    EVENT_TOKEN_INDEX,
    TINY_TOKENIZER,
    SPTokenizer,
    eventgpt_added_tokens,
    eventgpt_prompt,
    tokenize_with_placeholder,
)

N_FRAMES = 5
"""Event images per sample (EventGPT cuts the stream into 5 parts of equal event count)."""

MAX_DURATION_US = 100_000
"""The released model refuses streams of 100 ms or more (t.max - t.min)."""

CLIP_L14_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
"""``openai/clip-vit-large-patch14-336`` vision config (its public config.json)."""

VICUNA_7B = dict(
    vocab_size=32003,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=4096,
    hidden_act="silu",
    tie_word_embeddings=False,
)
"""Vicuna-7B v1.5 shapes (EVENTGPT.md), vocab 32000 + the 3 added event tokens."""

PRESETS: dict[str, dict[str, Any]] = {
    "eventgpt-7b": {"llama": VICUNA_7B, "vision": CLIP_L14_336, "tokenizer": None},
    "eventgpt-tiny": {
        "llama": dict(
            vocab_size=0,  # taken from the tokenizer
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            max_position_embeddings=2048,
            hidden_act="silu",
            tie_word_embeddings=False,
        ),
        # 336 px / patch 14 keeps the real token geometry: 577 tokens per frame, 582 pooled.
        "vision": dict(CLIP_L14_336, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32),
        "tokenizer": TINY_TOKENIZER,
    },
}


@dataclass
class LoadedEvents:
    """Stage-1 output: an event stream (``kind="events"``) or decoded frames (``"frames"``).

    Attributes:
        stream: ``stagewise.inputs.events.EventStream`` or ``None``.
        frames: list of ``[H, W, 3]`` uint8 RGB arrays, or ``None``.
        source: file the sample came from (for error messages).
    """

    kind: str
    stream: Any = None
    frames: list[np.ndarray] | None = None
    source: str = ""


TOWER_CKPT_PREFIX = "model.visual_tower.visual_tower.vision_model."
"""Where EventGPT's released checkpoints keep the CLIP tower weights."""


def checkpoint_key_to_module_key(key: str, tower_prefix: str = "vision_model.") -> str | None:
    """Map a released EventGPT weight key to this module's parameter name.

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


class EventGPT(nn.Module):
    """EventGPT as five stages (implements ``stagewise.models.base.MultimodalModel``).

    Build with :func:`build_random` (a preset, random weights) or :func:`from_pretrained`
    (a released checkpoint folder).

    Attributes:
        lm: ``LlamaForCausalLM``.
        visual_tower: ``CLIPVisionModel``.
        visual_projector: ``Linear(d_v, d) -> GELU -> Linear(d, d)``.
        feature_adaptor: ``Linear(d, d)``.
        tokenizer: :class:`stagewise.preprocess.prompt.SPTokenizer`.
        use_start_end: wrap ``<event>`` in ``<ev_start>``/``<ev_end>`` (config ``mm_use_im_start_end``).
        max_duration_us: streams at least this long are refused (or windowed with ``window=True``).
        gpu_preprocess: render event images and run the CLIP resize/normalize with torch on
            the model device instead of numpy + the ``transformers`` processor.
        fuse_vision: pool before the projector's second linear (module docstring).
        vision_batch: all frames through the tower in one call (default); ``False`` runs
            the seeds' one-call-per-frame loop (kept for side-by-side numbers).
        vision_graph: on CUDA, replay stage 3 from a captured CUDA graph (no launch gaps).
        vision_compile: run the tower through :mod:`stagewise.models.clip_fast` (one compiled
            layer function for all layers; eager on CPU).
    """

    name = "eventgpt"
    n_frames = N_FRAMES

    def __init__(self, llama: LlamaConfig, vision: CLIPVisionConfig, tokenizer: SPTokenizer, *, use_start_end: bool = True) -> None:
        super().__init__()
        llama._attn_implementation = "sdpa"
        vision._attn_implementation = "sdpa"
        self.lm = LlamaForCausalLM(llama)
        self.visual_tower = CLIPVisionModel(vision)
        d_v, d = vision.hidden_size, llama.hidden_size
        self.visual_projector = nn.Sequential(nn.Linear(d_v, d), nn.GELU(), nn.Linear(d, d))
        self.feature_adaptor = nn.Linear(d, d)
        self.tokenizer = tokenizer
        self.use_start_end = use_start_end
        self.image_size = vision.image_size
        self.max_duration_us = MAX_DURATION_US
        self.window = False
        self.gpu_preprocess = False
        self.fuse_vision = False
        self.vision_batch = True
        self.vision_graph = False
        self.vision_compile = False
        self._fast_tower: Any = None
        self._vision_graphs: dict[tuple, tuple] = {}
        self.sensor_size: tuple[int, int] | None = None
        self.preset = "custom"

    # -- attributes of the protocol -------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.lm.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the weights."""
        return self.lm.lm_head.weight.dtype

    @property
    def eos_token_id(self) -> int:
        """The tokenizer's EOS id (LLaMA: 2)."""
        return self.tokenizer.eos_token_id

    @property
    def n_vision_tokens(self) -> int:
        """Pooled vision tokens per sample: T + (image_size / patch)^2 + 1."""
        cfg = self.visual_tower.config
        return self.n_frames + (cfg.image_size // cfg.patch_size) ** 2 + 1

    # -- stage 1 ---------------------------------------------------------------------
    def load(self, sample: Sample) -> LoadedEvents:
        """Stage 1: the event stream (file or in-memory) or the pre-rendered PNG frames.

        A sample with ``window_us`` (``--window-ms``) reads only that window of its file
        (:func:`stagewise.inputs.samples.read_sample_events`); ``trust_pickle`` and
        ``input_error`` of the sample are honoured there.

        Raises:
            InputError: unreadable file (any reader failure, one line), bad stream, stream of
                ``>= max_duration_us`` without ``window``.
        """
        from stagewise.inputs import events as ev
        from stagewise.inputs.samples import read_sample_events

        if sample.input_error:
            raise InputError(None, sample.input_error)
        if sample.events is not None:
            stream = sample.events
            src = stream.source
        elif sample.events_path is not None:
            stream = read_sample_events(sample, self.sensor_size)
            src = str(sample.events_path)
        elif sample.event_image_paths:
            frames = ev.read_event_frames(sample.event_image_paths)
            return LoadedEvents("frames", frames=frames, source=str(sample.event_image_paths[0]))
        else:
            raise InputError(None, f"sample {sample.sample_id}: no events, event file or event images given")
        stream = ev.check_duration(stream, max_duration_us=self.max_duration_us, window=self.window)
        return LoadedEvents("events", stream=stream, source=src)

    # -- stage 2 ---------------------------------------------------------------------
    def preprocess(self, loaded: LoadedEvents, query: str) -> Prepared:
        """Stage 2: event images -> CLIP pixels ``[T, 3, 336, 336]`` on the device (model
        dtype); prompt -> ids ``[S_text]`` (int64, -200 at the vision placeholder)."""
        from stagewise.preprocess import clip as pp
        from stagewise.preprocess import render

        shapes: dict[str, list[int]] = {}
        if loaded.kind == "events":
            stream = loaded.stream
            shapes["load.events"] = [len(stream.events)]
            size = self.sensor_size or (
                (stream.height, stream.width) if stream.height and stream.width else None
            )
            if self.gpu_preprocess:
                imgs = render.render_event_images_torch(stream.events, self.n_frames, size, device=self.device)
                shapes["preprocess.event_images"] = list(imgs.shape)
                pixels = pp.clip_preprocess_torch(imgs, self.image_size, dtype=self.dtype)
            else:
                frames = render.render_event_images(stream.events, self.n_frames, size)
                shapes["preprocess.event_images"] = [len(frames), *frames[0].shape]
                pixels = pp.clip_preprocess(frames, self.image_size)
        else:
            frames = loaded.frames
            shapes["load.frames"] = [len(frames), *frames[0].shape]
            if self.gpu_preprocess and len({f.shape for f in frames}) == 1:
                imgs = torch.from_numpy(np.stack(frames)).to(self.device, non_blocking=True)
                pixels = pp.clip_preprocess_torch(imgs, self.image_size, dtype=self.dtype)
            elif self.gpu_preprocess:  # frames of different sizes: one resize per frame
                pixels = torch.cat([pp.clip_preprocess_torch(torch.from_numpy(f[None]).to(self.device), self.image_size, dtype=self.dtype) for f in frames])
            else:
                pixels = pp.clip_preprocess(frames, self.image_size)
        pixels = pixels.to(self.device, self.dtype, non_blocking=True)
        ids = tokenize_with_placeholder(eventgpt_prompt(query, self.use_start_end), self.tokenizer)
        input_ids = torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True)
        shapes["preprocess.pixel_values"] = list(pixels.shape)
        shapes["preprocess.input_ids"] = [len(ids)]
        where = [i for i, t in enumerate(ids) if t == EVENT_TOKEN_INDEX]
        if len(where) != 1:
            raise ValueError(f"prompt must hold exactly one vision placeholder {EVENT_TOKEN_INDEX}, found {len(where)}")
        return Prepared(pixels, input_ids, shapes, placeholder_index=where[0])

    # -- stage 3 ---------------------------------------------------------------------
    @torch.inference_mode()
    def encode_vision(self, prepared: Prepared) -> torch.Tensor:
        """Stage 3: all T frames through the tower in one batch, projector, adaptor, pooling.

        With ``vision_graph`` on a CUDA device the whole stage is replayed from a CUDA graph
        captured at the first call for that input shape (the capture belongs to warm-up).

        Returns:
            ``[T + 577, d]`` (582 x 4096 for EventGPT-7B), model dtype, on the device.
        """
        px = prepared.pixel_values  # [T, 3, 336, 336]
        if self.vision_graph and px.is_cuda and self.vision_batch:
            return self._vision_replay(px)
        return self._vision(px)

    def _vision(self, px: torch.Tensor) -> torch.Tensor:
        if self.vision_compile and self.vision_batch:
            if self._fast_tower is None:
                from stagewise.models.clip_fast import FastClipTower

                self._fast_tower = FastClipTower(self.visual_tower)
            feats = self._fast_tower(px)  # [T, 577, d_v]
        elif self.vision_batch:
            feats = self.visual_tower(pixel_values=px).last_hidden_state  # [T, 577, d_v]
        else:  # the seeds' loop: one tower call per frame
            feats = torch.cat([self.visual_tower(pixel_values=px[t : t + 1]).last_hidden_state for t in range(px.shape[0])])
        proj0, act, proj2 = self.visual_projector
        if self.fuse_vision:
            h = act(proj0(feats))  # [T, 577, d]
            pooled = spatio_temporal_pool(h)  # [T + 577, d]
            return self.feature_adaptor(proj2(pooled))
        h = self.feature_adaptor(proj2(act(proj0(feats))))  # [T, 577, d]
        return spatio_temporal_pool(h)

    def _vision_replay(self, px: torch.Tensor) -> torch.Tensor:
        """Stage 3 from a CUDA graph keyed by (shape, dtype, fused): one launch, no gaps."""
        key = (tuple(px.shape), px.dtype, self.fuse_vision, self.vision_compile)
        entry = self._vision_graphs.get(key)
        if entry is None:
            static_in = px.clone()
            side = torch.cuda.Stream(px.device)
            side.wait_stream(torch.cuda.current_stream(px.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm the kernels (cuBLAS/cuDNN handles, autotuning) off-graph
                    self._vision(static_in)
            torch.cuda.current_stream(px.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._vision(static_in)
            entry = self._vision_graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = entry
        static_in.copy_(px)
        graph.replay()
        return static_out.clone()

    # -- stage 4 (splice) ------------------------------------------------------------
    def build_inputs_embeds(self, prepared: Prepared, vision: torch.Tensor) -> torch.Tensor:
        """Splice ``vision`` ``[N_v, d]`` at the -200 placeholder of ``prepared.input_ids``.

        Returns:
            ``[S_text - 1 + N_v, d]`` LM input embeddings (model dtype).

        Raises:
            ValueError: the prompt holds no placeholder or more than one.
        """
        return splice_embeddings(self.lm.get_input_embeddings(), prepared.input_ids, vision, EVENT_TOKEN_INDEX, prepared.placeholder_index)

    # -- the fused reference ---------------------------------------------------------
    @torch.inference_mode()
    def generate_fused(self, prepared: Prepared, max_new_tokens: int, eos_token_id: int | None) -> list[int]:
        """Pixels in, one ``generate`` call (vision encoded inside), greedy ids out."""
        embeds = self.build_inputs_embeds(prepared, self.encode_vision(prepared))[None]
        return hf_generate(self.lm, embeds, max_new_tokens, eos_token_id)

    def decode_text(self, ids: list[int]) -> str:
        """Generated ids -> text (special tokens skipped)."""
        return self.tokenizer.decode(ids)

    def describe(self) -> dict[str, Any]:
        """Architecture facts recorded in ``config.json``."""
        lc, vc = self.lm.config, self.visual_tower.config
        return {
            "family": self.name,
            "preset": self.preset,
            "lm_params": sum(p.numel() for p in self.lm.parameters()),
            "vision_params": sum(p.numel() for m in (self.visual_tower, self.visual_projector, self.feature_adaptor) for p in m.parameters()),
            "lm": {k: getattr(lc, k, None) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")},
            "vision": {k: getattr(vc, k, None) for k in ("hidden_size", "num_hidden_layers", "image_size", "patch_size")},
            "n_frames": self.n_frames,
            "n_vision_tokens": self.n_vision_tokens,
            "tokenizer": str(self.tokenizer.model_file),
            "fuse_vision": self.fuse_vision,
            "vision_graph": self.vision_graph,
            "vision_compile": self.vision_compile,
            "gpu_preprocess": self.gpu_preprocess,
        }

    def vision_flops(self, n_images: int) -> float:
        """FLOPs of stage 3 for ``n_images`` frames (see :mod:`stagewise.measure.costmodel`)."""
        from stagewise.measure.costmodel import eventgpt_vision_flops

        return eventgpt_vision_flops(self, n_images)


def spatio_temporal_pool(h: torch.Tensor) -> torch.Tensor:
    """EventGPT's pooling of per-frame features.

    Args:
        h: ``[T, S, c]`` (T frames, S tokens per frame).

    Returns:
        ``[T + S, c]``: temporal tokens (mean over S) first, then spatial tokens (mean over T).
    """
    return torch.cat([h.mean(dim=1), h.mean(dim=0)], dim=0)


def splice_embeddings(embed: nn.Embedding, input_ids: torch.Tensor, vision: torch.Tensor, placeholder: int, index: int | None = None) -> torch.Tensor:
    """Embed ``input_ids`` ``[S]`` and put ``vision`` ``[N_v, d]`` where ``placeholder`` stands.

    Args:
        index: the placeholder's position when the caller knows it on the host (no
            device-to-host read then); ``None`` finds it in ``input_ids``.

    Raises:
        ValueError: not exactly one placeholder in ``input_ids`` (when searched).
    """
    if index is None:
        where = (input_ids == placeholder).nonzero().flatten().tolist()
        if len(where) != 1:
            raise ValueError(f"prompt must hold exactly one vision placeholder {placeholder}, found {len(where)}")
        index = where[0]
    k = index
    text = embed(input_ids.clamp_min(0))  # [S, d]
    return torch.cat([text[:k], vision.to(text.dtype), text[k + 1:]], dim=0)


def hf_generate(lm: LlamaForCausalLM, inputs_embeds: torch.Tensor, max_new_tokens: int, eos_token_id: int | None) -> list[int]:
    """``lm.generate`` from ``inputs_embeds`` ``[1, S, d]``: greedy, KV cache, new ids only.

    With ``eos_token_id=None`` it generates exactly ``max_new_tokens`` tokens.
    """
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens if eos_token_id is None else 0,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos_token_id,
        pad_token_id=0,
        use_cache=True,
    )
    mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
    out = lm.generate(inputs_embeds=inputs_embeds, attention_mask=mask, generation_config=cfg)
    ids = out[0].tolist()
    if eos_token_id is not None and eos_token_id in ids:
        ids = ids[: ids.index(eos_token_id) + 1]
    return ids


# -- construction --------------------------------------------------------------------


def _tokenizer_for(preset: dict[str, Any], tokenizer: str | Path | None, use_patch: bool, use_start_end: bool) -> SPTokenizer:
    if tokenizer is not None:
        path = Path(tokenizer)
        tok = SPTokenizer.from_folder(path) if path.is_dir() else SPTokenizer(path)
    else:
        tok = SPTokenizer(preset["tokenizer"] or TINY_TOKENIZER)
    tok.add_tokens(eventgpt_added_tokens(use_patch, use_start_end))
    return tok


class _default_dtype:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __enter__(self) -> None:
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc: object) -> None:
        torch.set_default_dtype(self.old)


def build_random(preset: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0, tokenizer: str | Path | None = None) -> EventGPT:
    """An EventGPT preset with random weights, built directly on ``device`` in ``dtype``.

    Args:
        preset: a key of :data:`PRESETS`.
        tokenizer: a LLaMA ``tokenizer.model`` (or a folder holding one); default: the
            preset's (the tiny preset ships its own).

    Raises:
        ValueError: unknown preset.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset: unknown EventGPT preset {preset!r}; choose one of {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    tok = _tokenizer_for(spec, tokenizer, True, True)
    llama = LlamaConfig(**{**spec["llama"], "vocab_size": max(spec["llama"]["vocab_size"], tok.vocab_size)})
    llama.bos_token_id, llama.eos_token_id, llama.pad_token_id = tok.bos_token_id, tok.eos_token_id, 0
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = EventGPT(llama, CLIPVisionConfig(**spec["vision"]), tok)
    model.preset = preset
    return model.eval()


def _vision_config(cfg: dict[str, Any], folder: Path, vision_tower: str | Path | None) -> tuple[CLIPVisionConfig, Path | None]:
    name = str(vision_tower or cfg.get("mm_visual_tower") or cfg.get("mm_vision_tower") or "")
    local = Path(name) if name else None
    if local is not None and not local.is_absolute() and not local.exists():
        local = folder / name
    if local is not None and (local / "config.json").is_file():
        return CLIPVisionConfig.from_pretrained(local), local
    if "clip-vit-large-patch14-336" in name:
        return CLIPVisionConfig(**CLIP_L14_336), None
    raise InputError(folder / "config.json", f"mm_visual_tower {name!r} is neither a local CLIP folder nor clip-vit-large-patch14-336; pass --vision-tower PATH")


def _weight_files(folder: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        f = folder / index
        if f.is_file():
            try:
                names = sorted(set(json.loads(f.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise InputError(f, f"unreadable shard index ({e})") from None
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise InputError(folder, f"shards listed in {index} are missing: {', '.join(missing)}")
            return [folder / n for n in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    raise InputError(folder, "no weights: expected model.safetensors[.index.json] or pytorch_model[-*].bin[.index.json]")


def _read_shard(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device=str(device))
        return torch.load(path, map_location=device, weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file for the user
        raise InputError(path, f"unreadable weight shard ({type(e).__name__}: {e})") from None


def from_pretrained(folder: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, vision_tower: str | Path | None = None, tokenizer: str | Path | None = None) -> EventGPT:
    """Load a released EventGPT checkpoint folder, unchanged.

    Reads ``config.json`` (``model_type: "EventChat_llama"``), the weight shards
    (``.safetensors`` or ``.bin``, single or indexed), ``tokenizer.model`` with its added
    tokens, and the CLIP tower: from the checkpoint's ``model.visual_tower.*`` keys when
    saved there, else from ``mm_visual_tower`` (or ``vision_tower``) when it is a local
    CLIP folder.

    Raises:
        InputError: missing folder/config/shards, wrong ``model_type``, unreadable shard,
            or weights missing for some parameters (listed).
    """
    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise InputError(folder, "not a checkpoint folder (no config.json)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise InputError(cfg_file, f"not JSON ({e})") from None
    if cfg.get("model_type") != "EventChat_llama":
        raise InputError(cfg_file, f"model_type is {cfg.get('model_type')!r}, expected 'EventChat_llama' (an EventGPT checkpoint)")
    use_start_end = bool(cfg.get("mm_use_im_start_end", False))
    use_patch = bool(cfg.get("mm_use_im_patch_token", True))
    tok_src = tokenizer or folder
    tok = SPTokenizer.from_folder(tok_src) if Path(tok_src).is_dir() else SPTokenizer(tok_src)
    tok.add_tokens(eventgpt_added_tokens(use_patch, use_start_end))
    llama_fields = {k: v for k, v in cfg.items() if not k.startswith("mm_") and k not in ("model_type", "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version")}
    llama = LlamaConfig(**llama_fields)
    vcfg, tower_dir = _vision_config(cfg, folder, vision_tower)
    device = torch.device(device)
    with torch.device(device), _default_dtype(dtype):
        model = EventGPT(llama, vcfg, tok, use_start_end=use_start_end)
    model.preset = f"checkpoint:{folder}"
    expected = set(model.state_dict())
    if llama.tie_word_embeddings:
        expected.discard("lm.lm_head.weight")
    loaded: set[str] = set()
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    prefix = tower_key_prefix(model.visual_tower)
    for shard in _weight_files(folder):
        for key, tensor in _read_shard(shard, device).items():
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
        model.visual_tower.load_state_dict(tower.state_dict(), strict=False)
        loaded |= {"visual_tower." + k for k in tower.state_dict()}
    buffers = {k for k, _ in model.named_buffers()}
    missing = sorted(k for k in expected - loaded if k not in buffers)
    if missing:
        shown = [module_key_to_checkpoint_key(k, prefix) for k in missing[:8]]
        more = f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""
        raise InputError(folder, f"checkpoint is missing {len(missing)} weights: {', '.join(shown)}{more}")
    return model.eval()


def save_checkpoint(model: EventGPT, folder: str | Path, *, safetensors: bool = True, max_shard_bytes: int = 2**30) -> Path:
    """Write ``model`` in EventGPT's released layout (config, shards + index, tokenizer).

    Used by the tests to build tiny checkpoints that load through :func:`from_pretrained`.
    Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lc = model.lm.config.to_dict()
    cfg = {k: v for k, v in lc.items() if not k.startswith("_") and k not in ("architectures", "transformers_version", "model_type")}
    cfg.update(
        model_type="EventChat_llama",
        architectures=["EventChatModel"],
        mm_visual_tower="visual_tower",
        mm_use_im_start_end=model.use_start_end,
        mm_use_im_patch_token=True,
    )
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    # The tower's config (the real checkpoints name the CLIP model; a local folder here).
    model.visual_tower.config.save_pretrained(folder / "visual_tower")
    prefix = tower_key_prefix(model.visual_tower)
    state = {module_key_to_checkpoint_key(k, prefix): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    ext = "safetensors" if safetensors else "bin"
    stem = "model" if safetensors else "pytorch_model"
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
    tok = model.tokenizer
    (folder / "tokenizer.model").write_bytes(Path(tok.model_file).read_bytes())
    (folder / "added_tokens.json").write_text(json.dumps(tok.added))
    return folder
