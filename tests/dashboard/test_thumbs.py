"""Result grids: small photos served as they are, big ones as a cached, upright thumbnail."""
import os

from PIL import Image

from matcher.dashboard.thumbs import THUMB_SIDE, Thumbnails


def test_small_photos_are_served_as_they_are(small_gallery, tmp_path):
    thumbs = Thumbnails(tmp_path / "thumbs")
    photo = next(small_gallery.glob("*.jpg"))            # a bundled 224 px photo
    assert thumbs(photo) == photo and not (tmp_path / "thumbs").exists()


def test_big_photos_get_one_upright_thumbnail(tmp_path):
    big = Image.effect_noise((3000, 1500), 60).convert("RGB")   # noise: a large JPEG
    big.paste((250, 0, 0), (0, 0, 3000, 200))                     # a red band along the top edge
    stored = big.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6                                              # stored sideways, tagged
    path = tmp_path / "phone.jpg"
    stored.save(path, "JPEG", exif=exif.tobytes(), quality=95)
    assert path.stat().st_size > 150_000
    thumbs = Thumbnails(tmp_path / "thumbs")
    small = thumbs(path)
    assert small != path and small.parent == tmp_path / "thumbs"
    with Image.open(small) as image:
        assert max(image.size) == THUMB_SIDE and image.size[0] > image.size[1]   # upright: wider than tall
        r, g, b = image.getpixel((image.size[0] // 2, 3))
        assert r > 200 and g < 60                                             # the red band is on top
    made = small.stat().st_mtime_ns
    assert thumbs(path) == small and small.stat().st_mtime_ns == made          # made once
    os.utime(path, (1, 1))                                                     # a changed photo: a new one
    assert thumbs(path) != small


def test_unreadable_or_unwritable_falls_back_to_the_original(tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(os.urandom(300_000))
    assert Thumbnails(tmp_path / "thumbs")(junk) == junk
    assert Thumbnails(None)(junk) == junk
    assert Thumbnails(tmp_path / "t")(tmp_path / "missing.jpg") == tmp_path / "missing.jpg"
