"""Single-file checkpoints (`.safetensors` with the original LDM key names): what family one is, from its header
alone, and its components through diffusers' single-file loading, offline, with the configs shipped in `configs/`.

configs/ holds the diffusers component configs of each supported family (`sd-v1`, `sd-v2-base`, `sd-v2-768-v`)
and CLIP's BPE tokenizer files (derived from OpenCLIP's `bpe_simple_vocab_16e6.txt.gz`, MIT licence), which SD 1.x
and SD 2.x share (SD 2.x pads with "!").
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ctxedit.errors import ModelError, first_line

CONFIGS = Path(__file__).parent / "configs"
FAMILIES = ("sd-v1", "sd-v2-base", "sd-v2-768-v")
PICKLES = (".ckpt", ".pt", ".pth", ".bin")
SUFFIXES = (".safetensors", *PICKLES)
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")  # model_index.json classes ctxedit takes
SUPPORTED = "Stable Diffusion 1.x and 2.x (a diffusers folder, a hub id or one .safetensors file)"
# diffusers' name of a checkpoint's type -> what ctxedit calls it when it refuses one (prefixes match)
UNSUPPORTED = {
    "xl": "SDXL", "playground": "SDXL (Playground v2.5)", "sd35": "SD3.5", "sd3": "SD3", "flux": "Flux",
    "chroma": "Flux (Chroma)", "animatediff": "a video model (AnimateDiff motion module)",
    "ltx-video": "a video model (LTX-Video)", "mochi": "a video model (Mochi)",
    "hunyuan-video": "a video model (HunyuanVideo)", "wan": "a video model (Wan)",
    "inpainting": "an inpainting model (9 input channels)", "instruct-pix2pix": "InstructPix2Pix (8 input channels)",
    "controlnet": "a ControlNet", "upscale": "an upscaler", "stable_cascade": "Stable Cascade",
}  # fmt: skip


def refuse(what: str, name: str) -> ModelError:
    return ModelError(f"{name} is {what}, which ctxedit does not support; it takes {SUPPORTED}")


def pipeline_name(kind: str, channels: int) -> str:
    """What a diffusers pipeline class (and its UNet's input channels) is, in words."""
    named = {
        "XL": "SDXL",
        "StableDiffusion3": "SD3",
        "Flux": "Flux",
        "Inpaint": "an inpainting model",
        "InstructPix2Pix": "InstructPix2Pix",
        "ControlNet": "a ControlNet pipeline",
        "Upscale": "an upscaler",
    }
    video = ("Video", "AnimateDiff", "CogVideoX", "Wan", "Hunyuan", "LTX", "Mochi", "I2VGen", "TextToVideo")
    for key, what in named.items():
        if key in kind:
            return what
    if any(key in kind for key in video):
        return f"a video model ({kind})"
    if kind in PIPELINES:
        return f"a model whose UNet takes {channels} input channels (not 4: inpainting or image-conditioned)"
    return f"a {kind or 'model without a pipeline class'}"


def _header(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from the safetensors header only (no weights read)."""
    try:
        with path.open("rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
    except (OSError, struct.error, ValueError) as error:
        raise ModelError(f"{path} is not a readable .safetensors file ({type(error).__name__})") from error
    return {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"}


def family(path: Path, config: str | None = None) -> str:
    """The shipped config family of a single-file checkpoint (`config` names one, or a folder, to override the
    guess), or a one-line refusal of a pickle or an architecture ctxedit does not take."""
    if path.suffix.lower() in PICKLES:
        raise ModelError(
            f"{path} is a pickle checkpoint ({path.suffix}), which can run code when loaded; convert it to "
            ".safetensors first (e.g. with diffusers' scripts/convert_original_stable_diffusion_to_diffusers.py)"
        )
    if path.suffix.lower() != ".safetensors":
        raise ModelError(f"{path}: --model takes a .safetensors file, a diffusers folder or a hub id")
    import torch
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    with torch.device("meta"):  # diffusers' detector reads names and shapes only
        checkpoint = {name: torch.empty(shape) for name, shape in _header(path).items()}
    kind = infer_diffusers_model_type(checkpoint)
    for prefix, what in UNSUPPORTED.items():
        if kind.startswith(prefix):
            raise refuse(what, str(path))
    conv_in = checkpoint.get("model.diffusion_model.input_blocks.0.0.weight")
    if kind not in ("v1", "v2") or conv_in is None:
        raise refuse("a checkpoint without a Stable Diffusion UNet", str(path))
    if any(".time_stack." in name for name in checkpoint):  # diffusers reads its 1024-wide attention as SD 2.x's
        raise refuse("a video model (Stable Video Diffusion)", str(path))
    if conv_in.shape[1] != 4:  # depth (5), InstructPix2Pix-like (8)
        raise refuse(pipeline_name(PIPELINES[0], conv_in.shape[1]), str(path))
    if config is not None:
        return config
    return "sd-v1" if kind == "v1" else "sd-v2-768-v"  # SD 2.x base (512, epsilon): --model-config sd-v2-base


def config_folder(config: str) -> Path:
    """A shipped family's config folder, or a diffusers folder the user gave (its configs, not its weights)."""
    if config in FAMILIES:
        return CONFIGS / config
    folder = Path(config).expanduser()
    if not (folder / "model_index.json").exists():
        raise ModelError(f"--model-config takes {', '.join(FAMILIES)} or a diffusers model folder, got {config!r}")
    return folder


def tokenizer(config: Path):
    """The CLIP tokenizer of a config folder: its own if it has one, else the shipped CLIP BPE files (SD 2.x's
    OpenCLIP text encoder, 1024 wide, pads with "!")."""
    from transformers import CLIPTokenizer

    if (config / "tokenizer").is_dir():
        return CLIPTokenizer.from_pretrained(config / "tokenizer")
    width = json.loads((config / "text_encoder" / "config.json").read_text())["hidden_size"]
    files = CONFIGS / "clip-tokenizer"
    return CLIPTokenizer(
        str(files / "vocab.json"),
        str(files / "merges.txt"),
        pad_token="!" if width == 1024 else "<|endoftext|>",
        model_max_length=77,
    )


def load_single_file(path: Path, config: Path, dtype) -> dict:
    """The unet, vae and text_encoder of a single-file checkpoint, on the CPU at `dtype` (the architecture from
    `config`, a folder of diffusers configs)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    try:
        pipeline = StableDiffusionPipeline.from_single_file(
            str(path), config=str(config), tokenizer=tokenizer(config), local_files_only=True, torch_dtype=dtype,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    except SingleFileComponentError as error:  # a part missing: a UNet-only file, a LoRA or a VAE given as --model
        raise ModelError(f"{path}: {first_line(error)} (a whole SD checkpoint is needed)") from error
    return {"unet": pipeline.unet, "vae": pipeline.vae, "text_encoder": pipeline.text_encoder}
