"""The run directory: where a tuning run keeps its record, caches, weights and edits; and progress events.

runs/<video-stem>/
  run.json               settings, versions, source video, loss summary, timings, one entry per edit
  run.json.lock          held while a process writes run.json (tuning, each edit, scores), so none loses another's
  source.safetensors     VAE latents of the frames and the source prompt's text states (computed once)
  tuned.safetensors      the trained UNet parameters and the context adapter, nothing else
  checkpoint.pt          tuning state for --resume (removed when tuning finishes)
  checkpoints/step-<n>.safetensors   trained parameters after step n (tune --keep-checkpoints)
  inversions/<key>.safetensors   inverted latents, keyed by every setting they depend on (.npy: a long clip's)
  .records.tmp-*/        a clip edited in windows: the source's records per window and step (while it lasts)
  edits/<slug>.mp4       the edited videos
  source-preview.mp4     the tuned frames as the model saw them, for the report (made by `ctxedit report`)
  report.html            the page of the run (`ctxedit report`)
"""

from __future__ import annotations

import json
import platform
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from ctxedit.errors import RunError
from ctxedit.files import write_json

RUNS_ROOT = Path("runs")


@dataclass(frozen=True)
class ProgressEvent:
    stage: str  # encode | tune | invert | edit | decode
    done: int
    total: int
    loss: float | None = None
    label: str = ""  # what the stage works on, e.g. the target text


Progress = Callable[[ProgressEvent], None]


def slugify(text: str, max_length: int = 60) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_length].rstrip("-") or "untitled"


@dataclass(frozen=True)
class Run:
    root: Path

    @property
    def record_path(self) -> Path:
        return self.root / "run.json"

    @property
    def source_path(self) -> Path:
        return self.root / "source.safetensors"

    @property
    def tuned_path(self) -> Path:
        return self.root / "tuned.safetensors"

    @property
    def checkpoint_path(self) -> Path:
        return self.root / "checkpoint.pt"

    @property
    def kept_dir(self) -> Path:
        return self.root / "checkpoints"

    def weights_path(self, step: int | None = None) -> Path:
        """The trained parameters after tuning step `step` (a kept checkpoint), or at the end (None)."""
        return self.tuned_path if step is None else self.kept_dir / f"step-{step}.safetensors"

    def kept_steps(self) -> list[int]:
        """The tuning steps whose parameters were kept (tune --keep-checkpoints), in order."""
        names = (path.stem.removeprefix("step-") for path in self.kept_dir.glob("step-*.safetensors"))
        return sorted(int(name) for name in names if name.isdigit())

    def inversion_path(self, key: str, suffix: str = ".safetensors") -> Path:
        return self.root / "inversions" / f"{key}{suffix}"

    def edit_path(self, target: str) -> Path:
        return self.root / "edits" / f"{slugify(target)}.mp4"

    def read_record(self) -> dict:
        if not self.record_path.exists():
            raise RunError(f"{self.root} holds no run; tune first: ctxedit tune VIDEO --prompt ... --run {self.root}")
        try:
            return json.loads(self.record_path.read_text())
        except json.JSONDecodeError as error:
            raise RunError(f"{self.record_path} is damaged ({error.msg}); tune again with --overwrite") from error

    def write_record(self, record: dict) -> None:
        """Replace the whole record (tuning, which owns the run while it runs)."""
        with self._lock():
            write_json(self.record_path, record)

    def update_record(self, change: Callable[[dict], None]) -> dict:
        """Apply `change` to the record as it is on disk now and write it back, both under the run's lock: what
        other processes recorded meanwhile (their edits, scores) is kept. Returns the new record."""
        with self._lock():
            record = self.read_record()
            change(record)
            write_json(self.record_path, record)
        return record

    def _lock(self) -> FileLock:
        """The inter-process lock of run.json (its file, and the folder, are made on first use; the file stays)."""
        return FileLock(self.root / "run.json.lock")

    def require_tuned(self) -> dict:
        """The record of a finished tuning run, or a RunError that says what to do."""
        record = self.read_record()
        if not self.tuned_path.exists() or "tuning" not in record:
            hint = "--resume it" if self.checkpoint_path.exists() else "run ctxedit tune"
            raise RunError(f"{self.root} has no finished tuning; {hint} first")
        return record


def latest_edits(record: dict) -> dict[str, dict]:
    """The last record entry of each edit file name (file names are unique in a run's edits/ folder; names,
    not paths, so that a run folder still matches after a move or from another working directory)."""
    return {Path(entry["path"]).name: entry for entry in record.get("edits", [])}


def source_chunks(record: dict) -> Iterator[np.ndarray]:
    """The tuned frames of the source, as the model saw them (processed size), `video.CHUNK` frames at a time."""
    from ctxedit import video as videos

    info = videos.probe(Path(record["video"]["path"]))
    size = (record["size"]["width"], record["size"]["height"])
    for chunk in videos.read_chunks(info, record["frames"]["indices"]):
        yield videos.resize_frames(chunk, size)


def source_frames(record: dict) -> np.ndarray:
    """The tuned frames of the source, as the model saw them (processed size)."""
    return np.concatenate(list(source_chunks(record)))


def default_run(video: Path) -> Run:
    return Run(RUNS_ROOT / slugify(video.stem))


def resolve_run(spec: str | None) -> Run:
    """A run directory by path, or `latest`: the run under runs/ whose record changed last."""
    if spec and spec != "latest":
        return Run(Path(spec))
    records = sorted(RUNS_ROOT.glob("*/run.json"), key=lambda p: p.stat().st_mtime)
    if not records:
        raise RunError(f"no runs under {RUNS_ROOT}/; tune first: ctxedit tune VIDEO --prompt ...")
    return Run(records[-1].parent)


def versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    from ctxedit import __version__

    return {
        "ctxedit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
