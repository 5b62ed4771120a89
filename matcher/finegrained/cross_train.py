"""Training of the cross-encoder (hard negatives from the dual teacher) and of its decomposition.

Cross-encoder: each step takes B captions; each is scored against its own image and K images
drawn from the dual teacher's top-``pool`` for that caption (its own image excluded), and the
loss is the cross-entropy of the positive among those K + 1 scores. These are exactly the
confusions a re-ranker of the dual shortlist has to resolve.

Decomposition: each step takes B images with one caption each; the cross-encoder scores all
B x B pairs (teacher, no grad) and the decomposed encoder's scaled cosines S learn
    L = ListNet(S * scale, T) + contrastive_weight * InfoNCE(S * scale),
the cross-encoder's logits T being used as they are.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from matcher.eval.metrics import retrieval_metrics
from matcher.finegrained.evaluate import encode_split, full_scores, rerank_metrics, score_shortlists
from matcher.finegrained.features import FineSplit
from matcher.train.loop import Optimiser, Round, fit, seeded, trainable
from matcher.train.losses import ContrastiveLoss, ListNetLoss
from matcher.train.selection import BestOnVal


@dataclass
class CrossRecipe:
    dim: int = 128
    layers: int = 2
    heads: int = 4
    ffn: int = 256
    dropout: float = 0.1
    residual: bool = False        # score = teacher logit scale * dual cosine + read-out (read-out starts at 0)
    steps: int = 300              # cross-encoder steps (CPU budget), B captions each
    batch_size: int = 32
    negatives: int = 3
    pool: int = 10                # hard negatives are drawn from the dual top-``pool``
    lr: float = 5e-4
    candidates: int = 10          # val/test shortlist the cross-encoder re-ranks
    decomp_steps: int = 200
    decomp_batch: int = 32
    decomp_lr: float = 5e-4
    contrastive_weight: float = 1.0
    eval_every: int = 100
    seed: int = 0
    decompose: bool = False       # train-cross: also distil the decomposition from the trained cross-encoder


def hard_negatives(dual: np.ndarray, caption_image: np.ndarray, pool: int) -> np.ndarray:
    """[captions, pool] each caption's top-``pool`` dual images other than its own."""
    sim = dual.copy()
    sim[np.arange(len(sim)), caption_image] = -np.inf
    return np.argpartition(-sim, pool - 1, axis=1)[:, :pool]


def _rerank_val(cross, val: FineSplit, dual_val: np.ndarray, candidates: int) -> dict:
    enc = encode_split(cross, val)
    return rerank_metrics(dual_val, score_shortlists(cross, enc, dual_val, candidates), val.caption_image)


def _fit_steps(module, name: str, label: str, lr: float, steps: int, eval_every: int, batch: Callable[[], tuple],
               loss: Callable[[tuple], torch.Tensor], validate: Callable[[], dict], log) -> dict:
    """``steps`` AdamW steps (one-cycle, 10 % warm-up), validated every ``eval_every`` steps and at
    the last; the best val checkpoint is restored. Entries: step, mean loss of the last ``eval_every``
    steps, val rsum (logged as ``label``), seconds since the start."""
    def evaluate(r: Round) -> dict | None:
        if r.index % eval_every and r.index != steps:
            return None
        m = validate()
        return {"step": r.index, "loss": float(np.mean(r.losses[-eval_every:])), "val_rsum": m["rsum"], "val": m,
                "seconds": round(time.time() - r.began, 1)}

    def report(entry: dict) -> None:
        log(f"[{name}] step {entry['step']}  loss {entry['loss']:.4f}  {label} {entry['val_rsum']:.2f}  "
            f"({entry['seconds']:.0f}s)")

    best = fit(module, Optimiser([{"params": trainable(module), "lr": lr}], 1e-4, steps, pct_start=0.1),
               loss, lambda _step: [batch()], evaluate, rounds=steps, log=report)
    return {"history": best.history, "best_step": best.best["step"], "val": best.best["val"]}


