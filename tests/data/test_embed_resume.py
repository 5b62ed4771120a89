"""Streaming, resumable gallery encoding: batches as it reads, chunks cached as they finish, an
interrupted encode resumes without re-encoding finished chunks, a corrupted chunk is encoded again."""
import numpy as np
import pytest

from matcher.data.cache import ArrayCache
from matcher.data.embed import embed_gallery
from matcher.data.gallery import open_gallery
from matcher.registry import load_encoder

CHUNK, BATCH = 4, 2   # 12 images: chunks of 4, batches of 2


class Interrupted(RuntimeError):
    pass


def counting(encoder, monkeypatch, fail_on_call: int | None = None) -> list[int]:
    """Record the size of every image batch the encoder sees; raise on call ``fail_on_call`` (1-based)."""
    sizes, real = [], type(encoder).encode_images.__get__(encoder)   # the unpatched method

    def encode_images(images, batch_size=16, progress=False):
        if fail_on_call is not None and len(sizes) + 1 == fail_on_call:
            raise Interrupted("killed half-way")
        sizes.append(len(images))
        return real(images, batch_size=batch_size, progress=progress)

    monkeypatch.setattr(encoder, "encode_images", encode_images)
    return sizes


def test_interrupted_encode_resumes_without_redoing_finished_chunks(small_gallery, tmp_path, monkeypatch):
    encoder, gallery = load_encoder("open_clip:matcher-tiny-vit"), open_gallery(small_gallery)
    clean = embed_gallery(encoder, gallery, ArrayCache(tmp_path / "clean"), batch_size=BATCH, chunk_images=CHUNK)

    cache = ArrayCache(tmp_path / "cache")
    seen = counting(encoder, monkeypatch, fail_on_call=6)   # dies inside the third chunk, 10 images read
    with pytest.raises(Interrupted):
        embed_gallery(encoder, gallery, cache, batch_size=BATCH, chunk_images=CHUNK)
    assert seen == [BATCH] * 5 and len(list(cache.root.glob("*-img4-*.npz"))) == 2

    seen = counting(encoder, monkeypatch)
    resumed = embed_gallery(encoder, gallery, cache, batch_size=BATCH, chunk_images=CHUNK)
    assert sum(seen) == 4 and max(seen) <= BATCH              # only the unfinished chunk, batch by batch
    assert not resumed.from_cache and resumed.names == clean.names
    assert np.array_equal(resumed.images, clean.images) and np.array_equal(resumed.captions, clean.captions)
    assert [p.name.count("-img") + p.name.count("-txt") for p in cache.root.glob("*.npz")] == [0]   # chunks folded in
    assert embed_gallery(encoder, gallery, cache, batch_size=BATCH, chunk_images=CHUNK).from_cache


def test_a_corrupted_chunk_is_encoded_again(small_gallery, tmp_path, monkeypatch, caplog):
    encoder, gallery = load_encoder("open_clip:matcher-tiny-vit"), open_gallery(small_gallery)
    cache = ArrayCache(tmp_path / "cache")
    counting(encoder, monkeypatch, fail_on_call=5)            # the first two chunks are written
    with pytest.raises(Interrupted):
        embed_gallery(encoder, gallery, cache, batch_size=BATCH, chunk_images=CHUNK)
    first = sorted(cache.root.glob("*-img4-*.npz"))[0]
    data = bytearray(first.read_bytes())
    data[len(data) // 2:len(data) // 2 + 32] = b"\xff" * 32
    first.write_bytes(bytes(data))

    seen = counting(encoder, monkeypatch)
    emb = embed_gallery(encoder, gallery, cache, batch_size=BATCH, chunk_images=CHUNK)
    assert sum(seen) == 8 and "corrupted" in caplog.text      # chunk 0 again and chunk 2; chunk 1 was kept
    assert len(emb.names) == 12 and len(emb.caption_texts) == 60
