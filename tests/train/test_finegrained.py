"""Fine-grained tiers on hand-made tensors: max-sum aggregation with known answers, code pooling,
the hinge loss with hardest negatives, re-ranking under the protocol, and short seeded training."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from matcher.finegrained.evaluate import Encoded, rerank_metrics, score_shortlists
from matcher.finegrained.features import FineSplit
from matcher.finegrained.scorers import AlignmentScorer, CodePooling, CodeScorer, max_sum, max_sum_pairs
from matcher.finegrained.checkpoints import FineRecipe
from matcher.finegrained.train import batch_scores, train_scorer
from matcher.train.losses import TripletHingeLoss, build_loss
from matcher.eval.metrics import retrieval_metrics


# --- max-sum aggregation ---------------------------------------------------------------------

def hand_made():
    """2 images x 2 regions, 2 texts x 3 token slots (text 1 has one padding slot), in 2-d."""
    image = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],     # image 0: regions along x and y
                          [[0.6, 0.8], [-1.0, 0.0]]])   # image 1
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]],
                         [[0.0, -1.0], [1.0, 0.0], [5.0, 5.0]]])  # last slot is padding
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return image, text, mask


def test_max_sum_known_answer():
    image, text, mask = hand_made()
    s = max_sum(image, text, mask, "sum")
    # image 0 / text 0: words x, y, (.6,.8) -> best regions 1, 1, .8 -> 2.8
    # image 0 / text 1: words -y, x -> max(0, -1)=0, 1 -> 1.0 (padding ignored)
    # image 1 / text 0: x -> max(.6, -1)=.6; y -> .8; (.6,.8) -> 1 -> 2.4
    # image 1 / text 1: -y -> max(-.8, 0)=0; x -> .6 -> 0.6
    expected = torch.tensor([[2.8, 1.0], [2.4, 0.6]])
    assert torch.allclose(s, expected, atol=1e-6)
    assert torch.allclose(max_sum(image, text, mask, "mean"), expected / torch.tensor([3.0, 2.0]), atol=1e-6)


def test_max_sum_pairs_is_the_diagonal_and_rejects_unknown_reduce():
    image, text, mask = hand_made()
    full = max_sum(image, text, mask, "mean")
    assert torch.allclose(max_sum_pairs(image, text, mask, "mean"), full.diagonal(), atol=1e-6)
    with pytest.raises(ValueError):
        max_sum(image, text, mask, "max")


def heads(seed=0, d_img=12, d_txt=10, dim=6):
    torch.manual_seed(seed)
    return torch.nn.Linear(d_img, dim), torch.nn.Linear(d_txt, dim)


def test_alignment_projections_start_at_the_dual_encoder():
    """Mean-pooling the projected regions equals the head applied to pooled features."""
    image_head, text_head = heads()
    scorer = AlignmentScorer(image_head, text_head).eval()
    regions = torch.randn(3, 5, 12)
    pooled = scorer.project_regions(regions).mean(1)
    assert torch.allclose(pooled, image_head(regions.mean(1)), atol=1e-5)


# --- code pooling ------------------------------------------------------------------------------

def test_code_pooling_shapes_weights_and_uniform_start():
    torch.manual_seed(0)
    pool = CodePooling(codes=4, dim=6)
    x = torch.randn(3, 7, 6)
    attn = pool.attention(x)
    assert attn.shape == (3, 4, 7)
    assert torch.allclose(attn.sum(-1), torch.ones(3, 4), atol=1e-6)
    assert pool(x).shape == (3, 4, 6)
    with torch.no_grad():
        pool.queries.zero_()  # zero queries -> uniform attention -> every code is the region mean
    assert torch.allclose(pool(x), x.mean(1, keepdim=True).expand(-1, 4, -1), atol=1e-6)


def test_code_pooling_follows_its_query():
    """A query aligned with one region's key, scaled up, pools (almost) only that region."""
    pool = CodePooling(codes=1, dim=2)
    with torch.no_grad():
        pool.key.weight.copy_(torch.eye(2))
        pool.key.bias.zero_()
        pool.queries.copy_(torch.tensor([[0.0, 100.0]]))
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    assert torch.allclose(pool(x)[0, 0], torch.tensor([0.0, 1.0]), atol=1e-4)


