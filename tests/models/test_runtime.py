"""Process allocator setting (matcher.runtime) and the image transform's fast downscaling."""
from __future__ import annotations

import platform
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from matcher.models.towers import image_transform

FREE_AND_MEASURE = """
import numpy as np
{setup}
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
before = rss_mb()
a = np.ones(64 * 2**20 // 8)   # 64 MB, touched
del a
print(round(rss_mb() - before))
"""


def _rss_kept_after_free(setup: str) -> int:
    out = subprocess.run([sys.executable, "-c", FREE_AND_MEASURE.format(setup=setup)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_importing_matcher_keeps_freed_activation_memory_in_the_process():
    # Default glibc hands a freed 64 MB block straight back to the kernel (the next forward pass
    # page-faults it in again); after `import matcher` the block stays mapped for reuse.
    assert _rss_kept_after_free("") < 16
    assert _rss_kept_after_free("import matcher; assert matcher.ALLOCATOR_TUNED") > 48


def test_downscaling_by_two_is_a_block_average():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    x = image_transform(112)(Image.fromarray(pixels)).numpy()
    expected = pixels.astype(np.float64).reshape(112, 2, 112, 2, 3).mean((1, 3)).transpose(2, 0, 1) / 127.5 - 1
    assert x.shape == (3, 112, 112)
    assert np.abs(x - expected).max() <= 1 / 127.5 + 1e-6  # PIL rounds the mean to uint8


def test_transform_keeps_native_size_pixels_and_centre_crops_others():
    rng = np.random.default_rng(1)
    square = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    x = image_transform(112)(Image.fromarray(square)).numpy()
    np.testing.assert_allclose(x, square.transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, 100:200] = 255  # the centre third is white: after the centre crop everything is white
    y = image_transform(64)(Image.fromarray(wide)).numpy()
    assert y.shape == (3, 64, 64)
    assert y[:, :, 4:-4].min() > 0.9


@pytest.mark.skipif(platform.system() != "Linux", reason="Linux /proc")
def test_a_spawned_measuring_child_reports_its_own_peak_memory_not_its_parents():
    from matcher.eval.costs import _in_child, peak_rss_mb

    ballast = np.ones(2**30 // 8)  # 1 GB resident in this (the parent) process
    parent = peak_rss_mb()
    child = _in_child(peak_rss_mb)
    assert parent > 1024
    assert child < parent - 512  # ru_maxrss would have reported at least the parent's size
    del ballast
