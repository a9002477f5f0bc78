"""stagewise compare on synthetic run directories with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from stagewise import STAGES
from stagewise.errors import InputError
from stagewise.results.compare import (
    bootstrap_geomean_ratio,
    compare_runs,
    config_diff,
    render_compare_markdown,
    write_compare,
)
from stagewise.results.records import SampleRecord, write_json
from stagewise.results.summary import summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_record(sid: str, *, model: str = "eventgpt", load: float = 8.5, pre: float = 17.0, vision: float = 28.5,
                prefill: float = 104.0, decode: float = 850.0, n_out: int = 46, n_vis: int = 582, n_text: int = 59,
                error: str | None = None) -> SampleRecord:
    """A 7B-like record (times in ms); e2e = stage sum + 0.25 ms of clock overhead."""
    if error is not None:
        return SampleRecord(sample_id=sid, model=model, engine="hf", error=error)
    ttft = load + pre + vision + prefill
    return SampleRecord(
        sample_id=sid, model=model, engine="hf",
        load_ms=load, preprocess_ms=pre, vision_ms=vision, prefill_ms=prefill, decode_ms=decode,
        e2el_ms=ttft + decode + 0.25, ttft_ms=ttft, tpot_ms=decode / (n_out - 1),
        itl_ms=[decode / (n_out - 1)] * (n_out - 1),
        decode_throughput_tok_s=(n_out - 1) / (decode / 1e3), n_images=5, n_vision_tokens=n_vis, n_text_tokens=n_text,
        n_prefill_tokens=n_vis + n_text, n_output_tokens=n_out, kv_cache_bytes=32 * 2 * (n_vis + n_text) * 4096 * 2,
        peak_gpu_mem_bytes=14_000 * 2**20, output_ids=list(range(n_out)),
    )


def config(model: str = "eventgpt", **over) -> dict:
    c = {"model": model, "preset": f"{model}-7b", "engine": "hf", "weights": "random", "dtype": "bfloat16",
         "device": "cuda:0", "batch_size": 1, "output_len": "fixed:46",
         "env": {"gpu": "NVIDIA H100 80GB HBM3", "driver": "550.54", "torch": "2.13.0",
                 "transformers": "5.17.0", "git_sha": "e4e52d1"}}
    for k, v in over.items():
        if k.startswith("env_"):
            c["env"][k[4:]] = v
        else:
            c[k] = v
    return c


def make_run(tmp_path, name: str, records: list[SampleRecord], cfg: dict | None = None):
    d = tmp_path / name
    d.mkdir()
    write_json(d / "config.json", cfg or config())
    (d / "samples.jsonl").write_text("".join(r.to_json() + "\n" for r in records), encoding="utf-8")
    write_json(d / "summary.json", summarize(records))
    return d


def scaled(r: SampleRecord, factor: float, sid: str | None = None, model: str = "video-llava") -> SampleRecord:
    """``r`` with every time multiplied by ``factor`` (same token counts)."""
    return make_record(sid or r.sample_id, model=model, load=r.load_ms * factor, pre=r.preprocess_ms * factor,
                       vision=r.vision_ms * factor, prefill=r.prefill_ms * factor, decode=r.decode_ms * factor,
                       n_out=r.n_output_tokens, n_text=r.n_text_tokens)


def test_pairs_only_ids_ok_in_every_run(tmp_path):
    # A: s0..s9; B: s3..s12 with s5 failed; C: s0..s7 -> common OK ids: s3, s4, s6, s7
    a = make_run(tmp_path, "A", [make_record(f"s{i}", decode=800.0 + 10 * i) for i in range(10)])
    b = make_run(tmp_path, "B", [make_record(f"s{i}", decode=1600.0 + 20 * i, error="boom" if i == 5 else None)
                                 for i in range(3, 13)])
    c = make_run(tmp_path, "C", [make_record(f"s{i}", decode=400.0 + 5 * i) for i in range(8)])
    res = compare_runs([a, b, c], n_boot=200)
    assert res["n_common"] == 4
    assert res["common_ids"] == ["s3", "s4", "s6", "s7"]
    assert [(r["label"], r["n_records"], r["n_ok"], r["n_failed"], r["n_ids"]) for r in res["runs"]] == [
        ("A", 10, 10, 0, 10), ("B", 10, 9, 1, 9), ("C", 8, 8, 0, 8)]
    dec = res["metrics"]["decode_ms"]["runs"]
    # means over the common ids only: A 800 + 10 * mean(3, 4, 6, 7) = 850
    assert dec[0]["mean"] == pytest.approx(850.0) and dec[0]["n"] == 4
    assert dec[1]["mean"] == pytest.approx(1700.0)
    assert dec[2]["mean"] == pytest.approx(425.0)
    assert dec[0]["ratio"] is None  # the baseline
    assert dec[1]["ratio"]["geomean"] == pytest.approx(2.0) and dec[1]["ratio"]["n"] == 4
    assert dec[2]["ratio"]["geomean"] == pytest.approx(0.5)
    assert dec[2]["ratio"]["ci95"] == pytest.approx([0.5, 0.5])


def test_repeats_of_an_id_are_averaged(tmp_path):
    a = make_run(tmp_path, "A", [make_record("s0", decode=800.0), make_record("s0", decode=900.0),
                                 make_record("s1", decode=850.0)])
    b = make_run(tmp_path, "B", [make_record("s0", decode=1700.0), make_record("s1", decode=1700.0)])
    res = compare_runs([a, b], n_boot=100)
    assert res["n_common"] == 2 and res["runs"][0]["n_records"] == 3 and res["runs"][0]["n_ids"] == 2
    assert res["metrics"]["decode_ms"]["runs"][0]["mean"] == pytest.approx(850.0)
    assert res["metrics"]["decode_ms"]["runs"][1]["ratio"]["geomean"] == pytest.approx(2.0)


def test_runner_repeat_suffixes_pair_with_plain_ids(tmp_path):
    # A measured each sample 3 times (ids s0@0..s0@2, config repeats=3); B once. "x@1" in a
    # run without repeats is a plain id and keeps its suffix.
    reps = [make_record(f"s{i}@{r}", decode=800.0 + 50 * r) for i in range(2) for r in range(3)]
    a = make_run(tmp_path, "A", reps + [make_record("s2@0", error="boom")], config(repeats=3))
    b = make_run(tmp_path, "B", [make_record("s0", decode=1700.0), make_record("s1", decode=1700.0),
                                 make_record("x@1")], config(repeats=1))
    res = compare_runs([a, b], n_boot=50)
    assert res["common_ids"] == ["s0", "s1"]
    assert [r["n_ids"] for r in res["runs"]] == [2, 3]
    assert res["metrics"]["decode_ms"]["runs"][0]["mean"] == pytest.approx(850.0)  # mean of 800, 850, 900
    assert res["metrics"]["decode_ms"]["runs"][1]["ratio"]["geomean"] == pytest.approx(2.0)


def _noisy_pair(tmp_path, n: int = 40):
    """Baseline samples spread over a factor ~3 (output lengths 20..100); the run is 2x each
    sample times exp(+-0.1) alternately, so the geometric mean of the ratios is exactly 2."""
    rng = np.random.default_rng(7)
    base, run = [], []
    for i in range(n):
        n_out = int(rng.integers(20, 101))
        r = make_record(f"s{i}", decode=18.0 * (n_out - 1), prefill=float(rng.uniform(90, 120)), n_out=n_out)
        base.append(r)
        run.append(scaled(r, 2.0 * math.exp(0.1 if i % 2 else -0.1)))
    return make_run(tmp_path, "A", base), make_run(tmp_path, "B", run, config("video-llava"))


def test_ratio_ci_brackets_the_true_ratio_and_is_deterministic(tmp_path):
    a, b = _noisy_pair(tmp_path)
    res = compare_runs([a, b], n_boot=2000, seed=0)
    ratio = res["metrics"]["decode_ms"]["runs"][1]["ratio"]
    assert ratio["geomean"] == pytest.approx(2.0, rel=1e-12)
    lo, hi = ratio["ci95"]
    # log-ratios are +-0.1: standard error 0.1 / sqrt(40) = 0.016, so the 95 % interval is
    # about 2 * exp(+-0.031) = [1.94, 2.06]. The between-sample spread (factor 5 in decode
    # time) must not widen it: pairing removes it.
    assert lo < 2.0 < hi, (lo, hi)
    assert 0.06 < hi - lo < 0.2, (lo, hi)
    again = compare_runs([a, b], n_boot=2000, seed=0)["metrics"]["decode_ms"]["runs"][1]["ratio"]["ci95"]
    assert again == [lo, hi]
    other = compare_runs([a, b], n_boot=2000, seed=1)["metrics"]["decode_ms"]["runs"][1]["ratio"]["ci95"]
    assert other != [lo, hi]
    # ratio direction is run / baseline: B is slower, so > 1
    assert res["metrics"]["e2el_ms"]["runs"][1]["ratio"]["geomean"] > 1.9


def test_bootstrap_edge_cases():
    assert bootstrap_geomean_ratio(np.array([]), n_boot=10, seed=0) == {"n": 0, "geomean": None, "ci95": None}
    one = bootstrap_geomean_ratio(np.array([3.0]), n_boot=10, seed=0)
    assert one["geomean"] == pytest.approx(3.0) and one["ci95"] is None
    # geometric, not arithmetic: ratios 1 and 4 -> 2 (arithmetic would be 2.5)
    two = bootstrap_geomean_ratio(np.array([1.0, 4.0]), n_boot=500, seed=0)
    assert two["geomean"] == pytest.approx(2.0)
    assert two["ci95"][0] == pytest.approx(1.0) and two["ci95"][1] == pytest.approx(4.0)


def test_one_common_sample_gives_null_ci_without_crash(tmp_path):
    a = make_run(tmp_path, "A", [make_record("s0"), make_record("s1")])
    b = make_run(tmp_path, "B", [make_record("s1", decode=1275.0), make_record("s2")])
    res = compare_runs([a, b])
    assert res["n_common"] == 1
    ratio = res["metrics"]["decode_ms"]["runs"][1]["ratio"]
    assert ratio["geomean"] == pytest.approx(1.5) and ratio["ci95"] is None
    md = render_compare_markdown(res)
    assert "1.500× (no CI: n=1)" in md


def test_explaining_stage_is_the_one_constructed_to_differ(tmp_path):
    base = [make_record(f"s{i}", prefill=100.0 + i, decode=850.0 + 3 * i) for i in range(6)]
    # prefill +300 ms, decode +50 ms (same output length): prefill explains 300 / 350 = 85.7 %
    run = [make_record(f"s{i}", prefill=400.0 + i, decode=900.0 + 3 * i) for i in range(6)]
    res = compare_runs([make_run(tmp_path, "A", base), make_run(tmp_path, "B", run)], n_boot=100)
    ex = res["explain"][1]
    assert res["explain"][0] is None
    assert ex["stage"] == "prefill"
    assert ex["e2el_diff_ms"] == pytest.approx(350.0)
    assert ex["shares"]["prefill"] == pytest.approx(300 / 350)
    assert ex["shares"]["decode"] == pytest.approx(50 / 350)
    assert ex["shares"]["load"] == pytest.approx(0.0) and ex["unattributed_ms"] == pytest.approx(0.0)
    ds = ex["decode_split"]
    assert ds["from_output_len_ms"] == pytest.approx(0.0)
    assert ds["from_time_per_token_ms"] == pytest.approx(50.0)
    md = render_compare_markdown(res)
    assert "**prefill** explains it (+300.0 ms, 85.7 % of the difference)" in md
    # the other way round (the run is faster): the same stage explains the speed-up
    res = compare_runs([tmp_path / "B", tmp_path / "A"], n_boot=100)
    ex = res["explain"][1]
    assert ex["stage"] == "prefill" and ex["e2el_diff_ms"] == pytest.approx(-350.0)
    assert ex["shares"]["prefill"] == pytest.approx(300 / 350)


def test_explaining_stage_with_opposing_differences(tmp_path):
    # load -900 ms (faster I/O), prefill +700, decode +600: e2e +400. Shares of the e2e
    # difference: load -225 %, prefill +175 %, decode +150 % -> prefill explains it, although
    # load has the largest absolute difference.
    base = [make_record(f"s{i}", load=1000.0, prefill=100.0, decode=800.0 + i) for i in range(3)]
    run = [make_record(f"s{i}", load=100.0, prefill=800.0, decode=1400.0 + i) for i in range(3)]
    ex = compare_runs([make_run(tmp_path, "A", base), make_run(tmp_path, "B", run)], n_boot=50)["explain"][1]
    assert ex["e2el_diff_ms"] == pytest.approx(400.0)
    assert ex["shares"] == pytest.approx({"load": -2.25, "preprocess": 0.0, "vision": 0.0, "prefill": 1.75,
                                          "decode": 1.5})
    assert ex["stage"] == "prefill"


def test_decode_split_attributes_output_length(tmp_path):
    # Same 18.5 ms per step; B generates 102 tokens instead of 46: the whole decode
    # difference (56 steps x 18.5 ms = 1036 ms) comes from the output length.
    base = [make_record(f"s{i}", decode=18.5 * 45, n_out=46) for i in range(4)]
    run = [make_record(f"s{i}", decode=18.5 * 101, n_out=102, load=700.0) for i in range(4)]
    res = compare_runs([make_run(tmp_path, "A", base), make_run(tmp_path, "B", run)], n_boot=100)
    ex = res["explain"][1]
    assert ex["stage"] == "decode"
    assert ex["stage_diff_ms"]["load"] == pytest.approx(691.5)
    assert ex["decode_split"]["from_output_len_ms"] == pytest.approx(56 * 18.5)
    assert ex["decode_split"]["from_time_per_token_ms"] == pytest.approx(0.0, abs=1e-9)
    assert sum(ex["shares"].values()) == pytest.approx(1.0)
    assert res["lengths"][1]["n_output_tokens"] == pytest.approx(102.0)
    assert res["lengths"][0]["kv_cache_mib"] == pytest.approx(320.5)  # 32 x 2 x 641 x 4096 x 2 bytes


def test_config_differences_listed_env_included(tmp_path):
    a = make_run(tmp_path, "A", [make_record("s0")], config("eventgpt"))
    b = make_run(tmp_path, "B", [make_record("s0")], config("video-llava", output_len="fixed:102",
                                                            env_git_sha="abc1234"))
    cfg_c = config("eventgpt")
    cfg_c["fairness"] = "png-frames"
    c = make_run(tmp_path, "C", [make_record("s0")], cfg_c)
    res = compare_runs([a, b, c], n_boot=10)
    diffs = {d["key"]: d["values"] for d in res["config_diff"]}
    assert set(diffs) == {"model", "preset", "output_len", "env.git_sha", "fairness"}
    assert diffs["model"] == ["eventgpt", "video-llava", "eventgpt"]
    assert diffs["env.git_sha"] == ["e4e52d1", "abc1234", "e4e52d1"]
    assert diffs["fairness"] == [None, None, "png-frames"]
    md = render_compare_markdown(res)
    assert "| env.git_sha | e4e52d1 | abc1234 | e4e52d1 |" in md
    assert config_diff([config(), config()]) == []


def test_write_compare_files(tmp_path):
    a, b = _noisy_pair(tmp_path, n=10)
    res = compare_runs([a, b], n_boot=300)
    md, js, png = write_compare(res, tmp_path / "out")
    assert (md.name, js.name, png.name) == ("compare.md", "compare.json", "compare_stages.png")
    assert png.read_bytes()[:8] == PNG_MAGIC

    def no_constants(name):
        raise AssertionError(f"non-finite float {name} in compare.json")

    back = json.loads(js.read_text(encoding="utf-8"), parse_constant=no_constants)
    assert back["n_common"] == 10 and back["baseline"] == "A"
    assert back["metrics"]["decode_ms"]["runs"][1]["ratio"]["geomean"] == pytest.approx(
        res["metrics"]["decode_ms"]["runs"][1]["ratio"]["geomean"])
    text = md.read_text(encoding="utf-8")
    assert "# stagewise compare: A vs B" in text
    assert "![mean time per stage, per run](compare_stages.png)" in text
    e2e_row = next(line for line in text.splitlines() if line.startswith("| E2EL |"))
    r = res["metrics"]["e2el_ms"]["runs"][1]["ratio"]
    assert f"{r['geomean']:.3f}× [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" in e2e_row
    for s in STAGES:
        assert f"| {s} |" in text


def test_nonfinite_values_are_written_as_null(tmp_path):
    res = {"runs": [], "x": float("nan"), "y": [float("inf")]}
    write_json(tmp_path / "c.json", res)
    assert json.loads((tmp_path / "c.json").read_text()) == {"runs": [], "x": None, "y": [None]}


def test_error_paths(tmp_path):
    good = make_run(tmp_path, "good", [make_record("s0"), make_record("s1")])
    with pytest.raises(InputError, match="missing_run: no such run directory"):
        compare_runs([good, tmp_path / "missing_run"])
    empty = make_run(tmp_path, "empty", [])
    with pytest.raises(InputError, match=r"samples\.jsonl: no samples"):
        compare_runs([good, empty])
    failed = make_run(tmp_path, "failed", [make_record("s0", error="boom"), make_record("s1", error="boom")])
    with pytest.raises(InputError, match=r"no successful samples \(all 2 failed\)"):
        compare_runs([good, failed])
    other = make_run(tmp_path, "other", [make_record("t0"), make_record("t1"), make_record("t2")])
    with pytest.raises(InputError, match=r"no sample id ran successfully in all runs .*good: 2, other: 3"):
        compare_runs([good, other])
    with pytest.raises(InputError, match="at least two run directories"):
        compare_runs([good])
    no_samples_file = tmp_path / "nofile"
    no_samples_file.mkdir()
    write_json(no_samples_file / "config.json", config())
    with pytest.raises(InputError, match=r"samples\.jsonl"):
        compare_runs([good, no_samples_file])
    with pytest.raises(InputError, match="n_boot"):
        compare_runs([good, good], n_boot=0)


def test_same_dir_twice_gets_distinct_labels_and_unit_ratio(tmp_path):
    a = make_run(tmp_path, "A", [make_record(f"s{i}", decode=800.0 + i) for i in range(3)])
    res = compare_runs([a, a], n_boot=50)
    assert [r["label"] for r in res["runs"]] == ["A (1)", "A (2)"]
    assert res["metrics"]["e2el_ms"]["runs"][1]["ratio"]["geomean"] == pytest.approx(1.0)
    ex = res["explain"][1]
    assert ex["e2el_diff_ms"] == 0.0 and all(v is None for v in ex["shares"].values())
    render_compare_markdown(res)  # no division by a zero difference


def test_compare_two_runs_made_by_the_cli(tmp_path, capsys):
    """End to end on real run directories: the tiny EventGPT on the built-in scene, twice,
    with different output lengths (8 and 24 tokens)."""
    from stagewise.cli import main

    dirs = []
    for n in (8, 24):
        d = tmp_path / f"tiny-{n}"
        rc = main(["run", "--out", str(d), "--num-samples", "2", "--output-len", f"fixed:{n}", "--no-ceilings"])
        assert rc == 0, capsys.readouterr()
        dirs.append(d)
    res = compare_runs(dirs, n_boot=200)
    assert res["n_common"] == 2
    assert [ln["n_output_tokens"] for ln in res["lengths"]] == [8.0, 24.0]
    assert {d["key"] for d in res["config_diff"]} >= {"requested.output_len"}
    ex = res["explain"][1]
    # 16 more decode steps at a positive time per step: the output-length part is positive
    assert ex["decode_split"]["steps"] == [7.0, 23.0] and ex["decode_split"]["from_output_len_ms"] > 0
    assert ex["unattributed_ms"] == pytest.approx(0.0, abs=0.05 * abs(ex["e2el_diff_ms"]) + 0.1)
    md, js, png = write_compare(res, tmp_path / "cmp")
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "| requested.output_len | fixed:8 | fixed:24 |" in md.read_text(encoding="utf-8")
