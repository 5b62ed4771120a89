"""Recall of two-stage (hashed) search under the standard protocol, and candidate recall.

Two-stage recall is computed exactly as the matcher would answer: for each query, the Hamming
top-C candidates are re-ranked by float similarity; an item outside the shortlist can never be
returned, so its rank counts as "not found". Candidate recall isolates the first stage: the share
of the float matcher's exhaustive top-10 that made it into the C candidates.
"""
from __future__ import annotations

import numpy as np

from matcher.data.embed import GalleryEmbeddings
from matcher.hashing.codes import Hasher
from matcher.search.index import BinaryIndex
from matcher.eval.metrics import i2t_ranks, recall_table, t2i_ranks

TOP = 10  # candidate recall is measured against the float matcher's exhaustive top-10


def shortlist(hasher: Hasher, items: np.ndarray, item_modality: str, queries: np.ndarray, query_modality: str,
              candidates: int) -> np.ndarray:
    """[Q, C] ids of each query's Hamming top-C among ``items`` (flat binary index)."""
    index = BinaryIndex(hasher.bits)
    index.add(hasher.encode(items, item_modality))
    return index.search(hasher.encode(queries, query_modality), candidates)[1]


def candidate_recall(cand: np.ndarray, sim: np.ndarray, top: int = TOP) -> float:
    """Share of each query's exhaustive float top-``top`` (rows of ``sim``) found in ``cand`` rows."""
    top = min(top, sim.shape[1])
    best = np.argpartition(-sim, top - 1, axis=1)[:, :top]
    found = (best[:, :, None] == cand[:, None, :]).any(axis=2)
    return float(found.mean())


def _mask(sim: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sim with non-candidates at -inf, boolean candidate mask)."""
    inside = np.zeros(sim.shape, dtype=bool)
    np.put_along_axis(inside, cand, True, axis=1)
    return np.where(inside, sim, -np.inf), inside


def two_stage_metrics(hasher: Hasher, emb: GalleryEmbeddings, candidates: int,
                      rerank: GalleryEmbeddings | None = None) -> dict:
    """Standard-protocol recall of two-stage search plus candidate recall, both directions."""
    rerank = rerank or emb
    sim_base = emb.captions @ emb.images.T            # what defines the "exhaustive top-10"
    sim_rerank = rerank.captions @ rerank.images.T    # what re-orders the shortlist
    cap_img = emb.caption_image
    n_img, n_cap = sim_base.shape[1], sim_base.shape[0]
    c_t2i = shortlist(hasher, emb.images, "image", emb.captions, "text", min(candidates, n_img))
    masked, inside = _mask(sim_rerank, c_t2i)
    ranks = t2i_ranks(masked, cap_img)
    ranks[~inside[np.arange(n_cap), cap_img]] = n_img
    t2i = recall_table(ranks)
    c_i2t = shortlist(hasher, emb.captions, "text", emb.images, "image", min(candidates, n_cap))
    masked_t, inside_t = _mask(sim_rerank.T, c_i2t)
    ranks_i = i2t_ranks(masked_t.T, cap_img)
    has_own = np.zeros(n_img, dtype=bool)
    np.logical_or.at(has_own, cap_img, inside_t[cap_img, np.arange(n_cap)])
    ranks_i[~has_own] = n_cap
    has_caption = np.bincount(cap_img, minlength=n_img) > 0
    i2t = recall_table(ranks_i[has_caption])
    return {
        "candidates": int(candidates), "t2i": t2i, "i2t": i2t, "rsum": sum(t2i.values()) + sum(i2t.values()),
        "candidate_recall": candidate_recall(c_t2i, sim_base),
        "candidate_recall_i2t": candidate_recall(c_i2t, sim_base.T),
    }
