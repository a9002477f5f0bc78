"""The ``stagewise`` command: run, verify, render, report, compare.

Bad input ends with one line ``stagewise: error: <file>: <problem>`` and exit status 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from stagewise.errors import InputError

DEFAULT_SIM_SAMPLES = 4


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device: CUDA requested but no CUDA device is available")
    return name


def _dtype(name: str, device: str) -> str:
    aliases = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    if name == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return aliases.get(name, name)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=None, help="model preset: eventgpt-tiny (default), eventgpt-7b, video-llava-7b, video-llava-tiny, llava-1.5-7b, llava-1.5-tiny")
    g.add_argument("--weights", default="random", help='"random" (default) or a checkpoint folder')
    g.add_argument("--tokenizer", default=None, help="LLaMA tokenizer.model (or a folder holding it)")
    g.add_argument("--vision-tower", default=None, help="local CLIP folder for EventGPT checkpoints saved without tower weights")
    g.add_argument("--engine", default="hf", choices=["hf", "fast"], help="decode engine (default hf)")
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--fast-stages", action="store_true", help="all stage 2/3 speed paths: --gpu-preprocess --fuse-vision --vision-graph --vision-compile")
    g.add_argument("--vision-graph", action="store_true", help="EventGPT: replay stage 3 from a CUDA graph (CUDA only)")
    g.add_argument("--vision-compile", action="store_true", help="EventGPT: the CLIP tower through one compiled layer function")
    g.add_argument("--gpu-preprocess", action="store_true", help="stage 2 (event rendering, CLIP resize/normalize) with torch on the device")
    g.add_argument("--fuse-vision", action="store_true", help="EventGPT: pool before the projector's second linear (same function, fewer FLOPs)")
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
    i.add_argument("--window", action="store_true", help="window streams of >= 100 ms to their first 100 ms instead of refusing them")
    _add_event_file_args(i)
    i.add_argument("--window-ms", type=float, default=None, help="cut each --events recording into consecutive windows [t0, t0 + MS) ms, one sample each (id <file>@<t0_us>); empty windows are skipped and counted")
    i.add_argument("--max-windows", type=int, default=None, help="with --window-ms: at most the first N non-empty windows per recording")


def _add_event_file_args(g: Any) -> None:
    g.add_argument("--sensor-size", default=None, help="WxH (width x height, the camera convention), e.g. 640x480: the sensor size for event files that store none (Prophesee EVT/DAT often); events are checked against it")
    g.add_argument("--trust-pickle", action="store_true", help="load pickled .npy files with plain numpy (runs any code the pickle names); default: NumPy arrays and plain containers only")


def _sensor_size(args: argparse.Namespace) -> tuple[int, int] | None:
    """``--sensor-size WxH`` as ``(height, width)``, or ``None``."""
    from stagewise.inputs.events import parse_sensor_size

    return parse_sensor_size(args.sensor_size) if getattr(args, "sensor_size", None) else None


def _window_us(args: argparse.Namespace) -> int | None:
    ms = getattr(args, "window_ms", None)
    if ms is None:
        return None
    us = round(ms * 1000)
    if us < 1:
        raise ValueError(f"window-ms: must be > 0, got {ms}")
    return us


def _samples(args: argparse.Namespace, family: str) -> list[Any]:
    from stagewise.inputs import samples as data
    from stagewise.models.base import Sample
    from stagewise.preprocess.prompt import DEFAULT_QUERY

    q = args.query or DEFAULT_QUERY
    fmt = args.input_format or data.DEFAULT_FORMAT[family]
    size, window_us = _sensor_size(args), _window_us(args)
    if window_us is not None and args.events is None:
        raise ValueError("window-ms: applies to --events FILE_OR_FOLDER")
    if args.dataset is not None:
        samples = data.dataset_samples(args.dataset, fmt, args.dataset_root, args.query, sensor_size=size, trust_pickle=args.trust_pickle)
    elif args.events is not None:
        found = data.discover_event_samples(args.events, q, window_us=window_us, max_windows=args.max_windows, sensor_size=size, trust_pickle=args.trust_pickle)
        print(f"stagewise: {found.summary()}", file=sys.stderr)
        samples = found.samples
    elif args.event_images:
        samples = [Sample("event_images", q, event_image_paths=list(args.event_images))]
    elif args.video is not None:
        samples = [Sample(args.video.stem, q, video_path=args.video)]
    elif args.image is not None:
        samples = [Sample(args.image.stem, q, image_path=args.image)]
    else:
        if family != "eventgpt":
            raise ValueError(f"the built-in scene is an event stream; {family} needs --video, --image or --dataset")
        samples = data.simulated_samples(args.num_samples, q)
    return samples[: args.limit] if args.limit else samples


def _preset_and_family(args: argparse.Namespace) -> tuple[str | None, str]:
    from stagewise.models.registry import family_of_checkpoint, family_of_preset

    if args.weights != "random":
        fam = family_of_checkpoint(Path(args.weights))
        return args.preset, fam
    preset = args.preset or "eventgpt-tiny"
    return preset, family_of_preset(preset)


def _run_config(args: argparse.Namespace, preset: str | None) -> Any:
    from stagewise.runner import RunConfig

    device = _device(args.device)
    return RunConfig(
        preset=preset,
        weights=str(args.weights),
        engine=args.engine,
        device=device,
        dtype=_dtype(args.dtype, device),
        batch_size=getattr(args, "batch_size", 1),
        output_len=getattr(args, "output_len", "fixed:46"),
        max_new_tokens=args.max_new_tokens,
        warmup=getattr(args, "warmup", 0),
        repeats=getattr(args, "repeats", 1),
        window=args.window,
        gpu_preprocess=args.gpu_preprocess or args.fast_stages,
        fuse_vision=args.fuse_vision or args.fast_stages,
        vision_graph=args.vision_graph or args.fast_stages,
        vision_compile=args.vision_compile or args.fast_stages,
        measure_ceilings=not getattr(args, "no_ceilings", False),
        tokenizer=args.tokenizer,
        vision_tower=args.vision_tower,
        seed=args.seed,
        input_format=args.input_format,
        inputs={
            **{k: (str(v) if v is not None else None) for k, v in (("events", args.events), ("dataset", args.dataset), ("video", args.video), ("image", args.image))},
            "window_us": _window_us(args),
            "max_windows": args.max_windows,
            "sensor_size_hw": list(size) if (size := _sensor_size(args)) else None,
            "trust_pickle": bool(args.trust_pickle),
        },
    )


def cmd_run(args: argparse.Namespace) -> int:
    """``stagewise run``: measure the samples, write the run directory, print the stage table.

    Returns 0, or 1 when every sample failed.
    """
    from rich.console import Console
    from tqdm import tqdm

    from stagewise.results.report import print_summary_table
    from stagewise.runner import execute

    console = Console()
    preset, family = _preset_and_family(args)
    samples = _samples(args, family)
    cfg = _run_config(args, preset)
    out = args.out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{preset or family}-{cfg.engine}"
    if cfg.weights == "random":
        console.print("[yellow]random weights: the generated text is meaningless; the timings are what this run is for.[/yellow]")
        if preset and preset.endswith("-7b") and family == "eventgpt" and cfg.tokenizer is None:
            console.print("[yellow]no --tokenizer: using the tiny tokenizer shipped with stagewise; prompt lengths differ from LLaMA-2's.[/yellow]")
    console.print(f"stagewise run: {len(samples)} sample(s) x {cfg.repeats} repeat(s), {preset or cfg.weights}, engine {cfg.engine}, {cfg.device}/{cfg.dtype} -> {out}")
    bar = tqdm(total=len(samples) * cfg.repeats, unit="sample", desc="measuring", leave=False)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    summary = execute(cfg, samples, out, resume=args.resume, progress=progress)
    bar.close()
    import json

    config = json.loads((out / "config.json").read_text())
    print_summary_table(summary, config, console)
    from stagewise.results.records import read_samples

    for rec in read_samples(out / "samples.jsonl"):
        if not rec.ok:
            console.print(f"[red]failed[/red] {rec.sample_id}: {rec.error}", markup=True, highlight=False, soft_wrap=True)
    console.print(f"run directory: {out}  (report: {out / 'report.md'})")
    return 0 if summary["n_failed"] < summary["n_samples"] else 1


def cmd_verify(args: argparse.Namespace) -> int:
    """``stagewise verify``: fused vs decoupled greedy ids per sample; 0 when all are identical, else 1."""
    from rich.console import Console
    from rich.table import Table

    from stagewise.engine import make_engine
    from stagewise.models.registry import load_model
    from stagewise.runner import configure_model
    from stagewise.verify import verify_sample

    console = Console()
    preset, family = _preset_and_family(args)
    samples = _samples(args, family)
    cfg = _run_config(args, preset)
    model = load_model(cfg.preset, cfg.weights, device=torch.device(cfg.device), dtype=cfg.torch_dtype, tokenizer=cfg.tokenizer, vision_tower=cfg.vision_tower, seed=cfg.seed)
    configure_model(model, cfg)
    n = args.max_new_tokens
    engine = make_engine(cfg.engine, model.lm, max_batch=1, max_seq=int(getattr(model, "n_vision_tokens", 0)) + 256 + n + 64)
    eos = None if cfg.weights == "random" else model.eos_token_id
    table = Table(title=f"verify: fused generate() vs decoupled (vision once + {cfg.engine} engine), {preset or cfg.weights}, {cfg.device}/{cfg.dtype}")
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
    return 0 if n_ok == len(results) else 1


def cmd_render(args: argparse.Namespace) -> int:
    """``stagewise render``: write the event images of ``--events`` as PNGs; prints their paths."""
    from stagewise.inputs import events as ev
    from stagewise.preprocess.render import save_event_pngs

    size = _sensor_size(args)
    stream = ev.read_events(args.events, sensor_size=size, trust_pickle=args.trust_pickle)
    stream = ev.check_duration(stream, window=args.window)
    paths = save_event_pngs(stream, args.out, n_frames=args.frames, sensor_size=size or ((stream.height, stream.width) if stream.height else None), stem=args.events.stem)
    for p in paths:
        print(p)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``stagewise report``: re-render ``report.md`` and the plot of a run directory."""
    from stagewise.results.report import write_report

    print(write_report(args.run_dir))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """``stagewise compare``: pair run directories by sample id; write compare.md/.json/.png."""
    from stagewise.results.compare import compare_runs, write_compare

    result = compare_runs(args.run_dirs, n_boot=args.n_boot, seed=args.seed)
    paths = write_compare(result, args.out)
    for p in paths:
        print(p)
    return 0


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
    return 0


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
    return 0 if failed == 0 else 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = argparse.ArgumentParser(prog="stagewise", description="Stage-resolved inference of multimodal LLMs on event streams and video.")
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("run", help="run the benchmark / inference job (default: tiny EventGPT on the built-in scene)")
    _add_model_args(r)
    r.add_argument("--batch-size", type=int, default=1)
    r.add_argument("--output-len", default="fixed:46", help="random weights: fixed:N (default fixed:46), mean:X, trace:FILE (a samples.jsonl)")
    r.add_argument("--max-new-tokens", type=int, default=512, help="real weights: stop at EOS or after this many tokens")
    r.add_argument("--warmup", type=int, default=1, help="warm-up batches, run and not recorded (default 1)")
    r.add_argument("--repeats", type=int, default=1, help="measure each sample this many times")
    r.add_argument("--out", type=Path, default=None, help="run directory (default runs/<time>-<preset>-<engine>)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out, skipping finished samples")
    r.add_argument("--no-ceilings", action="store_true", help="skip measuring the device's copy bandwidth and matmul rate")
    r.set_defaults(func=cmd_run)
    v = sub.add_parser("verify", help="check decoupled == fused greedy token ids")
    _add_model_args(v)
    v.add_argument("--max-new-tokens", type=int, default=32)
    v.add_argument("--out", type=Path, default=None, help="write the comparison as JSON here")
    v.set_defaults(func=cmd_verify)
    d = sub.add_parser("render", help="event stream -> event-frame PNGs (EventGPT's event images)")
    d.add_argument("--events", type=Path, required=True)
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--frames", type=int, default=5)
    d.add_argument("--sensor-size", default=None, help="WxH (width x height, the camera convention; was HxW before), e.g. 640x480 (default: the file's, else max coordinate + 1 per frame)")
    d.add_argument("--trust-pickle", action="store_true", help="load pickled .npy files with plain numpy (runs any code the pickle names)")
    d.add_argument("--window", action="store_true", help="window streams of >= 100 ms to the first 100 ms")
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
    """Entry point of the ``stagewise`` console command. Returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        argv = ["run"]
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (InputError, ValueError, FileExistsError) as e:
        print(f"stagewise: error: {e}", file=sys.stderr)
        return 2
