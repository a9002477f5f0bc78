"""Stage 2 event images: vectorized renderers against a per-event reference loop; the simulator."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from conftest import DSEC_H5, SAMPLE_NPY  # noqa: F401

from stagewise.inputs.events import (
    EVENT_DTYPE,
    EventStream,
    read_event_frames,
    read_events,
    split_equal_count,
)
from stagewise.inputs.simulate import moving_edge_events
from stagewise.preprocess.render import (
    render_event_image,
    render_event_images,
    render_event_images_torch,
    save_event_pngs,
)


def reference_image(part: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """EventGPT's rule as a plain loop: white, then each event in stream order paints its pixel."""
    x = part["x"].tolist()
    y = part["y"].tolist()
    p = part["p"].tolist()
    height, width = (max(y) + 1, max(x) + 1) if size is None else size
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    for xi, yi, pi in zip(x, y, p):
        image[yi, xi] = (0, 0, 255) if pi == 0 else (255, 0, 0)
    return image


def assert_images_equal(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype == np.uint8, f"{what}: {got.shape} {got.dtype} vs {want.shape}"
    bad = np.argwhere(np.any(got != want, axis=-1))
    assert bad.size == 0, f"{what}: {len(bad)} pixels differ, first at (y, x) = {tuple(bad[0])}"


@pytest.fixture(scope="module")
def sample() -> EventStream:
    if not SAMPLE_NPY.is_file():
        pytest.skip(f"{SAMPLE_NPY} absent")
    return read_events(SAMPLE_NPY)


@pytest.fixture(scope="module")
def scene() -> EventStream:
    return moving_edge_events()


def collisions(n: int = 3000, size: int = 6, seed: int = 0) -> np.ndarray:
    """Many events on few pixels, both polarities: every pixel is hit ~80 times."""
    rng = np.random.default_rng(seed)
    ev = np.zeros(n, dtype=EVENT_DTYPE)
    ev["t"] = np.arange(n)
    ev["x"] = rng.integers(0, size, n)
    ev["y"] = rng.integers(0, size - 1, n)
    ev["p"] = rng.integers(0, 2, n)
    return ev


# --------------------------------------------------------------------------- numpy renderer vs reference loop


@pytest.mark.parametrize("which", ["sample", "scene"])
def test_renderer_equals_reference_loop(which, request):
    stream = request.getfixturevalue(which)
    parts = split_equal_count(stream.events, 5)
    images = render_event_images(stream.events, 5)  # per-part size, as the reference
    assert len(images) == 5
    for k, (part, image) in enumerate(zip(parts, images)):
        assert_images_equal(image, reference_image(part), f"{which} frame {k}")
    sized = render_event_images(stream.events, 5, sensor_size=(480, 640))
    for k, (part, image) in enumerate(zip(parts, sized)):
        assert_images_equal(image, reference_image(part, (480, 640)), f"{which} frame {k} at 480x640")


def test_last_event_wins():
    ev = np.zeros(4, dtype=EVENT_DTYPE)
    ev["x"], ev["y"], ev["p"] = [1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 1]
    image = render_event_image(ev, 2, 2)
    assert tuple(image[0, 1]) == (0, 0, 255)  # ON then OFF -> blue
    assert tuple(image[1, 0]) == (255, 0, 0)  # OFF then ON -> red
    assert tuple(image[0, 0]) == tuple(image[1, 1]) == (255, 255, 255)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_heavy_collisions_match_reference(seed):
    ev = collisions(seed=seed)
    assert_images_equal(render_event_image(ev, 5, 6), reference_image(ev, (5, 6)), f"seed {seed}")


def test_empty_and_out_of_range():
    empty = np.zeros(0, dtype=EVENT_DTYPE)
    image = render_event_image(empty, 3, 4)
    assert image.shape == (3, 4, 3) and image.dtype == np.uint8 and np.all(image == 255)
    ev = collisions(n=10)
    with pytest.raises(ValueError):
        render_event_image(ev, 2, 2)
    with pytest.raises(ValueError):
        render_event_images(ev, 11)


def test_render_is_faster_than_the_loop(sample):
    # Timed against the reference loop in the same process, so the bound does not depend on
    # the machine: measured ~5 ms vectorized vs ~35 ms for the loop (7x); requiring 3x leaves
    # room for timer noise while still failing for anything loop-like.
    def best_ms(fn, repeats: int) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return min(times)

    parts = split_equal_count(sample.events, 5)
    vectorized = best_ms(lambda: render_event_images(sample.events, 5), 7)
    loop = best_ms(lambda: [reference_image(part) for part in parts], 2)
    assert vectorized * 3 < loop, f"vectorized {vectorized:.1f} ms vs reference loop {loop:.1f} ms for 5 frames"


# --------------------------------------------------------------------------- torch renderer


def torch_devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("which", ["sample", "scene"])
def test_torch_renderer_equals_numpy(which, request):
    stream = request.getfixturevalue(which)
    want = np.stack(render_event_images(stream.events, 5, sensor_size=(480, 640)))
    for device in torch_devices():
        got = torch.stack(render_event_images_torch(stream.events, 5, sensor_size=(480, 640), device=device))
        assert got.dtype == torch.uint8 and got.shape == (5, 480, 640, 3) and got.device.type == device
        assert_images_equal(got.cpu().numpy(), want, f"{which} on {device}")


def test_both_renderers_size_images_by_one_rule():
    """Without a sensor size every image is its own part's extent, on both paths (the reference's
    rule); with one, every image has the sensor's size. Parts of different extents included."""
    ev = collisions(n=1001, size=9, seed=4)
    ev["x"][:200] = np.minimum(ev["x"][:200], 3)  # first part narrower than the rest
    ev["y"][800:] = np.minimum(ev["y"][800:], 5)  # last part shorter
    want = render_event_images(ev, 5)
    sizes = [w.shape[:2] for w in want]
    assert len(set(sizes)) > 1, sizes
    got = render_event_images_torch(ev, 5)
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, (k, g.shape, w.shape)
        assert_images_equal(g.numpy()[None], w[None], f"part {k}")
    full = render_event_images_torch(ev, 5, sensor_size=(12, 11))
    want_full = np.stack(render_event_images(ev, 5, sensor_size=(12, 11)))
    assert_images_equal(torch.stack(full).numpy(), want_full, "sensor size")
    with pytest.raises(ValueError):
        render_event_images_torch(ev, 5, sensor_size=(2, 2))
    with pytest.raises(ValueError):
        render_event_images_torch(ev[:3], 5)


@pytest.mark.gpu
@pytest.mark.gpu
def test_torch_renderer_on_gpu(scene):
    got = torch.stack(render_event_images_torch(scene.events, 5, sensor_size=(480, 640), device="cuda"))
    want = np.stack(render_event_images(scene.events, 5, sensor_size=(480, 640)))
    assert_images_equal(got.cpu().numpy(), want, "cuda")


# --------------------------------------------------------------------------- PNGs and the simulator


def test_save_event_pngs_round_trip(tmp_path, scene):
    paths = save_event_pngs(scene, tmp_path / "out", n_frames=5, stem="clip")
    assert [p.name for p in paths] == [f"clip_{k}.png" for k in range(5)]
    frames = read_event_frames(paths)
    for k, (frame, image) in enumerate(zip(frames, render_event_images(scene.events, 5, scene.sensor_size))):
        assert_images_equal(frame, image, f"png {k}")


def test_simulated_scene_properties(scene):
    ev = scene.events
    assert len(scene) == 60_000 and ev.dtype == EVENT_DTYPE
    assert scene.sensor_size == (480, 640) and scene.source.startswith("simulated:")
    assert np.all(np.diff(ev["t"]) >= 0) and ev["t"].min() >= 0 and ev["t"].max() < 49_000
    assert scene.duration_us < 100_000
    assert int(ev["x"].max()) < 640 and int(ev["y"].max()) < 480
    on = float(np.mean(ev["p"]))
    assert 0.3 < on < 0.7, f"ON share {on:.2f}"
    np.testing.assert_array_equal(moving_edge_events().events, ev)  # deterministic
    assert not np.array_equal(moving_edge_events(seed=1).events, ev)


def test_simulated_bar_leading_edge_is_on():
    # Early in the stream the bar is in the left part of the frame and the disc in the right:
    # in the left third, ON events (leading edge) lie to the right of OFF events (trailing).
    ev = moving_edge_events(n_events=60_000).events
    early = ev[(ev["t"] < 10_000) & (ev["x"] < 200)]
    x_on = np.median(early["x"][early["p"] == 1])
    x_off = np.median(early["x"][early["p"] == 0])
    assert x_on > x_off + 20, f"median x ON {x_on}, OFF {x_off}"


def test_simulate_is_fast_and_validates():
    moving_edge_events()
    start = time.perf_counter()
    moving_edge_events()
    ms = (time.perf_counter() - start) * 1e3
    assert ms < 50, f"simulation took {ms:.1f} ms"
    with pytest.raises(ValueError, match="n_events"):
        moving_edge_events(n_events=0)
