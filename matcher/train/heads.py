"""Distil a student's projection heads from a teacher's similarity matrices, on cached embeddings.

Why heads only: any student (an open_clip model from the hub, a checkpoint) gets distilled in
minutes on a CPU, because the towers are frozen and their gallery embeddings come from the
embedding cache; each step is a [B, D] x [D, B] product. The objective is the project's
(``matcher.train.losses.DistillationObjective``): a distillation loss between the student's and
the teacher's in-batch similarity matrices plus InfoNCE, as for the offline student. The epoch
with the best val rsum is kept; epoch 0 (the identity heads, i.e. the student as it was) is
recorded too, so distillation can only be kept if it helps on val.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch

from matcher.data.embed import GalleryEmbeddings, embed_gallery
from matcher.data.training import training_gallery
from matcher.eval.metrics import retrieval_metrics
from matcher.data.cache import ArrayCache
from matcher.models.distilled import DistilledEncoder, ProjectionHeads
from matcher.models.encoder import Encoder
from matcher.train.loop import Optimiser, Round, fit, seeded
from matcher.train.losses import DistillationObjective
from matcher.train.pairs import caption_lists
from matcher.train.selection import BestOnVal

log = logging.getLogger(__name__)


@dataclass
class HeadRecipe:
    """Everything that determines distilled projection heads (part of their cache key)."""

    loss: str = "listnet"
    contrastive_weight: float = 1.0
    distill_weight: float = 1.0
    teacher_scale: float = 50.0   # temperature of the teacher's softmax rows (listnet); CLIP models train near 100
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0


def _val_rsum(heads: ProjectionHeads, val: GalleryEmbeddings) -> float:
    with torch.inference_mode():
        images = heads.project(torch.from_numpy(val.images), "image")
        texts = heads.project(torch.from_numpy(val.captions), "text")
    return float(retrieval_metrics((texts @ images.T).numpy(), val.caption_image)["rsum"])


def train_projection_heads(student: GalleryEmbeddings, teacher: GalleryEmbeddings, val: GalleryEmbeddings,
                           recipe: HeadRecipe = HeadRecipe(), progress: bool = True) -> tuple[ProjectionHeads, dict]:
    """Heads for ``student`` (train split embeddings) distilled from ``teacher`` (the same rows)."""
    if teacher.names != student.names or len(teacher.caption_texts) != len(student.caption_texts):
        raise ValueError("teacher and student embeddings must cover the same images and captions")
    rng = seeded(recipe.seed)
    heads = ProjectionHeads(student.images.shape[1])
    objective = DistillationObjective(recipe.loss, recipe.contrastive_weight, recipe.distill_weight)
    captions_of = caption_lists(student.caption_image, len(student.names))
    usable = np.array([i for i, c in enumerate(captions_of) if len(c)])
    batch = min(recipe.batch_size, len(usable))
    steps_per_epoch = max(1, len(usable) // batch)
    s_img, s_txt = torch.from_numpy(student.images), torch.from_numpy(student.captions)
    t_img, t_txt = torch.from_numpy(teacher.images), torch.from_numpy(teacher.captions)

    def batches(_epoch: int):
        perm = rng.permutation(usable)
        for step in range(steps_per_epoch):
            img = perm[step * batch:(step + 1) * batch]
            yield img, np.array([rng.choice(captions_of[i]) for i in img])

    def step(rows):
        img, cap = rows
        cos_s = heads.project(s_img[img], "image") @ heads.project(s_txt[cap], "text").T
        return objective(cos_s, t_img[img] @ t_txt[cap].T, heads.logit_scale.exp().clamp(max=100), recipe.teacher_scale)

    def evaluate(r: Round) -> dict:
        heads.eval()
        return {"epoch": r.index, "loss": r.loss, **r.parts, "val_rsum": _val_rsum(heads, val)}

    best = BestOnVal(heads)
    best.record({"epoch": 0, "val_rsum": _val_rsum(heads, val)})  # the student as it was
    optimiser = Optimiser([{"params": list(heads.parameters()), "lr": recipe.lr}], recipe.weight_decay,
                          recipe.epochs * steps_per_epoch, schedule="cosine")
    best = fit(heads, optimiser, step, batches, evaluate, rounds=recipe.epochs, steps_per_round=steps_per_epoch,
               best=best, progress="distilling heads, epoch" if progress else None)
    return heads.eval(), {"best_epoch": best.best["epoch"], "val_rsum": best.best["val_rsum"],
                          "val_rsum_before": best.history[0]["val_rsum"], "history": best.history}


def distil_student(name: str, student: Encoder, teacher: Encoder, recipe: HeadRecipe = HeadRecipe(),
                   cache: ArrayCache | None = None) -> DistilledEncoder:
    """``student`` with heads distilled from ``teacher`` on the training gallery, cached on disk
    (keyed by both encoders, the gallery and the recipe), so a later start loads them."""
    pair = training_gallery()
    if pair is None:
        raise ValueError("a distilled student needs a captioned training gallery: name one with --train-gallery PATH "
                         "(or MATCHER_TRAIN_GALLERY)")
    train, val = pair
    cache = cache or ArrayCache()
    digest = hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True).encode()).hexdigest()[:12]
    key = f"distilled-{student.fingerprint()}-{teacher.fingerprint()}-{train.fingerprint()}-{digest}"
    dim = embed_gallery(student, val).images.shape[1]
    heads = ProjectionHeads(dim)
    hit = cache.get(key)
    if hit is not None:
        heads.load_state_dict({k: torch.from_numpy(v) for k, v in hit[0].items()})
        return DistilledEncoder(name, student, heads)
    heads, record = train_projection_heads(embed_gallery(student, train), embed_gallery(teacher, train),
                                           embed_gallery(student, val), recipe)
    log.info("distilled %s from %s on %s: val rsum %.1f -> %.1f (epoch %d)", student.name, teacher.name, train.root,
             record["val_rsum_before"], record["val_rsum"], record["best_epoch"])
    cache.put(key, {k: v.detach().numpy() for k, v in heads.state_dict().items()},
              {k: record[k] for k in ("best_epoch", "val_rsum", "val_rsum_before")})
    return DistilledEncoder(name, student, heads)
