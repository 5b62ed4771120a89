"""Training losses. All share one call shape so training code can swap them by name.

``loss(sim_student, sim_teacher) -> scalar`` where ``sim_*`` are [B, B] image-text similarity
matrices of a batch (rows = images, columns = texts) whose diagonal holds the matching pairs;
``sim_teacher`` is None for losses that need no teacher and is always treated as a constant
(detached). Each class says in ``inputs`` which similarity it expects:

- ``"logits"``: cosine similarity times the model's own learned logit scale (1/temperature);
  the student's scale is a trained parameter, the teacher's is the one it was trained with;
- ``"cosine"``: the raw cosine similarities;
- ``"embeddings"``: not similarities but row-aligned unit-norm embeddings [B, D] of the student and
  the teacher (``EmbeddingDistillationLoss``, the feature-distillation pull).

Distillation losses (``DISTILLATION_LOSSES``): ``wsd``, ``listnet``, ``affinity``, ``mse``.
``contrastive`` needs no teacher (the teacher itself trains with it on its own logits).
``DistillationObjective`` mixes one of them with the contrastive loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j softmax(teacher)_j * log_softmax(student)_j."""
    target = F.softmax(teacher_logits.detach(), dim=1)
    return -(target * F.log_softmax(student_logits, dim=1)).sum(1).mean()


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE (CLIP): cross-entropy of rows (image->text) and columns (text->image)."""

    inputs = "logits"

    def forward(self, sim_student: torch.Tensor, sim_teacher: torch.Tensor | None = None) -> torch.Tensor:
        labels = torch.arange(sim_student.shape[0], device=sim_student.device)
        return 0.5 * (F.cross_entropy(sim_student, labels) + F.cross_entropy(sim_student.T, labels))


class HEILoss(nn.Module):
    """The HEI hashing loss (Tu et al., "Hashing based Efficient Inference for Image-Text Matching",
    Findings of ACL-IJCNLP 2021), as implemented here (docs/hashing.md has the derivation).

    ``sim_student`` is the relaxed Hamming similarity S^H = h g^T / k of the batch's tanh codes
    (h for images, g for texts, each in (-1, 1)^k; for binary codes this is exactly 1 - 2 d_H / k).
    ``sim_teacher`` is the matching score S of the same pairs from the float matcher (teacher or
    student cosine similarity). With B pairs, diagonal = matched::

        L = mean_i (1 - S^H_ii)^2                                 # matched: as similar as possible
          + neg_weight * mean_{i != j} relu(S^H_ij - S_ij)^2      # non-matched: no more than S_ij
          + quant_weight * mean(( |h| - 1)^2 and (|g| - 1)^2)     # keep tanh codes near +-1

    The non-matched term is one-sided: a hard negative that the teacher itself scores high is
    allowed a high Hamming similarity, which is what lets a short code keep it as a candidate
    for the re-ranker instead of spending bits on separating it.
    The quantisation term needs the relaxed codes, passed as ``codes=(h, g)``; without them it is 0.
    """

    def __init__(self, neg_weight: float = 1.0, quant_weight: float = 0.1):
        super().__init__()
        self.neg_weight, self.quant_weight = neg_weight, quant_weight

    def forward(self, sim_student: torch.Tensor, sim_teacher: torch.Tensor | None = None,
                codes: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if sim_teacher is None:
            raise ValueError("the HEI loss needs matching scores (sim_teacher) for the non-matched bound")
        eye = torch.eye(sim_student.shape[0], dtype=torch.bool, device=sim_student.device)
        matched = (1.0 - sim_student[eye]).pow(2).mean()
        excess = F.relu(sim_student - sim_teacher.detach())[~eye]
        non_matched = excess.pow(2).mean() if excess.numel() else sim_student.new_zeros(())
        loss = matched + self.neg_weight * non_matched
        if codes is not None and self.quant_weight:
            quant = torch.cat([c.abs().sub(1).pow(2).reshape(-1) for c in codes]).mean()
            loss = loss + self.quant_weight * quant
        return loss


class EmbeddingDistillationLoss(nn.Module):
    """Embedding (feature) distillation: L = mean_i (1 - cos(s_i, t_i)) over the batch's rows.

    ``sim_student`` and ``sim_teacher`` are [B, D] unit-norm embeddings of the same B images (or
    captions) from the student and the teacher, in spaces of the same size; on unit vectors the
    cosine is the dot product. The student trainer adds it once for images and once for captions.
    """

    inputs = "embeddings"

    def forward(self, sim_student: torch.Tensor, sim_teacher: torch.Tensor) -> torch.Tensor:
        return 1 - (sim_student * sim_teacher.detach()).sum(-1).mean()


class ListNetLoss(nn.Module):
    """ALADIN's listwise distillation (Messina et al., CBMI 2022), ListNet top-one probabilities.

    L = CE(softmax_rows(T), softmax_rows(S)) + CE(softmax_cols(T), softmax_cols(S)),
    CE(P, Q) = -1/B sum_i sum_j P_ij log Q_ij. T is the teacher's logit matrix as the teacher
    produces it; S is the student's cosine matrix scaled by the student's learned logit scale.
    The two directions are *summed*, as in ALADIN. Minimal (= the teacher's row/column entropy,
    zero gradient) when S == T.
    """

    inputs = "logits"

    def forward(self, sim_student: torch.Tensor, sim_teacher: torch.Tensor) -> torch.Tensor:
        return _soft_cross_entropy(sim_student, sim_teacher) + _soft_cross_entropy(sim_student.T, sim_teacher.T)


class AffinityLoss(nn.Module):
    """TinyCLIP's affinity mimicking (Wu et al., ICCV 2023).

    Image->text affinities A_i2t = softmax_rows(logits), text->image A_t2i = softmax_cols(logits),
    each model with its own temperature; L = 1/2 [CE(A_i2t^T, A_i2t^S) + CE(A_t2i^T, A_t2i^S)].
    On [B, B] in-batch matrices this has the same form as ``listnet`` with the two directions
    *averaged* instead of summed, i.e. it is listnet at half the weight; both are kept because
    the issue asks for both methods by name, and the ablation shows whether the weight matters.
    """

    inputs = "logits"

    def forward(self, sim_student: torch.Tensor, sim_teacher: torch.Tensor) -> torch.Tensor:
        return 0.5 * (_soft_cross_entropy(sim_student, sim_teacher) + _soft_cross_entropy(sim_student.T, sim_teacher.T))


class MSELoss(nn.Module):
    """Plain MSE between the raw cosine similarity matrices: mean_ij (S_ij - T_ij)^2."""

    inputs = "cosine"

    def forward(self, sim_student: torch.Tensor, sim_teacher: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(sim_student, sim_teacher.detach())


def standardize_rows(s: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Each row to mean 0 and (population) variance 1: removes per-row shift and scale."""
    s = s - s.mean(dim=1, keepdim=True)
    return s / (s.pow(2).mean(dim=1, keepdim=True) + eps).sqrt()


