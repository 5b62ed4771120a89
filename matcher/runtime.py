"""Process-level settings that make CPU inference fast *and* its timings repeatable.

glibc's malloc serves every block above its mmap threshold (128 kB at start, raised dynamically up
to 32 MB) with a fresh ``mmap`` and gives it back to the kernel on free; it also trims the top of
the heap once more than 128 kB there is free. A convolutional tower allocates and frees activation
maps of tens of MB per layer, so with those defaults every forward pass page-faults its way through
newly mapped, zero-filled memory. How often depends on where the dynamic threshold happens to sit,
which made timings bimodal on this project's VM: the teacher's image throughput at batch 8 was
62-63 images/s under the defaults and 147-168 with this setting, and the teacher/student ratio
9.1-9.9x against 3.6-4.5x (measured: README "Results", `bench/image_speed_options.py`).

``keep_freed_memory`` raises both thresholds to 1 GiB, so freed activation memory stays in the
process and is reused by the next pass. The cost is that the resident size stays at its high-water
mark instead of shrinking between requests, which a long-running app pays anyway on its next batch.
It is applied once, when ``matcher`` is imported, so the CLI, the app, the spawned measurement
processes and the tests all run under the same allocator behaviour. Setting the environment
variable ``MATCHER_GLIBC_MALLOC_DEFAULTS=1`` keeps glibc's defaults (``bench/image_speed_options.py``
uses it to measure the difference).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30


def keep_freed_memory(limit: int = KEEP_BYTES) -> bool:
    """Ask glibc to keep up to ``limit`` bytes of freed memory; False where that is not possible
    (another C library, e.g. macOS or musl) or where MATCHER_GLIBC_MALLOC_DEFAULTS=1 opts out.
    It changes speed, never results."""
    if os.environ.get("MATCHER_GLIBC_MALLOC_DEFAULTS") == "1":
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))
