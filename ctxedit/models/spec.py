"""What a run loads: the model the user named (hub id, diffusers folder or one .safetensors file) with its LoRAs and
embeddings, and where the weights were read from. Light to import (presets read it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ctxedit.models.embeddings import Embedding
from ctxedit.models.lora import Lora


@dataclass(frozen=True)
class ModelSpec:
    """What to load: a model (hub id, diffusers folder or one .safetensors file) and the LoRAs and textual-inversion
    embeddings added to it. Where a digest is given (a tuned run's record), the file must still be that one."""

    model: str
    config: str | None = None  # a single file's architecture: a shipped family (formats.FAMILIES) or a folder
    sha256: str | None = None
    loras: tuple[Lora, ...] = ()
    embeddings: tuple[Embedding, ...] = ()

    @classmethod
    def from_record(cls, record: dict) -> ModelSpec:
        """The model a run was tuned with (a single file, or a folder while that is there, else its hub id), with
        the digests its files must still have."""
        model = record["model"]
        return cls(
            model["path"] if model.get("sha256") or Path(model["path"]).exists() else model["id"],
            model.get("config"),
            model.get("sha256"),
            tuple(Lora(lora["path"], lora["scale"], lora["sha256"]) for lora in model.get("loras", [])),
            tuple(Embedding(e["path"], e["token"], e["sha256"]) for e in model.get("embeddings", [])),
        )

    def differences(self, record: dict) -> list[str]:
        """How this differs from the model a run's record names, as 'what: recorded -> now'. What this leaves to be
        found out (a single file's architecture, an embedding's token) is not a difference."""
        model = record["model"]
        tokens = [e.token for e in self.embeddings]
        recorded = {
            "model": model["id"],
            "model config": model.get("config") if self.config is not None else None,
            "LoRAs": [(Path(lora["path"]).resolve(), lora["scale"]) for lora in model.get("loras", [])],
            "embeddings": [
                (Path(e["path"]).resolve(), e["token"] if i < len(tokens) and tokens[i] is not None else None)
                for i, e in enumerate(model.get("embeddings", []))
            ],
        }
        now = {
            "model": self.model,
            "model config": self.config,
            "LoRAs": [(Path(lora.path).expanduser().resolve(), lora.scale) for lora in self.loras],
            "embeddings": [(Path(e.path).expanduser().resolve(), e.token) for e in self.embeddings],
        }
        return [f"{what}: {recorded[what]!r} -> {now[what]!r}" for what in now if recorded[what] != now[what]]


@dataclass(frozen=True)
class ModelSource:
    """Where the weights were read from, recorded in the run: enough to load the same model again."""

    id: str  # what the user gave: hub id, folder or file
    path: str  # the local folder or file the weights were read from
    revision: str | None  # hub commit, None for a local folder or file
    sha256: str | None = None  # a single file's digest
    config: str | None = None  # a single file's architecture
    loras: tuple[Lora, ...] = ()  # with their digests
    embeddings: tuple[Embedding, ...] = ()


def describe(model: dict) -> str:
    """A run record's model in one line: the model (and a single file's architecture), its LoRAs and embeddings."""
    parts = [model["id"] + (f" ({model['config']})" if model.get("config") else "")]
    parts += [f"LoRA {Path(lora['path']).name} at {lora['scale']:g}" for lora in model.get("loras", [])]
    parts += [f"embedding {e['token']} ({Path(e['path']).name})" for e in model.get("embeddings", [])]
    return ", ".join(parts)
