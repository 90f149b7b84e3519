"""One-shot tuning on one clip with the contextualized forward process (METHOD.md sections 1 and 4).

`tune_video` is what the CLI calls: it prepares the run (video, caches, record), builds the model and
runs `tune`, the flat training loop. The loop saves a checkpoint every few steps and on Ctrl-C, and
stops on a non-finite loss with the last good parameters kept.
"""

from __future__ import annotations

import math
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ctxedit import video as videos
from ctxedit.diffusion import ShiftSchedule, training_target
from ctxedit.errors import Interrupted, RunError, TuningDiverged
from ctxedit.files import atomic_path, sha256_of
from ctxedit.models.adapter import WEIGHTS, ContextAdapter, find_pretrained
from ctxedit.models.inflate import VideoUNet
from ctxedit.models.sd import StableDiffusion, load_sd, resolve_device, resolve_precision
from ctxedit.models.spec import ModelSpec
from ctxedit.models.trained import build, load_trained_state, save_trained, trained_state
from ctxedit.runs import Progress, ProgressEvent, Run, versions
from ctxedit.settings import TuneSettings
from ctxedit.windows import random_window


@dataclass
class TuneLog:
    losses: list[float]  # one per step done, resumed steps included
    stopped_early: str | None = None  # why tuning ended before --steps


@dataclass
class TuneResult:
    run: str
    steps: int
    first_loss: float
    last_loss: float
    seconds: float


# ---- the training loop -------------------------------------------------------------------------------------


