"""Inflate a Stable Diffusion 1.x UNet into a video UNet (Tune-A-Video), through the stock diffusers model.

Frames are folded into the batch: the UNet sees (b*f, c, h, w), so convolutions and GroupNorms stay
exactly SD per frame. Two things change, both by composition rather than by copied model code:
- every attention layer gets a processor of `ctxedit.attention`: sparse-causal self-attention (frame i
  attends to frames 0 and i-1), and the control of attention and features that editing uses;
- every transformer block gets a zero-initialized temporal attention `attn_temp`, applied to the
  block's output by a forward hook, so the inflated UNet equals the image UNet at init.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from ctxedit.attention import Control, CrossAttention, FrameLayout, SelfAttention, install, multihead_attention

TRAINABLE = ("attn1.to_q", "attn2.to_q", "attn_temp")  # Tune-A-Video's trainable set


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
    """An inflated SD UNet: latents (b, f, c, h, w), one timestep, text states (b, tokens, dim) -> eps (or v)."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet
        self.layout = FrameLayout()
        self.control = Control()  # off: the stock computation
        install(unet, self.layout, self.control)
        for block in self.transformer_blocks():
            block.attn_temp = TemporalAttention(block.attn1.query_dim, block.attn1.heads, self.layout)
            block.register_forward_hook(_after_block)

    def transformer_blocks(self) -> list[BasicTransformerBlock]:
        return [m for m in self.unet.modules() if isinstance(m, BasicTransformerBlock)]

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Tune-A-Video's trainable set, by name relative to the UNet; a layer a LoRA wraps keeps its own name and
        the LoRA's weights are not in the set (`models.lora`)."""
        return {
            name.replace(".base_layer.", "."): param
            for name, param in self.unet.named_parameters()
            if any(key in name for key in TRAINABLE) and ".lora_" not in name
        }

    def use_xformers(self, enabled: bool) -> None:
        """Route every attention through xformers (where no map is needed); keeps ctxedit's processors."""
        self.layout.xformers = enabled

    def _check_inflated(self) -> None:
        for block in self.transformer_blocks():
            processors = (block.attn1.processor, block.attn2.processor)
            if not (isinstance(processors[0], SelfAttention) and isinstance(processors[1], CrossAttention)):
                raise RuntimeError(
                    "a ctxedit attention processor was replaced (set_attn_processor, "
                    "set_default_attn_processor or enable_xformers_memory_efficient_attention on the inner UNet); "
                    "use VideoUNet.use_xformers instead"
                )

    def forward(
        self, sample: torch.Tensor, timestep: int | torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        self._check_inflated()
        b, f = sample.shape[:2]
        self.layout.num_frames = f
        self.control.timestep = int(timestep)
        text = encoder_hidden_states.repeat_interleave(f, dim=0)  # (b*f, tokens, dim)
        eps = self.unet(sample.flatten(0, 1), timestep, text).sample  # (b*f, c, h, w)
        return eps.unflatten(0, (b, f))
