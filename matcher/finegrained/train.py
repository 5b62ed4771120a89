"""Training of the fine tiers on cached region/token features, selected on val.

Every step samples B images (one random caption each), builds the in-batch [B, B] score matrix
of the scorer being trained and minimises the VSE++ hinge loss with hardest negatives
(``matcher.train.losses.TripletHingeLoss``; ``loss="contrastive"`` swaps in InfoNCE at the fixed
scale ``distill_scale``, the dual teacher's own objective). With a ``teacher`` (a scorer on
the same features: shrinking a code model; or anything with ``batch(rows, captions) -> [B, B]``, such
as ``distill.FineTeacher``: the fused score of a better tier) a listwise term is added on the same
matrices:
    L = hinge(S) + distill_weight * ListNet(scale * S, scale * T).
The epoch with the best val rsum is kept: re-ranking rsum of the dual teacher's top-C for a
re-ranker, exhaustive rsum for a late-interaction (code) scorer.

Code scorers that inflate (docs/inflate-shrink.md): ``query_init="kmeans"`` puts the queries on
k-means centroids of train region keys before the first step (not when shrinking a code model: the
queries then come from the larger one), ``query_lr_mult`` gives the queries their own learning rate,
and ``diversity_weight`` adds ``losses.CodeDiversityLoss`` on the batch's codes:
    L = hinge(S) [+ distill_weight * ListNet] + diversity_weight * mean off-diagonal cos^2 of each image's codes.
Each code-tier val entry also records the codes' ``attention_entropy`` and ``code_cosine``.
"""
from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import torch

from matcher.eval.metrics import retrieval_metrics
from matcher.finegrained.checkpoints import FineRecipe
from matcher.finegrained.evaluate import code_diversity, encode_split, full_scores, rerank_metrics, score_shortlists
from matcher.finegrained.features import FineSplit
from matcher.train.loop import Optimiser, Round, fit, seeded, trainable
from matcher.train.losses import CodeDiversityLoss, ContrastiveLoss, ListNetLoss, TripletHingeLoss
from matcher.train.selection import BestOnVal


def batch_scores(scorer, split: FineSplit, rows: np.ndarray, captions: np.ndarray, with_images: bool = False):
    """[B, B] scores of the batch's images (rows) against its captions (columns); with ``with_images``
    also the encoded images (for a term on the codes themselves)."""
    tokens, mask = split.token_batch(captions)
    images = scorer.encode_image(split.region_batch(rows))
    sim = scorer.score(images, scorer.encode_text(tokens, mask), mask)
    return (sim, images) if with_images else sim


def init_queries_kmeans(scorer, split: FineSplit, images: int = 500, seed: int = 0) -> list[int]:
    """Put a code scorer's queries on k-means centroids of ``images`` train images' region keys
    (regions projected by the scorer, then through its key map; see ``CodePooling.init_queries``).
    Returns the cluster sizes (regions per centroid, largest first)."""
    rows = np.sort(np.random.default_rng(seed).choice(len(split), min(images, len(split)), replace=False))
    was_training = scorer.training
    scorer.eval()  # no dropout on the features being clustered
    with torch.no_grad():
        sizes = scorer.pool.init_queries(scorer.project_regions(split.region_batch(rows)), seed)
    scorer.train(was_training)
    return sizes.tolist()


