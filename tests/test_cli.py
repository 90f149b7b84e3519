"""The command line end to end on the tiny model, and every bad input: one line, non-zero exit, nothing lost."""

import json
import re
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
from conftest import encode, ffmpeg, make_video
from typer.testing import CliRunner

from ctxedit import video
from ctxedit.cli import app
from ctxedit.models.sd import load_sd
from ctxedit.models.synthetic import write_tiny_clip
from ctxedit.settings import EditSettings

runner = CliRunner()
FAST = ["--frames", "4", "--stride", "3", "--size", "40", "--steps", "2", "--device", "cpu"]


def ctxedit(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def succeeds(*args: str):
    result = ctxedit(*args)
    assert result.exit_code == 0, result.output
    return result


def fails(*args: str, match: str, code: int | None = None):
    result = ctxedit(*args)
    assert result.exit_code != 0 and (code is None or result.exit_code == code), result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], result.stderr
    return result


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_help_imports_no_torch():
    code = "import sys, ctxedit.cli; sys.exit('torch' in sys.modules or 'diffusers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def help_panels(command: str) -> dict[str, str]:
    """The panels of `ctxedit COMMAND --help`, in order: title -> the text inside."""
    text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "160"}).stdout
    parts = re.split(r"^╭─ (.+?) ─+╮$", text, flags=re.M)[1:]
    return dict(zip(parts[::2], parts[1::2], strict=True))


def test_help_shows_the_common_options_first_then_the_rest_in_panels():
    edit = help_panels("edit")
    assert [title.split(":")[0] for title in edit] == [
        "Options", "Structure", "Re-alignment", "Windows (long clips)", "Output", "Model", "Reproducibility"
    ]  # fmt: skip
    first = edit["Options"]
    assert all(f"--{name} " in first for name in ("target", "run", "steps", "guidance", "device", "overwrite"))
    assert "--keep-inside " in edit["Structure: what the edit keeps of the source"] and "--inject " not in first
    assert "--candidates " in edit["Re-alignment"] and "--side-by-side " in edit["Output"]
    assert "--seed " in edit["Reproducibility"] and "--lora-scale " in edit["Model"]
    tune = help_panels("tune")
    panels = ["Arguments", "Options", "Model", "Frames", "Windows (long clips)", "Tuning", "Reproducibility"]
    assert list(tune) == panels
    assert "--prompt " in tune["Options"] and "--lora " in tune["Model"] and "--from " in tune["Frames"]


