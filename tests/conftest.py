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


def make_video(path: Path, width: int, height: int, frames: int, fps: int = 10, extra: tuple[str, ...] = ()) -> Path:
    """A synthetic test-pattern video; the container follows the file extension."""
    args = [ffmpeg_exe(), "-y", "-v", "error", "-f", "lavfi", "-i", f"testsrc=size={width}x{height}:rate={fps}"]
    subprocess.run([*args, "-frames:v", str(frames), *extra, str(path)], check=True)
    return path
