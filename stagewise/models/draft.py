"""Draft language models for speculative decoding (``--speculate draft_model``).

A draft model is a small text-only LLaMA that shares the target's tokenizer, so its ids can be
fed to the target as they are. Spec-Bench's small-draft baseline for Vicuna-7B uses a 68M LLaMA
(``JackFram/llama-68m``: 2 layers of width 768, the LLaMA-2 vocabulary of 32,000 pieces); the
``llama-68m`` preset has exactly its shapes (from its ``config.json``) with random weights, for
measuring the engine's cost of drafting; a real draft is loaded from a local checkpoint folder.

Vocabulary: the targets here (Vicuna v1.5 under EventGPT, LLaVA-1.5, Video-LLaVA) all use the
LLaMA-2 SentencePiece model and add special tokens from id 32000 on, which mean different things
in different models (EventGPT's ``<ev_patch>`` is LLaVA's ``<image>``). So the ids two models share
are their common base pieces; :func:`check_vocab` compares them piece by piece and says how many
ids a draft may propose (:class:`stagewise.engine.speculative.DraftModelDrafter`'s ``shared_vocab``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from stagewise.errors import InputError

LLAMA_68M: dict[str, Any] = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=2,
    num_attention_heads=12,
    num_key_value_heads=12,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    hidden_act="silu",
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
"""``JackFram/llama-68m``'s ``config.json`` (its ``bos_token_id`` 0 is as published; the LLaMA-2
tokenizer it uses has BOS 1, which is what prompts carry)."""

PRESETS: dict[str, dict[str, Any]] = {
    "llama-68m": LLAMA_68M,
    # CPU tests: 2 layers of width 32; vocab_size 0 = the target's (passed to build_random)
    "llama-draft-tiny": dict(LLAMA_68M, vocab_size=0, hidden_size=32, intermediate_size=64,
                             num_attention_heads=2, num_key_value_heads=2),
}
"""Draft presets: ``llama-68m`` (exact shapes) and ``llama-draft-tiny`` (CPU tests)."""


@dataclass
class DraftLM:
    """A draft language model and what defines its ids.

    Attributes:
        lm: the ``transformers`` ``LlamaForCausalLM`` (eval mode, no gradients).
        name: the preset name or the checkpoint folder.
        tokenizer: the draft's own tokenizer when it has one (a checkpoint's ``tokenizer.model`` /
            ``tokenizer.json``: anything :func:`tokenizer_pieces` reads), ``None`` for a random
            preset (its ids are the LLaMA-2 vocabulary by construction).
        source: the checkpoint folder, or ``None`` for a preset.
    """

    lm: LlamaForCausalLM
    name: str
    tokenizer: PreTrainedTokenizerBase | str | Path | None = None
    source: Path | None = None

    @property
    def vocab_size(self) -> int:
        """Rows of the draft's LM head."""
        return int(self.lm.lm_head.weight.shape[0])


