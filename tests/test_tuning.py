"""Tuning, inversion and editing through the library: exact equivalences, reload, resume, divergence."""

import json
import os
import shutil
import signal
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.optim.optimizer import register_optimizer_step_post_hook

from ctxedit import editing, tuning
from ctxedit.errors import Interrupted, ModelError, RunError, TuningDiverged, UsageError
from ctxedit.files import sha256_of
from ctxedit.models import adapter as adapters
from ctxedit.models.adapter import AdapterConfig, ContextAdapter
from ctxedit.models.sd import load_sd
from ctxedit.runs import Run
from ctxedit.settings import EditSettings, TuneSettings
from ctxedit.tuned import Tuned, load_tuned

SMALL = dict(prompt="a man is skiing", frames=3, stride=4, size=32, steps=2)
EDIT = EditSettings(steps=3, guidance=5.0)


def tune(video, model, root, **overrides) -> Run:
    run = Run(root)
    tuning.tune_video(video, TuneSettings(**(SMALL | overrides)), run, str(model), device="cpu")
    return run


def edit(run: Run, settings: EditSettings = EDIT, target: str = "a man is skiing on the moon"):
    tuned = load_tuned(run, device="cpu")
    source = editing.source_pass(tuned, settings)
    return source.trajectory, editing.edit_latents(tuned, source, target, settings)


def unet_weights(run: Run) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(run.tuned_path)).items() if k.startswith("unet.")}


def test_context_off_equals_an_untrained_adapter_exactly(skiing, tiny_model, tmp_path):
    off = tune(skiing, tiny_model, tmp_path / "off", context="off")
    idle = tune(skiing, tiny_model, tmp_path / "idle", context="quadratic", adapter_lr=0.0)
    weights_off, weights_idle = unet_weights(off), unet_weights(idle)
    assert weights_off.keys() == weights_idle.keys()
    assert all(torch.equal(weights_off[k], weights_idle[k]) for k in weights_off)
    assert any(k.startswith("adapter.") for k in load_file(str(idle.tuned_path)))
    inverted_off, edited_off = edit(off)
    inverted_idle, edited_idle = edit(idle)
    assert torch.equal(inverted_off, inverted_idle)
    assert torch.equal(edited_off, edited_idle)
    # ...and the tuning really changed something, so the equality is not vacuous.
    base = tune(skiing, tiny_model, tmp_path / "more", context="off", lr=1e-2)
    assert any(not torch.equal(unet_weights(base)[k], weights_off[k]) for k in weights_off)


def test_a_trained_adapter_changes_the_edit(skiing, tiny_model, tmp_path):
    plain = tune(skiing, tiny_model, tmp_path / "plain", context="off")
    context = tune(skiing, tiny_model, tmp_path / "ctx", adapter_lr=1e-2, steps=3)
    adapter_head = load_file(str(context.tuned_path))["adapter.head.weight"]
    assert adapter_head.abs().max() > 0
    assert not torch.equal(edit(plain)[1], edit(context)[1])


def test_edit_after_reload_equals_edit_in_memory(skiing, tiny_model, tmp_path):
    run = tune(skiing, tiny_model, tmp_path / "run", adapter_lr=1e-2)
    tuned = load_tuned(run, device="cpu")
    # Push the in-memory model away from the file, then check that a reload restores it exactly.
    with torch.no_grad():
        for p in tuned.model.trainable_parameters().values():
            p.add_(0.01)
    source = editing.source_pass(load_tuned(run, device="cpu"), EDIT)
    changed = editing.edit_latents(tuned, source, "spider man", EDIT)
    from ctxedit.models.trained import load_trained

    load_trained(run.tuned_path, tuned.model, tuned.adapter)
    restored = editing.edit_latents(tuned, source, "spider man", EDIT)
    fresh = editing.edit_latents(load_tuned(run, device="cpu"), source, "spider man", EDIT)
    assert torch.equal(restored, fresh) and not torch.equal(changed, fresh)


