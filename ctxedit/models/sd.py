"""Stable Diffusion 1.x / 2.x components: find and load them (hub id, folder or single file, with LoRAs and
embeddings), encode text, encode and decode frames."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ctxedit.errors import ModelError, UsageError, first_line
from ctxedit.files import require_file, verified_sha256
from ctxedit.models import adapter as adapters
from ctxedit.models import formats
from ctxedit.models.embeddings import add_embeddings
from ctxedit.models.lora import add_loras
from ctxedit.models.spec import ModelSource, ModelSpec
from ctxedit.prompts import expanded

COMPONENTS = {  # subfolder -> file that proves it is there
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": "tokenizer_config.json",
    "scheduler": "scheduler_config.json",
}
DEVICES = ("auto", "cuda", "cpu")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def resolve_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise UsageError(f"unknown --device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """Compute dtype; trained parameters and the adapter stay fp32 whatever this is."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown --precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _pipeline_class(folder: Path, name: str) -> None:
    """Refuse, before any weight is read, a diffusers model that is not an SD 1.x / 2.x text-to-image one."""
    index = json.loads((folder / "model_index.json").read_text())
    kind = index.get("_class_name", "")
    unet = folder / "unet" / "config.json"
    channels = json.loads(unet.read_text()).get("in_channels", 4) if unet.exists() else 4
    if kind not in formats.PIPELINES or channels != 4:
        raise formats.refuse(formats.pipeline_name(kind, channels), name)


