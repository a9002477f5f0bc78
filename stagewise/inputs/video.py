"""Stage-1 readers for frame-based models: MP4 files (PyAV) and folders of frame images.

Video-LLaVA looks at 8 frames sampled evenly over a clip; LLaVA-1.5 at one. Reading an
MP4 is the expensive part of stage 1 in the seeds (0.7 s of their 3.3 s Video-LLaVA
sample), so the reader decodes only what it needs: it first reads the packet index
(demuxing, no decoding) to learn how many frames there are and where the keyframes lie,
then, for each wanted frame, seeks to the keyframe before it when that skips decoding,
and converts to RGB only the frames it keeps.

Even sampling: frame indices ``np.linspace(0, total - 1, n).round()`` over the
presentation order (the first and the last frame are always included; with
``n > total`` frames repeat).

PyAV (``import av``) is imported lazily inside the MP4 functions, so this module and the
frame-folder path work on machines without it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stagewise.errors import InputError

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")
"""Frame-image file suffixes accepted in a frame folder (case-insensitive)."""

DEFAULT_N_FRAMES = 8
"""Frames per clip for Video-LLaVA (``LanguageBind/Video-LLaVA-7B-hf`` samples 8 frames)."""


def sample_indices(total: int, n: int) -> np.ndarray:
    """Indices of ``n`` frames spread evenly over ``total`` frames.

    Args:
        total: number of frames available (>= 1).
        n: number of frames wanted (>= 1).

    Returns:
        ``[n]`` int64: ``np.linspace(0, total - 1, n).round()``; non-decreasing, first 0,
        last ``total - 1`` (for ``n >= 2``); indices repeat when ``n > total``.

    Raises:
        ValueError: ``total < 1`` or ``n < 1``.
    """
    if total < 1:
        raise ValueError(f"sample_indices: total must be >= 1, got {total}")
    if n < 1:
        raise ValueError(f"sample_indices: n must be >= 1, got {n}")
    return np.linspace(0, total - 1, n).round().astype(np.int64)


def _middle(total: int) -> np.ndarray:
    """The middle frame's index, ``[(total - 1) // 2]``."""
    return np.array([(total - 1) // 2], dtype=np.int64)


# ---------------------------------------------------------------------------------------
# Frame images
# ---------------------------------------------------------------------------------------


def read_image(path: str | Path) -> np.ndarray:
    """Read one image file as RGB.

    Args:
        path: a PNG/JPEG (any format Pillow reads).

    Returns:
        ``[H, W, 3]`` uint8 RGB (grey, palette and alpha images are converted).

    Raises:
        InputError: the file is missing or Pillow cannot decode it.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "image file not found")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise InputError(path, f"cannot read image ({type(e).__name__}: {e})") from None


def list_frame_files(folder: str | Path) -> list[Path]:
    """The frame images of a folder, sorted by file name.

    Args:
        folder: a directory holding ``.png``/``.jpg``/``.jpeg`` files (other files are ignored).

    Returns:
        Paths sorted by name (plain string order: name frames with zero-padded numbers).

    Raises:
        InputError: the folder is missing or holds no frame image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "frame folder not found")
    files = sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.name,
    )
    if not files:
        raise InputError(folder, f"no frame images ({'/'.join(IMAGE_SUFFIXES)}) in the folder")
    return files


def read_frame_files(paths: Sequence[str | Path], n_frames: int = DEFAULT_N_FRAMES) -> np.ndarray:
    """Read ``n_frames`` images sampled evenly (see :func:`sample_indices`) from a list of files.

    Only the sampled files are read; a file sampled twice is read once.

    Args:
        paths: frame images in temporal order.
        n_frames: frames wanted (>= 1).

    Returns:
        ``[n_frames, H, W, 3]`` uint8 RGB.

    Raises:
        InputError: empty list, a missing/unreadable file, or frames of different sizes.
    """
    if not paths:
        raise InputError(None, "no frame images given")
    paths = [Path(p) for p in paths]
    return _read_files_at(paths, sample_indices(len(paths), n_frames))


