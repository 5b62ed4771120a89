"""Learned binary codes for two-stage search (issue #4).

- ``codes``: pack/unpack bits, Hamming similarity, the LSH and ITQ baselines;
- ``heads``: HEI hash heads (tanh-relaxed linear maps) and the HEI hashing loss;
- ``train``: fitting the heads on cached train-split embeddings, selection on val;
- ``search``: the two-stage search (Hamming shortlist -> float re-rank) and ``HashedMatcher``;
- ``evaluate``: standard-protocol recall and candidate recall of hashed matchers.

Every hasher offers ``encode(vectors, modality) -> packed uint8 codes`` so the index, the matcher,
the evaluation and the benchmark never need to know how the codes were learned.
"""
from matcher.hashing.codes import Hasher, ITQHasher, LSHHasher, hamming_similarity, pack_bits, unpack_bits

__all__ = ["Hasher", "ITQHasher", "LSHHasher", "hamming_similarity", "pack_bits", "unpack_bits"]