def train_cross(cross, train: FineSplit, dual_train: np.ndarray, val: FineSplit, dual_val: np.ndarray,
                recipe: CrossRecipe, log=print) -> dict:
    """Hard-negative training; the best val re-ranking checkpoint (every ``eval_every`` steps) is kept."""
    rng = seeded(recipe.seed)
    negatives = hard_negatives(dual_train, train.caption_image, recipe.pool)
    k = recipe.negatives + 1

    def batch() -> tuple:
        caps = rng.integers(0, train.n_captions, recipe.batch_size)
        own = train.caption_image[caps]
        neg = np.stack([rng.choice(negatives[c], recipe.negatives, replace=False) for c in caps])
        return caps, np.concatenate([own[:, None], neg], 1).ravel()                  # images: [B * k]

    def loss(b: tuple) -> torch.Tensor:
        caps, images = b
        tokens, mask = train.token_batch(caps)
        txt = cross.encode_text(tokens, mask).repeat_interleave(k, 0)
        scores = cross.score_pairs(cross.encode_image(train.region_batch(images)), txt, mask.repeat_interleave(k, 0))
        return F.cross_entropy(scores.view(-1, k), torch.zeros(len(caps), dtype=torch.long))

    return _fit_steps(cross, "cross", f"val rsum (re-rank C={recipe.candidates})", recipe.lr, recipe.steps,
                      recipe.eval_every, batch, loss, lambda: _rerank_val(cross, val, dual_val, recipe.candidates), log)


def decomposition_loss(decomposed, cross, train: FineSplit, rows: np.ndarray, captions: np.ndarray,
                       contrastive_weight: float) -> torch.Tensor:
    """ListNet to the cross-encoder's B x B logits + InfoNCE, on one batch (see module doc)."""
    regions = train.region_batch(rows)
    tokens, mask = train.token_batch(captions)
    b = len(rows)
    with torch.no_grad():
        img_t, txt_t = cross.encode_image(regions), cross.encode_text(tokens, mask)
        target = cross.score_pairs(img_t.repeat_interleave(b, 0), txt_t.repeat(b, 1, 1), mask.repeat(b, 1)).view(b, b)
    sim = decomposed.logit_scale.exp() * decomposed.score(decomposed.encode_image(regions),
                                                          decomposed.encode_text(tokens, mask))
    return ListNetLoss()(sim, target) + contrastive_weight * ContrastiveLoss()(sim)


def train_decomposed(decomposed, cross, train: FineSplit, val: FineSplit, recipe: CrossRecipe, log=print) -> dict:
    """Distil the cross-encoder into its decomposition; best exhaustive val rsum kept."""
    rng = seeded(recipe.seed, stream=1)
    cross.eval()

    def batch() -> tuple:
        rows = rng.choice(len(train), recipe.decomp_batch, replace=False)
        return rows, rows * train.captions_per_image + rng.integers(0, train.captions_per_image, len(rows))

    def validate() -> dict:
        enc = encode_split(decomposed, val)
        return retrieval_metrics(full_scores(decomposed, enc, chunk=5000), val.caption_image)

    return _fit_steps(decomposed, "decomposed", "val rsum", recipe.decomp_lr, recipe.decomp_steps, recipe.eval_every,
                      batch, lambda b: decomposition_loss(decomposed, cross, train, *b, recipe.contrastive_weight),
                      validate, log)


# -- the cross-encoder on MiniLM's pretrained layers (matcher.finegrained.vl_cross) ---------------

@dataclass
class VLCrossRecipe:
    grid: int = 4                 # region map pooled to grid x grid (+ one global token)
    residual: bool = True         # score = teacher logit scale * dual cosine + read-out (read-out starts at 0)
    steps: int = 3000             # each step: B caption-anchored and B image-anchored groups
    batch_size: int = 16
    negatives: int = 3
    pool: int = 10                # hard negatives are drawn from the dual top-``pool``
    lr: float = 3e-5              # the pretrained MiniLM layers
    new_lr: float = 1e-3          # what is new: region projection and norm, positions, read-out
    candidates: int = 10          # val shortlist re-ranked for selection
    val_captions: int = 1000      # selection re-ranks t2i for the first caption of this many val images
    eval_every: int = 250
    seed: int = 0


