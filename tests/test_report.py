"""`ctxedit report`: the page's contents from a real run (escaping, links, settings, scores, candidates, loss), its
refusals, and the page itself in headless Chromium (loads clean, every video plays, in sync, user text as text)."""

import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import linked_files
from PIL import Image
from typer.testing import CliRunner

from ctxedit import video
from ctxedit.cli import app
from ctxedit.report import marked

runner = CliRunner()
TUNE = ["--frames", "12", "--window", "12", "--stride", "3", "--size", "40", "--steps", "2", "--device", "cpu"]
HOSTILE = "a man is skiing on the <script>window.pwned = 1</script> & moon"
CHROMIUM_FLAGS = [  # as root in a container, on a closed network
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic", "--autoplay-policy=no-user-gesture-required",
]  # fmt: skip


def ctxedit(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def reported(tmp_path_factory, skiing, tiny_model) -> Path:
    """A run (in a folder named with characters a URL escapes) with an edit whose target is hostile HTML, written
    outside the run, and one with three kept candidates (scored), and its page."""
    root = tmp_path_factory.mktemp("report")
    run, outside = root / "ski run #1 ü", root / "elsewhere" / "hostile edit.mp4"
    ctxedit("tune", skiing, "--prompt", "a man is skiing", "--model", tiny_model, "--run", run, *TUNE)
    ctxedit("edit", "--run", run, "--target", HOSTILE, "--steps", "3", "--guidance", "4", "--out", outside,
            "--device", "cpu")  # fmt: skip
    ctxedit("edit", "--run", run, "--target", "a woman is skiing", "--steps", "3", "--candidates", "3",
            "--keep-candidates", "--fps", "20", "--device", "cpu")  # fmt: skip
    ctxedit("score", "--run", run, "--device", "cpu")
    assert ctxedit("report", run).strip() == f"report: {run / 'report.html'}"
    return run / "report.html"


def test_the_page_links_every_video_and_shows_settings_scores_candidates_and_loss(reported):
    page = reported.read_text(encoding="utf-8")
    record = json.loads((reported.parent / "run.json").read_text())
    files = linked_files(reported)
    assert all(f.is_file() for f in files) and len({f for f in files if f.suffix == ".mp4"}) == 2 + 3 + 1
    assert reported.parent.parent / "elsewhere" / "hostile edit.mp4" in files  # an edit written with --out
    preview = video.probe(reported.parent / "source-preview.mp4")  # the tuned frames at the model's size, with sound
    assert (preview.num_frames, preview.width, preview.height, preview.has_audio) == (12, 40, 40, True)
    assert "http://" not in page and "https://" not in page  # nothing fetched: offline anywhere
    assert page.count("<script>") == 1 and "&lt;script&gt;window.pwned" in page and "1&lt;/script&gt;" in page
    assert "<mark>woman</mark> is skiing" in page and "<code>guidance 4.0</code>" in page
    assert (
        "<code>fps 20.0</code>" in page and 'data-fps="20"' in page and 'data-fps="9.99001"' in page
    )  # 29.97 fps over stride 3
    assert page.count('<table class="scores">') == 2  # `ctxedit score` ran on both edits
    for setting in ("frames 12", "stride 3", "window 12", "size 40", "steps 2"):  # tuning; the rest are defaults
        assert f"<code>{setting}</code>" in page
    assert page.count("<code>") == 5 + 4 + 2  # tuning; candidates, keep_candidates, steps, fps; guidance, steps
    chosen = record["edits"][-1]["chosen"]
    assert f"Candidate {chosen + 1} was chosen: the best mean rank over consistency, preservation" in page
    assert page.count('<tr class="chosen">') == 1 and page.count('class="tile candidate chosen"') == 1
    loss = record["tuning"]["loss"]["curve"]
    points = re.search(r'<polyline class="raw" points="([^"]+)"', page).group(1).split()
    assert len(points) == len(loss) == 2 and "2 steps, loss" in page


def test_changed_words_are_marked_whatever_their_case_punctuation_or_weight():
    source = "A man is skiing, fast"
    assert marked(source, "a man is (surfing:1.5), fast") == "a man is <mark>(surfing:1.5),</mark> fast"
    assert marked(source, "a man is (skiing:2), fast") == "a man is (skiing:2), fast"
    assert marked(source, "a <b>man</b> is skiing") == "a <mark>&lt;b&gt;man&lt;/b&gt;</mark> is skiing"


def test_a_moved_run_folder_keeps_its_page_and_makes_a_new_one(reported, tmp_path):
    moved = tmp_path / "moved" / "my run"
    shutil.copytree(reported.parent, moved)
    inside = {f for f in linked_files(moved / "report.html") if "elsewhere" not in f.parts}
    assert all(f.is_file() for f in inside) and len(inside) == 1 + 1 + 3  # relative links travel with the folder
    (moved / "source-preview.mp4").unlink()
    ctxedit("report", moved, "--out", tmp_path / "page.html")  # the record's paths point at the old folder
    files = set(linked_files(tmp_path / "page.html"))
    assert all(f.is_file() for f in files) and len(files) == 2 + 3 + 1
    assert {f for f in files if moved not in f.parents} == {reported.parent.parent / "elsewhere" / "hostile edit.mp4"}


def test_old_odd_and_damaged_runs_still_make_a_page(reported, tmp_path):
    """No tuning step finished, records from before scores, outputs and curve strides, the source video gone (the
    preview there is kept even when older than the run's latents), an unreadable edit: each is shown as it is."""
    run = tmp_path / "run"
    shutil.copytree(reported.parent, run)
    record = json.loads((run / "run.json").read_text())
    record["tuning"] = {
        "steps_done": 0,
        "stopped_early": "the loss became nan at step 1",
        "loss": {"first": None, "last": None, "min": None, "mean_last_10pct": None, "curve": []},
    }
    record["video"]["path"] = str(tmp_path / "gone.mp4")
    for entry in record["edits"]:
        entry.pop("output"), entry.pop("scores")
    (run / "run.json").write_text(json.dumps(record))
    os.utime(run / "source-preview.mp4", (0, 0))  # older than source.safetensors: would be made again
    woman = run / "edits" / "a-woman-is-skiing.mp4"
    woman.write_bytes(woman.read_bytes()[:300])
    page = ctxedit("report", run, "--json")
    text = (run / "report.html").read_text()
    assert json.loads(page) == {"report": str(run / "report.html")}
    assert os.path.getmtime(run / "source-preview.mp4") == 0 and 'src="source-preview.mp4"' in text
    assert "No tuning step finished. Stopped early: the loss became nan at step 1." in text
    assert (
        "a-woman-is-skiing.mp4 is not a video ffmpeg can read" in text
        and '<table class="scores">' not in text
        and "output: none" in text
    )

    record["video"]["path"] = str(run / "source-preview.mp4")  # the user's own video where the preview goes
    (run / "run.json").write_text(json.dumps(record))
    (run / "source-preview.mp4").write_bytes(b"my video")
    os.utime(run / "source-preview.mp4", (0, 0))
    ctxedit("report", run)
    assert (run / "source-preview.mp4").read_bytes() == b"my video"  # never written over


def test_bad_requests_are_one_line_and_nothing_is_lost(reported, tmp_path):
    def fails(*args, match: str):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code != 0 and "Traceback" not in result.output
        assert (
            result.stderr.strip().startswith("error:") and match in result.stderr and "\n" not in result.stderr.strip()
        )

    mine = tmp_path / "notes.html"
    mine.write_text("my own page")
    fails("report", reported.parent, "--out", mine, match="is not a ctxedit report; pass --overwrite")
    assert mine.read_text() == "my own page"
    fails("report", reported.parent, "--out", tmp_path / "page.md", match="--out must end in .html")
    fails("report", tmp_path, match="holds no run; tune first")
    ctxedit("report", reported.parent, "--out", mine, "--overwrite")
    before = mine.stat().st_mtime_ns
    ctxedit("report", reported.parent, reported.parent, "--out", mine)  # its own page: replaced freely
    assert mine.stat().st_mtime_ns > before and mine.read_text().count('<section class="run"') == 2


# --- in a real browser -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = os.environ.get("CTXEDIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.fail("no Chromium: install Debian's chromium (.ci/run does) or set CTXEDIT_CHROMIUM to a browser")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def test_the_page_plays_every_video_in_sync_in_chromium(reported, browser, tmp_path):
    started = time.perf_counter()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems = []
    page.on("console", lambda message: message.type in ("error", "warning") and problems.append(message.text))
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("requestfailed", lambda request: problems.append(f"{request.url}: {request.failure}"))
    page.goto(reported.resolve().as_uri())
    page.wait_for_function("[...document.querySelectorAll('video')].every(v => v.readyState >= 3)", timeout=20_000)
    assert page.locator("video").count() == 2 + 3 + 1
    frames = "[...document.querySelectorAll('video')].map(v => v.currentTime * Number(v.dataset.fps))"
    paused = "[...document.querySelectorAll('video')].map(v => v.paused)"

    page.uncheck(".loop")  # a loop's wrap would put frame 0 beside frame 11
    playing = page.evaluate(f"""async () => {{  // clicked and sampled in the page: no round trip between
        document.querySelector('.play').click();
        await new Promise(done => setTimeout(done, 400));
        return [{frames}, {paused}]; }}""")
    assert not any(playing[1]) and min(playing[0]) > 0 and max(playing[0]) - min(playing[0]) <= 1  # 1.2 s clip
    page.click(".play")  # pause: every video on one frame
    assert len({int(f) for f in page.evaluate(frames)}) == 1 and all(page.evaluate(paused))
    page.click(".play")
    page.wait_for_function("document.querySelector('.play').textContent === 'Play'", timeout=5_000)  # the end
    assert page.locator(".frame").inner_text() == "12 / 12" and [int(f) for f in page.evaluate(frames)] == [11] * 6

    page.click(".back")
    assert [int(f) for f in page.evaluate(frames)] == [10] * 6
    page.fill(".scrub", "4")
    page.dispatch_event(".scrub", "input")
    assert [int(f) for f in page.evaluate(frames)] == [4] * 6 and page.locator(".frame").inner_text() == "5 / 12"
    page.click("h1")  # the keys act on the page, not on a control
    page.keyboard.press("ArrowRight")
    assert page.locator(".frame").inner_text() == "6 / 12"
    page.check(".loop")
    page.click("h1")
    page.keyboard.press("Space")  # plays, and with the loop on goes on past the end
    seen = page.evaluate("""new Promise(done => { const seen = [];
        const timer = setInterval(() => seen.push(Number(document.querySelector('.scrub').value)), 20);
        setTimeout(() => { clearInterval(timer); done(seen); }, 1800); })""")
    assert page.locator(".play").inner_text() == "Pause" and any(b < a for a, b in zip(seen, seen[1:], strict=False))
    page.keyboard.press("Space")
    assert all(page.evaluate(paused))

    assert page.evaluate("window.pwned") is None
    assert "<script>window.pwned = 1</script>" in page.locator(".tile.edit figcaption").first.inner_text()
    shot = tmp_path / "report.png"
    page.screenshot(path=shot, full_page=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[0] > 900 and pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200
    assert problems == []
    print(f"browser check: {time.perf_counter() - started:.1f} s")
