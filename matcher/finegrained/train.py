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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from matcher.atomic import atomic_path
from matcher.finegrained.evaluate import encode_split, full_scores, rerank_metrics, score_shortlists
from matcher.finegrained.features import FineSplit
from matcher.finegrained.checkpoints import FineRecipe, build_scorer
from matcher.train.losses import ContrastiveLoss, ListNetLoss, TripletHingeLoss
from matcher.eval.metrics import retrieval_metrics
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
    """Train in place, restore the best val epoch; returns the history."""
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    listnet = ListNetLoss()
    if recipe.loss == "triplet":
        base = TripletHingeLoss(recipe.margin)
    else:  # the dual teacher's own objective, on the fine scores at a fixed logit scale
        contrastive = ContrastiveLoss()
        base = lambda sim: contrastive(recipe.distill_scale * sim)  # noqa: E731
    if recipe.freeze_projections:
        scorer.image_proj.requires_grad_(False)
        scorer.text_proj.requires_grad_(False)
    params = [p for p in scorer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps = recipe.epochs * (len(train) // recipe.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=max(steps, 1),
                                                    pct_start=0.1)
    if teacher is not None:
        teacher.eval()
    start = val_metrics(scorer, val, dual_val, recipe)
    best = BestOnVal(scorer)
    best.record({"epoch": 0, "val_rsum": start["rsum"], "val": start})
    log(f"[{recipe.tier}] epoch 0 (init)  val rsum {start['rsum']:.2f}")
    for epoch in range(1, recipe.epochs + 1):
        scorer.train()
        began, losses = time.time(), []
        order = rng.permutation(len(train))
        for s in range(0, len(order) - recipe.batch_size + 1, recipe.batch_size):
            rows = order[s:s + recipe.batch_size]
            captions = rows * train.captions_per_image + rng.integers(0, train.captions_per_image, len(rows))
            sim = batch_scores(scorer, train, rows, captions)
            loss = base(sim)
            if teacher is not None:
                with torch.no_grad():
                    target = batch_scores(teacher, train, rows, captions)
                loss = loss + recipe.distill_weight * listnet(recipe.distill_scale * sim, recipe.distill_scale * target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        metrics = val_metrics(scorer, val, dual_val, recipe)
        best.record({"epoch": epoch, "loss": float(np.mean(losses)), "val_rsum": metrics["rsum"], "val": metrics,
                     "seconds": round(time.time() - began, 1)})
        log(f"[{recipe.tier}] epoch {epoch}  loss {np.mean(losses):.4f}  val rsum {metrics['rsum']:.2f}  "
            f"({time.time() - began:.0f}s)")
    chosen = best.restore()
    return {"recipe": asdict(recipe), "history": best.history, "best_epoch": chosen["epoch"], "val": chosen["val"]}


