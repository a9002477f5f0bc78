"""FLOPs and bytes per stage, from the model configs: the physical floor of each stage.

Why two numbers: vision and prefill push hundreds of tokens through every weight, so they
are bound by matrix arithmetic (floor = FLOPs / peak FLOP/s, utilisation = MFU); decode
pushes one token per sequence through every weight, so it is bound by streaming the
weights and the KV cache from HBM (floor = bytes / copy bandwidth, utilisation = MBU).

Counting conventions (the usual ones, e.g. Kaplan et al. 2020, "Scaling Laws", sec. 2.1;
PaLM appendix B for attention): a matmul of ``[m, k] x [k, n]`` is ``2 m k n`` FLOPs;
causal self-attention over ``S`` tokens costs ``2 S^2 d`` per layer (QK^T and AV, half of
the ``4 S^2 d`` of full attention); norms, activations and softmax are not counted.
Bytes count each weight read once and each KV-cache entry read once per step.
Ceilings are measured on the device (:func:`measure_ceilings`), not taken from datasheets.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import LlamaConfig

    from stagewise.models.base import MultimodalModel


def _get(cfg: LlamaConfig | dict, name: str, default: Any = None) -> Any:
    return getattr(cfg, name, default) if not isinstance(cfg, dict) else cfg.get(name, default)


def llama_layer_params(cfg: LlamaConfig | dict) -> int:
    """Weights of one decoder layer (attention + MLP + 2 RMSNorms), elements."""
    d = _get(cfg, "hidden_size")
    h = _get(cfg, "num_attention_heads")
    kv = _get(cfg, "num_key_value_heads") or h
    hd = _get(cfg, "head_dim") or d // h
    inter = _get(cfg, "intermediate_size")
    return d * h * hd * 2 + d * kv * hd * 2 + 3 * d * inter + 2 * d


def llama_decode_weight_bytes(cfg: LlamaConfig | dict, elem_bytes: int = 2) -> int:
    """Bytes of weights streamed per decode step: all layers, final norm, LM head
    (the embedding lookup reads one row per token and is not counted)."""
    d, v = _get(cfg, "hidden_size"), _get(cfg, "vocab_size")
    n = _get(cfg, "num_hidden_layers") * llama_layer_params(cfg) + d + v * d
    return n * elem_bytes


def kv_cache_bytes(cfg: LlamaConfig | dict, seq_len: int, batch: int = 1, elem_bytes: int = 2) -> int:
    """KV-cache size: ``layers x 2 (K, V) x batch x kv_heads x seq_len x head_dim x elem`` bytes.

    EventGPT-7B, 641 tokens, bf16: 32 x 2 x 32 x 641 x 128 x 2 = 336,068,608 B = 320.5 MiB.
    """
    d, h = _get(cfg, "hidden_size"), _get(cfg, "num_attention_heads")
    kv = _get(cfg, "num_key_value_heads") or h
    hd = _get(cfg, "head_dim") or d // h
    return _get(cfg, "num_hidden_layers") * 2 * batch * kv * seq_len * hd * elem_bytes


def llama_prefill_flops(cfg: LlamaConfig | dict, seq_len: int, batch: int = 1) -> float:
    """Prefill FLOPs: ``2 x tokens x layer weights`` + causal attention + LM head on the last token."""
    d, v, n_l = _get(cfg, "hidden_size"), _get(cfg, "vocab_size"), _get(cfg, "num_hidden_layers")
    h = _get(cfg, "num_attention_heads")
    hd = _get(cfg, "head_dim") or d // h
    tokens = batch * seq_len
    weights = 2.0 * tokens * n_l * llama_layer_params(cfg)
    attn = 2.0 * batch * n_l * seq_len * seq_len * h * hd
    return weights + attn + 2.0 * batch * d * v


def llama_decode_step_bytes(cfg: LlamaConfig | dict, kv_len: int, batch: int = 1, elem_bytes: int = 2,
                            weight_bytes: int | None = None) -> int:
    """Bytes one decode step must move: the weights once (``weight_bytes`` when given, e.g. quantized
    or one tensor-parallel rank's share; else all of them in ``elem_bytes``), plus the KV cache read
    for every row."""
    w = llama_decode_weight_bytes(cfg, elem_bytes) if weight_bytes is None else weight_bytes
    return w + kv_cache_bytes(cfg, kv_len, batch, elem_bytes)


def llama_decode_bytes(cfg: LlamaConfig | dict, prompt_len: int, n_out: int, batch: int = 1, elem_bytes: int = 2,
                       weight_bytes: int | None = None) -> int:
    """Bytes of all ``n_out - 1`` decode steps after the prefill (KV length grows by one each)."""
    return sum(llama_decode_step_bytes(cfg, prompt_len + i, batch, elem_bytes, weight_bytes) for i in range(1, n_out))


def clip_vision_flops(vcfg: LlamaConfig | dict, n_images: int, layers: int | None = None) -> float:
    """CLIP ViT FLOPs for ``n_images``: patch embedding and ``layers`` encoder layers (default all;
    full attention over ``(S / p)^2 + 1`` tokens: ``2 n (4 d^2 + 2 d I) + 4 n^2 d`` per layer)."""
    d, inter, n_l = _get(vcfg, "hidden_size"), _get(vcfg, "intermediate_size"), _get(vcfg, "num_hidden_layers")
    p, size = _get(vcfg, "patch_size"), _get(vcfg, "image_size")
    n_patch = (size // p) ** 2
    n = n_patch + 1
    patch = 2.0 * n_patch * 3 * p * p * d
    layer = 2.0 * n * (4 * d * d + 2 * d * inter) + 4.0 * n * n * d
    return n_images * (patch + (n_l if layers is None else layers) * layer)


def measure_ceilings(device: torch.device, copy_bytes: int = 1 << 30, matmul_n: int = 8192, repeats: int = 10) -> dict[str, float]:
    """Measure the device's two ceilings (CUDA only; ``{}`` elsewhere).

    Returns:
        ``{"copy_bw_bytes_s": bytes read + written per second of a device-to-device copy,
        "bf16_flops_s": FLOP/s of a bf16 ``matmul_n``^3 product on random data}``, each the
        median of ``repeats`` timed runs after warm-up (CUDA events).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return {}

    def timed(fn: Any) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize(device)
            times.append(a.elapsed_time(b) / 1e3)
        return sorted(times)[len(times) // 2]

    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src))
    src = dst = None  # free before the matmul buffers
    a = torch.randn(matmul_n, matmul_n, device=device, dtype=torch.bfloat16)
    b = torch.randn(matmul_n, matmul_n, device=device, dtype=torch.bfloat16)
    t_mm = timed(lambda: a @ b)
    a = b = None
    torch.cuda.empty_cache()
    return {"copy_bw_bytes_s": 2.0 * copy_bytes / t_copy, "bf16_flops_s": 2.0 * matmul_n**3 / t_mm, "measured_at": time.time()}


