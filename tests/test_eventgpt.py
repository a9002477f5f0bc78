"""EventGPT: pooling shapes, released checkpoint layout round trip, decoupled == fused, speed paths."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch

from stagewise.engine.base import stack_left_padded
from stagewise.engine.hf import HFEngine
from stagewise.errors import InputError
from stagewise.models.base import Prepared
from stagewise.models.eventgpt import (
    checkpoint_key_to_module_key,
    from_pretrained,
    module_key_to_checkpoint_key,
    save_checkpoint,
)
from stagewise.models.family import StageOptions
from stagewise.models.vision import FastClipTower, VisionOptions, spatio_temporal_pool
from stagewise.preprocess.prompt import (
    DEFAULT_QUERY,
    EVENT_TOKEN_INDEX,
    tokenize_prompt,
)


def _prepared(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(5, 3, 336, 336, generator=g)
    ids, k = tokenize_prompt(model.prompt, model.tokenizer, DEFAULT_QUERY)
    return Prepared(pixels, torch.tensor(ids), placeholder_index=k)


@contextmanager
def options(model, **kw):
    """Apply stage options for the block (the session model is shared: restore them after)."""
    vision = {k: kw.pop(k) for k in ("compile", "graph", "fuse", "per_frame") if k in kw}
    saved = model.options
    model.configure(StageOptions(vision=VisionOptions(**vision), **kw))
    try:
        yield model
    finally:
        model.configure(saved)


def test_pooling_order_and_shape():
    h = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    out = spatio_temporal_pool(h)
    assert out.shape == (2 + 3, 4)
    torch.testing.assert_close(out[:2], h.mean(1))  # temporal tokens first
    torch.testing.assert_close(out[2:], h.mean(0))


def test_vision_gives_582_tokens_and_fused_variant_matches(tiny_eventgpt):
    prep = _prepared(tiny_eventgpt)
    v = tiny_eventgpt.encode_vision(prep)
    assert v.shape == (582, tiny_eventgpt.lm.config.hidden_size) and tiny_eventgpt.n_vision_tokens == 582
    with options(tiny_eventgpt, fuse=True):
        vf = tiny_eventgpt.encode_vision(prep)
    diff = (v - vf).abs().max().item()
    assert diff < 1e-4, f"pool-before-linear differs by {diff}"


def test_splice_puts_vision_at_the_placeholder(tiny_eventgpt):
    prep = _prepared(tiny_eventgpt)
    v = tiny_eventgpt.encode_vision(prep)
    e = tiny_eventgpt.build_inputs_embeds(prep, v)
    k = prep.input_ids.tolist().index(EVENT_TOKEN_INDEX)
    assert k == prep.placeholder_index
    assert e.shape[0] == len(prep.input_ids) - 1 + 582
    torch.testing.assert_close(e[k : k + 582], v)
    emb = tiny_eventgpt.lm.get_input_embeddings()
    torch.testing.assert_close(e[:k], emb(prep.input_ids[:k]))
    torch.testing.assert_close(e[k + 582 :], emb(prep.input_ids[k + 1 :]))


def test_decoupled_equals_fused_tiny(tiny_eventgpt):
    engine = HFEngine(tiny_eventgpt.lm)
    for seed in range(2):
        prep = _prepared(tiny_eventgpt, seed)
        fused = tiny_eventgpt.generate_fused(prep, 12, None)
        row = tiny_eventgpt.build_inputs_embeds(prep, tiny_eventgpt.encode_vision(prep))
        out = engine.decode(engine.prefill(*stack_left_padded([row])), 12, None)
        assert fused == out.tokens[0].tolist(), f"fused {fused} != decoupled {out.tokens[0].tolist()}"
        assert len(fused) == 12


def test_key_mapping_round_trip():
    # both transformers 4.x's nested and 5.x's flat CLIPVisionModel keys
    for ck in ("model.layers.3.self_attn.q_proj.weight", "lm_head.weight", "model.visual_projector.0.weight", "model.feature_adaptor.bias", "model.visual_tower.visual_tower.vision_model.encoder.layers.0.mlp.fc1.weight"):
        for prefix in ("vision_model.", ""):
            assert module_key_to_checkpoint_key(checkpoint_key_to_module_key(ck, prefix), prefix) == ck
    assert checkpoint_key_to_module_key("model.layers.0.self_attn.rotary_emb.inv_freq") is None


@pytest.mark.parametrize("safetensors", [True, False])
def test_released_layout_loads_unchanged(tiny_eventgpt, tmp_path, safetensors):
    folder = save_checkpoint(tiny_eventgpt, tmp_path / "ckpt", safetensors=safetensors, max_shard_bytes=200_000)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "EventChat_llama"
    shards = sorted(folder.glob("*.safetensors" if safetensors else "pytorch_model-*.bin"))
    assert len(shards) > 1, "sharded"
    assert cfg["mm_use_im_start_end"] is False and cfg["mm_use_im_patch_token"] is True  # the released config
    loaded = from_pretrained(folder, device="cpu", dtype=torch.float32)
    assert loaded.tokenizer("a <ev_patch> b").input_ids == tiny_eventgpt.tokenizer("a <ev_patch> b").input_ids
    a, b = tiny_eventgpt.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    prep = _prepared(tiny_eventgpt)
    assert loaded.generate_fused(prep, 6, None) == tiny_eventgpt.generate_fused(prep, 6, None)


def test_checkpoint_missing_keys_are_listed(tiny_eventgpt, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_checkpoint(tiny_eventgpt, tmp_path / "ckpt", safetensors=True, max_shard_bytes=10**9)
    shard = next(folder.glob("model-*.safetensors"))
    state = load_file(str(shard))
    del state["model.feature_adaptor.weight"], state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(shard))
    idx = folder / "model.safetensors.index.json"
    m = json.loads(idx.read_text())
    m["weight_map"] = {k: v for k, v in m["weight_map"].items() if k in state}
    idx.write_text(json.dumps(m))
    with pytest.raises(InputError) as e:
        from_pretrained(folder, device="cpu", dtype=torch.float32)
    msg = str(e.value)
    assert "missing 2 weights" in msg and "model.feature_adaptor.weight" in msg and "model.layers.1.mlp.up_proj.weight" in msg and str(folder) in msg


def test_checkpoint_errors(tmp_path):
    with pytest.raises(InputError, match="no config.json"):
        from_pretrained(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InputError, match="EventChat_llama"):
        from_pretrained(tmp_path, device="cpu")


@pytest.mark.gpu
def test_vision_cuda_graph_equals_eager_on_gpu():
    from stagewise.models.registry import build_random

    model = build_random("eventgpt-tiny", device="cuda", dtype=torch.bfloat16)
    prep = _prepared(model)
    prep.pixel_values = prep.pixel_values.to("cuda", torch.bfloat16)
    with options(model, fuse=True):
        eager = model.encode_vision(prep)
    with options(model, fuse=True, graph=True):
        first = model.encode_vision(prep)  # captures
        prep.pixel_values = prep.pixel_values.flip(0).contiguous()  # new data, same shape: replayed
        again = model.encode_vision(prep)
        assert len(model.vision._graphs) == 1
    with options(model, fuse=True):
        eager2 = model.encode_vision(prep)
    assert torch.equal(first, eager), (first - eager).abs().max()
    assert torch.equal(again, eager2), (again - eager2).abs().max()


def test_png_frames_of_different_sizes_on_the_torch_path(tiny_eventgpt, tmp_path):
    """Pre-rendered frames need not share a size: the torch stage-2 path equals the CPU one."""
    import numpy as np
    from PIL import Image

    from stagewise.models.base import Sample

    rng = np.random.default_rng(0)
    paths = []
    for k, (h, w) in enumerate([(48, 64), (50, 60), (48, 64), (40, 70), (48, 64)]):
        paths.append(tmp_path / f"f{k}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    loaded = tiny_eventgpt.load(Sample("s", "q?", event_image_paths=paths))
    cpu = tiny_eventgpt.preprocess(loaded, "q?").pixel_values
    with options(tiny_eventgpt, gpu_preprocess=True):
        torch_path = tiny_eventgpt.preprocess(loaded, "q?").pixel_values
    assert torch_path.shape == (5, 3, 336, 336)
    assert torch.equal(cpu, torch_path), (cpu - torch_path).abs().max()


def test_fast_clip_tower_equals_transformers(tiny_eventgpt):
    """The one-function CLIP layer computes what transformers' encoder computes (fp32, eager)."""
    px = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(1))
    tower = tiny_eventgpt.vision.tower
    ref = tower(pixel_values=px).last_hidden_state
    got = FastClipTower(tower, compile=False)(px)
    assert got.shape == ref.shape == (2, 577, 32)
    err = (got - ref).abs().max().item()
    assert err < 1e-4, f"max |diff| {err}"
    again = tower(pixel_values=px).last_hidden_state  # HF tower unchanged
    assert torch.equal(again, ref)
    prep = _prepared(tiny_eventgpt)
    with options(tiny_eventgpt, compile=True):
        fast_v = tiny_eventgpt.encode_vision(prep)
    slow_v = tiny_eventgpt.encode_vision(prep)
    assert (fast_v - slow_v).abs().max().item() < 1e-4


@pytest.mark.gpu
def test_compiled_clip_tower_on_gpu_is_close_to_transformers():
    from stagewise.models.registry import build_random

    model = build_random("eventgpt-tiny", device="cuda", dtype=torch.bfloat16)
    px = torch.randn(5, 3, 336, 336, device="cuda", dtype=torch.bfloat16)
    ref = model.vision.tower(pixel_values=px).last_hidden_state.float()
    got = FastClipTower(model.vision.tower)(px).float()  # compiled on CUDA
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, f"relative L2 difference {rel} (bf16 rounding is ~4e-3)"
