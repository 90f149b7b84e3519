"""Contextual DDIM against the stock diffusers schedulers and METHOD.md's closed forms."""

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from ctxedit import diffusion
from ctxedit.diffusion import ShiftSchedule
from ctxedit.errors import UsageError
from ctxedit.models.adapter import AdapterConfig, ContextAdapter

SCHEDULES = ["quadratic", "prior", "noise"]


def sd_scheduler(steps: int = 10, prediction: str = "epsilon") -> DDIMScheduler:
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction,
    )  # fmt: skip
    scheduler.set_timesteps(steps)
    return scheduler


def inverse_of(scheduler: DDIMScheduler) -> DDIMInverseScheduler:
    inverse = DDIMInverseScheduler.from_config(scheduler.config)
    inverse.set_timesteps(scheduler.num_inference_steps)
    return inverse


def tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, 4, 8, 8, generator=g) for _ in range(3)]  # sample, eps, context


def test_shift_schedules_follow_their_formulas():
    alpha = torch.tensor([1e-4, 0.25, 0.5, 0.9999])
    quadratic = ShiftSchedule("quadratic", 2.0)(alpha)
    assert torch.allclose(quadratic, 2 * alpha.sqrt() * (1 - alpha.sqrt()))
    assert ShiftSchedule("quadratic")(0.25).item() == pytest.approx(0.25)  # the peak
    assert ShiftSchedule("quadratic")(1.0).item() == 0 and ShiftSchedule("quadratic")(0.0).item() == 0
    assert torch.allclose(ShiftSchedule("prior")(alpha), 1 - alpha.sqrt())
    assert torch.allclose(ShiftSchedule("noise")(alpha), 0.018125 * (1 - alpha).sqrt())
    assert not ShiftSchedule("off").active and not ShiftSchedule("prior", 0.0).active
    with pytest.raises(UsageError, match="quadratic, prior, noise, off"):
        ShiftSchedule("linear")


