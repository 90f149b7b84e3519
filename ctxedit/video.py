"""Video in and out: probe, pick frames, resize to what the model needs, write H.264 MP4 (+ audio, GIF).

Frames are numpy arrays (f, h, w, 3) of uint8 RGB. Decoding uses decord, falling back to the ffmpeg binary
of imageio-ffmpeg for what decord cannot read (GIF, some containers); encoding always uses that binary.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from ctxedit.errors import UsageError, VideoError
from ctxedit.files import atomic_path


@cache
def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _ffmpeg(args: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([ffmpeg_exe(), "-hide_banner", *args], input=stdin, capture_output=True)


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int
    height: int
    fps: float
    num_frames: int
    has_audio: bool


@dataclass(frozen=True)
class AudioSpan:
    """The part of a source's audio that an output covers."""

    path: Path
    start_s: float
    duration_s: float


def _probe_header(path: Path) -> tuple[int, int, float, bool, float | None]:
    """(width, height, fps, has_audio, duration in seconds if known) from ffmpeg's description of the file."""
    text = _ffmpeg(["-i", str(path)]).stderr.decode(errors="replace")
    stream = re.search(r"Stream #\S+.*?: Video: (.*)", text)
    if stream is None:
        raise VideoError(f"{path} is not a video ffmpeg can read (no video stream found)")
    size = re.search(r"\b(\d{1,5})x(\d{1,5})\b", stream.group(1))
    rate = re.search(r"([\d.]+)(k?) (?:fps|tbr)", stream.group(1))
    if size is None or rate is None:
        raise VideoError(f"{path}: cannot read the frame size or frame rate of its video stream")
    fps = float(rate.group(1)) * (1000 if rate.group(2) else 1)
    duration = re.search(r"Duration: (\d+):(\d+):([\d.]+)", text)
    seconds = (
        int(duration.group(1)) * 3600 + int(duration.group(2)) * 60 + float(duration.group(3)) if duration else None
    )
    return int(size.group(1)), int(size.group(2)), fps, "Audio:" in text, seconds


def _decord_reader(path: Path):
    """A decord VideoReader, or None when decord cannot read this file."""
    import decord

    decord.logging.set_level(decord.logging.QUIET)
    try:
        return decord.VideoReader(str(path), ctx=decord.cpu(0))
    except (decord.DECORDError, RuntimeError):
        return None


