"""Training losses. All share one call shape so training code can swap them by name.

``loss(sim_student, sim_teacher) -> scalar`` where ``sim_*`` are [B, B] image-text similarity
(logit) matrices of a batch whose diagonal holds the matching pairs; ``sim_teacher`` is None for
losses that need no teacher.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE (CLIP): cross-entropy of rows (image->text) and columns (text->image)."""

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


LOSSES: dict[str, type[nn.Module]] = {"contrastive": ContrastiveLoss, "hei": HEILoss}


def build_loss(name: str, **kwargs) -> nn.Module:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
    return LOSSES[name](**kwargs)
