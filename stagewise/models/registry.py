"""Presets and checkpoints -> a model object (one entry point for every family)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch

from stagewise.errors import InputError

FAMILY_MODULES = {
    "eventgpt": "stagewise.models.eventgpt",
    "video-llava": "stagewise.models.video_llava",
    "llava-1.5": "stagewise.models.llava",
}
"""Model family -> module exposing ``PRESETS``, ``build_random`` and ``from_pretrained``."""

CHECKPOINT_TYPES = {"EventChat_llama": "eventgpt", "video_llava": "video-llava", "llava": "llava-1.5"}
"""``config.json`` ``model_type`` -> family."""


def family_of_preset(preset: str) -> str:
    """The family a preset name belongs to (by prefix: ``eventgpt-``, ``video-llava-``, ``llava-1.5-``).

    Raises:
        ValueError: no family matches.
    """
    for fam in sorted(FAMILY_MODULES, key=len, reverse=True):
        if preset.startswith(fam + "-"):
            return fam
    raise ValueError(f"preset: {preset!r} names no model family ({', '.join(all_presets())})")


def all_presets() -> list[str]:
    """Every preset name of every family whose module imports."""
    out = []
    for mod in FAMILY_MODULES.values():
        try:
            out += list(importlib.import_module(mod).PRESETS)
        except ImportError:
            continue
    return out


def family_of_checkpoint(folder: Path) -> str:
    """Family of a checkpoint folder, from its ``config.json`` ``model_type``.

    Raises:
        InputError: no folder, no/unreadable config, unknown model_type.
    """
    cfg = folder / "config.json"
    if not folder.is_dir():
        raise InputError(folder, "checkpoint folder not found")
    if not cfg.is_file():
        raise InputError(folder, "not a checkpoint folder (no config.json)")
    try:
        mt = json.loads(cfg.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise InputError(cfg, f"not JSON ({e})") from None
    if mt not in CHECKPOINT_TYPES:
        raise InputError(cfg, f"model_type {mt!r} is not one stagewise runs ({', '.join(CHECKPOINT_TYPES)})")
    return CHECKPOINT_TYPES[mt]


def load_model(preset: str | None, weights: str, *, device: torch.device, dtype: torch.dtype, tokenizer: str | None = None, vision_tower: str | None = None, seed: int = 0) -> Any:
    """Build a model: a preset with ``weights="random"``, or a checkpoint folder.

    Args:
        preset: preset name (needed with random weights; with a checkpoint it only has to
            agree with the checkpoint's family).
        weights: ``"random"`` or a checkpoint folder path.
        tokenizer: a LLaMA ``tokenizer.model`` (or folder) overriding the default.
        vision_tower: a local CLIP folder (EventGPT checkpoints without tower weights).

    Raises:
        InputError / ValueError: unknown preset, bad checkpoint.
    """
    if weights == "random":
        if preset is None:
            raise ValueError("preset: random weights need --preset")
        mod = importlib.import_module(FAMILY_MODULES[family_of_preset(preset)])
        kw: dict[str, Any] = {"device": device, "dtype": dtype, "seed": seed}
        kw["tokenizer" if mod.__name__.endswith("eventgpt") else "tokenizer_path"] = tokenizer
        return mod.build_random(preset, **kw)
    folder = Path(weights)
    fam = family_of_checkpoint(folder)
    if preset is not None and family_of_preset(preset) != fam:
        raise InputError(folder, f"is a {fam} checkpoint, but --preset {preset} is a {family_of_preset(preset)} preset")
    mod = importlib.import_module(FAMILY_MODULES[fam])
    if fam == "eventgpt":
        return mod.from_pretrained(folder, device=device, dtype=dtype, vision_tower=vision_tower, tokenizer=tokenizer)
    return mod.from_pretrained(folder, device=device, dtype=dtype)
