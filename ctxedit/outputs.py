"""An edit's files: where they go (checked before any work, so that nothing runs only to be refused), and how they
are written: the MP4 at the size and rate asked, with the source's audio under it, a GIF, the kept candidates, and
the side-by-side and grid composites of a run's edits."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctxedit import compose
from ctxedit import video as videos
from ctxedit.errors import UsageError
from ctxedit.files import refuse_overwrite
from ctxedit.runs import Run, source_chunks
from ctxedit.settings import OutputSettings


@dataclass(frozen=True)
class Written:
    """What `write_edit` wrote."""

    frames: int
    width: int
    height: int
    fps: float
    audio: bool
    gif: str | None


def output_fps(record: dict, output: OutputSettings) -> float:
    return output.fps or record["fps"]


def audio_span(record: dict, output: OutputSettings) -> videos.AudioSpan | None:
    """The source's audio under the edited frames; none at another frame rate, where it would not line up."""
    source, frames = record["video"], record["frames"]
    if not source["has_audio"] or not Path(source["path"]).exists() or output_fps(record, output) != record["fps"]:
        return None
    start = frames.get("start_s", frames["indices"][0] / source["fps"])  # runs tuned before start_s was recorded
    return videos.AudioSpan(Path(source["path"]), start, frames["count"] * frames["stride"] / source["fps"])


def composite_paths(run: Run, output: OutputSettings) -> list[Path]:
    wanted = (("side-by-side", output.side_by_side), ("grid", output.grid))
    return [run.root / "edits" / f"{name}.mp4" for name, on in wanted if on]


def candidate_paths(path: Path, count: int) -> list[Path]:
    """Where `--keep-candidates` writes the candidates of the edit at `path`."""
    return [path.parent / f"{path.stem}.candidates" / f"{k}.mp4" for k in range(count)] if count > 1 else []


def output_paths(
    run: Run, targets: list[str], out: Path | None, output: OutputSettings, overwrite: bool, candidates: int = 1
) -> list[Path]:
    """Where each edit goes; checked (with the composites) before any work."""
    if not targets or any(not t.strip() for t in targets):
        raise UsageError("--target is empty; give the edited description, e.g. --target 'a man is skiing on the moon'")
    if out is not None and len(targets) > 1:
        raise UsageError("--out names one file; with several --target the edits go to the run's edits/ folder")
    paths = [out] if out is not None else [run.edit_path(t) for t in targets]
    if out is not None and out.suffix.lower() != ".mp4":
        raise UsageError(f"--out must end in .mp4, got {out.name}")
    if len(set(paths)) < len(paths):
        raise UsageError("two targets give the same file name; make them differ in letters or digits")
    for path in paths:
        refuse_overwrite(path, overwrite)
        if output.gif:
            refuse_overwrite(path.with_suffix(".gif"), overwrite)
        for kept in candidate_paths(path, candidates) if output.keep_candidates else []:
            refuse_overwrite(kept, overwrite)
    for path in composite_paths(run, output):
        refuse_overwrite(path, overwrite)
    return paths


def write_edit(
    frames: Iterable[np.ndarray], path: Path, record: dict, output: OutputSettings, overwrite: bool, gif: bool = False
) -> Written:
    """Write frames at the processed size (an iterable: streamed) as `output` asks (size, rate, the source's audio),
    and a GIF beside them when `gif`."""
    size = (record["size"]["width"], record["size"]["height"])
    if output.size == "source":
        size = videos.source_region(record["video"]["width"], record["video"]["height"], size)
        frames = (videos.resize_frames(frame[None], size)[0] for frame in frames)
    audio, fps = audio_span(record, output), output_fps(record, output)
    count = videos.write_video(frames, path, fps, audio, overwrite)
    gif_path = path.with_suffix(".gif") if gif else None
    if gif_path:
        videos.write_gif(path, gif_path, overwrite)
    return Written(count, *size, fps, audio is not None, str(gif_path) if gif_path else None)


def write_composites(
    run: Run, record: dict, edits: list[tuple[str, Path]], output: OutputSettings, overwrite: bool = False
) -> list[Path]:
    """The side-by-side and grid videos `output` asks for, of the source and `edits` (caption, file), composed
    a chunk of frames at a time."""
    paths = composite_paths(run, output)
    if not edits or not paths:
        return []
    captions = ["source: " + record["settings"]["prompt"], *(caption for caption, _ in edits)]
    fps, audio = output_fps(record, output), audio_span(record, output)
    for path in paths:
        layout = compose.side_by_side if path.stem == "side-by-side" else compose.grid
        videos.write_video(_composed(record, edits, captions, layout), path, fps, audio, overwrite)
    return paths


def _composed(record: dict, edits: list[tuple[str, Path]], captions: list[str], layout) -> Iterator[np.ndarray]:
    """The frames of one composite, read and laid out `video.CHUNK` frames at a time."""
    count = record["frames"]["count"]
    readers = [videos.read_chunks(videos.probe(path), list(range(count))) for _, path in edits]
    for source in source_chunks(record):
        rows = [source, *(compose.sized_like(next(reader), source) for reader in readers)]
        yield from layout(list(zip(captions, rows, strict=True)))
