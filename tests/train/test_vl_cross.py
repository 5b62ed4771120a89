"""The cross-encoder on MiniLM's pretrained layers: starts at the teacher, learns to match, resumes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from matcher.finegrained.cross_train import VLCrossRecipe, hard_negative_captions, vl_cross_groups
from matcher.finegrained.features import FineSplit
from matcher.finegrained.vl_cross import CrossSplit, VLCrossEncoder
from matcher.train.loop import Optimiser, Resume, fit

CAPTIONS = ["a black dog runs across the grass", "two children play in the snow", "a man rides a red bicycle",
            "a woman sits on a park bench", "a boat sails on a calm lake", "a cat sleeps on a sofa"]


@pytest.fixture(scope="module")
def tower():
    from matcher.models.towers import MiniLMTextTower

    return MiniLMTextTower(trainable_layers=2).eval()


def _lower_states(tower, texts):
    tok = tower.tokenize(texts)
    with torch.inference_mode():
        h = tower.forward_trunk(tok["input_ids"], tok["attention_mask"])
    lengths = tok["attention_mask"].sum(1).tolist()
    tokens = np.concatenate([row[:n].numpy() for row, n in zip(h, lengths)]).astype(np.float16)
    return tokens, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _split(tower, region_dim=32, seed=0) -> tuple[CrossSplit, nn.Linear, nn.Linear]:
    """6 'images' (random 7x7 region maps) each owning one real caption."""
    torch.manual_seed(seed)
    image_head, text_head = nn.Linear(region_dim, 16), nn.Linear(384, 16)
    regions = np.random.default_rng(seed).normal(size=(len(CAPTIONS), 49, region_dim)).astype(np.float16)
    tokens, offsets = _lower_states(tower, CAPTIONS)
    fine = FineSplit(regions, tokens, offsets, captions_per_image=1)  # dual embeddings from lower states: any vectors do
    return CrossSplit.build(fine, tokens, offsets, image_head, text_head), image_head, text_head


def _model(tower, image_head, text_head, residual_scale, seed=0):
    torch.manual_seed(seed)
    return VLCrossEncoder(tower.top_modules(), tower.layers[tower.split - 1].output.LayerNorm, image_head, text_head,
                          residual_scale, grid=2)


def test_untrained_score_is_the_scaled_dual_cosine(tower):
    split, ih, th = _split(tower)
    model = _model(tower, ih, th, residual_scale=20.0).eval()
    caps, imgs = np.repeat(np.arange(6), 6), np.tile(np.arange(6), 6)
    with torch.inference_mode():
        scores = model.score_pairs(*split.pairs(caps, imgs))
    expected = 20.0 * torch.from_numpy(split.dual[caps, imgs])
    assert torch.allclose(scores, expected, atol=1e-5)
    assert model.layers[0] is not tower.layers[tower.split]  # a copy: training never touches the teacher


def test_padding_does_not_change_a_pair_score(tower):
    split, ih, th = _split(tower)
    model = _model(tower, ih, th, residual_scale=0.0).eval()
    nn.init.normal_(model.head[-1].weight)
    regions, states, mask, cos = split.pairs(np.array([0]), np.array([0]))
    padded_states = torch.cat([states, torch.randn(1, 5, 384)], 1)
    padded_mask = torch.cat([mask, torch.zeros(1, 5, dtype=torch.bool)], 1)
    with torch.inference_mode():
        assert torch.allclose(model.score_pairs(regions, states, mask, cos),
                              model.score_pairs(regions, padded_states, padded_mask, cos), atol=1e-4)


def _train(model, split, steps, resume=None, fail_at=None):
    rng = np.random.default_rng(0)
    recipe = VLCrossRecipe(batch_size=3, negatives=2, pool=3)
    neg_t2i = np.stack([np.delete(np.arange(6), i)[:3] for i in range(6)])
    neg_i2t = hard_negative_captions(split.dual, split.caption_image, 3)

    def loss(batch):
        if fail_at is not None and len(losses) == fail_at:
            raise KeyboardInterrupt  # the run is killed in this step
        scores = model.score_pairs(*split.pairs(*batch)).view(-1, recipe.negatives + 1)
        out = nn.functional.cross_entropy(scores, torch.zeros(len(scores), dtype=torch.long))
        losses.append(out.item())
        return out

    losses: list[float] = []
    optimiser = Optimiser([{"params": list(model.parameters()), "lr": 1e-3}], 0.0, steps, pct_start=0.1)
    fit(model, optimiser, loss, lambda _r: [vl_cross_groups(split, recipe, rng, neg_t2i, neg_i2t)],
        lambda r: {"val_rsum": -r.loss, "step": r.index}, rounds=steps,
        resume=None if resume is None else Resume(resume, rng))
    return losses


def test_pretrained_cross_encoder_learns_matched_above_shuffled(tower):
    split, ih, th = _split(tower)
    model = _model(tower, ih, th, residual_scale=0.0)
    for p in model.parameters():
        p.requires_grad_(True)
    losses = _train(model, split, steps=40)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    model.eval()
    caps = np.arange(6)
    with torch.inference_mode():
        matched = model.score_pairs(*split.pairs(caps, caps))
        shuffled = model.score_pairs(*split.pairs(caps, np.roll(caps, 1)))
    assert (matched > shuffled).float().mean() >= 5 / 6


def test_hard_negative_captions_never_include_the_images_own(tower):
    dual = np.random.default_rng(0).normal(size=(30, 6))
    caption_image = np.repeat(np.arange(6), 5)
    neg = hard_negative_captions(dual, caption_image, 8)
    assert neg.shape == (6, 8)
    assert all((caption_image[neg[i]] != i).all() for i in range(6))


def test_a_killed_run_resumes_to_the_same_weights(tower, tmp_path):
    split, ih, th = _split(tower)
    straight = _model(tower, ih, th, residual_scale=5.0)
    _train(straight, split, steps=6)
    resumed = _model(tower, ih, th, residual_scale=5.0)
    state = tmp_path / "run.resume.pt"
    with pytest.raises(KeyboardInterrupt):
        _train(resumed, split, steps=6, resume=state, fail_at=3)
    assert state.exists()
    again = _model(tower, ih, th, residual_scale=5.0)  # a new process: fresh module, state from the file
    _train(again, split, steps=6, resume=state)
    for a, b in zip(straight.state_dict().values(), again.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)


class _Teacher(nn.Module):
    """The parts of a towers teacher the vl-cross loader reads: text tower, heads, logit scale."""

    def __init__(self, tower, region_dim=32):
        super().__init__()
        self.text_tower = tower
        self.image_head, self.text_head = nn.Sequential(nn.Linear(region_dim, 16)), nn.Sequential(nn.Linear(384, 16))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))


@pytest.mark.parametrize("kind", ["vl-cross", "vl-decomposed"])
def test_checkpoint_round_trip_scores_the_same(tower, tmp_path, kind):
    from matcher.finegrained.checkpoints import teacher_heads
    from matcher.finegrained.vl_cross import VLDecomposed, build_vl_cross, load_vl_cross, save_vl_cross

    teacher = _Teacher(tower)
    ih, th, scale = teacher_heads(teacher)
    split, _, _ = _split(tower)
    model = build_vl_cross(teacher, ih, th, scale, grid=2)
    nn.init.normal_(model.head[-1].weight)
    recipe = {"residual": True, "grid": 2}
    if kind == "vl-decomposed":
        model = VLDecomposed(model)
        nn.init.normal_(model.text_out.weight)
        recipe = {"cross_recipe": recipe}
    save_vl_cross(tmp_path / "m.pt", model, kind, recipe, {})
    loaded, loaded_recipe, _ = load_vl_cross(tmp_path / "m.pt", teacher)
    assert loaded_recipe["tier"] == kind
    caps = np.arange(6)
    with torch.inference_mode():
        a = model.eval().score_pairs(*split.pairs(caps, caps[::-1].copy()))
        b = loaded.score_pairs(*split.pairs(caps, caps[::-1].copy()))
    assert torch.allclose(a, b, atol=2e-2)  # stored as float16
    assert not torch.allclose(a, scale * torch.from_numpy(split.dual[caps, caps[::-1]]), atol=1e-3)


def test_decomposition_starts_at_the_teacher_and_its_distillation_lowers_the_loss(tower):
    from matcher.finegrained.vl_cross import VLDecomposed

    split, ih, th = _split(tower)
    cross = _model(tower, ih, th, residual_scale=5.0)
    nn.init.normal_(cross.head[-1].weight, std=5.0)  # a cross-encoder whose correction is far from zero
    cross.eval()
    torch.manual_seed(0)
    decomposed = VLDecomposed(cross)
    full = decomposed.full_scores(split)
    assert np.allclose(full, 5.0 * split.dual, atol=1e-5)  # u's map at zero: exactly the scaled dual cosine
    caps, imgs = np.repeat(np.arange(6), 6), np.tile(np.arange(6), 6)
    inputs = split.pairs(caps, imgs)
    with torch.no_grad():
        target = cross.score_pairs(*inputs).view(6, 6)

    def loss() -> torch.Tensor:
        scores = decomposed.score_pairs(*inputs).view(6, 6)
        return -(torch.softmax(target, 1) * torch.log_softmax(scores, 1)).sum(1).mean()

    decomposed.eval()  # no dropout: a deterministic loss to compare
    opt = torch.optim.AdamW([*decomposed.text_out.parameters(), *decomposed.image_out.parameters()], lr=3e-3)
    floor = -(torch.softmax(target, 1) * torch.log_softmax(target, 1)).sum(1).mean().item()  # loss at a perfect copy
    first = loss().item()
    for _ in range(60):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    assert loss().item() - floor < 0.7 * (first - floor)
    assert decomposed.text_out.weight.abs().sum() > 0


def test_a_corrupted_resume_file_is_refused_with_its_name(tower, tmp_path):
    split, ih, th = _split(tower)
    state = tmp_path / "run.resume.pt"
    state.write_bytes(b"not a torch file")
    with pytest.raises(RuntimeError, match="cannot resume from .*run.resume.pt.*delete it"):
        _train(_model(tower, ih, th, residual_scale=5.0), split, steps=2, resume=state)
    assert state.read_bytes() == b"not a torch file"  # nothing lost: the user decides
