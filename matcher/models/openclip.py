"""open_clip models as ``Encoder``s: hub pretrained tags, local checkpoints, or project configs.

Hub tags are what a Hugging Face Space runs (``ViT-L-14@dfn2b``). Names are checked against
``open_clip.list_pretrained()`` *before* anything is downloaded, so a typo fails fast with the
valid choices instead of a network error.
"""
from __future__ import annotations

from pathlib import Path

import torch

from matcher.models.encoder import Encoder
from matcher.paths import PACKAGE_DIR

OPEN_CLIP_CONFIG_DIR = PACKAGE_DIR / "models" / "configs" / "open_clip"
_registered = False


def _open_clip():
    """Import open_clip and register this project's model configs with it (once)."""
    global _registered
    import open_clip

    if not _registered:
        open_clip.add_model_config(OPEN_CLIP_CONFIG_DIR)
        _registered = True
    return open_clip


def validate_pretrained(model_name: str, tag: str) -> None:
    """Raise ``ValueError`` unless (model_name, tag) is a known open_clip pretrained pair."""
    open_clip = _open_clip()
    pairs = open_clip.list_pretrained()
    if (model_name, tag) in pairs:
        return
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}")
    tags = sorted(t for m, t in pairs if m == model_name)
    raise ValueError(f"open_clip has no pretrained tag {tag!r} for {model_name}; choose one of: {', '.join(tags) or 'none'}")


class OpenClipEncoder(Encoder):
    """An open_clip model. ``pretrained`` is a hub tag, a local checkpoint path, or None (random init)."""

    def __init__(self, model_name: str, pretrained: str | None = None, seed: int = 0):
        open_clip = _open_clip()
        if model_name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {model_name!r}")
        if pretrained is not None and not Path(pretrained).suffix:
            validate_pretrained(model_name, pretrained)
        elif pretrained is not None and not Path(pretrained).exists():
            raise FileNotFoundError(f"open_clip checkpoint not found: {pretrained}")
        torch.manual_seed(seed)  # random-init models (tests, plumbing) must be reproducible
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
        self.name = f"{model_name}@{pretrained}" if pretrained else model_name
        self.module, self.preprocess = model.eval(), preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)

    def _image_forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.module.encode_image(pixels)

    def _text_forward(self, texts: list[str]) -> torch.Tensor:
        return self.module.encode_text(self.tokenizer(texts))


def save_open_clip_checkpoint(encoder: OpenClipEncoder, path: str | Path) -> None:
    """Save weights in the ``state_dict`` layout open_clip's ``pretrained=PATH`` loader reads."""
    from matcher.atomic import atomic_path

    with atomic_path(path) as tmp:
        torch.save({"state_dict": encoder.module.state_dict()}, tmp)
