"""Attention and feature control: off is the stock computation, records have their shapes and size, injection
puts the source's features and maps in place, xformers is routed through our processors."""

import sys
import types
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from ctxedit.attention import (
    BLEND_DILATION,
    Plan,
    Reweighting,
    Session,
    WordMaps,
    attention_layers,
    attention_maps,
    blend_mask,
    layer_scale,
    restyled,
    source_plan,
    stands_out,
    step_plan,
    store_bytes,
)
from ctxedit.models.inflate import VideoUNet
from ctxedit.models.synthetic import SD15_UNET

FEATURE = "up_blocks.1.resnets.0"
SELF = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
CROSS = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"


@pytest.fixture
def model(tiny_model) -> VideoUNet:
    return VideoUNet(UNet2DConditionModel.from_pretrained(tiny_model / "unet").eval())


def inputs(seed: int = 0, frames: int = 3, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 4, 16, 16, generator=g), torch.randn(batch, 77, 32, generator=g)


def full_plan(model: VideoUNet, timestep: int) -> Plan:
    return Plan(
        features=(FEATURE,), self_attention=(SELF,), structure_steps=frozenset({timestep}),
        cross_attention=tuple(attention_layers(model.unet, "attn2")), word_steps=frozenset({timestep}),
    )  # fmt: skip


def output_of(model: VideoUNet, layer: str, *args) -> torch.Tensor:
    seen = []
    handle = model.unet.get_submodule(layer).register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        model(*args)
    handle.remove()
    return seen[-1]


def run(model: VideoUNet, session: Session | None, *args) -> torch.Tensor:
    with torch.no_grad(), model.control.applying(session):
        return model(*args)


def test_recording_is_transparent_and_off_is_bit_for_bit(model):
    x, text = inputs()
    plain = run(model, None, x, 500, text)
    words = WordMaps(tuple(attention_layers(model.unet, "attn2")), (16, 16))
    recording = Session(full_plan(model, 500), recording=True, word_maps=words, store_dtype=torch.float32)
    recorded = run(model, recording, x, 500, text)
    assert torch.equal(plain, run(model, None, x, 500, text)) and model.control.session is None
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-5)  # maps materialised instead of SDPA
    # A plan for other timesteps changes nothing, bit for bit.
    assert torch.equal(run(model, Session(full_plan(model, 999)), x, 500, text), plain)


def test_a_session_applies_inside_its_block_only_and_never_twice(model):
    x, text = inputs()
    session = Session(full_plan(model, 500), recording=True)
    with pytest.raises(ValueError), model.control.applying(session):
        raise ValueError("a failing call")
    assert model.control.session is None  # off again, whatever happened inside
    with model.control.applying(session), pytest.raises(RuntimeError, match="already applying"):
        with model.control.applying(Session()):
            pass


def test_records_have_the_layers_shapes(model):
    x, text = inputs(frames=3, batch=2)
    session = Session(full_plan(model, 500), recording=True, word_maps=WordMaps((CROSS,), (16, 16)))
    run(model, session, x, 500, text)
    store = session.store
    assert store[(500, FEATURE)].shape == (6, 32, 16, 16)  # (b*f, channels, h, w): up_blocks.1 of the tiny UNet
    assert store[(500, SELF + ".q")].shape == store[(500, SELF + ".k")].shape == (6, 256, 32)  # (b*f, hw, c)
    assert store[(500, CROSS)].shape == (3, 8, 256, 77)  # the conditional branch: (f, heads, hw, tokens)
    assert all(t.dtype == torch.float16 for t in store.values())
    assert session.word_maps.total.shape == (3, 77, 16, 16)  # (f, tokens, h, w)
    assert store_bytes(store) == sum(t.numel() * 2 for t in store.values())


