"""Edit quality on the shapes world: four methods side by side on held-out clips, scored against ground truth.

    python benchmarks/edit_quality.py [--clips 16] [--seeds 1] [--tune-steps 150] [--steps 25] [--ablation]
                                      [--device cpu|cuda] [--jobs N]

Methods, same budget (DDIM steps, guidance, tuning steps): the image model per frame (no inflation, no
tuning), the inflated video UNet without tuning, Tune-A-Video (tuned, context off) and ContextDiff (tuned,
context adapter). Each clip gets three edits: a colour edit and a shape edit of the first object, and a
colour+shape edit (of the first object in one-object clips, of the second in two-object clips, so that
binding says whether the untouched object stayed). Writes benchmarks/results/edit_quality.md (mean and
95% interval over clips and seeds) and edit_quality.png. `--ablation` adds ContextDiff variants (shift
schedule, context scale, adapter learning rate, context fixed at R(x0_src, c_tgt) instead of following x0_hat)
and writes edit_quality_ablation.md. The report is rewritten after every clip, so a stopped run leaves what it
measured. `--jobs N` scores N clips at once in worker processes (on a GPU, where one tiny-model process
leaves it mostly idle).
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from diffusers import DDIMInverseScheduler
from PIL import Image, ImageDraw

from ctxedit import diffusion, editing
from ctxedit.diffusion import ShiftSchedule
from ctxedit.models.sd import StableDiffusion, load_sd
from ctxedit.models.trained import build
from ctxedit.settings import EditSettings, TuneSettings
from ctxedit.toy.demo import TUNING, toy_model
from ctxedit.toy.metrics import score_edit
from ctxedit.toy.world import COLOURS, SHAPES, Clip, random_clip
from ctxedit.tuning import tune


@dataclass(frozen=True)
class Method:
    name: str
    inflated: bool = True
    tuned: bool = True
    context: str = "quadratic"  # shift schedule; "off" is Tune-A-Video
    context_scale: float = 1.0
    adapter_lr: float = TUNING["adapter_lr"]
    follow_x0_hat: bool = True  # False: the context stays R(x0_src, c_tgt) through sampling


METHODS = (
    Method("image model per frame", inflated=False, tuned=False, context="off"),
    Method("inflated, no tuning", tuned=False, context="off"),
    Method("Tune-A-Video", context="off"),
    Method("ContextDiff"),
)
ABLATION = (
    Method("ContextDiff, prior schedule", context="prior"),
    Method("ContextDiff, context scale 2", context_scale=2.0),
    Method("ContextDiff, adapter lr 1e-4", adapter_lr=1e-4),
    Method("ContextDiff, fixed context", follow_x0_hat=False),
)
HELD_OUT_SEED = 2024  # training used seeds 0-1, tests 0-99 of their own
RESULTS = Path(__file__).resolve().parent / "results"


class PerFrameUNet(torch.nn.Module):
    """The stock image UNet applied to each frame on its own, with the video UNet's call signature."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: int, text: torch.Tensor) -> torch.Tensor:
        b, f = sample.shape[:2]
        eps = self.unet(sample.flatten(0, 1), timestep, text.repeat_interleave(f, 0)).sample
        return eps.unflatten(0, (b, f))


def edits_for(clip: Clip, rng: np.random.Generator) -> list[tuple[str, int, Clip]]:
    """(kind, object index, target clip): colour, shape, and colour+shape."""
    used = {o.colour for o in clip.objects}

    def other_colour() -> str:
        return str(rng.choice([c for c in COLOURS if c not in used]))

    def other_shape(index: int) -> str:
        return str(rng.choice([s for s in SHAPES if s != clip.objects[index].shape]))

    both = len(clip.objects) - 1
    return [
        ("colour", 0, clip.edited(0, colour=other_colour())),
        ("shape", 0, clip.edited(0, shape=other_shape(0))),
        ("both", both, clip.edited(both, colour=other_colour(), shape=other_shape(both))),
    ]


