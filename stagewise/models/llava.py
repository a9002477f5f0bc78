"""LLaVA-1.5 (``transformers``' ``LlavaForConditionalGeneration``) as five stages, and the
parts it shares with Video-LLaVA (:mod:`stagewise.models.video_llava`).

Both are "LLaVA family" models: a CLIP ViT-L/14 tower, a two-layer GELU projector into the
LLaMA (Vicuna-7B v1.5) embedding space, and the vision embeddings standing in the prompt
where a placeholder token was. ``transformers`` computes the vision features inside
``forward``/``generate``; here stage 3 calls the very same feature method
(``get_image_features`` / ``get_video_features``: same layer, same CLS handling) once, and
stage 4 splices the result into the text embeddings, so the decoupled path reproduces the
fused ``generate`` token for token (checked by the tests and ``stagewise verify``).

Why the stages cost what they cost: the tower is compute-bound (577 tokens x 24 layers per
336-px image, ~0.4 TFLOP); the prefill is compute-bound too (576 vision + ~20 text tokens
through 6.7e9 parameters); decode is bandwidth-bound (13.5 GB of bf16 weights per token).

Facts of ``llava-hf/llava-1.5-7b-hf`` (its ``config.json``): ``image_token_index`` 32000,
``pad_token_id`` 32001, ``vocab_size`` 32064, ``vision_feature_layer`` -2 (the output of the
23rd of 24 CLIP layers; transformers still runs all 24), ``vision_feature_select_strategy``
``"default"`` (CLS dropped) -> (336/14)^2 = 576 image tokens; CLIP ViT-L/14-336 (hidden 1024,
24 layers, 16 heads, MLP 4096, ``quick_gelu``); image processor: shortest edge 336 (bicubic),
center crop 336, rescale 1/255, OpenAI CLIP mean/std. Prompt ``"USER: <image>\\n{query} ASSISTANT:"``.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stagewise.errors import InputError
from stagewise.models.base import Prepared, Sample
from stagewise.preprocess.clip import CLIP_MEAN, CLIP_STD
from stagewise.inputs.video import read_image, read_middle_frame

LLAVA_PROMPT = "USER: <image>\n{query} ASSISTANT:"
"""The llava-hf model card's prompt for LLaVA-1.5 (one image, before the question)."""

TOKENIZER_ENV = "STAGEWISE_SHARED_DATA"
"""Environment variable naming the shared data folder (``tokenizers/llama2/tokenizer.model`` inside)."""

_SHARED_TOKENIZER = Path("tokenizers") / "llama2" / "tokenizer.model"

LLAMA_PIECES = 32000
"""Pieces of the LLaMA-2 SentencePiece vocabulary (Vicuna v1.5, LLaVA-1.5, Video-LLaVA); added
tokens take the ids from 32000 on."""


# ---------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlavaPreset:
    """Architecture of a LLaVA-family model (random weights are drawn for it).

    LM fields are the LLaMA config; ``vision_*`` the CLIP vision tower; the defaults are
    Vicuna-7B v1.5 and CLIP ViT-L/14 (sources: the ``config.json`` of
    ``llava-hf/llava-1.5-7b-hf`` and ``LanguageBind/Video-LLaVA-7B-hf``).
    """

    name: str
    image_size: int
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    vocab_size: int = 32064
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    vision_hidden_size: int = 1024
    vision_intermediate_size: int = 4096
    vision_num_hidden_layers: int = 24
    vision_num_attention_heads: int = 16
    vision_patch_size: int = 14
    vision_projection_dim: int = 768
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"

    def __post_init__(self) -> None:
        if self.image_size % self.vision_patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of vision_patch_size")
        if self.vocab_size < 32003:
            raise ValueError(f"vocab_size {self.vocab_size} must hold the added tokens (>= 32003)")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy: {self.vision_feature_select_strategy!r}")


