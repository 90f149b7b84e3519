"""`ctxedit report`: runs as one HTML page to look at and share.

Per run: the source and every edit playing in sync (one play/pause, scrubber, frame steps and loop toggle), each
captioned with its target, the words it changed marked; per edit the settings that differ from the defaults, its
time, its recorded scores and its candidates (the chosen one marked, with its ranks); the tuning loss and the
timings as inline SVG. The page is self-contained (its style and script inline, nothing fetched; any browser that
plays H.264 MP4) and links the MP4s by relative path, so the folder that holds it and the runs can be moved or
shared. Record text is escaped.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import time
from html import escape
from importlib import resources
from pathlib import Path
from string import Template
from urllib.parse import quote

from ctxedit import __version__
from ctxedit.errors import RunError, UsageError, VideoError
from ctxedit.files import atomic_path
from ctxedit.models.spec import describe
from ctxedit.runs import Run, latest_edits, source_chunks
from ctxedit.settings import EditSettings, OutputSettings, TuneSettings, recorded_settings

GENERATOR = f'<meta name="generator" content="ctxedit report {__version__}">'  # such a page is replaced freely
SOURCE_PREVIEW = "source-preview.mp4"  # in the run folder: the tuned frames, as the edits show them
AXES = {  # recorded score -> its name on the page (all but the warp error: higher is better)
    "text": "text alignment",
    "consistency": "consistency",
    "preservation": "preservation",
    "warp_error": "warp error (px, lower is steadier)",
}


def write_report(runs: list[Run], dest: Path, overwrite: bool = False, title: str = "ctxedit report") -> Path:
    """Write the page of `runs` to `dest` (a run without a record shows as not run yet). A page that ctxedit wrote
    is replaced; any other file only with `overwrite`. Makes each run's source preview where it is missing."""
    if dest.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"the report is an HTML page: --out must end in .html, got {dest.name}")
    if dest.is_dir() or (dest.exists() and not overwrite and not is_report(dest)):
        raise RunError(f"{dest} already exists and is not a ctxedit report; pass --overwrite to replace it")
    folder = Path(os.path.abspath(dest.parent))
    sections = [_run_section(run, folder, f"run-{k}") for k, run in enumerate(runs)]
    index = ""
    if len(runs) > 1:
        links = "".join(f'<li><a href="#run-{k}">{escape(_name(run))}</a></li>' for k, run in enumerate(runs))
        index = f'<nav><ol class="runs">{links}</ol></nav>'
    written = f"Written {time.strftime('%Y-%m-%d %H:%M')} by ctxedit {__version__}."
    page = Template(_asset("report.html")).substitute(
        generator=GENERATOR, title=escape(title), style=_asset("report.css"), script=_asset("report.js"),
        written=escape(written), index=index, body="\n".join(sections),
    )  # fmt: skip
    with atomic_path(dest) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return dest


def is_report(path: Path) -> bool:
    """Whether `path` is a page that ctxedit wrote (it carries the generator tag near its start)."""
    with open(path, "rb") as f:
        return b'<meta name="generator" content="ctxedit report' in f.read(1024)


def _name(run: Run) -> str:
    return Path(os.path.abspath(run.root)).name  # `ctxedit report .` too


def _asset(name: str) -> str:
    return resources.files("ctxedit").joinpath("assets", name).read_text(encoding="utf-8")


def marked(source: str, target: str) -> str:
    """`target` as HTML, its words that `source` does not have at that place in <mark> (case, punctuation and
    (word:1.5) weights aside)."""
    words = target.split()
    matcher = difflib.SequenceMatcher(a=_plain(source.split()), b=_plain(words), autojunk=False)
    kept = {i for block in matcher.get_matching_blocks() for i in range(block.b, block.b + block.size)}
    return " ".join(escape(w) if i in kept else f"<mark>{escape(w)}</mark>" for i, w in enumerate(words))


def _plain(words: list[str]) -> list[str]:
    """Words as compared: lower case, without a (word:1.5) weight or punctuation."""
    return [re.sub(r":[\d.]+\)|\W", "", word.lower()) for word in words]


def source_preview(run: Run, record: dict) -> Path | None:
    """RUN/source-preview.mp4: the tuned frames of the source as the model saw them, with the source's sound, made
    when missing or older than the run's encoded source. When it cannot be made (the source video moved, the folder
    is read-only), the one there, if any; else None."""
    from ctxedit import video as videos
    from ctxedit.outputs import audio_span

    path = run.root / SOURCE_PREVIEW
    encoded = run.source_path
    fresh = path.exists() and (not encoded.exists() or path.stat().st_mtime >= encoded.stat().st_mtime)
    if fresh or path.resolve() == Path(record["video"]["path"]).resolve():  # never over the user's video
        return path
    try:
        audio = audio_span(record, OutputSettings())
        frames = (frame for chunk in source_chunks(record) for frame in chunk)
        videos.write_video(frames, path, record["fps"], audio, overwrite=True)
    except (VideoError, OSError):
        pass
    return path if path.exists() else None


