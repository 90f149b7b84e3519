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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ctxedit import compose, diffusion, prompts, realign
from ctxedit import video as videos
from ctxedit.attention import Plan, Reweighting, WordMaps, attention_layers, blend_mask, layer_scale, stands_out
from ctxedit.diffusion import ShiftSchedule
from ctxedit.errors import UsageError
from ctxedit.files import atomic_path, refuse_overwrite, sha256_of
from ctxedit.models.adapter import ContextAdapter
from ctxedit.models.inflate import VideoUNet
from ctxedit.models.sd import StableDiffusion, load_sd, resolve_device, resolve_precision
from ctxedit.models.trained import build, load_trained
from ctxedit.runs import Progress, ProgressEvent, Run, recorded_model
from ctxedit.settings import EditSettings, OutputSettings

REALIGN_WEIGHT = 1.5  # --realign auto: attention weight of the words the target changes, inside their region
REALIGN_FRACTION = 0.5  # ...fading from the whole weight at the first step to none halfway
# What the edit takes from the source, chosen by measurement on the shapes world (README, "Keeping structure"):
FEATURE_LAYERS = ("up_blocks.1.resnets.1",)  # decoder features that carry the layout (as Plug-and-Play's)
SELF_ATTENTION_LAYERS: tuple[str, ...] = ()  # self-attention injection moved objects more, not less
WORD_SCALES = (2, 4)  # cross-attention layers at 1/2 and 1/4 of the latent size: shared words' maps
MASK_SCALES = (2, 4)  # ...and the maps of the changed words, for blending


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
    weights: int | None = None  # the tuning step whose parameters are loaded (a kept checkpoint); None: the end


def use_weights(tuned: Tuned, step: int | None) -> None:
    """Load the parameters after tuning step `step` (None: the finished tuning) unless they are loaded."""
    if tuned.weights != step:
        load_trained(tuned.run.weights_path(step), tuned.model, tuned.adapter)
        tuned.weights = step


