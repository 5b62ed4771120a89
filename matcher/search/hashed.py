"""Two-stage search: Hamming shortlist of C candidates from a binary index, then exact float
re-rank of only those C, then top K.

The shortlist costs ``bits / 8`` bytes per gallery item; the float vectors are touched only for
the C candidates (one gather + one [C, D] x [D] product), so query cost barely grows with N
beyond the popcount scan.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
from PIL import Image

from matcher.data.embed import GalleryEmbeddings, embed_gallery
from matcher.data.gallery import Gallery
from matcher.hashing.codes import Hasher, hamming_similarity
from matcher.models.encoder import Encoder
from matcher.search.exact import caption_vectors
from matcher.search.index import BinaryIndex
from matcher.search.protocol import (Hit, QueryError, Ranking, SearchOptions, SearchResult, Stopwatch, check_k,
                                     check_text_query, row_of)

log = logging.getLogger(__name__)


def rerank(queries: np.ndarray, candidates: np.ndarray, vectors: np.ndarray, k: int,
           chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Re-score each query's candidate ids by inner product with ``vectors``; keep the best ``k``.

    ``candidates`` is [Q, C] (``-1`` = no candidate, scored -inf). Returns (scores [Q, k], ids [Q, k]),
    best first.
    """
    queries = np.asarray(queries, np.float32)
    k = min(k, candidates.shape[1])
    out_scores = np.empty((len(queries), k), np.float32)
    out_ids = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), chunk):
        ids = candidates[start:start + chunk]
        q = queries[start:start + chunk]
        # [Q, C, D] x [Q, D, 1]: one small batched matmul over only the gathered candidate rows.
        scores = np.matmul(vectors[np.maximum(ids, 0)], q[:, :, None])[..., 0]
        scores[ids < 0] = -np.inf
        if k < scores.shape[1]:
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            order = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable"), 1)
        else:
            order = np.argsort(-scores, axis=1, kind="stable")
        out_scores[start:start + chunk] = np.take_along_axis(scores, order, 1)
        out_ids[start:start + chunk] = np.take_along_axis(ids, order, 1)
    return out_scores, out_ids


