"""Train the shapes-world Stable Diffusion model from scratch: `python -m ctxedit.toy.train [--out samples/toy-sd]`.

A real diffusers SD-format model (AutoencoderKL, CLIPTextModel + CLIPTokenizer, UNet2DConditionModel,
SD 1.x DDIM schedule) learns text-to-image on still frames of the shapes world, like SD on photos; video
comes from ctxedit's inflation and tuning. Seeded, resumable (--work keeps checkpoints: a stopped run
continues where it was). With the defaults the VAE takes ~40 minutes on 2 CPU cores and the UNet stages
~2-2.3 hours there, or ~5 minutes on one GPU with --device cuda (batches and noise come from a CPU generator,
so both see the same data). Stages:
1. VAE (reconstruction on 32x32 crops, then the decoder alone on whole frames; --vae reuses one), 2. frames ->
latents once, 3. text encoder + UNet (noise prediction with Min-SNR weighting, 10% empty captions for
classifier-free guidance, EMA weights), 4. a shorter refine cycle from those weights on more two-object frames,
5. save in fp16, 6. evaluate. samples/toy-sd/training.json records how the bundled model was made.
Separately, `--vae MODEL --context` pre-trains a context adapter for a finished model on its training frames
(ContextDiff's text-to-image stage, the UNet and text encoder frozen; with `--joint` trained with it, the paper's
recipe) and saves it in MODEL/adapter, where `ctxedit tune` finds it; MODEL/adapter/training.json records it.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ctxedit.diffusion import ShiftSchedule
from ctxedit.files import atomic_folder, write_json
from ctxedit.models import adapter as adapters
from ctxedit.models.adapter import AdapterConfig, ContextAdapter
from ctxedit.models.synthetic import SD_SCHEDULER
from ctxedit.toy.world import BACKGROUNDS, COLOURS, MOTIONS, SHAPES, random_clip

WORDS = sorted({*COLOURS, *BACKGROUNDS, *SHAPES, *MOTIONS, "a", "and", "on", "background", "moving", "standing"})


@dataclass
class TrainConfig:
    seed: int = 0
    vae_cycles: tuple[int, ...] = (1500, 1000)  # cosine cycles (warm restart at half the lr); ~0.3 s a step
    vae_batch: int = 32
    vae_crop: int = 32  # the VAE is convolutional: 32x32 crops train it at a quarter of the cost
    vae_frames: int = 4000  # rendered once, cropped at random
    vae_lr: float = 2e-3
    decoder_steps: int = 3000  # then the decoder alone on whole frames (see train_decoder); ~0.45 s a step
    decoder_batch: int = 16
    decoder_lr: float = 1e-3
    images: int = 12000  # still frames encoded once for the UNet stage (~13 views of each)
    unet_steps: int = 7000  # 0.75-0.9 s a step on 2 cores in fp32 (bf16 autocast is 15x slower there), ~0.05 on a GPU
    unet_batch: int = 32
    unet_lr: float = 8e-4
    refine_steps: int = 2000  # then a second, gentler cycle from the EMA weights, on the frames plus fresh ones
    refine_images: int = 12000  # fresh frames for it, two objects in two of three (the hard case: duplicates)
    refine_lr: float = 3e-4
    snr_gamma: float = 5.0  # Min-SNR loss weighting: noisy timesteps stop dominating the gradient
    ema_decay: float = 0.999  # the saved weights are an exponential moving average of the trained ones
    empty_caption_rate: float = 0.1  # classifier-free guidance needs unconditional samples
    checkpoint_every: int = 200
    context_steps: int = 1500  # pre-training of the context adapter (--context), batch unet_batch
    context_lr: float = 1e-3  # the adapter's, from its zero head (as the shapes world's tuning); the UNet's: refine_lr


def word_tokenizer():
    """A CLIPTokenizer whose BPE merges build each world word into one token (vocab= and merges= directly:
    transformers 5 ignores vocab_file/merges_file)."""
    from transformers import CLIPTokenizer

    tokens, merges = ["<|startoftext|>", "<|endoftext|>"], []
    chars = sorted({c for w in WORDS for c in w})
    tokens += chars + [c + "</w>" for c in chars]
    for word in sorted(WORDS, key=len, reverse=True):  # long words first: their merges must win
        piece = word[0]
        for i, c in enumerate(word[1:], start=1):
            nxt = c + ("</w>" if i == len(word) - 1 else "")
            merges.append((piece, nxt))
            piece += nxt
            tokens.append(piece)
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=77)


def build_models(tokenizer):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
    )  # fmt: skip  # scale factor 4: 64x64 frames -> 16x16x4 latents; 0.7 M parameters, few channels at 64x64
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.convert_tokens_to_ids(
                "<|startoftext|>"), eos_token_id=end, pad_token_id=end,
        )
    )  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(48, 96, 96), layers_per_block=1, cross_attention_dim=128,
        attention_head_dim=8, norm_num_groups=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )  # fmt: skip  # 3.8 M parameters; cross-attention at 8x8 and 4x4 only (16x16 doubles the step time)
    return vae, text_encoder, unet


def random_frames(
    rng: np.random.Generator, count: int, objects: tuple[int, ...] = (1, 2)
) -> tuple[torch.Tensor, list[str]]:
    """Single frames of random clips, in [-1, 1], with their captions; each clip's object count is drawn from
    `objects` (1 or 2 alike by default; (1, 2, 2) gives two objects in two frames of three)."""
    frames, captions = [], []
    for _ in range(count):
        clip = random_clip(rng, frames=8, objects=int(rng.choice(objects)))
        frame = clip.render_frame(int(rng.integers(0, clip.frames)))[0]
        frames.append(frame)
        captions.append(clip.caption)
    pixels = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, captions


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss((a.clamp(-1, 1) + 1) / 2, (b.clamp(-1, 1) + 1) / 2).item()
    return 10 * np.log10(1 / max(mse, 1e-10))


class Checkpoints:
    """Training state in a work folder, so that a stopped training continues where it was."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def load(self, name: str):
        path = self.folder / f"{name}.pt"
        return torch.load(path, weights_only=False, map_location="cpu") if path.exists() else None

    def save(self, name: str, state: dict) -> None:
        tmp = self.folder / f".{name}.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.folder / f"{name}.pt")


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


