"""Cache the frozen trunks' outputs on the training data so CPU training only runs the tops.

Image trunk outputs are stored per view (original, horizontally flipped, optional crops), text trunk outputs
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


def crop_boxes(n_images: int, crops: int, seed: int = 0) -> np.ndarray:
    """[n_images, crops, 4] relative crop boxes (x0, y0, x1, y1), the same for every model.

    Area 50-100 % of the photo, aspect 3:4 to 4:3. Milder than ImageNet's random-resized crops
    (8-100 %) because a caption describes the whole scene. Seeded, so the teacher's and the
    student's caches crop the same regions: each crop view's teacher embedding is the target for
    the student's view of that same crop ("consistent" distillation).
    """
    rng = np.random.default_rng(seed)
    area = rng.uniform(0.5, 1.0, (n_images, crops))
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), (n_images, crops)))
    w, h = np.minimum(np.sqrt(area * aspect), 1.0), np.minimum(np.sqrt(area / aspect), 1.0)
    x0, y0 = rng.uniform(0, 1, (n_images, crops)) * (1 - w), rng.uniform(0, 1, (n_images, crops)) * (1 - h)
    return np.stack([x0, y0, x0 + w, y0 + h], -1)


def _crop(image: Image.Image, box: np.ndarray) -> Image.Image:
    w, h = image.size
    return image.crop((round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)))


def image_trunk_features(
    tower: EfficientNetLiteTower, paths: list[Path], flip: bool, batch_size: int = 16, desc: str = "images",
    crops: np.ndarray | None = None,
) -> np.ndarray:
    """Trunk outputs, float16, shape [N, views, C, H, W].

    Views: the photo; its mirror image when ``flip``; then one view per box of ``crops`` ([N, K, 4],
    see ``crop_boxes``), every second one mirrored.
    """
    transform = image_transform(tower.image_size)
    tower = tower.eval().to(memory_format=torch.channels_last)
    out = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch"):
            photos = [Image.open(p).convert("RGB") for p in paths[start : start + batch_size]]
            x = torch.stack([transform(im) for im in photos])
            views = [x, x.flip(-1)] if flip else [x]
            for k in range(0 if crops is None else crops.shape[1]):
                v = torch.stack([transform(_crop(im, crops[start + i, k])) for i, im in enumerate(photos)])
                views.append(v.flip(-1) if k % 2 else v)
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
                          skip_blocks: Sequence[int] = (), crop_views: int = 0) -> dict[str, np.ndarray]:
    """Per split trunk features, computed once: 'train' with flips (+ ``crop_views`` crops, see
    ``crop_boxes``), 'val'/'test' the photos alone."""
    skipped = f"-skip{'.'.join(map(str, sorted(skip_blocks)))}" if skip_blocks else ""
    cropped = f"-crops{crop_views}" if crop_views else ""
    name = f"{variant}-{image_size}-top{trainable_blocks}{skipped}{cropped}-{PREPROCESS_VERSION}"
    path = _feature_file(name)
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    tower = EfficientNetLiteTower(variant, image_size, trainable_blocks, skip_blocks)
    feats = {}
    for split in ("train", "val", "test"):
        idx = data.indices(split)
        paths = [data.root / "images" / data.images[i] for i in idx]
        crops = crop_boxes(len(idx), crop_views) if split == "train" and crop_views else None
        feats[split] = image_trunk_features(tower, paths, flip=split == "train", desc=f"{name} {split}", crops=crops)
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
