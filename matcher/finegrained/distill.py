"""Per-batch teacher matrices from a trained alignment scorer, for ``matcher.train.student``.

The student trainer distils a [B, B] teacher matrix per batch; by default that is the dual
teacher's ``t_img @ t_txt.T``. ``AlignmentTargets.batch(rows, captions)`` returns the alignment
scorer's matrix for the same batch instead. Regions and tokens are projected once (float16,
about 370 MB for Flickr8k train) so a batch only costs the max-sum itself.

Scale: the logit losses multiply the teacher matrix by a teacher scale. Alignment scores have
their own spread, so ``scale`` is calibrated once so that the alignment logits' mean per-row
standard deviation equals the dual teacher's (logit scale x cosine) on sample train batches:
the same "sharpness" of targets, only the ranking information differs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from matcher.finegrained.checkpoints import load_scorer, teacher_heads
from matcher.finegrained.features import FineSplit, fine_features
from matcher.finegrained.scorers import max_sum
from matcher.train.features import Flickr8k


class AlignmentTargets:
    """Alignment scores of any train batch (images by row id, captions by caption id)."""

    def __init__(self, data: Flickr8k, teacher: str | Path, scorer_path: str | Path, batch_size: int = 500):
        image_head, text_head, self.dual_scale = teacher_heads(teacher)
        scorer, recipe, _ = load_scorer(scorer_path, image_head, text_head)
        self.reduce = recipe.reduce
        train: FineSplit = fine_features(data, teacher)["train"]
        self.offsets = train.offsets
        with torch.inference_mode():
            self.regions = torch.cat([scorer.encode_image(train.region_batch(np.arange(s, min(s + batch_size, len(train)))))
                                      for s in range(0, len(train), batch_size)]).half()
            tokens = torch.from_numpy(train.tokens.astype(np.float32))
            self.tokens = torch.cat([torch.nn.functional.normalize(scorer.text_proj(tokens[s:s + 20000]), dim=-1)
                                     for s in range(0, len(tokens), 20000)]).half()
        self.scale = 1.0

    def batch(self, rows: np.ndarray, captions: np.ndarray) -> torch.Tensor:
        """[B, B] alignment scores, rows = images, columns = captions (raw, unscaled)."""
        starts, ends = self.offsets[captions], self.offsets[captions + 1]
        length = int((ends - starts).max())
        text = torch.zeros(len(captions), length, self.tokens.shape[1])
        mask = torch.zeros(len(captions), length, dtype=torch.bool)
        for i, (s, e) in enumerate(zip(starts, ends)):
            text[i, : e - s] = self.tokens[s:e].float()
            mask[i, : e - s] = True
        with torch.inference_mode():
            return max_sum(self.regions[torch.from_numpy(rows)].float(), text, mask, self.reduce).clone()

    def calibrate(self, t_images: torch.Tensor, t_texts: torch.Tensor, batch_size: int, batches: int = 4,
                  seed: int = 0) -> float:
        """Set ``scale`` so per-row score spread matches the dual teacher's logits (see module doc)."""
        rng = np.random.default_rng(seed)
        ratios = []
        for _ in range(batches):
            rows = rng.choice(len(self.regions), batch_size, replace=False)
            captions = rows * 5 + rng.integers(0, 5, batch_size)
            dual = self.dual_scale * (t_images[rows, 0] @ t_texts[captions].T)
            ratios.append(float(dual.std(1).mean() / self.batch(rows, captions).std(1).mean()))
        self.scale = float(np.mean(ratios))
        return self.scale
