"""Editing with structure kept: plain settings are the plain sampler bit for bit, direct inversion reconstructs
exactly under guidance, partial inversion starts later, blending masks find the edited object."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ctxedit import diffusion, editing, realign
from ctxedit.attention import blend_mask, stands_out, step_plan
from ctxedit.runs import Run
from ctxedit.settings import EditSettings, TuneSettings
from ctxedit.toy.demo import CLIP, TOY_MODEL
from ctxedit.tuned import Tuned, load_tuned
from ctxedit.tuning import tune_video
from ctxedit.windows import SpilledSteps, Windows

PLAIN = dict(inversion="plain", keep_structure=0.0, keep_words=0.0, blend="off", propagate=0.0)
PROMPT = "a man is skiing"


@pytest.fixture(scope="module")
def tuned(skiing, tiny_model, tmp_path_factory) -> Tuned:
    run = Run(tmp_path_factory.mktemp("runs") / "ski")
    settings = TuneSettings(prompt=PROMPT, frames=3, stride=4, size=32, steps=3, adapter_lr=1e-2)
    tune_video(skiing, settings, run, str(tiny_model), device="cpu")
    return load_tuned(run, device="cpu")


def plain_sample(tuned: Tuned, settings: EditSettings, target: str, guide=None) -> torch.Tensor:
    """What the sampler gives without anything from the source but its inverted latents."""
    from diffusers import DDIMScheduler

    trajectory, _ = editing.invert_source(tuned, settings)
    scheduler = DDIMScheduler.from_config(tuned.sd.scheduler.config)
    scheduler.set_timesteps(settings.steps)
    text, uncond = tuned.sd.encode_text([target]), tuned.sd.encode_text([""])
    with torch.no_grad():
        return diffusion.sample(
            editing.predictor(tuned, text, uncond, settings.guidance), trajectory[0], scheduler,
            lambda x0_hat: tuned.adapter(x0_hat, text), tuned.x0, tuned.shift, guide=guide,
            generator=torch.Generator().manual_seed(33),
        )  # fmt: skip


def test_nothing_kept_from_the_source_is_the_plain_sampler_bit_for_bit(tuned):
    settings = EditSettings(steps=4, **PLAIN)
    source = editing.source_pass(tuned, settings)
    assert source.landings is None and source.store == {} and source.word_maps is None
    target = "a man is skiing on the moon"
    assert torch.equal(editing.edit_latents(tuned, source, target, settings), plain_sample(tuned, settings, target))
    # Injection at fraction 0 and blending off add nothing to direct inversion's corrections, bit for bit.
    direct = EditSettings(steps=4, **(PLAIN | {"inversion": "direct"}))
    source = editing.source_pass(tuned, direct)
    assert source.store == {} and source.landings.shape[0] == 4
    landings, trajectory = source.landings, source.trajectory
    corrected = lambda step, y: diffusion.corrected(y, landings[step], trajectory[step + 1])  # noqa: E731
    expected = plain_sample(tuned, direct, target, guide=corrected)
    assert torch.equal(editing.edit_latents(tuned, source, target, direct), expected)


def test_direct_inversion_reconstructs_the_source_exactly_under_guidance(tuned):
    """Target = source prompt, the context following x0_hat as always, the default store (fp16 records, which the
    source pass goes on with as recorded): exact."""
    errors = {}
    for inversion in ("direct", "plain"):
        settings = EditSettings(steps=5, guidance=7.5, inversion=inversion)
        source = editing.source_pass(tuned, settings)
        assert source.store and all(t.dtype == torch.float16 for t in source.store.values())
        errors[inversion] = (editing.edit_latents(tuned, source, PROMPT, settings) - tuned.x0).abs().max()
    assert errors["direct"] < 1e-4 and errors["plain"] > 1e-2


def test_every_structure_setting_changes_the_edit(tuned):
    target = "a woman is skiing"
    base = EditSettings(steps=4, **(PLAIN | {"inversion": "direct"}))
    reference = editing.edit_latents(tuned, editing.source_pass(tuned, base), target, base)
    for change in ({"keep_structure": 1.0}, {"keep_words": 1.0}, {"blend": "woman"}, {"inversion": "negative"}):
        settings = EditSettings(**(base.to_dict() | change))
        source = editing.source_pass(tuned, settings)
        assert not torch.equal(editing.edit_latents(tuned, source, target, settings), reference), change


def test_strength_keep_structure_keep_words_and_the_fade_count_on_one_clock(tuned):
    """Fractions of the sampled steps: --strength 0.6 keeps --keep-structure and --keep-words as they are."""
    steps = step_plan(EditSettings(steps=10, strength=0.6, keep_structure=0.5, keep_words=1.0))
    assert (steps.first, steps.structure, steps.words) == (4, range(4, 7), range(4, 10))
    assert steps.reweighting == pytest.approx((1, 2 / 3, 1 / 3, 0, 0, 0))  # from the first sampled step to halfway
    settings = EditSettings(steps=10, strength=0.6, **(PLAIN | {"keep_structure": 0.4}))
    source = editing.source_pass(tuned, settings)
    sampled = editing.schedulers(tuned, 10)[0].timesteps.tolist()[4:]
    assert source.plan.structure_steps == set(sampled[:2]) and {t for t, _ in source.store} == set(sampled[:2])
    unkept = replace(settings, keep_structure=0.0)
    target = "a man is skiing on the moon"
    edited = editing.edit_latents(tuned, source, target, settings)
    assert not torch.equal(edited, editing.edit_latents(tuned, editing.source_pass(tuned, unkept), target, unkept))


def test_partial_inversion_starts_later_and_keeps_more_of_the_source(tuned):
    full, partial = (EditSettings(steps=10, strength=s, **PLAIN) for s in (1.0, 0.3))
    assert (full.first_step, partial.first_step) == (0, 7)
    steps = []
    progress = lambda event: steps.append(event.done) if event.stage == "edit" else None  # noqa: E731
    target = "a red car"
    distances = []
    for settings in (full, partial):
        steps.clear()
        edited = editing.edit_latents(tuned, editing.source_pass(tuned, settings), target, settings, progress)
        distances.append(float((edited - tuned.x0).square().mean()))
        assert steps[-1] == 10 - settings.first_step
    assert distances[1] < distances[0]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[Tuned, np.ndarray]:
    """The bundled model, barely tuned, on the demo's clip; with the objects' masks (f, objects, h, w)."""
    from ctxedit import video

    folder = tmp_path_factory.mktemp("shapes")
    frames, masks = CLIP.render()
    video.write_video(frames, folder / "clip.mp4", 8.0)
    run = Run(folder / "run")
    tune_video(folder / "clip.mp4", TuneSettings(prompt=CLIP.caption, frames=8, stride=1, size=64, steps=1), run,
               str(TOY_MODEL), device="cpu")  # fmt: skip
    return load_tuned(run, device="cpu"), masks


def latent_masks(masks: np.ndarray, index: int) -> torch.Tensor:
    return F.avg_pool2d(torch.tensor(masks[:, index]).float(), 4) > 0.5  # (f, 16, 16)


def test_blending_masks_cover_the_edited_object_on_a_shapes_clip(shapes):
    """The changed words' region from the source pass covers the square."""
    tuned, masks = shapes
    settings = EditSettings(steps=10, guidance=5.0)
    source = editing.source_pass(tuned, settings)
    target = CLIP.edited(1, colour="yellow").caption  # the blue square turns yellow
    words = editing.target_for(tuned, target, settings).blend
    maps = source.word_maps.of(words[0])
    assert stands_out(maps)  # the source pass localises the square: blending applies
    mask = blend_mask(maps) > 0  # (f, 16, 16) latents
    square, circle = latent_masks(masks, 1), latent_masks(masks, 0)
    assert (mask & square).sum() / square.sum() > 0.9
    assert (mask & circle).sum() / circle.sum() < 0.2 and mask.float().mean() < 0.5


