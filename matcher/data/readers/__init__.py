"""One small reader per manifest format, and the one table that picks a reader for a path.

Each reader module has ``NAME``, ``claims(path) -> bool`` (does this file or folder look like mine?)
and ``read(path, images) -> Manifest``. ``detect`` asks them in ``FORMATS`` order (the project's own
``captions.jsonl`` first); a folder nobody claims is a plain folder of images (format ``jsonl``
without a manifest). ``matcher.data.gallery.open_gallery`` is the entry point that uses them.
"""
from __future__ import annotations

from pathlib import Path

from matcher.data.readers import coco, csv, imagefolder, jsonl, karpathy, webdataset
from matcher.data.readers.base import GalleryError, Manifest

FORMATS = {m.NAME: m for m in (jsonl, imagefolder, karpathy, coco, csv, webdataset)}
# File names an uploaded archive may carry besides images (what a reader can read).
MANIFEST_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".tar")


def detect(path: str | Path) -> str:
    """The format of a manifest file, a gallery folder or a shard pattern."""
    path = Path(path)
    for name, reader in FORMATS.items():
        if (path.exists() or name == "webdataset") and reader.claims(path):
            return name
    if path.is_dir():
        return jsonl.NAME
    if not path.exists():
        raise GalleryError(f"gallery not found: {path}")
    raise GalleryError(f"cannot tell the format of {path}; pass --format (one of: {', '.join(FORMATS)})")


def read_manifest(path: str | Path, format: str | None = None, images: str | Path | None = None) -> Manifest:
    path = Path(path)
    if format is not None and format not in FORMATS:
        raise GalleryError(f"unknown gallery format {format!r}; choose one of: {', '.join(FORMATS)}")
    if format not in (None, webdataset.NAME) and not path.exists():
        raise GalleryError(f"gallery not found: {path}")
    if images is not None and not Path(images).is_dir():
        raise GalleryError(f"images folder not found: {images}")
    return FORMATS[format or detect(path)].read(path, Path(images) if images is not None else None)