def test_recording_goes_on_with_what_it_recorded_so_that_injecting_it_gives_the_same(model):
    """The source pass sees its features and maps at the store's precision (fp16): an edit that injects them into
    the same input computes exactly what the source pass did."""
    x, text = inputs(6)
    session = Session(full_plan(model, 500), recording=True)
    recorded = run(model, session, x, 500, text)
    session.recording, session.token_map = False, torch.arange(77)
    assert torch.equal(run(model, session, x, 500, text), recorded)
    full_precision = run(model, Session(full_plan(model, 500), recording=True, store_dtype=torch.float32), x, 500,
                         text)  # fmt: skip
    assert not torch.equal(recorded, full_precision)  # fp16 rounding shows: it is what is injected


def test_injection_puts_the_source_in_place_of_the_edit(model):
    source, text = inputs(1)
    edit, other_text = inputs(2)
    session = Session(full_plan(model, 500), recording=True)
    with model.control.applying(session):
        source_features = output_of(model, FEATURE, source, 500, text)
    session.recording, session.token_map = False, torch.arange(77)
    with model.control.applying(session):
        injected = output_of(model, FEATURE, edit, 500, other_text)
    torch.testing.assert_close(injected, source_features, atol=1e-2, rtol=1e-2)  # kept at fp16
    assert (run(model, session, edit, 500, other_text) - run(model, None, edit, 500, other_text)).abs().max() > 1e-3


def test_shared_words_take_the_source_maps_and_changed_words_keep_theirs(model):
    x, text = inputs(3, batch=1)
    changed = text.clone()
    changed[:, 5] += 3.0  # token 5 is a different word
    layers = tuple(attention_layers(model.unet, "attn2"))
    session = Session(Plan(cross_attention=layers, word_steps=frozenset({500})), recording=True)
    run(model, session, x, 500, text)
    source_maps = session.store[(500, CROSS)].float()
    session.recording, session.token_map = False, torch.where(torch.arange(77) == 5, -1, torch.arange(77))
    session.word_maps = WordMaps((CROSS,), (16, 16))
    seen = {}
    control = model.control
    real = control.cross_attention
    control.cross_attention = lambda layer, maps, frames: seen.setdefault(layer, real(layer, maps, frames))
    run(model, session, x, 500, changed)
    used = seen[CROSS]
    torch.testing.assert_close(used[..., :5], source_maps[..., :5], atol=1e-3, rtol=1e-2)
    assert (used[..., 5] - source_maps[..., 5]).abs().max() > 1e-3


