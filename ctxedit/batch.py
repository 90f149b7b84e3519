"""`ctxedit batch`: the jobs of preset files, resumable, one failing job not stopping the others, split across
processes launched by torchrun or accelerate (RANK, WORLD_SIZE, LOCAL_RANK) and across machines (--shard K/N).

Each job is a run folder ROOT/<preset>/<job>. A job whose run was tuned with the same settings, model and video
is not tuned again, an interrupted one resumes from its checkpoint, and an edit recorded with the same target,
settings and output options whose file is there is not redone. The run folders are the only state: whatever
was killed, running the batch again finishes what is missing.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from ctxedit.errors import CtxEditError, Interrupted, RunError, UsageError, VideoError
from ctxedit.files import atomic_path, remove_temporaries, sha256_of
from ctxedit.models.spec import describe
from ctxedit.presets import Job
from ctxedit.report import write_report
from ctxedit.runs import Progress, Run, latest_edits
from ctxedit.settings import EditSettings, OutputSettings, recorded_settings

STATUSES = ("done", "skipped", "failed")


@dataclass(frozen=True)
class Share:
    """Which jobs this process takes: every job i with i % (shards * world) == shard * world + rank."""

    shard: int = 0  # this machine's shard, 0-based (--shard K/N gives K-1)
    shards: int = 1
    rank: int = 0  # this process on the machine, from torchrun/accelerate
    world: int = 1
    local_rank: int = 0

    def takes(self, index: int) -> bool:
        return index % (self.shards * self.world) == self.shard * self.world + self.rank


@dataclass
class JobOutcome:
    job: str
    status: str  # done | skipped | failed
    detail: str
    seconds: float
    rank: int


def parse_shard(text: str | None) -> tuple[int, int]:
    """'K/N' (1-based) -> (K-1, N)."""
    if not text:
        return 0, 1
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard must look like K/N, e.g. 2/4, got {text!r}") from None
    if not 1 <= k <= n:
        raise UsageError(f"--shard K/N needs 1 <= K <= N, got {text!r}")
    return k - 1, n


def process_share(shard: str | None = None) -> Share:
    """This process's share from --shard and the launcher's environment."""
    try:
        rank, world, local_rank = (
            int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0))
        )
    except ValueError:
        raise UsageError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    return Share(*parse_shard(shard), rank, world, local_rank)


def job_run(root: Path, job: Job) -> Run:
    return Run(root / job.preset.stem / job.name)


def tuning_plan(run: Run, job: Job, video_sha: str, overwrite: bool) -> str:
    """tuned | resume | tune | retune (fresh over an unusable run), or a RunError saying why it cannot run."""
    if not run.record_path.exists():
        return "tune"
    record = run.read_record()
    differences = job.tune.differences(record)
    differences += job.model.differences(record)
    if record["video"]["sha256"] != video_sha:
        differences.append(f"video: {job.video} has changed")
    if differences and not overwrite:
        raise RunError(f"{run.root} holds a run with other settings ({'; '.join(differences)}); pass --overwrite")
    if differences:
        return "retune"
    if "tuning" in record and run.tuned_path.exists():
        return "tuned"
    if run.checkpoint_path.exists():
        return "resume"
    return "retune"  # started, but killed before its first checkpoint


def edits_to_do(run: Run, job: Job, record: dict, overwrite: bool) -> list:
    """The job's edits that are not done; a file made with other settings is kept unless `overwrite`."""
    entries, todo = latest_edits(record), []
    for spec in job.edits:
        path = run.edit_path(spec.name)
        entry = entries.get(path.name)
        same = entry is not None and (
            entry["target"],
            recorded_settings(EditSettings, entry["settings"]),
            recorded_settings(OutputSettings, entry.get("output", {})),
        ) == (spec.target, spec.settings.to_dict(), job.output.to_dict())
        if same and path.exists():
            continue
        if entry is not None and not same and path.exists() and not overwrite:
            raise RunError(f"{path} was made with other settings; pass --overwrite to redo it")
        todo.append(spec)  # a file without an entry was written by a batch killed before it could record it
    return todo


def describe_plan(job: Job, root: Path, overwrite: bool) -> str:
    """What running the job would do, without loading any model (for --dry-run)."""
    run = job_run(root, job)
    try:
        plan = tuning_plan(run, job, sha256_of(job.video), overwrite)
        todo = len(edits_to_do(run, job, run.read_record(), overwrite)) if plan == "tuned" else len(job.edits)
    except RunError as error:
        return f"fails: {error}"
    steps = {"tuned": "tuned already", "resume": "resume tuning", "tune": "tune", "retune": "tune again"}[plan]
    if plan != "tuned":
        steps += f" (--steps {job.tune.steps})"
    return f"{steps}; edits {todo} to do, {len(job.edits) - todo} done"


