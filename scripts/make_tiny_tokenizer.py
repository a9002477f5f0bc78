"""Train the tiny SentencePiece model shipped in ``stagewise/assets/``.

The embedded default (``stagewise run`` with no arguments) needs a LLaMA-style tokenizer
without any file outside the repo. This trains a 1,000-piece BPE model with LLaMA's
special ids (unk 0, BOS 1, EOS 2) and byte fallback, so any text encodes. Deterministic:
same corpus, same settings, same model.

Usage: ``python scripts/make_tiny_tokenizer.py``
"""

from __future__ import annotations

import io
from pathlib import Path

import sentencepiece as spm

from stagewise.preprocess.prompt import EVENTGPT_SYSTEM

CORPUS = [
    EVENTGPT_SYSTEM,
    "USER: What are the key elements in this scene? ASSISTANT:",
    "USER: Describe the scene in detail. ASSISTANT:",
    "In the scene, there is a road with a car driving ahead. The road is bordered by hedges and trees.",
    "The scene depicts a road with a car driving away from the viewer. The road is lined with trees.",
    "A bright bar sweeps across the field of view while a dark disc moves the other way.",
    "The event camera records changes of brightness at each pixel with microsecond timing.",
    "There is a pedestrian crossing the street, a cyclist on the right and buildings on the left.",
    "The vehicle turns left at the intersection; traffic lights, signs and lane markings are visible.",
]


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "stagewise" / "assets" / "tiny_llama_sp.model"
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=buf,
        vocab_size=1000,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        split_digits=True,
        normalization_rule_name="identity",
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    out.write_bytes(buf.getvalue())
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
