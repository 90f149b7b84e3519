"""Shared fixtures: a tiny random SD-format model, sample videos, synthetic videos. Everything offline."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests must never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import subprocess
from pathlib import Path

import pytest

from ctxedit.models.synthetic import write_tiny_sd
from ctxedit.video import ffmpeg_exe

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def skiing() -> Path:
    """256x256, 29.97 fps, 91 frames, with AAC audio."""
    return SAMPLES / "man-skiing.mp4"


@pytest.fixture(scope="session")
def car() -> Path:
    """256x256, 10 fps, 80 frames, no audio."""
    return SAMPLES / "car-turn.mp4"


def ffmpeg(*args, stdin: bytes | None = None) -> None:
    """Run the bundled ffmpeg quietly; fail the test with its message."""
    done = subprocess.run([ffmpeg_exe(), "-y", "-v", "error", *map(str, args)], input=stdin, capture_output=True)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-500:]


def encode(frames, path: Path, *options, fps: float = 10, inputs: tuple = ()) -> Path:
    """Encode RGB frames (f, h, w, 3) with `options` (codec, filters...); `inputs` adds inputs (e.g. audio)."""
    height, width = frames.shape[1:3]
    raw = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", fps, "-i", "-"]
    ffmpeg(*raw, *inputs, *options, path, stdin=frames.tobytes())
    return path


def make_video(path: Path, width: int, height: int, frames: int, fps: int = 10, extra: tuple[str, ...] = ()) -> Path:
    """A synthetic test-pattern video; the container follows the file extension."""
    args = [ffmpeg_exe(), "-y", "-v", "error", "-f", "lavfi", "-i", f"testsrc=size={width}x{height}:rate={fps}"]
    subprocess.run([*args, "-frames:v", str(frames), *extra, str(path)], check=True)
    return path


def linked_files(page: Path) -> list[Path]:
    """The local files an HTML page links (src and href, relative to its folder), as paths; fails on any other."""
    import html
    import re
    from urllib.parse import unquote

    links = [html.unescape(link) for link in re.findall(r'(?:src|href)="([^"]+)"', page.read_text(encoding="utf-8"))]
    files = [link for link in links if not link.startswith("#")]
    assert not [link for link in files if ":" in link or link.startswith("/")], "only relative links"
    return [Path(os.path.normpath(page.parent / unquote(link))) for link in files]
