"""The float rows of an evaluation: recall of an encoder on a gallery (standard protocol) and its costs.

Recall uses the cached gallery embeddings. Footprint (params, size, peak memory) is measured in a
fresh child process per matcher so that one model's memory never shows up in another's numbers;
speeds (text-query latency, image throughput) of all evaluated matchers in one child process with
their rounds interleaved, so that speed ratios compare models under the same load.
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

from matcher.data.embed import GalleryEmbeddings, embed_gallery
from matcher.models.encoder import Encoder
from matcher.data.gallery import Gallery
from matcher.data.images import load_rgb
from matcher.eval.metrics import PROBE_QUERIES, retrieval_metrics
from matcher.registry import cached_encoder

@dataclass
class Footprint:
    """What a matcher costs to hold: measured in its own child process so that one model's memory
    never shows up in another's numbers."""

    params: int
    size_mb: float
    peak_rss_mb: float


@dataclass
class Speed:
    """Text-query latency (batch 1, incl. tokenisation) and image throughput (batch 8, incl.
    preprocessing): medians over rounds, with the spread of the per-round values."""

    text_query_ms: float
    images_per_s: float
    text_query_ms_range: tuple[float, float]
    images_per_s_range: tuple[float, float]


def peak_rss_mb() -> float:
    """This process's peak resident memory since its last exec, in MB.

    Why not ``getrusage(...).ru_maxrss``: Linux carries that maximum across ``exec``, and a spawned
    child is forked from its parent first, so it reported the *parent's* size at spawn time (eval's
    children showed the eval process's 1-1.7 GB, whichever matcher they loaded). ``VmHWM`` belongs to
    the address space the child built itself.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1 if platform.system() == "Darwin" else 1024  # bytes on macOS, kB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def measure_footprint(spec: str, image_paths: list[str]) -> Footprint:
    encoder = cached_encoder(spec)
    encoder.encode_texts(PROBE_QUERIES[:1])
    encoder.encode_images([load_rgb(p) for p in image_paths[:8]], batch_size=8)
    return Footprint(encoder.num_params(), encoder.size_mb(), peak_rss_mb())


def measure_speeds(specs: list[str], image_paths: list[str], rounds: int = 5, queries: int = 10,
                   threads: int | None = None) -> dict[str, Speed]:
    """``time_interleaved`` for registered matchers / checkpoints, loaded by spec.

    Specs that share one encoder (``offline-hashed`` encodes with ``offline-student``) are timed once
    and share the result: timing the same model twice adds run time and no information.
    """
    if threads:
        torch.set_num_threads(threads)
    encoders = {spec: cached_encoder(spec) for spec in specs}
    first_spec = {}
    for spec, encoder in encoders.items():
        first_spec.setdefault(id(encoder), spec)
    timed = time_interleaved({spec: encoders[spec] for spec in first_spec.values()},
                             [load_rgb(p) for p in image_paths], rounds, queries)
    return {spec: timed[first_spec[id(encoder)]] for spec, encoder in encoders.items()}


def time_interleaved(encoders: dict[str, Encoder], images: list, rounds: int = 5, queries: int = 10,
                     batch_size: int = 8) -> dict[str, Speed]:
    """Time every encoder in one process, rounds interleaved (A, B, C, A, B, C, ...).

    Why one process and interleaving: on a shared VM the load drifts by up to ~2x within minutes;
    timing each model in its own process, minutes apart, made the teacher/student ratio swing
    (3.9x to 10x for the same two models). Interleaved rounds expose every encoder to the same load,
    so the *ratios* are stable even when absolute numbers are not. (Most of that drift turned out to
    be glibc returning activation memory to the kernel, now switched off by ``matcher.runtime``;
    interleaving stays as the guard against the rest.)
    """
    for encoder in encoders.values():  # warm-up
        encoder.encode_texts(PROBE_QUERIES[:3])
        encoder.encode_images(images[:batch_size], batch_size=batch_size)
    text_ms: dict[str, list[float]] = {name: [] for name in encoders}
    rates: dict[str, list[float]] = {name: [] for name in encoders}
    for _ in range(rounds):
        for name, encoder in encoders.items():
            latencies = []
            for i in range(queries):
                started = time.perf_counter()
                encoder.encode_texts([PROBE_QUERIES[i % len(PROBE_QUERIES)]])
                latencies.append((time.perf_counter() - started) * 1000)
            text_ms[name].append(float(np.median(latencies)))
            started = time.perf_counter()
            encoder.encode_images(images, batch_size=batch_size)
            rates[name].append(len(images) / (time.perf_counter() - started))
    return {name: Speed(float(np.median(text_ms[name])), float(np.median(rates[name])),
                        (min(text_ms[name]), max(text_ms[name])), (min(rates[name]), max(rates[name])))
            for name in encoders}


def _in_child(fn, *args):
    """Run ``fn(*args)`` in a freshly spawned process (clean memory, no state from this one)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def evaluate_embeddings(emb: GalleryEmbeddings) -> dict:
    if len(emb.caption_texts) == 0:
        raise ValueError("the gallery has no captions, so recall cannot be measured")
    return retrieval_metrics(emb.captions @ emb.images.T, emb.caption_image)


def measure_encoders(specs: list[str], gallery: Gallery, probe_images: int = 64) -> dict[str, dict]:
    """The float row of every encoder spec: recall on the gallery, footprint, and speeds timed together.

    Speeds of all ``specs`` come from one ``measure_speeds`` run, so ratios between them (student vs
    teacher) are measured under the same load.
    """
    specs = list(dict.fromkeys(specs))
    if not specs:
        return {}
    entries, probe_paths = {}, None
    for spec in specs:
        emb = embed_gallery(cached_encoder(spec), gallery)
        result = evaluate_embeddings(emb)
        probe_paths = probe_paths or [str(gallery.path(n)) for n in emb.names[:probe_images]]
        footprint = _in_child(measure_footprint, spec, probe_paths)
        result.update(spec=spec, params=footprint.params, size_mb=round(footprint.size_mb, 2),
                      peak_rss_mb=round(footprint.peak_rss_mb, 1),
                      images=len(emb.names), captions=len(emb.caption_texts), skipped=len(emb.skipped))
        entries[spec] = result
    speeds = _in_child(measure_speeds, specs, probe_paths)
    for spec, speed in speeds.items():
        entries[spec].update(
            text_query_ms=round(speed.text_query_ms, 2), images_per_s=round(speed.images_per_s, 1),
            text_query_ms_range=[round(v, 2) for v in speed.text_query_ms_range],
            images_per_s_range=[round(v, 1) for v in speed.images_per_s_range])
    return entries


SPEED_PROBE_NOTE = ("text query: batch 1 incl. tokenisation, median of 10 per round; images: 64 gallery photos at "
                    "batch 8 incl. preprocessing; median of 5 rounds, every matcher timed in one process with "
                    "rounds interleaved (ratios under the same load); memory: each matcher in its own process")


def machine_description() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
