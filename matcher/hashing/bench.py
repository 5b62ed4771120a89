"""Scale benchmark: exact float search against two-stage code indexes, from 1k to 1M items.

Methods (``BenchConfig.methods``), all on the same gallery and queries in one process:

- ``float-flat`` (exact inner product: the reference every recall is measured against) and
  ``float-hnsw`` (up to ``hnsw_max`` items: its build is slow on one thread);
- hash codes of ``bits`` (default 256 = 32 B/item) from a family ``hei`` (the trained heads), ``itq``
  or ``lsh`` (fitted on the train split's embeddings), shortlisted by ``-asym`` (the query's real
  projection against the items' bits, ``SignStage``) or ``-hamming`` (code against code); ``@B``
  picks another code length (``hei-asym@128``);
- any faiss factory string over the float vectors (the anchors): ``PQ64x4fs`` (32 B), ``PQ32x4fs``
  (16 B), ``RaBitQfs`` (1 bit per dimension + corrections: 40 B at D = 256), ``SVD192,RaBitQfs``
  (RaBitQ at 32 B on a 192-d projection that keeps inner products; ``QuantizedIndex``);

``bytes_per_item`` is what each item costs in the code index (its code); ``index_bytes_per_item``
the index file over N, fixed codebooks included. Each method runs as "codes only" (top-10 by code
score) and re-ranked: top-C by code score, then exact inner
product of those C from the float16 re-rank tier, a memory-mapped file (``C in candidates``).

Galleries (``BenchConfig.gallery``): the 8000 real Flickr8k image embeddings in the order test,
val, train (N = 1000 is exactly the test split), then distractors, either ``gaussian`` (draws
matched to the real embeddings' mean and covariance) or ``views`` (encoded augmented views of the
real photos, then samples of a mixture fitted to them: ``matcher.scale.views``). Queries are real
test-caption embeddings (text->image); query encoding is excluded (the same for every method).
Everything runs on one thread; single-query latencies are interleaved (blocks of 25 queries, every
method in turn in a random order per block) so a busy machine slows all methods alike.

With ``engine="ray"`` the default method also runs sharded over ``workers`` Ray actors
(``matcher.scale``), recording its recall, whether its top-k equals the single-process index's,
latency and throughput per number of workers.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import faiss
import numpy as np
from tqdm import tqdm

from matcher.atomic import atomic_path, write_json
from matcher.hashing.codes import Hasher, LayeredHasher
from matcher.search.index import (CandidateStage, FloatIndex, HammingStage, QuantizedIndex, QuantizerStage, SignStage,
                                  TwoStageIndex, factory_for, index_bytes, ivf_lists)

log = logging.getLogger(__name__)

FLOAT_METHODS = ("float-flat", "float-hnsw")
DEFAULT_METHODS = ["float-flat", "float-hnsw",
                   # flat scans of 32 B codes (16 B for @128 / PQ32x4fs, 40 B for RaBitQfs)
                   "hei-asym", "hei-hamming", "itq-asym", "lsh-asym", "hei-asym@128", "PQ64x4fs", "PQ32x4fs",
                   "RaBitQfs", "SVD192,RaBitQfs",
                   # inverted lists ({n} = ivf_lists(N)), 24 B codes + 8 B ids; the query scans 20 % of the lists
                   "hei-asym-ivf@192", "itq-asym-ivf@192", "SVD192,IVF{n},PQ48x4fs", "SVD128,IVF{n},RaBitQfs"]
DEFAULT_METHOD = "hei-asym-ivf@192"   # what `index build` and the Ray engine use by default; chosen by this benchmark
DEFAULT_CANDIDATES = 2000         # its shortlist: recall >= 0.99 on both galleries at 1M (docs/scale.md)
CODE_BUDGET = 32                  # bytes per item the code stage may cost (issue #17)
HASH_METHOD = re.compile(r"^(hei|itq|lsh)-(asym|hamming)(-ivf)?(?:@(\d+))?$")
IVF_PROBE = 0.2                   # share of the inverted lists an IVF method scans


@dataclass
class BenchConfig:
    sizes: list[int] = field(default_factory=lambda: [1000, 10_000, 100_000, 1_000_000])
    model: str = "offline-student"
    data: str = ""
    heads: str = "assets/models/offline-hashed.pt"
    bits: int = 256                 # code length of the hash-code methods without @B (32 B/item)
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    candidates: list[int] = field(default_factory=lambda: [100, 300, 500, 750, 1000, 3000])  # shortlist sizes C
    queries: int = 200              # single queries timed per size and method (per round)
    rounds: int = 3                 # interleaved timing rounds
    batch: int = 256                # batch size for throughput
    recall_queries: int = 1000      # queries whose top-k recall is measured (batch)
    galleries: list[str] = field(default_factory=lambda: ["gaussian", "views"])
    views: int = 4                  # augmented views encoded per real photo (gallery "views")
    hnsw_m: int = 32
    hnsw_ef_construction: int = 40
    hnsw_ef_search: int = 64
    hnsw_max: int = 100_000         # float HNSW skipped above this N (462 s to build at 1M on one thread)
    train_size: int = 65_536        # vectors a faiss quantiser is trained on (drawn from the gallery)
    seed: int = 0
    k: int = 10
    engine: str = "local"           # "ray": also shard the default method over Ray workers
    workers: list[int] = field(default_factory=lambda: [2])
    store: bool = True              # build the default method's index directory and reopen it in a new process
    default_method: str = DEFAULT_METHOD   # the method the index directory and the Ray engine use
    work_dir: str = ""              # re-rank tier and index directories (default: a temporary folder)


# -- galleries ---------------------------------------------------------------------------------

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


def view_embeddings(encoder, data: str, splits: tuple[str, ...], views: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(vectors [P * views, D], photo row of each) of augmented views of the photos of ``splits`` in
    that order, encoded once and kept in the embedding cache."""
    import hashlib

    from matcher.data.cache import ArrayCache
    from matcher.data.gallery import open_gallery
    from matcher.scale.views import VIEWS_FORMAT, encode_views, view_items

    gallery = open_gallery(data)
    names = [n for s in splits for n in gallery.select(s).names]
    key = hashlib.sha256(json.dumps([VIEWS_FORMAT, encoder.fingerprint(), names, views, seed]).encode()).hexdigest()[:32]
    cache = ArrayCache()
    hit = cache.get(f"views-{key}")
    if hit is not None:
        return hit[0]["vectors"], hit[0]["photos"]
    photos, view_ids = view_items(len(names), views)
    out, batch = [], 64
    for start in tqdm(range(0, len(photos), batch), desc=f"{encoder.name}: encoding {views} views per photo", unit="batch"):
        p, v = photos[start:start + batch], view_ids[start:start + batch]
        out.append(encode_views(encoder.encode_images, [gallery.path(names[i]) for i in p], p, v, seed))
    vectors = np.concatenate(out)
    cache.put(f"views-{key}", {"vectors": vectors, "photos": photos}, {"names": len(names), "views": views})
    return vectors, photos


