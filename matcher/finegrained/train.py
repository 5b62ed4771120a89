"""Training of the fine tiers on cached region/token features, selected on val.

Every step samples B images (one random caption each), builds the in-batch [B, B] score matrix
of the scorer being trained and minimises the VSE++ hinge loss with hardest negatives
(``matcher.train.losses.TripletHingeLoss``; ``loss="contrastive"`` swaps in InfoNCE at the fixed
scale ``distill_scale``, the dual teacher's own objective). With a ``teacher`` scorer (shrinking
a code model, or any fine scorer distilled from another) a listwise term is added on the same
matrices:
    L = hinge(S) + distill_weight * ListNet(scale * S, scale * T).
The epoch with the best val rsum is kept: re-ranking rsum of the dual teacher's top-C for a
re-ranker, exhaustive rsum for a late-interaction (code) scorer.
"""
from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import torch

from matcher.eval.metrics import retrieval_metrics
from matcher.finegrained.checkpoints import FineRecipe
from matcher.finegrained.evaluate import encode_split, full_scores, rerank_metrics, score_shortlists
from matcher.finegrained.features import FineSplit
from matcher.train.loop import Optimiser, Round, fit, seeded, trainable
from matcher.train.losses import ContrastiveLoss, ListNetLoss, TripletHingeLoss
from matcher.train.selection import BestOnVal


def batch_scores(scorer, split: FineSplit, rows: np.ndarray, captions: np.ndarray) -> torch.Tensor:
    """[B, B] scores of the batch's images (rows) against its captions (columns)."""
    tokens, mask = split.token_batch(captions)
    return scorer.score(scorer.encode_image(split.region_batch(rows)), scorer.encode_text(tokens, mask), mask)


def val_metrics(scorer, split: FineSplit, dual: np.ndarray, recipe: FineRecipe) -> dict:
    enc = encode_split(scorer, split)
    if recipe.tier == "codes":
        return retrieval_metrics(full_scores(scorer, enc), split.caption_image)
    return rerank_metrics(dual, score_shortlists(scorer, enc, dual, recipe.candidates), split.caption_image)


def train_scorer(scorer, train: FineSplit, val: FineSplit, dual_val: np.ndarray, recipe: FineRecipe,
                 teacher=None, log=print) -> dict:
    """Train in place, restore the best val epoch (the untrained scorer counts as epoch 0); returns the history."""
    rng = seeded(recipe.seed)
    listnet = ListNetLoss()
    if recipe.loss == "triplet":
        base = TripletHingeLoss(recipe.margin)
    else:  # the dual teacher's own objective, on the fine scores at a fixed logit scale
        contrastive = ContrastiveLoss()
        base = lambda sim: contrastive(recipe.distill_scale * sim)  # noqa: E731
    if recipe.freeze_projections:
        scorer.image_proj.requires_grad_(False)
        scorer.text_proj.requires_grad_(False)
    if teacher is not None:
        teacher.eval()

    def batches(_epoch: int):
        order = rng.permutation(len(train))
        for s in range(0, len(order) - recipe.batch_size + 1, recipe.batch_size):
            rows = order[s:s + recipe.batch_size]
            yield rows, rows * train.captions_per_image + rng.integers(0, train.captions_per_image, len(rows))

    def step(batch) -> torch.Tensor:
        rows, captions = batch
        sim = batch_scores(scorer, train, rows, captions)
        loss = base(sim)
        if teacher is not None:
            with torch.no_grad():
                target = batch_scores(teacher, train, rows, captions)
            loss = loss + recipe.distill_weight * listnet(recipe.distill_scale * sim, recipe.distill_scale * target)
        return loss

    def evaluate(r: Round) -> dict:
        metrics = val_metrics(scorer, val, dual_val, recipe)
        return {"epoch": r.index, "loss": r.loss, "val_rsum": metrics["rsum"], "val": metrics,
                "seconds": round(time.time() - r.started, 1)}

    def report(entry: dict) -> None:
        log(f"[{recipe.tier}] epoch {entry['epoch']}  loss {entry['loss']:.4f}  val rsum {entry['val_rsum']:.2f}  "
            f"({entry['seconds']:.0f}s)")

    start = val_metrics(scorer, val, dual_val, recipe)
    best = BestOnVal(scorer)
    best.record({"epoch": 0, "val_rsum": start["rsum"], "val": start})
    log(f"[{recipe.tier}] epoch 0 (init)  val rsum {start['rsum']:.2f}")
    optimiser = Optimiser([{"params": trainable(scorer), "lr": recipe.lr}], recipe.weight_decay,
                          recipe.epochs * (len(train) // recipe.batch_size), pct_start=0.1)
    fit(scorer, optimiser, step, batches, evaluate, rounds=recipe.epochs, best=best, log=report)
    chosen = best.best  # restored by fit
    return {"recipe": asdict(recipe), "history": best.history, "best_epoch": chosen["epoch"], "val": chosen["val"]}
