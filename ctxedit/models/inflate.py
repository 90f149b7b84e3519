"""Inflate a Stable Diffusion 1.x UNet into a video UNet (Tune-A-Video), through the stock diffusers model.

Frames are folded into the batch: the UNet sees (b*f, c, h, w), so convolutions and GroupNorms stay
exactly SD per frame. Two things change, both by composition rather than by copied model code:
- every `attn1` gets a sparse-causal attention processor (frame i attends to frames 0 and i-1);
- every transformer block gets a zero-initialized temporal attention `attn_temp`, applied to the
  block's output by a forward hook, so the inflated UNet equals the image UNet at init.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from torch import nn

TRAINABLE = ("attn1.to_q", "attn2.to_q", "attn_temp")  # Tune-A-Video's trainable set


@dataclass
class FrameLayout:
    """Shared by the processors and hooks of one inflated UNet; set by `VideoUNet.forward`."""

    num_frames: int = 1
    xformers: bool = False


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, xformers: bool) -> torch.Tensor:
    """Attention of (b, n, c) queries over (b, m, c) keys/values, split into `heads`; returns (b, n, c)."""
    b, n, c = q.shape
    q, k, v = (x.reshape(b, -1, heads, c // heads) for x in (q, k, v))  # (b, n, heads, d)
    if xformers:
        import xformers.ops

        out = xformers.ops.memory_efficient_attention(q, k, v)
    else:
        out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    return out.reshape(b, n, c)


class SparseCausalAttnProcessor:
    """Self-attention where queries of frame i see the tokens of frame 0 and frame i-1."""

    def __init__(self, layout: FrameLayout):
        self.layout = layout

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        frames = self.layout.num_frames
        bf, n, c = hidden_states.shape  # (b*f, hw, c)
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        # Frame 0 attends to itself twice, which leaves SD's output unchanged.
        previous = (torch.arange(frames, device=hidden_states.device) - 1).clamp(min=0)

        def sparse_causal(x: torch.Tensor) -> torch.Tensor:
            x = x.view(bf // frames, frames, n, -1)  # (b, f, hw, c)
            first = x[:, :1].expand(-1, frames, -1, -1)
            return torch.cat([first, x[:, previous]], dim=2).flatten(0, 1)  # (b*f, 2hw, c)

        out = multihead_attention(query, sparse_causal(key), sparse_causal(value), attn.heads, self.layout.xformers)
        return attn.to_out[1](attn.to_out[0](out))


class TemporalAttention(nn.Module):
    """Pre-LayerNorm self-attention over the frames at each spatial position, with a residual."""

    def __init__(self, dim: int, heads: int, layout: FrameLayout):
        super().__init__()
        self.layout = layout
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.to_out.weight)  # zero weight and bias: the identity at init
        nn.init.zeros_(self.to_out.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        frames = self.layout.num_frames
        bf, n, c = hidden_states.shape
        x = hidden_states.view(bf // frames, frames, n, c).transpose(1, 2).reshape(-1, frames, c)  # (b*hw, f, c)
        x = self.norm(x)
        x = multihead_attention(self.to_q(x), self.to_k(x), self.to_v(x), self.heads, self.layout.xformers)
        x = self.to_out(x).view(bf // frames, n, frames, c).transpose(1, 2).reshape(bf, n, c)  # (b*f, hw, c)
        return hidden_states + x


def _after_block(block: BasicTransformerBlock, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return block.attn_temp(output)


class VideoUNet(nn.Module):
    """An inflated SD UNet: latents (b, f, c, h, w), one timestep, text states (b, tokens, dim) -> eps."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet
        self.layout = FrameLayout()
        for block in self.transformer_blocks():
            block.attn1.set_processor(SparseCausalAttnProcessor(self.layout))
            block.attn_temp = TemporalAttention(block.attn1.query_dim, block.attn1.heads, self.layout)
            block.register_forward_hook(_after_block)

    def transformer_blocks(self) -> list[BasicTransformerBlock]:
        return [m for m in self.unet.modules() if isinstance(m, BasicTransformerBlock)]

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Tune-A-Video's trainable set, by name relative to the UNet."""
        return {n: p for n, p in self.unet.named_parameters() if any(key in n for key in TRAINABLE)}

    def use_xformers(self, enabled: bool) -> None:
        """Route our attention and the stock cross-attention through xformers; keeps the sparse-causal processors."""
        from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

        self.layout.xformers = enabled
        for block in self.transformer_blocks():
            block.attn2.set_processor(XFormersAttnProcessor() if enabled else AttnProcessor2_0())

    def _check_inflated(self) -> None:
        for block in self.transformer_blocks():
            if not isinstance(block.attn1.processor, SparseCausalAttnProcessor):
                raise RuntimeError(
                    "a sparse-causal attention processor was replaced (set_attn_processor, "
                    "set_default_attn_processor or enable_xformers_memory_efficient_attention on the inner UNet); "
                    "use VideoUNet.use_xformers instead"
                )

    def forward(
        self, sample: torch.Tensor, timestep: int | torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        self._check_inflated()
        b, f = sample.shape[:2]
        self.layout.num_frames = f
        text = encoder_hidden_states.repeat_interleave(f, dim=0)  # (b*f, tokens, dim)
        eps = self.unet(sample.flatten(0, 1), timestep, text).sample  # (b*f, c, h, w)
        return eps.unflatten(0, (b, f))
