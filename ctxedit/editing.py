"""Editing a tuned run, top to bottom as a diffusers pipeline:

1. `invert_source`: contextual DDIM inversion of the source, once per inversion setting, cached in the run;
2. `source_pass`: one walk along the inverted trajectory with the source prompt, guided like the edits: direct
   inversion's landings (its corrections), the features and maps to inject, the word maps for blending;
3. `edit_latents`: contextual DDIM sampling from the inverted source towards a parsed target, the attention control
   steered by one `Session` and `attention.step_plan`'s clock;
4. `render_edits`: every request (and its candidates, reranked by `realign`) sampled, written and recorded at once.

`edit_run` is what `ctxedit edit` calls, `render_edits` what `ctxedit batch` calls.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ctxedit import coherence, diffusion, outputs, realign
from ctxedit.attention import (
    Plan,
    Reweighting,
    Session,
    WordMaps,
    blend_mask,
    mask_layers,
    source_plan,
    stands_out,
    step_plan,
)
from ctxedit.errors import UsageError
from ctxedit.files import atomic_path, check_free_space, sha256_of
from ctxedit.models import lora
from ctxedit.prompts import Target, parse_target, token_ids
from ctxedit.runs import Progress, ProgressEvent, Run
from ctxedit.settings import EditSettings, OutputSettings
from ctxedit.tuned import Tuned, load_tuned
from ctxedit.windows import SHORTER_SPAN, Records, SpilledSteps, Windows


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


@dataclass(frozen=True)
class EditRequest:
    target: str  # as written, weights included
    settings: EditSettings
    path: Path


def schedulers(tuned: Tuned, steps: int):
    """(DDIM sampler, DDIM inverse scheduler) of the model's schedule at `steps` steps."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    sampler = DDIMScheduler.from_config(tuned.sd.scheduler.config)
    inverse = DDIMInverseScheduler.from_config(tuned.sd.scheduler.config)
    sampler.set_timesteps(steps)
    inverse.set_timesteps(steps)
    return sampler, inverse


def predictor(
    tuned: Tuned,
    text: torch.Tensor,
    uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
    windows: Windows | None = None,
    session: Session | None = None,
    records: Records | None = None,
    progress: Callable[[int, int], None] | None = None,
    steps: int = 1,
):
    """eps(x, t) (v for a v-model) of the tuned video UNet, with classifier-free guidance when `uncond` is given,
    each call steered by `session` (None: the stock UNet); over `windows` for a long clip, the session's records in
    `records` (saved while recording, loaded while injecting), `progress` told the windows run of `steps` x
    windows."""
    sd, model, control = tuned.sd, tuned.model, tuned.model.control

    def predict_frames(x: torch.Tensor, t: int, frames: list[int] | None = None) -> torch.Tensor:
        with control.applying(session, frames), sd.autocast():
            if uncond is None:
                return model(x.to(sd.dtype), t, text.to(sd.dtype)).float()
            both = model(torch.cat([x, x]).to(sd.dtype), t, torch.cat([uncond, text]).to(sd.dtype)).float()
        eps_uncond, eps_text = both.chunk(2)
        return eps_uncond + guidance * (eps_text - eps_uncond)

    if windows is None or not windows.split:
        return predict_frames
    calls = 0

    def predict(x: torch.Tensor, t: int) -> torch.Tensor:
        def window(k: int, frames: list[int]) -> torch.Tensor:
            nonlocal calls
            if records is not None and not session.recording:
                session.store = records.load(k, t, x.device)
            eps = predict_frames(x[:, frames], t, frames)
            if records is not None and session.recording:
                records.save(k, t, session.store)
                session.store = {}
            calls += 1
            if progress:
                progress(calls, steps * len(windows.sequences))
            return eps

        return windows.blend(window, x)

    return predict


def _callbacks(windows: Windows, stage: Callable[[int, int], None] | None):
    """(the predictor's progress, the sampler's): a long clip counts windows, a short one steps."""
    return (stage, None) if windows.split else (None, stage)


def _stage(progress: Progress | None, stage: str, label: str = "") -> Callable[[int, int], None] | None:
    return (lambda done, total: progress(ProgressEvent(stage, done, total, label=label))) if progress else None


