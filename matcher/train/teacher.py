"""Train the offline teacher: EfficientNet-Lite + MiniLM towers, fine-tuned tops and linear heads.

Runs on a CPU because the frozen trunks' outputs are cached once (``matcher.train.features``);
each step runs only the fine-tuned top blocks/layers and the heads. The epoch with the best
validation rsum is kept; test numbers come from ``python -m matcher eval`` on the saved file.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from matcher.dual_encoder import DualEncoderModule, save_checkpoint
from matcher.losses import ContrastiveLoss
from matcher.metrics import retrieval_metrics
from matcher.train.features import Flickr8k, cached_image_features, cached_text_features
from matcher.train.pairs import CachedSplit

log = logging.getLogger(__name__)


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
    epochs: int = 12
    batch_size: int = 256
    lr: float = 3e-4             # heads
    tower_lr: float = 5e-5       # fine-tuned tower tops
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


def _set_train_mode(module: DualEncoderModule) -> None:
    """Dropout on, but BatchNorm keeps its ImageNet statistics (small data, stable fine-tuning)."""
    module.train()
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()


def embed_cached(module: DualEncoderModule, split: CachedSplit, batch_size: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm (image, caption) embeddings of a cached split, first view only."""
    module.eval()
    images, texts = [], []
    with torch.inference_mode():
        for start in range(0, len(split), batch_size):
            rows = np.arange(start, min(start + batch_size, len(split)))
            images.append(module.image_head(module.image_tower.forward_top(split.image_batch(rows))))
        n_captions = len(split.offsets) - 1
        for start in range(0, n_captions, batch_size):
            states, mask = split.caption_batch(np.arange(start, min(start + batch_size, n_captions)))
            texts.append(module.text_head(module.text_tower.forward_top(states, mask)))
    norm = torch.nn.functional.normalize
    return norm(torch.cat(images), dim=-1).numpy(), norm(torch.cat(texts), dim=-1).numpy()


def cached_metrics(module: DualEncoderModule, split: CachedSplit) -> dict:
    images, texts = embed_cached(module, split)
    return retrieval_metrics(texts @ images.T, np.repeat(np.arange(len(split)), split.captions_per_image))


def train_teacher(data_root: str | Path, out: str | Path, recipe: TeacherRecipe) -> dict:
    """Train, keep the best epoch on val, save the checkpoint; returns the training history."""
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    data = Flickr8k.load(data_root)
    image_feats = cached_image_features(data, recipe.image_variant, recipe.image_size, recipe.cached_blocks)
    text_feats = cached_text_features(data, recipe.cached_layers)
    train = CachedSplit.from_features(image_feats, text_feats, "train")
    val = CachedSplit.from_features(image_feats, text_feats, "val")

    module = _training_module(recipe)
    heads = [*module.image_head.parameters(), *module.text_head.parameters(), module.logit_scale]
    head_ids = {id(p) for p in heads}
    tower = [p for p in module.parameters() if p.requires_grad and id(p) not in head_ids]
    optimizer = torch.optim.AdamW(
        [{"params": heads, "lr": recipe.lr}, {"params": tower, "lr": recipe.tower_lr}], weight_decay=recipe.weight_decay
    )
    steps = recipe.epochs * (len(train) // recipe.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[recipe.lr, recipe.tower_lr], total_steps=steps, pct_start=0.1
    )
    loss_fn = ContrastiveLoss()
    history, best, best_state = [], -1.0, None
    for epoch in range(1, recipe.epochs + 1):
        _set_train_mode(module)
        started, losses = time.time(), []
        for rows, views, captions in tqdm(train.sample_epoch(recipe.batch_size, rng), desc=f"epoch {epoch}",
                                          total=len(train) // recipe.batch_size, leave=False):
            img = module.image_head(module.image_tower.forward_top(train.image_batch(rows, views)))
            states, mask = train.caption_batch(captions)
            txt = module.text_head(module.text_tower.forward_top(states, mask))
            img, txt = torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)
            loss = loss_fn(module.logit_scale.exp().clamp(max=100) * img @ txt.T)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        metrics = cached_metrics(module, val)
        entry = {"epoch": epoch, "loss": float(np.mean(losses)), "val_rsum": metrics["rsum"],
                 "val": metrics, "temperature": float(1 / module.logit_scale.exp()), "seconds": time.time() - started}
        history.append(entry)
        log.info("epoch %d loss %.3f val rsum %.1f (%.0fs)", epoch, entry["loss"], metrics["rsum"], entry["seconds"])
        print(f"epoch {epoch:2d}  loss {entry['loss']:.3f}  val rsum {metrics['rsum']:.1f}  ({entry['seconds']:.0f}s)", flush=True)
        if metrics["rsum"] > best:
            best, best_state = metrics["rsum"], copy.deepcopy(module.state_dict())
    module.load_state_dict(best_state)
    final = DualEncoderModule(recipe.model_config())
    final.load_state_dict(module.state_dict())
    best_epoch = max(history, key=lambda h: h["val_rsum"])
    save_checkpoint(final, recipe.model_config(), out, {"recipe": asdict(recipe), "best_epoch": best_epoch["epoch"],
                                                        "val": best_epoch["val"], "data": "Flickr8k train, selected on val"})
    return {"recipe": asdict(recipe), "history": history, "best_epoch": best_epoch["epoch"], "checkpoint": str(out)}
