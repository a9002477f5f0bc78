"""report.md, stage_shares.png and the terminal table, on hand-built run directories."""

from __future__ import annotations

import io
import json

import matplotlib.image
import pytest

from stagewise import STAGES
from stagewise.errors import InputError
from stagewise.results.records import SampleRecord, write_json
from stagewise.results.report import (
    RANDOM_WEIGHTS_WARNING,
    load_run,
    plot_stage_shares,
    print_summary_table,
    render_markdown,
    shape_rows,
    write_report,
)
from stagewise.results.summary import summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def shapes_for(n_text: int = 59, n_vis: int = 582, n_out: int = 46) -> dict[str, list[int]]:
    s = n_vis + n_text
    return {
        "load.events": [132268],
        "preprocess.pixel_values": [5, 3, 336, 336],
        "preprocess.input_ids": [n_text + 1],
        "vision.features": [n_vis, 4096],
        "prefill.inputs_embeds": [1, s, 4096],
        "prefill.kv_cache": [32, 2, 1, 32, s, 128],
        "decode.output_ids": [n_out],
    }


def make_record(sid: str, *, load: float = 8.5, pre: float = 17.0, vision: float = 28.5, prefill: float = 104.0,
                decode: float = 850.0, n_out: int = 46, n_vis: int = 582, n_text: int = 59,
                error: str | None = None, shapes: dict | None = None) -> SampleRecord:
    """An EventGPT-7B-like record (times in ms); ``error`` gives a failed one."""
    if error is not None:
        return SampleRecord(sample_id=sid, model="eventgpt", engine="hf", error=error)
    ttft = load + pre + vision + prefill
    return SampleRecord(
        sample_id=sid, model="eventgpt", engine="hf",
        load_ms=load, preprocess_ms=pre, vision_ms=vision, prefill_ms=prefill, decode_ms=decode,
        e2el_ms=ttft + decode + 0.25, ttft_ms=ttft, tpot_ms=decode / (n_out - 1),
        itl_ms=[decode / (n_out - 1)] * (n_out - 1),
        decode_throughput_tok_s=(n_out - 1) / (decode / 1e3), n_images=5, n_vision_tokens=n_vis, n_text_tokens=n_text,
        n_prefill_tokens=n_vis + n_text, n_output_tokens=n_out, kv_cache_bytes=32 * 2 * (n_vis + n_text) * 4096 * 2,
        peak_gpu_mem_bytes=14_000 * 2**20, output_text="In the scene, there is a road.",
        output_ids=list(range(n_out)), shapes=shapes if shapes is not None else shapes_for(n_text, n_vis, n_out),
    )


def sample_records() -> list[SampleRecord]:
    """5 OK samples (decode 840..860, prefill 100..108; sample s2 has a longer prompt) and 2 failed."""
    recs = []
    for i in range(5):
        n_text = 63 if i == 2 else 59
        recs.append(make_record(f"s{i}", decode=840.0 + 5 * i, prefill=100.0 + 2 * i, n_text=n_text))
    recs.insert(3, make_record("bad_mp4", error="corrupt.mp4: moov atom not found"))
    recs.append(make_record("too_long", error="stream.npy: stream spans 250 ms | over 100 ms, refused"))
    return recs


def base_config(weights: str = "random") -> dict:
    return {"model": "eventgpt", "preset": "eventgpt-7b", "engine": "hf", "weights": weights, "dtype": "bfloat16",
            "device": "cuda:0", "batch_size": 1, "output_len": "fixed:46",
            "env": {"gpu": "NVIDIA H100 80GB HBM3", "driver": "550.54", "torch": "2.13.0",
                    "transformers": "5.17.0", "git_sha": "e4e52d1"}}


FLOORS = {
    "prefill": {"floor_ms": 26.0, "kind": "MFU", "flops": 8.6e12, "bytes": None},
    "decode": {"floor_ms": 425.0, "kind": "MBU", "flops": None, "bytes": 45 * 13.5e9},
}


def make_run(tmp_path, records=None, config=None, summary_extra=None, name="run"):
    d = tmp_path / name
    d.mkdir()
    write_json(d / "config.json", config or base_config())
    recs = sample_records() if records is None else records
    (d / "samples.jsonl").write_text("".join(r.to_json() + "\n" for r in recs), encoding="utf-8")
    summary = summarize(recs)
    summary.update(summary_extra or {})
    write_json(d / "summary.json", summary)
    return d