def two_stage_search(index: BinaryIndex, vectors: np.ndarray, query_codes: np.ndarray, query_vectors: np.ndarray,
                     k: int, candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """Batch form: Hamming top-C, then float re-rank to top-k. (scores [Q, k], ids [Q, k])."""
    _, cand = index.search(query_codes, max(candidates, k))
    return rerank(query_vectors, cand, vectors, k)


class HashedMatcher:
    """Binary codes of a float encoder's gallery embeddings + two-stage search.

    ``hashers`` maps code length -> hasher (``SearchOptions.bits`` picks one). Re-ranking uses the
    base encoder's vectors, or, with ``reranker=(encoder, embeddings)``, another encoder's (the
    teacher's): the query is then encoded by both and the shortlist re-scored by the teacher.
    """

    def __init__(self, encoder: Encoder, gallery: Gallery, hashers: dict[int, Hasher],
                 embeddings: GalleryEmbeddings | None = None,
                 reranker: tuple[Encoder, GalleryEmbeddings] | None = None, name: str | None = None):
        if not hashers:
            raise ValueError("a hashed matcher needs at least one hasher")
        self.encoder, self.gallery, self.hashers = encoder, gallery, dict(hashers)
        self.embeddings = embeddings or embed_gallery(encoder, gallery)
        self.rerank_encoder, self.rerank_embeddings = reranker or (None, self.embeddings)
        if self.rerank_embeddings.names != self.embeddings.names:
            raise ValueError("the re-ranker's gallery embeddings are not row-aligned with the base encoder's")
        self.name = name or f"{encoder.name}+hash"
        self._indexes: dict[tuple[int, str], BinaryIndex] = {}
        if SearchOptions.bits in self.hashers:
            # Built now, not on the first query: opening (and the app's warm-up) pays for it, and the
            # first query's "candidates" time is the search, not the gallery's hashing.
            self.index(SearchOptions.bits)

    def index(self, bits: int, target: str = "image") -> BinaryIndex:
        """The binary index of the gallery images (or captions) at ``bits``, built on first use."""
        key = (bits, target)
        if key not in self._indexes:
            vectors, modality = (self.embeddings.images, "image") if target == "image" else (self.embeddings.captions, "text")
            index = BinaryIndex(bits)
            index.add(self.hasher(bits).encode(vectors, modality))
            self._indexes[key] = index
        return self._indexes[key]

    def hasher(self, bits: int) -> Hasher:
        if bits not in self.hashers:
            raise QueryError(f"no {bits}-bit codes for this matcher; choose one of {sorted(self.hashers)}")
        return self.hashers[bits]

    def _search(self, base_query: np.ndarray, rerank_query: np.ndarray, modality: str, target: str,
                options: SearchOptions, clock: Stopwatch) -> SearchResult:
        k = check_k(options.k)
        if options.candidates < 1:
            raise QueryError(f"the shortlist size C must be at least 1 (got {options.candidates}).")
        hasher = self.hasher(options.bits)
        index = self.index(options.bits, target)  # a one-off build for other code lengths: not a search stage
        # Hashing the query is part of producing candidates: the three stages the page shows.
        with clock.stage("candidates"):
            distances, cand = index.search(hasher.encode(base_query[None], modality), max(options.candidates, k))
        with clock.stage("rerank"):
            if options.rerank:
                vectors = self.rerank_embeddings.images if target == "image" else self.rerank_embeddings.captions
                scores, ids = rerank(rerank_query[None], cand, vectors, k)
                scores, ids = scores[0], ids[0]
            else:
                scores, ids = hamming_similarity(distances[0, :k], options.bits), cand[0, :k]
        labels = self.embeddings.names if target == "image" else self.embeddings.caption_texts
        return clock.result([Hit(int(i), labels[i], float(s)) for s, i in zip(scores, ids) if i >= 0])

    def _encode(self, encode: Callable[[Encoder], Callable], query, clock: Stopwatch) -> tuple[np.ndarray, np.ndarray]:
        with clock.stage("encode"):
            base = encode(self.encoder)([query])[0]
            other = encode(self.rerank_encoder)([query])[0] if self.rerank_encoder else base
        return base, other

    def search_text(self, text: str, options: SearchOptions = SearchOptions()) -> SearchResult:
        text, clock = check_text_query(text), Stopwatch()
        base, other = self._encode(lambda e: e.encode_texts, text, clock)
        return self._search(base, other, "text", "image", options, clock)

    def search_image(self, image: Image.Image, options: SearchOptions = SearchOptions()) -> SearchResult:
        clock = Stopwatch()
        base, other = self._encode(lambda e: e.encode_images, image, clock)
        return self._search(base, other, "image", "image", options, clock)

    def more_like(self, name: str, options: SearchOptions = SearchOptions()) -> SearchResult:
        clock, row = Stopwatch(), row_of(self.embeddings.names, name)
        clock.timings["encode"] = 0.0
        base, other = self.embeddings.images[row], self.rerank_embeddings.images[row]
        return self._search(base, other, "image", "image", options, clock)

    def captions_for_image(self, image: Image.Image, options: SearchOptions = SearchOptions(k=5)) -> SearchResult:
        """image->text over the gallery's captions, through the caption codes."""
        if len(self.embeddings.caption_texts) == 0:
            raise QueryError("This gallery has no captions to search.")
        clock = Stopwatch()
        base, other = self._encode(lambda e: e.encode_images, image, clock)
        return self._search(base, other, "image", "caption", options, clock)

    def rank_captions(self, texts: list[str], owners: list[str], k: int, options: SearchOptions = SearchOptions(),
                      progress: Callable[[float], None] | None = None) -> Ranking:
        """Batch text->image answers. The owner can only be found inside the C-item shortlist, so
        ranks are censored at ``cap = C``. Gallery captions reuse their cached embeddings."""
        base = caption_vectors(self.embeddings, self.encoder, texts, owners)
        cap = min(max(options.candidates, k), len(self.embeddings.names))
        index, hasher = self.index(options.bits, "image"), self.hasher(options.bits)
        distances, cand = index.search(hasher.encode(base, "text"), cap)
        if options.rerank:
            other = (caption_vectors(self.rerank_embeddings, self.rerank_encoder, texts, owners)
                     if self.rerank_encoder else base)
            _, order = rerank(other, cand, self.rerank_embeddings.images, cap)
        else:
            order = cand
        name_row = {n: r for r, n in enumerate(self.embeddings.names)}
        owner_rows = np.array([name_row.get(o, -2) for o in owners])
        hit = order == owner_rows[:, None]
        ranks = np.where(hit.any(axis=1), hit.argmax(axis=1), cap)
        names = self.embeddings.names
        return Ranking([[names[j] for j in row[:k] if j >= 0] for row in order], ranks, cap)

