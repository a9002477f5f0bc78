"""The scenario: stage sums, records, JSON round trip, resume, output-length policies."""

from __future__ import annotations

import json

import pytest
import torch

from stagewise import STAGES
from stagewise.config import parse_output_len
from stagewise.inputs.samples import simulated_samples
from stagewise.models.base import Sample
from stagewise.results.records import SampleRecord, read_samples
from stagewise.runner import STAGE_SUM_TOLERANCE, RunConfig, execute


def _cfg(**kw):
    base = dict(preset="eventgpt-tiny", output_len="fixed:5", warmup=1, measure_ceilings=False)
    base.update(kw)
    return RunConfig(**base)


def test_run_directory_and_stage_sums(tiny_eventgpt, tmp_path):
    summary = execute(_cfg(), simulated_samples(2), tmp_path / "run", model=tiny_eventgpt)
    run = tmp_path / "run"
    for f in ("config.json", "samples.jsonl", "summary.json", "report.md", "stage_shares.png"):
        assert (run / f).is_file(), f
    recs = read_samples(run / "samples.jsonl")
    assert [r.sample_id for r in recs] == ["sim000", "sim001"]
    for r in recs:
        assert r.ok, r.error
        stages = [getattr(r, f"{s}_ms") for s in STAGES]
        assert all(t > 0 for t in stages), stages
        assert abs(sum(stages) - r.e2el_ms) / r.e2el_ms <= STAGE_SUM_TOLERANCE, (sum(stages), r.e2el_ms)
        assert r.ttft_ms == pytest.approx(sum(stages[:4]))
        assert r.n_vision_tokens == 582 and r.n_images == 5
        assert r.n_prefill_tokens == r.n_vision_tokens + r.n_text_tokens
        assert r.n_output_tokens == 5 and len(r.output_ids) == 5
        assert r.tpot_ms == pytest.approx((r.e2el_ms - r.ttft_ms) / 4)  # TPOT = (E2EL - TTFT) / (n_out - 1)
        assert len(r.itl_ms) == 4 and all(x > 0 for x in r.itl_ms)
        assert r.shapes["preprocess.pixel_values"] == [5, 3, 336, 336]
        assert r.shapes["vision.features"] == [582, 64]
        cfg = tiny_eventgpt.lm.config
        assert r.kv_cache_bytes == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (r.n_prefill_tokens + 4) * (cfg.hidden_size // cfg.num_attention_heads) * 4
    config = json.loads((run / "config.json").read_text())
    assert config["requested"]["weights"] == "random" and config["env"]["torch"] == torch.__version__
    assert config["applied"]["decoding"] == {"decoding": "greedy"} and recs[0].decoding == "greedy"
    assert summary["n_samples"] == 2 and summary["mean_decode_ms"] is not None and summary["n_failed"] == 0
    assert sum(summary["stage_share"].values()) == pytest.approx(1.0)


def test_record_json_round_trip(tiny_eventgpt, tmp_path):
    execute(_cfg(), simulated_samples(1), tmp_path / "run", model=tiny_eventgpt)
    (rec,) = read_samples(tmp_path / "run" / "samples.jsonl")
    again = SampleRecord.from_dict(json.loads(rec.to_json()))
    assert again == rec
    nan = SampleRecord("x", "m", "hf", tpot_ms=float("nan"))
    assert json.loads(nan.to_json())["tpot_ms"] is None


def test_resume_skips_finished_and_survives_a_torn_line(tiny_eventgpt, tmp_path):
    run = tmp_path / "run"
    execute(_cfg(), simulated_samples(3), run, model=tiny_eventgpt)
    lines = (run / "samples.jsonl").read_text().splitlines()
    (run / "samples.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    with pytest.raises(FileExistsError, match="--resume"):
        execute(_cfg(), simulated_samples(3), run, model=tiny_eventgpt)
    execute(_cfg(), simulated_samples(3), run, resume=True, model=tiny_eventgpt)
    ids = [r.sample_id for r in read_samples(run / "samples.jsonl")]
    assert ids == ["sim000", "sim001", "sim002"]


def test_failed_sample_is_recorded_and_the_run_goes_on(tiny_eventgpt, tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    samples = simulated_samples(1) + [Sample("bad", "q?", events_path=bad)]
    summary = execute(_cfg(), samples, tmp_path / "run", model=tiny_eventgpt)
    recs = {r.sample_id: r for r in read_samples(tmp_path / "run" / "samples.jsonl")}
    assert recs["sim000"].ok
    assert not recs["bad"].ok and "bad.npz" in recs["bad"].error
    assert summary["n_failed"] == 1


def test_batched_run_matches_batch_one(tiny_eventgpt, tmp_path):
    execute(_cfg(batch_size=1), simulated_samples(3), tmp_path / "b1", model=tiny_eventgpt)
    execute(_cfg(batch_size=3), simulated_samples(3), tmp_path / "b3", model=tiny_eventgpt)
    a = read_samples(tmp_path / "b1" / "samples.jsonl")
    b = read_samples(tmp_path / "b3" / "samples.jsonl")
    assert [r.output_ids for r in a] == [r.output_ids for r in b]
    assert all(r.batch_size == 3 for r in b)


def test_output_len_policies(tmp_path):
    assert parse_output_len("fixed:46").length("a", 7) == 46
    mean = parse_output_len("mean:45.5")
    lens = [mean.length(str(i), i) for i in range(10)]
    assert sum(lens) / 10 == 45.5 and set(lens) == {45, 46}
    trace = tmp_path / "samples.jsonl"
    trace.write_text("\n".join(SampleRecord(f"s{i}", "m", "hf", n_output_tokens=10 + i).to_json() for i in range(3)) + "\n")
    pol = parse_output_len(f"trace:{trace}")
    assert pol.length("s2", 0) == 12 and pol.length("s1@3", 5) == 11 and pol.length("other", 4) == 11
    for bad in ("fixed:0", "fixed:x", "mean:nan", "nope:1"):
        with pytest.raises(ValueError):
            parse_output_len(bad)


def test_config_validation():
    with pytest.raises(ValueError, match="engine"):
        RunConfig(engine="vllm")
    with pytest.raises(ValueError, match="batch_size"):
        RunConfig(batch_size=0)
    with pytest.raises(ValueError, match="output-len"):
        RunConfig(output_len="fixed:-3")


def test_fast_engine_run_matches_hf_and_batching(tiny_eventgpt, tmp_path):
    """fp32 CPU: the fast engine gives the hf engine's greedy ids, at batch 1 and batched."""
    execute(_cfg(engine="hf"), simulated_samples(3), tmp_path / "hf", model=tiny_eventgpt)
    execute(_cfg(engine="fast"), simulated_samples(3), tmp_path / "f1", model=tiny_eventgpt)
    execute(_cfg(engine="fast", batch_size=2), simulated_samples(3), tmp_path / "f2", model=tiny_eventgpt)
    ids = [[r.output_ids for r in read_samples(tmp_path / d / "samples.jsonl")] for d in ("hf", "f1", "f2")]
    assert ids[0] == ids[1] == ids[2]
    summary = json.loads((tmp_path / "f2" / "summary.json").read_text())
    assert summary["request_throughput_req_s"] > 0 and summary["output_throughput_tok_s"] > 0
