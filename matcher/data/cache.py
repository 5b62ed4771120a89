"""On-disk cache of arrays (gallery embeddings), keyed by content hashes.

Each entry is one ``.npz`` holding the arrays, a JSON metadata string and a SHA-256 checksum of
the arrays. Entries are written atomically; an entry that fails to load or to verify is treated
as corrupted: it is deleted, reported through ``logging`` and recomputed by the caller.

The cache is an optimisation, never a requirement: when its folder cannot be created or written
(read-only file system, disk full, no permission), ``ArrayCache`` logs it once, records a message
for the user (``cache_problems()``) and callers go on with the arrays they computed, in memory.
A hit touches the entry's modification time, so "oldest" means least recently used to whoever
evicts entries (``matcher.dashboard.disk``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import zipfile
from pathlib import Path

import numpy as np

from matcher.atomic import atomic_path
from matcher.paths import cache_dir

log = logging.getLogger(__name__)

_problems: dict[str, str] = {}     # cache folder -> what went wrong (for the page)
_problems_lock = threading.Lock()


def cache_problems() -> list[str]:
    """Plain-language messages about cache folders that could not be written, newest state per folder."""
    with _problems_lock:
        return list(_problems.values())


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        digest.update(key.encode() + str(value.dtype).encode() + str(value.shape).encode())
        digest.update(value.reshape(-1).view(np.uint8))  # the same bytes as tobytes(), without a copy
    return digest.hexdigest()


class ArrayCache:
    """Key -> (arrays, metadata). ``get`` returns None on a miss, a corrupted entry or an unusable
    folder; ``put`` never raises ``OSError`` (the entry is then simply not stored)."""

    def __init__(self, root: str | Path | None = None):
        self.root: Path | None = None
        self.problem: str | None = None
        try:
            self.root = Path(root) if root is not None else cache_dir() / "embeddings"
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._failed("cannot create the embedding cache folder", exc)

    def _failed(self, what: str, exc: OSError) -> None:
        where = str(self.root) if self.root is not None else (exc.filename or "the cache folder")
        self.problem = (f"The embedding cache ({where}) cannot be written: {exc.strerror or exc}. Searching works "
                        "from memory, but embeddings are recomputed at every start; free some space or set "
                        "MATCHER_CACHE_DIR to a writable folder.")
        with _problems_lock:
            first = where not in _problems
            _problems[where] = self.problem
        (log.warning if first else log.debug)("%s %s: %s", what, where, exc)

    def _recovered(self) -> None:
        if self.problem is not None:
            with _problems_lock:
                _problems.pop(str(self.root), None)
            self.problem = None

    def path(self, key: str) -> Path:
        if self.root is None:
            raise OSError(f"the cache folder is not usable: {self.problem}")
        return self.root / f"{key}.npz"

    def get(self, key: str) -> tuple[dict[str, np.ndarray], dict] | None:
        if self.root is None:
            return None
        path = self.path(key)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files if not k.startswith("__")}
                meta = json.loads(str(z["__meta__"]))
                stored = str(z["__checksum__"])
            if stored != _checksum(arrays):
                raise ValueError("checksum mismatch")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("cache entry %s is corrupted (%s); rebuilding it", path.name, exc)
            try:
                path.unlink(missing_ok=True)
            except OSError as unlink_exc:
                self._failed("cannot remove a corrupted cache entry in", unlink_exc)
            return None
        try:
            os.utime(path)  # most recently used: evicted last
        except OSError:
            pass
        return arrays, meta

    def put(self, key: str, arrays: dict[str, np.ndarray], meta: dict) -> bool:
        """Store an entry; False (logged, recorded in ``cache_problems()``) if the disk refused it."""
        if self.root is None:
            return False
        try:
            with atomic_path(self.path(key)) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, __meta__=np.array(json.dumps(meta)), __checksum__=np.array(_checksum(arrays)), **arrays)
        except OSError as exc:
            self._failed("cannot write a cache entry to", exc)
            return False
        self._recovered()
        return True