def test_markdown_has_stage_table_with_known_means_and_shares():
    recs = sample_records()
    md = render_markdown(base_config(), summarize(recs), recs)
    # decode 840, 845, 850, 855, 860 -> mean = p50 = 850; prefill 100..108 -> mean 104
    means = {"load": 8.5, "preprocess": 17.0, "vision": 28.5, "prefill": 104.0, "decode": 850.0}
    total = sum(means.values())
    assert "| 5 decode | 850.0 | 850.0 |" in md
    assert "| 4 prefill | 104.0 | 104.0 |" in md
    assert "| 3 vision | 28.50 | 28.50 |" in md
    decode_row = next(line for line in md.splitlines() if line.startswith("| 5 decode |"))
    assert decode_row.endswith(f"| {100 * means['decode'] / total:.1f} |")  # 84.3 % of the stage sum
    assert "| sum of stages | 1,008.0 |" in md
    # headers carry units
    assert "mean (ms)" in md and "p99 (ms)" in md and "KV cache (MiB)" in md and "TTFT (ms)" in md
    # KV cache: 32 layers x K,V x 641 tokens x 4096 x 2 bytes = 320.5 MiB (the seeds' figure)
    kv_row = next(line for line in md.splitlines() if line.startswith("| KV cache (MiB)"))
    assert kv_row.startswith("| KV cache (MiB) | 320.") and "| 320.5 |" in kv_row
    assert "Samples: 7 (5 ok, 2 failed)" in md
    # counts: integral values without decimals; the mean of 59, 59, 63, 59, 59 text tokens is 59.8
    assert "| vision tokens | 582 | 582 | 582 |" in md
    assert "| text tokens | 59.8 | 59 | 63 |" in md


def test_markdown_random_weights_warning_only_for_random():
    recs = sample_records()
    assert RANDOM_WEIGHTS_WARNING in render_markdown(base_config("random"), summarize(recs), recs)
    md = render_markdown(base_config("/ckpt/EventGPT-7b"), summarize(recs), recs)
    assert RANDOM_WEIGHTS_WARNING not in md
    assert "/ckpt/EventGPT-7b" in md


def test_markdown_lists_failed_samples_with_errors_escaped():
    recs = sample_records()
    md = render_markdown(base_config(), summarize(recs), recs)
    assert "## Failed samples (2)" in md
    assert "| bad_mp4 | corrupt.mp4: moov atom not found |" in md
    assert "over 100 ms" in md and "250 ms \\| over" in md  # a pipe in an error does not break the table


def test_shape_table_from_first_ok_sample_and_variation_noted():
    recs = sample_records()
    sid, rows = shape_rows(recs)
    assert sid == "s0"
    by = {(r["stage"], r["name"]): r for r in rows}
    assert [r["stage"] for r in rows] == ["load", "preprocess", "preprocess", "vision", "prefill", "prefill", "decode"]
    assert by[("vision", "features")]["shape"] == [582, 4096] and by[("vision", "features")]["varies"] is None
    # s2 has 63 text tokens: prefill length 641..645 varies
    assert by[("prefill", "inputs_embeds")]["varies"] == "[1, 641–645, 4096]"
    md = render_markdown(base_config(), summarize(recs), recs)
    assert "| prefill | inputs_embeds | [1, 641, 4096] | 2,625,536 | [1, 641–645, 4096] |" in md
    assert "| load | events | [132268] | 132,268 | same in all |" in md
    assert "Shapes vary across samples" in md


