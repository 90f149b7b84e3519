"""The `ctxedit` command: check flags, call one library function, print. Heavy imports stay inside commands."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from ctxedit.errors import CtxEditError
from ctxedit.settings import (
    DEFAULT_MODEL,
    STEPS,
    STEPS_GROWTH,
    EditSettings,
    OutputSettings,
    TuneSettings,
    default_model,
)

app = typer.Typer(
    help="Text-driven video editing: tune once on a clip, then edit it with any number of target texts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

# Help panels of tune and edit: the common options come first (typer's "Options"), then these, in this order.
MODEL, FRAMES, TUNING = "Model", "Frames", "Tuning"
STRUCTURE, REALIGN, WINDOWS = "Structure: what the edit keeps of the source", "Re-alignment", "Windows (long clips)"
OUTPUT, REPRODUCIBILITY = "Output", "Reproducibility"

RunOpt = Annotated[str, typer.Option("--run", help="Run directory, or 'latest' for the most recent under runs/.")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cuda | cpu.")]
PrecisionOpt = Annotated[str, typer.Option(help="auto (fp16/bf16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
SCORER_HELP = "Text alignment, recorded for every candidate: attention | caption | clip."
SCORER_MODEL_HELP = "Captioner (BLIP; 'shapes' for the demo world) or CLIP model: hub id or folder."
ScorerOpt = Annotated[str, typer.Option(help=SCORER_HELP)]
ScorerModelOpt = Annotated[str | None, typer.Option(help=SCORER_MODEL_HELP)]
OutputSizeOpt = Annotated[
    str,
    typer.Option(
        "--output-size", help="processed (the model's size) | source (scaled back, Lanczos).", rich_help_panel=OUTPUT
    ),
]
FpsOpt = Annotated[
    float | None,
    typer.Option(
        help="Frame rate of the outputs; another rate than the source's drops the audio.",
        show_default=False,
        rich_help_panel=OUTPUT,
    ),
]
GifOpt = Annotated[bool, typer.Option("--gif", help="Also write a GIF beside each MP4.", rich_help_panel=OUTPUT)]
SideBySideOpt = Annotated[
    bool,
    typer.Option(
        "--side-by-side", help="Also write edits/side-by-side.mp4: source | edits, captioned.", rich_help_panel=OUTPUT
    ),
]
GridOpt = Annotated[
    bool, typer.Option("--grid", help="Also write edits/grid.mp4: source and edits in a grid.", rich_help_panel=OUTPUT)
]


def _known_error(error: Exception) -> str | None:
    """One-line advice for failures that are not bugs but come from outside ctxedit's own checks."""
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError):
        return (
            "out of GPU memory; try fewer --frames, a smaller --size, --precision fp16, or closing other GPU programs"
        )
    if isinstance(error, PermissionError):
        return f"permission denied: {error.filename}; choose a --run or --out folder you can write to"
    if isinstance(error, OSError) and error.errno == 28:
        return "no space left on the disk; free some space or choose a --run folder on another disk"
    return None


def handle_errors(command):
    """Turn user-caused errors into one line on stderr and a non-zero exit; tracebacks only with CTXEDIT_DEBUG=1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        debug = os.environ.get("CTXEDIT_DEBUG") == "1"
        try:
            return command(*args, **kwargs)
        except CtxEditError as error:
            if debug:
                raise
            err.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as error:
            message = _known_error(error)
            if message is None or debug:
                raise
            err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


class ProgressBars:
    """Rich progress bars fed by the library's ProgressEvents; silent when stdout is not a terminal or with --json."""

    def __init__(self, quiet: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=err,
            disable=quiet or not out.is_terminal,
        )
        self.tasks: dict[tuple[str, str], int] = {}

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def __call__(self, event) -> None:
        key = (event.stage, event.label)
        if key not in self.tasks:
            label = f"{event.stage} {event.label[:30]}".strip()
            self.tasks[key] = self.progress.add_task(label, total=event.total, info="")
        info = f"loss {event.loss:.4f}" if event.loss is not None else ""
        self.progress.update(self.tasks[key], completed=event.done, total=event.total, info=info)


def _print_json(data) -> None:
    out.print_json(json.dumps(data))


