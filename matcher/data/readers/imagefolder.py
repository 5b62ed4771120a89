"""Hugging Face ``imagefolder`` with captions: ``<dir>/metadata.jsonl`` (or ``metadata.csv``), or one
per split as ``<dir>/<split>/metadata.jsonl``; each row has ``file_name`` (relative to the metadata
file's folder) and ``text`` (a string or a list of strings; ``caption``/``captions`` also accepted).
The split is the subfolder's name (``train``, ``validation``, ``test``, ...); metadata at the top
level has no split.
"""
from __future__ import annotations

from pathlib import Path

from matcher.data.readers.base import (Entry, GalleryError, Manifest, clean_captions, first_column, jsonl_rows,
                                       table_rows)

NAME = "imagefolder"
METADATA = ("metadata.jsonl", "metadata.csv")
TEXT_FIELDS = ("text", "caption", "captions")


def _metadata_files(folder: Path) -> list[Path]:
    found = []
    for sub in [folder] + sorted(p for p in folder.iterdir() if p.is_dir()):
        file = next((sub / m for m in METADATA if (sub / m).is_file()), None)
        if file:
            found.append(file)
    return found


def claims(path: Path) -> bool:
    return bool(_metadata_files(path)) if path.is_dir() else path.name in METADATA


def _rows(file: Path, manifest: Manifest):
    """``(line, row)`` of one metadata file; bad lines go to ``manifest.problems``."""
    if file.suffix == ".jsonl":
        for number, row, bad in jsonl_rows(file):
            if bad:
                manifest.problems.append((f"{file.name}:{number}", f"bad line ({bad}); skipped"))
            else:
                yield number, row
        return
    rows, problems = table_rows(file)
    manifest.problems += problems
    yield from rows


def read(path: Path, images: Path | None = None) -> Manifest:
    files = _metadata_files(path) if path.is_dir() else [path]
    root = path if path.is_dir() else path.parent
    if not files:
        raise GalleryError(f"{path}: no {' or '.join(METADATA)} found (at the top or in a split folder)")
    manifest = Manifest(NAME, files[0] if len(files) == 1 else root, images or root, [])
    for file in files:
        prefix = file.parent.relative_to(root).as_posix()
        split = None if prefix == "." else prefix
        label = file.name if split is None else f"{split}/{file.name}"
        for line, row in _rows(file, manifest):
            where, text_field = f"{label}:{line}", first_column(row, TEXT_FIELDS)
            captions = clean_captions(row.get(text_field)) if text_field else None
            if not isinstance(row.get("file_name"), str) or not row["file_name"].strip():
                manifest.problems.append((where, "needs a 'file_name' string; skipped"))
            elif captions is None:
                manifest.problems.append((where, "needs 'text': a string or a list of strings; skipped"))
            else:
                name = row["file_name"].strip() if split is None else f"{prefix}/{row['file_name'].strip()}"
                manifest.entries.append(Entry(name, captions, split, where))
    return manifest