def test_an_unguided_record_is_injected_into_both_branches(model):
    x, text = inputs(4, batch=1)
    session = Session(Plan(features=(FEATURE,), structure_steps=frozenset({500})), recording=True)
    with model.control.applying(session):
        recorded = output_of(model, FEATURE, x, 500, text)
    session.recording = False
    both, texts = inputs(5, batch=2)
    with model.control.applying(session):
        injected = output_of(model, FEATURE, both, 500, texts)
    torch.testing.assert_close(injected, torch.cat([recorded, recorded]), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_maps_are_float32_under_autocast(dtype):
    """Autocast would cast the product of queries and keys back to half precision: recording, blending and
    re-weighting then differ from fp32. The maps stay those of float32 arithmetic on the same inputs."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 64, 32, generator=g).to(dtype) for _ in range(2))
    with torch.autocast("cpu", dtype=dtype):
        maps = attention_maps(q, k, heads=4)
    assert maps.dtype == torch.float32
    torch.testing.assert_close(maps, attention_maps(q.float(), k.float(), heads=4), atol=1e-6, rtol=1e-5)


def test_xformers_is_used_by_every_processor_when_asked(model, monkeypatch):
    calls = []

    def memory_efficient_attention(q, k, v):  # (b, n, heads, d), like xformers
        calls.append(q.shape)
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    fake = types.ModuleType("xformers")
    fake.ops = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake.ops)
    x, text = inputs()
    with torch.no_grad():
        sdpa = model(x, 500, text)
        model.use_xformers(True)
        routed = model(x, 500, text)
    blocks = len(model.transformer_blocks())
    assert len(calls) == 3 * blocks  # self, cross and temporal attention of every block
    torch.testing.assert_close(routed, sdpa, atol=1e-5, rtol=1e-5)


def test_blend_mask_covers_the_region_of_a_word_and_little_else():
    maps = torch.full((2, 16, 16), 0.2)
    maps[:, 4:8, 9:13] = 1.0  # the word's object
    mask = blend_mask(maps)
    assert mask.shape == (2, 16, 16) and blend_mask(torch.zeros(2, 16, 16)).sum() == 0
    assert mask[:, 4:8, 9:13].min() == 1  # covered...
    margin = 1 + BLEND_DILATION  # the smoothing's reach and the dilation
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[4 - margin : 8 + margin, 9 - margin : 13 + margin] = False
    assert mask[:, outside].max() == 0 and mask[:, 3, 8].min() == 1  # ...with a margin, not the frame


def test_only_maps_that_single_out_a_region_stand_out():
    flat = torch.full((2, 16, 16), 0.2) + 0.02 * torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0))
    peaked = flat.clone()
    peaked[:, 4:8, 9:13] = 0.5  # 2.5x the background level
    assert stands_out(peaked) and not stands_out(flat)


def test_reweighting_raises_words_inside_their_region_lowers_them_outside_and_renormalises():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(2 * 2, 3, 8 * 8, 6, generator=g).softmax(-1)  # (b*f, heads, n, tokens): 2 frames, guided
    region = torch.zeros(2, 16, 16)
    region[:, :8] = 1  # the top half of the latents
    reweighting = Reweighting({2: 2.0, 3: 1.0}, torch.stack([region, torch.ones_like(region)]), {500: 1.0, 400: 0.5})
    out = reweighting.apply(maps, frames=2, timestep=500)
    assert torch.equal(out[:2], maps[:2])  # the unconditional branch is untouched
    torch.testing.assert_close(out.sum(-1), torch.ones(4, 3, 64))
    ratio = (out[2:, ..., 2] / out[2:, ..., 1]) / (maps[2:, ..., 2] / maps[2:, ..., 1])  # token 2 against token 1
    top, bottom = ratio.reshape(2, 3, 8, 8)[:, :, :4], ratio.reshape(2, 3, 8, 8)[:, :, 4:]
    torch.testing.assert_close(top, torch.full_like(top, 2.0))  # weight 2 inside the region...
    torch.testing.assert_close(bottom, torch.full_like(bottom, 0.5))  # ...1/2 outside
    half = reweighting.apply(maps, frames=2, timestep=400)  # half strength: weight 1.5
    torch.testing.assert_close(
        (half[2:, ..., 2] / half[2:, ..., 1])[..., :32], 1.5 * (maps[2:, ..., 2] / maps[2:, ..., 1])[..., :32]
    )
    assert reweighting.apply(maps, frames=2, timestep=300) is maps  # faded out: off
    everywhere = Reweighting({2: 2.0}, None, {500: 1.0}).apply(maps, frames=2, timestep=500)
    torch.testing.assert_close(everywhere[2:, ..., 2] / everywhere[2:, ..., 1], 2 * maps[2:, ..., 2] / maps[2:, ..., 1])


def test_layer_scales_follow_the_unet_levels():
    assert [layer_scale(n, 4) for n in ("down_blocks.0.x", "down_blocks.2.x", "mid_block.x", "up_blocks.1.x")] == [
        1, 4, 8, 4,
    ]  # fmt: skip


def test_store_of_sd15_at_512_stays_as_stated():
    """SD 1.5's architecture on the meta device, 8 frames at 512x512, guided, a 20-token source prompt, the
    default settings, 50 steps: the store is 825 MiB in fp16 (as README.md states)."""
    from ctxedit.settings import EditSettings

    timesteps = list(range(981, 0, -20))
    with torch.device("meta"):
        model = VideoUNet(UNet2DConditionModel(**SD15_UNET))
        plan = source_plan(step_plan(EditSettings()), timesteps, model.unet, source_tokens=20)
        per_step = {}
        for kind, t in (("both", timesteps[0]), ("words only", timesteps[30])):
            session = Session(plan, recording=True)
            with torch.no_grad(), model.control.applying(session):
                model(torch.randn(2, 8, 4, 64, 64), t, torch.randn(2, 77, 768))
            per_step[kind] = store_bytes(session.store)
    assert (len(plan.structure_steps), len(plan.word_steps)) == (20, 40)
    assert plan.structure_steps < plan.word_steps  # the first steps of both
    total = 20 * per_step["both"] + 20 * per_step["words only"]
    assert total / 2**20 == pytest.approx(825, abs=1)


def test_restyled_features_keep_the_sources_pattern_in_the_edits_channel_statistics():
    g = torch.Generator().manual_seed(0)
    source, own = torch.randn(2, 6, 8, 8, generator=g), 3 + 2 * torch.randn(2, 6, 8, 8, generator=g)
    weight = torch.zeros(2, 1, 8, 8)
    weight[..., 2:6, 1:5] = 1.0
    out = restyled(source, own, weight)
    inside = lambda x: x[..., 2:6, 1:5].flatten(2)  # noqa: E731
    torch.testing.assert_close(inside(out).mean(-1), inside(own).mean(-1))
    torch.testing.assert_close(inside(out).std(-1, correction=0), inside(own).std(-1, correction=0), rtol=1e-4, atol=0)
    pattern = torch.corrcoef(torch.stack([inside(out)[0, 0], inside(source)[0, 0]]))[0, 1]
    assert pattern == pytest.approx(1.0, abs=1e-5)  # where the source is bright, so is the result
    torch.testing.assert_close(restyled(source, source, weight), source, rtol=0, atol=1e-4)


@pytest.mark.parametrize("layout", [False, True])
def test_injected_features_outside_the_region_are_the_sources_and_inside_the_edits_after_the_inside_steps(
    model, layout
):
    """One step inside `inside_steps` and one after: outside the region the source's features at both; inside it the
    source's (or its layout in the edit's statistics) at the first, the edit's own at the second."""
    source, text = inputs(1)
    edit, other_text = inputs(2)
    plan = replace(full_plan(model, 500), structure_steps=frozenset({500, 400}), self_attention=())
    session = Session(plan, recording=True)
    recorded = {t: output_of_session(model, session, source, t, text) for t in (500, 400)}
    region = torch.zeros(3, 16, 16)
    region[:, :8, :8] = 1.0  # the top-left quarter of the latents, and so of every feature map
    session.recording, session.token_map = False, torch.arange(77)
    session.region, session.inside_steps, session.layout = region, frozenset({500}), layout
    own = {t: output_of(model, FEATURE, edit, t, other_text) for t in (500, 400)}
    size = own[500].shape[-1]
    corner = torch.zeros(size, size, dtype=torch.bool)
    corner[: size // 2, : size // 2] = True
    for t in (500, 400):
        got = output_of_session(model, session, edit, t, other_text)
        torch.testing.assert_close(got[..., ~corner], recorded[t][..., ~corner], atol=1e-2, rtol=1e-2)
        if t == 400:
            assert torch.equal(got[..., corner], own[t][..., corner])
        elif layout:
            expected = restyled(recorded[t], own[t], corner.float().expand(6, 1, -1, -1))
            torch.testing.assert_close(got[..., corner], expected[..., corner], atol=1e-2, rtol=1e-2)
        else:
            torch.testing.assert_close(got[..., corner], recorded[t][..., corner], atol=1e-2, rtol=1e-2)


def output_of_session(model: VideoUNet, session: Session, *args) -> torch.Tensor:
    with model.control.applying(session):
        return output_of(model, FEATURE, *args)