@app.command()
@handle_errors
def tune(
    video: Annotated[Path, typer.Argument(help="Source video (MP4, MOV, AVI, WEBM, MKV or GIF).", show_default=False)],
    prompt: Annotated[str, typer.Option(help="Caption of the source video, e.g. 'a man is skiing'.")],
    model: Annotated[
        str,
        typer.Option(
            help="Hub id, local diffusers folder or one .safetensors checkpoint (SD 1.x or 2.x). "
            f"\\[default: $CTXEDIT_MODEL or {DEFAULT_MODEL}]",
            show_default=False,
        ),
    ] = "",
    model_config: Annotated[
        str | None,
        typer.Option(
            help="Architecture of a single-file --model: sd-v1, sd-v2-base (512, epsilon), sd-v2-768-v or a diffusers "
            "folder. \\[default: from its keys; SD 2.x files: sd-v2-768-v]",
            show_default=False,
            rich_help_panel=MODEL,
        ),
    ] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(
            help="LoRA file (diffusers/peft or kohya), FILE or FILE:SCALE (e.g. style.safetensors:0.7); repeatable.",
            show_default=False,
            rich_help_panel=MODEL,
        ),
    ] = None,
    embedding: Annotated[
        list[str] | None,
        typer.Option(
            help="Textual-inversion embedding, FILE or FILE:TOKEN; its token can be used in the prompt and targets. "
            "Repeatable.",
            show_default=False,
            rich_help_panel=MODEL,
        ),
    ] = None,
    run: Annotated[
        str, typer.Option("--run", help="Run directory. \\[default: runs/<video name>]", show_default=False)
    ] = "",
    frames: Annotated[
        str,
        typer.Option(
            help="Frames to tune on and edit, or 'all' (the whole clip or --from/--to span).", rich_help_panel=FRAMES
        ),
    ] = str(TuneSettings.frames),
    stride: Annotated[int, typer.Option(help="Take every n-th frame.", rich_help_panel=FRAMES)] = TuneSettings.stride,
    start: Annotated[int, typer.Option(help="First frame index.", rich_help_panel=FRAMES)] = TuneSettings.start,
    from_time: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="Start of the span to edit: seconds, mm:ss or h:mm:ss (instead of --start).",
            show_default=False,
            rich_help_panel=FRAMES,
        ),
    ] = None,
    to_time: Annotated[
        str | None,
        typer.Option(
            "--to",
            help="End of the span: seconds, mm:ss or h:mm:ss. \\[default: the end]",
            show_default=False,
            rich_help_panel=FRAMES,
        ),
    ] = None,
    window: Annotated[
        int,
        typer.Option(
            help="Frames the model sees at once; longer clips are tuned and edited in windows.", rich_help_panel=WINDOWS
        ),
    ] = TuneSettings.window,
    size: Annotated[
        str,
        typer.Option(
            help="Short side in pixels (rounded to the model's multiple), or 'auto': the model's native one.",
            rich_help_panel=FRAMES,
        ),
    ] = TuneSettings.size,
    crop: Annotated[
        str, typer.Option(help="none (keep aspect ratio) | center (square).", rich_help_panel=FRAMES)
    ] = TuneSettings.crop,
    steps: Annotated[
        str, typer.Option(help=f"Tuning steps, or 'auto': {STEPS}, x (frames / window)^{STEPS_GROWTH:g} if longer.")
    ] = TuneSettings.steps,
    lr: Annotated[
        float, typer.Option(help="Learning rate of the UNet parameters.", rich_help_panel=TUNING)
    ] = TuneSettings.lr,
    adapter_lr: Annotated[
        float, typer.Option(help="Learning rate of the context adapter.", rich_help_panel=TUNING)
    ] = TuneSettings.adapter_lr,
    context: Annotated[
        str,
        typer.Option(help="Shift schedule: quadratic | prior | noise | off (Tune-A-Video).", rich_help_panel=TUNING),
    ] = TuneSettings.context,
    context_scale: Annotated[
        float, typer.Option(help="Scale of the context shift.", rich_help_panel=TUNING)
    ] = TuneSettings.context_scale,
    adapter: Annotated[
        str,
        typer.Option(
            help="Context adapter to start from: fresh (zero head: starts as Tune-A-Video), auto (the model's "
            "pre-trained adapter/ if it has one, else fresh) or the folder of a pre-trained adapter.",
            rich_help_panel=MODEL,
        ),
    ] = TuneSettings.adapter,
    seed: Annotated[
        int, typer.Option(help="Seed of initialization, timesteps and noise.", rich_help_panel=REPRODUCIBILITY)
    ] = TuneSettings.seed,
    checkpoint_every: Annotated[
        int, typer.Option(help="Steps between resumable checkpoints.", rich_help_panel=REPRODUCIBILITY)
    ] = TuneSettings.checkpoint_every,
    keep_checkpoints: Annotated[
        bool,
        typer.Option(
            "--keep-checkpoints",
            help="Keep the parameters of every checkpoint (edit --checkpoint STEP; more different --candidates).",
            rich_help_panel=REPRODUCIBILITY,
        ),
    ] = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue an interrupted run with the same settings.", rich_help_panel=REPRODUCIBILITY
        ),
    ] = False,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Tune the video UNet and the context adapter on one clip (once per video)."""
    settings = TuneSettings(
        prompt=prompt, frames=frames, stride=stride, start=start, from_time=from_time, to_time=to_time, window=window,
        size=size, crop=crop, steps=steps, lr=lr,
        adapter_lr=adapter_lr, context=context, context_scale=context_scale, adapter=adapter, seed=seed,
        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
    )  # fmt: skip
    from ctxedit.models.embeddings import Embedding
    from ctxedit.models.lora import Lora
    from ctxedit.models.spec import ModelSpec
    from ctxedit.runs import Run, default_run
    from ctxedit.tuning import tune_video

    weights = ModelSpec(
        model or default_model(), model_config, loras=tuple(map(Lora.parse, lora or ())),
        embeddings=tuple(map(Embedding.parse, embedding or ())),
    )  # fmt: skip

    if device == "auto" and not _has_cuda():
        err.print(
            "[yellow]warning:[/yellow] no CUDA GPU found; running on the CPU, where full-size SD is slow",
            soft_wrap=True,
        )
    run_dir = Run(Path(run)) if run else default_run(video)
    with ProgressBars(quiet=json_out) as bars:
        result = tune_video(video, settings, run_dir, weights, device, precision, resume, overwrite, progress=bars)
    if json_out:
        _print_json(asdict(result))
    else:
        out.print(
            f"tuned {result.steps} steps in {result.seconds:.1f} s, loss {result.first_loss:.4f} -> "
            f"{result.last_loss:.4f}; run: {result.run}\nnext: ctxedit edit --run {result.run} --target '...'",
            highlight=False,
        )


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@app.command()
@handle_errors
def edit(
    target: Annotated[
        list[str], typer.Option(help="Edited description; repeat for several edits.", show_default=False)
    ],
    run: RunOpt = "latest",
    steps: Annotated[int, typer.Option(help="DDIM steps of inversion and sampling.")] = EditSettings.steps,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = EditSettings.guidance,
    inversion_prompt: Annotated[
        str, typer.Option(help="source (ContextDiff) | empty (Tune-A-Video).", rich_help_panel=STRUCTURE)
    ] = EditSettings.inversion_prompt,
    inversion: Annotated[
        str,
        typer.Option(
            help="direct (the source reconstructs exactly under guidance) | plain | negative (prompt).",
            rich_help_panel=STRUCTURE,
        ),
    ] = EditSettings.inversion,
    keep_structure: Annotated[
        float,
        typer.Option(
            help="Fraction of the sampled steps (the first) that take the source's features; 0: none.",
            rich_help_panel=STRUCTURE,
        ),
    ] = EditSettings.keep_structure,
    keep_words: Annotated[
        float,
        typer.Option(
            help="Fraction of the sampled steps where words shared with the source keep its maps.",
            rich_help_panel=STRUCTURE,
        ),
    ] = EditSettings.keep_words,
    blend: Annotated[
        str,
        typer.Option(
            help="auto (only the changed words' region may change) | off | words to blend, e.g. 'hat,man'.",
            rich_help_panel=STRUCTURE,
        ),
    ] = EditSettings.blend,
    strength: Annotated[
        float,
        typer.Option(
            help="Fraction of the steps inverted and resampled; lower keeps more of the source.",
            rich_help_panel=STRUCTURE,
        ),
    ] = EditSettings.strength,
    keep_inside: Annotated[
        float,
        typer.Option(
            help="Fraction of the sampled steps (the first) during which direct inversion and the source's features "
            "also hold inside the region the edit changes; after it that region is the edit's own.",
            rich_help_panel=STRUCTURE,
        ),
    ] = EditSettings.keep_inside,
    inject: Annotated[
        str,
        typer.Option(
            help="whole (the source's features as they are) | layout (inside the changed region, the source's "
            "features in the edit's own channel statistics: its layout without its colours).",
            rich_help_panel=STRUCTURE,
        ),
    ] = EditSettings.inject,
    propagate: Annotated[
        float,
        typer.Option(
            help="Share of each pixel's change taken from the pixels it matches in the neighbouring frames of the "
            "source: the edit follows the source's motion; 0: off.",
            rich_help_panel=STRUCTURE,
        ),
    ] = EditSettings.propagate,
    realign: Annotated[
        str,
        typer.Option(
            help="auto (the words the target changes get more attention in their region) | off. "
            "Weigh words yourself with (word:1.5) in --target.",
            rich_help_panel=REALIGN,
        ),
    ] = EditSettings.realign,
    candidates: Annotated[
        int,
        typer.Option(
            help="Make this many edits that differ (eta seeds, guidance, structure, context scale, kept "
            "checkpoints); keep the steadiest and best preserved.",
            rich_help_panel=REALIGN,
        ),
    ] = EditSettings.candidates,
    scorer: Annotated[str, typer.Option(help=SCORER_HELP, rich_help_panel=REALIGN)] = EditSettings.scorer,
    scorer_model: Annotated[str | None, typer.Option(help=SCORER_MODEL_HELP, rich_help_panel=REALIGN)] = None,
    keep_candidates: Annotated[
        bool,
        typer.Option(
            "--keep-candidates", help="Write every candidate beside the chosen edit.", rich_help_panel=REALIGN
        ),
    ] = False,
    overlap: Annotated[
        int,
        typer.Option(
            help="Frames shared by neighbouring windows of a clip longer than the tuned --window.",
            rich_help_panel=WINDOWS,
        ),
    ] = EditSettings.overlap,
    out_path: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Output MP4 (one target only). \\[default: RUN/edits/<target>.mp4]",
            show_default=False,
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    output_size: OutputSizeOpt = OutputSettings.size,
    fps: FpsOpt = None,
    gif: GifOpt = False,
    side_by_side: SideBySideOpt = False,
    grid: GridOpt = False,
    context_scale: Annotated[
        float, typer.Option(help="Times the tuned context shift, in inversion and sampling.", rich_help_panel=MODEL)
    ] = EditSettings.context_scale,
    lora_scale: Annotated[
        str | None,
        typer.Option(
            help="Scale of the run's LoRAs: one for all, or one per LoRA (e.g. 0.5,1). \\[default: as tuned]",
            show_default=False,
            rich_help_panel=MODEL,
        ),
    ] = None,
    checkpoint: Annotated[
        int | None,
        typer.Option(
            help="Edit with the parameters kept after this tuning step (tune --keep-checkpoints). \\[default: the end]",
            show_default=False,
            rich_help_panel=MODEL,
        ),
    ] = None,
    eta: Annotated[
        float,
        typer.Option(help="DDIM eta; 0 is deterministic, > 0 adds seeded noise.", rich_help_panel=REPRODUCIBILITY),
    ] = EditSettings.eta,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed of the eta noise. \\[default: the run's seed]",
            show_default=False,
            rich_help_panel=REPRODUCIBILITY,
        ),
    ] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Edit a tuned run towards one or more target texts; writes one MP4 per target."""
    settings = EditSettings(
        steps=steps, guidance=guidance, inversion_prompt=inversion_prompt, inversion=inversion,
        keep_structure=keep_structure, keep_words=keep_words, blend=blend, strength=strength,
        keep_inside=keep_inside, inject=inject, propagate=propagate, realign=realign,
        candidates=candidates, scorer=scorer, scorer_model=scorer_model, context_scale=context_scale,
        lora_scale=lora_scale, overlap=overlap, checkpoint=checkpoint, eta=eta, seed=seed,
    )  # fmt: skip
    output = OutputSettings(
        size=output_size, fps=fps, gif=gif, side_by_side=side_by_side, grid=grid, keep_candidates=keep_candidates
    )
    from ctxedit.editing import edit_run
    from ctxedit.runs import resolve_run

    run_dir = resolve_run(run)
    with ProgressBars(quiet=json_out) as bars:
        results = edit_run(run_dir, target, settings, out_path, output, overwrite, device, precision, progress=bars)
    if json_out:
        _print_json([asdict(r) for r in results])
        return
    table = Table("target", "frames", "size", "fps", "seconds", "video")
    table.columns[-1].overflow = "fold"
    for r in results:
        table.add_row(r.target, str(r.frames), f"{r.width}x{r.height}", f"{r.fps:.4g}", f"{r.seconds:.1f}", r.path)
    out.print(table)