def test_weight_one_is_bit_for_bit_and_realign_changes_the_edit(skiing, tiny_model, tmp_path):
    run = tune(skiing, tiny_model, tmp_path / "run")
    tuned = load_tuned(run, device="cpu")
    source = editing.source_pass(tuned, EDIT)
    plain = editing.edit_latents(tuned, source, "a man is skiing on the moon", EDIT)
    assert torch.equal(plain, editing.edit_latents(tuned, source, "a man is skiing on the (moon:1.0)", EDIT))
    weighted = editing.edit_latents(tuned, source, "a man is skiing on the (moon:3)", EDIT)
    realigned = editing.edit_latents(tuned, source, "a man is skiing on the moon", replace(EDIT, realign="auto"))
    assert not torch.equal(plain, weighted) and not torch.equal(plain, realigned)
    assert torch.isfinite(weighted).all() and torch.isfinite(realigned).all()


def test_a_kept_checkpoint_is_a_shorter_run_and_edits_as_it(skiing, tiny_model, tmp_path):
    kept = tune(skiing, tiny_model, tmp_path / "kept", steps=4, checkpoint_every=2, keep_checkpoints=True,
                adapter_lr=1e-2)  # fmt: skip
    short = tune(skiing, tiny_model, tmp_path / "short", steps=2, adapter_lr=1e-2)
    assert kept.kept_steps() == [2] and short.kept_steps() == []
    at_two, after_two = load_file(str(kept.weights_path(2))), load_file(str(short.tuned_path))
    assert at_two.keys() == after_two.keys() and all(torch.equal(at_two[k], after_two[k]) for k in at_two)
    tuned = load_tuned(kept, device="cpu")
    earlier = replace(EDIT, checkpoint=2)
    source = editing.source_pass(tuned, earlier)
    assert torch.equal(source.trajectory, edit(short)[0])
    assert torch.equal(editing.edit_latents(tuned, source, "a man is skiing on the moon", earlier), edit(short)[1])
    final = editing.source_pass(tuned, EDIT)  # back to the finished tuning's parameters
    assert torch.equal(editing.edit_latents(tuned, final, "a man is skiing on the moon", EDIT), edit(kept)[1])
    assert not torch.equal(final.trajectory, source.trajectory)
    assert len(list((kept.root / "inversions").iterdir())) == 2  # cached apart


def test_context_scale_scales_the_shift_of_inversion_and_sampling(skiing, tiny_model, tmp_path):
    run = tune(skiing, tiny_model, tmp_path / "run", adapter_lr=1e-2, steps=3)
    tuned = load_tuned(run, device="cpu")
    assert tuned.shift_for(replace(EDIT, context_scale=0.5)).scale == tuned.shift.scale * 0.5
    _, plain = edit(run)
    halved, off = (edit(run, replace(EDIT, context_scale=scale))[1] for scale in (0.5, 0.0))
    assert not torch.equal(plain, halved) and not torch.equal(halved, off)
    assert torch.equal(off, editing.edit_latents(*_no_shift(tuned), "a man is skiing on the moon", EDIT))


def _no_shift(tuned: Tuned) -> tuple[Tuned, editing.SourcePass]:
    """The run with its context shift switched off in the schedule (scale 0), and its source pass."""
    unshifted = replace(tuned, shift=replace(tuned.shift, scale=0.0))
    return unshifted, editing.source_pass(unshifted, EDIT)


def test_trained_parameters_load_strictly(skiing, tiny_model, tmp_path):
    run = tune(skiing, tiny_model, tmp_path / "run")
    state = load_file(str(run.tuned_path))
    state["unet.extra.weight"] = torch.zeros(1)
    save_file(state, str(run.tuned_path))
    with pytest.raises(RunError, match="1 unexpected"):
        load_tuned(run, device="cpu")
    del state["unet.extra.weight"], state[next(k for k in state if "attn_temp" in k)]
    save_file(state, str(run.tuned_path))
    with pytest.raises(RunError, match="1 missing"):
        load_tuned(run, device="cpu")


def test_inversion_is_cached_per_setting(skiing, tiny_model, tmp_path):
    run = tune(skiing, tiny_model, tmp_path / "run")
    tuned = load_tuned(run, device="cpu")
    first, cached = editing.invert_source(tuned, EDIT)
    again, cached_again = editing.invert_source(tuned, EDIT)
    assert (cached, cached_again) == (False, True) and torch.equal(first, again)
    other, cached_other = editing.invert_source(tuned, EditSettings(steps=3, inversion_prompt="empty"))
    assert not cached_other and not torch.equal(first, other)
    assert len(list((run.root / "inversions").iterdir())) == 2


def ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture
def sigint(request):
    """The SIGINT handler tuning finds (Python's default unless the test is parametrized), set for the test and
    reset after: pytest started in the background by a shell without job control finds SIGINT ignored."""
    handler = getattr(request, "param", signal.default_int_handler)
    found = signal.signal(signal.SIGINT, handler)
    yield handler
    signal.signal(signal.SIGINT, found)


@pytest.mark.parametrize(
    "sigint",
    [signal.default_int_handler, signal.SIG_IGN, signal.SIG_DFL, lambda *_: None],
    ids=["default", "SIG_IGN", "SIG_DFL", "a function"],
    indirect=True,
)
def test_tuning_takes_ctrl_c_and_gives_back_the_handler_it_found(sigint):
    with tuning.interrupts_between_steps() as interrupted:
        assert not interrupted()
        ctrl_c()  # even where SIGINT was ignored: the user pressed it while tuning
        assert interrupted()
    assert signal.getsignal(signal.SIGINT) is sigint


@contextmanager
def ctrl_c_during_step(monkeypatch, step: int, where: str, presses: int = 1):
    """Press Ctrl-C `presses` times inside tuning step `step` (1-based): in the UNet's forward, in the backward
    pass, or between the optimizer's update and the loop's bookkeeping."""
    real_loss, calls, handles = tuning.training_loss, [], []

    def press(*_):
        for _ in range(presses):
            ctrl_c()

    def loss_with_ctrl_c(model, *args):
        calls.append(1)
        if len(calls) == step:
            if where == "forward":
                handles.append(model.unet.down_blocks[0].register_forward_hook(press))
            elif where == "optimizer step":
                handles.append(register_optimizer_step_post_hook(press))
        loss = real_loss(model, *args)
        if len(calls) == step and where == "backward":
            handles.append(next(iter(model.trainable_parameters().values())).register_hook(press))
        return loss

    monkeypatch.setattr(tuning, "training_loss", loss_with_ctrl_c)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        monkeypatch.setattr(tuning, "training_loss", real_loss)


def assert_same_run(run: Run, reference: Run) -> None:
    finished, expected = load_file(str(run.tuned_path)), load_file(str(reference.tuned_path))
    assert finished.keys() == expected.keys() and all(torch.equal(finished[k], expected[k]) for k in expected)
    losses = json.loads(run.record_path.read_text())["tuning"]["loss"]["curve"]
    assert losses == json.loads(reference.record_path.read_text())["tuning"]["loss"]["curve"]


@pytest.mark.parametrize("where", ["forward", "backward", "optimizer step"])
def test_ctrl_c_anywhere_in_a_step_resumes_bit_identically(skiing, tiny_model, tmp_path, monkeypatch, where, sigint):
    settings = dict(steps=5, adapter_lr=1e-2, checkpoint_every=100)
    reference = tune(skiing, tiny_model, tmp_path / "reference", **settings)
    with ctrl_c_during_step(monkeypatch, 3, where), pytest.raises(Interrupted, match="after step 3.*--resume"):
        tune(skiing, tiny_model, tmp_path / "run", **settings)  # the step under way finishes first
    run = Run(tmp_path / "run")
    assert run.checkpoint_path.exists() and not run.tuned_path.exists()
    assert signal.getsignal(signal.SIGINT) is sigint  # Ctrl-C is the user's again
    with pytest.raises(RunError, match="already holds a run"):
        tune(skiing, tiny_model, run.root, **settings)
    with pytest.raises(RunError, match="lr: 3e-05 -> 0.001"):
        tuning.tune_video(
            skiing, TuneSettings(**(SMALL | settings | {"lr": 1e-3})), run, str(tiny_model), "cpu", resume=True
        )
    tuning.tune_video(skiing, TuneSettings(**(SMALL | settings)), run, str(tiny_model), "cpu", resume=True)
    assert not run.checkpoint_path.exists()
    assert_same_run(run, reference)


