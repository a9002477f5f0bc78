"""Presets and checkpoint folders -> a model (one entry point for every family)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch

from stagewise.errors import InputError
from stagewise.models.checkpoint import read_config
from stagewise.models.family import VisionLanguageModel
from stagewise.models.presets import PRESETS, get_preset
from stagewise.preprocess.prompt import TINY_TOKENIZER

FAMILY_MODULES = {
    "eventgpt": "stagewise.models.eventgpt",
    "video-llava": "stagewise.models.video_llava",
    "llava-1.5": "stagewise.models.llava",
}
"""Model family -> module with ``build(preset, *, tokenizer, device, dtype, seed)`` and
``from_pretrained(folder, *, device, dtype, tokenizer, vision_tower)``."""

CHECKPOINT_TYPES = {"EventChat_llama": "eventgpt", "video_llava": "video-llava", "llava": "llava-1.5"}
"""``config.json`` ``model_type`` -> family."""

SHARED_DATA_ENV = "STAGEWISE_SHARED_DATA"
"""Environment variable naming the shared data folder (``tokenizers/llama2/tokenizer.model`` inside)."""


def all_presets() -> list[str]:
    """Every preset name."""
    return list(PRESETS)


def family_of_preset(preset: str) -> str:
    """The family of a preset.

    Raises:
        ValueError: unknown preset.
    """
    return get_preset(preset).family


def family_of_checkpoint(folder: Path) -> str:
    """Family of a checkpoint folder, from its ``config.json`` ``model_type``.

    Raises:
        InputError: no folder, no/unreadable config, unknown model_type.
    """
    cfg = read_config(Path(folder))
    mt = cfg.get("model_type")
    if mt not in CHECKPOINT_TYPES:
        raise InputError(Path(folder) / "config.json", f"model_type {mt!r} is not one stagewise runs ({', '.join(CHECKPOINT_TYPES)})")
    return CHECKPOINT_TYPES[mt]


def llama2_tokenizer_path() -> Path | None:
    """The LLaMA-2 ``tokenizer.model`` of the shared data, if present
    (``$STAGEWISE_SHARED_DATA/tokenizers/llama2/``, then ``<checkout>/../shared/data/...``)."""
    roots = [Path(os.environ[SHARED_DATA_ENV])] if os.environ.get(SHARED_DATA_ENV) else []
    roots.append(Path(__file__).resolve().parents[3] / "shared" / "data")
    for r in roots:
        f = r / "tokenizers" / "llama2" / "tokenizer.model"
        if f.is_file():
            return f
    return None


def default_tokenizer(preset: str) -> tuple[Path, str | None]:
    """The tokenizer a preset uses without ``--tokenizer``, and a warning when it is a stand-in.

    Tiny presets carry the tiny tokenizer; the 7B presets use the LLaMA-2 tokenizer of the shared
    data when present, else the tiny one (the prompt is then shorter than with LLaMA-2's).
    """
    p = get_preset(preset)
    if p.tokenizer is not None:
        return p.tokenizer, None
    found = llama2_tokenizer_path()
    if found is not None:
        return found, None
    return TINY_TOKENIZER, (f"no --tokenizer for {preset}: using the tiny tokenizer shipped with stagewise; "
                            "prompt lengths differ from LLaMA-2's (pass --tokenizer PATH/tokenizer.model)")


def load_model(preset: str | None, weights: str, *, device: torch.device, dtype: torch.dtype,
               tokenizer: str | Path | None = None, vision_tower: str | Path | None = None, seed: int = 0) -> VisionLanguageModel:
    """Build a model: a preset with ``weights="random"``, or a checkpoint folder.

    Args:
        preset: preset name (needed with random weights; with a checkpoint it only has to agree
            with the checkpoint's family).
        weights: ``"random"`` or a checkpoint folder path.
        tokenizer: a LLaMA ``tokenizer.model`` or folder overriding the default.
        vision_tower: a local CLIP folder (EventGPT checkpoints without tower weights).

    Raises:
        InputError / ValueError: unknown preset, bad checkpoint, options the family does not take.
    """
    if weights == "random":
        if preset is None:
            raise ValueError("preset: random weights need --preset")
        p = get_preset(preset)
        if vision_tower is not None:
            raise ValueError("vision_tower: applies to checkpoints, not to random weights")
        mod = importlib.import_module(FAMILY_MODULES[p.family])
        tok = tokenizer if tokenizer is not None else default_tokenizer(preset)[0]
        return mod.build(p, tokenizer=tok, device=torch.device(device), dtype=dtype, seed=seed)
    folder = Path(weights)
    fam = family_of_checkpoint(folder)
    if preset is not None and family_of_preset(preset) != fam:
        raise InputError(folder, f"is a {fam} checkpoint, but --preset {preset} is a {family_of_preset(preset)} preset")
    mod = importlib.import_module(FAMILY_MODULES[fam])
    return mod.from_pretrained(folder, device=torch.device(device), dtype=dtype, tokenizer=tokenizer, vision_tower=vision_tower)


def build_random(preset: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
                 seed: int = 0, tokenizer: str | Path | None = None) -> VisionLanguageModel:
    """A preset with random weights (``dtype`` a ``torch.dtype`` or a name such as ``"bf16"``).

    Raises:
        ValueError: unknown preset or dtype name.
        InputError: no tokenizer at ``tokenizer``.
    """
    if isinstance(dtype, str):
        from stagewise.config import DTYPES

        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(sorted(DTYPES))}, got {dtype!r}")
        dtype = getattr(torch, DTYPES[dtype])
    return load_model(preset, "random", device=torch.device(device), dtype=dtype, tokenizer=tokenizer, seed=seed)
