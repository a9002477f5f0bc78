"""LLaVA-1.5 through the five stages on the tiny preset (CPU, fp32): 576 image tokens,
decoupled == fused greedy tokens, the shared LM, input fallbacks, a saved tiny checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LLAMA_TOKENIZER, decoupled
from PIL import Image

from stagewise.errors import InputError
from stagewise.models import llava
from stagewise.models.base import MultimodalModel, Prepared, Sample
from stagewise.models.registry import build_random
from stagewise.preprocess.prompt import tokenize_prompt

QUERY = "What are the key elements in this scene?"


TOKENIZER = LLAMA_TOKENIZER if LLAMA_TOKENIZER.is_file() else None
pytestmark = pytest.mark.skipif(TOKENIZER is None, reason="LLaMA-2 tokenizer.model not in the shared data")


def scene_frame(t: int, h: int = 120, w: int = 160) -> np.ndarray:
    """``[h, w, 3]`` uint8: gradient background and a white square whose position encodes ``t``."""
    yy, xx = np.mgrid[:h, :w]
    f = np.empty((h, w, 3), np.uint8)
    f[..., 0] = (xx * 255 // (w - 1)).astype(np.uint8)
    f[..., 1] = (yy * 255 // (h - 1)).astype(np.uint8)
    f[..., 2] = 80
    x0 = (6 * t) % (w - 24)
    f[40:64, x0:x0 + 24] = 255
    return f


@pytest.fixture(scope="module")
def model():
    return build_random("llava-1.5-tiny", device="cpu", dtype=torch.float32, tokenizer=TOKENIZER)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("img") / "frame.png"
    Image.fromarray(scene_frame(3)).save(p)
    return p


@pytest.fixture(scope="module")
def prepared(model, image) -> Prepared:
    return model.preprocess(model.load(Sample("s0", QUERY, image_path=image)), QUERY)


# ---------------------------------------------------------------------------------------


def test_7b_preset_has_the_real_shapes():
    m = build_random("llava-1.5-7b", device="meta", dtype=torch.bfloat16, tokenizer=TOKENIZER)
    d = m.describe()
    assert isinstance(m, MultimodalModel)
    v, lm = d["vision"], d["lm"]
    assert v["tokens_per_image"] == 576 and d["n_vision_tokens"] == 576 and d["n_frames"] == 1
    assert v["cls_kept"] is False and v["feature_layer"] == -2 and v["feature_select_strategy"] == "default"
    assert v["image_size"] == 336 and v["patch_size"] == 14 and v["layers_run"] == 24
    assert (lm["hidden_size"], lm["num_hidden_layers"], lm["num_attention_heads"], lm["intermediate_size"]) == (4096, 32, 32, 11008)
    assert lm["vocab_size"] == 32064 and d["placeholder_token_id"] == 32000
    assert d["lm_params"] == 6_738_939_904
    assert d["total_params"] == 7_063_427_072  # the published llava-1.5-7b-hf size (7.06 B)
    # FLOPs by hand: T = 577 tokens into the tower (CLS included), 576 into the projector.
    t, dv, i, h = 577, 1024, 4096, 4096
    per_image = 2 * 3 * 14 * 14 * dv * 576 + 24 * (8 * t * dv**2 + 4 * t * t * dv + 4 * t * dv * i) \
        + 2 * 576 * (dv * h + h * h)
    assert m.vision_flops(1) == pytest.approx(per_image, rel=1e-12)
    assert 3.9e11 < m.vision_flops(1) < 4.2e11
    assert m.lm.model is m.hf.model.language_model and m.lm.lm_head is m.hf.lm_head


def test_tokenizer_and_prompt(model):
    tok = model.tokenizer
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]
    assert tok.pad_token_id == 32001 and model.eos_token_id == 2
    ids = torch.tensor(tokenize_prompt(model.prompt, model.tokenizer, QUERY)[0]).tolist()
    assert ids[0] == 1 and ids.count(32000) == 1 and len(ids) == 22
    # The ids transformers' own LLaVA processor test expects from llava-1.5-7b-hf's tokenizer for
    # "USER: <image>\nWhat is shown in this image? ASSISTANT:" (note the 29871 after 32000).
    assert torch.tensor(tokenize_prompt(model.prompt, model.tokenizer, "What is shown in this image?")[0]).tolist() == [
        1, 3148, 1001, 29901, 29871, 32000, 29871, 13, 5618, 338, 4318, 297, 445, 1967, 29973, 319, 1799,
        9047, 13566, 29901]
    assert model.decode_text(ids) == f"USER:  \n{QUERY} ASSISTANT:"


def test_stages_end_to_end_shapes(model, prepared):
    pv, ids = prepared.pixel_values, prepared.input_ids
    assert pv.shape == (1, 3, 336, 336) and pv.dtype == torch.float32
    assert prepared.shapes == {"load.frames": [1, 120, 160, 3], "preprocess.pixel_values": [1, 3, 336, 336],
                               "preprocess.input_ids": [22]}
    vision = model.encode_vision(prepared)
    hidden = model.hf.config.text_config.hidden_size
    assert vision.shape == (576, hidden)
    emb = model.build_inputs_embeds(prepared, vision)
    assert emb.shape == (21 + 576, hidden)
    p = int((ids == 32000).nonzero())
    assert torch.equal(emb[p:p + 576], vision)
    assert model.expanded_input_ids(prepared).shape == (597,)


def test_pixels_match_the_clip_recipe(model, prepared):
    """Shortest edge 336 (bicubic), center crop, /255, CLIP mean/std -- done here with PIL by hand."""
    f = scene_frame(3)
    h, w = f.shape[:2]
    im = Image.fromarray(f).resize((round(w * 336 / h), 336), Image.BICUBIC)
    x0 = (im.width - 336) // 2
    a = np.asarray(im.crop((x0, 0, x0 + 336, 336)), np.float32) / 255
    a = (a - np.array([0.48145466, 0.4578275, 0.40821073])) / np.array([0.26862954, 0.26130258, 0.27577711])
    ref = torch.from_numpy(a.transpose(2, 0, 1)).float()
    diff = (prepared.pixel_values[0] - ref).abs()
    assert diff.max() < 1e-4, f"pixels differ from the CLIP recipe: max {diff.max():.3e} mean {diff.mean():.3e}"


def test_vision_features_are_the_ones_forward_uses(model, prepared):
    vision = model.encode_vision(prepared)
    emb = model.build_inputs_embeds(prepared, vision)[None]
    ids = model.expanded_input_ids(prepared)[None]
    with torch.inference_mode():
        fused = model.hf(input_ids=ids, pixel_values=prepared.pixel_values).logits[0, -1]
        ours = model.lm(inputs_embeds=emb).logits[0, -1]
    diff = (fused - ours).abs()
    assert diff.max() < 1e-5, f"prefill logits differ: max {diff.max():.3e} mean {diff.mean():.3e}"


def test_decoupled_equals_fused_fixed_length(model, prepared):
    n = 16
    fused = model.generate_fused(prepared, n, None)
    ours, n_tok = decoupled(model, prepared, n, None)
    assert len(fused) == n and n_tok == n
    assert ours == fused, f"decoupled {ours} != fused {fused}"


def test_eos_none_ignores_the_models_default_eos(model, prepared):
    ref = model.generate_fused(prepared, 10, None)
    saved = model.hf.generation_config.eos_token_id
    model.hf.generation_config.eos_token_id = ref[1]
    try:
        assert model.generate_fused(prepared, 10, None) == ref
    finally:
        model.hf.generation_config.eos_token_id = saved


def test_eos_stops_both_paths_at_the_same_token(model, prepared):
    ref = model.generate_fused(prepared, 12, None)
    eos = ref[5]
    k = ref.index(eos)
    fused = model.generate_fused(prepared, 12, eos)
    ours, n_tok = decoupled(model, prepared, 12, eos)
    assert fused == ref[: k + 1] and ours == fused and n_tok == k + 1


def test_lm_shares_the_multimodal_weights(model):
    lm, hf = model.lm, model.hf
    assert lm.model.embed_tokens.weight.data_ptr() == hf.model.language_model.embed_tokens.weight.data_ptr()
    assert lm.model.layers[-1].mlp.down_proj.weight.data_ptr() == \
        hf.model.language_model.layers[-1].mlp.down_proj.weight.data_ptr()
    assert lm.lm_head.weight.data_ptr() == hf.lm_head.weight.data_ptr()
    assert not any(p.is_meta for p in lm.parameters())


def test_load_fallbacks_video_middle_frame_and_event_pngs(model, tmp_path):
    from stagewise.inputs.video import write_mp4

    frames = np.stack([scene_frame(t) for t in range(9)])
    folder = tmp_path / "video"
    folder.mkdir()
    for t, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{t:03d}.png")
    got = np.asarray(model.load(Sample("v", QUERY, video_path=folder)).frames)
    assert got.shape == (1, 120, 160, 3) and np.array_equal(got[0], frames[4])

    ev = [folder / f"{t:03d}.png" for t in range(5)]
    assert np.array_equal(model.load(Sample("e", QUERY, event_image_paths=ev)).frames[0], frames[2])

    pytest.importorskip("av")
    mp4 = write_mp4(tmp_path / "c.mp4", frames)
    mid = model.load(Sample("m", QUERY, video_path=mp4)).frames[0].astype(np.int16)
    errs = [np.abs(mid - f.astype(np.int16)).mean() for f in frames]
    assert int(np.argmin(errs)) == 4, f"middle frame of 9 should be index 4; errors {np.round(errs, 1)}"

    # image_path wins over the others
    img = tmp_path / "x.png"
    Image.fromarray(frames[7]).save(img)
    got = model.load(Sample("i", QUERY, image_path=img, video_path=folder)).frames
    assert np.array_equal(got[0], frames[7])


def test_load_errors(model, tmp_path):
    with pytest.raises(InputError, match="needs an image"):
        model.load(Sample("none", QUERY))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"PNG? no")
    with pytest.raises(InputError) as ei:
        model.load(Sample("bad", QUERY, image_path=bad))
    assert ei.value.path == bad


def test_saved_tiny_checkpoint_round_trip(model, prepared, image, tmp_path):
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    m2 = llava.from_pretrained(ckpt, device="cpu", dtype=torch.float32)
    assert m2.placeholder_id == 32000 and m2.eos_token_id == 2
    p2 = m2.preprocess(m2.load(Sample("s0", QUERY, image_path=image)), QUERY)
    assert torch.equal(p2.input_ids, prepared.input_ids)
    assert torch.equal(p2.pixel_values, prepared.pixel_values)
    v1, v2 = model.encode_vision(prepared), m2.encode_vision(p2)
    assert torch.equal(v1, v2), f"vision differs after reload: max {(v1 - v2).abs().max():.3e}"
    fused = model.generate_fused(prepared, 8, None)
    assert m2.generate_fused(p2, 8, None) == fused
    assert decoupled(m2, p2, 8, None)[0] == fused


def test_from_pretrained_errors(model, tmp_path):
    with pytest.raises(InputError, match="not found"):
        llava.from_pretrained(tmp_path / "missing", device="cpu", dtype=torch.float32)
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    wrong = tmp_path / "wrong"
    shutil.copytree(ckpt, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["model_type"] = "video_llava"
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="'llava'"):
        llava.from_pretrained(wrong, device="cpu", dtype=torch.float32)
    (ckpt / "preprocessor_config.json").unlink()
    with pytest.raises(InputError, match="preprocessor_config.json"):
        llava.from_pretrained(ckpt, device="cpu", dtype=torch.float32)


def test_dtype_names_and_bf16_build():
    with pytest.raises(ValueError, match="dtype"):
        build_random("llava-1.5-tiny", dtype="int3", tokenizer=TOKENIZER)
    m = build_random("llava-1.5-tiny", device="cpu", dtype="bf16", tokenizer=TOKENIZER)
    assert m.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in m.hf.parameters())


def test_tokenizer_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        build_random("llava-1.5-tiny", device="cpu", dtype="fp32", tokenizer=tmp_path)
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="SentencePiece") as ei:
        build_random("llava-1.5-tiny", device="cpu", dtype="fp32", tokenizer=tmp_path)
    assert ei.value.path == bad
    with pytest.raises(ValueError, match="llava-1.5-tiny"):
        build_random("llava-2", device="cpu", dtype="fp32", tokenizer=TOKENIZER)
