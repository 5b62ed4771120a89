"""Vector indexes behind one ``add`` / ``search`` shape (faiss underneath).

Embeddings are unit-norm, so inner product is cosine similarity.

- ``FloatIndex``: exact inner product (float32, 4 D bytes per item).
- ``BinaryIndex``: packed codes, symmetric Hamming distance (bits / 8 bytes per item).
- ``SignIndex``: the same packed codes, scored *asymmetrically*: the query keeps its real values
  (the hash head's output before ``sign``) and an item scores ``<query, +-1 code>``. Stored as a
  faiss PQ fast-scan index whose 4-bit sub-quantisers have the 16 sign patterns of 4 bits as
  centroids, so a code is exactly its bits (bits / 8 bytes per item) and the scan runs on faiss'
  SIMD lookup tables.
- ``QuantizedIndex``: any faiss float quantiser by factory string (``PQ64x4fs``, ``RaBitQfs`` ...),
  inner product; needs ``train`` on a sample first.

Every ``search`` returns (scores, ids) best first; for ``BinaryIndex`` the "scores" are Hamming
distances (lower is better), for the others inner products (higher is better).

On top of them, the two-stage search every tier and engine shares (numpy and faiss only, so an
index directory opens without loading a model):

- candidate stages, ``add(vectors, modality)`` / ``search(float queries, k, modality)`` with scores
  higher-is-better: ``SignStage`` (a hasher's codes, asymmetric score), ``HammingStage`` (the same
  codes, Hamming) and ``QuantizerStage`` (a faiss quantiser over the float vectors);
- ``rerank``: exact inner products of only the C candidates' rows of a float32 or float16 (memory-
  mapped) re-rank tier; ``TwoStageIndex`` = a stage + its re-rank vectors.
"""
from __future__ import annotations

import re
from pathlib import Path

import faiss
import numpy as np

from matcher.hashing.codes import Hasher, hamming_similarity

ADD_CHUNK = 65_536   # rows converted at a time: adding a million items never holds a second copy of them


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


class PackedCodes:
    """What the two indexes over packed ``bits``-bit codes share: the shape check, size, bytes per item."""

    bits: int
    index: faiss.Index | faiss.IndexBinary

    def _packed(self, codes: np.ndarray) -> np.ndarray:
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        if codes.ndim != 2 or codes.shape[1] * 8 != self.bits:
            raise ValueError(f"expected packed codes of shape [N, {self.bits // 8}], got {codes.shape}")
        return codes

    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def bytes_per_item(self) -> float:
        return self.bits / 8


