"""Stage-1 frame readers: MP4 (PyAV) and frame folders, even sampling, clear errors."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stagewise.errors import InputError
from stagewise.inputs.video import (
    list_frame_files,
    read_frame_files,
    read_image,
    read_middle_frame,
    read_video_frames,
    sample_indices,
    write_mp4,
)

av = pytest.importorskip("av")

H, W = 96, 128


def moving_scene(n: int, h: int = H, w: int = W) -> np.ndarray:
    """``[n, h, w, 3]`` uint8: a smooth gradient background, a white square moving right by
    3 px per frame and a red bar moving down by 2 px per frame, so every frame differs."""
    yy, xx = np.mgrid[:h, :w]
    frames = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        f = frames[t]
        f[..., 0] = (xx * 255 // (w - 1)).astype(np.uint8)
        f[..., 1] = (yy * 255 // (h - 1)).astype(np.uint8)
        f[..., 2] = 64
        x0 = (3 * t) % (w - 20)
        f[30:50, x0:x0 + 20] = 255
        y0 = (2 * t) % (h - 8)
        f[y0:y0 + 8, 90:120] = (255, 0, 0)
    return frames


def nearest_source(decoded: np.ndarray, source: np.ndarray) -> list[int]:
    """For each decoded frame, the index of the closest source frame (mean absolute error)."""
    d = np.abs(decoded[:, None].astype(np.int16) - source[None].astype(np.int16)).mean(axis=(2, 3, 4))
    return d.argmin(axis=1).tolist()


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    return moving_scene(30)


@pytest.fixture(scope="module")
def mp4(tmp_path_factory, scene) -> Path:
    return write_mp4(tmp_path_factory.mktemp("mp4") / "clip.mp4", scene, fps=20)


def full_decode(path: Path) -> np.ndarray:
    """Every frame of ``path``, decoded by PyAV directly (the reference for exact equality)."""
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


# ---------------------------------------------------------------------------------------


def test_sample_indices_are_even_and_inclusive():
    assert sample_indices(30, 8).tolist() == [0, 4, 8, 12, 17, 21, 25, 29]
    assert sample_indices(5, 8).tolist() == [0, 1, 1, 2, 2, 3, 3, 4]  # repeats when n > total
    assert sample_indices(1, 3).tolist() == [0, 0, 0]
    assert sample_indices(10, 1).tolist() == [0]
    assert sample_indices(8, 8).tolist() == list(range(8))
    assert sample_indices(30, 8).dtype == np.int64
    with pytest.raises(ValueError):
        sample_indices(0, 8)
    with pytest.raises(ValueError):
        sample_indices(10, 0)


def test_mp4_reads_the_evenly_sampled_frames(mp4, scene):
    got = read_video_frames(mp4, 8)
    assert got.shape == (8, H, W, 3) and got.dtype == np.uint8
    # The codec is lossy, so identify each decoded frame by its nearest source frame.
    want = sample_indices(len(scene), 8).tolist()
    assert nearest_source(got, scene) == want
    err = np.abs(got.astype(np.int16) - scene[want].astype(np.int16)).mean()
    assert err < 6, f"mean abs error {err:.2f} too large for crf 18"


@pytest.mark.parametrize("gop", [None, 4, 7])
@pytest.mark.parametrize("n", [1, 8, 50, 64])
def test_mp4_seeking_gives_the_same_pixels_as_a_full_decode(tmp_path, gop, n):
    frames = moving_scene(50)
    path = write_mp4(tmp_path / f"g{gop}.mp4", frames, fps=20, keyframe_interval=gop)
    ref = full_decode(path)
    assert len(ref) == 50
    got = read_video_frames(path, n)
    idx = sample_indices(50, n)
    assert np.array_equal(got, ref[idx]), f"gop={gop} n={n}: frames differ from a full decode"


def test_middle_frame_mp4_and_folder(tmp_path, mp4, scene):
    mid = read_middle_frame(mp4)
    assert mid.shape == (1, H, W, 3)
    assert nearest_source(mid, scene) == [(len(scene) - 1) // 2]
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(scene[:7]):
        Image.fromarray(f).save(folder / f"{i:03d}.png")
    assert np.array_equal(read_middle_frame(folder)[0], scene[3])


def test_frame_folder_sorted_by_name_png_and_jpg(tmp_path, scene):
    folder = tmp_path / "video"
    folder.mkdir()
    order = np.random.default_rng(0).permutation(12)  # write in a shuffled order
    for i in order:
        Image.fromarray(scene[i]).save(folder / f"frame_{i:04d}.png")
    (folder / "notes.txt").write_text("not a frame")
    files = list_frame_files(folder)
    assert [p.name for p in files] == [f"frame_{i:04d}.png" for i in range(12)]
    got = read_video_frames(folder, 8)
    assert np.array_equal(got, scene[sample_indices(12, 8)])  # PNG is lossless: exact

    jfolder = tmp_path / "jpg"
    jfolder.mkdir()
    for i in range(4):
        Image.fromarray(scene[i]).save(jfolder / f"{i}.JPG", quality=95)
    got = read_video_frames(jfolder, 8)
    assert got.shape == (8, H, W, 3)
    assert nearest_source(got, scene[:4]) == sample_indices(4, 8).tolist()


def test_read_frame_files_reads_rgb_from_grey_and_rgba(tmp_path):
    Image.fromarray(np.full((6, 8), 7, np.uint8), "L").save(tmp_path / "grey.png")
    Image.fromarray(np.full((6, 8, 4), 9, np.uint8), "RGBA").save(tmp_path / "rgba.png")
    got = read_frame_files([tmp_path / "grey.png", tmp_path / "rgba.png"], 2)
    assert got.shape == (2, 6, 8, 3) and got.dtype == np.uint8
    assert (got[0] == 7).all() and (got[1] == 9).all()


# --- errors: one InputError naming the file -----------------------------------------------


def _raises_naming(path: Path, fn, *args) -> InputError:
    with pytest.raises(InputError) as ei:
        fn(*args)
    assert ei.value.path == Path(path), f"error names {ei.value.path}, not {path}"
    assert str(path) in str(ei.value) and "\n" not in str(ei.value)
    return ei.value


def test_missing_path(tmp_path):
    _raises_naming(tmp_path / "nope.mp4", read_video_frames, tmp_path / "nope.mp4")
    _raises_naming(tmp_path / "nope.png", read_image, tmp_path / "nope.png")


def test_corrupt_mp4_random_bytes(tmp_path):
    p = tmp_path / "random.mp4"
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    _raises_naming(p, read_video_frames, p)
    e = tmp_path / "empty.mp4"
    e.write_bytes(b"")
    _raises_naming(e, read_video_frames, e)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_mp4(tmp_path, mp4, fraction):
    data = mp4.read_bytes()
    p = tmp_path / "truncated.mp4"
    p.write_bytes(data[: int(len(data) * fraction)])
    _raises_naming(p, read_video_frames, p)


def test_truncated_faststart_mp4(tmp_path, scene):
    """``moov`` first (streaming layout): the index survives the cut, the frame data does not."""
    p = tmp_path / "faststart.mp4"
    with av.open(str(p), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=20)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        for f in scene:
            for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode(None):
            c.mux(pkt)
    assert read_video_frames(p, 8).shape == (8, H, W, 3)
    cut = tmp_path / "faststart_cut.mp4"
    cut.write_bytes(p.read_bytes()[: int(p.stat().st_size * 0.6)])
    _raises_naming(cut, read_video_frames, cut)


def test_folder_errors(tmp_path, scene):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    _raises_naming(empty, read_video_frames, empty)

    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        Image.fromarray(scene[i]).save(bad / f"{i}.png")
    (bad / "1.png").write_bytes(b"not a png at all")
    _raises_naming(bad / "1.png", read_video_frames, bad, 3)

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(scene[0]).save(mixed / "0.png")
    Image.fromarray(scene[1][:, :64]).save(mixed / "1.png")
    _raises_naming(mixed / "1.png", read_video_frames, mixed, 2)

    with pytest.raises(InputError):
        read_frame_files([], 8)


def test_no_pyav_is_a_clear_error_for_mp4_only(monkeypatch, mp4, tmp_path, scene):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    err = _raises_naming(mp4, read_video_frames, mp4)
    assert "PyAV" in str(err)
    folder = tmp_path / "f"
    folder.mkdir()
    Image.fromarray(scene[0]).save(folder / "0.png")
    assert read_video_frames(folder, 2).shape == (2, H, W, 3)
    with pytest.raises(ImportError, match="PyAV"):
        write_mp4(tmp_path / "x.mp4", scene[:2])


@pytest.mark.slow
def test_importing_the_module_does_not_import_av():
    import subprocess

    code = "import sys, stagewise.inputs.video, stagewise.models.video_llava, stagewise.models.llava; " \
           "assert 'av' not in sys.modules, 'av imported at module level'"
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert r.returncode == 0, r.stderr[-2000:]


def test_write_mp4_validates_arguments(tmp_path, scene):
    with pytest.raises(ValueError, match="even"):
        write_mp4(tmp_path / "odd.mp4", scene[:2, :95])
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(tmp_path / "f.mp4", scene[:2].astype(np.float32))
    with pytest.raises(ValueError):
        write_mp4(tmp_path / "s.mp4", scene[0])
    p = write_mp4(tmp_path / "sub" / "dir" / "ok.mp4", scene[:3], fps=10)
    assert p.is_file() and len(full_decode(p)) == 3