def shift_of(tuned: Tuned, settings: EditSettings) -> ShiftSchedule:
    """The tuned context shift, scaled by the edit's `context_scale`."""
    return replace(tuned.shift, scale=tuned.shift.scale * settings.context_scale)


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
    """Everything the inverted trajectory depends on, hashed."""
    key = {
        "steps": settings.steps,
        "prompt": settings.inversion_prompt,
        "tuned": sha256_of(tuned.run.weights_path(settings.checkpoint)),
        "shift": asdict(shift_of(tuned, settings)) if tuned.adapter is not None else None,
        "runtime": [tuned.sd.device.type, str(tuned.sd.dtype)],
        "stored": "trajectory",  # the whole ordinary trajectory, not only its end
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _schedulers(tuned: Tuned, steps: int):
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    sampler = DDIMScheduler.from_config(tuned.sd.scheduler.config)
    inverse = DDIMInverseScheduler.from_config(tuned.sd.scheduler.config)
    sampler.set_timesteps(steps)
    inverse.set_timesteps(steps)
    return sampler, inverse


def _source_context(tuned: Tuned) -> torch.Tensor | None:
    """The context of the source's inversion, fixed: R(x0_src, c_src)."""
    return tuned.adapter(tuned.x0, tuned.source_text) if tuned.adapter is not None else None


def _context_of(tuned: Tuned, text: torch.Tensor):
    """The context while sampling towards `text`: R(x0_hat, c), None without an adapter."""
    return (lambda x0_hat: tuned.adapter(x0_hat, text)) if tuned.adapter is not None else None


@torch.no_grad()
def invert_source(tuned: Tuned, settings: EditSettings, progress: Progress | None = None) -> tuple[torch.Tensor, bool]:
    """(the source's ordinary trajectory [y_T, ..., y_0], whether it came from the cache); computed once per
    setting and cached in the run."""
    from safetensors.torch import load_file, save_file

    path = tuned.run.inversion_path(inversion_key(tuned, settings))
    if path.exists():
        return load_file(str(path), device=str(tuned.sd.device))["trajectory"], True
    _, inverse = _schedulers(tuned, settings.steps)
    text = tuned.source_text if settings.inversion_prompt == "source" else tuned.sd.encode_text([""])
    trajectory = diffusion.invert(
        predictor(tuned, text), tuned.x0, inverse, _source_context(tuned), shift_of(tuned, settings),
        _stage(progress, "invert"),
    )  # fmt: skip
    with atomic_path(path) as tmp:
        save_file({"trajectory": trajectory.contiguous().cpu()}, str(tmp))
    return trajectory, False


@dataclass
class SourcePass:
    """What every edit of the source with the same settings takes from it, computed once."""

    trajectory: torch.Tensor  # (steps + 1, 1, f, c, h, w): the inverted source, noisiest first
    cached: bool  # the inversion came from the run's cache
    corrections: torch.Tensor | None  # direct inversion: one per sampling step from settings.first_step
    plan: Plan  # what the edit takes from the source, where and when
    store: dict  # the source's recorded features and attention, keyed (timestep, layer)
    word_maps: WordMaps | None  # the source's cross-attention per token, for blending masks


def structure_plan(settings: EditSettings, timesteps: list[int], unet, source_tokens: int = 77) -> Plan:
    """Which layers inject at which timesteps: the first `keep_structure` and `keep_words` fractions of the steps;
    the shared words' maps are kept for the source prompt's `source_tokens` tokens."""
    levels = len(unet.config.block_out_channels)
    cross = tuple(name for name in attention_layers(unet, "attn2") if layer_scale(name, levels) in WORD_SCALES)
    return Plan(
        features=FEATURE_LAYERS,
        self_attention=SELF_ATTENTION_LAYERS,
        structure_steps=frozenset(timesteps[: round(settings.keep_structure * len(timesteps))]),
        cross_attention=cross,
        word_steps=frozenset(timesteps[: round(settings.keep_words * len(timesteps))]),
        source_tokens=source_tokens,
    )


def _mask_layers(unet, latent_size: tuple[int, int]) -> tuple[str, ...]:
    """Decoder cross-attention at 1/2 and 1/4 of the latents with maps of at least 8x8, where words are localised
    best; a UNet without such layers (a tiny one) uses all its decoder cross-attention."""
    levels = len(unet.config.block_out_channels)
    decoder = [name for name in attention_layers(unet, "attn2") if name.startswith("up_blocks")]
    scale = lambda name: layer_scale(name, levels)  # noqa: E731
    best = [name for name in decoder if scale(name) in MASK_SCALES and min(latent_size) // scale(name) >= 8]
    return tuple(best or decoder)


def _uncond(tuned: Tuned, settings: EditSettings) -> torch.Tensor:
    """The unguided branch: the source prompt for negative-prompt inversion, else the empty prompt."""
    return tuned.source_text if settings.inversion == "negative" else tuned.sd.encode_text([""])


@torch.no_grad()
def source_pass(tuned: Tuned, settings: EditSettings, progress: Progress | None = None) -> SourcePass:
    """Invert the source (or load it), then, if the settings use any, walk its trajectory once with the source
    prompt guided like the edits: direct inversion's corrections, the records to inject, the word maps."""
    use_weights(tuned, settings.checkpoint)
    trajectory, cached = invert_source(tuned, settings, progress)
    sampler, _ = _schedulers(tuned, settings.steps)
    source_tokens = len(prompts.token_ids(tuned.sd.tokenizer, tuned.record["settings"]["prompt"]))
    plan = structure_plan(settings, sampler.timesteps.tolist(), tuned.sd.unet, source_tokens)
    needed = settings.inversion == "direct" or plan.injects() or settings.blend != "off"
    if not needed:
        return SourcePass(trajectory, cached, None, Plan(), {}, None)
    control = tuned.model.control
    control.reset()
    control.plan, control.recording = plan, True
    if settings.blend != "off":
        latent_size = tuple(tuned.x0.shape[-2:])
        control.word_maps = WordMaps(_mask_layers(tuned.sd.unet, latent_size), latent_size)
    try:
        source = predictor(tuned, tuned.source_text, _uncond(tuned, settings), settings.guidance)
        corrections = diffusion.reconstruction_corrections(
            source, trajectory, sampler, _context_of(tuned, tuned.source_text), tuned.x0, shift_of(tuned, settings),
            settings.first_step, _stage(progress, "source"),
        )  # fmt: skip
        store, word_maps = control.store, control.word_maps
    finally:
        control.reset()
    direct = corrections if settings.inversion == "direct" else None
    return SourcePass(trajectory, cached, direct, plan, store, word_maps)


def _blend_tokens(tokenizer, source: str, target: str, settings: EditSettings) -> tuple[list[int], list[int]] | None:
    """(source, target) token positions whose region may change, or None for no blending."""
    if settings.blend == "off":
        return None
    words = settings.blend_words()
    if words:
        in_source = [w for w in words if prompts.has_word(tokenizer, source, w)]
        in_target = [w for w in words if prompts.has_word(tokenizer, target, w)]
        missing = [w for w in words if w not in in_source + in_target]
        if missing:
            raise UsageError(f"--blend word {missing[0]!r} is in neither the source nor the target prompt")
        return prompts.named_words(tokenizer, source, in_source), prompts.named_words(tokenizer, target, in_target)
    alignment = prompts.align(tokenizer, source, target)
    changed = (
        prompts.content(tokenizer, source, alignment.changed_source),
        prompts.content(tokenizer, target, alignment.changed_target),
    )
    if not any(changed):
        return None  # nothing named changed: nothing to localise
    return prompts.phrases(tokenizer, source, changed[0]), prompts.phrases(tokenizer, target, changed[1])


@torch.no_grad()
def edit_latents(
    tuned: Tuned,
    source: SourcePass,
    target: str,
    settings: EditSettings,
    progress: Progress | None = None,
    label: str | None = None,
) -> torch.Tensor:
    """Contextual DDIM sampling from the inverted source towards `target`, steered by the source pass; progress
    events carry `label` (default: the target)."""
    sd, control = tuned.sd, tuned.model.control
    use_weights(tuned, settings.checkpoint)
    sampler, _ = _schedulers(tuned, settings.steps)
    target, weights = prompts.parse_weights(sd.tokenizer, target)
    text = sd.encode_text([target])
    seed = settings.seed if settings.seed is not None else tuned.record["settings"]["seed"]
    generator = torch.Generator(sd.device).manual_seed(seed)
    source_prompt = tuned.record["settings"]["prompt"]
    blend = _blend_tokens(sd.tokenizer, source_prompt, target, settings) if source.word_maps else None
    # The region of the words the target replaces or drops, where the source pass saw them: fixed and reliable (a
    # model that binds words loosely may attend elsewhere for the new ones). Only words it adds take their own.
    # Where the source's words do not single out a region, a mask would pin the wrong place: no blending then.
    source_mask = None
    if blend and blend[0]:
        source_maps = source.word_maps.of(blend[0])
        source_mask = blend_mask(source_maps) if stands_out(source_maps) else None
        blend = blend if source_mask is not None else None
    start = settings.first_step

    def guide(step: int, y: torch.Tensor) -> torch.Tensor:
        if source.corrections is not None:
            y = y + source.corrections[step - start]
        if blend is not None:
            mask = source_mask if source_mask is not None else blend_mask(control.word_maps.of(blend[1]))
            anchor = source.trajectory[step + 1]
            y = anchor + mask[None, :, None] * (y - anchor)  # outside the mask, the source as it was
        return y

    alignment = prompts.align(sd.tokenizer, source_prompt, target)
    if settings.realign == "auto":  # the words the target changes, unless the prompt weighs them itself
        changed = prompts.content(sd.tokenizer, target, alignment.changed_target)
        weights = dict.fromkeys(changed, REALIGN_WEIGHT) | weights
    control.reset()
    control.plan, control.store = source.plan, source.store
    control.token_map = alignment.token_map.to(sd.device)
    if any(w != 1 for w in weights.values()):  # weight 1 everywhere: the stock attention, bit for bit
        timesteps = sampler.timesteps.tolist()[start:]
        fade = {t: max(0.0, 1 - k / (REALIGN_FRACTION * len(timesteps))) for k, t in enumerate(timesteps)}
        control.reweighting = Reweighting(weights, source_mask, fade)
    if blend is not None and source_mask is None:
        control.word_maps = WordMaps(source.word_maps.layers, source.word_maps.latent_size)
    try:
        return diffusion.sample(
            predictor(tuned, text, _uncond(tuned, settings), settings.guidance),
            source.trajectory[start],
            sampler,
            _context_of(tuned, text),
            tuned.x0,
            shift_of(tuned, settings),
            eta=settings.eta,
            generator=generator,
            start=start,
            guide=guide,
            callback=_stage(progress, "edit", label or target),
        )
    finally:
        control.reset()


def _output_fps(record: dict, output: OutputSettings) -> float:
    return output.fps or record["fps"]


def _audio_span(record: dict, output: OutputSettings) -> videos.AudioSpan | None:
    """The source's audio under the edited frames; none at another frame rate, where it would not line up."""
    source, frames = record["video"], record["frames"]
    if not source["has_audio"] or not Path(source["path"]).exists() or _output_fps(record, output) != record["fps"]:
        return None
    start = frames.get("start_s", frames["indices"][0] / source["fps"])  # runs tuned before start_s was recorded
    return videos.AudioSpan(Path(source["path"]), start, frames["count"] * frames["stride"] / source["fps"])


def composite_paths(run: Run, output: OutputSettings) -> list[Path]:
    wanted = (("side-by-side", output.side_by_side), ("grid", output.grid))
    return [run.root / "edits" / f"{name}.mp4" for name, on in wanted if on]


def output_paths(
    run: Run, targets: list[str], out: Path | None, output: OutputSettings, overwrite: bool, candidates: int = 1
) -> list[Path]:
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
        for kept in candidate_paths(path, candidates) if output.keep_candidates else []:
            refuse_overwrite(kept, overwrite)
    for path in composite_paths(run, output):
        refuse_overwrite(path, overwrite)
    return paths


@dataclass(frozen=True)
class EditRequest:
    target: str
    settings: EditSettings
    path: Path


def _source_key(settings: EditSettings) -> EditSettings:
    """The settings without what the source pass does not depend on (the rest of the run is fixed)."""
    return replace(settings, eta=0.0, seed=None, realign="off", candidates=1, scorer="attention", scorer_model=None)


def candidate_paths(path: Path, count: int) -> list[Path]:
    """Where `--keep-candidates` writes the candidates of the edit at `path`."""
    return [path.parent / f"{path.stem}.candidates" / f"{k}.mp4" for k in range(count)] if count > 1 else []


def render_edits(
    tuned: Tuned,
    requests: list[EditRequest],
    output: OutputSettings = OutputSettings(),
    overwrite: bool = False,
    progress: Progress | None = None,
) -> list[EditResult]:
    """Edit towards each request's target; every edit is written and recorded as soon as it is done. Requests
    (and candidates) with the same source-pass settings in a row share one source pass (the first one's time
    includes it). With `candidates` > 1 each candidate is scored and the best by fused ranks is the edit."""
    record = tuned.record
    kept = tuned.run.kept_steps()
    for request in requests:  # a --blend word in neither prompt, a malformed weight, ... fail before any work
        target, _ = prompts.parse_weights(tuned.sd.tokenizer, request.target)
        _blend_tokens(tuned.sd.tokenizer, record["settings"]["prompt"], target, request.settings)
        step = request.settings.checkpoint
        if step is not None and step not in kept:
            offer = f"kept: {', '.join(map(str, kept))}" if kept else "tune with --keep-checkpoints to keep some"
            raise UsageError(f"--checkpoint {step}: {tuned.run.root} kept no parameters after step {step} ({offer})")
    passes: dict[EditSettings, SourcePass] = {}  # the last one only: SD 1.5's holds ~825 MiB of records
    reranker = realign.Reranker(tuned)
    results = []
    for request in requests:
        started = time.perf_counter()
        settings = request.settings
        seed = settings.seed if settings.seed is not None else record["settings"]["seed"]
        options = realign.candidate_settings(settings, settings.candidates, seed, kept, tuned.adapter is not None)
        keys = [_source_key(option) for option in options]
        made: dict[int, np.ndarray] = {}
        cached = True
        for k in sorted(range(len(options)), key=lambda k: keys.index(keys[k])):  # one source pass per key
            if keys[k] not in passes:
                passes = {keys[k]: source_pass(tuned, options[k], progress)}
            source = passes[keys[k]]
            cached, source.cached = cached and source.cached, True
            label = request.target if len(options) == 1 else f"{request.target} ({k + 1}/{len(options)})"
            latents = edit_latents(tuned, source, request.target, options[k], progress, label)
            made[k] = tuned.sd.decode_latents(latents, _stage(progress, "decode", label))
        chosen, candidates = reranker.choose(request, options, made) if len(options) > 1 else (0, [])
        if output.keep_candidates:
            for path, candidate in zip(candidate_paths(request.path, len(candidates)), candidates, strict=True):
                path.parent.mkdir(parents=True, exist_ok=True)
                _write(made[candidate["index"]], path, record, output, overwrite)
                candidate["path"] = str(path)
        frames, fps, audio = _write(made[chosen], request.path, record, output, overwrite)
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
        entry = asdict(result) | {"settings": settings.to_dict(), "output": output.to_dict()}
        if candidates:
            entry |= {"candidates": candidates, "chosen": chosen, "rerank_axes": list(realign.RERANK_AXES)}
        record["edits"].append(entry)
        tuned.run.write_record(record)
        results.append(result)
    return results


def _write(frames: np.ndarray, path: Path, record: dict, output: OutputSettings, overwrite: bool):
    """Write decoded frames as `output` asks (size, rate, the source's audio); (frames written, fps, audio)."""
    if output.size == "source":
        region = videos.source_region(record["video"]["width"], record["video"]["height"], frames.shape[2:0:-1])
        frames = videos.resize_frames(frames, region)
    audio, fps = _audio_span(record, output), _output_fps(record, output)
    videos.write_video(frames, path, fps, audio, overwrite)
    return frames, fps, audio


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
    paths = output_paths(run, targets, out, output, overwrite, settings.candidates)
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
