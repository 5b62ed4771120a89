"""Early interaction (a small cross-encoder) and its decomposition (after VLDeformer, 2021).

``CrossEncoder``: [CLS] + the image's region tokens + the caption's word tokens go through one
small transformer together; the score is a linear read-out of the [CLS] output. Every pair needs
its own forward pass, so it only re-ranks a shortlist.

``DecomposedEncoder``: the *same* transformer (weights copied from the cross-encoder) run on
[CLS] + regions alone and on [CLS] + words alone; each [CLS] output is projected to an embedding
and the score is their cosine. Images are then encoded once per gallery item, like a dual
encoder, and it is trained to reproduce the cross-encoder's scores.

Inputs are the teacher's region and token features through the teacher's own heads (frozen,
1280->256 and 384->256) and a trained linear map to the transformer width: the gallery can store
the 256-d projected regions, and the transformer starts on features already aligned across
modalities.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from matcher.models.towers import masked_mean


class _Tokens(nn.Module):
    """Frozen teacher heads -> width, plus type (image/text) and position embeddings, and [CLS]."""

    def __init__(self, image_head: nn.Linear, text_head: nn.Linear, dim: int, regions: int, max_words: int):
        super().__init__()
        self.image_head, self.text_head = copy.deepcopy(image_head), copy.deepcopy(text_head)
        self.image_head.requires_grad_(False)
        self.text_head.requires_grad_(False)
        self.image_in = nn.Linear(image_head.out_features, dim)
        self.text_in = nn.Linear(text_head.out_features, dim)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.region_pos = nn.Parameter(0.02 * torch.randn(1, regions, dim))
        self.word_pos = nn.Parameter(0.02 * torch.randn(1, max_words, dim))
        self.types = nn.Parameter(0.02 * torch.randn(2, dim))

    def image(self, regions: torch.Tensor) -> torch.Tensor:
        """[I, R, dim] image tokens."""
        return self.embed_image(self.image_head(regions))

    def text(self, tokens: torch.Tensor) -> torch.Tensor:
        """[T, L, dim] word tokens (padding rows are masked out by the caller)."""
        return self.embed_text(self.text_head(tokens))

    def embed_image(self, projected: torch.Tensor) -> torch.Tensor:
        """Image tokens from regions already through the teacher's head ([I, R, 256])."""
        return self.image_in(projected) + self.region_pos[:, : projected.shape[1]] + self.types[0]

    def embed_text(self, projected: torch.Tensor) -> torch.Tensor:
        return self.text_in(projected) + self.word_pos[:, : projected.shape[1]] + self.types[1]


class CrossEncoder(nn.Module):
    def __init__(self, image_head: nn.Linear, text_head: nn.Linear, dim: int = 128, layers: int = 2,
                 heads: int = 4, ffn: int = 256, dropout: float = 0.1, regions: int = 49, max_words: int = 64,
                 residual_scale: float = 0.0):
        super().__init__()
        # residual_scale > 0: score = residual_scale * (dual teacher cosine) + read-out, read-out
        # initialised to zero, so training starts from the dual ranking and learns a correction.
        self.residual_scale = residual_scale
        self.tokens = _Tokens(image_head, text_head, dim, regions, max_words)
        layer = nn.TransformerEncoderLayer(dim, heads, ffn, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, 1)
        if residual_scale:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        self.config = {"dim": dim, "layers": layers, "heads": heads, "ffn": ffn, "dropout": dropout,
                       "regions": regions, "max_words": max_words, "residual_scale": residual_scale}

    def run(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """[CLS] output of the transformer over [CLS] + x; ``pad`` [B, len(x)] is True at padding."""
        cls = self.tokens.cls.expand(len(x), -1, -1)
        pad = torch.cat([torch.zeros(len(x), 1, dtype=torch.bool), pad], 1)
        return self.norm(self.encoder(torch.cat([cls, x], 1), src_key_padding_mask=pad)[:, 0])

    def encode_image(self, regions: torch.Tensor) -> torch.Tensor:
        """[I, R, 256] regions through the teacher's head: what a gallery stores per image."""
        return self.tokens.image_head(regions)

    def encode_text(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.tokens.text_head(tokens) * mask.unsqueeze(-1).to(tokens.dtype)

    def score_pairs(self, img: torch.Tensor, txt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[P] scores of aligned pairs: ``encode_image`` [P, R, 256], ``encode_text`` [P, L, 256], mask [P, L]."""
        pad = torch.cat([torch.zeros(img.shape[:2], dtype=torch.bool), ~mask], 1)
        x = torch.cat([self.tokens.embed_image(img), self.tokens.embed_text(txt)], 1)
        score = self.out(self.run(x, pad)).squeeze(-1)
        if self.residual_scale:  # the dual teacher's cosine: mean pooling commutes with its heads
            score = score + self.residual_scale * F.cosine_similarity(img.mean(1), masked_mean(txt, mask), dim=-1)
        return score


class DecomposedEncoder(nn.Module):
    """The cross-encoder's transformer applied per modality: a dual encoder with its weights."""

    def __init__(self, cross: CrossEncoder, embed_dim: int = 256):
        super().__init__()
        self.cross = copy.deepcopy(cross)
        dim = cross.config["dim"]
        self.image_out, self.text_out = nn.Linear(dim, embed_dim), nn.Linear(dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(3.0))

    def encode_image(self, regions: torch.Tensor) -> torch.Tensor:
        """[I, 1, D] unit embeddings (one "code" per image, so the evaluation helpers apply)."""
        x = self.cross.tokens.image(regions)
        out = self.cross.run(x, torch.zeros(x.shape[:2], dtype=torch.bool))
        return F.normalize(self.image_out(out), dim=-1).unsqueeze(1)

    def encode_text(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[T, 1, D] unit embeddings."""
        out = self.cross.run(self.cross.tokens.text(tokens), ~mask)
        return F.normalize(self.text_out(out), dim=-1).unsqueeze(1)

    def score(self, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[I, T] cosine similarities (``mask`` is unused: a text is one vector)."""
        return image[:, 0] @ text[:, 0].T

    def score_pairs(self, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return (image[:, 0] * text[:, 0]).sum(-1)
