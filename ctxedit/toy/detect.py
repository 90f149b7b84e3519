"""Reading a shapes-world frame back: background, objects (mask, centroid, colour, shape), object count.

Shapes are told apart by template matching: each candidate shape is rendered with the object's area at
its centroid and the best mask IoU wins (robust to the blur of a VAE, unlike bounding-box fill ratios).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from ctxedit.toy.world import BACKGROUNDS, COLOURS, SHAPES, Clip, shape_mask

AREA_PER_RADIUS2 = {"circle": np.pi, "square": 1.8**2, "triangle": 1.299 * 1.5**2}  # see world.outline
MIN_AREA = 30  # pixels; smaller blobs are noise
FOREGROUND_DISTANCE = 70  # RGB distance from the background that makes a pixel part of an object


@dataclass
class Detection:
    colour: str
    shape: str
    centroid: tuple[float, float]  # (x, y) pixels
    mask: np.ndarray  # (64, 64) bool
    shape_iou: float  # how well the best template fits


def _nearest(value: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda name: float(np.sum((value - np.array(palette[name])) ** 2)))


def background_of(frame: np.ndarray) -> str:
    border = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]]).astype(float)
    return _nearest(np.median(border, axis=0), BACKGROUNDS)


def foreground(frame: np.ndarray, background: str) -> np.ndarray:
    distance = np.linalg.norm(frame.astype(float) - np.array(BACKGROUNDS[background]), axis=-1)
    return distance > FOREGROUND_DISTANCE


def components(mask: np.ndarray, min_area: int = MIN_AREA) -> list[np.ndarray]:
    """4-connected components of a boolean mask, largest first, without the small ones."""
    seen = np.zeros_like(mask)
    found = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        pixels, queue = [], deque([start])
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(pixels) >= min_area:
            component = np.zeros_like(mask)
            component[tuple(np.array(pixels).T)] = True
            found.append(component)
    return sorted(found, key=lambda c: -c.sum())


def centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5  # pixel i covers [i, i + 1)


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """(shape, IoU) of the template that fits the mask best."""
    cx, cy = centroid(mask)
    area = mask.sum()
    best = ("circle", -1.0)
    for shape in SHAPES:
        radius = np.sqrt(area / AREA_PER_RADIUS2[shape])
        for scale in (0.94, 1.0, 1.06):
            template = shape_mask(shape, cx, cy, radius * scale) > 0.5
            iou = float((template & mask).sum() / max(1, (template | mask).sum()))
            best = max(best, (shape, iou), key=lambda b: b[1])
    return best


def detect(frame: np.ndarray) -> list[Detection]:
    """Every object in a frame, largest first."""
    found = []
    for mask in components(foreground(frame, background_of(frame))):
        core = mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
        colour = _nearest(frame[core if core.any() else mask].astype(float).mean(axis=0), COLOURS)
        shape, iou = classify_shape(mask)
        found.append(Detection(colour, shape, centroid(mask), mask, iou))
    return found


def shows(frame: np.ndarray, clip: Clip, detections: list[Detection] | None = None) -> bool:
    """Whether the frame (or its `detections`, if already made) shows exactly the clip's objects, colour and
    shape, counted (a duplicate is wrong)."""
    found = detect(frame) if detections is None else detections
    return sorted((d.colour, d.shape) for d in found) == sorted((o.colour, o.shape) for o in clip.objects)


def caption(frame: np.ndarray) -> str:
    """The shapes world's caption of a frame, written from its detections (objects left to right), without motion:
    "a green circle and a blue square on a gray background"."""
    objects = sorted(detect(frame), key=lambda d: d.centroid[0])
    described = " and ".join(f"a {d.colour} {d.shape}" for d in objects) or "nothing"
    return f"{described} on a {background_of(frame)} background"
