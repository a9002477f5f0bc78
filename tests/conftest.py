"""Shared test fixtures: where the real data lives, and a tiny EventGPT."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(os.environ.get("STAGEWISE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SAMPLE_NPY = SHARED_DATA / "events" / "eventgpt_sample1.npy"
DSEC_H5 = SHARED_DATA / "events" / "dsec_interlaken_00_d_000069_events.h5"
LLAMA_TOKENIZER = SHARED_DATA / "tokenizers" / "llama2" / "tokenizer.model"

# Without a GPU the Triton kernels' tests (test_quant.py) run in Triton's interpreter, which must be
# on before triton is first imported (transformers imports it); with a GPU they run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def require(path: Path) -> Path:
    """Skip the test when a real-data file is absent."""
    if not path.is_file():
        pytest.skip(f"real data not present: {path}")
    return path


@pytest.fixture(scope="session")
def tiny_eventgpt():
    """The eventgpt-tiny preset, fp32 on CPU (shared: tests must not mutate it)."""
    from stagewise.models.registry import build_random

    return build_random("eventgpt-tiny", device="cpu", dtype=torch.float32, seed=0)


@pytest.fixture(scope="module")
def triton_device():
    """Where the Triton kernels' tests run: ``"cuda"`` when present, else ``"cpu"`` under Triton's
    interpreter (switched on above, before triton is imported); skips without Triton, or when
    the kernels were defined before the interpreter was on."""
    from stagewise.engine import quant as Q

    if not Q.triton_available():
        pytest.skip("triton not installed")
    if torch.cuda.is_available():
        Q.ensure_triton()
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    Q.ensure_triton()
    import stagewise.engine.quant_triton as QT

    if type(QT._gemm_kernel).__name__ != "InterpretedFunction":
        pytest.skip("the Triton kernels were defined before the interpreter was switched on")
    return "cpu"


def cuda_graph_of(fn, *args):
    """Capture ``fn(*args)`` in a CUDA graph, after one warm-up call on a side stream (as capture
    requires). Returns ``(graph, static_out)``: each ``graph.replay()`` rewrites ``static_out``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(*args)
    return graph, static_out


def decoupled(model, prepared, n: int, eos: int | None) -> tuple[list[int], int]:
    """The decoupled path by hand: encode_vision once -> build_inputs_embeds -> HFEngine.

    Returns ``(greedy ids, number of tokens)``.
    """
    from stagewise.engine.hf import HFEngine

    vision = model.encode_vision(prepared)
    emb = model.build_inputs_embeds(prepared, vision)[None]  # [1, S, D]
    eng = HFEngine(model.lm)
    out = eng.decode(eng.prefill(emb, [emb.shape[1]]), n, eos)
    return out.tokens[0, : out.n_tokens[0]].tolist(), out.n_tokens[0]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
