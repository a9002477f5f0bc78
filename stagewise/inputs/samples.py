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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stagewise.errors import InputError
from stagewise.inputs.events import EVENT_SUFFIXES, EventStream, read_events
from stagewise.models.base import Sample
from stagewise.preprocess.prompt import DEFAULT_QUERY

INPUT_FORMATS = ("events", "png", "mp4")
DEFAULT_FORMAT = {"eventgpt": "events", "video-llava": "mp4", "llava-1.5": "mp4"}
"""The input each family reads unless ``--input-format`` says otherwise."""


def simulated_samples(n: int, query: str = DEFAULT_QUERY) -> list[Sample]:
    """``n`` samples of the built-in moving-edge scene (seeds 0..n-1); no files needed."""
    from stagewise.inputs.simulate import moving_edge_events

    return [Sample(sample_id=f"sim{i:03d}", query=query, events=moving_edge_events(seed=i)) for i in range(n)]


@dataclass
class EventSamples:
    """The samples found under ``--events``, and what discovery saw on the way.

    Attributes:
        samples: one per file, or one per non-empty window with ``--window-ms``; a file
            that could not be scanned for windows is one sample carrying ``input_error``.
        n_files: files considered (hidden files, names starting with ``.``, are ignored).
        n_windows: windowed samples (0 without ``--window-ms``).
        n_empty_windows: empty windows skipped, over all files.
        unsupported: files whose suffix no reader handles; each is still a sample, which
            fails at stage 1 ("unsupported event file type ...").
        unreadable: ``(file, one-line error)`` for files whose windows could not be found.
    """

    samples: list[Sample]
    n_files: int = 0
    n_windows: int = 0
    n_empty_windows: int = 0
    unsupported: list[Path] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the console, e.g. ``"3 event file(s) -> 41 sample(s) (40 windows, 2 empty
        windows skipped); 1 unsupported file(s): notes.txt"``."""
        text = f"{self.n_files} event file(s) -> {len(self.samples)} sample(s)"
        if self.n_windows:
            text += f" ({self.n_windows} windows, {self.n_empty_windows} empty windows skipped)"
        if self.unsupported:
            names = ", ".join(p.name for p in self.unsupported[:5]) + (", ..." if len(self.unsupported) > 5 else "")
            text += f"; {len(self.unsupported)} unsupported file(s), which fail at stage 1: {names}"
        if self.unreadable:
            names = ", ".join(p.name for p, _ in self.unreadable[:5]) + (", ..." if len(self.unreadable) > 5 else "")
            text += f"; {len(self.unreadable)} unreadable file(s), which fail at stage 1: {names}"
        return text


def discover_event_samples(
    path: str | Path,
    query: str = DEFAULT_QUERY,
    *,
    window_us: int | None = None,
    max_windows: int | None = None,
    sensor_size: tuple[int, int] | None = None,
    trust_pickle: bool = False,
) -> EventSamples:
    """Samples from ``--events``: a file, or every regular file under a folder.

    Every file becomes a sample (never skipped silently): unsupported suffixes and unreadable
    files are listed in the result and fail at stage 1 with a one-line ``InputError``. Ids are
    the file's path relative to the folder without its suffix (the file's stem for a single
    file), with the suffix kept where two files would share an id; a window's id is
    ``<file>@<t0_us>``.

    Args:
        path: an event file or a folder (searched recursively; hidden files ignored).
        query: the question of every sample.
        window_us: cut each recording into consecutive windows ``[t0, t0 + window_us)``
            (:mod:`stagewise.inputs.windows`), one sample per non-empty window; ``None``: one
            sample per file.
        max_windows: at most this many (the first) non-empty windows per file.
        sensor_size: ``(height, width)`` given to every sample (camera files without a size).
        trust_pickle: set on every sample (see :class:`Sample`).

    Returns:
        :class:`EventSamples`.

    Raises:
        InputError: ``path`` missing, or a folder with no (non-hidden) files.
        ValueError: ``window_us < 1`` or ``max_windows < 1``; ``max_windows`` without ``window_us``.
    """
    if max_windows is not None and window_us is None:
        raise ValueError("max-windows: needs --window-ms")
    if window_us is not None and window_us < 1:
        raise ValueError(f"window-ms: must be > 0, got {window_us / 1000} ms")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max-windows: must be >= 1, got {max_windows}")
    path = Path(path)
    if path.is_file():
        files, ids = [path], {path: path.stem}
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise InputError(path, f"folder holds no files (event files: {', '.join(EVENT_SUFFIXES)})")
        ids = _file_ids(path, files)
    else:
        raise InputError(path, "no such file or folder")

    out = EventSamples(samples=[], n_files=len(files))
    common: dict[str, Any] = {"query": query, "sensor_size": sensor_size, "trust_pickle": trust_pickle}
    for f in files:
        sid = ids[f]
        if f.suffix.lower() not in EVENT_SUFFIXES:
            out.unsupported.append(f)
            out.samples.append(Sample(sample_id=sid, events_path=f, **common))
            continue
        if window_us is None:
            out.samples.append(Sample(sample_id=sid, events_path=f, **common))
            continue
        from stagewise.inputs.windows import plan_windows

        try:
            plan = plan_windows(f, window_us, max_windows=max_windows, sensor_size=sensor_size, trust_pickle=trust_pickle)
        except InputError as err:
            out.unreadable.append((f, str(err)))
            out.samples.append(Sample(sample_id=sid, events_path=f, input_error=str(err), **common))
            continue
        out.n_empty_windows += plan.n_empty
        out.n_windows += len(plan.starts_us)
        for t0 in plan.starts_us:
            out.samples.append(Sample(sample_id=f"{sid}@{t0}", events_path=f, window_us=(t0, t0 + window_us), **common))
    return out


