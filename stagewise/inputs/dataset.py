"""Build a seeds-style dataset that drives all three models on the same samples.

For each event stream it writes, under ``<out>``:

- ``event_npy/<id>.npy``        the stream (structured ``EVENT_DTYPE`` array: no pickle);
- ``event_image/<id>_<k>.png``  EventGPT's 5 event images (k = 0..4);
- ``mp4/<id>.mp4``              an 8-frame video of event images (8 equal-count parts),
                                what Video-LLaVA reads (and LLaVA's middle frame);
- ``video/<id>/<k>.png``        the same 8 frames as a frame folder;
- ``dataset.json``              entries with ``id``, ``event_data``, ``event_image``,
                                ``video_data`` and ``conversations``.

So the fairness switch (``--input-format png`` / ``mp4``) can feed every model the same
pixels in the same file format, and the default formats feed each its native input.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stagewise.inputs.events import EventStream, write_events
from stagewise.preprocess.prompt import DEFAULT_QUERY
from stagewise.preprocess.render import render_event_images, save_event_pngs

N_VIDEO_FRAMES = 8
"""Video-LLaVA samples 8 frames per video (EVENTGPT.md)."""


def build_dataset(streams: dict[str, EventStream], out: Path, *, query: str = DEFAULT_QUERY, fps: int = 20, write_video: bool = True) -> Path:
    """Write the dataset for ``streams`` (id -> stream) under ``out``; returns ``dataset.json``.

    Frames are rendered at the stream's sensor size (else max coordinate + 1, rounded up
    to even for the H.264 encoder).

    Raises:
        ValueError: an empty stream or a stream with fewer events than frames.
        ImportError: ``write_video`` without PyAV installed.
    """
    from PIL import Image

    out = Path(out)
    entries = []
    for sid, stream in streams.items():
        ev = stream.events
        h = stream.height or int(ev["y"].max()) + 1
        w = stream.width or int(ev["x"].max()) + 1
        h, w = h + h % 2, w + w % 2
        (out / "event_npy").mkdir(parents=True, exist_ok=True)
        write_events(out / "event_npy" / f"{sid}.npy", stream)
        pngs = save_event_pngs(ev, out / "event_image", n_frames=5, sensor_size=(h, w), stem=sid)
        entry = {
            "id": sid,
            "event_data": f"{sid}.npy",
            "event_image": [p.name for p in pngs],
            "conversations": [{"from": "human", "value": f"<event>\n{query}"}, {"from": "gpt", "value": ""}],
        }
        if write_video:
            from stagewise.inputs.video import write_mp4

            frames = np.stack(render_event_images(ev, n_frames=N_VIDEO_FRAMES, sensor_size=(h, w)))
            write_mp4(out / "mp4" / f"{sid}.mp4", frames, fps=fps)
            folder = out / "video" / sid
            folder.mkdir(parents=True, exist_ok=True)
            for k, f in enumerate(frames):
                Image.fromarray(f).save(folder / f"{k:02d}.png")
            entry["video_data"] = sid
        entries.append(entry)
    path = out / "dataset.json"
    path.write_text(json.dumps(entries, indent=2))
    return path
