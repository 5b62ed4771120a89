"""A cross-encoder built on MiniLM's own pretrained layers (VisualBERT-style early interaction).

Why: a small transformer trained from random weights on 6000 photos stays at chance on a CPU budget
(docs/finegrained.md). Here the interaction layers are the teacher's top MiniLM layers, which
already read English; only the way image regions enter them is new. The caption's token states
after the lower (frozen) MiniLM layers come from the training cache, the teacher's 7x7 region map
is average-pooled to a small grid plus one global token, projected into MiniLM's token space and
appended to the caption, and the top layers see words and regions together.

Score = s * (dual teacher cosine) + read-out([CLS] output), the read-out's last layer starting at
zero: the untrained model ranks exactly as the teacher does, and training on the teacher's hard
negatives only has to learn a correction (``residual_scale`` 0 drops the dual term).

The region projection starts as ``pinv(W_text) @ W_image`` of the teacher's heads, so that the
teacher's text head maps a projected region close to where its image head maps the region, and
its LayerNorm starts as the lower layers' output norm, so regions enter at the scale of word states.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from matcher.finegrained.features import FineSplit, dual_embeddings
from matcher.models.towers import run_bert_layers


@dataclass
class CrossSplit:
    """What the cross-encoder reads of one split: the fine features (regions), the caption token
    states after the lower MiniLM layers (same offsets), and the dual teacher's unit embeddings."""

    fine: FineSplit
    lower: FineSplit        # regions shared with ``fine``; tokens = lower-layer states
    images: torch.Tensor    # [N, D] dual teacher image embeddings (unit)
    texts: torch.Tensor     # [5N, D] dual teacher caption embeddings (unit)

    @classmethod
    def build(cls, fine: FineSplit, lower_tokens: np.ndarray, lower_offsets: np.ndarray,
              image_head: nn.Linear, text_head: nn.Linear) -> "CrossSplit":
        if not np.array_equal(lower_offsets, fine.offsets):
            raise ValueError("the lower-layer token cache does not match the fine features (different captions "
                             "or tokenisation); rebuild both from the same data")
        images, texts = dual_embeddings(fine, image_head, text_head)
        return cls(fine, FineSplit(fine.regions, lower_tokens, lower_offsets), images, texts)

    def __len__(self) -> int:
        return len(self.fine)

    @property
    def caption_image(self) -> np.ndarray:
        return self.fine.caption_image

    @cached_property
    def dual(self) -> np.ndarray:
        """[captions, images] dual cosine matrix (computed once: training, selection and every
        shortlist read it)."""
        return (self.texts @ self.images.T).numpy()

    def pairs(self, captions: np.ndarray, images: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Inputs of ``VLCrossEncoder.score_pairs`` for aligned (caption, image) pairs."""
        states, mask = self.lower.token_batch(captions)
        cos = (self.texts[captions] * self.images[images]).sum(-1)
        return self.fine.region_batch(images), states, mask, cos


def cross_splits(data, teacher, splits=("train", "val", "test")):
    """(teacher module, image head, text head, logit scale, {split: CrossSplit}) from the training caches
    (Flickr8k folder ``data``, teacher checkpoint path ``teacher``)."""
    from matcher.finegrained.checkpoints import teacher_heads
    from matcher.finegrained.features import fine_features
    from matcher.models.dual_encoder import load_checkpoint
    from matcher.train.features import Flickr8k, cached_text_features

    flickr = Flickr8k.load(data)
    module = load_checkpoint(teacher).module.eval()
    image_head, text_head, scale = teacher_heads(module)
    feats = fine_features(flickr, teacher)
    lower = cached_text_features(flickr, module.text_tower.trainable_layers)
    out = {s: CrossSplit.build(feats[s], lower[f"{s}_tokens"], lower[f"{s}_offsets"], image_head, text_head)
           for s in splits}
    return module, image_head, text_head, scale, out


class VLCrossEncoder(nn.Module):
    def __init__(self, layers: list[nn.Module], lower_norm: nn.LayerNorm, image_head: nn.Linear, text_head: nn.Linear,
                 residual_scale: float, grid: int = 4):
        super().__init__()
        width, region_dim = text_head.in_features, image_head.in_features
        self.layers = nn.ModuleList(copy.deepcopy(list(layers)))
        self.grid, self.residual_scale = grid, residual_scale
        self.region_in = nn.Linear(region_dim, width)
        with torch.no_grad():
            pinv = torch.linalg.pinv(text_head.weight)                     # [width, D]
            self.region_in.weight.copy_(pinv @ image_head.weight)
            self.region_in.bias.copy_(pinv @ (image_head.bias - text_head.bias))
        self.region_norm = copy.deepcopy(lower_norm)
        self.region_pos = nn.Parameter(0.02 * torch.randn(1, grid * grid + 1, width))
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        self.config = {"grid": grid, "residual_scale": residual_scale, "layers": len(layers), "width": width,
                       "region_dim": region_dim}

    def image_tokens(self, regions: torch.Tensor) -> torch.Tensor:
        """[P, R, 1280] region features (R a square grid) -> [P, grid^2 + 1, width] tokens."""
        p, r, c = regions.shape
        side = int(round(r ** 0.5))
        grid = F.adaptive_avg_pool2d(regions.transpose(1, 2).reshape(p, c, side, side), self.grid)
        x = torch.cat([regions.mean(1, keepdim=True), grid.flatten(2).transpose(1, 2)], 1)
        return self.region_norm(self.region_in(x)) + self.region_pos

    def score_pairs(self, regions: torch.Tensor, states: torch.Tensor, mask: torch.Tensor,
                    cos: torch.Tensor) -> torch.Tensor:
        """[P] scores of aligned pairs: regions [P, R, 1280], lower-layer states [P, L, width] with
        mask [P, L] (True at words, [CLS] first), and the pairs' dual cosines [P]."""
        return self.score_tokens(self.image_tokens(regions), states, mask, cos)

    def score_tokens(self, img: torch.Tensor, states: torch.Tensor, mask: torch.Tensor,
                     cos: torch.Tensor) -> torch.Tensor:
        """``score_pairs`` from image tokens already made (a gallery stores them once per photo)."""
        h = torch.cat([states, img], 1)
        keep = torch.cat([mask.to(h.dtype), torch.ones(img.shape[:2], dtype=h.dtype)], 1)
        h = run_bert_layers(self.layers, h, keep)
        return self.head(h[:, 0]).squeeze(-1) + self.residual_scale * cos


def build_vl_cross(teacher_module: nn.Module, image_head: nn.Linear, text_head: nn.Linear, residual_scale: float,
                   grid: int = 4) -> VLCrossEncoder:
    """From a loaded towers teacher: its top MiniLM layers and the norm its lower layers end with."""
    tower = teacher_module.text_tower
    top = list(tower.layers[tower.split:])
    lower_norm = tower.layers[tower.split - 1].output.LayerNorm
    return VLCrossEncoder(top, lower_norm, image_head, text_head, residual_scale, grid)


def save_vl_cross(path, module: nn.Module, kind: str, recipe: dict, metadata: dict) -> None:
    """A ``vl-cross`` or ``vl-decomposed`` checkpoint: every weight (its MiniLM layers trained too), float16."""
    from matcher.finegrained.checkpoints import save_cross

    save_cross(path, kind, module, recipe, metadata)


def load_vl_cross(path, teacher_module: nn.Module):
    """(module, recipe, metadata) of a ``vl-cross`` / ``vl-decomposed`` checkpoint, rebuilt on the teacher it
    was trained from (the shapes of its MiniLM layers and heads come from there)."""
    from matcher.finegrained.checkpoints import CROSS_FORMAT, teacher_heads

    payload = torch.load(path, map_location="cpu", weights_only=True)
    kind = payload.get("kind")
    if payload.get("format") != CROSS_FORMAT or kind not in ("vl-cross", "vl-decomposed"):
        raise ValueError(f"{path} is not a vl-cross or vl-decomposed checkpoint")
    r = payload["recipe"]
    cross_recipe = r["cross_recipe"] if kind == "vl-decomposed" else r
    image_head, text_head, scale = teacher_heads(teacher_module)
    model = build_vl_cross(teacher_module, image_head, text_head, scale if cross_recipe["residual"] else 0.0,
                           cross_recipe["grid"])
    if kind == "vl-decomposed":
        model = VLDecomposed(model)
    model.load_state_dict({k: v.float() for k, v in payload["state_dict"].items()})
    return model.eval(), {**r, "tier": kind}, payload["metadata"]


def score_pairs(model: VLCrossEncoder, split: CrossSplit, captions: np.ndarray, images: np.ndarray,
                chunk: int = 256, progress: str | None = None) -> np.ndarray:
    """Scores of many (caption, image) pairs in chunks, no grad."""
    from tqdm import tqdm

    model.eval()
    out = []
    with torch.inference_mode():
        for s in tqdm(range(0, len(captions), chunk), desc=progress, disable=progress is None, leave=False):
            out.append(model.score_pairs(*split.pairs(captions[s:s + chunk], images[s:s + chunk])))
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)



