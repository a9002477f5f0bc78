"""Video-LLaVA through the five stages on the tiny preset (CPU, fp32): shapes, decoupled ==
fused greedy tokens, the shared LM, the fairness switch, and a saved tiny checkpoint."""

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
from stagewise.inputs.video import sample_indices, write_mp4
from stagewise.models import video_llava as vl
from stagewise.models.base import MultimodalModel, Prepared, Sample
from stagewise.models.registry import build_random
from stagewise.preprocess.prompt import tokenize_prompt

pytest.importorskip("av")

QUERY = "What are the key elements in this scene?"


TOKENIZER = LLAMA_TOKENIZER if LLAMA_TOKENIZER.is_file() else None
pytestmark = pytest.mark.skipif(TOKENIZER is None, reason="LLaMA-2 tokenizer.model not in the shared data")


def moving_scene(n: int, h: int = 96, w: int = 128) -> np.ndarray:
    """``[n, h, w, 3]`` uint8: gradient background, a white square moving right."""
    yy, xx = np.mgrid[:h, :w]
    frames = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        frames[t, ..., 0] = (xx * 255 // (w - 1)).astype(np.uint8)
        frames[t, ..., 1] = (yy * 255 // (h - 1)).astype(np.uint8)
        frames[t, ..., 2] = 40
        x0 = (4 * t) % (w - 24)
        frames[t, 30:54, x0:x0 + 24] = 255
    return frames


@pytest.fixture(scope="module")
def model():
    return build_random("video-llava-tiny", device="cpu", dtype=torch.float32, tokenizer=TOKENIZER)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_mp4(tmp_path_factory.mktemp("clip") / "clip.mp4", moving_scene(24), fps=20)


@pytest.fixture(scope="module")
def prepared(model, clip) -> Prepared:
    return model.preprocess(model.load(Sample("s0", QUERY, video_path=clip)), QUERY)


# ---------------------------------------------------------------------------------------


def test_7b_preset_has_the_real_shapes():
    m = build_random("video-llava-7b", device="meta", dtype=torch.bfloat16, tokenizer=TOKENIZER)
    d = m.describe()
    assert isinstance(m, MultimodalModel)
    v, lm = d["vision"], d["lm"]
    assert v["tokens_per_image"] == 257 and d["n_vision_tokens"] == 2056 and d["n_frames"] == 8
    assert v["cls_kept"] is True and v["feature_layer"] == -2
    assert v["image_size"] == 224 and v["patch_size"] == 14 and v["layers_run"] == 24
    assert (lm["hidden_size"], lm["num_hidden_layers"], lm["num_attention_heads"], lm["intermediate_size"]) == (4096, 32, 32, 11008)
    assert lm["vocab_size"] == 32064 and d["placeholder_token_id"] == 32001
    assert d["lm_params"] == 6_738_939_904  # Vicuna-7B with the 32064-row vocabulary
    projector = 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert d["vision_params"] == 303_179_776 + projector  # CLIP ViT-L/14 at 224 (no projection head) + projector
    assert m.hf.config.video_seq_length == 2056
    # FLOPs per frame, by hand: T = 257 tokens, D = 1024, I = 4096, 24 layers, LM hidden 4096.
    t, dv, i, h = 257, 1024, 4096, 4096
    per_frame = 2 * 3 * 14 * 14 * dv * 256 + 24 * (8 * t * dv**2 + 4 * t * t * dv + 4 * t * dv * i) \
        + 2 * t * (dv * h + h * h)
    assert m.vision_flops(1) == pytest.approx(per_frame, rel=1e-12)
    assert m.vision_flops(8) == pytest.approx(8 * per_frame, rel=1e-12)
    assert 1.3e12 < m.vision_flops(8) < 1.5e12
    # lm is the decoder of the multimodal model, not a copy (meta tensors compare by identity)
    assert m.lm.model is m.hf.model.language_model and m.lm.lm_head is m.hf.lm_head


def test_tokenizer_and_prompt(model):
    tok = model.tokenizer
    assert tok.convert_tokens_to_ids(["<image>", "<video>", "<pad>"]) == [32000, 32001, 32002]
    assert tok.pad_token_id == 32002 and model.eos_token_id == 2
    ids = torch.tensor(tokenize_prompt(model.prompt, model.tokenizer, QUERY)[0]).tolist()
    assert ids[0] == 1, "BOS missing"
    assert ids.count(32001) == 1 and len(ids) == 22
    assert model.decode_text(ids) == f"USER:  \n{QUERY} ASSISTANT:"
    with pytest.raises(InputError):
        torch.tensor(tokenize_prompt(model.prompt, model.tokenizer, "look at <video> again")[0])


def test_stages_end_to_end_shapes(model, prepared):
    pv, ids = prepared.pixel_values, prepared.input_ids
    assert pv.shape == (8, 3, 224, 224) and pv.dtype == torch.float32 and pv.device == model.device
    assert ids.dtype == torch.long and int((ids == 32001).sum()) == 1
    assert prepared.shapes == {"load.frames": [8, 96, 128, 3], "preprocess.pixel_values": [8, 3, 224, 224],
                               "preprocess.input_ids": [22]}
    vision = model.encode_vision(prepared)
    hidden = model.hf.config.text_config.hidden_size
    assert vision.shape == (2056, hidden) and vision.dtype == torch.float32
    emb = model.build_inputs_embeds(prepared, vision)
    assert emb.shape == (22 - 1 + 2056, hidden)
    p = int((ids == 32001).nonzero())
    text = model.hf.get_input_embeddings()(ids)
    assert torch.equal(emb[p:p + 2056], vision)
    assert torch.equal(emb[:p], text[:p]) and torch.equal(emb[p + 2056:], text[p + 1:])
    assert model.expanded_input_ids(prepared).shape == (2077,)


def test_vision_features_are_the_ones_forward_uses(model, prepared):
    """encode_vision == what forward() computes from pixels: compare the prefill logits of
    forward(expanded ids, pixels) with the LM fed our spliced embeddings."""
    vision = model.encode_vision(prepared)
    emb = model.build_inputs_embeds(prepared, vision)[None]
    ids = model.expanded_input_ids(prepared)[None]
    with torch.inference_mode():
        fused = model.hf(input_ids=ids, pixel_values_videos=prepared.pixel_values[None]).logits[0, -1]
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
    """A checkpoint's generation_config carries an EOS; with eos None generation must still run
    to max_new_tokens. Make the default EOS a token that is generated early, to be sure."""
    ref = model.generate_fused(prepared, 10, None)
    saved = model.hf.generation_config.eos_token_id
    model.hf.generation_config.eos_token_id = ref[2]
    try:
        assert model.generate_fused(prepared, 10, None) == ref
    finally:
        model.hf.generation_config.eos_token_id = saved


def test_eos_stops_both_paths_at_the_same_token(model, prepared):
    ref = model.generate_fused(prepared, 12, None)
    eos = ref[4]
    k = ref.index(eos)  # first occurrence
    fused = model.generate_fused(prepared, 12, eos)
    ours, n_tok = decoupled(model, prepared, 12, eos)
    assert fused == ref[: k + 1], f"fused with eos {eos}: {fused}"
    assert ours == fused and n_tok == k + 1


def test_lm_shares_the_multimodal_weights(model):
    from transformers import LlamaForCausalLM

    lm, hf = model.lm, model.hf
    assert isinstance(lm, LlamaForCausalLM)
    assert not any(p.is_meta for p in lm.parameters())
    pairs = [(lm.model.embed_tokens.weight, hf.model.language_model.embed_tokens.weight),
             (lm.model.layers[0].self_attn.q_proj.weight, hf.model.language_model.layers[0].self_attn.q_proj.weight),
             (lm.model.norm.weight, hf.model.language_model.norm.weight),
             (lm.lm_head.weight, hf.lm_head.weight)]
    for a, b in pairs:
        assert a.data_ptr() == b.data_ptr(), "LM weight copied, not shared"
    n_lm = sum(p.numel() for p in lm.parameters())
    n_text = sum(p.numel() for p in hf.model.language_model.parameters()) + hf.lm_head.weight.numel()
    assert n_lm == n_text


def test_fairness_switch_reads_the_event_pngs(model, tmp_path):
    frames = moving_scene(5)
    paths = []
    for i, f in enumerate(frames):
        paths.append(tmp_path / f"000000_{i}.png")
        Image.fromarray(f).save(paths[-1])
    loaded = model.load(Sample("ev", QUERY, event_image_paths=paths))
    assert np.asarray(loaded.frames).shape == (8, 96, 128, 3)
    assert np.array_equal(np.asarray(loaded.frames), frames[sample_indices(5, 8)])  # indices 0,1,1,2,2,3,3,4
    assert model.preprocess(loaded, QUERY).pixel_values.shape == (8, 3, 224, 224)


def test_frame_folder_and_mp4_give_the_same_layout(model, tmp_path):
    frames = moving_scene(16)
    folder = tmp_path / "video" / "clip"
    folder.mkdir(parents=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i:06d}.png")
    loaded = model.load(Sample("f", QUERY, video_path=folder))
    assert np.array_equal(np.asarray(loaded.frames), frames[sample_indices(16, 8)])


def test_load_errors(model, tmp_path):
    with pytest.raises(InputError, match="needs a video, event images or events"):
        model.load(Sample("none", QUERY))
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(InputError) as ei:
        model.load(Sample("bad", QUERY, video_path=bad))
    assert ei.value.path == bad and str(bad) in str(ei.value)


def test_build_random_errors(tmp_path):
    with pytest.raises(InputError) as ei:
        build_random("video-llava-tiny", device="cpu", dtype=torch.float32, tokenizer=tmp_path / "no.model")
    assert "no.model" in str(ei.value)
    with pytest.raises(ValueError, match="video-llava-tiny"):
        build_random("video-llava-13b", device="cpu", dtype=torch.float32, tokenizer=TOKENIZER)


def test_saved_tiny_checkpoint_round_trip(model, prepared, clip, tmp_path):
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    for f in ["config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json"]:
        assert (ckpt / f).is_file(), f
    m2 = vl.from_pretrained(ckpt, device="cpu", dtype=torch.float32)
    assert m2.preset is None and m2.source == str(ckpt) and m2.placeholder_id == 32001
    p2 = m2.preprocess(m2.load(Sample("s0", QUERY, video_path=clip)), QUERY)
    assert torch.equal(p2.input_ids, prepared.input_ids)
    assert torch.equal(p2.pixel_values, prepared.pixel_values)
    v1, v2 = model.encode_vision(prepared), m2.encode_vision(p2)
    assert torch.equal(v1, v2), f"vision differs after reload: max {(v1 - v2).abs().max():.3e}"
    fused = model.generate_fused(prepared, 8, None)
    assert m2.generate_fused(p2, 8, None) == fused
    assert decoupled(m2, p2, 8, None)[0] == fused
    assert m2.lm.lm_head.weight.data_ptr() == m2.hf.lm_head.weight.data_ptr()


def test_from_pretrained_errors(model, tmp_path):
    with pytest.raises(InputError, match="not found"):
        vl.from_pretrained(tmp_path / "missing", device="cpu", dtype=torch.float32)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="config.json"):
        vl.from_pretrained(empty, device="cpu", dtype=torch.float32)

    ckpt = model.save_pretrained(tmp_path / "ckpt")

    def broken(name: str, edit) -> Path:
        d = tmp_path / name
        shutil.copytree(ckpt, d)
        edit(d)
        return d

    no_proc = broken("no_proc", lambda d: (d / "preprocessor_config.json").unlink())
    with pytest.raises(InputError, match="preprocessor_config.json"):
        vl.from_pretrained(no_proc, device="cpu", dtype=torch.float32)
    no_w = broken("no_w", lambda d: (d / "model.safetensors").unlink())
    with pytest.raises(InputError, match="weight"):
        vl.from_pretrained(no_w, device="cpu", dtype=torch.float32)
    no_tok = broken("no_tok", lambda d: (d / "tokenizer.json").unlink())
    with pytest.raises(InputError, match="tokenizer"):
        vl.from_pretrained(no_tok, device="cpu", dtype=torch.float32)

    def other_type(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg["model_type"] = "llava"
        (d / "config.json").write_text(json.dumps(cfg))

    with pytest.raises(InputError, match="video_llava"):
        vl.from_pretrained(broken("llava_type", other_type), device="cpu", dtype=torch.float32)
