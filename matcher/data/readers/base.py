"""What every reader returns: the manifest's entries, each with where it came from, before any file
is looked at. ``matcher.data.gallery.open_gallery`` turns a ``Manifest`` into a ``Gallery`` (files
resolved, duplicates, missing files and empty caption lists reported) the same way for every format.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

Problem = tuple[str, str]  # (where: "file:line" or "file: item", what is wrong and what was done)


class GalleryError(ValueError):
    """The gallery cannot be used at all (missing, no images, a manifest that cannot be parsed)."""


@dataclass
class Entry:
    """One image as a manifest lists it."""

    image: str                  # path relative to the manifest's image root, as the manifest spells it
    captions: list[str]
    split: str | None
    where: str                  # "captions.jsonl:21", "dataset_coco.json: images[17]", ...


@dataclass
class Manifest:
    format: str
    source: Path                # the manifest file (or folder) read, for messages
    image_root: Path            # what every Entry.image is relative to
    entries: list[Entry]
    problems: list[Problem] = field(default_factory=list)   # found while parsing
    keep_unlisted: bool = False  # folder format: image files no entry names are kept, uncaptioned


def clean_captions(value) -> list[str] | None:
    """A caption string or list of strings, stripped, blanks dropped; None if it is neither."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        return None
    return [c.strip() for c in value if c.strip()]


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """``(line number, object, None)`` per JSON-object line, ``(line, None, reason)`` per bad line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, None, f"not JSON: {exc.msg} at column {exc.colno}"
                continue
            if not isinstance(row, dict):
                yield number, None, "not a JSON object"
                continue
            yield number, row, None


def load_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except ValueError as exc:
        line = getattr(exc, "lineno", None)
        raise GalleryError(f"{path}{f':{line}' if line else ''}: not a JSON file ({exc})") from None


def table_rows(path: Path) -> tuple[list[tuple[int, dict]], list[Problem]]:
    """A CSV (or ``.tsv``) file as ``(line number, {column: str})`` rows, via pandas.

    Lines with the wrong number of fields are skipped and reported with their line number; the
    other rows keep their file line (header = line 1; a quoted caption spanning lines shifts later
    numbers).
    """
    import pandas as pd

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            frame = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=str,
                                keep_default_na=False, on_bad_lines="warn", skip_blank_lines=True)
        except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise GalleryError(f"{path}: cannot read as a table ({exc})") from None
    problems, bad_lines = [], []
    for warning in caught:
        for part in str(warning.message).splitlines():
            if part.startswith("Skipping line"):   # pandas: "Skipping line 7: expected 3 fields, saw 4"
                number, _, reason = part[len("Skipping line "):].partition(": ")
                bad_lines.append(int(number))
                problems.append((f"{path.name}:{number}", f"bad line ({reason.strip()}); skipped"))
    frame.columns = [str(c).strip() for c in frame.columns]
    with open(path, encoding="utf-8", errors="replace") as f:
        not_rows = {n for n, text in enumerate(f, 1) if not text.strip()} | set(bad_lines)
    rows, line = [], min(set(range(1, len(not_rows) + 2)) - not_rows)   # the header's line
    for record in frame.to_dict("records"):
        line += 1
        while line in not_rows:
            line += 1
        rows.append((line, record))
    return rows, problems


def first_column(columns, choices: tuple[str, ...]) -> str | None:
    lowered = {c.lower(): c for c in columns}
    return next((lowered[c] for c in choices if c in lowered), None)


def single_match(folder: Path, patterns: tuple[str, ...], what: str) -> Path | None:
    """The one file in ``folder`` matching ``patterns``; None if none; an error naming them if several."""
    found = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(folder)) for p in found)
        raise GalleryError(f"{folder} holds several {what} files ({names}); pass the one to use")
    return found[0] if found else None