def _read_files_at(paths: list[Path], idx: np.ndarray) -> np.ndarray:
    """``[len(idx), H, W, 3]`` uint8: the images ``paths[i]`` for ``i`` in ``idx``, each read once."""
    cache: dict[int, np.ndarray] = {}
    for i in idx.tolist():
        if i not in cache:
            cache[i] = read_image(paths[i])
    shape = cache[int(idx[0])].shape
    for i, im in cache.items():
        if im.shape != shape:
            raise InputError(paths[i], f"frame size {im.shape[1]}x{im.shape[0]} differs from "
                             f"{shape[1]}x{shape[0]} of {paths[int(idx[0])].name}")
    return np.stack([cache[i] for i in idx.tolist()])  # [n, H, W, 3]


# ---------------------------------------------------------------------------------------
# MP4 (PyAV)
# ---------------------------------------------------------------------------------------


def _import_av(path: Path | None) -> Any:
    """Import PyAV or raise InputError naming ``path`` (the MP4 that needed it)."""
    try:
        import av
    except ImportError:
        raise InputError(path, "reading MP4 needs PyAV (pip install av), or give a folder of "
                         "frame images instead") from None
    return av


def _av_message(e: Exception) -> str:
    """FFmpeg's own words for an ``av.FFmpegError``, without the file name it appends."""
    return getattr(e, "strerror", None) or str(e)


