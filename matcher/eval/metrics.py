"""The standard image-text retrieval protocol: Recall@K in both directions and rsum.

- text->image: every caption is a query; a hit if *its own* image is in the top K. Captions that
  repeat across images (Flickr8k has 207 such strings) count only for their own image.
- image->text: every image is a query; a hit if *any* of its captions is in the top K.
- rsum: the sum of the six recalls (in percent).
- The same recalls under CLIP_benchmark's names, as fractions 0-1: ``image_retrieval_recall@K``
  (text->image) and ``text_retrieval_recall@K`` (image->text), so results line up with its tables.
Ranks count strictly better scores, so ties are resolved in the query's favour.
"""
from __future__ import annotations

import numpy as np

KS = (1, 5, 10)
# The text queries every speed probe times (eval's text-query latency, the fine row's search time).
PROBE_QUERIES = [
    "a dog runs through the grass", "two children play on the beach", "a man rides a bike down a dirt path",
    "a woman in a red coat walks in the snow", "a group of people stand outside a building",
]


def t2i_ranks(sim: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """Rank (0 = best) of each caption's own image. ``sim`` is [captions, images]."""
    gt = sim[np.arange(len(sim)), caption_image]
    return (sim > gt[:, None]).sum(axis=1)


def i2t_ranks(sim: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """Best rank among each image's captions. ``sim`` is [captions, images]."""
    sim_i2t = sim.T  # [images, captions]
    n_images = sim_i2t.shape[0]
    ranks = np.full(n_images, sim.shape[0], dtype=np.int64)
    for c, img in enumerate(caption_image):
        rank = int((sim_i2t[img] > sim_i2t[img, c]).sum())
        ranks[img] = min(ranks[img], rank)
    return ranks


def recall_table(ranks: np.ndarray, ks=KS) -> dict[str, float]:
    return {f"R@{k}": float(100.0 * np.mean(ranks < k)) for k in ks}


def clip_benchmark_recalls(ranks: np.ndarray, retrieved: str, ks=KS) -> dict[str, float]:
    """``{"<retrieved>_retrieval_recall@K": fraction}``: CLIP_benchmark's name for a recall, where
    ``retrieved`` is what the queries retrieve ("image" for text->image, "text" for image->text)."""
    return {f"{retrieved}_retrieval_recall@{k}": float(np.mean(ranks < k)) for k in ks}


def clip_benchmark_from_recalls(t2i: dict[str, float], i2t: dict[str, float]) -> dict[str, float]:
    """The same names from percent recall tables (rows measured another way, e.g. two-stage search)."""
    return {**{f"image_retrieval_recall@{k[2:]}": v / 100 for k, v in t2i.items()},
            **{f"text_retrieval_recall@{k[2:]}": v / 100 for k, v in i2t.items()}}


def retrieval_metrics(sim: np.ndarray, caption_image: np.ndarray) -> dict:
    """{"t2i": {R@1, R@5, R@10}, "i2t": {...}, "rsum", "image_retrieval_recall@K", "text_retrieval_recall@K"}
    for a [captions, images] similarity matrix."""
    caption_image = np.asarray(caption_image)
    if sim.shape[0] != len(caption_image):
        raise ValueError(f"similarity has {sim.shape[0]} rows but {len(caption_image)} captions")
    has_caption = np.bincount(caption_image, minlength=sim.shape[1]) > 0
    ranks_t2i, ranks_i2t = t2i_ranks(sim, caption_image), i2t_ranks(sim, caption_image)[has_caption]
    t2i, i2t = recall_table(ranks_t2i), recall_table(ranks_i2t)
    return {"t2i": t2i, "i2t": i2t, "rsum": sum(t2i.values()) + sum(i2t.values()),
            **clip_benchmark_recalls(ranks_t2i, "image"), **clip_benchmark_recalls(ranks_i2t, "text")}
