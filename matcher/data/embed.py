"""Encode a gallery with one encoder, through the on-disk cache, streaming and resumable.

The cache key is (encoder weights hash, gallery content hash), so a changed model or a changed
gallery never serves stale vectors. Unreadable images are skipped and reported, never fatal.

Images are read and encoded batch by batch (only one batch of decoded images is in memory), and
finished chunks of ``CHUNK_IMAGES`` images / ``CHUNK_TEXTS`` captions are cached as they complete,
under the same key plus the chunk's number. An encode that is killed resumes from the chunks that
were written; a corrupted chunk fails its checksum and is encoded again. When everything is done the
one entry of the whole gallery is written and the chunks are removed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from tqdm import tqdm

from matcher.data.cache import ArrayCache
from matcher.data.gallery import Gallery
from matcher.data.images import UnreadableImage, load_rgb
from matcher.models.encoder import Encoder

log = logging.getLogger(__name__)

CHUNK_IMAGES = 256
CHUNK_TEXTS = 4096


@dataclass
class GalleryEmbeddings:
    """Row-aligned embeddings of a gallery's readable images and of their captions."""

    names: list[str]                 # kept images, one per row of ``images``
    images: np.ndarray               # [N, D] float32, unit norm
    caption_texts: list[str]         # every caption of the kept images
    caption_image: np.ndarray        # [M] row in ``names`` that each caption describes
    captions: np.ndarray             # [M, D] float32, unit norm
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    from_cache: bool = False


Encoded = tuple[dict[str, np.ndarray], dict]   # one chunk's (arrays, metadata), as the cache holds it


def _chunked(cache: ArrayCache, key: str, kind: str, items: list, size: int, desc: str, unit: str,
             encode: Callable[[list, Callable[[int], object]], Encoded]) -> tuple[list[Encoded], list[str]]:
    """Every chunk of ``items``: from the cache when a valid entry exists, else ``encode(chunk,
    advance)`` and written to the cache at once; returns them with their cache keys. One progress bar
    (rate and time left) over all of them."""
    keys = [f"{key}-{kind}{size}-{start // size:05d}" for start in range(0, len(items), size)]
    found = {i: hit for i, k in enumerate(keys) if (hit := cache.get(k)) is not None}
    done = sum(len(items[i * size:(i + 1) * size]) for i in found)
    if found:
        log.info("%s: resuming, %d of %d %ss already encoded", desc, done, len(items), unit)
    out = []
    with tqdm(total=len(items), initial=done, desc=desc, unit=unit, smoothing=0.1) as bar:
        for i, chunk_key in enumerate(keys):
            if i not in found:
                found[i] = encode(items[i * size:(i + 1) * size], bar.update)
                cache.put(chunk_key, *found[i])
            out.append(found[i])
    return out, keys


def embed_gallery(encoder: Encoder, gallery: Gallery, cache: ArrayCache | None = None, batch_size: int = 16,
                  chunk_images: int = CHUNK_IMAGES, chunk_texts: int = CHUNK_TEXTS) -> GalleryEmbeddings:
    """Embeddings of every readable image and every caption, from cache when valid."""
    cache = cache or ArrayCache()
    key = f"{encoder.fingerprint()}-{gallery.fingerprint()}"
    hit = cache.get(key)
    if hit is not None:
        arrays, meta = hit
        return GalleryEmbeddings(
            meta["names"], arrays["images"], meta["caption_texts"], arrays["caption_image"], arrays["captions"],
            [tuple(s) for s in meta["skipped"]] + gallery.problems, from_cache=True,
        )

    def encode_images(names: list[str], advance) -> Encoded:
        kept, vectors, skipped = [], [], []
        for start in range(0, len(names), batch_size):
            batch = []
            for name in names[start:start + batch_size]:
                try:
                    batch.append(load_rgb(gallery.path(name)))
                    kept.append(name)
                except UnreadableImage as exc:
                    skipped.append((name, str(exc)))
                    log.warning("skipped %s: %s", name, exc)
            if batch:
                vectors.append(encoder.encode_images(batch, batch_size=batch_size))
            advance(len(names[start:start + batch_size]))
        images = np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)
        return {"images": images}, {"names": kept, "skipped": skipped}

    def encode_texts(texts: list[str], advance) -> Encoded:
        vectors = []
        for start in range(0, len(texts), 256):
            vectors.append(encoder.encode_texts(texts[start:start + 256]))
            advance(len(vectors[-1]))
        return {"captions": np.concatenate(vectors)}, {}

    image_chunks, image_keys = _chunked(cache, key, "img", gallery.names, chunk_images,
                                        f"{encoder.name}: encoding images", "img", encode_images)
    names = [n for _, meta in image_chunks for n in meta["names"]]
    skipped = [tuple(s) for _, meta in image_chunks for s in meta["skipped"]]
    if not names:
        raise ValueError(f"none of the {len(gallery)} images in {gallery.root} could be read")
    images = np.concatenate([arrays["images"] for arrays, meta in image_chunks if meta["names"]])
    texts, owner = [], []
    for row, name in enumerate(names):
        for caption in gallery.captions.get(name, []):
            texts.append(caption)
            owner.append(row)
    text_chunks, text_keys = _chunked(cache, key, "txt", texts, chunk_texts,
                                      f"{encoder.name}: encoding captions", "caption", encode_texts)
    captions = (np.concatenate([arrays["captions"] for arrays, _ in text_chunks]) if texts
                else np.zeros((0, images.shape[1]), np.float32))
    caption_image = np.asarray(owner, dtype=np.int64)
    cache.put(
        key,
        {"images": images, "captions": captions, "caption_image": caption_image},
        {"names": names, "caption_texts": texts, "skipped": skipped, "encoder": encoder.name},
    )
    for chunk_key in image_keys + text_keys:   # the whole entry now stands for them
        try:
            cache.path(chunk_key).unlink(missing_ok=True)
        except OSError:
            pass   # an unusable cache folder holds no chunks
    return GalleryEmbeddings(names, images, texts, caption_image, captions, skipped + gallery.problems)
