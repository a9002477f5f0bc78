"""The one interface every model family implements, and the data passed between stages.

The benchmark scenario (``stagewise.runner``) drives any model through the same five
stages and never looks inside it:

1. ``load(sample)``           disk -> host arrays             (CPU)
2. ``preprocess(loaded)``     host arrays -> pixel tensor on the device + prompt token ids
3. ``encode_vision(prep)``    pixels -> vision embeddings, computed ONCE per sample
4. ``build_inputs_embeds``    splice vision embeddings into the text embeddings; the
                              engine then runs the LM prefill over them (first token, KV cache)
5. decode                     the engine generates the remaining tokens

The language model is a ``transformers`` ``LlamaForCausalLM`` (``model.lm``) for every
family, so one decode engine serves all of them.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch
from transformers import LlamaForCausalLM

if TYPE_CHECKING:
    from stagewise.inputs.events import EventStream
    from stagewise.models.family import StageOptions


@dataclass
class Sample:
    """One benchmark sample: what to load and what to ask.

    Exactly the sources the model family needs must be set; others stay ``None``.

    Attributes:
        sample_id: unique id within a run (used to pair samples across runs).
        query: the user question placed in the prompt.
        events_path: an event-stream file (``.npy``/``.npz``/``.h5``/``.hdf5``).
        event_image_paths: pre-rendered event frames (PNG), in temporal order.
        video_path: an MP4 file, or a folder of frame images.
        image_path: a single image (LLaVA-1.5).
        events: an in-memory event stream (``stagewise.inputs.events.EventStream``),
            used by the built-in simulated scene; no file is read then.
        sensor_size: ``(height, width)`` of the event sensor when known (for camera files
            without one in their header; coordinates are checked against it).
        window_us: ``(t0_us, t1_us)``: stage 1 reads only the events with
            ``t0_us <= t < t1_us`` of ``events_path`` (one window of a long recording,
            ``--window-ms``); ``None`` reads the whole file.
        trust_pickle: unpickle ``events_path`` with plain ``np.load(allow_pickle=True)``
            (``--trust-pickle``) instead of stagewise's allow-list.
        draft: the same sample as a multimodal draft model reads it (its own input format), or
            ``None``: the draft reads this one (``--speculate multimodal_draft``).
        input_error: a one-line problem found while discovering the sample (e.g. a file
            whose windows could not be scanned); stage 1 raises it as ``InputError``.

    Raises:
        ValueError: ``window_us`` is not two integers with ``t0_us < t1_us``.
    """

    sample_id: str
    query: str
    events_path: Path | None = None
    event_image_paths: list[Path] | None = None
    video_path: Path | None = None
    image_path: Path | None = None
    events: EventStream | None = None
    sensor_size: tuple[int, int] | None = None
    window_us: tuple[int, int] | None = None
    trust_pickle: bool = False
    input_error: str | None = None
    draft: Sample | None = None

    def __post_init__(self) -> None:
        if self.window_us is not None:
            t0, t1 = self.window_us
            if not (isinstance(t0, numbers.Integral) and isinstance(t1, numbers.Integral) and t0 < t1):
                raise ValueError(f"window_us: expected (t0_us, t1_us) integers with t0_us < t1_us, got {self.window_us!r}")


@dataclass
class Loaded:
    """Output of stage 1: an event stream, or frames.

    Attributes:
        stream: an ``EventStream`` (EventGPT on raw events), or ``None``.
        frames: ``N`` images ``[H, W, 3]`` uint8 RGB (sizes may differ), or ``None``.
        source: the file the sample came from (for messages).
        shapes: name -> shape for the report's data-shape table.
        notes: what stage 1 did that a reader of the record should know (e.g. events sorted).
    """

    stream: EventStream | None = None
    frames: Sequence[np.ndarray] | None = None
    source: str = ""
    shapes: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Prepared:
    """Output of stage 2.

    Attributes:
        pixel_values: ``[N, 3, H, W]`` on the model device in the model dtype
            (N = frames or images for this sample).
        input_ids: ``[S_text]`` int64 on the model device; the vision placeholder stands at
            ``placeholder_index`` (a negative id, or the family's placeholder token).
        shapes: name -> shape list for the report's data-shape table.
        placeholder_index: position of the vision placeholder in ``input_ids``, known on the
            host at tokenization (so the splice in stage 4 needs no device-to-host read).
        notes: carried from stage 1, plus what stages 2-4 add (e.g. a prompt cut).
    """

    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    shapes: dict[str, list[int]] = field(default_factory=dict)
    placeholder_index: int = 0
    notes: list[str] = field(default_factory=list)


@runtime_checkable
class MultimodalModel(Protocol):
    """A multimodal LLM seen as five stages: everything the runner, ``verify`` and the engines use.

    Attributes:
        name: family name (``"eventgpt"``, ``"video-llava"``, ``"llava-1.5"``).
        lm: the ``LlamaForCausalLM`` decoder the engines drive.
        eos_token_id: end-of-sequence id of the tokenizer.
        n_frames: images per sample.
    """

    name: str
    lm: LlamaForCausalLM
    eos_token_id: int
    n_frames: int

    @property
    def device(self) -> torch.device:
        """Device of all weights."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of all weights."""
        ...

    @property
    def n_vision_tokens(self) -> int:
        """Vision embeddings per sample (sizes the static KV cache)."""
        ...

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prefill the LM accepts."""
        ...

    def configure(self, options: StageOptions) -> StageOptions:
        """Apply stage options; returns what was applied (raises ``ValueError`` for what it cannot serve)."""
        ...

    def applicable(self, options: StageOptions) -> StageOptions:
        """The subset of ``options`` this model and device can serve."""
        ...

    def load(self, sample: Sample) -> Loaded:
        """Stage 1: read the sample's inputs from disk into host memory."""
        ...

    def preprocess(self, loaded: Loaded, query: str) -> Prepared:
        """Stage 2: render / resize / normalize pixels onto the device; tokenize the prompt."""
        ...

    def encode_vision(self, prepared: Prepared) -> torch.Tensor:
        """Stage 3: ``[N_vision, hidden]`` vision embeddings in LM space, model dtype."""
        ...

    def build_inputs_embeds(self, prepared: Prepared, vision: torch.Tensor) -> torch.Tensor:
        """Stage 4 (first part): ``[S_prefill, hidden]`` LM input embeddings, vision spliced in."""
        ...

    def generate_fused(self, prepared: Prepared, max_new_tokens: int, eos_token_id: int | None) -> list[int]:
        """The fused reference path: pixels in, one ``generate`` call, greedy token ids out."""
        ...

    def decode_text(self, ids: Sequence[int]) -> str:
        """Token ids -> text, special tokens skipped."""
        ...

    def vision_flops(self, n_images: int) -> float:
        """FLOPs of stage 3 for ``n_images`` images."""
        ...

    def describe(self) -> dict[str, object]:
        """Architecture and applied-option facts for ``config.json``."""
        ...
