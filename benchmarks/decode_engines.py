"""The two decode engines side by side, in one process: ``hf`` (the seeds' method) and ``fast``.

A LLaMA-7B / Vicuna-shaped ``LlamaForCausalLM`` with RANDOM weights (bf16, built directly on
the GPU), a 641-token prompt of random token embeddings, 46 new tokens, greedy. Decode at
batch 1 is bound by memory bandwidth, prefill by matrix throughput, so the report divides each
time by its floor, using ceilings this script measures on the same device first:

* copy bandwidth: a 1 GiB device-to-device copy, bytes read + written per second;
* matmul rate: a bf16 8192^3 matmul.

Intervals (all medians over repeats, after warm-up; CUDA events unless said otherwise):

* ``prefill_ms``: ``engine.prefill`` call start -> its first token on the device (ends with a sync);
* ``tpot_ms`` (decode step): median of the engine's per-step times (``DecodeOutput.step_ms``,
  CUDA events between consecutive steps = ITL); TPOT = ITL here since every step emits a token;
* ``e2el_ms``: host clock from prefill start to the decoded tokens on the host;
* ``decode_tok_s``: B / tpot; ``output_tok_s``: B x new_tokens / e2el (prefill included);
* ``warmup_s``: ``engine.warmup_ms`` (compile, graph capture, warm-up runs);
* MBU = (weight bytes + KV bytes read per step) / tpot / copy bandwidth, where KV bytes count
  only the cache in use (the mean context over the run's steps), not the bucket;
* MFU = prefill FLOPs (2 x non-embedding params x S + causal attention) / prefill_ms / matmul rate.

Parity (batch 1): teacher forcing. HF's own greedy tokens are fed through (a) one HF forward
over prompt + tokens and (b) the fast engine's prefill and decode step (``FastEngine.score``);
we report the share of positions whose argmax agrees and the max |logit diff|. The same
agreement between HF's incremental greedy decode and HF's single forward is the bf16 noise
floor of the reference itself.

The last line printed is one JSON document (units in key names).

Usage::

    python3 benchmarks/decode_engines.py [--batch-sizes 1,16] [--new-tokens 46] [--prompt-len 641]
        [--out results.json] [--variants cublas:matvec=0 ...] [--profile] [--tiny]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import LlamaConfig, LlamaForCausalLM

from stagewise.engine.fast import FastEngine
from stagewise.engine.hf import HFEngine

VICUNA_7B = {
    "vocab_size": 32003, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}
TINY = {
    "vocab_size": 101, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
}


# ----------------------------------------------------------------------------------------------
# Ceilings measured here


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn()`` in ms (device work included)."""
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.randn(nbytes // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = time_ms(lambda: [dst.copy_(src) for _ in range(5)], device, 5) / 5
    return 2 * nbytes / (ms * 1e-3)


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype) -> float:
    """FLOP/s of an n^3 matmul."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    ms = time_ms(lambda: [a @ b for _ in range(10)], device, 5) / 10
    return 2 * n**3 / (ms * 1e-3)


# ----------------------------------------------------------------------------------------------
# Cost model of the decoder (bytes and FLOPs from the config)


def weight_bytes_per_step(lm) -> int:
    """Weights one decode step streams: every parameter but the embedding table (unless tied,
    where the table is the LM head and is read as such)."""
    embed = lm.model.embed_tokens.weight
    tied = lm.lm_head.weight.data_ptr() == embed.data_ptr()
    total = sum(p.numel() * p.element_size() for p in lm.parameters())
    return total if tied else total - embed.numel() * embed.element_size()


def kv_bytes_per_token(cfg, elem: int) -> int:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elem


def prefill_flops(lm, seq: int) -> float:
    """2 x (non-embedding, non-head params) x S + LM head at one position + causal attention."""
    cfg = lm.config
    head = lm.lm_head.weight.numel()
    body = sum(p.numel() for p in lm.model.layers.parameters())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * seq * seq  # QK^T + PV, causal half
    return 2.0 * body * seq + 2.0 * head + attn


# ----------------------------------------------------------------------------------------------
# Measurements


def make_prompt(lm, batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, lm.config.vocab_size, (batch, seq), generator=g).to(lm.device)
    with torch.no_grad():
        embeds = lm.model.embed_tokens(ids).detach()
    return embeds, torch.ones(batch, seq, dtype=torch.long, device=lm.device)


def measure_engine(engine, embeds, mask, new_tokens: int, repeats: int) -> dict:
    """prefill_ms (median), tpot_ms (median of all steps), e2el_ms (median), last tokens."""
    device = embeds.device
    prefill_ms, steps, e2el, runs = [], [], [], []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        pre = engine.prefill(embeds, mask)
        sync(device)
        t1 = time.perf_counter()
        out = engine.decode(pre, new_tokens, None)  # ends with the tokens on the host
        t2 = time.perf_counter()
        prefill_ms.append((t1 - t0) * 1e3)
        e2el.append((t2 - t0) * 1e3)
        steps.extend(out.step_ms)
        runs.append(out.tokens)
    return {
        "prefill_ms": statistics.median(prefill_ms),
        "tpot_ms": statistics.median(steps),
        "p90_tpot_ms": sorted(steps)[int(0.9 * (len(steps) - 1))],
        "e2el_ms": statistics.median(e2el),
        "tokens": runs[-1],
        "run_to_run_equal": all(torch.equal(t, runs[0]) for t in runs),
    }


def teacher_forced_parity(lm, fast: FastEngine, embeds, mask, hf_tokens: torch.Tensor) -> dict:
    """Feed HF's greedy tokens through one HF forward and through the fast engine's step."""
    forced = hf_tokens.to(embeds.device)  # [1, T]
    T = forced.shape[1]
    with torch.no_grad():
        full = torch.cat([embeds, lm.model.embed_tokens(forced[:, :-1])], dim=1)
        full_mask = torch.ones(full.shape[:2], dtype=torch.long, device=embeds.device)
        ref = lm(inputs_embeds=full, attention_mask=full_mask, logits_to_keep=T).logits.float()  # [1, T, V]
    got = fast.score(fast.prefill(embeds, mask), forced[:, :-1])  # [1, T, V]
    ref_arg, got_arg = ref.argmax(-1), got.argmax(-1)
    diff = (ref - got).abs()
    # how far apart the reference's top-2 logits are where the engines disagree
    top2 = ref.topk(2, dim=-1).values
    gap = (top2[..., 0] - top2[..., 1])[ref_arg != got_arg]
    return {
        "teacher_forced_agreement": (ref_arg == got_arg).float().mean().item(),
        "teacher_forced_positions": T,
        "max_abs_logit_diff": diff.max().item(),
        "mean_abs_logit_diff": diff.mean().item(),
        "logit_std": ref.std().item(),
        "hf_self_agreement": (ref_arg == forced).float().mean().item(),  # HF incremental vs one forward
        "disagree_top2_gap_max": gap.max().item() if gap.numel() else None,
    }


def kernel_table(run, device: torch.device, per: int, top: int = 14) -> list[dict]:
    """Device time per kernel name of ``run()`` (divided by ``per`` calls of interest)."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        sync(device)
    rows = []
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", None)
        if us is None:
            us = getattr(ev, "self_cuda_time_total", 0.0)
        if us > 0:
            rows.append({"kernel": ev.key[:90], "calls": ev.count / per, "us": us / per})
    rows.sort(key=lambda r: -r["us"])
    total = sum(r["us"] for r in rows)
    for r in rows:
        r["share"] = r["us"] / total if total else 0.0
    head = {"kernel": "TOTAL", "calls": sum(r["calls"] for r in rows), "us": total, "share": 1.0}
    return [head] + rows[:top]


