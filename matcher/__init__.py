"""matcher: efficient image-text matching backend (models, galleries, caches, indexes, evaluation).

Knows nothing about the UI: ``app.py`` and ``python -m matcher`` both call into this package.
"""
__version__ = "0.1.0"