def stage_floors(model: MultimodalModel, mean_record: dict[str, float], ceilings: dict[str, float], *,
                 weight_bytes: int | None = None) -> dict[str, dict[str, Any]]:
    """Per-stage floors for a run, from the mean token counts of its samples.

    Args:
        model: the run's model (``lm.config``, ``vision_flops``, ``n_frames``).
        mean_record: means of ``n_prefill_tokens``, ``n_output_tokens``, ``batch_size`` and
            ``n_images`` over the run's samples.
        ceilings: :func:`measure_ceilings` output (empty on CPU: no floors then).
        weight_bytes: the weight bytes one decode step actually streams on this device (the
            engine's count: quantized codes and scales, one tensor-parallel rank's share); default
            every weight in the model dtype. MBU is computed on it.

    Returns:
        ``{stage: {"floor_ms", "kind" ("MFU"|"MBU"), "flops", "bytes"}}`` for vision,
        prefill and decode; ``{}`` without ceilings.
    """
    if not ceilings:
        return {}
    cfg = model.lm.config
    elem = torch.finfo(model.dtype).bits // 8
    flops_s, bw = ceilings["bf16_flops_s"], ceilings["copy_bw_bytes_s"]
    batch = max(int(round(mean_record.get("batch_size", 1))), 1)
    s = int(round(mean_record["n_prefill_tokens"]))
    n_out = int(round(mean_record["n_output_tokens"]))
    n_img = int(round(mean_record.get("n_images", model.n_frames)))
    v_flops = model.vision_flops(n_img) * batch
    p_flops = llama_prefill_flops(cfg, s, batch)
    w_bytes = llama_decode_weight_bytes(cfg, elem) if weight_bytes is None else weight_bytes
    p_bytes = w_bytes + kv_cache_bytes(cfg, s, batch, elem)
    d_bytes = llama_decode_bytes(cfg, s, n_out, batch, elem, w_bytes)
    return {
        "vision": {"floor_ms": 1e3 * v_flops / flops_s, "kind": "MFU", "flops": v_flops, "bytes": None},
        "prefill": {"floor_ms": 1e3 * max(p_flops / flops_s, p_bytes / bw), "kind": "MFU", "flops": p_flops, "bytes": p_bytes},
        "decode": {"floor_ms": 1e3 * d_bytes / bw, "kind": "MBU", "flops": None, "bytes": d_bytes},
    }