def _check_codes_recipe(scorer, recipe: FineRecipe) -> None:
    """The saved recipe must rebuild the module being trained (a shrunk scorer inherits its pooling
    scale and dual weight from the larger one: its recipe has to say the same)."""
    got = {"codes": scorer.codes, "pool_scale": scorer.pool.scale, "dual_weight": scorer.dual_weight,
           "reduce": scorer.reduce}
    want = {"codes": recipe.codes, "pool_scale": recipe.pool_scale, "dual_weight": recipe.dual_weight,
            "reduce": recipe.reduce}
    if got != want:
        raise ValueError(f"the code scorer does not match its recipe: scorer {got}, recipe {want}")


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
    if isinstance(teacher, torch.nn.Module):
        teacher.eval()
    codes = recipe.tier == "codes"
    diversity = CodeDiversityLoss()
    init = {}
    if codes:
        _check_codes_recipe(scorer, recipe)
        if recipe.query_init == "kmeans" and not hasattr(teacher, "pool"):  # a code teacher: queries inherited
            init["kmeans_cluster_sizes"] = init_queries_kmeans(scorer, train, seed=recipe.seed)
        elif recipe.query_init not in ("random", "kmeans"):
            raise ValueError(f"unknown query_init {recipe.query_init!r}: use 'random' or 'kmeans'")

    def batches(_epoch: int):
        order = rng.permutation(len(train))
        for s in range(0, len(order) - recipe.batch_size + 1, recipe.batch_size):
            rows = order[s:s + recipe.batch_size]
            yield rows, rows * train.captions_per_image + rng.integers(0, train.captions_per_image, len(rows))

    def step(batch):
        rows, captions = batch
        sim, images = batch_scores(scorer, train, rows, captions, with_images=True)
        loss = base(sim)
        parts = {"match": float(loss.detach())}
        if teacher is not None:
            with torch.no_grad():
                target = (teacher.batch(rows, captions) if hasattr(teacher, "batch")
                          else batch_scores(teacher, train, rows, captions))
            distill = listnet(recipe.distill_scale * sim, recipe.distill_scale * target)
            loss = loss + recipe.distill_weight * distill
            parts["distill"] = float(distill.detach())
        if codes and recipe.diversity_weight:
            div = diversity(scorer.code_vectors(images))
            loss = loss + recipe.diversity_weight * div
            parts["diversity"] = float(div.detach())
        return loss, parts

    queries_at_start = scorer.pool.queries.detach().clone() if codes else None

    def diagnostics() -> dict:
        """Code-tier collapse diagnostics on val, and how far the queries moved from where training
        started (relative: ||Q - Q_start|| / ||Q_start||)."""
        if not codes:
            return {}
        shift = (scorer.pool.queries.detach() - queries_at_start).norm() / queries_at_start.norm().clamp_min(1e-12)
        return {"codes": {**code_diversity(scorer, val), "query_shift": round(float(shift), 4)}}

    def evaluate(r: Round) -> dict:
        metrics = val_metrics(scorer, val, dual_val, recipe)
        return {"epoch": r.index, "loss": r.loss, "parts": r.parts, "val_rsum": metrics["rsum"], "val": metrics,
                **diagnostics(), "seconds": round(time.time() - r.started, 1)}

    def report(entry: dict) -> None:
        extra = "".join(f"  {k} {v:.4f}" for k, v in entry.get("codes", {}).items())
        log(f"[{recipe.tier}] epoch {entry['epoch']}  loss {entry['loss']:.4f}  val rsum {entry['val_rsum']:.2f}{extra}  "
            f"({entry['seconds']:.0f}s)")

    start = val_metrics(scorer, val, dual_val, recipe)
    best = BestOnVal(scorer)
    at_init = diagnostics()
    best.record({"epoch": 0, "val_rsum": start["rsum"], "val": start, **at_init, **init})
    extra = "".join(f"  {k} {v:.4f}" for k, v in at_init.get("codes", {}).items())
    log(f"[{recipe.tier}] epoch 0 (init)  val rsum {start['rsum']:.2f}{extra}")
    params = trainable(scorer)
    groups = [{"params": params, "lr": recipe.lr}]
    if codes and recipe.query_lr_mult != 1.0 and scorer.pool.queries.requires_grad:
        groups = [{"params": [p for p in params if p is not scorer.pool.queries], "lr": recipe.lr},
                  {"params": [scorer.pool.queries], "lr": recipe.lr * recipe.query_lr_mult}]
    optimiser = Optimiser(groups, recipe.weight_decay, recipe.epochs * (len(train) // recipe.batch_size), pct_start=0.1)
    fit(scorer, optimiser, step, batches, evaluate, rounds=recipe.epochs, best=best, log=report)
    chosen = best.best  # restored by fit
    return {"recipe": asdict(recipe), "history": best.history, "best_epoch": chosen["epoch"], "val": chosen["val"]}