def run_job(job: Job, root: Path, device: str, precision: str, overwrite: bool, progress: Progress | None) -> str:
    """Tune (unless done) and edit what is missing; returns what was done ('' when nothing was)."""
    from ctxedit.editing import EditRequest, render_edits
    from ctxedit.outputs import composite_paths, write_composites
    from ctxedit.tuned import load_tuned
    from ctxedit.tuning import tune_video

    run = job_run(root, job)
    plan = tuning_plan(run, job, sha256_of(job.video), overwrite)
    remove_temporaries(run.root)  # left by a killed process; a job is only ever run by one process at a time
    done = []
    if plan != "tuned":
        tune_video(job.video, job.tune, run, job.model, device, precision, plan == "resume", plan == "retune", progress)
        done.append("tuned" if plan != "resume" else "resumed tuning")
    record = run.read_record()
    todo = edits_to_do(run, job, record, overwrite)
    if todo:
        tuned = load_tuned(run, device, precision)
        requests = [EditRequest(spec.target, spec.settings, run.edit_path(spec.name)) for spec in todo]
        render_edits(tuned, requests, job.output, overwrite=True, progress=progress)
        record = tuned.record
        done.append(f"{len(todo)} edit{'s' * (len(todo) > 1)}")
    if todo or not all(p.exists() for p in composite_paths(run, job.output)):
        edits = [(spec.target, run.edit_path(spec.name)) for spec in job.edits]
        write_composites(run, record, edits, job.output, overwrite=True)  # made from the edits: safe to redo
    return ", ".join(done)


def check_writable(root: Path) -> None:
    """Fail before any work when the output root cannot be created or written to."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as error:
        raise RunError(f"cannot write to --out {root}: {error.strerror or error}") from None


def _gather(outcomes: list[JobOutcome], share: Share) -> list[JobOutcome]:
    """Every process's outcomes, through torch.distributed (gloo: a few bytes of metadata, CPU or GPU alike)."""
    if share.world == 1:
        return outcomes
    import torch.distributed as dist

    everyone: list[list[JobOutcome] | None] = [None] * share.world
    dist.all_gather_object(everyone, outcomes)
    dist.barrier()  # no process tears the group down while another is still receiving
    return [outcome for part in everyone for outcome in part or []]


