"""Batch presets: validation of every bad input, resumability, failure isolation, sharding (two gloo processes),
outputs (side-by-side, grid, source size, fps, GIF, report) and killing a batch mid-way (SIGINT, SIGKILL)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import linked_files, make_video
from test_cli import ctxedit, fails
from test_tuning import ctrl_c_during_step

from ctxedit import settings, tuning, video
from ctxedit.batch import Share, parse_shard
from ctxedit.errors import UsageError
from ctxedit.presets import load_presets
from ctxedit.runs import Run

TUNE = {"frames": 2, "stride": 3, "size": 32, "steps": 2}
EDIT = {"steps": 2}


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def preset(path: Path, jobs: list, **defaults) -> Path:
    path.write_text(yaml.safe_dump({"defaults": defaults, "jobs": jobs}, allow_unicode=True), encoding="utf-8")
    return path


def job(name: str, video_path: Path, *edits, **fields) -> dict:
    return {"name": name, "video": str(video_path), "prompt": "a test pattern", "edits": list(edits), **fields}


def records(root: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in root.glob("*/*/run.json")}


def bad(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError, match=match) as caught:
        load_presets([path])
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)


def test_every_bad_preset_is_refused_with_file_job_and_key(tmp_path, skiing):
    video_line = f"video: {skiing}"
    bad(tmp_path, "", "the file is empty")
    bad(tmp_path, "jobs: [a, b\n", "not valid YAML")
    bad(tmp_path, "- just\n- a list\n", "expected a mapping")
    bad(tmp_path, "jobs: []\n", "non-empty 'jobs' list")
    bad(tmp_path, "job: []\n", "unknown key 'job'; expected one of defaults, jobs")
    bad(tmp_path, f"jobs:\n- {{{video_line}, prompt: x, edits: [y], colour: red}}\n", "job 1: unknown key 'colour'")
    text = f"jobs:\n- {{name: ski, {video_line}, prompt: x, edits: [y], tune: {{steps: many}}}}\n"
    bad(tmp_path, text, r"job 'ski': tune: --steps takes a number or 'auto', got 'many'")
    text = f"jobs:\n- {{name: ski, {video_line}, prompt: x, edits: [y], tune: {{steps: true}}}}\n"
    bad(tmp_path, text, "tune.steps: expected int or str, got True")
    text = f"jobs:\n- {{name: ski, {video_line}, prompt: x, edits: [y], tune: {{steps: 0}}}}\n"
    bad(tmp_path, text, "job 'ski': tune: --steps must be a number >= 1")
    text = f"jobs:\n- {{name: ski, {video_line}, prompt: x, edits: [y], output: {{size: huge}}}}\n"
    bad(tmp_path, text, "job 'ski': output: unknown --output-size 'huge'")
    bad(
        tmp_path,
        "jobs:\n- {name: ski, video: nowhere.mp4, prompt: x, edits: [y]}\n",
        "job 'ski': video: .* does not exist",
    )
    bad(tmp_path, f"jobs:\n- {{name: ski, video: {tmp_path}, prompt: x, edits: [y]}}\n", "is not a file")
    bad(tmp_path, f"jobs:\n- {{name: ski, {video_line}, edits: [y]}}\n", "job 'ski': prompt: expected non-empty text")
    bad(tmp_path, f"jobs:\n- {{name: ski, {video_line}, prompt: x, edits: []}}\n", "job 'ski': edits: expected a list")
    text = f"jobs:\n- {{name: ski, {video_line}, prompt: x, edits: [{{guidance: 3}}]}}\n"
    bad(tmp_path, text, r"job 'ski': edits\[1\].target: expected non-empty text")
    text = f"jobs:\n- {{name: ski, {video_line}, prompt: x, edits: [a b, A-B]}}\n"
    bad(tmp_path, text, r"edits\[2\]: writes the same file as edit 1 \(a-b.mp4\)")
    one = f"- {{name: a, {video_line}, prompt: x, edits: [y]}}\n"
    text = f"jobs:\n{one}{one}"
    bad(tmp_path, text, "job 'a': two jobs have this name")
    bad(
        tmp_path,
        f"jobs:\n- {{name: ../up, {video_line}, prompt: x, edits: [y]}}\n",
        "name: '../up' is not a folder name",
    )
    bad(
        tmp_path,
        f"jobs:\n- {{name: a, {video_line}, prompt: x, edits: [y], model: ./none}}\n",
        "model: .* does not exist",
    )
    bad(tmp_path, "defaults: {tune: {step: 3}}\njobs: []\n", "defaults: tune: unknown key 'step'")
    (tmp_path / "latin1.yaml").write_bytes("jobs: [caf\xe9]".encode("latin-1"))
    with pytest.raises(UsageError, match="not valid YAML"):
        load_presets([tmp_path / "latin1.yaml"])
    with pytest.raises(UsageError, match="no such preset file"):
        load_presets([tmp_path / "missing.yaml"])


def test_defaults_apply_per_key_and_paths_are_relative_to_the_preset(tmp_path, skiing, tiny_model):
    folder = tmp_path / "my presets é"
    folder.mkdir()
    (folder / "clip one.mp4").write_bytes(skiing.read_bytes())
    text = f"""
