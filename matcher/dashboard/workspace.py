"""What one running dashboard holds, shared by all its visitors: resolved presets, opened galleries,
matcher sets per (preset, gallery), results tables and error analyses, each computed once.

Visitors only carry a (preset, gallery folder) pair; everything heavy lives here and is built
lazily, so the page starts at once and the first query pays for loading (or a warm-up thread does).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from matcher.dashboard.matchers import MatcherSet, RoleUnavailable
from matcher.data.gallery import Gallery, open_gallery
from matcher.paths import DEFAULT_GALLERY, RESULTS_DIR, cache_dir
from matcher.presets import DEFAULT_PRESET, PRESETS, ActivePreset, hub_reachable, resolve_preset
from matcher.search.protocol import SearchOptions

MAX_OPEN = 4   # matcher sets kept (one per preset x gallery); older ones are dropped


class Workspace:
    def __init__(self, presets: dict[str, dict[str, str]] | None = None, default_preset: str | None = None,
                 gallery: str | Path | None = None, split: str | None = "test", results_dir: str | Path | None = None,
                 live_results_dir: str | Path | None = None, hub_ok: Callable[[], bool] = hub_reachable,
                 opener: Callable | None = None):
        self.presets = dict(PRESETS if presets is None else presets)
        self.default_preset = default_preset or (DEFAULT_PRESET if DEFAULT_PRESET in self.presets else next(iter(self.presets)))
        self.default_gallery = str(Path(gallery or DEFAULT_GALLERY).resolve())
        self.split = split
        self.results_dir = Path(results_dir or RESULTS_DIR)
        self._live_results_dir = Path(live_results_dir) if live_results_dir else None
        self._hub_ok = hub_ok
        self._hub: bool | None = None
        self._opener = opener
        self._lock = threading.RLock()
        self._active: dict[str, ActivePreset] = {}
        self._galleries: dict[str, Gallery] = {}
        self._sets: OrderedDict[tuple[str, str], MatcherSet] = OrderedDict()
        self._analyses: OrderedDict[tuple, object] = OrderedDict()

    @property
    def live_results_dir(self) -> Path:
        """Where re-measured results go (``<cache>/results``); resolved on use, so that a cache folder
        that cannot be created does not stop the page from starting."""
        if self._live_results_dir is None:
            try:
                root = cache_dir()
            except OSError as exc:
                raise ValueError(f"the cache folder cannot be written ({exc.strerror or exc})") from None
            self._live_results_dir = root / "results"
        return self._live_results_dir

    # presets and galleries ---------------------------------------------------------------------
    def hub_ok(self) -> bool:
        if self._hub is None:
            self._hub = bool(self._hub_ok())
        return self._hub

    def active(self, preset: str | None = None) -> ActivePreset:
        preset = preset or self.default_preset
        with self._lock:
            if preset not in self._active:
                self._active[preset] = resolve_preset(preset, self.presets, hub_ok=self.hub_ok)
            return self._active[preset]

    @property
    def max_roles(self) -> int:
        return max([3] + [len(r) for r in self.presets.values()])

    def gallery(self, root: str | None = None) -> Gallery:
        """The gallery at ``root`` (default: the bundled one, its test split when it has splits)."""
        root = str(Path(root or self.default_gallery).resolve())
        with self._lock:
            if root not in self._galleries:
                gallery = open_gallery(root)
                if self.split and gallery.splits and root == self.default_gallery:
                    gallery = gallery.select(self.split)
                self._galleries[root] = gallery
            return self._galleries[root]

    def matchers(self, preset: str | None = None, root: str | None = None) -> MatcherSet:
        active = self.active(preset)
        key = (active.name, str(Path(root or self.default_gallery).resolve()))
        with self._lock:
            if key in self._sets:
                self._sets.move_to_end(key)
                return self._sets[key]
            mset = MatcherSet(active.roles, self.gallery(key[1]), self._opener)
            self._sets[key] = mset
            while len(self._sets) > MAX_OPEN:
                self._sets.popitem(last=False)
            return mset

    def open_galleries(self) -> list[str]:
        """Gallery folders some open matcher set serves (a disk budget must not evict them)."""
        with self._lock:
            return sorted({root for _, root in self._sets})

    def code_lengths(self, preset: str | None = None, root: str | None = None) -> list[int]:
        """Code lengths the active preset's hashed matchers offer (opens them); [] without one."""
        return self.matchers(preset, root).code_lengths()

    def warm(self, preset: str | None = None) -> dict[str, str | None]:
        """Load the default matchers and gallery embeddings (run in a thread at start-up)."""
        started = time.perf_counter()
        status = self.matchers(preset).warm()
        status["seconds"] = round(time.perf_counter() - started, 1)  # type: ignore[assignment]
        return status

    # results ------------------------------------------------------------------------------------
    def results(self):
        """Shipped results, with any file re-measured from the page taking precedence."""
        from matcher.eval.results import RESULT_FILES, load_results

        shipped = load_results(self.results_dir)
        try:
            live_dir = self.live_results_dir
        except ValueError:
            return shipped
        live_files = [f for f in RESULT_FILES.values() if (live_dir / f).exists()]
        if not live_files:
            return shipped
        live = load_results(self.live_results_dir)
        for kind, filename in RESULT_FILES.items():
            if filename in live_files and kind in live.tables:
                shipped.tables[kind] = live.tables[kind]
                shipped.notes = [n for n in shipped.notes if not n.startswith(filename)]
                shipped.notes.append(f"{filename}: re-measured on this page ({self.live_results_dir})")
        return shipped

    def rerun_eval(self, preset: str | None = None, root: str | None = None, measure: Callable | None = None) -> Path:
        """Re-measure the active preset on the gallery with the same report builder as
        ``python -m matcher eval``; writes ``eval-test.json`` into the live results folder (the
        shipped file is left alone)."""
        from matcher.atomic import write_json
        from matcher.eval.report import build_report

        active, gallery = self.active(preset), self.gallery(root)
        kwargs = {"measure": measure} if measure else {}
        report = build_report(active.roles, gallery, split=self.split, preset=active.name, **kwargs)
        path = self.live_results_dir / "eval-test.json"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, report)
        except OSError as exc:
            raise ValueError(f"measured, but the results cannot be saved ({exc.strerror or exc})") from None
        return path

    # error analysis -----------------------------------------------------------------------------
    def _analysis_key(self, mset: MatcherSet, k: int, options: SearchOptions, limit: int | None) -> tuple:
        return (tuple(mset.roles.items()), str(mset.gallery.root), len(mset.gallery), k, options.bits, options.candidates,
                options.rerank, limit)

    def cached_analysis(self, preset: str | None, root: str | None, k: int, options: SearchOptions,
                        limit: int | None = None):
        """The analysis for these settings if it was computed and is still kept, else None (never computes)."""
        key = self._analysis_key(self.matchers(preset, root), k, options, limit)
        with self._lock:
            return self._analyses.get(key)

    def analysis(self, preset: str | None, root: str | None, k: int, options: SearchOptions, limit: int | None = None,
                 progress: Callable | None = None):
        from matcher.eval.analysis import analyse

        mset = self.matchers(preset, root)
        key = self._analysis_key(mset, k, options, limit)
        with self._lock:
            if key in self._analyses:
                return self._analyses[key]
        matchers = {}
        for role in mset.roles:
            try:
                matchers[role] = mset.matcher(role)
            except RoleUnavailable:
                continue  # shown as an error in the search tab; analysed without it
        if not matchers:
            raise ValueError("no matcher of this preset could be loaded")
        result = analyse(matchers, mset.gallery, k=k, options=options, limit=limit, progress=progress)
        with self._lock:
            self._analyses[key] = result
            while len(self._analyses) > 8:
                self._analyses.popitem(last=False)
        return result
