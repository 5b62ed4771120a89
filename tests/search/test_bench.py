"""The scale benchmark on tiny galleries: record shapes, recall against exact search, the best-method
rule, both kinds of distractors, the figure. Timings are recorded, never asserted."""
import json

import numpy as np
import pytest

from matcher.hashing.bench import (BenchConfig, best_methods, bench_size, distractors, figure, grow_gallery, make_method,
                                   needed_bits, overlap, speedups, write_rerank_tier)
from matcher.hashing.codes import ITQHasher, LSHHasher
from matcher.search.index import HammingStage, QuantizerStage, SignStage, ivf_lists
from tests.search.test_hashing import synthetic


def test_method_names_pick_family_scoring_and_bits():
    emb = synthetic(100)
    hashers = {"hei": {32: LSHHasher(emb.images, emb.captions, 32)}, "itq": {16: ITQHasher(emb.images, emb.captions, 16)},
               "lsh": {}}
    assert isinstance(make_method("hei-asym", hashers, 32, 32, 1000), SignStage)
    assert isinstance(make_method("hei-hamming", hashers, 32, 32, 1000), HammingStage)
    assert make_method("itq-asym@16", hashers, 32, 32, 1000).bits == 16
    short = make_method("hei-asym@24", hashers, 32, 32, 1000)             # the first 24 bits of the 32-bit head
    assert short.bits == 24 and np.array_equal(short.hasher.encode(emb.images, "image"),
                                                hashers["hei"][32].encode(emb.images, "image")[:, :3])
    ivf = make_method("hei-asym-ivf", hashers, 32, 32, 10_000)
    assert ivf.index.nlist == ivf_lists(10_000) == 128 and ivf.index.index.nprobe == 26 and ivf.needs_training
    assert ivf.bytes_per_item == 4 + 8                                       # code + id in the inverted list
    pq = make_method("SVD16,IVF{n},PQ8x4fs", hashers, 32, 32, 1000)
    assert isinstance(pq, QuantizerStage) and pq.name == "SVD16,IVF32,PQ8x4fs"
    assert make_method("SVD16,IVF{n},PQ8x4fs", hashers, 32, 32, 999).name == "SVD16,PQ8x4fs"   # too few for lists
    assert make_method("hei-asym-ivf", hashers, 32, 32, 999).index.nlist == 0
    with pytest.raises(ValueError, match="no 64-bit hei"):
        make_method("hei-asym@64", hashers, 32, 32, 1000)
    with pytest.raises(ValueError, match="asymmetric score only"):
        make_method("hei-hamming-ivf", hashers, 32, 32, 1000)
    assert needed_bits(["hei-asym", "itq-asym-ivf@16", "lsh-hamming", "PQ64x4fs", "float-flat"], 256) == \
        {"hei": {256}, "itq": {16}, "lsh": {256}}
    assert [ivf_lists(n) for n in (999, 1000, 100_000, 1_000_000, 10**9)] == [0, 32, 256, 1024, 4096]


def test_bench_size_records_recall_and_full_shortlist(tmp_path):
    emb = synthetic(100)
    items = np.concatenate([emb.images, distractors(emb.images, 150, seed=0)])
    assert items.shape == (250, 32) and np.allclose(np.linalg.norm(items, axis=1), 1, atol=1e-5)
    hasher = LSHHasher(emb.images, emb.captions, 32)
    cfg = BenchConfig(queries=5, rounds=1, batch=16, recall_queries=40, candidates=[20, 249], hnsw_m=8,
                      methods=["float-flat", "float-hnsw", "lsh-asym", "lsh-hamming", "PQ8x4fs"], train_size=250)
    stages = {"lsh-asym": lambda n: SignStage(hasher), "lsh-hamming": lambda n: HammingStage(hasher),
              "PQ8x4fs": lambda n: QuantizerStage("PQ8x4fs", 32), "lsh-asym-ivf": lambda n: SignStage(hasher, nlist=8, probe=0.5)}
    tier = write_rerank_tier(items, tmp_path / "v.f16")
    records, indexes, exact = bench_size(items, emb.captions, cfg, stages, tier, n_real=100)
    by = {r["method"]: r for r in records}
    assert set(by) == {"float-flat", "float-hnsw", *(f"{m}{s}" for m in stages for s in (" (codes only)", "+rerank C=20",
                                                                                          "+rerank C=249"))}
    assert exact.shape == (40, 10) and set(indexes) == set(stages)
    for m in ("lsh-asym", "lsh-hamming", "PQ8x4fs"):
        assert by[f"{m}+rerank C=249"]["recall_at_k"] == 1.0          # C ~ N: exactly the float top-k
        assert by[f"{m}+rerank C=20"]["recall_at_k"] >= by[f"{m} (codes only)"]["recall_at_k"]
        assert by[f"{m}+rerank C=20"]["rerank_tier"] == "float16 mmap"
    assert by["lsh-asym (codes only)"]["bytes_per_item"] == 4 and by["PQ8x4fs (codes only)"]["bytes_per_item"] == 4
    assert by["float-flat"]["bytes_per_item"] == 128 and by["float-flat"]["recall_at_k"] == 1.0
    assert all(r["distractors"] == 150 and r["gallery"] == "gaussian" for r in records)
    rows = speedups(records)
    assert len(rows) == 8 and all(r["p50_speedup_vs_float_flat"] > 0 for r in rows)
    assert by["lsh-asym-ivf (codes only)"]["bytes_per_item"] == 4 + 8
    assert len(figure(records).data) == 1 + 1 + len(stages)
    json.dumps(records)  # JSON-serialisable as written