class BinaryIndex(PackedCodes):
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
        self.index.add(self._packed(codes))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Hamming distances [Q, k] int32, ids [Q, k]), nearest first; k is clipped to the index size."""
        k = min(k, self.index.ntotal)
        if isinstance(self.index, faiss.IndexBinaryHNSW):
            self.index.hnsw.efSearch = max(self.index.hnsw.efSearch, k)
        return self.index.search(np.ascontiguousarray(queries, dtype=np.uint8), k)


def ivf_lists(n: int) -> int:
    """Inverted lists for n items: the power of two nearest sqrt(n), 16..4096; 0 (no lists: a flat
    scan) below 1000 items, where lists save nothing and could not be trained."""
    if n < 1000:
        return 0
    return int(min(4096, max(16, 2 ** round(np.log2(np.sqrt(n))))))


def factory_for(name: str, n: int) -> str:
    """A faiss factory string with ``{n}`` replaced by ``ivf_lists(n)`` (the ``IVF{n},`` step dropped
    when that is 0)."""
    lists = ivf_lists(n)
    return name.replace("{n}", str(lists)) if lists else name.replace("IVF{n},", "")


def sign_patterns(nbits: int = 4) -> np.ndarray:
    """[2^nbits, nbits] +-1 rows: centroid j has bit b (most significant first) of j."""
    j = np.arange(2 ** nbits)[:, None]
    return np.where((j >> (nbits - 1 - np.arange(nbits))) & 1, 1.0, -1.0).astype(np.float32)


class SignIndex(PackedCodes):
    """Packed binary codes searched with real-valued queries: score = ``<q, 2 b - 1>``.

    The asymmetric score keeps what ``sign()`` throws away on the query side (how sure each bit is),
    which orders a shortlist far better than the Hamming distance between two codes, at the same
    ``bits / 8`` bytes per item. faiss ``IndexPQFastScan`` with M = bits / 4 sub-quantisers of
    4 bits whose centroids are the 16 sign patterns: encoding a +-1 vector picks exactly its own
    pattern, and a query's lookup table holds its inner product with each pattern.

    With ``nlist`` the codes are split into that many inverted lists (``IndexIVFPQFastScan`` over
    the same sign-pattern codebooks; coarse centroids trained on the hash head's real outputs, inner
    product) and a query scans only its ``nprobe`` best lists; faiss stores an 8-byte id per item in
    the lists, so an item costs ``bits / 8 + 8`` bytes.
    """

    def __init__(self, bits: int, index: faiss.Index | None = None, nlist: int = 0, nprobe: int = 1):
        if bits % 8:
            raise ValueError(f"bits must be a multiple of 8 (got {bits})")
        self.bits = bits
        if index is None:
            if nlist:
                quantizer = faiss.IndexFlatIP(bits)
                index = faiss.IndexIVFPQFastScan(quantizer, bits, nlist, bits // 4, 4, faiss.METRIC_INNER_PRODUCT)
                quantizer.this.disown()          # the IVF index owns (and frees) its coarse quantiser
                index.own_fields = True
                index.by_residual = False
                index.nprobe = max(1, min(nprobe, nlist))
            else:
                index = faiss.IndexPQFastScan(bits, bits // 4, 4, faiss.METRIC_INNER_PRODUCT)
                index.is_trained = True
            self._set_patterns(index)
        self.index = index   # a loaded IVF index keeps the nprobe it was written with

    @staticmethod
    def _set_patterns(index) -> None:
        faiss.copy_array_to_vector(np.tile(sign_patterns(4)[None], (index.pq.M, 1, 1)).ravel(), index.pq.centroids)

    @property
    def nlist(self) -> int:
        return int(getattr(self.index, "nlist", 0))

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def train(self, real: np.ndarray) -> None:
        """IVF only: k-means of the items' real-valued projections [n, bits] for the coarse lists."""
        if self.nlist:
            self.index.train(np.ascontiguousarray(real, dtype=np.float32))
            self._set_patterns(self.index)   # training fitted a PQ too; the codes are the sign patterns

    def add(self, codes: np.ndarray) -> None:
        """Packed codes [N, bits / 8] (``matcher.hashing.codes.pack_bits`` layout)."""
        codes = self._packed(codes)
        for start in range(0, len(codes), ADD_CHUNK):
            signs = np.unpackbits(codes[start:start + ADD_CHUNK], axis=1).astype(np.float32) * 2 - 1
            self.index.add(signs)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k], ids [Q, k]) best first for real-valued queries [Q, bits]; k is clipped to
        the index size. Scores come from faiss' 8-bit lookup tables: close to, not exactly, the
        inner product."""
        k = min(k, self.index.ntotal)
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


class QuantizedIndex:
    """A faiss float quantiser named by its factory string, inner-product metric.

    ``PQ64x4fs`` = 64 sub-quantisers of 4 bits (32 B/item, fast-scan), ``PQ32x4fs`` (16 B),
    ``RaBitQ`` / ``RaBitQfs`` = 1 bit per dimension plus per-vector corrections (D / 8 + 8 B).
    ``IVF<n>,...`` factories scan the ``probe`` share of their lists. ``SVD<d>,<factory>`` first projects onto the top d right-singular vectors of the (uncentred)
    training sample, then rotates randomly: inner products survive it, unlike faiss' ``PCA<d>``,
    which centres the vectors and so changes which item has the larger inner product with a query
    (RaBitQ at 32 B for D = 256: ``SVD192,RaBitQfs``).
    """

    def __init__(self, factory: str, dim: int, index: faiss.Index | None = None, probe: float = 0.2):
        self.factory, self.dim, self.probe = factory, dim, probe
        if index is None:
            reduced = re.match(r"^SVD(\d+),(.+)$", factory)
            if reduced:
                out = int(reduced.group(1))
                inner = faiss.index_factory(out, reduced.group(2), faiss.METRIC_INNER_PRODUCT)
                index = faiss.IndexPreTransform(faiss.LinearTransform(dim, out, False), inner)
            else:
                index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        self.index = index

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def train(self, sample: np.ndarray) -> None:
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        if isinstance(self.index, faiss.IndexPreTransform) and self.factory.startswith("SVD"):
            transform = faiss.downcast_VectorTransform(self.index.chain.at(0))
            _, _, vt = np.linalg.svd(sample.astype(np.float64), full_matrices=False)
            # A random rotation after the projection spreads the energy over every output dimension
            # (the top singular directions hold most of it); 1-bit-per-dimension codes assume that
            # (candidate recall at C = 100, 10k items: 0.63 without it, 0.99 with it).
            rotation, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((transform.d_out, transform.d_out)))
            faiss.copy_array_to_vector(np.ascontiguousarray(rotation @ vt[:transform.d_out], np.float32).ravel(), transform.A)
            transform.is_trained = True
        self.index.train(sample)
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:   # an IVF factory scans the ``probe`` share of its lists (faiss' default is 1 list)
            ivf.nprobe = max(1, round(self.probe * ivf.nlist))

    def add(self, vectors: np.ndarray) -> None:
        if not self.index.is_trained:
            raise ValueError(f"{self.factory} must be trained on a sample before items are added")
        for start in range(0, len(vectors), ADD_CHUNK):
            self.index.add(np.ascontiguousarray(vectors[start:start + ADD_CHUNK], dtype=np.float32))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.index.ntotal)
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def __len__(self) -> int:
        return self.index.ntotal


def code_bytes(index) -> int:
    """Bytes one more item adds to a faiss index (its code, plus its 8-byte id in an inverted list),
    without the fixed codebooks, centroids and headers."""
    raw = getattr(index, "index", index)
    if isinstance(raw, faiss.IndexPreTransform):
        raw = faiss.downcast_index(raw.index)
    return int(raw.code_size) + (8 if isinstance(raw, faiss.IndexIVF) else 0)


def index_bytes(index) -> int:
    """Size of a faiss index as written to disk (what a code stage costs per item, times N)."""
    raw = getattr(index, "index", index)
    blob = faiss.serialize_index_binary(raw) if isinstance(raw, faiss.IndexBinary) else faiss.serialize_index(raw)
    return int(blob.nbytes)


def write_faiss(index, path: str | Path) -> None:
    raw = getattr(index, "index", index)
    (faiss.write_index_binary if isinstance(raw, faiss.IndexBinary) else faiss.write_index)(raw, str(path))


def read_faiss(path: str | Path, binary: bool):
    """A faiss index file, read through mmap (the codes end up in RAM; they are the small part)."""
    return (faiss.read_index_binary if binary else faiss.read_index)(str(path), faiss.IO_FLAG_MMAP)


SCORINGS = ("asymmetric", "hamming")
RERANK_ROWS = 1 << 16   # candidate rows gathered at once in a batch re-rank (64k x 256 x 4 B = 64 MB)


def gather_rows(vectors: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """float32 rows ``vectors[ids]`` (any shape of ids); float16 tiers (memory-mapped or not) are
    widened by torch, ~8x faster than numpy's float16 conversion."""
    rows = vectors[ids]
    if rows.dtype == np.float16:
        import torch

        return torch.from_numpy(np.ascontiguousarray(rows)).float().numpy()
    return np.asarray(rows, np.float32)


