"""What a run is asked to do: :class:`RunConfig` (with its command-line arguments) and the
generated-length policies.

With real weights a sample ends at EOS or ``max_new_tokens``. With random weights EOS is
meaningless, so the number of tokens to generate comes from a policy:

- ``fixed:N``    every sample generates N tokens (default ``fixed:46``, the seeds' mean 45.5
                 rounded);
- ``mean:X``     lengths ``round((i+1) X) - round(i X)`` for the i-th sample: integers whose
                 running mean is X (e.g. ``mean:45.5`` -> 46, 45, 46, 45, ...; ``mean:102.4``);
- ``trace:FILE`` per-sample lengths replayed from a previous run's ``samples.jsonl``
                 (matched by ``sample_id``; ids not in the trace take the trace's lengths in
                 file order, cycling).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stagewise.errors import InputError
from stagewise.results.records import read_samples


@dataclass
class OutputLenPolicy:
    """A parsed ``--output-len`` value; :meth:`length` gives a sample's token count.

    Raises (in :func:`parse_output_len`):
        ValueError: malformed spec; InputError: unreadable or empty trace file.
    """

    kind: str
    value: float = 0.0
    trace: dict[str, int] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)
    spec: str = ""

    def length(self, sample_id: str, index: int) -> int:
        """Tokens to generate (first token included) for the ``index``-th sample."""
        if self.kind == "fixed":
            return int(self.value)
        if self.kind == "mean":
            return max(1, round((index + 1) * self.value) - round(index * self.value))
        base = sample_id.split("@", 1)[0]
        if sample_id in self.trace:
            return self.trace[sample_id]
        if base in self.trace:
            return self.trace[base]
        return self.order[index % len(self.order)]


def parse_output_len(spec: str) -> OutputLenPolicy:
    """Parse ``fixed:N`` / ``mean:X`` / ``trace:FILE`` (see module docstring)."""
    kind, _, arg = spec.partition(":")
    if kind == "fixed":
        if not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"output-len: fixed:N needs a whole number N >= 1, got {spec!r}")
        return OutputLenPolicy("fixed", int(arg), spec=spec)
    if kind == "mean":
        try:
            x = float(arg)
        except ValueError:
            x = math.nan
        if not math.isfinite(x) or x < 1:
            raise ValueError(f"output-len: mean:X needs a number X >= 1, got {spec!r}")
        return OutputLenPolicy("mean", x, spec=spec)
    if kind == "trace":
        recs = [r for r in read_samples(Path(arg)) if r.ok and r.n_output_tokens]
        if not recs:
            raise InputError(arg, "trace holds no finished sample with an output length")
        return OutputLenPolicy("trace", trace={r.sample_id: int(r.n_output_tokens) for r in recs}, order=[int(r.n_output_tokens) for r in recs], spec=spec)
    raise ValueError(f"output-len: expected fixed:N, mean:X or trace:FILE, got {spec!r}")


# ----------------------------------------------------------------------------------------------
# The run's configuration


SPECULATE_METHODS = ("none", "ngram", "draft_model", "multimodal_draft")
"""``--speculate``: vLLM's method names, plus a multimodal draft model on its own input."""

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "fp32": "float32", "float32": "float32"}
"""Accepted ``--dtype`` names -> torch dtype names."""

RESUME_IGNORED = ("warmup", "measure_ceilings")
"""Fields that may differ when a run is resumed (they do not change what a record measures)."""


