"""Fit HEI hash heads on cached train-split embeddings; select the epoch on val.

Only the heads train: the float encoder is frozen and its gallery embeddings come from the
``embed_gallery`` cache, so one epoch over Flickr8k train (6000 images x 5 captions) is a few
hundred small matmuls on one CPU thread.

Batches hold B distinct images, each paired with one of its captions drawn at random, so the
diagonal of the [B, B] similarity is the matched pairs. Matching scores for the non-matched bound
come from the ``target`` embeddings (teacher, or the student itself).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from matcher.data.embed import GalleryEmbeddings
from matcher.hashing.evaluate import candidate_recall, shortlist
from matcher.hashing.heads import HashHeads, HEIHasher
from matcher.train.loop import Optimiser, Round, fit, seeded
from matcher.train.losses import HEILoss
from matcher.train.pairs import caption_lists
from matcher.train.selection import BestOnVal


@dataclass
class HashRecipe:
    """Everything that determines the trained hash heads (stored in their checkpoint's metadata).

    ``base``, ``target`` and ``bits`` are read by ``train-hash``: the encoder whose embeddings are
    hashed, the encoder whose scores bound the non-matched pairs, and the code lengths (one head
    pair each); ``train_heads`` gets the embeddings and one code length from it.
    """

    epochs: int = 40
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-5
    hidden: int = 0                # 0 = linear heads
    neg_weight: float = 300.0         # B(B-1) non-matched vs B matched terms; picked on a val pilot
    quant_weight: float = 0.1
    calibrate: bool = False        # map target scores by a fixed affine a*S+b (see ``target_calibration``)
    select_candidates: int = 100   # C at which val candidate recall picks the epoch
    seed: int = 0
    base: str = "offline-student"
    target: str = "offline-teacher"
    bits: str = "32,64,128,256"    # comma-separated code lengths

    def code_lengths(self) -> list[int]:
        try:
            return [int(b) for b in self.bits.split(",") if b.strip()]
        except ValueError:
            raise ValueError(f"bits must be comma-separated code lengths such as 32,64, not {self.bits!r}") from None


def target_calibration(target: GalleryEmbeddings, samples: int = 20000, seed: int = 0) -> tuple[float, float]:
    """(a, b) such that a*S+b maps the mean matched score to 1 and the mean non-matched score to 0.

    Hamming similarity lives on [-1, 1] with matched pairs pushed to 1, while a dual encoder's
    cosine scores sit in a narrow band (e.g. matched ~0.4, non-matched ~0.1); the calibrated bound
    keeps the HEI constraint "non-matched no more similar than their score" on the codes' scale.
    """
    rng = np.random.default_rng(seed)
    cap = rng.integers(0, len(target.caption_texts), samples)
    img = rng.integers(0, len(target.names), samples)
    pos = np.einsum("nd,nd->n", target.captions[cap], target.images[target.caption_image[cap]]).mean()
    keep = target.caption_image[cap] != img
    neg = np.einsum("nd,nd->n", target.captions[cap[keep]], target.images[img[keep]]).mean()
    a = 1.0 / max(pos - neg, 1e-6)
    return float(a), float(-a * neg)


def val_candidate_recall(hasher: HEIHasher, val: GalleryEmbeddings, candidates: int) -> float:
    """Mean of text->image and image->text candidate recall on the val split."""
    sim = val.captions @ val.images.T
    t2i = candidate_recall(shortlist(hasher, val.images, "image", val.captions, "text", candidates), sim)
    i2t = candidate_recall(shortlist(hasher, val.captions, "text", val.images, "image", candidates), sim.T)
    return 0.5 * (t2i + i2t)


def train_heads(train: GalleryEmbeddings, target: GalleryEmbeddings, val: GalleryEmbeddings, bits: int,
                recipe: HashRecipe = HashRecipe(), progress: bool = True) -> tuple[HashHeads, dict]:
    """Train one code length. Returns the best-on-val heads and a history record."""
    if target.names != train.names or len(target.caption_texts) != len(train.caption_texts):
        raise ValueError("target embeddings must cover the same train images and captions as the base embeddings")
    rng = seeded(recipe.seed)
    heads = HashHeads(train.images.shape[1], bits, recipe.hidden)
    heads.image.fit_input(train.images)
    heads.text.fit_input(train.captions)
    steps_per_epoch = max(1, len(train.names) // recipe.batch_size)
    loss_fn = HEILoss(recipe.neg_weight, recipe.quant_weight)
    captions_of = caption_lists(train.caption_image, len(train.names))
    usable = np.array([i for i, c in enumerate(captions_of) if len(c)])
    x_img, x_txt = torch.from_numpy(train.images), torch.from_numpy(train.captions)
    t_img, t_txt = torch.from_numpy(target.images), torch.from_numpy(target.captions)
    scale, shift = target_calibration(target) if recipe.calibrate else (1.0, 0.0)

    def batches(_epoch: int):
        perm = rng.permutation(usable)
        for step in range(steps_per_epoch):
            img = perm[step * recipe.batch_size:(step + 1) * recipe.batch_size]
            yield img, np.array([rng.choice(captions_of[i]) for i in img])

    def step(batch) -> torch.Tensor:
        img, cap = batch
        h, g = heads.image(x_img[img]), heads.text(x_txt[cap])
        return loss_fn(h @ g.T / bits, scale * (t_img[img] @ t_txt[cap].T) + shift, codes=(h, g))

    def evaluate(r: Round) -> dict:
        heads.eval()
        return {"epoch": r.index - 1, "loss": r.loss,  # epochs count from 0 here (as in the shipped heads' metadata)
                "val_candidate_recall": val_candidate_recall(HEIHasher(heads), val, recipe.select_candidates)}

    optimiser = Optimiser([{"params": list(heads.parameters()), "lr": recipe.lr}], recipe.weight_decay,
                          recipe.epochs * steps_per_epoch, schedule="cosine")
    best = fit(heads, optimiser, step, batches, evaluate, rounds=recipe.epochs, steps_per_round=steps_per_epoch,
               best=BestOnVal(heads, key="val_candidate_recall"),
               progress=f"HEI {bits} bits, epoch" if progress else None)
    return heads, {"bits": bits, "recipe": asdict(recipe), "best_epoch": best.best["epoch"],
                   "val_candidate_recall": best.best["val_candidate_recall"], "target_scale": scale,
                   "target_shift": shift, "history": best.history}
