"""This project's own format: a folder of images plus ``captions.jsonl``, one JSON object per line,
``{"image": name, "captions": [...], "split": ...}`` (the shared Flickr8k layout). ``name`` is
relative to the folder (or its ``images/`` subfolder). Image files no line names stay in the
gallery, uncaptioned (searchable, not evaluated). A folder with no manifest at all is read this way.
"""
from __future__ import annotations

from pathlib import Path

from matcher.data.readers.base import Entry, GalleryError, Manifest, clean_captions, jsonl_rows

NAME = "jsonl"
CAPTIONS_FILE = "captions.jsonl"


def claims(path: Path) -> bool:
    if path.is_dir():
        return (path / CAPTIONS_FILE).is_file()
    return path.suffix.lower() == ".jsonl" and path.name != "metadata.jsonl"


def read(path: Path, images: Path | None = None) -> Manifest:
    manifest_file = path / CAPTIONS_FILE if path.is_dir() else path
    folder = path if path.is_dir() else path.parent
    if not folder.is_dir():
        raise GalleryError(f"gallery folder not found: {folder}")
    manifest = Manifest(NAME, manifest_file, images or folder, [], keep_unlisted=True)
    if not manifest_file.is_file():
        return manifest   # a plain folder of images
    for number, row, bad in jsonl_rows(manifest_file):
        where = f"{manifest_file.name}:{number}"
        captions = clean_captions(row.get("captions", [])) if row else None
        if bad is None and not isinstance(row.get("image"), str):
            bad = "needs an 'image' string"
        elif bad is None and captions is None:
            bad = "'captions' must be a list of strings"
        if bad:
            manifest.problems.append((where, f"bad line ({bad}); skipped"))
            continue
        split = row.get("split")
        manifest.entries.append(Entry(row["image"], captions, None if split is None else str(split), where))
    return manifest