def _check_folder(folder: Path, name: str) -> None:
    if (folder / "model_index.json").exists():
        _pipeline_class(folder, name)
    missing = [f"{sub}/{proof}" for sub, proof in COMPONENTS.items() if not (folder / sub / proof).exists()]
    if not (folder / "model_index.json").exists():
        missing.insert(0, "model_index.json")
    if missing:
        raise ModelError(
            f"{name} is not a diffusers Stable Diffusion folder: missing {', '.join(missing)} "
            "(expected model_index.json and unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )


def hub_snapshot(model_id: str, patterns: list[str], what: str = "a local diffusers Stable Diffusion folder") -> Path:
    """The local snapshot of a hub repository's files matching `patterns`; respects HF_HUB_OFFLINE."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, allow_patterns=patterns))
    except Exception as error:  # offline, unknown id, gated, network: all mean "not available here"
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        where = (
            "offline mode (HF_HUB_OFFLINE) is on and it is not in the local cache"
            if offline
            else (f"it is not in the local cache and the hub could not provide it ({type(error).__name__})")
        )
        raise ModelError(
            f"cannot load model {model_id!r}: {where}; download it once with `hf download {model_id}` "
            f"or give the path to {what}"
        ) from error


def _download(model_id: str, fp16: bool) -> Path:
    """The local snapshot of a hub model (only the SD component files), after its model_index.json says it is one."""
    _pipeline_class(hub_snapshot(model_id, ["model_index.json", "unet/config.json"]), model_id)
    weights = ["*.fp16.safetensors"] if fp16 else ["diffusion_pytorch_model.safetensors", "model.safetensors"]
    patterns = ["model_index.json"] + [f"{sub}/{f}" for sub in COMPONENTS for f in ["*.json", "*.txt", *weights]]
    patterns += [f"{adapters.FOLDER}/config.json", f"{adapters.FOLDER}/{adapters.WEIGHTS}"]  # a pre-trained adapter
    folder = hub_snapshot(model_id, patterns, "a local diffusers Stable Diffusion folder (--model PATH)")
    if fp16 and not list((folder / "unet").glob("*.safetensors")):
        return _download(model_id, fp16=False)  # the repo has no fp16 variant
    return folder


def find_model(spec: ModelSpec, fp16: bool = False) -> ModelSource:
    """Resolve a hub id, a local folder or a single file to checked local weights (LoRAs and embeddings not yet
    read: their digests are taken when they are)."""
    path = Path(spec.model).expanduser()
    if spec.sha256 is not None:  # a run's single file: missing is not a hub id
        require_file(path, spec.sha256, "the model file")
    if path.is_file():
        config = formats.family(path, spec.config)
        config = config if config in formats.FAMILIES else str(formats.config_folder(config).resolve())
        digest = verified_sha256(path, spec.sha256, "the model file")
        return ModelSource(spec.model, str(path.resolve()), None, digest, config)
    if spec.config is not None:
        raise UsageError("--model-config is for a single-file checkpoint (--model FILE.safetensors)")
    if path.exists():
        _check_folder(path, str(path))
        return ModelSource(spec.model, str(path.resolve()), None)
    if spec.model.startswith((".", "/", "~")) or spec.model.count("/") > 1 or path.suffix in formats.SUFFIXES:
        raise ModelError(f"model {spec.model} does not exist")
    folder = _download(spec.model, fp16)
    _check_folder(folder, spec.model)
    return ModelSource(spec.model, str(folder), folder.name)


@dataclass
class StableDiffusion:
    """The loaded SD 1.x / 2.x components, frozen, on one device at one compute dtype."""

    vae: object
    text_encoder: object
    tokenizer: object
    unet: object
    scheduler: object  # DDIMScheduler, with the model's prediction type
    source: ModelSource
    device: torch.device
    dtype: torch.dtype

    @property
    def components(self) -> dict:
        return {name: getattr(self, name) for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}

    @property
    def prediction(self) -> str:
        """What the UNet predicts: "epsilon" or "v_prediction" (converted in `diffusion`)."""
        return self.scheduler.config.prediction_type

    @property
    def native_size(self) -> int:
        """The short side in pixels the model was trained at: 512 for SD 1.x and 2.x base, 768 for SD 2.x 768-v."""
        return self.unet.config.sample_size * self.vae_scale

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Pixel multiple every frame side must have: VAE and UNet downsampling and the adapter's 4x4 patches."""
        unet_down = 2 ** (len(self.unet.config.block_out_channels) - 1)
        return self.vae_scale * int(np.lcm(unet_down, 4))

    def autocast(self):
        """fp16/bf16 autocast at reduced precision; nothing at fp32."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Token hidden states (b, tokens, dim) in fp32."""
        ids = self.tokenizer(
            [expanded(self.tokenizer, prompt) for prompt in prompts],
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0].float()

    @torch.no_grad()
    def encode_frames(self, frames: np.ndarray, callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """uint8 frames (f, h, w, 3) -> scaled latents (1, f, c, h/s, w/s) in fp32, one frame at a time."""
        latents = []
        for i, frame in enumerate(frames):
            pixels = torch.from_numpy(frame).to(self.device).permute(2, 0, 1)[None]  # (1, 3, h, w)
            pixels = (pixels.to(self.dtype) / 127.5 - 1).contiguous()
            latents.append(self.vae.encode(pixels).latent_dist.mean.float() * self.vae.config.scaling_factor)
            if callback:
                callback(i + 1, len(frames))
        return torch.cat(latents)[None]

    def decode_latents(self, latents: torch.Tensor, callback: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Latents (1, f, c, h, w) -> uint8 frames (f, h*s, w*s, 3), one frame at a time to bound memory."""
        return np.stack(list(self.decoded_frames(latents, callback)))

    def decoded_frames(
        self, latents: torch.Tensor, callback: Callable[[int, int], None] | None = None
    ) -> Iterator[np.ndarray]:
        """Latents (1, f, c, h, w) -> uint8 frames (h*s, w*s, 3), decoded one by one as they are taken."""
        for i, latent in enumerate(latents[0]):
            with torch.no_grad():
                image = self.vae.decode((latent[None] / self.vae.config.scaling_factor).to(self.dtype)).sample
            image = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            yield image[0].permute(1, 2, 0).cpu().numpy()
            if callback:
                callback(i + 1, len(latents[0]))


def quiet_hf_libraries() -> None:
    """diffusers and transformers print warnings and progress bars of their own; ctxedit's library prints nothing."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()


def _variant(folder: Path, fp16: bool) -> str | None:
    return "fp16" if fp16 and any(folder.glob("*.fp16.safetensors")) else None


def _components(source: ModelSource, dtype: torch.dtype, fp16: bool) -> dict:
    """The unet, vae, text_encoder, tokenizer and scheduler, on the CPU, of a folder or a single file."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    if source.config is not None:
        configs = formats.config_folder(source.config)
        parts = formats.load_single_file(Path(source.path), configs, dtype)
    else:
        configs = folder = Path(source.path)
        loaders = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
        parts = {
            name: cls.from_pretrained(folder / name, variant=_variant(folder / name, fp16), torch_dtype=dtype)
            for name, cls in loaders.items()
        }
    parts["tokenizer"] = formats.tokenizer(configs)
    # Clipping x0_hat to [-1, 1] is for pixels; SD latents reach about +-4 (diffusers' SD pipelines turn it off).
    parts["scheduler"] = DDIMScheduler.from_pretrained(configs / "scheduler", clip_sample=False)
    return parts


def _check_scheduler(config, model: str) -> None:
    if config.prediction_type not in ("epsilon", "v_prediction"):
        raise ModelError(f"{model} predicts {config.prediction_type}; ctxedit takes epsilon and v-prediction models")
    if config.timestep_spacing not in ("leading", "trailing") or config.thresholding:
        option = "thresholding true" if config.thresholding else f"timestep_spacing {config.timestep_spacing!r}"
        raise ModelError(
            f"{model}: scheduler {option} cannot be inverted; set timestep_spacing 'leading' (SD 1.x's) and "
            "thresholding false in scheduler/scheduler_config.json"
        )


def load_sd(model: str | ModelSpec, device: torch.device, dtype: torch.dtype) -> StableDiffusion:
    """Load the SD 1.x / 2.x components of a hub id, local folder or single file, with their LoRAs and embeddings,
    frozen, on `device` at `dtype`."""
    quiet_hf_libraries()
    spec = model if isinstance(model, ModelSpec) else ModelSpec(model)
    for what, extra in [("the LoRA", lora) for lora in spec.loras] + [("the embedding", e) for e in spec.embeddings]:
        require_file(Path(extra.path).expanduser(), extra.sha256, what)  # before the model's own long load
    fp16 = dtype == torch.float16 and device.type == "cuda"
    source = find_model(spec, fp16)
    try:
        parts = _components(source, dtype, fp16)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        if source.config is not None:
            raise ModelError(
                f"{spec.model} does not fit the {source.config} architecture ({first_line(error)[:200]}); name its "
                f"own with --model-config ({', '.join(formats.FAMILIES)} or a diffusers folder)"
            ) from error
        raise ModelError(f"cannot load the Stable Diffusion components of {spec.model}: {first_line(error)}") from error
    _check_scheduler(parts["scheduler"].config, spec.model)
    if parts["unet"].config.cross_attention_dim != parts["text_encoder"].config.hidden_size:
        raise ModelError(f"{spec.model}: the UNet's cross-attention width does not match its text encoder")
    embeddings = add_embeddings(parts["tokenizer"], parts["text_encoder"], spec.embeddings)
    loras = add_loras(parts, spec.loras)
    for name in ("unet", "vae", "text_encoder"):
        parts[name] = parts[name].to(device).requires_grad_(False).eval()
    source = replace(source, loras=loras, embeddings=embeddings)
    return StableDiffusion(**parts, source=source, device=device, dtype=dtype)
