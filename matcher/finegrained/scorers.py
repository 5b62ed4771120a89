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

    code_m = sum_r softmax_r(q_m . W_k x_r / sqrt(D)) x_r. Queries start near zero, so every code
    starts as the mean of the regions, i.e. the dual encoder's image embedding; training then
    lets the codes specialise on different parts of the image.
    """

    def __init__(self, codes: int, dim: int):
        super().__init__()
        self.queries = nn.Parameter(0.02 * torch.randn(codes, dim))
        self.key = nn.Linear(dim, dim)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """[I, M, R] pooling weights (each row sums to 1 over regions)."""
        logits = torch.einsum("md,ird->imr", self.queries, self.key(x)) / math.sqrt(x.shape[-1])
        return logits.softmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("imr,ird->imd", self.attention(x), x)


class CodeScorer(_Projections):
    """Inflate: M codes per image, late interaction with the words (per word max over codes)."""

    def __init__(self, image_head: nn.Linear, text_head: nn.Linear, codes: int = 8, reduce: str = "mean",
                 dropout: float = 0.1):
        super().__init__(image_head, text_head, dropout)
        self.codes, self.reduce = codes, reduce
        self.pool = CodePooling(codes, image_head.out_features)

    def encode_image(self, regions: torch.Tensor) -> torch.Tensor:
        """[I, M, D] unit code vectors: what the gallery stores (M x 256 floats per image)."""
        return F.normalize(self.pool(self.project_regions(regions)), dim=-1)

    def score(self, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return max_sum(image, text, mask, self.reduce)

    def score_pairs(self, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return max_sum_pairs(image, text, mask, self.reduce)

    @classmethod
    def shrunk_from(cls, big: "CodeScorer", codes: int) -> "CodeScorer":
        """A small-M scorer that starts from a large-M one: same projections/key, its first M queries."""
        small = cls(big.image_proj, big.text_proj, codes, big.reduce, big.dropout.p)
        small.pool.key.load_state_dict(big.pool.key.state_dict())
        with torch.no_grad():
            small.pool.queries.copy_(big.pool.queries[:codes])
        return small
