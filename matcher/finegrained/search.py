"""The fine-grained tier as a dashboard matcher: the dual teacher's top-C, re-scored region × word.

``FineRerankMatcher`` serves one gallery like ``matcher.search.Matcher`` (same ``SearchOptions``,
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

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from matcher.cache import ArrayCache
from matcher.gallery import Gallery
from matcher.images import load_rgb
from matcher.towers import masked_mean
from matcher.search import Hit, Matcher, SearchOptions, SearchResult, check_k, check_text_query

DEFAULT_CANDIDATES = 50


class FineRerankMatcher:
    """Dual teacher shortlist + alignment-score re-rank, for text queries."""

    def __init__(self, base: Matcher, scorer, fuse: float | None, candidates: int = DEFAULT_CANDIDATES,
                 cache: ArrayCache | None = None, name: str = "fine"):
        self.base, self.scorer, self.fuse, self.candidates, self.name = base, scorer.eval(), fuse, candidates, name
        self.module = base.encoder.module  # the teacher's DualEncoderModule
        self.regions = self._gallery_regions(cache or ArrayCache())

    @property
    def embeddings(self):
        return self.base.embeddings

    @property
    def gallery(self) -> Gallery:
        return self.base.gallery

    # -- gallery side ---------------------------------------------------------------------------
    def _cache_key(self) -> str:
        weights = b"".join(v.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                           for _, v in sorted(self.scorer.state_dict().items()))
        import hashlib

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
        text, k = check_text_query(text), check_k(options.k)
        timings = {}
        started = time.perf_counter()
        query, words, mask = self._encode_text(text)
        timings["encode"] = round((time.perf_counter() - started) * 1000, 3)
        started = time.perf_counter()
        pool = max(k, self.candidates)
        cosines, rows = self.base.image_index.search(query[None].astype(np.float32), pool)
        keep = rows[0] >= 0
        cosines, rows = cosines[0][keep], rows[0][keep]
        timings["candidates"] = round((time.perf_counter() - started) * 1000, 3)
        started = time.perf_counter()
        scores = self.rerank_scores(cosines, rows, words, mask)
        order = np.argsort(-scores, kind="stable")[:k]
        timings["rerank"] = round((time.perf_counter() - started) * 1000, 3)
        hits = [Hit(int(rows[i]), self.embeddings.names[rows[i]], float(scores[i])) for i in order]
        return SearchResult(hits, timings)

    @torch.inference_mode()
    def rerank_scores(self, cosines: np.ndarray, rows: np.ndarray, words: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        """Fused (or pure alignment) scores of the shortlisted gallery rows for one query."""
        n = len(rows)
        align = self.scorer.score_pairs(self.regions[torch.from_numpy(rows)], words.expand(n, -1, -1),
                                        mask.expand(n, -1)).numpy()
        return align if self.fuse is None else cosines + self.fuse * align

    def search_image(self, image: Image.Image, options: SearchOptions = SearchOptions()) -> SearchResult:
        return self.base.search_image(image, options)  # no words to align: the dual teacher answers

    def more_like(self, name: str, options: SearchOptions = SearchOptions()) -> SearchResult:
        return self.base.more_like(name, options)


def open_fine_matcher(name: str, config: dict, gallery: Gallery) -> FineRerankMatcher:
    """Build from a registered config: {"type": "fine-rerank", "base", "scorer", "fuse", "candidates"}."""
    from matcher.finegrained.features import teacher_heads
    from matcher.finegrained.train import load_scorer
    from matcher.models import cached_encoder
    from matcher.paths import REPO_ROOT

    base = Matcher(cached_encoder(config["base"]), gallery)
    scorer_path = Path(config["scorer"])
    scorer_path = scorer_path if scorer_path.is_absolute() else REPO_ROOT / scorer_path
    image_head, text_head, _ = teacher_heads(base.encoder.module)
    scorer, _, _ = load_scorer(scorer_path, image_head, text_head)
    return FineRerankMatcher(base, scorer, config.get("fuse"), int(config.get("candidates", DEFAULT_CANDIDATES)),
                             name=name)

