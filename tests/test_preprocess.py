"""Stage 2 CLIP preprocessing: transformers' processor, an independent check of it, and the torch path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DSEC_H5, SAMPLE_NPY  # noqa: F401

from stagewise.inputs.events import read_events
from stagewise.inputs.simulate import moving_edge_events
from stagewise.preprocess.clip import (
    CLIP_MEAN,
    CLIP_STD,
    clip_image_processor,
    clip_preprocess,
    clip_preprocess_torch,
    resized_size,
)
from stagewise.preprocess.render import render_event_images, render_event_images_torch


def diff_stats(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a.float().cpu() - b.float().cpu()).abs()
    return float(d.max()), float(d.mean())


def assert_identical(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """The torch path reproduces Pillow's integer resize and transformers' float32 normalize,
    so it must agree exactly (target was 1e-2); any difference is a bug, not rounding."""
    assert got.shape == want.shape, f"{what}: {tuple(got.shape)} vs {tuple(want.shape)}"
    max_diff, mean_diff = diff_stats(got, want)
    assert max_diff == 0.0 and mean_diff == 0.0, f"{what}: max |diff| {max_diff:.3g}, mean |diff| {mean_diff:.3g}"


@pytest.fixture(scope="module")
def sample_images() -> list[np.ndarray]:
    if not SAMPLE_NPY.is_file():
        pytest.skip(f"{SAMPLE_NPY} absent")
    return render_event_images(read_events(SAMPLE_NPY).events, 5)


@pytest.fixture(scope="module")
def scene_images() -> list[np.ndarray]:
    return render_event_images(moving_edge_events().events, 5, sensor_size=(480, 640))


def test_constants_and_processor_settings():
    from transformers.image_utils import (
        OPENAI_CLIP_MEAN,
        OPENAI_CLIP_STD,
        PILImageResampling,
    )

    assert tuple(CLIP_MEAN) == tuple(OPENAI_CLIP_MEAN) and tuple(CLIP_STD) == tuple(OPENAI_CLIP_STD)
    proc = clip_image_processor()
    assert proc.backend == "pil"
    assert proc.size["shortest_edge"] == 336
    assert (proc.crop_size["height"], proc.crop_size["width"]) == (336, 336)
    assert proc.resample == PILImageResampling.BICUBIC
    assert proc.do_convert_rgb and proc.do_center_crop and proc.do_rescale and proc.do_normalize
    assert abs(proc.rescale_factor - 1 / 255) < 1e-12


def independent_clip(image: np.ndarray, size: int = 336) -> np.ndarray:
    """The CLIP recipe written out with Pillow + NumPy, to check transformers' processor."""
    from PIL import Image

    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_h, new_w = (size, int(size * width / height)) if height <= width else (int(size * height / width), size)
    assert abs(new_w - width * scale) < 1 and abs(new_h - height * scale) < 1
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    crop = resized[top : top + size, left : left + size].astype(np.float64) / 255.0
    return ((crop - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1)


def test_clip_preprocess_matches_the_recipe(scene_images):
    out = clip_preprocess(scene_images[:2] + [scene_images[2][:300, :500]])
    assert out.shape == (3, 3, 336, 336) and out.dtype == torch.float32
    for k, image in enumerate(scene_images[:2] + [scene_images[2][:300, :500]]):
        want = torch.from_numpy(independent_clip(image))
        max_diff, mean_diff = diff_stats(out[k], want)
        # float32 vs float64 arithmetic only: |x| <= 2.2, so errors stay ~1e-6.
        assert max_diff < 1e-5, f"image {k}: max |diff| {max_diff:.3g}, mean |diff| {mean_diff:.3g}"


def test_empty_and_bad_input():
    assert clip_preprocess([]).shape == (0, 3, 336, 336)
    assert clip_preprocess_torch(torch.zeros(0, 10, 12, 3, dtype=torch.uint8)).shape == (0, 3, 336, 336)
    with pytest.raises(ValueError):
        clip_preprocess([np.zeros((4, 4), dtype=np.uint8)])
    with pytest.raises(ValueError):
        clip_preprocess([np.zeros((4, 4, 3), dtype=np.float32)])
    with pytest.raises(ValueError):
        clip_preprocess_torch(torch.zeros(1, 4, 4, 3, dtype=torch.float32))
    with pytest.raises(ValueError):
        clip_preprocess_torch(torch.zeros(4, 4, 3, dtype=torch.uint8))


def test_resized_size():
    assert resized_size(480, 640) == (336, 448)
    assert resized_size(640, 480) == (448, 336)
    assert resized_size(481, 641) == (336, 447)  # truncated, as transformers does
    assert resized_size(100, 100) == (336, 336)


def test_torch_path_equals_processor_on_real_event_images(sample_images):
    want = clip_preprocess(sample_images)
    shapes = {im.shape for im in sample_images}
    assert len(shapes) == 1, f"per-part sizes differ: {shapes}"  # the sample's parts all span 640x480
    got = clip_preprocess_torch(torch.from_numpy(np.stack(sample_images)))
    assert got.dtype == torch.float32
    assert_identical(got, want, "eventgpt_sample1 (5 frames)")


def test_torch_path_equals_processor_on_synthetic_scene(scene_images):
    assert_identical(
        clip_preprocess_torch(torch.from_numpy(np.stack(scene_images))), clip_preprocess(scene_images), "synthetic scene"
    )


@pytest.mark.parametrize("shape", [(480, 640), (640, 480), (97, 131), (336, 500), (700, 700), (1001, 1503)])
def test_torch_path_equals_processor_on_noise(shape):
    # Random noise has the most high-frequency content, hence the most rounding ties in the
    # resize; sizes cover down- and upscaling, portrait, an unchanged edge and odd sizes.
    rng = np.random.default_rng(sum(shape))
    images = [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in range(2)]
    assert_identical(clip_preprocess_torch(torch.from_numpy(np.stack(images))), clip_preprocess(images), f"noise {shape}")


def test_torch_path_dtype(scene_images):
    x = torch.from_numpy(np.stack(scene_images[:2]))
    bf16 = clip_preprocess_torch(x, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(bf16, clip_preprocess_torch(x).to(torch.bfloat16))


def test_render_then_preprocess_on_torch_equals_host_path(scene_images):
    stream = moving_edge_events()
    pixels = clip_preprocess_torch(torch.stack(render_event_images_torch(stream.events, 5, sensor_size=(480, 640))))
    assert_identical(pixels, clip_preprocess(scene_images), "torch render + torch CLIP vs host")


@pytest.mark.gpu
@pytest.mark.gpu
def test_torch_path_on_gpu(scene_images):
    got = clip_preprocess_torch(torch.from_numpy(np.stack(scene_images)).cuda())
    assert got.device.type == "cuda"
    assert_identical(got, clip_preprocess(scene_images), "cuda")
