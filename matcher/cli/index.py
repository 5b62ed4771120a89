"""``python -m matcher index build|info|verify|search``: indexes on disk (``matcher.search.store``).

``build`` encodes a gallery batch by batch (or reads precomputed vectors with ``--vectors``) and
streams the codes and float16 re-rank vectors into a versioned index directory; ``search`` opens one
in a new process (mmap, no re-encoding of the gallery, no re-hashing) and answers a query.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from matcher.cli.common import add_gallery, fail

log = logging.getLogger(__name__)

DEFAULT_STAGE = "asym-ivf"  # measured: docs/scale.md (python -m matcher bench)
DEFAULT_BITS = 192          # 24 B of code + 8 B of list id = 32 bytes per item
IVF_PROBE = 0.2             # share of the inverted lists a query scans
STAGES_HELP = ("asym-ivf (hash codes in inverted lists, asymmetric score; default), asym (hash codes, flat scan), "
               "hamming (hash codes, Hamming distance), or a faiss factory string over the float vectors, e.g. "
               "PQ64x4fs, 'SVD192,IVF{n},PQ48x4fs' ({n}: lists for the gallery size)")


def open_model(text: str, gallery=None):
    """(encoder, {bits: hasher}, base spec) of a spec: a hashed spec gives its base encoder and its
    heads (heads made on first use for a spec without a heads file need ``gallery``)."""
    from matcher.registry import cached_encoder, load_hashers, parse_spec

    try:
        spec = parse_spec(text)
        hashers = load_hashers(spec, gallery) if spec.kind == "hashed" else {}
        return cached_encoder(spec.base), hashers, spec.base
    except (ValueError, FileNotFoundError) as exc:
        fail(exc)


def make_build_stage(name: str, bits: int, hashers: dict, dim: int, n: int):
    """The candidate stage ``--stage`` names for a gallery of about n items."""
    from matcher.hashing.codes import LayeredHasher
    from matcher.search.index import HammingStage, QuantizedIndex, QuantizerStage, SignStage, factory_for, ivf_lists

    if name in ("asym", "asym-ivf", "hamming"):
        if not hashers:
            fail(f"--stage {name} needs hash codes: give a hashed model (e.g. --model offline-hashed), "
                 "or a faiss quantiser such as --stage PQ64x4fs")
        longer = [b for b in sorted(hashers) if b >= bits]
        if not longer or bits % 8:
            fail(f"no {bits}-bit hash code: this model's heads have {sorted(hashers)} bits (a multiple of 8 up to those)")
        hasher = hashers[bits] if bits in hashers else LayeredHasher.of(hashers[longer[0]]).first(bits)
        if name == "hamming":
            return HammingStage(hasher)
        return SignStage(hasher, nlist=ivf_lists(n) if name == "asym-ivf" else 0, probe=IVF_PROBE)
    factory = factory_for(name, n)
    try:
        return QuantizerStage(factory, dim, QuantizedIndex(factory, dim, probe=IVF_PROBE))
    except RuntimeError as exc:
        fail(f"--stage {name!r} is neither asym-ivf, asym, hamming nor a faiss factory string "
             f"({str(exc).splitlines()[-1]})")


def gallery_batches(encoder, gallery, batch: int, skipped: list):
    """(vectors, names) per batch of readable images: the gallery is never held as one matrix."""
    from matcher.data.images import UnreadableImage, load_rgb

    images, names = [], []
    for name in gallery.names:
        try:
            images.append(load_rgb(gallery.path(name)))
            names.append(name)
        except UnreadableImage as exc:
            skipped.append((name, str(exc)))
        if len(images) == batch:
            yield encoder.encode_images(images, batch_size=batch), names
            images, names = [], []
    if images:
        yield encoder.encode_images(images, batch_size=batch), names


def vector_batches(vectors_path: str, names_path: str | None, batch: int):
    import numpy as np

    vectors = np.load(vectors_path, mmap_mode="r")
    names = Path(names_path).read_text().splitlines() if names_path else [str(i) for i in range(len(vectors))]
    if len(names) != len(vectors):
        fail(f"{vectors_path} has {len(vectors)} rows but {names_path} has {len(names)} names")
    for start in range(0, len(vectors), batch):
        yield np.asarray(vectors[start:start + batch], np.float32), names[start:start + batch]


def cmd_build(args: argparse.Namespace) -> None:
    import numpy as np
    from tqdm import tqdm

    from matcher.cli.common import open_gallery_arg
    from matcher.search.store import StoreError, build_index

    if Path(args.out).exists() and not args.overwrite:
        fail(f"{args.out} already exists (pass --overwrite to replace it)")
    gallery = None if args.vectors else open_gallery_arg(args)
    encoder, hashers, base = open_model(args.model, gallery)
    dim = encoder.dim
    n = len(gallery) if gallery is not None else len(np.load(args.vectors, mmap_mode="r"))
    stage = make_build_stage(args.stage, args.bits, hashers, dim, n)
    skipped: list = []
    meta = {"encoder": {"spec": base, "name": encoder.name, "fingerprint": encoder.fingerprint()},
            "model": args.model, "item_modality": "image"}
    if args.vectors:
        total = None
        batches = vector_batches(args.vectors, args.names, args.batch)
        meta["gallery"] = {"vectors": str(Path(args.vectors).resolve())}
    else:
        total = len(gallery)
        batches = gallery_batches(encoder, gallery, args.batch, skipped)
        meta["gallery"] = {"root": str(Path(gallery.root).resolve()), "split": args.split, "listed": total}
    bar = tqdm(total=total, desc=f"index {Path(args.out).name}: {stage.name}", unit="item", mininterval=1.0)
    seen = [0]

    def progress(rows: int) -> None:
        bar.update(rows - seen[0])
        seen[0] = rows

    try:
        store = build_index(args.out, stage, batches, dim, meta, overwrite=args.overwrite, progress=progress)
    except (StoreError, ValueError) as exc:
        fail(exc)
    finally:
        bar.close()
    for name, reason in skipped:
        print(f"  skipped {name}: {reason}")
    m = store.manifest
    print(f"wrote {store.path}: {m['count']} items, {stage.name} codes {m['code_bytes_per_item']} B/item + float16 "
          f"re-rank vectors {m['rerank_bytes_per_item']} B/item (mmap), built in {m['build_s']} s")


def _open(args: argparse.Namespace, encoder=None, full: bool = False):
    from matcher.search.store import IndexStore, StoreError

    try:
        return IndexStore.open(args.dir, encoder=encoder, full_check=full)
    except StoreError as exc:
        fail(exc)


def cmd_info(args: argparse.Namespace) -> None:
    store = _open(args)
    for key, value in store.summary().items():
        print(f"{key:22s} {value}")


def cmd_verify(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    store = _open(args, full=True)
    print(f"{store.path}: {store.count} items, every file matches its SHA-256 ({time.perf_counter() - started:.2f} s)")


def cmd_search(args: argparse.Namespace) -> None:
    from matcher.data.images import UnreadableImage, load_rgb
    from matcher.search.protocol import QueryError, SearchOptions
    from matcher.search.store import IndexedMatcher, read_manifest

    spec = read_manifest(Path(args.dir)).get("encoder", {}).get("spec") if not args.model else args.model
    if not spec:
        fail(f"{args.dir} does not record its encoder; pass --model")
    encoder, _, _ = open_model(spec)
    started = time.perf_counter()
    store = _open(args, encoder=encoder)
    opened = time.perf_counter() - started
    matcher = IndexedMatcher(store, encoder, default_candidates=args.candidates)
    options = SearchOptions(k=args.k, candidates=args.candidates)
    try:
        result = matcher.search_image(load_rgb(args.image), options) if args.image else matcher.search_text(args.query, options)
    except (QueryError, UnreadableImage) as exc:
        fail(exc)
    print(f"opened {store.path} ({store.count} items) in {opened * 1000:.1f} ms")
    for rank, hit in enumerate(result.hits, 1):
        print(f"{rank:3d}  {hit.score:.4f}  {hit.name}")
    print("timings (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings_ms.items()))


def add_commands(sub) -> None:
    p = sub.add_parser("index", help="build, inspect, verify and search an index directory (any gallery size)")
    isub = p.add_subparsers(dest="index_command", required=True)

    b = isub.add_parser("build", help="encode a gallery (streamed) into a versioned index directory")
    add_gallery(b)
    b.add_argument("--out", required=True, help="index directory to write")
    b.add_argument("--model", default="offline-hashed", help="a hashed spec (codes + base encoder) or a float encoder")
    b.add_argument("--stage", default=DEFAULT_STAGE, help=STAGES_HELP)
    b.add_argument("--bits", type=int, default=DEFAULT_BITS,
                   help="hash code length for asym-ivf/asym/hamming (the first bits of a longer head if needed)")
    b.add_argument("--batch", type=int, default=64, help="images encoded (and rows written) at a time")
    b.add_argument("--vectors", help="build from precomputed vectors (.npy, read by mmap) instead of encoding")
    b.add_argument("--names", help="with --vectors: a text file with one name per row")
    b.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    b.set_defaults(func=cmd_build)

    i = isub.add_parser("info", help="what an index holds (quick checks)")
    i.add_argument("dir")
    i.set_defaults(func=cmd_info)

    v = isub.add_parser("verify", help="re-hash every file of an index against its manifest")
    v.add_argument("dir")
    v.set_defaults(func=cmd_verify)

    s = isub.add_parser("search", help="open an index (mmap) and search it by text or image")
    s.add_argument("dir")
    s.add_argument("query", nargs="?", default="")
    s.add_argument("--image", help="query image path instead of text")
    s.add_argument("--model", help="query encoder spec (default: the one the index records)")
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--candidates", type=int, default=2000, help="shortlist size C (2000: docs/scale.md)")
    s.set_defaults(func=cmd_search)