@dataclass
class RunConfig:
    """Everything a run is asked to do; validated in ``__post_init__`` (``ValueError`` naming the field).

    Declares its own command-line arguments (:meth:`add_cli_args`) and is built from them
    (:meth:`from_args`), after sglang's ``BenchArgs``. What a run actually applied (stage speed
    paths a family can serve, engine settings on this device) is recorded next to it in
    ``config.json``'s ``applied``.

    Attributes:
        preset / weights / tokenizer / vision_tower: the model (``weights``: ``"random"`` or a folder).
        device / dtype / seed: where, in which precision; the base seed (sampling, random weights).
        engine / batch_size / kv_bucket / check_every / deterministic / cuda_graphs / compile / autotune /
            matvec_kernel: the decode engine (``autotune``: timing-based tuning of the fast engine's
            compiled kernels; ``matvec_kernel``: ``"inductor"`` or ``"triton"``, what computes the
            fast engine's dense decode projections, :attr:`~stagewise.engine.fast.FastOptions.matvec_kernel`).
        speculate / num_speculative_tokens / draft_model / prompt_lookup_max / prompt_lookup_min:
            speculative decoding in the fast engine (``ngram``: prompt lookup; ``draft_model``: a
            text-only LLaMA draft, a preset such as ``llama-68m`` or a folder; ``multimodal_draft``:
            another registry model on its own input, e.g. ``eventgpt-7b`` drafting for Video-LLaVA).
        tensor_parallel_size / all_reduce: split the fast engine's decoder over that many GPUs of
            one host (under torchrun), with this all-reduce (``auto``, ``nccl``, ``symm_mem``, ``gloo``).
        quantize / quant_group_size / quantized_cache / quant_decode_kernel / quant_prefill_kernel:
            weight-only quantization of the decoder in the fast engine (``none`` by default).
        output_len / max_new_tokens: generated length (random weights: a policy; real: EOS or the cap).
        temperature / top_p / top_k: decoding (temperature 0 = greedy, the default).
        gpu_preprocess / fuse_vision / vision_graph / vision_compile / fast_stages: stage 2/3 speed
            paths (``fast_stages``: every one the family and device can serve).
        window / sensor_size: EventGPT input rules (``sensor_size`` as ``(height, width)``).
        trust_pickle / window_ms / max_windows: event files: plain unpickling (opt-in), long
            recordings cut into windows of ``window_ms`` (at most ``max_windows`` per file).
        warmup / repeats / measure_ceilings: the measurement.
        input_format / inputs: which source each family reads, and the inputs given (recorded).
    """

    preset: str | None = "eventgpt-tiny"
    weights: str = "random"
    tokenizer: str | None = None
    vision_tower: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    engine: str = "hf"
    batch_size: int = 1
    kv_bucket: int = 64
    check_every: int = 16
    deterministic: bool = False
    cuda_graphs: bool = True
    compile: bool = True
    autotune: bool = True
    matvec_kernel: str = "inductor"
    output_len: str = "fixed:46"
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 50
    gpu_preprocess: bool = False
    fuse_vision: bool = False
    vision_graph: bool = False
    vision_compile: bool = False
    fast_stages: bool = False
    speculate: str = "none"
    num_speculative_tokens: int = 4
    draft_model: str | None = None
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    tensor_parallel_size: int = 1
    all_reduce: str = "auto"
    quantize: str = "none"
    quant_group_size: int = 128
    quantized_cache: str | None = None
    quant_decode_kernel: str = "auto"
    quant_prefill_kernel: str = "auto"
    window: bool = False
    sensor_size: tuple[int, int] | None = None
    trust_pickle: bool = False
    window_ms: float | None = None
    max_windows: int | None = None
    warmup: int = 1
    repeats: int = 1
    measure_ceilings: bool = True
    input_format: str | None = None
    inputs: dict[str, str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from stagewise.engine import ENGINES

        if self.engine not in ENGINES:
            raise ValueError(f"engine: expected one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.warmup < 0 or self.repeats < 1:
            raise ValueError(f"warmup must be >= 0 and repeats >= 1, got {self.warmup} and {self.repeats}")
        if self.kv_bucket < 1 or self.check_every < 1:
            raise ValueError(f"kv_bucket and check_every must be >= 1, got {self.kv_bucket} and {self.check_every}")
        if self.dtype not in DTYPES.values():
            raise ValueError(f"dtype: expected one of {', '.join(sorted(DTYPES))}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ValueError(f"device: expected cpu, cuda or cuda:N, got {self.device!r}")
        if self.speculate not in SPECULATE_METHODS:
            raise ValueError(f"speculate: expected one of {', '.join(SPECULATE_METHODS)}, got {self.speculate!r}")
        if self.speculate != "none":
            if self.engine != "fast" or self.batch_size != 1:
                raise ValueError("speculate: needs --engine fast and --batch-size 1 (batches are not done yet)")
            if not 1 <= self.num_speculative_tokens <= 15:
                raise ValueError(f"num_speculative_tokens: must be in 1..15, got {self.num_speculative_tokens}")
            if self.speculate in ("draft_model", "multimodal_draft") and not self.draft_model:
                raise ValueError(f"draft_model: --speculate {self.speculate} needs --draft-model PRESET_OR_FOLDER")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size: must be >= 1, got {self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1:
            if self.engine != "fast":
                raise ValueError("tensor_parallel_size: needs --engine fast")
            if self.quantize != "none":
                raise ValueError("tensor_parallel_size: quantized weights are not sharded yet; use one of --quantize and tensor parallelism")
            if self.speculate == "draft_model" or self.speculate == "multimodal_draft":
                raise ValueError("tensor_parallel_size: a draft model is not run in lockstep across ranks yet; use --speculate ngram or none")
        if self.matvec_kernel not in ("inductor", "triton"):
            raise ValueError(f"matvec_kernel: expected inductor or triton, got {self.matvec_kernel!r}")
        if self.matvec_kernel != "inductor":
            if self.engine != "fast":
                raise ValueError("matvec_kernel: --matvec-kernel triton needs --engine fast")
            if self.quantize != "none":
                raise ValueError("matvec_kernel: --matvec-kernel triton is for dense weights; use one of it and --quantize")
        if self.all_reduce not in ("auto", "nccl", "symm_mem", "gloo"):
            raise ValueError(f"all_reduce: expected auto, nccl, symm_mem or gloo, got {self.all_reduce!r}")
        if self.quantize != "none":
            if self.engine != "fast":
                raise ValueError("quantize: needs --engine fast")
            self.quant_options()  # validates kind, group size, kernels
        if self.input_format not in (None, "events", "png", "mp4"):
            raise ValueError(f"input_format: expected events, png or mp4, got {self.input_format!r}")
        if self.sensor_size is not None:
            self.sensor_size = (int(self.sensor_size[0]), int(self.sensor_size[1]))
        if self.window_ms is not None and not self.window_ms * 1000 >= 1:
            raise ValueError(f"window_ms: must be >= 0.001 (1 us), got {self.window_ms}")
        if self.max_windows is not None and self.max_windows < 1:
            raise ValueError(f"max_windows: must be >= 1, got {self.max_windows}")
        self.sampling  # validates temperature / top_p / top_k
        if self.weights == "random":
            if self.preset is None:
                raise ValueError("preset: random weights need --preset")
            from stagewise.models.presets import get_preset

            get_preset(self.preset)
            parse_output_len(self.output_len)

    # -- derived -----------------------------------------------------------------------------

    @property
    def torch_dtype(self):
        """``dtype`` as a ``torch.dtype``."""
        import torch

        return getattr(torch, self.dtype)

    @property
    def window_us(self) -> int | None:
        """``window_ms`` in whole microseconds, or ``None``."""
        return None if self.window_ms is None else round(self.window_ms * 1000)

    @property
    def sampling(self):
        """The decoding as :class:`stagewise.engine.sampling.SamplingParams`."""
        from stagewise.engine.sampling import SamplingParams

        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed)

    def stage_options(self):
        """The stage 1-3 options asked for explicitly (``fast_stages`` is resolved by the runner
        against what the family can serve)."""
        from stagewise.models.family import StageOptions
        from stagewise.models.vision import VisionOptions

        return StageOptions(gpu_preprocess=self.gpu_preprocess,
                            vision=VisionOptions(compile=self.vision_compile, graph=self.vision_graph, fuse=self.fuse_vision),
                            window=self.window, sensor_size=self.sensor_size)

    def quant_options(self):
        """:class:`stagewise.engine.quant.QuantOptions`, or ``None`` for ``quantize="none"``."""
        from stagewise.engine.quant import QuantOptions

        if self.quantize == "none":
            return None
        return QuantOptions(self.quantize, group_size=self.quant_group_size, cache_dir=self.quantized_cache,
                            decode_impl=self.quant_decode_kernel, prefill_impl=self.quant_prefill_kernel)

    def engine_options(self, *, max_batch: int, max_seq: int):
        """The engine's own options (:class:`~stagewise.engine.hf.HFOptions` or
        :class:`~stagewise.engine.fast.FastOptions`)."""
        from stagewise.engine.fast import FastOptions
        from stagewise.engine.hf import HFOptions

        if self.engine == "hf":
            return HFOptions(sampling=self.sampling)
        return FastOptions(max_batch=max_batch, max_seq=max_seq, kv_bucket=self.kv_bucket, check_every=self.check_every,
                           compile=None if self.compile else False, cuda_graphs=None if self.cuda_graphs else False,
                           autotune=None if self.autotune else False, matvec_kernel=self.matvec_kernel,
                           sampling=self.sampling, quantize=self.quant_options(), deterministic=True if self.deterministic else None)

    def resume_diff(self, recorded: dict) -> list[str]:
        """Fields whose value differs from a recorded ``config.json``'s ``requested`` (for ``--resume``)."""
        mine = _jsonable(asdict(self))
        return sorted(k for k, v in mine.items() if k not in RESUME_IGNORED and recorded.get(k, v) != v)

    # -- command line ---------------------------------------------------------------------------

    @staticmethod
    def add_cli_args(parser) -> None:
        """Declare every field as a command-line argument (``argparse``), grouped."""
        d = RunConfig
        g = parser.add_argument_group("model")
        g.add_argument("--preset", default=None, help="model preset: eventgpt-tiny (default), eventgpt-7b, llava-1.5-tiny, llava-1.5-7b, video-llava-tiny, video-llava-7b")
        g.add_argument("--weights", default=d.weights, help='"random" (default) or a checkpoint folder')
        g.add_argument("--tokenizer", default=None, help="LLaMA tokenizer.model, or a folder holding one (default: the preset's or the checkpoint's)")
        g.add_argument("--vision-tower", default=None, help="local CLIP folder for EventGPT checkpoints saved without tower weights")
        g.add_argument("--device", default="auto", help="auto (default: cuda when present), cpu, cuda, cuda:N")
        g.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")
        g.add_argument("--seed", type=int, default=d.seed, help="base seed: random weights, sampling (default 0)")
        e = parser.add_argument_group("engine")
        e.add_argument("--engine", default=d.engine, choices=["hf", "fast"], help="decode engine (default hf)")
        e.add_argument("--batch-size", type=int, default=d.batch_size)
        e.add_argument("--kv-bucket", type=int, default=d.kv_bucket, help="fast: KV-length granularity of the decode graphs (default 64)")
        e.add_argument("--check-every", type=int, default=d.check_every, help="fast: decode steps between host looks at EOS (default 16)")
        e.add_argument("--deterministic", action="store_true", help="fast: deterministic attention kernels also when greedy (always on when sampling)")
        e.add_argument("--no-cuda-graphs", action="store_true", help="fast: run the decode step without CUDA graphs")
        e.add_argument("--no-compile", action="store_true", help="fast: run the layer functions eagerly")
        e.add_argument("--no-autotune", action="store_true",
                       help="fast: no timing-based tuning of the compiled decode kernels (each process then compiles the same "
                            "kernels: data parallel ranks tune differently otherwise, docs/scale_out.md)")
        e.add_argument("--matvec-kernel", default=d.matvec_kernel, choices=["inductor", "triton"],
                       help="fast: what computes the dense decode projections (batch 1, a verify step): inductor (default: "
                            "compiled reductions, tuned by timing unless --no-autotune) or triton (a hand-written GEMV with "
                            "launch parameters fixed by the shape: the same kernel in every process; CUDA, compiled)")
        e.add_argument("--tensor-parallel-size", type=int, default=d.tensor_parallel_size, help="fast, under torchrun: split the decoder over T GPUs of one host (default 1)")
        e.add_argument("--all-reduce", default=d.all_reduce, choices=["auto", "nccl", "symm_mem", "gloo"], help="tensor parallel all-reduce (default auto: symmetric-memory one-shot on CUDA, gloo on CPU)")
        e.add_argument("--quantize", default=d.quantize, choices=["none", "int8", "int4", "fp8"], help="fast: weight-only quantization of the decoder's linear layers and LM head (default none)")
        e.add_argument("--quant-group-size", type=int, default=d.quant_group_size, help="int4 group size along the input features (default 128)")
        e.add_argument("--quantized-cache", default=None, help="fast: load/save the quantized weights (safetensors) in this folder")
        e.add_argument("--quant-decode-kernel", default=d.quant_decode_kernel, choices=["auto", "torch", "triton", "dequant"], help="quantized decode kernel (default auto: triton on CUDA when installed, else torch: compiled fused dequantization)")
        e.add_argument("--quant-prefill-kernel", default=d.quant_prefill_kernel, choices=["auto", "dequant", "triton", "scaled_mm"], help="quantized prefill kernel (default auto: on CUDA with triton, scaled_mm for fp8 and triton otherwise; else dequant: dequantize then cuBLAS)")
        sp = parser.add_argument_group("speculative decoding (fast engine, batch 1)")
        sp.add_argument("--speculate", default=d.speculate, choices=list(SPECULATE_METHODS), help="none (default); ngram: prompt lookup; draft_model: a text-only LLaMA draft; multimodal_draft: another registry model on its own input")
        sp.add_argument("--num-speculative-tokens", type=int, default=d.num_speculative_tokens, help="draft tokens per verify step, k (default 4)")
        sp.add_argument("--draft-model", default=None, help="draft_model: llama-68m (preset) or a LLaMA folder; multimodal_draft: a preset (eventgpt-7b) or checkpoint folder")
        sp.add_argument("--prompt-lookup-max", type=int, default=None, help="ngram: longest n-gram looked up (vLLM's default 5)")
        sp.add_argument("--prompt-lookup-min", type=int, default=None, help="ngram: shortest n-gram looked up")
        t = parser.add_argument_group("decoding")
        t.add_argument("--output-len", default=d.output_len, help="random weights: fixed:N (default fixed:46), mean:X, trace:FILE (a samples.jsonl)")
        t.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="real weights: stop at EOS or after this many tokens (default 512)")
        t.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (default); > 0 samples as generate(do_sample=True)")
        t.add_argument("--top-p", type=float, default=d.top_p, help="nucleus mass when sampling (default 1.0)")
        t.add_argument("--top-k", type=int, default=d.top_k, help="top-k when sampling (default 50, generate's; 0 = off)")
        s = parser.add_argument_group("stages 1-3")
        s.add_argument("--fast-stages", action="store_true", help="every stage 2/3 speed path the family and device can serve (recorded as applied)")
        s.add_argument("--gpu-preprocess", action="store_true", help="stage 2 (event rendering, CLIP resize/normalize) with torch on the device")
        s.add_argument("--vision-compile", action="store_true", help="stage 3: the CLIP tower through one compiled layer function")
        s.add_argument("--vision-graph", action="store_true", help="stage 3 replayed from a CUDA graph (CUDA only)")
        s.add_argument("--fuse-vision", action="store_true", help="EventGPT: pool before the projector's second linear (same function, fewer FLOPs)")
        s.add_argument("--window", action="store_true", help="EventGPT: keep the first 100 ms of longer streams instead of refusing them")
        s.add_argument("--sensor-size", default=None, help="WxH (width x height, the camera convention), e.g. 640x480: the sensor size for event files that store none (Prophesee EVT/DAT often); events are checked against it and event images take it")
        s.add_argument("--trust-pickle", action="store_true", help="load pickled .npy files with plain numpy (runs any code the pickle names); default: NumPy arrays and plain containers only")
        s.add_argument("--window-ms", type=float, default=None, help="cut each --events recording into consecutive windows [t0, t0 + MS) ms, one sample each (id <file>@<t0_us>); empty windows are skipped and counted")
        s.add_argument("--max-windows", type=int, default=None, help="with --window-ms: at most the first N non-empty windows per recording")
        r = parser.add_argument_group("measurement")
        r.add_argument("--warmup", type=int, default=d.warmup, help="warm-up batches, run and not recorded (default 1)")
        r.add_argument("--repeats", type=int, default=d.repeats, help="measure each sample this many times")
        r.add_argument("--no-ceilings", action="store_true", help="skip measuring the device's copy bandwidth and matmul rate")

    @classmethod
    def from_args(cls, args, *, preset: str | None, inputs: dict[str, str | None]) -> RunConfig:
        """Build from parsed arguments (``auto`` device/dtype resolved here).

        Raises:
            ValueError: a bad value (named); CUDA asked for where there is none.
        """
        import torch

        from stagewise.inputs.events import parse_sensor_size

        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device: CUDA requested but no CUDA device is available")
        dtype = args.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        elif dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of auto, {', '.join(sorted(DTYPES))}, got {dtype!r}")
        return cls(
            preset=preset, weights=str(args.weights), tokenizer=args.tokenizer, vision_tower=args.vision_tower,
            device=device, dtype=DTYPES.get(dtype, dtype), seed=args.seed,
            engine=args.engine, batch_size=args.batch_size, kv_bucket=args.kv_bucket, check_every=args.check_every,
            deterministic=args.deterministic,
            cuda_graphs=not args.no_cuda_graphs, compile=not args.no_compile, autotune=not args.no_autotune,
            matvec_kernel=args.matvec_kernel,
            speculate=args.speculate, num_speculative_tokens=args.num_speculative_tokens, draft_model=args.draft_model,
            prompt_lookup_max=args.prompt_lookup_max, prompt_lookup_min=args.prompt_lookup_min,
            tensor_parallel_size=args.tensor_parallel_size, all_reduce=args.all_reduce,
            quantize=args.quantize, quant_group_size=args.quant_group_size, quantized_cache=args.quantized_cache,
            quant_decode_kernel=args.quant_decode_kernel, quant_prefill_kernel=args.quant_prefill_kernel,
            output_len=args.output_len, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            gpu_preprocess=args.gpu_preprocess, fuse_vision=args.fuse_vision, vision_graph=args.vision_graph,
            vision_compile=args.vision_compile, fast_stages=args.fast_stages,
            window=args.window, sensor_size=parse_sensor_size(args.sensor_size) if args.sensor_size else None,
            trust_pickle=args.trust_pickle, window_ms=args.window_ms, max_windows=args.max_windows,
            warmup=args.warmup, repeats=args.repeats, measure_ceilings=not args.no_ceilings,
            input_format=args.input_format, inputs=inputs,
        )


def _jsonable(obj):
    """Tuples as lists (what a JSON round trip gives), recursively."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