def test_best_method_rule_respects_the_byte_budget_and_the_recall_floor():
    rec = lambda m, p50, recall, b: {"N": 10, "gallery": "g", "method": m, "candidates": 1, "p50_ms": p50,  # noqa: E731
                                     "recall_at_k": recall, "bytes_per_item": b, "engine": "local"}
    records = [rec("float-flat", 20.0, 1.0, 1024), rec("a+rerank C=1", 0.5, 0.995, 40), rec("b+rerank C=1", 1.0, 0.99, 32),
               rec("c+rerank C=1", 0.2, 0.98, 8), rec("d+rerank C=1", 2.0, 0.999, 16)]
    (best,) = best_methods(records)
    assert best["method"] == "b+rerank C=1" and best["p50_speedup_vs_float_flat"] == 20.0 and best["meets_speedup"]


def test_views_gallery_keeps_the_real_items_then_views_then_mixture_samples():
    rng = np.random.default_rng(0)
    real = synthetic(40).images
    owners = np.repeat(np.arange(40), 2)
    views = real[owners] + 0.02 * rng.standard_normal((80, 32)).astype(np.float32)
    views /= np.linalg.norm(views, axis=1, keepdims=True)
    items, note = grow_gallery("views", real, 300, seed=0, views=(views, owners))
    assert items.shape == (300, 32) and np.array_equal(items[:40], real) and np.array_equal(items[40:120], views)
    assert np.allclose(np.linalg.norm(items, axis=1), 1, atol=1e-5) and "mixture" in note
    assert np.median(np.max(items[120:] @ real.T, axis=1)) > np.median(np.max(distractors(real, 180, 0) @ real.T, axis=1))
    gaussian, _ = grow_gallery("gaussian", real, 30, seed=0)
    assert np.array_equal(gaussian, real[:30])          # N below the real count: only real items
    with pytest.raises(ValueError, match="unknown gallery"):
        grow_gallery("uniform", real, 50, seed=0)


def test_overlap_counts_the_share_of_the_exact_top_k():
    assert overlap(np.array([[1, 2, -1]]), np.array([[2, 3, 1]])) == pytest.approx(2 / 3)


def test_the_default_is_the_fastest_method_that_holds_on_every_gallery():
    from matcher.hashing.bench import best_overall

    def rec(g, m, p50, recall):
        return {"N": 10, "gallery": g, "method": m, "candidates": 1, "p50_ms": p50, "recall_at_k": recall,
                "bytes_per_item": 32 if m != "float-flat" else 1024, "engine": "local"}

    records = [rec(g, "float-flat", 20.0, 1.0) for g in ("a", "b")] + [
        rec("a", "x+rerank C=1", 0.5, 0.995), rec("b", "x+rerank C=1", 0.5, 0.98),     # fast, misses on b
        rec("b", "x+rerank C=2", 2.0, 0.995),                                            # x holds on b at 10x
        rec("a", "y+rerank C=1", 1.0, 0.991), rec("b", "y+rerank C=1", 1.0, 0.992),     # y: 20x on both
        rec("a", "z+rerank C=1", 0.1, 0.999)]                                            # z: never run on b
    best = best_overall(records)
    assert best["method"] == "y" and best["worst_gallery_speedup"] == 20.0 and set(best["per_gallery"]) == {"a", "b"}


def test_a_default_is_one_setting_that_holds_on_every_gallery():
    from matcher.hashing.bench import best_single_setting

    def rec(g, m, p50, recall):
        return {"N": 10, "gallery": g, "method": m, "candidates": 1, "p50_ms": p50, "recall_at_k": recall,
                "bytes_per_item": 32 if m != "float-flat" else 1024, "engine": "local"}

    records = [rec(g, "float-flat", 20.0, 1.0) for g in ("a", "b")] + [
        rec("a", "x+rerank C=1", 0.5, 0.995), rec("b", "x+rerank C=1", 0.5, 0.98),   # misses on b at C=1
        rec("a", "x+rerank C=2", 1.0, 0.999), rec("b", "x+rerank C=2", 2.0, 0.995),  # holds at C=2: worst 10x
        rec("a", "y+rerank C=5", 1.6, 0.991), rec("b", "y+rerank C=5", 1.0, 0.992)]  # holds: worst 12.5x
    best = best_single_setting(records)
    assert best["method"] == "y+rerank C=5" and best["worst_gallery_speedup"] == 12.5
