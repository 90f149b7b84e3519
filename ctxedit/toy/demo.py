"""`ctxedit demo`: the whole method on the bundled shapes-world model, end to end, in about a minute on a CPU.

Renders a two-object clip, tunes on it, edits it three ways (colour, shape, the other object's colour)
through the same library calls as `ctxedit tune` and `ctxedit edit`, then measures each edit against the
exact ground truth and writes a side-by-side video and a frame strip.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ctxedit import compose
from ctxedit import video as videos
from ctxedit.editing import edit_run
from ctxedit.errors import ModelError, RunError
from ctxedit.report import write_report
from ctxedit.runs import Progress, Run
from ctxedit.scoring import score_run
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
TUNING = dict(frames=8, stride=1, size=64, lr=1e-4, adapter_lr=1e-3)  # the toy model learns fast


@dataclass
class DemoEdit:
    change: str  # "red circle -> green circle"
    target: str
    path: str
    score: EditScore


@dataclass
class DemoResult:
    folder: str
    source: str
    side_by_side: str
    strip: str
    report: str
    edits: list[DemoEdit]
    seconds: float


def toy_model() -> Path:
    if not (TOY_MODEL / "model_index.json").exists():
        raise ModelError(f"the bundled shapes-world model is missing from {TOY_MODEL}; install from the source tree")
    return TOY_MODEL


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
        before, after = CLIP.objects[index], target.objects[index]
        change = f"{before.colour} {before.shape} -> {after.colour} {after.shape}"
        score = score_edit(CLIP, target, index, source_frames, frames)
        edits.append(DemoEdit(change, target.caption, result.path, score))
        rows.append((target.caption, frames))
    side_by_side = folder / "side-by-side.mp4"
    videos.write_video(compose.side_by_side(rows), side_by_side, FPS)
    strip = folder / "strip.png"
    compose.write_strip(rows, strip)
    score_run(run, [], "caption", "shapes", device)  # the scores the report shows, with the shapes world's captioner
    report = write_report([run], folder / "report.html", title="ctxedit demo: the shapes world")
    seconds = time.perf_counter() - started
    return DemoResult(str(folder), str(source), str(side_by_side), str(strip), str(report), edits, seconds)
