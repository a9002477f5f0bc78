"""One dataset drives all three models; a corrupt MP4 is recorded and the run goes on; compare."""

from __future__ import annotations

import json

import pytest
from conftest import LLAMA_TOKENIZER, require

from stagewise.cli import main
from stagewise.inputs.samples import dataset_samples
from stagewise.results.records import read_samples

pytest.importorskip("av")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    assert main(["make-dataset", "--out", str(root), "--simulated", "3"]) == 0
    entries = json.loads((root / "dataset.json").read_text())
    # Corrupt the last sample's MP4 (truncate it): Video-LLaVA must record the failure and go on.
    mp4 = root / "mp4" / f"{entries[-1]['video_data']}.mp4"
    mp4.write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 3])
    return root / "dataset.json"


def test_dataset_fields_resolve_per_format(dataset):
    ev = dataset_samples(dataset, "events")
    png = dataset_samples(dataset, "png")
    mp4 = dataset_samples(dataset, "mp4")
    assert [s.sample_id for s in ev] == [s.sample_id for s in png] == [s.sample_id for s in mp4] == ["sim000", "sim001", "sim002"]
    assert ev[0].events_path.suffix == ".npy" and len(png[0].event_image_paths) == 5 and mp4[0].video_path.suffix == ".mp4"
    assert ev[0].query == "What are the key elements in this scene?"


def test_three_models_same_samples_and_compare(dataset, tmp_path, capsys):
    tok = str(require(LLAMA_TOKENIZER))
    common = ["--dataset", str(dataset), "--no-ceilings", "--output-len", "fixed:4", "--warmup", "1"]
    assert main(["run", "--preset", "eventgpt-tiny", "--out", str(tmp_path / "egpt"), *common]) == 0
    # the dataset holds a corrupt MP4: recorded, the run goes on, exit code 3 (some samples failed)
    assert main(["run", "--preset", "video-llava-tiny", "--tokenizer", tok, "--out", str(tmp_path / "vl"), *common]) == 3
    assert main(["run", "--preset", "llava-1.5-tiny", "--tokenizer", tok, "--out", str(tmp_path / "ll"), "--input-format", "png", *common]) == 0
    vl = {r.sample_id: r for r in read_samples(tmp_path / "vl" / "samples.jsonl")}
    assert vl["sim000"].ok and vl["sim001"].ok
    assert not vl["sim002"].ok and "sim002.mp4" in vl["sim002"].error
    assert vl["sim000"].n_vision_tokens == 8 * 257 and vl["sim000"].vision_ms > 0
    ll = read_samples(tmp_path / "ll" / "samples.jsonl")
    assert all(r.ok and r.n_vision_tokens == 576 for r in ll)
    assert main(["compare", str(tmp_path / "egpt"), str(tmp_path / "vl"), str(tmp_path / "ll"), "--out", str(tmp_path / "cmp")]) == 0
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "Which stage explains the difference" in md
    # sim002 failed in the Video-LLaVA run, so only two samples are common to all three.
    assert "**2** sample(s)" in md
    assert result["n_common"] == 2 and result["common_ids"] == ["sim000", "sim001"]
    assert result["runs"][1]["n_failed"] == 1


def test_fairness_switch_feeds_video_llava_the_event_pngs(dataset, tmp_path):
    tok = str(require(LLAMA_TOKENIZER))
    assert main(["run", "--preset", "video-llava-tiny", "--tokenizer", tok, "--dataset", str(dataset), "--input-format", "png", "--no-ceilings", "--output-len", "fixed:3", "--out", str(tmp_path / "vlpng")]) == 0
    recs = read_samples(tmp_path / "vlpng" / "samples.jsonl")
    assert all(r.ok for r in recs), [r.error for r in recs]  # the PNGs are intact: no failure


@pytest.mark.parametrize("preset", ["video-llava-tiny", "llava-1.5-tiny"])
def test_verify_video_models(dataset, preset, capsys):
    tok = str(require(LLAMA_TOKENIZER))
    assert main(["verify", "--preset", preset, "--tokenizer", tok, "--dataset", str(dataset), "--limit", "1", "--max-new-tokens", "8"]) == 0
    assert "1/1 samples identical" in capsys.readouterr().out


@pytest.mark.parametrize("preset", ["video-llava-tiny", "llava-1.5-tiny"])
def test_fast_engine_serves_the_frame_models(dataset, preset, tmp_path):
    """One engine for the LLaMA decoders of all three families: fast (batched) == hf (batch 1)."""
    tok = str(require(LLAMA_TOKENIZER))
    common = ["--preset", preset, "--tokenizer", tok, "--dataset", str(dataset), "--input-format", "png", "--no-ceilings", "--output-len", "fixed:5"]
    assert main(["run", *common, "--engine", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main(["run", *common, "--engine", "fast", "--batch-size", "2", "--out", str(tmp_path / "fast")]) == 0
    hf = [r.output_ids for r in read_samples(tmp_path / "hf" / "samples.jsonl")]
    fast = [r.output_ids for r in read_samples(tmp_path / "fast" / "samples.jsonl")]
    assert hf == fast and len(hf) == 3
