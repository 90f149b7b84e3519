"""The part of the model that tuning changes: build it on a loaded SD, save it, load it back strictly.

Loading follows the one order that works with diffusers (`from_pretrained` drops the temporal keys):
base weights, inflate, then the saved trained parameters.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ctxedit.errors import RunError
from ctxedit.files import atomic_path
from ctxedit.models.adapter import AdapterConfig, ContextAdapter, load_pretrained
from ctxedit.models.inflate import VideoUNet
from ctxedit.models.sd import StableDiffusion


def build(
    sd: StableDiffusion, with_adapter: bool, seed: int, pretrained: Path | None = None
) -> tuple[VideoUNet, ContextAdapter | None]:
    """Inflate the SD UNet and, when the context is on, add an adapter: fresh (zero head), or the `pretrained`
    adapter folder's; trained parameters in fp32."""
    torch.manual_seed(seed)  # the temporal attention's q/k/v initialization
    model = VideoUNet(sd.unet).to(sd.device)
    if sd.device.type == "cuda" and importlib.util.find_spec("xformers") is not None:
        model.use_xformers(True)  # the [cuda] extra: memory-efficient attention everywhere
    for param in model.trainable_parameters().values():
        param.data = param.data.float()  # fp32 master weights under fp16/bf16 autocast
        param.requires_grad_(True)
    adapter = None
    if with_adapter:
        config = AdapterConfig(text_dim=sd.text_encoder.config.hidden_size, latent_channels=sd.unet.config.in_channels)
        adapter = ContextAdapter(config).to(sd.device)
        if pretrained is not None:
            load_pretrained(adapter, pretrained)
    return model, adapter


def trained_state(model: VideoUNet, adapter: ContextAdapter | None) -> dict[str, torch.Tensor]:
    state = {f"unet.{name}": p.detach() for name, p in model.trainable_parameters().items()}
    if adapter is not None:
        state.update({f"adapter.{name}": t.detach() for name, t in adapter.state_dict().items()})
    return state


def load_trained_state(state: dict[str, torch.Tensor], model: VideoUNet, adapter: ContextAdapter | None) -> None:
    """Copy a trained state in; the keys must match exactly (strict), else the file belongs to another setup."""
    expected = trained_state(model, adapter)
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        raise RunError(
            f"the trained parameters do not fit this model: {len(missing)} missing "
            f"(e.g. {sorted(missing)[:2]}), {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:2]})"
        )
    with torch.no_grad():
        for name, tensor in expected.items():
            if tensor.shape != state[name].shape:
                raise RunError(
                    f"the trained parameter {name} has shape {tuple(state[name].shape)}, expected {tuple(tensor.shape)}"
                )
            tensor.copy_(state[name])


def save_trained(path: Path, model: VideoUNet, adapter: ContextAdapter | None) -> None:
    from safetensors.torch import save_file

    state = {name: t.contiguous().cpu() for name, t in trained_state(model, adapter).items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def load_trained(path: Path, model: VideoUNet, adapter: ContextAdapter | None) -> None:
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device=str(model.unet.device))
    except (OSError, ValueError) as error:
        raise RunError(f"cannot read the trained parameters in {path}: {error}") from error
    load_trained_state(state, model, adapter)
