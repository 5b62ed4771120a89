"""The page in headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

One server for the module: the app built with tiny random-init open_clip models as a user's own
preset (teacher, a second tiny model as student, and ``hashed:`` on that student, whose HEI heads
train on a separate 30-photo gallery), a 12-photo gallery copied from the bundled one and small
fixture results, launched in-process on a free localhost port. Screenshots of every tab go to ``screenshots/`` (git-ignored).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import zipfile
from pathlib import Path

import pytest

from matcher.data.training import TRAIN_GALLERY_ENV
from tests.helpers import BUNDLED, REPO, bundled_rows, make_gallery
from tests.helpers import FIXTURE_EVAL

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
TINY = "open_clip:matcher-tiny-vit"
SHOTS = REPO / "screenshots"
TIMEOUT = 60_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    import app
    from matcher.dashboard.workspace import Workspace

    base = tmp_path_factory.mktemp("browser")
    gallery = make_gallery(base / "gallery", 12)
    results = base / "results"
    results.mkdir()
    (results / "eval-test.json").write_text(json.dumps(FIXTURE_EVAL))
    from matcher.models.openclip import OpenClipEncoder, save_open_clip_checkpoint

    other = base / "tiny-seed1.pt"  # a second, different tiny model: the matchers disagree, so there are cases
    save_open_clip_checkpoint(OpenClipEncoder("matcher-tiny-vit", seed=1), other)
    student = f"open_clip:matcher-tiny-vit@{other}"
    train = base / "train-gallery"   # bundled photos 100-129: none of the searched gallery's
    train.mkdir()
    rows = bundled_rows(130)[100:]
    for row in rows:
        shutil.copy(BUNDLED / "images" / row["image"], train / row["image"])
    (train / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    previous = os.environ.get(TRAIN_GALLERY_ENV)
    os.environ[TRAIN_GALLERY_ENV] = str(train)
    ws = Workspace(presets={"tiny": {"teacher": TINY, "student": student, "hashed": f"hashed:{student}"}}, gallery=gallery,
                   results_dir=results, live_results_dir=base / "live", hub_ok=lambda: False)
    ws.warm()
    demo = app.build_app(ws)
    demo.queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=_free_port(), quiet=True,
                            **app.launch_kwargs(ws))
    yield {"url": url, "gallery": gallery, "base": base}
    demo.close()
    if previous is None:
        os.environ.pop(TRAIN_GALLERY_ENV, None)
    else:
        os.environ[TRAIN_GALLERY_ENV] = previous


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT)
    page.goto(server["url"])
    page.wait_for_selector("#query textarea")
    yield page
    context.close()


def shot(page, name: str) -> None:
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def wait_for_results(page, columns: int = 3, k: int = 8) -> None:
    for i in range(columns):
        page.wait_for_function(
            f"document.querySelectorAll('#col-{i}-gallery img').length >= {k}", timeout=TIMEOUT)


def test_page_loads_and_says_which_preset_is_active(page):
    assert "matcher" in page.title()
    active = page.inner_text("#active-preset")
    assert "Active preset" in active and "tiny" in active
    for i, role in enumerate(["teacher", "student", "hashed"]):
        assert role in page.inner_text(f"#col-{i}-header")
    shot(page, "page")


def test_text_query_fills_three_columns(page, server):
    caption = json.loads((server["gallery"] / "captions.jsonl").read_text().splitlines()[0])["captions"][0]
    page.fill("#query textarea", caption)
    page.click("#search-btn")
    wait_for_results(page)
    for i, stage in enumerate(["search", "search", "rerank"]):   # the hashed column: candidates + re-rank
        header = page.inner_text(f"#col-{i}-header")
        assert "encode" in header and stage in header and "ms" in header
        assert "ground-truth image" in header  # the query is a gallery caption
    assert "a caption of this gallery" in page.inner_text("#search-status")
    shot(page, "search")


def test_image_upload_returns_results(page, server):
    photo = next(p for p in server["gallery"].iterdir() if p.suffix == ".jpg")
    page.set_input_files("#image-upload input[type=file]", str(photo))
    wait_for_results(page)
    assert "Image query" in page.inner_text("#search-status")
    shot(page, "search-image")


def test_bad_upload_shows_a_clear_message(page, server):
    bogus = server["base"] / "notes.txt"
    bogus.write_text("this is not a photo")
    page.set_input_files("#image-upload input[type=file]", str(bogus))
    page.wait_for_function("document.querySelector('#search-status').innerText.includes('not an image')")
    assert "notes.txt" in page.inner_text("#search-status")
    shot(page, "search-bad-upload")


def test_more_like_this_on_a_result(page):
    page.fill("#query textarea", "a dog in the snow")
    page.click("#search-btn")
    wait_for_results(page)
    page.locator("#col-1-gallery button.thumbnail-item").first.click()
    page.wait_for_function("document.querySelector('#selected').innerText.includes('Selected')")
    page.keyboard.press("Escape")
    page.click("#more-like")
    page.wait_for_function("document.querySelector('#search-status').innerText.includes('More like')")
    wait_for_results(page)


def test_tradeoff_chart_renders(page):
    page.get_by_role("tab", name="Trade-offs").click()
    page.wait_for_selector("#tradeoff-plot .js-plotly-plot")
    page.wait_for_function("document.querySelector('#tradeoff-plot').innerText.includes('published')")
    assert "teacher" in page.inner_text("#metrics-table")
    assert "published, Flickr30k" in page.inner_text("#tradeoff-notes")
    shot(page, "tradeoffs")


def test_error_analysis_tab(page):
    page.get_by_role("tab", name="Error analysis").click()
    page.click("#analyse")
    page.wait_for_function("document.querySelector('#analysis-status').innerText.includes('caption queries')")
    page.wait_for_function("document.querySelector('#case-info').innerText.includes('Right image')")
    for i in range(3):
        page.wait_for_function(f"document.querySelectorAll('#case-{i}-gallery img').length >= 1")
    shot(page, "errors")


def test_own_gallery_zip_and_bad_zip(page, server):
    archive = server["base"] / "mine.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for photo in sorted(server["gallery"].glob("*.jpg"))[:5]:
            zf.write(photo, f"holiday/{photo.name}")
        zf.writestr("holiday/readme.txt", "not an image")
    page.get_by_role("tab", name="Own gallery").click()
    page.set_input_files("#zip-upload input[type=file]", str(archive))
    page.wait_for_function("document.querySelector('#own-status').innerText.includes('Indexed')")
    assert "5 images" in page.inner_text("#own-status")
    assert "5 images" in page.inner_text("#gallery-info")
    assert "readme.txt" in page.inner_text("#own-skipped") and "not an image" in page.inner_text("#own-skipped")
    shot(page, "own-gallery")
    bogus = server["base"] / "photos.zip"
    bogus.write_text("not a zip at all")
    page.reload()
    page.get_by_role("tab", name="Own gallery").click()
    page.set_input_files("#zip-upload input[type=file]", str(bogus))
    page.wait_for_function("document.querySelector('#own-status').innerText.includes('not a zip')")


def test_clicking_an_example_query_runs_it(page, server):
    first = json.loads((server["gallery"] / "captions.jsonl").read_text().splitlines()[0])["captions"][0]
    page.get_by_text(first, exact=True).first.click()
    wait_for_results(page)
    assert first in page.input_value("#query textarea")
    assert "a caption of this gallery" in page.inner_text("#search-status")


@pytest.mark.slow
def test_real_bundled_teacher_answers_in_the_page(browser, tmp_path_factory):
    """The offline preset as shipped (the trained teacher) on a 12-photo gallery."""
    import app
    from matcher.paths import MODELS_DIR
    from matcher.dashboard.workspace import Workspace

    if not (MODELS_DIR / "offline-teacher.pt").exists():
        pytest.skip("the offline teacher checkpoint is not in this checkout yet")
    gallery = make_gallery(tmp_path_factory.mktemp("teacher") / "gallery", 12)
    ws = Workspace(gallery=gallery, hub_ok=lambda: False)  # the real presets, offline default
    demo = app.build_app(ws)
    demo.queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=_free_port(), quiet=True,
                            **app.launch_kwargs(ws))
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT)
        page.goto(url)
        assert "Active preset: offline" in page.inner_text("#active-preset")
        caption = json.loads((gallery / "captions.jsonl").read_text().splitlines()[3])["captions"][0]
        page.fill("#query textarea", caption)
        page.click("#search-btn")
        wait_for_results(page, columns=len(ws.active().roles))
        header = page.inner_text("#col-0-header")
        assert "offline-teacher" in header and "ground-truth image" in header and "encode" in header
        shot(page, "search-teacher")

        # The optional fourth column: the fine-grained tier re-ranks the teacher's shortlist.
        page.click("#preset input")
        page.get_by_role("option", name="offline+fine").click()
        page.wait_for_function("document.querySelector('#active-preset').innerText.includes('offline+fine')",
                               timeout=TIMEOUT)
        page.click("#search-btn")
        wait_for_results(page, columns=4)
        fine = page.inner_text("#col-3-header")
        assert "fine" in fine and "rerank" in fine and "candidates" in fine
        shot(page, "search-fine")

        # The same column switched to the cross-encoder (preset offline+cross); until its checkpoint is
        # trained, the preset line says so and the other three columns still answer.
        page.click("#preset input")
        page.get_by_role("option", name="offline+cross").click()
        page.wait_for_function("document.querySelector('#active-preset').innerText.includes('offline+cross')",
                               timeout=TIMEOUT)
        roles = ws.active("offline+cross").roles
        page.click("#search-btn")
        wait_for_results(page, columns=len(roles))
        if "fine" in roles:
            cross = page.inner_text("#col-3-header")
            assert "offline-vl-cross" in cross and "rerank" in cross
        else:
            assert "The fine matcher is not available (assets/models/fine/vl-cross.pt not found)" in \
                page.inner_text("#active-preset")
    finally:
        context.close()
        demo.close()