def method_model(sd: StableDiffusion, method: Method, x0, text, seed: int, tune_steps: int):
    """(sd with the method's UNet, model, adapter, shift) ready to invert and sample."""
    sd = replace(sd, unet=copy.deepcopy(sd.unet))
    shift = ShiftSchedule(method.context, method.context_scale)
    if not method.inflated:
        return sd, PerFrameUNet(sd.unet), None, shift
    model, adapter = build(sd, shift.active, seed)
    if method.tuned:
        settings = TuneSettings(
            prompt="-", steps=tune_steps, seed=seed, context=method.context, context_scale=method.context_scale,
            lr=TUNING["lr"], adapter_lr=method.adapter_lr, checkpoint_every=10**9,
        )  # fmt: skip
        with tempfile.TemporaryDirectory() as folder:
            tune(model, adapter, x0, text, sd, settings, Path(folder) / "checkpoint.pt")
    return sd, model, adapter, shift


def edit(tuned: editing.Tuned, x_T, target: str, settings: EditSettings, follow_x0_hat: bool):
    if follow_x0_hat or tuned.adapter is None:
        return editing.edit_latents(tuned, x_T, target, settings)
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(tuned.sd.scheduler.config)
    scheduler.set_timesteps(settings.steps)
    text, uncond = tuned.sd.encode_text([target]), tuned.sd.encode_text([""])
    fixed = tuned.adapter(tuned.x0, text)
    predict = editing.predictor(tuned, text, uncond, settings.guidance)
    return diffusion.sample(predict, x_T, scheduler, lambda _: fixed, tuned.x0, tuned.shift)


def run_clip(sd, clip: Clip, edits, methods, seeds: list[int], tune_steps: int, steps: int) -> list[dict]:
    source_frames, _ = clip.render()
    x0 = sd.encode_frames(source_frames)
    text = sd.encode_text([clip.caption])
    rows = []
    for method in methods:
        for seed in seeds if method.tuned else seeds[:1]:  # untuned methods ignore the seed
            started = time.perf_counter()
            method_sd, model, adapter, shift = method_model(sd, method, x0, text, seed, tune_steps)
            tuned = editing.Tuned(None, {"settings": {"seed": seed}}, method_sd, model, adapter, shift, x0, text)
            inverse = DDIMInverseScheduler.from_config(sd.scheduler.config)
            inverse.set_timesteps(steps)
            context = adapter(x0, text) if adapter is not None else None
            with torch.no_grad():
                x_T = diffusion.invert(editing.predictor(tuned, text), x0, inverse, context, shift)
            settings = EditSettings(steps=steps, guidance=5.0, seed=seed)
            for kind, index, target in edits:
                with torch.no_grad():
                    latents = edit(tuned, x_T, target.caption, settings, method.follow_x0_hat)
                frames = method_sd.decode_latents(latents)
                score = score_edit(clip, target, index, source_frames, frames)
                labels = {"method": method.name, "kind": kind, "objects": len(clip.objects), "seed": seed}
                rows.append(labels | asdict(score))
            for row in rows[-len(edits) :]:
                row["seconds"] = (time.perf_counter() - started) / len(edits)
    return rows


def interval(values: list[float]) -> str:
    values = np.asarray([v for v in values if v is not None], dtype=float)
    if len(values) == 0:
        return "-"
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
    return f"{values.mean():.2f} ± {half:.2f}"


