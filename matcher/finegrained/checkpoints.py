"""Fine-tier checkpoints: what a trained scorer is (its recipe), how it is saved and rebuilt, and the
teacher heads it starts from. Apart from training so that serving a fine tier (``matcher.registry``)
loads weights without importing any trainer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from matcher.atomic import atomic_path
from matcher.finegrained.scorers import AlignmentScorer, CodeScorer
from matcher.models.dual_encoder import load_checkpoint

FORMAT = "matcher-fine-scorer/1"
DEFAULT_TEACHER = "assets/models/offline-teacher.pt"


@dataclass
class FineRecipe:
    """Everything that determines a trained fine scorer (stored with its weights)."""

    tier: str = "alignment"      # alignment | codes
    reduce: str = "mean"         # word aggregation: sum | mean
    codes: int = 16              # M, codes tier only
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 1e-4
    loss: str = "triplet"        # triplet (VSE++ hinge, hardest negatives) | contrastive (InfoNCE at distill_scale)
    margin: float = 0.2
    dropout: float = 0.1
    freeze_projections: bool = False  # keep the teacher's heads; train only what the tier adds (code pooling)
    distill_weight: float = 1.0  # only with a teacher scorer
    distill_scale: float = 20.0  # logit scale applied to both matrices in the ListNet term
    candidates: int = 20         # val shortlist size for re-ranker selection
    seed: int = 0
    distill_from: str = ""       # a trained (larger) fine scorer to start from and distil (shrinking codes),
                                 # or fused:PATH@LAMBDA: distil dual + LAMBDA x that scorer (e.g. tops-alignment)
    # codes tier, Inflate & Shrink that inflates (docs/inflate-shrink.md); the defaults are the original
    # (collapsed) code scorer, so checkpoints trained before these fields existed rebuild unchanged
    query_init: str = "random"   # random (std 0.02: every code starts as the mean region) | kmeans (key centroids)
    query_lr_mult: float = 1.0   # the code queries' peak learning rate is lr * query_lr_mult
    pool_scale: float = 1.0      # pooling logits q.k / sqrt(D) times this: > 1 sharpens the softmax over regions
    diversity_weight: float = 0.0  # weight of the code diversity term (losses.CodeDiversityLoss)
    dual_weight: float = 0.0     # score = late interaction + dual_weight * the teacher's pooled cosine


def build_scorer(recipe: FineRecipe, image_head: torch.nn.Linear, text_head: torch.nn.Linear):
    if recipe.tier == "alignment":
        return AlignmentScorer(image_head, text_head, recipe.reduce, recipe.dropout)
    if recipe.tier == "codes":
        return CodeScorer(image_head, text_head, recipe.codes, recipe.reduce, recipe.dropout, recipe.pool_scale,
                          recipe.dual_weight)
    raise ValueError(f"unknown fine tier {recipe.tier!r}")


def teacher_heads(teacher: str | Path | torch.nn.Module = DEFAULT_TEACHER) -> tuple[torch.nn.Linear, torch.nn.Linear, float]:
    """Copies of the teacher's projection heads (1280->256, 384->256) and its logit scale.

    ``teacher`` is a checkpoint path, or the already loaded dual-encoder module (the dashboard holds
    the teacher anyway; reading its 100 MB checkpoint a second time only for two heads was waste).
    """
    module = teacher if isinstance(teacher, torch.nn.Module) else load_checkpoint(teacher).module
    if not (hasattr(module, "image_head") and hasattr(module, "text_head")):
        raise ValueError(f"the fine re-ranker needs a towers dual encoder as its base, not {type(module).__name__}")
    image_head, text_head = module.image_head[-1], module.text_head[-1]
    return (_copy_linear(image_head), _copy_linear(text_head), float(module.logit_scale.detach().exp().clamp(max=100)))


def _copy_linear(layer: torch.nn.Linear) -> torch.nn.Linear:
    out = torch.nn.Linear(layer.in_features, layer.out_features)
    out.load_state_dict(layer.state_dict())
    return out


def save_scorer(path: str | Path, scorer, recipe: FineRecipe, metadata: dict | None = None) -> None:
    """Trained weights only (float16), with the recipe that rebuilds the module, atomically."""
    state = {k: v.half() for k, v in scorer.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "recipe": asdict(recipe), "state_dict": state, "metadata": metadata or {}}, tmp)


CROSS_FORMAT = "matcher-fine-cross/1"
_FROZEN = ("tokens.image_head.", "tokens.text_head.")  # copies of the teacher's heads: rebuilt, not stored


def save_cross(path: str | Path, kind: str, module: torch.nn.Module, recipe: dict, metadata: dict) -> None:
    """A cross-encoder (``kind="cross"``) or its decomposition, trained weights only, float16."""
    state = {k: v.half() for k, v in module.state_dict().items() if not any(f in k for f in _FROZEN)}
    with atomic_path(path) as tmp:
        torch.save({"format": CROSS_FORMAT, "kind": kind, "recipe": recipe, "state_dict": state,
                    "metadata": metadata}, tmp)


def load_cross(payload: dict, image_head: torch.nn.Linear, text_head: torch.nn.Linear):
    from matcher.finegrained.cross import CrossEncoder, DecomposedEncoder

    r = payload["recipe"]
    module = CrossEncoder(image_head, text_head, r["dim"], r["layers"], r["heads"], r["ffn"], r["dropout"],
                          residual_scale=r.get("residual_scale", 0.0))
    if payload["kind"] == "decomposed":
        module = DecomposedEncoder(module)
    missing, unexpected = module.load_state_dict({k: v.float() for k, v in payload["state_dict"].items()}, strict=False)
    if unexpected or any(not any(f in k for f in _FROZEN) for k in missing):
        raise ValueError(f"cross checkpoint does not match its recipe: {unexpected[:3]} {missing[:3]}")
    return module.eval()


def load_scorer(path: str | Path, image_head: torch.nn.Linear, text_head: torch.nn.Linear):
    """(scorer, recipe, metadata); for cross checkpoints the recipe is a dict with ``tier`` set."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") == CROSS_FORMAT:
        return (load_cross(payload, image_head, text_head), {**payload["recipe"], "tier": payload["kind"]},
                payload["metadata"])
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fine scorer checkpoint ({FORMAT})")
    recipe = FineRecipe(**payload["recipe"])
    scorer = build_scorer(recipe, image_head, text_head)
    scorer.load_state_dict({k: v.float() for k, v in payload["state_dict"].items()})
    return scorer.eval(), recipe, payload["metadata"]