def inverse_sqrt_newton_schulz(a: torch.Tensor, iterations: int) -> torch.Tensor:
    """A^{-1/2} for a symmetric positive-definite A by coupled Newton-Schulz iterations.

    Only matrix products, so the backward pass is plain autograd: no eigen-decomposition, whose
    gradient explodes on nearly equal eigenvalues (a batch's similarity spectrum has many).
    A is first divided by its Frobenius norm (>= its largest eigenvalue) so the iteration converges.
    """
    n = a.shape[0]
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    norm = torch.linalg.matrix_norm(a)
    y, z = a / norm, eye
    for _ in range(iterations):
        t = 0.5 * (3.0 * eye - z @ y)
        y, z = y @ t, t @ z
    return z / norm.sqrt()


def zca_whiten_rows(r: torch.Tensor, eps: float, iterations: int) -> torch.Tensor:
    """W = (R R^T / n + eps I)^{-1/2} R: ZCA whitening of the rows of R (n = number of columns).

    With R = U diag(s) V^T this is U diag(s / sqrt(s^2/n + eps)) V^T: the singular vectors (the
    orthogonal basis) are kept and every direction is rescaled towards the same length, i.e. the
    rows' correlation structure is removed isotropically. ``eps`` (relative to the mean eigenvalue
    of R R^T / n, which is 1 for standardised rows) keeps near-null directions from being blown up.
    """
    n = r.shape[1]
    cov = r @ r.T / n
    eye = torch.eye(r.shape[0], dtype=r.dtype, device=r.device)
    return inverse_sqrt_newton_schulz(cov + eps * eye, iterations) @ r