def test_floors_table_utilisation_and_warmup_line():
    recs = sample_records()
    summary = summarize(recs) | {"floors": FLOORS, "warmup_ms": 25000.0,
                                 "ceilings": {"copy_bw_bytes_s": 2.9e12, "bf16_flops_s": 7.5e14}}
    md = render_markdown(base_config(), summary, recs)
    # utilisation = floor / measured: 26 / 104 = 25 %, 425 / 850 = 50 %
    assert "| prefill | MFU | 104.0 | 26.00 | 25.0 |" in md
    assert "| decode | MBU | 850.0 | 425.0 | 50.0 |" in md
    # achieved: 8.6e12 FLOPs in 104 ms = 82.7 TFLOP/s; 607.5e9 bytes in 850 ms = 714.7 GB/s
    assert "82.69 TFLOP/s" in md and "714.7 GB/s" in md
    assert "Compile / warm-up: 25,000.0 ms" in md
    assert "copy bandwidth 2,900.0 GB/s" in md and "bf16 matmul 750.0 TFLOP/s" in md
    md_plain = render_markdown(base_config(), summarize(recs), recs)
    assert "Against the floor" not in md_plain and "warm-up" not in md_plain


def test_markdown_with_no_successful_sample():
    recs = [make_record("a", error="boom"), make_record("b", error="boom too")]
    md = render_markdown(base_config(), summarize(recs), recs)
    assert "No sample ran to the end" in md
    assert "| 5 decode | – | – |" in md
    assert "## Failed samples (2)" in md


def test_write_report_recomputes_summary_keeps_floors_and_writes_png(tmp_path):
    stale = {"mean_decode_ms": 999.0, "floors": FLOORS, "warmup_ms": 1234.5,
             "engine_warmup_ms": 1000.0, "model_build_ms": 4321.0}
    d = make_run(tmp_path, summary_extra=stale)
    path = write_report(d)
    assert path == d / "report.md"
    md = path.read_text(encoding="utf-8")
    assert "| 5 decode | 850.0 |" in md and "999.0" not in md  # recomputed from the records
    assert "| decode | MBU | 850.0 | 425.0 | 50.0 |" in md  # floors kept from summary.json
    assert "Compile / warm-up: 1,234.5 ms (1.2 s), of which engine compile / capture 1,000.0 ms; " \
           "model build 4,321.0 ms." in md
    assert "![mean time per stage](stage_shares.png)" in md
    png = d / "stage_shares.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 200


def test_write_report_works_without_summary_json(tmp_path):
    d = make_run(tmp_path)
    (d / "summary.json").unlink()
    config, summary, records = load_run(d)
    assert "floors" not in summary and len(records) == 7
    assert "| 5 decode | 850.0 |" in write_report(d).read_text(encoding="utf-8")


def test_plot_stage_shares_several_runs_and_bad_labels(tmp_path):
    recs = sample_records()
    s = summarize(recs)
    out = plot_stage_shares([s, {st: 10.0 for st in STAGES}, s], tmp_path / "sub" / "p.png", labels=["a", "b", "c"])
    assert out.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="2 labels for 3"):
        plot_stage_shares([s, s, s], tmp_path / "q.png", labels=["a", "b"])
    with pytest.raises(ValueError, match="no summaries"):
        plot_stage_shares([], tmp_path / "r.png")


@pytest.mark.parametrize("missing", ["config.json", "samples.jsonl"])
def test_write_report_names_missing_file(tmp_path, missing):
    d = make_run(tmp_path)
    (d / missing).unlink()
    with pytest.raises(InputError, match=missing.replace(".", r"\.")):
        write_report(d)


def test_write_report_missing_dir_and_bad_config(tmp_path):
    with pytest.raises(InputError, match="no such run directory"):
        write_report(tmp_path / "nope")
    d = make_run(tmp_path)
    (d / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(InputError, match="config.json: not valid JSON"):
        write_report(d)
    (d / "config.json").write_text(json.dumps([1, 2]), encoding="utf-8")
    with pytest.raises(InputError, match="expected a JSON object"):
        write_report(d)


def test_print_summary_table_shows_stages_ttft_and_warning():
    from rich.console import Console

    recs = sample_records()
    summary = summarize(recs)
    console = Console(record=True, width=200, file=io.StringIO())
    print_summary_table(summary, base_config(), console=console)
    text = console.export_text()
    ttft_mean = 8.5 + 17.0 + 28.5 + 104.0  # 158.0 ms
    assert "TTFT (ms)" in text and f"{ttft_mean:.1f}" in text
    assert "850.0" in text and "TPOT" in text and "decode (tok/s)" in text
    assert "5 ok / 7 samples" in text
    assert RANDOM_WEIGHTS_WARNING in text
