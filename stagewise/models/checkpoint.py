"""Checkpoint folders: the one place that reads ``config.json``, lists and reads weight shards, and
loads ``transformers`` models from local folders.

Bad folders raise :class:`stagewise.errors.InputError` with one line naming the file and the problem.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaForCausalLM, PretrainedConfig, PreTrainedModel

from stagewise.errors import InputError


def read_config(folder: Path, model_type: str | None = None) -> dict[str, Any]:
    """The folder's ``config.json`` as a dict, checked against ``model_type`` when given.

    Raises:
        InputError: no folder, no or unreadable ``config.json``, another ``model_type``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "checkpoint folder not found")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise InputError(folder, "not a checkpoint folder (no config.json)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise InputError(cfg_file, f"not JSON ({' '.join(str(e).split())})") from None
    if not isinstance(cfg, dict):
        raise InputError(cfg_file, "not a JSON object")
    if model_type is not None and cfg.get("model_type") != model_type:
        raise InputError(cfg_file, f"model_type is {cfg.get('model_type')!r}, expected {model_type!r}")
    return cfg


def weight_files(folder: Path) -> list[Path]:
    """The weight shards of a folder: from ``*.index.json`` when present, else the single file.

    Raises:
        InputError: an unreadable index, listed shards missing, or no weights at all.
    """
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        f = folder / index
        if f.is_file():
            try:
                names = sorted(set(json.loads(f.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise InputError(f, f"unreadable shard index ({type(e).__name__}: {e})") from None
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise InputError(folder, f"shards listed in {index} are missing: {', '.join(missing)}")
            return [folder / n for n in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    raise InputError(folder, "no weights: expected model.safetensors[.index.json] or pytorch_model[-*].bin[.index.json]")


def read_shard(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """One shard's tensors (``.safetensors``, or a ``.bin`` read with ``weights_only=True``: no code runs).

    Raises:
        InputError: any reader failure.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device=str(device))
        return torch.load(path, map_location=device, weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file for the user
        raise InputError(path, f"unreadable weight shard ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None


def check_hf_folder(path: Path, model_type: str) -> dict[str, Any]:
    """Validate a local Hugging Face multimodal checkpoint folder; return its ``config.json``.

    Raises:
        InputError: missing folder, ``config.json``, weights, tokenizer or
            ``preprocessor_config.json``; a config of another ``model_type``.
    """
    cfg = read_config(path, model_type)
    if not (list(path.glob("*.safetensors")) or list(path.glob("pytorch_model*.bin"))):
        raise InputError(path, "no weight files (*.safetensors or pytorch_model*.bin)")
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        raise InputError(path, "no tokenizer (tokenizer.json or tokenizer.model)")
    if not (path / "preprocessor_config.json").is_file():
        raise InputError(path / "preprocessor_config.json", "missing: the image processor settings")
    return cfg


def load_hf(cls: type[PreTrainedModel], path: Path, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """``cls.from_pretrained(path)`` in ``dtype`` on ``device`` (eval, no gradients).

    Loads straight onto the device when ``accelerate`` is installed (``device_map``); otherwise on
    the host first, then moves it.
    """
    if device.type != "cpu" and importlib.util.find_spec("accelerate") is not None:
        hf = cls.from_pretrained(path, dtype=dtype, device_map=str(device))
    else:
        hf = cls.from_pretrained(path, dtype=dtype).to(device)
    return hf.eval().requires_grad_(False)


def build_random_hf(cls: type[PreTrainedModel], config: PretrainedConfig, device: torch.device, dtype: torch.dtype,
                    seed: int) -> PreTrainedModel:
    """``cls(config)`` with random weights created directly on ``device`` in ``dtype``
    (``transformers``' own initialisation, seeded; eval mode, no gradients)."""
    torch.manual_seed(seed)
    with torch.device(device):
        hf = cls._from_config(config, dtype=dtype)
    return hf.eval().requires_grad_(False)


def lm_view(hf: PreTrainedModel) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` whose decoder and head ARE ``hf``'s (shared, not copied).

    The shell is built on the meta device (no memory), then its ``model`` and ``lm_head``
    are replaced by ``hf.model.language_model`` and ``hf.lm_head``.

    Raises:
        RuntimeError: a parameter stayed on the meta device (internal invariant).
    """
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        lm = LlamaForCausalLM(hf.config.text_config)
    lm.model = hf.model.language_model
    lm.lm_head = hf.lm_head
    lm.eval().requires_grad_(False)
    if any(p.is_meta for p in lm.parameters()) and not any(p.is_meta for p in hf.parameters()):
        raise RuntimeError("lm_view: a parameter of the LM shell was not replaced")
    return lm
