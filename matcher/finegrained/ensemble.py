"""Several fine scorers fused with the dual cosine on one shortlist: dual + sum_k lambda_k * S_k.

Why: interaction scores make errors the pooled cosine does not (that is why fusing one helps), and
different scorers (region-word alignment, inflated codes, early interaction) make different ones. One
shortlist (the dual teacher's top-C, the same for every scorer), each scorer's scores of its pairs,
and the weights chosen on val by coordinate ascent over a grid that includes 0, so a scorer that does
not help on val gets weight 0 and the row says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from matcher.finegrained.evaluate import FUSE_GRID, Shortlists, rerank_metrics, shortlist

GRID = (0.0, *FUSE_GRID)  # 0 included: a scorer that does not help on val is left out
PairScorer = Callable[[np.ndarray, np.ndarray], np.ndarray]   # (caption ids, image ids) -> scores


@dataclass
class Scored:
    """One split's shortlists and every scorer's scores of their pairs."""

    dual: np.ndarray
    caption_image: np.ndarray
    t2i: np.ndarray
    i2t: np.ndarray
    t2i_scores: list[np.ndarray]
    i2t_scores: list[np.ndarray]

    def metrics(self, weights: tuple[float, ...]) -> dict:
        t2i = sum(w * s for w, s in zip(weights, self.t2i_scores)) + np.zeros(self.t2i.shape)
        i2t = sum(w * s for w, s in zip(weights, self.i2t_scores)) + np.zeros(self.i2t.shape)
        return rerank_metrics(self.dual, Shortlists(self.t2i, t2i, self.i2t, i2t), self.caption_image, fuse=1.0)


def score_split(dual: np.ndarray, caption_image: np.ndarray, scorers: list[PairScorer], candidates: int) -> Scored:
    t2i, i2t = shortlist(dual, candidates), shortlist(dual.T, candidates)
    caps, imgs = np.repeat(np.arange(len(dual)), t2i.shape[1]), np.repeat(np.arange(dual.shape[1]), i2t.shape[1])
    return Scored(dual, caption_image, t2i, i2t,
                  [f(caps, t2i.ravel()).reshape(t2i.shape) for f in scorers],
                  [f(i2t.ravel(), imgs).reshape(i2t.shape) for f in scorers])


def choose_weights(val: Scored, rounds: int = 3) -> tuple[tuple[float, ...], float]:
    """Coordinate ascent on val rsum over ``GRID`` per scorer, from all-zero (the dual teacher)."""
    weights = [0.0] * len(val.t2i_scores)
    best = val.metrics(tuple(weights))["rsum"]
    for _ in range(rounds):
        moved = False
        for k in range(len(weights)):
            for w in GRID:
                trial = tuple(weights[:k] + [w] + weights[k + 1:])
                rsum = val.metrics(trial)["rsum"]
                if rsum > best + 1e-9:
                    best, weights, moved = rsum, list(trial), True
        if not moved:
            break
    return tuple(weights), best
