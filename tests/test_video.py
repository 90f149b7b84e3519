"""Video in and out: probing, frame selection, sizes, decoding fallbacks, MP4/GIF writing with audio."""

import subprocess

import numpy as np
import pytest
from conftest import make_video

from ctxedit import video
from ctxedit.errors import RunError, UsageError, VideoError


def test_probe_the_samples(skiing, car):
    ski = video.probe(skiing)
    assert (ski.width, ski.height, ski.num_frames, ski.has_audio) == (256, 256, 91, True)
    assert ski.fps == pytest.approx(29.97, abs=0.01)
    assert video.probe(car).has_audio is False


@pytest.mark.parametrize(
    "source, size, crop, expected",
    [
        ((718, 718), 512, "none", (512, 512)),
        ((1920, 1080), 512, "none", (896, 512)),  # long side rounded down, not stretched
        ((1080, 1920), 512, "none", (512, 896)),  # portrait
        ((1920, 1080), 512, "center", (512, 512)),
        ((50, 40), 500, "none", (640, 512)),  # tiny source, odd --size rounded to the multiple
    ],
)
def test_processed_size_keeps_aspect_and_multiples(source, size, crop, expected):
    assert video.processed_size(*source, size, 64, crop) == expected


def test_processed_size_refuses_a_size_below_the_multiple():
    with pytest.raises(UsageError, match="at least 64"):
        video.processed_size(100, 100, 32, 64, "none")


def test_frame_indices_and_what_would_fit():
    assert video.frame_indices(20, 4, 3, 2) == [2, 5, 8, 11]
    with pytest.raises(VideoError, match=r"has 10 frames.*try --frames 5"):
        video.frame_indices(10, 8, 2, 0)


def test_read_frames_from_mp4_and_gif_fallback(skiing, tmp_path):
    info = video.probe(skiing)
    frames = video.read_frames(info, [0, 10, 90])
    assert frames.shape == (3, 256, 256, 3) and frames.dtype == np.uint8
    gif = make_video(tmp_path / "clip.gif", 48, 36, 6)
    gif_info = video.probe(gif)  # decord cannot read GIFs: ffmpeg decodes them
    assert (gif_info.width, gif_info.height, gif_info.num_frames) == (48, 36, 6)
    assert video.read_frames(gif_info, [1, 5]).shape == (2, 36, 48, 3)


@pytest.mark.parametrize("container", ["avi", "webm", "mkv", "mov"])
def test_other_containers(tmp_path, container):
    info = video.probe(make_video(tmp_path / f"clip.{container}", 64, 48, 5))
    assert video.read_frames(info, [0, 4]).shape == (2, 48, 64, 3)


def test_unusable_files_get_one_clear_line(tmp_path, car):
    (tmp_path / "text.mp4").write_text("hello")
    (tmp_path / "empty.mp4").write_bytes(b"")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(car.read_bytes()[: car.stat().st_size // 3])
    with pytest.raises(VideoError, match="does not exist"):
        video.probe(tmp_path / "missing.mp4")
    with pytest.raises(VideoError, match="not a file"):
        video.probe(tmp_path)
    for bad in ("text.mp4", "empty.mp4"):
        with pytest.raises(VideoError, match="not a video"):
            video.probe(tmp_path / bad)
    with pytest.raises(VideoError, match=r"truncated or corrupt: only \d+ of 80 frames"):
        video.probe(truncated)


def test_write_video_round_trip_with_audio(skiing, tmp_path):
    ramp = np.linspace(0, 200, 56)[None, None, :, None] + np.arange(6)[:, None, None, None] * 10
    frames = np.broadcast_to(ramp, (6, 40, 56, 3)).astype(np.uint8)
    dest = tmp_path / "out.mp4"
    video.write_video(frames, dest, 14.985, video.AudioSpan(skiing, 1.0, 6 / 14.985))
    info = video.probe(dest)
    assert (info.width, info.height, info.num_frames, info.has_audio) == (56, 40, 6, True)
    assert info.fps == pytest.approx(14.985, abs=0.01)
    header = subprocess.run([video.ffmpeg_exe(), "-i", str(dest)], capture_output=True, text=True).stderr
    assert "h264" in header and "yuv420p" in header
    back = video.read_frames(info, list(range(6)))
    assert np.abs(back.astype(int) - frames).mean() < 3  # lossy, but the same pictures
    video.write_gif(dest, tmp_path / "out.gif")
    assert video.probe(tmp_path / "out.gif").num_frames == 6


def test_writes_never_clobber(tmp_path):
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    dest = tmp_path / "out.mp4"
    dest.write_bytes(b"precious")
    with pytest.raises(RunError, match="--overwrite"):
        video.write_video(frames, dest, 10)
    with pytest.raises(VideoError, match="even"):
        video.write_video(np.zeros((2, 15, 16, 3), np.uint8), dest, 10, overwrite=True)
    assert dest.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]  # no temp file left behind
    video.write_video(frames, dest, 10, overwrite=True)
    assert video.probe(dest).num_frames == 2
