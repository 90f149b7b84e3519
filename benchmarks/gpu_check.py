"""GPU readiness: every CUDA path that no CPU test reaches, on SD 1.5's architecture with random weights.

    python benchmarks/gpu_check.py [--frames 8] [--size 512] [--tune-steps 20] [--steps 50]

For fp16 (with GradScaler) and bf16: tuning with gradient checkpointing (xformers when installed), inversion,
the source pass and one edit with the default structure settings, decoding. Prints a table of time and peak
GPU memory per stage and checks that every result is finite. Sized to finish in under 10 minutes on one GPU
(not yet run on one: `check` has run on the CPU with the tiny model).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from ctxedit import editing
from ctxedit.attention import store_bytes
from ctxedit.diffusion import ShiftSchedule
from ctxedit.models.synthetic import random_sd15
from ctxedit.models.trained import build, save_trained
from ctxedit.runs import Run
from ctxedit.settings import EditSettings, TuneSettings
from ctxedit.tuned import Tuned
from ctxedit.tuning import tune

SOURCE, TARGET = "a man is skiing", "a robot is skiing on the beach"


class Stage:
    """Times a block and records the peak GPU memory allocated inside it (0 off the GPU)."""

    def __init__(self, rows: list, precision: str, name: str):
        self.rows, self.precision, self.name = rows, precision, name
        self.cuda = torch.cuda.is_available()

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.started = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else 0.0
        self.rows.append((self.precision, self.name, time.perf_counter() - self.started, peak))


def check(sd, precision: str, args, rows: list, stores: list, folder: Path) -> None:
    """Tune, invert, run the source pass, edit and decode with `sd`, timing each stage into `rows`."""
    frames = np.random.default_rng(0).integers(0, 255, (args.frames, args.size, args.size, 3), dtype=np.uint8)
    shift = ShiftSchedule("quadratic")
    with Stage(rows, precision, "encode (VAE + text)"):
        x0, text = sd.encode_frames(frames), sd.encode_text([SOURCE])
    model, adapter = build(sd, shift.active, seed=0)
    sd.unet.enable_gradient_checkpointing()
    settings = TuneSettings(prompt=SOURCE, steps=args.tune_steps, checkpoint_every=10**9)
    with Stage(rows, f"{precision}, xformers {model.layout.xformers}", f"tuning, {args.tune_steps} steps"):
        log = tune(model, adapter, x0, text, sd, settings, folder / f"{precision}.pt")
    assert log.stopped_early is None and all(np.isfinite(log.losses)), f"tuning diverged: {log.losses}"
    run = Run(folder / precision)
    save_trained(run.tuned_path, model, adapter)
    tuned = Tuned(run, {"settings": {"seed": 0, "prompt": SOURCE}}, sd, model, adapter, shift, x0, text)
    edit = EditSettings(steps=args.steps)
    with Stage(rows, precision, f"inversion, {args.steps} steps"):
        editing.invert_source(tuned, edit)
    with Stage(rows, precision, "source pass (record, corrections, word maps)"):
        source = editing.source_pass(tuned, edit)
    stores.append((precision, store_bytes(source.store) / 2**20))
    with Stage(rows, precision, "edit, default structure settings"):
        latents = editing.edit_latents(tuned, source, TARGET, edit)
    with Stage(rows, precision, "decode"):
        sd.decode_latents(latents)
    assert torch.isfinite(latents).all(), "the edit is not finite"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--tune-steps", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this check exercises the GPU paths only")
    rows: list[tuple[str, str, float, float]] = []
    stores: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as folder:
        for precision, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            check(random_sd15(torch.device("cuda"), dtype), precision, args, rows, stores, Path(folder))
            torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}, SD 1.5 architecture, {args.frames} frames at {args.size}x{args.size}\n")
    print("| precision | stage | seconds | peak GPU memory |")
    print("|---|---|---:|---:|")
    for precision, name, seconds, peak in rows:
        print(f"| {precision} | {name} | {seconds:.1f} | {peak:.1f} GiB |")
    for precision, mib in stores:
        print(f"\n{precision}: the source pass keeps {mib:.0f} MiB of features and maps for the edits")


if __name__ == "__main__":
    main()
