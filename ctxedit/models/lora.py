"""LoRA files on the frozen SD weights: diffusers/peft and kohya formats, read by diffusers' loader into peft layers.

Unfused: each LoRA's low-rank term runs beside the layer it adapts. The layers tuning trains (the attention queries)
then keep weights of their own, separate from every LoRA's, so a tuned run is edited with its LoRAs at any scale
(`edit --lora-scale`) and loading a kept checkpoint's parameters never mixes with a LoRA (fused, each would need an
unfuse and a fuse again). Cost: `benchmarks/lora.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ctxedit.errors import ModelError, UsageError, first_line
from ctxedit.files import verified_sha256


@dataclass(frozen=True)
class Lora:
    path: str
    scale: float = 1.0
    sha256: str | None = None  # a tuned run's: the file must still be that one

    @classmethod
    def parse(cls, spec: str) -> Lora:
        """FILE or FILE:SCALE (e.g. style.safetensors:0.7)."""
        path, _, scale = spec.rpartition(":")
        if not path or "/" in scale or "\\" in scale:
            return cls(spec)
        try:
            value = float(scale)
        except ValueError:
            raise UsageError(f"--lora takes FILE or FILE:SCALE (e.g. style.safetensors:0.7), got {spec!r}") from None
        if not math.isfinite(value):
            raise UsageError(f"--lora scale must be a finite number, got {scale}")
        return cls(path, value)


def _pipeline(parts: dict):
    """diffusers' LoRA loader over our components (a view: nothing is copied)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(  # no scheduler: the pipeline would rewrite an old-style scheduler config
        **{name: parts[name] for name in ("vae", "text_encoder", "tokenizer", "unet")}, scheduler=None,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def add_loras(parts: dict, loras: tuple[Lora, ...]) -> tuple[Lora, ...]:
    """Load each LoRA into the unet and text encoder of `parts` (unfused, at its scale); the LoRAs as loaded: absolute
    paths and digests."""
    if not loras:
        return ()
    pipeline, loaded = _pipeline(parts), []
    for i, lora in enumerate(loras):
        path = Path(lora.path).expanduser()
        digest = verified_sha256(path, lora.sha256, "the LoRA")
        name = f"lora{i}"
        try:
            pipeline.load_lora_weights(str(path), adapter_name=name)
        except (ValueError, KeyError, RuntimeError, OSError, TypeError) as error:
            raise ModelError(f"cannot load the LoRA {path}: {first_line(error)[:300]}") from error
        if not any(name in names for names in pipeline.get_list_adapters().values()):
            raise ModelError(f"the LoRA {path} adapts no layer of this model; is it for another base model?")
        loaded.append(Lora(str(path.resolve()), lora.scale, digest))
    set_scales(parts, [lora.scale for lora in loaded])
    return tuple(loaded)


def set_scales(parts: dict, scales: list[float]) -> None:
    """Put the loaded LoRAs (in loading order) at `scales`; their weights stay frozen (peft unfreezes them)."""
    _pipeline(parts).set_adapters([f"lora{i}" for i in range(len(scales))], adapter_weights=scales)
    for name in ("unet", "text_encoder"):
        for parameter_name, parameter in parts[name].named_parameters():
            if ".lora_" in parameter_name:
                parameter.requires_grad_(False)


def scales_for(loras: tuple[Lora, ...], asked: list[float]) -> list[float]:
    """The scales of a run's LoRAs under --lora-scale (`asked`: none, one for all, or one per LoRA)."""
    if asked and not loras:
        raise UsageError("--lora-scale: the run was tuned without a LoRA (tune --lora FILE)")
    if len(asked) not in (0, 1, len(loras)):
        raise UsageError(f"--lora-scale gives {len(asked)} scales; the run has {len(loras)} LoRAs")
    return [lora.scale for lora in loras] if not asked else asked * len(loras) if len(asked) == 1 else asked
