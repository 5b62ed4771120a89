"""Code indexes for any size: the asymmetric sign index against a numpy reference, the faiss
quantiser anchors, stored hashers, candidate stages and the two-stage index (ranks and shapes on
tiny real-shaped cases; no timings asserted)."""
import numpy as np
import pytest
import torch

from matcher.hashing.codes import ITQHasher, LayeredHasher, LSHHasher, hasher_arrays, hasher_from_arrays, pack_bits
from matcher.hashing.heads import HashHeads, HEIHasher
from matcher.search.hashed import HashedMatcher
from matcher.search.index import (HammingStage, QuantizedIndex, QuantizerStage, SignIndex, SignStage, TwoStageIndex,
                                  code_bytes, gather_rows, rerank, sign_patterns)
from matcher.search.protocol import SearchOptions
from tests.search.test_hashing import _FixedEncoder, synthetic, unit


def test_sign_patterns_are_the_16_corners_in_packbits_order():
    p = sign_patterns(4)
    assert p.shape == (16, 4) and set(np.unique(p)) == {-1.0, 1.0}
    assert p[0].tolist() == [-1, -1, -1, -1] and p[1].tolist() == [-1, -1, -1, 1] and p[15].tolist() == [1, 1, 1, 1]


def test_sign_index_ranks_like_the_exact_asymmetric_score():
    rng = np.random.default_rng(0)
    items, queries = rng.standard_normal((400, 64)).astype(np.float32), rng.standard_normal((6, 64)).astype(np.float32)
    index = SignIndex(64)
    index.add(pack_bits(items))
    scores, ids = index.search(queries, 5)
    exact = queries @ np.where(items > 0, 1.0, -1.0).T          # <q, +-1 code>
    assert ids.shape == (6, 5) and len(index) == 400 and index.bytes_per_item == 8
    for q in range(6):
        tol = 0.02 * np.abs(exact[q]).max()                      # faiss' 8-bit lookup tables: near-ties may swap
        assert np.all(exact[q, ids[q]] >= np.sort(exact[q])[::-1][4] - tol)
        assert np.allclose(scores[q], exact[q, ids[q]], atol=tol)
    assert np.mean(ids[:, 0] == np.argmax(exact, axis=1)) >= 5 / 6
    with pytest.raises(ValueError, match="packed codes"):
        index.add(pack_bits(items[:, :32]))


def test_quantized_index_anchors_find_each_item_and_report_code_bytes():
    rng = np.random.default_rng(1)
    x = unit(rng.standard_normal((3000, 64)))
    for factory, per_item in (("PQ16x4fs", 8), ("RaBitQfs", 16), ("SVD48,RaBitQfs", 14)):
        index = QuantizedIndex(factory, 64)
        assert not index.is_trained
        with pytest.raises(ValueError, match="must be trained"):
            index.add(x)
        index.train(x)
        index.add(x)
        _, ids = index.search(x[:50], 20)
        assert np.mean([i in row for i, row in enumerate(ids)]) >= 0.9, factory   # an item finds itself
        assert code_bytes(index) == per_item, factory


def test_svd_projection_keeps_inner_product_order_unlike_centring_pca():
    """SVD<d> must not centre: on rank-16 data with a mean offset it is exact, centred PCA is not."""
    rng = np.random.default_rng(2)
    basis = np.linalg.qr(rng.standard_normal((32, 16)))[0].T          # a 16-d subspace of R^32
    x = unit((rng.standard_normal((2000, 16)) + 2.0) @ basis)
    q = unit((rng.standard_normal((40, 16)) + 2.0) @ basis)
    exact = np.argmax(q @ x.T, axis=1)
    top1 = {}
    for factory in ("SVD16,Flat", "PCA16,Flat"):
        index = QuantizedIndex(factory, 32)
        index.train(x)
        index.add(x)
        top1[factory] = np.mean(index.search(q, 1)[1][:, 0] == exact)
    assert top1["SVD16,Flat"] == 1.0 and top1["PCA16,Flat"] < 0.9


@pytest.mark.parametrize("make", ["lsh", "itq", "hei"])
def test_stored_hasher_arrays_reproduce_the_hasher(make):
    emb = synthetic(200)
    if make == "lsh":
        hasher = LSHHasher(emb.images, emb.captions, 32)
    elif make == "itq":
        hasher = ITQHasher(emb.images, emb.captions, 16)
    else:
        torch.manual_seed(0)
        heads = HashHeads(32, 24, hidden=16)
        heads.image.fit_input(emb.images)
        heads.text.fit_input(emb.captions)
        hasher = HEIHasher(heads)
    back = hasher_from_arrays(dict(hasher_arrays(hasher)))
    assert isinstance(back, LayeredHasher) and back.bits == hasher.bits and back.method == hasher.method
    for modality, x in (("image", emb.images), ("text", emb.captions)):
        assert np.allclose(back.real(x, modality), hasher.real(x, modality), atol=1e-5)
        assert np.array_equal(back.encode(x, modality), hasher.encode(x, modality))
    with pytest.raises(ValueError, match="unknown modality"):
        back.real(emb.images, "audio")