def located(run: Run, recorded: str) -> Path | None:
    """A file the record names: one written to an edits/ folder is looked for in the run's (where it stays when
    the run folder moves, and a path recorded relative to another working folder still finds it), then where it
    was written; None when it is in neither."""
    path = Path(recorded)
    for depth in (1, 2):  # an edit in edits/; a kept candidate in edits/<edit>.candidates/
        if path.parts[-depth - 1 : -depth] == ("edits",):
            if (moved := run.root.joinpath("edits", *path.parts[-depth:])).is_file():
                return moved
    return path if path.is_file() else None


def _href(path: Path, folder: Path) -> str:
    try:
        return escape(quote(Path(os.path.relpath(os.path.abspath(path), folder)).as_posix()))
    except ValueError:  # another drive (Windows): no relative path
        return escape(Path(os.path.abspath(path)).as_uri())


# --- one run ---------------------------------------------------------------------------------------------------


def _run_section(run: Run, folder: Path, anchor: str) -> str:
    head = f'<h2><a href="#{anchor}">{escape(_name(run))}</a> <small>{escape(str(run.root))}</small></h2>'
    if not run.record_path.exists():
        return f'<section class="run" id="{anchor}">{head}<p class="note">Not run yet.</p></section>'
    record = run.read_record()
    video, size, frames, source_prompt = record["video"], record["size"], record["frames"], record["settings"]["prompt"]
    facts = [
        f"source {escape(video['path'])} ({video['width']}x{video['height']}, {video['fps']:.4g} fps)",
        f"{frames['count']} frames at {size['width']}x{size['height']}, {record['fps']:.4g} fps",
        f"model {escape(describe(record['model']))}",
        f"{escape(record['runtime']['device'])}, {escape(record['runtime']['precision'])}",
    ]
    edits = [(entry, located(run, entry["path"])) for entry in latest_edits(record).values()]
    preview = source_preview(run, record)
    caption = f"<b>source</b> {escape(source_prompt)}"
    tiles = [_tile(preview, folder, caption, "source", f"source video not found: {video['path']}")]
    for k, (entry, path) in enumerate(edits):
        caption = f'<a href="#{anchor}-edit-{k}">{marked(source_prompt, entry["target"])}</a>'
        tiles.append(_tile(path, folder, caption, "edit", f"not found: {entry['path']}"))
    sound = preview is not None and video["has_audio"]
    cards = [_edit_card(run, record, e, path, folder, f"{anchor}-edit-{k}") for k, (e, path) in enumerate(edits)]
    return f"""<section class="run" id="{anchor}" data-frames="{frames["count"]}">
{head}
<p class="facts">{" · ".join(facts)}</p>
{_controls(frames["count"], sound)}
<div class="tiles">{"".join(tiles)}</div>
{"<h3>Edits</h3>" + "".join(cards) if cards else '<p class="note">No edits yet.</p>'}
{_tuning(record)}
</section>"""


def _controls(frames: int, sound: bool) -> str:
    toggle = '<label><input type="checkbox" class="sound"> sound</label>' if sound else ""
    return f"""<div class="controls" role="group" aria-label="playback of every video of this run">
<button type="button" class="play" title="play or pause every video (space)">Play</button>
<button type="button" class="back" title="previous frame (left arrow)">&#9664;</button>
<button type="button" class="next" title="next frame (right arrow)">&#9654;</button>
<input type="range" class="scrub" min="0" max="{frames - 1}" value="0" step="1" aria-label="frame">
<span class="frame">1 / {frames}</span>
<label><input type="checkbox" class="loop" checked> loop</label>{toggle}
</div>"""


def _tile(path: Path | None, folder: Path, caption: str, kind: str, gone: str) -> str:
    """A video of the run's player, captioned; `gone` says what is missing when there is no file (or why not, when
    it cannot be read)."""
    from ctxedit import video as videos

    try:
        info = videos.probe(path) if path is not None else None
    except VideoError as error:
        info, gone = None, str(error)
    if info is None:
        shown = f'<div class="gone">{escape(gone)}</div>'
    else:
        small = " small" if info.width < 256 else ""
        shown = (
            f'<video class="sync{small}" src="{_href(path, folder)}" data-fps="{info.fps:.6g}" width="{info.width}" '
            f'height="{info.height}" muted playsinline preload="auto"></video>'
        )
    return f'<figure class="tile {kind}">{shown}<figcaption>{caption}</figcaption></figure>'


