"""Karpathy split files (``dataset_flickr8k.json``, ``dataset_flickr30k.json``, ``dataset_coco.json``):
``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}``. Images live at
``<root>/<filepath>/<filename>``, root = the JSON's folder or ``--images``. ``split`` is
``train``/``val``/``test`` (COCO adds ``restval``); ``--split test`` of ``dataset_coco.json`` is the
5k test set.
"""
from __future__ import annotations

from pathlib import Path

from matcher.data.readers.base import Entry, GalleryError, Manifest, clean_captions, load_json, single_match

NAME = "karpathy"
PATTERNS = ("dataset_*.json",)


def claims(path: Path) -> bool:
    if path.is_dir():
        return any(path.glob(PATTERNS[0]))
    if path.suffix.lower() != ".json":
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(1 << 16)
    return '"sentences"' in head or '"filename"' in head


def read(path: Path, images: Path | None = None) -> Manifest:
    file = single_match(path, PATTERNS, "Karpathy split") if path.is_dir() else path
    data = load_json(file)
    items = data.get("images") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise GalleryError(f"{file}: not a Karpathy split file (no 'images' list)")
    manifest = Manifest(NAME, file, images or file.parent, [])
    for i, item in enumerate(items):
        where = f"{file.name}: images[{i}]"
        sentences = item.get("sentences") if isinstance(item, dict) else None
        raws = [s.get("raw") if isinstance(s, dict) else s for s in sentences] if isinstance(sentences, list) else None
        captions = clean_captions(raws) if raws is not None else None
        if not isinstance(item, dict) or not isinstance(item.get("filename"), str):
            manifest.problems.append((where, "needs a 'filename' string; skipped"))
        elif captions is None:
            manifest.problems.append((where, "'sentences' must be a list of {\"raw\": text}; skipped"))
        else:
            name = "/".join(p for p in (item.get("filepath") or "", item["filename"]) if p)
            split = item.get("split")
            manifest.entries.append(Entry(name, captions, None if split is None else str(split), where))
    return manifest
