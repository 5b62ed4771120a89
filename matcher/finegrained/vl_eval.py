"""``eval-fine`` rows of the MiniLM cross-encoder (``vl-cross``) and its decomposition (``vl-decomposed``).

Same protocol and columns as the other fine tiers (``matcher.finegrained.report``): the cross-encoder
re-ranks the dual teacher's top-C in both directions, pure and fused (λ chosen on val); the
decomposition is a dual encoder again and ranks every image exhaustively. Costs: per-pair µs of the
scorer, and one text query's search on the 1000-image test gallery after the teacher's text encoding
(the cross-encoder reads the lower-layer word states that encoding produces anyway; the
decomposition runs its two layers on the caption once more).
"""
from __future__ import annotations

import numpy as np
import torch

from matcher.eval.metrics import retrieval_metrics
from matcher.finegrained.evaluate import median_ms, pure_and_fused
from matcher.finegrained.vl_cross import CrossSplit, score_pairs, shortlists


def pair_us(model, split: CrossSplit, pairs: int = 512, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    caps, imgs = rng.integers(0, split.fine.n_captions, pairs), rng.integers(0, len(split), pairs)
    return median_ms(lambda: score_pairs(model, split, caps, imgs), 3) * 1000 / pairs


def rerank_search_ms(model, split: CrossSplit, candidates: int, queries: int = 30) -> float:
    """One caption (lower-layer states given): dual scores + top-C, then the cross-encoder on C pairs."""
    qs = iter(range(10 ** 9))

    def one() -> None:
        q = next(qs) % split.fine.n_captions
        with torch.inference_mode():
            top = torch.topk(split.images @ split.texts[q], candidates).indices.numpy()
            score_pairs(model, split, np.full(candidates, q), top)

    return median_ms(one, queries)


def decomposed_search_ms(model, split: CrossSplit, queries: int = 30) -> float:
    """One caption: its decomposed vector (two layers on the lower-layer states) + the exhaustive product."""
    with torch.inference_mode():
        v = torch.cat([model.encode_image(split.fine.region_batch(np.arange(s, min(s + 250, len(split)))))
                       for s in range(0, len(split), 250)])
    qs = iter(range(10 ** 9))

    def one() -> None:
        q = next(qs) % split.fine.n_captions
        with torch.inference_mode():
            u = model.encode_text(*split.lower.token_batch(np.array([q])))
            s = v @ u[0] + model.residual_scale * (split.images @ split.texts[q])
            torch.topk(s, 10)

    return median_ms(one, queries)


def cross_records(name: str, model, splits: dict, candidates: int, record) -> list[dict]:
    """Pure and fused re-ranking rows at shortlist size C; ``record`` builds a row like the other tiers'."""
    lists = {s: shortlists(model, splits[s], candidates, progress=f"{name} {s}") for s in ("val", "test")}
    cost, search = pair_us(model, splits["test"]), rerank_search_ms(model, splits["test"], candidates)
    pure, fused, lam = pure_and_fused({s: splits[s].dual for s in lists}, lists,
                                      {s: splits[s].caption_image for s in lists})
    rows = [record(f"{name} re-rank C={candidates}", "vl-cross", "rerank", pure["val"], pure["test"], search, cost,
                   candidates=candidates),
            record(f"{name} fused C={candidates}", "vl-cross", "fused", fused["val"], fused["test"], search, cost,
                   candidates=candidates, fuse_lambda=lam)]
    return rows


def decomposed_record(name: str, model, splits: dict, record) -> dict:
    """The decomposition as an exhaustive dual encoder; per pair it costs one product of the dual
    embeddings and one of the decomposed vectors (timed as the two [captions, images] products)."""
    metrics = {s: retrieval_metrics(model.full_scores(splits[s]), splits[s].caption_image) for s in ("val", "test")}
    test = splits["test"]
    d = model.image_out.out_features
    u, v = torch.randn(test.fine.n_captions, d), torch.randn(len(test), d)
    product = median_ms(lambda: (u @ v.T, test.texts @ test.images.T), 3)
    return record(name, "vl-decomposed", "exhaustive", metrics["val"], metrics["test"],
                  decomposed_search_ms(model, test), product * 1000 / (len(u) * len(v)),
                  gallery_floats_per_image=splits["test"].images.shape[1] + model.image_out.out_features)