_TINY_LM: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "num_key_value_heads": 4}
_TINY_VISION: dict[str, Any] = {"vision_hidden_size": 32, "vision_intermediate_size": 64,
                                "vision_num_hidden_layers": 3, "vision_num_attention_heads": 2,
                                "vision_projection_dim": 32}

PRESETS: dict[str, LlavaPreset] = {
    "llava-1.5-7b": LlavaPreset("llava-1.5-7b", image_size=336),
    # Same image size, tokens, vocabulary and processor; 2 LM layers of width 64, 3 CLIP layers of 32.
    "llava-1.5-tiny": LlavaPreset("llava-1.5-tiny", image_size=336, **_TINY_LM, **_TINY_VISION),
}
"""LLaVA-1.5 presets: ``llava-1.5-7b`` (exact shapes) and ``llava-1.5-tiny`` (CPU tests)."""


def text_config(p: LlavaPreset, pad_token_id: int | None) -> Any:
    """The ``LlamaConfig`` of a preset (Vicuna v1.5: BOS 1, EOS 2, SiLU, no biases, untied head)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=p.vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_hidden_layers, num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads, max_position_embeddings=p.max_position_embeddings,
        rms_norm_eps=p.rms_norm_eps, rope_theta=p.rope_theta, hidden_act="silu",
        bos_token_id=1, eos_token_id=2, pad_token_id=pad_token_id, tie_word_embeddings=False,
    )


def vision_config(p: LlavaPreset) -> Any:
    """The ``CLIPVisionConfig`` of a preset (CLIP ViT: ``quick_gelu``, LayerNorm eps 1e-5)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=p.vision_hidden_size, intermediate_size=p.vision_intermediate_size,
        num_hidden_layers=p.vision_num_hidden_layers, num_attention_heads=p.vision_num_attention_heads,
        patch_size=p.vision_patch_size, image_size=p.image_size, projection_dim=p.vision_projection_dim,
        hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )


def get_preset(presets: dict[str, LlavaPreset], name: str) -> LlavaPreset:
    """``presets[name]``, or ValueError listing the names."""
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
    return presets[name]


# ---------------------------------------------------------------------------------------
# Shared helpers: dtype/device, tokenizer, random weights, the LM view, checkpoint checks
# ---------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.bfloat16`` or a name (``"bf16"``, ``"bfloat16"``, ``"fp16"``, ``"float32"``...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def default_tokenizer_path() -> Path | None:
    """The LLaMA-2 ``tokenizer.model`` of the shared data, if present.

    Looks in ``$STAGEWISE_SHARED_DATA/tokenizers/llama2/`` and then in
    ``<checkout>/../shared/data/tokenizers/llama2/``.
    """
    roots = []
    if os.environ.get(TOKENIZER_ENV):
        roots.append(Path(os.environ[TOKENIZER_ENV]))
    roots.append(Path(__file__).resolve().parents[3] / "shared" / "data")
    for r in roots:
        if (r / _SHARED_TOKENIZER).is_file():
            return r / _SHARED_TOKENIZER
    return None


