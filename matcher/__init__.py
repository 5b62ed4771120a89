"""matcher: efficient image-text matching backend (models, galleries, caches, indexes, evaluation).

Knows nothing about the UI: ``app.py`` and ``python -m matcher`` both call into this package.
"""
from matcher.runtime import keep_freed_memory

__version__ = "0.1.0"

# Once per process, before any model runs: fast, repeatable CPU timings (see matcher.runtime).
ALLOCATOR_TUNED = keep_freed_memory()
