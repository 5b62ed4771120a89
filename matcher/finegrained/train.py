"""Training of the fine tiers on cached region/token features, selected on val.

Every step samples B images (one random caption each), builds the in-batch [B, B] score matrix
of the scorer being trained and minimises the VSE++ hinge loss with hardest negatives
(``matcher.losses.TripletHingeLoss``; ``loss="contrastive"`` swaps in InfoNCE at the fixed
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
from matcher.finegrained.scorers import AlignmentScorer, CodeScorer
from matcher.losses import ContrastiveLoss, ListNetLoss, TripletHingeLoss
from matcher.metrics import retrieval_metrics
from matcher.train.selection import BestOnVal

FORMAT = "matcher-fine-scorer/1"


@dataclass
class FineRecipe:
    """Everything that determines a trained fine scorer (stored with its weights)."""

    tier: str = "alignment"      # alignment | codes
    reduce: str = "mean"         # word aggregation: sum | mean
    codes: int = 16              # M, codes tier only
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 1e-4
    loss: str = "triplet"        # triplet (VSE++ hinge, hardest negatives) | contrastive (InfoNCE at distill_scale)
    margin: float = 0.2
    dropout: float = 0.1
    freeze_projections: bool = False  # keep the teacher's heads; train only what the tier adds (code pooling)
    distill_weight: float = 1.0  # only with a teacher scorer
    distill_scale: float = 20.0  # logit scale applied to both matrices in the ListNet term
    candidates: int = 20         # val shortlist size for re-ranker selection
    seed: int = 0


def build_scorer(recipe: FineRecipe, image_head: torch.nn.Linear, text_head: torch.nn.Linear):
    if recipe.tier == "alignment":
        return AlignmentScorer(image_head, text_head, recipe.reduce, recipe.dropout)
    if recipe.tier == "codes":
        return CodeScorer(image_head, text_head, recipe.codes, recipe.reduce, recipe.dropout)
    raise ValueError(f"unknown fine tier {recipe.tier!r}")


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


def save_scorer(path: str | Path, scorer, recipe: FineRecipe, metadata: dict | None = None) -> None:
    """Trained weights only (float16), with the recipe that rebuilds the module, atomically."""
    state = {k: v.half() for k, v in scorer.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "recipe": asdict(recipe), "state_dict": state, "metadata": metadata or {}}, tmp)


CROSS_FORMAT = "matcher-fine-cross/1"
_FROZEN = ("tokens.image_head.", "tokens.text_head.")  # copies of the teacher's heads: rebuilt, not stored


def save_cross(path: str | Path, kind: str, module: torch.nn.Module, recipe: dict, metadata: dict) -> None:
    """A cross-encoder (``kind="cross"``) or its decomposition, trained weights only, float16."""
    state = {k: v.half() for k, v in module.state_dict().items() if not any(f in k for f in _FROZEN)}
    with atomic_path(path) as tmp:
        torch.save({"format": CROSS_FORMAT, "kind": kind, "recipe": recipe, "state_dict": state,
                    "metadata": metadata}, tmp)


def load_cross(payload: dict, image_head: torch.nn.Linear, text_head: torch.nn.Linear):
    from matcher.finegrained.cross import CrossEncoder, DecomposedEncoder

    r = payload["recipe"]
    module = CrossEncoder(image_head, text_head, r["dim"], r["layers"], r["heads"], r["ffn"], r["dropout"],
                          residual_scale=r.get("residual_scale", 0.0))
    if payload["kind"] == "decomposed":
        module = DecomposedEncoder(module)
    missing, unexpected = module.load_state_dict({k: v.float() for k, v in payload["state_dict"].items()}, strict=False)
    if unexpected or any(not any(f in k for f in _FROZEN) for k in missing):
        raise ValueError(f"cross checkpoint does not match its recipe: {unexpected[:3]} {missing[:3]}")
    return module.eval()


def load_scorer(path: str | Path, image_head: torch.nn.Linear, text_head: torch.nn.Linear):
    """(scorer, recipe, metadata); for cross checkpoints the recipe is a dict with ``tier`` set."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") == CROSS_FORMAT:
        return (load_cross(payload, image_head, text_head), {**payload["recipe"], "tier": payload["kind"]},
                payload["metadata"])
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fine scorer checkpoint ({FORMAT})")
    recipe = FineRecipe(**payload["recipe"])
    scorer = build_scorer(recipe, image_head, text_head)
    scorer.load_state_dict({k: v.float() for k, v in payload["state_dict"].items()})
    return scorer.eval(), recipe, payload["metadata"]
