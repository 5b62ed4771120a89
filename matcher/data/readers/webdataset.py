"""WebDataset ``.tar`` shards as img2dataset writes them (what clip-retrieval reads): per sample
``{key}.jpg|jpeg|png|webp`` with its captions in ``{key}.txt`` (one per line) and/or ``{key}.json``
(``caption``: a string, or ``captions``: a list; an optional ``split``). ``.txt`` wins when both exist.

The path is a shard, a folder of shards, or a pattern (``shards/{00000..00009}.tar``, ``shards/*.tar``).
The images are extracted once, with the stdlib ``tarfile``, into the cache
(``<cache>/webdataset/<content hash of the shards>/<shard>/<key>.<ext>``), so the gallery is an
ordinary folder to everything downstream; the parsed captions are kept there too, so a second open
reads no tar.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from matcher.data.readers.base import Entry, GalleryError, Manifest, clean_captions
from matcher.paths import cache_dir

NAME = "webdataset"
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
_DONE = "manifest.json"


def expand(pattern: str) -> list[Path]:
    """Shard paths of a pattern: ``{000..009}`` ranges (zero padding kept), ``{a,b}`` lists, globs."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match:
        body = match.group(1)
        if ".." in body:
            lo, hi = body.split("..", 1)
            width = len(lo) if lo.startswith("0") else 0
            choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            choices = body.split(",")
        return [p for c in choices for p in expand(pattern[:match.start()] + c + pattern[match.end():])]
    if glob.has_magic(pattern):
        return [Path(p) for p in sorted(glob.glob(pattern))]
    return [Path(pattern)]


def shards(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(path.glob("*.tar"))
    return [p for p in expand(str(path)) if p.suffix == ".tar" and p.is_file()]


def claims(path: Path) -> bool:
    return bool(shards(path))


def _digest(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:24]


def _captions(text: bytes | None, meta: bytes | None) -> tuple[list[str] | None, str | None]:
    """(captions, split) of one sample; captions None when it has none to offer."""
    try:
        data = json.loads(meta) if meta is not None else None
    except ValueError:
        data = None
    data = data if isinstance(data, dict) else {}
    split = None if data.get("split") is None else str(data["split"])
    if text is not None:
        return clean_captions(text.decode("utf-8", errors="replace").splitlines()), split
    return clean_captions(data.get("captions", data.get("caption"))), split


def _extract(files: list[Path], target: Path) -> dict:
    """Every shard's images into ``target/<shard>/``; returns the manifest record kept beside them."""
    entries, problems, folders = [], [], set()
    for shard in files:
        folder = shard.stem if shard.stem not in folders else f"{shard.stem}-{len(folders)}"
        folders.add(folder)
        samples: dict[str, dict] = {}
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    name = PurePosixPath(member.name)
                    if not member.isfile() or name.is_absolute() or ".." in name.parts or name.name.startswith("."):
                        continue
                    stem, _, suffix = name.name.partition(".")   # the key ends at the first dot
                    key, suffix = (name.parent / stem).as_posix(), suffix.lower()
                    sample = samples.setdefault(key, {"where": f"{shard.name}:{member.name}"})
                    if suffix in sample:
                        problems.append((f"{shard.name}:{member.name}", f"sample {key} has a second .{suffix}; skipped"))
                        continue
                    if suffix in IMAGE_SUFFIXES:
                        out = target / folder / f"{key}.{suffix}"
                        out.parent.mkdir(parents=True, exist_ok=True)
                        with tar.extractfile(member) as src, open(out, "wb") as dst:
                            shutil.copyfileobj(src, dst)
                        sample[suffix] = f"{folder}/{key}.{suffix}"
                    elif suffix in ("txt", "json"):
                        sample[suffix] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError) as exc:   # a damaged shard: keep what came before the damage
            problems.append((shard.name, f"cannot read the rest of this shard ({exc})"))
        for key, sample in samples.items():
            image = next((sample[s] for s in IMAGE_SUFFIXES if s in sample), None)
            captions, split = _captions(sample.get("txt"), sample.get("json"))
            if image is None:
                problems.append((sample["where"], f"sample {key} has no .jpg/.png/.webp image; skipped"))
            elif captions is None:
                problems.append((sample["where"], f"sample {key} has no .txt and no 'caption'/'captions' in a .json; skipped"))
            else:
                entries.append({"image": image, "captions": captions, "split": split, "where": sample["where"]})
    return {"entries": entries, "problems": problems}


def read(path: Path, images: Path | None = None) -> Manifest:
    files = shards(path)
    if not files:
        raise GalleryError(f"no .tar shards found at {path}")
    target = cache_dir() / "webdataset" / _digest(files)
    if not (target / _DONE).is_file():
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            record = _extract(files, tmp)
            (tmp / _DONE).write_text(json.dumps(record))
            if target.exists():   # another process extracted the same shards meanwhile
                shutil.rmtree(tmp)
            else:
                tmp.rename(target)
        except OSError as exc:
            raise GalleryError(f"cannot extract the shards into {target.parent} ({exc.strerror or exc})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    record = json.loads((target / _DONE).read_text())
    entries = [Entry(e["image"], e["captions"], e["split"], e["where"]) for e in record["entries"]]
    return Manifest(NAME, path, target, entries, [tuple(p) for p in record["problems"]])