@app.command()
@handle_errors
def batch(
    presets: Annotated[
        list[Path],
        typer.Argument(help="Preset YAML files (see presets/).", metavar="PRESET.yaml...", show_default=False),
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", help="Root of the runs: OUT/<preset>/<job>/ and OUT/<preset>/report.html and .md.")
    ] = Path("runs"),
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check the presets and show the plan; run nothing.")
    ] = False,
    only: Annotated[
        list[str] | None, typer.Option(help="Run only this job (name or preset/name); repeatable.", show_default=False)
    ] = None,
    shard: Annotated[
        str | None, typer.Option(help="Take share K of N (1-based), e.g. a SLURM array task.", show_default=False)
    ] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Tune again and redo edits whose settings changed.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Run the jobs of preset files: tune each video once, make every edit; resumable and shardable.

    Several GPUs: torchrun --nproc-per-node G -m ctxedit batch PRESET.yaml (each process takes its share)."""
    from ctxedit.batch import describe_plan, process_share, run_batch, write_reports
    from ctxedit.presets import load_presets, select_jobs

    jobs = select_jobs(load_presets(presets), only)
    share = process_share(shard)
    lead = share.rank == 0
    if dry_run:
        table = Table("job", "video", "process", "plan")
        table.columns[-1].overflow = "fold"
        for index, job in enumerate(jobs):
            owner = index % (share.shards * share.world)
            where = f"shard {owner // share.world + 1}/{share.shards}, rank {owner % share.world}"
            table.add_row(job.label, job.video.name, where, describe_plan(job, out_dir, overwrite))
        if lead:
            out.print(table)
        return
    with ProgressBars(quiet=json_out or not lead) as bars:
        outcomes = run_batch(jobs, out_dir, share, device, precision, overwrite, progress=bars)
    failed = sum(o.status == "failed" for o in outcomes)
    if lead:
        reports = write_reports(jobs, out_dir, overwrite)
        if json_out:
            _print_json({"jobs": [asdict(o) for o in outcomes], "reports": [str(r) for r in reports]})
        else:
            table = Table("job", "status", "seconds", "detail")
            table.columns[-1].overflow = "fold"
            colour = {"done": "green", "skipped": "cyan", "failed": "red"}
            for o in outcomes:
                table.add_row(o.job, f"[{colour[o.status]}]{o.status}[/]", f"{o.seconds:.1f}", o.detail)
            out.print(table)
            done = len(outcomes) - failed
            summary = (
                f"{done} of {len(outcomes)} jobs finished, {failed} failed; report: {', '.join(map(str, reports))}"
            )
            out.print(summary, highlight=False)
    if failed:
        raise typer.Exit(1)


@app.command()
@handle_errors
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the videos and the run.")] = Path("ctxedit-demo"),
    steps: Annotated[int, typer.Option(help="Tuning steps.")] = 150,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Tune, edit and score a shapes-world clip with the bundled model, and write its report (no download, about 40
    seconds on a CPU)."""
    from ctxedit.toy.demo import run_demo

    with ProgressBars(quiet=json_out) as bars:
        result = run_demo(out_dir, steps, device=device, overwrite=overwrite, progress=bars)
    if json_out:
        _print_json(asdict(result))
        return
    legend = (
        "share of frames: edited = the target object is there, kept = the other object is unchanged in its place, "
        "exact = exactly the target's objects; drift and jitter in px; bg = background PSNR"
    )
    table = Table("edit", "edited", "kept", "exact", "drift (p90)", "jitter", "bg dB", caption=legend,
                  box=box.SIMPLE, pad_edge=False, collapse_padding=True)  # fmt: skip  # fits 80 columns
    for e in result.edits:
        s = e.score
        binding = "-" if s.binding is None else f"{s.binding:.0%}"
        drift = f"{s.drift_mean:.1f} ({s.drift_p90:.1f})"
        cells = f"{s.attribute:.0%}", binding, f"{s.exact:.0%}", drift, f"{s.jitter:.1f}", f"{s.background_psnr:.1f}"
        table.add_row(e.change, *cells)
    out.print(table)
    out.print(
        f"source {result.source}\nedits  {Path(result.edits[0].path).parent}/\nside by side {result.side_by_side}\n"
        f"frame strip {result.strip}\nreport {result.report}  (open it in a browser)\ndone in {result.seconds:.0f} s",
        highlight=False,
    )


