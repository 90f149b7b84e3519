"""Write the tiny model in the formats users bring: a single-file checkpoint with the original (LDM) key names, and
LoRA files in kohya's key names. The inverse of what diffusers reads, written from the two layouts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(name: str, table: dict[str, str]) -> str:
    for new, old in table.items():
        name = name.replace(f".{new}.", f".{old}.")
    return name


def unet_to_ldm(state: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """Diffusers UNet keys -> `model.diffusion_model.*` (input_blocks, middle_block, output_blocks)."""
    per = layers_per_block + 1
    renamed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip

    def part(kind: str, rest: str) -> str:  # a resnet's layers have LDM names of their own
        return f"0.{_rename('.' + rest, RESNET)[1:]}" if kind == "resnets" else f"1.{rest}"

    out = {}
    for name, tensor in state.items():
        module, _, leaf = name.rpartition(".")
        if module in renamed:
            new = f"{renamed[module]}.{leaf}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
            new = f"input_blocks.{1 + int(m[1]) * per + int(m[3])}.{part(m[2], m[4])}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", name):
            new = f"input_blocks.{1 + int(m[1]) * per + layers_per_block}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", name):
            index = 1 if m[1] == "attentions" else 2 * int(m[2])
            new = f"middle_block.{index}.{part(m[1], m[3])[2:]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
            new = f"output_blocks.{int(m[1]) * per + int(m[3])}.{part(m[2], m[4])}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", name):
            has_attention = any(k.startswith(f"up_blocks.{m[1]}.attentions.") for k in state)
            new = f"output_blocks.{int(m[1]) * per + layers_per_block}.{2 if has_attention else 1}.{m[2]}"
        else:
            raise ValueError(f"no LDM name for the UNet's {name}")
        out[f"model.diffusion_model.{new}"] = tensor
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """Diffusers VAE keys -> `first_stage_model.*` (the decoder's levels numbered from the bottom)."""
    out = {}
    for name, tensor in state.items():
        new = "." + name
        new = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", new)
        new = new.replace(".mid_block.attentions.0.", ".mid.attn_1.").replace(".conv_norm_out.", ".norm_out.")
        new = re.sub(r"\.encoder\.down_blocks\.(\d+)\.", r".encoder.down.\1.", new)
        new = re.sub(r"\.decoder\.up_blocks\.(\d+)\.", lambda m: f".decoder.up.{levels - 1 - int(m[1])}.", new)
        new = new.replace(".resnets.", ".block.").replace(".downsamplers.0.", ".downsample.")
        new = new.replace(".upsamplers.0.", ".upsample.")
        new = _rename(_rename(new, VAE_RESNET), VAE_ATTENTION)
        if ".mid.attn_1." in new and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out["first_stage_model" + new] = tensor
    return out


def write_single_file(folder: Path, path: Path) -> Path:
    """The diffusers model in `folder` as one `.safetensors` checkpoint with LDM key names (SD 1.x text encoder)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    text = CLIPTextModel.from_pretrained(folder / "text_encoder")
    state = unet_to_ldm(unet.state_dict(), unet.config.layers_per_block)
    state |= vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels))
    state |= {f"cond_stage_model.transformer.text_model.{k}": v for k, v in text.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def write_lora(folder: Path, path: Path, kohya: bool = False, seed: int = 0) -> Path:
    """A random LoRA (rank 4) of the model in `folder`'s UNet attention and text-encoder attention, made with peft:
    in diffusers' format (`unet.` / `text_encoder.` keys, peft's lora_A/lora_B), or kohya's (`lora_unet_` / `lora_te_`
    module names with underscores, lora_down/lora_up and an alpha per module)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    text = CLIPTextModel.from_pretrained(folder / "text_encoder")
    unet_targets, text_targets = ["to_q", "to_k", "to_v", "to_out.0"], ["q_proj", "k_proj", "v_proj", "out_proj"]
    for model, targets in ((unet, unet_targets), (text, text_targets)):
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False), model)
    parts = {"unet": get_peft_model_state_dict(unet), "text_encoder": get_peft_model_state_dict(text)}
    state = {}
    for prefix, layers in parts.items():
        for name, tensor in layers.items():
            if not kohya:
                state[f"{prefix}.{name}"] = tensor
                continue
            module, kind = name.rsplit(".lora_", 1)
            module = ("lora_unet_" if prefix == "unet" else "lora_te_text_model_") + module.replace(".", "_")
            state[f"{module}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = tensor
            state[f"{module}.alpha"] = torch.tensor(8.0)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def write_v_model(folder: Path) -> Path:
    """The tiny model as a v-prediction one (SD 2.x 768-v's scheduler), in `folder`."""
    from ctxedit.models.synthetic import write_tiny_sd

    write_tiny_sd(folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"prediction_type": "v_prediction"}))
    return folder
