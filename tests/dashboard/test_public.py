"""A page the public can use: disk budget, refused uploads deleted, leftovers cleaned at start,
no raw exception text (NUL bytes in every text and path input, unexpected errors), public-mode
switches for heavy work, the heavy thread's priority, launch settings."""
from __future__ import annotations

import inspect
import io
import logging
import os
import time
import zipfile
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

from matcher.dashboard.disk import DiskBudget, remove_stale_temp_files
from matcher.dashboard.heavy import HeavyRunner
from matcher.dashboard.settings import Settings
from matcher.dashboard.workspace import Workspace

TINY = "open_clip:matcher-tiny-vit"
RAW = ("null byte", "Traceback", "ValueError", "OSError", "KeyError", "TypeError", "RuntimeError", "secret")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A cache folder and a Gradio temp folder of this test's own."""
    root = tmp_path / "cache"
    monkeypatch.setenv("MATCHER_CACHE_DIR", str(root))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    (tmp_path / "gradio").mkdir()
    return root


def tiny_workspace(gallery: Path, tmp_path: Path) -> Workspace:
    return Workspace(presets={"tiny": {"teacher": TINY, "student": TINY}}, gallery=gallery,
                     live_results_dir=tmp_path / "live", hub_ok=lambda: False)


def handler(demo, name: str):
    """The Python function behind an event, by API name or function name."""
    for fn in demo.fns.values():
        if fn.api_name == name or getattr(fn.fn, "__name__", None) == name:
            return fn.fn
    raise KeyError(name)


def write_file(folder: Path, name: str, data: bytes) -> Path:
    """A file as Gradio stores an upload: ``<upload folder>/<random>/<name>``."""
    target = folder / os.urandom(6).hex() / name
    target.parent.mkdir(parents=True)
    target.write_bytes(data)
    return target


