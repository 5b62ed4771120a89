"""Checkpoint selection on the validation split, shared by every trainer in the project.

Why one class: each trainer (teacher, student, fine scorers, cross-encoder) trains on ``train``,
keeps the weights of its best validation rsum and reports test numbers elsewhere. Written once, the
rule is the same everywhere: strictly better replaces, so of equal scores the earliest is kept, and
the entry returned by ``restore`` is the one whose weights are restored.
"""
from __future__ import annotations

import copy

from torch import nn


class BestOnVal:
    """The history of validation entries (dicts with ``val_rsum``) and a copy of the best weights."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.history: list[dict] = []
        self.best: dict | None = None
        self._state: dict | None = None

    def record(self, entry: dict) -> None:
        """Append ``entry``; copy the module's weights if its ``val_rsum`` beats every earlier one."""
        self.history.append(entry)
        if self.best is None or entry["val_rsum"] > self.best["val_rsum"]:
            self.best, self._state = entry, copy.deepcopy(self.module.state_dict())

    def restore(self) -> dict:
        """Load the best weights back into the module; returns their entry."""
        if self.best is None:
            raise RuntimeError("no validation entry was recorded, so there is no best checkpoint to restore")
        self.module.load_state_dict(self._state)
        return self.best
