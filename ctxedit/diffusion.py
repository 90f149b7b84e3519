"""Contextual DDIM: shift schedules and the loops of inversion, source reconstruction and sampling.

Notation (name in code -> ContextDiff / METHOD.md sections 4-5):
- alpha_prod          -> alphā_t, `scheduler.alphas_cumprod[t]`
- shift               -> k_t = k(alphā_t) * scale, the weight of the context on the trajectory
- context             -> r̂, the adapter's output, shaped like the latents
- y                   -> the ordinary DDIM latent, which follows the usual DDPM marginals
- x                   -> x_t = y_t + k_t r̂, the contextual (shifted) latent the model sees

The loops carry y and take the stock diffusers step on it, so the y-trajectory is exact DDIM whatever the
context does; the context acts only through what the model sees (METHOD.md section 5, correction). With no
context every loop is the stock scheduler's, bit for bit. The model is a plain callable `model(x, t)` that
predicts what the scheduler's `prediction_type` says (eps, or v for SD 2.x 768-v); the loops never see a UNet
(k-diffusion style).

v-prediction (v = √ā ε - √(1-ā) x0, of the ordinary latent y: the shift does not enter it) is converted here and
nowhere else: `training_target` for tuning's loss, and inversion's `inversion_epsilon`. Sampling takes the stock
v step on y, which is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from ctxedit.errors import UsageError
from ctxedit.settings import CONTEXTS

NOISE_SCHEDULE_C = 0.018125  # constant of the released ContextDiff video code

Model = Callable[[torch.Tensor, int], torch.Tensor]
Callback = Callable[[int, int], None]
Guide = Callable[[int, torch.Tensor], torch.Tensor]  # (step, y after it) -> the y the loop continues from


class Steps(Protocol):
    """Where a loop keeps latents per step: a (steps, *shape) tensor, or a store indexed like one (on disk)."""

    def __getitem__(self, step: int) -> torch.Tensor: ...
    def __setitem__(self, step: int, latents: torch.Tensor) -> None: ...
    def __len__(self) -> int: ...


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

    def shifted(self, y: torch.Tensor, alpha_prod: torch.Tensor | float, context: torch.Tensor | None) -> torch.Tensor:
        """x = y + k(alphā) r̂: the contextual latent for the ordinary latent y."""
        if context is None or not self.active:
            return y
        return y + self(alpha_prod).to(y.device, y.dtype) * context


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


def training_target(x0: torch.Tensor, noise: torch.Tensor, alpha_prod: torch.Tensor, prediction: str) -> torch.Tensor:
    """What the model learns to predict at alphā for clean latents x0 and noise: eps, or v = √ā ε - √(1-ā) x0."""
    if prediction == "epsilon":
        return noise
    alpha_prod = alpha_prod.to(x0.device, x0.dtype)
    return alpha_prod.sqrt() * noise - (1 - alpha_prod).sqrt() * x0


def inversion_epsilon(
    v: torch.Tensor, y: torch.Tensor, alpha_cur: torch.Tensor, alpha_next: torch.Tensor
) -> torch.Tensor:
    """The eps of an inversion step from y (at alphā_cur) that a v-model predicted: the eps that sampling will
    see back at the step's end, √ā_n v + √(1-ā_n) y_next, solved with DDIM's y_next = f(y, eps). So a model whose
    prediction does not move inverts exactly, as a constant eps-model does (the stock inverse converts at ā_cur,
    which loses O(step²) at every step)."""
    a_cur, a_next = (a.to(y.device, y.dtype) for a in (alpha_cur, alpha_next))
    across = (a_next * a_cur).sqrt() + ((1 - a_next) * (1 - a_cur)).sqrt()  # cos of the step's angle
    return (a_cur.sqrt() * v + (1 - a_next).sqrt() * y) / across


def _epsilon_twin(scheduler: DDIMInverseScheduler) -> DDIMInverseScheduler:
    twin = DDIMInverseScheduler.from_config(scheduler.config, prediction_type="epsilon")
    twin.set_timesteps(scheduler.num_inference_steps, device=scheduler.timesteps.device)
    return twin


def invert(
    model: Model,
    x0: torch.Tensor,
    scheduler: DDIMInverseScheduler,
    context: torch.Tensor | None,
    shift: ShiftSchedule,
    callback: Callback | None = None,
    out: Steps | None = None,
) -> Steps:
    """Contextual DDIM inversion of clean latents x0 with a fixed context r (Tune-A-Video's next-step rule; a
    v-model's output converted by `inversion_epsilon`).

    Returns the ordinary trajectory (steps + 1, *x0.shape), noisiest first: [y_T, ..., y_0 = x0], so that
    entry i is where sampling step i starts; kept in `out` when given. Clean latents carry no shift."""
    timesteps = scheduler.timesteps.tolist()
    trajectory = out if out is not None else x0.new_empty(len(timesteps) + 1, *x0.shape)
    y = trajectory[len(timesteps)] = x0
    v_model = scheduler.config.prediction_type == "v_prediction"
    stepper = _epsilon_twin(scheduler) if v_model else scheduler
    for i, t in enumerate(timesteps):
        alpha_cur, alpha_next = inversion_alphas(scheduler, t)
        output = model(shift.shifted(y, alpha_cur, context), t)
        eps = inversion_epsilon(output, y, alpha_cur, alpha_next) if v_model else output
        y = stepper.step(eps, t, y).prev_sample
        trajectory[len(timesteps) - 1 - i] = y
        if callback:
            callback(i + 1, len(timesteps))
    return trajectory


def reconstruction_landings(
    model: Model,
    trajectory: Steps,
    scheduler: DDIMScheduler,
    context_of: Callable[[torch.Tensor], torch.Tensor] | None,
    x0_init: torch.Tensor,
    shift: ShiftSchedule,
    start: int = 0,
    callback: Callback | None = None,
    out: Steps | None = None,
) -> Steps:
    """Direct inversion (Ju et al. 2023): for each sampling step from `start`, where one step of `model` from a point
    of the source's trajectory lands (kept in `out` when given). Sampling with `model` (context as in `sample`) and
    `corrected` after each step reproduces the trajectory exactly, whatever the guidance; an edit gets the same
    corrections."""
    first = trajectory[start]
    landings = out if out is not None else first.new_empty(len(trajectory) - 1 - start, *first.shape)

    def back_on_trajectory(step: int, y: torch.Tensor) -> torch.Tensor:
        landings[step - start] = y
        return trajectory[step + 1]

    sample(model, first, scheduler, context_of, x0_init, shift, start=start, guide=back_on_trajectory,
           callback=callback)  # fmt: skip
    return landings


def corrected(y: torch.Tensor, landing: torch.Tensor, on_trajectory: torch.Tensor) -> torch.Tensor:
    """Direct inversion's correction of a step that reached y, where the source's own step reached `landing` instead
    of `on_trajectory`: written so that it gives exactly `on_trajectory` when y is the source's landing (as
    `y + (on_trajectory - landing)` would not, and in half precision a rounding off the trajectory changes the
    next step the model takes)."""
    return on_trajectory + (y - landing)


def sample(
    model: Model,
    y: torch.Tensor,
    scheduler: DDIMScheduler,
    context_of: Callable[[torch.Tensor], torch.Tensor] | None,
    x0_init: torch.Tensor,
    shift: ShiftSchedule,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    start: int = 0,
    guide: Guide | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Contextual DDIM sampling from the ordinary latent y at step `start` (0: the noisiest) to clean latents.
    The model sees x = y + k_t r̂, with r̂ from x0_init first, then from each step's x0_hat; `guide` may move y
    after each step (corrections, blending)."""
    use_context = context_of is not None and shift.active
    context = context_of(x0_init) if use_context else None
    timesteps = scheduler.timesteps.tolist()[start:]
    for i, t in enumerate(timesteps):
        x = shift.shifted(y, sampling_alphas(scheduler, t)[0], context)
        out = scheduler.step(model(x, t), t, y, eta=eta, generator=generator)
        y = guide(start + i, out.prev_sample) if guide else out.prev_sample
        if callback:
            callback(i + 1, len(timesteps))
        if use_context and i + 1 < len(timesteps):
            context = context_of(out.pred_original_sample)
    return y
