"""The one training loop (matcher.train.loop): best-on-val selection and restore, steps and their
averages, the optimiser's schedules, seeding; and that every trainer goes through it."""
import inspect

import numpy as np
import pytest
import torch
from torch import nn

from matcher.train.loop import Optimiser, Round, fit, seeded, train_frozen_batchnorm
from matcher.train.selection import BestOnVal


def _linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(2, 1, bias=False)


def _regression_step(layer: nn.Linear):
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])

    def step(target: float) -> torch.Tensor:
        return (layer(x) - target).pow(2).mean()

    return step


def test_fit_keeps_the_best_val_round_restores_it_and_skips_unvalidated_rounds():
    layer = _linear()
    scores = {1: 1.0, 2: 5.0, 3: None, 4: 5.0, 5: 2.0}  # round 3 not validated; 4 ties 2: the earlier stays
    weights = {}

    def evaluate(r: Round) -> dict | None:
        weights[r.index] = layer.weight.detach().clone()
        return None if scores[r.index] is None else {"epoch": r.index, "loss": r.loss, "val_rsum": scores[r.index]}

    logged = []
    best = fit(layer, Optimiser([{"params": list(layer.parameters()), "lr": 0.1}], 0.0, 10),
               _regression_step(layer), lambda _: [1.0, 1.0], evaluate, rounds=5, log=logged.append)
    assert [h["epoch"] for h in best.history] == [1, 2, 4, 5] and logged == best.history
    assert best.best["epoch"] == 2
    assert torch.equal(layer.weight, weights[2]) and not torch.equal(weights[2], weights[5])


def test_fit_continues_an_earlier_selection_and_selects_on_the_given_key():
    layer = _linear()
    start = layer.weight.detach().clone()
    best = BestOnVal(layer, key="recall")
    best.record({"epoch": 0, "recall": 0.9})  # e.g. the untrained model, validated before training
    fit(layer, Optimiser([{"params": list(layer.parameters()), "lr": 0.1}], 0.0, 4), _regression_step(layer),
        lambda _: [1.0, 1.0], lambda r: {"epoch": r.index, "recall": 0.5}, rounds=2, best=best)
    assert [h["epoch"] for h in best.history] == [0, 1, 2] and best.best["epoch"] == 0
    assert torch.equal(layer.weight, start)  # nothing beat the start: its weights are back


def test_rounds_report_their_steps_losses_and_averaged_parts():
    layer = _linear()
    step = _regression_step(layer)
    rounds = []

    def with_parts(target: float):
        loss = step(target)
        return loss, {"target": target, "total": float(loss.detach())}

    def evaluate(r: Round) -> dict:
        rounds.append((r.index, r.steps, list(r.losses), r.loss, dict(r.parts), r.began <= r.started))
        return {"epoch": r.index, "val_rsum": 0.0}

    batches = {1: [1.0, 3.0], 2: [2.0, 2.0, 5.0]}
    fit(layer, Optimiser([{"params": list(layer.parameters()), "lr": 0.01}], 0.0, 5), with_parts,
        lambda r: batches[r], evaluate, rounds=2)
    (i1, n1, l1, mean1, parts1, ok1), (i2, n2, l2, mean2, parts2, ok2) = rounds
    assert (i1, n1, i2, n2) == (1, 2, 2, 3) and ok1 and ok2
    assert len(l1) == 2 and len(l2) == 5 and l2[:2] == l1  # every step's loss since the start
    assert mean1 == pytest.approx(np.mean(l1)) and mean2 == pytest.approx(np.mean(l2[2:]))
    assert parts1["target"] == pytest.approx(2.0) and parts2["target"] == pytest.approx(3.0)
    assert parts2["total"] == pytest.approx(mean2)


def _lrs(optimiser: Optimiser) -> np.ndarray:
    optimizer, scheduler = optimiser.build()
    lrs = []
    for _ in range(optimiser.total_steps):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return np.array(lrs)


def test_one_cycle_peaks_at_each_groups_lr_after_the_warm_up_and_cosine_decays_to_zero():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    lrs = _lrs(Optimiser([{"params": [a], "lr": 1e-2}, {"params": [b], "lr": 1e-4}], 0.05, 100, pct_start=0.1))
    assert lrs.argmax(0).tolist() == [9, 9]  # the peak ends the 10 % warm-up
    assert lrs.max(0) == pytest.approx([1e-2, 1e-4]) and lrs[-1, 0] < 1e-5
    optimizer, _ = Optimiser([{"params": [a], "lr": 1e-3}], 0.05, 10).build()
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["weight_decay"] == 0.05
    cosine = _lrs(Optimiser([{"params": [a], "lr": 3e-3}], 0.0, 50, schedule="cosine"))[:, 0]
    assert cosine[0] == pytest.approx(3e-3) and np.all(np.diff(cosine) < 0) and cosine[-1] < 1e-5
    with pytest.raises(ValueError, match="unknown schedule"):
        Optimiser([{"params": [a], "lr": 1e-3}], 0.0, 10, schedule="step").build()


def _seeded_run(seed: int) -> torch.Tensor:
    rng = seeded(seed)
    layer = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))  # weights and dropout: torch's seed
    x = torch.randn(32, 4)

    def batches(_):
        order = rng.permutation(32)  # batches: numpy's generator
        return [order[i:i + 8] for i in range(0, 32, 8)]

    fit(layer, Optimiser([{"params": list(layer.parameters()), "lr": 1e-2}], 0.0, 12),
        lambda rows: layer(x[rows]).pow(2).mean(), batches, lambda r: {"epoch": r.index, "val_rsum": -r.loss},
        rounds=3)
    return torch.cat([p.detach().flatten() for p in layer.parameters()])


def test_seeded_runs_are_reproducible_and_the_seed_matters():
    assert torch.equal(_seeded_run(0), _seeded_run(0))
    assert not torch.equal(_seeded_run(0), _seeded_run(1))
    assert seeded(3, stream=1).integers(1 << 30) == np.random.default_rng(4).integers(1 << 30)


def test_frozen_batchnorm_training_mode_keeps_the_statistics():
    module = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.2))
    train_frozen_batchnorm(module.eval())
    assert module[0].training and module[2].training and not module[1].training


def test_every_trainer_goes_through_the_one_loop():
    """No trainer builds its own optimiser or schedule: they all call ``fit`` (which does)."""
    from matcher.finegrained import cross_train, train as fine_train
    from matcher.hashing import train as hash_train
    from matcher.train import student, teacher

    for module in (teacher, student, fine_train, cross_train, hash_train):
        source = inspect.getsource(module)
        assert "torch.optim" not in source and ".backward()" not in source, module.__name__
        assert "fit(" in source, module.__name__
