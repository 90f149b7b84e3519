"""The context adapter R(x0, c): relates the video latents to the text tokens (METHOD.md section 3).

Queries are 4x4 latent patches of every frame with learned row, column and frame embeddings; keys and
values are the text encoder's token states. Two pre-LN cross-attention layers, then a zero-initialized
head: an untrained adapter outputs exactly 0, so ContextDiff starts as Tune-A-Video. Always fp32.

A model folder may hold a pre-trained adapter in `adapter/` (config.json + adapter.safetensors), trained with
its text-to-image model as ContextDiff's first stage (`python -m ctxedit.toy.train --context` for the bundled
one); tuning starts from it instead of the zero head (`tune --adapter`).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ctxedit.errors import ModelError, UsageError, first_line
from ctxedit.files import atomic_folder, write_json

FOLDER = "adapter"  # a model folder's pre-trained adapter
WEIGHTS = "adapter.safetensors"


@dataclass(frozen=True)
class AdapterConfig:
    text_dim: int = 768  # CLIP ViT-L/14 token states of SD 1.x
    latent_channels: int = 4
    width: int = 256  # ~1.4 M parameters at SD 1.x sizes: small next to the UNet
    patch: int = 4  # 4x4 latent patches: 256 queries per frame at 512x512
    layers: int = 2
    heads: int = 4
    max_grid: int = 128  # patches per side: latents up to 512 (4096 px)
    max_frames: int = 256


class CrossAttentionLayer(nn.Module):
    """Pre-LN cross-attention from patches to text, then a small FFN, both residual."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_ff = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(text)
        x = x + self.attn(self.norm_q(x), kv, kv, need_weights=False)[0]
        return x + self.ff(self.norm_ff(x))


class ContextAdapter(nn.Module):
    """latents (b, f, c, h, w) and text token states (b, tokens, text_dim) -> context r, shaped like the latents."""

    def __init__(self, config: AdapterConfig = AdapterConfig()):
        super().__init__()
        self.config = config
        c, p, d = config.latent_channels, config.patch, config.width
        self.patch_in = nn.Linear(c * p * p, d)
        self.row_embed = nn.Parameter(torch.randn(config.max_grid, d) * 0.02)
        self.col_embed = nn.Parameter(torch.randn(config.max_grid, d) * 0.02)
        self.frame_embed = nn.Parameter(torch.randn(config.max_frames, d) * 0.02)
        self.text_in = nn.Linear(config.text_dim, d)
        self.layers = nn.ModuleList(CrossAttentionLayer(d, config.heads) for _ in range(config.layers))
        self.norm_out = nn.LayerNorm(d)
        self.head = nn.Linear(d, c * p * p)
        nn.init.zeros_(self.head.weight)  # zero head: r == 0 until trained
        nn.init.zeros_(self.head.bias)

    def check_shape(self, frames: int, height: int, width: int) -> None:
        p, cfg = self.config.patch, self.config
        if height % p or width % p:
            raise UsageError(f"latents of {height}x{width} are not divisible by the adapter patch {p}")
        if max(height, width) // p > cfg.max_grid or frames > cfg.max_frames:
            raise UsageError(
                f"the context adapter handles up to {cfg.max_frames} frames and {cfg.max_grid * p}-wide latents; "
                "use fewer --frames or a smaller --size"
            )

    def forward(self, latents: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, f, c, h, w = latents.shape
        self.check_shape(f, h, w)
        p = self.config.patch
        gh, gw = h // p, w // p
        device_type = latents.device.type
        fp32 = torch.autocast(device_type, enabled=False) if device_type in ("cuda", "cpu") else nullcontext()
        with fp32:  # the adapter's small outputs would lose too much in fp16
            x = latents.float().reshape(b, f, c, gh, p, gw, p).permute(0, 1, 3, 5, 2, 4, 6)  # (b, f, gh, gw, c, p, p)
            x = self.patch_in(x.reshape(b, f, gh, gw, c * p * p))
            x = x + self.row_embed[:gh, None] + self.col_embed[None, :gw] + self.frame_embed[:f, None, None]
            x = x.reshape(b, f * gh * gw, -1)  # (b, f*gh*gw, d)
            tokens = self.text_in(text.float())  # (b, tokens, d)
            for layer in self.layers:
                x = layer(x, tokens)
            x = self.head(self.norm_out(x)).reshape(b, f, gh, gw, c, p, p)
            return x.permute(0, 1, 4, 2, 5, 3, 6).reshape(b, f, c, h, w)  # (b, f, c, h, w)


def save_pretrained(folder: Path, adapter: ContextAdapter, shift: dict) -> None:
    """Write `adapter` as a pre-trained adapter folder, with the shift schedule it was trained with."""
    from safetensors.torch import save_file

    with atomic_folder(folder) as tmp:
        save_file({name: t.detach().contiguous().cpu() for name, t in adapter.state_dict().items()}, str(tmp / WEIGHTS))
        write_json(tmp / "config.json", asdict(adapter.config) | {"shift": shift})


def find_pretrained(choice: str, model_folder: Path) -> Path | None:
    """The adapter folder `tune --adapter` names: auto -> MODEL/adapter when there is one, fresh -> None, else a
    folder holding config.json and adapter.safetensors (or a model folder with an adapter/ in it)."""
    if choice == "fresh":
        return None
    if choice == "auto":
        return model_folder / FOLDER if (model_folder / FOLDER / WEIGHTS).exists() else None
    path = Path(choice).expanduser()
    for folder in (path / FOLDER, path):
        if (folder / WEIGHTS).exists() and (folder / "config.json").exists():
            return folder
    raise ModelError(f"no pre-trained context adapter in {choice}: expected config.json and {WEIGHTS} there")


def load_pretrained(adapter: ContextAdapter, folder: Path) -> dict:
    """Copy the pre-trained weights of `folder` into `adapter`, whose shape must match; returns their config."""
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / "config.json").read_text())
        state = load_file(str(folder / WEIGHTS), device=str(adapter.head.weight.device))
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot read the context adapter in {folder}: {error}") from error
    expected = asdict(adapter.config)
    differs = [f"{k} {config.get(k)} (this model: {v})" for k, v in expected.items() if config.get(k) != v]
    if differs:
        raise ModelError(f"the context adapter in {folder} was made for another model: {'; '.join(differs)}")
    try:
        adapter.load_state_dict(state)
    except RuntimeError as error:
        raise ModelError(f"the context adapter in {folder} does not fit: {first_line(error)}") from error
    return config
