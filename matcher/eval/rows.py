"""The evaluation rows of each kind of matcher, from the opened matcher and its base encoder's row.

``matcher.registry.KINDS`` names one of these per kind; ``matcher.eval.report.build_report`` calls
it. Every function has one call shape, ``(role, matcher, base_entry) -> {row name: row}``, where
``base_entry`` is the float row of the encoder that encodes the matcher's queries (recall over the
gallery, footprint, speeds timed together with the other encoders). A row derived from a base is
measured on its own search, never copied from the base's recall.
"""
from __future__ import annotations

import time

import numpy as np

from matcher.eval.metrics import KS, PROBE_QUERIES, clip_benchmark_from_recalls, clip_benchmark_recalls, recall_table
from matcher.hashing.report import DEFAULT_BITS, DEFAULT_CANDIDATES, hashed_entry
from matcher.search.protocol import Matcher, SearchOptions

def float_rows(role: str, matcher: Matcher, base_entry: dict) -> dict[str, dict]:
    """An exact float matcher's row is its encoder's row."""
    return {role: dict(base_entry)}


def hashed_rows(role: str, matcher, base_entry: dict) -> dict[str, dict]:
    """``hashed-<bits>`` for every code length the heads provide (C = 100), and ``role`` for the
    default length: two-stage recall, ``bytes_per_item``, candidate recall and stage latencies."""
    rows = {}
    for bits, hasher in sorted(matcher.hashers.items()):
        params = hasher.num_params
        rerank_emb = matcher.rerank_embeddings if matcher.rerank_encoder else None
        entry = hashed_entry(hasher, matcher.embeddings, base_entry, params, DEFAULT_CANDIDATES, rerank_emb=rerank_emb)
        entry.update(clip_benchmark_from_recalls(entry["t2i"], entry["i2t"]))
        entry.update(spec=matcher.name, base=base_entry.get("spec"),
                     rerank_by=matcher.rerank_encoder.name if matcher.rerank_encoder else base_entry.get("spec"))
        rows[f"hashed-{bits}"] = entry
        if bits == DEFAULT_BITS:
            rows[role] = entry
    return rows


def fine_rows(role: str, matcher, base_entry: dict, probes: int = 10) -> dict[str, dict]:
    """The fine re-rank as served (alignment scorer or vl-cross cross-encoder, ``matcher.search.fine``):
    text->image recall of the re-ranked shortlist over every caption of the gallery; image queries
    are answered by the dual base, so i2t is the base's."""
    gallery = matcher.gallery
    texts = [c for n in gallery.names for c in gallery.captions.get(n, [])]
    owners = [n for n in gallery.names for _ in gallery.captions.get(n, [])]
    ranking = matcher.rank_captions(texts, owners, 10, SearchOptions(k=10))
    t2i_ranks = np.asarray(ranking.gt_rank)
    t2i = recall_table(t2i_ranks)
    i2t = dict(base_entry["i2t"])
    latencies = []
    for i in range(probes):
        started = time.perf_counter()
        matcher.search_text(PROBE_QUERIES[i % len(PROBE_QUERIES)], SearchOptions(k=10))
        latencies.append((time.perf_counter() - started) * 1000)
    scorer_params = sum(p.numel() for p in matcher.scorer.parameters())
    entry = {**base_entry, "t2i": t2i, "i2t": i2t, "rsum": round(sum(t2i.values()) + sum(i2t.values()), 2),
             **clip_benchmark_recalls(t2i_ranks, "image"),   # i2t's text_retrieval_recall@K: the base's
             "spec": matcher.name, "base": base_entry.get("spec"), "scorer": matcher.kind,
             "candidates": matcher.candidates, "fuse": matcher.fuse,
             "params": int(base_entry["params"]) + scorer_params,
             "size_mb": round(base_entry["size_mb"] + scorer_params * 4 / 1e6, 2),
             "text_query_ms": round(float(np.median(latencies)), 2),
             "text_query_ms_range": [round(min(latencies), 2), round(max(latencies), 2)],
             "note": f"t2i: the base's top-C re-scored by {matcher.reader.reads}"
                     f"{' alone' if matcher.fuse is None else f', fused cos + {matcher.fuse:g} x score'}; "
                     "i2t: image queries are answered by the base; "
                     "text_query_ms: whole search (encode + shortlist + re-rank), median in the report process"}
    return {role: entry}


