"""tops-alignment: ALADIN's alignment with copies of the teacher's tops trained (small real towers, bundled photos)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from matcher.finegrained.scorers import AlignmentScorer, max_sum
from matcher.finegrained.tops import TopsAlignment, encode_cached, load_tops, save_tops
from matcher.finegrained.tops_train import TopsRecipe, train_tops
from matcher.train.losses import TripletHingeLoss
from matcher.train.loop import Optimiser, fit, train_frozen_batchnorm
from matcher.train.pairs import CachedSplit
from tests.helpers import BUNDLED, bundled_rows

N = 6


@pytest.fixture(scope="module")
def teacher():
    from matcher.models.dual_encoder import DualEncoderModule

    torch.manual_seed(0)
    return DualEncoderModule({
        "image_tower": {"type": "efficientnet-lite", "variant": "efficientnet-lite0", "image_size": 64,
                        "trainable_blocks": 1},
        "text_tower": {"type": "minilm", "trainable_layers": 1},
        "embed_dim": 32, "head_dropout": 0.0}).eval()


@pytest.fixture(scope="module")
def split(teacher) -> CachedSplit:
    """6 bundled photos (one view) with their first caption, as the teacher's trunk caches hold them."""
    from matcher.models.towers import image_transform

    rows = bundled_rows(N)
    transform = image_transform(64)
    pixels = torch.stack([transform(Image.open(BUNDLED / "images" / r["image"]).convert("RGB")) for r in rows])
    tower = teacher.text_tower
    tok = tower.tokenize([r["captions"][0] for r in rows])
    with torch.inference_mode():
        trunk = teacher.image_tower.forward_trunk(pixels)
        states = tower.forward_trunk(tok["input_ids"], tok["attention_mask"])
    lengths = tok["attention_mask"].sum(1).tolist()
    tokens = np.concatenate([s[:n].numpy() for s, n in zip(states, lengths)]).astype(np.float16)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return CachedSplit(trunk.numpy().astype(np.float16)[:, None], tokens, offsets, captions_per_image=1)


def test_untrained_with_special_tokens_is_the_alignment_scorer_on_the_teachers_features(teacher, split):
    model = TopsAlignment(teacher, "sum", dropout=0.0, drop_special=False).eval()
    image_head, text_head = teacher.image_head[-1], teacher.text_head[-1]
    reference = AlignmentScorer(image_head, text_head, "sum", dropout=0.0).eval()
    trunk = split.image_batch(np.arange(N))
    states, mask = split.caption_batch(np.arange(N))
    with torch.inference_mode():
        regions = teacher.image_tower.forward_top_map(trunk).flatten(2).transpose(1, 2)
        tokens = teacher.text_tower.forward_top_tokens(states, mask)
        want = reference.score(reference.encode_image(regions), reference.encode_text(tokens, mask.bool()), mask.bool())
        got = model.score(model.encode_image(trunk), *model.encode_text(states, mask))
    assert torch.allclose(got, want, atol=1e-4)
    assert model.text_layers[0] is not teacher.text_tower.layers[-1]  # copies: training never moves the teacher


def test_special_tokens_leave_the_alignment_and_words_stay_a_prefix(teacher, split):
    model = TopsAlignment(teacher, "sum", dropout=0.0, drop_special=True).eval()
    states, mask = split.caption_batch(np.arange(N))
    with torch.inference_mode():
        words, keep = model.encode_text(states, mask)
    lengths = mask.sum(1)
    assert keep.sum(1).tolist() == (lengths - 2).tolist()            # [CLS] and [SEP] gone
    assert all(bool(row[: int(n)].all()) and not bool(row[int(n):].any()) for row, n in zip(keep, lengths - 2))
    assert float(words[~keep].abs().max()) == 0.0                     # nothing left at masked places
    # the score of caption 0 does not depend on how far the batch pads it
    with torch.inference_mode():
        alone = model.encode_text(*split.caption_batch(np.array([0])))
        image = model.encode_image(split.image_batch(np.array([0])))
        assert torch.allclose(model.score(image, *alone)[0, 0], model.score(image, words[:1], keep[:1])[0, 0], atol=1e-4)


