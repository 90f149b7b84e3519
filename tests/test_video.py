"""Video in and out: what users bring (codecs, containers, rotation, pixel aspect, variable frame rate, long
files) decodes upright at its display size with the right frames and times; MP4/GIF writing with audio."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import encode, ffmpeg, make_video
from PIL import Image

from ctxedit import video
from ctxedit.errors import RunError, UsageError, VideoError


def test_probe_the_samples(skiing, car):
    ski = video.probe(skiing)
    assert (ski.width, ski.height, ski.num_frames, ski.has_audio) == (256, 256, 91, True)
    assert ski.fps == pytest.approx(29.97, abs=0.01)
    assert video.probe(car).has_audio is False


@pytest.mark.parametrize(
    "source, size, crop, expected",
    [
        ((718, 718), 512, "none", (512, 512)),
        ((1920, 1080), 512, "none", (896, 512)),  # long side rounded down, not stretched
        ((1080, 1920), 512, "none", (512, 896)),  # portrait
        ((1920, 1080), 512, "center", (512, 512)),
        ((50, 40), 500, "none", (640, 512)),  # tiny source, odd --size rounded to the multiple
    ],
)
def test_processed_size_keeps_aspect_and_multiples(source, size, crop, expected):
    assert video.processed_size(*source, size, 64, crop) == expected


def test_processed_size_refuses_a_size_below_the_multiple():
    with pytest.raises(UsageError, match="at least 64"):
        video.processed_size(100, 100, 32, 64, "none")


@pytest.fixture(scope="module")
def truth(car) -> np.ndarray:
    """Six natural frames, 96x54 (16:9): asymmetric, so any turn, mirror or stretch shows."""
    return video.resize_frames(video.read_frames(video.probe(car), list(range(0, 30, 5))), (96, 54))


def error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b).mean())


X264 = ("-c:v", "libx264", "-crf", "12")
CLIPS = {  # name: (encoder options, mean error allowed against the truth)
    "h264.mp4": ((*X264, "-pix_fmt", "yuv420p"), 4),
    "yuv444.mp4": ((*X264, "-pix_fmt", "yuv444p"), 4),
    "bt709-10bit.mp4": (  # 10-bit HEVC tagged BT.709 (its matrix: test_colours_are_converted_with_the_files_matrix)
        ("-vf", "scale=out_color_matrix=bt709", "-colorspace", "bt709", "-c:v", "libx265", "-crf", "12",
         "-pix_fmt", "yuv420p10le", "-x265-params", "log-level=none"), 4),
    "full-range.mp4": (("-vf", "scale=out_range=full", "-color_range", "pc", *X264, "-pix_fmt", "yuv420p"), 4),
    "av1.mp4": (("-c:v", "libsvtav1", "-crf", "20", "-svtav1-params", "log-level=0"), 4),
    "vp9.webm": (("-c:v", "libvpx-vp9", "-crf", "15", "-b:v", "0"), 4),
    "h264.mkv": (X264, 4),
    "prores.mov": (("-c:v", "prores_ks", "-pix_fmt", "yuv422p10le"), 4),
    "mpeg4.avi": (("-c:v", "mpeg4", "-q:v", "2"), 4),
    "palette.gif": ((), 18),  # 256 colours
}  # fmt: skip


@pytest.mark.parametrize("name", CLIPS)
def test_codecs_and_containers_give_the_right_pictures_and_times(truth, tmp_path, name):
    options, allowed = CLIPS[name]
    info = video.probe(encode(truth, tmp_path / name, *options))
    assert (info.width, info.height, info.num_frames) == (96, 54, 6)
    assert info.fps == pytest.approx(10) and info.times == pytest.approx([0, 0.1, 0.2, 0.3, 0.4, 0.5], abs=1e-3)
    order = [3, 0, 5, 1]
    frames = video.read_frames(info, order)
    assert frames.shape == (4, 54, 96, 3) and frames.dtype == np.uint8
    assert error(frames, truth[order]) < allowed < error(frames, truth[[0, 3, 1, 5]])  # those frames, no others


SATURATED = np.array(
    [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (200, 30, 200), (30, 200, 200)], np.uint8
)


@pytest.mark.parametrize("name", ["bt709-10bit.mp4", "h264.mp4"])  # tagged BT.709; untagged, so BT.601
def test_colours_are_converted_with_the_files_matrix(tmp_path, name):
    """Flat saturated colours come back within 1 level (measured 0.05 and 0.58); the other matrix is off by 11.5
    (BT.601's on the BT.709 file) and 10.5 (BT.709's on the untagged one)."""
    flat = np.broadcast_to(SATURATED[:, None, None], (6, 54, 96, 3)).copy()
    info = video.probe(encode(flat, tmp_path / name, *CLIPS[name][0]))
    assert error(video.read_frames(info, list(range(6))), flat) < 1


@pytest.fixture(scope="module")
def lossless(truth, tmp_path_factory):
    return encode(
        truth, tmp_path_factory.mktemp("clips") / "lossless.mkv", *X264[:2], "-qp", "0", "-pix_fmt", "yuv444p"
    )


def played(clip, height: int, width: int) -> np.ndarray:
    """The frames ffmpeg itself decodes from `clip`, as a player shows them."""
    command = [video.ffmpeg_exe(), "-v", "error", "-i", clip, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    raw = subprocess.run(command, capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)


@pytest.mark.parametrize("degrees", [0, 90, 180, 270])
@pytest.mark.parametrize("mirror", [False, True])
def test_display_matrix_rotation_and_mirror_come_out_as_players_show_them(truth, lossless, tmp_path, degrees, mirror):
    clip = tmp_path / "phone.mp4"
    ffmpeg("-display_rotation", degrees, *(["-display_hflip"] if mirror else []), "-i", lossless, "-c", "copy", clip)
    info = video.probe(clip)
    frames = video.read_frames(info, list(range(6)))
    if not mirror:  # counter-clockwise, as the flag says
        assert error(frames, np.rot90(truth, degrees // 90, axes=(1, 2))) < 1
    assert (info.width, info.height) == ((54, 96) if degrees in (90, 270) else (96, 54))
    assert error(frames, played(clip, info.height, info.width)) < 1  # ffmpeg turns and mirrors as players do


def test_pixel_aspect_ratio_is_applied(truth, tmp_path):
    """1440x1080-style anamorphic video: 4:3 pixels stored, a 16:9 picture shown."""
    squeezed = np.stack([np.asarray(Image.fromarray(f).resize((72, 54), Image.LANCZOS)) for f in truth])
    info = video.probe(encode(squeezed, tmp_path / "anamorphic.mp4", "-vf", "setsar=4/3", *X264))
    assert (info.width, info.height) == (96, 54)
    frames = video.read_frames(info, [0, 1])
    assert error(frames, truth[:2]) < 5 < 15 < error(video.resize_frames(squeezed[:2], (96, 54)), truth[:2])


def test_odd_sizes_and_a_single_frame(tmp_path):
    odd = video.probe(make_video(tmp_path / "odd.mkv", 97, 65, 5, extra=("-pix_fmt", "yuv444p")))
    assert (odd.width, odd.height) == (97, 65) and video.read_frames(odd, [4]).shape == (1, 65, 97, 3)
    single = video.probe(make_video(tmp_path / "single.mp4", 64, 48, 1))
    assert single.num_frames == 1 and video.read_frames(single, video.frame_indices(single, 1, 1, 0)).shape[0] == 1
    with pytest.raises(VideoError, match=r"has 1 frames .*try --frames 1"):
        video.frame_indices(single, 2, 1, 0)


def test_frame_indices_and_what_would_fit(tmp_path):
    steady = video.probe(make_video(tmp_path / "steady.mp4", 32, 32, 20))
    assert video.frame_indices(steady, 4, 3, 2) == [2, 5, 8, 11]
    assert video.frame_indices(steady, 2, 1, 18) == [18, 19]
    with pytest.raises(VideoError, match=r"has 20 frames .*try --frames 5, --frames all or a smaller --stride"):
        video.frame_indices(steady, 8, 4, 2)
    with pytest.raises(VideoError, match="--start must be below 20"):
        video.frame_indices(steady, 1, 1, 20)
    # Whole clips and time ranges (10 fps): every frame at the stride, from the first at or after --from until --to.
    assert video.frame_indices(steady, "all", 3, 2) == [2, 5, 8, 11, 14, 17]
    assert video.frame_indices(steady, "all", 1, from_time=0.45, to_time=1.0) == [5, 6, 7, 8, 9]
    assert video.frame_indices(steady, 2, 2, from_time=1.2) == [12, 14]
    with pytest.raises(VideoError, match=r"has 0.50 s but --frames 6 --stride 1 --from 0 needs 0.60 s; try --frames 5"):
        video.frame_indices(steady, 6, 1, from_time=0, to_time=0.5)
    with pytest.raises(VideoError, match="the video lasts 2.00 s; --from 2.5 is after it"):
        video.frame_indices(steady, "all", 1, from_time=2.5)


def grey_ramp(count: int) -> np.ndarray:
    """Frame n is flat grey 20 + 12 n: which frame a picture came from can be read off its brightness."""
    return np.broadcast_to((20 + 12 * np.arange(count))[:, None, None, None], (count, 32, 48, 3)).astype(np.uint8)


def which_frames(frames: np.ndarray) -> list[int]:
    return [round((f.mean() - 20) / 12) for f in frames]


VFR_TIMES = [(n + 2 * (n // 4)) / 10 for n in range(16)]  # bursts of 4 frames at 10 fps with 0.2 s gaps, as phones do


def test_variable_frame_rate_frames_follow_the_clock(tmp_path):
    vfr = ("-vf", "settb=1/1000,setpts=(N+2*floor(N/4))*100", "-fps_mode", "passthrough")
    clip = encode(grey_ramp(16), tmp_path / "vfr.mkv", *vfr, *X264, "-pix_fmt", "yuv444p")
    info = video.probe(clip)
    assert info.num_frames == 16 and info.times == pytest.approx(VFR_TIMES, abs=1e-3)
    assert which_frames(video.read_frames(info, list(range(16)))) == list(range(16))
    picks = video.frame_indices(info, 6, 1, 4)
    # What a steady clip at the average rate shows at each of its frame times: a frame repeats over a gap.
    clock = [VFR_TIMES[4] + k / info.fps for k in range(6)]
    shown = [max(n for n, t in enumerate(VFR_TIMES) if t <= c + 0.5 / info.fps) for c in clock]
    assert picks == shown and picks != list(range(4, 10)) and len(set(picks)) < len(picks)
    assert which_frames(video.read_frames(info, picks)) == picks


@pytest.mark.parametrize("gop", [None, 12])  # the sample (one keyframe); a keyframe every 12 frames, B-frames
def test_a_trimmed_mp4_shows_the_frames_a_player_shows(car, tmp_path, gop):
    """`-ss 1.3 -c copy` (as phones trim) keeps the packets from the keyframe before 1.3 s and writes an edit list
    that hides the 13 frames before it: they are decoded, not shown, and time starts at the first frame shown."""
    source = car
    if gop:
        source = tmp_path / "gop.mp4"
        ffmpeg("-i", car, "-c:v", "libx264", "-g", gop, "-bf", 2, "-crf", 17, source)
    trimmed = tmp_path / "trimmed.mp4"
    ffmpeg("-ss", 1.3, "-i", source, "-c", "copy", trimmed)
    shown = played(trimmed, 256, 256)
    info = video.probe(trimmed)
    assert info.num_frames == len(shown) == 67
    assert info.times == pytest.approx([n / 10 for n in range(67)], abs=1e-3) and info.end_s == pytest.approx(6.7)
    frames = video.read_frames(info, list(range(67)))
    assert error(frames, shown) < 2 < 10 < error(frames[1:], shown[:-1])  # the frames ffmpeg shows, not neighbours
    assert np.array_equal(frames, video.read_frames(video.probe(source), list(range(13, 80))))
    picks = [40, 5, 66, 11, 0]  # seeks, into the frames after the hidden keyframe too
    assert np.array_equal(video.read_frames(info, picks), frames[picks])


def sound(clip, start_s: float) -> np.ndarray:
    """Half a second of mono audio from `start_s`, cut as `write_video` cuts it (-ss before -i)."""
    cut = ["-ss", f"{start_s:.6f}", "-i", clip, "-t", "0.5", "-map", "0:a:0", "-ac", "1", "-ar", "44100", "-f", "s16le"]
    raw = subprocess.run([video.ffmpeg_exe(), "-v", "error", *cut, "-"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.int16).astype(float)


def test_a_trimmed_mp4_keeps_its_sound_under_its_frames(skiing, tmp_path):
    """Edits take the audio from their first frame's time (`start_s`): on a trim it is the sound under that frame."""
    trimmed = tmp_path / "trimmed.mp4"
    ffmpeg("-ss", 1.3, "-i", skiing, "-c", "copy", trimmed)
    info, full = video.probe(trimmed), video.probe(skiing)
    hidden = full.num_frames - info.num_frames  # 39 frames before 1.3 s at 29.97 fps
    assert (info.num_frames, hidden, info.has_audio) == (len(played(trimmed, 256, 256)), 39, True)
    assert info.times == pytest.approx([t - full.times[hidden] for t in full.times[hidden:]], abs=1e-6)
    assert np.array_equal(video.read_frames(info, [0, 30]), video.read_frames(full, [hidden, hidden + 30]))
    for n in (0, 30):
        here, there = sound(trimmed, info.times[n]), sound(skiing, full.times[hidden + n])
        assert len(here) == len(there) == 22050
        lag = np.argmax(np.correlate(there, here[2205:-2205], "valid")) - 2205  # samples, within +-50 ms
        assert abs(lag) < 0.002 * 44100  # 57 (1.3 ms): the trim's audio starts at 1.3 s, its first frame at 1.3013


