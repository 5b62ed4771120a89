"""Augmented views of real photos, and a gallery grown from them: distractors with real structure.

Gaussian distractors (``matcher.hashing.bench.distractors``) match the real embeddings' mean and
covariance but have no clusters and no near-duplicates. Here the gallery grows from the photos
themselves instead:

1. **Views**: each photo is re-encoded under random crops, flips and colour changes
   (``augment``), deterministic per (seed, photo, view), so the same view comes out of every engine
   (a plain loop here, Ray Data in ``matcher.scale.encode``).
2. **Mixture** (``ViewMixture``): one Gaussian component per photo, centred on the photo's own
   embedding plus the mean augmentation shift, with the covariance of the view-minus-photo
   displacements pooled over all views. Sampling it yields as many near-neighbours of real photos as
   wanted without encoding millions of images.

What this can tell that Gaussian draws cannot: how codes separate *tight clusters* of similar images
(the usual state of a large photo collection), where the 10th and 11th best scores are very close.
What it cannot: it has no content beyond the 8000 Flickr8k scenes, so it says nothing about a
collection with topics these photos lack.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

log = logging.getLogger(__name__)

VIEWS_FORMAT = "matcher-views/1"   # part of the cache key: a change of ``augment`` re-encodes


def view_rng(seed: int, photo: int, view: int) -> np.random.Generator:
    return np.random.default_rng([seed, photo, view])


def augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One random view: crop 35-100 % of the area (aspect 3/4-4/3) resized back, a flip half the
    time, brightness / contrast / saturation each scaled by 0.7-1.3."""
    w, h = image.size
    for _ in range(10):
        area = rng.uniform(0.35, 1.0) * w * h
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        cw, ch = w, h
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = image.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BILINEAR)
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enhance(out).enhance(float(rng.uniform(0.7, 1.3)))
    return out


def encode_views(encode_images: Callable[[list[Image.Image]], np.ndarray], paths: Sequence[str | Path],
                 photos: Sequence[int], views: Sequence[int], seed: int) -> np.ndarray:
    """Embeddings [len(paths), D] of view ``views[i]`` of photo ``photos[i]`` (file ``paths[i]``)."""
    from matcher.data.images import load_rgb

    images = [augment(load_rgb(p), view_rng(seed, int(i), int(v))) for p, i, v in zip(paths, photos, views)]
    return np.asarray(encode_images(images), np.float32)


def view_items(n_photos: int, views: int) -> tuple[np.ndarray, np.ndarray]:
    """(photo, view) of every view, photo-major: photo 0 views 0..V-1, photo 1 ..."""
    return np.repeat(np.arange(n_photos), views), np.tile(np.arange(views), n_photos)


@dataclass
class ViewMixture:
    """A Gaussian per photo: mean = photo embedding + mean view shift, shared covariance of the
    view displacements (fitted from real augmented views); samples are L2-normalised."""

    centres: np.ndarray    # [P, D] the photos' own embeddings
    shift: np.ndarray      # [D] mean of (view - its photo)
    chol: np.ndarray       # [D, D] Cholesky factor of the displacements' covariance

    @classmethod
    def fit(cls, photos: np.ndarray, view_vectors: np.ndarray, owners: np.ndarray) -> "ViewMixture":
        displacement = view_vectors - photos[owners]
        shift = displacement.mean(axis=0)
        cov = np.cov(displacement - shift, rowvar=False)
        chol = np.linalg.cholesky(cov + 1e-7 * np.eye(len(cov)))
        return cls(np.asarray(photos, np.float32), shift.astype(np.float32), chol.astype(np.float32))

    def sample(self, n: int, seed: int, chunk: int = 100_000) -> np.ndarray:
        rng = np.random.default_rng(seed)
        dim = self.centres.shape[1]
        out = np.empty((n, dim), np.float32)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            x = self.centres[rng.integers(0, len(self.centres), m)] + self.shift + rng.standard_normal((m, dim)).astype(np.float32) @ self.chol.T
            out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    def spread(self) -> dict:
        """How far a view moves from its photo, against how far photos are from each other (cosines)."""
        rng = np.random.default_rng(0)
        a = self.centres[rng.integers(0, len(self.centres), 2000)]
        b = self.centres[rng.integers(0, len(self.centres), 2000)]
        s = self.sample(2000, seed=1)
        return {"photo_to_photo_cos_mean": round(float(np.mean(np.sum(a * b, axis=1))), 4),
                "view_shift_norm": round(float(np.linalg.norm(self.shift)), 4),
                "displacement_rms": round(float(np.sqrt(np.sum(self.chol ** 2))), 4),
                "sample_norm_check": round(float(np.mean(np.linalg.norm(s, axis=1))), 4)}