def test_a_few_steps_rank_each_photo_above_the_others_for_its_caption(teacher, split):
    torch.manual_seed(0)
    model = TopsAlignment(teacher, "sum", dropout=0.0, drop_special=True)
    before = [p.detach().clone() for p in teacher.parameters()]
    with torch.inference_mode():
        enc = encode_cached(model, split)
        assert max_sum(enc.images, enc.texts, enc.mask).argmax(0).tolist() != list(range(N))  # not solved untrained
    hinge = TripletHingeLoss(0.2)

    def step(_batch):
        images = model.encode_image(split.image_batch(np.arange(N)))
        return hinge(model.score(images, *model.encode_text(*split.caption_batch(np.arange(N)))))

    losses = []
    fit(model, Optimiser([{"params": list(model.parameters()), "lr": 3e-4}], 0.0, 40), step,
        lambda _r: [None] * 40, lambda r: losses.append(r.loss) or None, rounds=1, train_mode=train_frozen_batchnorm)
    enc = encode_cached(model, split)
    with torch.inference_mode():
        scores = max_sum(enc.images, enc.texts, enc.mask)             # [images, captions]
    assert scores.argmax(0).tolist() == list(range(N))                 # every caption finds its photo
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))


def test_checkpoint_round_trip_and_a_foreign_file_is_refused(teacher, split, tmp_path):
    torch.manual_seed(1)
    model = TopsAlignment(teacher, "mean", dropout=0.0, drop_special=True).eval()
    with torch.no_grad():
        model.text_layers[0].output.dense.weight.add_(0.01 * torch.randn_like(model.text_layers[0].output.dense.weight))
    path = tmp_path / "tops.pt"
    save_tops(path, model, {**TopsRecipe(reduce="mean", dropout=0.0).__dict__}, {"best_epoch": 3})
    loaded, recipe, meta = load_tops(path, teacher)
    a, b = encode_cached(model, split), encode_cached(loaded, split)
    assert recipe["tier"] == "tops-alignment" and meta["best_epoch"] == 3
    with torch.inference_mode():
        assert torch.allclose(model.score(a.images, a.texts, a.mask), loaded.score(b.images, b.texts, b.mask), atol=2e-2)
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a tops-alignment checkpoint"):
        load_tops(tmp_path / "other.pt", teacher)


def test_training_keeps_the_best_val_epoch_and_resumes(teacher, split, tmp_path):
    """train_tops on the tiny split used as train and val: epoch 0 is the untrained copy, the best
    val epoch is the one returned, and the resume file carries the whole selection."""
    dual = np.random.default_rng(0).normal(size=(N, N)).astype(np.float32)
    recipe = TopsRecipe(epochs=2, caption_passes=1, batch_size=N, lr=1e-3, tower_lr=1e-4, dropout=0.0, candidates=3)
    torch.manual_seed(0)
    model = TopsAlignment(teacher, "sum", 0.0, True)
    result = train_tops(model, split, split, dual, recipe, np.random.default_rng(0), resume=tmp_path / "r.pt",
                        log=lambda _line: None)
    assert [e["epoch"] for e in result["history"]] == [0, 1, 2]
    assert result["val"]["rsum"] == max(e["val_rsum"] for e in result["history"])
    # a rerun of the finished command resumes from its state file: no epoch is trained or recorded twice
    again = train_tops(TopsAlignment(teacher, "sum", 0.0, True), split, split, dual, recipe,
                       np.random.default_rng(0), resume=tmp_path / "r.pt", log=lambda _line: None)
    assert [e["epoch"] for e in again["history"]] == [0, 1, 2]
    assert again["val"] == result["val"]


def test_student_teacher_matrix_from_a_tops_checkpoint_is_its_alignment_score(teacher, split, tmp_path, monkeypatch):
    """``teacher_scores=fused:tops-alignment.pt@λ``: the per-batch matrix the student distils is the
    tier's own score of those pairs (ragged word storage, any batch order)."""
    import matcher.finegrained.tops as tops
    from matcher.finegrained.distill import AlignmentTargets

    torch.manual_seed(2)
    model = TopsAlignment(teacher, "sum", 0.0, True).eval()
    with torch.no_grad():
        for p in model.text_layers.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = tmp_path / "tops.pt"
    save_tops(path, model, {"reduce": "sum", "dropout": 0.0, "drop_special": True}, {})
    monkeypatch.setattr(tops, "cached_splits", lambda data, teacher_, splits: (teacher, {"train": split}))
    targets = AlignmentTargets(None, teacher, path)
    rows, captions = np.array([4, 0, 2]), np.array([5, 1, 0])
    enc = encode_cached(load_tops(path, teacher)[0], split)
    with torch.inference_mode():
        want = model.score(enc.images[rows], enc.texts[captions], enc.mask[captions])
    assert torch.allclose(targets.batch(rows, captions), want, atol=2e-2)
    assert targets.reduce == "sum" and len(targets.offsets) == N + 1
