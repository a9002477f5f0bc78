"""Where a speculative verify step's time goes, against a decode step (issue 10's misses).

EventGPT-7B's LM shapes (LLaMA-7B, vocabulary 32003), RANDOM weights, bf16, batch 1, a 641-token
prompt of random embeddings. One fast engine, warmed up for decode and for verify steps of
``k + 1`` tokens; then :func:`stagewise.measure.profile.kernel_table` over ``--steps`` graph
replays of (1) the decode step and (2) the verify step (``FastEngine.extend`` of ``k + 1`` tokens
at the middle of a 46-token generation) for each ``k``. Per table: device time per step by kernel
and by class, the busy fraction, and the bandwidth at which the weight-streaming kernels read the
13.2 GB of weights (the decode step's compiled norm + matvec reductions; the verify step's cuBLAS
GEMMs).

Usage (GPU): ``PYTHONPATH=. python3 benchmarks/verify_profile.py --out verify_profile.json``
Smoke test (CPU, tiny shapes): ``PYTHONPATH=. python3 benchmarks/verify_profile.py --tiny``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stagewise.engine.fast import FastEngine, FastOptions
from stagewise.measure.env import environment
from stagewise.measure.profile import format_table, kernel_table

LLAMA_7B = dict(vocab_size=32003, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
# kernel classes that stream the weights: the decode step's compiled reductions, the verify step's GEMMs
STREAMING = ("matmul", "fused elementwise/reduction (compiled)")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="4,8", help="speculative tokens k: verify steps of k + 1 tokens")
    ap.add_argument("--steps", type=int, default=20, help="replays per profile")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (a test of the script)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    kw, S, new = (TINY, 20, 8) if args.tiny else (LLAMA_7B, 641, 46)
    ks = [int(k) for k in args.ks.split(",")]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(dev):
        lm = LlamaForCausalLM._from_config(LlamaConfig(**kw, max_position_embeddings=2048), dtype=dtype).eval()
    embeds = 0.02 * torch.randn(1, S, kw["hidden_size"], device=dev, dtype=dtype)
    eng = FastEngine(lm, FastOptions(max_seq=-(-(S + new + 16) // 64) * 64))
    eng.warmup(S, new, batch_sizes=[1])
    eng.warmup_extend(S, new, [k + 1 for k in ks])
    warm_s = time.perf_counter() - t0
    P = args.steps
    res: dict = {"device": environment(dev).get("gpu", "cpu"), "env": environment(dev), "prompt_len": S, "warmup_s": warm_s,
                 "weight_bytes_per_step": eng.weight_bytes_per_step, "steps": P}
    res["decode"] = kernel_table(lambda pre: eng.decode(pre, P + 1, None), P, dev, setup=lambda: eng.prefill(embeds, [S]))

    def at_middle():
        eng.prefill(embeds, [S])
        eng.advance(new // 2)  # (stale K/V there: timing only, as benchmarks/speculative.py)

    res["verify"] = {}
    for k in ks:
        tokens = torch.zeros(1, k + 1, dtype=torch.long, device=dev)
        res["verify"][k] = kernel_table(lambda _, t=tokens: [eng.extend(t) for _ in range(P)], P, dev, setup=at_middle)

    def streaming(t: dict) -> str:
        us = sum(t["by_class"].get(c, 0.0) for c in STREAMING)
        return f"weight-streaming kernels {us:.0f} us/step = {eng.weight_bytes_per_step / (us * 1e-6) / 1e12:.2f} TB/s" if us else "no kernels"

    print(f"\nverify-step profile, {res['device']}, prompt {S} tokens, {P} replays each; warm-up {warm_s:.0f} s")
    print(format_table(res["decode"], "decode step (1 token)") + "\n    " + streaming(res["decode"]))
    for k, t in res["verify"].items():
        print(format_table(t, f"verify step k={k} ({k + 1} tokens)") + "\n    " + streaming(t))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2, default=str))
    return res


if __name__ == "__main__":
    main()
