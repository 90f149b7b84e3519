"""Inflation (Tune-A-Video) and the context adapter: equivalences at init, causality, shapes at full size."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from ctxedit.attention import SelfAttention
from ctxedit.errors import UsageError
from ctxedit.models.adapter import AdapterConfig, ContextAdapter
from ctxedit.models.inflate import VideoUNet
from ctxedit.models.synthetic import SD15_UNET


@pytest.fixture
def unet(tiny_model) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(tiny_model / "unet").eval()


def inputs(frames: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, frames, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)


def test_inflated_frame0_equals_the_image_unet(unet):
    latents, text = inputs()
    with torch.no_grad():
        image = unet(latents[:, 0], 10, text).sample
        video = VideoUNet(unet)(latents, 10, text)
    assert video.shape == latents.shape
    torch.testing.assert_close(video[:, 0], image, atol=1e-5, rtol=1e-5)
    assert (video[:, 1] - image).abs().max() > 1e-4  # later frames do see other frames


@pytest.mark.parametrize("checkpointing", [False, True])
def test_changing_the_last_frame_changes_no_earlier_frame(unet, checkpointing):
    model = VideoUNet(unet)
    if checkpointing:
        unet.enable_gradient_checkpointing()
        model.train()
    latents, text = inputs(5)
    changed = latents.clone()
    changed[:, -1] += 1.0
    with torch.set_grad_enabled(checkpointing):
        before, after = model(latents, 500, text), model(changed, 500, text)
    assert torch.equal(before[:, :-1], after[:, :-1])
    assert not torch.equal(before[:, -1], after[:, -1])
    if checkpointing:
        after.sum().backward()  # the recomputation in backward runs too
        assert all(p.grad is not None for p in model.trainable_parameters().values())


def test_temporal_attention_is_wired_and_zero_at_init(unet):
    model = VideoUNet(unet)
    blocks = model.transformer_blocks()
    assert blocks and all(b.attn_temp.to_out.weight.abs().sum() == 0 for b in blocks)
    latents, text = inputs(3)
    changed = latents.clone()
    changed[:, -1] += 1.0
    with torch.no_grad():
        for block in blocks:
            torch.nn.init.normal_(block.attn_temp.to_out.weight, std=0.1)
        before, after = model(latents, 500, text), model(changed, 500, text)
    assert (before[:, 0] - after[:, 0]).abs().max() > 1e-5  # frames now talk in both directions


def test_trainable_set_is_tune_a_video_s(unet):
    names = VideoUNet(unet).trainable_parameters().keys()
    assert names and all(("attn1.to_q" in n) or ("attn2.to_q" in n) or ("attn_temp" in n) for n in names)
    assert any("attn_temp" in n for n in names) and any("attn2.to_q" in n for n in names)


def test_a_replaced_ctxedit_processor_is_refused(unet):
    model = VideoUNet(unet)
    assert all(isinstance(b.attn1.processor, SelfAttention) for b in model.transformer_blocks())
    unet.set_attn_processor(AttnProcessor2_0())
    latents, text = inputs(2)
    with pytest.raises(RuntimeError, match="ctxedit attention processor was replaced"):
        model(latents, 10, text)


def test_adapter_is_zero_at_init_and_relates_video_to_text():
    adapter = ContextAdapter(AdapterConfig(text_dim=32))
    latents, text = inputs(3)
    r = adapter(latents, text)
    assert r.shape == latents.shape and torch.equal(r, torch.zeros_like(r))
    r.square().sum().backward()
    assert adapter.head.weight.grad is not None
    with torch.no_grad():
        torch.nn.init.normal_(adapter.head.weight, std=0.1)
        base = adapter(latents, text)
        other_text = adapter(latents, text + torch.randn_like(text))
        other_video = adapter(latents + 1, text)
    assert (base - other_text).abs().max() > 1e-4  # token states, not a pooled vector
    assert (base - other_video).abs().max() > 1e-4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert adapter(latents, text).dtype == torch.float32


def test_adapter_refuses_shapes_it_cannot_patch():
    adapter = ContextAdapter(AdapterConfig(text_dim=32))
    with pytest.raises(UsageError, match="patch"):
        adapter(torch.zeros(1, 2, 4, 6, 8), torch.zeros(1, 77, 32))


def test_full_size_sd15_shapes_on_meta():
    """SD 1.5's UNet architecture, inflated, with the adapter: 8 frames at 64x64 latents (512x512)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        image_params = sum(p.numel() for p in unet.parameters())
        model = VideoUNet(unet)
        adapter = ContextAdapter(AdapterConfig(text_dim=768))
        latents, text = torch.randn(1, 8, 4, 64, 64), torch.randn(1, 77, 768)
        eps = model(latents, 500, text)
        r = adapter(latents, text)
    assert eps.shape == r.shape == (1, 8, 4, 64, 64)
    assert image_params == pytest.approx(859.5e6, rel=0.01)  # SD 1.5's UNet
    assert len(model.transformer_blocks()) == 16
    temporal = sum(p.numel() for p in unet.parameters()) - image_params
    trainable = sum(p.numel() for p in model.trainable_parameters().values())
    assert 40e6 < temporal < trainable < 150e6
    adapter_params = sum(p.numel() for p in adapter.parameters())
    assert 0.5e6 <= adapter_params <= 3e6
