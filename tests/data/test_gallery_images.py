import io
import json

import pytest
from PIL import Image

from matcher.data import images as images_mod
from matcher.data.gallery import GalleryError, open_gallery
from matcher.data.images import UnreadableImage, load_rgb


def _save(path, image, fmt, **kw):
    image.save(path, fmt, **kw)
    return path


def test_odd_modes_are_converted_to_rgb(tmp_path):
    cmyk = _save(tmp_path / "cmyk.jpg", Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG")
    gray = _save(tmp_path / "gray.png", Image.new("L", (40, 30), 128), "PNG")
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))  # fully transparent red -> white
    alpha = _save(tmp_path / "alpha.png", rgba, "PNG")
    deep = _save(tmp_path / "deep.png", Image.new("I;16", (40, 30), 65535), "PNG")
    for path in (cmyk, gray, alpha, deep):
        image = load_rgb(path)
        assert image.mode == "RGB" and image.size == (40, 30)
    assert load_rgb(alpha).getpixel((0, 0)) == (255, 255, 255)
    assert load_rgb(gray).getpixel((0, 0)) == (128, 128, 128)


def test_bad_files_raise_readable_reasons(tmp_path, monkeypatch):
    (tmp_path / "text.jpg").write_text("this is not an image")
    good = io.BytesIO()
    Image.new("RGB", (200, 200), (10, 200, 30)).save(good, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    _save(tmp_path / "tiny.png", Image.new("RGB", (1, 1)), "PNG")
    _save(tmp_path / "big.png", Image.new("RGB", (400, 300)), "PNG")
    with pytest.raises(UnreadableImage, match="not an image"):
        load_rgb(tmp_path / "text.jpg")
    with pytest.raises(UnreadableImage, match="truncated"):
        load_rgb(tmp_path / "truncated.jpg")
    with pytest.raises(UnreadableImage, match="too small"):
        load_rgb(tmp_path / "tiny.png")
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 100_000)
    with pytest.raises(UnreadableImage, match="too large"):
        load_rgb(tmp_path / "big.png")


def test_large_images_are_reduced(tmp_path):
    path = _save(tmp_path / "large.jpg", Image.new("RGB", (4000, 3000), (1, 2, 3)), "JPEG")
    image = load_rgb(path)
    assert max(image.size) <= images_mod.WORKING_SIDE and image.mode == "RGB"


def _sideways_photo(path, size=(40, 80), orientation=6):
    """A phone photo as cameras store it: pixels sideways, an EXIF tag saying how to turn them.
    Upright it is ``size`` (w, h), red on top, blue below."""
    upright = Image.new("RGB", size, (220, 20, 20))
    upright.paste((20, 20, 220), (0, size[1] // 2, size[0], size[1]))
    stored = upright.transpose(Image.Transpose.ROTATE_90)   # orientation 6 turns it back by 270 degrees
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, "JPEG", exif=exif.tobytes(), quality=95)
    return path


@pytest.mark.parametrize("size", [(40, 80), (1200, 2400)])   # the large one goes through the JPEG draft path
def test_exif_orientation_is_applied_before_anything_else(tmp_path, size):
    path = _sideways_photo(tmp_path / "phone.jpg", size)
    with Image.open(path) as raw:
        assert raw.size == (size[1], size[0])          # stored sideways
    image = load_rgb(path)
    w, h = image.size
    assert w < h and image.mode == "RGB"              # upright: taller than wide
    top, bottom = image.getpixel((w // 2, h // 8)), image.getpixel((w // 2, 7 * h // 8))
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]   # red on top, blue below
    plain = _save(tmp_path / "plain.jpg", Image.new("RGB", (60, 30), (5, 5, 5)), "JPEG")
    assert load_rgb(plain).size == (60, 30)            # no tag: untouched


def test_gallery_lists_captioned_first_and_reports_missing(tmp_path):
    for name in ("b.jpg", "a.jpg", "extra.png"):
        Image.new("RGB", (32, 32)).save(tmp_path / name)
    rows = [{"image": "b.jpg", "captions": ["x"], "split": "test"},
            {"image": "a.jpg", "captions": ["y", " "], "split": "val"},
            {"image": "gone.jpg", "captions": ["z"], "split": "test"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    gallery = open_gallery(tmp_path)
    assert gallery.names == ["b.jpg", "a.jpg", "extra.png"]
    assert gallery.captions["a.jpg"] == ["y"]
    assert gallery.problems == [("captions.jsonl:3", "gone.jpg: no such file; skipped")]
    assert gallery.select("test").names == ["b.jpg"]
    with pytest.raises(GalleryError, match="no images in split 'train'"):
        gallery.select("train")


def test_gallery_errors(tmp_path):
    with pytest.raises(GalleryError, match="not found"):
        open_gallery(tmp_path / "missing")
    with pytest.raises(GalleryError, match="no images"):
        open_gallery(tmp_path)
    Image.new("RGB", (32, 32)).save(tmp_path / "a.jpg")
    (tmp_path / "captions.jsonl").write_text('{"image": 3}\n')   # a bad line is reported, not fatal
    gallery = open_gallery(tmp_path)
    assert gallery.names == ["a.jpg"] and gallery.problems == [("captions.jsonl:1", "bad line (needs an 'image' string); skipped")]


def test_shared_layout_with_images_subfolder(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "p.jpg")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"image": "p.jpg", "captions": ["c"], "split": "test"}) + "\n")
    gallery = open_gallery(tmp_path)
    assert gallery.names == ["images/p.jpg"] and gallery.captions["images/p.jpg"] == ["c"] and not gallery.problems
