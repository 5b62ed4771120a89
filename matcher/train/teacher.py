"""Train the offline teacher: EfficientNet-Lite + MiniLM towers, fine-tuned tops and linear heads.

Two phases ("linear probe, then fine-tune"), both on a CPU because the frozen trunks' outputs
are cached once (``matcher.train.features``):
1. heads only, on pooled features of the frozen towers: thousands of cheap steps;
2. the top blocks/layers and the heads together, starting from phase 1, at a low learning rate.
Starting phase 2 from trained heads keeps random heads from wrecking the pretrained tops.
The epoch with the best validation rsum is kept; test numbers come from ``python -m matcher eval``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from matcher.eval.metrics import retrieval_metrics
from matcher.models.dual_encoder import DualEncoderModule, save_checkpoint
from matcher.train.features import Flickr8k, cached_image_features, cached_text_features
from matcher.train.loop import Optimiser, Round, fit, seeded, train_frozen_batchnorm
from matcher.train.losses import ContrastiveLoss
from matcher.train.pairs import CachedSplit
from matcher.train.selection import BestOnVal

CONTRASTIVE = ContrastiveLoss()


@dataclass
class TeacherRecipe:
    """Everything that determines the trained teacher (stored in the checkpoint's metadata)."""

    image_variant: str = "efficientnet-lite2"
    image_size: int = 224
    cached_blocks: int = 2       # trunk/top split used for the feature cache
    finetune_blocks: int = 2     # of those, how many are trained (0 = frozen tower)
    cached_layers: int = 2
    finetune_layers: int = 2
    embed_dim: int = 256
    head_dropout: float = 0.5
    probe_epochs: int = 30       # phase 1: heads on frozen pooled features (5 captions per image)
    probe_lr: float = 1e-3
    epochs: int = 10             # phase 2: tops + heads
    batch_size: int = 256
    lr: float = 1e-4             # heads in phase 2
    tower_lr: float = 1e-4       # fine-tuned tower tops
    weight_decay: float = 0.05
    seed: int = 0

    def model_config(self) -> dict:
        return {
            "image_tower": {"type": "efficientnet-lite", "variant": self.image_variant,
                            "image_size": self.image_size, "trainable_blocks": self.finetune_blocks},
            "text_tower": {"type": "minilm", "trainable_layers": self.finetune_layers},
            "embed_dim": self.embed_dim,
            "head_dropout": self.head_dropout,
        }


def _training_module(recipe: TeacherRecipe) -> DualEncoderModule:
    """The module with the *cache* split, and only the fine-tuned part trainable."""
    config = recipe.model_config()
    config["image_tower"]["trainable_blocks"] = recipe.cached_blocks
    config["text_tower"]["trainable_layers"] = recipe.cached_layers
    module = DualEncoderModule(config)
    image_top, text_top = module.image_tower.top_modules(), module.text_tower.top_modules()
    for m in image_top[: max(0, len(image_top) - 1 - recipe.finetune_blocks)] if recipe.finetune_blocks else image_top:
        m.requires_grad_(False)
    for m in text_top[: len(text_top) - recipe.finetune_layers]:
        m.requires_grad_(False)
    return module


def embed_split(module: DualEncoderModule, split: CachedSplit, project: bool = True,
                batch_size: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image view [N, V, D] and every caption [5N, D] of a cached split, tops run from the cache.

    ``project``: unit-norm head outputs (the shared space); otherwise the towers' pooled features
    (what the linear probe trains on).
    """
    module.eval()

    def out(image_or_text: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
        return torch.nn.functional.normalize(head(image_or_text), dim=-1) if project else image_or_text

    views, texts = [], []
    n_captions = len(split.offsets) - 1
    with torch.inference_mode():
        for v in range(split.images.shape[1]):
            chunks = []
            for start in tqdm(range(0, len(split), batch_size), desc=f"images, view {v}", leave=False):
                rows = np.arange(start, min(start + batch_size, len(split)))
                chunks.append(out(module.image_tower.forward_top(split.image_batch(rows, np.full(len(rows), v))),
                                  module.image_head))
            views.append(torch.cat(chunks))
        for start in tqdm(range(0, n_captions, batch_size), desc="captions", leave=False):
            states, mask = split.caption_batch(np.arange(start, min(start + batch_size, n_captions)))
            texts.append(out(module.text_tower.forward_top(states, mask), module.text_head))
    return torch.stack(views, 1), torch.cat(texts)


def cached_metrics(module: DualEncoderModule, split: CachedSplit) -> dict:
    """Recall on a cached split (first image view), from the same computation as training."""
    images, texts = embed_split(module, split)
    caption_image = np.repeat(np.arange(len(split)), split.captions_per_image)
    return retrieval_metrics((texts @ images[:, 0].T).numpy(), caption_image)


def _logits(module: DualEncoderModule, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """[B, B] logits of a batch: unit-norm head outputs of tower features, times the learned scale."""
    img = torch.nn.functional.normalize(module.image_head(img), dim=-1)
    txt = torch.nn.functional.normalize(module.text_head(txt), dim=-1)
    return module.logit_scale.exp().clamp(max=100) * img @ txt.T


def _probe_metrics(module: DualEncoderModule, images: torch.Tensor, texts: torch.Tensor) -> dict:
    module.eval()
    with torch.inference_mode():
        img = torch.nn.functional.normalize(module.image_head(images[:, 0]), dim=-1)
        txt = torch.nn.functional.normalize(module.text_head(texts), dim=-1)
    caption_image = np.repeat(np.arange(len(img)), len(txt) // len(img))
    return retrieval_metrics((txt @ img.T).numpy(), caption_image)


def _log(entry: dict) -> None:
    print(f"{entry['phase']} epoch {entry['epoch']:2d}  loss {entry['loss']:.3f}  val rsum {entry['val_rsum']:.1f}", flush=True)


def probe_heads(module: DualEncoderModule, train: CachedSplit, val: CachedSplit, recipe: TeacherRecipe,
                rng: np.random.Generator, best: BestOnVal) -> None:
    """Phase 1: heads (and temperature) on pooled frozen features; each epoch uses every caption."""
    train_img, train_txt = embed_split(module, train, project=False)
    val_img, val_txt = embed_split(module, val, project=False)
    params = [*module.image_head.parameters(), *module.text_head.parameters(), module.logit_scale]
    per_epoch = train.captions_per_image * (len(train) // recipe.batch_size)

    def batches(_epoch: int):
        return (b for _ in range(train.captions_per_image) for b in train.sample_epoch(recipe.batch_size, rng))

    def step(batch) -> torch.Tensor:
        rows, views, captions = batch
        return CONTRASTIVE(_logits(module, train_img[rows, views], train_txt[captions]))

    def evaluate(r: Round) -> dict | None:
        if r.index % 3 and r.index != recipe.probe_epochs:
            return None
        metrics = _probe_metrics(module, val_img, val_txt)
        return {"phase": "probe", "epoch": r.index, "loss": r.loss, "val_rsum": metrics["rsum"], "val": metrics}

    fit(module, Optimiser([{"params": params, "lr": recipe.probe_lr}], recipe.weight_decay,
                          recipe.probe_epochs * per_epoch),
        step, batches, evaluate, rounds=recipe.probe_epochs, best=best, log=_log)


def finetune(module: DualEncoderModule, train: CachedSplit, val: CachedSplit, recipe: TeacherRecipe,
             rng: np.random.Generator, best: BestOnVal) -> None:
    """Phase 2: fine-tuned tops and heads together from the phase-1 heads."""
    heads = [*module.image_head.parameters(), *module.text_head.parameters(), module.logit_scale]
    head_ids = {id(p) for p in heads}
    tower = [p for p in module.parameters() if p.requires_grad and id(p) not in head_ids]
    if not tower or recipe.epochs == 0:
        return
    per_epoch = len(train) // recipe.batch_size

    def step(batch) -> torch.Tensor:
        rows, views, captions = batch
        states, mask = train.caption_batch(captions)
        return CONTRASTIVE(_logits(module, module.image_tower.forward_top(train.image_batch(rows, views)),
                                   module.text_tower.forward_top(states, mask)))

    def evaluate(r: Round) -> dict:
        metrics = cached_metrics(module, val)
        return {"phase": "finetune", "epoch": r.index, "loss": r.loss, "val_rsum": metrics["rsum"], "val": metrics}

    optimiser = Optimiser([{"params": heads, "lr": recipe.lr}, {"params": tower, "lr": recipe.tower_lr}],
                          recipe.weight_decay, recipe.epochs * per_epoch)
    fit(module, optimiser, step, lambda _epoch: train.sample_epoch(recipe.batch_size, rng), evaluate,
        rounds=recipe.epochs, steps_per_round=per_epoch, best=best, train_mode=train_frozen_batchnorm,
        progress="fine-tune epoch", log=_log)


def train_teacher(data_root: str | Path, out: str | Path, recipe: TeacherRecipe) -> dict:
    """Train both phases, keep the best validation state, save the checkpoint; returns the history."""
    rng = seeded(recipe.seed)
    data = Flickr8k.load(data_root)
    image_feats = cached_image_features(data, recipe.image_variant, recipe.image_size, recipe.cached_blocks)
    text_feats = cached_text_features(data, recipe.cached_layers)
    train = CachedSplit.from_features(image_feats, text_feats, "train")
    val = CachedSplit.from_features(image_feats, text_feats, "val")

    module = _training_module(recipe)
    best = BestOnVal(module)
    probe_heads(module, train, val, recipe, rng, best)  # ends on the best probe state
    finetune(module, train, val, recipe, rng, best)
    chosen = best.restore()
    final = DualEncoderModule(recipe.model_config())
    final.load_state_dict(module.state_dict())
    summary = {"phase": chosen["phase"], "epoch": chosen["epoch"], "val": chosen["val"]}
    save_checkpoint(final, recipe.model_config(), out,
                    {"recipe": asdict(recipe), "best": summary, "data": "Flickr8k train, selected on val"})
    return {"recipe": asdict(recipe), "history": best.history, "best": summary, "checkpoint": str(out)}
