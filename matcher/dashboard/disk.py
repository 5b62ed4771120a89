"""One disk budget for everything a public page writes: extracted uploads, the embedding cache,
thumbnails and Gradio's temp folder (uploaded files, result images it copies).

Each folder's top-level entries (an extracted zip, one cache file, one Gradio upload folder) are
the units of eviction; when the folders together hold more than the budget, the least recently
used entries go first (oldest modification time: cache hits and re-used uploads touch theirs) until
the total fits. Entries named in ``keep`` and those younger than ``grace_s`` (being written or just
handed to a visitor) are never evicted; if the total still does not fit, ``enforce`` says so and
the caller refuses the new upload.

Nothing here knows about Gradio; ``app.py`` passes the folders.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MB = 1024 * 1024


@dataclass
class Entry:
    path: Path
    bytes: int
    last_used: float


@dataclass
class Enforced:
    total_bytes: int                                   # what the folders hold after eviction
    limit_bytes: int
    evicted: list[Path] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.limit_bytes


def _size(path: Path) -> int:
    try:
        if path.is_symlink() or not path.is_dir():
            return path.lstat().st_size
    except OSError:
        return 0
    total = 0
    for root, dirs, files in os.walk(path, onerror=lambda e: None):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _last_used(path: Path) -> float:
    """Newest mtime of the entry itself and of its direct children (a folder's files)."""
    try:
        newest = path.lstat().st_mtime
    except OSError:
        return 0.0
    if path.is_dir() and not path.is_symlink():
        try:
            with os.scandir(path) as it:
                for child in it:
                    try:
                        newest = max(newest, child.stat(follow_symlinks=False).st_mtime)
                    except OSError:
                        pass
        except OSError:
            pass
    return newest


def _remove(path: Path) -> bool:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        return True
    except FileNotFoundError:
        return True
    except OSError as exc:
        log.warning("disk budget: cannot remove %s (%s)", path, exc)
        return False


class DiskBudget:
    """At most ``limit_bytes`` in ``folders`` together; least recently used entries evicted first."""

    def __init__(self, folders: list[str | Path], limit_bytes: int, grace_s: float = 120.0):
        self.folders = [Path(f) for f in dict.fromkeys(str(f) for f in folders)]
        self.limit_bytes = int(limit_bytes)
        self.grace_s = grace_s
        self._lock = threading.Lock()

    def entries(self) -> list[Entry]:
        out = []
        for folder in self.folders:
            try:
                children = list(folder.iterdir()) if folder.is_dir() else []
            except OSError:
                continue
            for child in children:
                out.append(Entry(child, _size(child), _last_used(child)))
        return out

    def total_bytes(self) -> int:
        return sum(e.bytes for e in self.entries())

    def enforce(self, keep: list[str | Path] = ()) -> Enforced:
        """Evict least recently used entries until the folders fit the budget (or nothing more may go)."""
        keep_paths = [Path(k).resolve() for k in keep]
        with self._lock:
            entries = self.entries()
            total = sum(e.bytes for e in entries)
            result = Enforced(total, self.limit_bytes)
            if total <= self.limit_bytes:
                return result
            now = time.time()
            for entry in sorted(entries, key=lambda e: e.last_used):
                if total <= self.limit_bytes:
                    break
                resolved = entry.path.resolve()
                if now - entry.last_used < self.grace_s or any(resolved == k or k.is_relative_to(resolved)
                                                               or resolved.is_relative_to(k) for k in keep_paths):
                    continue
                if _remove(entry.path):
                    total -= entry.bytes
                    result.evicted.append(entry.path)
            result.total_bytes = total
        if result.evicted:
            log.info("disk budget %.0f MB: evicted %d least recently used entr%s, %.0f MB left", self.limit_bytes / MB,
                     len(result.evicted), "y" if len(result.evicted) == 1 else "ies", total / MB)
        return result

    def describe(self) -> str:
        return f"{self.limit_bytes / MB:.0f} MB over " + ", ".join(str(f) for f in self.folders)


def remove_stale_temp_files(folders: list[str | Path], older_than_s: float = 3600.0) -> list[Path]:
    """Temporary files of interrupted atomic writes (``.<name>.<random>.tmp``, ``matcher.atomic``) older
    than ``older_than_s``: a crash mid-write leaves them behind; nothing ever reads them."""
    removed, now = [], time.time()
    for folder in folders:
        try:
            candidates = list(Path(folder).glob(".*.tmp"))
        except OSError:
            continue
        for path in candidates:
            try:
                if path.is_file() and now - path.stat().st_mtime > older_than_s:
                    path.unlink()
                    removed.append(path)
            except OSError:
                pass
    return removed