def hard_negative_captions(dual: np.ndarray, caption_image: np.ndarray, pool: int) -> np.ndarray:
    """[images, pool] each image's top-``pool`` dual captions that are not its own."""
    sim = dual.T.copy()
    sim[caption_image, np.arange(len(caption_image))] = -np.inf
    return np.argpartition(-sim, pool - 1, axis=1)[:, :pool]


def vl_cross_groups(train, recipe: VLCrossRecipe, rng: np.random.Generator, negatives_t2i: np.ndarray,
                    negatives_i2t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(captions, images) of one step's pairs: B captions each with its image first, then K hard
    negative images; B images each with one of its captions first, then K hard negative captions."""
    b, k, per = recipe.batch_size, recipe.negatives, train.fine.captions_per_image
    caps = rng.integers(0, train.fine.n_captions, b)
    neg_i = np.stack([rng.choice(negatives_t2i[c], k, replace=False) for c in caps])
    t2i_imgs = np.concatenate([train.caption_image[caps][:, None], neg_i], 1)
    imgs = rng.integers(0, len(train), b)
    neg_c = np.stack([rng.choice(negatives_i2t[i], k, replace=False) for i in imgs])
    i2t_caps = np.concatenate([(imgs * per + rng.integers(0, per, b))[:, None], neg_c], 1)
    captions = np.concatenate([np.repeat(caps, k + 1), i2t_caps.ravel()])
    images = np.concatenate([t2i_imgs.ravel(), np.repeat(imgs, k + 1)])
    return captions, images


def train_vl_cross(model, train, val, recipe: VLCrossRecipe, resume: Path | None = None, log=print) -> dict:
    """Hard negatives in both directions, cross-entropy of the positive among K + 1; the best val
    re-ranking rsum (C = ``candidates``, every ``eval_every`` steps) is kept. ``resume``: a state file
    written after every validation, from which a killed run continues."""
    from matcher.finegrained.vl_cross import quick_rerank_metrics
    from matcher.train.loop import Resume

    rng = seeded(recipe.seed)
    dual_train = train.dual
    neg_t2i = hard_negatives(dual_train, train.caption_image, recipe.pool)
    neg_i2t = hard_negative_captions(dual_train, train.caption_image, recipe.pool)
    groups = 2 * recipe.batch_size

    def loss(b: tuple) -> torch.Tensor:
        scores = model.score_pairs(*train.pairs(*b)).view(groups, recipe.negatives + 1)
        return F.cross_entropy(scores, torch.zeros(groups, dtype=torch.long))

    rows = np.arange(0, val.fine.n_captions, val.fine.captions_per_image)[: recipe.val_captions]

    def validate() -> dict:
        return quick_rerank_metrics(model, val, recipe.candidates, rows)

    def evaluate(r: Round) -> dict | None:
        if r.index % recipe.eval_every and r.index != recipe.steps:
            return None
        m = validate()
        return {"step": r.index, "loss": float(np.mean(r.losses[-recipe.eval_every:])), "val_rsum": m["rsum"],
                "val": m, "seconds": round(time.time() - r.began, 1)}

    def report(entry: dict) -> None:
        log(f"[vl-cross] step {entry['step']}  loss {entry['loss']:.4f}  val rsum (re-rank C={recipe.candidates}) "
            f"{entry['val_rsum']:.2f}  ({entry['seconds']:.0f}s)")

    for p in model.parameters():  # the teacher's layers were copied frozen
        p.requires_grad_(True)
    pretrained, new = list(model.layers.parameters()), [p for n, p in model.named_parameters() if not n.startswith("layers.")]
    optimiser = Optimiser([{"params": pretrained, "lr": recipe.lr}, {"params": new, "lr": recipe.new_lr}], 1e-4,
                          recipe.steps, pct_start=0.1)
    start = BestOnVal(model)
    if resume is None or not Path(resume).exists():  # step 0: the teacher's own ranking (read-out at zero)
        m = validate()
        start.record({"step": 0, "loss": float("nan"), "val_rsum": m["rsum"], "val": m, "seconds": 0.0})
        report(start.best)
    best = fit(model, optimiser, loss,
               lambda _step: [vl_cross_groups(train, recipe, rng, neg_t2i, neg_i2t)], evaluate, rounds=recipe.steps,
               best=start, log=report, resume=None if resume is None else Resume(resume, rng))
    return {"history": best.history, "best_step": best.best["step"], "val": best.best["val"]}


@dataclass
class VLDecompRecipe:
    steps: int = 600              # groups as the cross-encoder's (both directions, hard negatives)
    batch_size: int = 8
    negatives: int = 3
    pool: int = 10
    lr: float = 5e-5              # the (copied) MiniLM layers
    new_lr: float = 1e-3          # the two output maps
    listnet_weight: float = 1.0   # match the cross-encoder's distribution over each group
    ce_weight: float = 0.5        # and keep the positive first
    eval_every: int = 200
    seed: int = 0


def train_vl_decomposed(decomposed, cross, train, val, recipe: VLDecompRecipe, resume: Path | None = None,
                        log=print) -> dict:
    """Distil the cross-encoder's scores on hard-negative groups into its decomposition; the best
    exhaustive val rsum (every caption against every image, as a dual encoder) is kept."""
    from matcher.train.loop import Resume

    rng = seeded(recipe.seed, stream=1)
    cross.eval()
    neg_t2i = hard_negatives(train.dual, train.caption_image, recipe.pool)
    neg_i2t = hard_negative_captions(train.dual, train.caption_image, recipe.pool)
    shape = (2 * recipe.batch_size, recipe.negatives + 1)

    def loss(b: tuple) -> tuple[torch.Tensor, dict]:
        inputs = train.pairs(*b)
        with torch.no_grad():
            target = cross.score_pairs(*inputs).view(shape)
        scores = decomposed.score_pairs(*inputs).view(shape)
        listnet = -(F.softmax(target, 1) * F.log_softmax(scores, 1)).sum(1).mean()  # ListNet over each group
        ce = F.cross_entropy(scores, torch.zeros(shape[0], dtype=torch.long))
        return recipe.listnet_weight * listnet + recipe.ce_weight * ce, {"listnet": listnet.item(), "ce": ce.item()}

    def validate() -> dict:
        return retrieval_metrics(decomposed.full_scores(val), val.caption_image)

    def evaluate(r: Round) -> dict | None:
        if r.index % recipe.eval_every and r.index != recipe.steps:
            return None
        m = validate()
        decomposed.train()
        return {"step": r.index, "loss": float(np.mean(r.losses[-recipe.eval_every:])), "val_rsum": m["rsum"],
                "val": m, "seconds": round(time.time() - r.began, 1)}

    def report(entry: dict) -> None:
        log(f"[vl-decomposed] step {entry['step']}  loss {entry['loss']:.4f}  val rsum {entry['val_rsum']:.2f}  "
            f"({entry['seconds']:.0f}s)")

    for p in decomposed.parameters():
        p.requires_grad_(True)
    layers = list(decomposed.cross.parameters())
    ids = {id(p) for p in layers}
    new = [p for p in decomposed.parameters() if id(p) not in ids]
    start = BestOnVal(decomposed)
    if resume is None or not Path(resume).exists():
        m = validate()
        start.record({"step": 0, "loss": float("nan"), "val_rsum": m["rsum"], "val": m, "seconds": 0.0})
        report(start.best)
    best = fit(decomposed, Optimiser([{"params": layers, "lr": recipe.lr}, {"params": new, "lr": recipe.new_lr}], 1e-4,
                                     recipe.steps, pct_start=0.1),
               loss, lambda _step: [vl_cross_groups(train, recipe, rng, neg_t2i, neg_i2t)], evaluate,
               rounds=recipe.steps, best=start, log=report, resume=None if resume is None else Resume(resume, rng))
    return {"history": best.history, "best_step": best.best["step"], "val": best.best["val"]}
