"""Evaluate matchers on a gallery split: recall (standard protocol) plus cost measurements.

Recall uses the cached gallery embeddings. Costs (params, size, text-query latency, image
throughput, peak memory) are measured in a fresh child process per matcher so that one model's
memory never shows up in another's numbers.
"""
from __future__ import annotations

import multiprocessing
import platform
from concurrent.futures import ProcessPoolExecutor
import resource
import time
from dataclasses import dataclass

import numpy as np
import torch

from matcher.embed import GalleryEmbeddings, embed_gallery
from matcher.gallery import Gallery
from matcher.images import load_rgb
from matcher.metrics import retrieval_metrics
from matcher.models import cached_encoder

PROBE_QUERIES = [
    "a dog runs through the grass", "two children play on the beach", "a man rides a bike down a dirt path",
    "a woman in a red coat walks in the snow", "a group of people stand outside a building",
]


@dataclass
class CostProbe:
    """What the child process measures for one matcher."""

    params: int
    size_mb: float
    text_query_ms: float
    images_per_s: float
    peak_rss_mb: float


def measure_costs(spec: str, image_paths: list[str], repeats: int = 30, threads: int | None = None,
                  image_passes: int = 5) -> CostProbe:
    """Single text query latency (p50 of ``repeats``, batch 1) and image throughput (batch 8, incl.
    preprocessing; median of ``image_passes`` passes over the probe images)."""
    if threads:
        torch.set_num_threads(threads)
    encoder = cached_encoder(spec)
    for q in PROBE_QUERIES[:3]:  # warm-up
        encoder.encode_texts([q])
    latencies = []
    for i in range(repeats):
        started = time.perf_counter()
        encoder.encode_texts([PROBE_QUERIES[i % len(PROBE_QUERIES)]])
        latencies.append((time.perf_counter() - started) * 1000)
    images = [load_rgb(p) for p in image_paths]
    encoder.encode_images(images[:8], batch_size=8)  # warm-up
    rates = []
    for _ in range(image_passes):  # one pass is ~1 s for the teacher: too short to be stable on a shared VM
        started = time.perf_counter()
        encoder.encode_images(images, batch_size=8)
        rates.append(len(images) / (time.perf_counter() - started))
    throughput = float(np.median(rates))
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return CostProbe(encoder.num_params(), encoder.size_mb(), float(np.median(latencies)), throughput, peak_kb / 1024)


def measure_costs_isolated(spec: str, image_paths: list[str]) -> CostProbe:
    """``measure_costs`` in a spawned process (clean memory accounting)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure_costs, spec, image_paths).result()


def evaluate_embeddings(emb: GalleryEmbeddings) -> dict:
    if len(emb.caption_texts) == 0:
        raise ValueError("the gallery has no captions, so recall cannot be measured")
    return retrieval_metrics(emb.captions @ emb.images.T, emb.caption_image)


def evaluate_matcher(spec: str, gallery: Gallery, probe_images: int = 64) -> tuple[dict, GalleryEmbeddings]:
    """The eval-JSON entry for one matcher and the embeddings it was computed from."""
    emb = embed_gallery(cached_encoder(spec), gallery)
    result = evaluate_embeddings(emb)
    paths = [str(gallery.path(n)) for n in emb.names[:probe_images]]
    costs = measure_costs_isolated(spec, paths)
    result.update(
        spec=spec, params=costs.params, size_mb=round(costs.size_mb, 2), text_query_ms=round(costs.text_query_ms, 2),
        images_per_s=round(costs.images_per_s, 1), peak_rss_mb=round(costs.peak_rss_mb, 1),
        images=len(emb.names), captions=len(emb.caption_texts), skipped=len(emb.skipped),
    )
    return result, emb


def machine_description() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
