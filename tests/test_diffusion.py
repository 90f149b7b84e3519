"""Contextual DDIM against the stock diffusers schedulers and METHOD.md's closed forms."""

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from ctxedit import diffusion
from ctxedit.diffusion import ShiftSchedule
from ctxedit.errors import UsageError

SCHEDULES = ["quadratic", "prior", "noise"]


def sd_scheduler(steps: int = 10) -> DDIMScheduler:
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
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


@pytest.mark.parametrize("kind", SCHEDULES)
def test_step_with_zero_context_is_bit_identical_to_stock(kind):
    scheduler = sd_scheduler()
    sample, eps, _ = tensors()
    for t in scheduler.timesteps.tolist():
        stock = scheduler.step(eps, t, sample)
        ours = diffusion.contextual_step(scheduler, eps, t, sample, torch.zeros_like(sample), ShiftSchedule(kind))
        assert torch.equal(ours.prev_sample, stock.prev_sample)
        assert torch.equal(ours.pred_original_sample, stock.pred_original_sample)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_inverse_step_with_zero_context_is_bit_identical_to_stock(kind):
    inverse = inverse_of(sd_scheduler())
    sample, eps, _ = tensors()
    for t in inverse.timesteps.tolist():
        stock = inverse.step(eps, t, sample)
        ours = diffusion.contextual_inverse_step(inverse, eps, t, sample, torch.zeros_like(sample), ShiftSchedule(kind))
        assert torch.equal(ours.prev_sample, stock.prev_sample)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_step_with_context_matches_closed_form(kind):
    scheduler, shift = sd_scheduler(), ShiftSchedule(kind, 1.5)
    x, eps, r = tensors(1)
    ac = scheduler.alphas_cumprod.double()
    for t in scheduler.timesteps.tolist():
        a_t = ac[t]
        a_prev = ac[t - 100] if t >= 100 else scheduler.final_alpha_cumprod.double()
        k_t, k_prev = shift(a_t).double(), shift(a_prev).double()
        x0_hat = (x.double() - k_t * r - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        expected = a_prev.sqrt() * x0_hat + k_prev * r + (1 - a_prev).sqrt() * eps
        out = diffusion.contextual_step(scheduler, eps, t, x, r, shift)
        torch.testing.assert_close(out.prev_sample.double(), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.pred_original_sample.double(), x0_hat, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_inverse_step_with_context_matches_closed_form(kind):
    inverse, shift = inverse_of(sd_scheduler()), ShiftSchedule(kind, 1.5)
    x, eps, r = tensors(2)
    ac = inverse.alphas_cumprod.double()
    for t in inverse.timesteps.tolist():
        a_cur = ac[t - 100] if t >= 100 else inverse.initial_alpha_cumprod.double()
        a_next = ac[t]
        k_cur, k_next = shift(a_cur).double(), shift(a_next).double()
        y = x.double() - k_cur * r
        y_next = a_next.sqrt() * (y - (1 - a_cur).sqrt() * eps) / a_cur.sqrt() + (1 - a_next).sqrt() * eps
        out = diffusion.contextual_inverse_step(inverse, eps, t, x, r, shift)
        torch.testing.assert_close(out.prev_sample.double(), y_next + k_next * r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_inversion_then_sampling_reproduces_x0(kind):
    scheduler = sd_scheduler(25)
    x0, eps, r = tensors(3)
    model = lambda x, t: eps  # noqa: E731 - a constant-eps model makes DDIM exactly invertible
    shift = ShiftSchedule(kind, 2.0)
    x_T = diffusion.invert(model, x0, inverse_of(scheduler), r, shift)
    assert (x_T - x0).abs().max() > 1  # it really went somewhere
    back = diffusion.sample(model, x_T, scheduler, lambda _: r, x0, shift)
    assert (back - x0).abs().max() < 1e-4


def test_context_changes_the_trajectory_and_eta_noise_is_seeded():
    scheduler = sd_scheduler(5)
    x0, eps, r = tensors(4)
    model = lambda x, t: eps  # noqa: E731
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
