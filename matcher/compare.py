"""Run one query on every matcher of a preset, side by side (what the dashboard's search tab shows).

- ``resolve_preset`` picks the preset that can actually run here: a preset that needs the
  Hugging Face hub falls back to ``offline`` when the hub cannot be reached, and roles whose
  weights are missing are dropped, each with a note meant for the user.
- ``MatcherSet`` opens each role's matcher lazily (once, thread-safe) over one gallery and answers
  text, image and "more like this" queries with one ``Column`` per role: the top-K with scores,
  ground-truth marks (when the query is one of the gallery's captions) and per-stage timings.

Nothing here knows about Gradio; ``python -m matcher compare`` prints the same columns.
"""
from __future__ import annotations

import os
import re
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from matcher.gallery import Gallery
from matcher.search import QueryError, SearchOptions, SearchResult

ROLE_ORDER = ("teacher", "student", "hashed")
WARM_UP_QUERY = "a dog runs on the grass"
REFERENCE_ROLE = "teacher"


def ordered_roles(roles) -> list[str]:
    """teacher | student | hashed first, then any other role in its given order."""
    roles = list(roles)
    return [r for r in ROLE_ORDER if r in roles] + [r for r in roles if r not in ROLE_ORDER]


def hub_reachable(timeout: float = 1.5) -> bool:
    """Whether the Hugging Face hub can be reached (False at once when offline mode is set)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MATCHER_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def needs_hub(spec: str) -> bool:
    """An ``open_clip:MODEL@TAG`` spec with a hub tag (not a local file) downloads weights."""
    if not spec.startswith("open_clip:"):
        return False
    _, _, tag = spec[len("open_clip:"):].partition("@")
    return bool(tag) and not Path(tag).suffix


def missing_weights(spec: str) -> str | None:
    """Why a spec cannot load from local files (None if it looks loadable or is not ours to judge)."""
    from matcher.models import registered_models
    from matcher.paths import REPO_ROOT

    config = registered_models().get(spec)
    if config and config.get("checkpoint") and not (REPO_ROOT / config["checkpoint"]).exists():
        return f"{config['checkpoint']} is not in this checkout yet"
    if spec.startswith("open_clip:"):
        _, _, tag = spec[len("open_clip:"):].partition("@")
        if tag and Path(tag).suffix and not Path(tag).exists():
            return f"{tag} not found"
        return None
    if spec.endswith(".pt") and not Path(spec).exists():
        return f"{spec} not found"
    return None


@dataclass
class ActivePreset:
    requested: str
    name: str                              # the preset actually in use
    roles: dict[str, str]                  # role -> spec, in display order, only usable roles
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for the page: which preset is active and why."""
        roles = ", ".join(f"{r} = `{s}`" for r, s in self.roles.items()) or "no matchers"
        text = f"Active preset: **{self.name}** ({roles})."
        if self.notes:
            text += " " + " ".join(self.notes)
        return text


def resolve_preset(requested: str, presets: dict[str, dict[str, str]] | None = None, fallback: str = "offline",
                   hub_ok: Callable[[], bool] = hub_reachable) -> ActivePreset:
    """The preset to run: ``requested`` if it can run here, else ``fallback``; unusable roles dropped."""
    from matcher.models import PRESETS

    presets = PRESETS if presets is None else presets
    if requested not in presets:
        raise ValueError(f"unknown preset {requested!r}; choose one of: {', '.join(presets)}")
    notes: list[str] = []
    name = requested
    if any(needs_hub(s) for s in presets[requested].values()) and not hub_ok():
        if requested == fallback or fallback not in presets:
            raise ValueError(f"preset {requested!r} needs the Hugging Face hub, which is not reachable")
        notes.append(f"Preset '{requested}' needs the Hugging Face hub, which is not reachable here, "
                     f"so the '{fallback}' preset is used.")
        name = fallback
    roles: dict[str, str] = {}
    for role in ordered_roles(presets[name]):
        spec = presets[name][role]
        reason = missing_weights(spec)
        if reason:
            notes.append(f"The {role} matcher is not available ({reason}).")
        else:
            roles[role] = spec
    return ActivePreset(requested, name, roles, notes)


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

    def __init__(self, roles: dict[str, str], gallery: Gallery, opener: Callable | None = None):
        from matcher.search import open_matcher

        self.roles = {r: roles[r] for r in ordered_roles(roles)}
        self.gallery = gallery
        self._opener = opener or open_matcher
        self._matchers: dict[str, object] = {}
        self._errors: dict[str, str] = {}
        self._locks = {r: threading.Lock() for r in self.roles}
        self._truth: dict[str, set[str]] | None = None

    def matcher(self, role: str):
        if role not in self.roles:
            raise RoleUnavailable(f"no {role} matcher in this preset")
        if role in self._matchers:
            return self._matchers[role]
        with self._locks[role]:
            if role not in self._matchers and role not in self._errors:
                try:
                    self._matchers[role] = self._opener(self.roles[role], self.gallery)
                except Exception as exc:  # a broken role must not take the other columns down
                    self._errors[role] = f"{type(exc).__name__}: {exc}"
            if role in self._errors:
                raise RoleUnavailable(f"the {role} matcher could not be loaded ({self._errors[role]})")
            return self._matchers[role]

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
    def _run(self, call: Callable[[object], SearchResult], truth: set[str]) -> list[Column]:
        columns = []
        for role, spec in self.roles.items():
            column = Column(role, spec)
            try:
                result = call(self.matcher(role))
            except QueryError:
                raise
            except RoleUnavailable as exc:
                column.error = str(exc)
            else:
                column.timings_ms = dict(result.timings_ms)
                column.hits = [ColumnHit(rank, h.name, self.gallery.path(h.name), float(h.score), h.name in truth)
                               for rank, h in enumerate(result.hits, 1)]
            columns.append(column)
        return columns

    def search_text(self, text: str, options: SearchOptions = SearchOptions()) -> list[Column]:
        from matcher.search import check_text_query

        text = check_text_query(text)  # one clear message instead of one per column
        return self._run(lambda m: m.search_text(text, options), self.ground_truth(text))

    def search_image(self, image: Image.Image, options: SearchOptions = SearchOptions()) -> list[Column]:
        return self._run(lambda m: m.search_image(image, options), set())

    def more_like(self, name: str, options: SearchOptions = SearchOptions()) -> list[Column]:
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
