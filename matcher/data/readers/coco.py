"""COCO caption annotations (``captions_val2014.json``): ``images[].id/file_name`` and
``annotations[].image_id/caption``. There is no split field, so the whole file is one split
(``--split`` is accepted with a note). ``file_name`` is relative to ``--images``, else to the first of
the JSON's folder, ``<folder>/val2014`` or ``<folder>/../val2014`` (named after the file,
``annotations/captions_val2014.json`` next to ``val2014/``) that holds the first image.
"""
from __future__ import annotations

from pathlib import Path

from matcher.data.readers.base import Entry, GalleryError, Manifest, load_json, single_match

NAME = "coco"
PATTERNS = ("captions_*.json", "annotations/captions_*.json")


def claims(path: Path) -> bool:
    if path.is_dir():
        return any(p for pattern in PATTERNS for p in path.glob(pattern))
    if path.suffix.lower() != ".json":
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(1 << 16)
    return '"file_name"' in head or '"annotations"' in head


def _image_root(file: Path, first: str | None) -> Path:
    tag = file.stem.removeprefix("captions_")
    candidates = [file.parent, file.parent / tag, file.parent.parent / tag]
    return next((c for c in candidates if first and (c / first).is_file()), file.parent)


def read(path: Path, images: Path | None = None) -> Manifest:
    file = single_match(path, PATTERNS, "COCO captions") if path.is_dir() else path
    data = load_json(file)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise GalleryError(f"{file}: not a COCO captions file (needs 'images' and 'annotations' lists)")
    problems, by_id = [], {}
    for i, item in enumerate(data["images"]):
        if not isinstance(item, dict) or not isinstance(item.get("file_name"), str) or "id" not in item:
            problems.append((f"{file.name}: images[{i}]", "needs 'id' and a 'file_name' string; skipped"))
        elif item["id"] in by_id:
            problems.append((f"{file.name}: images[{i}]", f"image id {item['id']} listed again; skipped"))
        else:
            by_id[item["id"]] = Entry(item["file_name"], [], None, f"{file.name}: images[{i}]")
    for i, ann in enumerate(data["annotations"]):
        entry = by_id.get(ann.get("image_id")) if isinstance(ann, dict) else None
        if entry is None or not isinstance(ann.get("caption"), str):
            problems.append((f"{file.name}: annotations[{i}]",
                             "needs an 'image_id' of a listed image and a 'caption' string; skipped"))
        elif ann["caption"].strip():
            entry.captions.append(ann["caption"].strip())
    entries = list(by_id.values())
    root = images or _image_root(file, entries[0].image if entries else None)
    return Manifest(NAME, file, root, entries, problems)