def _cycles(lengths: tuple[int, ...], step: int) -> float:
    """Cosine cycles, each restarting at half the previous peak."""
    for i, length in enumerate(lengths):
        if step < length:
            return 0.5**i * 0.5 * (1 + np.cos(np.pi * step / length))
        step -= length
    return 0.0


def train_vae(vae, config: TrainConfig, checkpoints: Checkpoints) -> None:
    """The whole VAE on 32x32 crops (a quarter of the cost), then the decoder alone on whole frames."""
    bank = _frame_bank(config, sum(config.vae_cycles) * config.vae_batch)
    _fit_vae(vae, bank, config, checkpoints, name="vae", cycles=config.vae_cycles, batch=config.vae_batch,
             crop=config.vae_crop, lr=config.vae_lr, seed=config.seed)  # fmt: skip
    train_decoder(vae, config, checkpoints, bank)


def train_decoder(vae, config: TrainConfig, checkpoints: Checkpoints, bank: torch.Tensor | None = None) -> None:
    """Fine-tune the decoder on whole frames, the encoder frozen. Trained on crops (one object at a time), the
    mid-block attention mixes the colours of two objects in a whole frame (red beside yellow came back orange).
    The latents do not change, so a UNet trained on them stays valid."""
    if bank is None:
        bank = _frame_bank(config, config.decoder_steps * config.decoder_batch)
    _fit_vae(vae, bank, config, checkpoints, name="decoder", cycles=(config.decoder_steps,),
             batch=config.decoder_batch, crop=bank.shape[-1], lr=config.decoder_lr, seed=config.seed + 4,
             decoder_only=True)  # fmt: skip


def _frame_bank(config: TrainConfig, seen: int) -> torch.Tensor:
    """The VAE stages' frames, rendered once: config.vae_frames, or fewer if training sees fewer (`seen`)."""
    return random_frames(np.random.default_rng(config.seed + 3), min(config.vae_frames, seen))[0]


