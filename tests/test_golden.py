"""Golden tests: stagewise against the outputs of EventGPT's own reference code.

``../shared/golden/eventgpt_ref/`` holds a tiny checkpoint saved by the reference's own
``save_pretrained`` (with its ``mm_visual_tower: "../clip_tower"``), and what the reference
inference path produced from it on ``eventgpt_sample1.npy`` in fp32 on CPU (its README says how and
to what tolerance to match). The checkpoint is loaded through the normal path
(:func:`stagewise.models.registry.load_model`), and every stage is compared: prompt ids, event images,
CLIP pixels, tower output, pooled vision embeddings, the spliced prefill, the first logits and 24
greedy ids, with both engines. Integers must match exactly; floats to the README's tolerances.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_NPY, SHARED_DATA

from stagewise.engine import make_engine
from stagewise.engine.base import stack_left_padded
from stagewise.engine.fast import FastOptions
from stagewise.models.base import Sample
from stagewise.models.family import StageOptions
from stagewise.models.registry import load_model
from stagewise.preprocess.prompt import tokenize_prompt

GOLDEN = SHARED_DATA.parent / "golden" / "eventgpt_ref"
pytestmark = pytest.mark.skipif(not (GOLDEN / "reference_outputs.json").is_file() or not SAMPLE_NPY.is_file(),
                                reason="golden fixture or real sample not present")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@pytest.fixture(scope="session")
def golden_dir(tmp_path_factory) -> Path:
    """``checkpoint/`` and ``clip_tower/`` side by side in a scratch folder, weights decompressed
    with ``lzma`` and checked against ``SHA256SUMS``."""
    root = tmp_path_factory.mktemp("golden")
    sums = {}
    for line in (GOLDEN / "SHA256SUMS").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            digest, name = line.split()
            sums[name] = digest
    for sub in ("checkpoint", "clip_tower"):
        (root / sub).mkdir()
        for f in (GOLDEN / sub).iterdir():
            if f.suffix == ".xz":
                with lzma.open(f) as src, open(root / sub / f.stem, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            else:
                shutil.copyfile(f, root / sub / f.name)
    for name, digest in sums.items():
        if not name.endswith(".xz"):
            assert _sha256(root / name) == digest, f"{name}: decompressed file differs from SHA256SUMS"
    return root


@pytest.fixture(scope="session")
def ref() -> dict:
    return json.loads((GOLDEN / "reference_outputs.json").read_text())


@pytest.fixture(scope="session")
def model(golden_dir):
    return load_model(None, str(golden_dir / "checkpoint"), device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="session")
def stages(model, ref):
    """Stages 1-4 on the real sample, through the model's own methods."""
    query = ref["inputs"]["query"]
    loaded = model.load(Sample("sample1", query, events_path=SAMPLE_NPY))
    images = model.frames(loaded)
    prep = model.preprocess(loaded, query)
    feats = model.vision.features(prep.pixel_values)
    vision = model.encode_vision(prep)
    embeds = model.build_inputs_embeds(prep, vision)
    return {"images": images, "prep": prep, "feats": feats, "vision": vision, "embeds": embeds}


def _close(got: float, want: float, rel: float, what: str, abs_: float = 0.0) -> None:
    assert abs(got - want) <= rel * abs(want) + abs_, f"{what}: {got} vs reference {want} (rel tol {rel})"


def _list_close(got, want, tol_of, what: str) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert abs(g - w) <= tol_of(w), f"{what}[{i}]: {g} vs reference {w}"


def test_checkpoint_loads_through_the_normal_path(model, golden_dir):
    assert model.name == "eventgpt" and model.lm.config.vocab_size == 978
    assert len(model.tokenizer) == 978 and model.tokenizer.convert_tokens_to_ids("<ev_patch>") == 977
    assert getattr(model.tokenizer, "legacy", None) is False  # the checkpoint's tokenizer_config.json
    assert model.use_start_end is False and model.use_patch_token is True


def test_prompt_ids(model, ref):
    r = ref["results"]
    ids, k = tokenize_prompt(model.prompt, model.tokenizer, ref["inputs"]["query"])
    assert model.prompt.text(ref["inputs"]["query"]) == r["prompt"]
    assert ids == r["prompt_ids"] and len(ids) == r["n_prompt_ids"] == 60 and k == r["placeholder_index"]
    for extra in ref["extra_queries"]:
        ids, k = tokenize_prompt(model.prompt, model.tokenizer, extra["query"])
        assert ids == extra["prompt_ids"] and k == extra["placeholder_index"], extra["query"]