class WSDLoss(nn.Module):
    """Whitened Similarity Distillation (after Wang et al., IEEE TPAMI 2022), as implemented here.

    Two whitening-like transformations, one for each retrieval direction, applied identically to
    the student's matrix S and the (detached) teacher's matrix T:

    - image->text (rows):  W_r(X) = ZCA_rows(standardize_rows(X))
    - text->image (cols):  W_c(X) = ZCA_rows(standardize_rows(X^T))

    standardize_rows removes each query's shift and scale (the two models' similarities live on
    very different ranges and their per-query spreads differ); ZCA_rows then decorrelates the
    queries' score vectors in their own eigenbasis: (C + eps I)^{-1/2} with C = X X^T / B, which
    rescales every principal direction to about unit variance without rotating it (the whitening
    that stays closest to the input). L = 1/2 [mean (W_r(S) - W_r(T))^2 + mean (W_c(S) - W_c(T))^2].

    What it is invariant to, exactly: any positive scale and shift of S (global or per query in
    the direction's own standardisation), so the student's temperature and any per-image or
    per-caption bias ("hubness") are not distilled; and, as eps -> 0, a correlation structure
    imposed by a symmetric positive-definite mixing of white score vectors. Because it ignores
    temperature, it is meant to be mixed with the contrastive loss (which sets the scale).
    """

    inputs = "cosine"

    def __init__(self, eps: float = 0.5, iterations: int = 12):
        super().__init__()
        self.eps, self.iterations = eps, iterations

    def whiten(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = s.float()
        rows = zca_whiten_rows(standardize_rows(s), self.eps, self.iterations)
        cols = zca_whiten_rows(standardize_rows(s.T), self.eps, self.iterations)
        return rows, cols

    def forward(self, sim_student: torch.Tensor, sim_teacher: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_rows, t_cols = self.whiten(sim_teacher.detach())
        s_rows, s_cols = self.whiten(sim_student)
        return 0.5 * (F.mse_loss(s_rows, t_rows) + F.mse_loss(s_cols, t_cols))


class TripletHingeLoss(nn.Module):
    """VSE++ hinge triplet loss (Faghri et al., BMVC 2018), used to train the fine-grained scorers.

    With S the [B, B] score matrix (rows = images, columns = texts, diagonal = matched) and
    m the margin, for every image i and every text j:
        image anchor:  c_i(j) = relu(m + S_ij - S_ii)   (negative texts of image i, j != i)
        text anchor:   c_j(i) = relu(m + S_ij - S_jj)   (negative images of text j, i != j)
    ``hardest=True`` (max-violation) keeps only the hardest negative of each anchor,
    L = mean_i max_j c_i(j) + mean_j max_i c_j(i); otherwise the violations are summed over
    negatives. Scores are used as given (no temperature): the margin is in score units.
    ``sim_teacher`` is ignored (the call shape is shared with the distillation losses).
    """

    inputs = "cosine"

    def __init__(self, margin: float = 0.2, hardest: bool = True):
        super().__init__()
        self.margin, self.hardest = margin, hardest

    def forward(self, sim_student: torch.Tensor, sim_teacher: torch.Tensor | None = None) -> torch.Tensor:
        pos = sim_student.diagonal()
        eye = torch.eye(sim_student.shape[0], dtype=torch.bool, device=sim_student.device)
        cost_text = F.relu(self.margin + sim_student - pos[:, None]).masked_fill(eye, 0.0)
        cost_image = F.relu(self.margin + sim_student - pos[None, :]).masked_fill(eye, 0.0)
        if self.hardest:
            return cost_text.amax(1).mean() + cost_image.amax(0).mean()
        return cost_text.sum(1).mean() + cost_image.sum(0).mean()


class CodeDiversityLoss(nn.Module):
    """Keeps an image's M codes apart (Inflate & Shrink's codes, docs/inflate-shrink.md).

    ``sim_student`` here is not a score matrix but the batch's codes [I, M, D] (any norm; they are
    unit-normalised first); with C_i = the [M, M] cosine matrix of image i's codes,
        L = mean_i mean_{m != n} C_i[m, n]^2 ,
    0 when every image's codes are orthogonal, 1 when they are all the same (collapsed) code, and 0
    for M = 1 (nothing to keep apart). ``sim_teacher`` is ignored (the call shape is shared).
    Not in ``LOSSES``: it regularises a code scorer, it is not a distillation or matching loss.
    """

    inputs = "codes"

    def forward(self, sim_student: torch.Tensor, sim_teacher: torch.Tensor | None = None) -> torch.Tensor:
        codes = F.normalize(sim_student, dim=-1)
        m = codes.shape[1]
        if m < 2:
            return codes.new_zeros(())
        cos = codes @ codes.transpose(1, 2)
        off = ~torch.eye(m, dtype=torch.bool, device=codes.device)
        return cos[:, off].pow(2).mean()


LOSSES: dict[str, type[nn.Module]] = {
    "contrastive": ContrastiveLoss,
    "wsd": WSDLoss,
    "listnet": ListNetLoss,
    "affinity": AffinityLoss,
    "mse": MSELoss,
    "hei": HEILoss,
    "triplet": TripletHingeLoss,
}
DISTILLATION_LOSSES = ("wsd", "listnet", "affinity", "mse")


def build_loss(name: str, **kwargs) -> nn.Module:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
    return LOSSES[name](**kwargs)


class DistillationObjective(nn.Module):
    """``distill_weight * loss(S, T) + contrastive_weight * contrastive(S)`` on the right inputs.

    Called with both kinds of similarity so every loss gets what it expects:
    ``objective(cos_student, cos_teacher, student_scale, teacher_scale)`` -> (total, parts).
    For ``name == "contrastive"`` the teacher is ignored and only the contrastive term is used.
    """

    def __init__(self, name: str, contrastive_weight: float = 1.0, distill_weight: float = 1.0, **kwargs):
        super().__init__()
        self.name = name
        self.loss = build_loss(name, **kwargs)
        self.contrastive = ContrastiveLoss()
        self.contrastive_weight = 1.0 if name == "contrastive" else contrastive_weight
        self.distill_weight = 0.0 if name == "contrastive" else distill_weight

    def forward(self, cos_student: torch.Tensor, cos_teacher: torch.Tensor | None,
                student_scale: torch.Tensor, teacher_scale: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, dict]:
        logits = student_scale * cos_student
        parts = {}
        if self.contrastive_weight:
            parts["contrastive"] = self.contrastive(logits)
        if self.distill_weight:
            if cos_teacher is None:
                raise ValueError(f"loss {self.name!r} needs the teacher's similarities")
            if self.loss.inputs == "logits":
                parts[self.name] = self.loss(logits, teacher_scale * cos_teacher.detach())
            else:
                parts[self.name] = self.loss(cos_student, cos_teacher.detach())
        total = self.contrastive_weight * parts.get("contrastive", 0.0) + self.distill_weight * parts.get(self.name, 0.0)
        return total, {k: float(v.detach()) for k, v in parts.items()}


def double_centre(s: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """J S J / rms(J S J) with J = I - 11^T / n on each side: removes every row's and every column's
    mean (per-image and per-caption biases) and the global scale; an all-equal matrix maps to 0."""
    s = s - s.mean(dim=1, keepdim=True)
    s = s - s.mean(dim=0, keepdim=True)
    return s / (s.pow(2).mean() + eps).sqrt()


class SharedWhitenedSimilarityLoss(nn.Module):
    """WSD re-derived from the method's description: two whitening-like transformations in an
    orthogonal space shared by the teacher's and the student's matrices (``wsd-shared``).

    ``wsd`` standardises every query's scores and then whitens each matrix with its *own* covariance
    in its own eigenbasis, weighing every direction alike (the teacher's noisy weak directions
    included). Here both matrices are expressed in one orthogonal space, the teacher's singular
    basis, and each is whitened there by its *own* per-direction scale:

        T~ = centred(T) = U diag(sigma) V^T   (double-centred teacher, rank r; U: images, V: captions)
        P(X) = U_r^T centred(X) V_r           [r, r]; P(T) = diag(sigma)
        rows (image side):  R(X) = P(X) with every row scaled to unit norm      R(T) = I
        cols (text side):   C(X) = P(X) with every column scaled to unit norm   C(T) = I
        L = 1/2 sum_k a_k [ ||R(S)_k - e_k||^2 + ||C(S)_.k - e_k||^2 ]
          = sum_k a_k [ 2 - cos(P(S)_k., e_k) - cos(P(S)_.k, e_k) ]
        a_k = sigma_k / (sigma_k + eps * mean(sigma)), normalised to sum 1

    Row k asks: does the student pair the teacher's k-th image direction with the teacher's k-th
    caption direction and with no other? The two normalisations are the whitening: every direction
    counts by the same unit norm whatever the two models' spectra (the student's temperature and
    how strongly it weighs shared semantics vs. the pair-specific part are not distilled; the
    contrastive loss sets those). ``eps`` is the whitening strength: 0 weighs every direction
    equally (full whitening), a large eps weighs them by the teacher's singular values.
    (A first derivation, one whitened least-squares difference A centred(S) B with A, B =
    diag(sigma^-1/2) U^T, V diag(sigma^-1/2) built from the teacher alone, trained at chance:
    docs/wsd.md.)

    Exactly invariant to: a positive scale of S, any per-row and per-column shift of S, a re-ordering
    of the batch (the same permutation of the rows, and of the columns, of S and T), and any
    positive rescaling of the student's singular values along the teacher's singular vectors
    (S~ = U D V^T, D > 0 diagonal, has loss 0). Minimal (0) at S = T.
    """

    inputs = "cosine"

    def __init__(self, eps: float = 0.5, rank_tol: float = 1e-6):
        super().__init__()
        self.eps, self.rank_tol = eps, rank_tol

    def basis(self, sim_teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U_r, V_r, a): the teacher's singular vectors on its rank and the direction weights."""
        with torch.no_grad():
            u, sigma, vh = torch.linalg.svd(double_centre(sim_teacher.detach().double()))
            keep = sigma > self.rank_tol * sigma.max().clamp(min=1e-30)
            sigma = sigma[keep]
            weights = sigma / (sigma + self.eps * sigma.mean())
            weights = weights / weights.sum().clamp(min=1e-30)
            dtype = sim_teacher.dtype
        return u[:, keep].to(dtype), vh[keep].T.to(dtype), weights.to(dtype)

    def project(self, s: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """P(S) = U_r^T centred(S) V_r."""
        return u.T @ double_centre(s) @ v

    def forward(self, sim_student: torch.Tensor, sim_teacher: torch.Tensor) -> torch.Tensor:
        u, v, weights = self.basis(sim_teacher)
        if weights.numel() == 0:  # an all-equal teacher matrix: nothing to distil
            return sim_student.sum() * 0.0
        p = self.project(sim_student, u, v)
        diag = p.diagonal()
        row_cos = diag / (p.pow(2).sum(1) + 1e-12).sqrt()
        col_cos = diag / (p.pow(2).sum(0) + 1e-12).sqrt()
        return (weights * (2.0 - row_cos - col_cos)).sum()


LOSSES["wsd-shared"] = SharedWhitenedSimilarityLoss
DISTILLATION_LOSSES = (*DISTILLATION_LOSSES, "wsd-shared")
