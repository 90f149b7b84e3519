"""Steadiness across frames: the edit's change carried along the source's own correspondences (after TokenFlow).

Each latent pixel of a frame is matched to its nearest neighbour in the frames before and after it, by the SOURCE's
clean latents and within a few pixels (`correspondences`); while sampling, the edit's change from the source
trajectory (`y - y_source`) is blended with its matches' change (`propagate`). The change then follows how the
source moves instead of settling differently in every frame (wobble, flicker).
"""

from __future__ import annotations

import torch

SEARCH_RADIUS = 2  # latent pixels a match may be from the same place in the neighbouring frame
CHUNK = 16  # frames matched at once
DISTANCE_COST = 0.05  # per squared latent pixel of offset, against the features' squared distance: ties go near


def correspondences(features: torch.Tensor, radius: int = SEARCH_RADIUS) -> torch.Tensor:
    """For frames (f, c, h, w), each pixel's best match in the frame before and the frame after it (the first and
    last frames use their one neighbour twice): (f, 2, h*w) flat pixel indices into those frames."""
    f, c, h, w = features.shape
    if f < 2:
        return torch.arange(h * w, device=features.device).expand(f, 2, -1).clone()
    unit = (features - features.mean((0, 2, 3), keepdim=True)) / features.std((0, 2, 3), keepdim=True).clamp(min=1e-6)
    dy, dx = torch.meshgrid(torch.arange(-radius, radius + 1), torch.arange(-radius, radius + 1), indexing="ij")
    offsets = torch.stack([dy.flatten(), dx.flatten()]).to(features.device)  # (2, size^2), size = 2 radius + 1
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten().to(features.device), xs.flatten().to(features.device)
    to_y, to_x = ys[None] + offsets[0, :, None], xs[None] + offsets[1, :, None]  # (size^2, h*w)
    outside = (to_y < 0) | (to_y >= h) | (to_x < 0) | (to_x >= w)
    candidates = to_y.clamp(0, h - 1) * w + to_x.clamp(0, w - 1)  # (size^2, h*w)
    flat = unit.flatten(2)  # (f, c, h*w)
    distance = DISTANCE_COST * offsets.square().sum(0)[:, None].float()  # (size^2, 1)
    matches = torch.empty(f, 2, h * w, dtype=torch.long, device=features.device)
    for side, neighbours in enumerate(neighbour_frames(f)):
        for start in range(0, f, CHUNK):  # a few frames at a time: the costs of a long clip would not fit
            frames = slice(start, start + CHUNK)
            there = flat[neighbours[frames]][:, :, candidates]  # (frames, c, size^2, h*w)
            cost = ((there - flat[frames, :, None]).square().sum(1) + distance).masked_fill(outside, float("inf"))
            matches[frames, side] = torch.gather(candidates, 0, cost.argmin(1))  # each pixel's best candidate
    return matches


def neighbour_frames(f: int) -> tuple[list[int], list[int]]:
    """(the frame before each frame, the frame after it); the ends use their one neighbour twice."""
    return [i - 1 if i > 0 else 1 for i in range(f)], [i + 1 if i < f - 1 else f - 2 for i in range(f)]


def propagate(change: torch.Tensor, matches: torch.Tensor, strength: float) -> torch.Tensor:
    """The edit's change (1, f, c, h, w) from the source, blended (`strength`: the neighbours' share) with the
    change at each pixel's matches in the frames before and after it (`correspondences`)."""
    _, f, c, h, w = change.shape
    if f < 2 or strength == 0:
        return change
    flat = change[0].flatten(2)  # (f, c, h*w)
    carried = []
    for k, neighbours in enumerate(neighbour_frames(f)):
        index = matches[:, k][:, None].expand(-1, c, -1)  # (f, c, h*w)
        carried.append(torch.gather(flat[neighbours], 2, index))
    along = torch.stack(carried).mean(0).view(1, f, c, h, w)
    return change + strength * (along - change)
