"""Cache the frozen trunks' outputs on the training data so CPU training only runs the tops.

Image trunk outputs are stored per view (original and horizontally flipped), text trunk outputs
as ragged token states (concatenated tokens + offsets) to avoid storing padding.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from matcher.atomic import atomic_path
from matcher.paths import cache_dir
from matcher.towers import PREPROCESS_VERSION, EfficientNetLiteTower, MiniLMTextTower, image_transform


@dataclass
class Flickr8k:
    """The shared Flickr8k copy: image names, their 5 captions and split, in file order."""

    root: Path
    images: list[str]
    captions: list[list[str]]
    splits: list[str]

    @classmethod
    def load(cls, root: str | Path) -> "Flickr8k":
        root = Path(root)
        rows = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines() if line.strip()]
        return cls(root, [r["image"] for r in rows], [r["captions"] for r in rows], [r["split"] for r in rows])

    def indices(self, split: str) -> np.ndarray:
        return np.array([i for i, s in enumerate(self.splits) if s == split])


def _feature_file(name: str) -> Path:
    return cache_dir() / "features" / f"{name}.npz"


def image_trunk_features(
    tower: EfficientNetLiteTower, paths: list[Path], flip: bool, batch_size: int = 16, desc: str = "images"
) -> np.ndarray:
    """Trunk outputs, float16, shape [N, views, C, H, W] (views = 2 when ``flip``)."""
    transform = image_transform(tower.image_size)
    tower = tower.eval().to(memory_format=torch.channels_last)
    out = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch"):
            x = torch.stack([transform(Image.open(p)) for p in paths[start : start + batch_size]])
            views = [x, x.flip(-1)] if flip else [x]
            h = [tower.forward_trunk(v.contiguous(memory_format=torch.channels_last)) for v in views]
            out.append(torch.stack(h, 1).half().numpy())
    return np.concatenate(out)


def text_trunk_features(tower: MiniLMTextTower, texts: list[str], batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Token states after the trunk: (tokens [T, D] float16, offsets [N + 1] int64)."""
    tower = tower.eval()
    chunks, lengths = [], []
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), batch_size), desc="captions", unit="batch"):
            tok = tower.tokenize(texts[start : start + batch_size])
            h = tower.forward_trunk(tok["input_ids"], tok["attention_mask"])
            for row, mask in zip(h, tok["attention_mask"]):
                n = int(mask.sum())
                chunks.append(row[:n].half().numpy())
                lengths.append(n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return np.concatenate(chunks), offsets


def cached_image_features(data: Flickr8k, variant: str, image_size: int, trainable_blocks: int,
                          skip_blocks: Sequence[int] = ()) -> dict[str, np.ndarray]:
    """Per split trunk features ('train' with flips, 'val'/'test' without), computed once."""
    skipped = f"-skip{'.'.join(map(str, sorted(skip_blocks)))}" if skip_blocks else ""
    name = f"{variant}-{image_size}-top{trainable_blocks}{skipped}-{PREPROCESS_VERSION}"
    path = _feature_file(name)
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    tower = EfficientNetLiteTower(variant, image_size, trainable_blocks, skip_blocks)
    feats = {}
    for split in ("train", "val", "test"):
        idx = data.indices(split)
        paths = [data.root / "images" / data.images[i] for i in idx]
        feats[split] = image_trunk_features(tower, paths, flip=split == "train", desc=f"{name} {split}")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **feats)
    return feats


def cached_text_features(data: Flickr8k, trainable_layers: int) -> dict[str, np.ndarray]:
    """Token states for every caption (5 per image, in image order) of each split."""
    name = f"minilm-l6-top{trainable_layers}"
    path = _feature_file(name)
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    tower = MiniLMTextTower(trainable_layers)
    feats = {}
    for split in ("train", "val", "test"):
        texts = [c for i in data.indices(split) for c in data.captions[i]]
        tokens, offsets = text_trunk_features(tower, texts)
        feats[f"{split}_tokens"], feats[f"{split}_offsets"] = tokens, offsets
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **feats)
    return feats