defaults:
  model: {tiny_model}
  tune: {{steps: 7, lr: 3e-5, size: 32}}
  edit: {{guidance: 4}}
  output: {{size: source}}
jobs:
  - video: clip one.mp4
    prompt: a man is skiing
    tune: {{steps: 9, frames: all, from_time: "0:01", to_time: 2.5, window: 6}}
    edits:
      - on the moon
      - {{target: on mars, guidance: 9, seed: 4, name: mars, overlap: 3}}
"""
    (folder / "ski.yaml").write_text(text, encoding="utf-8")
    [loaded] = load_presets([folder / "ski.yaml"])
    assert loaded.name == "clip-one" and loaded.video == (folder / "clip one.mp4").resolve()
    assert (loaded.tune.steps, loaded.tune.lr, loaded.tune.size, loaded.tune.prompt) == (9, 3e-5, 32, "a man is skiing")
    assert (loaded.tune.frames, loaded.tune.from_time, loaded.tune.to_time, loaded.tune.window) == ("all", 1, 2.5, 6)
    assert loaded.edits[1].settings.overlap == 3
    assert [(e.name, e.settings.guidance, e.settings.seed) for e in loaded.edits] == [
        ("on-the-moon", 4.0, None),
        ("mars", 9.0, 4),
    ]
    assert loaded.output.size == "source" and loaded.model.model == str(tiny_model)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "ski.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(UsageError, match="same name as"):
        load_presets([folder / "ski.yaml", tmp_path / "other" / "ski.yaml"])


def test_shards_and_ranks_take_every_job_exactly_once():
    for shards in (1, 2, 3):
        for world in (1, 2, 4):
            owners = [
                [(k, r) for k in range(shards) for r in range(world) if Share(k, shards, r, world).takes(i)]
                for i in range(13)
            ]
            assert all(len(o) == 1 for o in owners)
            assert len({o[0] for o in owners}) == min(13, shards * world)
    assert parse_shard("2/4") == (1, 4)
    for text in ("0/2", "3/2", "a/b", "2"):
        with pytest.raises(UsageError, match="--shard"):
            parse_shard(text)


def test_batch_runs_resumes_isolates_failures_and_writes_outputs(tmp_path, skiing, car, tiny_model):
    (tmp_path / "broken.mp4").write_bytes(car.read_bytes()[:40000])
    portrait = make_video(tmp_path / "tall clip ü.webm", 40, 72, 8)
    tiny = make_video(tmp_path / "tiny.gif", 50, 40, 8)
    long = make_video(tmp_path / "long.avi", 64, 48, 3000, fps=100)  # 30 s: only the frames used are decoded
    jobs = [
        job("ski", skiing, "a man is skiing on mars", {"target": "a man is skiing on the moon", "guidance": 3.0}),
        job("broken", tmp_path / "broken.mp4", "anything"),
        job("tall", portrait, "a tall pattern", output={"size": "source", "fps": 5.0, "gif": True, "grid": True}),
        job("tiny", tiny, "a small pattern", tune={"start": 4}),
        job("long", long, "a long pattern", tune={"start": 2900}),
    ]
    path = preset(
        tmp_path / "mix.yaml", jobs, model=str(tiny_model), tune=TUNE, edit=EDIT, output={"side_by_side": True}
    )
    result = ctxedit("batch", path, "--device", "cpu", "--json")
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    statuses = {o["job"]: (o["status"], o["detail"]) for o in summary["jobs"]}
    assert statuses["mix/ski"] == ("done", "tuned, 2 edits")
    assert all(statuses[f"mix/{name}"] == ("done", "tuned, 1 edit") for name in ("tall", "tiny", "long"))
    assert statuses["mix/broken"][0] == "failed" and "truncated or corrupt" in statuses["mix/broken"][1]

    ski = tmp_path / "runs/mix/ski/edits"
    assert sorted(p.name for p in ski.iterdir()) == [
        "a-man-is-skiing-on-mars.mp4",
        "a-man-is-skiing-on-mars.png",
        "a-man-is-skiing-on-the-moon.mp4",
        "a-man-is-skiing-on-the-moon.png",
        "side-by-side.mp4",
    ]
    edit_info = video.probe(ski / "a-man-is-skiing-on-mars.mp4")
    both = video.probe(ski / "side-by-side.mp4")
    assert (edit_info.width, edit_info.height, edit_info.has_audio) == (32, 32, True)
    assert both.width == 3 * 256 and both.num_frames == 2 and both.has_audio  # 32 px panels enlarged 8x
    tall = tmp_path / "runs/mix/tall/edits"
    tall_info = video.probe(tall / "a-tall-pattern.mp4")
    assert (tall_info.width, tall_info.height, tall_info.fps) == (40, 70, 5.0)  # the source pixels it covers
    assert (tall / "a-tall-pattern.gif").stat().st_size > 0 and (tall / "grid.mp4").exists()
    report = (tmp_path / "runs/mix/report.md").read_text()
    assert (
        "## broken\n\nNot run yet." in report
        and "![a man is skiing on mars](ski/edits/a-man-is-skiing-on-mars.png)" in report
    )
    assert "guidance 3.0, 2 steps" in report
    page = tmp_path / "runs/mix/report.html"  # every job's videos, linked from the preset's folder
    videos = {f.relative_to(tmp_path / "runs/mix").as_posix() for f in linked_files(page) if f.suffix == ".mp4"}
    assert (
        all(f.is_file() for f in linked_files(page))
        and {"ski/source-preview.mp4", "tall/edits/a-tall-pattern.mp4"} < videos
    )
    assert len(videos) == 4 + 5 and "Not run yet." in page.read_text()  # 4 sources, 5 edits; the broken job

    # Run again: nothing is redone, the broken job fails again with the same reason.
    stamps = {p: p.stat().st_mtime_ns for p in ski.glob("*.mp4")}
    again = json.loads(ctxedit("batch", path, "--device", "cpu", "--json").stdout)
    assert [o["status"] for o in again["jobs"]] == ["skipped", "failed", "skipped", "skipped", "skipped"]
    assert stamps == {p: p.stat().st_mtime_ns for p in ski.glob("*.mp4")}
    # ...nor for a run recorded before the newest settings existed (they count as their defaults).
    record_path = tmp_path / "runs/mix/ski/run.json"
    record = json.loads(record_path.read_text())
    del record["settings"]["keep_checkpoints"]
    for entry in record["edits"]:
        del entry["settings"]["context_scale"], entry["settings"]["checkpoint"]
    record_path.write_text(json.dumps(record))
    old = json.loads(ctxedit("batch", path, "--only", "ski", "--device", "cpu", "--json").stdout)
    assert [o["status"] for o in old["jobs"]] == ["skipped"] and stamps == {
        p: p.stat().st_mtime_ns for p in ski.glob("*.mp4")
    }

    # A changed edit setting is refused without --overwrite (nothing lost), redone with it; tuning is kept.
    jobs[0]["edits"][1]["guidance"] = 6.0
    preset(path, jobs, model=str(tiny_model), tune=TUNE, edit=EDIT, output={"side_by_side": True})
    moon = ski / "a-man-is-skiing-on-the-moon.mp4"
    before = moon.read_bytes()
    refused = json.loads(ctxedit("batch", path, "--only", "ski", "--device", "cpu", "--json").stdout)["jobs"]
    assert refused[0]["status"] == "failed" and "made with other settings; pass --overwrite" in refused[0]["detail"]
    assert moon.read_bytes() == before
    redone = json.loads(ctxedit("batch", path, "--only", "mix/ski", "--overwrite", "--device", "cpu", "--json").stdout)
    assert redone["jobs"][0]["detail"] == "1 edit" and moon.read_bytes() != before
    assert stamps[ski / "a-man-is-skiing-on-mars.mp4"] == (ski / "a-man-is-skiing-on-mars.mp4").stat().st_mtime_ns

    # Changed tuning settings: refused, the run kept.
    preset(path, jobs, model=str(tiny_model), tune=TUNE | {"steps": 3}, edit=EDIT)
    out = json.loads(ctxedit("batch", path, "--only", "ski", "--device", "cpu", "--json").stdout)["jobs"][0]
    assert out["status"] == "failed" and "holds a run with other settings (steps: 2 -> 3)" in out["detail"]
    fails("batch", path, "--only", "nobody", match="--only 'nobody' names no job")
    assert records(tmp_path / "runs")["ski"]["tuning"]["steps_done"] == 2


def test_a_preset_that_leaves_the_steps_at_auto_resumes_and_then_skips(tmp_path, skiing, tiny_model, monkeypatch):
    """Tuning steps left at "auto" (runs record the number it came to): an interrupted job resumes its tuning and a
    finished one is not done again."""
    monkeypatch.setattr(settings, "STEPS", 4)  # auto on a clip that fits one window (300 steps would take 30 s)
    tune = {name: value for name, value in TUNE.items() if name != "steps"}
    jobs = [job("ski", skiing, "on mars")]
    path = preset(tmp_path / "auto.yaml", jobs, model=str(tiny_model), tune=tune, edit={"steps": 1})
    with ctrl_c_during_step(monkeypatch, 2, "forward"):
        assert ctxedit("batch", path, "--device", "cpu").exit_code == 130
    run = Run(tmp_path / "runs/auto/ski")
    assert run.checkpoint_path.exists() and run.read_record()["settings"]["steps"] == 4

    real_loss, steps_run = tuning.training_loss, []
    monkeypatch.setattr(tuning, "training_loss", lambda *args: steps_run.append(1) or real_loss(*args))
    resumed = json.loads(ctxedit("batch", path, "--device", "cpu", "--json").stdout)["jobs"][0]
    assert (resumed["status"], resumed["detail"], len(steps_run)) == ("done", "resumed tuning, 1 edit", 2)
    assert run.read_record()["tuning"]["steps_done"] == 4 and not run.checkpoint_path.exists()
    again = json.loads(ctxedit("batch", path, "--device", "cpu", "--json").stdout)["jobs"][0]
    assert (again["status"], again["detail"], len(steps_run)) == ("skipped", "already done", 2)


def test_bad_places_to_write(tmp_path, skiing, tiny_model, monkeypatch):
    path = preset(tmp_path / "p.yaml", [job("ski", skiing, "on mars")], model=str(tiny_model), tune=TUNE, edit=EDIT)
    (tmp_path / "file").write_text("I am a file")
    fails("batch", path, "--out", tmp_path / "file" / "runs", "--device", "cpu", match="cannot write to --out")
    assert (tmp_path / "file").read_text() == "I am a file"
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "locked").mkdir(mode=0o500)
        fails("batch", path, "--out", tmp_path / "locked", "--device", "cpu", match="Permission denied")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(video, "write_video", disk_full)
    result = ctxedit("batch", path, "--device", "cpu", "--json")
    [outcome] = json.loads(result.stdout)["jobs"]
    assert result.exit_code == 1 and outcome["status"] == "failed" and "No space left on device" in outcome["detail"]
    assert not list((tmp_path / "runs/p/ski").glob("edits/*"))


def test_two_processes_split_the_jobs_through_torchrun(tmp_path, skiing, car, tiny_model):
    jobs = [job(f"clip{i}", (skiing, car)[i % 2], "edited") for i in range(3)]
    path = preset(tmp_path / "split.yaml", jobs, model=str(tiny_model), tune=TUNE, edit=EDIT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*command, "-m", "ctxedit", "batch", str(path), "--device", "cpu", "--json"],
        capture_output=True,
        text=True,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # printed once, by rank 0, with every process's outcomes
    assert [(o["job"], o["status"], o["rank"]) for o in summary["jobs"]] == [
        ("split/clip0", "done", 0),
        ("split/clip1", "done", 1),
        ("split/clip2", "done", 0),
    ]
    assert all(len(r["edits"]) == 1 for r in records(tmp_path / "runs").values())


def _wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, "the batch ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)


def test_a_killed_batch_finishes_on_the_next_run_without_redoing_anything(tmp_path, skiing, tiny_model):
    edits = [f"edit number {i}" for i in range(4)]
    tune = TUNE | {"steps": 60, "checkpoint_every": 5}
    path = preset(
        tmp_path / "k.yaml", [job("ski", skiing, *edits)], model=str(tiny_model), tune=tune, edit={"steps": 40}
    )
    run = tmp_path / "runs/k/ski"
    command = [sys.executable, "-m", "ctxedit", "batch", str(path), "--device", "cpu"]

    # SIGINT (Ctrl-C) while tuning: a checkpoint, exit 130; the next run resumes it.
    # A shell without job control starts background jobs with SIGINT ignored; the batch must see Ctrl-C.
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=default_sigint)
    _wait_for(lambda: (run / "checkpoint.pt").exists(), process)
    process.send_signal(signal.SIGINT)
    assert process.wait(60) == 130
    assert (run / "checkpoint.pt").exists() and "tuning" not in json.loads((run / "run.json").read_text())

    # SIGKILL once the first edit is recorded.
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    edited = lambda: (run / "run.json").exists() and len(json.loads((run / "run.json").read_text())["edits"]) >= 1  # noqa: E731
    _wait_for(edited, process)
    process.kill()
    process.wait()
    record = json.loads((run / "run.json").read_text())
    assert record["tuning"]["steps_done"] == 60 and 1 <= len(record["edits"]) < 4
    first = Path(record["edits"][0]["path"])
    stamp = first.stat().st_mtime_ns

    finished = subprocess.run([*command, "--json"], capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert json.loads(finished.stdout)["jobs"][0]["status"] == "done"
    record = json.loads((run / "run.json").read_text())
    assert sorted(e["target"] for e in record["edits"]) == edits  # each edit recorded once: none redone
    assert first.stat().st_mtime_ns == stamp
    assert not list(run.glob("**/.*.tmp-*"))
    for target in edits:
        assert video.probe(run / "edits" / f"{target.replace(' ', '-')}.mp4").num_frames == 2


def test_the_shipped_presets_are_valid_and_the_shapes_one_runs_on_a_cpu(tmp_path):
    presets = sorted((Path(__file__).resolve().parents[1] / "presets").glob("*.yaml"))
    assert [p.stem for p in presets] == ["car-turn", "man-skiing", "shapes"]
    assert sum(len(job.edits) for job in load_presets(presets)) == 12
    result = ctxedit("batch", presets[-1], "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    assert [o["status"] for o in json.loads(result.stdout)["jobs"]] == ["done", "done"]
    for name in ("two-shapes", "one-shape"):
        edits = tmp_path / "out/shapes" / name / "edits"
        assert len(list(edits.glob("*.mp4"))) == 3 and len(list(edits.glob("*.png"))) == 2  # 2 edits + side by side
    assert (tmp_path / "out/shapes/report.md").read_text().count("![") == 4