def _top_k_order(scores: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Column order of the k best per row: best score first, equal scores by lower id, so the order
    is a function of the candidate *set* and shards that re-rank their parts and merge
    (``matcher.scale``) return exactly this. A partition first (linear), then a sort of k only;
    rows with a tie across the k-th place are sorted whole."""
    if k >= scores.shape[1]:
        return np.lexsort((ids, -scores), axis=1)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(scores, part, 1).min(axis=1, keepdims=True)
    inner = np.lexsort((np.take_along_axis(ids, part, 1), -np.take_along_axis(scores, part, 1)), axis=1)
    order = np.take_along_axis(part, inner, 1)
    tied = np.flatnonzero((scores >= kth).sum(axis=1) > k)
    if len(tied):
        order[tied] = np.lexsort((ids[tied], -scores[tied]), axis=1)[:, :k]
    return order


def rerank(queries: np.ndarray, candidates: np.ndarray, vectors: np.ndarray, k: int,
           chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Re-score each query's candidate ids by inner product with ``vectors``; keep the best ``k``.

    ``candidates`` is [Q, C] (``-1`` = no candidate, scored -inf); ``vectors`` may be float32 or
    float16, in RAM or memory-mapped. Returns (scores [Q, k], ids [Q, k]), best first, equal scores
    in id order.
    """
    queries = np.asarray(queries, np.float32)
    k = min(k, candidates.shape[1])
    chunk = chunk or max(1, RERANK_ROWS // max(1, candidates.shape[1]))
    out_scores = np.empty((len(queries), k), np.float32)
    out_ids = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), chunk):
        ids = candidates[start:start + chunk]
        q = queries[start:start + chunk]
        # [Q, C, D] x [Q, D, 1]: one small batched matmul over only the gathered candidate rows.
        scores = np.matmul(gather_rows(vectors, np.maximum(ids, 0)), q[:, :, None])[..., 0]
        scores[ids < 0] = -np.inf
        order = _top_k_order(scores, ids, k)
        out_scores[start:start + chunk] = np.take_along_axis(scores, order, 1)
        out_ids[start:start + chunk] = np.take_along_axis(ids, order, 1)
    return out_scores, out_ids


