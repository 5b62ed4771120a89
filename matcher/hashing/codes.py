"""Binary codes: packing, Hamming similarity, and the two unlearned baselines (LSH, ITQ).

A code of ``k`` bits is stored as ``k / 8`` bytes (``np.packbits`` order, most significant bit
first), which is the layout faiss binary indexes read. Only the XOR popcount matters for Hamming
distance, so any fixed bit order would do; packbits' is used everywhere so codes are portable.

Both baselines centre the embeddings per modality before projecting: image and text embeddings of
a dual encoder sit in different cones (the "modality gap"), and without per-modality centring a
sign() code mostly records which modality a vector came from instead of what it shows.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

MODALITIES = ("image", "text")


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """[N, k] array (bool, {0,1}, or real values thresholded at > 0) -> [N, k/8] uint8."""
    bits = np.asarray(bits)
    if bits.ndim != 2 or bits.shape[1] % 8:
        raise ValueError(f"need a [N, k] array with k a multiple of 8, got shape {bits.shape}")
    return np.packbits(bits > 0, axis=1)


def unpack_bits(codes: np.ndarray, bits: int | None = None) -> np.ndarray:
    """[N, k/8] uint8 -> [N, k] uint8 of 0/1 (inverse of ``pack_bits`` on binary input)."""
    out = np.unpackbits(np.asarray(codes, dtype=np.uint8), axis=1)
    return out if bits is None else out[:, :bits]


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint16)


def hamming_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """All-pairs Hamming distance [len(a), len(b)] of packed codes (numpy reference, small inputs)."""
    xor = np.bitwise_xor(a[:, None, :], b[None, :, :])
    return _POPCOUNT[xor].sum(axis=-1).astype(np.int32)


def hamming_similarity(distance: np.ndarray, bits: int) -> np.ndarray:
    """1 - 2 d / k: the inner product of the +-1 codes divided by k, in [-1, 1]."""
    return 1.0 - 2.0 * np.asarray(distance, dtype=np.float32) / bits


class Hasher(Protocol):
    """Anything that turns float embeddings of one modality into packed k-bit codes."""

    bits: int
    method: str
    num_params: int   # what the code stage adds to the matcher (weights, means)

    def encode(self, vectors: np.ndarray, modality: str) -> np.ndarray: ...


class ProjectionHasher:
    """sign((x - mean[modality]) @ W): the form LSH, ITQ and (linear) HEI heads share at inference."""

    method = "projection"

    def __init__(self, means: dict[str, np.ndarray], projection: np.ndarray, bias: dict[str, np.ndarray] | None = None):
        self.means = {m: np.asarray(v, np.float32) for m, v in means.items()}
        self.projection = np.asarray(projection, np.float32)
        self.bias = {m: np.asarray(v, np.float32) for m, v in (bias or {}).items()}
        self.bits = int(self.projection.shape[1])
        self.num_params = int(self.projection.size + sum(v.size for v in self.means.values())
                              + sum(v.size for v in self.bias.values()))

    def real(self, vectors: np.ndarray, modality: str) -> np.ndarray:
        """The real-valued projection before sign() (useful for diagnostics)."""
        if modality not in self.means:
            raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
        z = (np.asarray(vectors, np.float32) - self.means[modality]) @ self.projection
        return z + self.bias[modality] if modality in self.bias else z

    def encode(self, vectors: np.ndarray, modality: str) -> np.ndarray:
        return pack_bits(self.real(vectors, modality))


def modality_means(images: np.ndarray, texts: np.ndarray) -> dict[str, np.ndarray]:
    return {"image": images.mean(axis=0), "text": texts.mean(axis=0)}


class LSHHasher(ProjectionHasher):
    """Sign of a Gaussian random projection (SimHash): bits agree with probability 1 - angle/pi."""

    method = "lsh"

    def __init__(self, images: np.ndarray, texts: np.ndarray, bits: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        super().__init__(modality_means(images, texts), rng.standard_normal((images.shape[1], bits)).astype(np.float32))


class ITQHasher(ProjectionHasher):
    """Iterative Quantisation (Gong & Lazebnik 2011): PCA to k dims, then the rotation R that
    minimises ||sign(VR) - VR||^2, alternating B = sign(VR) and R from the SVD of B^T V.

    Fitted on both modalities together (each centred on its own mean), so one rotation serves
    text queries and image items alike.
    """

    method = "itq"

    def __init__(self, images: np.ndarray, texts: np.ndarray, bits: int, iterations: int = 50, seed: int = 0):
        dim = images.shape[1]
        if bits > dim:
            raise ValueError(f"ITQ needs bits <= embedding dim ({bits} > {dim})")
        means = modality_means(images, texts)
        x = np.concatenate([images - means["image"], texts - means["text"]]).astype(np.float64)
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        pca = vt[:bits].T                                      # [D, k]
        v = x @ pca
        rng = np.random.default_rng(seed)
        rotation, _ = np.linalg.qr(rng.standard_normal((bits, bits)))
        for _ in range(iterations):
            b = np.sign(v @ rotation)
            u, _, wt = np.linalg.svd(b.T @ v)
            rotation = (u @ wt).T
        super().__init__(means, (pca @ rotation).astype(np.float32))


class LayeredHasher:
    """Any hasher above as plain arrays: per modality ``z = (x - mean) * scale``, then linear layers
    with ReLU between them; ``sign`` of the last one is the code.

    This is what an index directory stores next to its codes (``hasher_arrays`` /
    ``hasher_from_arrays``), so a saved index hashes its queries exactly as it hashed its items,
    whatever later happens to the checkpoint the hasher came from.
    """

    def __init__(self, method: str, inputs: dict[str, tuple[np.ndarray, float]],
                 layers: dict[str, list[tuple[np.ndarray, np.ndarray]]]):
        self.method, self.inputs, self.layers = method, inputs, layers
        self.bits = int(next(iter(layers.values()))[-1][0].shape[1])
        self.num_params = int(sum(w.size + b.size for ls in layers.values() for w, b in ls)
                              + sum(m.size for m, _ in inputs.values()))

    @classmethod
    def of(cls, hasher) -> "LayeredHasher":
        """The same function as ``hasher`` (an HEI head, LSH, ITQ or another LayeredHasher)."""
        if isinstance(hasher, LayeredHasher):
            return hasher
        if isinstance(hasher, ProjectionHasher):
            zero = np.zeros(hasher.bits, np.float32)
            return cls(hasher.method, {m: (v, 1.0) for m, v in hasher.means.items()},
                       {m: [(hasher.projection, hasher.bias.get(m, zero))] for m in hasher.means})
        if hasattr(hasher, "inputs") and hasattr(hasher, "layers"):   # HEIHasher (matcher.hashing.heads)
            return cls(hasher.method, dict(hasher.inputs), {m: list(ls) for m, ls in hasher.layers.items()})
        raise TypeError(f"cannot store a hasher of type {type(hasher).__name__}")

    def first(self, bits: int) -> "LayeredHasher":
        """The code made of this code's first ``bits`` bits (a shorter code from a longer head)."""
        if not 0 < bits <= self.bits or bits % 8:
            raise ValueError(f"cannot take {bits} of {self.bits} bits (a multiple of 8 up to {self.bits})")
        return LayeredHasher(self.method, self.inputs,
                             {m: ls[:-1] + [(ls[-1][0][:, :bits], ls[-1][1][:bits])] for m, ls in self.layers.items()})

    def real(self, vectors: np.ndarray, modality: str) -> np.ndarray:
        if modality not in self.layers:
            raise ValueError(f"unknown modality {modality!r}; expected one of {sorted(self.layers)}")
        mean, scale = self.inputs[modality]
        z = (np.asarray(vectors, np.float32) - mean) * np.float32(scale)
        for i, (w, b) in enumerate(self.layers[modality]):
            z = z @ w + b
            if i < len(self.layers[modality]) - 1:
                z = np.maximum(z, 0)
        return z

    def encode(self, vectors: np.ndarray, modality: str) -> np.ndarray:
        return pack_bits(self.real(vectors, modality))


def hasher_arrays(hasher) -> dict[str, np.ndarray]:
    """A hasher as a flat dict of arrays (``np.savez``-able, no pickle)."""
    h = LayeredHasher.of(hasher)
    out = {"method": np.array(h.method)}
    for m, (mean, scale) in h.inputs.items():
        out[f"{m}/mean"], out[f"{m}/scale"] = np.asarray(mean, np.float32), np.array(scale, np.float32)
        for i, (w, b) in enumerate(h.layers[m]):
            out[f"{m}/w{i}"], out[f"{m}/b{i}"] = np.asarray(w, np.float32), np.asarray(b, np.float32)
    return out


def hasher_from_arrays(arrays) -> LayeredHasher:
    modalities = sorted({k.split("/")[0] for k in arrays if "/" in k})
    inputs, layers = {}, {}
    for m in modalities:
        inputs[m] = (np.asarray(arrays[f"{m}/mean"]), float(arrays[f"{m}/scale"]))
        n = sum(1 for k in arrays if k.startswith(f"{m}/w"))
        layers[m] = [(np.asarray(arrays[f"{m}/w{i}"]), np.asarray(arrays[f"{m}/b{i}"])) for i in range(n)]
    return LayeredHasher(str(arrays["method"]), inputs, layers)
