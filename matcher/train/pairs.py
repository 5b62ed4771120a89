"""Training batches over cached trunk features: image views and ragged caption token states."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def caption_lists(caption_image: np.ndarray, n_images: int) -> list[np.ndarray]:
    """Caption rows of each image, in order (batches pair each image with one of them)."""
    order = np.argsort(caption_image, kind="stable")
    bounds = np.searchsorted(caption_image[order], np.arange(n_images + 1))
    return [order[bounds[i]:bounds[i + 1]] for i in range(n_images)]


@dataclass
class CachedSplit:
    """One split's cached trunk outputs. Image ``i`` owns captions ``5*i .. 5*i+4``."""

    images: np.ndarray   # [N, V, C, H, W] float16 (V views: original, flipped)
    tokens: np.ndarray   # [T, D] float16, all captions' token states concatenated
    offsets: np.ndarray  # [5N + 1] start of each caption in ``tokens``
    captions_per_image: int = 5

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def from_features(cls, image_feats: dict, text_feats: dict, split: str) -> "CachedSplit":
        return cls(image_feats[split], text_feats[f"{split}_tokens"], text_feats[f"{split}_offsets"])

    def image_batch(self, rows: np.ndarray, views: np.ndarray | None = None) -> torch.Tensor:
        views = np.zeros(len(rows), dtype=np.int64) if views is None else views
        return torch.from_numpy(self.images[rows, views].astype(np.float32))

    def caption_batch(self, caption_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded token states [B, L, D] and attention mask [B, L] for the given caption ids."""
        starts, ends = self.offsets[caption_ids], self.offsets[caption_ids + 1]
        length = int((ends - starts).max())
        states = np.zeros((len(caption_ids), length, self.tokens.shape[1]), dtype=np.float32)
        mask = np.zeros((len(caption_ids), length), dtype=np.int64)
        for row, (s, e) in enumerate(zip(starts, ends)):
            states[row, : e - s] = self.tokens[s:e]
            mask[row, : e - s] = 1
        return torch.from_numpy(states), torch.from_numpy(mask)

    def sample_epoch(self, batch_size: int, rng: np.random.Generator):
        """Yield (image rows, views, caption ids): each image once, a random view and caption."""
        order = rng.permutation(len(self))
        n_views = self.images.shape[1]
        for start in range(0, len(order) - batch_size + 1, batch_size):  # full batches only
            rows = order[start : start + batch_size]
            views = rng.integers(0, n_views, len(rows))
            captions = rows * self.captions_per_image + rng.integers(0, self.captions_per_image, len(rows))
            yield rows, views, captions
