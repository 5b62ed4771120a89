"""Cache the frozen trunks' outputs on the training data so CPU training only runs the tops.

Image trunk outputs are stored per view (original, horizontally flipped, optional crops), text trunk outputs
as ragged token states (concatenated tokens + offsets) to avoid storing padding.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from matcher.data.cache import ArrayCache
from matcher.paths import cache_dir
from matcher.models.towers import PREPROCESS_VERSION, EfficientNetLiteTower, MiniLMTextTower, image_transform


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

    @cached_property
    def digest(self) -> str:
        """Identity of this copy: ``captions.jsonl`` (names, captions, splits) and every photo's size.

        Stored with each training cache, because cache names say which model and preprocessing made
        the features, not from which data: a cache of another copy (a subset, a test folder) under
        the same cache directory would otherwise be reused silently.
        """
        digest = hashlib.sha256((self.root / "captions.jsonl").read_bytes())
        for name in self.images:
            digest.update(f"{name}:{(self.root / 'images' / name).stat().st_size};".encode())
        return digest.hexdigest()[:16]


def file_digest(path: Path) -> str:
    """Content hash of a checkpoint: caches derived from it are keyed by what it holds, not its name."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def cached_arrays(name: str, data: Flickr8k, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The training cache ``name`` for ``data``: loaded when intact and made from the same data, else built.

    Entries go through ``ArrayCache``: written atomically with a checksum, so a truncated or corrupted
    file is reported and rebuilt instead of crashing a training run. (Caches written before this
    check, in ``features/`` without a checksum, are not read; delete that folder to reclaim the space.)
    """
    cache = ArrayCache(cache_dir() / "training")
    hit = cache.get(name)
    if hit is not None and hit[1].get("data") == data.digest:
        return hit[0]
    arrays = build()
    cache.put(name, arrays, {"data": data.digest, "root": str(data.root)})
    return arrays


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

    def build() -> dict[str, np.ndarray]:
        tower = EfficientNetLiteTower(variant, image_size, trainable_blocks, skip_blocks)
        feats = {}
        for split in ("train", "val", "test"):
            idx = data.indices(split)
            paths = [data.root / "images" / data.images[i] for i in idx]
            crops = crop_boxes(len(idx), crop_views) if split == "train" and crop_views else None
            feats[split] = image_trunk_features(tower, paths, flip=split == "train", desc=f"{name} {split}", crops=crops)
        return feats

    return cached_arrays(name, data, build)


def cached_text_features(data: Flickr8k, trainable_layers: int) -> dict[str, np.ndarray]:
    """Token states for every caption (5 per image, in image order) of each split."""
    def build() -> dict[str, np.ndarray]:
        tower = MiniLMTextTower(trainable_layers)
        feats = {}
        for split in ("train", "val", "test"):
            texts = [c for i in data.indices(split) for c in data.captions[i]]
            tokens, offsets = text_trunk_features(tower, texts)
            feats[f"{split}_tokens"], feats[f"{split}_offsets"] = tokens, offsets
        return feats

    return cached_arrays(f"minilm-l6-top{trainable_layers}", data, build)
