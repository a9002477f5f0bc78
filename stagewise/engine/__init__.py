"""Stages 4 and 5: drive a LLaMA-family decoder through prefill and decode.

``hf``   -- the reference: ``transformers``' own forward with a ``DynamicCache``, one
            Python step per token (the seeds' method).
``fast`` -- stagewise's engine: static KV cache, CUDA-graph captured decode step,
            no host synchronization per token.

Layer math (:mod:`~stagewise.engine.layers`), token selection (:mod:`~stagewise.engine.sampling`)
and the engines' shared contract (:mod:`~stagewise.engine.base`) sit beside them.
"""

from __future__ import annotations

from transformers import LlamaForCausalLM

from stagewise.engine.fast import FastEngine, FastOptions
from stagewise.engine.hf import HFEngine, HFOptions

ENGINES: dict[str, tuple[type, type]] = {"hf": (HFEngine, HFOptions), "fast": (FastEngine, FastOptions)}
"""Engine name -> (engine class, its options class)."""


def make_engine(name: str, lm: LlamaForCausalLM, options: HFOptions | FastOptions | None = None) -> HFEngine | FastEngine:
    """Build the engine called ``name`` over the ``LlamaForCausalLM`` ``lm``.

    Args:
        options: that engine's options (default: its defaults).

    Raises:
        ValueError: unknown engine name, or options of another engine.
    """
    if name not in ENGINES:
        raise ValueError(f"engine: unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    cls, opt_cls = ENGINES[name]
    if options is None:
        options = opt_cls()
    if not isinstance(options, opt_cls):
        raise ValueError(f"engine: {name} takes {opt_cls.__name__}, got {type(options).__name__}")
    return cls(lm, options)
