"""Editing a tuned run: contextual DDIM inversion of the source (once, cached) and contextual sampling per target.

`edit_run` is what `ctxedit edit` calls, `render_edits` what `ctxedit batch` calls. The model is loaded once
for all targets, an inversion with the same settings is reused (cached on disk), frames are decoded one by
one and each edit is written atomically and recorded at once.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ctxedit import compose, diffusion, prompts, realign
from ctxedit import video as videos
from ctxedit.attention import Plan, Reweighting, WordMaps, attention_layers, blend_mask, layer_scale, stands_out
from ctxedit.diffusion import ShiftSchedule
from ctxedit.errors import UsageError
from ctxedit.files import TEMPORARY, atomic_path, check_free_space, refuse_overwrite, sha256_of
from ctxedit.models.adapter import ContextAdapter
from ctxedit.models.inflate import VideoUNet
from ctxedit.models.sd import StableDiffusion, load_sd, resolve_device, resolve_precision
from ctxedit.models.trained import build, load_trained
from ctxedit.runs import Progress, ProgressEvent, Run, recorded_model
from ctxedit.settings import EditSettings, OutputSettings, TuneSettings, recorded_settings
from ctxedit.tuning import with_anchor

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


@dataclass(frozen=True)
class Windows:
    """How a clip longer than the model's window is run: windows of `size` frames every `size - overlap` (the last
    one ends with the clip), each after the anchor frame (`tuning.with_anchor`); where windows overlap, their
    outputs are blended with weights that ramp across the overlap. A clip that fits is one window, run as is."""

    frames: int
    size: int
    overlap: int

    def __post_init__(self) -> None:
        if self.frames > self.size and not 0 <= self.overlap < self.size:
            raise UsageError(f"--overlap must be from 0 to below the tuned --window {self.size}, got {self.overlap}")

    @cached_property
    def sequences(self) -> list[list[int]]:
        """The frames of each window, in the order the model sees them (the anchor first)."""
        if self.frames <= self.size:
            return [list(range(self.frames))]
        firsts = [*range(0, self.frames - self.size, self.size - self.overlap), self.frames - self.size]
        return [with_anchor(first, self.size) for first in firsts]

    def blend(self, run: Callable[[int, list[int]], torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """`run(k, frames)` gives window k's output for its frames, shaped like `like[:, frames]`; the clip's."""
        sequences = self.sequences
        if len(sequences) == 1:
            return run(0, sequences[0])
        position = torch.arange(self.size, device=like.device)
        ramp = (torch.minimum(position + 1, self.size - position) / (self.overlap + 1)).clamp(max=1)
        total = torch.zeros(like.shape, device=like.device)
        weight = torch.zeros(self.frames, device=like.device)
        for k, frames in enumerate(sequences):
            own = frames[-self.size :]  # the anchor of a later window is the first window's to give
            out = run(k, frames)[:, -self.size :].float()
            total[:, own] += ramp.view(1, -1, *[1] * (out.dim() - 2)) * out
            weight[own] += ramp
        return total / weight.view(1, -1, *[1] * (like.dim() - 2))


def windows_of(tuned: Tuned, settings: EditSettings) -> Windows:
    window = recorded_settings(TuneSettings, tuned.record["settings"])["window"]
    return Windows(tuned.x0.shape[1], window, settings.overlap)


class SpilledSteps:
    """Latents per step in a memory-mapped .npy file, indexed like a (steps, ...) tensor (`diffusion.Steps`), one
    step in memory at a time: a long clip's inverted trajectory and corrections (each ~3.3 MB per frame with SD 1.5
    at 512 px and 50 steps) stay off the GPU."""

    def __init__(self, array: np.ndarray, device: torch.device):
        self.array, self.device = array, device

    @classmethod
    def create(cls, path: Path, steps: int, like: torch.Tensor) -> SpilledSteps:
        return cls(np.lib.format.open_memmap(path, "w+", np.float32, (steps, *like.shape)), like.device)

    @classmethod
    def open(cls, path: Path, device: torch.device) -> SpilledSteps:
        return cls(np.load(path, mmap_mode="r"), device)

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, step: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[step])).to(self.device)

    def __setitem__(self, step: int, latents: torch.Tensor) -> None:
        self.array[step] = latents.float().cpu().numpy()


SHORTER_SPAN = "free some space or edit a shorter span (--from/--to)"


class Records:
    """What the source pass of a clip run in windows keeps on disk, in a temporary folder of the run: its records to
    inject, one file per (window, timestep) (the store grows with the clip; one window's is in memory), and its
    corrections (`steps`). The first records saved tell how much the whole store takes: refused if the disk has no
    room for it."""

    def __init__(self, run: Run, windows: int, plan: Plan):
        self.folder = tempfile.TemporaryDirectory(dir=run.root, prefix=f".records{TEMPORARY}")
        self.windows, self.plan, self.checked = windows, plan, False

    def _path(self, window: int, timestep: int) -> Path:
        return Path(self.folder.name) / f"{window}-{timestep}.safetensors"

    def save(self, window: int, timestep: int, store: dict[tuple[int, str], torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if store and not self.checked:
            check_free_space(Path(self.folder.name), self._needed(store), "The source's records", SHORTER_SPAN)
            self.checked = True
        if store:
            save_file({layer: t.contiguous() for (_, layer), t in store.items()}, str(self._path(window, timestep)))

    def _needed(self, store: dict[tuple[int, str], torch.Tensor]) -> int:
        """Bytes of the whole store, from one step's records: each layer's at every step its kind records."""
        plan = self.plan
        steps = lambda layer: plan.word_steps if layer in plan.cross_attention else plan.structure_steps  # noqa: E731
        return self.windows * sum(t.nbytes * len(steps(layer)) for (_, layer), t in store.items())

    def load(self, window: int, timestep: int, device: torch.device) -> dict[tuple[int, str], torch.Tensor]:
        from safetensors.torch import load_file

        path = self._path(window, timestep)
        state = load_file(str(path), device=str(device)) if path.exists() else {}
        return {(timestep, layer): t for layer, t in state.items()}

    def steps(self, name: str, count: int, like: torch.Tensor) -> SpilledSteps:
        path = Path(self.folder.name) / f"{name}.npy"
        check_free_space(path.parent, count * like.numel() * 4, f"The source's {name}", SHORTER_SPAN)
        return SpilledSteps.create(path, count, like)


def predictor(
    tuned: Tuned,
    text: torch.Tensor,
    uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
    windows: Windows | None = None,
    records: Records | None = None,
    progress: Callable[[int, int], None] | None = None,
    steps: int = 1,
):
    """eps(x, t) of the tuned video UNet, with classifier-free guidance when `uncond` is given; over `windows` for a
    long clip, its source records in `records` (saved while recording, loaded while injecting), `progress` told
    the windows run of `steps` x windows."""
    sd, model, control = tuned.sd, tuned.model, tuned.model.control

    def predict_frames(x: torch.Tensor, t: int) -> torch.Tensor:
        with sd.autocast():
            if uncond is None:
                return model(x.to(sd.dtype), t, text.to(sd.dtype)).float()
            both = model(torch.cat([x, x]).to(sd.dtype), t, torch.cat([uncond, text]).to(sd.dtype)).float()
        eps_uncond, eps_text = both.chunk(2)
        return eps_uncond + guidance * (eps_text - eps_uncond)

    if windows is None or len(windows.sequences) == 1:
        return predict_frames
    calls = 0

    def predict(x: torch.Tensor, t: int) -> torch.Tensor:
        def window(k: int, frames: list[int]) -> torch.Tensor:
            nonlocal calls
            control.frames = frames
            if records is not None and not control.recording:
                control.store = records.load(k, t, x.device)
            eps = predict_frames(x[:, frames], t)
            if records is not None and control.recording:
                records.save(k, t, control.store)
                control.store = {}
            calls += 1
            if progress:
                progress(calls, steps * len(windows.sequences))
            return eps

        try:
            return windows.blend(window, x)
        finally:
            control.frames = None

    return predict


def _callbacks(windows: Windows, stage: Callable[[int, int], None] | None):
    """(the predictor's progress, the sampler's): a long clip counts windows, a short one steps."""
    return (None, stage) if len(windows.sequences) == 1 else (stage, None)


def _stage(progress: Progress | None, stage: str, label: str = "") -> Callable[[int, int], None] | None:
    return (lambda done, total: progress(ProgressEvent(stage, done, total, label=label))) if progress else None


def inversion_key(tuned: Tuned, settings: EditSettings) -> str:
    """Everything the inverted trajectory depends on, hashed."""
    windows = windows_of(tuned, settings)
    key = {
        "steps": settings.steps,
        "prompt": settings.inversion_prompt,
        "tuned": sha256_of(tuned.run.weights_path(settings.checkpoint)),
        "shift": asdict(shift_of(tuned, settings)) if tuned.adapter is not None else None,
        "windows": [windows.size, windows.overlap] if len(windows.sequences) > 1 else None,
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


def _context_of(tuned: Tuned, text: torch.Tensor, windows: Windows):
    """The context while sampling towards `text`: R(x0_hat, c), a window at a time; None without an adapter."""
    if tuned.adapter is None:
        return None
    return lambda x0_hat: windows.blend(lambda _, frames: tuned.adapter(x0_hat[:, frames], text), x0_hat)


@torch.no_grad()
def invert_source(
    tuned: Tuned, settings: EditSettings, progress: Progress | None = None
) -> tuple[diffusion.Steps, bool]:
    """(the source's ordinary trajectory [y_T, ..., y_0], whether it came from the cache); computed once per
    setting and cached in the run, a long clip's on disk (`SpilledSteps`)."""
    from safetensors.torch import load_file, save_file

    windows = windows_of(tuned, settings)
    spill = len(windows.sequences) > 1
    path = tuned.run.inversion_path(inversion_key(tuned, settings), ".npy" if spill else ".safetensors")
    if path.exists() and spill:
        return SpilledSteps.open(path, tuned.sd.device), True
    if path.exists():
        return load_file(str(path), device=str(tuned.sd.device))["trajectory"], True
    _, inverse = _schedulers(tuned, settings.steps)
    text = tuned.source_text if settings.inversion_prompt == "source" else tuned.sd.encode_text([""])
    counted, callback = _callbacks(windows, _stage(progress, "invert"))
    source_context = _context_of(tuned, tuned.source_text, windows)  # fixed: R(x0_src, c_src)
    if spill:
        needed = (settings.steps + 1) * tuned.x0.numel() * 4
        check_free_space(tuned.run.root, needed, "The inverted source of this clip", SHORTER_SPAN)
    with atomic_path(path) as tmp:
        trajectory = diffusion.invert(
            predictor(tuned, text, windows=windows, progress=counted, steps=settings.steps), tuned.x0, inverse,
            source_context(tuned.x0) if source_context else None, shift_of(tuned, settings), callback,
            SpilledSteps.create(tmp, settings.steps + 1, tuned.x0) if spill else None,
        )  # fmt: skip
        if spill:
            trajectory.array.flush()
        else:
            save_file({"trajectory": trajectory.contiguous().cpu()}, str(tmp))
    return trajectory, False


@dataclass
class SourcePass:
    """What every edit of the source with the same settings takes from it, computed once."""

    trajectory: diffusion.Steps  # (steps + 1, 1, f, c, h, w): the inverted source, noisiest first
    cached: bool  # the inversion came from the run's cache
    corrections: diffusion.Steps | None  # direct inversion: one per sampling step from settings.first_step
    plan: Plan  # what the edit takes from the source, where and when
    store: dict  # the source's recorded features and attention, keyed (timestep, layer)...
    records: Records | None  # ...or, for a clip run in windows, per window on disk (with the corrections)
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
        return SourcePass(trajectory, cached, None, Plan(), {}, None, None)
    control = tuned.model.control
    control.reset()
    control.plan, control.recording = plan, True
    windows = windows_of(tuned, settings)
    records = Records(tuned.run, len(windows.sequences), plan) if len(windows.sequences) > 1 else None
    if settings.blend != "off":
        latent_size = tuple(tuned.x0.shape[-2:])
        layers = _mask_layers(tuned.sd.unet, latent_size)
        control.word_maps = WordMaps(layers, latent_size, clip_frames=windows.frames, tokens=source_tokens)
    counted, callback = _callbacks(windows, _stage(progress, "source"))
    count = settings.steps - settings.first_step
    try:
        source = predictor(tuned, tuned.source_text, _uncond(tuned, settings), settings.guidance, windows, records,
                           counted, count)  # fmt: skip
        corrections = diffusion.reconstruction_corrections(
            source, trajectory, sampler, _context_of(tuned, tuned.source_text, windows), tuned.x0,
            shift_of(tuned, settings), settings.first_step, callback,
            records.steps("corrections", count, tuned.x0) if records else None,
        )  # fmt: skip
        store, word_maps = control.store, control.word_maps
    except BaseException:
        if records:
            records.folder.cleanup()  # now, not whenever the traceback lets go of it
        raise
    finally:
        control.reset()
    direct = corrections if settings.inversion == "direct" else None
    return SourcePass(trajectory, cached, direct, plan, store, records, word_maps)


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
    windows = windows_of(tuned, settings)
    if any(w != 1 for w in weights.values()):  # weight 1 everywhere: the stock attention, bit for bit
        timesteps = sampler.timesteps.tolist()[start:]
        fade = {t: max(0.0, 1 - k / (REALIGN_FRACTION * len(timesteps))) for k, t in enumerate(timesteps)}
        control.reweighting = Reweighting(weights, source_mask, fade)
    if blend is not None and source_mask is None:
        control.word_maps = WordMaps(
            source.word_maps.layers, source.word_maps.latent_size, clip_frames=windows.frames,
            tokens=len(prompts.token_ids(sd.tokenizer, target)),
        )  # fmt: skip
    counted, callback = _callbacks(windows, _stage(progress, "edit", label or target))
    try:
        return diffusion.sample(
            predictor(
                tuned,
                text,
                _uncond(tuned, settings),
                settings.guidance,
                windows,
                source.records,
                counted,
                settings.steps - start,
            ),
            source.trajectory[start],
            sampler,
            _context_of(tuned, text, windows),
            tuned.x0,
            shift_of(tuned, settings),
            eta=settings.eta,
            generator=generator,
            start=start,
            guide=guide,
            callback=callback,
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
        windows_of(tuned, request.settings)  # an --overlap the window cannot take
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
        made: dict[int, torch.Tensor] = {}  # latents
        cached = True
        for k in sorted(range(len(options)), key=lambda k: keys.index(keys[k])):  # one source pass per key
            if keys[k] not in passes:
                passes = {keys[k]: source_pass(tuned, options[k], progress)}
            source = passes[keys[k]]
            cached, source.cached = cached and source.cached, True
            made[k] = edit_latents(tuned, source, request.target, options[k], progress, _label(request, k, options))

        decode = [_stage(progress, "decode", _label(request, k, options)) for k in range(len(options))]
        if len(options) == 1:
            chosen, candidates, frames = 0, [], tuned.sd.decoded_frames(made[0], decode[0])  # streamed to the file
        else:  # the candidates are scored on their frames
            frames_of = {k: tuned.sd.decode_latents(latents, decode[k]) for k, latents in made.items()}
            chosen, candidates = reranker.choose(request, options, frames_of)
            frames = frames_of[chosen]
        if output.keep_candidates:
            for path, candidate in zip(candidate_paths(request.path, len(candidates)), candidates, strict=True):
                path.parent.mkdir(parents=True, exist_ok=True)
                _write(frames_of[candidate["index"]], path, record, output, overwrite)
                candidate["path"] = str(path)
        count, (width, height), fps, audio = _write(frames, request.path, record, output, overwrite)
        gif_path = request.path.with_suffix(".gif") if output.gif else None
        if gif_path:
            videos.write_gif(request.path, gif_path, overwrite)
        result = EditResult(
            target=request.target,
            path=str(request.path),
            gif=str(gif_path) if gif_path else None,
            frames=count,
            width=width,
            height=height,
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


def _label(request: EditRequest, k: int, options: list[EditSettings]) -> str:
    return request.target if len(options) == 1 else f"{request.target} ({k + 1}/{len(options)})"


def _write(frames: Iterable[np.ndarray], path: Path, record: dict, output: OutputSettings, overwrite: bool):
    """Write frames at the processed size (an iterable: streamed) as `output` asks (size, rate, the source's
    audio); (frames written, (width, height), fps, audio)."""
    size = (record["size"]["width"], record["size"]["height"])
    if output.size == "source":
        size = videos.source_region(record["video"]["width"], record["video"]["height"], size)
        frames = (videos.resize_frames(frame[None], size)[0] for frame in frames)
    audio, fps = _audio_span(record, output), _output_fps(record, output)
    return videos.write_video(frames, path, fps, audio, overwrite), size, fps, audio


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
