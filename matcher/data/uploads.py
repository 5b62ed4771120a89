"""Own galleries: a user's zip of images (optionally with ``captions.jsonl``) or a server-side folder.

Zip extraction is defensive, because the zip comes from a stranger:
- members that would land outside the target (absolute paths, ``..``, drive letters) are refused,
  symlinks and special files are refused, names are never trusted as-is;
- only image files and manifests (``captions.jsonl`` or any format ``matcher.data.readers`` reads:
  .jsonl, .json, .csv, .tsv, WebDataset .tar shards) are extracted; everything else is listed as skipped;
- limits on the number of files, on each file's size and on the total size are enforced on the
  bytes actually written (a zip's declared sizes can lie), so zip bombs stop early;
- the result is cached by the zip's content hash: the same zip is extracted (and, through the
  embedding cache, encoded) once.

Server-side folders are only accepted below configured roots (``MATCHER_FOLDER_ROOTS``), so a
public page cannot be used to browse the server's disk. Every failure, including a disk that is
full or read-only and paths no file system accepts (NUL bytes), is an ``UploadError`` with a
message for the user; a half-extracted ``<hash>.tmp<pid>`` folder is removed on the way out, and
``remove_partial_extractions`` removes those a crash left behind.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from matcher.data.gallery import CAPTIONS_FILE
from matcher.data.readers import MANIFEST_SUFFIXES
from matcher.data.images import IMAGE_EXTENSIONS
from matcher.paths import REPO_ROOT, cache_dir

log = logging.getLogger(__name__)

MAX_FILES = 5000
MAX_FILE_BYTES = 30 * 1024 * 1024
MAX_TOTAL_BYTES = 500 * 1024 * 1024
_DONE = ".extracted"


class UploadError(ValueError):
    """The upload cannot be used at all; the message is meant for the user."""


@dataclass
class Extracted:
    root: Path
    files: int
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (member name, reason)
    from_cache: bool = False


def uploads_dir() -> Path:
    """Where zips are extracted (``<cache>/uploads``); ``UploadError`` if the disk refuses it."""
    try:
        path = cache_dir() / "uploads"
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UploadError(_disk_message(exc)) from None
    return path


def _disk_message(exc: OSError) -> str:
    return (f"the server cannot store uploads right now ({exc.strerror or type(exc).__name__}); "
            "please try again later.")


_PARTIAL = re.compile(r".+\.tmp(\d+)$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def remove_partial_extractions(root: str | Path | None = None) -> list[Path]:
    """Delete ``<hash>.tmp<pid>`` folders whose extracting process is gone (left by a crash)."""
    try:
        root = Path(root) if root is not None else uploads_dir()
        entries = list(root.iterdir()) if root.is_dir() else []
    except (OSError, UploadError):
        return []
    removed = []
    for entry in entries:
        match = _PARTIAL.fullmatch(entry.name)
        if match and entry.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
            log.info("removed a partial extraction left by a crash: %s", entry)
    return removed


def touch(path: Path) -> None:
    """Mark an extracted gallery as just used (disk budgets evict the least recently used first)."""
    for p in (path / _DONE, path):
        try:
            os.utime(p)
        except OSError:
            pass


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:24]


def safe_member_path(name: str) -> PurePosixPath | None:
    """The relative path a member may be written to, or None if the name is unsafe."""
    if not name or "\x00" in name:
        return None
    name = name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return None
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return PurePosixPath(*parts)


def _is_link_or_special(info: zipfile.ZipInfo) -> bool:
    kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip tool stored no file type (plain file)
    return kind != 0 and kind not in (stat.S_IFREG, stat.S_IFDIR)


def _common_top_folder(paths: list[PurePosixPath]) -> str | None:
    """The single folder every member sits in (zips of a folder), to be stripped."""
    tops = {p.parts[0] for p in paths}
    if len(tops) == 1 and all(len(p.parts) > 1 for p in paths):
        return tops.pop()
    return None


def extract_zip(zip_path: str | Path, target_root: str | Path | None = None, max_files: int = MAX_FILES,
                max_file_bytes: int = MAX_FILE_BYTES, max_total_bytes: int = MAX_TOTAL_BYTES) -> Extracted:
    """Extract the images (and ``captions.jsonl``) of a zip into ``target_root/<content hash>/``."""
    zip_path = Path(zip_path)
    try:
        return _extract_zip(zip_path, target_root, max_files, max_file_bytes, max_total_bytes)
    except ValueError as exc:  # e.g. a NUL byte in the path: no file system accepts it
        if isinstance(exc, UploadError):
            raise
        raise UploadError("that upload has a name the server cannot use; rename the file and try again.") from None
    except OSError as exc:  # disk full or read-only, permission, file gone
        raise UploadError(_disk_message(exc)) from None


def _extract_zip(zip_path: Path, target_root: str | Path | None, max_files: int, max_file_bytes: int,
                 max_total_bytes: int) -> Extracted:
    if not zipfile.is_zipfile(zip_path):
        raise UploadError(f"{zip_path.name} is not a zip file. Upload a .zip of images (optionally with captions.jsonl).")
    target = Path(target_root or uploads_dir()) / _file_hash(zip_path)
    if (target / _DONE).exists():
        touch(target)
        files = sum(1 for p in target.rglob("*") if p.is_file() and p.name != _DONE)
        skipped = [tuple(line.split("\t", 1)) for line in (target / _DONE).read_text().splitlines() if "\t" in line]
        return Extracted(target, files, skipped, from_cache=True)

    skipped: list[tuple[str, str]] = []
    wanted: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                rel = safe_member_path(info.filename)
                if rel is None:
                    skipped.append((info.filename, "unsafe path (outside the gallery folder)"))
                    continue
                if _is_link_or_special(info):
                    skipped.append((info.filename, "links and special files are not extracted"))
                    continue
                if rel.parts[0] == "__MACOSX" or any(p.startswith(".") for p in rel.parts):
                    continue  # OS metadata, not content
                if not _is_manifest(rel) and rel.suffix.lower() not in IMAGE_EXTENSIONS:
                    skipped.append((info.filename, "not an image or manifest file"))
                    continue
                if info.file_size > max_file_bytes:
                    skipped.append((info.filename, f"larger than {max_file_bytes // (1024 * 1024)} MB"))
                    continue
                wanted.append((info, rel))
            images = sum(1 for _, rel in wanted if rel.suffix.lower() in IMAGE_EXTENSIONS)
            if images > max_files:
                raise UploadError(f"the zip holds {images} images; the limit is {max_files}.")
            if not any(rel.suffix.lower() in IMAGE_EXTENSIONS or rel.suffix.lower() == ".tar" for _, rel in wanted):
                raise UploadError("the zip contains no image files (.jpg, .png, ...) or WebDataset shards (.tar).")
            strip = _common_top_folder([rel for _, rel in wanted])
            if strip and not any(_is_manifest(rel) and len(rel.parts) == 1 for _, rel in wanted):
                wanted = [(i, PurePosixPath(*rel.parts[1:])) for i, rel in wanted]
            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            total = 0
            try:
                for info, rel in wanted:
                    out = tmp.joinpath(*rel.parts)
                    if not out.resolve().is_relative_to(tmp.resolve()):
                        skipped.append((info.filename, "unsafe path (outside the gallery folder)"))
                        continue
                    out.parent.mkdir(parents=True, exist_ok=True)
                    written = 0
                    with zf.open(info) as src, open(out, "wb") as dst:
                        for chunk in iter(lambda: src.read(1 << 16), b""):
                            written += len(chunk)
                            total += len(chunk)
                            if written > max_file_bytes:
                                break
                            if total > max_total_bytes:
                                raise UploadError(f"the zip unpacks to more than {max_total_bytes // (1024 * 1024)} MB; "
                                                  "upload fewer or smaller images.")
                            dst.write(chunk)
                    if written > max_file_bytes:
                        out.unlink()
                        total -= written
                        skipped.append((info.filename, f"larger than {max_file_bytes // (1024 * 1024)} MB"))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, RuntimeError, NotImplementedError, EOFError, zlib.error) as exc:
        raise UploadError(f"cannot read {zip_path.name} as a zip ({exc}).") from None
    try:
        (tmp / _DONE).write_text("".join(f"{n}\t{r}\n" for n, r in skipped))
        if target.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # another request extracted the same zip meanwhile
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sum(1 for p in target.rglob("*") if p.is_file() and p.name != _DONE)
    return Extracted(target, files, skipped)


def _is_manifest(rel: PurePosixPath) -> bool:
    return rel.name == CAPTIONS_FILE or rel.suffix.lower() in MANIFEST_SUFFIXES


def folder_roots() -> list[Path]:
    """Where server-side gallery folders may live: ``MATCHER_FOLDER_ROOTS`` (os.pathsep-separated),
    by default the bundled galleries and ``../shared/data`` next to the checkout."""
    env = os.environ.get("MATCHER_FOLDER_ROOTS")
    if env:
        return [Path(p).resolve() for p in env.split(os.pathsep) if p.strip()]
    roots = [REPO_ROOT / "assets" / "gallery", REPO_ROOT.parent / "shared" / "data"]
    return [r.resolve() for r in roots if r.exists()]


def check_folder(folder: str | Path, roots: list[Path] | None = None) -> Path:
    """A server-side gallery folder, if it exists and lies under an allowed root."""
    text = str(folder if folder is not None else "").strip()
    if not text:
        raise UploadError("Type the path of a folder on the server.")
    if "\x00" in text or len(text) > 4096 or not text.isprintable():
        raise UploadError("That is not a folder path (it contains characters no path can hold).")
    roots = folder_roots() if roots is None else [Path(r).resolve() for r in roots]
    try:
        path = Path(text).expanduser().resolve()
        inside = any(path.is_relative_to(r) for r in roots)
        exists = inside and path.is_dir()
    except (OSError, ValueError, RuntimeError):  # unreadable, a link loop, a name too long
        raise UploadError("That folder cannot be read on this server.") from None
    if not inside:
        allowed = ", ".join(str(r) for r in roots) or "none configured"
        raise UploadError(f"{path} is outside the folders this server shares (allowed: {allowed}; "
                          "set MATCHER_FOLDER_ROOTS to change).")
    if not exists:
        raise UploadError(f"folder not found: {path}")
    return path
