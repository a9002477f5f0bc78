"""Where samples come from: one event file, a folder of them, a dataset JSON, or the
built-in simulated scene.

The dataset JSON is the seeds' format: a list of entries with ``event_data`` (a file under
``<root>/event_npy/``), ``event_image`` (PNG files under ``<root>/event_image/``),
``video_data`` (``<root>/mp4/<name>.mp4``, else the frame folder ``<root>/video/<name>/``)
and ``conversations`` (the first human turn is the query; ``<event>``/``<image>``/``<video>``
markers are removed). ``<root>`` is the JSON's folder unless given.

``input_format`` chooses which of a sample's sources a model reads (the fairness switch):
``events`` (raw stream), ``png`` (pre-rendered event frames), ``mp4`` (video, falling back to
the frame folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stagewise.errors import InputError
from stagewise.models.base import Sample
from stagewise.preprocess.prompt import DEFAULT_QUERY

EVENT_SUFFIXES = (".npy", ".npz", ".h5", ".hdf5")
INPUT_FORMATS = ("events", "png", "mp4")
DEFAULT_FORMAT = {"eventgpt": "events", "video-llava": "mp4", "llava-1.5": "mp4"}
"""The input each family reads unless ``--input-format`` says otherwise."""


def simulated_samples(n: int, query: str = DEFAULT_QUERY) -> list[Sample]:
    """``n`` samples of the built-in moving-edge scene (seeds 0..n-1); no files needed."""
    from stagewise.inputs.simulate import moving_edge_events

    return [Sample(sample_id=f"sim{i:03d}", query=query, events=moving_edge_events(seed=i)) for i in range(n)]


def event_file_samples(path: Path, query: str = DEFAULT_QUERY) -> list[Sample]:
    """One sample per event file: ``path`` itself, or every event file in the folder ``path``.

    Raises:
        InputError: path missing, or a folder with no event files.
    """
    path = Path(path)
    if path.is_file():
        return [Sample(sample_id=path.stem, query=query, events_path=path)]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in EVENT_SUFFIXES and p.is_file())
        if not files:
            raise InputError(path, f"folder holds no event files ({', '.join(EVENT_SUFFIXES)})")
        return [Sample(sample_id=str(p.relative_to(path).with_suffix("")), query=query, events_path=p) for p in files]
    raise InputError(path, "no such file or folder")


def _query_of(entry: dict[str, Any], default: str) -> str:
    for turn in entry.get("conversations") or []:
        if turn.get("from") in ("human", "user"):
            q = str(turn.get("value", ""))
            for marker in ("<event>", "<image>", "<video>"):
                q = q.replace(marker, "")
            return q.strip() or default
    return default


def dataset_samples(json_path: Path, input_format: str, root: Path | None = None, query: str | None = None) -> list[Sample]:
    """Samples of a seeds-style dataset JSON, reading the source ``input_format`` names.

    Raises:
        InputError: unreadable JSON, not a list, an entry lacking the field the format
            needs (named with its index), a missing referenced file.
    """
    json_path = Path(json_path)
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input-format: expected one of {', '.join(INPUT_FORMATS)}, got {input_format!r}")
    try:
        entries = json.loads(json_path.read_text())
    except FileNotFoundError:
        raise InputError(json_path, "dataset JSON not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(json_path, f"not JSON ({e})") from None
    if not isinstance(entries, list):
        raise InputError(json_path, "dataset JSON must be a list of samples")
    root = Path(root) if root else json_path.parent
    out = []
    for i, e in enumerate(entries):
        sid = str(e.get("id") or e.get("sample_id") or (Path(str(e.get("event_data", i))).with_suffix("")))
        s = Sample(sample_id=sid, query=query or _query_of(e, DEFAULT_QUERY))
        if input_format == "events":
            if not e.get("event_data"):
                raise InputError(json_path, f"entry {i} has no 'event_data' (needed for --input-format events)")
            s.events_path = root / "event_npy" / e["event_data"]
        elif input_format == "png":
            imgs = e.get("event_image")
            if not imgs:
                raise InputError(json_path, f"entry {i} has no 'event_image' list (needed for --input-format png)")
            s.event_image_paths = [root / "event_image" / p for p in (imgs if isinstance(imgs, list) else [imgs])]
        else:
            name = e.get("video_data")
            if not name:
                raise InputError(json_path, f"entry {i} has no 'video_data' (needed for --input-format mp4)")
            name = str(name).removesuffix(".mp4")
            mp4, folder = root / "mp4" / f"{name}.mp4", root / "video" / name
            s.video_path = mp4 if mp4.is_file() or not folder.is_dir() else folder
        out.append(s)
    return out


def to_format(samples: list[Sample], input_format: str) -> list[Sample]:
    """Check that every sample has the source ``input_format`` needs.

    Raises:
        InputError: a sample lacks it (named).
    """
    need = {"events": lambda s: s.events is not None or s.events_path is not None, "png": lambda s: bool(s.event_image_paths), "mp4": lambda s: s.video_path is not None}[input_format]
    for s in samples:
        if not need(s):
            raise InputError(None, f"sample {s.sample_id} has no input for --input-format {input_format}")
    return samples
