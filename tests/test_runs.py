"""The run's record under concurrent writers: processes that edit or score one run at once each keep what the
others recorded (run.json is changed under an inter-process lock)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_video

from ctxedit import tuning
from ctxedit.errors import RunError
from ctxedit.files import remove_temporaries, write_json
from ctxedit.runs import Run, resolve_run
from ctxedit.settings import TuneSettings

TINY = dict(prompt="a man is skiing", frames=2, stride=3, size=32, steps=1)

APPEND = """
import sys, time
from pathlib import Path
from ctxedit.runs import Run

run, name, count = Run(Path(sys.argv[1])), sys.argv[2], int(sys.argv[3])
(run.root / f"ready-{name}").touch()
while not (run.root / "go").exists():
    time.sleep(0.001)
for i in range(count):
    run.update_record(lambda record: record["edits"].append({"target": f"{name} {i}"}))
"""


def wait_for(paths: list[Path], processes: list[subprocess.Popen], timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not all(path.exists() for path in paths):
        assert all(p.poll() is None for p in processes) and time.time() < deadline, "a writer ended before its start"
        time.sleep(0.01)


def test_two_processes_updating_one_record_lose_nothing(tmp_path):
    run = Run(tmp_path / "run")
    run.write_record({"settings": {"prompt": "a man is skiing"}, "edits": []})
    count = 300
    writers = [subprocess.Popen([sys.executable, "-c", APPEND, str(run.root), name, str(count)]) for name in "ab"]
    wait_for([run.root / "ready-a", run.root / "ready-b"], writers)
    (run.root / "go").touch()  # both start appending at once
    assert [writer.wait(60) for writer in writers] == [0, 0]
    targets = [entry["target"] for entry in run.read_record()["edits"]]
    for name in "ab":
        assert [t for t in targets if t.startswith(name)] == [f"{name} {i}" for i in range(count)]
    assert len(targets) == 2 * count and run.read_record()["settings"] == {"prompt": "a man is skiing"}


def test_a_run_made_before_the_lock_is_updated_and_its_lock_file_is_no_temporary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = resolve_run("runs/old")
    write_json(run.record_path, {"edits": [{"target": "a"}]})  # as every run before run.json.lock
    new = run.update_record(lambda record: record["edits"].append({"target": "b"}))
    assert new == run.read_record() == {"edits": [{"target": "a"}, {"target": "b"}]}
    remove_temporaries(run.root)
    assert sorted(path.name for path in run.root.iterdir()) == ["run.json", "run.json.lock"]
    assert resolve_run("latest") == run
    with pytest.raises(RunError, match="holds no run"):
        Run(tmp_path / "runs/none").update_record(lambda record: None)


def test_an_edit_and_a_score_process_on_one_run_at_once_both_record(skiing, tiny_model, tmp_path):
    """`ctxedit edit` and `ctxedit score` at once: each reads the record when it starts and writes it when it is done,
    and neither loses what the other recorded."""
    run = Run(tmp_path / "run")
    tuning.tune_video(skiing, TuneSettings(**TINY), run, str(tiny_model), "cpu")
    earlier = make_video(tmp_path / "earlier.mp4", 32, 32, 2)  # an edit to score
    run.update_record(lambda record: record["edits"].append({"target": "a test pattern", "path": str(earlier)}))
    where = ["--run", str(run.root), "--device", "cpu"]
    commands = [["edit", *where, "--target", "a man is skiing on the moon", "--steps", "1"], ["score", *where]]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen([sys.executable, "-m", "ctxedit", *command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=env)
        for command in commands
    ]  # fmt: skip
    for process in processes:
        _, errors = process.communicate(timeout=120)
        assert process.returncode == 0, errors.decode()[-2000:]
    earlier_entry, edit = run.read_record()["edits"]
    assert set(earlier_entry["scores"]) == {"attention"} and edit["target"] == "a man is skiing on the moon"
    assert Path(edit["path"]).exists()
