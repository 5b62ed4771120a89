"""What every matcher answers, whatever its tier: the one call shape the page, the CLI and the
evaluation use.

A matcher serves one gallery. Exact float search (``matcher.search.exact``), the two-stage hashed
search (``matcher.search.hashed``) and the fine-grained re-rank (``matcher.search.fine``) all
implement ``Matcher``, so callers never ask which kind they hold: they call the protocol's methods
and read ``SearchResult.timings_ms`` (per stage, so the page can show where the time goes).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Iterator, Protocol, runtime_checkable

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # annotations only: the protocol does not depend on the data stage at run time
    from matcher.data.embed import GalleryEmbeddings
    from matcher.data.gallery import Gallery

MAX_QUERY_CHARS = 500
MAX_K = 100
DEPTH = 100   # how deep ``rank_by_search`` looks; ranks at or beyond it are censored


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


@dataclass(frozen=True)
class SearchOptions:
    """One call shape for every matcher; each tier reads the fields it has a use for."""

    k: int = 10
    bits: int = 64          # hashed: code length
    candidates: int = 100   # hashed: Hamming shortlist size C
    rerank: bool = True     # hashed: re-rank the shortlist by float similarity


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


class Stopwatch:
    """Per-stage wall time in ms, in the order the stages ran: ``with clock.stage("encode"): ...``.

    A stage timed twice adds up (a query encoded by two encoders is one ``encode`` stage).
    """

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            spent = (time.perf_counter() - started) * 1000
            self.timings[name] = round(self.timings.get(name, 0.0) + spent, 3)

    def result(self, hits: list[Hit]) -> SearchResult:
        return SearchResult(hits, dict(self.timings))


@dataclass
class Ranking:
    """One matcher's answers for a batch of caption queries (the error analysis reads these)."""

    topk: list[list[str]]     # per caption: top-K image names, best first
    gt_rank: np.ndarray       # per caption: 0-based rank of the right image (censored at ``cap``)
    cap: int                  # ranks >= cap mean "not found within cap"


@runtime_checkable
class Matcher(Protocol):
    """A searchable gallery. Every tier implements all of it; queries it refuses raise ``QueryError``."""

    name: str

    @property
    def gallery(self) -> Gallery: ...

    @property
    def embeddings(self) -> GalleryEmbeddings:
        """The float embeddings of the gallery that queries are encoded against (cached on disk)."""
        ...

    def search_text(self, text: str, options: SearchOptions = SearchOptions()) -> SearchResult: ...

    def search_image(self, image: Image.Image, options: SearchOptions = SearchOptions()) -> SearchResult: ...

    def more_like(self, name: str, options: SearchOptions = SearchOptions()) -> SearchResult:
        """Neighbours of a gallery image, from its stored embedding (nothing re-encoded)."""
        ...

    def captions_for_image(self, image: Image.Image, options: SearchOptions = SearchOptions(k=5)) -> SearchResult:
        """image->text over the gallery's captions."""
        ...

    def rank_captions(self, texts: list[str], owners: list[str], k: int, options: SearchOptions,
                      progress: Callable[[float], None] | None = None) -> Ranking:
        """Batch text->image: each text's top-k and the rank of its owner image (error analysis)."""
        ...


def row_of(names: list[str], name: str) -> int:
    """The gallery row of an image name, or a ``QueryError`` the user can read."""
    try:
        return names.index(name)
    except ValueError:
        raise QueryError(f"{name!r} is not in this gallery.") from None


def rank_by_search(matcher: Matcher, texts: list[str], owners: list[str], k: int, options: SearchOptions,
                   depth: int = DEPTH, progress: Callable[[float], None] | None = None) -> Ranking:
    """``rank_captions`` through ``search_text`` one query at a time, ranks censored at ``depth``.

    Why it exists: a tier whose score is not one matrix product (the fine re-rank) has no batch
    shortcut; this is its honest, slower answer.
    """
    from tqdm import tqdm

    options = replace(options, k=min(MAX_K, max(k, depth)))
    topk, ranks = [], []
    queries = tqdm(list(zip(texts, owners)), desc=f"{matcher.name}: caption queries", unit="query", mininterval=1.0)
    for i, (text, owner) in enumerate(queries):
        names = [h.name for h in matcher.search_text(text, options).hits]
        topk.append(names[:k])
        ranks.append(names.index(owner) if owner in names else options.k)
        if progress and i % 50 == 0:
            progress(i / len(texts))
    return Ranking(topk, np.asarray(ranks), cap=options.k)