def test_a_weight_on_a_word_the_target_keeps_applies_in_that_words_region(shapes):
    """ "a (red:2) circle ... a yellow square": red is raised on its circle (its phrase's region in the source, not
    over the square, the changed words' region), the changed words' own weights (--realign auto) stay in theirs."""
    tuned, masks = shapes
    settings = EditSettings(steps=10, guidance=5.0, realign="auto")
    source = editing.source_pass(tuned, settings)
    target = editing.target_for(tuned, CLIP.edited(1, colour="yellow").caption.replace("red", "(red:2)"), settings)
    changed_region = blend_mask(source.word_maps.of(target.blend[0]))
    reweighting = editing.reweighting(target, settings, source, changed_region, {981: 1.0})
    red, yellow = 2, 8  # token positions: "a red circle moving right and a yellow square ..."
    assert reweighting.weights[red] == 2 and reweighting.weights[yellow] == realign.REALIGN_WEIGHT
    regions = dict(zip(reweighting.weights, reweighting.regions > 0, strict=True))
    circle, square = latent_masks(masks, 0), latent_masks(masks, 1)
    assert (regions[red] & circle).sum() / circle.sum() > 0.9 and (regions[red] & square).sum() / square.sum() < 0.2
    assert torch.equal(regions[yellow], changed_region > 0)


