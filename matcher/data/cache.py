"""On-disk cache of arrays (gallery embeddings), keyed by content hashes.

Each entry is one ``.npz`` holding the arrays, a JSON metadata string and a SHA-256 checksum of
the arrays. Entries are written atomically; an entry that fails to load or to verify is treated
as corrupted: it is deleted, reported through ``logging`` and recomputed by the caller.
"""
from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from pathlib import Path

import numpy as np

from matcher.atomic import atomic_path
from matcher.paths import cache_dir

log = logging.getLogger(__name__)


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        digest.update(key.encode() + str(value.dtype).encode() + str(value.shape).encode())
        digest.update(value.reshape(-1).view(np.uint8))  # the same bytes as tobytes(), without a copy
    return digest.hexdigest()


class ArrayCache:
    """Key -> (arrays, metadata). ``get`` returns None on a miss *or* a corrupted entry."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else cache_dir() / "embeddings"
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npz"

    def get(self, key: str) -> tuple[dict[str, np.ndarray], dict] | None:
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
            path.unlink(missing_ok=True)
            return None
        return arrays, meta

    def put(self, key: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
        with atomic_path(self.path(key)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, __meta__=np.array(json.dumps(meta)), __checksum__=np.array(_checksum(arrays)), **arrays)
