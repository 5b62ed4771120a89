"""A student encoder with projection heads distilled from a teacher: ``distilled:STUDENT from TEACHER``.

The student's towers stay as they are (any open_clip model or checkpoint); one linear head per
modality, initialised to the identity, maps its unit embeddings into a space whose image-text
similarities follow the teacher's (``matcher.train.heads``). Starting at the identity means an
untrained head is the student itself, so "before and after" is the same model with and without it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from matcher.models.encoder import Encoder


class ProjectionHeads(nn.Module):
    """Image and text heads (D -> D, identity at init) and the student's logit scale."""

    def __init__(self, dim: int, init_scale: float = 20.0):
        super().__init__()
        self.image, self.text = nn.Linear(dim, dim), nn.Linear(dim, dim)
        for head in (self.image, self.text):
            nn.init.eye_(head.weight)
            nn.init.zeros_(head.bias)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_scale)).log())

    def project(self, vectors: torch.Tensor, modality: str) -> torch.Tensor:
        head = self.image if modality == "image" else self.text
        return F.normalize(head(F.normalize(vectors, dim=-1)), dim=-1)


class DistilledEncoder(Encoder):
    """``student`` followed by trained ``heads``; encodes like any other encoder."""

    def __init__(self, name: str, student: Encoder, heads: ProjectionHeads):
        self.name, self.student, self.heads = name, student, heads.eval()
        self.module = nn.ModuleDict({"student": student.module, "heads": heads})
        self.preprocess = student.preprocess
        self.preprocess_version = getattr(student, "preprocess_version", "")
        self.config = {"student": student.name, "heads": "linear, identity init"}

    def _image_forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.heads.project(self.student._image_forward(pixels), "image")

    def _text_forward(self, texts: list[str]) -> torch.Tensor:
        return self.heads.project(self.student._text_forward(texts), "text")
