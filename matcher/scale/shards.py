"""A gallery split into shards, each an index directory (codes + memory-mapped re-rank vectors).

``Shard`` is what one worker owns; it answers in *global* row ids (its rows are numbered from
``offset``). The search is the single-process two-stage search, distributed:

1. every shard returns its top-C by code score (``Shard.candidates``);
2. the driver keeps the global top-C of those (``merge_topk``): exactly the top-C one index over all
   items would have returned, since a shard's share of the global top-C is within its own top-C;
3. every shard re-ranks the ids of that global top-C that are its own, with its own vectors, and
   returns its top-K (``Shard.rerank``); the driver merges those into the final top-K.

Only ids and scores travel (C x 12 bytes per shard and query); vectors never leave their shard.
``rounds=1`` skips step 2 (each shard re-ranks its own top-C at once: one round trip, recall at
least the single-process one). The same ``Shard`` runs in-process (``LocalShards``) or as a Ray
actor (``matcher.scale.engine``), so the two are the same code.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from matcher.search.index import CandidateStage
from matcher.search.store import IndexStore, build_index


class Shard:
    """One index directory serving rows ``offset .. offset + count - 1`` of the whole gallery."""

    def __init__(self, path: str | Path, offset: int, threads: int = 1):
        import faiss

        faiss.omp_set_num_threads(threads)
        self.store = IndexStore.open(path)
        self.offset, self.count = int(offset), self.store.count

    def info(self) -> dict:
        return {"path": str(self.store.path), "offset": self.offset, "count": self.count, "pid": os.getpid(),
                "host": socket.gethostname(), "open_ms": round(self.store.open_s * 1000, 1)}

    def _global(self, ids: np.ndarray) -> np.ndarray:
        return np.where(ids >= 0, ids + self.offset, -1)

    def candidates(self, queries: np.ndarray, c: int, modality: str = "text") -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self.store.index.candidates(queries, c, modality)
        return scores, self._global(ids)

    def rerank(self, queries: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of the global ``ids`` [Q, C] that are this shard's (others ignored); top-k."""
        local = ids - self.offset
        local = np.where((ids >= 0) & (local >= 0) & (local < self.count), local, -1)
        scores, got = self.store.index.rerank(queries, local, k)
        return scores, self._global(np.where(np.isfinite(scores), got, -1))

    def search(self, queries: np.ndarray, k: int, c: int, modality: str = "text") -> tuple[np.ndarray, np.ndarray]:
        """One round: this shard's own top-C re-ranked to its top-k."""
        scores, ids = self.store.index.search(queries, k, c, modality)
        return scores, self._global(ids)


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (score, id) per query over the shards' answers; ties go to the lower id."""
    scores = np.concatenate([np.asarray(s, np.float32) for s, _ in parts], axis=1)
    ids = np.concatenate([np.asarray(i, np.int64) for _, i in parts], axis=1)
    scores = np.where(ids >= 0, scores, -np.inf)
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    out_scores, out_ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    return out_scores, np.where(np.isfinite(out_scores), out_ids, -1)


def sharded_search(call: Callable[[str, tuple], list], queries: np.ndarray, k: int, c: int,
                   modality: str = "text", rounds: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The fan-out/merge of the module docstring. ``call(method, args)`` runs ``Shard.method(*args)``
    on every shard and returns their answers in shard order (in-process or on Ray)."""
    queries = np.atleast_2d(np.asarray(queries, np.float32))
    if rounds == 1:
        return merge_topk(call("search", (queries, k, c, modality)), k)
    if rounds != 2:
        raise ValueError(f"rounds must be 1 or 2 (got {rounds})")
    _, top_c = merge_topk(call("candidates", (queries, max(c, k), modality)), max(c, k))
    return merge_topk(call("rerank", (queries, top_c, k)), k)


class LocalShards:
    """Shards in this process (the reference the Ray engine is tested against, and a laptop's
    way to serve a gallery written as shards)."""

    def __init__(self, shards: Sequence[tuple[str | Path, int]]):
        self.shards = [Shard(path, offset) for path, offset in shards]

    def _call(self, method: str, args: tuple) -> list:
        return [getattr(s, method)(*args) for s in self.shards]

    def search(self, queries, k: int, c: int, modality: str = "text", rounds: int = 2):
        return sharded_search(self._call, queries, k, c, modality, rounds)


def split_rows(n: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous (start, end) row ranges of near-equal size."""
    if not 1 <= shards <= max(1, n):
        raise ValueError(f"cannot split {n} items into {shards} shards")
    bounds = np.linspace(0, n, shards + 1).round().astype(int)
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def write_shards(root: str | Path, make_stage: Callable[[], CandidateStage], vectors: np.ndarray,
                 names: Sequence[str] | None, shards: int, meta: dict | None = None, batch: int = 65_536,
                 train_size: int = 65_536, overwrite: bool = True) -> list[tuple[Path, int]]:
    """Write ``shards`` index directories ``root/shard-000 ...`` over contiguous row ranges of
    ``vectors`` (an array or memmap: read batch by batch). Returns [(path, offset)].

    A stage that needs training (a quantiser, inverted lists) is trained once, on rows spread over
    the whole gallery, and every shard starts from a copy of it: the shards then hold exactly the
    codes and lists one index over everything would (``make_stage`` may also return such a trained
    copy itself, e.g. ``stage.empty_copy``).
    """
    root = Path(root)
    template = make_stage()
    if template.needs_training and not _trained(template):
        rows = np.linspace(0, len(vectors) - 1, min(train_size, len(vectors))).astype(int)
        template.train(np.asarray(vectors[rows], np.float32))
    out = []
    for i, (start, end) in enumerate(split_rows(len(vectors), shards)):
        def batches(start=start, end=end) -> Iterable:
            for s in range(start, end, batch):
                e = min(end, s + batch)
                yield np.asarray(vectors[s:e], np.float32), (names[s:e] if names is not None else [str(r) for r in range(s, e)])
        path = root / f"shard-{i:03d}"
        build_index(path, template.empty_copy(), batches(), vectors.shape[1],
                    {**(meta or {}), "shard": {"index": i, "of": shards, "offset": start}}, overwrite=overwrite,
                    train_size=train_size)
        out.append((path, start))
    return out


def _trained(stage: CandidateStage) -> bool:
    return bool(getattr(stage.index, "is_trained", True))
