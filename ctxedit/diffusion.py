"""Contextual DDIM: shift schedules, one sampling step, one inversion step, and the two loops.

Notation (name in code -> ContextDiff / METHOD.md section 4-5):
- alpha_prod          -> alphā_t, `scheduler.alphas_cumprod[t]`
- shift               -> k_t = k(alphā_t) * scale, the weight of the context on the trajectory
- context             -> r̂, the adapter's output, shaped like the latents
- sample / x          -> x_t, the contextual (shifted) latent
- y                   -> y_t = x_t - k_t r̂, which follows the ordinary DDPM marginals

A step maps x to y, takes the stock diffusers step in y-space and shifts back. With r̂ = 0 it is
bit-identical to the stock scheduler. The loops take the model as a plain callable
`model(x, t) -> eps` and never see a UNet (k-diffusion style).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from ctxedit.errors import UsageError
from ctxedit.settings import CONTEXTS

NOISE_SCHEDULE_C = 0.018125  # constant of the released ContextDiff video code


@dataclass(frozen=True)
class ShiftSchedule:
    """k(alphā) * scale: how strongly the context shifts the trajectory at each noise level."""

    kind: str = "quadratic"
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in CONTEXTS:
            raise UsageError(f"unknown context schedule {self.kind!r}; choose one of {', '.join(CONTEXTS)}")
        if not math.isfinite(self.scale):
            raise UsageError(f"context scale must be a finite number, got {self.scale}")

    @property
    def active(self) -> bool:
        return self.kind != "off" and self.scale != 0.0

    def __call__(self, alpha_prod: torch.Tensor | float) -> torch.Tensor:
        """k for one alphā (defined on alphā, not t, so that the final alphā works too)."""
        alpha_prod = torch.as_tensor(alpha_prod, dtype=torch.float64)
        sqrt_alpha = alpha_prod.sqrt()
        if self.kind == "quadratic":  # vanishes at both ends, peak 0.25
            k = sqrt_alpha * (1 - sqrt_alpha)
        elif self.kind == "prior":
            k = 1 - sqrt_alpha
        elif self.kind == "noise":
            k = NOISE_SCHEDULE_C * (1 - alpha_prod).sqrt()
        else:
            k = torch.zeros_like(alpha_prod)
        return (k * self.scale).float()


@dataclass
class ContextualStepOutput:
    prev_sample: torch.Tensor  # x at the next noise level of the loop
    pred_original_sample: torch.Tensor  # x0_hat, the clean latent this step predicts


def _step_ratio(scheduler: DDIMScheduler | DDIMInverseScheduler) -> int:
    if scheduler.num_inference_steps is None:
        raise UsageError("the scheduler has no timesteps: call scheduler.set_timesteps(n) first")
    return scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def sampling_alphas(scheduler: DDIMScheduler, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alphā_t, alphā_prev) exactly as `DDIMScheduler.step` chooses them."""
    prev_t = t - _step_ratio(scheduler)
    alpha_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    return scheduler.alphas_cumprod[t], alpha_prev


def inversion_alphas(scheduler: DDIMInverseScheduler, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alphā_cur, alphā_next) exactly as `DDIMInverseScheduler.step` chooses them for timestep t."""
    cur_t = min(t - _step_ratio(scheduler), scheduler.config.num_train_timesteps - 1)
    alpha_cur = scheduler.alphas_cumprod[cur_t] if cur_t >= 0 else scheduler.initial_alpha_cumprod
    return alpha_cur, scheduler.alphas_cumprod[t]


def _shifted(
    stock_step: Callable[[torch.Tensor], object],
    sample: torch.Tensor,
    context: torch.Tensor | None,
    k_from: torch.Tensor,
    k_to: torch.Tensor,
) -> ContextualStepOutput:
    # 1. into y-space, where the stock step is exact
    y = sample if context is None else sample - k_from.to(sample.dtype) * context
    # 2. the stock step
    out = stock_step(y)
    # 3. back into x-space at the new noise level; x0_hat needs no shift (k vanishes for clean data)
    prev = out.prev_sample if context is None else out.prev_sample + k_to.to(sample.dtype) * context
    return ContextualStepOutput(prev_sample=prev, pred_original_sample=out.pred_original_sample)


def contextual_step(
    scheduler: DDIMScheduler,
    pred_epsilon: torch.Tensor,
    t: int,
    sample: torch.Tensor,
    context: torch.Tensor | None,
    shift: ShiftSchedule,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> ContextualStepOutput:
    """One contextual DDIM sampling step x_t -> x_prev (METHOD.md section 5)."""
    alpha_prod_t, alpha_prod_t_prev = sampling_alphas(scheduler, t)
    return _shifted(
        lambda y: scheduler.step(pred_epsilon, t, y, eta=eta, generator=generator),
        sample,
        context if shift.active else None,
        shift(alpha_prod_t),
        shift(alpha_prod_t_prev),
    )


def contextual_inverse_step(
    scheduler: DDIMInverseScheduler,
    pred_epsilon: torch.Tensor,
    t: int,
    sample: torch.Tensor,
    context: torch.Tensor | None,
    shift: ShiftSchedule,
) -> ContextualStepOutput:
    """One contextual DDIM inversion step x_cur -> x_next, with eps predicted at t = t_next."""
    alpha_prod_cur, alpha_prod_next = inversion_alphas(scheduler, t)
    return _shifted(
        lambda y: scheduler.step(pred_epsilon, t, y),
        sample,
        context if shift.active else None,
        shift(alpha_prod_cur),
        shift(alpha_prod_next),
    )


Model = Callable[[torch.Tensor, int], torch.Tensor]
Callback = Callable[[int, int], None]


def invert(
    model: Model,
    x0: torch.Tensor,
    scheduler: DDIMInverseScheduler,
    context: torch.Tensor | None,
    shift: ShiftSchedule,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Contextual DDIM inversion of clean latents x0 with a fixed context r (Tune-A-Video's next-step rule)."""
    x = x0
    timesteps = scheduler.timesteps.tolist()
    for i, t in enumerate(timesteps):
        x = contextual_inverse_step(scheduler, model(x, t), t, x, context, shift).prev_sample
        if callback:
            callback(i + 1, len(timesteps))
    return x


def sample(
    model: Model,
    x: torch.Tensor,
    scheduler: DDIMScheduler,
    context_of: Callable[[torch.Tensor], torch.Tensor] | None,
    x0_init: torch.Tensor,
    shift: ShiftSchedule,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Contextual DDIM sampling from x_T; the context r̂ comes from x0_init first, then from each step's x0_hat."""
    use_context = context_of is not None and shift.active
    context = context_of(x0_init) if use_context else None
    timesteps = scheduler.timesteps.tolist()
    for i, t in enumerate(timesteps):
        out = contextual_step(scheduler, model(x, t), t, x, context, shift, eta, generator)
        x = out.prev_sample
        if use_context and i + 1 < len(timesteps):
            context = context_of(out.pred_original_sample)
        if callback:
            callback(i + 1, len(timesteps))
    return x