def _context_of(tuned: Tuned, text: torch.Tensor, windows: Windows):
    """The context while sampling towards `text`: R(x0_hat, c), a window at a time; None without an adapter."""
    if tuned.adapter is None:
        return None
    return lambda x0_hat: windows.blend(lambda _, frames: tuned.adapter(x0_hat[:, frames], text), x0_hat)


def _uncond(tuned: Tuned, settings: EditSettings) -> torch.Tensor:
    """The unguided branch: the source prompt for negative-prompt inversion, else the empty prompt."""
    return tuned.source_text if settings.inversion == "negative" else tuned.sd.encode_text([""])


# ---- 1. inversion ------------------------------------------------------------------------------------------


def inversion_key(tuned: Tuned, settings: EditSettings) -> str:
    """Everything the inverted trajectory depends on, hashed: the settings of the inversion stage (but an overlap of
    a clip that fits one window, a context scale without an adapter), the parameters and shift they apply to, and
    where it runs."""
    windows = tuned.windows(settings.overlap)
    idle = {"overlap": not windows.split, "context_scale": tuned.adapter is None}  # settings that cannot act here
    idle["lora_scale"] = True  # keyed by the scales it comes to: as tuned, given as one or as many, alike
    key = {
        "settings": {name: value for name, value in settings.depending("inversion") if not idle.get(name)},
        "loras": lora.scales_for(tuned.sd.source.loras, settings.lora_scales()),
        "tuned": sha256_of(tuned.run.weights_path(settings.checkpoint)),
        "shift": asdict(tuned.shift_for(settings)) if tuned.adapter is not None else None,
        "windows": [windows.size, windows.overlap] if windows.split else None,
        "runtime": [tuned.sd.device.type, str(tuned.sd.dtype)],
        "stored": "trajectory",  # the whole ordinary trajectory, not only its end
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def invert_source(
    tuned: Tuned, settings: EditSettings, progress: Progress | None = None
) -> tuple[diffusion.Steps, bool]:
    """(the source's ordinary trajectory [y_T, ..., y_0], whether it came from the cache); computed once per
    setting and cached in the run, a long clip's on disk (`SpilledSteps`)."""
    from safetensors.torch import load_file, save_file

    windows = tuned.windows(settings.overlap)
    path = tuned.run.inversion_path(inversion_key(tuned, settings), ".npy" if windows.split else ".safetensors")
    if path.exists() and windows.split:
        return SpilledSteps.open(path, tuned.sd.device), True
    if path.exists():
        return load_file(str(path), device=str(tuned.sd.device))["trajectory"], True
    _, inverse = schedulers(tuned, settings.steps)
    text = tuned.source_text if settings.inversion_prompt == "source" else tuned.sd.encode_text([""])
    counted, callback = _callbacks(windows, _stage(progress, "invert"))
    source_context = _context_of(tuned, tuned.source_text, windows)  # fixed: R(x0_src, c_src)
    if windows.split:
        needed = (settings.steps + 1) * tuned.x0.numel() * 4
        check_free_space(tuned.run.root, needed, "The inverted source of this clip", SHORTER_SPAN)
    with atomic_path(path) as tmp:
        trajectory = diffusion.invert(
            predictor(tuned, text, windows=windows, progress=counted, steps=settings.steps), tuned.x0, inverse,
            source_context(tuned.x0) if source_context else None, tuned.shift_for(settings), callback,
            SpilledSteps.create(tmp, settings.steps + 1, tuned.x0) if windows.split else None,
        )  # fmt: skip
        if windows.split:
            trajectory.array.flush()
        else:
            save_file({"trajectory": trajectory.contiguous().cpu()}, str(tmp))
    return trajectory, False


# ---- 2. the source pass ------------------------------------------------------------------------------------


@dataclass
class SourcePass:
    """What every edit of the source with the same settings takes from it, computed once."""

    trajectory: diffusion.Steps  # (steps + 1, 1, f, c, h, w): the inverted source, noisiest first
    cached: bool  # the inversion came from the run's cache
    landings: diffusion.Steps | None  # direct inversion: where each sampling step from settings.first_step lands
    plan: Plan  # what the edit takes from the source, where and when
    store: dict  # the source's recorded features and attention, keyed (timestep, layer)...
    records: Records | None  # ...or, for a clip run in windows, per window on disk (with the landings)
    word_maps: WordMaps | None  # the source's cross-attention per token, for blending masks


@torch.no_grad()
def source_pass(tuned: Tuned, settings: EditSettings, progress: Progress | None = None) -> SourcePass:
    """Invert the source (or load it), then, if the settings use any, walk its trajectory once with the source
    prompt guided like the edits: direct inversion's landings, the records to inject, the word maps."""
    tuned.use(settings)
    trajectory, cached = invert_source(tuned, settings, progress)
    sampler, _ = schedulers(tuned, settings.steps)
    source_tokens = len(token_ids(tuned.sd.tokenizer, tuned.prompt))
    latent_size = tuple(tuned.x0.shape[-2:])
    layers = mask_layers(tuned.sd.unet, latent_size) if settings.blend != "off" else ()
    plan = source_plan(step_plan(settings), sampler.timesteps.tolist(), tuned.sd.unet, source_tokens, layers)
    if not (settings.inversion == "direct" or plan.injects() or layers):
        return SourcePass(trajectory, cached, None, Plan(), {}, None, None)
    windows = tuned.windows(settings.overlap)
    records = Records(tuned.run.root, len(windows.sequences), plan) if windows.split else None
    word_maps = WordMaps(layers, latent_size, clip_frames=windows.frames, tokens=source_tokens) if layers else None
    session = Session(plan, recording=True, word_maps=word_maps)
    counted, callback = _callbacks(windows, _stage(progress, "source"))
    count = settings.steps - settings.first_step
    try:
        source = predictor(tuned, tuned.source_text, _uncond(tuned, settings), settings.guidance, windows, session,
                           records, counted, count)  # fmt: skip
        landings = diffusion.reconstruction_landings(
            source, trajectory, sampler, _context_of(tuned, tuned.source_text, windows), tuned.x0,
            tuned.shift_for(settings), settings.first_step, callback,
            records.steps("landings", count, tuned.x0) if records else None,
        )  # fmt: skip
    except BaseException:
        if records:
            records.cleanup()  # now, not whenever the traceback lets go of it
        raise
    direct = landings if settings.inversion == "direct" else None
    return SourcePass(trajectory, cached, direct, plan, session.store, records, session.word_maps)


# ---- 3. an edit --------------------------------------------------------------------------------------------


def _region(maps: torch.Tensor) -> torch.Tensor | None:
    """The blending mask of summed word maps (f, h, w), or None where they do not single out a region."""
    return blend_mask(maps) if stands_out(maps) else None


def reweighting(
    target: Target, settings: EditSettings, source: SourcePass, changed_region: torch.Tensor | None, strength: dict
) -> Reweighting | None:
    """The target's prompt weights (with --realign auto, the words it changes weighted too, unless the prompt weighs
    them itself), each in its own region: a changed word in the changed words' region, a word the target keeps in
    its phrase's in the source; raised everywhere where no region is known. None where every weight is 1: the stock
    attention."""
    weights = target.weights
    if settings.realign == "auto":
        weights = dict.fromkeys(target.changed, realign.REALIGN_WEIGHT) | weights
    if all(w == 1 for w in weights.values()):
        return None
    regions = [
        _region(source.word_maps.of(target.kept_phrases[token]))
        if token in target.kept_phrases and source.word_maps is not None else changed_region
        for token in weights
    ]  # fmt: skip
    if all(region is None for region in regions):
        return Reweighting(weights, None, strength)
    like = next(region for region in regions if region is not None)
    stacked = torch.stack([torch.ones_like(like) if region is None else region for region in regions])
    return Reweighting(weights, stacked, strength)


@torch.no_grad()
def edit_latents(
    tuned: Tuned,
    source: SourcePass,
    target: Target | str,
    settings: EditSettings,
    progress: Progress | None = None,
    label: str | None = None,
) -> torch.Tensor:
    """Contextual DDIM sampling from the inverted source towards `target` (parsed, or a prompt to parse), steered
    by the source pass; progress events carry `label` (default: the target's text)."""
    sd = tuned.sd
    target = target_for(tuned, target, settings) if isinstance(target, str) else target
    tuned.use(settings)
    sampler, _ = schedulers(tuned, settings.steps)
    text = sd.encode_text([target.text])
    generator = torch.Generator(sd.device).manual_seed(settings.seed if settings.seed is not None else tuned.seed)
    windows = tuned.windows(settings.overlap)
    # The region of the words the target replaces or drops, where the source pass saw them: fixed and reliable (a
    # model that binds words loosely may attend elsewhere for the new ones). Only words it adds take their own.
    # Where the source's words do not single out a region, a mask would pin the wrong place: no blending then.
    blend = target.blend if source.word_maps else None
    source_mask = _region(source.word_maps.of(blend[0])) if blend and blend[0] else None
    if blend and blend[0] and source_mask is None:
        blend = None
    own_maps = None  # words the target only adds: their region from the edit's own maps
    if blend is not None and source_mask is None:
        layers, latent_size = source.word_maps.layers, source.word_maps.latent_size
        own_maps = WordMaps(layers, latent_size, clip_frames=windows.frames, tokens=target.tokens)
    timesteps = sampler.timesteps.tolist()
    steps = step_plan(settings)
    token_map = target.alignment.token_map.to(sd.device)
    weighing = reweighting(target, settings, source, source_mask, steps.strength(timesteps))
    session = Session(
        source.plan, store=source.store, token_map=token_map, word_maps=own_maps, reweighting=weighing,
        region=source_mask, inside_steps=frozenset(timesteps[i] for i in steps.inside),
        layout=settings.inject == "layout",
    )  # fmt: skip
    start = settings.first_step

    matches = coherence.correspondences(tuned.x0[0]) if settings.propagate else None

    def guide(step: int, y: torch.Tensor) -> torch.Tensor:
        needed = source.landings is not None or blend is not None or matches is not None
        anchor = source.trajectory[step + 1] if needed else None
        if source.landings is not None:
            fixed = diffusion.corrected(y, source.landings[step - start], anchor)
            free = source_mask is not None and step not in steps.inside  # the region's own, uncorrected, from here
            y = source_mask[None, :, None] * y + (1 - source_mask[None, :, None]) * fixed if free else fixed
        if matches is not None:  # the change carried along the source's correspondences
            y = anchor + coherence.propagate(y - anchor, matches, settings.propagate)
        if blend is not None:
            mask = source_mask if source_mask is not None else blend_mask(session.word_maps.of(blend[1]))
            y = anchor + mask[None, :, None] * (y - anchor)  # outside the mask, the source as it was
        return y

    counted, callback = _callbacks(windows, _stage(progress, "edit", label or target.text))
    model = predictor(tuned, text, _uncond(tuned, settings), settings.guidance, windows, session, source.records,
                      counted, settings.steps - start)  # fmt: skip
    return diffusion.sample(
        model, source.trajectory[start], sampler, _context_of(tuned, text, windows), tuned.x0,
        tuned.shift_for(settings), eta=settings.eta, generator=generator, start=start, guide=guide, callback=callback,
    )  # fmt: skip


# ---- 4. requests, candidates and files ---------------------------------------------------------------------


def target_for(tuned: Tuned, raw: str, settings: EditSettings) -> Target:
    """The target prompt `raw` parsed against the run's source prompt, blending as `settings` say."""
    blend_words = None if settings.blend == "off" else settings.blend_words()
    return parse_target(tuned.sd.tokenizer, tuned.prompt, raw, blend_words)


def parse_requests(tuned: Tuned, requests: list[EditRequest]) -> list[Target]:
    """Each request's target parsed; a --blend word in neither prompt, a malformed weight, an --overlap the window
    cannot take, a --lora-scale the run's LoRAs cannot take or a --checkpoint that was not kept fail here, before any
    work."""
    kept = tuned.run.kept_steps()
    targets = []
    for request in requests:
        settings = request.settings
        targets.append(target_for(tuned, request.target, settings))
        tuned.windows(settings.overlap)
        lora.scales_for(tuned.sd.source.loras, settings.lora_scales())
        step = settings.checkpoint
        if step is not None and step not in kept:
            offer = f"kept: {', '.join(map(str, kept))}" if kept else "tune with --keep-checkpoints to keep some"
            raise UsageError(f"--checkpoint {step}: {tuned.run.root} kept no parameters after step {step} ({offer})")
    return targets


def _sampled(
    tuned: Tuned,
    passes: dict[tuple, SourcePass],
    request: EditRequest,
    target: Target,
    options: list[EditSettings],
    progress: Progress | None,
) -> tuple[list[torch.Tensor], bool]:
    """(each option's latents, in order; whether every inversion came from the cache). Options with the same
    source-pass settings share one source pass, and so do the requests in a row (`passes` keeps the last one)."""
    keys = [option.depending("source") for option in options]
    made: list[torch.Tensor] = [None] * len(options)
    cached = True
    for k in sorted(range(len(options)), key=lambda k: keys.index(keys[k])):
        if keys[k] not in passes:
            passes.clear()  # the one before goes first: two source passes never share the memory (no name holds one)
            passes[keys[k]] = source_pass(tuned, options[k], progress)
        cached = cached and passes[keys[k]].cached
        passes[keys[k]].cached = True  # for the edits that reuse it
        made[k] = edit_latents(tuned, passes[keys[k]], target, options[k], progress, _label(request, k, options))
    return made, cached


def _reranked(
    tuned: Tuned,
    reranker: realign.Reranker,
    request: EditRequest,
    target: Target,
    options: list[EditSettings],
    made: list[torch.Tensor],
    output: OutputSettings,
    overwrite: bool,
    progress: Progress | None,
) -> tuple[int, list[dict]]:
    """(the chosen candidate, one record per candidate), each candidate decoded, scored (and kept when asked) in
    turn, one in memory at a time; (0, []) for a single edit."""
    if len(options) == 1:
        return 0, []
    scores, paths = [], outputs.candidate_paths(request.path, len(options)) if output.keep_candidates else []
    for k, latents in enumerate(made):
        frames = tuned.sd.decode_latents(latents, _stage(progress, "decode", _label(request, k, options)))
        scores.append(reranker.score(target, request.settings, frames))
        if paths:
            paths[k].parent.mkdir(parents=True, exist_ok=True)
            outputs.write_edit(frames, paths[k], tuned.record, output, overwrite)
    return realign.choose(request.settings, options, scores, paths)


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
    targets = parse_requests(tuned, requests)
    kept = tuned.run.kept_steps()
    passes: dict[tuple, SourcePass] = {}  # the last one only: SD 1.5's holds ~825 MiB of records
    reranker = realign.Reranker(tuned)
    results = []
    for request, target in zip(requests, targets, strict=True):
        started = time.perf_counter()
        settings = request.settings
        seed = settings.seed if settings.seed is not None else tuned.seed
        options = realign.candidate_settings(settings, settings.candidates, seed, kept, tuned.adapter is not None)
        made, cached = _sampled(tuned, passes, request, target, options, progress)
        chosen, candidates = _reranked(tuned, reranker, request, target, options, made, output, overwrite, progress)
        decoding = _stage(progress, "decode", request.target) if not candidates else None  # candidates: shown above
        frames = tuned.sd.decoded_frames(made[chosen], decoding)  # streamed to the file
        written = outputs.write_edit(frames, request.path, tuned.record, output, overwrite, output.gif)
        result = EditResult(
            target=request.target,
            path=str(request.path),
            gif=written.gif,
            frames=written.frames,
            width=written.width,
            height=written.height,
            fps=written.fps,
            audio=written.audio,
            inversion_cached=cached,
            seconds=time.perf_counter() - started,
        )
        entry = asdict(result) | {"settings": settings.to_dict(), "output": output.to_dict()}
        if candidates:
            entry |= {"candidates": candidates, "chosen": chosen, "rerank_axes": list(realign.RERANK_AXES)}
        tuned.record = tuned.run.update_record(lambda record, entry=entry: record["edits"].append(entry))
        results.append(result)
    return results


def _label(request: EditRequest, k: int, options: list[EditSettings]) -> str:
    return request.target if len(options) == 1 else f"{request.target} ({k + 1}/{len(options)})"


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
    paths = outputs.output_paths(run, targets, out, output, overwrite, settings.candidates)
    tuned = load_tuned(run, device, precision)
    requests = [EditRequest(target, settings, path) for target, path in zip(targets, paths, strict=True)]
    results = render_edits(tuned, requests, output, overwrite, progress)
    edits = [(r.target, Path(r.path)) for r in results]
    outputs.write_composites(run, tuned.record, edits, output, overwrite)
    return results
