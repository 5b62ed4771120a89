"""Embedding cache: hit, invalidation by gallery or model change, corruption -> rebuild."""
import shutil

import numpy as np
from PIL import Image

from matcher.data.cache import ArrayCache
from matcher.data.embed import embed_gallery
from matcher.data.gallery import open_gallery
from matcher.registry import load_encoder
from matcher.models.openclip import OpenClipEncoder


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

    # So does the same model behind another preprocessing version (matcher.models.towers.PREPROCESS_VERSION).
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


def test_training_caches_are_rebuilt_when_corrupted_or_made_from_other_data(tmp_path, monkeypatch, caplog):
    """Training features (trunk outputs, teacher targets) are cached per Flickr8k copy, checksummed."""
    from matcher.train.features import Flickr8k, cached_arrays
    from tests.helpers import tiny_flickr8k

    monkeypatch.setenv("MATCHER_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def build(value: float):
        def _build():
            calls.append(value)
            return {"x": np.full((3, 2), value, np.float32)}
        return _build

    first = Flickr8k.load(tiny_flickr8k(tmp_path / "a", {"train": 2, "val": 1, "test": 1}))
    assert cached_arrays("feats", first, build(1.0))["x"][0, 0] == 1.0
    assert cached_arrays("feats", first, build(2.0))["x"][0, 0] == 1.0 and calls == [1.0]   # a hit

    # the same cache name, another copy of the data (other splits): rebuilt, not reused
    other = Flickr8k.load(tiny_flickr8k(tmp_path / "b", {"train": 3, "val": 1}))
    assert other.digest != first.digest
    assert cached_arrays("feats", other, build(3.0))["x"][0, 0] == 3.0 and calls == [1.0, 3.0]

    # a corrupted file: reported and rebuilt
    (entry,) = (tmp_path / "cache" / "training").glob("feats.npz")
    entry.write_bytes(entry.read_bytes()[:100])
    assert cached_arrays("feats", other, build(4.0))["x"][0, 0] == 4.0 and calls == [1.0, 3.0, 4.0]
    assert "corrupted" in caplog.text


def test_read_only_cache_folder_is_reported_and_searching_goes_on(small_gallery, tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    from matcher.data.cache import cache_problems

    root = tmp_path / "ro" / "embeddings"
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    cache = ArrayCache(root)
    assert "Read-only file system" in cache.problem and "MATCHER_CACHE_DIR" in cache.problem
    assert cache.problem in cache_problems()
    assert cache.get("anything") is None
    assert cache.put("anything", {"x": np.zeros(3)}, {}) is False
    encoder = load_encoder("open_clip:matcher-tiny-vit")
    emb = embed_gallery(encoder, open_gallery(small_gallery), cache)   # computed, used, not stored
    assert emb.images.shape == (12, 32) and not emb.from_cache


def test_full_disk_while_writing_leaves_nothing_behind_and_recovers(tmp_path, monkeypatch):
    import errno

    import matcher.data.cache as cache_module
    from matcher.data.cache import cache_problems

    cache = ArrayCache(tmp_path / "cache")
    real_savez = np.savez

    def full(file, **arrays):
        file.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module.np, "savez", full)
    assert cache.put("k", {"x": np.arange(3)}, {"m": 1}) is False
    assert any("No space left on device" in p for p in cache_problems())
    assert list(cache.root.iterdir()) == []            # the half-written temporary file is gone
    monkeypatch.setattr(cache_module.np, "savez", real_savez)
    assert cache.put("k", {"x": np.arange(3)}, {"m": 1}) is True
    assert not any(str(cache.root) in p for p in cache_problems())   # space again: the message goes
    arrays, meta = cache.get("k")
    assert arrays["x"].tolist() == [0, 1, 2] and meta == {"m": 1}


def test_unusable_cache_root_from_the_environment(small_gallery, tmp_path, monkeypatch):
    """MATCHER_CACHE_DIR below a regular file: no folder can be made there (a real OSError)."""
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("MATCHER_CACHE_DIR", str(tmp_path / "file" / "cache"))
    cache = ArrayCache()
    assert cache.root is None and "cannot be written" in cache.problem
    emb = embed_gallery(load_encoder("open_clip:matcher-tiny-vit"), open_gallery(small_gallery))
    assert len(emb.names) == 12


def test_a_hit_marks_the_entry_as_recently_used(tmp_path):
    import os

    cache = ArrayCache(tmp_path / "cache")
    cache.put("k", {"x": np.arange(3)}, {})
    os.utime(cache.path("k"), (1_000_000, 1_000_000))
    assert cache.get("k") is not None
    assert cache.path("k").stat().st_mtime > 1_000_000
