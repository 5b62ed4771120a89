"""A gallery is a folder of images plus an optional ``captions.jsonl``.

``captions.jsonl`` has one JSON object per line: ``{"image": name, "captions": [...], "split": ...}``
(the shared Flickr8k format). ``name`` is relative to the folder, or to its ``images/`` subfolder
(the shared layout). Images without a line are still searchable; lines without an image file are
reported, not fatal.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from matcher.data.images import IMAGE_EXTENSIONS

CAPTIONS_FILE = "captions.jsonl"


class GalleryError(ValueError):
    """The gallery folder cannot be used at all (missing, empty, bad captions file)."""


@dataclass
class Gallery:
    """Image files (relative to ``root``) in a fixed order, with their captions and splits."""

    root: Path
    names: list[str]
    captions: dict[str, list[str]] = field(default_factory=dict)
    splits: dict[str, str] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (name, reason) found while listing

    def __len__(self) -> int:
        return len(self.names)

    def path(self, name: str) -> Path:
        return self.root / name

    def select(self, split: str | None) -> "Gallery":
        """The images of one split (all images when ``split`` is None)."""
        if split is None:
            return self
        names = [n for n in self.names if self.splits.get(n) == split]
        if not names:
            known = sorted(set(self.splits.values())) or ["none"]
            raise GalleryError(f"no images in split {split!r} of {self.root} (splits present: {', '.join(known)})")
        return Gallery(self.root, names, self.captions, self.splits, self.problems)

    def fingerprint(self) -> str:
        """Content hash of the image bytes and captions: any change invalidates cached embeddings."""
        digest = hashlib.sha256()
        for name in self.names:
            digest.update(name.encode() + b"\0")
            digest.update(hashlib.sha256(self.path(name).read_bytes()).digest())
            digest.update(json.dumps(self.captions.get(name, [])).encode())
        return digest.hexdigest()[:32]


def _read_captions(root: Path) -> list[dict]:
    path = root / CAPTIONS_FILE
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                raise ValueError("needs an 'image' string")
            captions = row.get("captions", [])
            if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
                raise ValueError("'captions' must be a list of strings")
        except ValueError as exc:
            raise GalleryError(f"{path}:{number}: bad line ({exc})") from None
        rows.append(row)
    return rows


def open_gallery(root: str | Path) -> Gallery:
    """List a gallery folder. Images listed in ``captions.jsonl`` come first, in its order."""
    root = Path(root)
    if not root.is_dir():
        raise GalleryError(f"gallery folder not found: {root}")
    on_disk = sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    present = set(on_disk)
    names, captions, splits, problems = [], {}, {}, []
    for row in _read_captions(root):
        name = row["image"]
        if name not in present and f"images/{name}" in present:
            name = f"images/{name}"
        if name not in present:
            problems.append((name, "listed in captions.jsonl but no such file"))
            continue
        if name in captions:
            continue
        names.append(name)
        captions[name] = [c.strip() for c in row.get("captions", []) if c.strip()]
        if "split" in row:
            splits[name] = str(row["split"])
    listed = set(names)
    names += [n for n in on_disk if n not in listed]
    if not names:
        raise GalleryError(f"no images found in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return Gallery(root, names, captions, splits, problems)