def index_rows(role: str, matcher, base_entry: dict, probes: int = 10) -> dict[str, dict]:
    """An index directory as served (``index:DIR``): text->image recall of its own two-stage search
    (codes -> top C -> float16 re-rank) over every caption of the evaluated gallery, which must be the
    gallery it indexes (the same readable images, so the recall is over the same captions as its
    encoder's float row; otherwise ``StoreError``). An image index holds no caption codes, so i2t and
    rsum are not measured (``None``), never copied from the encoder's row."""
    from matcher.data.embed import embed_gallery
    from matcher.search.store import StoreError

    store = matcher.store
    emb = embed_gallery(matcher.encoder, matcher.gallery)   # the float row's own embeddings (from the cache)
    held, evaluated = set(store.names), set(emb.names)
    if held != evaluated:
        absent, extra = sorted(evaluated - held), sorted(held - evaluated)
        built = store.manifest.get("gallery") or {}
        raise StoreError(
            f"index {store.path} holds {store.count} items, the evaluated gallery has {len(emb.names)} readable images "
            f"({len(absent)} of them not in the index{f', e.g. {absent[0]!r}' if absent else ''}; {len(extra)} items of "
            f"the index not in the gallery{f', e.g. {extra[0]!r}' if extra else ''}): recall is only defined over the "
            f"gallery an index was built from ({built.get('root') or 'not recorded'}"
            f"{', split ' + built['split'] if built.get('split') else ''}). Evaluate that gallery, or build the index "
            f"from this one: python -m matcher index build --gallery {matcher.gallery.root} [--split S] "
            f"--out {store.path} --overwrite")
    k = max(KS)
    candidates = min(max(matcher.default_candidates, k), store.count)
    owners = np.array([store.names.index(emb.names[i]) for i in emb.caption_image], np.int64)
    _, ids = store.search(emb.captions, k, candidates)
    hit = ids == owners[:, None]
    ranks = np.where(hit.any(axis=1), hit.argmax(axis=1), k)      # censored at k: only R@K for K <= k is read
    t2i = recall_table(ranks)
    latencies = []
    for i in range(probes):
        started = time.perf_counter()
        matcher.search_text(PROBE_QUERIES[i % len(PROBE_QUERIES)], SearchOptions(k=k))
        latencies.append((time.perf_counter() - started) * 1000)
    m = store.manifest
    entry = {**{key: value for key, value in base_entry.items()
                if not key.startswith("text_retrieval_recall") and key != "peak_rss_mb"},
             "t2i": t2i, "i2t": None, "rsum": None, **clip_benchmark_recalls(ranks, "image"),
             "spec": matcher.name, "base": base_entry.get("spec"), "items": store.count, "candidates": candidates,
             "stage": m["stage"].get("name"), "bytes_per_item": m.get("code_bytes_per_item"),
             "rerank_bytes_per_item": m.get("rerank_bytes_per_item"),
             "exhaustive_t2i_R@10": base_entry["t2i"]["R@10"],
             "t2i_R@10_vs_exhaustive": t2i["R@10"] / max(base_entry["t2i"]["R@10"], 1e-9),
             "text_query_ms": round(float(np.median(latencies)), 2),
             "text_query_ms_range": [round(min(latencies), 2), round(max(latencies), 2)],
             "note": "t2i: the index's codes -> top C -> float16 re-rank, every caption of the gallery it indexes; "
                     "i2t / rsum: not measured (an image index holds no caption codes); text_query_ms: whole search "
                     "(encode + shortlist + re-rank), median in the report process; params / size_mb / images_per_s: "
                     "the query encoder's"}
    return {role: entry}
