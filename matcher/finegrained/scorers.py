"""Fine-grained scorers over the teacher's region and token features.

- ``AlignmentScorer`` (ALADIN's alignment head, Messina et al., CBMI 2022): every word is matched
  to its best region, S(i, c) = agg_w max_r cos(P_v r_r, P_t t_w) with agg = sum or mean over words.
- ``CodeScorer`` (Inflate & Shrink, EMNLP 2021): the 49 regions are pooled into M "inflated" code
  vectors by M learned queries, and scored against words by the same late interaction with the
  codes in place of regions. M trades accuracy (more codes) for storage and latency (fewer).

Both start from the teacher's own heads: at init the projected regions average to the dual
encoder's image embedding (pooling commutes with a linear map), so training moves from the dual
encoder's geometry instead of from scratch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def max_sum(image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """Late-interaction scores of every image against every text: [I, T].

    ``image`` [I, R, D] (regions or codes), ``text`` [T, L, D] (token vectors), ``mask`` [T, L]
    (True = real token). For each word the best-matching image vector is taken (max over R); the
    words are then summed (``"sum"``) or averaged (``"mean"``, which removes the length bias that
    "sum" gives long captions when an image ranks captions). Inputs are used as given: pass unit
    vectors for cosine similarities.
    """
    sim = torch.einsum("ird,tld->itlr", image, text).amax(-1)  # [I, T, L]: best region per word
    return _reduce_words(sim, mask, reduce)


def max_sum_pairs(image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """``max_sum`` for aligned pairs only: image[p] vs text[p] -> [P] (for re-ranking shortlists)."""
    sim = torch.einsum("prd,pld->plr", image, text).amax(-1)  # [P, L]
    return _reduce_words(sim, mask, reduce)


def _reduce_words(sim: torch.Tensor, mask: torch.Tensor, reduce: str) -> torch.Tensor:
    m = mask.to(sim.dtype)
    total = (sim * m).sum(-1)
    if reduce == "sum":
        return total
    if reduce == "mean":
        return total / m.sum(-1).clamp(min=1.0)
    raise ValueError(f"unknown word aggregation {reduce!r}: use 'sum' or 'mean'")


class _Projections(nn.Module):
    """Per-region and per-token linear projections into the teacher's 256-d space, unit-normed."""

    def __init__(self, image_head: nn.Linear, text_head: nn.Linear, dropout: float):
        super().__init__()
        self.image_proj = nn.Linear(image_head.in_features, image_head.out_features)
        self.text_proj = nn.Linear(text_head.in_features, text_head.out_features)
        self.image_proj.load_state_dict(image_head.state_dict())
        self.text_proj.load_state_dict(text_head.state_dict())
        self.dropout = nn.Dropout(dropout)

    def project_regions(self, regions: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self.dropout(regions))

    def encode_text(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[T, L, D] unit token vectors, zeros at padding."""
        t = F.normalize(self.text_proj(self.dropout(tokens)), dim=-1)
        return t * mask.unsqueeze(-1).to(t.dtype)


class AlignmentScorer(_Projections):
    """ALADIN-style alignment score: agg over words of the max cosine over regions."""

    def __init__(self, image_head: nn.Linear, text_head: nn.Linear, reduce: str = "sum", dropout: float = 0.1):
        super().__init__(image_head, text_head, dropout)
        self.reduce = reduce

    def encode_image(self, regions: torch.Tensor) -> torch.Tensor:
        """[I, R, D] unit region vectors (what a gallery stores per image)."""
        return F.normalize(self.project_regions(regions), dim=-1)

    def score(self, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return max_sum(image, text, mask, self.reduce)

    def score_pairs(self, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return max_sum_pairs(image, text, mask, self.reduce)


class CodePooling(nn.Module):
    """M learned queries attention-pool R region vectors into M code vectors ("inflate").

    code_m = sum_r softmax_r(scale * q_m . W_k x_r / sqrt(D)) x_r. Queries start near zero, so every
    code starts as the mean of the regions, i.e. the dual encoder's image embedding; training then
    lets the codes specialise on different parts of the image. ``scale`` > 1 sharpens the softmax
    (1 is the original pooling); ``init_queries`` puts the queries on clusters of the keys instead
    of near zero (``kmeans``), which is what keeps the codes apart (docs/inflate-shrink.md).
    """

    def __init__(self, codes: int, dim: int, scale: float = 1.0):
        super().__init__()
        self.queries = nn.Parameter(0.02 * torch.randn(codes, dim))
        self.key = nn.Linear(dim, dim)
        self.scale = float(scale)  # a recipe field (FineRecipe.pool_scale), not a weight: old checkpoints load

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """[I, M, R] pooling weights (each row sums to 1 over regions)."""
        logits = torch.einsum("md,ird->imr", self.queries, self.key(x)) * (self.scale / math.sqrt(x.shape[-1]))
        return logits.softmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("imr,ird->imd", self.attention(x), x)

    @torch.no_grad()
    def init_queries(self, x: torch.Tensor, seed: int = 0, iterations: int = 25) -> torch.Tensor:
        """Queries = k-means centroids of the (centred) keys of region vectors ``x`` [I, R, D].

        What a query meets is a key W_k x_r, so the clustering is done in key space. The keys' mean is
        subtracted first: q . k_r for the mean direction is the same bias for every query, which would
        send all codes to the same regions; without it each query favours the regions of its own
        cluster. Centroids are ordered by cluster size (largest first), so the first M queries of a
        larger model, which ``CodeScorer.shrunk_from`` keeps, are its M most populated clusters.
        Returns the cluster sizes in that order.
        """
        keys = self.key(x.reshape(-1, x.shape[-1]))
        keys = keys - keys.mean(0)
        centroids, sizes = kmeans(keys, len(self.queries), seed, iterations)
        self.queries.copy_(centroids)
        return sizes


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iterations: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding on the rows of ``x`` [N, D] (seeded, deterministic).

    Returns (centroids [k, D], cluster sizes [k]) sorted by size, largest first. A cluster that
    empties is re-seeded at the point farthest from its centroid.
    """
    if k > len(x):
        raise ValueError(f"k-means needs at least k = {k} points, got {len(x)}")
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randint(len(x), (1,), generator=gen)]
    for _ in range(1, k):  # k-means++: next centre drawn with probability ~ squared distance
        d2 = torch.cdist(x, centroids).pow(2).amin(1)
        centroids = torch.cat([centroids, x[torch.multinomial(d2 / d2.sum(), 1, generator=gen)]])
    for _ in range(iterations):
        dist = torch.cdist(x, centroids)
        assign = dist.argmin(1)
        sizes = torch.bincount(assign, minlength=k)
        new = torch.zeros_like(centroids).index_add_(0, assign, x) / sizes.clamp(min=1).unsqueeze(1).to(x.dtype)
        empty = torch.nonzero(sizes == 0).flatten()
        if len(empty):  # re-seed at the points farthest from their centroid, one each
            new[empty] = x[torch.topk(dist.amin(1), len(empty)).indices]
        if torch.allclose(new, centroids):
            break
        centroids = new
    assign = torch.cdist(x, centroids).argmin(1)
    sizes = torch.bincount(assign, minlength=k)
    order = torch.argsort(sizes, descending=True, stable=True)
    return centroids[order], sizes[order]


