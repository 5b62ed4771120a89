"""Recall of the fine tiers under the standard protocol, as re-rankers or exhaustively, and their costs.

Re-ranking (``rerank_metrics``): text->image, each caption re-scores the dual teacher's top-C
images; image->text, each image re-scores the teacher's top-C captions. Items outside the
shortlist keep their dual order *below* the re-scored ones: the full matrix gets
``OFFSET + fine score`` on the shortlist and the dual cosine elsewhere, so
``matcher.eval.metrics.retrieval_metrics`` applies unchanged (t2i read from one matrix, i2t from the other).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from matcher.finegrained.features import FineSplit
from matcher.eval.metrics import retrieval_metrics

OFFSET = 1e4  # far above any fine or fused score: shortlisted items always rank first


@dataclass
class Encoded:
    """A split as a scorer stores it: per-image vectors [N, R or M, D], padded token vectors [5N, L, D]."""

    images: torch.Tensor
    texts: torch.Tensor
    mask: torch.Tensor


def encode_split(scorer, split: FineSplit, batch_size: int = 250) -> Encoded:
    scorer.eval()
    with torch.inference_mode():
        images = torch.cat([scorer.encode_image(split.region_batch(np.arange(s, min(s + batch_size, len(split)))))
                            for s in range(0, len(split), batch_size)])
        states, mask = split.token_batch(np.arange(split.n_captions))
        texts = torch.cat([scorer.encode_text(states[s:s + batch_size], mask[s:s + batch_size])
                           for s in range(0, split.n_captions, batch_size)])
    return Encoded(images, texts, mask)


def pair_scores(scorer, enc: Encoded, captions: np.ndarray, images: np.ndarray, chunk: int = 2000) -> np.ndarray:
    """Fine score of each (caption, image) pair, in chunks to bound memory."""
    out = []
    with torch.inference_mode():
        for s in range(0, len(captions), chunk):
            c, i = torch.from_numpy(captions[s:s + chunk]), torch.from_numpy(images[s:s + chunk])
            n = int(enc.mask[c].sum(1).max())  # trim the split-wide padding to this chunk's longest caption
            out.append(scorer.score_pairs(enc.images[i], enc.texts[c][:, :n], enc.mask[c][:, :n]))
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def full_scores(scorer, enc: Encoded, chunk: int = 100) -> np.ndarray:
    """Exhaustive [captions, images] fine scores (late interaction over every pair)."""
    out = []
    with torch.inference_mode():
        for s in range(0, len(enc.texts), chunk):
            n = int(enc.mask[s:s + chunk].sum(1).max())
            out.append(scorer.score(enc.images, enc.texts[s:s + chunk, :n], enc.mask[s:s + chunk, :n]).T)
    return torch.cat(out).numpy()


def shortlist(sim: np.ndarray, candidates: int) -> np.ndarray:
    """[Q, C] column ids of each row's top-C by ``sim`` (unordered)."""
    c = min(candidates, sim.shape[1])
    return np.argpartition(-sim, c - 1, axis=1)[:, :c]


@dataclass
class Shortlists:
    """Both directions' shortlists from the dual scores and the fine scores of their pairs."""

    t2i: np.ndarray        # [captions, C] image ids
    t2i_fine: np.ndarray   # [captions, C]
    i2t: np.ndarray        # [images, C] caption ids
    i2t_fine: np.ndarray   # [images, C]


def score_shortlists(scorer, enc: Encoded, dual: np.ndarray, candidates: int) -> Shortlists:
    t2i = shortlist(dual, candidates)
    caps = np.repeat(np.arange(len(dual)), t2i.shape[1])
    t2i_fine = pair_scores(scorer, enc, caps, t2i.ravel()).reshape(t2i.shape)
    i2t = shortlist(dual.T, candidates)
    imgs = np.repeat(np.arange(dual.shape[1]), i2t.shape[1])
    i2t_fine = pair_scores(scorer, enc, i2t.ravel(), imgs).reshape(i2t.shape)
    return Shortlists(t2i, t2i_fine, i2t, i2t_fine)