def _fit_vae(
    vae, bank: torch.Tensor, config: TrainConfig, checkpoints: Checkpoints, *, name: str, cycles: tuple[int, ...],
    batch: int, crop: int, lr: float, seed: int, decoder_only: bool = False,
) -> None:  # fmt: skip
    """Reconstruction training on random crops of `bank` frames, in cosine cycles; resumable."""
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()] if decoder_only else [*vae.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng, step = np.random.default_rng(seed), 0
    state = checkpoints.load(name)
    if state:
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state, step = state["rng"], state["step"]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(_cycles, cycles), last_epoch=step - 1)
    vae.train().requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    while step < sum(cycles):
        index = rng.integers(0, len(bank), batch)
        top, left = rng.integers(0, bank.shape[-1] - crop + 1, (2, batch))
        pixels = torch.stack([bank[i, :, y : y + crop, x : x + crop] for i, y, x in zip(index, top, left, strict=True)])
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.mode()).sample  # ctxedit encodes with the mean: train the decoder on it
        loss = F.l1_loss(recon, pixels) + F.mse_loss(recon, pixels)
        if not decoder_only:
            loss = loss + 1e-6 * posterior.kl().mean() / pixels[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        if step % 50 == 0:
            log(f"{name} step {step}/{sum(cycles)} loss {loss.item():.4f} psnr {psnr(recon, pixels):.1f} dB")
        if step % config.checkpoint_every == 0 or step == sum(cycles):
            state = {"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng.bit_generator.state}
            checkpoints.save(name, state | {"step": step})
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_frames(
    vae, checkpoints: Checkpoints, name: str, count: int, seed: int, objects: tuple[int, ...] = (1, 2)
) -> tuple[torch.Tensor, list[str]]:
    """(latents, captions) of `count` random frames, each through the VAE once; kept in the work folder."""
    state = checkpoints.load(name)
    if state:
        return state["latents"], state["captions"]
    rng = np.random.default_rng(seed)
    latents, captions = [], []
    for start in range(0, count, 256):
        pixels, batch_captions = random_frames(rng, min(256, count - start), objects)
        latents.append(vae.encode(pixels.to(vae.device)).latent_dist.mean.cpu())
        captions += batch_captions
    latents = torch.cat(latents)
    checkpoints.save(name, {"latents": latents, "captions": captions})
    log(f"encoded {len(captions)} frames ({name})")
    return latents, captions


def train_unet(
    unet, text_encoder, tokenizer, latents, captions, scale, config, checkpoints, device, *, name: str, steps: int,
    lr: float, seed: int, adapter: ContextAdapter | None = None, trained: tuple[str, ...] = ("unet", "text_encoder"),
    adapter_lr: float = 0.0,
) -> None:  # fmt: skip
    """One cosine cycle of `steps` from the current weights of the `trained` parts ("unet", "text_encoder",
    "adapter"), which end as their EMA; the others stay frozen. With an adapter, on ContextDiff's contextual
    forward marginal x_t = √ā x0 + k_t R(x0, c) + √(1-ā) ε (quadratic k, as `tune`), the adapter at `adapter_lr`."""
    from diffusers import DDPMScheduler

    parts = {"unet": unet, "text_encoder": text_encoder} | ({"adapter": adapter} if adapter is not None else {})
    for part, module in parts.items():
        module.to(device).train(part in trained).requires_grad_(part in trained)
    lrs = {"unet": lr, "text_encoder": lr, "adapter": adapter_lr}
    groups = [{"params": [*parts[part].parameters()], "lr": lrs[part]} for part in trained]
    params = [p for group in groups for p in group["params"]]

    noise_scheduler = DDPMScheduler(**{k: v for k, v in SD_SCHEDULER.items() if k != "set_alpha_to_one"})
    shift = ShiftSchedule()
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    generator, step = torch.Generator().manual_seed(seed), 0
    state = checkpoints.load(name)
    if state:
        for part in trained:
            parts[part].load_state_dict(state[part])
        optimizer.load_state_dict(state["optimizer"])
        ema = [e.to(device) for e in state["ema"]]
        generator.set_state(state["generator"])
        step = state["step"]
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    warmup = 100
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps))),
        last_epoch=step - 1,
    )
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids.to(device)
    ids, latents = ids.to(device), latents.to(device)
    started = time.perf_counter()
    while step < steps:
        index = torch.randint(0, len(latents), (config.unet_batch,), generator=generator).to(device)
        x0 = latents[index] * scale
        batch_ids = ids[index].clone()
        drop = (torch.rand(config.unet_batch, generator=generator) < config.empty_caption_rate).to(device)
        batch_ids[drop] = empty
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.randint(0, 1000, (config.unet_batch,), generator=generator).to(device)
        text = text_encoder(batch_ids)[0]
        x_t = noise_scheduler.add_noise(x0, noise, t)
        if adapter is not None:  # each image a one-frame clip for the adapter
            x_t = x_t + shift(alphas_cumprod[t]).to(device)[:, None, None, None] * adapter(x0[:, None], text)[:, 0]
        pred = unet(x_t, t, text).sample
        snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
        weight = snr.clamp(max=config.snr_gamma) / snr
        loss = (weight * F.mse_loss(pred.float(), noise, reduction="none").mean((1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - config.ema_decay)
        step += 1
        if step % 25 == 0:
            per_step = (time.perf_counter() - started) / 25
            started = time.perf_counter()
            log(f"{name} step {step}/{steps} loss {loss.item():.4f} ({per_step:.2f} s/step)")
        if step % config.checkpoint_every == 0 or step == steps:
            state = {part: parts[part].state_dict() for part in trained}
            state |= {"optimizer": optimizer.state_dict(), "ema": ema, "generator": generator.get_state()}
            checkpoints.save(name, state | {"step": step})
    with torch.no_grad():
        torch._foreach_copy_([p.data for p in params], ema)
    for module in parts.values():
        module.cpu().eval().requires_grad_(False)


def save(out: Path, vae, text_encoder, tokenizer, unet, scale: float) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    vae.register_to_config(scaling_factor=scale)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    with atomic_folder(out) as tmp:
        pipeline.to(torch.float16).save_pretrained(tmp)


def save_part(folder: Path, model) -> None:
    """Replace one part of a saved model (its vae, unet or text_encoder folder) in fp16."""
    with atomic_folder(folder) as tmp:
        model.to(torch.float16).save_pretrained(tmp)


@torch.no_grad()
def evaluate(
    folder: Path,
    count: int = 384,
    guidance: float = 4.0,
    steps: int = 25,
    seed: int = 777,
    device: str = "cpu",
    context: bool = True,
) -> dict:
    """Text-to-image accuracy on fresh captions: the share of images whose detected objects (colour and
    shape, counted: a duplicate or a third object is wrong) are exactly those of the caption, for one- and
    two-object captions. With `context` and a pre-trained adapter in the folder, sampling is contextual
    (R(x0_hat, c) from each step's x0 estimate, zeros before the first)."""
    from diffusers import DDIMScheduler

    from ctxedit import diffusion
    from ctxedit.models.sd import load_sd
    from ctxedit.toy.detect import shows

    sd = load_sd(str(folder), torch.device(device), torch.float32)
    rng = np.random.default_rng(seed)
    clips = [random_clip(rng, frames=1, objects=1 + i % 2) for i in range(count)]
    text, empty = sd.encode_text([c.caption for c in clips]), sd.encode_text([""]).expand(count, -1, -1)

    def guided(x: torch.Tensor, t: int) -> torch.Tensor:
        eps_empty, eps_text = sd.unet(torch.cat([x, x]), t, torch.cat([empty, text])).sample.chunk(2)
        return eps_empty + guidance * (eps_text - eps_empty)

    adapter, shift = (pretrained_adapter(folder, sd.device) if context else None) or (None, ShiftSchedule("off"))
    context_of = (lambda x0: adapter(x0[:, None], text)[:, 0]) if adapter is not None else None
    scheduler = DDIMScheduler.from_config(sd.scheduler.config)
    scheduler.set_timesteps(steps)
    noise = torch.randn(count, 4, 16, 16, generator=torch.Generator().manual_seed(seed)).to(sd.device)
    latents = diffusion.sample(guided, noise, scheduler, context_of, torch.zeros_like(noise), shift)
    images = sd.decode_latents(latents[None])
    right = [shows(image, clip) for image, clip in zip(images, clips, strict=True)]
    return {
        "one_object": float(np.mean(right[0::2])),
        "two_objects": float(np.mean(right[1::2])),
        "captions": count,
        "guidance": guidance,
        "context": adapter is not None,
    }


def pretrained_adapter(folder: Path, device: torch.device) -> tuple[ContextAdapter, ShiftSchedule] | None:
    """The model folder's pre-trained context adapter and the shift it was trained with, or None."""
    found = adapters.find_pretrained("auto", folder)
    if found is None:
        return None
    config = json.loads((found / "config.json").read_text())
    adapter = ContextAdapter(AdapterConfig(**{k: config[k] for k in asdict(AdapterConfig())})).to(device)
    adapters.load_pretrained(adapter, found)
    return adapter, ShiftSchedule(**config["shift"])


def train_context(vae, config: TrainConfig, checkpoints: Checkpoints, model: Path, device, joint: bool) -> dict:
    """ContextDiff's text-to-image stage: a fresh adapter (zero head) trained on the model's training frames
    with the contextual forward process, the UNet and text encoder frozen, or trained with it (`joint`, the
    paper's recipe). Saved into the model folder (adapter/, and with `joint` its unet/ and text_encoder/ too);
    returns how it was trained."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=torch.float32)
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    torch.manual_seed(config.seed + 7)
    adapter = ContextAdapter(
        AdapterConfig(text_dim=text_encoder.config.hidden_size, latent_channels=unet.config.in_channels)
    )
    latents, captions = encode_frames(vae.to(device), checkpoints, "dataset", config.images, config.seed + 1)
    fresh, fresh_captions = encode_frames(
        vae, checkpoints, "refine-dataset", config.refine_images, config.seed + 5, objects=(1, 2, 2)
    )
    trained = ("unet", "text_encoder", "adapter") if joint else ("adapter",)
    began = time.perf_counter()
    train_unet(unet, text_encoder, tokenizer, torch.cat([latents, fresh]), captions + fresh_captions,
               vae.config.scaling_factor, config, checkpoints, device, name="context-joint" if joint else "context",
               steps=config.context_steps, lr=config.refine_lr, seed=config.seed + 8, adapter=adapter,
               trained=trained, adapter_lr=config.context_lr)  # fmt: skip
    minutes = (time.perf_counter() - began) / 60
    record = {
        "shift": asdict(ShiftSchedule()),
        "trained": list(trained),
        "steps": config.context_steps,
        "batch": config.unet_batch,
        "adapter_lr": config.context_lr,
        "unet_lr": config.refine_lr if joint else None,
        "frames": len(captions) + len(fresh_captions),
        "minutes_this_session": round(minutes, 1),
        "device": str(device),
    }
    if joint:
        save_part(model / "unet", unet)
        save_part(model / "text_encoder", text_encoder)
    adapters.save_pretrained(model / adapters.FOLDER, adapter, record["shift"])
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("samples/toy-sd"))
    parser.add_argument("--work", type=Path, default=Path("runs/toy-training"), help="checkpoints; rerun to resume")
    parser.add_argument("--vae-steps", type=int, help="one cosine cycle of this many VAE steps (default: the cycles)")
    parser.add_argument("--unet-steps", type=int, default=TrainConfig.unet_steps)
    parser.add_argument("--images", type=int, default=TrainConfig.images)
    parser.add_argument("--refine-steps", type=int, default=TrainConfig.refine_steps)
    parser.add_argument("--refine-images", type=int, default=TrainConfig.refine_images)
    parser.add_argument("--vae", type=Path, help="reuse the VAE of this SD-format model instead of training one")
    parser.add_argument("--decoder-steps", type=int, default=TrainConfig.decoder_steps)
    only = parser.add_mutually_exclusive_group()
    only.add_argument(
        "--decoder-only", action="store_true", help="fine-tune the decoder of the --vae model on whole frames and save "
        "it back into that model (its latents, hence its UNet, stay valid)"
    )  # fmt: skip
    only.add_argument(
        "--refine-only", action="store_true", help="run the refine cycle on the UNet and text encoder of the --vae "
        "model and save them back into that model"
    )  # fmt: skip
    only.add_argument(
        "--context", action="store_true", help="pre-train a context adapter for the --vae model on its training "
        "frames (ContextDiff's text-to-image stage) and save it in MODEL/adapter; its UNet and text encoder stay "
        "frozen unless --joint"
    )  # fmt: skip
    parser.add_argument(
        "--joint", action="store_true", help="with --context: train the UNet and text encoder with the adapter and "
        "save them back into the model too (the paper's recipe; run it on a copy of the model)"
    )  # fmt: skip
    parser.add_argument("--context-steps", type=int, default=TrainConfig.context_steps)
    parser.add_argument("--device", default="cpu", help="where the UNet stages and the evaluation run (cpu, cuda)")
    parser.add_argument("--eval-captions", type=int, default=384, help="held-out captions the evaluation draws")
    args = parser.parse_args(argv)
    if (args.decoder_only or args.refine_only or args.context) and not args.vae:
        parser.error("--decoder-only, --refine-only and --context need --vae MODEL")
    if args.joint and not args.context:
        parser.error("--joint goes with --context")
    if args.refine_only and args.refine_steps < 1:
        parser.error("--refine-only needs --refine-steps of at least 1")
    cycles = {"vae_cycles": (args.vae_steps,)} if args.vae_steps else {}
    config = TrainConfig(
        unet_steps=args.unet_steps, images=args.images, decoder_steps=args.decoder_steps,
        refine_steps=args.refine_steps, refine_images=args.refine_images, context_steps=args.context_steps, **cycles,
    )  # fmt: skip

    from ctxedit.models.sd import quiet_hf_libraries

    quiet_hf_libraries()
    torch.manual_seed(config.seed)
    tokenizer = word_tokenizer()
    vae, text_encoder, unet = build_models(tokenizer)
    checkpoints = Checkpoints(args.work)
    began = time.perf_counter()
    if args.vae:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae, subfolder="vae", torch_dtype=torch.float32).requires_grad_(False)
        if args.decoder_only:
            train_decoder(vae, config, checkpoints)
    else:
        train_vae(vae, config, checkpoints)
    pixels, _ = random_frames(np.random.default_rng(12345), 64)
    with torch.no_grad():
        log(f"vae held-out psnr {psnr(vae.decode(vae.encode(pixels).latent_dist.mean).sample, pixels):.2f} dB")
    if args.decoder_only:
        save_part(args.vae / "vae", vae)
        log(f"saved the fine-tuned decoder in {args.vae / 'vae'}")
        return
    device = torch.device(args.device)
    if args.context:
        record = train_context(vae, config, checkpoints, args.vae, device, args.joint)
        record["accuracy"] = {
            name: evaluate(args.vae, count=args.eval_captions, device=args.device, context=context)
            for name, context in (("with_context", True), ("without_context", False))
        }
        write_json(args.vae / adapters.FOLDER / "training.json", record)
        log(f"saved the context adapter in {args.vae / adapters.FOLDER}: {record}")
        return
    latents, captions = encode_frames(vae.to(device), checkpoints, "dataset", config.images, config.seed + 1)
    if args.refine_only:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet = UNet2DConditionModel.from_pretrained(args.vae, subfolder="unet", torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(args.vae, subfolder="text_encoder", torch_dtype=torch.float32)
        scale = vae.config.scaling_factor
    else:
        scale = float(1 / latents.std())  # as SD: unit variance latents for the diffusion model
        log(f"latent scaling factor {scale:.4f}")
        train_unet(unet, text_encoder, tokenizer, latents, captions, scale, config, checkpoints, device, name="unet",
                   steps=config.unet_steps, lr=config.unet_lr, seed=config.seed + 2)  # fmt: skip
    if config.refine_steps:
        fresh, fresh_captions = encode_frames(
            vae, checkpoints, "refine-dataset", config.refine_images, config.seed + 5, objects=(1, 2, 2)
        )
        train_unet(unet, text_encoder, tokenizer, torch.cat([latents, fresh]), captions + fresh_captions, scale,
                   config, checkpoints, device, name="refine", steps=config.refine_steps, lr=config.refine_lr,
                   seed=config.seed + 6)  # fmt: skip
    if args.refine_only:
        out = args.vae
        save_part(out / "unet", unet)
        save_part(out / "text_encoder", text_encoder)
    else:
        out = args.out
        save(out, vae, text_encoder, tokenizer, unet, scale)
    minutes = (time.perf_counter() - began) / 60
    log(f"saved {out} after {minutes:.1f} min")
    accuracy = evaluate(out, count=args.eval_captions, device=args.device)
    log(f"text-to-image accuracy on held-out captions: {accuracy}")
    if not args.refine_only:
        report = {"config": asdict(config), "minutes_this_session": minutes, "accuracy": accuracy}
        write_json(out / "training.json", report)


if __name__ == "__main__":
    main()