def llama_quantized_weight_bytes(
    cfg: LlamaConfig | dict, kind: str, group_size: int = 128, *, lm_head: bool = True, elem_bytes: int = 2
) -> int:
    """Bytes of weights streamed per decode step with the linear layers weight-only quantized.

    Every decoder linear (q, k, v, o, gate, up, down) in ``kind``'s format (bytes per
    ``[N, K]`` weight from :func:`stagewise.engine.quant.quantized_nbytes`: codes + scales
    (+ zeros)); the LM head too when ``lm_head``, else in ``elem_bytes``; RMSNorm weights in
    ``elem_bytes``; the embedding is not counted (one row per token). Fusing q/k/v or gate/up
    does not change the count (per-channel scales are per row, int4 groups run along K).
    ``kind="none"`` gives :func:`llama_decode_weight_bytes`.

    LLaMA-7B (vocab 32000), int4 G=128, LM head included: 6.61e9 weights x (0.5 + 4/128) B
    + norms = 3.51 GB (13.21 GB in bf16 by :func:`llama_decode_weight_bytes`).

    Raises:
        ValueError: unknown kind or a group size that does not divide the input features.
    """
    from stagewise.engine.quant import quantized_nbytes

    if kind == "none":
        return llama_decode_weight_bytes(cfg, elem_bytes)
    d, v, n_l = _get(cfg, "hidden_size"), _get(cfg, "vocab_size"), _get(cfg, "num_hidden_layers")
    h = _get(cfg, "num_attention_heads")
    kv = _get(cfg, "num_key_value_heads") or h
    hd = _get(cfg, "head_dim") or d // h
    inter = _get(cfg, "intermediate_size")
    shapes = [((h + 2 * kv) * hd, d), (d, h * hd), (2 * inter, d), (d, inter)]  # fused qkv, o, gate_up, down
    layer = sum(quantized_nbytes(n, k, kind, group_size) for n, k in shapes) + 2 * d * elem_bytes
    head = quantized_nbytes(v, d, kind, group_size) if lm_head else v * d * elem_bytes
    return n_l * layer + d * elem_bytes + head


# ----------------------------------------------------------------------------------------------
# Tensor parallelism: what ONE GPU streams and computes, and the collectives between the GPUs
# (the split of stagewise.engine.parallel: projections and KV heads divided by T, norms and the
# LM head replicated on every rank)


