"""Clips longer than the model's window: which frames each window holds, how windows' outputs are blended, and what
a clip run in windows keeps on disk (its inverted trajectory, direct inversion's landings, the source's records).

Every window holds the clip's anchor frame 0 first (`with_anchor`): each frame's sparse-causal attention sees it,
so all windows of a clip share one appearance. Tuning draws one window per step (`random_window`); inversion,
the source pass and sampling run every window at every step (`Windows`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ctxedit.attention import Plan
from ctxedit.errors import UsageError
from ctxedit.files import TEMPORARY, check_free_space

SHORTER_SPAN = "free some space or edit a shorter span (--from/--to)"


def with_anchor(first: int, size: int) -> list[int]:
    """The frames of a window of `size` from frame `first`, after the clip's anchor frame 0 unless it starts there."""
    return list(range(first, first + size)) if first == 0 else [0, *range(first, first + size)]


def random_window(frames: int, size: int, generator: torch.Generator) -> list[int]:
    """A window of `size` from anywhere in a clip of `frames`, drawn with `generator` (so a resumed run draws alike)."""
    first = torch.randint(0, frames - size + 1, (1,), generator=generator, device=generator.device)
    return with_anchor(int(first), size)


@dataclass(frozen=True)
class Windows:
    """How a clip longer than the model's window is run: windows of `size` frames every `size - overlap` (the last
    one ends with the clip), each after the anchor frame; where windows overlap, their outputs are blended with
    weights that ramp across the overlap. A clip that fits is one window, run as is."""

    frames: int
    size: int
    overlap: int

    def __post_init__(self) -> None:
        if self.frames > self.size and not 0 <= self.overlap < self.size:
            raise UsageError(f"--overlap must be from 0 to below the tuned --window {self.size}, got {self.overlap}")

    @cached_property
    def sequences(self) -> list[list[int]]:
        """The frames of each window, in the order the model sees them (the anchor first)."""
        if self.frames <= self.size:
            return [list(range(self.frames))]
        firsts = [*range(0, self.frames - self.size, self.size - self.overlap), self.frames - self.size]
        return [with_anchor(first, self.size) for first in firsts]

    @property
    def split(self) -> bool:
        """Whether the clip is run in more than one window."""
        return len(self.sequences) > 1

    def blend(self, run: Callable[[int, list[int]], torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """`run(k, frames)` gives window k's output for its frames, shaped like `like[:, frames]`; the clip's."""
        sequences = self.sequences
        if len(sequences) == 1:
            return run(0, sequences[0])
        position = torch.arange(self.size, device=like.device)
        ramp = (torch.minimum(position + 1, self.size - position) / (self.overlap + 1)).clamp(max=1)
        total = torch.zeros(like.shape, device=like.device)
        weight = torch.zeros(self.frames, device=like.device)
        for k, frames in enumerate(sequences):
            own = frames[-self.size :]  # the anchor of a later window is the first window's to give
            out = run(k, frames)[:, -self.size :].float()
            total[:, own] += ramp.view(1, -1, *[1] * (out.dim() - 2)) * out
            weight[own] += ramp
        return total / weight.view(1, -1, *[1] * (like.dim() - 2))


class SpilledSteps:
    """Latents per step in a memory-mapped .npy file, indexed like a (steps, ...) tensor (`diffusion.Steps`), one
    step in memory at a time: a long clip's inverted trajectory and landings (each ~3.3 MB per frame with SD 1.5
    at 512 px and 50 steps) stay off the GPU."""

    def __init__(self, array: np.ndarray, device: torch.device):
        self.array, self.device = array, device

    @classmethod
    def create(cls, path: Path, steps: int, like: torch.Tensor) -> SpilledSteps:
        return cls(np.lib.format.open_memmap(path, "w+", np.float32, (steps, *like.shape)), like.device)

    @classmethod
    def open(cls, path: Path, device: torch.device) -> SpilledSteps:
        return cls(np.load(path, mmap_mode="r"), device)

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, step: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[step])).to(self.device)

    def __setitem__(self, step: int, latents: torch.Tensor) -> None:
        self.array[step] = latents.float().cpu().numpy()


class Records:
    """What the source pass of a clip run in windows keeps on disk, in a temporary folder of the run (`root`): its
    records to inject, one file per (window, timestep) (the store grows with the clip; one window's is in memory),
    and its landings (`steps`). The first records saved tell how much the whole store takes: refused if the disk
    has no room for it. `cleanup` removes the folder (as does the last reference going)."""

    def __init__(self, root: Path, windows: int, plan: Plan):
        self.folder = tempfile.TemporaryDirectory(dir=root, prefix=f".records{TEMPORARY}")
        self.windows, self.plan, self.checked = windows, plan, False

    def _path(self, window: int, timestep: int) -> Path:
        return Path(self.folder.name) / f"{window}-{timestep}.safetensors"

    def save(self, window: int, timestep: int, store: dict[tuple[int, str], torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if store and not self.checked:
            check_free_space(Path(self.folder.name), self._needed(store), "The source's records", SHORTER_SPAN)
            self.checked = True
        if store:
            save_file({layer: t.contiguous() for (_, layer), t in store.items()}, str(self._path(window, timestep)))

    def _needed(self, store: dict[tuple[int, str], torch.Tensor]) -> int:
        """Bytes of the whole store, from one step's records: each layer's at every step its kind records."""
        plan = self.plan
        steps = lambda layer: plan.word_steps if layer in plan.cross_attention else plan.structure_steps  # noqa: E731
        return self.windows * sum(t.nbytes * len(steps(layer)) for (_, layer), t in store.items())

    def load(self, window: int, timestep: int, device: torch.device) -> dict[tuple[int, str], torch.Tensor]:
        from safetensors.torch import load_file

        path = self._path(window, timestep)
        state = load_file(str(path), device=str(device)) if path.exists() else {}
        return {(timestep, layer): t for layer, t in state.items()}

    def steps(self, name: str, count: int, like: torch.Tensor) -> SpilledSteps:
        path = Path(self.folder.name) / f"{name}.npy"
        check_free_space(path.parent, count * like.numel() * 4, f"The source's {name}", SHORTER_SPAN)
        return SpilledSteps.create(path, count, like)

    def cleanup(self) -> None:
        self.folder.cleanup()
