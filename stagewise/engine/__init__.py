"""Decode engines: drive a LLaMA-family decoder through prefill and decode.

``hf``   -- the reference: ``transformers``' own forward with a ``DynamicCache``, one
            Python step per token (the seeds' method).
``fast`` -- stagewise's engine: static KV cache, CUDA-graph captured decode step,
            no host synchronization per token.
"""

from __future__ import annotations

from typing import Any

ENGINES = ("hf", "fast")


def make_engine(name: str, lm: Any, **kwargs: Any):
    """Build the engine called ``name`` over the ``LlamaForCausalLM`` ``lm``.

    Raises:
        ValueError: unknown engine name.
    """
    if name == "hf":
        from stagewise.engine.hf import HFEngine

        return HFEngine(lm, **kwargs)
    if name == "fast":
        from stagewise.engine.fast import FastEngine

        return FastEngine(lm, **kwargs)
    raise ValueError(f"engine: unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
