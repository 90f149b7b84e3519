"""The edit settings that interact, every pair of their values at least once (allpairspy), end to end on the tiny
model: whatever the mix, the edit has the right frames, run.json records exactly what was asked, every control that
is on changes the result, the source prompt under direct inversion gives the source back, and nothing temporary is
left behind."""

import gc
from dataclasses import replace

import pytest
import torch
from allpairspy import AllPairs
from checkpoints import write_lora, write_v_model

from ctxedit import editing, video
from ctxedit.attention import stands_out, step_plan
from ctxedit.models.lora import Lora
from ctxedit.models.sd import StableDiffusion
from ctxedit.models.spec import ModelSpec
from ctxedit.runs import Run
from ctxedit.settings import EditSettings, OutputSettings, TuneSettings
from ctxedit.tuned import Tuned, load_tuned
from ctxedit.tuning import tune_video

PROMPT = "a man is skiing"
TARGETS = {
    "plain": "a man is skiing on the moon",
    "weighted": "a man is skiing on the (moon:2)",  # a word the target adds
    "kept weighted": "a (man:2) is skiing on the moon",  # a word the target keeps
    "replaced": "a woman is skiing",  # a word the target replaces
}
VALUES = {  # every setting that meets the others in an edit, with the values worth crossing
    "inversion": ["direct", "plain", "negative"],
    "keep_structure": [0.0, 0.4, 1.0],
    "keep_words": [0.0, 0.8],
    "blend": ["auto", "off", "man"],
    "strength": [1.0, 0.5],
    "keep_inside": [1.0, 0.4, 0.0],
    "inject": ["whole", "layout"],
    "propagate": [0.0, 0.5],
    "target": list(TARGETS),
    "realign": ["off", "auto"],
    "candidates": [1, 3],
    "context_scale": [1.0, 0.0],
    "lora_scale": [None, "0.5"],  # the runs are tuned with a LoRA at 1; None: as tuned
    "eta": [0.0, 0.5],
    "overlap": [None, 1, 2],  # None: a clip that fits one window; else a longer clip in windows (a v-model's)
    "checkpoint": [None, 2],
    "size": ["processed", "source"],
    "fps": [None, 5.0],
}
CASES = [dict(zip(VALUES, values, strict=True)) for values in AllPairs(list(VALUES.values()))]
RECONSTRUCTION = 1e-4  # largest latent error of the source prompt under direct inversion (latents' std ~1)


@pytest.fixture(scope="module")
def runs(skiing, tiny_model, tmp_path_factory) -> dict[str, Run]:
    """A clip that fits the model's window (an epsilon model) and one edited in windows (a v-prediction model, so
    that every setting's values meet v-prediction too: each meets every overlap), both keeping the parameters of
    step 2, both tuned with a LoRA (kohya's format)."""
    made = {}
    lora = write_lora(tiny_model, tmp_path_factory.mktemp("loras") / "style.safetensors", kohya=True)
    v_model = write_v_model(tmp_path_factory.mktemp("models") / "tiny-v")
    for name, frames, window, base in (("short", 3, 8, tiny_model), ("long", 6, 4, v_model)):
        run = Run(tmp_path_factory.mktemp("runs") / name)
        settings = TuneSettings(prompt=PROMPT, frames=frames, stride=2, size=32, steps=4, window=window,
                                adapter_lr=1e-2, checkpoint_every=2, keep_checkpoints=True)  # fmt: skip
        tune_video(skiing, settings, run, ModelSpec(str(base), loras=(Lora(str(lora)),)), device="cpu")
        made[name] = run
    return made


@pytest.fixture(scope="module")
def loaded(runs) -> dict[str, Tuned]:
    return {name: load_tuned(run, device="cpu") for name, run in runs.items()}


def settings_of(case: dict) -> EditSettings:
    asked = {k: v for k, v in case.items() if k in EditSettings.__dataclass_fields__ and k != "overlap"}
    return EditSettings(steps=4, guidance=5.0, overlap=case["overlap"] or 2, **asked)


def latents(tuned: Tuned, settings: EditSettings, target: str) -> torch.Tensor:
    return editing.edit_latents(tuned, editing.source_pass(tuned, settings), target, settings)


