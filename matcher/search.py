"""A matcher serving one gallery: encoder + cached embeddings + index, with per-stage timings.

text->image, image->image (an uploaded image or "more like this" on a gallery item) and
image->text over the gallery's captions. Every result carries how long each stage took.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from matcher.embed import GalleryEmbeddings, embed_gallery
from matcher.encoders import Encoder
from matcher.gallery import Gallery
from matcher.index import FloatIndex

MAX_QUERY_CHARS = 500
MAX_K = 100


@dataclass(frozen=True)
class SearchOptions:
    """One call shape for every matcher. Float matchers use ``k`` only."""

    k: int = 10
    bits: int = 64          # hashed matchers: code length
    candidates: int = 100   # hashed matchers: Hamming shortlist size C
    rerank: bool = True     # hashed matchers: re-rank the shortlist by float similarity


class QueryError(ValueError):
    """A query the matcher refuses; the message is meant for the user."""


def check_text_query(text: str | None) -> str:
    text = (text or "").strip()
    if not text:
        raise QueryError("Type a few words to search for, e.g. 'a dog running on the beach'.")
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"That query is {len(text)} characters long; please keep it under {MAX_QUERY_CHARS}.")
    return text


def check_k(k: int) -> int:
    if not 1 <= int(k) <= MAX_K:
        raise QueryError(f"K must be between 1 and {MAX_K} (got {k}).")
    return int(k)


@dataclass
class Hit:
    row: int          # row in the gallery embeddings (image) or caption index (text)
    name: str         # image file name, or the caption text
    score: float


@dataclass
class SearchResult:
    hits: list[Hit]
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def total_ms(self) -> float:
        return sum(self.timings_ms.values())


class _Stopwatch:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def lap(self, stage: str, started: float) -> float:
        now = time.perf_counter()
        self.timings[stage] = round((now - started) * 1000, 3)
        return now


class Matcher:
    """Exact float search of one encoder over one gallery."""

    def __init__(self, encoder: Encoder, gallery: Gallery, embeddings: GalleryEmbeddings | None = None):
        self.encoder, self.gallery = encoder, gallery
        self.embeddings = embeddings or embed_gallery(encoder, gallery)
        self.image_index = FloatIndex(self.embeddings.images.shape[1])
        self.image_index.add(self.embeddings.images)
        self.caption_index = FloatIndex(self.embeddings.images.shape[1])
        if len(self.embeddings.caption_texts):
            self.caption_index.add(self.embeddings.captions)

    @property
    def name(self) -> str:
        return self.encoder.name

    def _image_hits(self, query: np.ndarray, k: int, clock: _Stopwatch) -> list[Hit]:
        started = time.perf_counter()
        scores, ids = self.image_index.search(query[None], k)
        clock.lap("search", started)
        return [Hit(int(i), self.embeddings.names[i], float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0]

    def search_text(self, text: str, options: SearchOptions = SearchOptions()) -> SearchResult:
        text, k, clock = check_text_query(text), check_k(options.k), _Stopwatch()
        started = time.perf_counter()
        query = self.encoder.encode_texts([text])[0]
        clock.lap("encode", started)
        return SearchResult(self._image_hits(query, k, clock), clock.timings)

    def search_image(self, image: Image.Image, options: SearchOptions = SearchOptions()) -> SearchResult:
        k, clock = check_k(options.k), _Stopwatch()
        started = time.perf_counter()
        query = self.encoder.encode_images([image])[0]
        clock.lap("encode", started)
        return SearchResult(self._image_hits(query, k, clock), clock.timings)

    def more_like(self, name: str, options: SearchOptions = SearchOptions()) -> SearchResult:
        """Neighbours of a gallery image, from its stored embedding (nothing re-encoded)."""
        k, clock = check_k(options.k), _Stopwatch()
        try:
            row = self.embeddings.names.index(name)
        except ValueError:
            raise QueryError(f"{name!r} is not in this gallery.") from None
        clock.timings["encode"] = 0.0
        return SearchResult(self._image_hits(self.embeddings.images[row], k, clock), clock.timings)

    def captions_for_image(self, image: Image.Image, options: SearchOptions = SearchOptions(k=5)) -> SearchResult:
        """image->text over the gallery's captions."""
        if len(self.caption_index) == 0:
            raise QueryError("This gallery has no captions to search.")
        k, clock = check_k(options.k), _Stopwatch()
        started = time.perf_counter()
        query = self.encoder.encode_images([image])[0]
        started = clock.lap("encode", started)
        scores, ids = self.caption_index.search(query[None], k)
        clock.lap("search", started)
        hits = [Hit(int(i), self.embeddings.caption_texts[i], float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0]
        return SearchResult(hits, clock.timings)


def open_matcher(spec: str, gallery: Gallery):
    """The matcher a spec names, serving ``gallery``. Every matcher takes ``SearchOptions``.

    Float specs (any ``load_encoder`` spec) give an exact ``Matcher``; a registered config of type
    ``"hashed"`` gives a two-stage ``HashedMatcher`` (``matcher.hashing``), one of type
    ``"fine-rerank"`` the teacher's shortlist re-scored region x word (``matcher.finegrained``).
    """
    from matcher.models import cached_encoder, registered_models

    config = registered_models().get(spec)
    if config and config.get("type") == "hashed":
        from matcher.hashing.search import open_hashed_matcher

        return open_hashed_matcher(spec, config, gallery)
    if config and config.get("type") == "fine-rerank":
        from matcher.finegrained.search import open_fine_matcher

        return open_fine_matcher(spec, config, gallery)
    return Matcher(cached_encoder(spec), gallery)
