"""``python -m matcher bench --engine ray``: the default method sharded over Ray workers, against
the single-process index on the same items and queries."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from matcher.scale.shards import write_shards
from matcher.search.index import TwoStageIndex


def _percentiles(times: list[float]) -> tuple[float, float]:
    ms = np.asarray(times) * 1000
    return round(float(np.percentile(ms, 50)), 4), round(float(np.percentile(ms, 95)), 4)


def _overlap(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0].tolist()) & set(e.tolist())) / len(e) for f, e in zip(found, exact)]))


def _batched(search, queries: np.ndarray, size: int = 256):
    parts = [search(queries[s:s + size]) for s in range(0, len(queries), size)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _latency_and_qps(search, timed: np.ndarray, batch: np.ndarray) -> tuple[tuple[float, float], float]:
    """((p50, p95) ms of one query at a time, queries per second on ``batch`` at once)."""
    search(timed[:1])
    times = []
    for q in timed:
        t = time.perf_counter()
        search(q[None])
        times.append(time.perf_counter() - t)
    t, reps = time.perf_counter(), 0
    while reps < 5 and (reps == 0 or time.perf_counter() - t < 1.0):
        search(batch)
        reps += 1
    return _percentiles(times), round(reps * len(batch) / (time.perf_counter() - t), 1)


def ray_records(single: TwoStageIndex, items: np.ndarray, queries: np.ndarray, exact: np.ndarray, cfg, work: Path,
                common: dict, candidates: int) -> list[dict]:
    """One record per worker count (and per merge: ``rounds`` 2 = the single-process result, 1 = each
    shard re-ranks its own top-C); shards are written to ``work`` first."""
    from matcher.scale.engine import RayShards, start_ray

    stage = single.stage
    make = stage.empty_copy   # every shard gets the single index's trained parts: the same partition and codes
    rq, timed, batch, k = queries[:len(exact)], queries[:cfg.queries], queries[:cfg.batch], cfg.k
    _, ref = _batched(lambda q: single.search(q, k, candidates), rq)
    local_p50, local_qps = _latency_and_qps(lambda q: single.search(q, k, candidates), timed, batch)
    start_ray(num_cpus=max(cfg.workers))
    records = []
    for workers in cfg.workers:
        t = time.perf_counter()
        shards = write_shards(work / f"shards-{common['gallery']}-{common['N']}-w{workers}", make, items, None, workers,
                              train_size=cfg.train_size)
        build_s = time.perf_counter() - t
        engine = RayShards(shards)
        try:
            for rounds in (2, 1):
                def search(q, rounds=rounds):
                    return engine.search(q, k, candidates, rounds=rounds)

                _, ids = _batched(search, rq)
                (p50, p95), qps = _latency_and_qps(search, timed, batch)
                records.append({
                    **common, "method": f"{stage.name}+rerank C={candidates}", "engine": "ray", "workers": workers,
                    "shards": workers, "rounds": rounds, "candidates": candidates,
                    "merge": "global top-C, then each shard re-ranks its share" if rounds == 2 else
                             "each shard re-ranks its own top-C",
                    "recall_at_k": round(_overlap(ids, exact), 4),
                    "single_process_recall_at_k": round(_overlap(ref, exact), 4),
                    "same_topk_as_single_process": round(float(np.mean(np.all(ids == ref, axis=1))), 4),
                    "p50_ms": p50, "p95_ms": p95, "batch_qps": qps, "build_s": round(build_s, 2),
                    "single_process_p50_ms": local_p50[0], "single_process_batch_qps": local_qps,
                    "bytes_per_item": stage.bytes_per_item, "rerank_bytes_per_item": 2 * items.shape[1],
                    "shard_open_ms": [i["open_ms"] for i in engine.infos],
                    "label": f"ray x{workers} ({rounds}-round merge), N={common['N']:,} ({common['gallery']})"})
        finally:
            engine.close()
    return records
