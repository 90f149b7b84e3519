"""Editing a tuned run: contextual DDIM inversion of the source (once, cached) and contextual sampling per target.

`edit_run` is what `ctxedit edit` calls, `render_edits` what `ctxedit batch` calls. The model is loaded once
for all targets, an inversion with the same settings is reused (cached on disk), frames are decoded one by
one and each edit is written atomically and recorded at once.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ctxedit import compose, diffusion
from ctxedit import video as videos
from ctxedit.diffusion import ShiftSchedule
from ctxedit.errors import UsageError
from ctxedit.files import atomic_path, refuse_overwrite, sha256_of
from ctxedit.models.adapter import ContextAdapter
from ctxedit.models.inflate import VideoUNet
from ctxedit.models.sd import StableDiffusion, load_sd, resolve_device, resolve_precision
from ctxedit.models.trained import build, load_trained
from ctxedit.runs import Progress, ProgressEvent, Run, recorded_model
from ctxedit.settings import EditSettings, OutputSettings


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


def _output_fps(record: dict, output: OutputSettings) -> float:
    return output.fps or record["fps"]


def _audio_span(record: dict, output: OutputSettings) -> videos.AudioSpan | None:
    """The source's audio under the edited frames; none at another frame rate, where it would not line up."""
    source, frames = record["video"], record["frames"]
    if not source["has_audio"] or not Path(source["path"]).exists() or _output_fps(record, output) != record["fps"]:
        return None
    start = frames["indices"][0] / source["fps"]
    return videos.AudioSpan(Path(source["path"]), start, frames["count"] * frames["stride"] / source["fps"])


def composite_paths(run: Run, output: OutputSettings) -> list[Path]:
    wanted = (("side-by-side", output.side_by_side), ("grid", output.grid))
    return [run.root / "edits" / f"{name}.mp4" for name, on in wanted if on]


def output_paths(run: Run, targets: list[str], out: Path | None, output: OutputSettings, overwrite: bool) -> list[Path]:
    """Where each edit goes; checked (with the composites) before any work so that nothing runs only to be refused."""
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
        if output.gif:
            refuse_overwrite(path.with_suffix(".gif"), overwrite)
    for path in composite_paths(run, output):
        refuse_overwrite(path, overwrite)
    return paths


@dataclass(frozen=True)
class EditRequest:
    target: str
    settings: EditSettings
    path: Path


def render_edits(
    tuned: Tuned,
    requests: list[EditRequest],
    output: OutputSettings = OutputSettings(),
    overwrite: bool = False,
    progress: Progress | None = None,
) -> list[EditResult]:
    """Edit towards each request's target; every edit is written and recorded as soon as it is done. Requests
    with the same inversion settings share one inversion (the first one's time includes it)."""
    record = tuned.record
    inversions: dict[tuple[int, str], tuple[torch.Tensor, bool]] = {}  # the rest of inversion_key is fixed here
    results = []
    for request in requests:
        started = time.perf_counter()
        key = (request.settings.steps, request.settings.inversion_prompt)
        if key not in inversions:
            inversions[key] = invert_source(tuned, request.settings, progress)
        inverted, cached = inversions[key]
        inversions[key] = (inverted, True)
        latents = edit_latents(tuned, inverted, request.target, request.settings, progress)
        frames = tuned.sd.decode_latents(latents, _stage(progress, "decode", request.target))
        if output.size == "source":
            frames = videos.resize_frames(
                frames, videos.source_region(record["video"]["width"], record["video"]["height"], frames.shape[2:0:-1])
            )
        audio, fps = _audio_span(record, output), _output_fps(record, output)
        videos.write_video(frames, request.path, fps, audio, overwrite)
        gif_path = request.path.with_suffix(".gif") if output.gif else None
        if gif_path:
            videos.write_gif(request.path, gif_path, overwrite)
        result = EditResult(
            target=request.target,
            path=str(request.path),
            gif=str(gif_path) if gif_path else None,
            frames=len(frames),
            width=frames.shape[2],
            height=frames.shape[1],
            fps=fps,
            audio=audio is not None,
            inversion_cached=cached,
            seconds=time.perf_counter() - started,
        )
        record["edits"].append(asdict(result) | {"settings": request.settings.to_dict(), "output": output.to_dict()})
        tuned.run.write_record(record)
        results.append(result)
    return results


def edit_run(
    run: Run,
    targets: list[str],
    settings: EditSettings,
    out: Path | None = None,
    output: OutputSettings = OutputSettings(),
    overwrite: bool = False,
    device: str = "auto",
    precision: str = "auto",
    progress: Progress | None = None,
) -> list[EditResult]:
    """Edit a tuned run towards each target with one model load; then the composites `output` asks for."""
    paths = output_paths(run, targets, out, output, overwrite)
    tuned = load_tuned(run, device, precision)
    requests = [EditRequest(target, settings, path) for target, path in zip(targets, paths, strict=True)]
    results = render_edits(tuned, requests, output, overwrite, progress)
    write_composites(run, tuned.record, [(r.target, Path(r.path)) for r in results], output, overwrite)
    return results


def source_frames(record: dict) -> np.ndarray:
    """The tuned frames of the source, as the model saw them (processed size)."""
    info = videos.probe(Path(record["video"]["path"]))
    size = (record["size"]["width"], record["size"]["height"])
    return videos.resize_frames(videos.read_frames(info, record["frames"]["indices"]), size)


def write_composites(
    run: Run, record: dict, edits: list[tuple[str, Path]], output: OutputSettings, overwrite: bool = False
) -> list[Path]:
    """The side-by-side and grid videos `output` asks for, of the source and `edits` (caption, file)."""
    if not composite_paths(run, output) or not edits:
        return []
    source = ("source: " + record["settings"]["prompt"], source_frames(record))
    folder, fps, audio = run.root / "edits", _output_fps(record, output), _audio_span(record, output)
    return compose.write_composites(source, edits, folder, output.side_by_side, output.grid, fps, audio, overwrite)
