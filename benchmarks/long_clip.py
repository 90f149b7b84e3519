"""Whole clips in windows: edit quality over a long shapes-world clip, and memory and time against clip length.

    python benchmarks/long_clip.py [--frames 120] [--tune-steps 150,600] [--steps 25] [--skip-cost] [--skip-quality]
                                   [--development]

Quality: a 120-frame clip at 8 fps (a red circle going back and forth across the frame three times, a blue square
standing still), tuned with the demo's settings on the whole clip (`--frames all`, windows of 8) for each of
--tune-steps, and its circle made green by
  - ctxedit: windows of 8 after the anchor frame, 2 frames overlapping, blended at every step;
  - naive windows (after the first tuning): the same model, windows of 8 edited independently (no anchor, no
    overlap);
  - short clips: every 8 frames tuned (the first --tune-steps) and edited alone, one after the other (the quality
    of a short clip, over the same frames);
scored over every frame against the ground truth (`toy.metrics.score_edit`), plus flicker: how far each frame-to-
frame change departs from the source's (mean absolute difference, 0-255), at window seams (where the windows
covering two neighbouring frames differ) against inside windows. `--development`: ctxedit's rows only, on two other
clips (`development_clips`), where settings are chosen before they are measured on the clip above.
Cost: peak memory (RSS) and time of `tune` and one `edit` (--cost-steps each) at 32, 120 and 480 frames with the
tiny random model (32 px) and the bundled model (64 px), each in a fresh process.
Writes benchmarks/results/long_clip_quality.md (or long_clip_development.md) and long_clip_cost.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from edit_quality import GUIDANCE, RESULTS, machine

from ctxedit import editing, windows
from ctxedit import video as videos
from ctxedit.runs import Run
from ctxedit.settings import EditSettings, TuneSettings
from ctxedit.toy.demo import TUNING, toy_model
from ctxedit.toy.metrics import score_edit
from ctxedit.toy.world import Clip, Shape
from ctxedit.tuned import Tuned, load_tuned
from ctxedit.tuning import tune_video

FPS = 8.0
WINDOW, OVERLAP = 8, 2


def long_clip(frames: int) -> Clip:
    return Clip(
        objects=(
            Shape("circle", "red", radius=7.0, start=(12.0, 20.0), motion="right", speed=1.0, period=80),
            Shape("square", "blue", radius=7.0, start=(44.0, 46.0), motion="still", speed=0.0),
        ),
        background="gray",
        frames=frames,
    )


def development_clips(frames: int) -> list[tuple[Clip, str]]:
    """Other long clips, with the colour their moving object is given: settings are chosen on these, then
    measured on `long_clip`."""
    down = Clip(
        objects=(
            Shape("triangle", "blue", radius=7.0, start=(22.0, 12.0), motion="down", speed=0.9, period=64),
            Shape("square", "yellow", radius=6.0, start=(50.0, 14.0), motion="still", speed=0.0),
        ),
        background="white",
        frames=frames,
    )
    left = Clip(
        objects=(
            Shape("square", "green", radius=7.0, start=(52.0, 42.0), motion="left", speed=0.8, period=96),
            Shape("circle", "red", radius=7.0, start=(16.0, 14.0), motion="still", speed=0.0),
        ),
        background="black",
        frames=frames,
    )
    return [(down, "red"), (left, "yellow")]


def tuned_on(
    clip: Clip, folder: Path, tune_steps: int, device: str, frames: int | str = "all", start: int = 0
) -> Tuned:
    source = folder / "source.mp4"
    videos.write_video(clip.render()[0], source, FPS)
    chosen = TUNING | {"frames": frames, "start": start, "window": WINDOW, "steps": tune_steps}
    run = Run(folder / "run")
    tune_video(source, TuneSettings(**chosen, prompt=clip.caption), run, str(toy_model()), device=device)
    return load_tuned(run, device)


def edit(tuned: Tuned, target: str, settings: EditSettings) -> np.ndarray:
    source = editing.source_pass(tuned, settings)
    return tuned.sd.decode_latents(editing.edit_latents(tuned, source, target, settings))


def flicker(frames: np.ndarray, source: np.ndarray, sequences: list[list[int]], size: int) -> tuple[float, float]:
    """(mean flicker at seams, inside windows) of an edit whose windows had these frame `sequences`."""
    covering = [frozenset(k for k, s in enumerate(sequences) if f in s[-size:]) for f in range(len(frames))]
    change = np.abs(np.diff(frames.astype(float), axis=0) - np.diff(source.astype(float), axis=0)).mean(axis=(1, 2, 3))
    seams = [covering[i] != covering[i + 1] for i in range(len(change))]
    return float(change[seams].mean()), float(change[[not s for s in seams]].mean())


def quality(
    clip: Clip, colour: str, tune_steps: list[int], steps: int, device: str, baselines: bool = True
) -> list[dict]:
    """Rows: the whole clip tuned `tune_steps[k]` steps and edited in ctxedit's windows, its moving object given
    `colour`; with `baselines`, also naive windows after the first tuning and every 8 frames tuned and edited alone
    with the first tuning's steps."""
    frames = clip.frames
    target = clip.edited(0, colour=colour)
    source_frames, _ = clip.render()
    settings = EditSettings(steps=steps, guidance=GUIDANCE, seed=0, overlap=OVERLAP)
    rows = []

    def row(name: str, edited: np.ndarray, sequences: list[list[int]], tune_s: float, edit_s: float) -> None:
        seam, inside = flicker(edited, source_frames, sequences, WINDOW)
        score = score_edit(clip, target, 0, source_frames, edited)
        name = name if baselines else f"{clip.objects[0].describe()}: {name}"
        rows.append({"method": name, "frames": frames, "windows": len(sequences), "tune_s": tune_s,
                     "edit_s": edit_s, "seam": seam, "inside": inside, **vars(score)})  # fmt: skip
        print(rows[-1], flush=True)

    with tempfile.TemporaryDirectory() as folder:
        for n, tune_s in enumerate(tune_steps):
            started = time.perf_counter()
            tuned = tuned_on(clip, Path(folder) / f"long-{n}", tune_s, device)
            tuning = time.perf_counter() - started
            for name in ("ctxedit windows", "naive windows")[: 2 if n == 0 and baselines else 1]:
                naive = name.startswith("naive")
                chosen = EditSettings(**(settings.to_dict() | {"overlap": 0})) if naive else settings
                real_anchor = windows.with_anchor
                if naive:  # each window on its own: no anchor frame
                    windows.with_anchor = lambda first, size: list(range(first, first + size))
                try:
                    started = time.perf_counter()
                    edited = edit(tuned, target.caption, chosen)
                    sequences = tuned.windows(chosen.overlap).sequences
                finally:
                    windows.with_anchor = real_anchor
                row(f"{name}, tuned {tune_s} steps", edited, sequences, tuning, time.perf_counter() - started)
        chunks, tuning, editing_s = [], 0.0, 0.0
        for first in range(0, frames, WINDOW) if baselines else ():  # short clips: every 8 frames on their own
            started = time.perf_counter()
            tuned = tuned_on(clip, Path(folder) / f"short-{first}", tune_steps[0], device, WINDOW, first)
            tuning += time.perf_counter() - started
            started = time.perf_counter()
            chunks.append(edit(tuned, target.caption, settings))
            editing_s += time.perf_counter() - started
        sequences = [list(range(first, first + WINDOW)) for first in range(0, frames, WINDOW)]
        if chunks:
            row(f"short clips: every 8 frames alone, tuned {tune_steps[0]} steps each", np.concatenate(chunks),
                sequences, tuning, editing_s)  # fmt: skip
    return rows