def test_a_long_clip_is_tuned_a_window_at_a_time_and_resumes_bit_identically(skiing, tiny_model, tmp_path, monkeypatch):
    settings = dict(frames=10, window=4, steps=6, adapter_lr=1e-2, checkpoint_every=100)
    real_loss, seen = tuning.training_loss, []
    monkeypatch.setattr(tuning, "training_loss", lambda model, adapter, x0, *a: seen.append(x0) or real_loss(
        model, adapter, x0, *a))  # fmt: skip
    reference = tune(skiing, tiny_model, tmp_path / "reference", **settings)
    monkeypatch.setattr(tuning, "training_loss", real_loss)
    x0 = load_file(str(reference.source_path))["latents"]
    starts = [next(s for s in range(7) if torch.equal(window[:, -4:], x0[:, s : s + 4])) for window in seen]
    assert x0.shape[1] == 10 and len(set(starts)) > 2  # four frames in a row, from all over the clip...
    assert all(
        torch.equal(w[:, 0], x0[:, 0]) and w.shape[1] == (4 if s == 0 else 5) for w, s in zip(seen, starts, strict=True)
    )
    with ctrl_c_during_step(monkeypatch, 3, "forward"), pytest.raises(Interrupted):  # ...after the anchor frame
        tune(skiing, tiny_model, tmp_path / "run", **settings)
    tuning.tune_video(skiing, TuneSettings(**(SMALL | settings)), Run(tmp_path / "run"), str(tiny_model), "cpu",
                      resume=True)  # fmt: skip
    assert_same_run(Run(tmp_path / "run"), reference)


def test_auto_steps_grow_with_a_clip_longer_than_the_window(skiing, tiny_model, tmp_path, monkeypatch):
    """--steps auto: 300 for a clip that fits a window, 300 x sqrt(frames / window) beyond; the run records the
    number it ran, and an explicit --steps is taken as given."""
    from ctxedit import settings as settings_module

    auto = TuneSettings(prompt="a man is skiing")
    assert [auto.steps_for(n) for n in (1, 8, 32, 120, 480)] == [300, 300, 600, 1162, 2324]
    assert TuneSettings(prompt="a man is skiing", steps=50).steps_for(480) == 50
    monkeypatch.setattr(settings_module, "STEPS", 2)
    run = tune(skiing, tiny_model, tmp_path / "run", frames=10, window=4, steps="auto")
    record = run.read_record()
    assert record["settings"]["steps"] == 3 == record["tuning"]["steps_done"]  # round(2 * sqrt(10 / 4))


def test_resume_compares_auto_steps_as_the_number_they_came_to(skiing, tiny_model, tmp_path, monkeypatch):
    """--steps auto is recorded as the number it came to on the run's frames: --resume with auto again continues
    the run, with another number it is refused (it would not end where an uninterrupted run does)."""
    from ctxedit import settings as settings_module

    monkeypatch.setattr(settings_module, "STEPS", 2)
    settings = dict(frames=10, window=4, steps="auto", adapter_lr=1e-2)  # 3 steps: round(2 * sqrt(10 / 4))
    reference = tune(skiing, tiny_model, tmp_path / "reference", **settings)
    with ctrl_c_during_step(monkeypatch, 2, "forward"), pytest.raises(Interrupted, match="after step 2"):
        tune(skiing, tiny_model, tmp_path / "run", **settings)
    run = Run(tmp_path / "run")
    with pytest.raises(RunError, match="these differ: steps: 3 -> 5$"):
        tuning.tune_video(skiing, TuneSettings(**(SMALL | settings | {"steps": 5})), run, str(tiny_model), "cpu",
                          resume=True)  # fmt: skip
    monkeypatch.setattr(settings_module, "STEPS", 4)  # auto on these frames comes to another number now
    with pytest.raises(RunError, match=r"these differ: steps: 3 -> 'auto' \(6\)$"):
        tuning.tune_video(skiing, TuneSettings(**(SMALL | settings)), run, str(tiny_model), "cpu", resume=True)
    monkeypatch.setattr(settings_module, "STEPS", 2)
    tuning.tune_video(skiing, TuneSettings(**(SMALL | settings)), run, str(tiny_model), "cpu", resume=True)
    assert_same_run(run, reference)
    assert run.read_record()["settings"]["steps"] == 3


@pytest.mark.parametrize("sigint", [signal.SIG_IGN], ids=["SIG_IGN"], indirect=True)  # as a background job finds it
def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(skiing, tiny_model, tmp_path, monkeypatch, sigint):
    settings = dict(steps=5, adapter_lr=1e-2, checkpoint_every=2)
    reference = tune(skiing, tiny_model, tmp_path / "reference", **settings)
    with ctrl_c_during_step(monkeypatch, 4, "backward", presses=2):
        with pytest.raises(Interrupted, match="stopped during step 4; the checkpoint of step 2 is kept"):
            tune(skiing, tiny_model, tmp_path / "run", **settings)
    assert signal.getsignal(signal.SIGINT) is sigint
    run = Run(tmp_path / "run")
    tuning.tune_video(skiing, TuneSettings(**(SMALL | settings)), run, str(tiny_model), "cpu", resume=True)
    assert_same_run(run, reference)


