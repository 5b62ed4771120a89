"""The teacher's *unpooled* features: 49 region vectors per image and the token states per caption.

Fine-grained scorers compare regions with words, so they need what the dual-encoder teacher
mean-pools away. Both come from the teacher's own trunk caches (``matcher.train.features``) by
running its fine-tuned top blocks/layers once; the result is cached on disk (float16), keyed by
the teacher checkpoint's content hash so a retrained teacher never serves stale features.

Only the first image view (no flip) is kept for train: it halves the cache (about 750 MB) and
the fine tiers train for minutes, not epochs of augmentation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from matcher.models.dual_encoder import load_checkpoint
from matcher.models.towers import masked_mean
from matcher.finegrained.checkpoints import DEFAULT_TEACHER
from matcher.train.features import Flickr8k, cached_arrays, file_digest, cached_image_features, cached_text_features
from matcher.train.pairs import CachedSplit

SPLITS = ("train", "val", "test")


@dataclass
class FineSplit:
    """One split's region and token features. Image ``i`` owns captions ``5*i .. 5*i+4``."""

    regions: np.ndarray   # [N, R, 1280] float16, the conv-head map before pooling (R = 49 at 224 px)
    tokens: np.ndarray    # [T, 384] float16, final token states of all captions, concatenated
    offsets: np.ndarray   # [5N + 1] start of each caption in ``tokens``
    captions_per_image: int = 5

    def __len__(self) -> int:
        return len(self.regions)

    @property
    def n_captions(self) -> int:
        return len(self.offsets) - 1

    @property
    def caption_image(self) -> np.ndarray:
        return np.repeat(np.arange(len(self)), self.captions_per_image)

    def region_batch(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.regions[rows].astype(np.float32))

    def token_batch(self, caption_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded token states [B, L, 384] and a boolean mask [B, L]."""
        starts, ends = self.offsets[caption_ids], self.offsets[caption_ids + 1]
        length = int((ends - starts).max())
        states = np.zeros((len(caption_ids), length, self.tokens.shape[1]), dtype=np.float32)
        mask = np.zeros((len(caption_ids), length), dtype=bool)
        for row, (s, e) in enumerate(zip(starts, ends)):
            states[row, : e - s] = self.tokens[s:e]
            mask[row, : e - s] = True
        return torch.from_numpy(states), torch.from_numpy(mask)


def _unpooled(module, split: CachedSplit, batch_size: int = 200) -> dict[str, np.ndarray]:
    """Run the teacher's tops on one cached split (first view), keeping regions and tokens."""
    tower_i, tower_t = module.image_tower, module.text_tower
    regions, tokens, lengths = [], [], []
    with torch.inference_mode():
        for start in range(0, len(split), batch_size):
            rows = np.arange(start, min(start + batch_size, len(split)))
            fmap = tower_i.forward_top_map(split.image_batch(rows))          # [B, C, H, W]
            regions.append(fmap.flatten(2).transpose(1, 2).half().numpy())   # [B, HW, C]
        n_captions = len(split.offsets) - 1
        for start in range(0, n_captions, batch_size):
            states, mask = split.caption_batch(np.arange(start, min(start + batch_size, n_captions)))
            h = tower_t.forward_top_tokens(states, mask)
            for row, m in zip(h, mask):
                n = int(m.sum())
                tokens.append(row[:n].half().numpy())
                lengths.append(n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return {"regions": np.concatenate(regions), "tokens": np.concatenate(tokens), "offsets": offsets}


def fine_features(data: Flickr8k, teacher: str | Path = DEFAULT_TEACHER) -> dict[str, FineSplit]:
    """{split: FineSplit} for train/val/test, computed once per teacher checkpoint and cached."""
    teacher = Path(teacher)

    def build() -> dict[str, np.ndarray]:
        encoder = load_checkpoint(teacher)
        module, config = encoder.module.eval(), encoder.config
        img_cfg, txt_cfg = config["image_tower"], config["text_tower"]
        image_feats = cached_image_features(data, img_cfg["variant"], img_cfg["image_size"], img_cfg["trainable_blocks"])
        text_feats = cached_text_features(data, txt_cfg["trainable_layers"])
        arrays = {}
        for s in SPLITS:
            for key, value in _unpooled(module, CachedSplit.from_features(image_feats, text_feats, s)).items():
                arrays[f"{s}_{key}"] = value
        return arrays

    z = cached_arrays(f"fine-{file_digest(teacher)}", data, build)
    return {s: FineSplit(z[f"{s}_regions"], z[f"{s}_tokens"], z[f"{s}_offsets"]) for s in SPLITS}


def dual_embeddings(split: FineSplit, image_head: torch.nn.Linear, text_head: torch.nn.Linear,
                    batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """The dual-encoder teacher's unit image [N, D] and caption [5N, D] embeddings, from the unpooled features.

    Mean pooling commutes with the linear heads, so these equal the teacher's own embeddings.
    """
    with torch.inference_mode():
        img = torch.cat([image_head(split.region_batch(np.arange(s, min(s + batch_size, len(split)))).mean(1))
                         for s in range(0, len(split), batch_size)])
        txt = []
        for s in range(0, split.n_captions, batch_size):
            states, mask = split.token_batch(np.arange(s, min(s + batch_size, split.n_captions)))
            txt.append(text_head(masked_mean(states, mask)))
    return F.normalize(img, dim=-1), F.normalize(torch.cat(txt), dim=-1)


def dual_similarity(split: FineSplit, image_head: torch.nn.Linear, text_head: torch.nn.Linear,
                    batch_size: int = 500) -> np.ndarray:
    """The dual teacher's [captions, images] cosine matrix: the first stage every re-ranking tier starts from."""
    img, txt = dual_embeddings(split, image_head, text_head, batch_size)
    return (txt @ img.T).numpy()