def test_tune_then_edit(skiing, tiny_model, tmp_path):
    tuned = json.loads(
        succeeds("tune", skiing, "--prompt", "a man is skiing", "--model", tiny_model, *FAST, "--json").stdout
    )
    assert tuned["run"] == "runs/man-skiing" and tuned["steps"] == 2

    edits = json.loads(
        succeeds("edit", "--target", "a man is skiing on the moon", "--target", "spider man is skiing", "--steps", "3",
                 "--gif", "--json", "--device", "cpu").stdout
    )  # fmt: skip
    assert [e["inversion_cached"] for e in edits] == [False, True]  # one inversion for both targets
    for e in edits:
        info = video.probe(tmp_path / e["path"])
        assert (info.num_frames, info.width, info.height, info.has_audio) == (4, 40, 40, True)
        assert info.fps == pytest.approx(29.97 / 3, abs=0.01)
        assert video.probe(tmp_path / e["gif"]).num_frames == 4

    shared = ["--output-size", "source", "--fps", "5", "--side-by-side", "--grid", "--json", "--device", "cpu"]
    again = json.loads(
        succeeds("edit", "--target", "a man surfing", "--target", "a cat", "--steps", "3", *shared).stdout
    )
    assert again[0]["inversion_cached"] is True
    info = video.probe(tmp_path / again[0]["path"])
    assert (info.width, info.height, info.fps, info.has_audio) == (256, 256, 5.0, False)  # source size, new rate
    edits_dir = tmp_path / "runs/man-skiing/edits"
    side, grid = video.probe(edits_dir / "side-by-side.mp4"), video.probe(edits_dir / "grid.mp4")
    assert (side.width, side.num_frames, grid.width, grid.height) == (3 * 240, 4, 2 * 240, 2 * side.height)
    fails("edit", "--target", "a dog", "--side-by-side", match="side-by-side.mp4 already exists; pass --overwrite")
    fails("edit", "--target", "a dog", "--output-size", "huge", match="unknown --output-size 'huge'", code=2)

    record = json.loads((tmp_path / "runs/man-skiing/run.json").read_text())
    assert record["frames"]["indices"] == [0, 3, 6, 9]
    assert record["video"]["sha256"] and record["model"]["path"] == str(tiny_model.resolve())
    assert set(record["versions"]) >= {"ctxedit", "torch", "diffusers", "transformers"}
    assert record["settings"]["prompt"] == "a man is skiing" and record["settings"]["seed"] == 33
    assert record["runtime"] == {"device": "cpu", "precision": "float32"}
    assert len(record["tuning"]["loss"]["curve"]) == 2 and {"load_s", "encode_s", "tune_s"} <= set(record["timings"])
    assert [e["target"] for e in record["edits"]] == [
        "a man is skiing on the moon",
        "spider man is skiing",
        "a man surfing",
        "a cat",
    ]
    assert record["edits"][0]["settings"]["guidance"] == 7.5
    assert record["edits"][0]["settings"] | {"seed": 0} == EditSettings(steps=3, seed=0).to_dict()
    assert "a man is skiing" in succeeds("info").stdout

    bad = (
        ("--keep-structure", "1.5", "--keep-structure must be a fraction in [0, 1], got 1.5"),
        ("--keep-words", "-0.1", "--keep-words must be a fraction in [0, 1]"),
        ("--strength", "0", "--strength must be a fraction in (0, 1], got 0.0"),
        ("--inversion", "null-text", "unknown --inversion 'null-text'; choose one of direct, plain, negative"),
        ("--blend", ",", "--blend takes auto, off or words"),
        ("--eta", "1.5", "--eta must be between 0 (deterministic) and 1 (DDPM-like), got 1.5"),
        ("--keep-inside", "2", "--keep-inside must be a fraction in [0, 1], got 2.0"),
        ("--inject", "colour", "unknown --inject 'colour'; choose one of whole, layout"),
        ("--propagate", "-1", "--propagate must be a fraction in [0, 1], got -1.0"),
    )
    for flag, value, match in bad:
        fails("edit", "--target", "a dog", flag, value, match=match, code=2)
    fails("edit", "--target", "a dog", "--blend", "hat", match="--blend word 'hat' is in neither", code=2)
    assert len(json.loads((tmp_path / "runs/man-skiing/run.json").read_text())["edits"]) == 4


def test_any_aspect_ratio_odd_sizes_and_no_audio(tiny_model, tmp_path):
    wide = make_video(tmp_path / "wide.mp4", 120, 68, 12)
    succeeds(
        "tune", wide, "--prompt", "a test pattern", "--model", tiny_model, *FAST[:4], "--size", "32", "--steps", "1"
    )
    succeeds("edit", "--target", "a red test pattern", "--steps", "2", "--out", "wide-edit.mp4")
    info = video.probe(tmp_path / "wide-edit.mp4")
    assert (info.width, info.height, info.num_frames, info.has_audio) == (56, 32, 4, False)

    odd = make_video(tmp_path / "odd.mkv", 51, 41, 6, extra=("-pix_fmt", "yuv444p"))
    succeeds("tune", odd, "--prompt", "odd", "--model", tiny_model, "--frames", "2", "--size", "30", "--steps", "1")
    succeeds("edit", "--target", "even", "--steps", "2", "--out", "odd-edit.mp4")
    assert (video.probe(tmp_path / "odd-edit.mp4").width, video.probe(tmp_path / "odd-edit.mp4").height) == (32, 32)