def test_asymmetric_stage_shortlists_better_than_hamming_on_paired_data():
    """The reason the asymmetric score is the default: same codes, more of the exact top-10 in the top-C."""
    emb = synthetic(600, seed=3)
    hasher = LSHHasher(emb.images, emb.captions, 32)
    exact = np.argsort(-(emb.captions @ emb.images.T), axis=1)[:, :10]
    found = {}
    for stage in (SignStage(hasher), HammingStage(hasher)):
        stage.add(emb.images, "image")
        scores, ids = stage.search(emb.captions, 30, "text")
        assert scores.shape == ids.shape == (len(emb.captions), 30)
        assert np.all(scores <= 1.0) and np.all(scores >= -1.0) and np.all(np.diff(scores, axis=1) <= 1e-6)
        found[stage.name] = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)])
    assert found["lsh32-asym"] > found["lsh32-hamming"] + 0.03


def test_two_stage_index_with_every_candidate_is_exact_search_on_float16_vectors():
    emb = synthetic(150)
    stage = QuantizerStage("PQ8x4fs", 32)
    stage.train(emb.images)
    stage.add(emb.images)
    two = TwoStageIndex(stage, emb.images.astype(np.float16))
    scores, ids = two.search(emb.captions[:20], 5, c=150)
    ref = emb.captions[:20] @ emb.images.astype(np.float16).astype(np.float32).T
    assert ids.tolist() == np.argsort(-ref, axis=1, kind="stable")[:, :5].tolist()
    assert np.allclose(scores, np.sort(ref, axis=1)[:, ::-1][:, :5], atol=1e-5)
    with pytest.raises(ValueError, match="re-rank vectors"):
        TwoStageIndex(stage, emb.images[:10])


def test_rerank_breaks_score_ties_by_lower_id_and_reads_float16():
    vectors = np.array([[1, 0], [0, 1], [1, 0], [0.5, 0.5]], np.float16)
    scores, ids = rerank(np.array([[1.0, 0.0]], np.float32), np.array([[2, 3, 0, -1]]), vectors, 3)
    assert ids.tolist() == [[0, 2, 3]] and np.allclose(scores, [[1, 1, 0.5]])
    assert gather_rows(vectors, np.array([1, 3])).dtype == np.float32


def test_hashed_matcher_hamming_scoring_keeps_the_old_behaviour():
    emb = synthetic(80)
    hashers = {32: LSHHasher(emb.images, emb.captions, 32)}
    old = HashedMatcher(_FixedEncoder(emb), None, hashers, embeddings=emb, scoring="hamming")
    new = HashedMatcher(_FixedEncoder(emb), None, hashers, embeddings=emb)
    assert new.scoring == "asymmetric" and isinstance(new.index(32), SignStage) and isinstance(old.index(32), HammingStage)
    options = SearchOptions(k=5, bits=32, candidates=80)
    assert [h.row for h in old.search_text("caption 3", options).hits] == [h.row for h in new.search_text("caption 3", options).hits]
    codes_only = old.search_text("caption 3", SearchOptions(k=5, bits=32, candidates=20, rerank=False)).hits
    assert all(abs(h.score * 32 / 2 - round(h.score * 32 / 2)) < 1e-5 for h in codes_only)   # 1 - 2d/k steps
    with pytest.raises(ValueError, match="unknown scoring"):
        HashedMatcher(_FixedEncoder(emb), None, hashers, embeddings=emb, scoring="cosine")


def test_partitioned_top_k_order_equals_a_full_sort_with_ties():
    from matcher.search.index import _top_k_order

    rng = np.random.default_rng(4)
    scores = rng.integers(0, 6, (200, 40)).astype(np.float32)       # many exact ties, across the k-th place too
    ids = np.stack([rng.permutation(1000)[:40] for _ in range(200)])
    for k in (1, 5, 39, 40):
        full = np.lexsort((ids, -scores), axis=1)[:, :k]
        got = _top_k_order(scores, ids, k)
        assert np.array_equal(np.take_along_axis(ids, got, 1), np.take_along_axis(ids, full, 1))
