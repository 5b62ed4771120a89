"""Encode a gallery with one encoder, through the on-disk cache.

The cache key is (encoder weights hash, gallery content hash), so a changed model or a changed
gallery never serves stale vectors. Unreadable images are skipped and reported, never fatal.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from matcher.data.cache import ArrayCache
from matcher.models.encoder import Encoder
from matcher.data.gallery import Gallery
from matcher.data.images import UnreadableImage, load_rgb

log = logging.getLogger(__name__)


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


def _encode_images(encoder: Encoder, gallery: Gallery, batch_size: int) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    names, chunks, batch, batch_names, skipped = [], [], [], [], []

    def flush() -> None:
        if batch:
            chunks.append(encoder.encode_images(batch, batch_size=batch_size))
            names.extend(batch_names)
            batch.clear()
            batch_names.clear()

    for name in tqdm(gallery.names, desc=f"{encoder.name}: encoding images", unit="img"):
        try:
            batch.append(load_rgb(gallery.path(name)))
            batch_names.append(name)
        except UnreadableImage as exc:
            skipped.append((name, str(exc)))
            log.warning("skipped %s: %s", name, exc)
        if len(batch) == batch_size:
            flush()
    flush()
    if not names:
        raise ValueError(f"none of the {len(gallery)} images in {gallery.root} could be read")
    return names, np.concatenate(chunks), skipped


def embed_gallery(encoder: Encoder, gallery: Gallery, cache: ArrayCache | None = None, batch_size: int = 16) -> GalleryEmbeddings:
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
    names, images, skipped = _encode_images(encoder, gallery, batch_size)
    texts, owner = [], []
    for row, name in enumerate(names):
        for caption in gallery.captions.get(name, []):
            texts.append(caption)
            owner.append(row)
    captions = encoder.encode_texts(texts, progress=True) if texts else np.zeros((0, images.shape[1]), np.float32)
    caption_image = np.asarray(owner, dtype=np.int64)
    cache.put(
        key,
        {"images": images, "captions": captions, "caption_image": caption_image},
        {"names": names, "caption_texts": texts, "skipped": skipped, "encoder": encoder.name},
    )
    return GalleryEmbeddings(names, images, texts, caption_image, captions, skipped + gallery.problems)
