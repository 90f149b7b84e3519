"""The edit's change carried along the source's correspondences: matches follow the source's motion, propagation
at strength 0 is the identity and otherwise pulls each frame's change towards its matches'."""

import torch

from ctxedit.coherence import correspondences, neighbour_frames, propagate


def moving_blob(frames: int = 6, size: int = 12) -> torch.Tensor:
    """(f, 4, size, size) features: a 2x2 blob (its two columns unlike each other) moving one pixel right per frame
    on a faint gradient."""
    x = torch.linspace(0, 1, size).expand(frames, 1, size, size).repeat(1, 4, 1, 1) * 0.1
    blob = torch.tensor([[1.0, -2.0], [-1.0, 1.0], [0.5, 1.0], [2.0, -0.5]])[:, None, :]  # (c, 1, 2 columns)
    for f in range(frames):
        x[f, :, 5:7, 2 + f : 4 + f] = blob
    return x


def test_matches_follow_the_sources_motion():
    features = moving_blob()
    matches = correspondences(features)  # (f, 2, h*w)
    w = features.shape[-1]
    for f in range(1, 5):
        pixel = 5 * w + 2 + f  # the blob's top-left in frame f
        assert matches[f, 0, pixel] == 5 * w + 1 + f and matches[f, 1, pixel] == 5 * w + 3 + f
    assert neighbour_frames(4) == ([1, 0, 1, 2], [1, 2, 3, 2])
    assert correspondences(features[:1]).equal(torch.arange(w * w).expand(1, 2, -1))


def test_propagation_is_the_identity_at_zero_and_steadies_a_flickering_change():
    features = moving_blob()
    matches = correspondences(features)
    change = torch.randn(1, 6, 4, 12, 12, generator=torch.Generator().manual_seed(0))
    assert propagate(change, matches, 0.0) is change
    steady = torch.ones(1, 6, 4, 12, 12)
    torch.testing.assert_close(propagate(steady, matches, 0.7), steady)  # a change the same everywhere stays
    flicker = torch.ones(1, 6, 4, 12, 12) * torch.tensor([1.0, -1.0] * 3)[None, :, None, None, None]
    calmer = propagate(flicker, matches, 0.5)
    assert calmer.diff(dim=1).abs().mean() < 0.5 * flicker.diff(dim=1).abs().mean()


def test_a_long_clip_is_matched_a_few_frames_at_a_time_as_at_once(monkeypatch):
    from ctxedit import coherence

    features = torch.randn(40, 4, 10, 10, generator=torch.Generator().manual_seed(1))
    chunked = correspondences(features)
    monkeypatch.setattr(coherence, "CHUNK", 1000)
    assert torch.equal(chunked, correspondences(features))
