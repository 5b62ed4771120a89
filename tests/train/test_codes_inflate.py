"""Inflate & Shrink codes that inflate (docs/inflate-shrink.md), on hand-made inputs: the diversity
term, k-means initialisation of the queries, the sharper pooling, the dual residual in the late
interaction, the queries' own learning rate, a short seeded run, shrinking, and the old checkpoints."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from matcher.finegrained.checkpoints import FineRecipe, build_scorer, load_scorer
from matcher.finegrained.evaluate import code_diversity
from matcher.finegrained.scorers import CodePooling, CodeScorer, kmeans, max_sum
from matcher.finegrained.train import init_queries_kmeans, train_scorer
from matcher.paths import REPO_ROOT
from matcher.train.losses import CodeDiversityLoss

from tests.train.test_finegrained import heads, tiny_split


# --- the diversity term ----------------------------------------------------------------------------

def test_diversity_is_zero_for_orthogonal_codes_and_one_for_collapsed_codes():
    loss = CodeDiversityLoss()
    orthogonal = torch.stack([torch.eye(4)[:3] * 2.0, -torch.eye(4)[1:]])  # [2 images, 3 codes, 4-d], any norm
    assert loss(orthogonal, None).item() == pytest.approx(0.0, abs=1e-7)
    collapsed = torch.randn(2, 1, 4).expand(-1, 3, -1) * torch.tensor([1.0, 2.0, 5.0]).view(1, 3, 1)
    assert loss(collapsed, None).item() == pytest.approx(1.0, abs=1e-6)
    assert loss(torch.randn(5, 1, 4), None).item() == 0.0  # one code: nothing to keep apart


def test_diversity_known_answer_and_gradient_pushes_codes_apart():
    # codes (1,0) and (.6,.8) have cosine .6: both ordered pairs count -> .36
    codes = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]], requires_grad=True)
    loss = CodeDiversityLoss()(codes, None)
    assert loss.item() == pytest.approx(0.36, abs=1e-6)
    loss.backward()
    with torch.no_grad():
        moved = codes - 0.1 * codes.grad
    assert F.cosine_similarity(moved[0, 0], moved[0, 1], dim=0) < 0.6


# --- k-means initialisation --------------------------------------------------------------------------

def clustered_regions(images=20, regions=8, dim=6, clusters=4, seed=0):
    """Each region lies near one of ``clusters`` well-separated centres (+ a shared offset), and every
    image has regions from every cluster; returns (regions [I, R, D], cluster id [I, R])."""
    g = torch.Generator().manual_seed(seed)
    centres = 4.0 * torch.eye(dim)[:clusters]
    ids = torch.arange(regions).remainder(clusters).expand(images, -1)
    x = centres[ids] + 0.1 * torch.randn(images, regions, dim, generator=g) + torch.full((dim,), 3.0)
    return x, ids


def test_kmeans_finds_separated_clusters_sorted_by_size():
    g = torch.Generator().manual_seed(1)
    sizes = [50, 30, 20]
    centres = torch.tensor([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]])
    x = torch.cat([c + 0.2 * torch.randn(n, 2, generator=g) for c, n in zip(centres, sizes)])
    got, counts = kmeans(x, 3, seed=0)
    assert counts.tolist() == sizes                      # largest first
    assert torch.allclose(got, centres, atol=0.15)       # each centre recovered, in that order
    assert torch.equal(kmeans(x, 3, seed=0)[0], got)     # seeded: deterministic
    with pytest.raises(ValueError):
        kmeans(x[:2], 3)


def test_kmeans_init_puts_the_queries_on_distinct_region_clusters():
    x, ids = clustered_regions()
    torch.manual_seed(0)  # the near-zero random queries: the same whichever tests ran before
    pool = CodePooling(codes=4, dim=6, scale=8.0)
    with torch.no_grad():  # a key map that is not the identity: the clustering has to happen in key space
        pool.key.weight.copy_(torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(3)))[0])
        pool.key.bias.fill_(0.5)
    before = pool.attention(x)
    sizes = pool.init_queries(x, seed=0)
    assert sizes.tolist() == [40, 40, 40, 40]
    attn = pool.attention(x)                                       # [I, M, R]
    # every query puts most of its weight on one cluster, and the four queries on four different ones
    per_cluster = torch.stack([(attn * (ids == c).unsqueeze(1)).sum(-1) for c in range(4)], -1)  # [I, M, 4]
    assert (per_cluster.amax(-1) > 0.95).all()
    favourite = per_cluster.argmax(-1)                            # [I, M]
    assert all(sorted(row.tolist()) == [0, 1, 2, 3] for row in favourite)
    # the random (near zero) queries pool everything almost uniformly
    entropy = lambda a: float(-(a * a.clamp_min(1e-12).log()).detach().sum(-1).mean() / np.log(a.shape[-1]))  # noqa: E731
    assert entropy(before) > 0.95 and entropy(attn) < 0.3


def test_kmeans_init_of_a_scorer_uses_its_projected_train_regions():
    image_head, text_head = heads()
    scorer = CodeScorer(image_head, text_head, codes=3, dropout=0.5, pool_scale=4.0)
    split = tiny_split(40, 0)
    scorer.train()
    sizes = init_queries_kmeans(scorer, split, images=30, seed=0)
    assert sum(sizes) == 30 * 4 and sizes == sorted(sizes, reverse=True)
    assert scorer.training                                       # mode given back
    again = CodeScorer(image_head, text_head, codes=3, dropout=0.5, pool_scale=4.0)
    again.pool.key.load_state_dict(scorer.pool.key.state_dict())
    init_queries_kmeans(again, split, images=30, seed=0)
    assert torch.equal(again.pool.queries, scorer.pool.queries)  # no dropout in the clustering, seeded
    fresh = CodeScorer(image_head, text_head, codes=3, dropout=0.5, pool_scale=4.0)   # random near-zero queries
    assert code_diversity(scorer, split)["attention_entropy"] < code_diversity(fresh, split)["attention_entropy"]


# --- the scorer: pooling scale, dual residual, shrinking -------------------------------------------------

def test_pool_scale_sharpens_the_attention():
    torch.manual_seed(0)
    flat, sharp = CodePooling(3, 6, scale=1.0), CodePooling(3, 6, scale=10.0)
    sharp.load_state_dict(flat.state_dict())
    x = torch.randn(2, 7, 6)
    with torch.no_grad():
        flat.queries.mul_(50)
        sharp.queries.copy_(flat.queries)
    h = lambda a: float(-(a * a.clamp_min(1e-12).log()).sum(-1).mean().detach())  # noqa: E731
    assert h(sharp.attention(x)) < h(flat.attention(x))
    assert set(flat.state_dict()) == {"queries", "key.weight", "key.bias"}  # the scale is not a weight


def test_dual_residual_is_late_interaction_plus_the_teachers_pooled_cosine():
    image_head, text_head = heads()
    torch.manual_seed(1)
    scorer = CodeScorer(image_head, text_head, codes=3, dropout=0.0, pool_scale=3.0, dual_weight=0.5).eval()
    plain = CodeScorer(image_head, text_head, codes=3, dropout=0.0, pool_scale=3.0).eval()
    plain.pool.load_state_dict(scorer.pool.state_dict())
    regions, tokens = torch.randn(4, 5, 12), torch.randn(3, 6, 10)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        img, txt = scorer.encode_image(regions), scorer.encode_text(tokens, mask)
        assert img.shape == (4, 4, 6)                              # the global vector + 3 codes
        s = scorer.score(img, txt, mask)
        m = mask.unsqueeze(-1).float()
        dual = F.normalize(image_head(regions.mean(1)), dim=-1) @ F.normalize(
            text_head((tokens * m).sum(1) / m.sum(1)), dim=-1).T       # the teacher's own cosine
        late = plain.score(plain.encode_image(regions), plain.encode_text(tokens, mask), mask)
        assert torch.allclose(s, late + 0.5 * dual, atol=1e-5)
        assert torch.allclose(scorer.code_vectors(img), plain.encode_image(regions), atol=1e-6)
        pairs = scorer.score_pairs(img[:3], txt, mask)
        assert torch.allclose(pairs, s.diagonal(), atol=1e-5)
        trimmed = scorer.score_pairs(img[:3], txt[:, :6], mask[:, :6])  # padding beyond the longest: no change
        padded = torch.cat([txt, torch.zeros(3, 2, 6)], 1)
        assert torch.allclose(scorer.score_pairs(img[:3], padded, torch.cat([mask, torch.zeros(3, 2, dtype=torch.bool)], 1)),
                              trimmed, atol=1e-6)


def test_shrinking_keeps_scale_dual_weight_and_the_largest_clusters():
    image_head, text_head = heads()
    big = CodeScorer(image_head, text_head, codes=8, dropout=0.0, pool_scale=6.0, dual_weight=1.0)
    small = CodeScorer.shrunk_from(big, 2)
    assert (small.codes, small.pool.scale, small.dual_weight) == (2, 6.0, 1.0)
    assert torch.equal(small.pool.queries, big.pool.queries[:2])
    recipe = FineRecipe(tier="codes", codes=2, pool_scale=6.0, dual_weight=1.0, epochs=0)
    rebuilt = build_scorer(recipe, image_head, text_head)
    rebuilt.load_state_dict(small.state_dict())                  # the saved recipe rebuilds the same module
    regions = torch.randn(2, 4, 12)
    assert torch.allclose(rebuilt.eval().encode_image(regions), small.eval().encode_image(regions))
    split = tiny_split(8, 0)
    with pytest.raises(ValueError, match="does not match its recipe"):
        train_scorer(small, split, split, np.zeros((40, 8), np.float32), FineRecipe(tier="codes", codes=2, epochs=0),
                     log=lambda *_: None)


# --- training ---------------------------------------------------------------------------------------

INFLATE = dict(tier="codes", codes=3, epochs=2, batch_size=8, lr=1e-2, dropout=0.0, freeze_projections=True,
               query_init="kmeans", query_lr_mult=5.0, pool_scale=4.0, diversity_weight=1.0, dual_weight=0.5)


def _run(**overrides):
    torch.manual_seed(0)
    image_head, text_head = heads()
    recipe = FineRecipe(**{**INFLATE, **overrides})
    scorer = build_scorer(recipe, image_head, text_head)
    train, val = tiny_split(48, 0), tiny_split(8, 1)
    out = train_scorer(scorer, train, val, np.zeros((40, 8), np.float32), recipe, log=lambda *_: None)
    return scorer, out, train


def test_a_short_seeded_run_moves_the_queries_and_keeps_the_codes_distinct():
    scorer, out, train = _run()
    again, out_again, _ = _run()
    assert torch.equal(again.pool.queries, scorer.pool.queries)       # seeded: the same run twice
    assert [h["val_rsum"] for h in out_again["history"]] == [h["val_rsum"] for h in out["history"]]
    init, *epochs = out["history"]
    image_head, text_head = heads()  # seeds torch as _run did before building the scorer
    start = build_scorer(FineRecipe(**INFLATE), image_head, text_head)
    assert init["kmeans_cluster_sizes"] == init_queries_kmeans(start, train, seed=0)
    assert init["codes"]["query_shift"] == 0.0
    for entry in epochs:
        assert set(entry["parts"]) == {"match", "diversity"}
        assert entry["codes"]["query_shift"] > 0.01                   # the queries moved ...
        assert entry["codes"]["code_cosine"] < 0.9                    # ... and the codes stayed apart
        assert entry["codes"]["attention_entropy"] < 0.9
    assert epochs[-1]["parts"]["diversity"] < 0.81                    # mean cos^2 below 0.9^2


def test_without_kmeans_and_diversity_the_codes_start_collapsed():
    """The original recipe (random near-zero queries, scale 1): what the issue found, on tiny data."""
    _, out, _ = _run(epochs=1, query_init="random", query_lr_mult=1.0, pool_scale=1.0, diversity_weight=0.0,
                     dual_weight=0.0)
    assert out["history"][0]["codes"]["attention_entropy"] > 0.99
    assert "kmeans_cluster_sizes" not in out["history"][0]
    assert set(out["history"][1]["parts"]) == {"match"}


def test_the_query_learning_rate_multiplier_applies_to_the_queries_only():
    frozen, out_frozen, _ = _run(epochs=1, query_lr_mult=0.0)
    assert out_frozen["history"][1]["codes"]["query_shift"] == 0.0    # lr * 0: the queries stay on the centroids
    _, out, _ = _run(epochs=1, query_lr_mult=1.0)
    _, out_fast, _ = _run(epochs=1, query_lr_mult=10.0)
    assert 0.0 < out["history"][1]["codes"]["query_shift"] < out_fast["history"][1]["codes"]["query_shift"]
    with pytest.raises(ValueError, match="query_init"):
        _run(epochs=0, query_init="zeros")


# --- old checkpoints and shipped recipes ----------------------------------------------------------------

FINE = REPO_ROOT / "assets" / "models" / "fine"


@pytest.mark.parametrize("name", ["codes-16", "codes-4", "codes-1"])
def test_old_code_checkpoints_load_and_pool_exactly_as_before(name):
    image_head, text_head = heads(d_img=1280, d_txt=384, dim=256)
    scorer, recipe, _ = load_scorer(FINE / f"{name}.pt", image_head, text_head)
    assert (recipe.pool_scale, recipe.dual_weight, recipe.query_init, recipe.diversity_weight) == (1.0, 0.0, "random", 0.0)
    regions = torch.randn(2, 49, 1280)
    with torch.no_grad():
        x = scorer.image_proj(regions)
        attn = torch.softmax(torch.einsum("md,ird->imr", scorer.pool.queries, scorer.pool.key(x)) / 16.0, -1)
        old = F.normalize(torch.einsum("imr,ird->imd", attn, x), dim=-1)   # the formula they were trained with
        assert torch.allclose(scorer.encode_image(regions), old, atol=1e-5)
        tokens, mask = torch.randn(3, 5, 384), torch.ones(3, 5, dtype=torch.bool)
        text = scorer.encode_text(tokens, mask)
        assert torch.allclose(text.norm(dim=-1), torch.ones(3, 5), atol=1e-5)
        assert torch.allclose(scorer.score(old, text, mask), max_sum(old, text, mask, "mean"), atol=1e-6)


RECIPES = REPO_ROOT / "matcher" / "train" / "recipes"
CHAIN = [16, 8, 4, 2, 1]


def test_the_shrink_chain_recipes_distil_each_m_from_the_previous_one():
    recipes = {m: json.loads((RECIPES / f"fine-codes-inflate-{m}.json").read_text()) for m in CHAIN}
    assert recipes[16]["distill_from"] == "" and recipes[16]["query_init"] == "kmeans"
    for big, small in zip(CHAIN, CHAIN[1:]):
        r = recipes[small]
        assert r["codes"] == small and r["distill_from"] == f"assets/models/fine/codes-inflate-{big}.pt"
        for key in ("pool_scale", "dual_weight", "reduce"):   # what shrunk_from inherits must be what the recipe says
            assert r[key] == recipes[16][key], (small, key)


# --- the measured table and the trade-off chart -------------------------------------------------------

def test_every_m_is_measured_uncollapsed_and_a_point_of_the_tradeoff_chart():
    """assets/results/finegrained.json (python -m matcher eval-fine --append --pattern 'codes-inflate-*'):
    one row per M with accuracy, per-pair and search cost, and the collapse diagnostics; the dashboard's
    chart (matcher.eval.results) draws each of them on both cost axes."""
    from matcher.eval.results import load_results, tradeoff_points

    results = REPO_ROOT / "assets" / "results"
    records = {r["name"]: r for r in json.loads((results / "finegrained.json").read_text())["records"]}
    for m in CHAIN:
        r = records[f"codes-inflate-{m}"]
        assert r["codes"] == m + 1 and r["gallery_floats_per_image"] == (m + 1) * 256  # the global vector + M codes
        assert r["pair_us"] > 0 and r["search_ms"] > 0 and r["rsum"] > 0 and r["val_rsum"] > 0
        if m > 1:  # the inflated codes no longer collapse (the old ones: 1.0000 and 1.0000)
            assert r["code_cosine"] < 0.9 and r["attention_entropy"] < 0.9, (m, r["code_cosine"], r["attention_entropy"])
    loaded = load_results(results)
    for speed in ("text-query latency (ms)", "search latency at N (ms)"):
        points = tradeoff_points(loaded, speed, "rsum").points
        fine = points[points["group"] == "fine-grained tiers"].set_index("label")
        for m in CHAIN:
            name = f"codes-inflate-{m}"
            column = "text_query_ms" if speed.startswith("text") else "search_ms"
            assert fine.loc[name, "accuracy"] == records[name]["rsum"]
            assert fine.loc[name, "speed"] == records[name][column]


class _Targets:
    """A ``batch(rows, captions)`` teacher (as ``distill.FineTeacher``): a fixed [images, captions] matrix."""

    def __init__(self, matrix: torch.Tensor):
        self.matrix, self.calls = matrix, 0

    def batch(self, rows, captions):
        self.calls += 1
        return self.matrix[torch.from_numpy(rows)][:, torch.from_numpy(captions)]


def test_codes_distil_a_batch_teacher_from_their_own_kmeans_start():
    """Shrinking from a better tier's fused score (``distill_from: fused:PATH@LAMBDA``): the codes still
    start from k-means (the teacher has no queries to inherit) and the ListNet term is on the teacher's
    matrix of each batch."""
    torch.manual_seed(0)
    image_head, text_head = heads()
    recipe = FineRecipe(**{**INFLATE, "epochs": 1, "distill_weight": 1.0})
    scorer = build_scorer(recipe, image_head, text_head)
    train, val = tiny_split(48, 0), tiny_split(8, 1)
    targets = _Targets(torch.randn(48, 48 * train.captions_per_image))
    out = train_scorer(scorer, train, val, np.zeros((40, 8), np.float32), recipe, teacher=targets,
                       log=lambda *_: None)
    assert "kmeans_cluster_sizes" in out["history"][0]
    assert set(out["history"][1]["parts"]) == {"match", "distill", "diversity"}
    assert targets.calls == 48 // recipe.batch_size


def test_fine_teacher_is_the_fused_score_of_the_batch():
    from matcher.finegrained.distill import FineTeacher, TeacherScores

    class Alignment:
        scale = 1.0

        def batch(self, rows, captions):
            return torch.from_numpy(rows[:, None] * 10.0 + captions[None, :]).float()

    images, texts = F.normalize(torch.randn(6, 4), dim=-1), F.normalize(torch.randn(30, 4), dim=-1)
    teacher = FineTeacher(TeacherScores("fused", 20.0, Alignment(), 0.5), images, texts)
    rows, captions = np.array([3, 0]), np.array([7, 16, 2])
    want = images[[3, 0]] @ texts[[7, 16, 2]].T + 0.5 * torch.tensor([[37.0, 46, 32], [7, 16, 2]])
    assert torch.allclose(teacher.batch(rows, captions), want)
    from matcher.finegrained.distill import fine_teacher

    with pytest.raises(ValueError, match="fused:PATH@LAMBDA"):
        fine_teacher("assets/models/fine/alignment-sum.pt", None, "assets/models/offline-teacher.pt", None, None, None)
