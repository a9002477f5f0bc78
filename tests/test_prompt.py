"""Prompts as the authors' code builds them: EventGPT's template and ``tokenizer_event_token`` with
``transformers``' LLaMA tokenizer, for every combination of the released configs' switches."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import LLAMA_TOKENIZER, SHARED_DATA, require

from stagewise.errors import InputError
from stagewise.preprocess.prompt import (
    DEFAULT_QUERY,
    EV_END,
    EV_START,
    EVENT_TOKEN_INDEX,
    EVENTGPT_FORMAT,
    TINY_TOKENIZER,
    PromptFormat,
    decode_ids,
    eventgpt_added_tokens,
    eventgpt_prompt,
    load_tokenizer,
    tokenize_prompt,
    tokenize_with_placeholder,
)

GOLDEN_PROMPTS = SHARED_DATA.parent / "golden" / "eventgpt_ref" / "prompt_ids.json"


def test_template_always_writes_the_wrappers():
    p = eventgpt_prompt("Q?")
    assert p.startswith("A chat between a curious human")
    assert p.endswith(f"USER: {EV_START}<event>{EV_END}\nQ? ASSISTANT:")


def _folder_with(tmp_path, legacy: bool | None):
    """A checkpoint-style tokenizer folder around the LLaMA-2 model, ``legacy`` as given."""
    d = tmp_path / f"tok-{legacy}"
    d.mkdir()
    shutil.copyfile(require(LLAMA_TOKENIZER), d / "tokenizer.model")
    cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
           "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if legacy is not None:
        cfg["legacy"] = legacy
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("legacy", [True, False])
def test_released_config_gives_the_authors_ids(tmp_path, legacy):
    """``mm_use_im_start_end`` false, ``<ev_patch>`` added: the reference's ids for three queries
    (60/58/61), whatever the tokenizer's ``legacy`` (identical in this config, as the golden says)."""
    golden = json.loads(require(GOLDEN_PROMPTS).read_text())
    tok = load_tokenizer(_folder_with(tmp_path, legacy), eventgpt_added_tokens(True, False))
    assert tok.convert_tokens_to_ids("<ev_patch>") == 32000 and len(tok) == 32001
    for q in golden["legacy_true"]["prompts"]:
        ids, k = tokenize_prompt(EVENTGPT_FORMAT, tok, q["query"])
        assert ids == q["input_ids"] and len(ids) == q["n_ids"] and k == q["placeholder_index"], q["query"]


def test_bare_tokenizer_model_gets_bos_and_legacy(tmp_path):
    """A bare ``tokenizer.model`` (what ``--tokenizer`` usually names) behaves like the released
    slow tokenizer: BOS added (``transformers`` 5 alone adds none), ``legacy=True``."""
    tok = load_tokenizer(require(LLAMA_TOKENIZER), eventgpt_added_tokens(True, False))
    ids, _ = tokenize_prompt(EVENTGPT_FORMAT, tok, DEFAULT_QUERY)
    assert len(ids) == 60 and ids[0] == 1 and ids.count(1) == 1 and ids.count(EVENT_TOKEN_INDEX) == 1
    assert tok.legacy is True


@pytest.mark.parametrize("legacy, n_ids", [(True, 54), (False, 53)])
def test_start_end_tokens_and_legacy(tmp_path, legacy, n_ids):
    """``mm_use_im_start_end`` true: the wrappers are single added ids; ``legacy`` then changes the
    ids after ``<ev_end>`` (legacy keeps SentencePiece's lone space 29871 before ``\\n``)."""
    tok = load_tokenizer(_folder_with(tmp_path, legacy), eventgpt_added_tokens(True, True))
    assert tok.convert_tokens_to_ids([EV_START, EV_END]) == [32001, 32002]
    ids, k = tokenize_prompt(EVENTGPT_FORMAT, tok, DEFAULT_QUERY)
    assert len(ids) == n_ids
    assert ids[k - 1] == 32001 and ids[k + 1] == 32002
    after = ids[k + 2: k + 4]
    assert after == ([29871, 13] if legacy else [13, 5618])


def test_decoding_matches_transformers_around_added_tokens():
    tok = load_tokenizer(require(LLAMA_TOKENIZER), eventgpt_added_tokens(True, False))
    ids = tok("What are the key elements", add_special_tokens=False).input_ids
    assert decode_ids(tok, [1, *ids[:2], 32000, *ids[2:], 2, EVENT_TOKEN_INDEX]) == "What are the key elements"


def test_bos_only_on_the_first_piece():
    tok = load_tokenizer(TINY_TOKENIZER)
    ids = tokenize_with_placeholder("a <event> b <event> c", tok)
    assert ids.count(EVENT_TOKEN_INDEX) == 2 and ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_whole_text_mode_uses_the_marker_token():
    tok = load_tokenizer(TINY_TOKENIZER, ["<image>"])
    fmt = PromptFormat("USER: <image>\n{query} ASSISTANT:", "<image>", split=False)
    ids, k = tokenize_prompt(fmt, tok, "What?")
    assert ids[0] == tok.bos_token_id and ids[k] == tok.convert_tokens_to_ids("<image>") and ids.count(ids[k]) == 1
    with pytest.raises(InputError, match="must not contain"):
        tokenize_prompt(fmt, tok, "a <image> b")


def test_bad_template_and_missing_tokenizer_are_clear(tmp_path):
    with pytest.raises(ValueError, match="template"):
        PromptFormat("no marker {query}", "<image>", split=False)
    with pytest.raises(InputError, match="tokenizer model not found") as e:
        load_tokenizer(tmp_path / "nope.model")
    assert "nope.model" in str(e.value) and "\n" not in str(e.value)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a SentencePiece model"):
        load_tokenizer(bad)