MEASURE_READ = """
import resource, sys
from pathlib import Path
from ctxedit import video
info = video.probe(Path(sys.argv[1]))
video.read_frames(info, list(range(0, info.num_frames, info.num_frames // 8))[:8])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.parametrize("codec", [("-c:v", "libx264", "-preset", "ultrafast"), ("-c:v", "libsvtav1", "-preset", "12")])
def test_memory_does_not_grow_with_the_length_of_the_file(tmp_path, codec):
    """8 frames spread over 3000 (640x360) cost what 8 frames spread over 300 do: only they are kept."""
    peaks = []
    for count in (300, 3000):
        clip = tmp_path / f"{count}.mp4"
        ffmpeg("-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30", "-frames:v", count, *codec, clip)
        run = subprocess.run([sys.executable, "-c", MEASURE_READ, clip], capture_output=True, text=True, check=True)
        peaks.append(int(run.stdout))
    assert peaks[1] < 1.1 * peaks[0], peaks  # KiB; decoding the whole long file would take 2 GB more


def test_unusable_files_get_one_clear_line(tmp_path, car):
    (tmp_path / "text.mp4").write_text("hello")
    (tmp_path / "empty.mp4").write_bytes(b"")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(car.read_bytes()[: car.stat().st_size // 3])
    with pytest.raises(VideoError, match="does not exist"):
        video.probe(tmp_path / "missing.mp4")
    with pytest.raises(VideoError, match="not a file"):
        video.probe(tmp_path)
    for bad in ("text.mp4", "empty.mp4"):
        with pytest.raises(VideoError, match="not a video"):
            video.probe(tmp_path / bad)
    with pytest.raises(VideoError, match=r"truncated or corrupt: only \d+ of 80 frames"):
        video.probe(truncated)
    ffmpeg("-display_rotation", 45, "-i", car, "-c", "copy", tmp_path / "tilted.mp4")
    with pytest.raises(VideoError, match="rotation 45 degrees: only multiples of 90"):
        video.probe(tmp_path / "tilted.mp4")


@pytest.mark.parametrize("fps", [14.985, 29.97, 40 / 11])  # each once lost its last frame to -shortest
def test_write_video_round_trip_with_audio(skiing, tmp_path, fps):
    ramp = np.linspace(0, 200, 56)[None, None, :, None] + np.arange(6)[:, None, None, None] * 10
    frames = np.broadcast_to(ramp, (6, 40, 56, 3)).astype(np.uint8)
    dest = tmp_path / "out.mp4"
    video.write_video(frames, dest, fps, video.AudioSpan(skiing, 1.0, 6 / fps))
    info = video.probe(dest)
    assert (info.width, info.height, info.num_frames, info.has_audio) == (56, 40, 6, True)
    assert info.fps == pytest.approx(fps, abs=0.01)
    header = subprocess.run([video.ffmpeg_exe(), "-i", str(dest)], capture_output=True, text=True).stderr
    assert "h264" in header and "yuv420p" in header
    back = video.read_frames(info, list(range(6)))
    assert np.abs(back.astype(int) - frames).mean() < 3  # lossy, but the same pictures
    video.write_gif(dest, tmp_path / "out.gif")
    assert video.probe(tmp_path / "out.gif").num_frames == 6


def test_writes_never_clobber(tmp_path):
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    dest = tmp_path / "out.mp4"
    dest.write_bytes(b"precious")
    with pytest.raises(RunError, match="--overwrite"):
        video.write_video(frames, dest, 10)
    with pytest.raises(VideoError, match="even"):
        video.write_video(np.zeros((2, 15, 16, 3), np.uint8), dest, 10, overwrite=True)
    assert dest.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]  # no temp file left behind

    def mismatched():  # streamed frames that change size half way: refused, nothing written
        yield from (np.zeros((16, 16, 3), np.uint8), np.zeros((16, 18, 3), np.uint8))

    with pytest.raises(VideoError, match=r"frame 1 is \(16, 18, 3\), the first was \(16, 16, 3\)"):
        video.write_video(mismatched(), dest, 10, overwrite=True)
    assert dest.read_bytes() == b"precious" and [p.name for p in tmp_path.iterdir()] == ["out.mp4"]
    assert video.write_video(iter(frames), dest, 10, overwrite=True) == 2  # any iterable, streamed
    assert video.probe(dest).num_frames == 2


def test_frames_read_in_chunks_are_those_read_at_once(car):
    """One running decoder, chunk after chunk, repeats included (a frame shown over a gap): the same pictures."""
    info = video.probe(car)
    indices = [0, 1, 1, 2, 5, 9, 9, 9, 30, 31, 60, 79]
    chunks = list(video.read_chunks(info, indices, 5))
    assert [len(c) for c in chunks] == [5, 5, 2]
    assert np.array_equal(np.concatenate(chunks), video.read_frames(info, indices))