COST_RUN = """
import json, resource, sys, time
from pathlib import Path
from ctxedit import editing, video
from ctxedit.runs import Run
from ctxedit.settings import EditSettings, TuneSettings
from ctxedit.tuning import tune_video
sys.path.insert(0, {benchmarks!r})
from long_clip import long_clip
folder, model, frames, size, device, steps = Path({folder!r}), {model!r}, {frames}, {size}, {device!r}, {steps}
clip = long_clip(frames)
video.write_video(clip.render()[0], folder / "source.mp4", 8.0)
run = Run(folder / "run")
started = time.perf_counter()
settings = TuneSettings(prompt=clip.caption, frames="all", stride=1, size=size, steps=steps, window=8)
tune_video(folder / "source.mp4", settings, run, model, device=device)
tuned_s = time.perf_counter() - started
started = time.perf_counter()
editing.edit_run(run, [clip.edited(0, colour="green").caption], EditSettings(steps=steps, guidance=5.0), device=device)
print(json.dumps({{"tune_s": tuned_s, "edit_s": time.perf_counter() - started,
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def cost(device: str, steps: int) -> list[dict]:
    from ctxedit.models.synthetic import write_tiny_sd

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        models = {"tiny random (32 px)": (str(write_tiny_sd(Path(folder) / "tiny")), 32),
                  "bundled shapes model (64 px)": (str(toy_model()), 64)}  # fmt: skip
        for name, (model, size) in models.items():
            for frames in (32, 120, 480):
                work = Path(tempfile.mkdtemp(dir=folder))
                code = COST_RUN.format(benchmarks=str(Path(__file__).parent), folder=str(work), model=model,
                                       frames=frames, size=size, device=device, steps=steps)  # fmt: skip
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                measured = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append({"model": name, "frames": frames, "steps": steps, **measured})
                print(rows[-1], flush=True)
    return rows


QUALITY_HEADER = (
    "| editing | frames | windows | attribute | binding | exact | drift px | jitter px | flicker at seams "
    "| flicker inside | seams / inside | edit s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)
COST_HEADER = (
    "| model | frames | peak RSS MiB | tune s | edit s | edit ms per frame and step |\n|---|---:|---:|---:|---:|---:|"
)


def quality_report(rows: list[dict], header: str) -> str:
    lines = [f"# Whole clips in windows: quality over a {rows[0]['frames']}-frame clip\n\n{header}\n", QUALITY_HEADER]
    for r in rows:
        seams = f"{r['seam']:.2f} | {r['inside']:.2f} | {r['seam'] / r['inside']:.2f}" if r["seam"] else "- | - | -"
        scores = " | ".join(f"{r[k]:.2f}" for k in ("attribute", "binding", "exact", "drift_mean", "jitter"))
        lines.append(f"| {r['method']} | {r['frames']} | {r['windows']} | {scores} | {seams} | {r['edit_s']:.0f} |")
    return "\n".join(lines) + "\n"


def cost_report(rows: list[dict], header: str) -> str:
    steps = rows[0]["steps"]
    lines = [f"# Whole clips in windows: memory and time (tune {steps} steps, one edit of {steps} steps)\n\n{header}\n",
             COST_HEADER]  # fmt: skip
    for r in rows:
        per = 1000 * r["edit_s"] / (r["frames"] * r["steps"])
        times = f"{r['tune_s']:.1f} | {r['edit_s']:.1f} | {per:.1f}"
        lines.append(f"| {r['model']} | {r['frames']} | {r['rss_mib']:.0f} | {times} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--tune-steps", default="150", help="tuning steps of the whole clip, comma-separated")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--development", action="store_true", help="quality on the development clips instead")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--cost-steps", type=int, default=5, help="tuning and DDIM steps of the cost rows")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.skip_quality:
        tune_steps = [int(n) for n in args.tune_steps.split(",")]
        header = (f"Edited with {args.steps} DDIM steps at guidance {GUIDANCE:g} and "
                  f"ctxedit's structure defaults; {machine(args.device)}.")  # fmt: skip
        if args.development:
            clips = development_clips(args.frames)
            rows = [row for clip, colour in clips for row in quality(clip, colour, tune_steps, args.steps,
                                                                     args.device, baselines=False)]  # fmt: skip
        else:
            rows = quality(long_clip(args.frames), "green", tune_steps, args.steps, args.device)
        text = quality_report(rows, header)
        name = "long_clip_development.md" if args.development else "long_clip_quality.md"
        (args.out / name).write_text(text)
        print(text)
    if not args.skip_cost:
        header = f"Each row a fresh process, ctxedit's defaults otherwise; {machine(args.device)}."
        text = cost_report(cost(args.device, args.cost_steps), header)
        (args.out / "long_clip_cost.md").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
