"""A small SYNTHETIC event stream: the built-in default input of ``stagewise run``.

Why: the main job must run with no files and no network. The scene is not a camera
recording and carries no meaning for the model; it exists so that every stage (render,
CLIP preprocessing, vision, prefill, decode) gets input of realistic size and structure
(~60k events in < 100 ms on a 640x480 sensor, like EventGPT's public sample).

The scene: a bright vertical bar sweeps left to right while a dark disc moves right to
left. An event camera reports brightness changes, so the bar fires ON events (p = 1) on
its leading (right) edge and OFF events (p = 0) on its trailing edge; the dark disc fires
OFF on its leading (left) half-circle and ON on its trailing half. A few percent of the
events are uniform background noise of random polarity.
"""

from __future__ import annotations

import numpy as np

from stagewise.inputs.events import EVENT_DTYPE, EventStream

# Share of the events per source: bar leading, bar trailing, disc leading, disc trailing, noise.
_SOURCE_SHARES = np.array([0.30, 0.25, 0.20, 0.17, 0.08])


def moving_edge_events(
    *,
    height: int = 480,
    width: int = 640,
    duration_us: int = 49_000,
    n_events: int = 60_000,
    seed: int = 0,
) -> EventStream:
    """Simulate the moving-edge scene (synthetic data, see the module docstring).

    Args:
        height: sensor height in pixels.
        width: sensor width in pixels.
        duration_us: the events' timestamps lie in ``[0, duration_us)`` microseconds.
        n_events: exact number of events.
        seed: seed of the NumPy generator; the same arguments give the same stream.

    Returns:
        An :class:`EventStream` of ``n_events`` ``EVENT_DTYPE`` events sorted by ``t``,
        with ``height``/``width`` set and ``source`` naming the simulation.

    Raises:
        ValueError: a size, the duration or ``n_events`` is < 1 (the message names it).
    """
    for name, value in (("height", height), ("width", width), ("duration_us", duration_us), ("n_events", n_events)):
        if value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")
    rng = np.random.default_rng(seed)
    n = n_events
    t = np.sort(rng.integers(0, duration_us, size=n, dtype=np.int64))  # [N] us
    phase = t / duration_us  # [N] in [0, 1)
    source = rng.choice(len(_SOURCE_SHARES), size=n, p=_SOURCE_SHARES)  # [N] in 0..4

    x = np.zeros(n, dtype=np.float64)  # noise events (source 4) are placed below
    y = np.zeros(n, dtype=np.float64)
    p = np.empty(n, dtype=np.uint8)

    # Bright bar, width bar_w, left edge moving from -bar_w to width over the stream.
    bar_w = max(2.0, 0.1 * width)
    left = -bar_w + (width + bar_w) * phase  # [N]
    for src, edge, polarity in ((0, left + bar_w, 1), (1, left, 0)):
        m = source == src
        x[m] = edge[m] + rng.normal(0.0, 1.5, size=int(m.sum()))
        y[m] = rng.uniform(0, height, size=int(m.sum()))
        p[m] = polarity

    # Dark disc moving right to left through the lower middle of the frame.
    radius = max(2.0, 0.15 * min(height, width))
    cx = width * (0.85 - 0.7 * phase)  # [N]
    cy = height * 0.55
    for src, lo, polarity in ((2, 0.5 * np.pi, 0), (3, -0.5 * np.pi, 1)):
        # leading (left) half: angles in (pi/2, 3pi/2) -> darker -> OFF; trailing half -> ON
        m = source == src
        k = int(m.sum())
        angle = rng.uniform(lo, lo + np.pi, size=k)
        r = radius + rng.normal(0.0, 1.5, size=k)
        x[m] = cx[m] + r * np.cos(angle)
        y[m] = cy + r * np.sin(angle)
        p[m] = polarity

    # Background noise, and every event that fell off the sensor becomes noise too.
    xi = np.floor(x).astype(np.int64)
    yi = np.floor(y).astype(np.int64)
    noise = (source == 4) | (xi < 0) | (xi >= width) | (yi < 0) | (yi >= height)
    k = int(noise.sum())
    xi[noise] = rng.integers(0, width, size=k)
    yi[noise] = rng.integers(0, height, size=k)
    p[noise] = rng.integers(0, 2, size=k, dtype=np.uint8)

    events = np.empty(n, dtype=EVENT_DTYPE)
    events["t"] = t
    events["x"] = xi
    events["y"] = yi
    events["p"] = p
    source_name = f"simulated:moving_edge(height={height}, width={width}, duration_us={duration_us}, n_events={n}, seed={seed})"
    return EventStream(events=events, height=height, width=width, source=source_name)
