"""Typed settings of tuning and editing, validated on construction. Light to import: the CLI reads the defaults."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields

from ctxedit.errors import UsageError

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # overridden by $CTXEDIT_MODEL
CONTEXTS = ("quadratic", "prior", "noise", "off")
CROPS = ("none", "center")
ADAPTERS = ("auto", "fresh")  # or the folder of a pre-trained adapter
INVERSION_PROMPTS = ("source", "empty")
INVERSIONS = ("direct", "plain", "negative")
BLEND_MODES = ("auto", "off")  # or the words to blend, e.g. "circle" or "man,hat"
REALIGN_MODES = ("auto", "off")
INJECTIONS = ("whole", "layout")
SCORERS = ("attention", "caption", "clip")
OUTPUT_SIZES = ("processed", "source")
STEPS = 300  # tuning steps of a clip that fits one window: between the two releases (500 and 200)
STEPS_GROWTH = 0.5  # --steps auto: STEPS x (frames / window) ** this for a longer clip (benchmarks/long_clip.py)


def default_model() -> str:
    return os.environ.get("CTXEDIT_MODEL") or DEFAULT_MODEL


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"unknown {flag} {value!r}; choose one of {', '.join(allowed)}")


def check_scorer(scorer: str, model: str | None) -> None:
    """A known text scorer, with the model it needs (caption and clip load one)."""
    _choice("--scorer", scorer, SCORERS)
    if scorer != "attention" and not model:
        raise UsageError(f"--scorer {scorer} needs --scorer-model (a hub id or a local folder)")


def parse_time(flag: str, value: float | str | None) -> float | None:
    """Seconds from a number or '[h:]mm:ss[.ff]' (e.g. '1:05.5'); None stays None."""
    if value is None:
        return None
    problem = UsageError(f"{flag} takes seconds (e.g. 12.5), mm:ss or h:mm:ss (e.g. 1:05), got {value!r}")
    parts = str(value).strip().split(":")
    try:
        numbers = [float(part) for part in parts]
    except ValueError:
        raise problem from None
    if len(parts) > 3 or any(not math.isfinite(n) or n < 0 for n in numbers) or any(n >= 60 for n in numbers[1:]):
        raise problem
    return sum(n * 60**power for power, n in enumerate(reversed(numbers)))


def _at_least(flag: str, value: float, low: float) -> None:
    if not (math.isfinite(value) and value >= low):
        raise UsageError(f"{flag} must be a number >= {low}, got {value}")


def recorded_settings(cls: type, values: dict) -> dict:
    """Settings as recorded; a setting `cls` gained since is what the recorded run did without it (its `before`
    metadata: the value of the old behaviour), else its default."""
    return {f.name: values.get(f.name, f.metadata.get("before", f.default)) for f in fields(cls)}


@dataclass(frozen=True)
class TuneSettings:
    prompt: str  # the source caption, e.g. "a man is skiing"
    frames: int | str = 8  # ContextDiff's release (Tune-A-Video used 24); "all": the whole selection
    stride: int = 2  # every 2nd frame: more motion per clip at the same cost
    start: int = 0  # index of the first frame
    from_time: float | str | None = None  # --from: where the selection starts, seconds or [h:]mm:ss (not with start)
    to_time: float | str | None = None  # --to: where it ends (exclusive); None: the end of the video
    window: int = 8  # frames the model sees at once; longer selections are tuned and edited in windows
    size: int | str = "auto"  # short side in pixels; "auto": the model's native one (512 SD 1.x, 768 SD 2.x 768-v)
    crop: str = "none"  # keep the aspect ratio; "center" gives a square
    steps: int | str = "auto"  # "auto": STEPS, growing with a clip longer than the window (steps_for)
    lr: float = 3e-5  # Tune-A-Video's UNet learning rate
    adapter_lr: float = 1e-4  # higher than the UNet's: the adapter starts from a zero head
    context: str = "quadratic"  # shift schedule; "off" is exact Tune-A-Video
    context_scale: float = 1.0
    adapter: str = "fresh"  # zero head; "auto": MODEL/adapter if any (pre-trained ones measured no better); a folder
    seed: int = 33
    weight_decay: float = 1e-2  # AdamW, as Tune-A-Video
    max_grad_norm: float = 1.0  # clipped per group: UNet and adapter separately
    checkpoint_every: int = 50  # steps between resumable checkpoints
    keep_checkpoints: bool = False  # also keep the parameters of every checkpoint (edit --checkpoint, candidates)

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise UsageError("--prompt is empty; describe the source video, e.g. --prompt 'a man is skiing'")
        _choice("--crop", self.crop, CROPS)
        _choice("--context", self.context, CONTEXTS)
        named = (("--frames", "frames", "all"), ("--steps", "steps", "auto"), ("--size", "size", "auto"))
        for flag, name, word in named:
            if getattr(self, name) != word:
                try:
                    object.__setattr__(self, name, int(getattr(self, name)))
                except ValueError:
                    raise UsageError(f"{flag} takes a number or '{word}', got {getattr(self, name)!r}") from None
        for flag, value in (("--frames", self.frames), ("--stride", self.stride), ("--steps", self.steps)):
            _at_least(flag, 1 if value in ("all", "auto") else value, 1)
        _at_least("--start", self.start, 0)
        _at_least("--window", self.window, 2)
        object.__setattr__(self, "from_time", parse_time("--from", self.from_time))
        object.__setattr__(self, "to_time", parse_time("--to", self.to_time))
        if self.from_time is not None and self.start:
            raise UsageError("give --start (a frame index) or --from (a time), not both")
        if None not in (self.from_time, self.to_time) and self.to_time <= self.from_time:
            raise UsageError(f"--to ({self.to_time:g} s) must come after --from ({self.from_time:g} s)")
        _at_least("--size", 1 if self.size == "auto" else self.size, 1)
        _at_least("--lr", self.lr, 0)
        _at_least("--adapter-lr", self.adapter_lr, 0)
        _at_least("--context-scale", abs(self.context_scale), 0)
        if self.adapter not in ADAPTERS and (self.context == "off" or self.context_scale == 0):
            raise UsageError("--adapter PATH needs the context on: --context quadratic, prior or noise")
        _at_least("--checkpoint-every", self.checkpoint_every, 1)

    def to_dict(self) -> dict:
        return asdict(self)

    def steps_for(self, frames: int) -> int:
        """The tuning steps of a selection of `frames`: --steps, or for "auto" STEPS, times (frames / window) **
        STEPS_GROWTH for a clip longer than the window (each step sees one window of it)."""
        if self.steps != "auto":
            return self.steps
        return round(STEPS * max(1.0, frames / self.window) ** STEPS_GROWTH)

    def size_for(self, native: int) -> int:
        """The short side in pixels on a model whose native one is `native`: --size, or for "auto" `native`."""
        return native if self.size == "auto" else self.size

    def differences(self, record: dict) -> list[str]:
        """Settings that differ from those of a run's record, as 'name: recorded -> now'. Steps and size compare as the
        number they come to on the run's frames and model (a run records those numbers); a setting recorded before it
        existed counts as its default."""
        recorded = recorded_settings(type(self), record["settings"])
        given = self.to_dict()
        native = record.get("size", {}).get("native", 512)  # runs from before SD 2.x were all SD 1.x's 512
        now = given | {"steps": self.steps_for(len(record["frames"]["indices"])), "size": self.size_for(native)}
        return [
            f"{name}: {recorded[name]!r} -> {given[name]!r}" + (f" ({value})" if value != given[name] else "")
            for name, value in now.items()
            if recorded[name] != value
        ]


def _fraction(flag: str, value: float, low_open: bool = False) -> None:
    if not (math.isfinite(value) and (0 < value if low_open else 0 <= value) and value <= 1):
        raise UsageError(f"{flag} must be a fraction in {'(0' if low_open else '[0'}, 1], got {value}")


STAGES = ("inversion", "source", "edit")  # what an edit setting changes: each stage depends on those before it


def _stage(stage: str, default: object = None, before: object = None):
    """A setting that the edit's `stage` and every later one depend on (`EditSettings.depending`); `before`: the
    value that acts as edits did before the setting existed, for their records (`recorded_settings`)."""
    return field(default=default, metadata={"stage": stage} | ({"before": before} if before is not None else {}))


@dataclass(frozen=True)
class EditSettings:
    """Every field declares the first stage it changes: the inverted trajectory (cached in the run), the source pass
    (corrections, records, word maps; shared by the edits in a row) or only the edit. Cache keys come from that."""

    steps: int = _stage("inversion", 50)  # DDIM steps for inversion and for sampling
    guidance: float = _stage("source", 7.5)  # ContextDiff's CFG scale; Tune-A-Video used 12.5
    inversion_prompt: str = _stage("inversion", "source")  # "empty" is Tune-A-Video's inversion
    inversion: str = _stage("source", "direct")  # direct: the source reconstructs exactly under guidance
    keep_structure: float = _stage("source", 0.4)  # first fraction of the sampled steps that take the source's features
    keep_words: float = _stage("source", 0.8)  # ...where shared words take the source's cross-attention
    blend: str = _stage("source", "auto")  # auto: outside the changed words' region the source stays; off; or words
    strength: float = _stage("source", 1.0)  # fraction of the steps inverted and resampled; lower keeps more
    keep_inside: float = _stage("edit", 0.4, 1.0)  # inside the changed region, corrections and features this long
    inject: str = _stage("edit", "layout", "whole")  # inside the region, the injected features in the edit's statistics
    propagate: float = _stage("edit", 0.15, 0.0)  # share of each pixel's change taken from its matches in next frames
    realign: str = _stage("edit", "off")  # auto: the words the target changes get more attention in their region, early
    candidates: int = _stage("edit", 1)  # > 1: that many edits that differ (eta seeds, guidance, structure, ...)
    scorer: str = _stage("edit", "attention")  # text alignment of the candidates: attention | caption | clip
    scorer_model: str | None = _stage("edit")  # captioner (BLIP, or "shapes") or CLIP model, hub id or folder
    context_scale: float = _stage("inversion", 1.0)  # times the tuned context shift, in inversion and sampling alike
    lora_scale: float | str | None = _stage("inversion")  # the LoRAs' scales (0.5, or one per LoRA "0.5,1"), kept as
    # text; None: as tuned
    overlap: int = _stage("inversion", 2)  # frames shared by neighbouring windows of a clip longer than the window
    checkpoint: int | None = _stage("inversion")  # the parameters after this tuning step (tune --keep-checkpoints)
    eta: float = _stage("edit", 0.0)  # 0: deterministic DDIM; > 0 adds seeded noise
    seed: int | None = _stage("edit")  # None: the run's tuning seed

    def __post_init__(self) -> None:
        _choice("--inversion-prompt", self.inversion_prompt, INVERSION_PROMPTS)
        _choice("--inversion", self.inversion, INVERSIONS)
        _choice("--realign", self.realign, REALIGN_MODES)
        _choice("--inject", self.inject, INJECTIONS)
        check_scorer(self.scorer, self.scorer_model)
        if not 1 <= self.candidates <= 32:
            raise UsageError(f"--candidates must be between 1 and 32, got {self.candidates}")
        _at_least("--steps", self.steps, 1)
        _at_least("--guidance", self.guidance, 0)
        _at_least("--context-scale", self.context_scale, 0)
        _at_least("--overlap", self.overlap, 0)
        if self.checkpoint is not None:
            _at_least("--checkpoint", self.checkpoint, 1)
        if not 0 <= self.eta <= 1:  # above 1, DDIM's sqrt(1 - alpha_prev - sigma^2) can go negative: NaN latents
            raise UsageError(f"--eta must be between 0 (deterministic) and 1 (DDPM-like), got {self.eta}")
        _fraction("--keep-structure", self.keep_structure)
        _fraction("--keep-words", self.keep_words)
        _fraction("--keep-inside", self.keep_inside)
        _fraction("--propagate", self.propagate)
        _fraction("--strength", self.strength, low_open=True)
        if self.lora_scale is not None:
            object.__setattr__(self, "lora_scale", ",".join(map(repr, self.lora_scales())))
        if not self.blend_words() and self.blend not in BLEND_MODES:
            raise UsageError(f"--blend takes auto, off or words (e.g. 'circle' or 'man,hat'), got {self.blend!r}")

    def lora_scales(self) -> list[float]:
        """The scales --lora-scale gives ([] for None): one for every LoRA, or one per LoRA in tuning's order."""
        if self.lora_scale is None:
            return []
        try:
            scales = [float(part) for part in str(self.lora_scale).split(",")]
        except ValueError:
            scales = []
        if not scales or not all(math.isfinite(scale) for scale in scales):
            raise UsageError(f"--lora-scale takes a number, or one per LoRA (e.g. 0.5,1), got {self.lora_scale!r}")
        return scales

    def blend_words(self) -> list[str]:
        """The words --blend names, or [] for auto and off."""
        if self.blend in BLEND_MODES:
            return []
        return [word for word in self.blend.replace(",", " ").split() if word]

    @property
    def first_step(self) -> int:
        """Index of the first sampling step: partial inversion (--strength) skips the noisiest ones."""
        return self.steps - max(1, round(self.strength * self.steps))

    def to_dict(self) -> dict:
        return asdict(self)

    def depending(self, stage: str) -> tuple[tuple[str, object], ...]:
        """(name, value) of every setting that `stage` depends on: those of its own stage and the stages before."""
        before = STAGES[: STAGES.index(stage) + 1]
        return tuple((f.name, getattr(self, f.name)) for f in fields(self) if f.metadata["stage"] in before)


@dataclass(frozen=True)
class OutputSettings:
    size: str = "processed"  # "source": scaled back to the source's resolution (Lanczos)
    fps: float | None = None  # None: the source's rate over the stride; another rate drops the audio
    gif: bool = False  # a GIF beside each MP4
    side_by_side: bool = False  # source | edits in one captioned video
    grid: bool = False  # source and edits in a captioned grid, for many targets
    keep_candidates: bool = False  # with candidates > 1, every candidate beside the chosen edit

    def __post_init__(self) -> None:
        _choice("--output-size", self.size, OUTPUT_SIZES)
        if self.fps is not None and not (math.isfinite(self.fps) and 0 < self.fps <= 240):
            raise UsageError(f"--fps must be between 0 and 240, got {self.fps}")

    def to_dict(self) -> dict:
        return asdict(self)
