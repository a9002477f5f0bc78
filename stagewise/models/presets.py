"""Presets: the exact architectures of the released models, and tiny ones in the same geometry.

A preset builds the real architecture with random weights (timing: the output length then comes
from a policy, never from a random model's EOS). Sources of the shapes: Vicuna-7B v1.5's and
``openai/clip-vit-large-patch14-336``'s ``config.json`` (EventGPT, ``../shared/spec/EVENTGPT.md``),
``llava-hf/llava-1.5-7b-hf`` and ``LanguageBind/Video-LLaVA-7B-hf``'s ``config.json``.

The tiny presets keep every token count of the real ones (336 px / patch 14: 577 tokens per frame;
EventGPT's 582 pooled tokens; Video-LLaVA's 8 x 257) with a 2-layer LM of width 64, and carry their
own tokenizer (``stagewise/assets/tiny_llama_sp.model``), so ``stagewise run --preset X`` needs no
download for every tiny X.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stagewise.preprocess.prompt import TINY_TOKENIZER


@dataclass(frozen=True)
class LMShape:
    """A LLaMA decoder's shape.

    Attributes:
        vocab: embedding rows; 0 = the tokenizer's length rounded up to a multiple of 64.
    """

    hidden: int = 4096
    intermediate: int = 11008
    layers: int = 32
    heads: int = 32
    kv_heads: int = 32
    vocab: int = 0
    max_positions: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"LMShape: hidden {self.hidden} / heads {self.heads} / kv_heads {self.kv_heads} do not divide")

    def llama_config(self, vocab: int, *, bos: int = 1, eos: int = 2, pad: int | None = 0):
        """The ``transformers`` ``LlamaConfig`` (SiLU, no biases, untied head)."""
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            max_position_embeddings=self.max_positions, rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
            hidden_act="silu", bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False,
        )

    def vocab_for(self, n_tokens: int) -> int:
        """Embedding rows for a tokenizer of ``n_tokens`` (the preset's, or rounded up to 64)."""
        return max(self.vocab, n_tokens) if self.vocab else -(-n_tokens // 64) * 64


@dataclass(frozen=True)
class VisionShape:
    """A CLIP ViT's shape (quick-GELU, LayerNorm eps 1e-5)."""

    hidden: int = 1024
    intermediate: int = 4096
    layers: int = 24
    heads: int = 16
    image_size: int = 336
    patch: int = 14
    projection_dim: int = 768

    def __post_init__(self) -> None:
        if self.image_size % self.patch:
            raise ValueError(f"VisionShape: image_size {self.image_size} is not a multiple of patch {self.patch}")

    def clip_config(self):
        """The ``transformers`` ``CLIPVisionConfig``."""
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(
            hidden_size=self.hidden, intermediate_size=self.intermediate, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, image_size=self.image_size, patch_size=self.patch,
            projection_dim=self.projection_dim, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        )


@dataclass(frozen=True)
class Preset:
    """A named architecture.

    Attributes:
        name: ``eventgpt-7b``, ``llava-1.5-tiny``, ...
        family: ``eventgpt``, ``llava-1.5`` or ``video-llava``.
        tokenizer: the tokenizer it carries (``None``: the LLaMA-2 one must be given or found).
    """

    name: str
    family: str
    lm: LMShape
    vision: VisionShape
    tokenizer: Path | None = None


VICUNA_7B = LMShape()
CLIP_L14_336 = VisionShape()
CLIP_L14_224 = VisionShape(image_size=224)
TINY_LM = LMShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=4, max_positions=4096)
TINY_CLIP = dict(hidden=32, intermediate=64, layers=2, heads=2, projection_dim=32)

PRESETS: dict[str, Preset] = {p.name: p for p in (
    # EventGPT-7B: Vicuna-7B + the released config's one added token <ev_patch> (32001 rows).
    Preset("eventgpt-7b", "eventgpt", LMShape(vocab=32001), CLIP_L14_336),
    Preset("eventgpt-tiny", "eventgpt", TINY_LM, VisionShape(**TINY_CLIP), TINY_TOKENIZER),
    # llava-1.5-7b-hf: vocab 32064 (32000 pieces + <image> + <pad>, padded to 64).
    Preset("llava-1.5-7b", "llava-1.5", LMShape(vocab=32064), CLIP_L14_336),
    Preset("llava-1.5-tiny", "llava-1.5", TINY_LM, VisionShape(**{**TINY_CLIP, "layers": 3}), TINY_TOKENIZER),
    Preset("video-llava-7b", "video-llava", LMShape(vocab=32064), CLIP_L14_224),
    Preset("video-llava-tiny", "video-llava", TINY_LM, VisionShape(**{**TINY_CLIP, "layers": 3, "image_size": 224}), TINY_TOKENIZER),
)}
"""Every preset, by name."""


def get_preset(name: str) -> Preset:
    """``PRESETS[name]``.

    Raises:
        ValueError: unknown name (the known ones listed).
    """
    if name not in PRESETS:
        raise ValueError(f"preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
