"""Scores of an edit that need no ground truth, on three axes: how well it says the target text, how steady it
is from frame to frame, how much of the source's structure it keeps. Higher is better on every axis.

Text alignment has pluggable scorers, each a callable `(frames, text) -> float`:
- `caption`: a captioner describes sampled frames and the reward is how close the captions are to the target
  text in the text encoder's space (RealignDiff's caption reward). Captioners: BLIP from transformers (hub id or
  local folder), or the shapes world's own (`shapes`: its detectors write the caption of a frame);
- `clip`: CLIP's frame-text score, as published (100 x cosine, averaged over frames);
- `attention`: no extra model: the UNet's own cross-attention mass on the words the target changes, at late
  (low-noise) timesteps of the edit re-noised.
Frame consistency and preservation are computed from pixels: how the edit changes from frame to frame against how
the source does, and how well the edges of each edited frame match the source's. Beside them the warp error, the
video-editing benchmarks' temporal measure (lower is steadier): each edited frame warped onto the next along the
source's optical flow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ctxedit.errors import ModelError, UsageError, first_line
from ctxedit.prompts import Target, expanded, parse_target
from ctxedit.windows import Windows

TextScorer = Callable[[np.ndarray, Target], float]
CAPTION_FRAMES = 8  # frames captioned per edit, spread over the clip (all of an 8-frame clip: a wrong one counts)
ATTENTION_TIMESTEPS = (100, 250)  # late denoising: the picture is formed, the words point at what is there


@dataclass(frozen=True)
class Scores:
    text: float
    consistency: float
    preservation: float
    warp_error: float  # lower is steadier (`warp_error`)

    def axes(self) -> dict[str, float]:
        return {"text": self.text, "consistency": self.consistency, "preservation": self.preservation,
                "warp_error": self.warp_error}  # fmt: skip


def _grey(frames: np.ndarray) -> np.ndarray:
    return frames.astype(np.float32).mean(-1) / 255


def consistency(frames: np.ndarray, source: np.ndarray) -> float:
    """Minus the mean difference between the edit's frame-to-frame change and the source's (0 is as steady as
    the source; flicker and lost motion lower it)."""
    if len(frames) < 2:
        return 0.0
    edit, src = _grey(frames), _grey(source)
    return -float(np.abs(np.diff(edit, axis=0) - np.diff(src, axis=0)).mean())


WARP_FLOW_SIZE = 256  # the long side optical flow is computed at: a clip's motion, not its fine texture


def _flows(grey: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Optical flow (OpenCV's DIS) between neighbouring grey uint8 frames: (forward t -> t+1, backward t+1 -> t),
    each (h, w, 2) in pixels."""
    import cv2

    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    forward = [dis.calc(a, b, None) for a, b in zip(grey[:-1], grey[1:], strict=True)]
    backward = [dis.calc(b, a, None) for a, b in zip(grey[:-1], grey[1:], strict=True)]
    return forward, backward


