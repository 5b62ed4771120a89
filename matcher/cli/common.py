"""Arguments every command shares, with one meaning each, and the one way a command fails.

- ``--gallery PATH`` / ``--split NAME``: the gallery (a folder, a manifest file or a shard pattern in any
  format ``matcher.data.readers`` reads; ``--format`` to say which, ``--images`` for where its images
  are) and the split. Manifest problems and notes are printed as ``note:`` lines.
- ``--preset NAME`` / ``--preset-file F`` / ``--roles LIST``: which matchers; ``F`` is a JSON object
  role -> spec; ``LIST`` is a comma list of the preset's roles and/or ``ROLE=SPEC`` additions
  (``matcher.presets.parse_roles``).
- ``--train-gallery PATH``: the captioned gallery that ``hashed:SPEC`` heads train on (never the
  gallery being searched); default Flickr8k beside the checkout.
- ``--data PATH``: the Flickr8k training folder (train/val/test) the trainers and benches read.
Errors the user can fix leave through ``fail``: one ``error: ...`` line, exit status 1, no traceback.
"""
from __future__ import annotations

import argparse
from typing import NoReturn
from pathlib import Path

from matcher.paths import DEFAULT_GALLERY, REPO_ROOT

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "flickr8k"


def fail(message: object) -> NoReturn:
    raise SystemExit(f"error: {message}")


def add_gallery(p: argparse.ArgumentParser, split: str | None = None, readers: bool = True) -> None:
    """``--gallery`` and ``--split``; with ``readers``, ``--format`` / ``--images`` for manifests in
    other formats (commands that read the gallery by path only, like ``ablate-student``, go without)."""
    from matcher.data.readers import FORMATS

    p.add_argument("--gallery", default=str(DEFAULT_GALLERY),
                   help="folder of images (+ captions.jsonl), or a Karpathy/COCO JSON, CSV/TSV, imagefolder "
                        "metadata or WebDataset shards (file, folder or pattern such as 'shards/{000..009}.tar')")
    if readers:
        p.add_argument("--format", choices=list(FORMATS), help="the gallery's format (default: detected from the path)")
        p.add_argument("--images", help="folder the manifest's image paths are relative to (default: the manifest's)")
    p.add_argument("--split", default=split,
                   help="only images of this split (a gallery without split field is one split)")


def add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=str(DEFAULT_DATA), help="Flickr8k folder with captions.jsonl and images/")


def add_roles(p: argparse.ArgumentParser) -> None:
    from matcher.presets import DEFAULT_PRESET

    p.add_argument("--preset", default=DEFAULT_PRESET, help="matcher preset (python -m matcher info lists them)")
    p.add_argument("--preset-file", dest="preset_file", help="a preset of your own: a JSON object role -> spec")
    p.add_argument("--roles", "--matchers", dest="roles",
                   help="comma list of the preset's roles and/or ROLE=SPEC additions, e.g. "
                        "teacher,candidate=runs/student.pt (default: every role of the preset)")
    p.add_argument("--train-gallery", dest="train_gallery",
                   help="captioned gallery that hashed:SPEC heads train on (default: Flickr8k beside the checkout)")


def add_search_options(p: argparse.ArgumentParser, k: int = 10) -> None:
    p.add_argument("--k", type=int, default=k)
    p.add_argument("--bits", type=int, default=64, help="hashed matchers: code length")
    p.add_argument("--candidates", type=int, default=100, help="hashed matchers: candidate pool C")
    p.add_argument("--no-rerank", action="store_true", help="hashed matchers: skip the float re-rank")


def open_gallery_arg(args: argparse.Namespace):
    from matcher.data.gallery import GalleryError, open_gallery

    try:
        gallery = open_gallery(args.gallery, getattr(args, "format", None), getattr(args, "images", None)).select(args.split)
    except GalleryError as exc:
        fail(exc)
    for where, reason in gallery.problems:
        print(f"note: {where}: {reason}")
    for note in gallery.notes:
        print(f"note: {note}")
    return gallery


def roles_arg(args: argparse.Namespace) -> dict[str, str]:
    """The matchers ``--preset`` / ``--roles`` name, resolved by the one preset rule (with its notes)."""
    import os

    from matcher.data.training import TRAIN_GALLERY_ENV
    from matcher.presets import PRESETS, load_preset_file, parse_roles, resolve_preset

    if getattr(args, "train_gallery", None):
        if not Path(args.train_gallery).exists():
            fail(f"--train-gallery {args.train_gallery} not found")
        os.environ[TRAIN_GALLERY_ENV] = str(Path(args.train_gallery).resolve())
    presets, name = dict(PRESETS), args.preset
    try:
        if getattr(args, "preset_file", None):
            name = Path(args.preset_file).stem
            presets[name] = load_preset_file(args.preset_file)
            args.preset = name
        if name not in presets:
            fail(f"unknown preset {name!r}; choose one of: {', '.join(presets)}")
        if args.roles:  # named explicitly: the user's choice stands, or is refused with a reason
            return parse_roles(args.roles, presets[name])
        active = resolve_preset(name, presets)
    except ValueError as exc:
        fail(exc)
    for note in active.notes:
        print(f"note: {note}")
    return active.roles


def search_options_arg(args: argparse.Namespace):
    from matcher.search.protocol import SearchOptions

    return SearchOptions(k=args.k, bits=args.bits, candidates=args.candidates, rerank=not args.no_rerank)


def resume_file(out: Path) -> Path:
    """Where a long training keeps its state until it finishes: runs/ (git-ignored), not beside the
    checkpoints, so ``eval-fine`` never mistakes it for a trained tier. Rerunning the same command resumes."""
    return Path("runs") / f"{Path(out).stem}.resume.pt"
