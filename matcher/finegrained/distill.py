"""Per-batch teacher matrices from a trained alignment scorer (``train-fine`` or ``train-tops-alignment``),
for ``matcher.train.student``.

The student trainer distils a [B, B] teacher matrix per batch; by default that is the dual
teacher's ``t_img @ t_txt.T``. ``AlignmentTargets.batch(rows, captions)`` returns the alignment
scorer's matrix for the same batch instead. Regions and tokens are projected once (float16,
about 370 MB for Flickr8k train) so a batch only costs the max-sum itself.

Scale: the logit losses multiply the teacher matrix by a teacher scale. Alignment scores have
their own spread, so ``scale`` is calibrated once so that the alignment logits' mean per-row
standard deviation equals the dual teacher's (logit scale x cosine) on sample train batches:
the same "sharpness" of targets, only the ranking information differs.

Fused: ``teacher_scores="fused:PATH@LAMBDA"`` distils the fused re-ranker's score instead,
``F = t_img @ t_txt.T + LAMBDA * alignment(PATH)`` -- the dual teacher's cosine plus LAMBDA times the
raw alignment score, exactly the score ``rerank_metrics(fuse=LAMBDA)`` ranks a shortlist by (e.g.
``fused:assets/models/fine/alignment-sum.pt@0.0625``, the best non-N-to-N tier in
docs/finegrained.md). It is in the dual teacher's cosine units, so its logits use the dual
teacher's own logit scale (no calibration): ``s * F = dual logits + LAMBDA * (s * alignment)``, and
LAMBDA = 0 gives the dual teacher's matrix and scale exactly. Unlike the re-ranker, which fuses
only the top-C shortlist, every in-batch pair gets the fused score.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from matcher.finegrained.checkpoints import load_scorer, teacher_heads
from matcher.finegrained.features import FineSplit, fine_features
from matcher.finegrained.scorers import max_sum
from matcher.train.features import Flickr8k


DUAL = "dual"
FUSED_PREFIX = "fused:"


def parse_teacher_scores(spec: str) -> tuple[str, str | None, float]:
    """``"dual"`` -> ("dual", None, 0); ``"fused:PATH@LAMBDA"`` -> ("fused", PATH, LAMBDA);
    anything else is an alignment scorer's path -> ("alignment", PATH, 0). Raises ValueError on a
    fused spec without a path or a numeric LAMBDA >= 0."""
    if spec == DUAL:
        return DUAL, None, 0.0
    if spec.startswith(FUSED_PREFIX):
        path, sep, weight = spec[len(FUSED_PREFIX):].rpartition("@")
        try:
            lam = float(weight)
        except ValueError:
            lam = float("nan")
        if not sep or not path or not lam >= 0:
            raise ValueError(f"teacher_scores {spec!r}: write fused:PATH@LAMBDA, e.g. "
                             f"fused:assets/models/fine/alignment-sum.pt@0.0625 (LAMBDA >= 0)")
        return "fused", path, lam
    return "alignment", spec, 0.0


class TeacherScores:
    """The per-batch teacher matrix the student distils, and the scale that turns it into logits.

    ``kind`` as ``parse_teacher_scores`` returns it; ``alignment`` is anything with
    ``batch(rows, captions) -> [B, B]`` (an ``AlignmentTargets``), unused for "dual".
    ``dual_scale`` is the dual teacher's logit scale; for "alignment" the scale is the alignment
    targets' calibrated one (``AlignmentTargets.calibrate``).
    """

    def __init__(self, kind: str, dual_scale: float, alignment=None, weight: float = 0.0):
        if kind != DUAL and alignment is None:
            raise ValueError(f"teacher scores {kind!r} need an alignment scorer")
        self.kind, self.alignment, self.weight = kind, alignment, weight
        self.scale = float(alignment.scale) if kind == "alignment" else float(dual_scale)

    def batch(self, rows: np.ndarray, captions: np.ndarray, t_img: torch.Tensor, t_txt: torch.Tensor) -> torch.Tensor:
        """[B, B] teacher matrix of the batch: rows = images (``t_img`` [B, D]), columns = captions."""
        if self.kind == "alignment":
            return self.alignment.batch(rows, captions)
        dual = t_img @ t_txt.T
        if self.kind == DUAL:
            return dual
        return dual + self.weight * self.alignment.batch(rows, captions)


def teacher_scores(spec: str, data: Flickr8k, teacher: str | Path, t_images: torch.Tensor, t_texts: torch.Tensor,
                   dual_scale: float, batch_size: int, seed: int = 0) -> TeacherScores:
    """The ``TeacherScores`` a recipe's ``teacher_scores`` field names (alignment scorer loaded and,
    for the pure alignment matrix, its scale calibrated on train batches)."""
    kind, path, weight = parse_teacher_scores(spec)
    if kind == DUAL:
        return TeacherScores(DUAL, dual_scale)
    alignment = AlignmentTargets(data, teacher, path)
    if kind == "alignment":
        alignment.calibrate(t_images, t_texts, batch_size, seed=seed)
    return TeacherScores(kind, dual_scale, alignment, weight)


class AlignmentTargets:
    """Alignment scores of any train batch (images by row id, captions by caption id)."""

    def __init__(self, data: Flickr8k, teacher: str | Path, scorer_path: str | Path, batch_size: int = 500):
        from matcher.finegrained.tops import is_tops_checkpoint

        image_head, text_head, self.dual_scale = teacher_heads(teacher)
        self.scale = 1.0
        if is_tops_checkpoint(scorer_path):
            self._from_tops(data, teacher, scorer_path)
            return
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

    def _from_tops(self, data: Flickr8k, teacher: str | Path, path: str | Path) -> None:
        """A ``tops-alignment`` scorer: its own tops run once over train from the trunk caches (first view,
        as for the other scorers); its word vectors are a prefix of each padded row, kept ragged."""
        from matcher.finegrained.tops import cached_splits, encode_cached, load_tops

        module, splits = cached_splits(data, teacher, ("train",))
        model, recipe, _ = load_tops(path, module)
        enc = encode_cached(model, splits["train"])
        self.reduce = recipe["reduce"]
        self.regions = enc.images.half()
        self.tokens = enc.texts[enc.mask].half()  # row-major: caption by caption, words in order
        self.offsets = np.concatenate([[0], np.cumsum(enc.mask.sum(1).numpy())]).astype(np.int64)

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


def fused_composition(align: AlignmentTargets, t_images: torch.Tensor, t_texts: torch.Tensor, weight: float,
                      batch_size: int = 256, batches: int = 8, seed: int = 0) -> dict:
    """What the fused teacher matrix is made of, on random train batches like the student's (one
    caption per image; ``t_images`` [N, D] the teacher's unflipped train image embeddings,
    ``t_texts`` its caption embeddings, e.g. from ``matcher.train.student.teacher_targets``):
    per-row (image -> captions) and per-column spread of the dual cosine and of ``weight`` x
    alignment, in-batch R@1 of dual / alignment / fused in both directions, how often fusing
    changes a row's or column's top-1, the mean per-row Spearman correlation of fused and dual,
    and the correlation of a caption's mean alignment score with its token count."""
    rng = np.random.default_rng(seed)
    acc: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        acc.setdefault(key, []).append(float(value))

    def ranks(x: torch.Tensor) -> torch.Tensor:
        return x.argsort(1).argsort(1).float()

    for _ in range(batches):
        rows = rng.choice(len(t_images), batch_size, replace=False)
        captions = rows * 5 + rng.integers(0, 5, batch_size)
        dual = t_images[rows] @ t_texts[captions].T
        a = align.batch(rows, captions)
        fused = dual + weight * a
        eye = torch.arange(batch_size)
        add("dual_row_std", dual.std(1).mean())
        add("align_row_std_weighted", (weight * a).std(1).mean())
        add("dual_col_std", dual.std(0).mean())
        add("align_col_std_weighted", (weight * a).std(0).mean())
        for name, m in (("dual", dual), ("align", a), ("fused", fused)):
            add(f"{name}_i2t_R@1", (m.argmax(1) == eye).float().mean() * 100)
            add(f"{name}_t2i_R@1", (m.argmax(0) == eye).float().mean() * 100)
        add("top1_changed_rows_pct", (fused.argmax(1) != dual.argmax(1)).float().mean() * 100)
        add("top1_changed_cols_pct", (fused.argmax(0) != dual.argmax(0)).float().mean() * 100)
        rd, rf = ranks(dual), ranks(fused)
        rd, rf = rd - rd.mean(1, keepdim=True), rf - rf.mean(1, keepdim=True)
        add("row_spearman_fused_dual", ((rd * rf).sum(1) / (rd.norm(dim=1) * rf.norm(dim=1))).mean())
        lengths = torch.from_numpy((align.offsets[captions + 1] - align.offsets[captions]).astype(np.float32))
        add("caption_mean_align_vs_length_corr", torch.corrcoef(torch.stack([a.mean(0), lengths]))[0, 1])
    return {"weight": weight, "batch_size": batch_size,
            "batches": batches, "seed": seed, **{k: round(float(np.mean(v)), 4) for k, v in acc.items()}}


