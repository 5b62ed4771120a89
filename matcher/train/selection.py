"""Checkpoint selection on the validation split, shared by every trainer in the project.

Why one class: each trainer (teacher, student, fine scorers, cross-encoder, hash heads) trains on
``train``, keeps the weights of its best validation score and reports test numbers elsewhere (the
loop that drives them all is ``matcher.train.loop.fit``). Written once, the
rule is the same everywhere: strictly better replaces, so of equal scores the earliest is kept, and
the entry returned by ``restore`` is the one whose weights are restored.
"""
from __future__ import annotations

import copy

from torch import nn


class BestOnVal:
    """The history of validation entries (dicts with the score ``key``, ``val_rsum`` unless a trainer
    selects on another score) and a copy of the best weights."""

    def __init__(self, module: nn.Module, key: str = "val_rsum") -> None:
        self.module, self.key = module, key
        self.history: list[dict] = []
        self.best: dict | None = None
        self._state: dict | None = None

    def record(self, entry: dict) -> None:
        """Append ``entry``; copy the module's weights if its score beats every earlier one."""
        self.history.append(entry)
        if self.best is None or entry[self.key] > self.best[self.key]:
            self.best, self._state = entry, copy.deepcopy(self.module.state_dict())

    def restore(self) -> dict:
        """Load the best weights back into the module; returns their entry."""
        if self.best is None:
            raise RuntimeError("no validation entry was recorded, so there is no best checkpoint to restore")
        self.module.load_state_dict(self._state)
        return self.best

    def state_dict(self) -> dict:
        """History, best entry and best weights: what a resumed run needs to keep selecting."""
        return {"history": self.history, "best": self.best, "weights": self._state}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.best, self._state = state["history"], state["best"], state["weights"]
