"""Decoding cost of choosing a few frames from long files: time and peak memory, by codec and length.

    python benchmarks/decode.py                  # 640x360 H.264 / AV1 / GIF at 300 and 3000 frames, 1080p H.264
    python benchmarks/decode.py --decord         # add decord (pip install decord) on the H.264 files, to compare

Each measurement runs in a fresh process: probe the file, then read 8 frames spread over all of it (what
`ctxedit tune --stride` does on a long clip). Peak memory is the process's maximum resident set, imports included
(~80 MiB for ctxedit.video with PyAV and numpy). Clips are generated once with the bundled ffmpeg into --cache.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from ctxedit.video import ffmpeg_exe

CLIPS = [  # (label, size, frames, encoder options, file suffix)
    ("H.264", "640x360", 300, ["-c:v", "libx264", "-preset", "ultrafast"], "mp4"),
    ("H.264", "640x360", 3000, ["-c:v", "libx264", "-preset", "ultrafast"], "mp4"),
    ("AV1", "640x360", 300, ["-c:v", "libsvtav1", "-preset", "12"], "mp4"),
    ("AV1", "640x360", 3000, ["-c:v", "libsvtav1", "-preset", "12"], "mp4"),
    ("GIF", "320x180", 300, [], "gif"),
    ("GIF", "320x180", 3000, [], "gif"),
    ("H.264", "1920x1080", 1800, ["-c:v", "libx264", "-preset", "ultrafast"], "mp4"),
]

MEASURE = """
import resource, sys, time
from pathlib import Path
decoder, path = sys.argv[1], sys.argv[2]
started = time.perf_counter()
if decoder == "ctxedit":
    from ctxedit import video
    info = video.probe(Path(path))
    count = info.num_frames
    probed = time.perf_counter()
    frames = video.read_frames(info, list(range(0, count, count // 8))[:8])
else:
    import decord
    reader = decord.VideoReader(path, ctx=decord.cpu(0))
    count = len(reader)
    probed = time.perf_counter()
    frames = reader.get_batch(list(range(0, count, count // 8))[:8]).asnumpy()
done = time.perf_counter()
print(probed - started, done - probed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, frames.shape[0])
"""


def make_clip(cache: Path, size: str, frames: int, options: list[str], suffix: str) -> Path:
    path = cache / f"{size}-{frames}-{options[1] if options else 'gif'}.{suffix}"
    if not path.exists():
        source = ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate=30", "-frames:v", str(frames)]
        subprocess.run(
            [ffmpeg_exe(), "-y", "-v", "error", *source, *options, str(path)], check=True, capture_output=True
        )
    return path


def measure(decoder: str, path: Path) -> tuple[float, float, float]:
    """(probe s, read s, peak MiB) in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, decoder, str(path)], capture_output=True, text=True, check=True
    )
    probe_s, read_s, peak, count = out.stdout.split()
    assert int(count) == 8
    return float(probe_s), float(read_s), float(peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decord", action="store_true", help="also measure decord on the H.264 files")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ctxedit-decode-bench")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    print("| file | size | frames | decoder | probe s | read 8 frames s | peak MiB |")
    print("|---|---|---:|---|---:|---:|---:|")
    for label, size, frames, options, suffix in CLIPS:
        path = make_clip(args.cache, size, frames, options, suffix)
        decoders = ["ctxedit", *(["decord"] if args.decord and label == "H.264" else [])]
        for decoder in decoders:
            probe_s, read_s, peak = measure(decoder, path)
            print(
                f"| {label} | {size} | {frames} | {decoder} | {probe_s:.2f} | {read_s:.2f} | {peak:.0f} |", flush=True
            )


if __name__ == "__main__":
    main()
