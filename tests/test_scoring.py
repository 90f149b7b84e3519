"""Scores without ground truth (text alignment, consistency, preservation), their models, and candidate reranking."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from ctxedit import realign, scoring
from ctxedit.errors import ModelError
from ctxedit.models.sd import load_sd
from ctxedit.models.synthetic import write_tiny_blip, write_tiny_clip
from ctxedit.prompts import parse_target
from ctxedit.scoring import Scores
from ctxedit.settings import EditSettings
from ctxedit.toy.demo import TOY_MODEL
from ctxedit.toy.detect import caption
from ctxedit.toy.world import Clip, Shape

CLIP = Clip(
    (Shape("circle", "red", 9.0, (16.0, 30.0), "right", 1.5), Shape("square", "blue", 8.0, (46.0, 34.0), "up", 1.0)),
    "gray",
)


@pytest.fixture(scope="module")
def source() -> np.ndarray:
    return CLIP.render()[0]


def test_the_shapes_world_captions_what_it_sees(source):
    assert caption(source[0]) == "a red circle and a blue square on a gray background"
    recoloured = CLIP.edited(1, colour="yellow", shape="triangle").render()[0]
    assert caption(recoloured[3]) == "a red circle and a yellow triangle on a gray background"


def test_consistency_and_preservation_follow_what_they_name(source):
    assert scoring.consistency(source, source) == 0 and scoring.preservation(source, source) == pytest.approx(1)
    flicker = source.astype(int) + np.array([0, 40] * 4)[:, None, None, None]
    assert scoring.consistency(np.clip(flicker, 0, 255).astype(np.uint8), source) < -0.05
    recoloured = CLIP.edited(0, colour="green").render()[0]  # the same layout
    moved = np.roll(source, 10, axis=2)  # the same pictures, elsewhere
    assert scoring.preservation(recoloured, source) > 0.8 > 0.3 > scoring.preservation(moved, source)


def test_caption_reward_prefers_the_target_the_captions_say(source):
    sd = load_sd(str(TOY_MODEL), torch.device("cpu"), torch.float32)
    reward = scoring.caption_reward(lambda frames: [caption(f) for f in frames], scoring.text_embedder(sd))
    said = "a red circle moving right and a blue square moving up on a gray background"
    right = reward(source, parse_target(sd.tokenizer, said, said))
    wrong = reward(source, parse_target(sd.tokenizer, said, said.replace("red circle", "green triangle")))
    assert right > wrong and right == reward(source, parse_target(sd.tokenizer, said, said))


def test_tiny_blip_and_clip_load_and_score_deterministically(tiny_model, source, tmp_path):
    captioner = scoring.blip_captioner(str(write_tiny_blip(tmp_path / "blip", favour="green")), torch.device("cpu"))
    captions = captioner(scoring.sampled(source))
    assert len(captions) == scoring.CAPTION_FRAMES and all(c.split()[0] == "green" for c in captions)
    text_score, frame_consistency = scoring.clip_scorer(str(write_tiny_clip(tmp_path / "clip")), torch.device("cpu"))
    green, red = text_score(source, "a green circle"), text_score(source, "a red square")
    assert green != red and green == text_score(source, "a green circle")
    assert frame_consistency(np.repeat(source[:1], 4, 0)) == pytest.approx(100, abs=1e-3)
    assert frame_consistency(source) < 100
    with pytest.raises(ModelError, match="scorer model folder ./nowhere does not exist"):
        scoring.clip_scorer("./nowhere", torch.device("cpu"))
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE"):
        scoring.blip_captioner("nobody/no-such-captioner", torch.device("cpu"))
    with pytest.raises(ModelError, match="cannot load .* as CLIPModel"):
        scoring.clip_scorer(str(tiny_model / "unet"), torch.device("cpu"))


def test_attention_mass_is_a_share_of_the_words(tiny_model, source):
    from ctxedit.models.inflate import VideoUNet
    from ctxedit.windows import Windows

    sd = load_sd(str(tiny_model), torch.device("cpu"), torch.float32)
    model = VideoUNet(sd.unet)
    frames = source[:3, :32, :32]
    target = parse_target(sd.tokenizer, "a red square", "a green circle")
    assert target.changed  # the tiny tokenizer splits words into pieces
    mass = scoring.attention_mass(sd, model, frames, target)
    assert 0 < mass < 1 and mass == scoring.attention_mass(sd, model, frames, target)
    assert scoring.attention_mass(sd, model, frames, parse_target(sd.tokenizer, "a red square", "a red square")) == 0
    assert model.control.session is None  # the UNet is left as it was
    # A clip longer than the model's window is run a window at a time (after its anchor frame); one that fits as is.
    assert scoring.attention_mass(sd, model, frames, target, Windows(3, 3, 0)) == mass
    # Windows [0, 1] and [0, 1, 2]: each frame counted once. The untuned model's frames look back only and its temporal
    # attention is the identity, so each window computes its frames as the whole clip does: the same mass.
    assert scoring.attention_mass(sd, model, frames, target, Windows(3, 2, 0)) == pytest.approx(mass, rel=1e-6)


def test_ranks_are_fused_and_candidates_differ():
    scores = [Scores(0.5, -0.1, 0.9, 1.0), Scores(0.7, -0.2, 0.8, 2.0), Scores(0.7, -0.1, 0.95, 1.0)]
    assert scoring.fused_ranks([s.axes() for s in scores], ("text",)) == [2.0, 0.5, 0.5]  # a tie shares its ranks
    assert realign.best_candidate(scores, ("text", "preservation")) == 2
    assert realign.best_candidate(scores) == 2  # by consistency and preservation: as steady as 0, better kept
    settings = EditSettings(candidates=8, seed=None)
    options = realign.candidate_settings(settings, 8, seed=33)
    assert options[0] == replace(settings, candidates=1) and len(set(options)) == 8
    assert {o.seed for o in options if o.eta > 0} == {34, 38}  # every eta draw its own noise
    assert {o.guidance for o in options} == {7.5, 11.25, 5.025} and {o.keep_structure for o in options} >= {0.2, 0.6}
    assert {o.context_scale for o in options} == {1.0, 0.5} and {o.checkpoint for o in options} == {None}
    kept = realign.candidate_settings(settings, 11, 33, kept=[100, 200])
    assert [o.checkpoint for o in kept] == [None] * 5 + [200] + [None] * 4 + [100]  # the latest kept first
    from_kept = realign.candidate_settings(replace(settings, checkpoint=200), 11, 33, kept=[100, 200])
    assert [o.checkpoint for o in from_kept][4:] == [200, None, 200, 200, 200, 200, 100]  # the user's, then others
    plain = realign.candidate_settings(settings, 8, 33, context=False)  # no adapter: the context scale stays
    assert len(set(plain)) == 8 and {o.context_scale for o in plain} == {1.0}


@pytest.mark.parametrize("change", [{}, {"keep_structure": 0.0}, {"context_scale": 0.0}, {"steps": 4, "strength": 0.5}])
def test_every_candidate_acts_differently(change):
    """No two of 32 candidates act alike, whatever the user's settings (a keep-structure 0 varied down, a context
    scale 0 scaled, fractions of few steps that come to the same steps, a seed without eta are alike)."""
    settings = EditSettings(candidates=32, **change)
    options = realign.candidate_settings(settings, 32, seed=33, kept=[100, 200])
    assert len(options) == 32 and len({realign.behaviour(o) for o in options}) == 32
    assert options[0] == replace(settings, candidates=1) and all(o.candidates == 1 for o in options)
    assert all(0.5 * settings.guidance <= o.guidance <= 2.5 * settings.guidance for o in options)
    assert all(o.context_scale <= 2 * settings.context_scale for o in options)


def wobbled(clip: Clip, amplitude: float, seed: int = 0) -> np.ndarray:
    """The clip with each object shaken off its path by up to `amplitude` pixels, frame by frame."""
    rng = np.random.default_rng(seed)
    offsets = rng.uniform(-amplitude, amplitude, (clip.frames, 2))
    frames = []
    for f in range(clip.frames):
        objects = tuple(replace(o, start=(o.centre(f)[0] + offsets[f, 0], o.centre(f)[1] + offsets[f, 1]),
                                motion="still") for o in clip.objects)  # fmt: skip
        frames.append(replace(clip, objects=objects, frames=1).render()[0][0])
    return np.stack(frames)


def test_warp_error_rises_with_wobble_and_flicker_but_not_with_a_steady_recolouring(source):
    own = scoring.warp_error(source, source)
    recoloured = scoring.warp_error(CLIP.edited(0, colour="green", shape="triangle").render()[0], source)
    shaken = [scoring.warp_error(wobbled(CLIP, amplitude), source) for amplitude in (1.0, 2.0, 4.0)]
    flicker = np.clip(source.astype(int) + np.array([0, 30] * 4)[:, None, None, None], 0, 255).astype(np.uint8)
    assert own < 1.0 and recoloured < 1.0  # the edit moves as the source does (0.50 and 0.46)
    assert 1.5 < shaken[0] < shaken[1] < shaken[2]  # 1.9, 3.4, 6.2
    assert scoring.warp_error(flicker, source) > 10
    assert scoring.warp_error(source[:1], source[:1]) == 0.0