def _ffmpeg_frames(path: Path, width: int, height: int, limit: int | None = None) -> np.ndarray:
    """Decode frames with the ffmpeg binary: all of them, or the first `limit`."""
    count = [] if limit is None else ["-frames:v", str(limit)]
    out = _ffmpeg(["-v", "error", "-i", str(path), *count, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
    frames = np.frombuffer(out.stdout, np.uint8)
    whole = frames.size // (width * height * 3)
    return frames[: whole * width * height * 3].reshape(whole, height, width, 3)


def probe(path: Path) -> VideoInfo:
    """Describe a video file, or fail with one line that says why it cannot be used."""
    if not path.exists():
        raise VideoError(f"{path} does not exist")
    if not path.is_file():
        raise VideoError(f"{path} is not a file")
    width, height, fps, has_audio, duration = _probe_header(path)
    reader = _decord_reader(path)
    if reader is not None:
        num_frames, fps = len(reader), reader.get_avg_fps() or fps
    else:
        num_frames = len(_ffmpeg_frames(path, width, height))
        expected = round(duration * fps) if duration else 0
        if num_frames < 0.9 * expected - 1:
            raise VideoError(f"{path} is truncated or corrupt: only {num_frames} of {expected} frames decode")
    if num_frames == 0:
        raise VideoError(f"{path} has no decodable frames")
    return VideoInfo(path, width, height, fps, num_frames, has_audio)


def frame_indices(num_frames: int, count: int, stride: int, start: int) -> list[int]:
    """The `count` frames start, start+stride, ...; fail with what would fit when the video is too short."""
    if count < 1 or stride < 1 or start < 0:
        raise UsageError("--frames and --stride must be >= 1 and --start >= 0")
    last = start + (count - 1) * stride
    if last >= num_frames:
        fits = max(0, (num_frames - 1 - start) // stride + 1)
        hint = f"--frames {fits}" if fits else f"--start below {num_frames}"
        raise VideoError(
            f"the video has {num_frames} frames but --frames {count} --stride {stride} --start {start} "
            f"needs frame {last}; try {hint} or a smaller --stride"
        )
    return list(range(start, last + 1, stride))


def read_frames(info: VideoInfo, indices: list[int]) -> np.ndarray:
    """Decode the frames at `indices`; (f, h, w, 3) uint8."""
    reader = _decord_reader(info.path)
    if reader is not None:
        import decord

        try:
            return reader.get_batch(indices).asnumpy()
        except (decord.DECORDError, RuntimeError):
            pass  # damaged stream: let ffmpeg decode what it can
    frames = _ffmpeg_frames(info.path, info.width, info.height, limit=max(indices) + 1)
    if len(frames) <= max(indices):
        raise VideoError(f"{info.path} is truncated or corrupt: only {len(frames)} of {info.num_frames} frames decode")
    return frames[indices]


def processed_size(width: int, height: int, size: int, multiple: int, crop: str) -> tuple[int, int]:
    """Output (width, height): short side -> `size`, both sides multiples of `multiple`, aspect kept."""
    if size < multiple:
        raise UsageError(f"--size must be at least {multiple} for this model, got {size}")
    short = max(multiple, round(size / multiple) * multiple)
    if crop == "center":
        return short, short
    scale = short / min(width, height)
    # The long side is rounded down and the excess cropped, so nothing is stretched.
    fit = lambda side: max(multiple, int(side * scale + 1e-6) // multiple * multiple)  # noqa: E731
    return (short, fit(height)) if width <= height else (fit(width), short)


def source_region(width: int, height: int, out_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) in source pixels of the region that `resize_frames` maps onto `out_size`, rounded to
    even sides for H.264: the size an edit goes back to with `--output-size source`, unstretched."""
    out_w, out_h = out_size
    scale = max(out_w / width, out_h / height)
    even = lambda side: max(2, round(side / 2) * 2)  # noqa: E731
    return min(width, even(out_w / scale)) // 2 * 2, min(height, even(out_h / scale)) // 2 * 2


def resize_frames(frames: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """Scale to cover `out_size` (width, height), then center-crop to it; Lanczos filtering."""
    from PIL import Image

    out_w, out_h = out_size
    in_h, in_w = frames.shape[1:3]
    scale = max(out_w / in_w, out_h / in_h)
    cover = (max(out_w, round(in_w * scale)), max(out_h, round(in_h * scale)))
    left, top = (cover[0] - out_w) // 2, (cover[1] - out_h) // 2
    box = (left, top, left + out_w, top + out_h)
    resized = [np.asarray(Image.fromarray(f).resize(cover, Image.LANCZOS).crop(box)) for f in frames]
    return np.stack(resized)


def write_video(
    frames: np.ndarray,
    dest: Path,
    fps: float,
    audio: AudioSpan | None = None,
    overwrite: bool = False,
) -> None:
    """Write H.264 MP4 (yuv420p, faststart), muxing the audio span when given; atomic."""
    height, width = frames.shape[1:3]
    if width % 2 or height % 2:
        raise VideoError(f"H.264 yuv420p needs even frame sizes, got {width}x{height}")
    video_in = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", f"{fps:.6f}", "-i", "-"]
    audio_in, audio_out = [], []
    if audio is not None:
        audio_in = ["-ss", f"{audio.start_s:.6f}", "-t", f"{audio.duration_s:.6f}", "-i", str(audio.path)]
        audio_out = ["-map", "1:a:0", "-c:a", "aac", "-b:a", "192k", "-shortest"]
    with atomic_path(dest, overwrite) as tmp:
        encode = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "17", "-movflags", "+faststart"]
        args = ["-y", "-v", "error", *video_in, *audio_in, "-map", "0:v:0", *audio_out, *encode, str(tmp)]
        done = _ffmpeg(args, stdin=np.ascontiguousarray(frames).tobytes())
        if done.returncode != 0:
            raise VideoError(f"ffmpeg could not write {dest}: {done.stderr.decode(errors='replace').strip()}")


def write_gif(video: Path, dest: Path, overwrite: bool = False) -> None:
    """Convert an MP4 to a GIF with a palette made for it; atomic."""
    palette = "split[a][b];[a]palettegen=stats_mode=diff[p];[b][p]paletteuse=dither=sierra2_4a"
    with atomic_path(dest, overwrite) as tmp:
        done = _ffmpeg(["-y", "-v", "error", "-i", str(video), "-vf", palette, "-f", "gif", str(tmp)])
        if done.returncode != 0:
            raise VideoError(f"ffmpeg could not write {dest}: {done.stderr.decode(errors='replace').strip()}")
