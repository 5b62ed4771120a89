"""Scale benchmark: float flat, float HNSW, binary flat and binary + re-rank, from 1k to 1M items.

The gallery grows beyond the 8000 real Flickr8k images with *distractors*: vectors drawn from a
Gaussian with the mean and full covariance of the real image embeddings, then L2-normalised, so
they match the real embeddings' first two moments (and their codes come from the same hash head).
Items are ordered test, val, train, distractors: N = 1000 is exactly the real test split.
Queries are real test-caption embeddings (text->image); query encoding is excluded (it costs the
same for every index). Everything runs on one thread (faiss and numpy/BLAS).
"""
from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from matcher.atomic import atomic_path, write_json
from matcher.hashing.codes import Hasher
from matcher.search.hashed import rerank
from matcher.search.index import BinaryIndex

log = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    sizes: list[int] = field(default_factory=lambda: [1000, 10_000, 100_000, 1_000_000])
    model: str = "offline-student"
    data: str = ""
    heads: str = "assets/models/offline-hashed.pt"
    bits: int = 64
    candidates: list[int] = field(default_factory=lambda: [100, 1000])  # shortlist sizes C for binary+rerank
    queries: int = 200          # single queries timed per size and method
    batch: int = 256            # batch size for throughput; these queries also measure recall
    hnsw_m: int = 32
    hnsw_ef_construction: int = 40
    hnsw_ef_search: int = 64
    hnsw_max: int = 1_000_000   # float HNSW skipped above this N (build time)
    seed: int = 0
    k: int = 10