def _tp_split(cfg: LlamaConfig | dict, tensor_parallel_size: int) -> tuple[int, int]:
    """(elements of one layer divided among the ranks, elements replicated on every rank) of the
    whole decoder (the embedding table is not read by a step and is not counted)."""
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size: must be >= 1, got {tensor_parallel_size}")
    d, v, n_l = _get(cfg, "hidden_size"), _get(cfg, "vocab_size"), _get(cfg, "num_hidden_layers")
    sharded = n_l * (llama_layer_params(cfg) - 2 * d)  # q, k, v, o, gate, up, down
    replicated = n_l * 2 * d + d + v * d  # the two RMSNorms of each layer, the final norm, the LM head
    return sharded, replicated


def llama_tp_decode_step_bytes(cfg: LlamaConfig | dict, kv_len: int, *, batch: int = 1, elem_bytes: int = 2, tensor_parallel_size: int = 1) -> int:
    """Bytes ONE GPU must move per decode step under tensor parallelism ``T``: ``1 / T`` of every
    layer's projections and of the KV cache (its KV heads), all of the replicated weights.
    ``T = 1`` gives :func:`llama_decode_step_bytes`. MBU under tensor parallelism is this over the
    step time over one GPU's copy bandwidth (every GPU streams its share at the same time).

    LLaMA-7B shapes (vocabulary 32,000), bf16, T = 2: (6,476,005,376 / 2 + 131,338,240) x 2 B =
    6,738,681,856 B of weights per GPU, against 13,214,687,232 B at T = 1.

    Raises:
        ValueError: ``tensor_parallel_size < 1``.
    """
    sharded, replicated = _tp_split(cfg, tensor_parallel_size)
    t = tensor_parallel_size
    return (sharded // t + replicated) * elem_bytes + kv_cache_bytes(cfg, kv_len, batch, elem_bytes) // t


def llama_tp_decode_bytes(cfg: LlamaConfig | dict, prompt_len: int, n_out: int, *, batch: int = 1, elem_bytes: int = 2, tensor_parallel_size: int = 1) -> int:
    """Per-GPU bytes of all ``n_out - 1`` decode steps after the prefill (:func:`llama_tp_decode_step_bytes`)."""
    return sum(llama_tp_decode_step_bytes(cfg, prompt_len + i, batch=batch, elem_bytes=elem_bytes, tensor_parallel_size=tensor_parallel_size)
               for i in range(1, n_out))


def llama_tp_prefill_flops(cfg: LlamaConfig | dict, seq_len: int, *, batch: int = 1, tensor_parallel_size: int = 1) -> float:
    """Per-GPU prefill FLOPs under tensor parallelism ``T``: the layers' projections and attention
    (heads split) divided by ``T``; the LM head on the last token on every rank. ``T = 1`` gives
    :func:`llama_prefill_flops`. (Norms are not counted, as everywhere in this module.)

    Raises:
        ValueError: ``tensor_parallel_size < 1``.
    """
    _tp_split(cfg, tensor_parallel_size)
    head = 2.0 * batch * _get(cfg, "hidden_size") * _get(cfg, "vocab_size")
    return (llama_prefill_flops(cfg, seq_len, batch) - head) / tensor_parallel_size + head


def llama_tp_all_reduces(cfg: LlamaConfig | dict, n_tokens: int, *, elem_bytes: int = 2) -> dict[str, int]:
    """The all-reduces of one forward over ``n_tokens`` tokens (``batch`` for a decode step,
    ``batch x S`` for a prefill) under tensor parallelism: one after each row-parallel projection
    (o-proj and down-proj), each summing a ``[n_tokens, hidden]`` partial output.

    Returns:
        ``{"n_all_reduces": 2 x layers, "bytes_each": n_tokens x hidden x elem_bytes}`` (EventGPT-7B
        decode at batch 1, bf16: 64 all-reduces of 8,192 B).
    """
    return {"n_all_reduces": 2 * _get(cfg, "num_hidden_layers"), "bytes_each": n_tokens * _get(cfg, "hidden_size") * elem_bytes}