def shortlists(model: VLCrossEncoder, split: CrossSplit, candidates: int, progress: str | None = None):
    """The dual teacher's top-C per caption (t2i) and per image (i2t), scored by ``model``."""
    from matcher.finegrained.evaluate import Shortlists, shortlist

    dual = split.dual
    t2i, i2t = shortlist(dual, candidates), shortlist(dual.T, candidates)
    caps, imgs = np.repeat(np.arange(len(dual)), t2i.shape[1]), np.repeat(np.arange(dual.shape[1]), i2t.shape[1])
    t2i_fine = score_pairs(model, split, caps, t2i.ravel(), progress=progress and f"{progress} t2i")
    i2t_fine = score_pairs(model, split, i2t.ravel(), imgs, progress=progress and f"{progress} i2t")
    return Shortlists(t2i, t2i_fine.reshape(t2i.shape), i2t, i2t_fine.reshape(i2t.shape))


def quick_rerank_metrics(model: VLCrossEncoder, split: CrossSplit, candidates: int, caption_rows: np.ndarray) -> dict:
    """Re-ranking recall for model selection at a fifth of the cost: t2i over ``caption_rows`` only
    (e.g. one caption per image), i2t over every image with all captions as the protocol has it."""
    from matcher.eval.metrics import retrieval_metrics
    from matcher.finegrained.evaluate import OFFSET, shortlist

    dual = split.dual
    sub = dual[caption_rows]
    t2i = shortlist(sub, candidates)
    fine = score_pairs(model, split, np.repeat(caption_rows, t2i.shape[1]), t2i.ravel()).reshape(t2i.shape)
    sim = sub.copy()
    sim[np.arange(len(sub))[:, None], t2i] = OFFSET + fine
    t2i_recall = retrieval_metrics(sim, split.caption_image[caption_rows])["t2i"]
    i2t = shortlist(dual.T, candidates)
    imgs = np.repeat(np.arange(dual.shape[1]), i2t.shape[1])
    sim_i2t = dual.T.copy()
    sim_i2t[np.arange(dual.shape[1])[:, None], i2t] = OFFSET + score_pairs(model, split, i2t.ravel(), imgs).reshape(i2t.shape)
    i2t_recall = retrieval_metrics(sim_i2t.T, split.caption_image)["i2t"]
    return {"t2i": t2i_recall, "i2t": i2t_recall, "rsum": sum(t2i_recall.values()) + sum(i2t_recall.values())}


