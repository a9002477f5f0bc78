"""The eventgpt_v1 prompt, the SentencePiece tokenizer and the <event> -> -200 splice."""

from __future__ import annotations

import pytest
from conftest import LLAMA_TOKENIZER, require

from stagewise.errors import InputError
from stagewise.preprocess.prompt import (
    DEFAULT_QUERY,
    EV_END,
    EV_START,
    EVENT_TOKEN_INDEX,
    TINY_TOKENIZER,
    SPTokenizer,
    eventgpt_added_tokens,
    eventgpt_prompt,
    tokenize_with_placeholder,
)


def test_prompt_template():
    p = eventgpt_prompt("Q?")
    assert p.startswith("A chat between a curious human")
    assert p.endswith(f"USER: {EV_START}<event>{EV_END}\nQ? ASSISTANT:")
    assert "<ev_start>" not in eventgpt_prompt("Q?", use_start_end=False)


def test_real_llama_tokenizer_splice():
    tok = SPTokenizer(require(LLAMA_TOKENIZER))
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (1, 2, 32000)
    tok.add_tokens(eventgpt_added_tokens(True, True))
    assert tok.added == {"<ev_patch>": 32000, "<ev_start>": 32001, "<ev_end>": 32002}
    ids = tokenize_with_placeholder(eventgpt_prompt(DEFAULT_QUERY), tok)
    print(f"eventgpt_v1 prompt with the LLaMA-2 tokenizer: {len(ids)} ids (placeholder included) for {DEFAULT_QUERY!r}")
    assert ids[0] == 1 and ids.count(1) == 1, "exactly one BOS, first"
    k = ids.index(EVENT_TOKEN_INDEX)
    assert ids[k - 1] == 32001 and ids[k + 1] == 32002
    assert ids.count(EVENT_TOKEN_INDEX) == 1
    # LLaMA's SentencePiece: 'USER: ' ends with the lone space piece 29871, '\n' is byte 13.
    assert ids[k - 2] == 29871 and ids[k + 2 : k + 4] == [29871, 13]
    # The text tokens decode back to the prompt (specials skipped).
    assert tok.decode(ids).endswith(f"{DEFAULT_QUERY} ASSISTANT:")
    # 1 BOS + 34 system/USER pieces + <ev_start> + -200 + <ev_end> + 16 query pieces.
    assert len(ids) == 54


def test_bos_only_on_first_chunk():
    tok = SPTokenizer(TINY_TOKENIZER)
    ids = tokenize_with_placeholder("a <event> b <event> c", tok)
    assert ids.count(EVENT_TOKEN_INDEX) == 2 and ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_missing_tokenizer_is_one_clear_line(tmp_path):
    with pytest.raises(InputError, match="tokenizer model not found") as e:
        SPTokenizer(tmp_path / "nope.model")
    assert "nope.model" in str(e.value) and "\n" not in str(e.value)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a SentencePiece model"):
        SPTokenizer(bad)
