"""Output people share: captioned side-by-side and grid videos of a source and its edits, and frame strips.

Rows are (caption, frames) with frames (f, h, w, 3) uint8, all of one size. Small frames (the shapes world's
64x64) are enlarged with nearest-neighbour so that they stay crisp and the captions stay readable.
"""

from __future__ import annotations

import math
import textwrap
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ctxedit import video as videos
from ctxedit.files import atomic_path

CAPTION_LINES = 3
MIN_PANEL_SIDE = 256  # frames smaller than this are enlarged by a whole factor


@cache
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _enlargement(frames: np.ndarray) -> int:
    return max(1, MIN_PANEL_SIDE // min(frames.shape[1:3]))


def captioned(frames: np.ndarray, text: str) -> np.ndarray:
    """Frames (enlarged when small) with `text` wrapped in a white band under each; the band's height
    depends only on the frame size, so that panels of one source line up."""
    scale = _enlargement(frames)
    height, width = frames.shape[1] * scale, frames.shape[2] * scale
    font_size = max(11, width // 28)
    lines = textwrap.wrap(text, width=max(8, int(width / (0.55 * font_size))))
    if len(lines) > CAPTION_LINES:
        lines = lines[:CAPTION_LINES]
        lines[-1] = lines[-1][: max(0, len(lines[-1]) - 1)] + "…"
    band = (round(font_size * 1.25) * CAPTION_LINES + 8) // 2 * 2  # even, for H.264
    out = np.full((len(frames), height + band, width, 3), 255, np.uint8)
    out[:, :height] = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    caption = Image.new("RGB", (width, band), (255, 255, 255))
    ImageDraw.Draw(caption).multiline_text((4, 4), "\n".join(lines), fill=(0, 0, 0), font=_font(font_size))
    out[:, height:] = np.asarray(caption)
    return out


def side_by_side(rows: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """All videos in one row, each captioned."""
    return np.concatenate([captioned(frames, text) for text, frames in rows], axis=2)


def grid(rows: list[tuple[str, np.ndarray]], columns: int | None = None) -> np.ndarray:
    """Captioned videos in a grid (as square as possible, filled row by row, blank cells white)."""
    columns = columns or math.ceil(math.sqrt(len(rows)))
    panels = [captioned(frames, text) for text, frames in rows]
    panels += [np.full_like(panels[0], 255)] * (-len(panels) % columns)
    lines = [np.concatenate(panels[i : i + columns], axis=2) for i in range(0, len(panels), columns)]
    return np.concatenate(lines, axis=1)


def strip(rows: list[tuple[str, np.ndarray]], max_frames: int = 8) -> Image.Image:
    """A still image: one row of (at most `max_frames`, evenly spaced) frames per video, under its title; frames
    are shown 128 to 256 pixels high."""
    picks = np.linspace(0, len(rows[0][1]) - 1, min(max_frames, len(rows[0][1]))).round().astype(int)
    frame_h, frame_w = rows[0][1].shape[1:3]
    scale = max(1, 128 // frame_h) if frame_h < 128 else min(1.0, 256 / frame_h)
    height, width = round(frame_h * scale), round(frame_w * scale) * len(picks)
    title = 16
    image = Image.new("RGB", (width, len(rows) * (height + title)), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for i, (text, frames) in enumerate(rows):
        top = i * (height + title)
        draw.text((4, top + 2), text, fill=(0, 0, 0), font=_font(11))
        row = Image.fromarray(np.concatenate(list(frames[picks]), axis=1))
        image.paste(row.resize((width, height), Image.NEAREST if scale >= 1 else Image.LANCZOS), (0, top + title))
    return image


def write_strip(rows: list[tuple[str, np.ndarray]], dest: Path, overwrite: bool = False) -> None:
    with atomic_path(dest, overwrite) as tmp:
        strip(rows).save(tmp, format="PNG")


def sized_like(frames: np.ndarray, like: np.ndarray) -> np.ndarray:
    """`frames` at the size of the frames `like` (edits may be at the source's size)."""
    if frames.shape[1:3] != like.shape[1:3]:
        frames = videos.resize_frames(frames, (like.shape[2], like.shape[1]))
    return frames
