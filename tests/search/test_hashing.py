"""Hashing: code packing, Hamming search vs a numpy reference, the HEI loss on hand-made cases,
two-stage search = exact float search when C = N, and the hashed matcher end to end."""
import json

import numpy as np
import pytest
import torch

from matcher.data.embed import GalleryEmbeddings
from matcher.hashing.codes import ITQHasher, LSHHasher, hamming_distance, hamming_similarity, pack_bits, unpack_bits
from matcher.hashing.evaluate import candidate_recall, two_stage_metrics
from matcher.hashing.heads import HashHeads, HEIHasher, base_probe, load_heads, save_heads
from matcher.search.hashed import HashedMatcher, rerank, two_stage_search
from matcher.hashing.train import HashRecipe, train_heads
from matcher.search.index import BinaryIndex, FloatIndex
from matcher.train.losses import HEILoss, build_loss
from matcher.search.protocol import QueryError, SearchOptions


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic(n, dim=32, seed=0):
    """Paired embeddings with a shared latent, a modality offset and noise (5 captions per image)."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(99).standard_normal((8, dim))
    z = rng.standard_normal((n, 8))
    cap_img = np.repeat(np.arange(n), 5)
    images = unit(z @ mix + 0.8 * rng.standard_normal((n, dim)) + 1.0)
    captions = unit(z[cap_img] @ mix + 1.2 * rng.standard_normal((5 * n, dim)) - 1.0)
    return GalleryEmbeddings([f"{i}.jpg" for i in range(n)], images, [f"caption {i}" for i in range(5 * n)], cap_img, captions)


# --- codes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 32, 64, 256])
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    raw = rng.integers(0, 2, (7, bits)).astype(np.uint8)
    packed = pack_bits(raw)
    assert packed.shape == (7, bits // 8) and packed.dtype == np.uint8
    assert np.array_equal(unpack_bits(packed, bits), raw)
    assert np.array_equal(pack_bits(raw * 2.0 - 1.0), packed)  # real values are thresholded at 0


def test_pack_known_layout_and_bad_shapes():
    assert pack_bits(np.array([[1, 0, 0, 0, 0, 0, 0, 1]]))[0, 0] == 0b10000001
    with pytest.raises(ValueError):
        pack_bits(np.ones((2, 12)))


def test_hamming_similarity_equals_scaled_inner_product_of_signs():
    rng = np.random.default_rng(1)
    a, b = rng.choice([-1.0, 1.0], (5, 64)), rng.choice([-1.0, 1.0], (6, 64))
    sim = hamming_similarity(hamming_distance(pack_bits(a), pack_bits(b)), 64)
    assert np.allclose(sim, a @ b.T / 64)


def test_binary_index_matches_numpy_bruteforce():
    rng = np.random.default_rng(2)
    items, queries = rng.integers(0, 256, (300, 8), dtype=np.uint8), rng.integers(0, 256, (20, 8), dtype=np.uint8)
    index = BinaryIndex(64)
    index.add(items)
    dist, ids = index.search(queries, 15)
    ref = hamming_distance(queries, items)
    assert np.array_equal(dist, np.sort(ref, axis=1)[:, :15])
    assert np.array_equal(np.take_along_axis(ref, ids, 1), dist)  # ids carry those distances
    assert len(index) == 300 and index.bytes_per_item == 8
    with pytest.raises(ValueError):
        index.add(items[:, :4])


def test_binary_hnsw_finds_exact_duplicates():
    rng = np.random.default_rng(3)
    items = rng.integers(0, 256, (500, 8), dtype=np.uint8)
    index = BinaryIndex(64, hnsw_m=16)
    index.add(items)
    dist, ids = index.search(items[:20], 5)
    assert np.array_equal(ids[:, 0], np.arange(20)) and np.all(dist[:, 0] == 0)


def test_lsh_and_itq_shapes_and_determinism():
    emb = synthetic(200)
    for cls in (LSHHasher, ITQHasher):
        a, b = cls(emb.images, emb.captions, 16, seed=0), cls(emb.images, emb.captions, 16, seed=0)
        codes = a.encode(emb.captions, "text")
        assert codes.shape == (1000, 2) and np.array_equal(codes, b.encode(emb.captions, "text"))
    with pytest.raises(ValueError, match="bits <= embedding dim"):
        ITQHasher(emb.images, emb.captions, 64)


def test_itq_reduces_quantisation_error_versus_its_start():
    emb = synthetic(300)
    itq0, itq = ITQHasher(emb.images, emb.captions, 16, iterations=0), ITQHasher(emb.images, emb.captions, 16)

    def error(h):
        v = np.concatenate([h.real(emb.images, "image"), h.real(emb.captions, "text")])
        return float(((np.sign(v) - v) ** 2).sum())

    assert error(itq) < error(itq0)


# --- HEI loss --------------------------------------------------------------------------------

def test_hei_loss_is_registered():
    assert isinstance(build_loss("hei"), HEILoss)


def test_hei_loss_pulls_matched_pair_up():
    loss_fn = HEILoss(neg_weight=1.0, quant_weight=0.0)
    sim = torch.tensor([[0.2, -1.0], [-1.0, 0.9]], requires_grad=True)
    teacher = torch.zeros(2, 2)
    loss_fn(sim, teacher).backward()
    assert sim.grad[0, 0] < 0 and sim.grad[1, 1] < 0        # descent raises matched similarity
    assert abs(sim.grad[0, 0]) > abs(sim.grad[1, 1])          # the worse-matched pair is pulled harder
    perfect = HEILoss(quant_weight=0.0)(torch.tensor([[1.0, -0.5], [-0.5, 1.0]]), torch.zeros(2, 2))
    assert perfect.item() == pytest.approx(0.0)


def test_hei_loss_pushes_non_matched_pair_only_above_its_score():
    loss_fn = HEILoss(neg_weight=1.0, quant_weight=0.0)
    sim = torch.tensor([[1.0, 0.7, 0.1], [0.2, 1.0, 0.3], [0.0, 0.0, 1.0]], requires_grad=True)
    teacher = torch.tensor([[0.9, 0.4, 0.5], [0.5, 0.9, 0.3], [0.1, 0.1, 0.9]])
    loss = loss_fn(sim, teacher)
    loss.backward()
    assert sim.grad[0, 1] > 0                                 # 0.7 > its score 0.4: pushed down
    assert sim.grad[0, 2] == 0 and sim.grad[1, 0] == 0        # below their scores: left alone
    assert sim.grad[1, 2] == 0                                # exactly at its score: left alone
    assert loss.item() == pytest.approx(0.3 ** 2 / 6)          # one violation of 0.3, six non-matched pairs


def test_hei_quantisation_term_prefers_saturated_codes():
    loss_fn = HEILoss(neg_weight=0.0, quant_weight=1.0)
    sim, teacher = torch.eye(2), torch.zeros(2, 2)
    soft = loss_fn(sim, teacher, codes=(torch.full((2, 4), 0.5), torch.full((2, 4), -0.5)))
    hard = loss_fn(sim, teacher, codes=(torch.full((2, 4), 1.0), torch.full((2, 4), -1.0)))
    assert soft.item() == pytest.approx(0.25) and hard.item() == pytest.approx(0.0)
    with pytest.raises(ValueError):
        loss_fn(sim, None)


# --- two-stage search ---------------------------------------------------------------------------

def test_two_stage_with_all_candidates_is_exact_float_search():
    emb = synthetic(120)
    hasher = LSHHasher(emb.images, emb.captions, 32)
    index = BinaryIndex(32)
    index.add(hasher.encode(emb.images, "image"))
    queries = emb.captions[:40]
    scores, ids = two_stage_search(index, emb.images, hasher.encode(queries, "text"), queries, k=10, candidates=len(emb.images))
    exact = FloatIndex(emb.images.shape[1])
    exact.add(emb.images)
    ref_scores, ref_ids = exact.search(queries, 10)
    assert np.array_equal(ids, ref_ids)
    assert np.allclose(scores, ref_scores, atol=1e-5)


def test_rerank_orders_candidates_and_ignores_missing():
    vectors = np.eye(4, dtype=np.float32)
    scores, ids = rerank(np.array([[0.1, 0.9, 0.5, 0.0]], np.float32), np.array([[0, 2, 1, -1]]), vectors, 3)
    assert ids.tolist() == [[1, 2, 0]] and np.allclose(scores, [[0.9, 0.5, 0.1]])


def test_two_stage_metrics_at_full_shortlist_equal_exhaustive_recall():
    from matcher.eval.costs import evaluate_embeddings

    emb = synthetic(60)
    hasher = LSHHasher(emb.images, emb.captions, 16)
    full = two_stage_metrics(hasher, emb, candidates=len(emb.caption_texts))
    exact = evaluate_embeddings(emb)
    assert full["t2i"] == pytest.approx(exact["t2i"]) and full["i2t"] == pytest.approx(exact["i2t"])
    assert full["candidate_recall"] == 1.0
    short = two_stage_metrics(hasher, emb, candidates=10)
    assert short["t2i"]["R@10"] <= full["t2i"]["R@10"] + 1e-9


def test_candidate_recall_counts_exhaustive_top_found():
    sim = np.array([[0.9, 0.8, 0.1, 0.0]])
    assert candidate_recall(np.array([[0, 3]]), sim, top=2) == 0.5
    assert candidate_recall(np.array([[1, 0]]), sim, top=2) == 1.0


# --- HEI heads: training, saving, matcher ------------------------------------------------------

def test_hei_training_learns_and_round_trips(tmp_path):
    torch.set_num_threads(1)
    train, val, test = synthetic(600, seed=0), synthetic(150, seed=1), synthetic(150, seed=2)
    heads, record = train_heads(train, train, val, 32, HashRecipe(epochs=6, batch_size=128), progress=False)
    hei = HEIHasher(heads)
    history = record["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert two_stage_metrics(hei, test, 20)["candidate_recall"] > 0.4  # chance is 20/150
    assert 0 <= record["best_epoch"] < 6 and len(record["history"]) == 6
    path = tmp_path / "heads.pt"
    save_heads(path, {32: heads}, {"base": "synthetic"})
    loaded, meta = load_heads(path)
    assert meta == {"base": "synthetic"}
    assert np.array_equal(loaded[32].encode(test.captions, "text"), hei.encode(test.captions, "text"))
    # numpy inference agrees with the torch head's sign
    with torch.no_grad():
        torch_bits = heads.text(torch.from_numpy(test.captions)).numpy() > 0
    assert np.array_equal(pack_bits(torch_bits), hei.encode(test.captions, "text"))


class _FixedEncoder:
    """Stands in for an Encoder: maps known strings / images to stored vectors."""

    name = "fixed"

    def __init__(self, emb):
        self.emb = emb

    def encode_texts(self, texts):
        return np.stack([self.emb.captions[self.emb.caption_texts.index(t)] for t in texts])

    def encode_images(self, images):
        return np.stack([self.emb.images[int(im)] for im in images])


def test_hashed_matcher_full_shortlist_equals_float_top_k_with_stage_timings():
    emb = synthetic(80)
    hashers = {16: LSHHasher(emb.images, emb.captions, 16), 32: LSHHasher(emb.images, emb.captions, 32)}
    matcher = HashedMatcher(_FixedEncoder(emb), gallery=None, hashers=hashers, embeddings=emb)
    result = matcher.search_text("caption 7", SearchOptions(k=5, bits=32, candidates=80))
    expected = np.argsort(-(emb.images @ emb.captions[7]), kind="stable")[:5]
    assert [h.row for h in result.hits] == expected.tolist()
    assert set(result.timings_ms) == {"encode", "candidates", "rerank"}
    assert [h.row for h in matcher.search_image(3, SearchOptions(k=3, candidates=80, bits=16)).hits][0] == 3
    assert matcher.more_like("3.jpg", SearchOptions(k=3, bits=16, candidates=80)).hits[0].name == "3.jpg"
    caps = matcher.captions_for_image(2, SearchOptions(k=5, bits=16, candidates=400))
    assert caps.hits[0].row == int(np.argmax(emb.captions @ emb.images[2]))
    unranked = matcher.search_text("caption 7", SearchOptions(k=5, bits=32, candidates=20, rerank=False))
    assert all(-1 <= h.score <= 1 for h in unranked.hits) and len(unranked.hits) == 5
    with pytest.raises(QueryError, match="no 64-bit codes"):
        matcher.search_text("caption 7", SearchOptions(bits=64))
    with pytest.raises(QueryError):
        matcher.more_like("missing.jpg")


def _other_tiny_checkpoint(tmp_path):
    from matcher.models.openclip import OpenClipEncoder, save_open_clip_checkpoint

    path = tmp_path / "other-tiny.pt"
    save_open_clip_checkpoint(OpenClipEncoder("matcher-tiny-vit", seed=7), path)
    return path


def test_open_matcher_builds_hashed_matcher_from_registered_config(tmp_path, monkeypatch, small_gallery):
    import matcher.registry as models
    from matcher.data.gallery import open_gallery
    from matcher.registry import open_matcher
    from matcher.search.exact import ExactMatcher

    encoder = models.cached_encoder("open_clip:matcher-tiny-vit")
    torch.manual_seed(0)
    save_heads(tmp_path / "heads.pt", {16: HashHeads(32, 16)}, {"base_probe": base_probe(encoder)})
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "tiny-hashed.json").write_text(json.dumps(
        {"type": "hashed", "base": "open_clip:matcher-tiny-vit", "heads": str(tmp_path / "heads.pt")}))
    monkeypatch.setattr(models, "CONFIG_DIR", configs)
    gallery = open_gallery(small_gallery)
    hashed = open_matcher("tiny-hashed", gallery)
    assert isinstance(hashed, HashedMatcher) and hashed.name == "tiny-hashed"
    exact = ExactMatcher(encoder, gallery).search_text("a dog", SearchOptions(k=5))
    result = hashed.search_text("a dog", SearchOptions(k=5, bits=16, candidates=len(gallery)))
    assert [h.row for h in result.hits] == [h.row for h in exact.hits]
    assert set(result.timings_ms) == {"encode", "candidates", "rerank"}
    assert models.load_encoder("tiny-hashed").fingerprint() == encoder.fingerprint()  # queries use the base encoder
    other = models.load_encoder("open_clip:matcher-tiny-vit@" + str(_other_tiny_checkpoint(tmp_path)))
    save_heads(tmp_path / "heads.pt", {16: HashHeads(32, 16)}, {"base_probe": base_probe(other)})
    with pytest.raises(ValueError, match="trained on other weights"):
        open_matcher("tiny-hashed", gallery)


def test_rerank_by_another_encoder_orders_the_shortlist_by_its_vectors():
    emb, other = synthetic(60, seed=0), synthetic(60, seed=5)
    other.names = emb.names
    hashers = {16: LSHHasher(emb.images, emb.captions, 16)}
    matcher = HashedMatcher(_FixedEncoder(emb), None, hashers, embeddings=emb, reranker=(_FixedEncoder(other), other))
    result = matcher.search_text("caption 4", SearchOptions(k=5, bits=16, candidates=60))
    expected = np.argsort(-(other.images @ other.captions[4]), kind="stable")[:5]
    assert [h.row for h in result.hits] == expected.tolist()


def test_rank_captions_matches_search_text_and_censors_outside_shortlist():
    emb = synthetic(50)
    matcher = HashedMatcher(_FixedEncoder(emb), None, {16: LSHHasher(emb.images, emb.captions, 16)}, embeddings=emb)
    texts = emb.caption_texts[:30]
    owners = [emb.names[i] for i in emb.caption_image[:30]]
    options = SearchOptions(k=5, bits=16, candidates=10)
    ranking = matcher.rank_captions(texts, owners, 5, options)
    topk, ranks, cap = ranking.topk, ranking.gt_rank, ranking.cap
    assert cap == 10 and len(topk) == 30 and ranks.max() <= 10
    for text, names, rank, owner in zip(texts, topk, ranks, owners):
        assert names == [h.name for h in matcher.search_text(text, options).hits]
        if rank < 5:
            assert names[rank] == owner
        else:
            assert owner not in names
    full_ranks = matcher.rank_captions(texts, owners, 5, SearchOptions(k=5, bits=16, candidates=50)).gt_rank
    sim = emb.captions[:30] @ emb.images.T
    exact = (sim > sim[np.arange(30), emb.caption_image[:30]][:, None]).sum(axis=1)
    assert np.array_equal(full_ranks, exact)


def test_default_code_length_index_is_built_when_the_matcher_opens():
    """Opening (the app's warm-up) hashes the gallery for the default bits, not the first query."""
    emb = synthetic(40)
    hashers = {16: LSHHasher(emb.images, emb.captions, 16), SearchOptions.bits: LSHHasher(emb.images, emb.captions, SearchOptions.bits)}
    matcher = HashedMatcher(_FixedEncoder(emb), None, hashers, embeddings=emb)
    assert set(matcher._indexes) == {(SearchOptions.bits, "image")}   # other code lengths stay lazy
    built = matcher.index(SearchOptions.bits)
    matcher.search_text("caption 3")
    assert matcher.index(SearchOptions.bits) is built and len(matcher._indexes) == 1