def build_llama_tokenizer(tokenizer_path: str | Path | None, added: Sequence[tuple[str, int]]) -> Any:
    """A LLaMA tokenizer from a bare SentencePiece ``tokenizer.model`` plus added special tokens.

    Args:
        tokenizer_path: the ``tokenizer.model`` file or a folder holding it; None: see
            :func:`default_tokenizer_path`.
        added: ``(token, expected_id)`` pairs added in order as special tokens, e.g.
            ``[("<image>", 32000), ("<pad>", 32001)]`` for llava-1.5-7b-hf. A ``"<pad>"`` entry
            becomes the pad token.

    Returns:
        A ``transformers`` ``LlamaTokenizer`` with ``legacy=True`` semantics: every text
        segment gets the SentencePiece prefix "▁", also the one right after an added token.
        That is how the released llava-hf tokenizers split ``"USER: <image>\\n..."``:
        ``[1, 3148, 1001, 29901, 29871, 32000, 29871, 13, ...]`` (the ids ``transformers``' own
        LLaVA processor test expects); ``legacy=False`` would drop the second 29871. BOS is NOT
        relied on: the models prepend it themselves, because ``transformers`` 5 building from a
        bare ``tokenizer.model`` was seen to add none.

    Raises:
        InputError: no tokenizer file (given path missing, or none found by default), or
            not a 32000-piece SentencePiece model.
    """
    import sentencepiece as spm
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer

    if tokenizer_path is None:
        model_file = default_tokenizer_path()
        if model_file is None:
            raise InputError(None, "no LLaMA tokenizer: pass tokenizer_path (a tokenizer.model) or set "
                             f"{TOKENIZER_ENV} to the shared data folder")
    else:
        model_file = Path(tokenizer_path)
        if model_file.is_dir():
            model_file = model_file / "tokenizer.model"
        if not model_file.is_file():
            raise InputError(model_file, "LLaMA tokenizer.model not found")
    try:
        n_pieces = spm.SentencePieceProcessor(model_file=str(model_file)).get_piece_size()
    except (RuntimeError, OSError) as e:
        raise InputError(model_file, f"not a SentencePiece model ({e})") from None
    if n_pieces != LLAMA_PIECES:
        raise InputError(model_file, f"{n_pieces} pieces; the LLaMA-2 vocabulary has {LLAMA_PIECES}")
    with tempfile.TemporaryDirectory() as d:
        shutil.copyfile(model_file, Path(d) / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(d, legacy=True)
    tok.init_kwargs["legacy"] = True  # saved to tokenizer_config.json: reloads the same
    for text, want in added:
        tok.add_tokens([AddedToken(text, special=True, normalized=False)], special_tokens=True)
        got = tok.convert_tokens_to_ids(text)
        if got != want:  # internal invariant once the vocabulary size is checked
            raise RuntimeError(f"{text} got id {got}, expected {want}")
        if text == "<pad>":
            tok.pad_token = text
    return tok


def build_random_hf(cls: Any, config: Any, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    """``cls(config)`` with random weights created directly on ``device`` in ``dtype``.

    ``transformers``' own initialisation (normal, std 0.02 for LLaMA; CLIP's factors),
    seeded by ``seed``; eval mode, no gradients.
    """
    torch.manual_seed(seed)
    with torch.device(device):
        hf = cls._from_config(config, dtype=dtype)
    return hf.eval().requires_grad_(False)


def lm_view(hf: Any) -> Any:
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


def check_checkpoint_folder(path: Path, model_type: str) -> dict:
    """Validate a local Hugging Face checkpoint folder; return its ``config.json``.

    Raises:
        InputError: missing folder, ``config.json``, weights, tokenizer or
            ``preprocessor_config.json``; a config of another ``model_type``.
    """
    if not path.is_dir():
        raise InputError(path, "checkpoint folder not found")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise InputError(cfg_file, "missing: not a Hugging Face checkpoint folder")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise InputError(cfg_file, f"cannot read JSON ({e})") from None
    if cfg.get("model_type") != model_type:
        raise InputError(cfg_file, f"model_type is {cfg.get('model_type')!r}, expected {model_type!r}")
    if not (list(path.glob("*.safetensors")) or list(path.glob("pytorch_model*.bin"))):
        raise InputError(path, "no weight files (*.safetensors or pytorch_model*.bin)")
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        raise InputError(path, "no tokenizer (tokenizer.json or tokenizer.model)")
    if not (path / "preprocessor_config.json").is_file():
        raise InputError(path / "preprocessor_config.json", "missing: the image processor settings")
    return cfg


def load_pretrained_hf(cls: Any, path: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """``cls.from_pretrained(path)`` in ``dtype`` on ``device`` (eval, no gradients).

    Loads straight onto the device when ``accelerate`` is installed (``device_map``);
    otherwise on the host first, then moves it.
    """
    import importlib.util

    if device.type != "cpu" and importlib.util.find_spec("accelerate") is not None:
        hf = cls.from_pretrained(path, dtype=dtype, device_map=str(device))
    else:
        hf = cls.from_pretrained(path, dtype=dtype).to(device)
    return hf.eval().requires_grad_(False)


def clip_tower_flops(image_size: int, patch: int, hidden: int, intermediate: int,
                     layers: int) -> dict[str, float]:
    """FLOPs (multiply-add = 2) of one image through a CLIP ViT, per part.

    With ``T = (image_size / patch)^2 + 1`` tokens (patches + CLS), ``D = hidden``,
    ``I = intermediate``, ``L = layers`` run:

    - patch embedding (a conv = one matmul): ``2 * (3 * patch^2) * D * (T - 1)``
    - per layer: Q, K, V, O projections ``8 * T * D^2``; scores ``Q K^T`` and ``softmax(.) V``
      ``4 * T^2 * D``; MLP ``4 * T * D * I``
    - LayerNorms, softmax, activations and biases are left out (< 1 %).

    Returns:
        ``{"patch_embed", "layers", "tokens"}`` (FLOPs, FLOPs, ``T``).
    """
    n_patches = (image_size // patch) ** 2
    t = n_patches + 1
    d, i = hidden, intermediate
    per_layer = 8 * t * d * d + 4 * t * t * d + 4 * t * d * i
    return {"patch_embed": 2.0 * 3 * patch * patch * d * n_patches, "layers": float(layers * per_layer),
            "tokens": float(t)}


# ---------------------------------------------------------------------------------------
# The shared model class
# ---------------------------------------------------------------------------------------


class LlavaFamilyModel:
    """Five-stage wrapper around a ``transformers`` LLaVA-family model (see the module docstring).

    Subclasses set the class attributes and implement :meth:`load`, :meth:`encode_vision`
    and :meth:`_pixel_kwargs`.

    Attributes:
        name: family name.
        hf: the ``transformers`` multimodal model.
        lm: ``LlamaForCausalLM`` sharing ``hf``'s decoder and head (see :func:`lm_view`).
        tokenizer, image_processor: the processor parts.
        device, dtype: of all weights.
        eos_token_id: the tokenizer's EOS (2).
        placeholder_id: the token that stands for the vision embeddings in ``input_ids``.
        n_frames: images per sample (8 for Video-LLaVA, 1 for LLaVA-1.5).
        preset: preset name, or None for a checkpoint.
        source: ``"random"`` or the checkpoint folder.
    """

    name: str = ""
    prompt_template: str = ""
    placeholder_token: str = ""
    n_frames: int = 1

    def __init__(self, hf: Any, tokenizer: Any, image_processor: Any, *, preset: str | None,
                 source: str) -> None:
        self.hf = hf
        self.lm = lm_view(hf)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.preset = preset
        self.source = source
        p = next(hf.parameters())
        self.device: torch.device = p.device
        self.dtype: torch.dtype = p.dtype
        self.eos_token_id: int = int(tokenizer.eos_token_id)
        self.bos_token_id: int | None = tokenizer.bos_token_id
        self.placeholder_id: int = int(tokenizer.convert_tokens_to_ids(self.placeholder_token))
        cfg_id = self._config_placeholder_id()
        if self.placeholder_id != cfg_id:
            raise InputError(None if source == "random" else source,
                             f"tokenizer maps {self.placeholder_token} to {self.placeholder_id}, "
                             f"but the model config expects {cfg_id}")

    # -- per family -------------------------------------------------------------------

    def _config_placeholder_id(self) -> int:
        raise NotImplementedError

    def _pixel_kwargs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """``generate`` keyword for the pixels ``[N, 3, H, W]``."""
        raise NotImplementedError

    def load(self, sample: Sample) -> np.ndarray:
        raise NotImplementedError

    def encode_vision(self, prepared: Prepared) -> torch.Tensor:
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------

    @property
    def vision_config(self) -> Any:
        return self.hf.config.vision_config

    def cls_kept(self) -> bool:
        """Does the vision path keep the CLS token in its output?"""
        raise NotImplementedError

    def vision_tokens_per_image(self) -> int:
        """Vision embeddings per image: ``(image_size / patch)^2`` (+1 when CLS is kept)."""
        vc = self.vision_config
        return (vc.image_size // vc.patch_size) ** 2 + (1 if self.cls_kept() else 0)

    def vision_tokens(self, n_images: int | None = None) -> int:
        """Vision embeddings for ``n_images`` images (default :attr:`n_frames`)."""
        return self.vision_tokens_per_image() * (self.n_frames if n_images is None else n_images)

    @property
    def n_vision_tokens(self) -> int:
        """Vision embeddings per sample (the runner sizes the static KV cache with it)."""
        return self.vision_tokens()

    def tokenize(self, query: str) -> torch.Tensor:
        """Prompt ids ``[S_text]`` int64 (host): BOS + the template with ONE placeholder id.

        Raises:
            InputError: the query itself contains the placeholder text.
        """
        if self.placeholder_token in query:
            raise InputError(None, f"the query must not contain {self.placeholder_token!r}")
        text = self.prompt_template.format(query=query)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        ids_t = torch.tensor(ids, dtype=torch.long)
        if int((ids_t == self.placeholder_id).sum()) != 1:  # internal invariant
            raise RuntimeError(f"prompt holds {(ids_t == self.placeholder_id).sum()} placeholders, not 1")
        return ids_t

    def preprocess(self, loaded: np.ndarray, query: str) -> Prepared:
        """Stage 2: image processor on each frame + tokenizer.

        Args:
            loaded: ``[N, H, W, 3]`` uint8 RGB from :meth:`load`.
            query: the user question.

        Returns:
            :class:`Prepared` with ``pixel_values`` ``[N, 3, S, S]`` (S = tower image size) on
            the device in the model dtype, ``input_ids`` ``[S_text]`` int64 on the device holding
            ONE :attr:`placeholder_id` (not expanded; :meth:`build_inputs_embeds` splices the
            ``N_vision`` embeddings there), and ``shapes``.
        """
        frames = np.asarray(loaded)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"preprocess: expected [N, H, W, 3] frames, got {list(frames.shape)}")
        kwargs: dict[str, Any] = {"return_tensors": "pt"}
        if "return_legacy_image_output" in inspect.signature(self.image_processor.preprocess).parameters:
            kwargs["return_legacy_image_output"] = False
        out = self.image_processor(images=list(frames), **kwargs)
        pv = out["pixel_values"] if "pixel_values" in out else out["pixel_values_images"]
        pv = pv.to(self.device, self.dtype)  # [N, 3, S, S]
        ids = self.tokenize(query).to(self.device)  # [S_text]
        return Prepared(pv, ids, shapes={
            "load.frames": list(frames.shape),
            "preprocess.pixel_values": list(pv.shape),
            "preprocess.input_ids": list(ids.shape),
        })

    def _placeholder_pos(self, input_ids: torch.Tensor) -> int:
        pos = (input_ids == self.placeholder_id).nonzero().flatten().tolist()
        if len(pos) != 1:
            raise ValueError(f"input_ids must hold exactly one placeholder {self.placeholder_id}, found {len(pos)}")
        return pos[0]

    @torch.inference_mode()
    def build_inputs_embeds(self, prepared: Prepared, vision: torch.Tensor) -> torch.Tensor:
        """Stage 4, first part: text embeddings with ``vision`` in place of the placeholder.

        Args:
            prepared: from :meth:`preprocess` (``input_ids`` ``[S_text]``, one placeholder).
            vision: ``[N_vision, hidden]`` from :meth:`encode_vision`.

        Returns:
            ``[S_text - 1 + N_vision, hidden]`` in the model dtype on the device -- the same
            values ``transformers`` builds with ``masked_scatter`` over an expanded prompt.
        """
        ids = prepared.input_ids
        p = self._placeholder_pos(ids)
        emb = self.hf.get_input_embeddings()(ids)  # [S_text, D]
        return torch.cat([emb[:p], vision.to(emb.dtype), emb[p + 1:]], dim=0)  # [S_prefill, D]

    def expanded_input_ids(self, prepared: Prepared) -> torch.Tensor:
        """``input_ids`` with the placeholder repeated once per vision token (``transformers``' layout).

        Returns:
            ``[S_text - 1 + N_vision]`` int64 on the device.
        """
        ids = prepared.input_ids
        p = self._placeholder_pos(ids)
        n = self.vision_tokens(prepared.pixel_values.shape[0])
        return torch.cat([ids[:p], ids.new_full((n,), self.placeholder_id), ids[p + 1:]])

    @torch.inference_mode()
    def generate_fused(self, prepared: Prepared, max_new_tokens: int, eos_token_id: int | None) -> list[int]:
        """The fused reference: ONE ``hf.generate`` call from pixels, greedy.

        The prompt is the expanded one (:meth:`expanded_input_ids`), as the ``transformers``
        processor would build it; vision runs inside ``generate``.

        Args:
            max_new_tokens: tokens to generate (>= 1).
            eos_token_id: stop after this token; None: never stop early -- exactly
                ``max_new_tokens`` tokens (the model's default EOS is switched off too).

        Returns:
            The generated ids (EOS included when hit).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids = self.expanded_input_ids(prepared)  # [S_prefill]
        gc = copy.deepcopy(self.hf.generation_config)
        gc.max_new_tokens = max_new_tokens
        gc.max_length = None
        gc.min_new_tokens = None
        gc.min_length = 0
        gc.do_sample = False
        gc.num_beams = 1
        gc.temperature = gc.top_p = gc.top_k = None
        gc.eos_token_id = eos_token_id
        saved = self.hf.generation_config
        self.hf.generation_config = gc  # generate() fills unset (None) fields from here
        try:
            out = self.hf.generate(
                input_ids=ids[None], attention_mask=torch.ones_like(ids)[None],
                generation_config=gc, **self._pixel_kwargs(prepared.pixel_values),
            )
        finally:
            self.hf.generation_config = saved
        return out[0, ids.numel():].tolist()

    def decode_text(self, ids: list[int]) -> str:
        """Token ids -> text, special tokens skipped (ids past the tokenizer's table read as '')."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def vision_flops(self, n_images: int) -> float:
        """FLOPs of stage 3 for ``n_images`` images: CLIP tower (all its layers) + projector.

        Per image (:func:`clip_tower_flops` for the tower): the tower runs ALL its layers even
        though ``vision_feature_layer = -2`` reads the second-to-last output (``transformers``
        computes every hidden state); the projector then maps ``N`` tokens (CLS kept for
        Video-LLaVA's videos, dropped for LLaVA-1.5's images) with
        ``2 * N * (D_v * D + D * D)`` (two linears, D = LM hidden). Total = ``n_images`` x
        (patch embedding + L x layer + projector).
        """
        vc = self.vision_config
        t = clip_tower_flops(vc.image_size, vc.patch_size, vc.hidden_size, vc.intermediate_size,
                             vc.num_hidden_layers)
        d = self.hf.config.text_config.hidden_size
        proj = 2.0 * self.vision_tokens_per_image() * (vc.hidden_size * d + d * d)
        return float(n_images) * (t["patch_embed"] + t["layers"] + proj)

    def _param_count(self, module: Any) -> int:
        return int(sum(p.numel() for p in module.parameters()))

    def describe(self) -> dict[str, Any]:
        """Preset/architecture facts for the run's ``config.json`` (JSON-serialisable)."""
        vc, tc = self.vision_config, self.hf.config.text_config
        import transformers

        return {
            "family": self.name,
            "preset": self.preset,
            "source": self.source,
            "hf_class": type(self.hf).__name__,
            "image_processor": type(self.image_processor).__name__,
            "transformers_version": transformers.__version__,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "prompt_template": self.prompt_template,
            "placeholder_token": self.placeholder_token,
            "placeholder_token_id": self.placeholder_id,
            "n_frames": self.n_frames,
            "image_size": vc.image_size,
            "patch_size": vc.patch_size,
            "vision_feature_layer": self.hf.config.vision_feature_layer,
            "vision_feature_select_strategy": self.hf.config.vision_feature_select_strategy,
            "vision_cls_kept": self.cls_kept(),
            "vision_tokens_per_image": self.vision_tokens_per_image(),
            "vision_tokens": self.vision_tokens(),
            "vision_layers_run": vc.num_hidden_layers,
            "vision_hidden_size": vc.hidden_size,
            "vision_flops": self.vision_flops(self.n_frames),
            "vision_tower_params": self._vision_tower_params(),
            "projector_params": self._param_count(self.hf.model.multi_modal_projector),
            "lm_params": self._param_count(self.lm),
            "total_params": self._param_count(self.hf),
            "lm_hidden_size": tc.hidden_size,
            "lm_layers": tc.num_hidden_layers,
            "lm_heads": tc.num_attention_heads,
            "lm_kv_heads": tc.num_key_value_heads,
            "lm_intermediate_size": tc.intermediate_size,
            "vocab_size": tc.vocab_size,
            "eos_token_id": self.eos_token_id,
        }

    def _vision_tower_params(self) -> int:
        raise NotImplementedError

    def save_pretrained(self, path: str | Path) -> Path:
        """Write model, tokenizer and image processor as a Hugging Face folder
        (what ``from_pretrained`` of this family reads)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        return path


# ---------------------------------------------------------------------------------------
# LLaVA-1.5
# ---------------------------------------------------------------------------------------

LLAVA_IMAGE_TOKEN_ID = 32000
LLAVA_PAD_TOKEN_ID = 32001


def clip_processor_kwargs(image_size: int) -> dict[str, Any]:
    """The CLIP preprocessing settings both frame models' processors share: shortest edge
    ``image_size`` (bicubic), center crop, rescale 1/255, OpenAI CLIP mean/std, RGB."""
    return dict(
        do_resize=True, size={"shortest_edge": image_size}, resample=3, do_center_crop=True,
        crop_size={"height": image_size, "width": image_size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True,
    )


def llava_image_processor(image_size: int) -> Any:
    """CLIP image processor with llava-1.5-7b-hf's settings, PIL backend.

    The PIL backend (``CLIPImageProcessorPil``) gives the same pixels with or without
    torchvision installed; shortest edge ``image_size`` (bicubic), center crop, rescale
    1/255, OpenAI CLIP mean/std, RGB conversion.
    """
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(**clip_processor_kwargs(image_size))


class LlavaModel(LlavaFamilyModel):
    """LLaVA-1.5 as five stages: one image -> 576 embeddings (CLS dropped, layer -2)."""

    name = "llava-1.5"
    prompt_template = LLAVA_PROMPT
    placeholder_token = "<image>"
    n_frames = 1

    def _config_placeholder_id(self) -> int:
        return int(self.hf.config.image_token_id)

    def cls_kept(self) -> bool:
        """``vision_feature_select_strategy == "full"`` keeps CLS; ``"default"`` (LLaVA-1.5) drops it."""
        return self.hf.config.vision_feature_select_strategy == "full"

    def _pixel_kwargs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixel_values": pixel_values}

    def _vision_tower_params(self) -> int:
        return self._param_count(self.hf.model.vision_tower)

    def load(self, sample: Sample) -> np.ndarray:
        """Stage 1: ``[1, H, W, 3]`` uint8 RGB.

        ``sample.image_path``; else the middle frame of ``sample.video_path`` (MP4 or folder);
        else the middle one of ``sample.event_image_paths``.

        Raises:
            InputError: none of them set, or the file cannot be read.
        """
        if sample.image_path is not None:
            return read_image(sample.image_path)[None]
        if sample.video_path is not None:
            return read_middle_frame(sample.video_path)
        if sample.event_image_paths:
            paths = list(sample.event_image_paths)
            return read_image(paths[(len(paths) - 1) // 2])[None]
        raise InputError(None, f"sample {sample.sample_id!r}: LLaVA-1.5 needs image_path, video_path "
                         "or event_image_paths")

    @torch.inference_mode()
    def encode_vision(self, prepared: Prepared) -> torch.Tensor:
        """Stage 3: ``[N * 576, hidden]`` -- ``hf.model.get_image_features`` (tower, layer -2,
        CLS dropped, projector), the call ``forward`` makes inside ``generate``."""
        cfg = self.hf.config
        out = self.hf.model.get_image_features(
            pixel_values=prepared.pixel_values,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        if isinstance(feats, (list, tuple)):
            return torch.cat(list(feats), dim=0)  # [N * 576, D]
        return feats.flatten(0, 1)


def _llava_config(p: LlavaPreset) -> Any:
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=vision_config(p), text_config=text_config(p, pad_token_id=None),
        image_token_index=LLAVA_IMAGE_TOKEN_ID, projector_hidden_act="gelu",
        vision_feature_layer=p.vision_feature_layer,
        vision_feature_select_strategy=p.vision_feature_select_strategy,
        image_seq_length=(p.image_size // p.vision_patch_size) ** 2, pad_token_id=LLAVA_PAD_TOKEN_ID,
        tie_word_embeddings=False,
    )


def build_random(preset: str, *, device: str | torch.device, dtype: torch.dtype | str, seed: int = 0,
                 tokenizer_path: str | Path | None = None) -> LlavaModel:
    """LLaVA-1.5 with random weights and a preset's exact shapes.

    Args:
        preset: a key of :data:`PRESETS` (``"llava-1.5-7b"``, ``"llava-1.5-tiny"``).
        device: where the weights are created (directly; ``"meta"`` for shapes only).
        dtype: weight dtype (``torch.bfloat16`` or a name, see :func:`as_dtype`).
        seed: ``torch.manual_seed`` before initialisation.
        tokenizer_path: LLaMA-2 ``tokenizer.model`` (or its folder); None: the shared one.

    Returns:
        :class:`LlavaModel`: tokenizer with ``<image>`` = 32000 and ``<pad>`` = 32001 added,
        CLIP image processor with the real settings.

    Raises:
        ValueError: unknown preset or dtype.
        InputError: no tokenizer.
    """
    from transformers import LlavaForConditionalGeneration

    p = get_preset(PRESETS, preset)
    tok = build_llama_tokenizer(tokenizer_path, [("<image>", LLAVA_IMAGE_TOKEN_ID), ("<pad>", LLAVA_PAD_TOKEN_ID)])
    hf = build_random_hf(LlavaForConditionalGeneration, _llava_config(p), torch.device(device), as_dtype(dtype), seed)
    return LlavaModel(hf, tok, llava_image_processor(p.image_size), preset=p.name, source="random")


def from_pretrained(path: str | Path, *, device: str | torch.device, dtype: torch.dtype | str) -> LlavaModel:
    """LLaVA-1.5 from a local Hugging Face folder (e.g. a download of ``llava-hf/llava-1.5-7b-hf``).

    Reads ``config.json`` (``model_type: "llava"``) and the weights
    (``LlavaForConditionalGeneration``), the tokenizer (``AutoTokenizer``) and
    ``preprocessor_config.json`` (with the PIL CLIP processor, see :func:`llava_image_processor`).

    Raises:
        InputError: missing folder or files, a config of another model type, or a tokenizer
            whose ``<image>`` id differs from the config's.
    """
    from transformers import AutoTokenizer, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    path = Path(path)
    check_checkpoint_folder(path, "llava")
    tok = AutoTokenizer.from_pretrained(path)
    improc = CLIPImageProcessorPil.from_pretrained(path)
    hf = load_pretrained_hf(LlavaForConditionalGeneration, path, torch.device(device), as_dtype(dtype))
    return LlavaModel(hf, tok, improc, preset=None, source=str(path))