def test_a_nan_loss_stops_tuning_and_keeps_the_last_good_parameters(skiing, tiny_model, tmp_path, monkeypatch):
    reference = tune(skiing, tiny_model, tmp_path / "reference", steps=2)
    real_loss, calls = tuning.training_loss, []

    def nan_at_step_3(*args):
        calls.append(1)
        loss = real_loss(*args)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(tuning, "training_loss", nan_at_step_3)
    with pytest.raises(TuningDiverged, match="nan at step 3.*kept"):
        tune(skiing, tiny_model, tmp_path / "run", steps=5)
    run = Run(tmp_path / "run")
    kept, expected = load_file(str(run.tuned_path)), load_file(str(reference.tuned_path))
    assert all(torch.equal(kept[k], expected[k]) for k in expected)
    record = json.loads(run.record_path.read_text())
    assert record["tuning"]["steps_done"] == 2 and "nan at step 3" in record["tuning"]["stopped_early"]


def with_pretrained_adapter(model: Path, folder: Path, **config_changes) -> Path:
    """A copy of `model` with a pre-trained context adapter (a random, non-zero head) in adapter/."""
    shutil.copytree(model, folder)
    sd = load_sd(str(model), torch.device("cpu"), torch.float32)
    config = AdapterConfig(text_dim=sd.text_encoder.config.hidden_size, latent_channels=4, **config_changes)
    adapter = ContextAdapter(config)
    torch.nn.init.normal_(adapter.head.weight, std=0.05, generator=torch.Generator().manual_seed(1))
    adapters.save_pretrained(folder / adapters.FOLDER, adapter, {"kind": "quadratic", "scale": 1.0})
    return folder


def test_tuning_starts_from_the_models_pretrained_adapter(skiing, tiny_model, tmp_path):
    model = with_pretrained_adapter(tiny_model, tmp_path / "with-adapter")
    pretrained = load_file(str(model / "adapter" / adapters.WEIGHTS))
    auto = tune(skiing, model, tmp_path / "auto", adapter="auto", adapter_lr=0.0)  # the adapter stays as loaded
    tuned = {k.removeprefix("adapter."): v for k, v in load_file(str(auto.tuned_path)).items() if "adapter." in k}
    assert tuned.keys() == pretrained.keys() and all(torch.equal(tuned[k], pretrained[k]) for k in tuned)
    record = auto.read_record()
    assert record["adapter"]["pretrained"] == str(model / "adapter") and record["settings"]["adapter"] == "auto"
    assert record["adapter"]["sha256"] == sha256_of(model / "adapter" / adapters.WEIGHTS)
    given = tune(skiing, tiny_model, tmp_path / "given", adapter_lr=0.0, adapter=str(model / "adapter"))
    assert given.tuned_path.read_bytes() == auto.tuned_path.read_bytes()

    # --adapter fresh (the default) is today's ContextDiff bit for bit, as on a model folder without an adapter.
    fresh = tune(skiing, model, tmp_path / "fresh")
    plain = tune(skiing, tiny_model, tmp_path / "plain", adapter="auto")
    assert fresh.tuned_path.read_bytes() == plain.tuned_path.read_bytes()
    assert fresh.read_record()["adapter"] is None and plain.read_record()["adapter"] is None
    assert fresh.read_record()["settings"]["adapter"] == "fresh"
    assert not torch.equal(edit(auto)[1], edit(plain)[1])  # the edit samples with the pre-trained context


def test_a_pretrained_adapter_that_does_not_fit_is_refused(skiing, tiny_model, tmp_path):
    with pytest.raises(ModelError, match="no pre-trained context adapter in .*nowhere"):
        tune(skiing, tiny_model, tmp_path / "a", adapter=str(tmp_path / "nowhere"))
    other = with_pretrained_adapter(tiny_model, tmp_path / "other", width=64)
    with pytest.raises(ModelError, match="made for another model: width 64"):
        tune(skiing, other, tmp_path / "b", adapter="auto")
    with pytest.raises(UsageError, match="--adapter PATH needs the context on"):
        TuneSettings(prompt="a man is skiing", context="off", adapter=str(other))
    assert not Run(tmp_path / "a").record_path.exists() and not Run(tmp_path / "b").record_path.exists()