def table(rows: list[dict], methods) -> str:
    pick = lambda method, key, kinds=("colour", "shape", "both"): [  # noqa: E731
        r[key] for r in rows if r["method"] == method and r["kind"] in kinds
    ]
    header = [
        "method", "colour drift px", "colour drift p90", "colour jitter px", "shape drift px", "attribute",
        "binding (2 objects)", "exact frames", "mask IoU (colour)", "background dB", "s per edit",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in (m.name for m in methods):
        binding = [r["binding"] for r in rows if r["method"] == method and r["objects"] == 2]
        cells = [
            method,
            interval(pick(method, "drift_mean", ("colour",))),
            interval(pick(method, "drift_p90", ("colour",))),
            interval(pick(method, "jitter", ("colour",))),
            interval(pick(method, "drift_mean", ("shape",))),
            interval(pick(method, "attribute")),
            interval(binding),
            interval(pick(method, "exact")),
            interval(pick(method, "mask_iou", ("colour",))),
            interval(pick(method, "background_psnr")),
            f"{np.mean(pick(method, 'seconds')):.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Bars of colour-edit drift and jitter per method with their 95% intervals (PIL, no plotting library)."""
    metrics = (("drift_mean", "colour-edit drift (px)"), ("jitter", "colour-edit jitter (px)"))
    width, height, margin = 900, 420, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    colours = ["#999999", "#6f8fbf", "#d98c3f", "#3f9f5f"]
    names = [m.name for m in METHODS]
    panel = (width - margin) // len(metrics)
    top = max(
        np.mean(v) + 1.96 * np.std(v, ddof=1) / np.sqrt(len(v))
        for key, _ in metrics
        for m in names
        if len(v := [r[key] for r in rows if r["method"] == m and r["kind"] == "colour"]) > 1
    )
    scale = (height - 2 * margin) / max(top, 1e-6)
    for p, (key, title) in enumerate(metrics):
        left = margin + p * panel
        draw.text((left, 10), title, fill="black")
        draw.line([(left, height - margin), (left + panel - 20, height - margin)], fill="black")
        for i, method in enumerate(names):
            values = [r[key] for r in rows if r["method"] == method and r["kind"] == "colour"]
            mean = float(np.mean(values))
            half = 1.96 * np.std(values, ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0
            x = left + 10 + i * (panel - 30) // len(names)
            bar = (panel - 30) // len(names) - 10
            draw.rectangle([x, height - margin - mean * scale, x + bar, height - margin], fill=colours[i])
            mid = x + bar // 2
            draw.line([(mid, height - margin - (mean + half) * scale), (mid, height - margin - (mean - half) * scale)],
                      fill="black", width=2)  # fmt: skip
            draw.text((x, height - margin + 5), method.replace(", ", ",\n").replace(" per", "\nper"), fill="black")
            draw.text((x, height - margin - mean * scale - 14), f"{mean:.2f}", fill="black")
    image.save(path)


_worker_sd: StableDiffusion | None = None


def _load_worker_model(device: str) -> None:
    global _worker_sd
    _worker_sd = load_sd(str(toy_model()), torch.device(device), torch.float32)


def _score_clip(job: tuple) -> list[dict]:
    clip, edits, methods, seeds, tune_steps, steps = job
    return run_clip(_worker_sd, clip, edits, methods, seeds, tune_steps, steps)


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{os.cpu_count()}-core CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=1, help="tuning seeds per clip (tuned methods)")
    parser.add_argument("--tune-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps of inversion and of sampling")
    parser.add_argument("--ablation", action="store_true", help="Tune-A-Video, ContextDiff and its variants")
    parser.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--jobs", type=int, default=1, help="clips scored at once, each in its own process")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the report")
    args = parser.parse_args()
    if args.clips < 1 or args.jobs < 1:
        parser.error("--clips and --jobs must be at least 1")
    methods = (METHODS[2], METHODS[3], *ABLATION) if args.ablation else METHODS

    rng = np.random.default_rng(HELD_OUT_SEED)
    jobs = []
    for i in range(args.clips):
        clip = random_clip(rng, frames=8, objects=1 + i % 2)
        jobs.append((clip, edits_for(clip, rng), methods, list(range(args.seeds)), args.tune_steps, args.steps))
    name = "edit_quality_ablation" if args.ablation else "edit_quality"
    title = "Edit quality on the shapes world" + (": ContextDiff ablation" if args.ablation else "")
    args.out.mkdir(parents=True, exist_ok=True)
    rows, started = [], time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.jobs, _load_worker_model, (args.device,)) as pool:
        for done, clip_rows in enumerate(pool.imap(_score_clip, jobs), 1):
            rows += clip_rows
            minutes = (time.perf_counter() - started) / 60
            print(f"clip {done}/{args.clips} done, {minutes:.1f} min", flush=True)
            settings = (
                f"{done} of {args.clips} held-out clips (seed {HELD_OUT_SEED}) x 3 edits, {args.seeds} tuning "
                f"seed(s), {args.tune_steps} tuning steps, {args.steps} DDIM steps, guidance 5, "
                f"{machine(args.device)}, {args.jobs} process(es), {minutes:.0f} min"
            )
            report = f"# {title}\n\n{settings}; mean ± 95% interval over clips and seeds.\n\n{table(rows, methods)}\n"
            (args.out / f"{name}.md").write_text(report)
    if not args.ablation:
        plot(rows, args.out / f"{name}.png")
    print(report)


if __name__ == "__main__":
    main()