def _decode_mp4(path: Path, pick: Callable[[int], np.ndarray]) -> np.ndarray:
    """Decode the frames ``pick(total)`` (presentation-order indices) of an MP4's first video stream.

    Returns ``[len(pick(total)), H, W, 3]`` uint8 RGB. Raises InputError on any failure.
    """
    av = _import_av(path)
    try:
        container = av.open(str(path))
    except av.FFmpegError as e:
        raise InputError(path, f"cannot open as a video ({_av_message(e)})") from None
    try:
        with container:
            if not container.streams.video:
                raise InputError(path, "no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"

            # 1) packet index, no decoding: pts and keyframe flag of every frame.
            pts: list[int | None] = []
            key: list[bool] = []
            for pkt in container.demux(stream):
                if pkt.size == 0:  # the demuxer's end-of-stream flush packet
                    continue
                pts.append(pkt.pts)
                key.append(bool(pkt.is_keyframe))
            if not pts:
                raise InputError(path, "no video frames")
            idx = pick(len(pts))

            if any(p is None for p in pts):
                return _decode_sequential(container, stream, idx, path)

            # 2) presentation order = sorted pts; decode only up to each wanted frame,
            #    seeking to the keyframe before it when that skips frames.
            pres = sorted(pts)  # type: ignore[arg-type]
            key_pts = sorted(p for p, k in zip(pts, key) if k)
            targets = sorted({pres[i] for i in idx.tolist()})
            got: dict[int, np.ndarray] = {}
            frames = None  # the decode generator
            last = None  # pts of the last decoded frame
            for t in targets:
                j = bisect.bisect_right(key_pts, t) - 1
                kf = key_pts[j] if j >= 0 else pres[0]
                if frames is None or last is None or kf > last:
                    container.seek(kf, stream=stream, backward=True, any_frame=False)
                    frames = container.decode(stream)
                for frame in frames:
                    if frame.pts is None:
                        return _decode_sequential(container, stream, idx, path)
                    last = frame.pts
                    if frame.pts == t:
                        got[t] = frame.to_ndarray(format="rgb24")
                        break
                    if frame.pts > t:
                        raise InputError(path, f"frame at pts {t} not found while decoding")
                else:
                    raise InputError(path, f"stream ended before frame at pts {t} (truncated?)")
            return np.stack([got[pres[i]] for i in idx.tolist()])  # [n, H, W, 3]
    except av.FFmpegError as e:
        raise InputError(path, f"cannot decode video ({_av_message(e)})") from None


def _decode_sequential(container: Any, stream: Any, idx: np.ndarray, path: Path) -> np.ndarray:
    """Fallback without timestamps: decode from the start, keep the ``idx``-th frames."""
    container.seek(0)
    wanted = set(idx.tolist())
    last = int(idx.max())
    got: dict[int, np.ndarray] = {}
    for i, frame in enumerate(container.decode(stream)):
        if i in wanted:
            got[i] = frame.to_ndarray(format="rgb24")
        if i >= last:
            break
    missing = wanted - got.keys()
    if missing:
        raise InputError(path, f"stream ended before frame {min(missing)} (truncated?)")
    return np.stack([got[i] for i in idx.tolist()])


def _read_frames(path: str | Path, pick: Callable[[int], np.ndarray]) -> np.ndarray:
    path = Path(path)
    if path.is_dir():
        files = list_frame_files(path)
        return _read_files_at(files, pick(len(files)))
    if not path.exists():
        raise InputError(path, "video not found (expected an MP4 file or a folder of frames)")
    return _decode_mp4(path, pick)


def read_video_frames(path: str | Path, n_frames: int = DEFAULT_N_FRAMES) -> np.ndarray:
    """Stage 1 of Video-LLaVA: ``n_frames`` frames sampled evenly from a video.

    Args:
        path: an MP4 (any container/codec FFmpeg reads; first video stream), or a folder of
            frame images (``.png``/``.jpg``/``.jpeg``, sorted by name).
        n_frames: frames wanted (>= 1); indices per :func:`sample_indices`.

    Returns:
        ``[n_frames, H, W, 3]`` uint8 RGB, in temporal order.

    Raises:
        InputError: missing path; PyAV missing (MP4 only); not a decodable video (corrupt
            or truncated file); no frames; a folder without images; an unreadable image.
        ValueError: ``n_frames < 1``.
    """
    if n_frames < 1:
        raise ValueError(f"read_video_frames: n_frames must be >= 1, got {n_frames}")
    return _read_frames(path, lambda total: sample_indices(total, n_frames))


def read_middle_frame(path: str | Path) -> np.ndarray:
    """The middle frame (index ``(total - 1) // 2``) of an MP4 or a frame folder.

    Returns:
        ``[1, H, W, 3]`` uint8 RGB (the same layout as :func:`read_video_frames`).

    Raises:
        InputError: as :func:`read_video_frames`.
    """
    return _read_frames(path, _middle)


def write_mp4(
    path: str | Path,
    frames: np.ndarray,
    fps: int = 20,
    *,
    keyframe_interval: int | None = None,
    crf: int = 18,
) -> Path:
    """Encode frames to an H.264 MP4 (PyAV; MPEG-4 part 2 where libx264 is missing).

    Args:
        path: output file (parent folders are created).
        frames: ``[n, H, W, 3]`` uint8 RGB, ``n >= 1``, ``H`` and ``W`` even (yuv420p).
        fps: frame rate (frames per second).
        keyframe_interval: maximum frames between keyframes (GOP size); encoder default if None.
        crf: x264 constant-rate factor (0 = lossless, 18 = visually lossless).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: wrong shape/dtype, odd frame size, ``fps < 1``.
        ImportError: PyAV is not installed.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"write_mp4: frames must be [n>=1, H, W, 3], got {list(frames.shape)}")
    if frames.dtype != np.uint8:
        raise ValueError(f"write_mp4: frames must be uint8, got {frames.dtype}")
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:
        raise ValueError(f"write_mp4: frame size {w}x{h} must be even for yuv420p")
    if fps < 1:
        raise ValueError(f"write_mp4: fps must be >= 1, got {fps}")
    try:
        import av
    except ImportError:
        raise ImportError("write_mp4 needs PyAV: pip install av") from None

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        av.codec.Codec("libx264", "w")
        codec, options = "libx264", {"crf": str(crf)}
    except (ValueError, av.FFmpegError):  # UnknownCodecError is a ValueError
        codec, options = "mpeg4", {"qscale": "2"}
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if keyframe_interval is not None:
            stream.codec_context.gop_size = int(keyframe_interval)
        for f in frames:
            for pkt in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(pkt)
        for pkt in stream.encode(None):
            container.mux(pkt)
    return path
