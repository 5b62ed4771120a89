"""What a running page needs besides the workspace: its settings, the disk budget over everything
it writes, thumbnails for result grids and the heavy-work thread. Nothing here knows about Gradio;
``app.py`` passes Gradio's temp folder in.
"""
from __future__ import annotations

import time
from pathlib import Path

from matcher.dashboard.disk import DiskBudget, Enforced, remove_stale_temp_files
from matcher.dashboard.heavy import HeavyRunner
from matcher.dashboard.settings import Settings
from matcher.dashboard.thumbs import Thumbnails
from matcher.data.uploads import remove_partial_extractions
from matcher.paths import cache_dir


def usable_cache_dir() -> Path | None:
    """The cache folder, or None when it cannot be created (read-only disk): the page runs without it."""
    try:
        return cache_dir()
    except OSError:
        return None


class Services:
    """Settings, the disk budget (uploads + embedding cache + thumbnails + ``temp_dir``), thumbnails
    and the heavy thread of one page."""

    def __init__(self, settings: Settings, temp_dir: str | Path | None = None):
        self.settings = settings
        root = usable_cache_dir()
        self.uploads = root / "uploads" if root else None
        self.thumbs_dir = root / "thumbs" if root else None
        self.thumbs = Thumbnails(self.thumbs_dir)
        self.heavy = HeavyRunner()
        self.temp_dir = Path(temp_dir) if temp_dir else None
        folders = [self.uploads, root / "embeddings" if root else None, self.thumbs_dir, self.temp_dir]
        self.budget = DiskBudget([f for f in folders if f], settings.disk_budget_bytes)
        self._last_check = 0.0

    def clean_at_start(self) -> list[Path]:
        """Leftovers of a crash (half-extracted zips, interrupted cache writes), then the budget."""
        removed = remove_partial_extractions(self.uploads) if self.uploads else []
        removed += remove_stale_temp_files(self.budget.folders)
        removed += self.budget.enforce().evicted
        return removed

    def enforce(self, in_use: list[str | Path] = (), every_s: float = 0.0) -> Enforced | None:
        """Apply the budget, never evicting ``in_use``; with ``every_s``, at most that often (None if skipped)."""
        if every_s and time.monotonic() - self._last_check < every_s:
            return None
        self._last_check = time.monotonic()
        return self.budget.enforce(keep=list(in_use))


def discard_upload(path: str | Path | None, upload_root: str | Path) -> bool:
    """Delete a visitor's uploaded file once it has been read or refused, and its folder if now empty;
    only inside ``upload_root`` (the web framework's upload folder), never anything else."""
    if not path:
        return False
    try:
        file, root = Path(path).resolve(), Path(upload_root).resolve()
        if not file.is_relative_to(root) or file == root:
            return False
        file.unlink(missing_ok=True)
        parent = file.parent
        if parent != root and not any(parent.iterdir()):
            parent.rmdir()
        return True
    except (OSError, ValueError):
        return False
