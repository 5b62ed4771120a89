"""The fine-grained tiers as dashboard matchers: the dual teacher's top-C, re-scored by a pair scorer.

``FineRerankMatcher`` serves one gallery like ``matcher.search.exact.Matcher`` (same ``SearchOptions``,
``SearchResult`` with per-stage timings), so the app and the error analysis treat it as one more
column. Three kinds of scorer re-rank, one code path:

- ``alignment`` (``offline-fine``): ALADIN-style region x word alignment of the teacher's *final*
  token states against its unit region vectors;
- ``tops-alignment`` (``offline-tops``): the same alignment, but of word and region vectors made by the
  tier's own trained copies of the teacher's top blocks/layers (``matcher.finegrained.tops``), which
  read the caption's lower-layer states and the photo's trunk output;
- ``vl-cross`` (``offline-vl-cross``): the cross-encoder on the teacher's top MiniLM layers
  (``matcher.finegrained.vl_cross``), which reads the caption's states after the text tower's
  *lower* layers together with 4 x 4 + 1 image tokens made from the region map.

A text query runs the teacher's text tower once: the lower layers' states (what the cross-encoder
reads), the final token states (what the alignment scorer reads) and, from their mean through the
teacher's head, the dual query embedding all come from that one run. Stages:

1. ``encode``: the query's token states and dual embedding;
2. ``candidates``: exact float search of the teacher's gallery embeddings, top-C;
3. ``rerank``: ``cos_dual + fuse · S`` on the C candidates (``fuse`` chosen on val by ``eval-fine``;
   ``fuse = None`` ranks by the scorer alone), top-K. The cross-encoder's S already holds the
   teacher's scaled cosine (its read-out is a correction), so with its read-out at zero either way
   ranks exactly as the teacher.

The gallery side is computed once per (teacher, scorer weights, gallery) from the teacher's unpooled
feature map of each photo and kept in the on-disk array cache, in float16: the alignment scorer's
unit region vectors (49 x 256 per photo), or the cross-encoder's image tokens (17 x 384 per photo:
the pooled grid and the global token after its region projection, so a query projects nothing).
Image queries ("search by image", "more like this") have no words, so they are answered by the dual
teacher alone, and the result says so in its timings (no ``rerank`` stage).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
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


class CheckpointProblem(ValueError):
    """A fine column's scorer checkpoint is missing, unreadable or of a kind it cannot serve."""


# -- what each kind of scorer stores per gallery image and reads per query -------------------------

