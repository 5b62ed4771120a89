"""Own galleries: safe zip extraction (paths, links, limits, bombs), caching, allowed server folders."""
import io
import stat
import zipfile

import pytest
from PIL import Image

from matcher.data.gallery import open_gallery
from matcher.data.uploads import UploadError, check_folder, extract_zip, safe_member_path


def png_bytes(color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, "PNG")
    return buf.getvalue()


def make_zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            if isinstance(data, zipfile.ZipInfo):
                zf.writestr(data, b"target")
            else:
                zf.writestr(name, data)
    return path


def test_safe_member_path():
    assert str(safe_member_path("a/b.jpg")) == "a/b.jpg"
    assert str(safe_member_path("./a//b.jpg")) == "a/b.jpg"
    for bad in ["../x.jpg", "a/../../x.jpg", "/etc/x.jpg", "C:/x.jpg", "a\\..\\..\\x.jpg", "", "a\x00.jpg"]:
        assert safe_member_path(bad) is None, bad


def test_extracts_images_and_captions_strips_top_folder_and_lists_skips(tmp_path):
    link = zipfile.ZipInfo("trip/link.jpg")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = make_zip(tmp_path / "trip.zip", {
        "trip/a.png": png_bytes(), "trip/sub/b.png": png_bytes((0, 0, 200)), "trip/notes.txt": b"hello",
        "trip/captions.jsonl": '{"image": "a.png", "captions": ["a red square"]}\n', "trip/../../evil.png": png_bytes(),
        "__MACOSX/trip/._a.png": b"junk", "trip/link.jpg": link,
    })
    out = extract_zip(archive, tmp_path / "uploads")
    reasons = dict(out.skipped)
    assert reasons["trip/notes.txt"] == "not an image or manifest file"
    assert "unsafe path" in reasons["trip/../../evil.png"] and "links" in reasons["trip/link.jpg"]
    assert not (tmp_path / "evil.png").exists() and not list(tmp_path.rglob("evil.png"))
    gallery = open_gallery(out.root)
    assert sorted(gallery.names) == ["a.png", "sub/b.png"] and gallery.captions["a.png"] == ["a red square"]
    again = extract_zip(archive, tmp_path / "uploads")
    assert again.from_cache and again.root == out.root and dict(again.skipped) == reasons


def test_not_a_zip_and_no_images_are_clear_errors(tmp_path):
    (tmp_path / "photos.zip").write_text("not a zip")
    with pytest.raises(UploadError, match="is not a zip file"):
        extract_zip(tmp_path / "photos.zip", tmp_path / "u")
    with pytest.raises(UploadError, match="no image files"):
        extract_zip(make_zip(tmp_path / "t.zip", {"a.txt": b"x"}), tmp_path / "u")


def test_count_size_and_bomb_limits(tmp_path):
    many = make_zip(tmp_path / "many.zip", {f"{i}.png": png_bytes() for i in range(6)})
    with pytest.raises(UploadError, match="limit is 5"):
        extract_zip(many, tmp_path / "u", max_files=5)
    with pytest.raises(UploadError, match="unpacks to more than"):
        extract_zip(many, tmp_path / "u", max_total_bytes=len(png_bytes()) * 3)
    assert not any((tmp_path / "u").glob("*.tmp*"))  # partial extraction cleaned up
    bomb = make_zip(tmp_path / "bomb.zip", {"big.png": b"\0" * 3_000_000, "ok.png": png_bytes()})
    out = extract_zip(bomb, tmp_path / "u", max_file_bytes=1_000_000)
    assert "larger than" in dict(out.skipped)["big.png"] and out.files == 1


def test_server_folders_only_below_allowed_roots(tmp_path):
    inside = tmp_path / "shared" / "photos"
    inside.mkdir(parents=True)
    assert check_folder(str(inside), [tmp_path / "shared"]) == inside.resolve()
    with pytest.raises(UploadError, match="outside the folders"):
        check_folder("/etc", [tmp_path / "shared"])
    with pytest.raises(UploadError, match="outside the folders"):
        check_folder(str(inside / ".." / ".." ), [tmp_path / "shared"])
    with pytest.raises(UploadError, match="not found"):
        check_folder(str(tmp_path / "shared" / "missing"), [tmp_path / "shared"])


def test_nul_bytes_and_odd_paths_are_plain_upload_errors(tmp_path):
    roots = [tmp_path]
    for bad in ["/etc\x00", "photos\x00/x", "a\nb", "x" * 5000]:
        with pytest.raises(UploadError, match="not a folder path"):
            check_folder(bad, roots)
    with pytest.raises(UploadError, match="Type the path"):
        check_folder(None, roots)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(UploadError):
        check_folder(str(loop / "x"), roots)
    with pytest.raises(UploadError, match="name the server cannot use"):
        extract_zip(tmp_path / "a\x00.zip", tmp_path / "u")


def test_a_full_disk_during_extraction_is_an_upload_error_and_leaves_no_partial_folder(tmp_path, monkeypatch):
    import builtins
    import errno

    archive = make_zip(tmp_path / "p.zip", {f"{i}.png": png_bytes() for i in range(3)})
    real_open = builtins.open
    written = []

    def full_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if "w" in mode and ".tmp" in str(file):
            written.append(file)
            if len(written) == 2:
                handle.close()
                raise OSError(errno.ENOSPC, "No space left on device")
        return handle

    monkeypatch.setattr(builtins, "open", full_open)
    with pytest.raises(UploadError, match="cannot store uploads right now"):
        extract_zip(archive, tmp_path / "u")
    monkeypatch.undo()
    assert list((tmp_path / "u").iterdir()) == []


def test_partial_extractions_of_dead_processes_are_removed(tmp_path):
    import os
    from pathlib import Path

    from matcher.data.uploads import remove_partial_extractions

    dead = next(p for p in range(4_000_000, 4_100_000) if not Path(f"/proc/{p}").exists())
    crashed, live, done = tmp_path / f"aa.tmp{dead}", tmp_path / f"bb.tmp{os.getpid()}", tmp_path / "cc"
    for folder in (crashed, live, done):
        folder.mkdir()
    assert remove_partial_extractions(tmp_path) == [crashed]
    assert live.exists() and done.exists()


def test_a_zip_in_another_manifest_format_becomes_a_captioned_gallery(tmp_path):
    """A zip holding a CSV of image/caption pairs (one of the formats matcher.data.readers reads),
    inside one top folder: the manifest is extracted with the images and the captions are used."""
    csv = "image,caption\nred.png,a red square\nred.png,a plain red tile\nblue.png,a blue square\n"
    z = make_zip(tmp_path / "pairs.zip", {"mine/red.png": png_bytes((200, 0, 0)), "mine/blue.png": png_bytes((0, 0, 200)),
                                          "mine/pairs.csv": csv, "mine/notes.txt": b"x"})
    extracted = extract_zip(z, tmp_path / "out")
    gallery = open_gallery(extracted.root)
    assert sorted(gallery.names) == ["blue.png", "red.png"]
    assert gallery.captions["red.png"] == ["a red square", "a plain red tile"]
    assert ("mine/notes.txt", "not an image or manifest file") in extracted.skipped
