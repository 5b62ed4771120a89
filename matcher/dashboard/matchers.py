"""The matchers of a preset over one gallery, side by side (what the dashboard's search tab shows).

- ``MatcherSet`` opens each role's matcher lazily (once, thread-safe) over one gallery and answers
  text, image and "more like this" queries with one ``Column`` per role: the top-K with scores,
  ground-truth marks (when the query is one of the gallery's captions) and per-stage timings.
  An option only one matcher refuses (a code length its hash heads lack) is that column's message;
  the other columns still answer. ``code_lengths()`` says which code lengths the hashed heads have.
- Text queries that arrive together are encoded in one batch per encoder
  (``matcher.dashboard.batching``), so concurrent visitors share forward passes.

Nothing here knows about Gradio; ``python -m matcher compare`` prints the same columns.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from matcher.dashboard.batching import share_text_batches
from matcher.data.gallery import Gallery
from matcher.presets import ordered_roles
from matcher.registry import open_matcher
from matcher.search.protocol import Matcher, QueryError, SearchOptions, SearchResult, check_k, check_text_query

WARM_UP_QUERY = "a dog runs on the grass"


def normalise_caption(text: str) -> str:
    """Lower case, single spaces, no trailing full stop: how queries are matched to captions."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return re.sub(r"\s*\.$", "", text)


@dataclass
class ColumnHit:
    rank: int
    name: str
    path: Path
    score: float
    match: bool = False       # a ground-truth image of the query caption


@dataclass
class Column:
    role: str
    spec: str
    hits: list[ColumnHit] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def total_ms(self) -> float:
        return sum(self.timings_ms.values())

    def timings_text(self) -> str:
        if not self.timings_ms:
            return ""
        parts = [f"{stage} {ms:.1f} ms" for stage, ms in self.timings_ms.items()]
        return " · ".join(parts) + f" · total {self.total_ms:.1f} ms"


class RoleUnavailable(RuntimeError):
    """A role's matcher could not be opened; the message says why."""