def two_stage_search(index: BinaryIndex, vectors: np.ndarray, query_codes: np.ndarray, query_vectors: np.ndarray,
                     k: int, candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """Batch form over a Hamming index: top-C, then float re-rank to top-k. (scores [Q, k], ids [Q, k])."""
    _, cand = index.search(query_codes, max(candidates, k))
    return rerank(query_vectors, cand, vectors, k)


# -- candidate stages: a code index + the query transform ---------------------------------------------------------------------------

def _trained_empty(index: faiss.Index) -> faiss.Index:
    """A copy of a faiss index with its training (codebooks, coarse centroids, nprobe) and no items."""
    copy = faiss.deserialize_index(faiss.serialize_index(index))   # clone_index does not keep every IVF type
    copy.reset()
    return copy


class CandidateStage:
    """A code index plus what turns a float query into its query form. Subclasses set ``index``."""

    name: str
    hasher: Hasher | None = None
    needs_training = False

    def train(self, sample: np.ndarray, modality: str = "image") -> None:
        """Fit what the codes need (faiss quantisers, inverted lists) on items; hashers come trained."""

    def add(self, vectors: np.ndarray, modality: str = "image") -> None:
        raise NotImplementedError

    def search(self, queries: np.ndarray, k: int, modality: str = "text") -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k] higher is better, ids [Q, k]) of the float queries [Q, D]."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.index)

    def empty_copy(self) -> "CandidateStage":
        """The same stage with no items, trained parts (codebooks, coarse lists) shared by value:
        shards made from one such template partition and score exactly like the whole index."""
        raise NotImplementedError

    @property
    def bytes_per_item(self) -> int:
        """What each item costs in the code index (its code; fixed codebooks and headers excluded)."""
        return code_bytes(self.index)

    @property
    def index_bytes_per_item(self) -> float:
        """The code index as written to disk, divided by the number of items (fixed parts included)."""
        return index_bytes(self.index) / max(1, len(self))


class HammingStage(CandidateStage):
    """Packed codes, symmetric Hamming distance; scores are ``1 - 2 d / bits``."""

    def __init__(self, hasher: Hasher, index: BinaryIndex | None = None):
        self.hasher, self.bits = hasher, hasher.bits
        self.index = index if index is not None else BinaryIndex(hasher.bits)
        self.name = f"{hasher.method}{hasher.bits}-hamming"

    def empty_copy(self) -> "HammingStage":
        return HammingStage(self.hasher)

    def add(self, vectors, modality="image"):
        for start in range(0, len(vectors), ADD_CHUNK):   # hashing in chunks: no second float copy of N items
            self.index.add(self.hasher.encode(vectors[start:start + ADD_CHUNK], modality))

    def search(self, queries, k, modality="text"):
        distances, ids = self.index.search(self.hasher.encode(queries, modality), k)
        return hamming_similarity(distances, self.bits), ids