def test_windows_cover_the_clip_after_its_anchor_and_blend_across_seams():
    windows = Windows(frames=23, size=6, overlap=2)
    sequences = windows.sequences
    assert [s[-6] for s in sequences] == [0, 4, 8, 12, 16, 17]  # every 4 frames, the last one ending with the clip
    assert sequences[0] == list(range(6)) and all(s[0] == 0 and len(s) == 7 for s in sequences[1:])  # the anchor
    assert Windows(frames=5, size=6, overlap=2).sequences == [list(range(5))]  # shorter than a window
    x = torch.randn(1, 23, 4, 2, 2)
    assert torch.allclose(windows.blend(lambda _, frames: x[:, frames], x), x, atol=1e-6)
    constant = windows.blend(lambda k, frames: torch.full_like(x[:, frames], float(k)), x)[0, :, 0, 0, 0]
    assert constant[:4].tolist() == [0, 0, 0, 0] and 0 < constant[4] < constant[5] < 1  # ramped over the overlap
    assert constant[6:8].tolist() == [1, 1] and constant[0] == 0  # the anchor is the first window's alone


@pytest.fixture(scope="module")
def long_clip(skiing, tiny_model, tmp_path_factory) -> Tuned:
    """The whole clip at stride 4 (23 frames), tuned and edited in windows of 6."""
    run = Run(tmp_path_factory.mktemp("runs") / "long")
    settings = TuneSettings(prompt=PROMPT, frames="all", stride=4, size=32, steps=3, adapter_lr=1e-2, window=6)
    tune_video(skiing, settings, run, str(tiny_model), device="cpu")
    return load_tuned(run, device="cpu")


