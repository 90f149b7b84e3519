"""The shapes world: seeded short videos of coloured shapes moving over a plain background, with captions
and exact ground truth per frame. Small enough to train a real SD-format model on a CPU, exact enough to
measure edits instead of eyeballing them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # frame side in pixels
SUPERSAMPLE = 4  # shapes are drawn 4x larger and downsampled: smooth edges, sub-pixel positions
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
BACKGROUNDS = {"gray": (128, 128, 128), "black": (20, 20, 20), "white": (235, 235, 235)}
SHAPES = ("circle", "square", "triangle")
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
RADII = {1: (8.0, 13.0), 2: (6.0, 9.0)}  # object size in pixels, by objects per clip (two must fit apart)
TRAVEL = (10.0, 17.0)  # pixels an object moves over the whole clip, whatever its length


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    radius: float
    start: tuple[float, float]  # centre at frame 0, pixels
    motion: str
    speed: float
    period: int = 0  # > 0: back and forth along `motion`, turning every `period` / 2 frames (long clips)

    def centre(self, frame: int) -> tuple[float, float]:
        dx, dy = MOTIONS[self.motion]
        if self.period:
            phase = frame % self.period
            frame = min(phase, self.period - phase)
        return self.start[0] + dx * self.speed * frame, self.start[1] + dy * self.speed * frame

    def describe(self) -> str:
        moving = "standing still" if self.motion == "still" else f"moving {self.motion}"
        return f"a {self.colour} {self.shape} {moving}"


@dataclass(frozen=True)
class Clip:
    objects: tuple[Shape, ...]
    background: str
    frames: int = 8

    @property
    def caption(self) -> str:
        return f"{' and '.join(o.describe() for o in self.objects)} on a {self.background} background"

    def edited(self, index: int, **attributes: str) -> Clip:
        """The same clip with object `index` given a new colour and/or shape."""
        objects = list(self.objects)
        objects[index] = replace(objects[index], **attributes)
        return replace(self, objects=tuple(objects))

    def render_frame(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(frame (64, 64, 3) uint8, masks (objects, 64, 64) bool) of one frame."""
        canvas = Image.new("RGB", (SIZE * SUPERSAMPLE,) * 2, BACKGROUNDS[self.background])
        draw = ImageDraw.Draw(canvas)
        for obj in self.objects:
            draw.polygon(outline(obj.shape, *obj.centre(index), obj.radius), fill=COLOURS[obj.colour])
        masks = [shape_mask(obj.shape, *obj.centre(index), obj.radius) > 0.5 for obj in self.objects]
        return np.asarray(canvas.resize((SIZE, SIZE), Image.LANCZOS)), np.stack(masks)

    def render(self) -> tuple[np.ndarray, np.ndarray]:
        """(frames (f, 64, 64, 3) uint8, masks (f, objects, 64, 64) bool)."""
        frames, masks = zip(*(self.render_frame(f) for f in range(self.frames)), strict=True)
        return np.stack(frames), np.stack(masks)


def outline(shape: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    """The shape's polygon on the supersampled canvas; a triangle's centroid sits at (cx, cy)."""
    x, y, r = cx * SUPERSAMPLE, cy * SUPERSAMPLE, radius * SUPERSAMPLE
    if shape == "circle":
        angles = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        return [(x + r * np.cos(a), y + r * np.sin(a)) for a in angles]
    # Areas are close to the circle's, so that size does not give the shape away.
    if shape == "square":
        r *= 0.9
        return [(x - r, y - r), (x + r, y - r), (x + r, y + r), (x - r, y + r)]
    if shape == "triangle":
        r *= 1.5
        return [(x, y - r), (x + r * 0.866, y + r / 2), (x - r * 0.866, y + r / 2)]
    raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def shape_mask(shape: str, cx: float, cy: float, radius: float) -> np.ndarray:
    """Coverage in [0, 1] of each pixel of a 64x64 frame by the shape."""
    canvas = Image.new("L", (SIZE * SUPERSAMPLE,) * 2, 0)
    ImageDraw.Draw(canvas).polygon(outline(shape, cx, cy, radius), fill=255)
    return np.asarray(canvas.resize((SIZE, SIZE), Image.BOX), dtype=np.float32) / 255


def _random_shape(rng: np.random.Generator, frames: int, radii: tuple[float, float]) -> Shape:
    radius = float(rng.uniform(*radii))
    motion = str(rng.choice(list(MOTIONS)))
    travel = float(rng.uniform(*TRAVEL))
    speed = travel / max(1, frames - 1)
    dx, dy = MOTIONS[motion]
    margin = radius * 1.5 + 1
    # Start where the whole path stays inside the frame.
    lo_x, hi_x = margin - min(0, dx) * travel, SIZE - margin - max(0, dx) * travel
    lo_y, hi_y = margin - min(0, dy) * travel, SIZE - margin - max(0, dy) * travel
    start = (float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y)))
    return Shape(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), radius, start, motion, speed)


def _apart(a: Shape, b: Shape, frames: int) -> bool:
    gap = 1.5 * (a.radius + b.radius) + 2
    return all(np.hypot(*np.subtract(a.centre(f), b.centre(f))) > gap for f in range(frames))


def random_clip(rng: np.random.Generator, frames: int = 8, objects: int = 1) -> Clip:
    """A clip of 1 or 2 objects that stay inside the frame and never touch; two objects differ in colour."""
    for _ in range(10_000):
        shapes = [_random_shape(rng, frames, RADII[objects]) for _ in range(objects)]
        if objects == 1 or (shapes[0].colour != shapes[1].colour and _apart(*shapes, frames)):
            return Clip(tuple(shapes), str(rng.choice(list(BACKGROUNDS))), frames)
    raise RuntimeError(f"no layout of {objects} objects over {frames} frames found")
