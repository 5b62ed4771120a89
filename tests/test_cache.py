"""Embedding cache: hit, invalidation by gallery or model change, corruption -> rebuild."""
import shutil

import numpy as np
from PIL import Image

from matcher.cache import ArrayCache
from matcher.embed import embed_gallery
from matcher.gallery import open_gallery
from matcher.models import load_encoder
from matcher.openclip_encoder import OpenClipEncoder


def test_hit_invalidation_and_corruption(small_gallery, tmp_path, caplog):
    cache = ArrayCache(tmp_path / "cache")
    encoder = load_encoder("open_clip:matcher-tiny-vit")
    gallery = open_gallery(small_gallery)

    first = embed_gallery(encoder, gallery, cache)
    assert not first.from_cache and first.images.shape == (12, 32) and len(first.caption_texts) == 60
    second = embed_gallery(encoder, gallery, cache)
    assert second.from_cache and np.array_equal(first.images, second.images)
    assert list(second.caption_image) == list(first.caption_image)

    # A changed image invalidates the entry.
    name = gallery.names[0]
    Image.new("RGB", (64, 64), (0, 255, 0)).save(small_gallery / name, "JPEG")
    changed = embed_gallery(encoder, open_gallery(small_gallery), cache)
    assert not changed.from_cache and not np.allclose(changed.images[0], first.images[0])

    # A different model (other weights) does not reuse it either.
    other = OpenClipEncoder("matcher-tiny-vit", seed=7)
    assert not embed_gallery(other, open_gallery(small_gallery), cache).from_cache

    # So does the same model behind another preprocessing version (matcher.towers.PREPROCESS_VERSION).
    repreprocessed = load_encoder("open_clip:matcher-tiny-vit")
    repreprocessed.preprocess_version = "next"
    assert repreprocessed.fingerprint() != encoder.fingerprint()
    assert not embed_gallery(repreprocessed, open_gallery(small_gallery), cache).from_cache

    # Corrupt every entry: detected, reported and rebuilt with the same vectors.
    for path in cache.root.glob("*.npz"):
        data = bytearray(path.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
        path.write_bytes(bytes(data))
    rebuilt = embed_gallery(encoder, open_gallery(small_gallery), cache)
    assert not rebuilt.from_cache
    assert np.allclose(rebuilt.images, changed.images, atol=1e-6)
    assert "corrupted" in caplog.text
    assert embed_gallery(encoder, open_gallery(small_gallery), cache).from_cache


def test_truncated_cache_file_is_rebuilt(small_gallery, tmp_path):
    cache = ArrayCache(tmp_path / "cache")
    encoder = load_encoder("open_clip:matcher-tiny-vit")
    embed_gallery(encoder, open_gallery(small_gallery), cache)
    (entry,) = cache.root.glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:100])
    assert not embed_gallery(encoder, open_gallery(small_gallery), cache).from_cache


def test_broken_files_are_skipped_and_reported(small_gallery, tmp_path):
    (small_gallery / "notes.jpg").write_text("not a picture")
    (small_gallery / "dot.png").write_bytes(b"")
    Image.new("RGB", (1, 1)).save(small_gallery / "pixel.png")
    Image.new("CMYK", (64, 48)).save(small_gallery / "print.jpg")
    emb = embed_gallery(load_encoder("open_clip:matcher-tiny-vit"), open_gallery(small_gallery), ArrayCache(tmp_path / "c"))
    skipped = dict(emb.skipped)
    assert set(skipped) == {"notes.jpg", "dot.png", "pixel.png"}
    assert "print.jpg" in emb.names and len(emb.names) == 13
    assert "too small" in skipped["pixel.png"]