def test_a_long_clip_is_edited_in_windows_and_reconstructs_exactly(long_clip):
    """Direct inversion with the source prompt gives the source back, window by window: each window injects its own
    records (from disk) and takes its corrections; any mix-up would show."""
    assert long_clip.x0.shape[1] == 23 and len(long_clip.windows(EditSettings().overlap).sequences) == 6
    events, errors = [], {}
    for inversion in ("direct", "plain"):
        settings = EditSettings(steps=5, guidance=7.5, inversion=inversion)
        source = editing.source_pass(long_clip, settings)
        folder = Path(source.records.folder.name)
        assert len(list(folder.glob("*.safetensors"))) == 6 * 4  # windows x steps with records
        assert isinstance(source.trajectory, SpilledSteps)  # on disk, the run's inversion cache
        assert [p.suffix for p in long_clip.run.root.glob("inversions/*")] == [".npy"]
        assert source.cached == (inversion == "plain")
        if inversion == "direct":
            assert isinstance(source.landings, SpilledSteps) and len(source.landings) == 5
            assert (folder / "landings.npy").exists()
        edited = editing.edit_latents(long_clip, source, PROMPT, settings, events.append)
        errors[inversion] = (edited - long_clip.x0).abs().max()
    assert errors["direct"] < 1e-4 and errors["plain"] > 1e-2
    edit_events = [(e.done, e.total) for e in events if e.stage == "edit"]
    assert edit_events[-1] == (5 * 6, 5 * 6)  # progress counts windows of every step
    del source
    assert not folder.exists()  # the records go with the source pass


def test_a_long_clip_without_room_on_disk_is_refused_before_the_work(long_clip, monkeypatch):
    """The inverted trajectory, the corrections and the records each ask for their room first, with a way out, and
    a refused source pass leaves nothing behind."""
    from collections import namedtuple

    from ctxedit import files
    from ctxedit.errors import RunError

    usage = namedtuple("usage", "total used free")
    settings = EditSettings(steps=4, guidance=7.5)
    corrections = 4 * long_clip.x0.numel() * 4  # 4 steps of float32 latents
    for free, what in ((0, "The inverted source of this clip"), (corrections, "The source's records")):
        monkeypatch.setattr(files.shutil, "disk_usage", lambda _, free=free: usage(1 << 40, 1 << 40, free))
        with pytest.raises(RunError, match=f"^{what} would take about [0-9.]+ MiB in .*, which has .* free; free some"):
            editing.source_pass(long_clip, settings)
        if free == 0:  # the next try finds the inversion done
            monkeypatch.undo()
            editing.invert_source(long_clip, settings)
    assert not list(long_clip.run.root.glob(".records*"))


OTHER_VALUES = {  # a valid value other than the default, for every edit setting
    "steps": {"steps": 7}, "guidance": {"guidance": 3.0}, "inversion_prompt": {"inversion_prompt": "empty"},
    "inversion": {"inversion": "plain"}, "keep_structure": {"keep_structure": 0.1}, "keep_words": {"keep_words": 0.1},
    "blend": {"blend": "off"}, "strength": {"strength": 0.5}, "realign": {"realign": "auto"},
    "candidates": {"candidates": 2}, "scorer": {"scorer": "clip", "scorer_model": "m"},
    "scorer_model": {"scorer_model": "m"}, "context_scale": {"context_scale": 0.5}, "lora_scale": {"lora_scale": "0.5"},
    "overlap": {"overlap": 1},
    "checkpoint": {"checkpoint": 2}, "eta": {"eta": 0.3}, "seed": {"seed": 5}, "keep_inside": {"keep_inside": 1.0},
    "inject": {"inject": "whole"}, "propagate": {"propagate": 0.0},
}  # fmt: skip


def test_cache_keys_come_from_each_settings_declared_stage(tuned):
    """A setting declares the first stage it changes; the inverted trajectory's key and the source pass's key take
    exactly the settings of their stage and the ones before, so a new setting cannot be left out of them."""
    from dataclasses import fields

    assert set(OTHER_VALUES) == {f.name for f in fields(EditSettings)}
    base = EditSettings()
    for name, change in OTHER_VALUES.items():
        stage = EditSettings.__dataclass_fields__[name].metadata["stage"]
        other = replace(base, **change)
        assert (other.depending("inversion") != base.depending("inversion")) == (stage == "inversion"), name
        assert (other.depending("source") != base.depending("source")) == (stage in ("inversion", "source")), name
        if stage != "inversion" or name in ("checkpoint", "lora_scale"):  # not kept, no LoRA here: refused, no key
            continue
        acts = name != "overlap"  # the clip fits one window: an overlap changes nothing
        assert (editing.inversion_key(tuned, other) != editing.inversion_key(tuned, base)) == acts, name
    assert editing.inversion_key(tuned, replace(base, guidance=3.0, eta=0.5)) == editing.inversion_key(tuned, base)
    # The edit's own settings leave the source pass as it was (computed afresh, not cached).
    settings = EditSettings(steps=3)
    landings = editing.source_pass(tuned, settings).landings
    edit_only = dict(eta=0.5, seed=3, realign="auto", candidates=2, keep_inside=0.0, inject="whole", propagate=0.5)
    again = editing.source_pass(tuned, replace(settings, **edit_only)).landings
    assert torch.equal(landings, again)


