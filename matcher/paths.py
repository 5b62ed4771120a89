"""Where things live on disk: the bundled assets (models, results, gallery) and the user's cache.

The assets sit next to the package in a checkout (``pip install -e .`` or running from the repo).
An installed copy of the package (``pip install .``) has no assets beside it: it then reads them
from ``$MATCHER_HOME`` (a checkout), else from the current directory.
"""
from __future__ import annotations

import os
from pathlib import Path


def _home() -> Path:
    if os.environ.get("MATCHER_HOME"):
        return Path(os.environ["MATCHER_HOME"]).expanduser().resolve()
    checkout = Path(__file__).resolve().parent.parent
    return checkout if (checkout / "assets").is_dir() else Path.cwd()


REPO_ROOT = _home()
ASSETS_DIR = REPO_ROOT / "assets"
MODELS_DIR = ASSETS_DIR / "models"
DEFAULT_GALLERY = ASSETS_DIR / "gallery" / "flickr8k-test"
RESULTS_DIR = ASSETS_DIR / "results"
DEFAULT_TRAIN_DATA = REPO_ROOT.parent / "shared" / "data" / "flickr8k"   # Flickr8k beside the checkout
PACKAGE_DIR = Path(__file__).resolve().parent   # package data (model configs, recipes) travels with the code


SPACES_PERSISTENT = Path("/data")   # a Hugging Face Space's persistent storage, when the Space has it


def cache_dir() -> Path:
    """Embedding/feature cache root: ``$MATCHER_CACHE_DIR``, else a Space's persistent ``/data``
    (so gallery embeddings survive restarts there), else ``~/.cache/matcher``.

    Kept out of the repository so that generated data never ends up in git.
    """
    default = Path.home() / ".cache" / "matcher"
    if SPACES_PERSISTENT.is_dir() and os.access(SPACES_PERSISTENT, os.W_OK):
        default = SPACES_PERSISTENT / "matcher-cache"
    root = Path(os.environ.get("MATCHER_CACHE_DIR") or default)
    root.mkdir(parents=True, exist_ok=True)
    return root