def test_code_scorer_encodes_m_unit_codes_and_shrinks():
    image_head, text_head = heads()
    big = CodeScorer(image_head, text_head, codes=8).eval()
    codes = big.encode_image(torch.randn(3, 5, 12))
    assert codes.shape == (3, 8, 6)
    assert torch.allclose(codes.norm(dim=-1), torch.ones(3, 8), atol=1e-5)
    small = CodeScorer.shrunk_from(big, 2)
    assert small.codes == 2 and torch.equal(small.pool.queries, big.pool.queries[:2])
    tokens, mask = torch.randn(4, 3, 10), torch.ones(4, 3, dtype=torch.bool)
    assert small.score(small.encode_image(torch.randn(3, 5, 12)), small.encode_text(tokens, mask), mask).shape == (3, 4)


# --- hinge loss --------------------------------------------------------------------------------

def test_triplet_hinge_hardest_known_answer():
    sim = torch.tensor([[0.9, 0.8, 0.1],
                        [0.2, 0.5, 0.6],
                        [0.0, 0.1, 0.7]])
    # image anchors (rows): violations relu(.2 + S_ij - S_ii): row0 max(.1, 0)=.1; row1 max(0, .3)=.3; row2 max(0,0)=0
    # text anchors (cols): relu(.2 + S_ij - S_jj): col0 max(0, 0)=0; col1 max(.5, 0)=.5; col2 max(0, .1)=.1
    loss = TripletHingeLoss(margin=0.2)(sim, None)
    assert loss.item() == pytest.approx((0.1 + 0.3 + 0.0) / 3 + (0.0 + 0.5 + 0.1) / 3, abs=1e-6)
    summed = TripletHingeLoss(margin=0.2, hardest=False)(sim, None)
    assert summed.item() == pytest.approx((0.1 + 0.3 + 0.0) / 3 + (0.0 + 0.5 + 0.1) / 3, abs=1e-6)  # one violation each
    assert isinstance(build_loss("triplet"), TripletHingeLoss)


