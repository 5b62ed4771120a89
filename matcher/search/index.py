"""Vector indexes behind one ``add`` / ``search`` shape (faiss underneath).

Embeddings are unit-norm, so inner product is cosine similarity.
"""
from __future__ import annotations

import faiss
import numpy as np


class FloatIndex:
    """Exact inner-product search over float32 vectors (``faiss.IndexFlatIP``)."""

    def __init__(self, dim: int):
        self.index = faiss.IndexFlatIP(dim)

    def add(self, vectors: np.ndarray) -> None:
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k], ids [Q, k]), best first; k is clipped to the index size."""
        k = min(k, self.index.ntotal)
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def __len__(self) -> int:
        return self.index.ntotal


class BinaryIndex:
    """Hamming-distance search over packed binary codes (``faiss.IndexBinaryFlat``, or
    ``IndexBinaryHNSW`` when ``hnsw_m`` is given, for galleries where even a popcount scan is too slow).

    Codes are ``bits / 8`` bytes per item, so a million items take 8 MB at 64 bits: the candidate
    stage costs bytes per item, not the kilobyte a float32 vector costs.
    """

    def __init__(self, bits: int, hnsw_m: int | None = None, ef_search: int = 128):
        if bits % 8:
            raise ValueError(f"bits must be a multiple of 8 (got {bits})")
        self.bits = bits
        if hnsw_m:
            self.index = faiss.IndexBinaryHNSW(bits, hnsw_m)
            self.index.hnsw.efSearch = ef_search
        else:
            self.index = faiss.IndexBinaryFlat(bits)

    def add(self, codes: np.ndarray) -> None:
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        if codes.ndim != 2 or codes.shape[1] * 8 != self.bits:
            raise ValueError(f"expected packed codes of shape [N, {self.bits // 8}], got {codes.shape}")
        self.index.add(codes)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Hamming distances [Q, k] int32, ids [Q, k]), nearest first; k is clipped to the index size."""
        k = min(k, self.index.ntotal)
        if isinstance(self.index, faiss.IndexBinaryHNSW):
            self.index.hnsw.efSearch = max(self.index.hnsw.efSearch, k)
        return self.index.search(np.ascontiguousarray(queries, dtype=np.uint8), k)

    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def bytes_per_item(self) -> float:
        return self.bits / 8