@contextmanager
def interrupts_between_steps() -> Iterator[Callable[[], bool]]:
    """Ctrl-C only sets a flag, which the caller reads between steps (`interrupted()`); a second Ctrl-C raises
    KeyboardInterrupt at once. Outside the main thread, where signals cannot be caught, the flag stays False."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    requested = threading.Event()

    def on_ctrl_c(signum, frame) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield requested.is_set
    finally:  # `previous` is None where a non-Python handler was installed; Python's default is then the best guess
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)


def training_loss(
    model: VideoUNet,
    adapter: ContextAdapter | None,
    x0: torch.Tensor,
    text: torch.Tensor,
    sd: StableDiffusion,
    shift: ShiftSchedule,
    generator: torch.Generator,
) -> torch.Tensor:
    """Loss of the model's prediction (eps, or v for a v-model) at one random t on the contextual forward marginal
    x_t = √ā x0 + k_t r + √(1-ā) ε."""
    scheduler = sd.scheduler
    t = int(torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator, device=x0.device))
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    x_t = scheduler.add_noise(x0, noise, torch.tensor([t]))
    if adapter is not None:
        # The adapter learns through x_t: its output shifts where the UNet has to denoise from.
        x_t = x_t + shift(scheduler.alphas_cumprod[t]).to(x0.device) * adapter(x0, text)
    with sd.autocast():
        prediction = model(x_t.to(sd.dtype), t, text.to(sd.dtype))
    return F.mse_loss(prediction.float(), training_target(x0, noise, scheduler.alphas_cumprod[t], sd.prediction))


def _save_checkpoint(path, model, adapter, optimizer, generator, scaler, losses) -> None:
    state = {
        "losses": losses,
        "trained": {n: t.cpu() for n, t in trained_state(model, adapter).items()},
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "scaler": scaler.state_dict(),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _restore_checkpoint(path, model, adapter, optimizer, generator, scaler) -> list[float]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    load_trained_state(state["trained"], model, adapter)
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    scaler.load_state_dict(state["scaler"])
    return state["losses"]


def tune(
    model: VideoUNet,
    adapter: ContextAdapter | None,
    x0: torch.Tensor,
    text: torch.Tensor,
    sd: StableDiffusion,
    settings: TuneSettings,
    checkpoint: Path,
    progress: Progress | None = None,
    kept_path: Callable[[int], Path] | None = None,
) -> TuneLog:
    """Tune the trainable UNet parameters and the adapter; resumes from `checkpoint` when it exists. A clip longer
    than `settings.window` is seen a window at a time (`with_anchor`), each step's from anywhere in it. With
    `settings.keep_checkpoints`, the parameters at every periodic checkpoint are also saved to `kept_path(step)`.

    Ctrl-C takes effect between steps: the step under way finishes, the checkpoint is saved and Interrupted
    raised, so a resumed run is bit-identical to an uninterrupted one (a second Ctrl-C stops at once and keeps
    the last checkpoint). A non-finite loss ends tuning before its update: the parameters stay those of the
    last good step.
    """
    shift = ShiftSchedule(settings.context, settings.context_scale)
    unet_params = list(model.trainable_parameters().values())
    adapter_params = list(adapter.parameters()) if adapter is not None else []
    groups = [{"params": unet_params, "lr": settings.lr}]
    if adapter_params:
        groups.append({"params": adapter_params, "lr": settings.adapter_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    scaler = torch.amp.GradScaler(sd.device.type, enabled=sd.dtype == torch.float16)
    generator = torch.Generator(sd.device).manual_seed(settings.seed)
    losses: list[float] = []
    if checkpoint.exists():
        losses = _restore_checkpoint(checkpoint, model, adapter, optimizer, generator, scaler)
    save = lambda: _save_checkpoint(checkpoint, model, adapter, optimizer, generator, scaler, losses)  # noqa: E731

    model.train()
    saved = len(losses) if checkpoint.exists() else None  # the step the checkpoint on disk holds
    frames, window = x0.shape[1], settings.window
    try:
        with interrupts_between_steps() as interrupted:
            for step in range(len(losses), settings.steps):
                seen = x0[:, random_window(frames, window, generator)] if frames > window else x0
                loss = training_loss(model, adapter, seen, text, sd, shift, generator)
                if not math.isfinite(loss.item()):
                    return TuneLog(losses, stopped_early=f"the loss became {loss.item()} at step {step + 1}")
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                # Clipped separately: with one clip, the adapter's gradients would rescale the UNet's update.
                torch.nn.utils.clip_grad_norm_(unet_params, settings.max_grad_norm)
                if adapter_params:
                    torch.nn.utils.clip_grad_norm_(adapter_params, settings.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                if progress:
                    progress(ProgressEvent("tune", step + 1, settings.steps, loss=losses[-1]))
                stop = interrupted()
                periodic = (step + 1) % settings.checkpoint_every == 0 and step + 1 < settings.steps
                if periodic and settings.keep_checkpoints and kept_path is not None:
                    save_trained(kept_path(step + 1), model, adapter)
                if stop or periodic:
                    save()
                    saved = step + 1
                if stop:
                    raise Interrupted(
                        f"tuning interrupted after step {saved}; checkpoint saved, continue with --resume"
                    )
    except KeyboardInterrupt:  # a second Ctrl-C: stop inside the step, keep the last checkpoint
        kept = f"the checkpoint of step {saved} is kept, continue with --resume" if saved else "no checkpoint yet"
        raise Interrupted(f"tuning stopped during step {len(losses) + 1}; {kept}") from None
    finally:
        model.eval()
    return TuneLog(losses)


# ---- the run around it -------------------------------------------------------------------------------------


def _check_run_state(run: Run, settings: TuneSettings, resume: bool, overwrite: bool) -> dict | None:
    """The record to resume from, or None for a fresh run; refuses to clobber a finished one. Changes nothing."""
    if resume:
        if not run.checkpoint_path.exists():
            raise RunError(f"nothing to resume in {run.root}: no checkpoint (tuning finished or never started)")
        record = run.read_record()
        differences = settings.differences(record)
        if differences:
            raise RunError(f"--resume needs the interrupted run's settings; these differ: {'; '.join(differences)}")
        return record
    if run.record_path.exists() and not overwrite:
        raise RunError(f"{run.root} already holds a run; pass --overwrite to start again or --resume to continue")
    return None


def _clear_caches(run: Run) -> None:
    """Remove what an earlier tuning of this run left (edited videos stay)."""
    for stale in (run.tuned_path, run.checkpoint_path, run.source_path):
        stale.unlink(missing_ok=True)
    shutil.rmtree(run.root / "inversions", ignore_errors=True)
    shutil.rmtree(run.kept_dir, ignore_errors=True)


def _describe_source(video: Path, info: videos.VideoInfo) -> dict:
    return {
        "path": str(video.resolve()),
        "sha256": sha256_of(video),
        "width": info.width,
        "height": info.height,
        "fps": info.fps,
        "num_frames": info.num_frames,
        "has_audio": info.has_audio,
    }


def _encode_source(
    sd: StableDiffusion,
    info: videos.VideoInfo,
    indices: list[int],
    size: tuple[int, int],
    prompt: str,
    run: Run,
    progress: Progress | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames -> latents and prompt -> text states, once per run (cached in the run directory for --resume)."""
    from safetensors.torch import load_file, save_file

    if run.source_path.exists():
        cache = load_file(str(run.source_path), device=str(sd.device))
        return cache["latents"], cache["text"]
    latents = []
    for n, chunk in enumerate(videos.read_chunks(info, indices)):  # a chunk of frames in memory at a time
        done = n * videos.CHUNK
        encoded = (lambda i, _, k=done: progress(ProgressEvent("encode", k + i, len(indices)))) if progress else None
        latents.append(sd.encode_frames(videos.resize_frames(chunk, size), encoded))
    latents = torch.cat(latents, dim=1)
    text = sd.encode_text([prompt])
    with atomic_path(run.source_path) as tmp:
        save_file({"latents": latents.contiguous().cpu(), "text": text.contiguous().cpu()}, str(tmp))
    return latents, text