def test_triplet_hinge_zero_when_margin_met_and_hardest_only_counts_the_worst():
    assert TripletHingeLoss(0.2)(torch.eye(4), None).item() == 0.0
    sim = torch.tensor([[1.0, 0.9, 0.9], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    hardest = TripletHingeLoss(0.2)(sim, None).item()
    summed = TripletHingeLoss(0.2, hardest=False)(sim, None).item()
    assert summed > hardest > 0


def test_triplet_hinge_gradient_pushes_the_hardest_negative_down():
    sim = torch.tensor([[0.5, 0.45, 0.1], [0.0, 0.5, 0.0], [0.0, 0.0, 0.5]], requires_grad=True)
    TripletHingeLoss(0.2)(sim, None).backward()
    assert sim.grad[0, 1] > 0 and sim.grad[0, 0] < 0 and sim.grad[0, 2] == 0


# --- re-ranking under the protocol --------------------------------------------------------------

class OracleScorer:
    """Scores a pair 1 if the caption belongs to the image, else 0 (through ``score_pairs``)."""

    def score_pairs(self, image, text, mask):
        return (image[:, 0, 0] == text[:, 0, 0]).float()


def test_rerank_fixes_the_shortlist_and_keeps_the_rest_in_dual_order():
    n = 6
    caption_image = np.repeat(np.arange(n), 5)
    rng = np.random.default_rng(0)
    dual = rng.standard_normal((5 * n, n)).astype(np.float32)
    enc = Encoded(torch.arange(n, dtype=torch.float32).view(n, 1, 1),
                  torch.from_numpy(caption_image.astype(np.float32)).view(-1, 1, 1), torch.ones(5 * n, 1, dtype=torch.bool))
    lists = score_shortlists(OracleScorer(), enc, dual, candidates=5 * n)  # C = all: the oracle decides everything
    assert rerank_metrics(dual, lists, caption_image)["rsum"] == pytest.approx(600.0)
    lists0 = score_shortlists(OracleScorer(), enc, dual, candidates=1)
    lists0.t2i_fine[:] = 0.0
    lists0.i2t_fine[:] = 0.0  # C = 1 with constant fine scores: the dual order is unchanged
    assert rerank_metrics(dual, lists0, caption_image)["rsum"] == pytest.approx(retrieval_metrics(dual, caption_image)["rsum"])


# --- short seeded training ----------------------------------------------------------------------

def tiny_split(n, seed, dim_img=12, dim_txt=10, regions=4, words=3):
    """Images whose region 0 carries a latent, captions whose word 0 carries the same latent."""
    rng = np.random.default_rng(seed)
    mix_i, mix_t = np.random.default_rng(7).standard_normal((2, 4, dim_img))[0], np.random.default_rng(8).standard_normal((4, dim_txt))
    z = rng.standard_normal((n, 4))
    regs = rng.standard_normal((n, regions, dim_img))
    regs[:, 0] += 3 * z @ mix_i
    caps = rng.standard_normal((5 * n, words, dim_txt))
    caps[:, 0] += 3 * np.repeat(z, 5, axis=0) @ mix_t
    offsets = np.arange(0, 5 * n * words + 1, words)
    return FineSplit(regs.astype(np.float16), caps.reshape(-1, dim_txt).astype(np.float16), offsets)


def test_alignment_training_lowers_the_loss_and_keeps_the_best_val_epoch():
    train, val = tiny_split(64, 0), tiny_split(16, 1)
    image_head, text_head = heads()
    recipe = FineRecipe(epochs=4, batch_size=16, lr=1e-2, candidates=16, dropout=0.0)
    scorer = AlignmentScorer(image_head, text_head, "mean", 0.0)
    rows, caps = np.arange(16), np.arange(16) * 5
    hinge = TripletHingeLoss(recipe.margin)
    with torch.no_grad():
        before = hinge(batch_scores(scorer, train, rows, caps)).item()
    dual = np.zeros((80, 16), dtype=np.float32)  # C = all images: val rsum is the fine scorer's own
    out = train_scorer(scorer, train, val, dual, recipe, log=lambda *_: None)
    with torch.no_grad():
        after = hinge(batch_scores(scorer.eval(), train, rows, caps)).item()
    assert after < before
    assert out["best_epoch"] > 0 and out["val"]["rsum"] > out["history"][0]["val_rsum"]
    assert out["val"]["rsum"] == max(h["val_rsum"] for h in out["history"])


# --- cross-encoder and its decomposition ---------------------------------------------------------

def tiny_cross(seed=0):
    from matcher.finegrained.cross import CrossEncoder

    image_head, text_head = heads(seed)
    torch.manual_seed(seed)
    return CrossEncoder(image_head, text_head, dim=16, layers=1, heads=2, ffn=32, dropout=0.0, regions=4, max_words=8).eval()


def test_cross_encoder_scores_pairs_and_ignores_padding():
    cross = tiny_cross()
    regions, tokens = torch.randn(3, 4, 12), torch.randn(3, 3, 10)
    mask = torch.ones(3, 3, dtype=torch.bool)
    with torch.no_grad():
        s = cross.score_pairs(cross.encode_image(regions), cross.encode_text(tokens, mask), mask)
        padded = torch.cat([tokens, 9 * torch.randn(3, 2, 10)], 1)
        pmask = torch.cat([mask, torch.zeros(3, 2, dtype=torch.bool)], 1)
        s_pad = cross.score_pairs(cross.encode_image(regions), cross.encode_text(padded, pmask), pmask)
        other = cross.score_pairs(cross.encode_image(regions.flip(0)), cross.encode_text(tokens, mask), mask)
    assert s.shape == (3,)
    assert torch.allclose(s, s_pad, atol=1e-5)   # padding tokens are masked out
    assert not torch.allclose(s, other)           # and the image does matter


def test_hard_negatives_never_include_the_own_image():
    from matcher.finegrained.cross_train import hard_negatives

    dual = np.random.default_rng(0).standard_normal((20, 4))
    cap_img = np.repeat(np.arange(4), 5)
    neg = hard_negatives(dual, cap_img, 2)
    assert neg.shape == (20, 2) and not (neg == cap_img[:, None]).any()


def test_decomposition_starts_from_the_cross_encoder_and_training_lowers_its_loss():
    from matcher.finegrained.cross import DecomposedEncoder
    from matcher.finegrained.cross_train import CrossRecipe, decomposition_loss, train_decomposed

    cross = tiny_cross()
    decomposed = DecomposedEncoder(cross, embed_dim=8)
    assert torch.equal(decomposed.cross.tokens.image_in.weight, cross.tokens.image_in.weight)
    train, val = tiny_split(64, 0), tiny_split(16, 1)
    rows, caps = np.arange(16), np.arange(16) * 5
    with torch.no_grad():
        before = decomposition_loss(decomposed.eval(), cross, train, rows, caps, 1.0).item()
    recipe = CrossRecipe(decomp_steps=30, decomp_batch=16, decomp_lr=1e-2, eval_every=30)
    train_decomposed(decomposed, cross, train, val, recipe, log=lambda *_: None)
    with torch.no_grad():
        after = decomposition_loss(decomposed.eval(), cross, train, rows, caps, 1.0).item()
    assert after < before
    assert decomposed.encode_image(torch.randn(2, 4, 12)).shape == (2, 1, 8)


def test_cross_encoder_training_on_hard_negatives_keeps_the_best_val_checkpoint():
    from matcher.finegrained.cross_train import CrossRecipe, train_cross

    cross = tiny_cross()
    train, val = tiny_split(32, 0), tiny_split(8, 1)
    rng = np.random.default_rng(0)
    dual_train, dual_val = rng.standard_normal((160, 32)).astype(np.float32), rng.standard_normal((40, 8)).astype(np.float32)
    recipe = CrossRecipe(steps=20, batch_size=8, negatives=2, pool=4, lr=5e-3, candidates=8, eval_every=10)
    out = train_cross(cross, train, dual_train, val, dual_val, recipe, log=lambda *_: None)
    assert [h["step"] for h in out["history"]] == [10, 20]
    assert out["val"]["rsum"] == max(h["val_rsum"] for h in out["history"])
    assert out["history"][-1]["loss"] < np.log(3)  # below chance for 1 positive among 3


def test_code_training_with_frozen_projections_only_moves_the_pooling():
    train, val = tiny_split(32, 0), tiny_split(8, 1)
    image_head, text_head = heads()
    scorer = CodeScorer(image_head, text_head, codes=2, dropout=0.0)
    before = {k: v.clone() for k, v in scorer.state_dict().items()}
    recipe = FineRecipe(tier="codes", codes=2, epochs=1, batch_size=8, lr=1e-2, freeze_projections=True)
    train_scorer(scorer, train, val, np.zeros((40, 8), dtype=np.float32), recipe, log=lambda *_: None)
    after = scorer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("image_proj", "text_proj")))
    assert not any(p.requires_grad for p in [*scorer.image_proj.parameters(), *scorer.text_proj.parameters()])
    assert scorer.pool.queries.requires_grad


