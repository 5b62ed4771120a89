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


LOSSES: dict[str, type[nn.Module]] = {"contrastive": ContrastiveLoss}


def build_loss(name: str, **kwargs) -> nn.Module:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
    return LOSSES[name](**kwargs)