class CodeScorer(_Projections):
    """Inflate: M codes per image, late interaction with the words (per word max over codes).

    ``dual_weight`` > 0 adds the dual encoder's own cosine as a residual:
        S(i, c) = agg_l max_m cos(code_m, P_t w_l) + dual_weight * cos(mean_r P_v x_r, mean_l P_t w_l)
    and then an image is stored as [global, code_1 .. code_M] (M + 1 unit vectors) and a caption as its
    projected tokens *before* normalisation (zeros at padding; ``score`` normalises them and pools
    them into the teacher's caption embedding). ``dual_weight == 0`` is the original scorer.
    """

    def __init__(self, image_head: nn.Linear, text_head: nn.Linear, codes: int = 8, reduce: str = "mean",
                 dropout: float = 0.1, pool_scale: float = 1.0, dual_weight: float = 0.0):
        super().__init__(image_head, text_head, dropout)
        self.codes, self.reduce, self.dual_weight = codes, reduce, float(dual_weight)
        self.pool = CodePooling(codes, image_head.out_features, pool_scale)

    def encode_image(self, regions: torch.Tensor) -> torch.Tensor:
        """[I, M, D] unit code vectors (what the gallery stores, M x 256 floats per image); with
        ``dual_weight`` [I, 1 + M, D], the teacher's image embedding first."""
        x = self.project_regions(regions)
        codes = F.normalize(self.pool(x), dim=-1)
        if not self.dual_weight:
            return codes
        return torch.cat([F.normalize(x.mean(1, keepdim=True), dim=-1), codes], 1)

    def encode_text(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not self.dual_weight:
            return super().encode_text(tokens, mask)
        t = self.text_proj(self.dropout(tokens))
        return t * mask.unsqueeze(-1).to(t.dtype)

    def code_vectors(self, image: torch.Tensor) -> torch.Tensor:
        """The M unit codes of encoded images (the global vector, if any, left out)."""
        return image[:, 1:] if self.dual_weight else image

    def score(self, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not self.dual_weight:
            return max_sum(image, text, mask, self.reduce)
        # max over the codes only; the slice is taken of the small result, not of the stored gallery
        sim = torch.einsum("ird,tld->itlr", image, F.normalize(text, dim=-1))[..., 1:].amax(-1)
        late = _reduce_words(sim, mask, self.reduce)
        return late + self.dual_weight * image[:, 0] @ F.normalize(text.sum(1), dim=-1).T

    def score_pairs(self, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not self.dual_weight:
            return max_sum_pairs(image, text, mask, self.reduce)
        sim = torch.einsum("prd,pld->plr", image, F.normalize(text, dim=-1))[..., 1:].amax(-1)
        late = _reduce_words(sim, mask, self.reduce)
        return late + self.dual_weight * (image[:, 0] * F.normalize(text.sum(1), dim=-1)).sum(-1)

    @classmethod
    def shrunk_from(cls, big: "CodeScorer", codes: int) -> "CodeScorer":
        """A small-M scorer that starts from a large-M one: same projections/key, pooling scale and
        dual weight, its first M queries."""
        small = cls(big.image_proj, big.text_proj, codes, big.reduce, big.dropout.p, big.pool.scale, big.dual_weight)
        small.pool.key.load_state_dict(big.pool.key.state_dict())
        with torch.no_grad():
            small.pool.queries.copy_(big.pool.queries[:codes])
        return small
