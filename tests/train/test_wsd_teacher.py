"""WSD against the non-N-to-N teacher (issue 18 item 5): the fused teacher matrix
(matcher.finegrained.distill), the re-derived shared-basis WSD loss (``wsd-shared``) and the
per-seed ablation table (matcher.train.student), all on hand-made inputs."""
import csv
import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from matcher.finegrained.distill import TeacherScores, parse_teacher_scores
from matcher.train.losses import SharedWhitenedSimilarityLoss, build_loss, double_centre
from matcher.train.student import (StudentRecipe, _finished_run, _run_record, _variant_checkpoint, seed_summary,
                                   write_ablation)

B, D = 12, 6


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


class _FakeAlignment:
    """Stands in for AlignmentTargets: a fixed matrix per (rows, captions), records its calls."""

    def __init__(self, matrix: torch.Tensor, scale: float = 7.0):
        self.matrix, self.scale, self.calls = matrix, scale, []

    def batch(self, rows, captions):
        self.calls.append((tuple(rows), tuple(captions)))
        return self.matrix[torch.as_tensor(rows)][:, torch.as_tensor(captions)]


def _embeddings(seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.5 * torch.randn(B, D, generator=g), dim=-1)
    align = 3.0 + 2.0 * torch.rand(B, B, generator=g)  # alignment-sum-like: positive, several units
    return img, txt, align


# -- the fused teacher matrix ------------------------------------------------------------------

def test_parse_teacher_scores():
    assert parse_teacher_scores("dual") == ("dual", None, 0.0)
    assert parse_teacher_scores("assets/models/fine/alignment-sum.pt") == \
        ("alignment", "assets/models/fine/alignment-sum.pt", 0.0)
    assert parse_teacher_scores("fused:assets/models/fine/alignment-sum.pt@0.0625") == \
        ("fused", "assets/models/fine/alignment-sum.pt", 0.0625)
    assert parse_teacher_scores("fused:a@b.pt@0") == ("fused", "a@b.pt", 0.0)  # the last @ separates
    for bad in ("fused:x.pt", "fused:@0.1", "fused:x.pt@", "fused:x.pt@-1", "fused:x.pt@lots", "fused:x.pt@nan"):
        with pytest.raises(ValueError, match="fused:PATH@LAMBDA"):
            parse_teacher_scores(bad)


def test_fused_matrix_is_dual_plus_lambda_alignment():
    img, txt, align = _embeddings()
    rows, captions = np.array([3, 1, 4, 0, 5]), np.array([2, 7, 1, 8, 11])
    t_img, t_txt = img[rows], txt[captions]
    fake = _FakeAlignment(align)
    scores = TeacherScores("fused", dual_scale=23.0, alignment=fake, weight=0.0625)
    fused = scores.batch(rows, captions, t_img, t_txt)
    expected = t_img @ t_txt.T + 0.0625 * align[rows][:, captions]
    assert torch.allclose(fused, expected, atol=1e-6)
    assert fake.calls == [(tuple(rows), tuple(captions))]  # the alignment of exactly this batch
    assert scores.scale == 23.0  # the dual teacher's logit scale, not the alignment's calibrated one
    # the alignment term changes the ranking: not just the dual matrix
    assert not torch.allclose(fused.argsort(1), (t_img @ t_txt.T).argsort(1))


def test_fused_at_lambda_zero_is_the_dual_teacher_exactly():
    img, txt, align = _embeddings(1)
    rows = captions = np.arange(B)
    dual = TeacherScores("dual", dual_scale=23.0)
    fused0 = TeacherScores("fused", dual_scale=23.0, alignment=_FakeAlignment(align), weight=0.0)
    assert torch.equal(fused0.batch(rows, captions, img, txt), dual.batch(rows, captions, img, txt))
    assert torch.equal(dual.batch(rows, captions, img, txt), img @ txt.T)
    assert fused0.scale == dual.scale == 23.0


def test_pure_alignment_uses_its_calibrated_scale_and_fused_needs_a_scorer():
    img, txt, align = _embeddings(2)
    scores = TeacherScores("alignment", dual_scale=23.0, alignment=_FakeAlignment(align, scale=4.5))
    assert scores.scale == 4.5
    assert torch.equal(scores.batch(np.arange(B), np.arange(B), img, txt), align)
    with pytest.raises(ValueError, match="need an alignment scorer"):
        TeacherScores("fused", dual_scale=23.0, weight=0.1)


# -- wsd-shared ------------------------------------------------------------------------------------

