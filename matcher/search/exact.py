"""Exact float search of one encoder over one gallery: the teacher's and the student's tier.

text->image, image->image (an uploaded image or "more like this" on a gallery item) and
image->text over the gallery's captions, each answer with per-stage timings.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

from matcher.data.embed import GalleryEmbeddings, embed_gallery
from matcher.data.gallery import Gallery
from matcher.eval.metrics import t2i_ranks
from matcher.models.encoder import Encoder
from matcher.search.index import FloatIndex
from matcher.search.protocol import (Hit, QueryError, Ranking, SearchOptions, SearchResult, Stopwatch, check_k,
                                     check_text_query, row_of)


class ExactMatcher:
    """Inner-product search over every gallery vector (faiss flat index)."""

    def __init__(self, encoder: Encoder, gallery: Gallery, embeddings: GalleryEmbeddings | None = None,
                 name: str | None = None):
        self.encoder, self.gallery = encoder, gallery
        self.embeddings = embeddings or embed_gallery(encoder, gallery)
        self.name = name or encoder.name
        dim = self.embeddings.images.shape[1]
        self.image_index = FloatIndex(dim)
        self.image_index.add(self.embeddings.images)
        self.caption_index = FloatIndex(dim)
        if len(self.embeddings.caption_texts):
            self.caption_index.add(self.embeddings.captions)

    def _image_hits(self, query: np.ndarray, k: int, clock: Stopwatch) -> SearchResult:
        with clock.stage("search"):
            scores, ids = self.image_index.search(query[None], k)
        names = self.embeddings.names
        return clock.result([Hit(int(i), names[i], float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0])

    def search_text(self, text: str, options: SearchOptions = SearchOptions()) -> SearchResult:
        text, k, clock = check_text_query(text), check_k(options.k), Stopwatch()
        with clock.stage("encode"):
            query = self.encoder.encode_texts([text])[0]
        return self._image_hits(query, k, clock)

    def search_image(self, image: Image.Image, options: SearchOptions = SearchOptions()) -> SearchResult:
        k, clock = check_k(options.k), Stopwatch()
        with clock.stage("encode"):
            query = self.encoder.encode_images([image])[0]
        return self._image_hits(query, k, clock)

    def more_like(self, name: str, options: SearchOptions = SearchOptions()) -> SearchResult:
        k, clock = check_k(options.k), Stopwatch()
        row = row_of(self.embeddings.names, name)
        clock.timings["encode"] = 0.0
        return self._image_hits(self.embeddings.images[row], k, clock)

    def captions_for_image(self, image: Image.Image, options: SearchOptions = SearchOptions(k=5)) -> SearchResult:
        if len(self.caption_index) == 0:
            raise QueryError("This gallery has no captions to search.")
        k, clock = check_k(options.k), Stopwatch()
        with clock.stage("encode"):
            query = self.encoder.encode_images([image])[0]
        with clock.stage("search"):
            scores, ids = self.caption_index.search(query[None], k)
        texts = self.embeddings.caption_texts
        return clock.result([Hit(int(i), texts[i], float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0])

    def rank_captions(self, texts: list[str], owners: list[str], k: int, options: SearchOptions = SearchOptions(),
                      progress: Callable[[float], None] | None = None) -> Ranking:
        """Exact ranks from the cached embeddings (captions the gallery holds are not re-encoded)."""
        emb = self.embeddings
        queries = caption_vectors(emb, self.encoder, texts, owners)
        sim = queries @ emb.images.T
        top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        name_row = {n: r for r, n in enumerate(emb.names)}
        gt_rows = np.array([name_row.get(o, -1) for o in owners])
        ranks = np.where(gt_rows >= 0, t2i_ranks(sim, np.maximum(gt_rows, 0)), len(emb.names))
        return Ranking([[emb.names[j] for j in row] for row in top], ranks, cap=len(emb.names))


def caption_vectors(emb: GalleryEmbeddings, encoder: Encoder, texts: list[str], owners: list[str]) -> np.ndarray:
    """Embeddings of caption queries: the cached row where the gallery holds (text, owner), else encoded."""
    row_of_pair: dict[tuple[str, str], int] = {}
    for i, text in enumerate(emb.caption_texts):
        row_of_pair.setdefault((text, emb.names[emb.caption_image[i]]), i)
    rows = np.array([row_of_pair.get((t, o), -1) for t, o in zip(texts, owners)], dtype=np.int64)
    out = np.empty((len(texts), emb.images.shape[1]), np.float32)
    known = rows >= 0
    out[known] = emb.captions[rows[known]]
    if (~known).any():
        out[~known] = encoder.encode_texts([t for t, r in zip(texts, rows) if r < 0])
    return out