class SignStage(CandidateStage):
    """Packed codes, asymmetric score ``<h(q), +-1 code> / |h(q)|_1`` in [-1, 1]: the Hamming
    similarity with each bit weighted by how far the query's own projection is from 0.

    ``nlist`` > 0 splits the codes into inverted lists (``SignIndex``) of which a query scans the
    ``probe`` share; the lists are trained on a sample of the items (``train``).
    """

    def __init__(self, hasher: Hasher, index: SignIndex | None = None, nlist: int = 0, probe: float = 0.2):
        self.hasher, self.bits = hasher, hasher.bits
        self.index = index if index is not None else SignIndex(hasher.bits, nlist=nlist, nprobe=max(1, round(probe * nlist)))
        self.needs_training = bool(self.index.nlist)
        ivf = f"-ivf{self.index.nlist}" if self.index.nlist else ""
        self.name = f"{hasher.method}{hasher.bits}-asym{ivf}"

    def train(self, sample, modality="image"):
        if self.needs_training:
            self.index.train(self.hasher.real(np.asarray(sample, np.float32), modality))

    def empty_copy(self) -> "SignStage":
        if not self.index.nlist:
            return SignStage(self.hasher)
        return SignStage(self.hasher, SignIndex(self.bits, _trained_empty(self.index.index)))

    def add(self, vectors, modality="image"):
        for start in range(0, len(vectors), ADD_CHUNK):
            self.index.add(self.hasher.encode(vectors[start:start + ADD_CHUNK], modality))

    def add_codes(self, codes: np.ndarray) -> None:
        self.index.add(codes)

    def search(self, queries, k, modality="text"):
        real = self.hasher.real(np.asarray(queries, np.float32), modality)
        scores, ids = self.index.search(real, k)
        norm = np.maximum(np.abs(real).sum(axis=1, keepdims=True), 1e-12)
        return np.clip(scores / norm, -1.0, 1.0), ids


class QuantizerStage(CandidateStage):
    """A faiss float quantiser over the float vectors themselves (queries unchanged)."""

    needs_training = True

    def __init__(self, factory: str, dim: int, index: QuantizedIndex | None = None):
        self.index = index if index is not None else QuantizedIndex(factory, dim)
        self.factory, self.name = factory, factory

    def train(self, sample, modality="image"):
        self.index.train(sample)

    def empty_copy(self) -> "QuantizerStage":
        return QuantizerStage(self.factory, self.index.dim,
                              QuantizedIndex(self.factory, self.index.dim, _trained_empty(self.index.index)))

    def add(self, vectors, modality="image"):
        self.index.add(vectors)

    def search(self, queries, k, modality="text"):
        return self.index.search(queries, k)


def make_stage(scoring: str, hasher: Hasher) -> CandidateStage:
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; expected one of {SCORINGS}")
    return SignStage(hasher) if scoring == "asymmetric" else HammingStage(hasher)


class TwoStageIndex:
    """A candidate stage over N items plus their re-rank vectors [N, D] (float32 or float16, in RAM
    or memory-mapped): ``search`` = top-C by code score, then exact inner product on those C.

    ``candidates`` and ``rerank`` are the two halves, so a sharded index can merge the shards'
    candidates before re-ranking (``matcher.scale``) and return what one process would.
    """

    def __init__(self, stage: CandidateStage, vectors: np.ndarray):
        if len(vectors) != len(stage):
            raise ValueError(f"{len(stage)} codes but {len(vectors)} re-rank vectors")
        self.stage, self.vectors = stage, vectors

    def __len__(self) -> int:
        return len(self.stage)

    def candidates(self, queries: np.ndarray, c: int, modality: str = "text") -> tuple[np.ndarray, np.ndarray]:
        return self.stage.search(np.atleast_2d(queries), c, modality)

    def rerank(self, queries: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return rerank(np.atleast_2d(queries), ids, self.vectors, k)

    def search(self, queries: np.ndarray, k: int, c: int, modality: str = "text") -> tuple[np.ndarray, np.ndarray]:
        _, ids = self.candidates(queries, max(c, k), modality)
        return self.rerank(queries, ids, k)
