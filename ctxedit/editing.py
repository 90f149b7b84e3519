"""Editing a tuned run: contextual DDIM inversion of the source (once, cached) and contextual sampling per target.

`edit_run` is what the CLI calls. It loads the model once for all targets, reuses a cached inversion
when one with the same settings exists, decodes frame by frame and writes each edit atomically.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ctxedit import diffusion
from ctxedit import video as videos
from ctxedit.diffusion import ShiftSchedule
from ctxedit.errors import UsageError
from ctxedit.files import atomic_path, refuse_overwrite, sha256_of
from ctxedit.models.adapter import ContextAdapter
from ctxedit.models.inflate import VideoUNet
from ctxedit.models.sd import StableDiffusion, load_sd, resolve_device, resolve_precision
from ctxedit.models.trained import build, load_trained
from ctxedit.runs import Progress, ProgressEvent, Run, recorded_model
from ctxedit.settings import EditSettings


@dataclass
class Tuned:
    """A tuned run, loaded: the model, its adapter, and the cached source latents and prompt states."""

    run: Run
    record: dict
    sd: StableDiffusion
    model: VideoUNet
    adapter: ContextAdapter | None
    shift: ShiftSchedule
    x0: torch.Tensor  # (1, f, c, h, w) source latents
    source_text: torch.Tensor  # (1, tokens, dim)


@dataclass
class EditResult:
    target: str
    path: str
    gif: str | None
    frames: int
    width: int
    height: int
    fps: float
    audio: bool
    inversion_cached: bool
    seconds: float


def load_tuned(run: Run, device: str = "auto", precision: str = "auto") -> Tuned:
    from safetensors.torch import load_file

    record = run.require_tuned()
    torch_device = resolve_device(device)
    sd = load_sd(recorded_model(record), torch_device, resolve_precision(precision, torch_device))
    settings = record["settings"]
    shift = ShiftSchedule(settings["context"], settings["context_scale"])
    model, adapter = build(sd, shift.active, settings["seed"])
    load_trained(run.tuned_path, model, adapter)
    cache = load_file(str(run.source_path), device=str(torch_device))
    return Tuned(run, record, sd, model, adapter, shift, cache["latents"], cache["text"])


def predictor(tuned: Tuned, text: torch.Tensor, uncond: torch.Tensor | None = None, guidance: float = 1.0):
    """eps(x, t) of the tuned video UNet, with classifier-free guidance when `uncond` is given."""
    sd, model = tuned.sd, tuned.model

    def predict(x: torch.Tensor, t: int) -> torch.Tensor:
        with sd.autocast():
            if uncond is None:
                return model(x.to(sd.dtype), t, text.to(sd.dtype)).float()
            both = model(torch.cat([x, x]).to(sd.dtype), t, torch.cat([uncond, text]).to(sd.dtype)).float()
        eps_uncond, eps_text = both.chunk(2)
        return eps_uncond + guidance * (eps_text - eps_uncond)

    return predict


def _stage(progress: Progress | None, stage: str, label: str = "") -> Callable[[int, int], None] | None:
    return (lambda done, total: progress(ProgressEvent(stage, done, total, label=label))) if progress else None


def inversion_key(tuned: Tuned, settings: EditSettings) -> str:
    """Everything the inverted latents depend on, hashed."""
    key = {
        "steps": settings.steps,
        "prompt": settings.inversion_prompt,
        "tuned": sha256_of(tuned.run.tuned_path),
        "runtime": [tuned.sd.device.type, str(tuned.sd.dtype)],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def invert_source(tuned: Tuned, settings: EditSettings, progress: Progress | None = None) -> tuple[torch.Tensor, bool]:
    """(x_T of the source, whether it came from the cache); computed once per setting and cached."""
    from diffusers import DDIMInverseScheduler
    from safetensors.torch import load_file, save_file

    path = tuned.run.inversion_path(inversion_key(tuned, settings))
    if path.exists():
        return load_file(str(path), device=str(tuned.sd.device))["latents"], True
    scheduler = DDIMInverseScheduler.from_config(tuned.sd.scheduler.config)
    scheduler.set_timesteps(settings.steps)
    text = tuned.source_text if settings.inversion_prompt == "source" else tuned.sd.encode_text([""])
    # The context of the source trajectory stays fixed: R(x0_src, c_src).
    context = tuned.adapter(tuned.x0, tuned.source_text) if tuned.adapter is not None else None
    latents = diffusion.invert(
        predictor(tuned, text), tuned.x0, scheduler, context, tuned.shift, _stage(progress, "invert")
    )
    with atomic_path(path) as tmp:
        save_file({"latents": latents.contiguous().cpu()}, str(tmp))
    return latents, False


@torch.no_grad()
def edit_latents(
    tuned: Tuned, inverted: torch.Tensor, target: str, settings: EditSettings, progress: Progress | None = None
) -> torch.Tensor:
    """Contextual DDIM sampling from the inverted source towards `target`; the context follows x0_hat."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(tuned.sd.scheduler.config)
    scheduler.set_timesteps(settings.steps)
    text, uncond = tuned.sd.encode_text([target]), tuned.sd.encode_text([""])
    context_of = (lambda x0_hat: tuned.adapter(x0_hat, text)) if tuned.adapter is not None else None
    seed = settings.seed if settings.seed is not None else tuned.record["settings"]["seed"]
    generator = torch.Generator(tuned.sd.device).manual_seed(seed)
    return diffusion.sample(
        predictor(tuned, text, uncond, settings.guidance),
        inverted,
        scheduler,
        context_of,
        tuned.x0,
        tuned.shift,
        eta=settings.eta,
        generator=generator,
        callback=_stage(progress, "edit", target),
    )


