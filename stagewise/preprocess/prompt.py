"""Stage 2, the text half: prompt templates, the LLaMA tokenizer, and the vision placeholder.

One tokenizer for every family: ``transformers``' ``LlamaTokenizer``, loaded from a checkpoint folder
(its ``tokenizer_config.json`` settings and added tokens honoured: ``legacy``, ``add_bos_token``...)
or from a bare SentencePiece ``tokenizer.model`` (then with the settings the released models were
run with: ``legacy=True``, BOS added). The family's own special tokens are added on top when the
checkpoint does not already carry them (EventGPT's ``<ev_patch>``, LLaVA's ``<image>``...).

Two ways a prompt becomes ids, each the one its authors' code uses:

* **split** (EventGPT, ``tokenizer_event_token`` in ``common/common.py`` of XduSyL/EventGPT): the text
  is split on ``<event>``; each piece is tokenized on its own (``tokenizer(piece).input_ids``, so each
  gets a BOS and SentencePiece's dummy-prefix space); the pieces are joined with the placeholder id
  -200; only the first piece keeps its BOS.
* **whole** (the llava-hf processors): the whole text is tokenized once, the placeholder being an
  added special token (``<image>`` / ``<video>``), and BOS is prepended.

EventGPT's released template (``eventgpt_v1``, ``dataset/conversation.py``) always writes
``<ev_start><event><ev_end>`` into the text. When ``mm_use_im_start_end`` is false (the released
EventGPT-7B) the wrappers are not added tokens and are tokenized as ordinary text
(``▁< ev _ start >``): with the LLaMA-2 tokenizer and the default query that is 60 ids, the 641-token
prefill the seeds report. When it is true they are single added ids.

The placeholder's position is known here, on the host, so the splice in stage 4 needs no
device-to-host read.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stagewise.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EVENTGPT_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
EVENT_TOKEN = "<event>"
EVENT_TOKEN_INDEX = -200
EV_PATCH, EV_START, EV_END = "<ev_patch>", "<ev_start>", "<ev_end>"
DEFAULT_QUERY = "What are the key elements in this scene?"
TINY_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tiny_llama_sp.model"
"""A 977-piece LLaMA-style SentencePiece model (BPE, byte fallback, BOS 1, EOS 2) shipped with
stagewise, so the tiny presets run with no download (``scripts/make_tiny_tokenizer.py``)."""

EVENTGPT_MAX_EMBEDS = 2048
"""EventGPT's reference cuts the spliced input embeddings at 2048 positions
(``tokenizer_model_max_length = 2048`` in ``prepare_inputs_labels_for_multimodal``)."""


def eventgpt_prompt(query: str) -> str:
    """The ``eventgpt_v1`` prompt for ``query``: the wrappers are always written (see module docstring)."""
    return f"{EVENTGPT_SYSTEM} USER: {EV_START}{EVENT_TOKEN}{EV_END}\n{query} ASSISTANT:"


def eventgpt_added_tokens(use_patch_token: bool, use_start_end: bool) -> list[str]:
    """Special tokens EventGPT adds to the tokenizer, in the order they get ids (``initialize_vision_tokenizer``)."""
    toks = [EV_PATCH] if use_patch_token else []
    if use_start_end:
        toks += [EV_START, EV_END]
    return toks


@dataclass(frozen=True)
class PromptFormat:
    """How a family turns a query into prompt ids.

    Attributes:
        template: the text with ``{query}``; holds ``marker`` exactly once.
        marker: where the vision embeddings go (``<event>``, ``<image>``, ``<video>``).
        split: tokenize piece by piece around the marker (EventGPT) instead of the whole text (llava-hf).
        placeholder: the id standing for the vision embeddings in ``split`` mode (-200); in ``whole``
            mode the marker's own token id is used.
        max_embeds: the reference cuts the spliced embeddings at this length (EventGPT: 2048), or
            ``None``: prompts longer than the LM's positions are refused.

    Raises:
        ValueError: a template without exactly one marker or without ``{query}``.
    """

    template: str
    marker: str
    split: bool
    placeholder: int = EVENT_TOKEN_INDEX
    max_embeds: int | None = None

    def __post_init__(self) -> None:
        if self.template.count(self.marker) != 1 or "{query}" not in self.template:
            raise ValueError(f"template: needs one {self.marker!r} and a {{query}}, got {self.template!r}")

    def text(self, query: str) -> str:
        """The prompt text for ``query``."""
        return self.template.replace("{query}", query)


EVENTGPT_FORMAT = PromptFormat(eventgpt_prompt("{query}"), EVENT_TOKEN, split=True, max_embeds=EVENTGPT_MAX_EMBEDS)


def load_tokenizer(source: str | Path | None, added: Sequence[str] = (), *, fallback: Path | None = None) -> PreTrainedTokenizerBase:
    """A ``transformers`` ``LlamaTokenizer`` with ``added`` special tokens.

    Args:
        source: a checkpoint folder (``tokenizer.model`` + ``tokenizer_config.json`` and friends, its
            settings honoured), a bare ``tokenizer.model`` file, or a folder holding only that file;
            ``None``: ``fallback``.
        added: special tokens to add (in order, next free ids) unless the tokenizer has them already.
        fallback: the tokenizer file used when ``source`` is None.

    Returns:
        the tokenizer; ``tok.bos_token_id`` is what every encoding starts with (checked).

    Raises:
        InputError: no tokenizer at ``source`` (one line naming it), or a file that is not a
            SentencePiece model.
    """
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer

    path = Path(source) if source is not None else fallback
    if path is None:
        raise InputError(None, "no tokenizer: pass --tokenizer PATH (a LLaMA tokenizer.model or a checkpoint folder)")
    if path.is_dir() and (path / "tokenizer_config.json").is_file() and any((path / f).is_file() for f in ("tokenizer.model", "tokenizer.json")):
        tok = _load(LlamaTokenizer, path, {})
    else:
        model_file = path / "tokenizer.model" if path.is_dir() else path
        if not model_file.is_file():
            raise InputError(model_file, "tokenizer model not found (pass --tokenizer PATH to a LLaMA tokenizer.model)")
        _check_sentencepiece(model_file)
        with tempfile.TemporaryDirectory() as d:
            shutil.copyfile(model_file, Path(d) / "tokenizer.model")
            tok = _load(LlamaTokenizer, Path(d), {"legacy": True, "add_bos_token": True})
        tok.init_kwargs["legacy"] = True  # saved to tokenizer_config.json: reloads the same
    new = [t for t in added if t not in tok.get_vocab()]
    if new:
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in new], special_tokens=True)
    if tok("a").input_ids[:1] != [tok.bos_token_id]:  # transformers 5 was seen to drop BOS for bare models
        raise InputError(path, "the tokenizer adds no BOS token; its tokenizer_config.json must set add_bos_token")
    return tok


def _load(cls: type[PreTrainedTokenizerBase], folder: Path, kwargs: dict[str, object]) -> PreTrainedTokenizerBase:
    try:
        return cls.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, RuntimeError, TypeError, json.JSONDecodeError) as e:
        raise InputError(folder, f"unreadable tokenizer ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None


def _check_sentencepiece(model_file: Path) -> None:
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_file=str(model_file))
    except (RuntimeError, OSError) as e:
        raise InputError(model_file, f"not a SentencePiece model ({' '.join(str(e).split())[:200]})") from None


def tokenize_prompt(fmt: PromptFormat, tokenizer: PreTrainedTokenizerBase, query: str) -> tuple[list[int], int]:
    """Prompt ids for ``query`` and the placeholder's position, as the family's authors build them.

    Returns:
        ``(ids, index)``: ``ids[index]`` is the placeholder (``fmt.placeholder`` in split mode, the
        marker's token id in whole mode); exactly one placeholder; BOS first.

    Raises:
        InputError: the query itself contains the marker.
    """
    if fmt.marker in query:
        raise InputError(None, f"the query must not contain {fmt.marker!r}")
    text = fmt.text(query)
    if fmt.split:
        ids = tokenize_with_placeholder(text, tokenizer, fmt.marker, fmt.placeholder)
        placeholder = fmt.placeholder
    else:
        placeholder = tokenizer.convert_tokens_to_ids(fmt.marker)
        ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    where = [i for i, t in enumerate(ids) if t == placeholder]
    if len(where) != 1:  # internal invariant: the template holds the marker once
        raise RuntimeError(f"prompt holds {len(where)} placeholders, not 1")
    return ids, where[0]


def tokenize_with_placeholder(text: str, tokenizer: PreTrainedTokenizerBase, marker: str = EVENT_TOKEN, index: int = EVENT_TOKEN_INDEX) -> list[int]:
    """EventGPT's ``tokenizer_event_token``: every piece between markers tokenized with its BOS; the
    first piece keeps it, the others drop it; the pieces joined with ``index``."""
    chunks = [tokenizer(c).input_ids for c in text.split(marker)]
    ids = [chunks[0][0]] if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id else []
    offset = len(ids)
    for k, chunk in enumerate(chunks):
        if k > 0:
            ids.append(index)
        ids.extend(chunk[offset:])
    return ids


def decode_ids(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """Generated ids -> text with ``transformers``' decoding (special tokens skipped; negative
    placeholders and ids past the tokenizer's table dropped)."""
    n = len(tokenizer)
    return tokenizer.decode([i for i in ids if 0 <= i < n], skip_special_tokens=True).strip()
