"""Result records for hashed matchers: the eval-JSON entries and the HEI-vs-LSH-vs-ITQ table.

Everything here returns plain dicts / lists of flat records so the dashboard can read the JSON
without knowing this package.
"""
from __future__ import annotations

import time

import numpy as np
from tqdm import tqdm

from matcher.data.embed import GalleryEmbeddings
from matcher.hashing.codes import Hasher, ITQHasher, LSHHasher
from matcher.hashing.evaluate import two_stage_metrics
from matcher.search.hashed import rerank
from matcher.search.index import BinaryIndex

DEFAULT_BITS = 64
DEFAULT_CANDIDATES = 100
SWEEP_CANDIDATES = (20, 50, 100, 200)


def stage_latency(hasher: Hasher, emb: GalleryEmbeddings, candidates: int, queries: int = 200) -> dict[str, float]:
    """Median per-query ms of the two search stages for single text queries (encoding excluded)."""
    index = BinaryIndex(hasher.bits)
    index.add(hasher.encode(emb.images, "image"))
    cand_ms, rerank_ms = [], []
    for q in emb.captions[:queries]:
        t0 = time.perf_counter()
        _, cand = index.search(hasher.encode(q[None], "text"), candidates)
        t1 = time.perf_counter()
        rerank(q[None], cand, emb.images, 10)
        t2 = time.perf_counter()
        cand_ms.append((t1 - t0) * 1000)
        rerank_ms.append((t2 - t1) * 1000)
    return {"candidates_ms": round(float(np.median(cand_ms)), 4), "rerank_ms": round(float(np.median(rerank_ms)), 4)}


def hashed_entry(hasher: Hasher, emb: GalleryEmbeddings, base_entry: dict, head_params: int,
                 candidates: int = DEFAULT_CANDIDATES, sweep=SWEEP_CANDIDATES,
                 rerank_emb: GalleryEmbeddings | None = None) -> dict:
    """One ``hashed-<k>`` eval entry: the float entry's shape plus the two-stage fields.

    Top-level recall is at ``candidates``; ``sweep`` lists the same measures at other C.
    ``base_entry`` (the float encoder's own eval entry) supplies the query-encoding costs.
    """
    main = two_stage_metrics(hasher, emb, candidates, rerank_emb)
    entry = {
        "t2i": main["t2i"], "i2t": main["i2t"], "rsum": main["rsum"],
        "params": int(base_entry["params"]) + head_params,
        "size_mb": round(base_entry["size_mb"] + head_params * 4 / 1e6, 2),
        "text_query_ms": base_entry["text_query_ms"], "images_per_s": base_entry["images_per_s"],
        "spec": base_entry.get("spec"), "method": hasher.method, "bits": hasher.bits, "candidates": int(candidates),
        "bytes_per_item": hasher.bits / 8, "candidate_recall": main["candidate_recall"],
        "candidate_recall_i2t": main["candidate_recall_i2t"],
        "exhaustive_t2i_R@10": base_entry["t2i"]["R@10"],
        "t2i_R@10_vs_exhaustive": main["t2i"]["R@10"] / max(base_entry["t2i"]["R@10"], 1e-9),
        **stage_latency(hasher, emb, candidates),
        "sweep": [two_stage_metrics(hasher, emb, c, rerank_emb) for c in sweep],
        "images": len(emb.names), "captions": len(emb.caption_texts),
    }
    return entry


def baseline_hashers(train: GalleryEmbeddings, bits: int, seed: int = 0) -> list[Hasher]:
    """LSH and (where bits <= dim) ITQ fitted on the same train embeddings as the HEI heads."""
    out: list[Hasher] = [LSHHasher(train.images, train.captions, bits, seed=seed)]
    if bits <= train.images.shape[1]:
        out.append(ITQHasher(train.images, train.captions, bits, seed=seed))
    return out


def comparison_records(hashers: list[Hasher], emb: GalleryEmbeddings, split: str,
                       candidates=SWEEP_CANDIDATES) -> list[dict]:
    """Flat records {split, method, bits, candidates, bytes_per_item, candidate_recall, ..., t2i_R@1 ...}."""
    exhaustive = two_stage_metrics(hashers[0], emb, len(emb.caption_texts))  # C = all: exact float recall
    records = []
    for hasher in tqdm(hashers, desc=f"hashers on {split}", unit="hasher"):
        for c in candidates:
            m = two_stage_metrics(hasher, emb, c)
            records.append({
                "split": split, "method": hasher.method, "bits": hasher.bits, "candidates": c,
                "bytes_per_item": hasher.bits / 8, "candidate_recall": round(m["candidate_recall"], 4),
                "candidate_recall_i2t": round(m["candidate_recall_i2t"], 4),
                **{f"t2i_{k}": round(v, 2) for k, v in m["t2i"].items()},
                **{f"i2t_{k}": round(v, 2) for k, v in m["i2t"].items()},
                "rsum": round(m["rsum"], 2),
                "exhaustive_t2i_R@10": round(exhaustive["t2i"]["R@10"], 2),
                "exhaustive_rsum": round(exhaustive["rsum"], 2),
            })
    return records