def grow_gallery(kind: str, real: np.ndarray, n: int, seed: int, views: tuple[np.ndarray, np.ndarray] | None = None):
    """The first ``n`` items of a gallery: real embeddings, then distractors of ``kind``; and a note."""
    extra = max(0, n - len(real))
    if kind == "gaussian":
        return (np.concatenate([real, distractors(real, extra, seed)])[:n],
                {"distractors": "Gaussian draws matched to the real embeddings' mean and covariance, L2-normalised"})
    if kind == "views":
        from matcher.scale.views import ViewMixture

        vectors, photos = views
        mixture = ViewMixture.fit(real, vectors, photos)
        sampled = mixture.sample(max(0, extra - len(vectors)), seed)
        return (np.concatenate([real, vectors[:extra], sampled])[:n],
                {"distractors": f"{len(vectors)} encoded augmented views of the real photos, then samples of a "
                                "Gaussian mixture fitted to them (one component per photo, shared covariance of "
                                "the view displacements)", "mixture": mixture.spread()})
    raise ValueError(f"unknown gallery {kind!r}: expected gaussian or views")


# -- methods -----------------------------------------------------------------------------------

def make_method(name: str, hashers: dict[str, dict[int, Hasher]], bits: int, dim: int, n: int) -> CandidateStage:
    """An empty candidate stage by bench name (module docstring) for a gallery of n items."""
    m = HASH_METHOD.match(name)
    if m:
        family, scoring, ivf, b = m.group(1), m.group(2), bool(m.group(3)), int(m.group(4) or bits)
        hasher = hashers[family].get(b)
        if hasher is None and family == "hei":   # a shorter code: the first b bits of a longer head
            longer = [h for h in sorted(hashers["hei"]) if h > b]
            hasher = LayeredHasher.of(hashers["hei"][longer[0]]).first(b) if longer else None
        if hasher is None:
            raise ValueError(f"no {b}-bit {family} hasher (have {sorted(hashers[family])})")
        if scoring == "hamming":
            if ivf:
                raise ValueError(f"{name}: inverted lists are for the asymmetric score only")
            return HammingStage(hasher)
        return SignStage(hasher, nlist=ivf_lists(n) if ivf else 0, probe=IVF_PROBE)
    factory = factory_for(name, n)
    return QuantizerStage(factory, dim, QuantizedIndex(factory, dim, probe=IVF_PROBE))