def test_an_edit_holds_one_source_pass_and_one_candidates_frames_at_a_time(tuned, tmp_path, monkeypatch):
    """A second source pass is computed only once the first is gone; candidates are decoded and scored one by one."""
    import gc
    import weakref

    from ctxedit.models.sd import StableDiffusion

    passes, alive_at_start, events = [], [], []
    real_pass, real_decode, real_score = editing.source_pass, StableDiffusion.decode_latents, realign.Reranker.score

    def source_pass(*args, **kwargs):
        gc.collect()
        alive_at_start.append(sum(ref() is not None for ref in passes))
        made = real_pass(*args, **kwargs)
        passes.append(weakref.ref(made))
        return made

    monkeypatch.setattr(editing, "source_pass", source_pass)
    monkeypatch.setattr(StableDiffusion, "decode_latents", lambda *a: events.append("decode") or real_decode(*a))
    monkeypatch.setattr(realign.Reranker, "score", lambda *a: events.append("score") or real_score(*a))
    settings = EditSettings(steps=2, guidance=5.0, candidates=3)  # the third candidate: guidance x1.5, its own pass
    requests = [editing.EditRequest("a man is skiing on the moon", settings, tmp_path / "a.mp4"),
                editing.EditRequest("a man is skiing on mars", replace(settings, candidates=1, guidance=6.0),
                                    tmp_path / "b.mp4")]  # fmt: skip
    editing.render_edits(tuned, requests)
    assert alive_at_start == [0, 0, 0]  # the user's settings (and eta's), guidance x1.5, the next request's 6
    assert events == ["decode", "score"] * 3


def test_source_frames_and_composites_are_read_a_chunk_at_a_time(long_clip, tmp_path, monkeypatch):
    """A clip's source frames and the edits read back for the composites never come in whole (23 frames here), and
    nothing reads the composites when none is asked for."""
    from ctxedit import video
    from ctxedit.settings import OutputSettings

    sizes, real_read, real_chunks = [], video.read_frames, video.read_chunks
    monkeypatch.setattr(video, "read_frames", lambda info, indices: sizes.append(len(indices)) or
                        real_read(info, indices))  # fmt: skip
    monkeypatch.setattr(video, "read_chunks", lambda *args: (sizes.append(len(c)) or c for c in real_chunks(*args)))
    output = OutputSettings(side_by_side=True, grid=True)
    editing.edit_run(long_clip.run, ["a man is skiing on the moon"], EditSettings(steps=2, candidates=2),
                     out=tmp_path / "edit.mp4", output=output, device="cpu")  # fmt: skip
    assert sizes and max(sizes) <= video.CHUNK and sum(sizes) >= 23 * 4  # source twice (scores, composites) and edit
    for name in ("side-by-side", "grid"):
        assert video.probe(long_clip.run.root / "edits" / f"{name}.mp4").num_frames == 23
    sizes.clear()
    editing.edit_run(long_clip.run, ["a man is skiing on mars"], EditSettings(steps=2), device="cpu")
    assert sizes == []


