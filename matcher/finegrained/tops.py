"""ALADIN's alignment score with the teacher's top blocks and layers trained for it (``tops-alignment``).

Why: the first alignment scorers (``scorers.AlignmentScorer``) learn only two linear maps on the
frozen teacher's region and word features, and those features come out of top blocks/layers that
were trained for *mean pooling*. ALADIN back-propagates its alignment loss into the backbone's top
layers. Here that is trained copies of the teacher's last MBConv blocks + conv head and its last
MiniLM layers, run from the trunk caches the teacher itself was fine-tuned from
(``matcher.train.features``), under the alignment score. The teacher stays as it is: it is still
the first stage whose top-C this tier re-ranks (pure, or fused with its cosine), and the dashboard's
other columns keep using it.

Special tokens: [CLS] and [SEP] still take part in the layers' attention but are dropped from the
alignment (ALADIN scores words only): they match every image about equally, so with ``sum`` they
only add a per-caption constant.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from matcher.finegrained.evaluate import Encoded
from matcher.finegrained.scorers import AlignmentScorer
from matcher.models.towers import run_bert_layers
from matcher.train.pairs import CachedSplit

KIND = "tops-alignment"


class TopsAlignment(nn.Module):
    """Copies of the teacher's tops + an alignment scorer whose projections start as the teacher's heads.

    At initialisation (``drop_special=False``) this is exactly ``AlignmentScorer`` on the teacher's
    fine features; training then moves the tops as well as the projections.
    """

    def __init__(self, teacher_module: nn.Module, reduce: str = "sum", dropout: float = 0.1,
                 drop_special: bool = True):
        from matcher.finegrained.checkpoints import teacher_heads

        super().__init__()
        image, text = teacher_module.image_tower, teacher_module.text_tower
        self.image_blocks = nn.ModuleList(copy.deepcopy(list(image.blocks[image.split:])))
        self.image_conv = copy.deepcopy(image.head)
        self.text_layers = nn.ModuleList(copy.deepcopy(list(text.layers[text.split:])))
        image_head, text_head, _ = teacher_heads(teacher_module)
        self.scorer = AlignmentScorer(image_head, text_head, reduce, dropout)
        self.drop_special = drop_special
        self.requires_grad_(True)

    def regions(self, trunk: torch.Tensor) -> torch.Tensor:
        """[I, R, 1280] region vectors of trunk outputs [I, C, H, W] (the teacher's cache split)."""
        h = trunk
        for block in self.image_blocks:
            h = block(h)
        return self.image_conv(h).flatten(2).transpose(1, 2)

    def encode_image(self, trunk: torch.Tensor) -> torch.Tensor:
        """[I, R, D] unit region vectors (what a gallery stores per image)."""
        return self.scorer.encode_image(self.regions(trunk))

    def word_states(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(final token states [T, L', 384], word mask [T, L']) from lower-layer states [T, L, 384] and
        their attention mask [T, L]. With ``drop_special`` the [CLS] column is cut and [SEP] masked,
        so the words stay a prefix of each row (what ``evaluate.pair_scores`` trims by)."""
        keep = mask.bool()
        h = run_bert_layers(self.text_layers, states, keep)
        if self.drop_special:
            lengths = keep.sum(1)
            keep = keep.clone()
            keep[torch.arange(len(keep)), (lengths - 1).clamp(min=0)] = False  # [SEP]
            h, keep = h[:, 1:], keep[:, 1:]                                      # [CLS]
        return h, keep

    def encode_text(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(unit word vectors [T, L', D], word mask [T, L']): ``word_states`` through the projection."""
        h, keep = self.word_states(states, mask)
        return self.scorer.encode_text(h, keep), keep

    def score(self, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.scorer.score(image, text, mask)

    def score_pairs(self, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.scorer.score_pairs(image, text, mask)


def encode_cached(model: TopsAlignment, split: CachedSplit, batch_size: int = 200) -> Encoded:
    """A split as the tier stores it (first image view), run from the trunk caches, no grad."""
    model.eval()
    images, texts, masks = [], [], []
    n_captions = len(split.offsets) - 1
    with torch.inference_mode():
        for s in tqdm(range(0, len(split), batch_size), desc="tops-alignment: images", leave=False):
            images.append(model.encode_image(split.image_batch(np.arange(s, min(s + batch_size, len(split))))))
        for s in tqdm(range(0, n_captions, batch_size), desc="tops-alignment: captions", leave=False):
            t, m = model.encode_text(*split.caption_batch(np.arange(s, min(s + batch_size, n_captions))))
            texts.append(t)
            masks.append(m)
    length = max(t.shape[1] for t in texts)
    texts = [nn.functional.pad(t, (0, 0, 0, length - t.shape[1])) for t in texts]
    masks = [nn.functional.pad(m, (0, length - m.shape[1])) for m in masks]
    return Encoded(torch.cat(images), torch.cat(texts), torch.cat(masks))


def save_tops(path, model: TopsAlignment, recipe: dict, metadata: dict) -> None:
    """Every weight of the tier (its tops are trained too), float16, atomically."""
    from matcher.finegrained.checkpoints import save_cross

    save_cross(path, KIND, model, recipe, metadata)


def is_tops_checkpoint(path) -> bool:
    from matcher.finegrained.checkpoints import CROSS_FORMAT

    payload = torch.load(path, map_location="cpu", weights_only=True)
    return payload.get("format") == CROSS_FORMAT and payload.get("kind") == KIND


def load_tops(path, teacher_module: nn.Module) -> tuple[TopsAlignment, dict, dict]:
    """(model, recipe, metadata), rebuilt on the teacher it was trained from (the shapes come from there)."""
    from matcher.finegrained.checkpoints import CROSS_FORMAT

    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != CROSS_FORMAT or payload.get("kind") != KIND:
        raise ValueError(f"{path} is not a {KIND} checkpoint")
    r = payload["recipe"]
    model = TopsAlignment(teacher_module, r["reduce"], r["dropout"], r["drop_special"])
    model.load_state_dict({k: v.float() for k, v in payload["state_dict"].items()})
    return model.eval(), {**r, "tier": KIND}, payload["metadata"]


def cached_splits(data, teacher, splits=("train", "val", "test")):
    """(teacher module, {split: CachedSplit}) from the teacher's own trunk caches; ``data`` is the
    Flickr8k folder or an already loaded ``Flickr8k``."""
    from matcher.models.dual_encoder import load_checkpoint
    from matcher.train.features import Flickr8k, cached_image_features, cached_text_features

    flickr = data if isinstance(data, Flickr8k) else Flickr8k.load(data)
    module = load_checkpoint(teacher).module.eval()
    image, text = module.image_tower, module.text_tower
    image_feats = cached_image_features(flickr, image.variant, image.image_size, image.trainable_blocks)
    text_feats = cached_text_features(flickr, text.trainable_layers)
    return module, {s: CachedSplit.from_features(image_feats, text_feats, s) for s in splits}


def dual_matrix(module: nn.Module, split: CachedSplit) -> np.ndarray:
    """The dual teacher's [captions, images] cosines on a cached split (first view): the shortlists this
    tier re-ranks."""
    from matcher.train.teacher import embed_split

    images, texts = embed_split(module, split)
    return (texts @ images[:, 0].T).numpy()