def needed_bits(methods: list[str], bits: int) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {"hei": set(), "itq": set(), "lsh": set()}
    for name in methods:
        m = HASH_METHOD.match(name)
        if m:
            out[m.group(1)].add(int(m.group(4) or bits))
    return out


def _percentiles(times: list[float]) -> tuple[float, float]:
    ms = np.asarray(times) * 1000
    return round(float(np.percentile(ms, 50)), 4), round(float(np.percentile(ms, 95)), 4)


def overlap(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of the exact top-k found in ``found`` (rows aligned)."""
    return float(np.mean([len(set(f[f >= 0].tolist()) & set(e.tolist())) / len(e) for f, e in zip(found, exact)]))


def time_interleaved(fns: dict[str, Callable[[np.ndarray], object]], queries: np.ndarray, rounds: int,
                     block: int = 25, seed: int = 0) -> dict[str, tuple[float, float]]:
    """p50/p95 ms of one query at a time. The queries are cut into blocks; every method runs each
    block in turn, in a fresh random order per block and round, so load from other processes on a
    shared machine falls on all methods alike (their ratios stay comparable) while each method still
    runs ``block`` queries in a row, as a server dedicated to it would (warm caches)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for fn in fns.values():
        fn(queries[:1])  # warm-up
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        for start in range(0, len(queries), block):
            for i in rng.permutation(len(names)):
                fn, spent = fns[names[i]], times[names[i]]
                for q in queries[start:start + block]:
                    t = time.perf_counter()
                    fn(q[None])
                    spent.append(time.perf_counter() - t)
    return {name: _percentiles(ts) for name, ts in times.items()}


def _qps(fn, batch: np.ndarray, min_seconds: float = 1.0, max_reps: int = 5) -> float:
    reps, elapsed = 0, 0.0
    while reps < max_reps and (elapsed < min_seconds or reps == 0):
        t = time.perf_counter()
        fn(batch)
        elapsed += time.perf_counter() - t
        reps += 1
    return round(reps * len(batch) / elapsed, 1)


def write_rerank_tier(items: np.ndarray, path: Path) -> np.ndarray:
    """The re-rank vectors as a float16 file, reopened memory-mapped (what an index directory holds)."""
    with open(path, "wb") as f:
        for start in range(0, len(items), 100_000):
            f.write(items[start:start + 100_000].astype(np.float16).tobytes())
    return np.memmap(path, dtype=np.float16, mode="r", shape=items.shape)


def bench_size(items: np.ndarray, queries: np.ndarray, cfg: BenchConfig, stages: dict[str, Callable[[int], CandidateStage]],
               tier: np.ndarray, n_real: int, gallery: str = "gaussian") -> tuple[list[dict], dict, np.ndarray]:
    """Every method at one gallery size. ``stages`` maps a method name to a factory of an empty
    candidate stage for N items; ``tier`` holds the re-rank vectors (float16, ideally memory-mapped) of at least
    these N items. Returns (records, {method: TwoStageIndex}, exact top-k ids of the recall queries)
    for further use (index directory, Ray)."""
    n, dim = items.shape
    rq, single, batch = queries[:cfg.recall_queries], queries[:cfg.queries], queries[:cfg.batch]
    common = {"N": n, "gallery": gallery, "real_items": min(n, n_real), "distractors": max(0, n - n_real),
              "dim": dim, "k": cfg.k, "threads": 1}
    built, fns, records = {}, {}, []

    flat = FloatIndex(dim)
    t = time.perf_counter()
    flat.add(items)
    built["float-flat"] = {"build_s": round(time.perf_counter() - t, 3), "bytes_per_item": 4 * dim,
                           "index_bytes_per_item": round(index_bytes(flat.index) / n, 3), "rerank_bytes_per_item": 0}
    exact = flat.search(rq, cfg.k)[1]
    fns["float-flat"] = lambda q: flat.search(q, cfg.k)
    if "float-hnsw" in cfg.methods:
        if n <= cfg.hnsw_max:
            hnsw = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = cfg.hnsw_ef_construction
            t = time.perf_counter()
            hnsw.add(items)
            hnsw.hnsw.efSearch = cfg.hnsw_ef_search
            built["float-hnsw"] = {"build_s": round(time.perf_counter() - t, 3), "rerank_bytes_per_item": 0,
                                   "bytes_per_item": round(index_bytes(hnsw) / n, 1),
                                   "index_bytes_per_item": round(index_bytes(hnsw) / n, 3),
                                   "note": f"M={cfg.hnsw_m} efConstruction={cfg.hnsw_ef_construction} efSearch={cfg.hnsw_ef_search}"}
            fns["float-hnsw"] = lambda q: hnsw.search(q, cfg.k)
        else:
            records.append({**common, "method": "float-hnsw", "engine": "local", "skipped": True,
                            "note": f"not built: N > hnsw_max {cfg.hnsw_max} (build time on one thread)"})

    indexes: dict[str, TwoStageIndex] = {}
    sample = items[np.random.default_rng(cfg.seed).permutation(n)[:cfg.train_size]]
    for name, factory in stages.items():
        stage = factory(n)
        t = time.perf_counter()
        stage.train(sample)
        stage.add(items, "image")   # hashing the items is part of building
        two = TwoStageIndex(stage, tier[:n] if len(tier) > n else tier)
        indexes[name] = two
        built[name] = {"build_s": round(time.perf_counter() - t, 3), "bytes_per_item": stage.bytes_per_item,
                       "index_bytes_per_item": round(stage.index_bytes_per_item, 3), "rerank_bytes_per_item": 0,
                       "stage": stage.name}
        fns[f"{name} (codes only)"] = lambda q, st=stage: st.search(q, cfg.k)
        for c in cfg.candidates:
            if c < n:
                fns[f"{name}+rerank C={c}"] = lambda q, two=two, c=c: two.search(q, cfg.k, c)
    timings = time_interleaved(fns, single, cfg.rounds)

    for label, fn in fns.items():
        base = label.split("+rerank")[0].split(" (codes only)")[0]
        info = dict(built[base])
        rec = {**common, "method": label, "engine": "local", **info}
        rec["p50_ms"], rec["p95_ms"] = timings[label]
        rec["batch_qps"] = _qps(fn, batch)
        if label in FLOAT_METHODS:
            ids = exact if label == "float-flat" else fn(rq)[1]
        elif "+rerank" in label:
            c = int(label.rsplit("=", 1)[1])
            two = indexes[base]
            _, cand = two.candidates(rq, c)
            _, ids = two.rerank(rq, cand, cfg.k)
            rec.update(candidates=c, candidate_recall=round(overlap(cand, exact), 4), rerank_tier="float16 mmap",
                       rerank_bytes_per_item=2 * dim)
        else:
            ids = fn(rq)[1]
        rec["recall_at_k"] = round(overlap(ids, exact), 4)
        rec["label"] = f"{label}, N={n:,} ({gallery})"
        records.append(rec)
    del flat
    gc.collect()
    return records, indexes, exact


# -- summaries ---------------------------------------------------------------------------------

def speedups(records: list[dict]) -> list[dict]:
    """Every re-ranked method's p50 speed-up over float flat, per gallery and N."""
    out = []
    for key in sorted({(r.get("gallery", ""), r["N"]) for r in records}):
        rows = [r for r in records if (r.get("gallery", ""), r["N"]) == key and not r.get("skipped")
                and r.get("engine", "local") == "local"]
        flat = next((r for r in rows if r["method"] == "float-flat"), None)
        for r in rows:
            if flat and "+rerank" in r["method"]:
                out.append({"gallery": key[0], "N": key[1], "method": r["method"], "candidates": r["candidates"],
                            "p50_speedup_vs_float_flat": round(flat["p50_ms"] / r["p50_ms"], 2),
                            "code_bytes_per_item": round(r["bytes_per_item"], 3), "recall_at_k": r["recall_at_k"]})
    return out


def best_methods(records: list[dict], min_recall: float = 0.99, budget: float = CODE_BUDGET,
                 min_speedup: float = 20.0) -> list[dict]:
    """Per gallery and N: the fastest re-ranked method with code bytes <= budget and recall >=
    min_recall, and whether it is at least ``min_speedup`` x faster than float flat."""
    out = []
    for s in speedups(records):
        ok = s["code_bytes_per_item"] <= budget and s["recall_at_k"] >= min_recall
        if ok:
            out.append(s)
    best = {}
    for s in out:
        key = (s["gallery"], s["N"])
        if key not in best or s["p50_speedup_vs_float_flat"] > best[key]["p50_speedup_vs_float_flat"]:
            best[key] = s
    return [{**s, "meets_speedup": s["p50_speedup_vs_float_flat"] >= min_speedup} for s in best.values()]


def best_overall(records: list[dict], min_recall: float = 0.99, budget: float = CODE_BUDGET) -> dict | None:
    """The method to make the default: at the largest N, per method its fastest setting (C) with
    recall >= min_recall and code bytes <= budget on *each* gallery; the method whose worse gallery
    is fastest relative to float flat wins (a method missing the floor on a gallery is out)."""
    if not records:
        return None
    n = max(r["N"] for r in records)
    galleries = sorted({r.get("gallery", "") for r in records if r["N"] == n})
    per_method: dict[str, dict[str, dict]] = {}
    for s in speedups([r for r in records if r["N"] == n]):
        if s["code_bytes_per_item"] <= budget and s["recall_at_k"] >= min_recall:
            best = per_method.setdefault(_family(s["method"]), {})
            if s["gallery"] not in best or s["p50_speedup_vs_float_flat"] > best[s["gallery"]]["p50_speedup_vs_float_flat"]:
                best[s["gallery"]] = s
    scored = [(min(v["p50_speedup_vs_float_flat"] for v in by.values()), m, by) for m, by in per_method.items()
              if set(by) == set(galleries)]
    if not scored:
        return None
    worst, method, by = max(scored, key=lambda t: t[0])
    return {"N": n, "method": method, "worst_gallery_speedup": worst, "per_gallery": by}


def best_single_setting(records: list[dict], min_recall: float = 0.99, budget: float = CODE_BUDGET) -> dict | None:
    """A default is one setting: at the largest N, the (method, C) with recall >= min_recall and code
    bytes <= budget on *every* gallery whose slowest gallery is fastest relative to float flat."""
    if not records:
        return None
    n = max(r["N"] for r in records)
    galleries = {r.get("gallery", "") for r in records if r["N"] == n}
    by_setting: dict[str, list[dict]] = {}
    for s in speedups([r for r in records if r["N"] == n]):
        by_setting.setdefault(s["method"], []).append(s)
    ok = [(min(x["p50_speedup_vs_float_flat"] for x in rows), method, rows) for method, rows in by_setting.items()
          if {x["gallery"] for x in rows} == galleries
          and all(x["recall_at_k"] >= min_recall and x["code_bytes_per_item"] <= budget for x in rows)]
    if not ok:
        return None
    worst, method, rows = max(ok, key=lambda t: t[0])
    return {"N": n, "method": method, "worst_gallery_speedup": worst, "per_gallery": {x["gallery"]: x for x in rows}}


def _family(method: str) -> str:
    """``hei-asym+rerank C=100`` and ``hei-asym (codes only)`` -> ``hei-asym`` (one line in the figure)."""
    return method.split("+rerank")[0].replace(" (codes only)", "")


def figure(records: list[dict]):
    """Plotly figure: recall@k vs p50 latency at each N, one trace per method family and gallery."""
    import plotly.graph_objects as go

    fig = go.Figure()
    rows = [r for r in records if not r.get("skipped") and "p50_ms" in r]
    for (gallery, n) in sorted({(r.get("gallery", ""), r["N"]) for r in rows}):
        part = [r for r in rows if r.get("gallery", "") == gallery and r["N"] == n and r.get("engine", "local") == "local"]
        for base in dict.fromkeys(_family(r["method"]) for r in part):
            pts = sorted((r for r in part if _family(r["method"]) == base), key=lambda r: r["p50_ms"])
            fig.add_trace(go.Scatter(
                x=[r["p50_ms"] for r in pts], y=[r["recall_at_k"] for r in pts], mode="lines+markers",
                name=f"{base} · N={n:,} · {gallery}", text=[r["method"] for r in pts],
                hovertemplate="%{text}<br>p50 %{x:.3f} ms<br>recall@10 %{y:.4f}<extra></extra>",
                visible=True if n == max(r["N"] for r in rows) else "legendonly"))
    fig.update_layout(title="Recall@10 vs exact search against single-query latency (p50, one thread)",
                      xaxis_title="ms per query (p50)", yaxis_title="recall@10 vs exact float search",
                      xaxis_type="log", template="plotly_white")
    return fig


def load_hashers(cfg: BenchConfig, encoder, train_emb, bits_needed: dict[str, set[int]]) -> dict[str, dict[int, Hasher]]:
    from matcher.hashing.codes import ITQHasher, LSHHasher
    from matcher.hashing.heads import check_base, load_heads
    from matcher.paths import REPO_ROOT

    out: dict[str, dict[int, Hasher]] = {"hei": {}, "itq": {}, "lsh": {}}
    if bits_needed["hei"]:
        hashers, meta = load_heads(REPO_ROOT / cfg.heads)
        try:
            check_base(encoder, meta, cfg.heads)
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
        missing = {b for b in bits_needed["hei"] if b not in hashers and not any(h > b for h in hashers)}
        if missing:
            raise SystemExit(f"error: {cfg.heads} has no {sorted(missing)}-bit head (has {sorted(hashers)})")
        out["hei"] = hashers
    for b in bits_needed["itq"]:
        out["itq"][b] = ITQHasher(train_emb.images, train_emb.captions, b, seed=cfg.seed)
    for b in bits_needed["lsh"]:
        out["lsh"][b] = LSHHasher(train_emb.images, train_emb.captions, b, seed=cfg.seed)
    return out


def store_record(two: TwoStageIndex, items: np.ndarray, queries: np.ndarray, cfg: BenchConfig, work: Path,
                 common: dict, encoder) -> dict:
    """Build the default method's index directory (streamed), reopen it in a new process, search it."""
    from matcher.search.store import IndexStore, build_index

    path = work / f"index-{common['gallery']}-{common['N']}"
    stage = two.stage.empty_copy()   # trained parts (lists, codebooks) as in memory: the same answers
    batches = ((items[s:s + 65_536], [str(i) for i in range(s, min(s + 65_536, len(items)))])
               for s in range(0, len(items), 65_536))
    meta = {"encoder": {"spec": cfg.model, "name": encoder.name, "fingerprint": encoder.fingerprint()},
            "gallery": {"bench": common["gallery"]}}
    t = time.perf_counter()
    store = build_index(path, stage, batches, items.shape[1], meta, overwrite=True, train_size=cfg.train_size)
    build_s = time.perf_counter() - t
    code = ("import time, json; t = time.perf_counter(); from matcher.search.store import IndexStore; "
            f"s = IndexStore.open({str(path)!r}); print(json.dumps({{'open_s': time.perf_counter() - t, 'quick': s.open_s}}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    opened = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-500:]}
    reopened = IndexStore.open(path)
    _, ids = reopened.search(queries, cfg.k, DEFAULT_CANDIDATES)
    _, ref = two.search(queries, cfg.k, DEFAULT_CANDIDATES)
    return {**common, "method": f"index directory: {two.stage.name}+rerank C={DEFAULT_CANDIDATES}", "engine": "store",
            "build_s": round(build_s, 2), "disk_bytes_per_item": round(sum(e["bytes"] for e in store.manifest["files"].values()) / len(items), 1),
            "bytes_per_item": store.manifest["code_bytes_per_item"], "rerank_bytes_per_item": 2 * items.shape[1],
            "open_s_new_process": round(opened.get("quick", float("nan")), 4) if "quick" in opened else None,
            "import_and_open_s_new_process": round(opened["open_s"], 3) if "open_s" in opened else None,
            "open_error": opened.get("error"), "same_topk_as_in_memory": float(np.mean(np.all(ids == ref, axis=1)))}


def scoring_records(cfg: BenchConfig, bits: tuple[int, ...] = (32, 64, 128, 256),
                    shortlists: tuple[int, ...] = (20, 50, 100)) -> list[dict]:
    """Hamming against asymmetric scoring of the same codes on the real splits (1000 images, 5000
    caption queries each): the share of the exhaustive top-10 found in the top C, per code family."""
    emb, encoder = split_embeddings(cfg.model, cfg.data, ("train", "val", "test"))
    hashers = load_hashers(cfg, encoder, emb["train"], {"hei": set(bits), "itq": set(bits), "lsh": set(bits)})
    records = []
    for split in ("val", "test"):
        images, captions = emb[split].images, emb[split].captions
        exact = np.argsort(-(captions @ images.T), axis=1)[:, :10]
        for b in bits:
            for family in ("hei", "itq", "lsh"):
                for stage in (HammingStage(hashers[family][b]), SignStage(hashers[family][b])):
                    stage.add(images, "image")
                    _, ids = stage.search(captions, max(shortlists), "text")
                    for c in shortlists:
                        records.append({"split": split, "method": family, "bits": b, "bytes_per_item": b // 8,
                                        "scoring": "hamming" if isinstance(stage, HammingStage) else "asymmetric",
                                        "candidates": c, "candidate_recall": round(overlap(ids[:, :c], exact), 4)})
    return records


def run_scoring(cfg: BenchConfig, json_path: str | Path) -> dict:
    from matcher.atomic import write_records_csv

    faiss.omp_set_num_threads(1)
    records = scoring_records(cfg)
    report = {"config": asdict(cfg), "command": "python -m matcher " + " ".join(sys.argv[1:]), "records": records}
    write_json(json_path, report)
    write_records_csv(Path(json_path).with_suffix(".csv"), records)
    for r in records:
        if r["split"] == "test" and r["method"] == "hei":
            print(f"test hei {r['bits']:>3} bits C={r['candidates']:<3} {r['scoring']:<10} {r['candidate_recall']:.4f}")
    print(f"wrote {json_path} (+ .csv)")
    return report


def run_benchmark(cfg: BenchConfig, json_path: str | Path) -> dict:
    """Run every size of every gallery; JSON (+ CSV, HTML, figure JSON) rewritten after each size."""
    work = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="matcher-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(cfg, Path(json_path), work)
    finally:
        if not cfg.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def _run(cfg: BenchConfig, json_path: Path, work: Path) -> dict:
    import torch

    from matcher.atomic import write_records_csv

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    if "OMP_NUM_THREADS" not in os.environ:
        log.info("numpy BLAS threads are not pinned; set OMP_NUM_THREADS=1 for strict single-thread numbers")
    emb, encoder = split_embeddings(cfg.model, cfg.data, ("test", "val", "train"))
    methods = list(cfg.methods)
    if (cfg.engine == "ray" or cfg.store) and cfg.default_method not in methods:
        methods.append(cfg.default_method)
    hashers = load_hashers(cfg, encoder, emb["train"], needed_bits(methods, cfg.bits))
    dim = emb["test"].images.shape[1]
    stages = {m: (lambda n, m=m: make_method(m, hashers, cfg.bits, dim, n)) for m in methods if m not in FLOAT_METHODS}
    real = np.concatenate([emb[s].images for s in ("test", "val", "train")])
    queries = np.ascontiguousarray(emb["test"].captions[np.random.default_rng(cfg.seed).permutation(len(emb["test"].captions))])
    report = {"config": asdict(cfg), "command": "python -m matcher " + " ".join(sys.argv[1:]), "default_method": cfg.default_method,
              "default_candidates": DEFAULT_CANDIDATES, "galleries": {}, "records": [], "speedups": [], "best": []}
    largest = max(cfg.sizes)
    for kind in cfg.galleries:
        views = view_embeddings(encoder, cfg.data, ("test", "val", "train"), cfg.views, cfg.seed) if kind == "views" else None
        t = time.perf_counter()
        items, note = grow_gallery(kind, real, largest, cfg.seed, views)
        report["galleries"][kind] = {**note, "grow_s": round(time.perf_counter() - t, 1)}
        tier = write_rerank_tier(items, work / f"vectors-{kind}.f16")
        for n in tqdm(sorted(cfg.sizes), desc=f"bench sizes ({kind})", unit="size"):
            records, indexes, exact = bench_size(np.ascontiguousarray(items[:n]), queries, cfg, stages, tier,
                                                 len(real), kind)
            common = {"N": n, "gallery": kind, "dim": dim, "k": cfg.k, "threads": 1}
            if cfg.store:
                records.append(store_record(indexes[cfg.default_method], items[:n], queries[:cfg.recall_queries], cfg,
                                            work, common, encoder))
            if cfg.engine == "ray":
                from matcher.scale.bench import ray_records

                records += ray_records(indexes[cfg.default_method], items[:n], queries, exact, cfg, work, common,
                                       DEFAULT_CANDIDATES)
            for r in records:
                r.setdefault("load_average_1m", round(os.getloadavg()[0], 2))  # shared machine: context for timings
                r.setdefault("peak_rss_mb", round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
            report["records"] += records
            report["speedups"] = speedups(report["records"])
            report["best"] = best_methods(report["records"])
            report["best_on_every_gallery"] = best_overall(report["records"])      # C chosen per gallery
            report["best_single_setting"] = best_single_setting(report["records"])   # one C for every gallery
            write_json(json_path, report)  # partial results survive a long run being stopped
            write_records_csv(json_path.with_suffix(".csv"), report["records"])
            del indexes
            gc.collect()
        del items, tier
        gc.collect()
    fig = figure(report["records"])
    with atomic_path(json_path.with_suffix(".html")) as tmp:
        fig.write_html(str(tmp), include_plotlyjs="cdn")
    with atomic_path(json_path.with_suffix(".fig.json")) as tmp:
        tmp.write_text(fig.to_json())
    for b in report["best"]:
        print(f"{b['gallery']:>8} N={b['N']:>9,}: best within {CODE_BUDGET} B/item and recall >= 0.99: {b['method']}, "
              f"{b['p50_speedup_vs_float_flat']}x faster than float flat (p50), {b['code_bytes_per_item']:.1f} B/item, "
              f"recall@{cfg.k} {b['recall_at_k']:.4f}")
    for key, what in (("best_on_every_gallery", "C chosen per gallery"), ("best_single_setting", "one setting")):
        best = report.get(key)
        if best:
            print(f"best on every gallery at N={best['N']:,} ({what}): {best['method']} (worst gallery "
                  f"{best['worst_gallery_speedup']}x faster than float flat)")
    print(f"wrote {json_path} (+ .csv, .html, .fig.json)")
    return report