def test_a_portrait_phone_clip_with_variable_frame_rate_and_sound(tiny_model, tmp_path):
    """Stored landscape with a 90-degree display rotation, bursts of frames with gaps, a beep at 1.5 s: the edit
    is portrait like the clip and its sound lines up with the frames it shows."""
    frames = np.random.default_rng(0).integers(0, 255, (16, 64, 96, 3), dtype=np.uint8)
    beep = "aevalsrc=0.5*sin(2*PI*1000*t)*between(t\\,1.5\\,1.7):s=48000:d=2.2"
    vfr = ("-vf", "settb=1/1000,setpts=(N+2*floor(N/4))*100", "-fps_mode", "passthrough")  # 0 .1 .2 .3 .6 ...
    stored = encode(frames, tmp_path / "stored.mp4", *vfr, "-c:v", "libx264", "-c:a", "aac",
                    inputs=("-f", "lavfi", "-i", beep))  # fmt: skip
    ffmpeg("-display_rotation", 90, "-i", stored, "-c", "copy", tmp_path / "phone.mp4")
    tune = ["tune", tmp_path / "phone.mp4", "--prompt", "noise", "--model", tiny_model, "--frames", "4"]
    succeeds(*tune, "--start", "8", "--size", "32", "--steps", "1")
    record = json.loads((tmp_path / "runs/phone/run.json").read_text())
    assert record["size"] == {"width": 32, "height": 48, "latent": [24, 16], "native": 32}  # portrait, as shown
    assert record["frames"]["start_s"] == pytest.approx(1.2)  # frame 8's time, not 8 / the average rate
    succeeds("edit", "--target", "a painting", "--steps", "2", "--output-size", "source", "--out", "edit.mp4")
    info = video.probe(tmp_path / "edit.mp4")
    assert (info.width, info.height, info.num_frames, info.has_audio) == (64, 96, 4, True)
    with av.open(str(tmp_path / "edit.mp4")) as container:
        sound = np.concatenate([f.to_ndarray().mean(0) for f in container.decode(audio=0)])
        rate = container.streams.audio[0].rate
    assert np.argmax(np.abs(sound) > 0.2) / rate == pytest.approx(1.5 - 1.2, abs=0.02)


def test_a_time_span_edited_whole_in_windows_keeps_every_frame_and_its_sound(tiny_model, tmp_path):
    frames = np.random.default_rng(1).integers(0, 255, (40, 48, 48, 3), dtype=np.uint8)
    beep = "aevalsrc=0.5*sin(2*PI*1000*t)*between(t\\,2\\,2.2):s=48000:d=4"
    clip = encode(frames, tmp_path / "clip.mp4", "-c:v", "libx264", "-c:a", "aac", inputs=("-f", "lavfi", "-i", beep))
    tune = ["tune", clip, "--prompt", "noise", "--model", tiny_model, "--size", "32", "--steps", "2", "--stride", "1"]
    fails(*tune, "--frames", "all", "--from", "1.5", "--start", "3", match="give --start (a frame index) or --from")
    fails(*tune, "--frames", "some", match="--frames takes a number or 'all', got 'some'", code=2)
    succeeds(*tune, "--frames", "all", "--from", "0:01.5", "--to", "3.5", "--window", "6")
    record = json.loads((tmp_path / "runs/clip/run.json").read_text())
    assert record["frames"]["indices"] == list(range(15, 35)) and record["frames"]["count"] == 20
    assert "20 frames, 15 to 34 -> 32x32 at 10 fps" in succeeds("info").stdout
    edit = json.loads(succeeds("edit", "--target", "a painting", "--steps", "2", "--json", "--device", "cpu").stdout)[0]
    info = video.probe(tmp_path / edit["path"])
    assert (info.num_frames, info.fps, info.has_audio) == (20, 10, True)  # five windows of 6, every frame once
    with av.open(str(tmp_path / edit["path"])) as container:
        sound = np.concatenate([f.to_ndarray().mean(0) for f in container.decode(audio=0)])
        rate = container.streams.audio[0].rate
    assert len(sound) / rate == pytest.approx(2.0, abs=0.03)  # the span's sound, from 1.5 s
    assert np.argmax(np.abs(sound) > 0.2) / rate == pytest.approx(2.0 - 1.5, abs=0.02)
    fails("edit", "--target", "x", "--overlap", "6", match="below the tuned --window 6, got 6")