class MatcherSet:
    """The matchers of one preset over one gallery, opened lazily and shared between threads."""

    LOADING_GRACE_S = 15.0   # how long a query waits for a matcher another thread is opening

    def __init__(self, roles: dict[str, str], gallery: Gallery, opener: Callable[[str, Gallery], Matcher] | None = None,
                 batch_texts: bool = True):
        self.roles = {r: roles[r] for r in ordered_roles(roles)}
        self.gallery = gallery
        self._opener = opener or open_matcher
        self._batch_texts = batch_texts
        self._matchers: dict[str, Matcher] = {}
        self._errors: dict[str, str] = {}
        self._locks = {r: threading.Lock() for r in self.roles}
        self._opening_since: dict[str, float] = {}
        self._truth: dict[str, set[str]] | None = None

    def matcher(self, role: str, wait: bool = True) -> Matcher:
        """The role's matcher, opened on first use. ``wait=False`` (what queries use): while another
        thread is opening it (the start-up warm-up encoding a gallery can take minutes, an hour for a
        large hub model on a CPU Space), wait at most ``LOADING_GRACE_S`` and then raise
        ``RoleUnavailable`` ("still loading") instead of freezing the page; a short opening is simply
        waited for."""
        if role not in self.roles:
            raise RoleUnavailable(f"no {role} matcher in this preset")
        if role in self._matchers:
            return self._matchers[role]
        if not self._locks[role].acquire(timeout=-1 if wait else self.LOADING_GRACE_S):
            waited = time.monotonic() - self._opening_since.get(role, time.monotonic())
            raise RoleUnavailable(f"the {role} matcher is still loading (its model and the gallery's embeddings, "
                                  f"{waited:.0f} s so far); it answers as soon as it is ready")
        try:
            self._opening_since.setdefault(role, time.monotonic())
            if role not in self._matchers and role not in self._errors:
                try:
                    matcher = self._opener(self.roles[role], self.gallery)
                    if self._batch_texts:
                        share_text_batches(matcher)
                    self._matchers[role] = matcher
                except Exception as exc:  # a broken role must not take the other columns down
                    self._errors[role] = f"{type(exc).__name__}: {exc}"
            if role in self._errors:
                raise RoleUnavailable(f"the {role} matcher could not be loaded ({self._errors[role]})")
            return self._matchers[role]
        finally:
            self._locks[role].release()

    def warm(self) -> dict[str, str | None]:
        """Open every matcher now (model + gallery embeddings) and answer one throw-away query with
        each; returns role -> error or None.

        Why the query: a model's first forward pass (thread pools, allocator, tokenizer state) is far
        slower than the next ones, so the first user query showed that start-up in its per-stage
        timings instead of each matcher's steady speed, which is what the columns compare.
        """
        status = {}
        for role in self.roles:
            try:
                self.matcher(role).search_text(WARM_UP_QUERY)
                status[role] = None
            except RoleUnavailable as exc:
                status[role] = str(exc)
        return status

    def code_lengths(self) -> list[int]:
        """Code lengths (bits) the hashed matchers of this set can search with (opens them); [] if none."""
        bits: set[int] = set()
        for role in self.roles:
            try:
                hashers = getattr(self.matcher(role), "hashers", None)
            except RoleUnavailable:
                continue
            if isinstance(hashers, dict):
                bits.update(int(b) for b in hashers)
        return sorted(bits)

    # ground truth -------------------------------------------------------------------------
    def ground_truth(self, text: str) -> set[str]:
        """Images one of whose captions equals the query (after ``normalise_caption``)."""
        if self._truth is None:
            truth: dict[str, set[str]] = {}
            for name in self.gallery.names:
                for caption in self.gallery.captions.get(name, []):
                    truth.setdefault(normalise_caption(caption), set()).add(name)
            self._truth = truth
        return set(self._truth.get(normalise_caption(text or ""), set()))

    # queries ---------------------------------------------------------------------------------
    def _run(self, call: Callable[[Matcher], SearchResult], truth: set[str]) -> list[Column]:
        """One column per role. A query every matcher refuses raises ``QueryError`` once; one that only
        some refuse (e.g. a code length only the hashed matcher reads) is a message in those columns."""
        columns, refused = [], []
        for role, spec in self.roles.items():
            column = Column(role, spec)
            try:
                result = call(self.matcher(role, wait=False))
            except QueryError as exc:
                column.error = str(exc)
                refused.append(exc)
            except RoleUnavailable as exc:
                column.error = str(exc)
            else:
                column.timings_ms = dict(result.timings_ms)
                column.hits = [ColumnHit(rank, h.name, self.gallery.path(h.name), float(h.score), h.name in truth)
                               for rank, h in enumerate(result.hits, 1)]
            columns.append(column)
        if refused and len(refused) == len(columns):
            raise refused[0]
        return columns

    def search_text(self, text: str, options: SearchOptions = SearchOptions()) -> list[Column]:
        text = check_text_query(text)  # one clear message instead of one per column
        check_k(options.k)
        return self._run(lambda m: m.search_text(text, options), self.ground_truth(text))

    def search_image(self, image: Image.Image, options: SearchOptions = SearchOptions()) -> list[Column]:
        check_k(options.k)
        return self._run(lambda m: m.search_image(image, options), set())

    def more_like(self, name: str, options: SearchOptions = SearchOptions()) -> list[Column]:
        check_k(options.k)
        if name not in set(self.gallery.names):
            raise QueryError(f"{name!r} is not in this gallery.")
        return self._run(lambda m: m.more_like(name, options), set())


def example_queries(gallery: Gallery, n: int = 8, split: str | None = "test") -> list[str]:
    """Real captions spread evenly over the gallery (first caption of every (len/n)-th image)."""
    names = [x for x in gallery.names if gallery.captions.get(x) and (split is None or gallery.splits.get(x, split) == split)]
    if not names:
        return []
    step = max(1, len(names) // n)
    return [gallery.captions[names[i]][0] for i in range(0, len(names), step)][:n]