def warp_error(frames: np.ndarray, source: np.ndarray) -> float:
    """The video-editing benchmarks' temporal measure: each edited frame warped along the SOURCE's optical flow onto
    the next, the mean absolute RGB difference (0-255) to that next frame where the flow is reliable (forward and
    backward flow agree, i.e. not occluded). Needs no model weights; 0 is an edit that moves exactly as the source;
    flicker and wobble raise it. Frames (f, h, w, 3) uint8, at the source's size."""
    import cv2

    if len(frames) < 2:
        return 0.0
    scale = min(1.0, WARP_FLOW_SIZE / max(source.shape[1:3]))
    size = (round(source.shape[2] * scale), round(source.shape[1] * scale))
    small = lambda clip: np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in clip])  # noqa: E731
    edit, src = small(frames), small(source)
    forward, backward = _flows(np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in src]))
    h, w = edit.shape[1:3]
    grid = np.stack(np.meshgrid(np.arange(w), np.arange(h)), -1).astype(np.float32)  # (h, w, 2) as (x, y)
    errors, counted = 0.0, 0
    for t, (fw, bw) in enumerate(zip(forward, backward, strict=True)):
        back = grid + bw  # where each pixel of frame t+1 was in frame t
        warped = cv2.remap(edit[t], back[..., 0], back[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        there = cv2.remap(fw, back[..., 0], back[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        mismatch = np.square(bw + there).sum(-1)  # forward-backward check (Sundaram et al.)
        reliable = mismatch <= 0.01 * (np.square(bw).sum(-1) + np.square(there).sum(-1)) + 0.5
        inside = (back[..., 0] >= 0) & (back[..., 0] <= w - 1) & (back[..., 1] >= 0) & (back[..., 1] <= h - 1)
        keep = reliable & inside
        errors += float(np.abs(warped.astype(np.float32) - edit[t + 1].astype(np.float32))[keep].sum())
        counted += int(keep.sum()) * 3
    return errors / max(counted, 1)


def _edges(grey: np.ndarray) -> np.ndarray:
    dy, dx = np.gradient(grey, axis=(-2, -1))
    return np.hypot(dx, dy)


def preservation(frames: np.ndarray, source: np.ndarray) -> float:
    """Correlation of the edit's edge magnitudes with the source's, mean over frames (1: the same layout)."""
    edit, src = _edges(_grey(frames)), _edges(_grey(source))
    correlations = []
    for a, b in zip(edit.reshape(len(edit), -1), src.reshape(len(src), -1), strict=True):
        a, b = a - a.mean(), b - b.mean()
        correlations.append(float((a * b).sum() / max(np.sqrt((a * a).sum() * (b * b).sum()), 1e-12)))
    return float(np.mean(correlations))


def sampled(frames: np.ndarray, count: int = CAPTION_FRAMES) -> np.ndarray:
    return frames[np.unique(np.linspace(0, len(frames) - 1, count).round().astype(int))]


# ---- text alignment ----------------------------------------------------------------------------------------


def caption_reward(captioner: Callable[[np.ndarray], list[str]], embed: Callable[[list[str]], torch.Tensor]):
    """RealignDiff's caption reward: mean cosine similarity of the captions of sampled frames with the text."""

    def score(frames: np.ndarray, target: Target) -> float:
        captions = captioner(sampled(frames))
        vectors = F.normalize(embed([target.text, *captions]).float(), dim=-1)
        return float((vectors[1:] @ vectors[0]).mean())

    return score


def text_embedder(sd) -> Callable[[list[str]], torch.Tensor]:
    """Pooled embeddings (the end token's state) of SD's own text encoder."""

    @torch.no_grad()
    def embed(texts: list[str]) -> torch.Tensor:
        texts = [expanded(sd.tokenizer, text) for text in texts]
        ids = sd.tokenizer(texts, padding="max_length", max_length=sd.tokenizer.model_max_length, truncation=True,
                           return_tensors="pt").input_ids.to(sd.device)  # fmt: skip
        return sd.text_encoder(ids).pooler_output

    return embed


def blip_captioner(model_id: str, device: torch.device) -> Callable[[np.ndarray], list[str]]:
    """Captions from a BLIP captioning model (hub id or local folder), greedy, up to 30 tokens."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor, model = _load(model_id, BlipProcessor, BlipForConditionalGeneration, device)

    @torch.no_grad()
    def caption(frames: np.ndarray) -> list[str]:
        inputs = processor(images=list(frames), return_tensors="pt").to(device)
        out = model.generate(**inputs, max_new_tokens=30, do_sample=False)
        return [text.strip() for text in processor.batch_decode(out, skip_special_tokens=True)]

    return caption


def clip_scorer(
    model_id: str, device: torch.device
) -> tuple[Callable[[np.ndarray, str], float], Callable[[np.ndarray], float]]:
    """(CLIP frame-text score, CLIP frame consistency): 100 x cosine of each frame with the text, and of
    consecutive frames with each other, averaged (Tune-A-Video's protocol)."""
    from transformers import CLIPModel, CLIPProcessor

    processor, model = _load(model_id, CLIPProcessor, CLIPModel, device)

    @torch.no_grad()
    def images(frames: np.ndarray) -> torch.Tensor:
        pixels = processor(images=list(frames), return_tensors="pt").pixel_values.to(device)
        return F.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)

    @torch.no_grad()
    def text_score(frames: np.ndarray, text: str) -> float:
        ids = processor(text=[text], return_tensors="pt", padding=True, truncation=True).to(device)
        words = F.normalize(_features(model.get_text_features(**ids)), dim=-1)
        return float(100 * (images(frames) @ words[0]).mean())

    def frame_consistency(frames: np.ndarray) -> float:
        vectors = images(frames)
        return float(100 * (vectors[1:] * vectors[:-1]).sum(-1).mean()) if len(vectors) > 1 else 100.0

    return text_score, frame_consistency


def _features(output) -> torch.Tensor:
    """transformers 5 returns the projected features in an output object, 4 returned the tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _load(model_id: str, processor_class, model_class, device: torch.device):
    """A transformers processor and model from a local folder or a hub id (HF_HUB_OFFLINE respected)."""
    from ctxedit.models.sd import hub_snapshot, quiet_hf_libraries

    quiet_hf_libraries()
    folder = Path(model_id).expanduser()
    if not folder.exists():
        if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
            raise ModelError(f"scorer model folder {model_id} does not exist")
        patterns = ["*.json", "*.txt", "*.safetensors", "*.model"]
        folder = hub_snapshot(model_id, patterns, f"a local {model_class.__name__} folder")
    try:
        return processor_class.from_pretrained(folder), model_class.from_pretrained(folder).to(device).eval()
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load {model_id} as {model_class.__name__}: {first_line(error)}") from None


@torch.no_grad()
def attention_mass(
    sd, model, frames: np.ndarray, target: Target, windows: Windows | None = None, generator_seed: int = 0
) -> float:
    """Share of the cross-attention (decoder layers, conditional pass) that the words `target` changes receive over
    all its word tokens, with the edit re-noised to `ATTENTION_TIMESTEPS`: how much the model finds them there. A
    clip longer than the model's window is run a window at a time (`windows`)."""
    from ctxedit.attention import Session, WordMaps, attention_layers

    if not target.changed:
        return 0.0  # the target changes no word: nothing to find, every candidate alike
    latents = sd.encode_frames(frames)
    windows = windows or Windows(latents.shape[1], latents.shape[1], 0)
    states = sd.encode_text([target.text])
    words = list(range(1, target.tokens - 1))
    layers = tuple(name for name in attention_layers(sd.unet, "attn2") if name.startswith("up_blocks"))
    generator = torch.Generator(sd.device).manual_seed(generator_seed)
    masses = []
    for t in ATTENTION_TIMESTEPS:
        noise = torch.randn(latents.shape, generator=generator, device=sd.device)
        noisy = sd.scheduler.add_noise(latents, noise, torch.tensor([t]))
        session = Session(word_maps=WordMaps(layers, tuple(latents.shape[-2:]), clip_frames=windows.frames))
        for frames_of_window in windows.sequences:
            positions = frames_of_window if windows.split else None
            with model.control.applying(session, positions), sd.autocast():
                model(noisy[:, frames_of_window].to(sd.dtype), t, states.to(sd.dtype))
        seen = torch.zeros(windows.frames, device=sd.device)  # how often each frame was run (the anchor: each window)
        for frames_of_window in windows.sequences:
            seen[frames_of_window] += 1
        maps = session.word_maps.total / seen[:, None, None, None]  # (f, tokens, h, w), each frame counted once
        masses.append(float(maps[:, target.changed].sum() / maps[:, words].sum()))
    return float(np.mean(masses))


def text_scorer(kind: str, model_id: str | None, sd, model, windows: Windows | None = None) -> TextScorer:
    """The text-alignment scorer `kind` (attention | caption | clip); `model_id` names the captioner (a BLIP model,
    or "shapes" for the shapes world's) or the CLIP model; the attention scorer runs `model` over `windows`."""
    if kind == "attention":
        return lambda frames, target: attention_mass(sd, model, frames, target, windows)
    if kind == "clip":
        clip = clip_scorer(model_id, sd.device)[0]
        return lambda frames, target: clip(frames, target.text)
    if model_id == "shapes":
        from ctxedit.toy.detect import caption

        return caption_reward(lambda frames: [caption(f) for f in frames], text_embedder(sd))
    return caption_reward(blip_captioner(model_id, sd.device), text_embedder(sd))


def score(frames: np.ndarray, source: np.ndarray, target: Target, text_score: TextScorer) -> Scores:
    steadiness = consistency(frames, source), preservation(frames, source), warp_error(frames, source)
    return Scores(text_score(frames, target), *steadiness)


def axis_ranks(candidates: list[dict[str, float]], axis: str) -> list[float]:
    """Rank of each candidate on one axis (0 is the best, higher scores are better; ties share their mean rank)."""
    values = np.array([-c[axis] for c in candidates])
    order = values.argsort(kind="stable")
    rank = np.empty(len(values))
    rank[order] = np.arange(len(values))
    for value in np.unique(values):  # ties
        rank[values == value] = rank[values == value].mean()
    return [float(r) for r in rank]


def fused_ranks(candidates: list[dict[str, float]], axes: tuple[str, ...]) -> list[float]:
    """Mean rank of each candidate over `axes`: scores of different scales fused by their ranks alone."""
    return [float(r) for r in np.mean([axis_ranks(candidates, axis) for axis in axes], axis=0)]


def score_run(
    run, edits: list[Path], scorer: str, scorer_model: str | None, device: str = "auto", precision: str = "auto"
) -> list[dict]:
    """Score the run's recorded edits (all, or those at the paths `edits`) and record the scores in run.json."""
    from ctxedit import video
    from ctxedit.compose import sized_like
    from ctxedit.runs import source_frames
    from ctxedit.settings import EditSettings, check_scorer, recorded_settings
    from ctxedit.tuned import load_tuned

    check_scorer(scorer, scorer_model)
    record = run.require_tuned()
    latest = {str(Path(e["path"]).resolve()): e for e in record["edits"]}  # a re-made edit: its last entry
    chosen = [str(p.resolve()) for p in edits] if edits else list(latest)
    for path, given in zip(chosen, edits or chosen, strict=True):
        if path not in latest:
            raise UsageError(f"{given} is not an edit recorded in {run.root} (`ctxedit info` lists them)")
        if not Path(path).exists():
            raise UsageError(f"{given} is recorded but no longer exists")
    if not chosen:
        raise UsageError(f"{run.root} holds no edits yet; make some with ctxedit edit --target ...")
    tuned = load_tuned(run, device, precision)
    source = source_frames(record)
    text_score = text_scorer(scorer, scorer_model, tuned.sd, tuned.model, tuned.windows(0))
    results = []
    for path in chosen:
        entry = latest[path]
        tuned.use(EditSettings(**recorded_settings(EditSettings, entry.get("settings", {}))))  # its checkpoint, LoRAs
        chunks = video.read_chunks(video.probe(Path(path)), list(range(len(source))))
        frames = np.concatenate([sized_like(chunk, source) for chunk in chunks])  # at the model's size
        target = parse_target(tuned.sd.tokenizer, tuned.prompt, entry["target"])
        axes = score(frames, source, target, text_score).axes()
        entry.setdefault("scores", {})[scorer] = axes
        results.append({"path": entry["path"], "target": entry["target"], "scorer": scorer, **axes})

    def add_scores(now: dict) -> None:  # to the record as it is now: another process may have recorded since
        latest_now = {str(Path(e["path"]).resolve()): e for e in now["edits"]}
        for path in set(chosen) & set(latest_now):
            latest_now[path].setdefault("scores", {})[scorer] = latest[path]["scores"][scorer]

    run.update_record(add_scores)
    return results