def photo_zip(gallery: Path, n: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for photo in sorted(gallery.glob("*.jpg"))[:n]:
            zf.write(photo, photo.name)
    return buf.getvalue()


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


# -- disk -------------------------------------------------------------------------------------

def test_disk_budget_evicts_least_recently_used_first(tmp_path):
    a, b = tmp_path / "uploads", tmp_path / "embeddings"
    for folder in (a, b):
        folder.mkdir()
    sizes = {a / "old": 300, b / "older.npz": 300, a / "recent": 300, b / "kept.npz": 300}
    for i, (path, size) in enumerate(sizes.items()):
        if path.suffix:
            path.write_bytes(b"x" * size)
        else:
            path.mkdir()
            (path / "photo.jpg").write_bytes(b"x" * size)
    age(b / "older.npz", 4000)
    age(a / "old" / "photo.jpg", 3000)
    age(a / "old", 3000)
    age(b / "kept.npz", 5000)
    age(a / "recent" / "photo.jpg", 10)   # younger than the grace period: never evicted
    age(a / "recent", 10)
    budget = DiskBudget([a, b], limit_bytes=700, grace_s=60)
    assert budget.total_bytes() == 1200
    done = budget.enforce(keep=[b / "kept.npz"])
    assert done.evicted == [b / "older.npz", a / "old"]           # oldest first, the kept one skipped
    assert done.fits and done.total_bytes == 600 == budget.total_bytes()
    assert (a / "recent").exists() and (b / "kept.npz").exists()
    tight = DiskBudget([a, b], limit_bytes=100, grace_s=60).enforce(keep=[b / "kept.npz"])
    assert not tight.fits and tight.evicted == []                  # nothing more may go: the caller refuses


def test_start_up_removes_leftovers_and_applies_the_budget(cache, small_gallery, tmp_path):
    import app

    uploads, embeddings = cache / "uploads", cache / "embeddings"
    uploads.mkdir(parents=True)
    embeddings.mkdir()
    dead_pid = next(p for p in range(4_000_000, 4_100_000) if not Path(f"/proc/{p}").exists())
    crashed = uploads / f"0123abcd.tmp{dead_pid}"
    (crashed / "sub").mkdir(parents=True)
    (crashed / "sub" / "half.jpg").write_bytes(b"x" * 100)
    running = uploads / f"4567cdef.tmp{os.getpid()}"      # an extraction of a live process: left alone
    running.mkdir()
    interrupted = embeddings / ".abc.npz.k2j3.tmp"         # an atomic write that never finished
    interrupted.write_bytes(b"x" * 10)
    age(interrupted, 7200)
    old_gallery = uploads / "89ab" / "photo.jpg"
    old_gallery.parent.mkdir()
    old_gallery.write_bytes(b"x" * 3 * 1024 * 1024)
    age(old_gallery, 9000)
    age(old_gallery.parent, 9000)
    demo = app.build_app(tiny_workspace(small_gallery, tmp_path), settings=Settings(disk_budget_mb=2))
    assert not crashed.exists() and running.exists() and not interrupted.exists()
    assert not old_gallery.parent.exists()                  # 3 MB over a 2 MB budget: evicted at start
    assert demo.delete_cache == Settings().delete_cache == (600, 3600)


def test_upload_over_the_budget_is_refused_and_deleted(cache, small_gallery, tmp_path):
    import app

    temp = tmp_path / "gradio"
    ws = tiny_workspace(small_gallery, tmp_path)
    demo = app.build_app(ws, settings=Settings(disk_budget_mb=0), temp_dir=temp)
    upload_zip = handler(demo, "upload_zip")
    upload = write_file(temp, "holiday.zip", photo_zip(small_gallery, 4))
    root, status, _, _ = upload_zip(str(upload), "tiny", ws.default_gallery)
    assert "disk budget" in status and root == ws.default_gallery
    assert not upload.exists() and not upload.parent.exists()     # the upload is gone at once
    assert not any((cache / "uploads").iterdir())                 # and so is what was extracted

    demo = app.build_app(ws, settings=Settings(disk_budget_mb=50), temp_dir=temp)
    upload = write_file(temp, "holiday.zip", photo_zip(small_gallery, 4))
    root, status, _, _ = handler(demo, "upload_zip")(str(upload), "tiny", ws.default_gallery)
    assert "Indexed **4 images**" in status and Path(root).parent == cache / "uploads"
    assert not upload.exists()                                     # extracted: the zip itself is not kept


def test_refused_and_read_uploads_are_deleted_at_once(cache, small_gallery, tmp_path):
    import app

    temp = tmp_path / "gradio"
    ws = tiny_workspace(small_gallery, tmp_path)
    demo = app.build_app(ws, settings=Settings(), temp_dir=temp)
    not_a_zip = write_file(temp, "photos.zip", os.urandom(20_000))
    _, status, _, _ = handler(demo, "upload_zip")(str(not_a_zip), "tiny", ws.default_gallery)
    assert "not a zip file" in status and not not_a_zip.exists()
    search_image = handler(demo, "search_image")
    not_an_image = write_file(temp, "notes.png", b"plain text")
    out = search_image(str(not_an_image), "tiny", ws.default_gallery, 4, 64, 100, True)
    assert "not an image we can read" in out[0] and not not_an_image.exists()
    photo = write_file(temp, "query.jpg", next(small_gallery.glob("*.jpg")).read_bytes())
    out = search_image(str(photo), "tiny", ws.default_gallery, 4, 64, 100, True)
    assert out[0].startswith("Image query") and not photo.exists()
    outside = tmp_path / "mine.jpg"                                # never deletes outside Gradio's upload folder
    outside.write_bytes(photo_zip(small_gallery, 1))
    search_image(str(outside), "tiny", ws.default_gallery, 4, 64, 100, True)
    assert outside.exists()


def test_stale_atomic_temp_files_only_when_old(tmp_path):
    fresh, stale = tmp_path / ".a.npz.x.tmp", tmp_path / ".b.npz.y.tmp"
    fresh.write_bytes(b"1")
    stale.write_bytes(b"1")
    age(stale, 7200)
    assert remove_stale_temp_files([tmp_path]) == [stale] and fresh.exists()


# -- public mode and launch -------------------------------------------------------------------

def test_settings_from_env():
    private = Settings.from_env({})
    assert not private.public and private.allow_folders and private.allow_rerun and private.disk_budget_mb == 2048
    public = Settings.from_env({"MATCHER_PUBLIC": "1"})
    assert public.public and not public.allow_folders and not public.allow_rerun and public.allow_uploads
    assert (public.max_upload_mb, public.zip_max_images) == (100, 500)
    opened = Settings.from_env({"MATCHER_PUBLIC": "1", "MATCHER_ALLOW_RERUN": "yes", "MATCHER_DISK_BUDGET_MB": "512"})
    assert opened.allow_rerun and opened.disk_budget_mb == 512
    with pytest.raises(ValueError, match="MATCHER_DISK_BUDGET_MB"):
        Settings.from_env({"MATCHER_DISK_BUDGET_MB": "lots"})


def test_public_mode_turns_heavy_work_off_and_sets_limits(cache, small_gallery, tmp_path):
    import app

    ws = tiny_workspace(small_gallery, tmp_path)
    public = Settings.from_env({"MATCHER_PUBLIC": "1"})
    demo = app.build_app(ws, settings=public)
    apis = {fn.api_name for fn in demo.fns.values() if fn.api_name}
    assert "use_folder" not in apis and {"search_text", "upload_zip", "analyse"} <= apis
    assert not any(getattr(fn.fn, "__name__", "") == "rerun" for fn in demo.fns.values())
    kwargs = app.launch_kwargs(ws, public)
    assert kwargs["max_file_size"] == "100mb" and kwargs["show_error"] is False
    from matcher.data.uploads import folder_roots

    assert not any(str(r) in kwargs["allowed_paths"] for r in folder_roots())  # no browsing the shared folders
    private = app.build_app(ws, settings=Settings())
    assert "use_folder" in {fn.api_name for fn in private.fns.values()}
    assert app.launch_kwargs(ws, Settings())["max_file_size"] == "200mb"


def test_heavy_work_runs_on_one_low_priority_thread():
    import threading

    runner = HeavyRunner()
    seen = [runner.run(lambda: (threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
            for _ in range(3)]
    assert len({tid for tid, _ in seen}) == 1 and threading.get_native_id() != seen[0][0]
    if runner.niced:
        assert all(nice >= 10 for _, nice in seen)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < 10   # the caller's thread is untouched
    with pytest.raises(ZeroDivisionError):
        runner.run(lambda: 1 / 0)
    runner.shutdown()


# -- no raw exception text --------------------------------------------------------------------

def nul_argument(block, name: str):
    """What a hostile client could send to each input: NUL bytes in every text and path."""
    if isinstance(block, (gr.Textbox, gr.State, gr.Radio)):
        return f"x\x00{name}"
    if isinstance(block, gr.File):
        return f"/etc/passwd\x00{name}.zip"
    if isinstance(block, gr.Dropdown):
        return "\x00"
    if isinstance(block, gr.Slider):
        return block.minimum
    if isinstance(block, gr.Checkbox):
        return True
    return None


def assert_clean(message: str) -> None:
    assert not any(raw in message for raw in RAW), message


def test_nul_bytes_in_every_text_and_path_input_give_plain_messages(cache, small_gallery, tmp_path, caplog):
    import app

    ws = tiny_workspace(small_gallery, tmp_path)
    demo = app.build_app(ws, settings=Settings())
    called = 0
    for fn in demo.fns.values():
        if fn.fn is None or not fn.inputs or getattr(fn.fn, "__module__", None) != "app":
            continue  # Gradio's own helpers (examples) are not ours to test
        args = [nul_argument(block, f"arg{i}") for i, block in enumerate(fn.inputs)]
        kwargs = {}
        if "evt" in inspect.signature(fn.fn).parameters:
            kwargs["evt"] = gr.SelectData(None, {"index": 0, "value": "\x00"})
        called += 1
        try:
            out = fn.fn(*args, **kwargs)
        except gr.Error as exc:
            assert_clean(exc.message)
            continue
        for value in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(value, str):
                assert_clean(value)
    assert called >= 10

    # The path inputs get a message of their own, not the generic one.
    root = ws.default_gallery
    status = handler(demo, "use_folder")("/etc\x00", "tiny", root)[1]
    assert "not a folder path" in status
    status = handler(demo, "upload_zip")("/tmp/a\x00.zip", "tiny", root)[1]
    assert "name the server cannot use" in status
    out = handler(demo, "search_image")("/tmp/a\x00.jpg", "tiny", root, 4, 64, 100, True)
    assert "not an image we can read" in out[0]
    assert "not in this gallery" in handler(demo, "more_like")("a\x00.jpg", "tiny", root, 4, 64, 100, True)[0]
    out = handler(demo, "search_text")("a dog\x00 in the snow", "tiny", root, 4, 64, 100, True)
    assert out[0].startswith("Text query") and len(out[3]) == 4   # a NUL is just a character in a query


def test_an_unexpected_error_is_one_sentence_with_an_id_and_logged_in_full(cache, small_gallery, tmp_path, caplog,
                                                                            monkeypatch):
    import app

    ws = tiny_workspace(small_gallery, tmp_path)
    demo = app.build_app(ws, settings=Settings())

    def broken(*args, **kwargs):
        raise RuntimeError("secret detail /srv/private/path")

    monkeypatch.setattr(ws, "matchers", broken)
    with caplog.at_level(logging.ERROR, logger="matcher.app"):
        with pytest.raises(gr.Error) as raised:
            handler(demo, "search_text")("a dog", "tiny", ws.default_gallery, 4, 64, 100, True)
    message = raised.value.message
    assert_clean(message)
    error_id = message.split("error id ")[1].split(")")[0]
    assert len(error_id) == 10
    record = next(r for r in caplog.records if error_id in r.getMessage())
    assert "secret detail" in record.getMessage() and record.exc_info is not None


def test_through_http_no_endpoint_shows_raw_exception_text(cache, small_gallery, tmp_path):
    """Every named endpoint of a launched page, called with NUL bytes in its text and path inputs."""
    import httpx

    import app
    from tests.dashboard.test_dashboard_browser import _free_port

    ws = tiny_workspace(small_gallery, tmp_path)
    demo = app.build_app(ws, settings=Settings())
    demo.queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=_free_port(), quiet=True,
                            **app.launch_kwargs(ws, Settings()))
    try:
        apis = {fn.api_name: fn for fn in demo.fns.values() if fn.api_name and fn.api_visibility != "private"}
        assert {"search_text", "search_image", "more_like", "upload_zip", "use_folder", "analyse"} <= set(apis)
        with httpx.Client(timeout=120) as http:
            for name, fn in apis.items():
                data = []
                for i, block in enumerate(b for b in fn.inputs if not isinstance(b, gr.State)):
                    value = nul_argument(block, f"arg{i}")
                    if isinstance(block, gr.File):
                        value = {"path": value, "meta": {"_type": "gradio.FileData"}}
                    elif isinstance(block, gr.Dropdown):
                        value = block.value
                    data.append(value)
                event = http.post(f"{url}gradio_api/call/{name}", json={"data": data})
                assert event.status_code == 200, (name, event.text)
                stream = http.get(f"{url}gradio_api/call/{name}/{event.json()['event_id']}").text
                assert "event: complete" in stream or "event: error" in stream, (name, stream[:300])
                assert_clean(stream)
    finally:
        demo.close()


def test_an_unwritable_cache_folder_is_a_message_and_searching_goes_on(small_gallery, tmp_path, monkeypatch):
    """MATCHER_CACHE_DIR below a regular file: no folder can be made there (a real OSError, as root too)."""
    import app

    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("MATCHER_CACHE_DIR", str(tmp_path / "file" / "cache"))
    ws = Workspace(presets={"tiny": {"teacher": TINY}}, gallery=small_gallery, hub_ok=lambda: False)
    demo = app.build_app(ws, settings=Settings())        # starts: nothing of the cache is needed to serve
    out = handler(demo, "search_text")("a dog on the grass", "tiny", ws.default_gallery, 3, 64, 100, True)
    assert len(out[3]) == 3                              # answered from memory
    assert "embedding cache" in out[0] and "cannot be written" in out[0] and "MATCHER_CACHE_DIR" in out[0]
    assert_clean(out[0])
