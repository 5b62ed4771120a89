"""Shared fixtures: a private cache dir per test session, small real galleries made from bundled photos."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import make_gallery


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Never read or pollute the user's real cache."""
    os.environ["MATCHER_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def small_gallery(tmp_path) -> Path:
    return make_gallery(tmp_path / "gallery", 12)