def test_candidates_are_scored_the_best_kept_and_all_recorded(skiing, tiny_model, tmp_path):
    succeeds("tune", skiing, "--prompt", "a man is skiing", "--model", tiny_model, *FAST, "--keep-checkpoints",
             "--checkpoint-every", "1")  # fmt: skip
    assert "after steps 1" in succeeds("info").stdout
    fails("edit", "--target", "x", "--checkpoint", "2", match="kept no parameters after step 2 (kept: 1)")
    target = "a man is skiing on the (moon:2)"
    succeeds("edit", "--target", target, "--steps", "3", "--candidates", "3", "--keep-candidates", "--device", "cpu")
    entry = json.loads((tmp_path / "runs/man-skiing/run.json").read_text())["edits"][-1]
    assert entry["target"] == target and entry["settings"]["candidates"] == 3
    assert [c["changes"] for c in entry["candidates"]] == [{}, {"eta": 0.5, "seed": 34}, {"guidance": 11.25}]
    axes = {"text", "consistency", "preservation", "warp_error"}
    assert all(set(c["scores"]) == axes for c in entry["candidates"])
    chosen = entry["candidates"][entry["chosen"]]
    edit, kept = video.probe(tmp_path / entry["path"]), video.probe(tmp_path / chosen["path"])
    assert np.array_equal(video.read_frames(edit, [0, 3]), video.read_frames(kept, [0, 3]))  # the chosen one
    (tmp_path / entry["path"]).rename(tmp_path / "moved.mp4")  # the candidates are still there: refused before work
    fails("edit", "--target", target, "--steps", "3", "--candidates", "3", "--keep-candidates",
          match="candidates/0.mp4 already exists; pass --overwrite")  # fmt: skip
    (tmp_path / "moved.mp4").rename(tmp_path / entry["path"])

    scored = json.loads(succeeds("score", "--json", "--device", "cpu").stdout)
    assert [r["target"] for r in scored] == [target] and scored[0]["scorer"] == "attention"
    clip_model = write_tiny_clip(tmp_path / "clip")
    by_clip = json.loads(succeeds("score", entry["path"], "--scorer", "clip", "--scorer-model", clip_model,
                                  "--json").stdout)  # fmt: skip
    assert by_clip[0]["preservation"] == scored[0]["preservation"] and by_clip[0]["text"] != scored[0]["text"]
    assert by_clip[0]["warp_error"] == scored[0]["warp_error"] >= 0
    record = json.loads((tmp_path / "runs/man-skiing/run.json").read_text())
    assert set(record["edits"][-1]["scores"]) == {"attention", "clip"}
    fails("score", "runs/man-skiing/edits/other.mp4", match="is not an edit recorded in runs/man-skiing")
    fails("score", "--scorer", "clip", match="--scorer clip needs --scorer-model")
    fails("edit", "--target", "x", "--candidates", "0", match="--candidates must be between 1 and 32", code=2)
    fails("edit", "--target", "a (moon:x)", match="'x' in '(moon:x)' is not a number", code=2)


