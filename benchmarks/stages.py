"""Time and peak memory of each ctxedit stage, beside the naive variant that re-encodes every tuning step.

    python benchmarks/stages.py [--frames 8] [--repeats 5]

Prints a markdown table per setup: the tiny random model on the CPU (always), and SD 1.5's architecture
with random weights on CUDA (when a GPU is present). Random weights time exactly like real ones.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from ctxedit import diffusion
from ctxedit.attention import Session, source_plan, step_plan
from ctxedit.diffusion import ShiftSchedule
from ctxedit.models.sd import StableDiffusion, load_sd
from ctxedit.models.synthetic import random_sd15, write_tiny_sd
from ctxedit.models.trained import build
from ctxedit.settings import EditSettings
from ctxedit.tuning import training_loss

PROMPT = "a man is skiing"


class PeakMemory:
    """Peak GPU memory allocated, or peak resident memory of this process on the CPU (sampled every 2 ms)."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self.running = device, 0, False

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak, self.running = self._rss(), True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()


def measure(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, float]:
    """(seconds per call, peak MiB) after one warm-up call."""
    fn()
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / repeats
    return seconds, memory.peak / 2**20


def stages(sd: StableDiffusion, frames: np.ndarray, repeats: int) -> list[tuple[str, float, float]]:
    shift = ShiftSchedule("quadratic")
    model, adapter = build(sd, True, seed=0)
    if sd.device.type == "cuda":
        sd.unet.enable_gradient_checkpointing()
    params = [*model.trainable_parameters().values(), *adapter.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    generator = torch.Generator(sd.device).manual_seed(0)
    x0, text = sd.encode_frames(frames), sd.encode_text([PROMPT])

    def update(latents: torch.Tensor, states: torch.Tensor) -> None:
        model.train()
        training_loss(model, adapter, latents, states, sd, shift, generator).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()

    def naive_update() -> None:  # Tune-A-Video: VAE and text encoder run again at every step
        update(sd.encode_frames(frames), sd.encode_text([PROMPT]))

    def predict(x: torch.Tensor, t: int, states: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), sd.autocast():
            return model(x.to(sd.dtype), t, states.to(sd.dtype)).float()

    ddim = DDIMScheduler.from_config(sd.scheduler.config)
    ddim.set_timesteps(50)
    inverse = DDIMInverseScheduler.from_config(sd.scheduler.config)
    inverse.set_timesteps(50)
    uncond = sd.encode_text([""])
    t_invert, t_edit = int(inverse.timesteps[10]), int(ddim.timesteps[10])

    def inversion_step() -> None:
        with torch.no_grad():
            x = shift.shifted(x0, diffusion.inversion_alphas(inverse, t_invert)[0], adapter(x0, text))
            inverse.step(predict(x, t_invert, text), t_invert, x0)

    def edit_step() -> None:  # classifier-free guidance: both branches in one batch, one shared context
        with torch.no_grad():
            x = shift.shifted(x0, diffusion.sampling_alphas(ddim, t_edit)[0], adapter(x0, text))
            eps = predict(torch.cat([x, x]), t_edit, torch.cat([uncond, text]))
            ddim.step(eps[:1] + 7.5 * (eps[1:] - eps[:1]), t_edit, x0)

    plan = source_plan(step_plan(EditSettings()), ddim.timesteps.tolist(), sd.unet)
    session = Session(plan, token_map=torch.arange(77, device=sd.device))

    def controlled(recording: bool) -> Callable[[], None]:
        """An editing step of the source pass (recording) or of an edit (injecting), default structure settings."""

        def step() -> None:
            session.recording = recording
            with model.control.applying(session):
                edit_step()

        return step

    controlled(True)()  # something to inject
    rows = [
        ("encode (VAE + text, once per run)", lambda: (sd.encode_frames(frames), sd.encode_text([PROMPT]))),
        ("tuning step, cached latents (ctxedit)", lambda: update(x0, text)),
        ("tuning step, re-encoding (naive)", naive_update),
        ("inversion step", inversion_step),
        ("editing step (CFG 7.5)", edit_step),
        ("source pass step, recording (default structure settings)", controlled(True)),
        ("editing step, injecting (default structure settings)", controlled(False)),
        ("decode (all frames, one at a time)", lambda: sd.decode_latents(x0)),
    ]
    return [(name, *measure(fn, repeats, sd.device)) for name, fn in rows]


def report(title: str, rows: list[tuple[str, float, float]], tuning_steps: int = 300) -> None:
    print(f"\n### {title}\n")
    print("| stage | time per call | peak memory |")
    print("|---|---:|---:|")
    for name, seconds, mib in rows:
        print(f"| {name} | {seconds * 1000:.1f} ms | {mib:.0f} MiB |")
    timing = {name: seconds for name, seconds, _ in rows}
    encode, cached, naive = (timing[name] for name, *_ in rows[:3])
    ours, theirs = encode + tuning_steps * cached, tuning_steps * naive
    print(f"\n{tuning_steps} tuning steps: {ours:.1f} s cached vs {theirs:.1f} s naive, {theirs / ours:.2f}x faster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    with tempfile.TemporaryDirectory() as folder:
        sd = load_sd(str(write_tiny_sd(Path(folder) / "tiny")), torch.device("cpu"), torch.float32)
    frames = rng.integers(0, 255, (args.frames, 32, 32, 3), dtype=np.uint8)  # 16x16 latents
    threads = torch.get_num_threads()
    report(f"tiny model, CPU ({threads} threads), {args.frames} frames at 32x32", stages(sd, frames, args.repeats))

    if torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.float16
        sd = random_sd15(device, dtype)
        frames = rng.integers(0, 255, (args.frames, 512, 512, 3), dtype=np.uint8)
        name = torch.cuda.get_device_name()
        report(f"SD 1.5 architecture, {name}, fp16, {args.frames} frames at 512x512", stages(sd, frames, args.repeats))


if __name__ == "__main__":
    main()