class VLDecomposed(nn.Module):
    """The cross-encoder's layers run on each modality alone (after VLDeformer): a dual encoder again.

    Only the cross-encoder's *correction* is decomposed: score = s * (dual cosine) + <u, v>, with u a
    linear map of the caption's [CLS] output of the layers run on its words alone and v a unit vector
    from the image's global-token output of the layers run on its regions alone. u's map starts at
    zero, so the untrained decomposition ranks exactly as the teacher while v (and through it, u's
    map) still gets a gradient from the first step; gallery images are encoded once (the dual
    embedding plus v), so a query costs one text encoding and a matrix product.
    """

    def __init__(self, cross: VLCrossEncoder, dim: int = 256):
        super().__init__()
        self.cross = copy.deepcopy(cross)
        width = cross.config["width"]
        self.text_out, self.image_out = nn.Linear(width, dim), nn.Linear(width, dim)
        nn.init.zeros_(self.text_out.weight)
        nn.init.zeros_(self.text_out.bias)
        self.residual_scale = cross.residual_scale
        self.config = {**cross.config, "decomposed_dim": dim}

    def _run(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return run_bert_layers(self.cross.layers, h, keep)[:, 0]

    def encode_text(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[T, dim] correction vectors (not normalised: their length is how much a caption corrects)
        from lower-layer states [T, L, width] ([CLS] first)."""
        return self.text_out(self._run(states, mask))

    def encode_image(self, regions: torch.Tensor) -> torch.Tensor:
        """[I, dim] unit vectors from region features [I, R, 1280] (the global token's output)."""
        tokens = self.cross.image_tokens(regions)
        return F.normalize(self.image_out(self._run(tokens, torch.ones(tokens.shape[:2]))), dim=-1)

    def score_pairs(self, regions: torch.Tensor, states: torch.Tensor, mask: torch.Tensor,
                    cos: torch.Tensor) -> torch.Tensor:
        u, v = self.encode_text(states, mask), self.encode_image(regions)
        return (u * v).sum(-1) + self.residual_scale * cos

    def full_scores(self, split: CrossSplit, batch: int = 250) -> np.ndarray:
        """Exhaustive [captions, images] scores: every caption against every image, as a dual encoder."""
        self.eval()
        with torch.inference_mode():
            v = torch.cat([self.encode_image(split.fine.region_batch(np.arange(s, min(s + batch, len(split)))))
                           for s in range(0, len(split), batch)])
            n = split.fine.n_captions
            u = torch.cat([self.encode_text(*split.lower.token_batch(np.arange(s, min(s + batch, n))))
                           for s in range(0, n, batch)])
            return (u @ v.T + self.residual_scale * (split.texts @ split.images.T)).numpy()
