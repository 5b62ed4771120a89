"""HEI hash heads: one small network per modality from a float embedding to k tanh-relaxed bits.

Training sees ``tanh(head(x))`` (differentiable); inference takes ``sign(head(x))`` and packs it.
The inference path is plain numpy so a query costs one tiny matmul, no torch call.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from matcher.atomic import atomic_path
from matcher.hashing.codes import MODALITIES, pack_bits

HEADS_FORMAT = "matcher-hash-heads/1"


class HashHead(nn.Module):
    """Linear (``hidden=0``) or one-hidden-layer MLP from a D-dim embedding to k real outputs."""

    def __init__(self, dim: int, bits: int, hidden: int = 0):
        super().__init__()
        self.dim, self.bits, self.hidden = dim, bits, hidden
        layers: list[nn.Module] = [nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, bits)] if hidden else [nn.Linear(dim, bits)]
        self.net = nn.Sequential(*layers)
        # Fixed input standardisation: subtract this modality's mean (the modality gap would
        # otherwise dominate every bit) and scale to unit variance per dimension on average.
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(()))

    def fit_input(self, x: np.ndarray) -> None:
        mean = x.mean(axis=0)
        self.mean.copy_(torch.from_numpy(mean))
        self.scale.fill_(float(1.0 / np.sqrt(((x - mean) ** 2).sum(axis=1).mean() / x.shape[1])))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) * self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Relaxed codes in (-1, 1)^k."""
        return torch.tanh(self.logits(x))


class HashHeads(nn.Module):
    """The image head and the text head of one code length."""

    def __init__(self, dim: int, bits: int, hidden: int = 0):
        super().__init__()
        self.dim, self.bits, self.hidden = dim, bits, hidden
        self.image = HashHead(dim, bits, hidden)
        self.text = HashHead(dim, bits, hidden)

    def head(self, modality: str) -> HashHead:
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
        return self.image if modality == "image" else self.text

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class HEIHasher:
    """Inference-time view of trained ``HashHeads``: numpy weights, ``encode`` -> packed codes."""

    method = "hei"

    def __init__(self, heads: HashHeads):
        self.bits, self.dim, self.hidden = heads.bits, heads.dim, heads.hidden
        self.num_params = heads.num_params()
        self.inputs = {m: (heads.head(m).mean.numpy().copy(), float(heads.head(m).scale)) for m in MODALITIES}
        self.layers = {
            m: [(l.weight.detach().numpy().T.copy(), l.bias.detach().numpy().copy())
                for l in heads.head(m).net if isinstance(l, nn.Linear)]
            for m in MODALITIES
        }

    def real(self, vectors: np.ndarray, modality: str) -> np.ndarray:
        if modality not in self.layers:
            raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
        mean, scale = self.inputs[modality]
        z = (np.asarray(vectors, np.float32) - mean) * np.float32(scale)
        layers = self.layers[modality]
        for i, (w, b) in enumerate(layers):
            z = z @ w + b
            if i < len(layers) - 1:
                z = np.maximum(z, 0)
        return z

    def encode(self, vectors: np.ndarray, modality: str) -> np.ndarray:
        return pack_bits(self.real(vectors, modality))


PROBE_TEXTS = ["a dog runs through the grass", "two children play on the beach", "a man climbs a rock wall"]


def base_probe(encoder) -> list[list[float]]:
    """The base encoder's embeddings of fixed probe texts, stored with the heads.

    Heads are only meaningful on the embeddings they were trained on. Comparing what the encoder
    *outputs* (rather than a hash of how it is stored) survives changes to the fingerprint scheme
    and still catches any change of weights or preprocessing that moves the embeddings.
    """
    return encoder.encode_texts(PROBE_TEXTS).round(5).tolist()


def check_base(encoder, meta: dict, source: str, atol: float = 1e-3) -> None:
    """Raise ``ValueError`` when ``encoder`` is not the encoder the heads were trained on."""
    probe = meta.get("base_probe")
    if probe is None:
        return
    got = encoder.encode_texts(PROBE_TEXTS)
    if got.shape != np.asarray(probe).shape or not np.allclose(got, np.asarray(probe), atol=atol):
        raise ValueError(f"hash heads {source} were trained on other weights than {encoder.name!r} "
                         "(its embeddings of the probe texts differ); retrain them with `python -m matcher train-hash`")


def save_heads(path: str | Path, heads: dict[int, HashHeads], meta: dict) -> None:
    """One file holds the heads of every code length (a few hundred KB in all)."""
    payload = {
        "format": HEADS_FORMAT, "meta": meta,
        "heads": {int(b): {"dim": h.dim, "hidden": h.hidden, "state": h.state_dict()} for b, h in heads.items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_heads(path: str | Path) -> tuple[dict[int, HEIHasher], dict]:
    """({bits: HEIHasher}, meta) from a ``save_heads`` file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"hash-head checkpoint not found: {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != HEADS_FORMAT:
        raise ValueError(f"{path} is not a hash-head checkpoint (format {payload.get('format')!r})")
    hashers = {}
    for bits, entry in payload["heads"].items():
        heads = HashHeads(entry["dim"], int(bits), entry["hidden"])
        heads.load_state_dict(entry["state"])
        hashers[int(bits)] = HEIHasher(heads)
    return hashers, payload["meta"]
