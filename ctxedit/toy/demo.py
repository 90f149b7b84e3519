"""`ctxedit demo`: the whole method on the bundled shapes-world model, end to end, in about a minute on a CPU.

Renders a two-object clip, tunes on it, edits it three ways (colour, shape, the other object's colour)
through the same library calls as `ctxedit tune` and `ctxedit edit`, then measures each edit against the
exact ground truth and writes a side-by-side video and a frame strip.
"""

from __future__ import annotations

import shutil
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ctxedit import video as videos
from ctxedit.editing import edit_run
from ctxedit.errors import ModelError, RunError
from ctxedit.files import atomic_path
from ctxedit.runs import Progress, Run
from ctxedit.settings import EditSettings, TuneSettings
from ctxedit.toy.metrics import EditScore, score_edit
from ctxedit.toy.world import Clip, Shape
from ctxedit.tuning import tune_video

TOY_MODEL = Path(__file__).resolve().parents[2] / "samples" / "toy-sd"
FPS = 8.0
CLIP = Clip(
    objects=(
        Shape("circle", "red", radius=8.0, start=(14.0, 22.0), motion="right", speed=2.0),
        Shape("square", "blue", radius=7.0, start=(44.0, 46.0), motion="still", speed=0.0),
    ),
    background="gray",
    frames=8,
)
EDITS = ((0, {"colour": "green"}), (0, {"shape": "triangle"}), (1, {"colour": "yellow"}))  # (object, change)
FONT = ImageFont.load_default(size=11)
TUNING = dict(frames=8, stride=1, size=64, lr=1e-4, adapter_lr=1e-3)  # the toy model learns fast


@dataclass
class DemoEdit:
    target: str
    path: str
    score: EditScore


@dataclass
class DemoResult:
    folder: str
    source: str
    side_by_side: str
    strip: str
    edits: list[DemoEdit]
    seconds: float


def toy_model() -> Path:
    if not (TOY_MODEL / "model_index.json").exists():
        raise ModelError(f"the bundled shapes-world model is missing from {TOY_MODEL}; install from the source tree")
    return TOY_MODEL


def _captioned(frames: np.ndarray, text: str, scale: int = 4) -> np.ndarray:
    """Frames scaled up `scale` times, with `text` wrapped in a white band under each."""
    height, width = frames.shape[1] * scale, frames.shape[2] * scale
    lines = textwrap.wrap(text, width=width // 6)[:4]  # ~6 px per character at size 11
    band = 13 * 4 + 6  # room for 4 lines whatever the text: every panel has the same (even) height
    out = []
    for frame in frames:
        panel = Image.new("RGB", (width, height + band), (255, 255, 255))
        panel.paste(Image.fromarray(frame).resize((width, height), Image.NEAREST))
        ImageDraw.Draw(panel).multiline_text((4, height + 3), "\n".join(lines), fill=(0, 0, 0), font=FONT)
        out.append(np.asarray(panel))
    return np.stack(out)


def _strip(rows: list[tuple[str, np.ndarray]], scale: int = 2) -> Image.Image:
    """One row of frames per video, each under its title."""
    width = rows[0][1].shape[0] * rows[0][1].shape[2] * scale
    height = rows[0][1].shape[1] * scale
    image = Image.new("RGB", (width, len(rows) * (height + 16)), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for i, (title, frames) in enumerate(rows):
        top = i * (height + 16)
        draw.text((4, top + 2), title, fill=(0, 0, 0), font=FONT)
        row = Image.fromarray(np.concatenate(list(frames), axis=1))
        image.paste(row.resize((width, height), Image.NEAREST), (0, top + 16))
    return image


def run_demo(
    folder: Path,
    tune_steps: int = 150,
    edit_steps: int = 25,
    device: str = "auto",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> DemoResult:
    started = time.perf_counter()
    model = toy_model()
    if folder.exists():
        if not overwrite:
            raise RunError(f"{folder} already exists; pass --overwrite to run the demo again there")
        shutil.rmtree(folder)
    source_frames, _ = CLIP.render()
    source = folder / "source.mp4"
    videos.write_video(source_frames, source, FPS)
    run = Run(folder / "run")
    settings = TuneSettings(prompt=CLIP.caption, steps=tune_steps, **TUNING)
    tune_video(source, settings, run, str(model), device=device, precision="fp32", progress=progress)

    targets = [CLIP.edited(index, **change) for index, change in EDITS]
    results = edit_run(run, [t.caption for t in targets], EditSettings(steps=edit_steps, guidance=5.0), device=device,
                       precision="fp32", progress=progress)  # fmt: skip
    edits, rows = [], [("source: " + CLIP.caption, source_frames)]
    for (index, _), target, result in zip(EDITS, targets, results, strict=True):
        frames = videos.read_frames(videos.probe(Path(result.path)), list(range(CLIP.frames)))
        edits.append(DemoEdit(target.caption, result.path, score_edit(CLIP, target, index, source_frames, frames)))
        rows.append((target.caption, frames))
    panels = [_captioned(frames, title) for title, frames in rows]
    side_by_side = folder / "side-by-side.mp4"
    videos.write_video(np.concatenate(panels, axis=2), side_by_side, FPS)
    strip = folder / "strip.png"
    with atomic_path(strip) as tmp:
        _strip(rows).save(tmp, format="PNG")
    return DemoResult(str(folder), str(source), str(side_by_side), str(strip), edits, time.perf_counter() - started)
