"""Where things live on disk: the repo's bundled assets and the user's cache directory."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS_DIR = REPO_ROOT / "assets"
MODELS_DIR = ASSETS_DIR / "models"
DEFAULT_GALLERY = ASSETS_DIR / "gallery" / "flickr8k-test"
RESULTS_DIR = ASSETS_DIR / "results"


def cache_dir() -> Path:
    """Embedding/feature cache root: ``$MATCHER_CACHE_DIR`` or ``~/.cache/matcher``.

    Kept out of the repository so that generated data never ends up in git.
    """
    root = Path(os.environ.get("MATCHER_CACHE_DIR") or Path.home() / ".cache" / "matcher")
    root.mkdir(parents=True, exist_ok=True)
    return root
