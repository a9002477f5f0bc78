"""Prompts and the LLaMA SentencePiece tokenizer, with EventGPT's ``<event>`` splice.

EventGPT (conversation mode ``eventgpt_v1``, Vicuna v1 style) builds

    {system} USER: <ev_start><event><ev_end>\\n{query} ASSISTANT:

splits it on ``<event>``, tokenizes each piece with the slow (SentencePiece) LLaMA
tokenizer, and joins the pieces with the placeholder id -200 (``EVENT_TOKEN_INDEX``)
where the vision embeddings go; only the first piece keeps its BOS
(``../shared/spec/EVENTGPT.md``; the same join as LLaVA's ``tokenizer_image_token``).

The tokenizer here is SentencePiece itself with the slow tokenizer's semantics: text is
split on the added special tokens first, and every other piece is encoded on its own
(SentencePiece adds its dummy-prefix space to each). This is what ``transformers``'
slow ``LlamaTokenizer`` (legacy mode) did for the released model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import sentencepiece as spm

from stagewise.errors import InputError

EVENTGPT_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
EVENT_TOKEN = "<event>"
EVENT_TOKEN_INDEX = -200
EV_PATCH, EV_START, EV_END = "<ev_patch>", "<ev_start>", "<ev_end>"
DEFAULT_QUERY = "What are the key elements in this scene?"
TINY_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tiny_llama_sp.model"


def eventgpt_prompt(query: str, use_start_end: bool = True) -> str:
    """The ``eventgpt_v1`` prompt for ``query`` (``<event>`` marks the vision tokens)."""
    ev = f"{EV_START}{EVENT_TOKEN}{EV_END}" if use_start_end else EVENT_TOKEN
    return f"{EVENTGPT_SYSTEM} USER: {ev}\n{query} ASSISTANT:"


def eventgpt_added_tokens(use_patch_token: bool, use_start_end: bool) -> list[str]:
    """Special tokens EventGPT adds to the tokenizer, in the order they get ids 32000+."""
    toks = [EV_PATCH] if use_patch_token else []
    if use_start_end:
        toks += [EV_START, EV_END]
    return toks


class SPTokenizer:
    """LLaMA SentencePiece tokenizer (slow semantics) plus added special tokens.

    Args:
        model_file: a SentencePiece ``tokenizer.model``.
        added_tokens: ``{token: id}`` of added special tokens (ids >= the base vocab).

    Attributes:
        bos_token_id, eos_token_id: from the SentencePiece model (LLaMA: 1, 2).
        vocab_size: base pieces + added tokens.

    Raises:
        InputError: the model file is missing or not a SentencePiece model.
    """

    def __init__(self, model_file: str | Path, added_tokens: dict[str, int] | None = None) -> None:
        model_file = Path(model_file)
        if not model_file.is_file():
            raise InputError(model_file, "tokenizer model not found (pass --tokenizer PATH to a LLaMA tokenizer.model)")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(str(model_file))
        except (OSError, RuntimeError) as e:
            raise InputError(model_file, f"not a SentencePiece model ({e})") from None
        self.model_file = model_file
        self.bos_token_id = int(self.sp.bos_id())
        self.eos_token_id = int(self.sp.eos_id())
        self.added: dict[str, int] = dict(added_tokens or {})
        self._id_to_added = {v: k for k, v in self.added.items()}
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(self.added, key=len, reverse=True))) + ")") if self.added else None

    @property
    def vocab_size(self) -> int:
        """Pieces + added tokens (the LM's embedding rows must be at least this many)."""
        return max([self.sp.get_piece_size() - 1, *self.added.values()]) + 1

    def add_tokens(self, tokens: list[str]) -> None:
        """Append special tokens not yet present, with the next free ids."""
        for t in tokens:
            if t not in self.added:
                self.added[t] = self.vocab_size
        self.__init__(self.model_file, self.added)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Text -> ids: split on added tokens, SentencePiece-encode every other piece."""
        ids = [self.bos_token_id] if add_bos else []
        pieces = self._split.split(text) if self._split else [text]
        for piece in pieces:
            if not piece:
                continue
            if piece in self.added:
                ids.append(self.added[piece])
            else:
                ids.extend(self.sp.encode(piece))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text. Added tokens, BOS/EOS and negative placeholders are skipped when asked."""
        out: list[str] = []
        run: list[int] = []
        base = self.sp.get_piece_size()
        for i in ids:
            if i in self._id_to_added or i < 0 or i >= base:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special_tokens and i in self._id_to_added:
                    out.append(self._id_to_added[i])
            elif skip_special_tokens and i in (self.bos_token_id, self.eos_token_id):
                continue
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out).strip()

    @classmethod
    def from_folder(cls, folder: str | Path) -> "SPTokenizer":
        """Load ``tokenizer.model`` and its added tokens from a checkpoint folder.

        Added tokens come from ``added_tokens.json`` or, failing that, from
        ``tokenizer_config.json``'s ``added_tokens_decoder`` (ids >= 32000 only).

        Raises:
            InputError: no ``tokenizer.model`` in the folder, or an unreadable json.
        """
        folder = Path(folder)
        added: dict[str, int] = {}
        f = folder / "added_tokens.json"
        try:
            if f.is_file():
                added = {k: int(v) for k, v in json.loads(f.read_text()).items()}
            elif (folder / "tokenizer_config.json").is_file():
                f = folder / "tokenizer_config.json"
                dec = json.loads(f.read_text()).get("added_tokens_decoder", {})
                added = {v["content"]: int(k) for k, v in dec.items() if int(k) >= 32000}
        except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
            raise InputError(f, f"unreadable tokenizer config ({e})") from None
        return cls(folder / "tokenizer.model", added)


def tokenize_with_placeholder(prompt: str, tok: SPTokenizer, marker: str = EVENT_TOKEN, index: int = EVENT_TOKEN_INDEX) -> list[int]:
    """Tokenize ``prompt`` with ``index`` standing for each ``marker`` (EventGPT/LLaVA join).

    Every piece between markers is tokenized with BOS; the first piece keeps it, the
    others drop it; the pieces are joined with ``index``.

    Returns:
        token ids (int), ``index`` where the vision embeddings go.
    """
    chunks = [tok.encode(c, add_bos=True) for c in prompt.split(marker)]
    ids = [chunks[0][0]] if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id else []
    offset = len(ids)
    for k, chunk in enumerate(chunks):
        if k > 0:
            ids.append(index)
        ids.extend(chunk[offset:])
    return ids
