"""Attention and feature control of the video UNet: the one owner of its attention processors and feature hooks.

- `SelfAttention` on every `attn1`: sparse-causal attention (frame i attends to frames 0 and i-1, Tune-A-Video).
- `CrossAttention` on every `attn2`: attention of the image tokens over the text tokens.
- a forward hook on chosen decoder resnets: their output features.

What they do beyond the stock computation lives in plain objects: a `Session` (the plan of what to record or
inject, where and when, its store, word maps and re-weighting) applies to the calls made inside
`Control.applying(session)`, and processors ask the one `Control` by (layer, current timestep). Outside a session
every processor is the stock computation, bit for bit. Recording (the source's pass) puts features, self-attention
queries and keys and cross-attention maps into the session's store, keyed (timestep, layer); injecting (the edit)
takes them back in place of the edit's own, for the first part of the steps (Plug-and-Play features and
self-attention, Prompt-to-Prompt cross-attention of the shared words; `step_plan` says when). Either way the
cross-attention maps of chosen words can be summed up for local blending (`WordMaps`), and the attention to chosen
target words re-weighted inside their regions (`Reweighting`, re-alignment's fine stage).
Frames are folded into the batch, (b*f, tokens, c); in a guided call the conditional branch is the last one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from ctxedit.settings import EditSettings

BLEND_THRESHOLD = 0.2  # of a word region's peak (P2P's local blending)
BLEND_DILATION = 2  # latent pixels added around the region
BLEND_CONTRAST = 0.5  # a word region's peak over its border level: below, the words are not localised


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


def attention_maps(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) of (b, n, c) queries over (b, m, c) keys: (b, heads, n, m), in float32 even under
    autocast (which would cast the product back down to half precision)."""
    b, n, c = q.shape
    q, k = (x.reshape(b, -1, heads, c // heads).transpose(1, 2).float() for x in (q, k))  # (b, heads, n, d)
    autocast = q.device.type != "meta" and torch.is_autocast_enabled(q.device.type)  # meta: shape checks
    with torch.autocast(q.device.type, enabled=False) if autocast else nullcontext():
        return (q @ k.transpose(-1, -2) * (c // heads) ** -0.5).softmax(-1)


def apply_maps(maps: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(b, heads, n, m) maps over (b, m, c) values -> (b, n, c)."""
    b, heads, n, m = maps.shape
    v = v.reshape(b, m, heads, -1).transpose(1, 2)  # (b, heads, m, d)
    return (maps.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, -1)


@dataclass(frozen=True)
class Plan:
    """What an edit takes from the source, where and when. Layers are module names relative to the UNet."""

    features: tuple[str, ...] = ()  # resnets whose output features are the source's (Plug-and-Play)
    self_attention: tuple[str, ...] = ()  # attn1 layers whose queries and keys are the source's (Plug-and-Play)
    structure_steps: frozenset[int] = frozenset()  # timesteps at which the two above apply
    cross_attention: tuple[str, ...] = ()  # attn2 layers where shared words take the source's maps (P2P)
    word_steps: frozenset[int] = frozenset()  # timesteps at which the one above applies
    source_tokens: int = 77  # the source prompt's tokens up to its end token: only their maps are kept
    maps: tuple[str, ...] = ()  # attn2 layers computed through explicit maps at every step (the source pass sums
    # them up for blending), so that an edit computes them as the source pass did: exact in half precision too

    def injects(self) -> bool:
        return bool((self.features or self.self_attention) and self.structure_steps) or bool(
            self.cross_attention and self.word_steps
        )


@dataclass
class WordMaps:
    """Cross-attention per text token, summed over heads, steps and `layers`, per frame of the conditional branch,
    at the latents' size: (f, tokens, h, w). Maps of coarser layers are upsampled to it. Only the first `tokens`
    are kept (a prompt's own: the padding is never asked for). A clip run in windows adds each window's maps at its
    frames (`clip_frames` in all)."""

    layers: tuple[str, ...]
    latent_size: tuple[int, int]
    total: torch.Tensor | None = None
    clip_frames: int | None = None
    tokens: int | None = None  # None: all 77

    def add(self, maps: torch.Tensor, frames: int, positions: list[int] | None = None) -> None:
        """Add the (b*f, heads, n, tokens) maps of one layer, of the clip's frames `positions` (None: all)."""
        h, w = self.latent_size
        scale = round((h * w / maps.shape[2]) ** 0.5)
        words = maps[-frames:, ..., : self.tokens].sum(1).transpose(1, 2)  # (f, tokens, n)
        words = words.reshape(frames, -1, h // scale, w // scale)
        words = F.interpolate(words, size=(h, w), mode="bilinear", align_corners=False)  # (f, tokens, h, w)
        if positions is not None:
            if self.total is None:
                self.total = words.new_zeros(self.clip_frames, *words.shape[1:])
            self.total.index_add_(0, torch.tensor(positions, device=words.device), words)
        else:
            self.total = words if self.total is None else self.total + words

    def of(self, tokens: list[int]) -> torch.Tensor:
        """The summed maps of `tokens`: (f, h, w); zeros for no token."""
        if self.total is None:
            raise RuntimeError("no cross-attention was recorded: the UNet ran no layer of WordMaps.layers")
        return self.total[:, tokens].sum(1)


def _above_border(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(how far summed word maps (f, h, w) rise above their border's median, that median per frame)."""
    border = torch.cat([maps[:, 0], maps[:, -1], maps[:, :, 0], maps[:, :, -1]], dim=1).median(dim=1).values  # (f,)
    return (maps - border[:, None, None]).clamp(min=0), border


def stands_out(maps: torch.Tensor, contrast: float = BLEND_CONTRAST) -> bool:
    """Whether summed word maps (f, h, w) single out a region: their peak rises `contrast` times their border
    level above it, on average over frames. Words a model does not localise give flat maps."""
    lifted, border = _above_border(maps)
    return bool((lifted.amax(dim=(1, 2)) / border.clamp(min=1e-12)).mean() >= contrast)


def blend_mask(maps: torch.Tensor, threshold: float = BLEND_THRESHOLD, dilation: int = BLEND_DILATION) -> torch.Tensor:
    """Local blending's mask (f, h, w), 1 where the edit may differ from the source, from summed word maps (f, h, w):
    where they rise above their border's median (word maps are diffuse: what counts is how far above the
    background level), smoothed, over `threshold` of the frame's peak, dilated by `dilation` latent pixels."""
    lifted = F.avg_pool2d(_above_border(maps)[0][:, None], 3, stride=1, padding=1, count_include_pad=False)
    peak = lifted.amax(dim=(2, 3), keepdim=True)  # (f, 1, 1, 1)
    mask = ((lifted > threshold * peak) & (peak > 0)).float()
    return F.max_pool2d(mask, 2 * dilation + 1, stride=1, padding=dilation)[:, 0]


REWEIGHT_FADE = 0.5  # prompt weights fade from the whole weight at the first sampled step to none halfway


@dataclass(frozen=True)
class StepPlan:
    """What each control does at each step, on one clock: the fractions of the edit settings count the sampled steps
    (those from `first`, which partial inversion, --strength, chooses), whatever the total. Steps are indices into
    the scheduler's timesteps, noisiest first. Direct inversion's corrections and local blending act at every
    sampled step."""

    first: int  # the first sampled step
    structure: range  # steps whose features (and self-attention) are the source's
    inside: range  # steps where direct inversion's corrections and the source's features act inside the edit's region
    words: range  # steps where the words shared with the source take the source's cross-attention maps
    reweighting: tuple[float, ...]  # per sampled step, the fraction of the prompt weights that applies

    def strength(self, timesteps: list[int]) -> dict[int, float]:
        """Timestep -> the fraction of the prompt weights that applies there."""
        return dict(zip(timesteps[self.first :], self.reweighting, strict=True))


def step_plan(settings: EditSettings) -> StepPlan:
    """The one place that decides when each control acts (`StepPlan`)."""
    first = settings.first_step
    sampled = settings.steps - first
    return StepPlan(
        first=first,
        structure=range(first, first + round(settings.keep_structure * sampled)),
        inside=range(first, first + round(settings.keep_inside * sampled)),
        words=range(first, first + round(settings.keep_words * sampled)),
        reweighting=tuple(max(0.0, 1 - k / (REWEIGHT_FADE * sampled)) for k in range(sampled)),
    )


@dataclass(frozen=True)
class Reweighting:
    """RealignDiff's fine stage: in the conditional branch, the attention to some target tokens is raised inside
    each token's region and lowered outside (weight w inside, 1/w outside), then renormalised over the tokens to the
    query's total; a per-timestep strength fades it out (1: the whole weight, 0 or absent: off)."""

    weights: dict[int, float]  # token position -> weight
    regions: torch.Tensor | None  # (tokens, f, h, w) per weighted token, at the latents' size, 1 inside (all ones:
    # raised everywhere); None: every token raised everywhere
    strength: dict[int, float]  # timestep -> fraction of (weight - 1) that applies

    def apply(self, maps: torch.Tensor, frames: int, timestep: int, positions: list[int] | None = None) -> torch.Tensor:
        """(b*f, heads, n, tokens) maps of the clip's frames `positions` (None: all) -> the same with the
        conditional branch re-weighted."""
        strength = self.strength.get(timestep, 0.0)
        if strength == 0:
            return maps
        tokens = torch.tensor(list(self.weights), device=maps.device)
        weights = 1 + strength * (torch.tensor(list(self.weights.values()), device=maps.device) - 1)  # (k,)
        factor = weights.expand(frames, 1, maps.shape[2], -1)  # (f, 1, n, k)
        if self.regions is not None:
            regions = self.regions if positions is None else self.regions[:, positions]  # (k, f, h, w)
            h, w = regions.shape[-2:]
            scale = round((h * w / maps.shape[2]) ** 0.5)
            inside = F.adaptive_avg_pool2d(regions.float(), (h // scale, w // scale)).flatten(2).to(maps.device)
            factor = (weights[:, None, None] ** (2 * inside - 1)).permute(1, 2, 0)[:, None]  # w inside, 1/w outside
        cond = maps[-frames:]
        weighed = cond.clone()
        weighed[..., tokens] = cond[..., tokens] * factor
        # Each query keeps its total (1, or what the shared words' source maps make it): only the share moves.
        return torch.cat([maps[:-frames], weighed * (cond.sum(-1, keepdim=True) / weighed.sum(-1, keepdim=True))])


def restyled(source: torch.Tensor, own: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """AdaIN: the `source` features (n, c, h, w) with each channel given the mean and standard deviation that `own`
    has under `weight` (n, 1, h, w): the source's spatial pattern (layout) in the edit's statistics (appearance)."""
    total = weight.sum((2, 3), keepdim=True).clamp(min=1e-6)

    def statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = (x * weight).sum((2, 3), keepdim=True) / total
        return mean, ((x - mean).square() * weight).sum((2, 3), keepdim=True).div(total).sqrt()

    (source_mean, source_std), (own_mean, own_std) = statistics(source.float()), statistics(own.float())
    return ((source.float() - source_mean) / (source_std + 1e-5) * own_std + own_mean).to(source.dtype)


def store_bytes(store: dict[tuple[int, str], torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in store.values())


def layer_scale(name: str, levels: int) -> int:
    """How many times smaller than the latents a layer of an SD-style UNet works, from its name."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return 2 ** int(parts[1])
    if parts[0] == "up_blocks":
        return 2 ** (levels - 1 - int(parts[1]))
    return 2 ** (levels - 1)  # mid_block


def attention_layers(unet: torch.nn.Module, kind: str) -> list[str]:
    """Names of the UNet's `attn1` or `attn2` layers, in order."""
    return [name for name, _ in unet.named_modules() if name.endswith("." + kind)]


# What the edit takes from the source, chosen by measurement on the shapes world (benchmarks/README.md):
FEATURE_LAYERS = ("up_blocks.1.resnets.1",)  # decoder features that carry the layout (as Plug-and-Play's)
SELF_ATTENTION_LAYERS: tuple[str, ...] = ()  # self-attention injection moved objects more, not less
WORD_SCALES = (2, 4)  # cross-attention layers at 1/2 and 1/4 of the latent size: shared words' maps
MASK_SCALES = (2, 4)  # ...and the maps of the changed words, for blending


def source_plan(
    steps: StepPlan, timesteps: list[int], unet: torch.nn.Module, source_tokens: int = 77, maps: tuple[str, ...] = ()
) -> Plan:
    """Which layers take the source's features and maps, at the timesteps `steps` says; the shared words' maps are
    kept for the source prompt's `source_tokens` tokens; `maps` are the layers whose maps the source pass sums up."""
    levels = len(unet.config.block_out_channels)
    cross = tuple(name for name in attention_layers(unet, "attn2") if layer_scale(name, levels) in WORD_SCALES)
    return Plan(
        features=FEATURE_LAYERS,
        self_attention=SELF_ATTENTION_LAYERS,
        structure_steps=frozenset(timesteps[i] for i in steps.structure),
        cross_attention=cross,
        word_steps=frozenset(timesteps[i] for i in steps.words),
        source_tokens=source_tokens,
        maps=maps,
    )


def mask_layers(unet: torch.nn.Module, latent_size: tuple[int, int]) -> tuple[str, ...]:
    """Decoder cross-attention at 1/2 and 1/4 of the latents with maps of at least 8x8, where words are localised
    best; a UNet without such layers (a tiny one) uses all its decoder cross-attention."""
    levels = len(unet.config.block_out_channels)
    decoder = [name for name in attention_layers(unet, "attn2") if name.startswith("up_blocks")]
    scale = lambda name: layer_scale(name, levels)  # noqa: E731
    best = [name for name in decoder if scale(name) in MASK_SCALES and min(latent_size) // scale(name) >= 8]
    return tuple(best or decoder)


@dataclass
class Session:
    """What the processors and hooks do beyond the stock computation during one pass over the steps: the source
    pass (`recording`: records go into `store`) or an edit (what was recorded is injected from `store`)."""

    plan: Plan = field(default_factory=Plan)
    recording: bool = False
    store: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # keyed (timestep, layer)
    token_map: torch.Tensor | None = None  # per target token, the source token whose map it takes, -1: its own
    word_maps: WordMaps | None = None
    reweighting: Reweighting | None = None
    region: torch.Tensor | None = None  # (f, h, w) at the latents' size, 1 where the edit changes the source
    inside_steps: frozenset[int] = frozenset()  # timesteps where injected features apply inside the region too
    layout: bool = False  # ...re-normalised there to the edit's own channel statistics (AdaIN)
    store_dtype: torch.dtype = torch.float16  # records are kept at half precision: enough to steer structure
    store_device: torch.device | None = None  # None: where they were computed; "cpu" to offload


class Control:
    """Shared by the processors and hooks of one video UNet: the session of the call under way (none: every
    processor is the stock computation, bit for bit), its timestep (set by `VideoUNet.forward`) and the clip's frames
    it runs on (a window; None: all). A session applies only inside `applying`, one call at a time."""

    def __init__(self) -> None:
        self.session: Session | None = None
        self.timestep: int | None = None
        self.frames: list[int] | None = None

    @contextmanager
    def applying(self, session: Session | None, frames: list[int] | None = None) -> Iterator[None]:
        """`session` steers the UNet calls made inside the block, on the clip's `frames`; off again after it."""
        if self.session is not None:
            raise RuntimeError("a control session is already applying to this UNet")
        self.session, self.frames = session, frames
        try:
            yield
        finally:
            self.session, self.frames = None, None

    def _exchange(self, session: Session, layer: str, value: torch.Tensor) -> torch.Tensor:
        """Record `value` under (timestep, layer) and go on with it as recorded (at the store's precision, so that
        the source pass sees exactly what an edit will inject), or return the recorded one in its place."""
        key = (self.timestep, layer)
        if session.recording:
            session.store[key] = value.detach().to(session.store_device or value.device, session.store_dtype)
        source = session.store[key].to(value.device, value.dtype)
        if source.shape[0] != value.shape[0]:  # recorded without guidance: the same for both branches
            source = source.repeat(value.shape[0] // source.shape[0], *[1] * (source.dim() - 1))
        return source

    def features(self, layer: str, hidden: torch.Tensor) -> torch.Tensor:
        """The source's features in place of the edit's (`hidden`, (b*f, c, h, w)); inside the session's region only
        at its inside steps, and there with the edit's own channel statistics when it asks for the layout alone."""
        session = self.session
        if not (session and layer in session.plan.features and self.timestep in session.plan.structure_steps):
            return hidden
        source = self._exchange(session, layer, hidden)
        if session.recording or session.region is None:
            return source
        if self.timestep in session.inside_steps and not session.layout:
            return source
        region = session.region if self.frames is None else session.region[self.frames]
        weight = F.adaptive_avg_pool2d(region[:, None].to(hidden), hidden.shape[-2:])  # (f, 1, h, w)
        weight = weight.repeat(hidden.shape[0] // weight.shape[0], 1, 1, 1)
        inside = restyled(source, hidden, weight) if self.timestep in session.inside_steps else hidden
        return weight * inside + (1 - weight) * source  # exactly either where the weight is 0 or 1

    def queries_keys(self, layer: str, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        session = self.session
        if session and layer in session.plan.self_attention and self.timestep in session.plan.structure_steps:
            return self._exchange(session, layer + ".q", q), self._exchange(session, layer + ".k", k)
        return q, k

    def wants_maps(self, layer: str) -> bool:
        session = self.session
        if session is None:
            return False
        plan, reweighting = session.plan, session.reweighting
        shared = layer in plan.cross_attention and self.timestep in plan.word_steps
        reweighted = reweighting is not None and reweighting.strength.get(self.timestep, 0.0) != 0
        summed = session.word_maps is not None and layer in session.word_maps.layers
        return shared or reweighted or summed or layer in plan.maps

    def cross_attention(self, layer: str, maps: torch.Tensor, frames: int) -> torch.Tensor:
        """(b*f, heads, n, tokens) maps of the edit -> the maps to use; the conditional branch may take the
        source's maps for the tokens the two prompts share."""
        session = self.session
        if session.word_maps is not None and layer in session.word_maps.layers:
            session.word_maps.add(maps.float(), frames, self.frames)
        plan = session.plan
        if layer in plan.cross_attention and self.timestep in plan.word_steps:
            cond = maps[-frames:].clone()
            source = self._exchange(session, layer, cond[..., : plan.source_tokens])
            if session.recording:  # the source's own maps, as recorded
                cond[..., : plan.source_tokens] = source
            else:
                shared = (session.token_map >= 0) & (session.token_map < plan.source_tokens)
                cond[..., shared] = source[..., session.token_map[shared]]
            maps = torch.cat([maps[:-frames], cond])
        if session.reweighting is not None:
            maps = session.reweighting.apply(maps, frames, self.timestep, self.frames)
        return maps


class _Processor:
    """A diffusers attention processor for the layer named `layer`; diffusers passes a processor only the
    arguments its `__call__` names, so each kind spells them out."""

    def __init__(self, layer: str, layout: FrameLayout, control: Control):
        self.layer, self.layout, self.control = layer, layout, control


class SelfAttention(_Processor):
    """Sparse-causal self-attention (queries of frame i see the tokens of frames 0 and i-1), under `control`."""

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
        query, key = self.control.queries_keys(self.layer, attn.to_q(hidden_states), attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        # Frame 0 attends to itself twice, which leaves SD's output unchanged.
        previous = (torch.arange(frames, device=hidden_states.device) - 1).clamp(min=0)

        def sparse_causal(x: torch.Tensor) -> torch.Tensor:
            x = x.view(bf // frames, frames, n, -1)  # (b, f, hw, c)
            first = x[:, :1].expand(-1, frames, -1, -1)
            return torch.cat([first, x[:, previous]], dim=2).flatten(0, 1)  # (b*f, 2hw, c)

        out = multihead_attention(query, sparse_causal(key), sparse_causal(value), attn.heads, self.layout.xformers)
        return attn.to_out[1](attn.to_out[0](out))


class CrossAttention(_Processor):
    """Attention of image tokens over text tokens; its maps are materialised only when `control` wants them."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        text = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(text), attn.to_v(text)
        if self.control.wants_maps(self.layer):
            maps = attention_maps(query, key, attn.heads)
            out = apply_maps(self.control.cross_attention(self.layer, maps, self.layout.num_frames), value)
        else:
            out = multihead_attention(query, key, value, attn.heads, self.layout.xformers)
        return attn.to_out[1](attn.to_out[0](out.to(query.dtype)))


def install(unet: torch.nn.Module, layout: FrameLayout, control: Control) -> None:
    """Put our processors on every attention layer of the UNet's transformer blocks and hook every resnet."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    for name, module in unet.named_modules():
        if isinstance(module, BasicTransformerBlock) and module.attn2 is not None:
            module.attn1.set_processor(SelfAttention(f"{name}.attn1", layout, control))
            module.attn2.set_processor(CrossAttention(f"{name}.attn2", layout, control))
        elif isinstance(module, ResnetBlock2D):
            module.register_forward_hook(lambda _, args, out, name=name: control.features(name, out))