def test_each_candidates_scores_are_its_own_whatever_order_they_are_made_in(tuned, tmp_path, monkeypatch):
    """Six candidates are made in source-pass order (0, 1, 5, 2, 3, 4: the eta draws share the user's pass); each
    one's recorded scores, and the choice, are still its own."""
    from ctxedit.scoring import Scores

    made, real_edit = {}, editing.edit_latents
    monkeypatch.setattr(editing, "edit_latents", lambda t, s, target, settings, *a: made.setdefault(
        settings, real_edit(t, s, target, settings, *a)))  # fmt: skip
    brightness = lambda frames: float(frames.astype(float).mean())  # noqa: E731 - a score that tells frames apart
    monkeypatch.setattr(realign.Reranker, "score", lambda self, target, settings, frames: Scores(
        brightness(frames), brightness(frames), 0.0, 0.0))  # fmt: skip
    settings = EditSettings(steps=2, guidance=5.0, candidates=6)
    path = tmp_path / "edit.mp4"
    editing.render_edits(tuned, [editing.EditRequest("a man is skiing on the moon", settings, path)])
    entry = tuned.run.read_record()["edits"][-1]
    for candidate in entry["candidates"]:
        option = replace(settings, candidates=1, **candidate["changes"])
        assert candidate["scores"]["text"] == brightness(tuned.sd.decode_latents(made[option]))
    best = max(range(6), key=lambda k: entry["candidates"][k]["scores"]["consistency"])
    assert entry["chosen"] == best


def test_region_control_at_its_off_values_is_the_old_path_bit_for_bit(shapes, monkeypatch):
    """--keep-inside 1 --inject whole --propagate 0: exactly the edit that knows no region (the code before them)."""
    tuned, _ = shapes
    settings = EditSettings(steps=6, guidance=5.0, keep_inside=1.0, inject="whole", propagate=0.0)
    source = editing.source_pass(tuned, settings)
    target = CLIP.edited(1, colour="yellow").caption
    edited = editing.edit_latents(tuned, source, target, settings)
    real = editing.Session
    monkeypatch.setattr(editing, "Session", lambda *args, region=None, **kwargs: real(*args, **kwargs))
    assert torch.equal(edited, editing.edit_latents(tuned, source, target, settings))


@pytest.mark.parametrize("change", [{"keep_inside": 0.0}, {"inject": "layout"}, {"propagate": 0.5}])
def test_region_controls_change_only_the_region_and_keep_the_reconstruction_exact(shapes, change):
    """Each control changes the edit inside the changed words' region and nothing outside it (blending keeps the
    source there); the source's own caption still gives the source back exactly."""
    tuned, masks = shapes
    base = EditSettings(steps=6, guidance=5.0, keep_inside=1.0, inject="whole", propagate=0.0)
    settings = replace(base, **change)
    source = editing.source_pass(tuned, settings)
    target = editing.target_for(tuned, CLIP.edited(1, colour="yellow").caption, settings)
    region = blend_mask(source.word_maps.of(target.blend[0])) > 0  # (f, 16, 16)
    square = latent_masks(masks, 1)
    assert (region & square).sum() / square.sum() > 0.9  # the region covers the edited object
    before, after = (editing.edit_latents(tuned, source, target, s)[0] for s in (base, settings))
    assert torch.equal(before.permute(1, 0, 2, 3)[:, ~region], after.permute(1, 0, 2, 3)[:, ~region])
    assert (before - after).abs().amax() > 1e-3
    assert (editing.edit_latents(tuned, source, CLIP.caption, settings) - tuned.x0).abs().max() < 1e-4


def test_an_edit_recorded_before_a_setting_existed_reads_as_what_it_did():
    """Batch compares a preset with the recorded edits: an edit made before region control reads as region control
    off (so the new defaults make it again), not as today's defaults."""
    from ctxedit.settings import recorded_settings

    old = {k: v for k, v in EditSettings().to_dict().items() if k not in ("keep_inside", "inject", "propagate")}
    then = EditSettings(keep_inside=1.0, inject="whole", propagate=0.0).to_dict()
    assert recorded_settings(EditSettings, old) == then != EditSettings().to_dict()
