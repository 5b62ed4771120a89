"""Fusing several fine scorers with the dual cosine: weights chosen on val, 0 for a scorer that does not help."""
from __future__ import annotations

import numpy as np

from matcher.eval.metrics import retrieval_metrics
from matcher.finegrained.ensemble import choose_weights, score_split
from matcher.finegrained.evaluate import Shortlists


def _case(seed: int):
    """20 images, 2 captions each; a noisy dual matrix that still has the truth in its top 5."""
    rng = np.random.default_rng(seed)
    caption_image = np.repeat(np.arange(20), 2)
    truth = (caption_image[:, None] == np.arange(20)[None]).astype(float)
    dual = 0.3 * truth + rng.normal(0, 0.2, truth.shape)
    oracle = lambda c, i: (caption_image[c] == i).astype(float)          # knows the answer
    noise = lambda c, i: np.random.default_rng(0).normal(size=len(c))   # knows nothing
    return dual, caption_image, oracle, noise


def test_all_zero_weights_rank_as_the_dual_teacher():
    dual, caption_image, oracle, noise = _case(0)
    scored = score_split(dual, caption_image, [oracle, noise], candidates=5)
    assert np.isclose(scored.metrics((0.0, 0.0))["rsum"], retrieval_metrics(dual, caption_image)["rsum"])


def test_val_weights_keep_the_oracle_and_drop_the_noise():
    dual, caption_image, oracle, noise = _case(1)
    val = score_split(dual, caption_image, [noise, oracle], candidates=20)
    weights, best = choose_weights(val)
    assert weights[0] == 0.0 and weights[1] > 0
    assert best == 600.0  # the oracle over every image ranks the truth first in both directions
    assert best > retrieval_metrics(dual, caption_image)["rsum"]


def test_pure_and_fused_rows_of_one_scorer():
    from matcher.finegrained.evaluate import FUSE_GRID, pure_and_fused

    dual, caption_image, oracle, _ = _case(2)
    scored = score_split(dual, caption_image, [oracle], candidates=20)
    lists = Shortlists(scored.t2i, scored.t2i_scores[0], scored.i2t, scored.i2t_scores[0])
    splits = {"val": dual, "test": dual}
    pure, fused, lam = pure_and_fused(splits, {"val": lists, "test": lists}, {"val": caption_image, "test": caption_image})
    assert pure["test"]["rsum"] == 600.0 and fused["val"]["rsum"] == 600.0  # the oracle over every image
    from matcher.finegrained.evaluate import rerank_metrics

    weak = rerank_metrics(dual, lists, caption_image, fuse=min(FUSE_GRID))["rsum"]
    assert lam in FUSE_GRID and weak < 600.0  # val picked a weight that lets the oracle decide; a tiny one does not
