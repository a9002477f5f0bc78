"""Issue 4's target table, both engines measured in ONE process on the same model.

Rows (EventGPT-7B shapes, random weights, bf16, batch 1 unless said, medians of --repeats):

- raw events (.npy, in page cache) -> CLIP pixel tensor on the GPU  (stage 1 + 2)
- vision, 5 frames incl. projector / adaptor / pooling              (stage 3)
- prefill of the real spliced prompt                                (stage 4)
- decode step (median ms per token)                                 (stage 5)
- one sample end to end (46 new tokens), through the runner's own ``run_batch``
- batch 16, output tokens/s (prefill + decode of 16 prompts)
- compile + warm-up
- parity: teacher-forced next-token agreement of fast vs HF and the max |logit diff|

"hf" is the seeds' method: numpy + ``transformers`` CLIP processor on the CPU, one vision-tower
call per frame, ``transformers``' forward with a dynamic cache. "fast" is stagewise's: stage 2
with torch on the GPU, all frames in one tower call with the pool-before-linear vision path, and
the static-cache CUDA-graph engine.

Usage (GPU): ``python benchmarks/engine.py --events eventgpt_sample1.npy --tokenizer tokenizer.model --out docs/results/engine_h100.json``
Smoke test (CPU): ``python benchmarks/engine.py --tiny``
The last printed line is one JSON document.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stagewise.measure.costmodel import kv_cache_bytes, llama_decode_step_bytes, llama_prefill_flops, measure_ceilings  # noqa: E402
from stagewise.engine.base import stack_left_padded  # noqa: E402
from stagewise.engine.fast import FastEngine  # noqa: E402
from stagewise.engine.hf import HFEngine  # noqa: E402
from stagewise.measure.env import environment  # noqa: E402
from stagewise.models.base import Sample  # noqa: E402
from stagewise.models.eventgpt import build_random  # noqa: E402
from stagewise.preprocess.prompt import DEFAULT_QUERY  # noqa: E402
from stagewise.runner import run_batch  # noqa: E402
from stagewise.measure.timing import device_sync  # noqa: E402

TARGETS = {
    "decode_step_ms": ("decode step (ms/token)", "<= 5.0"),
    "prefill_ms": ("prefill (ms)", "<= 14"),
    "vision_ms": ("vision, 5 frames (ms)", "<= 4"),
    "events_to_pixels_ms": ("raw events -> pixels on GPU (ms)", "<= 5"),
    "e2e_ms": ("one sample end to end (ms)", "<= 250, >= 3.3x vs hf"),
    "b16_output_tok_s": ("batch 16 output tok/s, incl. prefill", ">= 2,000"),
    "warmup_s": ("compile + warm-up (s)", "<= 60"),
}


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """Median wall ms of ``fn()`` with a device sync on both sides; returns (ms, last result)."""
    out, times = None, []
    for _ in range(repeats):
        device_sync(device)
        t0 = time.perf_counter()
        out = fn()
        device_sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return median(times), out


def configure(model, mode: str) -> None:
    """``hf``: the seeds' method; ``fast``: stagewise's stage 2/3 paths."""
    fast = mode == "fast"
    model.gpu_preprocess = fast
    model.fuse_vision = fast
    model.vision_batch = fast
    model.vision_graph = fast
    model.vision_compile = fast


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=Path, default=Path(".carry/data/eventgpt_sample1.npy"))
    ap.add_argument("--tokenizer", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=46)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tiny", action="store_true", help="eventgpt-tiny on CPU (smoke test)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    ceilings = measure_ceilings(device)
    model = build_random("eventgpt-tiny" if args.tiny else "eventgpt-7b", device=device, dtype=dtype, tokenizer=args.tokenizer)
    if args.events.is_file():
        sample = Sample(args.events.stem, DEFAULT_QUERY, events_path=args.events)
        args.events.read_bytes()  # into the page cache
    else:
        from stagewise.inputs.simulate import moving_edge_events

        sample = Sample("sim000", DEFAULT_QUERY, events=moving_edge_events(seed=0))
    n_new, R = args.new_tokens, args.repeats
    res: dict = {"hf": {}, "fast": {}}

    # Stages 1-3 per mode (model-side switches), on the same sample.
    preps = {}
    for mode in ("hf", "fast"):
        configure(model, mode)
        model.preprocess(model.load(sample), sample.query)  # warm (processor caches, kernels)
        ms, prep = timed(lambda: model.preprocess(model.load(sample), sample.query), device, R)
        res[mode]["events_to_pixels_ms"] = ms
        preps[mode] = prep
        model.encode_vision(prep)
        ms, vis = timed(lambda: model.encode_vision(prep), device, R)
        res[mode]["vision_ms"] = ms
        res[mode]["_vision"] = vis
    va, vb = res["hf"].pop("_vision").float(), res["fast"].pop("_vision").float()
    vision_rel_diff = ((va - vb).norm() / va.norm()).item()
    pix_diff = (preps["hf"].pixel_values.float() - preps["fast"].pixel_values.float()).abs().max().item()

    # Engines over the same LM weights.
    configure(model, "hf")
    row = model.build_inputs_embeds(preps["hf"], model.encode_vision(preps["hf"]))
    S = row.shape[0]
    max_seq = (S + n_new + 64 + 63) // 64 * 64
    t0 = time.perf_counter()
    fast = FastEngine(model.lm, max_batch=args.batch, max_seq=max_seq)
    fast.warmup(S, n_new, batch_sizes=[1, args.batch])
    res["fast"]["warmup_s"] = (time.perf_counter() - t0)
    hf = HFEngine(model.lm)
    t0 = time.perf_counter()
    embeds1, mask1 = stack_left_padded([row])
    hf.decode(hf.prefill(embeds1, mask1), 3, None)
    device_sync(device)
    res["hf"]["warmup_s"] = time.perf_counter() - t0

    cfg = model.lm.config
    for name, eng in (("hf", hf), ("fast", fast)):
        ms, _ = timed(lambda: eng.prefill(embeds1, mask1), device, R)
        res[name]["prefill_ms"] = ms
        steps = []
        for _ in range(max(2, R // 2)):
            out = eng.decode(eng.prefill(embeds1, mask1), n_new, None)
            steps += out.step_ms
        res[name]["decode_step_ms"] = median(steps)
        res[name]["decode_tok_s"] = 1e3 / res[name]["decode_step_ms"]
        # batch B: 16 copies of the prompt
        eb, mb = stack_left_padded([row] * args.batch)

        def batch_run():
            return eng.decode(eng.prefill(eb, mb), n_new, None)

        batch_run()
        ms, _ = timed(batch_run, device, max(2, R // 2))
        res[name]["b16_ms"] = ms
        res[name]["b16_output_tok_s"] = args.batch * n_new / (ms / 1e3)  # prefill included
        out = batch_run()
        res[name]["b16_decode_tok_s"] = args.batch * (n_new - 1) / (sum(out.step_ms) / 1e3)  # decode phase

    # One sample end to end through the runner (stage clock, same code as `stagewise run`).
    for name, eng in (("hf", hf), ("fast", fast)):
        configure(model, name)
        run_batch(model, eng, [sample], [n_new], random_weights=True, max_new_tokens=n_new, engine_name=name)
        recs = [run_batch(model, eng, [sample], [n_new], random_weights=True, max_new_tokens=n_new, engine_name=name).records[0] for _ in range(R)]
        res[name]["e2e_ms"] = median([r.e2e_ms for r in recs])
        res[name]["e2e_stage_ms"] = {s: median([getattr(r, f"{s}_ms") for r in recs]) for s in ("load", "preprocess", "vision", "prefill", "decode")}

    # Parity: teacher-forced next-token agreement of fast vs one HF forward over the same tokens.
    configure(model, "hf")
    hf_tokens = hf.decode(hf.prefill(embeds1, mask1), n_new, None).tokens.to(device)  # [1, n]
    with torch.inference_mode():
        full = torch.cat([embeds1, model.lm.get_input_embeddings()(hf_tokens[:, :-1])], dim=1)
        ref = model.lm(inputs_embeds=full, logits_to_keep=n_new).logits.float()  # [1, n, V]
    got = fast.score(fast.prefill(embeds1, mask1), hf_tokens[:, :-1])  # [1, n, V]
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    hf_self = (ref.argmax(-1) == hf_tokens).float().mean().item()  # HF step-by-step vs HF one forward
    parity = {"teacher_forced_agreement": agree, "hf_self_agreement": hf_self, "positions": n_new, "max_abs_logit_diff": (ref - got).abs().max().item(), "logit_std": ref.std().item()}

    floors = {}
    if ceilings:
        bw, fl = ceilings["copy_bw_bytes_s"], ceilings["bf16_flops_s"]
        floors = {
            "decode_step_ms": 1e3 * llama_decode_step_bytes(cfg, S + n_new // 2) / bw,
            "prefill_ms": 1e3 * llama_prefill_flops(cfg, S) / fl,
            "vision_ms": 1e3 * model.vision_flops(5) / fl,
        }
    doc = {
        "device": environment(device).get("gpu", "cpu"),
        "env": environment(device),
        "prompt_tokens": S,
        "new_tokens": n_new,
        "batch": args.batch,
        "ceilings": ceilings,
        "floors_ms": floors,
        "kv_cache_bytes": kv_cache_bytes(cfg, S + n_new - 1),
        "hf": res["hf"],
        "fast": res["fast"],
        "speedup_e2e": res["hf"]["e2e_ms"] / res["fast"]["e2e_ms"],
        "parity": parity,
        "stage2_pixels_max_abs_diff": pix_diff,
        "vision_fused_rel_diff": vision_rel_diff,
    }
    print(f"\n{model.preset} shapes, {doc['device']}, prompt {S} tokens, {n_new} new tokens, medians of {R}")
    print(f"{'figure':36s} {'target':>22s} {'hf':>12s} {'fast':>12s} {'floor':>10s}")
    for key, (label, target) in TARGETS.items():
        fl = floors.get(key)
        print(f"{label:36s} {target:>22s} {res['hf'][key]:12.2f} {res['fast'][key]:12.2f} {'' if fl is None else f'{fl:10.2f}'}")
    print(f"{'speed-up, one sample e2e (hf/fast)':36s} {'>= 3.3x':>22s} {doc['speedup_e2e']:25.2f}x")
    print(f"{'batch 16, decode phase tok/s':36s} {'':>22s} {res['hf']['b16_decode_tok_s']:12.2f} {res['fast']['b16_decode_tok_s']:12.2f}")
    print(f"parity: teacher-forced agreement {agree:.2%} over {n_new} positions, max |logit diff| {parity['max_abs_logit_diff']:.4f} (logit std {parity['logit_std']:.3f}); HF vs itself {hf_self:.2%}")
    print(f"stage 2 pixels fast vs hf: max |diff| {pix_diff:.3g}; vision fused vs unfused: rel. L2 diff {vision_rel_diff:.3g}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc))
    return doc


if __name__ == "__main__":
    main()
