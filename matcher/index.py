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