def _codes(settings: dict) -> str:
    return " ".join(f"<code>{escape(name)} {escape(str(value))}</code>" for name, value in settings.items()) or "none"


def _changed(values: dict, defaults: dict) -> str:
    """The settings among `values` that differ from `defaults`."""
    return _codes({name: value for name, value in values.items() if name in defaults and value != defaults[name]})


def _edit_card(run: Run, record: dict, entry: dict, path: Path | None, folder: Path, anchor: str) -> str:
    settings = recorded_settings(EditSettings, entry.get("settings", {}))
    output = entry.get("output", {})
    files = [f'<a href="{_href(path, folder)}">mp4</a>'] if path else ["file not found"]
    if entry.get("gif") and (gif := located(run, entry["gif"])):
        files.append(f'<a href="{_href(gif, folder)}">gif</a>')
    facts = [
        f"{entry['seconds']:.1f} s" + (" (inversion cached)" if entry.get("inversion_cached") else ""),
        f"{entry['frames']} frames, {entry['width']}x{entry['height']} at {entry['fps']:.4g} fps",
        *files,
    ]
    seed = settings["seed"] if settings["seed"] is not None else f"{record['settings']['seed']} (the run's)"
    scores = entry.get("scores", {})
    return f"""<article class="edit" id="{anchor}">
<h4><a href="#{anchor}">{marked(record["settings"]["prompt"], entry["target"])}</a></h4>
<p class="facts">{" · ".join(facts)}</p>
<p>Settings changed from the defaults: {_changed(settings, EditSettings().to_dict())};
output: {_changed(output, OutputSettings().to_dict())}; seed {escape(str(seed))}.</p>
{_scores_table(scores) if scores else ""}
{_candidates(run, entry, folder) if entry.get("candidates") else ""}
</article>"""


def _cell(value: float | None, rank: float | None = None) -> str:
    """A score (and its rank among the candidates, 1 the best) as a table cell."""
    shown = "-" if value is None else f"{value:.4f}"
    return f"<td>{shown}" + ("" if rank is None else f" <small>({rank + 1:g})</small>") + "</td>"


def _scores_table(scores: dict[str, dict]) -> str:
    """The scores `ctxedit score` recorded, one row per text scorer."""
    head = "".join(f"<th>{escape(name)}</th>" for name in AXES.values())
    rows = [f"<tr><th>{escape(scorer)}</th>{''.join(_cell(axes.get(a)) for a in AXES)}</tr>" for scorer, axes in
            scores.items()]  # fmt: skip
    caption = "<caption>Scores (ctxedit score)</caption>"
    return f'<table class="scores">{caption}<tr><th>scorer</th>{head}</tr>{"".join(rows)}</table>'


def _candidates(run: Run, entry: dict, folder: Path) -> str:
    """The candidates of an edit: a grid of those kept (playing with the rest), the chosen one marked, and a table of
    what each changed, its scores and its ranks on the axes that chose."""
    from ctxedit.scoring import axis_ranks, fused_ranks

    candidates, chosen = entry["candidates"], entry["chosen"]
    axes = tuple(entry.get("rerank_axes", ("consistency", "preservation")))
    scores = [c["scores"] for c in candidates]
    ranks = {axis: axis_ranks(scores, axis) for axis in axes}
    mean = fused_ranks(scores, axes)
    why = ", ".join(f"{ranks[a][chosen] + 1:g} of {len(candidates)} on {a}" for a in axes)
    reason = f"Candidate {chosen + 1} was chosen: the best mean rank over {', '.join(axes)} ({why})."
    tiles, rows = [], []
    for k, c in enumerate(candidates):
        label = f"candidate {k + 1}" + (" · chosen" if k == chosen else "")
        change = escape(", ".join(f"{n} {v}" for n, v in c["changes"].items()) or "the settings asked for")
        if "path" in c:
            kind = "candidate chosen" if k == chosen else "candidate"
            tiles.append(
                _tile(located(run, c["path"]), folder, f"<b>{label}</b> {change}", kind, f"not found: {c['path']}")
            )
        cells = "".join(_cell(c["scores"].get(a), ranks[a][k] if a in ranks else None) for a in AXES)
        mark = ' class="chosen"' if k == chosen else ""
        rows.append(f"<tr{mark}><th>{label}</th><td>{change}</td>{cells}<td>{mean[k] + 1:g}</td></tr>")
    head = "".join(f"<th>{escape(name)}</th>" for name in AXES.values())
    grid = f'<div class="tiles candidates">{"".join(tiles)}</div>' if tiles else ""
    return f"""<div class="candidates-block">
<p>{escape(reason)}</p>{grid}
<table class="ranks"><caption>Candidates: scores (rank)</caption>
<tr><th>candidate</th><th>changed</th>{head}<th>mean rank</th></tr>{"".join(rows)}</table>
</div>"""