def distractors(real: np.ndarray, n: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """n unit vectors ~ normalise(N(mean(real), cov(real)))."""
    rng = np.random.default_rng(seed)
    mean, cov = real.mean(axis=0), np.cov(real, rowvar=False)
    chol = np.linalg.cholesky(cov + 1e-6 * np.eye(len(cov)))
    out = np.empty((n, real.shape[1]), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = mean + rng.standard_normal((m, real.shape[1])) @ chol.T
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def split_embeddings(spec: str, data: str, splits: tuple[str, ...]):
    """{split: GalleryEmbeddings} of one encoder on the shared Flickr8k folder (cached)."""
    from matcher.data.embed import embed_gallery
    from matcher.data.gallery import open_gallery
    from matcher.registry import cached_encoder

    gallery, encoder = open_gallery(data), cached_encoder(spec)
    return {s: embed_gallery(encoder, gallery.select(s)) for s in splits}, encoder


def _serialized_bytes(index) -> int:
    blob = faiss.serialize_index_binary(index) if isinstance(index, faiss.IndexBinary) else faiss.serialize_index(index)
    return int(blob.nbytes)


def _percentiles(times: list[float]) -> tuple[float, float]:
    ms = np.asarray(times) * 1000
    return round(float(np.percentile(ms, 50)), 4), round(float(np.percentile(ms, 95)), 4)


def _overlap(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of the exact top-k found in ``found`` (rows aligned)."""
    return float(np.mean([len(set(f[f >= 0]) & set(e)) / len(e) for f, e in zip(found, exact)]))


def _time_single(fn, queries: np.ndarray) -> tuple[float, float]:
    fn(queries[:1])  # warm-up
    times = []
    for q in queries:
        t = time.perf_counter()
        fn(q[None])
        times.append(time.perf_counter() - t)
    return _percentiles(times)


def _time_batch(fn, batch: np.ndarray, min_seconds: float = 1.0, max_reps: int = 5):
    """(queries per second, result of the first run)."""
    reps, elapsed, result = 0, 0.0, None
    while reps < max_reps and (elapsed < min_seconds or reps == 0):
        t = time.perf_counter()
        out = fn(batch)
        elapsed += time.perf_counter() - t
        reps += 1
        result = out if result is None else result
    return round(reps * len(batch) / elapsed, 1), result


def bench_size(items: np.ndarray, item_codes: np.ndarray, hasher: Hasher, queries: np.ndarray,
               cfg: BenchConfig, n_real: int) -> list[dict]:
    """All methods at one gallery size. ``item_codes`` are the first N rows of the packed codes."""
    n, dim = items.shape
    single, batch = queries[:cfg.queries], queries[:cfg.batch]
    common = {"N": n, "real_items": min(n, n_real), "distractors": max(0, n - n_real), "dim": dim,
              "bits": hasher.bits, "k": cfg.k, "threads": 1}
    records = []

    t = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    flat.add(items)
    build = time.perf_counter() - t
    p50, p95 = _time_single(lambda q: flat.search(q, cfg.k), single)
    qps, (_, exact) = _time_batch(lambda b: flat.search(b, cfg.k), batch)
    records.append({**common, "method": "float-flat", "build_s": round(build, 3),
                    "bytes_per_item": _serialized_bytes(flat) / n, "rerank_bytes_per_item": 0,
                    "p50_ms": p50, "p95_ms": p95, "batch_qps": qps, "recall_at_k": 1.0})

    if n <= cfg.hnsw_max:
        t = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = cfg.hnsw_ef_construction
        hnsw.add(items)
        build = time.perf_counter() - t
        hnsw.hnsw.efSearch = cfg.hnsw_ef_search
        p50, p95 = _time_single(lambda q: hnsw.search(q, cfg.k), single)
        qps, (_, ids) = _time_batch(lambda b: hnsw.search(b, cfg.k), batch)
        records.append({**common, "method": "float-hnsw", "build_s": round(build, 3),
                        "bytes_per_item": _serialized_bytes(hnsw) / n, "rerank_bytes_per_item": 0,
                        "p50_ms": p50, "p95_ms": p95, "batch_qps": qps, "recall_at_k": _overlap(ids, exact),
                        "note": f"M={cfg.hnsw_m} efConstruction={cfg.hnsw_ef_construction} efSearch={cfg.hnsw_ef_search}"})
        del hnsw
    else:
        records.append({**common, "method": "float-hnsw", "skipped": True,
                        "note": f"not built: N > --hnsw-max {cfg.hnsw_max} (build time on this shared 2-core machine)"})
    del flat
    gc.collect()

    t = time.perf_counter()
    binary = BinaryIndex(hasher.bits)
    binary.add(item_codes)
    build = time.perf_counter() - t  # + hashing the items, timed by the caller (code_s)
    code_bytes = _serialized_bytes(binary.index) / n

    def hamming_only(q):
        return binary.search(hasher.encode(q, "text"), cfg.k)

    p50, p95 = _time_single(hamming_only, single)
    qps, (_, ids) = _time_batch(hamming_only, batch)
    records.append({**common, "method": "binary-flat", "build_s": round(build, 3), "bytes_per_item": code_bytes,
                    "rerank_bytes_per_item": 0, "p50_ms": p50, "p95_ms": p95, "batch_qps": qps,
                    "recall_at_k": _overlap(ids, exact)})
    for c in cfg.candidates:
        def two_stage(q, c=c):
            _, cand = binary.search(hasher.encode(q, "text"), c)
            return rerank(q, cand, items, cfg.k)

        p50, p95 = _time_single(two_stage, single)
        qps, (_, ids) = _time_batch(two_stage, batch)
        _, cand = binary.search(hasher.encode(batch, "text"), c)
        records.append({**common, "method": f"binary+rerank C={c}", "candidates": c, "build_s": round(build, 3),
                        "bytes_per_item": code_bytes, "rerank_bytes_per_item": 4 * dim, "p50_ms": p50, "p95_ms": p95,
                        "batch_qps": qps, "recall_at_k": _overlap(ids, exact), "candidate_recall": _overlap(cand, exact),
                        "note": "re-rank vectors stay in RAM (or another tier); only C rows are read per query"})
    return records


def speedups(records: list[dict]) -> list[dict]:
    """binary+rerank (each C) vs float-flat p50 ratio per N."""
    out = []
    for n in sorted({r["N"] for r in records}):
        rows = [r for r in records if r["N"] == n and not r.get("skipped")]
        flat = next((r for r in rows if r["method"] == "float-flat"), None)
        for r in rows:
            if flat and r["method"].startswith("binary+rerank"):
                out.append({"N": n, "candidates": r["candidates"],
                            "p50_speedup_vs_float_flat": round(flat["p50_ms"] / r["p50_ms"], 2),
                            "code_bytes_per_item": r["bytes_per_item"], "recall_at_k": r["recall_at_k"]})
    return out


def figure(records: list[dict]):
    """Plotly figure: p50 single-query latency vs N, log-log, one line per method."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for method in dict.fromkeys(r["method"] for r in records):
        rows = sorted((r for r in records if r["method"] == method and not r.get("skipped")), key=lambda r: r["N"])
        fig.add_trace(go.Scatter(x=[r["N"] for r in rows], y=[r["p50_ms"] for r in rows], mode="lines+markers",
                                 name=method, error_y=dict(type="data", symmetric=False,
                                                           array=[r["p95_ms"] - r["p50_ms"] for r in rows])))
    fig.update_layout(title="Single-query latency (p50, bar to p95), one CPU thread", xaxis_title="gallery size N",
                      yaxis_title="ms per query", xaxis_type="log", yaxis_type="log", template="plotly_white")
    return fig


def load_hasher(cfg: BenchConfig, encoder) -> Hasher:
    from matcher.hashing.heads import check_base, load_heads
    from matcher.paths import REPO_ROOT

    hashers, meta = load_heads(REPO_ROOT / cfg.heads)
    try:
        check_base(encoder, meta, cfg.heads)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if cfg.bits not in hashers:
        raise SystemExit(f"error: {cfg.heads} has no {cfg.bits}-bit head (has {sorted(hashers)})")
    return hashers[cfg.bits]


def run_benchmark(cfg: BenchConfig, json_path: str | Path) -> dict:
    import torch

    from matcher.atomic import write_records_csv

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    if "OMP_NUM_THREADS" not in os.environ:
        log.info("numpy BLAS threads are not pinned; set OMP_NUM_THREADS=1 for strict single-thread numbers")
    emb, encoder = split_embeddings(cfg.model, cfg.data, ("test", "val", "train"))
    hasher = load_hasher(cfg, encoder)
    real = np.concatenate([emb[s].images for s in ("test", "val", "train")])
    queries = np.ascontiguousarray(emb["test"].captions[np.random.default_rng(cfg.seed).permutation(len(emb["test"].captions))])
    largest = max(cfg.sizes)
    t = time.perf_counter()
    items = np.concatenate([real, distractors(real, max(0, largest - len(real)), cfg.seed)])[:largest]
    codes = hasher.encode(items, "image")
    code_s = time.perf_counter() - t
    json_path = Path(json_path)
    report = {"config": asdict(cfg), "code_s_all_items": round(code_s, 2),
              "gallery": "real Flickr8k image embeddings (test, val, train) + Gaussian distractors matched to "
                         "their mean and covariance", "records": [], "speedups": []}
    for n in tqdm(sorted(cfg.sizes), desc="bench sizes", unit="size"):
        report["records"] += bench_size(np.ascontiguousarray(items[:n]), codes[:n], hasher, queries, cfg, len(real))
        for r in report["records"]:
            r.setdefault("load_average_1m", round(os.getloadavg()[0], 2))  # shared machine: context for timings
        report["speedups"] = speedups(report["records"])
        write_json(json_path, report)  # partial results survive a long run being stopped
        write_records_csv(json_path.with_suffix(".csv"), report["records"])
        gc.collect()
    fig = figure(report["records"])
    with atomic_path(json_path.with_suffix(".html")) as tmp:
        fig.write_html(str(tmp), include_plotlyjs="cdn")
    with atomic_path(json_path.with_suffix(".fig.json")) as tmp:
        tmp.write_text(fig.to_json())
    for s in report["speedups"]:
        print(f"N={s['N']:>9,} C={s['candidates']}: binary+rerank p50 {s['p50_speedup_vs_float_flat']}x faster than float flat, "
              f"{s['code_bytes_per_item']:.0f} B/item codes, recall@k {s['recall_at_k']:.3f}")
    print(f"wrote {json_path} (+ .csv, .html, .fig.json)")
    return report