def _loss_summary(losses: list[float]) -> dict:
    tail = losses[-max(1, len(losses) // 10) :]
    stride = max(1, len(losses) // 100)
    return {
        "first": losses[0] if losses else None,
        "last": losses[-1] if losses else None,
        "min": min(losses, default=None),
        "mean_last_10pct": sum(tail) / len(tail) if losses else None,
        "curve": losses[::stride],  # at most ~100 points
        "curve_stride": stride,
    }


def tune_video(
    video: Path,
    settings: TuneSettings,
    run: Run,
    model: ModelSpec | str,
    device: str = "auto",
    precision: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> TuneResult:
    """Tune on one video and record everything in the run directory."""
    started = time.perf_counter()
    recorded = _check_run_state(run, settings, resume, overwrite)
    info = videos.probe(video)
    indices = videos.frame_indices(
        info, settings.frames, settings.stride, settings.start, settings.from_time, settings.to_time
    )
    settings = replace(settings, steps=settings.steps_for(len(indices)))  # recorded as the number it ran
    source = _describe_source(video, info)
    if recorded and recorded["video"]["sha256"] != source["sha256"]:
        raise RunError(f"--resume needs the same video; {video} differs from the one {run.root} was tuned on")
    torch_device = resolve_device(device)
    dtype = resolve_precision(precision, torch_device)
    sd = load_sd(ModelSpec.from_record(recorded) if recorded else model, torch_device, dtype)
    settings = replace(settings, size=settings.size_for(sd.native_size))  # recorded as the number it ran
    width, height = videos.processed_size(info.width, info.height, settings.size, sd.size_multiple, settings.crop)
    if not recorded:
        _clear_caches(run)  # only now that the video and the model are known to work
    loaded = time.perf_counter()

    x0, text = _encode_source(sd, info, indices, (width, height), settings.prompt, run, progress)
    encoded = time.perf_counter()

    with_context = ShiftSchedule(settings.context, settings.context_scale).active
    pretrained = find_pretrained(settings.adapter, Path(sd.source.path)) if with_context else None
    model, adapter = build(sd, with_context, settings.seed, pretrained)
    if torch_device.type == "cuda":
        sd.unet.enable_gradient_checkpointing()  # ~2x less activation memory for ~30% more time
    record = {
        "versions": versions(),
        "model": asdict(sd.source),
        "video": source,
        "frames": {
            "indices": indices,
            "start": settings.start,
            "stride": settings.stride,
            "count": len(indices),
            "start_s": info.times[indices[0]],  # where the audio under the edits begins
        },
        "size": {"width": width, "height": height, "latent": list(x0.shape[-2:]), "native": sd.native_size},
        "fps": source["fps"] / settings.stride,
        "settings": settings.to_dict(),
        "adapter": {"pretrained": str(pretrained), "sha256": sha256_of(pretrained / WEIGHTS)} if pretrained else None,
        "runtime": {"device": str(torch_device), "precision": str(dtype).removeprefix("torch.")},
        "timings": {"load_s": loaded - started, "encode_s": encoded - loaded},
        "edits": recorded.get("edits", []) if recorded else [],
    }
    run.write_record(record)

    log = tune(model, adapter, x0, text, sd, settings, run.checkpoint_path, progress, run.weights_path)
    losses = log.losses
    save_trained(run.tuned_path, model, adapter)
    run.checkpoint_path.unlink(missing_ok=True)
    tuned = time.perf_counter()
    record["tuning"] = {"steps_done": len(losses), "stopped_early": log.stopped_early, "loss": _loss_summary(losses)}
    record["timings"].update(tune_s=tuned - encoded, tune_step_s=(tuned - encoded) / max(1, len(losses)))
    run.write_record(record)
    if log.stopped_early:
        raise TuningDiverged(
            f"{log.stopped_early}; the parameters of the step before are kept in {run.tuned_path} "
            "(edit works with them); for a full run lower --lr or use --precision fp32 and tune again"
        )
    return TuneResult(str(run.root), len(losses), losses[0], losses[-1], tuned - started)
