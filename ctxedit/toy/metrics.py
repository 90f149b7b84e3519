"""How good an edit of a shapes-world clip is, measured against the exact ground truth.

An edit asks one object of the source clip to change colour and/or shape. Measured per edit:
- attribute: fraction of frames where that object shows the target colour and shape;
- binding: fraction of frames where every other object kept its colour and shape (two-object clips);
- exact: fraction of frames showing exactly the target's objects, counted (no leftover, duplicate or extra);
- drift: distance of the edited object's centroid from the source trajectory (mean and p90, px);
- jitter: frame-to-frame motion of the edited object minus the source's motion (mean, px);
- mask IoU of the edited object against the source object; background PSNR outside all objects;
- colour error: RGB distance of the edited object's median colour from the target colour (mean over frames);
- area: the edited object's area over the source object's (mean over frames; 1 is the source's size).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctxedit.toy.detect import Detection, detect, shows
from ctxedit.toy.world import COLOURS, Clip


@dataclass
class EditScore:
    attribute: float
    binding: float | None  # None for one-object clips
    exact: float
    drift_mean: float
    drift_p90: float
    jitter: float
    mask_iou: float
    background_psnr: float
    colour_error: float
    area: float


def _nearest(detections: list[Detection], point: tuple[float, float]) -> Detection | None:
    return min(detections, key=lambda d: np.hypot(*np.subtract(d.centroid, point)), default=None)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(float) - b.astype(float)) ** 2)) if a.size else 0.0
    return float(10 * np.log10(255**2 / max(mse, 1e-10)))


def score_edit(source: Clip, target: Clip, index: int, source_frames: np.ndarray, frames: np.ndarray) -> EditScore:
    """Score `frames`, an edit of `source` towards `target` (which differs in object `index` only)."""
    wanted = target.objects[index]
    _, source_masks = source.render()
    attribute, binding, exact, drift, centres, ious, colour_errors, areas = [], [], [], [], [], [], [], []
    for f, frame in enumerate(frames):
        detections = detect(frame)
        truth = source.objects[index].centre(f)
        matches = [d for d in detections if (d.colour, d.shape) == (wanted.colour, wanted.shape)]
        edited = _nearest(matches, truth) or _nearest(detections, truth)
        attribute.append(bool(matches))
        exact.append(shows(frame, target, detections))
        if edited is None:  # the object vanished: the worst drift the frame allows
            drift.append(float(np.hypot(*frame.shape[:2])))
            centres.append(truth)
            ious.append(0.0)
        else:
            drift.append(float(np.hypot(*np.subtract(edited.centroid, truth))))
            centres.append(edited.centroid)
            union = (edited.mask | source_masks[f, index]).sum()
            ious.append(float((edited.mask & source_masks[f, index]).sum() / max(1, union)))
            median = np.median(frame[edited.mask].astype(float), axis=0)
            colour_errors.append(float(np.linalg.norm(median - np.array(COLOURS[wanted.colour]))))
            areas.append(float(edited.mask.sum() / max(1, source_masks[f, index].sum())))
        others = [o for i, o in enumerate(source.objects) if i != index]
        kept = [_nearest(detections, o.centre(f)) for o in others]
        pairs = zip(kept, others, strict=True)
        binding.append(all(d is not None and (d.colour, d.shape) == (o.colour, o.shape) for d, o in pairs))
    source_path = np.array([source.objects[index].centre(f) for f in range(len(frames))])
    jitter = np.linalg.norm(np.diff(np.array(centres), axis=0) - np.diff(source_path, axis=0), axis=1)
    outside = ~np.any(np.concatenate([source_masks, target.render()[1]], axis=1), axis=1)
    outside &= np.roll(outside, 2, axis=1) & np.roll(outside, -2, axis=1)
    outside &= np.roll(outside, 2, axis=2) & np.roll(outside, -2, axis=2)  # 2 px away from every object
    return EditScore(
        attribute=float(np.mean(attribute)),
        binding=float(np.mean(binding)) if len(source.objects) > 1 else None,
        exact=float(np.mean(exact)),
        drift_mean=float(np.mean(drift)),
        drift_p90=float(np.percentile(drift, 90)),
        jitter=float(jitter.mean()) if len(jitter) else 0.0,
        mask_iou=float(np.mean(ious)),
        background_psnr=_psnr(frames[outside], source_frames[outside]),
        colour_error=float(np.mean(colour_errors)) if colour_errors else float(np.hypot(255, 255)),
        area=float(np.mean(areas)) if areas else 0.0,
    )