class FineTeacher:
    """The per-batch teacher matrix of a fine scorer's training (``train-fine`` with ``distill_from:
    "fused:PATH@LAMBDA"``): the same ``TeacherScores`` the student distils, on the fine split's rows and
    caption ids, with the dual teacher's embeddings of that split. This is how a code tier is shrunk
    from a better, slower tier (e.g. tops-alignment) while it keeps reading the teacher's features."""

    def __init__(self, scores: TeacherScores, images: torch.Tensor, texts: torch.Tensor):
        self.scores, self.images, self.texts = scores, images, texts

    def batch(self, rows: np.ndarray, captions: np.ndarray) -> torch.Tensor:
        return self.scores.batch(rows, captions, self.images[torch.from_numpy(rows)],
                                 self.texts[torch.from_numpy(captions)])


def fine_teacher(spec: str, data: Flickr8k, teacher: str | Path, train: FineSplit, image_head, text_head,
                 batch_size: int = 128) -> FineTeacher:
    """The ``FineTeacher`` a ``fused:PATH@LAMBDA`` spec names (PATH: a train-fine alignment scorer or a
    train-tops-alignment checkpoint), on ``train`` (the teacher's fine features)."""
    from matcher.finegrained.features import dual_embeddings

    kind, _, _ = parse_teacher_scores(spec)
    if kind != "fused":
        raise ValueError(f"distill_from {spec!r}: a fine scorer distils another scorer's checkpoint, or "
                         "fused:PATH@LAMBDA (the dual cosine + LAMBDA x that scorer)")
    images, texts = dual_embeddings(train, image_head, text_head)
    scale = teacher_heads(teacher)[2]
    return FineTeacher(teacher_scores(spec, data, teacher, images, texts, scale, batch_size), images, texts)
