"""A gallery: image files under one root, with their captions and splits, read from any manifest format.

``open_gallery(path, format=None, images=None)`` is the one entry point. ``path`` is a folder, a
manifest file or a WebDataset shard pattern; its format is detected (``matcher.data.readers.detect``)
unless ``format`` names it: the project's ``captions.jsonl``, Karpathy split JSON, COCO captions JSON,
CSV/TSV, Hugging Face imagefolder metadata, WebDataset shards (docs/data.md). ``images`` overrides the
folder image paths are relative to.

A bad manifest is never fatal as long as one image is usable: a malformed line, an entry naming a
missing file (or one outside the root), an image listed twice, an entry with no captions are each
skipped and recorded once in ``Gallery.problems`` as ``("file:line", reason)``.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

from matcher.data.images import IMAGE_EXTENSIONS
from matcher.data.readers import read_manifest
from matcher.data.readers.base import GalleryError, Problem
from matcher.data.readers.jsonl import CAPTIONS_FILE

__all__ = ["CAPTIONS_FILE", "Gallery", "GalleryError", "open_gallery"]


@dataclass
class Gallery:
    """Image files (relative to ``root``) in a fixed order, with their captions and splits."""

    root: Path
    names: list[str]
    captions: dict[str, list[str]] = field(default_factory=dict)
    splits: dict[str, str] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)   # (where, reason): manifest entries not used
    notes: list[str] = field(default_factory=list)          # how the request was read (e.g. a split-less format)
    format: str = "jsonl"

    def __len__(self) -> int:
        return len(self.names)

    def path(self, name: str) -> Path:
        return self.root / name

    def select(self, split: str | None) -> "Gallery":
        """The images of one split (all images when ``split`` is None). A gallery whose manifest has
        no split field at all (COCO captions, a plain folder) is one split: all of it, with a note."""
        if split is None:
            return self
        if not self.splits:
            note = f"the {self.format} gallery has no split field: split {split!r} is all {len(self.names)} images"
            return Gallery(self.root, self.names, self.captions, self.splits, self.problems, self.notes + [note], self.format)
        names = [n for n in self.names if self.splits.get(n) == split]
        if not names:
            known = sorted(set(self.splits.values()))
            raise GalleryError(f"no images in split {split!r} of {self.root} (splits present: {', '.join(known)})")
        return Gallery(self.root, names, self.captions, self.splits, self.problems, self.notes, self.format)

    def fingerprint(self) -> str:
        """Content hash of the image bytes and captions: any change invalidates cached embeddings."""
        digest = hashlib.sha256()
        for name in self.names:
            digest.update(name.encode() + b"\0")
            digest.update(hashlib.sha256(self.path(name).read_bytes()).digest())
            digest.update(json.dumps(self.captions.get(name, [])).encode())
        return digest.hexdigest()[:32]


def _relative(name: str) -> str | None:
    """``name`` as a normalised path inside the root, or None if it points outside it."""
    name = posixpath.normpath(name.replace("\\", "/"))
    if name.startswith(("/", "../")) or name in ("..", ".") or (len(name) > 1 and name[1] == ":"):
        return None
    return name


def open_gallery(path: str | Path, format: str | None = None, images: str | Path | None = None) -> Gallery:
    """Read a gallery in any supported format. Entries come first, in manifest order; in the folder
    format, image files no entry names follow, uncaptioned."""
    manifest = read_manifest(path, format, images)
    root = manifest.image_root
    on_disk = sorted(str(p.relative_to(root).as_posix()) for p in root.rglob("*")
                     if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS) if manifest.keep_unlisted else []
    present = set(on_disk)

    def exists(name: str) -> bool:
        return name in present if manifest.keep_unlisted else (root / name).is_file()

    names, captions, splits, used = [], {}, {}, {}
    problems = list(manifest.problems)
    for entry in manifest.entries:
        name = _relative(entry.image)
        if name is None:
            problems.append((entry.where, f"{entry.image}: outside the gallery folder; skipped"))
            continue
        if not exists(name) and exists(f"images/{name}"):
            name = f"images/{name}"
        if not exists(name):
            problems.append((entry.where, f"{entry.image}: no such file; skipped"))
        elif name in used:
            problems.append((entry.where, f"{entry.image}: listed again (first at {used[name]}); skipped"))
        elif not entry.captions:
            problems.append((entry.where, f"{entry.image}: no captions; skipped"
                             + (" (the image stays searchable)" if manifest.keep_unlisted else "")))
        else:
            used[name] = entry.where
            names.append(name)
            captions[name] = entry.captions
            if entry.split is not None:
                splits[name] = entry.split
    names += [n for n in on_disk if n not in used]
    if not names:
        first = f"; first problem: {': '.join(problems[0])}" if problems else ""
        hint = "" if manifest.keep_unlisted or images else "; if the images live elsewhere, pass --images DIR"
        raise GalleryError(f"no images found in {path} (looked under {root}{first}){hint}")
    return Gallery(root, names, captions, splits, problems, [], manifest.format)


TERMS_FILES = ("TERMS.md", "TERMS.txt", "LICENSE", "LICENSE.md", "LICENSE.txt")


def gallery_terms(root: str | Path | None, limit: int = 400) -> str | None:
    """The terms a gallery folder states, for the page to show beside it: the first paragraph of a
    ``TERMS``/``LICENSE`` file, else a README paragraph that starts with "**Terms.**"; None if none."""
    if root is None or not Path(root).is_dir():
        return None
    root = Path(root)
    paragraphs: list[str] = []
    for name in TERMS_FILES:
        if (root / name).is_file():
            paragraphs = [p for p in _paragraphs(root / name) if not p.startswith("#")][:1]
            break
    else:
        if (root / "README.md").is_file():
            paragraphs = [p for p in _paragraphs(root / "README.md") if p.startswith("**Terms.**")][:1]
    if not paragraphs:
        return None
    text = " ".join(paragraphs[0].split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def _paragraphs(path: Path) -> list[str]:
    try:
        return [p.strip() for p in path.read_text(errors="replace").split("\n\n") if p.strip()]
    except OSError:
        return []
