"""The fine-grained tier as a dashboard matcher: the dual teacher's top-C, re-scored region × word.

``FineRerankMatcher`` serves one gallery like ``matcher.search.exact.Matcher`` (same ``SearchOptions``,
``SearchResult`` with per-stage timings), so the app and the error analysis treat it as one more
column. A text query runs the teacher's text tower once: its token states feed the alignment
scorer, their mean (through the teacher's head) is the dual query embedding. Stages:

1. ``encode``: the query's token states and dual embedding;
2. ``candidates``: exact float search of the teacher's gallery embeddings, top-C;
3. ``rerank``: ``cos_dual + fuse · S_align`` on the C candidates (``fuse`` chosen on val by
   ``eval-fine``; ``fuse = None`` ranks by the alignment score alone), top-K.

The gallery side stores, per image, the scorer's unit region vectors (49 × 256, float16), computed
once from the teacher's unpooled feature map and kept in the on-disk array cache. Image queries
("search by image", "more like this") have no words to align, so they are answered by the dual
teacher alone, and the result says so in its timings (no ``rerank`` stage).
"""
from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from matcher.data.cache import ArrayCache
from matcher.data.embed import GalleryEmbeddings
from matcher.data.gallery import Gallery
from matcher.data.images import load_rgb
from matcher.models.towers import masked_mean
from matcher.search.exact import ExactMatcher
from matcher.search.protocol import (Hit, Ranking, SearchOptions, SearchResult, Stopwatch, check_k, check_text_query,
                                     rank_by_search)

DEFAULT_CANDIDATES = 50


class FineRerankMatcher:
    """Dual teacher shortlist + alignment-score re-rank, for text queries."""

    def __init__(self, base: ExactMatcher, scorer, fuse: float | None, candidates: int = DEFAULT_CANDIDATES,
                 cache: ArrayCache | None = None, name: str = "fine"):
        self.base, self.scorer, self.fuse, self.candidates, self.name = base, scorer.eval(), fuse, candidates, name
        self.module = base.encoder.module  # the teacher's DualEncoderModule
        self.regions = self._gallery_regions(cache or ArrayCache())

    @property
    def embeddings(self) -> GalleryEmbeddings:
        return self.base.embeddings

    @property
    def gallery(self) -> Gallery:
        return self.base.gallery

    # -- gallery side ---------------------------------------------------------------------------
    def _cache_key(self) -> str:
        weights = b"".join(v.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                           for _, v in sorted(self.scorer.state_dict().items()))
        scorer_hash = hashlib.sha256(weights).hexdigest()[:16]
        return f"fine-{self.base.encoder.fingerprint()}-{scorer_hash}-{self.gallery.fingerprint()}"

    @torch.inference_mode()
    def _gallery_regions(self, cache: ArrayCache, batch_size: int = 16) -> torch.Tensor:
        """[N, R, D] unit region vectors, row order = the base matcher's embeddings."""
        key = self._cache_key()
        hit = cache.get(key)
        if hit is not None and list(hit[1].get("names", [])) == list(self.embeddings.names):
            return torch.from_numpy(hit[0]["regions"].astype(np.float32))
        names, tower, chunks = self.embeddings.names, self.module.image_tower, []
        for start in tqdm(range(0, len(names), batch_size), desc=f"{self.name}: regions", unit="batch"):
            pixels = torch.stack([self.base.encoder.preprocess(load_rgb(self.gallery.path(n)))
                                  for n in names[start:start + batch_size]])
            fmap = tower.forward_top_map(tower.forward_trunk(pixels.contiguous(memory_format=torch.channels_last)))
            chunks.append(self.scorer.encode_image(fmap.flatten(2).transpose(1, 2)).half())
        regions = torch.cat(chunks) if chunks else torch.zeros(0, 49, 256, dtype=torch.float16)
        cache.put(key, {"regions": regions.numpy()}, {"names": list(names)})
        return regions.float()

    # -- queries --------------------------------------------------------------------------------
    @torch.inference_mode()
    def _encode_text(self, text: str) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """(dual query embedding [D], unit token vectors [1, L, D], mask [1, L]) from one tower run."""
        tower = self.module.text_tower
        tokens = tower.tokenize([text])
        mask = tokens["attention_mask"]
        states = tower.forward_top_tokens(tower.forward_trunk(tokens["input_ids"], mask), mask)
        query = torch.nn.functional.normalize(self.module.text_head(masked_mean(states, mask)), dim=-1)[0].numpy()
        return query, self.scorer.encode_text(states, mask.bool()), mask.bool()

    def search_text(self, text: str, options: SearchOptions = SearchOptions()) -> SearchResult:
        text, k, clock = check_text_query(text), check_k(options.k), Stopwatch()
        with clock.stage("encode"):
            query, words, mask = self._encode_text(text)
        with clock.stage("candidates"):
            cosines, rows = self.base.image_index.search(query[None].astype(np.float32), max(k, self.candidates))
            keep = rows[0] >= 0
            cosines, rows = cosines[0][keep], rows[0][keep]
        with clock.stage("rerank"):
            scores = self.rerank_scores(cosines, rows, words, mask)
            order = np.argsort(-scores, kind="stable")[:k]
        return clock.result([Hit(int(rows[i]), self.embeddings.names[rows[i]], float(scores[i])) for i in order])

    @torch.inference_mode()
    def rerank_scores(self, cosines: np.ndarray, rows: np.ndarray, words: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        """Fused (or pure alignment) scores of the shortlisted gallery rows for one query."""
        n = len(rows)
        align = self.scorer.score_pairs(self.regions[torch.from_numpy(rows)], words.expand(n, -1, -1),
                                        mask.expand(n, -1)).numpy()
        return align if self.fuse is None else cosines + self.fuse * align

    # No words to align in an image query: the dual teacher answers (no "rerank" stage in the timings).
    def search_image(self, image: Image.Image, options: SearchOptions = SearchOptions()) -> SearchResult:
        return self.base.search_image(image, options)

    def more_like(self, name: str, options: SearchOptions = SearchOptions()) -> SearchResult:
        return self.base.more_like(name, options)

    def captions_for_image(self, image: Image.Image, options: SearchOptions = SearchOptions(k=5)) -> SearchResult:
        return self.base.captions_for_image(image, options)

    def rank_captions(self, texts: list[str], owners: list[str], k: int, options: SearchOptions = SearchOptions(),
                      progress: Callable[[float], None] | None = None) -> Ranking:
        """Query by query: the re-rank is per caption, so there is no batch shortcut."""
        return rank_by_search(self, texts, owners, k, options, progress=progress)