def test_residual_cross_encoder_starts_at_the_scaled_dual_cosine():
    from matcher.finegrained.cross import CrossEncoder

    image_head, text_head = heads()
    cross = CrossEncoder(image_head, text_head, dim=16, layers=1, heads=2, ffn=32, dropout=0.0, regions=4,
                         max_words=8, residual_scale=20.0).eval()
    regions, tokens = torch.randn(3, 4, 12), torch.randn(3, 5, 10)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        s = cross.score_pairs(cross.encode_image(regions), cross.encode_text(tokens, mask), mask)
        m = mask.unsqueeze(-1).float()
        dual = F.cosine_similarity(image_head(regions.mean(1)), text_head((tokens * m).sum(1) / m.sum(1)), dim=-1)
    assert torch.allclose(s, 20.0 * dual, atol=1e-5)


def test_code_diversity_detects_collapsed_and_distinct_codes():
    from matcher.finegrained.evaluate import code_diversity

    image_head, text_head = heads()
    scorer = CodeScorer(image_head, text_head, codes=3, dropout=0.0)
    split = tiny_split(8, 0)
    with torch.no_grad():
        scorer.pool.queries.zero_()
    collapsed = code_diversity(scorer, split)
    assert collapsed["attention_entropy"] == pytest.approx(1.0, abs=1e-4)
    assert collapsed["code_cosine"] == pytest.approx(1.0, abs=1e-4)
    with torch.no_grad():
        scorer.pool.queries.copy_(50 * torch.randn(3, 6))
    distinct = code_diversity(scorer, split)
    assert distinct["attention_entropy"] < 0.5 and distinct["code_cosine"] < collapsed["code_cosine"]