def _matrices(seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(B, 4, generator=g) @ torch.randn(4, B, generator=g) + 0.3 * torch.randn(B, B, generator=g)
    s = t + 0.8 * torch.randn(B, B, generator=g)
    return s, t


def test_registered_and_zero_at_the_teacher_up_to_scale_and_biases():
    loss = build_loss("wsd-shared", eps=0.5)
    assert isinstance(loss, SharedWhitenedSimilarityLoss) and loss.inputs == "cosine"
    s, t = _matrices()
    assert float(loss(t.clone(), t)) == pytest.approx(0.0, abs=1e-10)
    g = torch.Generator().manual_seed(9)
    row_bias, col_bias = torch.randn(B, 1, generator=g), torch.randn(1, B, generator=g)
    assert float(loss(5.0 * t + row_bias + col_bias - 2.0, t)) == pytest.approx(0.0, abs=1e-8)
    assert float(loss(s, t)) > 0.05
    assert float(loss(-t, t)) == pytest.approx(4.0, rel=1e-5)  # ||-W - W||^2 / ||W||^2


def test_invariances_it_claims():
    loss = SharedWhitenedSimilarityLoss(eps=0.5)
    s, t = _matrices(1)
    base = float(loss(s, t))
    g = torch.Generator().manual_seed(4)
    for a in (0.01, 3.0, 40.0):  # positive scale of the student (its temperature)
        assert float(loss(a * s, t)) == pytest.approx(base, rel=1e-4)
    shifted = s + torch.randn(B, 1, generator=g) + torch.randn(1, B, generator=g)  # per-image and per-caption bias
    assert float(loss(shifted, t)) == pytest.approx(base, rel=1e-4)
    assert float(loss(s, 2.0 * t + 1.0)) == pytest.approx(base, rel=1e-4)  # and of the teacher
    p, q = torch.randperm(B, generator=g), torch.randperm(B, generator=g)  # re-ordered batch
    assert float(loss(s[p][:, q], t[p][:, q])) == pytest.approx(base, rel=1e-4)
    # not invariant to what carries ranking information: a different pairing of rows
    assert abs(float(loss(s[p], t)) - base) > 0.05


def test_gradient_points_towards_the_teacher():
    loss = SharedWhitenedSimilarityLoss(eps=0.5)
    s, t = _matrices(2)
    x = s.clone().requires_grad_()
    value = loss(x, t)
    value.backward()
    assert torch.isfinite(x.grad).all()
    stepped = float(loss(s - 0.05 * x.grad / x.grad.norm() * s.norm(), t))
    assert stepped < float(value.detach())
    path = [float(loss(s + a * (t - s), t)) for a in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert all(b < a for a, b in zip(path, path[1:])) and path[-1] == pytest.approx(0.0, abs=1e-10)
    # the teacher is a constant: no gradient flows into it
    tt, ss = t.clone().requires_grad_(), s.clone().requires_grad_()
    loss(ss, tt).backward()
    assert tt.grad is None and ss.grad is not None


def test_whitening_ignores_the_spectrum_along_the_teachers_directions():
    """Each direction counts by its unit-normalised row/column in the teacher's basis: a student
    with the teacher's singular vectors and any positive spectrum is at 0; mixing two of the
    teacher's directions is not."""
    s, t = _matrices(3)
    loss = SharedWhitenedSimilarityLoss(eps=0.5)
    u, v, weights = loss.basis(t)
    assert u.shape == v.shape == (B, B - 1)  # double centring removes the all-ones direction
    assert torch.allclose(loss.project(t, u, v), torch.diag(torch.diagonal(loss.project(t, u, v))), atol=1e-5)
    uu, sigma, vh = torch.linalg.svd(double_centre(t))
    other = uu @ torch.diag(sigma.flip(0).roll(-1) + 0.1) @ vh  # same directions, another spectrum
    assert float(loss(other, t)) == pytest.approx(0.0, abs=1e-5)
    assert float(torch.nn.functional.mse_loss(double_centre(other), double_centre(t))) > 0.1  # MSE is not 0
    mix = torch.eye(B)
    mix[:2, :2] = torch.tensor([[0.6, 0.8], [-0.8, 0.6]])  # rotate the teacher's two strongest directions
    mixed = uu @ torch.diag(sigma) @ mix @ vh
    assert float(loss(mixed, t)) > 0.02


def test_eps_sets_the_whitening_strength():
    """eps = 0: every direction of the teacher's rank weighs the same; large eps: weights follow
    the teacher's singular values (weak, noisy directions count less)."""
    _, t = _matrices(4)
    sigma = torch.linalg.svdvals(double_centre(t))[: B - 1]
    flat = SharedWhitenedSimilarityLoss(eps=0.0).basis(t)[2]
    assert torch.allclose(flat, torch.full((B - 1,), 1.0 / (B - 1)), atol=1e-6)
    strong = SharedWhitenedSimilarityLoss(eps=1e6).basis(t)[2]
    assert torch.allclose(strong, sigma / sigma.sum(), atol=1e-4)
    mid = SharedWhitenedSimilarityLoss(eps=0.5).basis(t)[2]
    assert float(mid.sum()) == pytest.approx(1.0) and float(mid[0]) > float(mid[-1])


# -- the per-seed table ------------------------------------------------------------------------

def test_seed_summary_mean_spread_and_std():
    rows = [{"loss": "wsd", "val_rsum": v, "test_rsum": t} for v, t in [(100.0, 90.0), (104.0, 93.0), (102.0, 99.0)]]
    rows.append({"loss": "listnet", "val_rsum": 110.0, "test_rsum": 101.0})
    wsd, listnet = seed_summary(rows)
    assert wsd["loss"] == "wsd" and wsd["seeds"] == 3
    assert wsd["val_rsum_mean"] == pytest.approx(102.0) and wsd["test_rsum_mean"] == pytest.approx(94.0)
    assert (wsd["val_rsum_min"], wsd["val_rsum_max"]) == (100.0, 104.0)
    assert (wsd["test_rsum_min"], wsd["test_rsum_max"]) == (90.0, 99.0)
    assert wsd["val_rsum_std"] == pytest.approx(2.0) and wsd["test_rsum_std"] == pytest.approx(float(np.std([90, 93, 99], ddof=1)), abs=0.01)
    assert listnet["seeds"] == 1 and listnet["val_rsum_std"] == 0.0


def test_table_files_carry_the_seed_rows_and_the_summary(tmp_path):
    rows = [{"loss": "wsd", "seed": s, "val_rsum": 100.0 + s, "test_rsum": 90.0 + s} for s in (0, 1, 2)]
    summary = seed_summary(rows)
    out = tmp_path / "wsd-seeds.json"
    write_ablation(out, rows, {"command": "c"}, summary)
    data = json.loads(out.read_text())
    assert [r["seed"] for r in data["records"]] == [0, 1, 2] and data["summary"] == summary
    lines = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [r["seed"] for r in lines] == ["0", "1", "2", "all"]
    assert float(lines[-1]["val_rsum_mean"]) == 101.0 and float(lines[-1]["test_rsum_max"]) == 92.0


def test_a_finished_seed_run_is_reused_only_for_the_same_recipe(tmp_path):
    recipe = StudentRecipe(epochs=2, loss="wsd-shared", seed=1, teacher_scores="fused:x.pt@0.0625")
    ckpt = _variant_checkpoint(tmp_path, "wsd-shared", 1)
    assert ckpt.name == "student-wsd-shared-s1.pt"
    trained, result = {"best_epoch": 2, "val": {"rsum": 101.5}, "history": [{"seconds": 3.0}]}, {"rsum": 97.0}
    _run_record(ckpt).write_text(json.dumps({"recipe": asdict(recipe), "trained": trained, "result": result}))
    assert _finished_run(ckpt, recipe) is None  # the checkpoint is gone: retrain
    ckpt.write_bytes(b"")
    assert _finished_run(ckpt, recipe) == (trained, result)
    assert _finished_run(ckpt, replace(recipe, seed=2)) is None
    assert _finished_run(ckpt, replace(recipe, teacher_scores="dual")) is None


def test_fused_composition_on_hand_made_embeddings():
    from matcher.finegrained.distill import fused_composition

    g = torch.Generator().manual_seed(8)
    n = 40
    img = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img.repeat_interleave(5, 0) + 0.3 * torch.randn(5 * n, D, generator=g), dim=-1)
    lengths = torch.randint(5, 20, (5 * n,), generator=g)
    align = _FakeAlignment(torch.rand(n, 5 * n, generator=g) + 0.05 * lengths[None, :].float())
    align.offsets = np.concatenate([[0], np.cumsum(lengths.numpy())])
    same = fused_composition(align, img, txt, weight=0.0, batch_size=16, batches=3)
    assert same["top1_changed_rows_pct"] == 0 and same["row_spearman_fused_dual"] == pytest.approx(1.0)
    assert same["fused_i2t_R@1"] == same["dual_i2t_R@1"] > 50 and same["align_row_std_weighted"] == 0
    mixed = fused_composition(align, img, txt, weight=10.0, batch_size=16, batches=3)
    assert mixed["row_spearman_fused_dual"] < 0.9 and mixed["caption_mean_align_vs_length_corr"] > 0.5
    assert mixed["align_row_std_weighted"] > mixed["dual_row_std"]