def build_random(preset: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0, vocab_size: int | None = None) -> DraftLM:
    """A draft preset with random weights (``transformers``' initialization, seeded), on ``device``.

    Args:
        preset: a key of :data:`PRESETS`.
        vocab_size: overrides the preset's vocabulary (required for ``llama-draft-tiny``, whose
            vocabulary is the target's).

    Raises:
        ValueError: unknown preset, or no vocabulary size.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"draft preset: unknown {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = dict(PRESETS[preset])
    if vocab_size is not None:
        cfg["vocab_size"] = vocab_size
    if cfg["vocab_size"] < 1:
        raise ValueError(f"vocab_size: the {preset} preset takes the target's vocabulary size (pass vocab_size)")
    torch.manual_seed(seed)
    with torch.device(device):
        lm = LlamaForCausalLM._from_config(LlamaConfig(**cfg), dtype=dtype)
    return DraftLM(lm.eval().requires_grad_(False), preset)


def from_pretrained(folder: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16) -> DraftLM:
    """Load a local LLaMA checkpoint folder as a draft (``LlamaForCausalLM.from_pretrained``, never
    the network), with its tokenizer (``tokenizer.model`` or ``tokenizer.json``) when present.

    Raises:
        InputError: no folder, no/unreadable ``config.json``, a model type other than ``llama``,
            no weights, or weights that do not load.
    """
    from transformers import LlamaForCausalLM

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "draft checkpoint folder not found")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise InputError(folder, "not a checkpoint folder (no config.json)")
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise InputError(cfg_file, f"not JSON ({e})") from None
    if model_type != "llama":
        raise InputError(cfg_file, f"model_type {model_type!r}: a draft model must be a LLaMA ('llama')")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise InputError(folder, "no weights (*.safetensors or *.bin)")
    try:
        lm = LlamaForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise InputError(folder, f"draft weights do not load ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    tok = next((f for f in (folder / "tokenizer.model", folder / "tokenizer.json") if f.is_file()), None)
    return DraftLM(lm.to(device).eval().requires_grad_(False), str(folder), tok, folder)


def load_draft(spec: str, *, device: str | torch.device, dtype: torch.dtype, seed: int = 0,
               vocab_size: int | None = None) -> DraftLM:
    """``--draft-model SPEC``: a preset name (random weights) or a checkpoint folder.

    Raises:
        InputError: a path that is not a usable checkpoint; ValueError: an unknown preset.
    """
    if spec in PRESETS:
        return build_random(spec, device=device, dtype=dtype, seed=seed, vocab_size=vocab_size)
    if Path(spec).exists() or "/" in spec:
        return from_pretrained(spec, device=device, dtype=dtype)
    raise ValueError(f"draft model: {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a folder")


# ---------------------------------------------------------------------------------------------
# Vocabulary compatibility


def tokenizer_pieces(tokenizer: PreTrainedTokenizerBase | str | Path) -> list[str]:
    """The base pieces of a tokenizer, by id (added special tokens excluded).

    Accepts a ``transformers`` tokenizer, or a path to a ``tokenizer.model`` (SentencePiece) /
    ``tokenizer.json`` file.

    Raises:
        InputError: a file that neither library reads.
    """
    if isinstance(tokenizer, (str, Path)):
        path = Path(tokenizer)
        if path.suffix == ".json":
            from tokenizers import Tokenizer

            try:
                tok = Tokenizer.from_file(str(path))
            except Exception as e:  # noqa: BLE001 - any parse failure is a bad file for the user
                raise InputError(path, f"not a tokenizers JSON file ({e})") from None
            return [tok.id_to_token(i) for i in range(tok.get_vocab_size(with_added_tokens=False))]
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.load(str(path))
        except (OSError, RuntimeError) as e:
            raise InputError(path, f"not a SentencePiece model ({e})") from None
        return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    return list(tokenizer.convert_ids_to_tokens(list(range(int(tokenizer.vocab_size)))))


def check_vocab(draft_tokenizer: PreTrainedTokenizerBase | str | Path | None,
                target_tokenizer: PreTrainedTokenizerBase | str | Path | None, *, draft_vocab: int, target_vocab: int,
                where: str | Path | None = None) -> int:
    """How many leading ids mean the same to the draft and to the target (the ids a draft may
    propose), after checking that their tokenizers agree.

    Args:
        draft_tokenizer / target_tokenizer: anything :func:`tokenizer_pieces` reads, or ``None``
            when a model has no tokenizer of its own (a random-weight preset: its ids are taken as
            they are, nothing to compare).
        draft_vocab / target_vocab: the models' LM-head sizes.
        where: the draft's checkpoint (named in the error).

    Returns:
        ``min`` of the two base-piece counts (when known) and of the two vocabularies.

    Raises:
        InputError: the base pieces differ at some id (names the first one), or fewer than 3
            ids would be shared (not the same tokenizer family).
    """
    shared = min(draft_vocab, target_vocab)
    pieces = [None if t is None else tokenizer_pieces(t) for t in (draft_tokenizer, target_tokenizer)]
    for p in pieces:
        if p is not None:
            shared = min(shared, len(p))
    if pieces[0] is not None and pieces[1] is not None:
        for i, (a, b) in enumerate(zip(pieces[0], pieces[1])):
            if a != b:
                raise InputError(where, f"the draft's tokenizer differs from the target's: id {i} is {a!r} "
                                        f"in the draft, {b!r} in the target (a draft must share the target's tokenizer)")
    if shared < 3:
        raise InputError(where, f"the draft and the target share only {shared} token ids")
    return shared