# --- tuning: loss and timings ------------------------------------------------------------------------------------


def _tuning(record: dict) -> str:
    tuning, timings = record.get("tuning"), record.get("timings", {})
    changed = {line.split(":")[0] for line in TuneSettings(prompt=record["settings"]["prompt"]).differences(record)}
    settings = _codes({name: value for name, value in record["settings"].items() if name in changed})
    head = f"<h3>Tuning</h3>\n<p>Settings changed from the defaults: {settings}.</p>"
    stopped = f" Stopped early: {escape(tuning['stopped_early'])}." if tuning and tuning.get("stopped_early") else ""
    if not tuning or not tuning["steps_done"]:
        return f'{head}<p class="note">{"No tuning step finished." if tuning else "Tuning not finished."}{stopped}</p>'
    loss, steps = tuning["loss"], tuning["steps_done"]
    bars = [(name.removesuffix("_s"), value) for name, value in timings.items() if name != "tune_step_s"]
    bars += [(f"edit {k + 1}", e["seconds"]) for k, e in enumerate(latest_edits(record).values())]
    return f"""{head}
<p>{steps} steps, loss {loss["first"]:.4f} to {loss["last"]:.4f} (lowest {loss["min"]:.4f}),
{timings.get("tune_step_s", 0):.2f} s per step.{stopped}</p>
<div class="plots">{_loss_plot(loss["curve"], loss.get("curve_stride", max(1, steps // 100)), steps)}
{_bar_plot(bars)}</div>"""


def _loss_plot(curve: list[float], stride: int, steps: int) -> str:
    """The tuning loss per step (light) and its running geometric mean over a tenth of the steps (dark), on a log
    scale: a diffusion loss spans decades from one timestep to the next."""
    if not curve or min(curve) <= 0:
        return ""
    width, height, left, bottom = 380, 150, 54, 120
    logs = [math.log10(value) for value in curve]
    low, high = min(logs), max(logs)
    reach = max(1, len(curve) // 10)
    mean = [sum(logs[max(0, k + 1 - reach) : k + 1]) / min(k + 1, reach) for k in range(len(logs))]

    def line(values: list[float]) -> str:  # point k is step k * stride + 1
        xs = (left + (width - left - 8) * k * stride / max(1, steps - 1) for k in range(len(values)))
        ys = (8 + (bottom - 8) * (high - value) / ((high - low) or 1.0) for value in values)
        return " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys, strict=True))

    return f"""<svg class="plot" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img"
aria-label="tuning loss per step"><title>tuning loss per step</title>
<line x1="{left}" y1="{bottom}" x2="{width - 8}" y2="{bottom}" class="axis"/>
<line x1="{left}" y1="8" x2="{left}" y2="{bottom}" class="axis"/>
<polyline class="raw" points="{line(logs)}"/><polyline class="mean" points="{line(mean)}"/>
<text x="{left - 4}" y="14" class="end">{max(curve):.3g}</text>
<text x="{left - 4}" y="{bottom}" class="end">{min(curve):.3g}</text>
<text x="{left}" y="{bottom + 14}" class="middle">1</text>
<text x="{width - 8}" y="{bottom + 14}" class="end">{steps}</text>
<text x="{(width + left) / 2}" y="{height - 2}" class="middle">loss per step, log scale (dark: mean)</text>
</svg>"""


def _bar_plot(bars: list[tuple[str, float]]) -> str:
    """Seconds per stage, as horizontal bars."""
    width, row, label = 360, 18, 70
    most = max((seconds for _, seconds in bars), default=0) or 1.0
    items = []
    for k, (name, seconds) in enumerate(bars):
        top, length = 4 + k * row, (width - label - 60) * seconds / most
        items.append(
            f'<text x="{label - 4}" y="{top + 12}" class="end">{escape(name)}</text>'
            f'<rect x="{label}" y="{top + 2}" width="{length:.1f}" height="{row - 6}"/>'
            f'<text x="{label + length + 4:.1f}" y="{top + 12}">{seconds:.1f} s</text>'
        )
    height = 8 + row * len(bars)
    return f"""<svg class="plot" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img"
aria-label="seconds per stage"><title>seconds per stage</title>{"".join(items)}</svg>"""
