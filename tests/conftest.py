"""Shared fixtures: a private cache dir per test session, small real galleries made from bundled photos."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "assets" / "gallery" / "flickr8k-test"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Never read or pollute the user's real cache."""
    os.environ["MATCHER_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.manual_seed(0)
    np.random.seed(0)
    yield


def bundled_rows(n: int) -> list[dict]:
    lines = (BUNDLED / "captions.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def make_gallery(root: Path, n: int) -> Path:
    """A gallery folder with the first ``n`` bundled test photos and their captions."""
    root.mkdir(parents=True, exist_ok=True)
    rows = bundled_rows(n)
    for row in rows:
        target = root / Path(row["image"]).name
        shutil.copy(BUNDLED / "images" / row["image"], target)
        row["image"] = target.name
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def small_gallery(tmp_path) -> Path:
    return make_gallery(tmp_path / "gallery", 12)
