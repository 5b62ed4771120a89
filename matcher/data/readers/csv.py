"""A CSV (``.csv``) or tab-separated (``.tsv``) table with one row per caption: an ``image`` column
(also accepted: ``filepath``, ``file_name``, ``filename``, ``image_path``, ``path``), a ``caption``
column (also: ``title``, ``text``, ``sentence``, ``raw``) and an optional ``split`` column. Image paths
are relative to the table's folder or ``--images``. Read with pandas.
"""
from __future__ import annotations

from pathlib import Path

from matcher.data.readers.base import Entry, GalleryError, Manifest, first_column, single_match, table_rows

NAME = "csv"
IMAGE_COLUMNS = ("image", "filepath", "file_name", "filename", "image_path", "path")
CAPTION_COLUMNS = ("caption", "title", "text", "sentence", "raw")
PATTERNS = ("*.csv", "*.tsv")


def claims(path: Path) -> bool:
    if path.is_dir():
        return any(p.name != "metadata.csv" for pattern in PATTERNS for p in path.glob(pattern))
    return path.suffix.lower() in (".csv", ".tsv") and path.name != "metadata.csv"


def read(path: Path, images: Path | None = None) -> Manifest:
    file = single_match(path, PATTERNS, "CSV/TSV") if path.is_dir() else path
    rows, problems = table_rows(file)
    columns = list(rows[0][1]) if rows else []
    image_col, caption_col = first_column(columns, IMAGE_COLUMNS), first_column(columns, CAPTION_COLUMNS)
    if rows and (image_col is None or caption_col is None):
        raise GalleryError(f"{file}: needs an image column ({', '.join(IMAGE_COLUMNS)}) and a caption column "
                           f"({', '.join(CAPTION_COLUMNS)}); found {', '.join(columns)}")
    split_col = first_column(columns, ("split",))
    entries: dict[str, Entry] = {}
    for line, row in rows:
        where, image = f"{file.name}:{line}", row[image_col].strip()
        split = row[split_col].strip() or None if split_col else None
        if not image:
            problems.append((where, "no image name; skipped"))
            continue
        entry = entries.setdefault(image, Entry(image, [], split, where))
        if entry.split != split:
            problems.append((where, f"{image}: split {split!r} differs from {entry.where}'s {entry.split!r}; row skipped"))
        elif row[caption_col].strip():
            entry.captions.append(row[caption_col].strip())
    return Manifest(NAME, file, images or file.parent, list(entries.values()), problems)