def run_batch(
    jobs: list[Job],
    root: Path,
    share: Share = Share(),
    device: str = "auto",
    precision: str = "auto",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> list[JobOutcome]:
    """Run this process's share of `jobs`; returns the outcomes of all processes (in job order)."""
    import torch

    check_writable(root)
    if share.world > 1:
        import torch.distributed as dist

        # The group only gathers outcomes at the end; jobs may take hours, so the timeout is generous.
        dist.init_process_group("gloo", timeout=timedelta(days=7))
        if torch.cuda.is_available():
            torch.cuda.set_device(share.local_rank)  # "cuda" now means this process's GPU
    try:
        outcomes = []
        for index, job in enumerate(jobs):
            if not share.takes(index):
                continue
            started = time.perf_counter()
            try:
                detail = run_job(job, root, device, precision, overwrite, progress)
                status = "done" if detail else "skipped"
                detail = detail or "already done"
            except (KeyboardInterrupt, Interrupted):
                raise  # Ctrl-C stops the batch (tuning saved a checkpoint); running it again goes on from there
            except Exception as error:  # one failing job must not stop the others
                known = isinstance(error, CtxEditError)
                status, detail = "failed", str(error) if known else f"{type(error).__name__}: {error}"
            outcomes.append(JobOutcome(job.label, status, detail, time.perf_counter() - started, share.rank))
        everyone = _gather(outcomes, share)
    finally:
        if share.world > 1:
            torch.distributed.destroy_process_group()
    order = {job.label: i for i, job in enumerate(jobs)}
    return sorted(everyone, key=lambda outcome: order[outcome.job])


def _edit_block(entry: dict, video: Path, root: Path, strip: Path | None, run_seed: int) -> list[str]:
    settings = recorded_settings(EditSettings, entry["settings"])
    seed = settings["seed"] if settings["seed"] is not None else f"{run_seed} (the run's)"
    files = [video, *([video.with_suffix(".gif")] if entry["gif"] else [])]
    files = " · ".join(f"[{p.suffix[1:]}]({os.path.relpath(p, root)})" for p in files)
    lines = [
        f"**{entry['target']}** — guidance {settings['guidance']}, {settings['steps']} steps, {settings['inversion']} "
        f"inversion ({settings['inversion_prompt']} prompt), structure {settings['keep_structure']}, words "
        f"{settings['keep_words']}, blend {settings['blend']}, inside {settings['keep_inside']} "
        f"({settings['inject']}), propagation {settings['propagate']}, strength {settings['strength']}, eta "
        f"{settings['eta']}, "
        f"seed {seed}; {entry['width']}x{entry['height']} "
        f"at {entry['fps']:.4g} fps; {entry['seconds']:.1f} s — {files}",
        "",
    ]
    if strip is not None:
        lines += [f"![{entry['target']}]({os.path.relpath(strip, root)})", ""]
    return lines


def _strip_of(entry: dict, video: Path, record: dict, source: list) -> Path | None:
    """edits/<name>.png beside the edit (source row above edit row), made when missing or older than the edit."""
    from ctxedit import compose
    from ctxedit import video as videos
    from ctxedit.runs import source_frames

    png = video.with_suffix(".png")
    if png.exists() and png.stat().st_mtime >= video.stat().st_mtime:
        return png
    try:
        if not source:
            source.append(source_frames(record))
        rows = [
            ("source: " + record["settings"]["prompt"], source[0]),
            (
                entry["target"],
                compose.sized_like(videos.read_frames(videos.probe(video), list(range(len(source[0])))), source[0]),
            ),
        ]
    except VideoError:
        return None  # the source video was moved: no strip, the rest of the report stands
    compose.write_strip(rows, png, overwrite=True)
    return png


def write_reports(jobs: list[Job], root: Path, overwrite: bool = False) -> list[Path]:
    """ROOT/<preset>/report.html (`ctxedit report` of the preset's runs) and report.md for each preset, made from
    the run folders (so they cover every process's and shard's work). report.md: per job the source, settings and
    timings; per edit its settings, time, files, frame strip."""
    written = []
    for preset in dict.fromkeys(job.preset for job in jobs):
        folder, runs = root / preset.stem, [job_run(root, job) for job in jobs if job.preset == preset]
        written.append(write_report(runs, folder / "report.html", overwrite, f"ctxedit batch: {preset.name}"))
        lines = [f"# {preset.name}", "", f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} by ctxedit batch.", ""]
        for run in runs:
            lines += [f"## {run.root.name}", "", *_job_lines(run, folder), ""]
        dest = folder / "report.md"
        with atomic_path(dest) as tmp:
            tmp.write_text("\n".join(lines), encoding="utf-8")
        written.append(dest)
    return written


def _job_lines(run: Run, folder: Path) -> list[str]:
    if not run.record_path.exists():
        return ["Not run yet."]
    record = run.read_record()
    video, size, tuning, timings = record["video"], record["size"], record.get("tuning"), record["timings"]
    settings = ", ".join(f"{k} {v}" for k, v in record["settings"].items() if k != "prompt")
    lines = [
        f"- source: `{video['path']}` ({video['width']}x{video['height']}, {video['fps']:.4g} fps), frames "
        f"{record['frames']['indices']} at {size['width']}x{size['height']}",
        f"- prompt: {record['settings']['prompt']}",
        f"- model: `{describe(record['model'])}`; {record['runtime']['device']}, {record['runtime']['precision']}",
        f"- tuning: {settings}",
    ]
    if tuning and tuning["steps_done"]:
        loss = tuning["loss"]
        lines.append(
            f"- tuned {tuning['steps_done']} steps in {timings['tune_s']:.1f} s "
            f"({timings['tune_step_s']:.2f} s/step), loss {loss['first']:.4f} -> {loss['last']:.4f}"
        )
    elif tuning:
        lines.append(f"- no tuning step finished: {tuning['stopped_early']}")
    else:
        lines.append("- tuning not finished")
    lines.append("")
    source: list = []  # read once per job, when a strip has to be made
    for name, entry in latest_edits(record).items():
        video = run.root / "edits" / name
        if video.exists():
            strip = _strip_of(entry, video, record, source)
            lines += _edit_block(entry, video, folder, strip, record["settings"]["seed"])
    return lines
