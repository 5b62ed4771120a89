"""Two-stage search: a shortlist of C candidates from a compact code index, then an exact re-rank
of only those C by float vectors, then top K.

The code stage costs bytes per item (``bits / 8`` for binary codes, 32 B for ``PQ64x4fs``); the
re-rank vectors are touched only for the C candidates (one gather + one [C, D] x [D] product), so
they can live in a slower, larger tier: float16 rows in a memory-mapped file
(``matcher.search.store``) cost 2 D bytes on disk per item and nothing in RAM until read.

Candidate stages (``matcher.search.index``; all ``add(vectors, modality)`` /
``search(queries, k, modality) -> (scores, ids)``, scores higher-is-better):

- ``SignStage``: binary codes from a hasher, scored asymmetrically (query's real projection against
  the items' +-1 bits, ``matcher.search.index.SignIndex``); the default, chosen by
  ``python -m matcher bench`` (docs/scale.md);
- ``HammingStage``: the same codes, symmetric Hamming distance (``BinaryIndex``);
- ``QuantizerStage``: a faiss float quantiser (``PQ64x4fs``, ``RaBitQfs`` ...), the anchors.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
from PIL import Image

from matcher.data.embed import GalleryEmbeddings, embed_gallery
from matcher.data.gallery import Gallery
from matcher.hashing.codes import Hasher
from matcher.models.encoder import Encoder
from matcher.search.exact import caption_vectors
from matcher.search.index import (SCORINGS, CandidateStage, HammingStage, QuantizerStage, SignStage,  # noqa: F401
                                  TwoStageIndex, gather_rows, make_stage, rerank, two_stage_search)
from matcher.search.protocol import (Hit, QueryError, Ranking, SearchOptions, SearchResult, Stopwatch, check_k,
                                     check_text_query, row_of)

log = logging.getLogger(__name__)

class HashedMatcher:
    """Binary codes of a float encoder's gallery embeddings + two-stage search.

    ``hashers`` maps code length -> hasher (``SearchOptions.bits`` picks one). ``scoring`` is how the
    shortlist is drawn from the codes: ``"asymmetric"`` (default: the query's real projection
    against the items' bits, ``SignStage``) or ``"hamming"`` (code against code). Without re-rank
    the score is the stage's similarity in [-1, 1]. Re-ranking uses the base encoder's vectors, or,
    with ``reranker=(encoder, embeddings)``, another encoder's (the teacher's): the query is then
    encoded by both and the shortlist re-scored by the teacher.
    """

    def __init__(self, encoder: Encoder, gallery: Gallery, hashers: dict[int, Hasher],
                 embeddings: GalleryEmbeddings | None = None,
                 reranker: tuple[Encoder, GalleryEmbeddings] | None = None, name: str | None = None,
                 scoring: str = "asymmetric"):
        if not hashers:
            raise ValueError("a hashed matcher needs at least one hasher")
        if scoring not in SCORINGS:
            raise ValueError(f"unknown scoring {scoring!r}; expected one of {SCORINGS}")
        self.encoder, self.gallery, self.hashers, self.scoring = encoder, gallery, dict(hashers), scoring
        self.embeddings = embeddings or embed_gallery(encoder, gallery)
        self.rerank_encoder, self.rerank_embeddings = reranker or (None, self.embeddings)
        if self.rerank_embeddings.names != self.embeddings.names:
            raise ValueError("the re-ranker's gallery embeddings are not row-aligned with the base encoder's")
        self.name = name or f"{encoder.name}+hash"
        self._indexes: dict[tuple[int, str], CandidateStage] = {}
        if SearchOptions.bits in self.hashers:
            # Built now, not on the first query: opening (and the app's warm-up) pays for it, and the
            # first query's "candidates" time is the search, not the gallery's hashing.
            self.index(SearchOptions.bits)

    def index(self, bits: int, target: str = "image") -> CandidateStage:
        """The code index of the gallery images (or captions) at ``bits``, built on first use."""
        key = (bits, target)
        if key not in self._indexes:
            vectors, modality = (self.embeddings.images, "image") if target == "image" else (self.embeddings.captions, "text")
            stage = make_stage(self.scoring, self.hasher(bits))
            stage.add(vectors, modality)
            self._indexes[key] = stage
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
        index = self.index(options.bits, target)  # a one-off build for other code lengths: not a search stage
        # Hashing the query is part of producing candidates: the three stages the page shows.
        with clock.stage("candidates"):
            code_scores, cand = index.search(base_query[None], max(options.candidates, k), modality)
        with clock.stage("rerank"):
            if options.rerank:
                vectors = self.rerank_embeddings.images if target == "image" else self.rerank_embeddings.captions
                scores, ids = rerank(rerank_query[None], cand, vectors, k)
                scores, ids = scores[0], ids[0]
            else:
                scores, ids = code_scores[0, :k], cand[0, :k]
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
        _, cand = self.index(options.bits, "image").search(base, cap, "text")
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