@app.command()
@handle_errors
def score(
    edits: Annotated[
        list[Path] | None, typer.Argument(help="Edited MP4s of the run. \\[default: all its edits]", show_default=False)
    ] = None,
    run: RunOpt = "latest",
    scorer: ScorerOpt = EditSettings.scorer,
    scorer_model: ScorerModelOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Score a run's edits: text alignment, frame consistency, preservation of the source (higher is better) and
    warp error (lower is steadier)."""
    from ctxedit.runs import resolve_run
    from ctxedit.scoring import score_run

    results = score_run(resolve_run(run), edits or [], scorer, scorer_model, device, precision)
    if json_out:
        _print_json(results)
        return
    table = Table("edit", f"text ({scorer})", "consistency", "preservation", "warp error")
    for r in results:
        cells = (f"{r[axis]:.4f}" for axis in ("text", "consistency", "preservation", "warp_error"))
        table.add_row(r["target"], *cells)
    out.print(table)


@app.command()
@handle_errors
def report(
    runs: Annotated[
        list[str] | None,
        typer.Argument(help="Run directories. \\[default: the latest run]", metavar="[RUN]...", show_default=False),
    ] = None,
    out_path: Annotated[
        Path | None,
        typer.Option(
            "--out", help="The page. \\[default: RUN/report.html; several runs: ./report.html]", show_default=False
        ),
    ] = None,
    open_page: Annotated[bool, typer.Option("--open", help="Open the page in the web browser.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a file at --out that is not a ctxedit report.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Write an HTML page of runs: the source and edits playing in sync, settings, scores, candidates, tuning loss.

    One file, offline in any browser; it links the videos by relative path, so move or share it with the runs."""
    import webbrowser

    from ctxedit.report import write_report
    from ctxedit.runs import resolve_run

    chosen = [resolve_run(run) for run in runs or ["latest"]]
    for run in chosen:
        run.read_record()  # a folder that holds no run: one line, before anything is written
    names = chosen[0].root.resolve().name if len(chosen) == 1 else f"{len(chosen)} runs"
    dest = out_path or (chosen[0].root / "report.html" if len(chosen) == 1 else Path("report.html"))
    page = write_report(chosen, dest, overwrite, title=f"ctxedit: {names}")
    if json_out:
        _print_json({"report": str(page)})
    else:
        out.print(f"report: {page}", highlight=False, soft_wrap=True)
    if open_page:
        webbrowser.open(page.resolve().as_uri())


@app.command()
@handle_errors
def info(run: RunOpt = "latest", json_out: JsonOpt = False) -> None:
    """Show what a run holds: settings, loss, edits and timings."""
    from ctxedit.models.spec import describe
    from ctxedit.runs import resolve_run

    run_dir = resolve_run(run)
    record = run_dir.read_record()
    if json_out:
        _print_json(record)
        return
    settings, tuning, source, size = record["settings"], record.get("tuning"), record["video"], record["size"]
    table = Table(show_header=False, title=str(run_dir.root))
    table.add_row("model", f"{describe(record['model'])}; read from {record['model']['path']}")
    table.add_row("video", f"{source['path']} ({source['width']}x{source['height']}, {source['fps']:.4g} fps)")
    indices = record["frames"]["indices"]
    chosen = str(indices) if len(indices) <= 12 else f"{len(indices)} frames, {indices[0]} to {indices[-1]}"
    table.add_row("frames", f"{chosen} -> {size['width']}x{size['height']} at {record['fps']:.4g} fps")
    table.add_row("prompt", settings["prompt"])
    table.add_row("settings", ", ".join(f"{k}={v}" for k, v in settings.items() if k != "prompt"))
    table.add_row("runtime", f"{record['runtime']['device']}, {record['runtime']['precision']}")
    if tuning:
        loss = tuning["loss"]
        state = f" (stopped early: {tuning['stopped_early']})" if tuning["stopped_early"] else ""
        table.add_row("tuning", f"{tuning['steps_done']} steps, loss {loss['first']:.4f} -> {loss['last']:.4f}{state}")
    else:
        table.add_row("tuning", "not finished" + (" (resumable)" if run_dir.checkpoint_path.exists() else ""))
    if run_dir.kept_steps():
        table.add_row("kept checkpoints", "after steps " + ", ".join(map(str, run_dir.kept_steps())))
    table.add_row("timings", ", ".join(f"{k}={v:.2f}" for k, v in record["timings"].items()))
    for edit in record["edits"]:
        table.add_row("edit", f"{edit['target']!r} -> {edit['path']} ({edit['seconds']:.1f} s)")
    out.print(table, highlight=False)


def main() -> None:
    app()
