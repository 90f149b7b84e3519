"""What an unfused LoRA costs: one UNet step of SD 1.5's architecture (random weights) without a LoRA, with one
unfused (peft layers beside each adapted layer, as ctxedit runs them) and with it fused into the weights.

    python benchmarks/lora.py                     # CPU, 1 frame at 256x256 (32x32 latents), rank 32
    python benchmarks/lora.py --device cuda --frames 8 --latent 64 --dtype bf16

The LoRA adapts what kohya's trainer adapts in an SD 1.x UNet: every attention projection, proj_in/proj_out and
the feed-forward layers. Times are the median of --repeats steps after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ctxedit.models.synthetic import SD15_UNET

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def step_seconds(unet, latents, text, repeats: int) -> float:
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            if latents.device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            unet(latents, 500, text)
            if latents.device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("--latent", type=int, default=32, help="latent side (pixels / 8)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtype = dtype[args.dtype]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).to(device, dtype).eval()
    latents = torch.randn(args.frames, 4, args.latent, args.latent, device=device, dtype=dtype)
    text = torch.randn(args.frames, 77, 768, device=device, dtype=dtype)
    rows = [("no LoRA", step_seconds(unet, latents, text, args.repeats))]
    config = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS, init_lora_weights=False)
    inject_adapter_in_model(config, unet)
    unet.to(device, dtype)
    rows.append((f"LoRA rank {args.rank}, unfused (ctxedit)", step_seconds(unet, latents, text, args.repeats)))
    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    rows.append((f"LoRA rank {args.rank}, fused", step_seconds(unet, latents, text, args.repeats)))
    print(f"SD 1.5 UNet, {args.frames} frame(s) at {args.latent}x{args.latent} latents, {args.dtype}, {args.device}")
    print("| | s per step | vs no LoRA |\n|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {seconds / rows[0][1]:.2f}x |")


if __name__ == "__main__":
    main()
