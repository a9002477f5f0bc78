"""The ``stagewise`` command: run, verify, render, report, compare, make-dataset, convert.

Bad input ends with one line ``stagewise: error: <file>: <problem>``, never a traceback; every
argument, input, tokenizer and the output folder are checked before any model is built.

Exit codes (``run``): 0 every sample ok; 3 some samples failed (each recorded with its reason);
1 no sample ok, or the run crashed; 2 usage error (bad argument or input, before anything ran);
130 interrupted (Ctrl-C; the finished samples are on disk and the resume command is printed).
The other commands: 0 ok, 1 a check failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stagewise.errors import InputError

if TYPE_CHECKING:
    from rich.console import Console

    from stagewise.config import RunConfig
    from stagewise.models.base import MultimodalModel, Sample

DEFAULT_SIM_SAMPLES = 4
EXIT_OK, EXIT_CRASH, EXIT_USAGE, EXIT_SOME_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _add_input_args(p: argparse.ArgumentParser) -> None:
    i = p.add_argument_group("inputs (none: the built-in simulated scene)")
    i.add_argument("--events", type=Path, default=None, help="an event file (.npy/.npz/.h5) or a folder of them")
    i.add_argument("--event-images", type=Path, nargs="+", default=None, help="pre-rendered event PNG frames of one sample")
    i.add_argument("--video", type=Path, default=None, help="an MP4 or a folder of frames (Video-LLaVA, LLaVA)")
    i.add_argument("--image", type=Path, default=None, help="one image (LLaVA-1.5)")
    i.add_argument("--dataset", type=Path, default=None, help="seeds-style dataset JSON (event_data, event_image, video_data, conversations)")
    i.add_argument("--dataset-root", type=Path, default=None, help="dataset root (default: the JSON's folder)")
    i.add_argument("--input-format", choices=["events", "png", "mp4"], default=None, help="which source the model reads (fairness switch)")
    i.add_argument("--query", default=None, help="the question (default: the dataset's, else 'What are the key elements in this scene?')")
    i.add_argument("--num-samples", type=int, default=DEFAULT_SIM_SAMPLES, help="samples of the built-in scene (default 4)")
    i.add_argument("--limit", type=int, default=None, help="use only the first N samples")


def _add_event_file_args(g: argparse._ActionsContainer) -> None:
    g.add_argument("--sensor-size", default=None, help="WxH (width x height, the camera convention), e.g. 640x480: the sensor size for event files that store none (Prophesee EVT/DAT often); events are checked against it")
    g.add_argument("--trust-pickle", action="store_true", help="load pickled .npy files with plain numpy (runs any code the pickle names); default: NumPy arrays and plain containers only")


def _sensor_size(args: argparse.Namespace) -> tuple[int, int] | None:
    """``--sensor-size WxH`` as ``(height, width)``, or ``None``."""
    from stagewise.inputs.events import parse_sensor_size

    return parse_sensor_size(args.sensor_size) if getattr(args, "sensor_size", None) else None


def _samples(args: argparse.Namespace, family: str, cfg: RunConfig) -> list[Sample]:
    from stagewise.inputs import samples as data
    from stagewise.models.base import Sample
    from stagewise.preprocess.prompt import DEFAULT_QUERY

    q = args.query or DEFAULT_QUERY
    fmt = args.input_format or data.DEFAULT_FORMAT[family]
    if args.num_samples < 1:
        raise ValueError(f"num-samples: must be >= 1, got {args.num_samples}")
    if cfg.window_us is not None and args.events is None:
        raise ValueError("window-ms: applies to --events FILE_OR_FOLDER")
    if args.dataset is not None:
        samples = data.dataset_samples(args.dataset, fmt, args.dataset_root, args.query, sensor_size=cfg.sensor_size,
                                       trust_pickle=cfg.trust_pickle)
    elif args.events is not None:
        found = data.discover_event_samples(args.events, q, window_us=cfg.window_us, max_windows=cfg.max_windows,
                                            sensor_size=cfg.sensor_size, trust_pickle=cfg.trust_pickle)
        print(f"stagewise: {found.summary()}", file=sys.stderr)
        samples = found.samples
    elif args.event_images:
        samples = [Sample("event_images", q, event_image_paths=list(args.event_images))]
    elif args.video is not None:
        samples = [Sample(args.video.stem, q, video_path=args.video)]
    elif args.image is not None:
        samples = [Sample(args.image.stem, q, image_path=args.image)]
    else:
        samples = data.simulated_samples(args.num_samples, q)
    return samples[: args.limit] if args.limit else samples


def _preset_and_family(args: argparse.Namespace) -> tuple[str | None, str]:
    from stagewise.models.registry import family_of_checkpoint, family_of_preset

    if args.weights != "random":
        fam = family_of_checkpoint(Path(args.weights))
        return args.preset, fam
    preset = args.preset or "eventgpt-tiny"
    return preset, family_of_preset(preset)


def _inputs(args: argparse.Namespace) -> dict[str, str | None]:
    return {k: (str(v) if v is not None else None) for k, v in (("events", args.events), ("dataset", args.dataset), ("video", args.video), ("image", args.image))}


def _config(args: argparse.Namespace) -> tuple[RunConfig, list[Sample]]:
    """The run's configuration and samples, everything checked before a model is built."""
    from stagewise.config import RunConfig

    preset, family = _preset_and_family(args)
    cfg = RunConfig.from_args(args, preset=preset, inputs=_inputs(args))
    if cfg.tokenizer is not None and not Path(cfg.tokenizer).exists():
        raise InputError(cfg.tokenizer, "tokenizer not found (pass a LLaMA tokenizer.model or a folder holding one)")
    if cfg.vision_tower is not None and not Path(cfg.vision_tower).is_dir():
        raise InputError(cfg.vision_tower, "vision tower folder not found")
    return cfg, _samples(args, family, cfg)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(out, "--out exists and is not a folder")
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    import os

    if not os.access(probe, os.W_OK):
        raise InputError(out, f"cannot write here ({probe} is not writable)")


