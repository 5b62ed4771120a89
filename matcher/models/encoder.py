"""The one interface every matcher's model offers: images and texts in, unit-norm vectors out.

Tower models (offline, built here) and open_clip models (hub tags, local checkpoints, custom
configs) both implement it, so the gallery cache, indexes, evaluation and app never need to know
which kind they hold.
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm


class Encoder(ABC):
    """Base class: subclasses supply the torch module, preprocessing and the two raw forwards."""

    name: str
    module: nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]

    @abstractmethod
    def _image_forward(self, pixels: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _text_forward(self, texts: list[str]) -> torch.Tensor: ...

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 16, progress: bool = False) -> np.ndarray:
        """L2-normalised image embeddings, float32 [N, D]."""
        self.module.eval()
        out = []
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc=f"{self.name}: images", unit="batch", disable=not progress):
            pixels = torch.stack([self.preprocess(im) for im in images[start : start + batch_size]])
            out.append(torch.nn.functional.normalize(self._image_forward(pixels).float(), dim=-1))
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """L2-normalised text embeddings, float32 [N, D]."""
        self.module.eval()
        out = []
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc=f"{self.name}: texts", unit="batch", disable=not progress):
            out.append(torch.nn.functional.normalize(self._text_forward(list(texts[start : start + batch_size])).float(), dim=-1))
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)

    @property
    def dim(self) -> int:
        return int(self.encode_texts(["dimension probe"]).shape[1])

    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def size_mb(self) -> float:
        """Weights as they sit in memory (all parameters and buffers), in MB."""
        tensors = list(self.module.parameters()) + list(self.module.buffers())
        return sum(t.numel() * t.element_size() for t in tensors) / 1e6

    def fingerprint(self) -> str:
        """Hash of name, config, preprocessing version and every weight: cached embeddings are valid
        only for identical models fed identical pixels."""
        if getattr(self, "_fingerprint", None) is None:
            digest = hashlib.sha256(self.name.encode())
            digest.update(getattr(self, "preprocess_version", "").encode())
            digest.update(json.dumps(getattr(self, "config", None), sort_keys=True, default=str).encode())
            for key, tensor in sorted(self.module.state_dict().items()):
                digest.update(key.encode())
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:32]
        return self._fingerprint