def profile_decode(fast: FastEngine, embeds, mask, new_tokens: int) -> list[dict]:
    """Kernel time per decode step (graph replays)."""
    pre = fast.prefill(embeds, mask)
    return kernel_table(lambda: fast.decode(pre, new_tokens, None), embeds.device, new_tokens - 1)


def profile_prefill(engine, embeds, mask) -> list[dict]:
    """Kernel time of one prefill."""
    return kernel_table(lambda: engine.prefill(embeds, mask), embeds.device, 1)


def fp32_parity(cfg_kwargs: dict, device: torch.device, S: int, new: int, kv_bucket: int) -> dict:
    """Teacher-forced parity with the 7B shapes in fp32 (bf16 rounding out of the picture)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(**cfg_kwargs)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        lm = LlamaForCausalLM(cfg).eval()
    embeds, mask = make_prompt(lm, 1, S, seed=1)
    hf = HFEngine(lm)
    hf_tokens = hf.decode(hf.prefill(embeds, mask), new, None).tokens
    fast = FastEngine(lm, max_batch=1, max_seq=-(-(S + new - 1) // kv_bucket) * kv_bucket, kv_bucket=kv_bucket)
    fast.warmup(S, new)
    out = teacher_forced_parity(lm, fast, embeds, mask, hf_tokens)
    fast_tokens = fast.decode(fast.prefill(embeds, mask), new, None).tokens
    out["greedy_tokens_equal"] = bool(torch.equal(fast_tokens, hf_tokens))
    out["warmup_s"] = fast.warmup_ms / 1e3
    del fast, hf, lm
    gc.collect()
    return out


def warm_up(fast: FastEngine, prompt_len: int, new: int, batch_sizes: list[int]) -> dict[int, float]:
    """``fast.warmup`` for each batch size in turn; seconds each took."""
    warm = {}
    for B in batch_sizes:
        before = fast.warmup_ms
        fast.warmup(prompt_len, new, batch_sizes=[B])
        warm[B] = (fast.warmup_ms - before) / 1e3
    return warm


def parse_variant(text: str) -> tuple[str, dict]:
    """``name:key=value,key=value`` -> (name, FastEngine kwargs)."""
    name, _, spec = text.partition(":")
    kwargs = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        kwargs[key] = int(value) if value.lstrip("-").isdigit() else value
        if key in ("matvec", "autotune", "compile", "cuda_graphs"):
            kwargs[key] = bool(int(value))
    return name, kwargs


def environment(device: torch.device) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }
    try:
        done = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10, check=False)
        env["git_sha"] = done.stdout.strip() if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        env["git_sha"] = None
    return env


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,16; tiny 1,4)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 46 (tiny 8)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 641 (tiny 24)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hf-repeats", type=int, default=3)
    ap.add_argument("--kv-bucket", type=int, default=64)
    ap.add_argument("--variants", nargs="*", default=None,
                    help="extra fast-engine configs at batch 1, e.g. cublas:matvec=0 autotune:autotune=1")
    ap.add_argument("--profile", action="store_true", help="kernel breakdown of decode step and prefill")
    ap.add_argument("--fp32-parity", action="store_true", help="also teacher-forced parity in fp32 (7B shapes)")
    ap.add_argument("--tiny", action="store_true", help="tiny random model (CPU smoke test)")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON document here too")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tiny = args.tiny or device.type != "cuda"
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,4" if tiny else "1,16")).split(",")]
    new = args.new_tokens or (8 if tiny else 46)
    S = args.prompt_len or (24 if tiny else 641)
    variants = args.variants if args.variants is not None else ([] if tiny else ["cublas:matvec=0"])
    result: dict = {"env": environment(device), "model": "tiny" if tiny else "vicuna-7b-shapes (random weights)",
                    "dtype": str(dtype).replace("torch.", ""), "prompt_len": S, "new_tokens": new,
                    "batch_sizes": batch_sizes}

    # ceilings
    copy_bw = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 26))
    mm_rate = matmul_rate(device, 8192 if device.type == "cuda" else 1024, dtype)
    result["copy_bw_bytes_s"] = copy_bw
    result["matmul_flop_s"] = mm_rate

    # model
    t0 = time.perf_counter()
    torch.manual_seed(0)
    cfg = LlamaConfig(**(TINY if tiny else VICUNA_7B))
    cfg._attn_implementation = "sdpa"
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        lm = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(prev)
    sync(device)
    result["model_init_s"] = time.perf_counter() - t0
    w_bytes = weight_bytes_per_step(lm)
    kv_tok = kv_bytes_per_token(cfg, torch.finfo(dtype).bits // 8)
    result["weight_bytes"] = w_bytes
    result["kv_bytes_per_token"] = kv_tok
    result["prefill_flops"] = prefill_flops(lm, S)
    mean_ctx = S + (new - 2) / 2 + 1  # slots attended, averaged over the steps
    step_bytes = {B: w_bytes + B * kv_tok * mean_ctx for B in batch_sizes}

    embeds1, mask1 = make_prompt(lm, 1, S, seed=1)

    # ---- hf
    hf = HFEngine(lm)
    hf.decode(hf.prefill(embeds1, mask1), 3, None)  # warm-up (cuBLAS, allocator)
    hf_b1 = measure_engine(hf, embeds1, mask1, new, args.hf_repeats)
    hf_logits_before = hf.prefill(embeds1, mask1).logits
    result["hf_decode_run_to_run_equal"] = hf_b1["run_to_run_equal"]
    result["hf_deterministic"] = bool(torch.equal(hf_logits_before, hf.prefill(embeds1, mask1).logits))

    # ---- fast
    sync(device)
    mem0 = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    max_seq = -(-(S + new - 1) // args.kv_bucket) * args.kv_bucket
    fast = FastEngine(lm, max_batch=max(batch_sizes), max_seq=max_seq, kv_bucket=args.kv_bucket)
    if device.type == "cuda":
        sync(device)
        own = 2 * fast.k_cache.numel() * fast.k_cache.element_size()
        own += sum(t.numel() * t.element_size() for t in fast.buf)
        own += sum(t.numel() * t.element_size() for t in fast.rope_table)
        result["fast_extra_weight_bytes"] = torch.cuda.memory_allocated(device) - mem0 - own
    hf_after = hf.prefill(embeds1, mask1).logits
    hf_tokens_after = hf.decode(hf.prefill(embeds1, mask1), new, None).tokens
    # bit-identical prefill logits; greedy tokens are no test here: HF's own decode is not
    # bit-reproducible run to run on the GPU (see hf_decode_run_to_run_equal)
    result["hf_unchanged_after_fast_build"] = bool(torch.equal(hf_logits_before, hf_after))
    result["hf_after_build_max_abs_logit_diff"] = (hf_logits_before - hf_after).abs().max().item()
    result["hf_after_build_tokens_equal"] = bool(torch.equal(hf_tokens_after, hf_b1["tokens"]))

    try:
        warm = warm_up(fast, S, new, batch_sizes)
    except RuntimeError as err:  # keep the run's other numbers; measure without prefill graphs instead
        import traceback

        traceback.print_exc()
        result["fast_warmup_error"] = repr(err)[:500]
        fast = None
        gc.collect()
        fast = FastEngine(lm, max_batch=max(batch_sizes), max_seq=max_seq, kv_bucket=args.kv_bucket,
                          prefill_graphs=False)
        warm = warm_up(fast, S, new, batch_sizes)
    fast_b1 = measure_engine(fast, embeds1, mask1, new, args.repeats)
    # a prompt length warmup() did not capture: the compiled layer functions run one by one
    other = make_prompt(lm, 1, S - 1, seed=2)
    result["fast_b1_prefill_uncaptured_ms"] = time_ms(functools.partial(fast.prefill, *other), device, args.repeats)

    per_engine = {"hf": {"b1": hf_b1}, "fast": {"b1": fast_b1}}
    for B in batch_sizes:
        if B == 1:
            continue
        embeds, mask = make_prompt(lm, B, S, seed=B)
        per_engine["hf"][f"b{B}"] = measure_engine(hf, embeds, mask, new, max(1, args.hf_repeats - 1))
        per_engine["fast"][f"b{B}"] = measure_engine(fast, embeds, mask, new, args.repeats)
        del embeds, mask
        gc.collect()

    result["parity"] = teacher_forced_parity(lm, fast, embeds1, mask1, hf_b1["tokens"])
    fast_tok, hf_tok = fast_b1["tokens"][0].tolist(), hf_b1["tokens"][0].tolist()
    result["parity"]["greedy_identical_prefix_tokens"] = next(
        (i for i, (a, b) in enumerate(zip(fast_tok, hf_tok)) if a != b), len(hf_tok))

    if args.profile and device.type == "cuda":
        result["fast_profile_b1"] = profile_decode(fast, embeds1, mask1, new)
        result["fast_prefill_profile_b1"] = profile_prefill(fast, embeds1, mask1)
        result["hf_prefill_profile_b1"] = profile_prefill(hf, embeds1, mask1)

    engines = {}
    for name, runs in per_engine.items():
        row = {"warmup_s": (fast.warmup_ms / 1e3) if name == "fast" else 0.0}
        if name == "fast":
            row.update({f"warmup_s_b{B}": s for B, s in warm.items()})
        for key, m in runs.items():
            B = int(key[1:])
            row[f"{key}_prefill_ms"] = m["prefill_ms"]
            row[f"{key}_tpot_ms"] = m["tpot_ms"]
            row[f"{key}_p90_tpot_ms"] = m["p90_tpot_ms"]
            row[f"{key}_e2el_ms"] = m["e2el_ms"]
            row[f"{key}_decode_tok_s"] = 1e3 * B / m["tpot_ms"]
            row[f"{key}_output_tok_s"] = 1e3 * B * new / m["e2el_ms"]
            row[f"{key}_decode_bytes_s"] = step_bytes[B] / (m["tpot_ms"] * 1e-3)
            row[f"{key}_mbu"] = row[f"{key}_decode_bytes_s"] / copy_bw
            flops = prefill_flops(lm, S) * B
            row[f"{key}_prefill_flop_s"] = flops / (m["prefill_ms"] * 1e-3)
            row[f"{key}_mfu"] = row[f"{key}_prefill_flop_s"] / mm_rate
        engines[name] = row
    result["engines"] = engines

    # ---- variants of the fast engine (batch 1 decode only)
    del fast
    gc.collect()
    result["variants"] = {}
    for text in variants:
        name, kwargs = parse_variant(text)
        torch._dynamo.reset()
        eng = FastEngine(lm, max_batch=1, max_seq=max_seq, **{"kv_bucket": args.kv_bucket, **kwargs})
        eng.warmup(S, new, batch_sizes=[1])
        m = measure_engine(eng, embeds1, mask1, new, 3)
        if args.profile and device.type == "cuda":
            result[f"variant_{name}_profile_b1"] = profile_decode(eng, embeds1, mask1, new)
        result["variants"][name] = {"kwargs": kwargs, "warmup_s": eng.warmup_ms / 1e3,
                                    "b1_tpot_ms": m["tpot_ms"], "b1_prefill_ms": m["prefill_ms"],
                                    "b1_mbu": step_bytes[1] / (m["tpot_ms"] * 1e-3) / copy_bw}
        del eng
        gc.collect()

    if args.fp32_parity and device.type == "cuda":
        del hf, lm, embeds1, mask1
        gc.collect()
        torch.cuda.empty_cache()
        torch.backends.cuda.matmul.allow_tf32 = False
        result["parity_fp32"] = fp32_parity(VICUNA_7B, device, S, new, args.kv_bucket)

    print_table(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


def print_table(r: dict) -> None:
    e = r["engines"]
    hf, fast = e["hf"], e["fast"]
    print(f"\ndevice {r['env']['device']} | torch {r['env']['torch']} | transformers {r['env']['transformers']}")
    print(f"model {r['model']}, {r['dtype']}, prompt {r['prompt_len']}, new tokens {r['new_tokens']}")
    print(f"ceilings measured: copy {r['copy_bw_bytes_s'] / 1e12:.2f} TB/s (read+write), "
          f"matmul {r['matmul_flop_s'] / 1e12:.0f} TFLOP/s; weights {r['weight_bytes'] / 1e9:.2f} GB/step")
    floor = r["weight_bytes"] / r["copy_bw_bytes_s"] * 1e3
    print(f"decode floor b1 (weights only / copy bw): {floor:.2f} ms; prefill floor: "
          f"{r['prefill_flops'] / r['matmul_flop_s'] * 1e3:.2f} ms\n")
    rows = [("decode step b1 (ms/token, median)", "b1_tpot_ms", "{:.2f}"),
            ("decode step b1 p90 (ms)", "b1_p90_tpot_ms", "{:.2f}"),
            ("decode tokens/s b1", "b1_decode_tok_s", "{:.1f}"),
            ("achieved bandwidth b1 (GB/s)", "b1_decode_bytes_s", "{:.0f}", 1e-9),
            ("MBU b1 (vs copy bw)", "b1_mbu", "{:.1%}"),
            (f"prefill {r['prompt_len']} tokens b1 (ms)", "b1_prefill_ms", "{:.2f}"),
            ("prefill TFLOP/s b1", "b1_prefill_flop_s", "{:.0f}", 1e-12),
            ("MFU prefill b1", "b1_mfu", "{:.1%}"),
            ("e2e b1 (ms)", "b1_e2el_ms", "{:.1f}")]
    for B in r["batch_sizes"]:
        if B != 1:
            rows += [(f"decode step b{B} (ms)", f"b{B}_tpot_ms", "{:.2f}"),
                     (f"decode-phase tok/s b{B}", f"b{B}_decode_tok_s", "{:.0f}"),
                     (f"output tok/s b{B} (prefill incl.)", f"b{B}_output_tok_s", "{:.0f}"),
                     (f"prefill b{B} (ms)", f"b{B}_prefill_ms", "{:.1f}"),
                     (f"MBU b{B}", f"b{B}_mbu", "{:.1%}")]
    rows += [("compile + warm-up (s)", "warmup_s", "{:.1f}")]
    print(f"{'figure':44s} {'hf':>12s} {'fast':>12s}")
    for label, key, fmt, *scale in rows:
        s = scale[0] if scale else 1
        cells = [fmt.format(x[key] * s) if key in x else "-" for x in (hf, fast)]
        print(f"{label:44s} {cells[0]:>12s} {cells[1]:>12s}")
    for k, v in fast.items():
        if k.startswith("warmup_s_b"):
            print(f"  fast warm-up for batch {k[len('warmup_s_b'):]}: {v:.1f} s")
    p = r["parity"]
    print(f"\nparity (teacher-forced, b1, {p['teacher_forced_positions']} positions): argmax agreement "
          f"{p['teacher_forced_agreement']:.1%}, max |logit diff| {p['max_abs_logit_diff']:.3g} "
          f"(mean {p['mean_abs_logit_diff']:.3g}, logit std {p['logit_std']:.3g}); "
          f"HF incremental vs one HF forward: {p['hf_self_agreement']:.1%}; "
          f"greedy tokens identical for the first {p['greedy_identical_prefix_tokens']}")
    print(f"fast prefill of a length warmup() did not capture ({r['prompt_len'] - 1} tokens): "
          f"{r['fast_b1_prefill_uncaptured_ms']:.2f} ms")
    print(f"HF output unchanged after building the fast engine: {r['hf_unchanged_after_fast_build']} "
          f"(prefill logits max |diff| {r['hf_after_build_max_abs_logit_diff']:.3g}, greedy tokens equal "
          f"{r['hf_after_build_tokens_equal']}; HF prefill run-to-run identical: {r['hf_deterministic']}, "
          f"HF greedy tokens run-to-run identical: {r['hf_decode_run_to_run_equal']}); "
          f"extra weight bytes: {r.get('fast_extra_weight_bytes', 'n/a')}")
    for name, v in r.get("variants", {}).items():
        print(f"variant {name} {v['kwargs']}: decode b1 {v['b1_tpot_ms']:.2f} ms (MBU {v['b1_mbu']:.1%}), "
              f"prefill {v['b1_prefill_ms']:.2f} ms, warm-up {v['warmup_s']:.1f} s")
    if "parity_fp32" in r:
        p = r["parity_fp32"]
        print(f"parity fp32 (7B shapes): argmax agreement {p['teacher_forced_agreement']:.1%}, max |logit diff| "
              f"{p['max_abs_logit_diff']:.3g}; HF incremental vs one HF forward {p['hf_self_agreement']:.1%}; "
              f"greedy tokens equal: {p['greedy_tokens_equal']}")
    tables = [("fast_profile_b1", "fast decode step b1, kernel time per step"),
              ("fast_prefill_profile_b1", "fast prefill b1, kernel time"),
              ("hf_prefill_profile_b1", "hf prefill b1, kernel time")]
    tables += [(f"variant_{name}_profile_b1", f"variant {name}: decode step b1, kernel time per step")
               for name in r.get("variants", {})]
    for key, title in tables:
        if key in r:
            print(f"\n{title}:")
            for row in r[key]:
                print(f"  {row['us']:8.1f} us {row['share']:6.1%} {row['calls']:6.1f}x  {row['kernel']}")
    print()


if __name__ == "__main__":
    main()
