"""Weight-only quantization in the fast engine against its bf16 baseline, in ONE process.

For EventGPT-7B shapes (random weights, bf16 activations, batch 1, the real spliced prompt) and each of
int8 (per channel), int4 (group 128) and fp8 (e4m3, per channel):

1. the kernels are chosen by measurement: each candidate decode kernel (the compiled multiply-and-sum
   with fused dequantization, the Triton GEMV) and prefill kernel (dequantize + cuBLAS, the Triton GEMM,
   fp8 ``_scaled_mm``) is timed on layer 0's four projections (CUDA-graph replays, medians), and the
   fastest is used;
2. a fast engine with those kernels is built over the same model and measured as the bf16 one: the
   decode step (median inter-token latency), the prefill, batch 16 decode-phase tokens/s (int4 and
   bf16), one sample end to end through the runner (int4), and the weight bytes one step streams;
3. quality, honestly: with random weights only numerical agreement means anything, so the quantized
   engine is teacher-forced on the bf16 engine's greedy ids and compared position by position
   (:func:`stagewise.measure.agreement.logit_agreement`: top-1 agreement, max / mean |logit diff|, KL).

Usage (GPU): ``PYTHONPATH=. python3 benchmarks/quantization.py --events sample1.npy --tokenizer tokenizer.model --out quant.json``
Smoke test (CPU): ``PYTHONPATH=. python3 benchmarks/quantization.py --tiny``. The last line is one JSON document.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
from pathlib import Path

import torch

from stagewise.engine.base import stack_left_padded
from stagewise.engine.fast import FastEngine, FastOptions
from stagewise.engine.quant import QuantOptions, quantize_weight
from stagewise.measure.agreement import logit_agreement
from stagewise.measure.costmodel import measure_ceilings
from stagewise.measure.env import environment
from stagewise.measure.profile import format_table, kernel_table
from stagewise.measure.timing import graph_replay_times, time_ms
from stagewise.models.base import Sample
from stagewise.models.family import StageOptions
from stagewise.models.registry import build_random
from stagewise.models.vision import VisionOptions
from stagewise.preprocess.prompt import DEFAULT_QUERY
from stagewise.runner import run_batch

KINDS = ("int8", "int4", "fp8")
TARGETS = {"bf16": None, "int8": "<= 3.0", "int4": "<= 2.0", "fp8": "<= 3.0"}


def graph_ms(fn, reps: int = 50) -> float:
    """Median ms of ``fn()`` replayed from a CUDA graph (CPU: plain calls)."""
    if not torch.cuda.is_available():
        return time_ms(fn, torch.device("cpu"), 3)[0]
    return statistics.median(graph_replay_times(fn, reps)[0])


def choose_kernels(engine: FastEngine, kind: str, group: int, prompt_len: int) -> dict:
    """Time every kernel candidate of ``kind`` on layer 0's projections; the fastest decode (M = 1)
    and prefill (M = ``prompt_len``) kernels, with every timing."""
    w0 = engine.layers[0]
    dense = [w0.wqkv, w0.wo, w0.w_gate_up, w0.w_down]
    dev, dt = dense[0].device, dense[0].dtype
    out: dict = {"decode": {}, "prefill": {}}
    cands = {"decode": ["torch", "triton"], "prefill": ["dequant", "triton"] + (["scaled_mm"] if kind == "fp8" else [])}
    if dev.type != "cuda":
        cands = {"decode": ["dequant"], "prefill": ["dequant"]}
    for phase, impls in cands.items():
        m = 1 if phase == "decode" else prompt_len
        for impl in impls:
            try:
                qs = [quantize_weight(w, kind, group_size=group,
                                      decode_impl=impl if phase == "decode" else "torch",
                                      prefill_impl=impl if phase == "prefill" else "dequant") for w in dense]
                xs = [torch.randn(m, w.shape[1], device=dev, dtype=dt) for w in dense]
                fns = []
                for q, x in zip(qs, xs):
                    f = (lambda x, q=q: q.linear(x, decode=True)) if phase == "decode" else (lambda x, q=q: q.linear(x, decode=False))
                    if phase == "decode" and dev.type == "cuda":
                        f = torch.compile(f, fullgraph=True, dynamic=False)
                    fns.append((f, x))
                out[phase][impl] = sum(graph_ms(lambda f=f, x=x: f(x)) for f, x in fns)
            except Exception as e:  # noqa: BLE001 - a candidate may not run on this GPU: recorded, skipped
                out[phase][impl] = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:160]}"
    for phase in ("decode", "prefill"):
        ok = {k: v for k, v in out[phase].items() if isinstance(v, float)}
        out[f"{phase}_impl"] = min(ok, key=ok.get) if ok else ("torch" if phase == "decode" else "dequant")
    return out


def measure(engine: FastEngine, embeds, lengths, n_new: int, R: int, device) -> dict:
    """Prefill ms and the median decode step of ``engine`` on one prompt."""
    res = {"prefill_ms": time_ms(lambda: engine.prefill(embeds, lengths), device, R)[0]}
    steps = []
    for _ in range(2):
        steps += engine.decode(engine.prefill(embeds, lengths), n_new, None).step_ms
    res["median_itl_ms"] = statistics.median(steps)
    res["weight_bytes_per_step"] = engine.weight_bytes_per_step
    return res


def b16_decode_tok_s(engine: FastEngine, row, n_new: int, batch: int) -> float:
    eb, lb = stack_left_padded([row] * batch)
    engine.decode(engine.prefill(eb, lb), n_new, None)
    out = engine.decode(engine.prefill(eb, lb), n_new, None)
    return batch * (n_new - 1) / (sum(out.step_ms) / 1e3)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=Path, default=None)
    ap.add_argument("--tokenizer", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=46)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--tiny", action="store_true", help="eventgpt-tiny on CPU (smoke test)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="also profile STEPS decode steps (graph replays) of every engine: a per-kernel table of the step")
    ap.add_argument("--no-e2e", action="store_true", help="skip the int4 end-to-end sample and the batch-16 figures")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    ceilings = measure_ceilings(device)
    model = build_random("eventgpt-tiny" if args.tiny else "eventgpt-7b", device=device, dtype=dtype, tokenizer=args.tokenizer)
    model.configure(model.applicable(StageOptions(gpu_preprocess=True, vision=VisionOptions(compile=True, graph=True, fuse=True))))
    if args.events is not None and args.events.is_file():
        sample = Sample(args.events.stem, DEFAULT_QUERY, events_path=args.events)
    else:
        from stagewise.inputs.simulate import moving_edge_events

        sample = Sample("sim000", DEFAULT_QUERY, events=moving_edge_events(seed=0))
    prep = model.preprocess(model.load(sample), sample.query)
    row = model.build_inputs_embeds(prep, model.encode_vision(prep))
    S, n_new, R = row.shape[0], args.new_tokens, args.repeats
    embeds, lengths = stack_left_padded([row])
    max_seq = (S + n_new + 64 + 63) // 64 * 64
    group = args.group_size if not args.tiny else 32

    def build(quant: QuantOptions | None, batch: int) -> FastEngine:
        eng = FastEngine(model.lm, FastOptions(max_batch=batch, max_seq=max_seq, quantize=quant))
        eng.warmup(S, n_new, batch_sizes=[1, batch] if batch > 1 else [1])
        return eng

    def profile(eng: FastEngine) -> dict:
        P = args.profile
        return kernel_table(lambda pre: eng.decode(pre, P + 1, None), P, device, setup=lambda: eng.prefill(embeds, lengths))

    results: dict = {}
    base = build(None, 1 if args.no_e2e else args.batch)
    results["bf16"] = measure(base, embeds, lengths, n_new, R, device)
    if not args.no_e2e:
        results["bf16"]["b16_decode_throughput_tok_s"] = b16_decode_tok_s(base, row, n_new, args.batch)
    if args.profile:
        results["bf16"]["profile"] = profile(base)
    results["bf16"]["engine_warmup_ms"] = base.warmup_ms
    ref_ids = base.decode(base.prefill(embeds, lengths), n_new, None).tokens.to(device)  # [1, n]
    forced = ref_ids[:, :-1]
    ref_logits = base.score(base.prefill(embeds, lengths), forced)[0].float().cpu()  # [n, V]
    kernels = {kind: choose_kernels(base, kind, group, S) for kind in args.kinds.split(",")}
    del base
    gc.collect()
    torch.cuda.empty_cache() if device.type == "cuda" else None

    for kind in args.kinds.split(","):
        k = kernels[kind]
        q = QuantOptions(kind, group_size=group, decode_impl=k["decode_impl"], prefill_impl=k["prefill_impl"])
        batch = args.batch if kind == "int4" and not args.no_e2e else 1
        try:
            eng = build(q, batch)
        except Exception as e:  # noqa: BLE001 - e.g. fp8 on a GPU without it: recorded
            results[kind] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"}
            continue
        r = measure(eng, embeds, lengths, n_new, R, device)
        r["engine_warmup_ms"] = eng.warmup_ms
        r["kernels"] = k
        r["quantization"] = eng.quant_info
        got = eng.score(eng.prefill(embeds, lengths), forced)[0].float().cpu()
        r["agreement_vs_bf16"] = logit_agreement(ref_logits, got)
        if args.profile:
            r["profile"] = profile(eng)
        if kind == "int4" and not args.no_e2e:
            r["b16_decode_throughput_tok_s"] = b16_decode_tok_s(eng, row, n_new, args.batch)
            kw = dict(random_weights=True, max_new_tokens=n_new, seeds=[0], engine_name="fast")
            run_batch(model, eng, [sample], [n_new], **kw)
            recs = [run_batch(model, eng, [sample], [n_new], **kw).records[0] for _ in range(R)]
            r["e2el_ms"] = statistics.median(x.e2el_ms for x in recs)
            r["stage_ms"] = {s: statistics.median(getattr(x, f"{s}_ms") for x in recs) for s in ("load", "preprocess", "vision", "prefill", "decode")}
        results[kind] = r
        del eng
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None

    bw = ceilings.get("copy_bw_bytes_s")
    env = environment(device)
    doc = {"device": env.get("gpu", "cpu"), "env": env, "ceilings": ceilings, "n_prefill_tokens": S, "n_output_tokens": n_new,
           "group_size": group, "results": results,
           "note": "random weights: only numerical agreement with the bf16 engine means anything, not the text"}
    print(f"\n{model.preset} shapes, {doc['device']}, prefill {S} tokens, {n_new} new tokens, medians")
    print(f"{'variant':8s} {'decode ms/token':>16s} {'target':>8s} {'floor':>7s} {'MBU':>6s} {'prefill ms':>11s} {'x bf16':>7s} "
          f"{'b16 tok/s':>10s} {'top-1 agr.':>10s} {'max|dlogit|':>11s} {'KL':>9s}  kernels")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:8s} failed: {r['error']}")
            continue
        floor = 1e3 * r["weight_bytes_per_step"] / bw if bw else None
        mbu = f"{floor / r['median_itl_ms']:6.0%}" if floor else "   -"
        a = r.get("agreement_vs_bf16", {})
        kern = f"{r['kernels']['decode_impl']}/{r['kernels']['prefill_impl']}" if "kernels" in r else "cuBLAS"
        b16 = f"{r['b16_decode_throughput_tok_s']:10.0f}" if "b16_decode_throughput_tok_s" in r else f"{'':>10s}"
        print(f"{name:8s} {r['median_itl_ms']:16.3f} {TARGETS[name] or '':>8s} {'' if floor is None else f'{floor:7.3f}'} {mbu} "
              f"{r['prefill_ms']:11.2f} {r['prefill_ms'] / results['bf16']['prefill_ms']:7.2f} {b16} "
              f"{a.get('top1_agreement', float('nan')):10.3f} {a.get('max_abs_logit_diff', float('nan')):11.4f} {a.get('mean_kl', float('nan')):9.2e}  {kern}")
    for name, r in results.items():
        if "profile" in r:
            t = r["profile"]
            mm = t["by_class"].get("matmul")
            bw_mm = f"; matmul kernels stream {r['weight_bytes_per_step'] / 1e9:.2f} GB/step at {r['weight_bytes_per_step'] / (mm * 1e-6) / 1e12:.2f} TB/s" if mm else ""
            print("\n" + format_table(t, f"profile of the {name} decode step (graph replay, {args.profile} steps)") + bw_mm)
    if "int4" in results and "e2el_ms" in results["int4"]:
        print(f"one sample end to end, int4, {n_new} tokens: {results['int4']['e2el_ms']:.1f} ms (target <= 130)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc))
    return doc


if __name__ == "__main__":
    main()
