"""Encoding a big gallery on Ray Data: ``map_batches`` with an actor pool (each actor loads the
encoder once), results written by the workers as shard files, then index shards built from them.

Each input row is ``{"row", "path", "photo", "view"}``; ``view < 0`` encodes the image as it is,
``view >= 0`` encodes that augmented view (``matcher.scale.views``, deterministic per (seed, photo,
view), so the vectors equal a plain loop's). Output files are Parquet with columns ``row`` (int64)
and ``vector`` (float32 bytes, D x 4 per row): plain Arrow types any reader understands.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from matcher.scale.engine import _ray


class EncodeBatch:
    """The per-actor callable: encoder loaded once, then batch after batch."""

    def __init__(self, spec: str, seed: int = 0):
        import torch

        from matcher.registry import load_encoder

        torch.set_num_threads(1)
        self.encoder, self.seed = load_encoder(spec), seed

    def __call__(self, batch: dict) -> dict:
        from matcher.data.images import load_rgb
        from matcher.scale.views import augment, view_rng

        images = []
        for path, photo, view in zip(batch["path"], batch["photo"], batch["view"]):
            image = load_rgb(str(path))
            images.append(augment(image, view_rng(self.seed, int(photo), int(view))) if int(view) >= 0 else image)
        vectors = np.asarray(self.encoder.encode_images(images, batch_size=len(images)), np.float32)
        return {"row": np.asarray(batch["row"], np.int64), "vector": np.array([v.tobytes() for v in vectors], dtype=object)}


def encode_on_ray(paths: Sequence[str | Path], spec: str, out_dir: str | Path, workers: int = 2, batch: int = 32,
                  photos: Sequence[int] | None = None, views: Sequence[int] | None = None, seed: int = 0) -> list[Path]:
    """Encode ``paths`` (optionally as views) with ``workers`` encoder actors; the workers write
    Parquet shard files into ``out_dir``. Returns the files written."""
    ray = _ray()
    n = len(paths)
    rows = [{"row": i, "path": str(p), "photo": int(photos[i]) if photos is not None else i,
             "view": int(views[i]) if views is not None else -1} for i, p in enumerate(paths)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(n, workers * 4)))
    ds = ds.map_batches(EncodeBatch, fn_constructor_kwargs={"spec": spec, "seed": seed}, batch_size=batch,
                        concurrency=workers, num_cpus=1, batch_format="numpy")
    ds.write_parquet(str(out_dir))
    return sorted(out_dir.glob("*.parquet"))


def read_encoded(files: Sequence[str | Path], dim: int | None = None) -> np.ndarray:
    """The vectors of Parquet shard files, ordered by row: [N, D] float32."""
    import pyarrow.parquet as pq

    rows, vectors = [], []
    for f in files:
        table = pq.read_table(f, columns=["row", "vector"])
        rows.append(table.column("row").to_numpy())
        vectors += [np.frombuffer(b, np.float32) for b in table.column("vector").to_pylist()]
    order = np.argsort(np.concatenate(rows))
    out = np.stack(vectors)[order] if vectors else np.zeros((0, dim or 0), np.float32)
    return out