def rerank_metrics(dual: np.ndarray, lists: Shortlists, caption_image: np.ndarray, fuse: float | None = None) -> dict:
    """Protocol recall after re-ranking; ``fuse=λ`` scores shortlisted pairs by dual + λ·fine."""
    def combined(fine: np.ndarray, dual_at: np.ndarray) -> np.ndarray:
        return fine if fuse is None else dual_at + fuse * fine

    rows = np.arange(len(dual))[:, None]
    sim_t2i = dual.copy()
    sim_t2i[rows, lists.t2i] = OFFSET + combined(lists.t2i_fine, dual[rows, lists.t2i])
    cols = np.arange(dual.shape[1])[:, None]
    sim_i2t = dual.T.copy()
    sim_i2t[cols, lists.i2t] = OFFSET + combined(lists.i2t_fine, dual.T[cols, lists.i2t])
    t2i = retrieval_metrics(sim_t2i, caption_image)["t2i"]
    i2t = retrieval_metrics(sim_i2t.T, caption_image)["i2t"]
    return {"t2i": t2i, "i2t": i2t, "rsum": sum(t2i.values()) + sum(i2t.values())}


FUSE_GRID = tuple(2.0 ** k for k in range(-6, 5))  # fusion weights λ tried on val (dual + λ·fine)


def pure_and_fused(duals: dict, lists: dict, caption_images: dict) -> tuple[dict, dict, float]:
    """({split: metrics} re-ranked by the fine score alone, {split: metrics} fused with λ chosen on
    val from ``FUSE_GRID``, λ): the two rows every re-ranking tier reports per shortlist size."""
    splits = ("val", "test")
    pure = {s: rerank_metrics(duals[s], lists[s], caption_images[s]) for s in splits}
    by_lam = {lam: rerank_metrics(duals["val"], lists["val"], caption_images["val"], fuse=lam)["rsum"]
              for lam in FUSE_GRID}
    lam = max(by_lam, key=by_lam.get)
    fused = {s: rerank_metrics(duals[s], lists[s], caption_images[s], fuse=lam) for s in splits}
    return pure, fused, lam


def code_diversity(scorer, split: FineSplit, images: int = 200) -> dict[str, float]:
    """How far the M codes are from all being the mean region (collapse diagnostics).

    ``attention_entropy``: mean entropy of the pooling weights / log R (1 = uniform = mean pooling);
    ``code_cosine``: mean cosine between two different codes of the same image (1 = identical codes).
    """
    import math

    scorer.eval()
    with torch.inference_mode():
        x = scorer.project_regions(split.region_batch(np.arange(min(images, len(split)))))
        attn = scorer.pool.attention(x)
        entropy = float(-(attn * attn.clamp_min(1e-12).log()).sum(-1).mean() / math.log(attn.shape[-1]))
        codes = torch.nn.functional.normalize(scorer.pool(x), dim=-1)
        m = codes.shape[1]
        off = ~torch.eye(m, dtype=torch.bool)
        cosine = float((codes @ codes.transpose(1, 2))[:, off].mean()) if m > 1 else 1.0
    return {"attention_entropy": round(entropy, 4), "code_cosine": round(cosine, 4)}


# -- costs ----------------------------------------------------------------------------------------

def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def pair_cost_us(scorer, enc: Encoded, pairs: int = 2000, seed: int = 0) -> float:
    """Microseconds per (caption, image) pair scored, batched, on the current torch threads."""
    rng = np.random.default_rng(seed)
    caps, imgs = rng.integers(0, len(enc.texts), pairs), rng.integers(0, len(enc.images), pairs)
    return median_ms(lambda: pair_scores(scorer, enc, caps, imgs), 3) * 1000 / pairs


def search_ms(dual_images: torch.Tensor, dual_texts: torch.Tensor, scorer=None, enc: Encoded | None = None,
              candidates: int = 0, exhaustive: bool = False, queries: int = 50) -> float:
    """Median ms of one text query's search over the gallery, query already encoded.

    Dual: a [1, D] x [D, N] product and a top-k. Re-ranker: the same plus fine scores of the top-C.
    Exhaustive late interaction: fine scores against every gallery item, then a top-k.
    """
    def one(q: int) -> None:
        with torch.inference_mode():
            if enc is not None:  # a real query has no padding
                n = int(enc.mask[q].sum())
                text, mask = enc.texts[q:q + 1, :n], enc.mask[q:q + 1, :n]
            if exhaustive:
                s = scorer.score(enc.images, text, mask)[:, 0]
                torch.topk(s, 10)
                return
            s = dual_images @ dual_texts[q]
            if candidates:
                cand = torch.topk(s, candidates).indices
                fine = scorer.score_pairs(enc.images[cand], text.expand(len(cand), -1, -1),
                                          mask.expand(len(cand), -1))
                torch.topk(fine, 10)
            else:
                torch.topk(s, 10)

    qs = iter(range(10**9))
    return median_ms(lambda: one(next(qs) % len(dual_texts)), queries)