def cmd_run(args: argparse.Namespace) -> int:
    """``stagewise run``: measure the samples, write the run directory, print the stage table and,
    last, one JSON line with the headline figures (for scripts).

    Returns the exit code (module docstring).
    """
    from rich.console import Console
    from tqdm import tqdm

    from stagewise.distributed import DistContext, destroy, init, launch
    from stagewise.models.registry import default_tokenizer
    from stagewise.results.records import read_samples
    from stagewise.results.report import print_summary_table
    from stagewise.runner import check_run_dir, execute

    console = Console()
    cfg, samples = _config(args)
    out = args.out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.preset or Path(cfg.weights).name}-{cfg.engine}"
    _check_out(out)
    check_run_dir(cfg, out, args.resume)
    if args.nproc is not None:  # relaunch this very command under torchrun, one process per GPU
        argv = [a for a in args.argv if a != "--resume"] + (["--resume"] if args.resume else [])
        if args.out is None:
            argv += ["--out", str(out)]
        return launch(args.nproc, argv)
    ctx = DistContext.from_env()
    if ctx.distributed:
        if args.out is None:
            raise ValueError("out: under torchrun every rank must write to the same folder; pass --out DIR")
        ctx = init(ctx, "cuda" if cfg.device.startswith("cuda") else "cpu")
    if not ctx.is_main:  # the other ranks run their shard quietly; rank 0 reports
        try:
            execute(cfg, samples, out, resume=args.resume, ctx=ctx)
        finally:
            destroy(ctx)
        return EXIT_OK
    if cfg.weights == "random":
        console.print("[yellow]random weights: the generated text is meaningless; the timings are what this run is for.[/yellow]")
        warning = default_tokenizer(cfg.preset)[1] if cfg.tokenizer is None else None
        if warning:
            console.print(f"[yellow]{warning}[/yellow]")
    console.print(f"stagewise run: {len(samples)} sample(s) x {cfg.repeats} repeat(s), {cfg.preset or cfg.weights}, engine {cfg.engine}, {cfg.device}/{cfg.dtype} -> {out}")
    bar = tqdm(total=len(samples) * cfg.repeats, unit="sample", desc="measuring", leave=False)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        summary = execute(cfg, samples, out, resume=args.resume, progress=progress, ctx=ctx)
    except KeyboardInterrupt:
        bar.close()
        n = len(read_samples(out / "samples.jsonl")) if (out / "samples.jsonl").is_file() else 0
        argv = [a for a in args.argv if a != "--resume"] or ["run"]
        if "--out" not in argv:
            argv += ["--out", str(out)]
        print(f"\nstagewise: interrupted; {n} sample(s) are recorded in {out / 'samples.jsonl'}. Resume with:\n"
              f"  stagewise {shlex.join(argv)} --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        destroy(ctx)
    bar.close()
    config = json.loads((out / "config.json").read_text())
    print_summary_table(summary, config, console)
    for rec in read_samples(out / "samples.jsonl"):
        if not rec.ok:
            console.print(f"[red]failed[/red] {rec.sample_id}: {rec.error}", markup=True, highlight=False, soft_wrap=True)
    console.print(f"run directory: {out}  (report: {out / 'report.md'})")
    n, n_failed = summary["n_samples"], summary["n_failed"]
    code = EXIT_OK if n_failed == 0 else (EXIT_SOME_FAILED if n_failed < n else EXIT_CRASH)
    print(json.dumps(headline(summary, out, code)))
    return code


def headline(summary: dict[str, Any], run_dir: Path, exit_code: int) -> dict[str, Any]:
    """The last line of ``stagewise run``: one JSON object (units in the keys, ``null`` never ``NaN``)."""
    from stagewise.results.records import _finite

    keys = ("mean_e2el_ms", "mean_ttft_ms", "mean_tpot_ms", "median_itl_ms", "mean_prefill_ms", "mean_decode_ms",
            "request_throughput_req_s", "output_throughput_tok_s")
    return _finite({"run_dir": str(run_dir), "n_samples": summary["n_samples"], "n_failed": summary["n_failed"],
                    **{k: summary.get(k) for k in keys}, "exit_code": exit_code})


def cmd_verify(args: argparse.Namespace) -> int:
    """``stagewise verify``: fused vs decoupled greedy ids per sample; 0 when all are identical, else 1."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from stagewise.engine import make_engine
    from stagewise.models.registry import load_model
    from stagewise.runner import PROMPT_TEXT_BUDGET, resolve_stage_options
    from stagewise.verify import verify_sample

    console = Console()
    cfg, samples = _config(args)
    model = load_model(cfg.preset, cfg.weights, device=torch.device(cfg.device), dtype=cfg.torch_dtype,
                       tokenizer=cfg.tokenizer, vision_tower=cfg.vision_tower, seed=cfg.seed)
    model.configure(resolve_stage_options(model, cfg))
    n = cfg.max_new_tokens
    max_seq = model.n_vision_tokens + PROMPT_TEXT_BUDGET + n + 64
    if cfg.quantize != "none":
        return _verify_quantized(cfg, model, samples, max_seq, console, args.out)
    engine = make_engine(cfg.engine, model.lm, cfg.engine_options(max_batch=1, max_seq=max_seq))
    eos = None if cfg.weights == "random" else model.eos_token_id
    table = Table(title=f"verify: fused generate() vs decoupled (vision once + {cfg.engine} engine), {cfg.preset or cfg.weights}, {cfg.device}/{cfg.dtype}")
    for col in ("sample", "tokens", "identical", "first diff", "top-2 margin at diff"):
        table.add_column(col)
    results = []
    for s in samples:
        r = verify_sample(model, engine, s, n, eos)
        results.append(r)
        table.add_row(r.sample_id, f"{len(r.fused)}/{len(r.decoupled)}", "yes" if r.ok else "NO", "-" if r.first_diff is None else str(r.first_diff), "-" if r.margin is None else f"{r.margin:.4f}")
    console.print(table)
    n_ok = sum(r.ok for r in results)
    console.print(f"{n_ok}/{len(results)} samples identical")
    if args.out:
        from stagewise.results.records import write_json

        write_json(args.out, [r.__dict__ | {"ok": r.ok} for r in results])
    return EXIT_OK if n_ok == len(results) else EXIT_CRASH


def _verify_quantized(cfg: RunConfig, model: MultimodalModel, samples: list[Sample], max_seq: int, console: Console,
                      out_path: Path | None) -> int:
    """``verify --quantize KIND``: the quantized fast engine against the model-dtype one, teacher-forced
    (top-1 agreement, |logit diff|, KL per token); always 0 unless a run fails (it reports, not judges)."""
    from dataclasses import replace

    from rich.table import Table

    from stagewise.engine import make_engine
    from stagewise.verify import quant_agreement

    q_opts = cfg.engine_options(max_batch=1, max_seq=max_seq)
    ref = make_engine("fast", model.lm, replace(q_opts, quantize=None))
    quant = make_engine("fast", model.lm, q_opts)
    table = Table(title=f"verify --quantize {cfg.quantize}: teacher-forced agreement with the {cfg.dtype} engine, {cfg.preset or cfg.weights}")
    for col in ("sample", "positions", "top-1 agreement", "max |logit diff|", "mean |logit diff|", "mean KL (nats)"):
        table.add_column(col)
    results = []
    for s in samples:
        r = quant_agreement(model, ref, quant, s, cfg.max_new_tokens)
        a = r.agreement
        results.append({"sample_id": r.sample_id, "ref_ids": r.ref_ids, **a})
        table.add_row(r.sample_id, str(a["n_positions"]), f"{a['top1_agreement']:.3f}", f"{a['max_abs_logit_diff']:.4g}",
                      f"{a['mean_abs_logit_diff']:.4g}", f"{a['mean_kl']:.4g}")
    console.print(table)
    if cfg.weights == "random":
        console.print("[yellow]random weights: only this numerical agreement means anything, not the text.[/yellow]")
    if out_path is not None:
        from stagewise.results.records import write_json

        write_json(out_path, {"quantization": quant.quant_info, "samples": results, "weight_bytes_per_step": {
            "reference": ref.weight_bytes_per_step, "quantized": quant.weight_bytes_per_step}})
    return EXIT_OK


def cmd_render(args: argparse.Namespace) -> int:
    """``stagewise render``: write the event images of ``--events`` as PNGs; prints their paths."""
    from stagewise.inputs import events as ev
    from stagewise.preprocess.render import save_event_pngs

    size = _sensor_size(args)
    stream = ev.read_events(args.events, sensor_size=size, trust_pickle=args.trust_pickle)
    stream = ev.check_duration(stream, window=args.window)
    paths = save_event_pngs(stream, args.out, n_frames=args.frames, sensor_size=size or stream.sensor_size, stem=args.events.stem)
    for p in paths:
        print(p)
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    """``stagewise report``: re-render ``report.md`` and the plot of a run directory."""
    from stagewise.results.report import write_report

    print(write_report(args.run_dir))
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    """``stagewise compare``: pair run directories by sample id; write compare.md/.json/.png."""
    from stagewise.results.compare import compare_runs, write_compare

    result = compare_runs(args.run_dirs, n_boot=args.n_boot, seed=args.seed)
    for p in write_compare(result, args.out):
        print(p)
    return EXIT_OK


def cmd_make_dataset(args: argparse.Namespace) -> int:
    """``stagewise make-dataset``: one seeds-style dataset from event files and/or the built-in scene."""
    from stagewise.inputs import events as ev
    from stagewise.inputs.dataset import build_dataset
    from stagewise.inputs.simulate import moving_edge_events

    streams = {}
    size = _sensor_size(args)
    for f in args.events or []:
        streams[f.stem] = ev.check_duration(ev.read_events(f, sensor_size=size, trust_pickle=args.trust_pickle), window=args.window)
    for i in range(args.simulated):
        streams[f"sim{i:03d}"] = moving_edge_events(seed=i)
    if not streams:
        raise ValueError("make-dataset: give --events FILE... and/or --simulated N")
    print(build_dataset(streams, args.out, write_video=not args.no_video))
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    """``stagewise convert IN... --out DIR``: event files -> the pickle-free formats.

    Each input is read as stage 1 reads it (safe unpickling unless ``--trust-pickle``, camera
    formats through faery, validated, sorted by time) and written with
    :func:`stagewise.inputs.events.write_events` as ``DIR/<stem>.h5`` (DSEC layout with
    ``ms_to_idx``, so later windowed reads touch only their window; the default) or
    ``DIR/<stem>.npz``. Prints one output path per input, then any reader notes.

    Returns 0 when every input was converted, else 2 (the failures are printed, one line each).
    """
    from stagewise.inputs import events as ev

    size = _sensor_size(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stems = [f.stem for f in args.inputs]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise ValueError(f"convert: inputs share the output name(s) {', '.join(dup)}; convert them into different --out folders")
    failed = 0
    for f in args.inputs:
        try:
            stream = ev.read_events(f, sensor_size=size, trust_pickle=args.trust_pickle)
            out = ev.write_events(args.out / f"{f.stem}.{args.format}", stream)
        except InputError as e:
            print(f"stagewise: error: {e}", file=sys.stderr)
            failed += 1
            continue
        print(out)
        for note in stream.notes:
            print(f"  note: {note}")
    return EXIT_OK if failed == 0 else EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from stagewise.config import RunConfig

    p = argparse.ArgumentParser(prog="stagewise", description="Stage-resolved inference of multimodal LLMs on event streams and video.")
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("run", help="run the benchmark / inference job (default: tiny EventGPT on the built-in scene)")
    RunConfig.add_cli_args(r)
    _add_input_args(r)
    r.add_argument("--out", type=Path, default=None, help="run directory (default runs/<time>-<preset>-<engine>)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out (same configuration), skipping finished samples")
    r.add_argument("--nproc", type=int, default=None, help="run on N processes through torchrun (data parallel over N GPUs; with --tensor-parallel-size T, N/T model copies)")
    r.set_defaults(func=cmd_run)
    v = sub.add_parser("verify", help="check decoupled == fused greedy token ids")
    RunConfig.add_cli_args(v)
    _add_input_args(v)
    v.set_defaults(max_new_tokens=32)
    v.add_argument("--out", type=Path, default=None, help="write the comparison as JSON here")
    v.set_defaults(func=cmd_verify)
    d = sub.add_parser("render", help="event stream -> event-frame PNGs (EventGPT's event images)")
    d.add_argument("--events", type=Path, required=True)
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--frames", type=int, default=5)
    d.add_argument("--window", action="store_true", help="window streams of >= 100 ms to the first 100 ms")
    _add_event_file_args(d)
    d.set_defaults(func=cmd_render)
    md = sub.add_parser("make-dataset", help="write a seeds-style dataset (events, event PNGs, MP4, frame folders) from event files / the built-in scene")
    md.add_argument("--out", type=Path, required=True)
    md.add_argument("--events", type=Path, nargs="*", default=None)
    md.add_argument("--simulated", type=int, default=0, help="add N samples of the built-in scene")
    md.add_argument("--window", action="store_true")
    md.add_argument("--no-video", action="store_true", help="skip mp4/ and video/ (no PyAV needed)")
    _add_event_file_args(md)
    md.set_defaults(func=cmd_make_dataset)
    cv = sub.add_parser("convert", help="event files (pickled .npy, camera formats, ...) -> pickle-free .h5 (DSEC layout) or .npz")
    cv.add_argument("inputs", type=Path, nargs="+", metavar="IN")
    cv.add_argument("--out", type=Path, required=True, help="output folder (DIR/<stem>.<format>)")
    cv.add_argument("--format", choices=["h5", "npz"], default="h5", help="h5 (default: DSEC layout, windowed reads touch only their window) or npz")
    _add_event_file_args(cv)
    cv.set_defaults(func=cmd_convert)
    rp = sub.add_parser("report", help="re-render a run directory's report.md and plot")
    rp.add_argument("run_dir", type=Path)
    rp.set_defaults(func=cmd_report)
    c = sub.add_parser("compare", help="compare run directories stage by stage")
    c.add_argument("run_dirs", type=Path, nargs="+")
    c.add_argument("--out", type=Path, default=Path("compare"))
    c.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for the ratio CIs (default 2000)")
    c.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    c.set_defaults(func=cmd_compare)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stagewise`` console command. Returns the exit status (module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        argv = ["run"]
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse's own usage errors (already printed)
        return EXIT_USAGE if e.code else EXIT_OK
    args.argv = list(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except (InputError, ValueError, FileExistsError) as e:
        print(f"stagewise: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nstagewise: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - a crash: one line, the traceback in a log file
        log = Path(f"stagewise-crash-{time.strftime('%Y%m%d-%H%M%S')}.log")
        try:
            log.write_text("".join(traceback.format_exception(e)))
            where = f" (traceback in {log})"
        except OSError:
            where = ""
        print(f"stagewise: crashed: {type(e).__name__}: {' '.join(str(e).split())[:300]}{where}", file=sys.stderr)
        return EXIT_CRASH
