"""Stage 2, second half: CLIP ViT-L/14-336 pixel preprocessing.

The vision tower expects what ``openai/clip-vit-large-patch14-336``'s image processor
produces: RGB, shortest edge resized to 336 with bicubic filtering, a centred 336x336
crop, values rescaled by 1/255 and normalized with CLIP's mean and std.

Two implementations, meant to be interchangeable:

- :func:`clip_preprocess` runs ``transformers``' own processor on the host. The backend
  is pinned to the PIL one (``CLIPImageProcessorPil``, present in transformers 5.17 and
  5.23): it works with or without torchvision, and it is the backend whose resize is
  Pillow's -- the one CLIP and LLaVA were trained with. (With torchvision installed,
  ``CLIPImageProcessor`` in transformers 5 is the torchvision backend, whose float
  bicubic resize differs slightly; we never pick it implicitly.)
- :func:`clip_preprocess_torch` runs on the tensor's device (the GPU stage-2 path of
  issue 4). Its resize reimplements Pillow's separable two-pass (horizontal, then
  vertical) antialiased bicubic resampling for 8-bit images: the same filter
  (a = -0.5, support scaled by the downscale factor), the same 22-bit fixed-point
  coefficients, rounding and clamping to uint8 after each pass. Pillow's result is
  therefore reproduced exactly; the rescale/normalize step is a per-channel lookup table
  computed with the same NumPy dtypes as ``transformers`` uses, so the output is
  bit-identical to :func:`clip_preprocess` (max and mean |diff| 0 in the tests).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import torch

# openai/CLIP, clip/clip.py `_transform` (Normalize) -- the same numbers are
# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD and the checkpoint's
# preprocessor_config.json.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 336
RESCALE_FACTOR = 1 / 255

# Pillow's 8-bit resampling arithmetic (libImaging/Resample.c): coefficients are fixed
# point with 32 - 8 - 2 = 22 fractional bits; bicubic uses a = -0.5 and support 2.
_PRECISION_BITS = 32 - 8 - 2
_BICUBIC_A = -0.5
_BICUBIC_SUPPORT = 2.0


def clip_image_processor(size: int = CLIP_SIZE) -> Any:
    """The CLIP ViT-L/14-336 image processor, built offline (no hub access).

    Settings: convert to RGB; resize the shortest edge to ``size`` (bicubic, Pillow);
    center-crop ``size x size``; rescale by 1/255; normalize with ``CLIP_MEAN`` /
    ``CLIP_STD``. Backend: ``transformers``' PIL backend (``CLIPImageProcessorPil``),
    chosen explicitly so that the result does not depend on whether torchvision is
    installed.

    Args:
        size: output side in pixels (336 for ViT-L/14-336).

    Returns:
        A ``transformers`` ``CLIPImageProcessorPil``.

    Raises:
        ValueError: ``size < 1``.
    """
    from transformers.image_utils import PILImageResampling
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if size < 1:
        raise ValueError(f"size: must be >= 1, got {size}")
    return CLIPImageProcessorPil(
        do_convert_rgb=True,
        do_resize=True,
        size={"shortest_edge": size},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=RESCALE_FACTOR,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


@lru_cache(maxsize=4)
def _cached_processor(size: int) -> Any:
    return clip_image_processor(size)


def clip_preprocess(images: Sequence[np.ndarray], size: int = CLIP_SIZE) -> torch.Tensor:
    """CLIP preprocessing on the host with ``transformers``' processor (the reference).

    Args:
        images: ``N`` arrays ``[H, W, 3]`` uint8 RGB (sizes may differ).
        size: output side in pixels.

    Returns:
        ``[N, 3, size, size]`` float32 CPU tensor (``[0, 3, size, size]`` for no images).

    Raises:
        ValueError: an image is not ``[H, W, 3]`` uint8.
    """
    for i, image in enumerate(images):
        _check_image(i, image)
    if len(images) == 0:
        return torch.empty((0, 3, size, size), dtype=torch.float32)
    out = _cached_processor(size)(images=list(images), return_tensors="pt", input_data_format="channels_last")
    return out["pixel_values"].to(torch.float32)


def _check_image(i: int, image: Any) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shown = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"images[{i}]: expected an [H, W, 3] uint8 array, got {shown}")


def resized_size(height: int, width: int, size: int = CLIP_SIZE) -> tuple[int, int]:
    """``(new_height, new_width)`` after resizing the shortest edge to ``size``.

    The long edge is ``int(size * long / short)`` (truncated), as ``transformers``'
    ``get_resize_output_image_size`` computes it.
    """
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def clip_preprocess_torch(
    images: torch.Tensor, size: int = CLIP_SIZE, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """CLIP preprocessing in pure torch on ``images.device`` (the GPU stage-2 path).

    Steps: Pillow-exact bicubic resize of the shortest edge to ``size`` (two passes,
    horizontal then vertical, integer arithmetic, uint8 rounding/clamping after each,
    see the module docstring), centre crop with ``top = (H' - size) // 2``,
    ``left = (W' - size) // 2`` (as ``transformers``), then rescale + normalize through a
    ``[3, 256]`` lookup table holding exactly the float32 values ``transformers``
    computes.

    Parity with :func:`clip_preprocess` (same images): identical; the tests assert
    max |diff| == 0 and mean |diff| == 0 after normalization, on real rendered event
    images and on the synthetic scene (target was 1e-2).

    Args:
        images: ``[N, H, W, 3]`` uint8 RGB, any device; all images share one size.
        size: output side in pixels.
        dtype: output dtype (e.g. ``torch.bfloat16`` for the model); values are computed
            in float32 and cast once at the end.

    Returns:
        ``[N, 3, size, size]`` tensor of ``dtype`` on ``images.device``.

    Raises:
        ValueError: ``images`` is not ``[N, H, W, 3]`` uint8, or ``size < 1``.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"images: expected an [N, H, W, 3] uint8 tensor, got {images.dtype} {tuple(images.shape)}")
    if size < 1:
        raise ValueError(f"size: must be >= 1, got {size}")
    n, height, width, _ = images.shape
    device = images.device
    if n == 0:
        return torch.empty((0, 3, size, size), dtype=dtype, device=device)
    new_h, new_w = resized_size(height, width, size)

    # The axis being resampled goes first so that each tap gathers whole contiguous rows.
    x = images.permute(2, 0, 1, 3).to(torch.int32)  # [W, N, H, 3] levels 0..255
    if new_w != width:  # Pillow skips a pass whose size does not change
        x = _resample_first_dim(x, *_pil_coeffs(width, new_w, device))  # [W', N, H, 3]
    x = x.permute(2, 0, 1, 3)  # [H, W', N, 3]
    if new_h != height:
        x = _resample_first_dim(x, *_pil_coeffs(height, new_h, device))  # [H', W', N, 3]
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[top : top + size, left : left + size].permute(2, 3, 0, 1)  # [N, 3, size, size] int32 levels

    lut = _normalize_lut(device)  # [3, 256] float32
    channel = torch.arange(3, device=device, dtype=torch.int64).view(1, 3, 1, 1) * 256  # [1, 3, 1, 1]
    flat = (x.to(torch.int64) + channel).reshape(-1)  # [N*3*size*size] index into lut
    out = lut.view(-1).index_select(0, flat).view(n, 3, size, size)  # [N, 3, size, size] float32
    return out.to(dtype)


def _resample_first_dim(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One Pillow resampling pass along dim 0.

    ``x``: ``[L_in, ...]`` int32 levels 0..255; ``index``/``weight``: ``[L_out, K]`` int64
    source rows and int32 fixed-point weights. Returns ``[L_out, ...]`` int32 levels,
    ``clip8((2^21 + sum_k x[index[:, k]] * weight[:, k]) >> 22)`` as Pillow computes it.
    """
    rows = x.reshape(x.shape[0], -1)  # [L_in, R] (a copy when x is a permuted view)
    acc = torch.full((index.shape[0], rows.shape[1]), 1 << (_PRECISION_BITS - 1), dtype=torch.int32, device=x.device)
    for k in range(index.shape[1]):  # K taps (7 for 640 -> 448): gather rows, multiply-add
        acc += rows.index_select(0, index[:, k]) * weight[:, k, None]
    return torch.clamp(acc >> _PRECISION_BITS, 0, 255).view(index.shape[0], *x.shape[1:])


def _bicubic(v: np.ndarray) -> np.ndarray:
    """Pillow's bicubic kernel (a = -0.5), with its order of float64 operations."""
    a = _BICUBIC_A
    v = np.abs(v)
    inner = ((a + 2.0) * v - (a + 3.0)) * v * v + 1
    outer = (((v - 5) * v + 8) * v - 4) * a
    return np.where(v < 1.0, inner, np.where(v < 2.0, outer, 0.0))


@lru_cache(maxsize=32)
def _pil_coeffs_host(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's resampling taps for ``in_size -> out_size`` along one axis.

    Returns ``index [out_size, K]`` int64 (source positions, padded with valid ones) and
    ``weight [out_size, K]`` int32 (22-bit fixed point; padding taps weigh 0).
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _BICUBIC_SUPPORT * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale  # [out]
    # C's (int) truncates toward zero; the result is clamped to the image anyway.
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)  # [out]
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin  # [out] tap count
    taps = np.arange(ksize, dtype=np.int64)  # [K]
    valid = taps[None, :] < xmax[:, None]  # [out, K]
    w = _bicubic((taps[None, :] + xmin[:, None] - center[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(valid, w, 0.0)
    total = np.zeros(out_size, dtype=np.float64)
    for k in range(ksize):  # sequential sum, in Pillow's order
        total = total + w[:, k]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    scaled = w * (1 << _PRECISION_BITS)
    fixed = np.where(w < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int32)
    index = np.where(valid, xmin[:, None] + taps[None, :], xmin[:, None])
    return index, fixed


_DEVICE_CACHE: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _pil_coeffs(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (str(device), in_size, out_size)
    if key not in _DEVICE_CACHE:
        index, weight = _pil_coeffs_host(in_size, out_size)
        _DEVICE_CACHE[key] = (torch.from_numpy(index).to(device), torch.from_numpy(weight).to(device))
    return _DEVICE_CACHE[key]


_LUT_CACHE: dict[str, torch.Tensor] = {}


def _normalize_lut(device: torch.device) -> torch.Tensor:
    """``[3, 256]`` float32: level v of channel c -> ``(v / 255 - mean_c) / std_c``.

    Computed with transformers' dtypes: ``float32(float64(v) * (1/255))``, then float32
    subtraction and division by float32 mean/std.
    """
    key = str(device)
    if key not in _LUT_CACHE:
        levels = (np.arange(256, dtype=np.float64) * RESCALE_FACTOR).astype(np.float32)  # [256]
        mean = np.array(CLIP_MEAN, dtype=np.float32)[:, None]
        std = np.array(CLIP_STD, dtype=np.float32)[:, None]
        _LUT_CACHE[key] = torch.from_numpy((levels[None, :] - mean) / std).to(device)  # [3, 256]
    return _LUT_CACHE[key]