def _file_ids(root: Path, files: list[Path]) -> dict[Path, str]:
    """Relative path without suffix; with the suffix where two files would share an id."""
    bare = {f: str(f.relative_to(root).with_suffix("")) for f in files}
    counts: dict[str, int] = {}
    for v in bare.values():
        counts[v] = counts.get(v, 0) + 1
    return {f: (v if counts[v] == 1 else str(f.relative_to(root))) for f, v in bare.items()}


def event_file_samples(path: Path, query: str = DEFAULT_QUERY) -> list[Sample]:
    """One sample per file: ``path`` itself, or every (non-hidden) file in the folder ``path``
    (:func:`discover_event_samples` without windows; unsupported files included).

    Raises:
        InputError: path missing, or a folder with no files.
    """
    return discover_event_samples(path, query).samples


def read_sample_events(sample: Sample, sensor_size: tuple[int, int] | None = None) -> EventStream:
    """Stage 1 of an event-file sample: its file, or only its window, as an :class:`EventStream`.

    Args:
        sample: a sample with ``events_path`` (``window_us``, ``sensor_size``,
            ``trust_pickle`` and ``input_error`` honoured).
        sensor_size: ``(height, width)`` used when the sample has none.

    Raises:
        InputError: ``sample.input_error`` (a problem found at discovery), no
            ``events_path``, or anything :func:`read_events` raises.
    """
    if sample.input_error:
        raise InputError(None, sample.input_error)
    if sample.events_path is None:
        raise InputError(None, f"sample {sample.sample_id}: no event file")
    t0, t1 = sample.window_us if sample.window_us is not None else (None, None)
    return read_events(sample.events_path, trust_pickle=sample.trust_pickle, sensor_size=sample.sensor_size or sensor_size, t0_us=t0, t1_us=t1)


def _query_of(json_path: Path, i: int, entry: dict[str, Any], default: str) -> str:
    turns = entry.get("conversations")
    if turns is None:
        return default
    if not isinstance(turns, list):
        raise InputError(json_path, f"entry {i}: 'conversations' must be a list of turns, got {type(turns).__name__}")
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise InputError(json_path, f"entry {i}: conversations[{k}] must be an object with 'from' and 'value', got {type(turn).__name__}")
        if turn.get("from") in ("human", "user"):
            value = turn.get("value", "")
            if not isinstance(value, str):
                raise InputError(json_path, f"entry {i}: conversations[{k}].value must be a string, got {type(value).__name__}")
            q = value
            for marker in ("<event>", "<image>", "<video>"):
                q = q.replace(marker, "")
            return q.strip() or default
    return default


def _name_field(json_path: Path, i: int, entry: dict[str, Any], key: str) -> str | None:
    """A file-name field: a non-empty string, or ``None`` when absent or empty."""
    value = entry.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InputError(json_path, f"entry {i}: '{key}' must be a file name (a string), got {type(value).__name__}")
    return value


def dataset_samples(
    json_path: Path,
    input_format: str,
    root: Path | None = None,
    query: str | None = None,
    *,
    sensor_size: tuple[int, int] | None = None,
    trust_pickle: bool = False,
) -> list[Sample]:
    """Samples of a seeds-style dataset JSON, reading the source ``input_format`` names.

    Args:
        sensor_size / trust_pickle: set on every sample (see :class:`Sample`).

    Raises:
        InputError: unreadable JSON, not a list, an entry that is not an object or has a
            malformed field (``"entry <i>: ..."``), an entry lacking the field the format
            needs (named with its index).
        ValueError: unknown ``input_format``.
    """
    json_path = Path(json_path)
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input-format: expected one of {', '.join(INPUT_FORMATS)}, got {input_format!r}")
    try:
        entries = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(json_path, "dataset JSON not found") from None
    except (OSError, ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InputError(json_path, f"not JSON ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    if not isinstance(entries, list):
        raise InputError(json_path, "dataset JSON must be a list of samples")
    root = Path(root) if root else json_path.parent
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise InputError(json_path, f"entry {i}: must be an object with event_data / event_image / video_data / conversations, got {type(e).__name__}")
        raw_id = e.get("id", e.get("sample_id"))
        if raw_id is not None and not isinstance(raw_id, (str, int)):
            raise InputError(json_path, f"entry {i}: 'id' must be a string or an integer, got {type(raw_id).__name__}")
        event_data = _name_field(json_path, i, e, "event_data")
        sid = str(raw_id) if raw_id not in (None, "") else str(Path(event_data).with_suffix("")) if event_data else str(i)
        s = Sample(sample_id=sid, query=query or _query_of(json_path, i, e, DEFAULT_QUERY), sensor_size=sensor_size, trust_pickle=trust_pickle)
        if input_format == "events":
            if not event_data:
                raise InputError(json_path, f"entry {i} has no 'event_data' (needed for --input-format events)")
            s.events_path = root / "event_npy" / event_data
        elif input_format == "png":
            imgs = e.get("event_image")
            if not imgs:
                raise InputError(json_path, f"entry {i} has no 'event_image' list (needed for --input-format png)")
            names = imgs if isinstance(imgs, list) else [imgs]
            bad = [k for k, name in enumerate(names) if not isinstance(name, str) or not name]
            if bad:
                raise InputError(json_path, f"entry {i}: 'event_image' must be a file name or a list of them (strings); item {bad[0]} is {names[bad[0]]!r}")
            s.event_image_paths = [root / "event_image" / p for p in names]
        else:
            name = _name_field(json_path, i, e, "video_data")
            if not name:
                raise InputError(json_path, f"entry {i} has no 'video_data' (needed for --input-format mp4)")
            name = name.removesuffix(".mp4")
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
