"""Is the fast engine's decoding reproducible run to run on this GPU? Greedy and seeded sampling,
the same prompt decoded three times by one engine, for engine variants (default; SDPA restricted
to one backend; CUDA graphs off; compile off; ``FastOptions.deterministic`` forced off and on —
by default it is on when sampling), on a small LLaMA (hidden 512, 4 layers, vocabulary
32001) and, with ``--7b``, on EventGPT-7B's LM shapes. Prints per variant whether the three runs gave
the same ids and the same logits bit for bit, and first whether the building blocks (``transformers``'
forward, SDPA for prefill and decode, a GEMM) repeat their results bit for bit on this GPU. With
``--7b`` only the default variant runs both modes, then ``deterministic=True`` greedy and
``deterministic=False`` sampling (each mode with the non-default setting); every row also gives the
median decode step, so the setting's cost can be read off.

Usage (GPU): ``PYTHONPATH=. python3 benchmarks/determinism.py [--7b]``
"""

from __future__ import annotations

import argparse
import json
import statistics
from contextlib import nullcontext

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stagewise.engine.fast import FastEngine, FastOptions
from stagewise.engine.sampling import SamplingParams


def backend(name: str | None):
    if name is None:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([{"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                         "cudnn": SDPBackend.CUDNN_ATTENTION}[name]])


def same_thrice(fn) -> dict:
    """Call ``fn`` three times: are the results equal bit for bit, and by how much do they differ."""
    a, b, c = fn(), fn(), fn()
    return {"same": bool(torch.equal(a, b) and torch.equal(a, c)), "max_diff": float(torch.maximum((a - b).abs().max(), (a - c).abs().max()))}


@torch.no_grad()
def kernel_checks(lm, embeds: torch.Tensor) -> dict:
    """The building blocks, each run three times on the same inputs (eager, default backends):
    ``transformers``' forward over the prompt (logits of its last position), SDPA over the prompt
    (causal) and over one decode query against a masked static cache, and the MLP's largest GEMM."""
    S, H = embeds.shape[1], lm.config.hidden_size
    nh = lm.config.num_attention_heads
    g = torch.Generator(device=embeds.device).manual_seed(1)
    q, k, v = (torch.randn(1, nh, S, H // nh, device=embeds.device, dtype=embeds.dtype, generator=g) for _ in range(3))
    mask = torch.zeros(1, 1, 1, S, device=embeds.device, dtype=embeds.dtype)
    mask[..., S - 7:] = float("-inf")
    x = torch.randn(S, H, device=embeds.device, dtype=embeds.dtype, generator=g)
    w = lm.model.layers[0].mlp.up_proj.weight
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return {"hf_forward_last_logits": same_thrice(lambda: lm(inputs_embeds=embeds).logits[0, -1].float()),
            "sdpa_prefill_causal": same_thrice(lambda: sdpa(q, k, v, is_causal=True)),
            "sdpa_decode_masked": same_thrice(lambda: sdpa(q[:, :, -1:], k, v, attn_mask=mask)),
            "gemm_prompt_x_up_proj": same_thrice(lambda: x @ w.t())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--7b", dest="big", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=46)
    ap.add_argument("--modes", default="greedy,sampling")
    ap.add_argument("--sdpa-row", action="store_true", help="--7b: also deterministic=True with SDPA step attention")
    ap.add_argument("--skip-nondeterministic-sampling", action="store_true", help="--7b: no deterministic=False sampling row")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: a smoke test only
    torch.manual_seed(0)
    kw = dict(vocab_size=32001, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32) if args.big \
        else dict(vocab_size=32001, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8)
    with torch.device(dev):
        lm = LlamaForCausalLM._from_config(LlamaConfig(**kw, max_position_embeddings=2048), dtype=torch.bfloat16).eval()
    S, n = 641, args.new_tokens
    embeds = 0.02 * torch.randn(1, S, kw["hidden_size"], device=dev, dtype=torch.bfloat16)
    variants = [("default", {}, None), ("deterministic=False", {"deterministic": False}, None),
                ("deterministic=True", {"deterministic": True}, None), ("sdpa=efficient", {}, "efficient"), ("sdpa=math", {}, "math"),
                ("no cuda graphs", {"cuda_graphs": False}, None), ("no compile", {"compile": False, "cuda_graphs": False}, None)]
    if args.big:  # each compiled 7B engine costs ~30-60 s of compilation: the default both ways, then the
        variants = variants[:3]  # non-default setting of FastOptions.deterministic for each mode
        if args.sdpa_row:
            variants.append(("deterministic=True, sdpa", {"deterministic": True, "deterministic_step_attention": "sdpa"}, None))
        if args.skip_nondeterministic_sampling:
            variants = [v for v in variants if v[0] != "deterministic=False"]
    modes = [m for m in (("greedy", SamplingParams()), ("sampling", SamplingParams(temperature=0.4, seed=7))) if m[0] in args.modes.split(",")]
    out = {"kernels": kernel_checks(lm, embeds)}
    print("kernels", json.dumps(out["kernels"]), flush=True)
    for name, opts, be in variants:
        row = {}
        for mode, params in modes:
            if args.big and name != "default" and (name == "deterministic=False") != (mode == "sampling"):
                continue  # deterministic=True rows: greedy only
            with backend(be):
                eng = FastEngine(lm, FastOptions(max_seq=768, sampling=params, **opts))
                eng.warmup(S, n, batch_sizes=[1])
                ids, logits, steps = [], [], []
                for _ in range(3):
                    pre = eng.prefill(embeds, [S], seeds=[7])
                    out_ = eng.decode(pre, n, None)
                    ids.append(out_.tokens[0].tolist())
                    steps += out_.step_ms
                    logits.append(eng.score(eng.prefill(embeds, [S], seeds=[7]), torch.tensor([ids[0][:-1]], device=dev))[0])
            first = next((i for i, (a, b) in enumerate(zip(ids[0], ids[1])) if a != b), None)
            row[mode] = {"same_ids": ids[0] == ids[1] == ids[2], "first_diff": first,
                         "same_logits": bool(torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])),
                         "max_logit_diff": float((logits[0] - logits[1]).abs().max()),
                         "deterministic_attention": eng.deterministic, "decode_step_ms_median": statistics.median(steps)}
            del eng
        out[name] = row
        print(name, json.dumps(row), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
