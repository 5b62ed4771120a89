"""The one training loop of every trainer: seeding, AdamW over learning-rate groups, a per-step
schedule, a progress bar and best-on-val selection (``matcher.train.selection.BestOnVal``).

A run is ``rounds`` rounds: an epoch, or a single step for the step-budget trainers (cross-encoder).
Each round sets the module to training mode, runs ``step`` on every batch of ``batches(round)``
(zero_grad, backward, optimiser step, schedule step), then asks ``evaluate`` for the round's history
entry: a dict holding the selection score (``BestOnVal.key``, ``val_rsum`` by default), or None
where the trainer does not validate that round. At the end the best entry's weights are restored.

What differs between trainers stays with them: how batches are drawn, the loss of a batch, the
validation and the fields of an entry. Seeding happens before the modules are built
(``seeded``), since their initial weights come from torch's generator too.
"""
from __future__ import annotations

import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from matcher.train.selection import BestOnVal

def seeded(seed: int, stream: int = 0) -> np.random.Generator:
    """Seed torch (initial weights, dropout) and return the numpy generator that draws the batches.

    ``stream`` offsets the numpy seed, for a second run that must not replay the first one's draws.
    """
    torch.manual_seed(seed)
    return np.random.default_rng(seed + stream)


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def train_frozen_batchnorm(module: nn.Module) -> None:
    """Dropout on, but BatchNorm keeps its (ImageNet) statistics: small data, stable fine-tuning."""
    module.train()
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


@dataclass
class Optimiser:
    """AdamW over ``groups`` (dicts with ``params`` and the peak ``lr``) and a per-step schedule.

    ``schedule``: ``one-cycle`` (``OneCycleLR`` to each group's lr, warm-up share ``pct_start``) or
    ``cosine`` (``CosineAnnealingLR`` from each group's lr down to 0), over ``total_steps``.
    """

    groups: list[dict]
    weight_decay: float
    total_steps: int
    schedule: str = "one-cycle"
    pct_start: float = 0.3

    def build(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        optimizer = torch.optim.AdamW(self.groups, weight_decay=self.weight_decay)
        total = max(self.total_steps, 1)
        if self.schedule == "one-cycle":
            return optimizer, torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=[g["lr"] for g in self.groups], total_steps=total, pct_start=self.pct_start)
        if self.schedule == "cosine":
            return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
        raise ValueError(f"unknown schedule {self.schedule!r}; choose one-cycle or cosine")


@dataclass
class Round:
    """What ``evaluate`` gets after a round's steps."""

    index: int                    # 1-based
    steps: int                    # steps taken in this round
    losses: list[float]           # every step's loss since the run began
    parts: dict[str, float] = field(default_factory=dict)  # per named part a step returned: its mean this round
    started: float = 0.0          # time.time() when the round began
    began: float = 0.0            # time.time() when the run began

    @property
    def loss(self) -> float:
        """Mean loss of this round's steps."""
        return float(np.mean(self.losses[-self.steps:])) if self.steps else float("nan")


def fit(module: nn.Module, optimiser: Optimiser, step: Callable[[Any], torch.Tensor | tuple[torch.Tensor, dict]],
        batches: Callable[[int], Iterable[Any]], evaluate: Callable[[Round], dict | None], *, rounds: int,
        steps_per_round: int | None = None, best: BestOnVal | None = None,
        train_mode: Callable[[nn.Module], None] = nn.Module.train, progress: str | None = None,
        log: Callable[[dict], None] | None = None, resume: "Resume | None" = None) -> BestOnVal:
    """Train ``module`` for ``rounds`` rounds, keep the best validated entry and restore its weights.

    ``step(batch)`` returns the batch's loss, or (loss, {part: float}) to have named parts averaged
    per round (``Round.parts``). ``best`` continues an earlier selection (an entry recorded before
    training, or a previous phase); ``progress`` is the label of a per-round progress bar
    (``steps_per_round`` long), None for none; ``log`` sees every recorded entry.
    Returns the ``BestOnVal`` with the history; its ``best`` is the restored entry.
    """
    best = BestOnVal(module) if best is None else best
    optimizer, scheduler = optimiser.build()
    losses: list[float] = []
    began, first = time.time(), 1
    if resume is not None:
        first, losses = resume.load(module, optimizer, scheduler, best)
    for index in range(first, rounds + 1):
        train_mode(module)
        started, steps, sums = time.time(), 0, {}
        for batch in tqdm(batches(index), desc=f"{progress} {index}", total=steps_per_round, leave=False,
                          disable=progress is None):
            result = step(batch)
            loss, parts = result if isinstance(result, tuple) else (result, {})
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            steps += 1
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + value
        entry = evaluate(Round(index, steps, losses, {k: v / steps for k, v in sums.items()}, started, began))
        if entry is not None:
            best.record(entry)
            if log is not None:
                log(entry)
            if resume is not None:
                resume.save(index, losses, module, optimizer, scheduler, best)
    if best.best is not None:
        best.restore()
    return best


@dataclass
class Resume:
    """A long run's state on disk (``path``), written atomically after each validated round.

    Holds the weights, the optimiser and schedule, the losses, the selection (history, best entry
    and best weights) and the random generators (torch's and the trainer's batch generator ``rng``),
    so a run killed after round r continues at round r + 1 and draws the batches it would have drawn.
    A file from another run (other rounds or module) fails to load with torch's message.
    """

    path: Path
    rng: np.random.Generator | None = None

    def load(self, module, optimizer, scheduler, best: BestOnVal) -> tuple[int, list[float]]:
        if not Path(self.path).exists():
            return 1, []
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
            module.load_state_dict(state["module"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except Exception as exc:  # truncated, foreign or from another module: refuse, keep the file
            raise RuntimeError(f"cannot resume from {self.path} ({type(exc).__name__}: {exc}); "
                               "delete it to start the run over") from exc
        best.load_state_dict(state["selection"])
        torch.set_rng_state(state["torch_rng"])
        if self.rng is not None:
            self.rng.bit_generator.state = state["rng"]
        return state["round"] + 1, list(state["losses"])

    def save(self, index: int, losses: list[float], module, optimizer, scheduler, best: BestOnVal) -> None:
        from matcher.atomic import atomic_path

        state = {"round": index, "losses": losses, "module": module.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "selection": best.state_dict(), "torch_rng": torch.get_rng_state(),
                 "rng": None if self.rng is None else self.rng.bit_generator.state}
        with atomic_path(Path(self.path)) as tmp:
            torch.save(state, tmp)
