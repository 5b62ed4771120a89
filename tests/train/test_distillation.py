"""Distillation losses (matcher.train.losses) and the student's tiny text tower: minima, invariances,
finite gradients, a tiny training run that lowers each loss, checkpoint round trip."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from matcher.train.losses import (DISTILLATION_LOSSES, LOSSES, DistillationObjective, WSDLoss, build_loss,
                            inverse_sqrt_newton_schulz, standardize_rows, zca_whiten_rows)

B, D = 24, 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


def _pair(seed: int, noise: float = 0.7):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    txt = F.normalize(img + noise * torch.randn(B, D, generator=g), dim=-1)
    return img, txt


def _teacher_student_cos():
    ti, tt = _pair(0)
    si, st = _pair(1, noise=1.5)
    return si @ st.T, ti @ tt.T


def _call(name, cos_s, cos_t, s_scale=20.0, t_scale=20.0):
    loss = build_loss(name)
    if loss.inputs == "logits":
        return loss(s_scale * cos_s, t_scale * cos_t)
    return loss(cos_s, cos_t)


STUDENT_LOSSES = sorted({"contrastive", *DISTILLATION_LOSSES})  # HEI (hashing) is tested in test_hashing.py


def test_registry_has_every_loss():
    assert set(STUDENT_LOSSES) | {"hei", "triplet"} == set(LOSSES)  # hei: hashing, triplet: fine tiers
    with pytest.raises(ValueError, match="choose one of"):
        build_loss("kl")


@pytest.mark.parametrize("name", ["mse", "wsd"])
def test_zero_when_student_equals_teacher(name):
    _, cos_t = _teacher_student_cos()
    assert float(_call(name, cos_t.clone(), cos_t)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["listnet", "affinity"])
def test_soft_label_losses_are_minimal_at_the_teacher(name):
    """CE(P_T, P_S) >= H(P_T) with equality iff P_S == P_T: at S == T it equals the entropy and
    its gradient vanishes, and any perturbation increases it."""
    cos_s, cos_t = _teacher_student_cos()
    logits_t = 20.0 * cos_t
    s = logits_t.clone().requires_grad_()
    loss = build_loss(name)
    at_teacher = loss(s, logits_t)
    at_teacher.backward()
    assert float(s.grad.abs().max()) < 1e-6
    p_r, p_c = F.softmax(logits_t, 1), F.softmax(logits_t, 0)
    entropy = -(p_r * p_r.log()).sum(1).mean() - (p_c * p_c.log()).sum(0).mean()
    expected = entropy if name == "listnet" else 0.5 * entropy
    assert float(at_teacher) == pytest.approx(float(expected), rel=1e-5)
    for seed in range(3):
        noise = torch.randn(B, B, generator=torch.Generator().manual_seed(seed))
        assert float(loss(logits_t + noise, logits_t)) > float(at_teacher)
    assert float(loss(20.0 * cos_s, logits_t)) > float(at_teacher)


def test_wsd_invariant_to_scale_and_shift_of_the_student():
    cos_s, cos_t = _teacher_student_cos()
    wsd = WSDLoss()
    base = float(wsd(cos_s, cos_t))
    assert base > 0.01
    for a, b in [(3.0, 0.0), (0.05, 0.4), (17.0, -2.0)]:
        assert float(wsd(a * cos_s + b, cos_t)) == pytest.approx(base, rel=1e-4, abs=1e-6)
        assert float(wsd(cos_s, a * cos_t + b)) == pytest.approx(base, rel=1e-4, abs=1e-6)
    # a student that is a rescaled, shifted copy of the teacher has nothing left to learn
    assert float(wsd(42.0 * cos_t - 3.0, cos_t)) == pytest.approx(0.0, abs=1e-6)


def test_wsd_directions_remove_per_query_scale_and_shift():
    """Row whitening ignores per-image (row) affine changes, column whitening per-caption ones."""
    cos_s, _ = _teacher_student_cos()
    g = torch.Generator().manual_seed(5)
    row_scale, row_shift = torch.rand(B, 1, generator=g) * 5 + 0.1, torch.randn(B, 1, generator=g)
    wsd = WSDLoss()
    rows, cols = wsd.whiten(cos_s)
    rows2, _ = wsd.whiten(row_scale * cos_s + row_shift)
    _, cols2 = wsd.whiten(cos_s * row_scale.T + row_shift.T)
    assert torch.allclose(rows, rows2, atol=1e-4) and torch.allclose(cols, cols2, atol=1e-4)


def test_zca_removes_symmetric_mixing_and_newton_schulz_matches_eigh():
    g = torch.Generator().manual_seed(3)
    n, m = 12, 400
    white = torch.linalg.qr(torch.randn(m, n, generator=g))[0].T * m**0.5  # rows: R R^T / m = I
    q = torch.linalg.qr(torch.randn(n, n, generator=g))[0]
    mixing = q @ torch.diag(torch.linspace(0.5, 2.0, n)) @ q.T  # symmetric positive definite
    assert torch.allclose(zca_whiten_rows(mixing @ white, eps=1e-6, iterations=40), white, atol=1e-3)
    a = mixing @ mixing + 0.1 * torch.eye(n)
    vals, vecs = torch.linalg.eigh(a.double())
    exact = (vecs @ torch.diag(vals.rsqrt()) @ vecs.T).float()
    assert torch.allclose(inverse_sqrt_newton_schulz(a, 30), exact, atol=1e-4)


def test_standardize_rows():
    x = torch.randn(5, 9) * 4 + 2
    z = standardize_rows(x)
    assert torch.allclose(z.mean(1), torch.zeros(5), atol=1e-5)
    assert torch.allclose(z.pow(2).mean(1), torch.ones(5), atol=1e-4)


@pytest.mark.parametrize("name", STUDENT_LOSSES)
def test_finite_gradients(name):
    cos_s, cos_t = _teacher_student_cos()
    cos_s = cos_s.clone().requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    total, parts = DistillationObjective(name)(cos_s, cos_t, scale, 20.0)
    total.backward()
    assert torch.isfinite(total) and all(np.isfinite(v) for v in parts.values())
    assert torch.isfinite(cos_s.grad).all() and float(cos_s.grad.abs().sum()) > 0
    assert torch.isfinite(scale.grad)
    # a degenerate batch (all similarities equal) must not produce NaNs either
    flat = torch.full((B, B), 0.3, requires_grad=True)
    total, _ = DistillationObjective(name)(flat, cos_t, scale, 20.0)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(flat.grad).all()


@pytest.mark.parametrize("name", STUDENT_LOSSES)
def test_tiny_training_run_lowers_the_loss(name):
    """A linear student on random features, 60 Adam steps, lowers its own objective a lot."""
    torch.manual_seed(0)
    ti, tt = _pair(0)
    x_img, x_txt = torch.randn(B, 32), torch.randn(B, 32)
    f_img, f_txt = torch.nn.Linear(32, D), torch.nn.Linear(32, D)
    scale = torch.nn.Parameter(torch.tensor(2.0))
    objective = DistillationObjective(name, contrastive_weight=0.0 if name != "contrastive" else 1.0)
    opt = torch.optim.Adam([*f_img.parameters(), *f_txt.parameters(), scale], lr=0.05)

    def step():
        s = F.normalize(f_img(x_img), dim=-1) @ F.normalize(f_txt(x_txt), dim=-1).T
        return objective(s, ti @ tt.T, scale.exp(), 20.0)[0]

    first = float(step())
    for _ in range(60):
        loss = step()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(step()) < 0.7 * first


def test_objective_mixes_contrastive_by_weight():
    cos_s, cos_t = _teacher_student_cos()
    total, parts = DistillationObjective("mse", contrastive_weight=0.5, distill_weight=2.0)(cos_s, cos_t, 10.0, 20.0)
    assert float(total) == pytest.approx(0.5 * parts["contrastive"] + 2.0 * parts["mse"], rel=1e-5)
    total, parts = DistillationObjective("contrastive")(cos_s, None, 10.0)
    assert set(parts) == {"contrastive"}
    with pytest.raises(ValueError, match="needs the teacher"):
        DistillationObjective("wsd")(cos_s, None, 10.0)


def test_embedding_distillation_is_one_minus_the_mean_cosine_and_pulls_only_the_student():
    from matcher.train.losses import EmbeddingDistillationLoss

    loss = EmbeddingDistillationLoss()
    assert loss.inputs == "embeddings"
    s, t = _pair(0)
    assert float(loss(s, s)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(s, -s)) == pytest.approx(2.0, abs=1e-6)
    assert float(loss(s, t)) == pytest.approx(float(1 - F.cosine_similarity(s, t).mean()), abs=1e-6)
    student, teacher = s.clone().requires_grad_(), t.clone().requires_grad_()
    loss(student, teacher).backward()
    assert teacher.grad is None and torch.allclose(student.grad, -t / B)