def _audio_span(record: dict) -> videos.AudioSpan | None:
    source, frames = record["video"], record["frames"]
    if not source["has_audio"] or not Path(source["path"]).exists():
        return None
    start = frames["indices"][0] / source["fps"]
    return videos.AudioSpan(Path(source["path"]), start, frames["count"] * frames["stride"] / source["fps"])


def output_paths(run: Run, targets: list[str], out: Path | None, gif: bool, overwrite: bool) -> list[Path]:
    """Where each edit goes; checked before any work so that nothing runs only to be refused."""
    if not targets or any(not t.strip() for t in targets):
        raise UsageError("--target is empty; give the edited description, e.g. --target 'a man is skiing on the moon'")
    if out is not None and len(targets) > 1:
        raise UsageError("--out names one file; with several --target the edits go to the run's edits/ folder")
    paths = [out] if out is not None else [run.edit_path(t) for t in targets]
    if out is not None and out.suffix.lower() != ".mp4":
        raise UsageError(f"--out must end in .mp4, got {out.name}")
    if len(set(paths)) < len(paths):
        raise UsageError("two targets give the same file name; make them differ in letters or digits")
    for path in paths:
        refuse_overwrite(path, overwrite)
        if gif:
            refuse_overwrite(path.with_suffix(".gif"), overwrite)
    return paths


def edit_run(
    run: Run,
    targets: list[str],
    settings: EditSettings,
    out: Path | None = None,
    gif: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    precision: str = "auto",
    progress: Progress | None = None,
) -> list[EditResult]:
    """Edit a tuned run towards each target; every edit is written and recorded as soon as it is done."""
    paths = output_paths(run, targets, out, gif, overwrite)
    tuned = load_tuned(run, device, precision)
    record = tuned.record
    results, started = [], time.perf_counter()
    inverted, cached = invert_source(tuned, settings, progress)  # the first edit's time includes it
    for target, path in zip(targets, paths, strict=True):
        latents = edit_latents(tuned, inverted, target, settings, progress)
        frames = tuned.sd.decode_latents(latents, _stage(progress, "decode", target))
        audio = _audio_span(record)
        videos.write_video(frames, path, record["fps"], audio, overwrite)
        gif_path = path.with_suffix(".gif") if gif else None
        if gif_path:
            videos.write_gif(path, gif_path, overwrite)
        result = EditResult(
            target=target,
            path=str(path),
            gif=str(gif_path) if gif_path else None,
            frames=len(frames),
            width=frames.shape[2],
            height=frames.shape[1],
            fps=record["fps"],
            audio=audio is not None,
            inversion_cached=cached,
            seconds=time.perf_counter() - started,
        )
        cached, started = True, time.perf_counter()  # the next targets reuse this inversion
        record["edits"].append(asdict(result) | {"settings": settings.to_dict()})
        run.write_record(record)
        results.append(result)
    return results
