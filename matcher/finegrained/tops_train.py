"""Training of ``tops-alignment`` (ALADIN's alignment loss back-propagated into the teacher's tops).

Each step takes B images (a random view: original or flipped, as the teacher was trained) with one
random caption each, runs the trained tops from the trunk caches, and minimises the VSE++ hinge
loss with hardest negatives on the [B, B] alignment scores, as the first alignment scorers did.
The teacher's top blocks/layers move at ``tower_lr`` (the teacher's own fine-tuning rate), the
projections at ``lr``. Selection on val: the dual teacher's top-``candidates`` re-ranked by
dual + λ·alignment with the best λ of ``FUSE_GRID`` (what the tier serves); the pure re-rank rsum is
recorded beside it. Runs are resumable (``fit``'s ``Resume``).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from matcher.finegrained.evaluate import FUSE_GRID, rerank_metrics, score_shortlists
from matcher.finegrained.tops import TopsAlignment, encode_cached
from matcher.train.loop import Optimiser, Resume, Round, fit, train_frozen_batchnorm
from matcher.train.losses import TripletHingeLoss
from matcher.train.pairs import CachedSplit
from matcher.train.selection import BestOnVal


@dataclass
class TopsRecipe:
    reduce: str = "sum"           # word aggregation of the alignment score
    drop_special: bool = True     # [CLS]/[SEP] out of the alignment (still in the attention)
    epochs: int = 6
    caption_passes: int = 2       # an epoch meets every image this many times, each with a random caption
    batch_size: int = 128
    lr: float = 1e-3              # projections (start: the teacher's heads)
    tower_lr: float = 1e-4        # copies of the teacher's top blocks and layers
    weight_decay: float = 1e-4
    margin: float = 0.2
    dropout: float = 0.1
    candidates: int = 20          # val shortlist re-ranked for selection
    seed: int = 0


def val_entry(model: TopsAlignment, val: CachedSplit, dual_val: np.ndarray, candidates: int) -> dict:
    """Pure and best-fused re-rank metrics of the dual top-C on val (``val_rsum`` = fused)."""
    enc = encode_cached(model, val)
    lists = score_shortlists(model, enc, dual_val, candidates)
    caption_image = np.repeat(np.arange(len(val)), val.captions_per_image)
    pure = rerank_metrics(dual_val, lists, caption_image)
    fused = {lam: rerank_metrics(dual_val, lists, caption_image, fuse=lam) for lam in FUSE_GRID}
    lam = max(fused, key=lambda k: fused[k]["rsum"])
    return {"val_rsum": fused[lam]["rsum"], "val": fused[lam], "fuse_lambda": lam, "pure_rsum": pure["rsum"]}


def train_tops(model: TopsAlignment, train: CachedSplit, val: CachedSplit, dual_val: np.ndarray,
               recipe: TopsRecipe, rng: np.random.Generator, resume: Path | None = None,
               log: Callable[[str], None] = print) -> dict:
    """Train in place; the best val state (the untrained copy counts as epoch 0) is restored."""
    hinge = TripletHingeLoss(recipe.margin)
    per_epoch = recipe.caption_passes * (len(train) // recipe.batch_size)

    def batches(_epoch: int):
        return (b for _ in range(recipe.caption_passes) for b in train.sample_epoch(recipe.batch_size, rng))

    def step(batch):
        rows, views, captions = batch
        images = model.encode_image(train.image_batch(rows, views))
        texts, mask = model.encode_text(*train.caption_batch(captions))
        return hinge(model.score(images, texts, mask))

    def evaluate(r: Round) -> dict:
        entry = {"epoch": r.index, "loss": r.loss, **val_entry(model, val, dual_val, recipe.candidates),
                 "seconds": round(time.time() - r.started, 1)}
        return entry

    def report(e: dict) -> None:
        loss = f"  loss {e['loss']:.4f}" if "loss" in e else ""
        log(f"[tops-alignment] epoch {e['epoch']}{loss}  val fused {e['val_rsum']:.2f} (λ {e['fuse_lambda']:g})  "
            f"pure {e['pure_rsum']:.2f}  ({e.get('seconds', 0):.0f}s)")

    best = BestOnVal(model)
    if resume is None or not Path(resume).exists():  # a resumed run has epoch 0 in its saved history
        start = {"epoch": 0, **val_entry(model, val, dual_val, recipe.candidates)}
        best.record(start)
        report(start)
    projections = [p for n, p in model.named_parameters() if n.startswith("scorer.")]
    tops = [p for n, p in model.named_parameters() if not n.startswith("scorer.")]
    optimiser = Optimiser([{"params": projections, "lr": recipe.lr}, {"params": tops, "lr": recipe.tower_lr}],
                          recipe.weight_decay, recipe.epochs * per_epoch, pct_start=0.1)
    fit(model, optimiser, step, batches, evaluate, rounds=recipe.epochs, steps_per_round=per_epoch, best=best,
        train_mode=train_frozen_batchnorm, progress="tops-alignment epoch", log=report,
        resume=Resume(Path(resume), rng) if resume is not None else None)
    chosen = best.best
    return {"recipe": asdict(recipe), "history": best.history, "best_epoch": chosen["epoch"], "val": chosen["val"],
            "fuse_lambda": chosen["fuse_lambda"]}