class _Alignment:
    """Region x word alignment (``matcher.finegrained.scorers``): unit regions vs final token states."""

    kind, cache_prefix = "alignment", "fine"   # the prefix caches written before vl-cross existed use
    reads = "region x word"

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def gallery_side(self, trunk: torch.Tensor, tower: torch.nn.Module) -> torch.Tensor:
        return self.model.encode_image(_regions(trunk, tower))

    def query_side(self, lower: torch.Tensor, final: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model.encode_text(final, mask), mask

    def scores(self, stored: torch.Tensor, cosines: torch.Tensor, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = len(stored)
        return self.model.score_pairs(stored, words.expand(n, -1, -1), mask.expand(n, -1))


class _VLCross:
    """The MiniLM cross-encoder (``matcher.finegrained.vl_cross.VLCrossEncoder``): image tokens stored,
    the query's lower-layer states read, its top layers run on words and image tokens together."""

    kind, cache_prefix = "vl-cross", "fine-vl-cross"
    reads = "cross-encoder (words + image tokens through the teacher's top MiniLM layers)"

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def gallery_side(self, trunk: torch.Tensor, tower: torch.nn.Module) -> torch.Tensor:
        return self.model.image_tokens(_regions(trunk, tower))

    def query_side(self, lower: torch.Tensor, final: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return lower, mask

    def scores(self, stored: torch.Tensor, cosines: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``VLCrossEncoder.score_tokens``: the image tokens are stored per photo, the query's states shared."""
        n = len(stored)
        return self.model.score_tokens(stored, states.expand(n, -1, -1), mask.expand(n, -1), cosines)


class _TopsAlignment(_Alignment):
    """Alignment with the tier's own trained tops (``matcher.finegrained.tops``): its copies of the
    teacher's top blocks run on the photo's trunk output, its top MiniLM layers on the query's
    lower-layer states; the teacher's own tops only shortlist."""

    kind, cache_prefix = "tops-alignment", "fine-tops"
    reads = "region x word, with its own trained top blocks and layers"

    def gallery_side(self, trunk: torch.Tensor, tower: torch.nn.Module) -> torch.Tensor:
        return self.model.encode_image(trunk)

    def query_side(self, lower: torch.Tensor, final: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model.encode_text(lower, mask)


def _regions(trunk: torch.Tensor, tower: torch.nn.Module) -> torch.Tensor:
    """[N, R, 1280] the teacher's unpooled region vectors from its trunk output."""
    return tower.forward_top_map(trunk).flatten(2).transpose(1, 2)


def _reader(scorer: torch.nn.Module):
    from matcher.finegrained.tops import TopsAlignment
    from matcher.finegrained.vl_cross import VLCrossEncoder, VLDecomposed

    if isinstance(scorer, TopsAlignment):
        return _TopsAlignment(scorer)
    if isinstance(scorer, VLDecomposed):
        raise CheckpointProblem("a vl-decomposed checkpoint is a dual encoder, not a re-ranker of the teacher's "
                                "shortlist; the fine column serves alignment and vl-cross checkpoints")
    return _VLCross(scorer) if isinstance(scorer, VLCrossEncoder) else _Alignment(scorer)


def load_rerank_scorer(path: str | Path, teacher_module: torch.nn.Module) -> torch.nn.Module:
    """The scorer a ``fine-rerank`` config names, rebuilt on the teacher that shortlists for it: an
    alignment scorer (``train-fine``) or a ``vl-cross`` cross-encoder (``train-vl-cross``). A missing,
    unreadable or other checkpoint raises ``CheckpointProblem`` with a message for the user."""
    from matcher.finegrained.checkpoints import CROSS_FORMAT, load_scorer, teacher_heads

    path = Path(path)
    if not path.is_file():
        raise CheckpointProblem(f"scorer checkpoint {path} not found (not trained yet, or not in this checkout)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one message, not a traceback
        raise CheckpointProblem(f"scorer checkpoint {path} cannot be read ({type(exc).__name__}: {exc})") from None
    kind = payload.get("kind") if isinstance(payload, dict) else None
    if isinstance(payload, dict) and payload.get("format") == CROSS_FORMAT:
        from matcher.finegrained.tops import load_tops
        from matcher.finegrained.vl_cross import load_vl_cross

        loaders = {"vl-cross": load_vl_cross, "tops-alignment": load_tops}
        if kind not in loaders:
            raise CheckpointProblem(f"{path} is a {kind!r} checkpoint; the fine column re-ranks with alignment "
                                    "(train-fine), vl-cross (train-vl-cross) or tops-alignment "
                                    "(train-tops-alignment) checkpoints")
        try:
            model, _, _ = loaders[kind](path, teacher_module)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointProblem(f"{kind} checkpoint {path} does not fit the teacher it is served on "
                                    f"({type(exc).__name__}: {str(exc)[:200]})") from None
        return model
    image_head, text_head, _ = teacher_heads(teacher_module)
    try:
        scorer, _, _ = load_scorer(path, image_head, text_head)
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise CheckpointProblem(f"{path} is not a fine scorer checkpoint this version reads "
                                f"({type(exc).__name__}: {str(exc)[:200]})") from None
    return scorer


class FineRerankMatcher:
    """Dual teacher shortlist + re-rank by an alignment scorer (on the teacher's tops or its own) or the
    MiniLM cross-encoder, for text queries."""

    def __init__(self, base: ExactMatcher, scorer, fuse: float | None, candidates: int = DEFAULT_CANDIDATES,
                 cache: ArrayCache | None = None, name: str = "fine"):
        self.base, self.scorer, self.fuse, self.candidates, self.name = base, scorer.eval(), fuse, int(candidates), name
        if self.candidates < 1:
            raise ValueError(f"{name}: candidates must be at least 1 (got {candidates})")
        self.reader = _reader(self.scorer)
        self.module = base.encoder.module  # the teacher's DualEncoderModule
        self.regions = self._gallery_side(cache or ArrayCache())

    @property
    def kind(self) -> str:
        """``alignment``, ``tops-alignment`` or ``vl-cross``: which scorer re-ranks."""
        return self.reader.kind

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
        return f"{self.reader.cache_prefix}-{self.base.encoder.fingerprint()}-{scorer_hash}-{self.gallery.fingerprint()}"

    @torch.inference_mode()
    def _gallery_side(self, cache: ArrayCache, batch_size: int = 16) -> torch.Tensor:
        """[N, ...] what the scorer reads of each photo, row order = the base matcher's embeddings:
        unit region vectors [N, 49, 256] (alignment, tops-alignment) or image tokens [N, 17, 384] (vl-cross)."""
        key = self._cache_key()
        hit = cache.get(key)
        if hit is not None and list(hit[1].get("names", [])) == list(self.embeddings.names):
            return torch.from_numpy(hit[0]["regions"].astype(np.float32))
        names, tower, chunks = self.embeddings.names, self.module.image_tower, []
        for start in tqdm(range(0, len(names), batch_size), desc=f"{self.name}: gallery ({self.kind})", unit="batch"):
            pixels = torch.stack([self.base.encoder.preprocess(load_rgb(self.gallery.path(n)))
                                  for n in names[start:start + batch_size]])
            trunk = tower.forward_trunk(pixels.contiguous(memory_format=torch.channels_last))
            chunks.append(self.reader.gallery_side(trunk, tower).half())
        stored = torch.cat(chunks) if chunks else torch.zeros(0, 1, 1, dtype=torch.float16)
        cache.put(key, {"regions": stored.numpy()}, {"names": list(names), "kind": self.kind})
        return stored.float()

    # -- queries --------------------------------------------------------------------------------
    @torch.inference_mode()
    def _encode_text(self, text: str) -> tuple:
        """(dual query embedding [D], *what the scorer reads of the query) from one text tower run:
        for alignment and tops-alignment (unit word vectors [1, L, D], word mask [1, L]); for vl-cross
        (lower-layer states [1, L, 384], mask [1, L])."""
        tower = self.module.text_tower
        tokens = tower.tokenize([text])
        mask = tokens["attention_mask"]
        lower = tower.forward_trunk(tokens["input_ids"], mask)
        final = tower.forward_top_tokens(lower, mask)
        query = torch.nn.functional.normalize(self.module.text_head(masked_mean(final, mask)), dim=-1)[0].numpy()
        return (query, *self.reader.query_side(lower, final, mask.bool()))

    def search_text(self, text: str, options: SearchOptions = SearchOptions()) -> SearchResult:
        text, k, clock = check_text_query(text), check_k(options.k), Stopwatch()
        with clock.stage("encode"):
            query, *features = self._encode_text(text)
        with clock.stage("candidates"):
            cosines, rows = self.base.image_index.search(query[None].astype(np.float32), max(k, self.candidates))
            keep = rows[0] >= 0
            cosines, rows = cosines[0][keep], rows[0][keep]
        with clock.stage("rerank"):
            scores = self.rerank_scores(cosines, rows, *features)
            order = np.argsort(-scores, kind="stable")[:k]
        return clock.result([Hit(int(rows[i]), self.embeddings.names[rows[i]], float(scores[i])) for i in order])

    @torch.inference_mode()
    def rerank_scores(self, cosines: np.ndarray, rows: np.ndarray, *features: torch.Tensor) -> np.ndarray:
        """Fused (or pure scorer) scores of the shortlisted gallery rows for one query."""
        cosines = np.asarray(cosines, dtype=np.float32)
        fine = self.reader.scores(self.regions[torch.from_numpy(np.asarray(rows))], torch.from_numpy(cosines),
                                  *features).numpy()
        return fine if self.fuse is None else cosines + self.fuse * fine

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