def stock_loops(scheduler: DDIMScheduler, model, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_T, x_0) of the stock diffusers inversion and sampling loops."""
    inverse, x = inverse_of(scheduler), x0
    for t in inverse.timesteps.tolist():
        x = inverse.step(model(x, t), t, x).prev_sample
    x_T = x
    for t in scheduler.timesteps.tolist():
        x = scheduler.step(model(x, t), t, x).prev_sample
    return x_T, x


def random_adapter(seed: int = 0) -> ContextAdapter:
    """A context adapter with a trained-looking (non-zero) head: its context depends on the latents and text."""
    torch.manual_seed(seed)
    adapter = ContextAdapter(AdapterConfig(text_dim=32)).eval().requires_grad_(False)
    with torch.no_grad():
        torch.nn.init.normal_(adapter.head.weight, std=0.05)
    return adapter


@pytest.mark.parametrize("context", ["none", "zero"])
def test_loops_without_context_are_the_stock_loops_bit_for_bit(context):
    scheduler = sd_scheduler()
    x0, _, _ = tensors()
    model = lambda x, t: torch.tanh(x) + t / 1000  # noqa: E731 - depends on x and t
    r = torch.zeros_like(x0) if context == "zero" else None
    shift = ShiftSchedule("quadratic")
    trajectory = diffusion.invert(model, x0, inverse_of(scheduler), r, shift)
    back = diffusion.sample(model, trajectory[0], scheduler, None if r is None else (lambda _: r), x0, shift)
    stock_T, stock_0 = stock_loops(scheduler, model, x0)
    assert torch.equal(trajectory[0], stock_T) and torch.equal(trajectory[-1], x0)
    assert torch.equal(back, stock_0)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_loops_with_a_fixed_context_follow_the_closed_forms(kind):
    """METHOD.md section 5 in x-space, in float64: with r fixed, carrying y is carrying x (clean ends unshifted)."""
    scheduler, shift = sd_scheduler(), ShiftSchedule(kind, 1.5)
    inverse = inverse_of(scheduler)
    x0, eps, r = (t.double() for t in tensors(1))
    model = lambda x, t: eps  # noqa: E731
    ac = scheduler.alphas_cumprod.double()
    first, final = inverse.initial_alpha_cumprod.double(), scheduler.final_alpha_cumprod.double()
    x = x0 + shift(first).double() * r
    for t in inverse.timesteps.tolist():
        a_cur, a_next = (ac[t - 100] if t >= 100 else first), ac[t]
        y = x - shift(a_cur).double() * r
        y_next = a_next.sqrt() * (y - (1 - a_cur).sqrt() * eps) / a_cur.sqrt() + (1 - a_next).sqrt() * eps
        x = y_next + shift(a_next).double() * r
    trajectory = diffusion.invert(model, x0, inverse, r, shift)
    torch.testing.assert_close(shift.shifted(trajectory[0], ac[901], r), x, atol=1e-6, rtol=1e-6)
    for t in scheduler.timesteps.tolist():
        a_t, a_prev = ac[t], (ac[t - 100] if t >= 100 else final)
        x0_hat = (x - shift(a_t).double() * r - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0_hat + shift(a_prev).double() * r + (1 - a_prev).sqrt() * eps
    back = diffusion.sample(model, trajectory[0], scheduler, lambda _: r, x0, shift)
    torch.testing.assert_close(back, x - shift(final).double() * r, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("kind", SCHEDULES)
def test_round_trip_is_exact_with_a_real_adapter_whose_context_follows_x0_hat(kind, prediction):
    """Inversion with R(x0, c) and sampling with R(x0_hat, c): the context changes at every step, the
    y-trajectory does not care. (A constant context would hide a sampler that carries x.) A v-model too."""
    scheduler, shift, adapter = sd_scheduler(25, prediction), ShiftSchedule(kind, 2.0), random_adapter()
    x0, eps, _ = tensors(3)
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(4))
    model = lambda x, t: eps  # noqa: E731 - a constant prediction (eps or v) makes DDIM exactly invertible
    seen = []
    with torch.no_grad():
        r = adapter(x0, text)
        assert r.square().mean().sqrt() > 0.3  # a real, sizeable context
        trajectory = diffusion.invert(model, x0, inverse_of(scheduler), r, shift)
        context_of = lambda x0_hat: seen.append(x0_hat) or adapter(x0_hat, text)  # noqa: E731
        back = diffusion.sample(model, trajectory[0], scheduler, context_of, x0, shift)
    assert (trajectory[0] - x0).abs().max() > 1  # it really went somewhere
    assert len(seen) == 25 and (adapter(seen[1], text) - r).abs().max() > 1e-2  # the context moved
    assert (back - x0).abs().max() < 2e-5


def test_v_predictions_are_converted_as_diffusers_defines_them():
    """Tuning's target is diffusers' velocity; inversion's eps is the one sampling sees back at the step's end, which
    the stock inverse scheduler's conversion (at the step's start) is not: it does not return a constant v-model."""
    scheduler = sd_scheduler(25, "v_prediction")
    x0, noise, v = tensors(8)
    t = torch.tensor([500])
    target = diffusion.training_target(x0, noise, scheduler.alphas_cumprod[500], "v_prediction")
    torch.testing.assert_close(target, scheduler.get_velocity(x0, noise, t))
    assert torch.equal(diffusion.training_target(x0, noise, scheduler.alphas_cumprod[500], "epsilon"), noise)
    inverse, shift = inverse_of(scheduler), ShiftSchedule("off")
    for t in inverse.timesteps.tolist()[:3]:
        a_cur, a_next = diffusion.inversion_alphas(inverse, t)
        eps = diffusion.inversion_epsilon(v, x0, a_cur, a_next)
        y_next = a_next.sqrt() * (x0 - (1 - a_cur).sqrt() * eps) / a_cur.sqrt() + (1 - a_next).sqrt() * eps
        torch.testing.assert_close(eps, a_next.sqrt() * v + (1 - a_next).sqrt() * y_next)  # sampling's eps there
    trajectory = diffusion.invert(lambda x, t: v, x0, inverse, None, shift)
    stock_T, stock_0 = stock_loops(scheduler, lambda x, t: v, x0)
    back = diffusion.sample(lambda x, t: v, trajectory[0], scheduler, None, x0, shift)
    assert (back - x0).abs().max() < 2e-5 < 0.05 < (stock_0 - x0).abs().max()


def test_reconstruction_landings_make_any_model_reproduce_the_trajectory():
    """Direct inversion: a model that cannot invert exactly (it depends on x, and is guided) is pulled back
    onto the source trajectory at every step, and from a later start too (partial inversion)."""
    scheduler, shift, adapter = sd_scheduler(), ShiftSchedule("quadratic"), random_adapter(1)
    x0, eps, r = tensors(5)
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(6))
    context_of = lambda x0_hat: adapter(x0_hat, text)  # noqa: E731 - the context follows x0_hat, as when editing
    source = lambda x, t: eps  # noqa: E731
    guided = lambda x, t: eps + 7.5 * torch.tanh(x)  # noqa: E731
    trajectory = diffusion.invert(source, x0, inverse_of(scheduler), r, shift)
    for start in (0, 4):
        landings = diffusion.reconstruction_landings(guided, trajectory, scheduler, context_of, x0, shift, start)
        assert landings.shape == (10 - start, *x0.shape)
        assert (landings - trajectory[start + 1 :]).abs().max() > 0.1  # the guided model steps off the trajectory
        visited = []

        def guide(step, y, landings=landings, start=start, visited=visited):
            visited.append(step)
            return diffusion.corrected(y, landings[step - start], trajectory[step + 1])

        back = diffusion.sample(guided, trajectory[start], scheduler, context_of, x0, shift, start=start, guide=guide)
        assert visited == list(range(start, 10))
        assert torch.equal(back, x0)  # bit for bit: each corrected step lands exactly on the trajectory
    unguided = diffusion.sample(guided, trajectory[0], scheduler, context_of, x0, shift)
    assert (unguided - x0).abs().max() > 0.1


def test_loops_keep_their_steps_on_disk_bit_for_bit(tmp_path):
    """A long clip's trajectory and landings go to memory-mapped files (`windows.SpilledSteps`): the loops
    write and read them there with exactly the numbers they keep in memory, and a reopened file gives them back."""
    from ctxedit.windows import SpilledSteps

    scheduler, shift, adapter = sd_scheduler(), ShiftSchedule("quadratic"), random_adapter(2)
    x0, eps, r = tensors(7)
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(8))
    context_of = lambda x0_hat: adapter(x0_hat, text)  # noqa: E731
    model = lambda x, t: eps + 0.5 * torch.tanh(x)  # noqa: E731 - depends on x: every step differs
    in_memory = diffusion.invert(model, x0, inverse_of(scheduler), r, shift)
    on_disk = diffusion.invert(model, x0, inverse_of(scheduler), r, shift,
                               out=SpilledSteps.create(tmp_path / "trajectory.npy", 11, x0))  # fmt: skip
    reopened = SpilledSteps.open(tmp_path / "trajectory.npy", x0.device)
    assert len(reopened) == 11 and all(torch.equal(in_memory[i], reopened[i]) for i in range(11))
    assert not torch.equal(reopened[0], reopened[10]) and torch.equal(reopened[10], x0)
    guided = lambda x, t: model(x, t) + 3.0 * torch.tanh(2 * x)  # noqa: E731
    kept = diffusion.reconstruction_landings(guided, in_memory, scheduler, context_of, x0, shift, 4)
    out = SpilledSteps.create(tmp_path / "landings.npy", 6, x0)
    spilled = diffusion.reconstruction_landings(guided, on_disk, scheduler, context_of, x0, shift, 4, out=out)
    assert len(spilled) == 6 and all(torch.equal(kept[i], spilled[i]) for i in range(6))
    assert (kept - in_memory[5:]).abs().max() > 0.1


def test_context_changes_the_trajectory_and_eta_noise_is_seeded():
    scheduler = sd_scheduler(5)
    x0, eps, r = tensors(4)
    model = lambda x, t: eps + 0.1 * x  # noqa: E731 - the context acts through what the model sees
    plain = diffusion.sample(model, x0, scheduler, None, x0, ShiftSchedule())
    shifted = diffusion.sample(model, x0, scheduler, lambda _: r, x0, ShiftSchedule())
    assert (plain - shifted).abs().max() > 1e-3
    noisy = [
        diffusion.sample(model, x0, scheduler, None, x0, ShiftSchedule(), eta=0.5,
                         generator=torch.Generator().manual_seed(seed))
        for seed in (1, 1, 2)
    ]  # fmt: skip
    assert torch.equal(noisy[0], noisy[1]) and not torch.equal(noisy[0], noisy[2])


def test_step_without_timesteps_says_how_to_fix():
    scheduler = DDIMScheduler()
    with pytest.raises(UsageError, match="set_timesteps"):
        diffusion.sampling_alphas(scheduler, 10)