def test_bad_videos(tiny_model, skiing, car, tmp_path):
    tune = ["tune", "--prompt", "x", "--model", tiny_model, *FAST]
    fails(*tune, tmp_path / "missing.mp4", match="does not exist")
    (tmp_path / "notes.mp4").write_text("not a video")
    fails(*tune, tmp_path / "notes.mp4", match="not a video")
    (tmp_path / "truncated.mp4").write_bytes(car.read_bytes()[:40000])
    fails(*tune, tmp_path / "truncated.mp4", match="truncated or corrupt")
    subprocess.run(
        [video.ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "sine=duration=1", str(tmp_path / "sound.m4a")],
        check=True,
    )
    fails(*tune, tmp_path / "sound.m4a", match="no video stream")
    fails("tune", skiing, "--prompt", "x", "--model", tiny_model, "--frames", "50", match="has 91 frames")
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*/tuned.safetensors"))


def test_bad_settings_and_models(tiny_model, skiing, tmp_path):
    fails("tune", skiing, "--prompt", "  ", "--model", tiny_model, match="--prompt is empty", code=2)
    fails("tune", skiing, "--prompt", "x", "--context", "linear", match="quadratic, prior, noise, off", code=2)
    fails("tune", skiing, "--prompt", "x", "--size", "4", "--model", tiny_model, match="at least 8")
    fails("tune", skiing, "--prompt", "x", "--model", "nobody/no-such-model", match="HF_HUB_OFFLINE")
    (tmp_path / "not-a-model").mkdir()
    fails(
        "tune",
        skiing,
        "--prompt",
        "x",
        "--model",
        tmp_path / "not-a-model",
        match="not a diffusers Stable Diffusion folder",
    )
    fails("tune", skiing, "--prompt", "x", "--model", "./nowhere", match="does not exist")
    fails("tune", skiing, "--prompt", "x", "--model", tiny_model, *FAST, "--adapter", "./nowhere",
          match="no pre-trained context adapter in ./nowhere")  # fmt: skip
    fails("tune", skiing, "--prompt", "x", "--context", "off", "--adapter", tiny_model, match="needs the context on")


def test_scheduler_options_the_inversion_cannot_use(tiny_model, skiing, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config_path = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    del config["clip_sample"]  # diffusers' default would clip x0_hat of latents to [-1, 1]
    config_path.write_text(json.dumps(config))
    assert load_sd(str(model), torch.device("cpu"), torch.float32).scheduler.config.clip_sample is False
    for option, value in (("timestep_spacing", "linspace"), ("thresholding", True)):
        config_path.write_text(json.dumps(config | {option: value}))
        shown = "thresholding true" if option == "thresholding" else "timestep_spacing 'linspace'"
        fails("tune", skiing, "--prompt", "x", "--model", model, *FAST, match=f"scheduler {shown} cannot be inverted")
    assert not (tmp_path / "runs").exists()


def test_nothing_is_overwritten_without_asking(tiny_model, skiing, tmp_path):
    fails("edit", "--target", "x", match="no runs under runs/")
    fails("edit", "--target", "x", "--run", tmp_path / "elsewhere", match="holds no run")
    tune = ["tune", skiing, "--prompt", "a man is skiing", "--model", tiny_model, *FAST]
    succeeds(*tune)
    fails(*tune, match="already holds a run; pass --overwrite")
    succeeds("edit", "--target", "a man is skiing on mars", "--steps", "2")
    edit_file = tmp_path / "runs/man-skiing/edits/a-man-is-skiing-on-mars.mp4"
    before = edit_file.read_bytes()
    fails("edit", "--target", "a man is skiing on mars", "--steps", "3", match="already exists; pass --overwrite")
    assert edit_file.read_bytes() == before
    fails("edit", "--target", "", match="--target is empty")
    fails("edit", "--target", "a", "--target", "b", "--out", "x.mp4", match="--out names one file")
    succeeds("edit", "--target", "a man is skiing on mars", "--steps", "3", "--overwrite")
    assert edit_file.read_bytes() != before
    succeeds(*tune, "--overwrite")
    fails("tune", skiing, "--prompt", "a man is skiing", "--model", tiny_model, "--resume", match="nothing to resume")
