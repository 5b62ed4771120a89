"""Fusing several fine scorers with the dual cosine: weights chosen on val, 0 for a scorer that does not help."""
from __future__ import annotations

import numpy as np

from matcher.eval.metrics import retrieval_metrics
from matcher.finegrained.ensemble import choose_weights, score_split


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