@pytest.mark.parametrize("gpu_preprocess", [False, True], ids=["numpy", "torch"])
def test_event_images(model, ref, stages, gpu_preprocess):
    r = ref["results"]
    images = stages["images"]
    if gpu_preprocess:  # the torch renderer must produce the very same images
        model.configure(StageOptions(gpu_preprocess=True))
        try:
            images = model.frames(model.load(Sample("s", "q", events_path=SAMPLE_NPY)))
        finally:
            model.configure(StageOptions())
    assert list(images[0].shape[:2]) == r["event_image_size"]
    for k, (img, want) in enumerate(zip(images, r["event_images"], strict=True)):
        arr = img.numpy() if isinstance(img, torch.Tensor) else img
        assert list(arr.shape) == want["shape"] and str(arr.dtype) == want["dtype"]
        assert hashlib.md5(arr.tobytes(order="C")).hexdigest() == want["md5"], f"event image {k}"


def test_pixel_values(ref, stages):
    r = ref["results"]["pixel_values"]
    px = stages["prep"].pixel_values.double()
    assert list(px.shape) == r["shape"]
    _close(float(px.sum()), r["sum"], 1e-5, "pixel sum", 1e-5)
    _close(float(px.mean()), r["mean"], 1e-5, "pixel mean", 1e-5)
    _list_close(px[0, 0, 0, :5].tolist(), r["at_0_0_0_:5"], lambda w: 1e-5 * abs(w) + 1e-5, "pixels")


def test_clip_last_hidden_state(ref, stages):
    r = ref["results"]["clip_last_hidden_state"]
    h = stages["feats"].double()
    assert list(h.shape) == r["shape"]
    _close(float(h.abs().sum()), r["abs_sum"], 1e-4, "tower abs_sum")
    _close(float(h.sum()), r["sum"], 0, "tower sum", 1e-4 * r["abs_sum"])
    _list_close(h[0, 0, :8].tolist(), r["at_0_0_:8"], lambda w: 1e-4 * max(1.0, abs(w)), "tower[0, 0]")
    _list_close(h[4, 576, :8].tolist(), r["at_4_576_:8"], lambda w: 1e-4 * max(1.0, abs(w)), "tower[4, 576]")


def test_vision_embeddings_and_splice(ref, stages):
    r = ref["results"]["vision_embeddings"]
    v = stages["vision"].double()
    assert list(v.shape) == r["shape"] == [582, 4096]
    abs_sum = r["abs_sum"]
    _close(float(v.abs().sum()), abs_sum, 1e-4, "vision abs_sum")
    _close(float(v.sum()), r["sum"], 0, "vision sum", 1e-4 * abs_sum)  # the sum cancels: against abs_sum
    for row in (0, 5, 581):
        _list_close(v[row, :8].tolist(), r[f"row{row}_:8"], lambda w: 1e-4 * max(1.0, abs(w)), f"vision row {row}")
    _list_close(v.sum(dim=1).tolist(), r["row_sums"], lambda w: 1e-4 * abs_sum / 582, "vision row sums")
    e = stages["embeds"]
    assert list(e.shape) == ref["results"]["inputs_embeds"]["shape"] == [641, 4096]  # the seeds' 641-token prefill
    k = stages["prep"].placeholder_index
    assert torch.equal(e[k:k + 582], stages["vision"])


@pytest.mark.parametrize("engine_name", ["hf", "fast"])
def test_first_logits_and_greedy_ids(model, ref, stages, engine_name):
    r = ref["results"]
    opts = FastOptions(max_seq=704, kv_bucket=64) if engine_name == "fast" else None
    engine = make_engine(engine_name, model.lm, opts)
    embeds, lengths = stack_left_padded([stages["embeds"]])
    pre = engine.prefill(embeds, lengths)
    top = torch.topk(pre.logits[0].double(), 5)
    assert top.indices.tolist() == r["first_step_logits"]["top5_ids"]
    _list_close(top.values.tolist(), r["first_step_logits"]["top5_values"], lambda w: 1e-4 * abs(w), "top-5 logits")
    out = engine.decode(pre, 24, None)
    assert out.tokens[0].tolist() == r["generated_ids"]
    assert model.decode_text(out.tokens[0].tolist()) == r["generated_text"]


def test_fused_reference_path_matches_too(model, ref, stages):
    assert model.generate_fused(stages["prep"], 24, None) == ref["results"]["generated_ids"]