def test_alignment_targets_batch_matches_max_sum_and_calibration_matches_the_dual_spread():
    """The student's per-batch teacher matrix from stored unit regions/tokens (no real data needed)."""
    from matcher.finegrained.distill import AlignmentTargets

    rng = torch.Generator().manual_seed(0)
    targets = AlignmentTargets.__new__(AlignmentTargets)   # skip the loading; fill what batch() reads
    targets.reduce, targets.dual_scale, targets.scale = "mean", 30.0, 1.0
    targets.regions = F.normalize(torch.randn(12, 4, 6, generator=rng), dim=-1).half()
    lengths = np.tile([3, 2, 4, 3, 2], 12)
    targets.offsets = np.concatenate([[0], np.cumsum(lengths)])
    targets.tokens = F.normalize(torch.randn(int(lengths.sum()), 6, generator=rng), dim=-1).half()
    rows, caps = np.array([0, 5, 7]), np.array([1, 26, 35])
    got = targets.batch(rows, caps)
    text = torch.zeros(3, 4, 6)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    for i, c in enumerate(caps):
        s, e = targets.offsets[c], targets.offsets[c + 1]
        text[i, : e - s], mask[i, : e - s] = targets.tokens[s:e].float(), True
    assert torch.allclose(got, max_sum(targets.regions[rows].float(), text, mask, "mean"), atol=1e-6)
    t_images = F.normalize(torch.randn(12, 1, 5, generator=rng), dim=-1)
    t_texts = F.normalize(torch.randn(60, 5, generator=rng), dim=-1)
    scale = targets.calibrate(t_images, t_texts, batch_size=6, batches=1)
    draw = np.random.default_rng(0)  # the batch calibrate drew (same seed, same order of draws)
    r = draw.choice(12, 6, replace=False)
    c = r * 5 + draw.integers(0, 5, 6)
    assert scale > 0
    dual_spread = (30.0 * (t_images[r, 0] @ t_texts[c].T)).std(1).mean()
    assert (scale * targets.batch(r, c)).std(1).mean().item() == pytest.approx(dual_spread.item(), rel=1e-4)


# -- the fine tier as a dashboard matcher (bundled teacher + bundled alignment scorer) ----------------

@pytest.mark.slow
def test_fine_rerank_matcher_reorders_only_the_teacher_shortlist(small_gallery, tmp_path):
    from matcher.data.cache import ArrayCache
    from matcher.search.fine import FineRerankMatcher
    from matcher.data.gallery import open_gallery
    from matcher.registry import registered_models
    from matcher.registry import open_matcher
    from matcher.search.exact import ExactMatcher
    from matcher.search.protocol import QueryError, SearchOptions

    gallery = open_gallery(small_gallery)
    fine = open_matcher("offline-fine", gallery)
    assert isinstance(fine, FineRerankMatcher) and fine.regions.shape[:2] == (12, 49)
    config = registered_models()["offline-fine"]
    caption = gallery.captions[gallery.names[3]][0]

    result = fine.search_text(caption, SearchOptions(k=5))
    assert set(result.timings_ms) == {"encode", "candidates", "rerank"}
    scores = [h.score for h in result.hits]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    # Every hit is scored cos_teacher + fuse * alignment, recomputed here independently.
    query, words, mask = fine._encode_text(caption)
    teacher = fine.base.encoder.encode_texts([caption])[0]
    assert np.allclose(query, teacher, atol=1e-5)  # one tower run gives the teacher's own embedding
    for hit in result.hits:
        cos = float(fine.embeddings.images[hit.row] @ teacher)
        align = float(fine.scorer.score_pairs(fine.regions[hit.row:hit.row + 1], words, mask)[0])
        assert hit.score == pytest.approx(cos + config["fuse"] * align, abs=1e-4)
    # With a shortlist of C = k, re-ranking can only permute the teacher's own top-k.
    short = FineRerankMatcher(fine.base, fine.scorer, config["fuse"], candidates=5, cache=ArrayCache(tmp_path))
    teacher_top = {h.name for h in ExactMatcher(fine.base.encoder, gallery).search_text(caption, SearchOptions(k=5)).hits}
    assert {h.name for h in short.search_text(caption, SearchOptions(k=5)).hits} == teacher_top
    # gallery regions are deterministic up to their float16 storage (thread counts change the last bit)
    assert torch.allclose(short.regions, fine.regions, atol=2e-3)
    # Image queries have no words: the teacher answers, unchanged.
    assert [h.name for h in fine.more_like(gallery.names[0]).hits] == [h.name for h in fine.base.more_like(gallery.names[0]).hits]
    with pytest.raises(QueryError):
        fine.search_text("   ")


def test_teacher_heads_from_the_loaded_teacher_equal_those_from_its_checkpoint():
    """The dashboard takes the heads from the teacher it already holds instead of re-reading the file."""
    from matcher.finegrained.checkpoints import teacher_heads
    from matcher.registry import cached_encoder
    from matcher.paths import REPO_ROOT

    from_file = teacher_heads(REPO_ROOT / "assets/models/offline-teacher.pt")
    from_module = teacher_heads(cached_encoder("offline-teacher").module)
    for a, b in zip(from_file[:2], from_module[:2]):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert from_file[2] == pytest.approx(from_module[2])
    with pytest.raises(ValueError, match="towers dual encoder as its base"):
        teacher_heads(torch.nn.Linear(2, 2))
