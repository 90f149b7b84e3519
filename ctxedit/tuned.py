"""A tuned run, loaded for editing and scoring: the model with its trained parameters, the context adapter and
shift, the cached source latents and prompt states."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ctxedit.diffusion import ShiftSchedule
from ctxedit.models import lora
from ctxedit.models.adapter import ContextAdapter
from ctxedit.models.inflate import VideoUNet
from ctxedit.models.sd import StableDiffusion, load_sd, resolve_device, resolve_precision
from ctxedit.models.spec import ModelSpec
from ctxedit.models.trained import build, load_trained
from ctxedit.runs import Run
from ctxedit.settings import EditSettings, TuneSettings, recorded_settings
from ctxedit.windows import Windows


@dataclass
class Tuned:
    """A tuned run, loaded: the model, its adapter, and the cached source latents and prompt states."""

    run: Run
    record: dict
    sd: StableDiffusion
    model: VideoUNet
    adapter: ContextAdapter | None
    shift: ShiftSchedule
    x0: torch.Tensor  # (1, f, c, h, w) source latents
    cached_text: torch.Tensor  # (1, tokens, dim): the source prompt's states as tuning encoded them
    weights: int | None = None  # the tuning step whose parameters are loaded (a kept checkpoint); None: the end
    lora_scales: list[float] = field(default_factory=list)  # the scales the LoRAs are at
    source_text: torch.Tensor | None = None  # the source prompt's states with the LoRAs at those scales

    def __post_init__(self) -> None:
        self.source_text = self.cached_text if self.source_text is None else self.source_text

    @property
    def prompt(self) -> str:
        return self.record["settings"]["prompt"]

    @property
    def seed(self) -> int:
        return self.record["settings"]["seed"]

    def use(self, settings: EditSettings) -> None:
        """The tuned parameters and LoRA scales `settings` asks for (--checkpoint, --lora-scale), unless in use."""
        if self.weights != settings.checkpoint:
            load_trained(self.run.weights_path(settings.checkpoint), self.model, self.adapter)
            self.weights = settings.checkpoint
        scales = lora.scales_for(self.sd.source.loras, settings.lora_scales())
        if scales != self.lora_scales:
            lora.set_scales(self.sd.components, scales)
            tuned_scales = scales == [entry.scale for entry in self.sd.source.loras]
            self.source_text = self.cached_text if tuned_scales else self.sd.encode_text([self.prompt])
            self.lora_scales = scales

    def shift_for(self, settings: EditSettings) -> ShiftSchedule:
        """The tuned context shift, scaled by the edit's `context_scale`."""
        return replace(self.shift, scale=self.shift.scale * settings.context_scale)

    def windows(self, overlap: int) -> Windows:
        """The windows the clip is run in, those of `overlap` frames."""
        window = recorded_settings(TuneSettings, self.record["settings"])["window"]
        return Windows(self.x0.shape[1], window, overlap)


def load_tuned(run: Run, device: str = "auto", precision: str = "auto") -> Tuned:
    from safetensors.torch import load_file

    record = run.require_tuned()
    torch_device = resolve_device(device)
    sd = load_sd(ModelSpec.from_record(record), torch_device, resolve_precision(precision, torch_device))
    settings = record["settings"]
    shift = ShiftSchedule(settings["context"], settings["context_scale"])
    model, adapter = build(sd, shift.active, settings["seed"])
    load_trained(run.tuned_path, model, adapter)
    cache = load_file(str(run.source_path), device=str(torch_device))
    tuned_scales = [entry.scale for entry in sd.source.loras]
    return Tuned(run, record, sd, model, adapter, shift, cache["latents"], cache["text"], lora_scales=tuned_scales)
