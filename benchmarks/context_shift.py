"""How far ContextDiff's context actually moves the trajectories, after tuning on held-out shapes clips.

    python benchmarks/context_shift.py [--clips 4] [--tune-steps 150] [--pretrained MODEL ...]

Per clip: tune ContextDiff as edit_quality.py does, from a fresh adapter and from each pre-trained one (the
adapter/ of each MODEL), then report, as RMS over all latent entries, the context r = R(x0, c) for the source
caption (relative to the latents' own RMS), the largest shift k(ā_t) r over t relative to the noise term
√(1-ā_t) ε at that t, and how much r changes when the caption is the colour-edit target: the only part of the
shift that can steer an edit.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from edit_quality import HELD_OUT_SEED, Method, context_methods, edits_for, method_model

from ctxedit.models.sd import load_sd
from ctxedit.toy.demo import toy_model
from ctxedit.toy.world import random_clip


def rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt())


@torch.no_grad()
def shift_sizes(sd, method: Method, clip, target: str, tune_steps: int) -> tuple[float, float, float]:
    if method.model is not None:
        sd = load_sd(str(method.model), sd.device, torch.float32)
    x0 = sd.encode_frames(clip.render()[0])
    text, target_text = sd.encode_text([clip.caption]), sd.encode_text([target])
    with torch.enable_grad():
        _, _, adapter, shift = method_model(sd, method, x0, text, 0, tune_steps)
    r = adapter(x0, text)
    alphas = sd.scheduler.alphas_cumprod
    peak = max(float(shift(a)) * rms(r) / float((1 - a).sqrt()) for a in alphas[::10])
    return rms(r) / rms(x0), peak, rms(adapter(x0, target_text) - r) / rms(x0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--tune-steps", type=int, default=150)
    parser.add_argument("--pretrained", type=Path, nargs="*", default=[], metavar="MODEL", help="models with adapter/")
    args = parser.parse_args()
    methods = [m for m in context_methods(args.pretrained) if m.context != "off"]
    sd = load_sd(str(toy_model()), torch.device("cpu"), torch.float32)
    rng = np.random.default_rng(HELD_OUT_SEED)  # the first clips of the edit-quality benchmark
    print("| clip | adapter | RMS r / RMS x0 | max_t k r / noise | RMS (r_target - r_source) / RMS x0 |")
    print("|---|---|---|---|---|")
    for i in range(args.clips):
        clip = random_clip(rng, frames=8, objects=1 + i % 2)
        target = edits_for(clip, rng)[0][2].caption  # the colour edit
        for method in methods:
            sizes = shift_sizes(sd, method, clip, target, args.tune_steps)
            adapter = method.adapter.parent.name if method.adapter else "fresh"
            print(f"| {clip.caption} | {adapter} | " + " | ".join(f"{s:.4f}" for s in sizes) + " |", flush=True)


if __name__ == "__main__":
    main()