def controls_on(tuned: Tuned, settings: EditSettings, target: str) -> dict[str, tuple[EditSettings, str]]:
    """Each control that is on in this mix -> (the settings and target with it off)."""
    off = {}
    if settings.inversion != "plain":
        off["inversion"] = replace(settings, inversion="plain"), target
    for name in ("keep_structure", "keep_words", "context_scale", "eta", "propagate"):
        if getattr(settings, name):
            off[name] = replace(settings, **{name: 0.0}), target
    if settings.lora_scale is not None:
        off["lora_scale"] = replace(settings, lora_scale=None), target
    parsed = editing.target_for(tuned, target, settings)
    words = parsed.blend
    if settings.blend != "off" and words and words[0]:  # a region from the source's words: region control acts
        source = editing.source_pass(tuned, settings)
        if stands_out(source.word_maps.of(words[0])):
            steps = step_plan(settings)
            injected_later = set(steps.structure) - set(steps.inside)
            if settings.keep_inside < 1 and (settings.inversion == "direct" or injected_later):
                off["keep_inside"] = replace(settings, keep_inside=1.0), target
            if settings.inject == "layout" and set(steps.structure) & set(steps.inside):
                off["inject"] = replace(settings, inject="whole"), target
    if settings.realign == "auto" and set(parsed.changed) - set(parsed.weights):  # words the prompt does not weigh
        off["realign"] = replace(settings, realign="off"), target
    if "(" in target:
        off["weights"] = settings, target.replace("(", "").replace(":2)", "")
    if settings.blend != "off":  # blending applies where the source's words single out a region
        source = editing.source_pass(tuned, settings)
        if words and (not words[0] or stands_out(source.word_maps.of(words[0]))):  # or the added words' own maps
            off["blend"] = replace(settings, blend="off"), target
    return off


@pytest.mark.parametrize("case", CASES, ids=[f"case{k}" for k in range(len(CASES))])
def test_settings_hold_together_whatever_the_mix(case, runs, loaded, tmp_path, monkeypatch):
    name = "short" if case["overlap"] is None else "long"
    run, tuned, settings = runs[name], loaded[name], settings_of(case)
    target = TARGETS[case["target"]]
    output = OutputSettings(size=case["size"], fps=case["fps"])
    decoded = []
    real_decoded = StableDiffusion.decoded_frames
    monkeypatch.setattr(StableDiffusion, "decoded_frames", lambda sd, x, cb=None: decoded.append(x) or
                        real_decoded(sd, x, cb))  # fmt: skip
    out = tmp_path / "edit.mp4"
    [result] = editing.edit_run(run, [target], settings, out=out, output=output, device="cpu")

    # The frames: finite latents, the clip's count, the size and rate asked for.
    record = run.read_record()
    assert decoded and all(torch.isfinite(x).all() for x in decoded)
    info = video.probe(out)
    size = (record["size"]["width"], record["size"]["height"])
    if case["size"] == "source":
        size = video.source_region(record["video"]["width"], record["video"]["height"], size)
    assert (info.num_frames, info.width, info.height) == (record["frames"]["count"], *size)
    assert info.fps == pytest.approx(case["fps"] or record["fps"], rel=1e-3)
    assert video.read_frames(info, list(range(info.num_frames))).std() > 0

    # The record: exactly what was asked.
    entry = record["edits"][-1]
    assert (entry["target"], entry["settings"], entry["output"]) == (target, settings.to_dict(), output.to_dict())
    if settings.candidates > 1:
        assert len(entry["candidates"]) == settings.candidates and entry["chosen"] in range(settings.candidates)
        assert len({str(c["changes"]) for c in entry["candidates"]}) == settings.candidates
    else:
        assert "candidates" not in entry

    # Every control that is on changes the result.
    edited = latents(tuned, settings, target)
    for control, (without, plain_target) in controls_on(tuned, settings, target).items():
        assert not torch.equal(edited, latents(tuned, without, plain_target)), control

    # The source prompt under direct inversion gives the source back.
    if settings.inversion == "direct":
        again = latents(tuned, replace(settings, eta=0.0), PROMPT)
        assert (again - tuned.x0).abs().max() < RECONSTRUCTION

    # Nothing temporary is left behind.
    gc.collect()
    assert not [p for p in run.root.rglob("*") if ".tmp-" in p.name or p.name.startswith(".records")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit.mp4"]
