"""The engine table: the seeds' method (``hf``) and stagewise's (``fast``), in ONE process on one model.

Rows (EventGPT-7B shapes, random weights, bf16, batch 1 unless said, medians of --repeats):

- raw events (.npy, in page cache) -> CLIP pixel tensor on the device   (stages 1 + 2)
- vision, 5 frames incl. projector / adaptor / pooling                   (stage 3)
- prefill of the real spliced prompt                                     (stage 4)
- decode step: the median inter-token latency (``median_itl_ms``)       (stage 5)
- one sample end to end (46 new tokens), through the runner's own ``run_batch``
- batch 16: output tokens/s of prefill + decode, and of the decode phase alone
- compile + warm-up of the engine
- parity: teacher-forced next-token agreement of fast vs one HF forward, max |logit diff|

``hf`` is the seeds' method: numpy + ``transformers`` CLIP processor on the CPU, one tower call
per frame, ``transformers``' forward with a dynamic cache. ``fast`` is stagewise's: every stage
2/3 speed path (``StageOptions``) and the static-cache CUDA-graph engine. Timing with the
package's own timer (:func:`stagewise.measure.timing.time_ms`), floors from its cost model,
environment from :func:`stagewise.measure.env.environment`; names in the project's vocabulary
(``docs/metrics.md``).

Usage (GPU): ``python3 benchmarks/engine.py --events eventgpt_sample1.npy --tokenizer tokenizer.model --out engine.json``
Smoke test (CPU): ``python3 benchmarks/engine.py --tiny``. The last printed line is one JSON document.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from stagewise import STAGES
from stagewise.engine import make_engine
from stagewise.engine.base import stack_left_padded
from stagewise.engine.fast import FastOptions
from stagewise.measure.costmodel import (
    kv_cache_bytes,
    llama_decode_step_bytes,
    llama_prefill_flops,
    measure_ceilings,
)
from stagewise.measure.env import environment
from stagewise.measure.timing import device_sync, time_ms
from stagewise.models.base import Sample
from stagewise.models.family import StageOptions
from stagewise.models.registry import build_random
from stagewise.models.vision import VisionOptions
from stagewise.preprocess.prompt import DEFAULT_QUERY
from stagewise.runner import run_batch

ROWS = {
    "median_itl_ms": ("decode step (ms/token)", "<= 5.0"),
    "prefill_ms": ("prefill (ms)", "<= 14"),
    "vision_ms": ("vision, 5 frames (ms)", "<= 4"),
    "events_to_pixels_ms": ("raw events -> pixels (ms)", "<= 5"),
    "e2el_ms": ("one sample end to end (ms)", "<= 250"),
    "b16_output_throughput_tok_s": ("batch 16 output tok/s incl. prefill", ">= 2,000"),
    "engine_warmup_ms": ("compile + warm-up (ms)", "<= 60,000"),
}

STAGE_OPTIONS = {
    "hf": StageOptions(vision=VisionOptions(per_frame=True)),  # the seeds' loop: one tower call per frame
    "fast": StageOptions(gpu_preprocess=True, vision=VisionOptions(compile=True, graph=True, fuse=True)),
}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=Path, default=None, help="an EventGPT .npy (default: the built-in scene)")
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
    if device.type == "cpu":
        STAGE_OPTIONS["fast"] = model.applicable(STAGE_OPTIONS["fast"])
    if args.events is not None and args.events.is_file():
        sample = Sample(args.events.stem, DEFAULT_QUERY, events_path=args.events)
        args.events.read_bytes()  # into the page cache
    else:
        from stagewise.inputs.simulate import moving_edge_events

        sample = Sample("sim000", DEFAULT_QUERY, events=moving_edge_events(seed=0))
    n_new, R = args.new_tokens, args.repeats
    res: dict = {"hf": {}, "fast": {}}

    # Stages 1-3 per mode, on the same sample.
    preps, visions = {}, {}
    for mode in ("hf", "fast"):
        model.configure(STAGE_OPTIONS[mode])
        res[mode]["events_to_pixels_ms"], _, preps[mode] = time_ms(lambda: model.preprocess(model.load(sample), sample.query), device, R)
        res[mode]["vision_ms"], _, visions[mode] = time_ms(lambda: model.encode_vision(preps[mode]), device, R)
    va, vb = visions["hf"].float(), visions["fast"].float()
    vision_rel_diff = ((va - vb).norm() / va.norm()).item()
    pix_diff = (preps["hf"].pixel_values.float() - preps["fast"].pixel_values.float()).abs().max().item()

    # Engines over the same LM weights.
    model.configure(STAGE_OPTIONS["hf"])
    row = model.build_inputs_embeds(preps["hf"], model.encode_vision(preps["hf"]))
    S = row.shape[0]
    max_seq = (S + n_new + 64 + 63) // 64 * 64
    fast = make_engine("fast", model.lm, FastOptions(max_batch=args.batch, max_seq=max_seq))
    fast.warmup(S, n_new, batch_sizes=[1, args.batch])
    res["fast"]["engine_warmup_ms"] = fast.warmup_ms
    hf = make_engine("hf", model.lm)
    embeds1, len1 = stack_left_padded([row])
    t0 = time.perf_counter()
    hf.decode(hf.prefill(embeds1, len1), 3, None)
    device_sync(device)
    res["hf"]["engine_warmup_ms"] = (time.perf_counter() - t0) * 1e3

    cfg = model.lm.config
    for name, eng in (("hf", hf), ("fast", fast)):
        res[name]["prefill_ms"] = time_ms(lambda: eng.prefill(embeds1, len1), device, R)[0]
        steps = []
        for _ in range(max(2, R // 2)):
            steps += eng.decode(eng.prefill(embeds1, len1), n_new, None).step_ms
        res[name]["median_itl_ms"] = statistics.median(steps)
        res[name]["decode_throughput_tok_s"] = 1e3 / res[name]["median_itl_ms"]
        eb, lb = stack_left_padded([row] * args.batch)

        def batch_run():
            return eng.decode(eng.prefill(eb, lb), n_new, None)

        ms, _, out = time_ms(batch_run, device, max(2, R // 2))
        res[name]["b16_ms"] = ms
        res[name]["b16_output_throughput_tok_s"] = args.batch * n_new / (ms / 1e3)  # prefill included
        res[name]["b16_decode_throughput_tok_s"] = args.batch * (n_new - 1) / (sum(out.step_ms) / 1e3)  # decode phase

    # One sample end to end through the runner (stage clock, the code `stagewise run` runs).
    for name, eng in (("hf", hf), ("fast", fast)):
        model.configure(STAGE_OPTIONS[name])
        kw = dict(random_weights=True, max_new_tokens=n_new, seeds=[0], engine_name=name)
        run_batch(model, eng, [sample], [n_new], **kw)
        recs = [run_batch(model, eng, [sample], [n_new], **kw).records[0] for _ in range(R)]
        res[name]["e2el_ms"] = statistics.median(r.e2el_ms for r in recs)
        res[name]["ttft_ms"] = statistics.median(r.ttft_ms for r in recs)
        res[name]["stage_ms"] = {s: statistics.median(getattr(r, f"{s}_ms") for r in recs) for s in STAGES}
        res[name]["n_prefill_tokens"] = recs[0].n_prefill_tokens

    # Parity: teacher-forced next-token agreement of fast vs one HF forward over the same tokens.
    hf_tokens = hf.decode(hf.prefill(embeds1, len1), n_new, None).tokens.to(device)  # [1, n]
    with torch.inference_mode():
        full = torch.cat([embeds1, model.lm.get_input_embeddings()(hf_tokens[:, :-1])], dim=1)
        ref = model.lm(inputs_embeds=full, logits_to_keep=n_new).logits.float()  # [1, n, V]
    got = fast.score(fast.prefill(embeds1, len1), hf_tokens[:, :-1])  # [1, n, V]
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    hf_self = (ref.argmax(-1) == hf_tokens).float().mean().item()  # HF step by step vs HF one forward
    parity = {"teacher_forced_agreement": agree, "hf_self_agreement": hf_self, "positions": n_new,
              "max_abs_logit_diff": (ref - got).abs().max().item(), "logit_std": ref.std().item()}

    # Seeded sampling on the device (temperature 0.4, the EventGPT authors' script): the same seed
    # gives the same ids twice, another seed other ids (a fast engine over the same weights).
    from stagewise.engine.sampling import SamplingParams

    sampler = make_engine("fast", model.lm, FastOptions(max_seq=max_seq, sampling=SamplingParams(temperature=0.4, seed=7)))
    sampler.warmup(S, n_new, batch_sizes=[1])
    draws = [sampler.decode(sampler.prefill(embeds1, len1, seeds=[s]), n_new, None).tokens[0].tolist() for s in (7, 7, 8)]
    sampling = {"temperature": 0.4, "top_k": 50, "same_seed_same_ids": draws[0] == draws[1],
                "other_seed_other_ids": draws[0] != draws[2], "ids_seed7": draws[0]}
    del sampler

    floors = {}
    if ceilings:
        bw, fl = ceilings["copy_bw_bytes_s"], ceilings["bf16_flops_s"]
        floors = {"median_itl_ms": 1e3 * llama_decode_step_bytes(cfg, S + n_new // 2) / bw,
                  "prefill_ms": 1e3 * llama_prefill_flops(cfg, S) / fl,
                  "vision_ms": 1e3 * model.vision_flops(5) / fl}
    env = environment(device)
    doc = {"device": env.get("gpu", "cpu"), "env": env, "n_prefill_tokens": S, "n_output_tokens": n_new, "batch": args.batch,
           "ceilings": ceilings, "floors_ms": floors, "kv_cache_bytes": kv_cache_bytes(cfg, S + n_new - 1),
           "weight_bytes_per_step": fast.weight_bytes_per_step, "hf": res["hf"], "fast": res["fast"],
           "speedup_e2el": res["hf"]["e2el_ms"] / res["fast"]["e2el_ms"], "parity": parity,
           "stage2_pixels_max_abs_diff": pix_diff, "vision_fused_rel_diff": vision_rel_diff, "sampling": sampling}
    print(f"\n{model.preset} shapes, {doc['device']}, prefill {S} tokens, {n_new} new tokens, medians of {R}")
    print(f"{'figure':38s} {'target':>20s} {'hf':>12s} {'fast':>12s} {'floor':>10s}")
    for key, (label, target) in ROWS.items():
        fl = floors.get(key)
        print(f"{label:38s} {target:>20s} {res['hf'][key]:12.2f} {res['fast'][key]:12.2f} {'' if fl is None else f'{fl:10.2f}'}")
    print(f"{'speed-up, one sample (hf / fast)':38s} {'>= 3.3x':>20s} {doc['speedup_e2el']:25.2f}x")
    print(f"{'batch 16, decode phase tok/s':38s} {'':>20s} {res['hf']['b16_decode_throughput_tok_s']:12.2f} {res['fast']['b16_decode_throughput_tok_s']:12.2f}")
    print(f"parity: teacher-forced agreement {agree:.2%} over {n_new} positions, max |logit diff| {parity['max_abs_logit_diff']:.4f} "
          f"(logit std {parity['logit_std']:.3f}); HF vs itself {hf_self:.2%}")
    print(f"stage 2 pixels fast vs hf: max |diff| {pix_diff:.3g}; vision fast vs hf: rel. L2 diff {vision_rel_diff:.3g}")
    print(f"seeded sampling on the device (T 0.4, top-k 50): same seed twice -> same ids: {sampling['same_seed_same_ids']}; "
          f"another seed -> other ids: {sampling['other_seed_other_ids']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc))
    return doc


if __name__ == "__main__":
    main()
