"""Per-sample results: the record schema, and the ``samples.jsonl`` writer/reader.

Interval definitions (all in ms, each between two named end points; the runner puts
a device synchronization at every stage boundary, so the intervals tile the sample):

- ``load_ms``        sample start -> inputs in host memory (stage 1)
- ``preprocess_ms``  -> pixel tensor on the device and prompt ids ready (stage 2)
- ``vision_ms``      -> vision embeddings in LM space ready (stage 3)
- ``prefill_ms``     -> splice done, KV cache filled, first token on the device (stage 4)
- ``decode_ms``      -> last token on the device (stage 5)
- ``e2el_ms``        sample start -> last token (end-to-end latency), measured by its own clock
- ``stage_gap``      |sum of the five stages - e2el_ms| / e2el_ms (checked <= 2 %)
- ``ttft_ms``        load + preprocess + vision + prefill (time to first token)
- ``tpot_ms``        (e2el_ms - ttft_ms) / (n_output_tokens - 1): time per output token after
                     the first (vLLM's TPOT)
- ``itl_ms``         the device time of each decode step (inter-token latencies), in order
- ``decode_throughput_tok_s``  (n_output_tokens - 1) / decode_ms

Speculative decoding (``--speculate``) adds ``n_drafted_tokens``, ``n_accepted_tokens``,
``acceptance_rate`` (accepted / drafted), ``mean_accepted_length`` (tokens per verify step, the bonus
token included), ``draft_ms`` and ``verify_ms`` (sub-stages of decode: decode_ms = draft_ms +
verify_ms + the loop's bookkeeping), ``n_verify_steps`` and ``n_host_syncs``; ``itl_ms`` then holds
one entry per verify step (the time between two bursts of tokens). A draft model's own stages
(``draft_load``, ``draft_preprocess``, ``draft_vision``, ``draft_prefill``) are timed between prefill
and decode and kept in ``draft_stage_ms``; the stage sum with them tiles the sample.

Vocabulary: vLLM's, with units in the names (``docs/metrics.md``). Records written by older
versions (``e2e_ms``, ``itl_p50_ms``...) are read with their fields mapped (:data:`LEGACY_FIELDS`).

In a batch, the stage times are those of the whole batch (each sample of a batch
carries the same ones) and ``batch_size`` says how many samples shared them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from stagewise import STAGES
from stagewise.errors import InputError

LEGACY_FIELDS = {"e2e_ms": "e2el_ms", "decode_tok_s": "decode_throughput_tok_s"}
"""Record fields renamed since the first runs were committed: old name -> current name."""


@dataclass
class SampleRecord:
    """One line of ``samples.jsonl``: everything measured for one sample.

    Times are ms, sizes bytes, rates tokens/s. ``error`` is set (and the timing
    fields stay ``None``) when the sample failed; the run goes on.
    """

    sample_id: str
    model: str
    engine: str
    batch_size: int = 1
    load_ms: float | None = None
    preprocess_ms: float | None = None
    vision_ms: float | None = None
    prefill_ms: float | None = None
    decode_ms: float | None = None
    e2el_ms: float | None = None
    stage_gap: float | None = None
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    decode_throughput_tok_s: float | None = None
    n_images: int | None = None
    n_vision_tokens: int | None = None
    n_text_tokens: int | None = None
    n_prefill_tokens: int | None = None
    n_output_tokens: int | None = None
    kv_cache_bytes: int | None = None
    peak_gpu_mem_bytes: int | None = None
    output_text: str | None = None
    output_ids: list[int] = field(default_factory=list)
    decoding: str | None = None
    seed: int | None = None
    quantization: str | None = None
    weight_bytes_per_step: int | None = None
    speculative_method: str | None = None
    num_speculative_tokens: int | None = None
    n_verify_steps: int | None = None
    n_drafted_tokens: int | None = None
    n_accepted_tokens: int | None = None
    acceptance_rate: float | None = None
    mean_accepted_length: float | None = None
    draft_ms: float | None = None
    verify_ms: float | None = None
    n_host_syncs: int | None = None
    draft_stage_ms: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the sample ran to the end."""
        return self.error is None

    def stage_ms(self) -> dict[str, float | None]:
        """``{stage: ms}`` for the five stages, in pipeline order."""
        return {s: getattr(self, f"{s}_ms") for s in STAGES}

    def to_json(self) -> str:
        """One JSON line; non-finite floats become ``null``."""
        return json.dumps(_finite(asdict(self)), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SampleRecord":
        """Inverse of ``asdict``; older field names are mapped (:data:`LEGACY_FIELDS`), unknown keys
        ignored (forward compatibility)."""
        names = {f.name for f in fields(cls)}
        d = {LEGACY_FIELDS.get(k, k): v for k, v in d.items()}
        return cls(**{k: v for k, v in d.items() if k in names})


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


class SampleWriter:
    """Appends records to ``samples.jsonl`` as each sample finishes (flushed and fsynced),
    so that a killed run loses nothing it had finished and can resume."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, record: SampleRecord) -> None:
        """Append one record and push it to disk."""
        self._fh.write(record.to_json() + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        """Close the file (records already written are on disk)."""
        self._fh.close()

    def __enter__(self) -> "SampleWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_samples(path: Path) -> list[SampleRecord]:
    """Read ``samples.jsonl``. A truncated last line (a run killed mid-write) is skipped.

    Raises:
        InputError: the file is missing, or a line other than the last is not JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such samples file")
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[SampleRecord] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(SampleRecord.from_dict(json.loads(line)))
        except (json.JSONDecodeError, TypeError) as e:
            if i == len(lines) - 1:
                break  # a partial last line: the sample is redone on resume
            raise InputError(path, f"line {i + 1} is not a sample record ({e})") from None
    return out


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, non-finite floats as ``null``."""
    Path(path).write_text(json.dumps(_finite(obj), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
