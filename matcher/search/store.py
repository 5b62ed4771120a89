"""Indexes on disk: a versioned directory that a new process opens with mmap in milliseconds.

Layout (``FORMAT`` / ``VERSION`` in ``manifest.json``)::

    DIR/manifest.json   what was built, from what, by which encoder; every file's size and checksums
    DIR/codes.faiss     the candidate stage (faiss index file: SignIndex, BinaryIndex or a quantiser)
    DIR/hasher.npz      the query side of hashed codes (``matcher.hashing.codes.hasher_arrays``)
    DIR/vectors.f16     re-rank vectors, float16 [N, D] row-major, raw (memory-mapped on open)
    DIR/names.bin       item names (paths relative to the gallery root), UTF-8, concatenated
    DIR/names.idx       int64 [N + 1] offsets into names.bin (memory-mapped)

Building streams (``IndexWriter.add`` batch by batch: vectors go straight to disk as float16, codes
to the faiss index; a quantiser that needs training buffers only its training sample) and
writes into a hidden sibling directory that is renamed into place when complete, so a killed build
never leaves something that looks like an index. Opening checks, in this order, and refuses with a
``StoreError`` saying what is wrong and what to do: the manifest (present, parseable, this format
and version), every file's size (a truncated file), checksums (full SHA-256 of files up to
``FULL_CHECK_BYTES``, a sampled digest of larger ones; ``verify(full=True)`` hashes everything), and,
given the query encoder, its fingerprint against the one the index was built with.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from matcher.hashing.codes import hasher_arrays, hasher_from_arrays
from matcher.search.index import (BinaryIndex, CandidateStage, HammingStage, QuantizedIndex, QuantizerStage, SignIndex,
                                  SignStage, TwoStageIndex, gather_rows, read_faiss, write_faiss)
from matcher.search.protocol import (Hit, QueryError, Ranking, SearchOptions, SearchResult, Stopwatch, check_k,
                                     check_text_query)

FORMAT = "matcher-index"
VERSION = 1
MANIFEST = "manifest.json"
CODES, HASHER, VECTORS, NAMES, OFFSETS = "codes.faiss", "hasher.npz", "vectors.f16", "names.bin", "names.idx"
FULL_CHECK_BYTES = 64 << 20     # files up to this size are fully hashed on every open
SAMPLE_BLOCKS, SAMPLE_BLOCK = 64, 64 << 10
DEFAULT_TRAIN = 65_536          # vectors a quantiser is trained on (the first ones added)


class StoreError(ValueError):
    """An index directory that cannot be used as it is; the message says why and how to fix it."""


# -- checksums ---------------------------------------------------------------------------------

def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sampled_sha256(path: Path) -> str:
    """SHA-256 of the size and SAMPLE_BLOCKS blocks spread evenly over the file (first and last
    included): catches truncation, a swapped file and most overwrites without reading gigabytes."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for offset in sorted({int(o) for o in np.linspace(0, max(0, size - SAMPLE_BLOCK), SAMPLE_BLOCKS)}):
            f.seek(offset)
            digest.update(f.read(SAMPLE_BLOCK))
    return digest.hexdigest()


# -- names -------------------------------------------------------------------------------------

class Names(Sequence[str]):
    """Item names from the memory-mapped blob + offsets; nothing is decoded until asked for."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self.blob, self.offsets = blob, offsets
        self._rows: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return bytes(self.blob[self.offsets[i]:self.offsets[i + 1]]).decode("utf-8")

    def index(self, name: str, *args) -> int:   # noqa: D401 - list.index semantics (ValueError if absent)
        if self._rows is None:
            self._rows = {n: r for r, n in enumerate(self)}
        if name not in self._rows:
            raise ValueError(f"{name!r} is not in the index")
        return self._rows[name]

    def __iter__(self) -> Iterator[str]:
        data = bytes(self.blob)
        for start, end in zip(self.offsets[:-1], self.offsets[1:]):
            yield data[start:end].decode("utf-8")


# -- stages <-> files --------------------------------------------------------------------------

def stage_meta(stage: CandidateStage) -> dict:
    if isinstance(stage, SignStage):
        return {"kind": "sign", "bits": stage.bits, "hasher": stage.hasher.method, "name": stage.name,
                "nlist": stage.index.nlist, "nprobe": int(getattr(stage.index.index, "nprobe", 0))}
    if isinstance(stage, HammingStage):
        return {"kind": "hamming", "bits": stage.bits, "hasher": stage.hasher.method, "name": stage.name}
    if isinstance(stage, QuantizerStage):
        return {"kind": "quantizer", "factory": stage.factory, "name": stage.name}
    raise TypeError(f"cannot store a {type(stage).__name__}")


def _load_stage(meta: dict, dim: int, path: Path) -> CandidateStage:
    kind = meta.get("kind")
    if kind == "quantizer":
        return QuantizerStage(meta["factory"], dim, QuantizedIndex(meta["factory"], dim, read_faiss(path / CODES, False)))
    if kind in ("sign", "hamming"):
        with np.load(path / HASHER, allow_pickle=False) as z:
            hasher = hasher_from_arrays({k: z[k] for k in z.files})
        if kind == "sign":
            return SignStage(hasher, SignIndex(meta["bits"], read_faiss(path / CODES, False)))
        index = BinaryIndex(meta["bits"])
        index.index = read_faiss(path / CODES, True)
        return HammingStage(hasher, index)
    raise StoreError(f"{path / MANIFEST}: unknown candidate stage {kind!r}")


# -- writing -----------------------------------------------------------------------------------

class IndexWriter:
    """Stream items into a new index directory: ``add(vectors, names)`` per batch, then ``close()``.

    ``meta`` is recorded in the manifest (put ``encoder`` = {"name", "fingerprint", "spec"} and
    ``gallery`` = {"root", ...} there: ``IndexStore.open`` checks the encoder). Rows are numbered in
    the order added. Nothing appears at ``path`` until ``close`` succeeds.
    """

    def __init__(self, path: str | Path, stage: CandidateStage, dim: int, meta: dict | None = None,
                 train_size: int = DEFAULT_TRAIN, overwrite: bool = False):
        self.path, self.stage, self.dim, self.meta = Path(path), stage, int(dim), dict(meta or {})
        if self.path.exists() and not overwrite:
            raise StoreError(f"{self.path} already exists (pass overwrite=True / --overwrite to replace it)")
        self.tmp = self.path.parent / f".{self.path.name}.building-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.train_size, self.count, self.started = train_size, 0, time.perf_counter()
        self._vectors = open(self.tmp / VECTORS, "wb")
        self._names = open(self.tmp / NAMES, "wb")
        self._offsets, self._offset = [0], 0
        self._pending: list[np.ndarray] = []   # vectors waiting for the quantiser to be trained
        self._pending_rows = 0

    def add(self, vectors: np.ndarray, names: Sequence[str]) -> None:
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape [n, {self.dim}], got {vectors.shape}")
        if len(names) != len(vectors):
            raise ValueError(f"{len(vectors)} vectors but {len(names)} names")
        self._vectors.write(vectors.astype(np.float16).tobytes())
        for name in names:
            data = str(name).encode("utf-8")
            self._names.write(data)
            self._offset += len(data)
            self._offsets.append(self._offset)
        self.count += len(vectors)
        if self.stage.needs_training and not self._trained():
            self._pending.append(vectors)
            self._pending_rows += len(vectors)
            if self._pending_rows >= self.train_size:
                self._flush_pending()
        else:
            self.stage.add(vectors, self.meta.get("item_modality", "image"))

    def _trained(self) -> bool:
        return bool(getattr(self.stage.index, "is_trained", True)) and not self._pending

    def _flush_pending(self) -> None:
        if not self._pending:
            return
        sample = np.concatenate(self._pending)
        self._pending, self._pending_rows = [], 0
        self.stage.train(sample[:self.train_size])
        self.stage.add(sample, self.meta.get("item_modality", "image"))

    def close(self) -> "IndexStore":
        if self.count == 0:
            self.abort()
            raise StoreError("no items were added; an empty index is not written")
        self._flush_pending()
        self._vectors.close()
        self._names.close()
        np.save(self.tmp / OFFSETS, np.asarray(self._offsets, np.int64))
        os.replace(self.tmp / f"{OFFSETS}.npy", self.tmp / OFFSETS)
        write_faiss(self.stage.index, self.tmp / CODES)
        files = [CODES, VECTORS, NAMES, OFFSETS]
        if getattr(self.stage, "hasher", None) is not None:
            with open(self.tmp / HASHER, "wb") as f:
                np.savez(f, **hasher_arrays(self.stage.hasher))
            files.append(HASHER)
        manifest = {
            "format": FORMAT, "version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "count": self.count, "dim": self.dim, "vector_dtype": "float16", "stage": stage_meta(self.stage),
            "code_bytes_per_item": self.stage.bytes_per_item,
            "codes_file_bytes_per_item": round(os.path.getsize(self.tmp / CODES) / self.count, 3),
            "rerank_bytes_per_item": 2 * self.dim, "build_s": round(time.perf_counter() - self.started, 2),
            **self.meta,
            "files": {f: {"bytes": os.path.getsize(self.tmp / f), "sha256": file_sha256(self.tmp / f),
                          "sampled_sha256": sampled_sha256(self.tmp / f)} for f in files},
        }
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if self.path.exists():
            old = self.path.parent / f".{self.path.name}.old-{os.getpid()}"
            os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.path)
        return IndexStore.open(self.path)

    def abort(self) -> None:
        for f in (self._vectors, self._names):
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "IndexWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:
            self.abort()


def build_index(path: str | Path, stage: CandidateStage, batches: Iterable[tuple[np.ndarray, Sequence[str]]],
                dim: int, meta: dict | None = None, overwrite: bool = False, train_size: int = DEFAULT_TRAIN,
                progress: Callable[[int], None] | None = None) -> "IndexStore":
    """Write an index from an iterable of (vectors, names) batches; ``progress(rows_so_far)``."""
    with IndexWriter(path, stage, dim, meta, train_size=train_size, overwrite=overwrite) as writer:
        for vectors, names in batches:
            writer.add(vectors, names)
            if progress:
                progress(writer.count)
        return writer.close()


# -- reading -----------------------------------------------------------------------------------

class IndexStore:
    """An opened index directory: ``index`` (a ``TwoStageIndex`` over mmap'd float16 vectors),
    ``names``, ``manifest``. Open with ``IndexStore.open``."""

    def __init__(self, path: Path, manifest: dict, index: TwoStageIndex, names: Names, open_s: float):
        self.path, self.manifest, self.index, self.names, self.open_s = path, manifest, index, names, open_s

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def vectors(self) -> np.ndarray:
        return self.index.vectors

    @classmethod
    def open(cls, path: str | Path, encoder=None, full_check: bool = False) -> "IndexStore":
        """Open ``path`` (mmap), refusing a missing, foreign, truncated, corrupted or mismatched index.

        ``encoder``: the encoder that will encode queries; its fingerprint must be the one recorded.
        """
        started = time.perf_counter()
        path = Path(path)
        manifest = read_manifest(path)
        problems = check_files(path, manifest, full=full_check)
        if problems:
            raise StoreError(f"index {path} is damaged: " + "; ".join(problems)
                             + ". Rebuild it with `python -m matcher index build`.")
        if encoder is not None:
            check_encoder(manifest, encoder, path)
        count, dim = int(manifest["count"]), int(manifest["dim"])
        vectors = np.memmap(path / VECTORS, dtype=np.float16, mode="r", shape=(count, dim))
        names = Names(np.memmap(path / NAMES, dtype=np.uint8, mode="r") if manifest["files"][NAMES]["bytes"]
                      else np.zeros(0, np.uint8), np.load(path / OFFSETS, mmap_mode="r", allow_pickle=False))
        try:
            stage = _load_stage(manifest["stage"], dim, path)
        except RuntimeError as exc:   # faiss could not parse the file
            raise StoreError(f"index {path}: {CODES} is unreadable ({str(exc).splitlines()[-1]}); rebuild it") from None
        if len(stage) != count or len(names) != count:
            raise StoreError(f"index {path}: {len(stage)} codes and {len(names)} names for {count} items; rebuild it")
        return cls(path, manifest, TwoStageIndex(stage, vectors), names, time.perf_counter() - started)

    def verify(self) -> list[str]:
        """Every file fully re-hashed: the problems found (empty when intact)."""
        return check_files(self.path, self.manifest, full=True)

    def search(self, queries: np.ndarray, k: int = 10, candidates: int = 2000,
               modality: str = "text") -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k, candidates, modality)

    def summary(self) -> dict:
        m = self.manifest
        return {"path": str(self.path), "items": m["count"], "dim": m["dim"], "stage": m["stage"].get("name"),
                "code_bytes_per_item": m.get("code_bytes_per_item"), "rerank": f"float16 mmap, {2 * m['dim']} B/item",
                "encoder": (m.get("encoder") or {}).get("name"), "built": m.get("created"),
                "open_ms": round(self.open_s * 1000, 1)}


def read_manifest(path: Path) -> dict:
    if not path.is_dir():
        raise StoreError(f"no index at {path} (not a directory); build one with `python -m matcher index build`")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise StoreError(f"{path} is not an index directory (no {MANIFEST}); "
                         "an interrupted build leaves nothing here, so build it again") from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path / MANIFEST} is unreadable ({exc}); rebuild the index") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{path} is not a matcher index (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("version") != VERSION:
        raise StoreError(f"index {path} has format version {manifest.get('version')}, this code reads version "
                         f"{VERSION}; rebuild it with `python -m matcher index build`")
    return manifest


def recorded_encoder_spec(path: str | Path) -> str | None:
    """The spec of the encoder an index's queries need, as its manifest records it; None when the
    manifest cannot be read (``IndexStore.open`` then says why) or records none."""
    try:
        spec = (read_manifest(Path(path)).get("encoder") or {}).get("spec")
    except StoreError:
        return None
    return spec if isinstance(spec, str) and spec.strip() else None


def check_files(path: Path, manifest: dict, full: bool = False) -> list[str]:
    problems = []
    for name, entry in manifest.get("files", {}).items():
        f = path / name
        if not f.exists():
            problems.append(f"{name} is missing")
            continue
        size = f.stat().st_size
        if size != entry["bytes"]:
            what = "truncated" if size < entry["bytes"] else "longer than written"
            problems.append(f"{name} is {what} ({size} bytes, the manifest says {entry['bytes']})")
            continue
        if full or size <= FULL_CHECK_BYTES:
            if file_sha256(f) != entry["sha256"]:
                problems.append(f"{name} does not match its checksum (corrupted)")
        elif sampled_sha256(f) != entry["sampled_sha256"]:
            problems.append(f"{name} does not match its sampled checksum (corrupted)")
    return problems


def check_gallery(store: "IndexStore", gallery) -> None:
    """Refuse to serve ``store`` over a gallery that does not hold its items: the gallery supplies
    the files and captions of what the index returns, so every item must be one of its images."""
    present = set(gallery.names)
    missing = [name for name in store.names if name not in present]
    if not missing:
        return
    built = store.manifest.get("gallery") or {}
    if built.get("root"):
        split = f" --split {built['split']}" if built.get("split") else ""
        source, fix = f"images of {built['root']}", f"serve the gallery it was built from (--gallery {built['root']}{split})"
    else:
        source = f"vectors from {built.get('vectors', 'an unrecorded source')}"
        fix = f"search it with `python -m matcher index search {store.path}`"
    raise StoreError(f"index {store.path} holds {store.count} {source}; {len(missing)} of them are not in the gallery "
                     f"being served ({gallery.root}, {len(gallery)} images; first missing: {missing[0]!r}): {fix}")


def check_encoder(manifest: dict, encoder, path: Path) -> None:
    built = manifest.get("encoder") or {}
    if built.get("fingerprint") and built["fingerprint"] != encoder.fingerprint():
        raise StoreError(f"index {path} was built with encoder {built.get('name')!r} (fingerprint "
                         f"{built['fingerprint'][:12]}), but queries would be encoded by {encoder.name!r} "
                         f"(fingerprint {encoder.fingerprint()[:12]}): their vectors are not comparable. "
                         f"Use {built.get('spec') or built.get('name')!r} or rebuild the index with this encoder.")


# -- a matcher over a stored index ---------------------------------------------------------------

class IndexedMatcher:
    """The ``Matcher`` protocol over an ``IndexStore``: the gallery is the index (any size), queries
    are encoded by ``encoder`` (checked against the index's fingerprint), nothing is re-encoded or
    re-hashed. Images only: caption search needs caption codes, which an image index does not hold.
    ``options.candidates`` is the shortlist C; left at ``SearchOptions``' default (100, sized for the
    1000-photo gallery) it becomes ``default_candidates`` (2000: recall >= 0.99 at 1M items on both
    benchmark galleries, docs/scale.md). ``options.bits`` is fixed by the index.
    ``gallery``: the gallery it is served over (``index:DIR`` in the registry: the page's, the
    command's), which must hold every item (``check_gallery``); without one, a gallery of the items
    under the root the manifest records, without captions.
    """

    def __init__(self, store: IndexStore, encoder, name: str | None = None, default_candidates: int = 2000,
                 gallery=None):
        check_encoder(store.manifest, encoder, store.path)
        if gallery is not None:
            check_gallery(store, gallery)
        self.store, self.encoder = store, encoder
        self.name = name or f"index:{store.path.name}"
        self.default_candidates = default_candidates
        self._gallery, self._embeddings = gallery, None

    @property
    def gallery(self):
        from matcher.data.gallery import Gallery

        if self._gallery is None:
            root = (self.store.manifest.get("gallery") or {}).get("root", str(self.store.path))
            self._gallery = Gallery(Path(root), list(self.store.names))
        return self._gallery

    @property
    def embeddings(self):
        """The index's vectors as float32 ``GalleryEmbeddings`` (materialised on first use: N x D x 4 bytes)."""
        from matcher.data.embed import GalleryEmbeddings

        if self._embeddings is None:
            dim = self.store.dim
            self._embeddings = GalleryEmbeddings(list(self.store.names), np.asarray(self.store.vectors, np.float32), [],
                                                 np.zeros(0, np.int64), np.zeros((0, dim), np.float32))
        return self._embeddings

    def _c(self, options: SearchOptions) -> int:
        c = options.candidates if options.candidates != SearchOptions.candidates else self.default_candidates
        if c < 1:
            raise QueryError(f"the shortlist size C must be at least 1 (got {c}).")
        return c

    def _search(self, query: np.ndarray, modality: str, options: SearchOptions, clock: Stopwatch) -> SearchResult:
        k = check_k(options.k)
        with clock.stage("candidates"):
            code_scores, cand = self.store.index.candidates(query[None], max(self._c(options), k), modality)
        with clock.stage("rerank"):
            if options.rerank:
                scores, ids = self.store.index.rerank(query[None], cand, k)
                scores, ids = scores[0], ids[0]
            else:
                scores, ids = code_scores[0, :k], cand[0, :k]
        return clock.result([Hit(int(i), self.store.names[i], float(s)) for s, i in zip(scores, ids) if i >= 0])

    def search_text(self, text: str, options: SearchOptions = SearchOptions()) -> SearchResult:
        text, clock = check_text_query(text), Stopwatch()
        with clock.stage("encode"):
            query = self.encoder.encode_texts([text])[0]
        return self._search(query, "text", options, clock)

    def search_image(self, image: Image.Image, options: SearchOptions = SearchOptions()) -> SearchResult:
        clock = Stopwatch()
        with clock.stage("encode"):
            query = self.encoder.encode_images([image])[0]
        return self._search(query, "image", options, clock)

    def more_like(self, name: str, options: SearchOptions = SearchOptions()) -> SearchResult:
        try:
            row = self.store.names.index(name)
        except ValueError:
            raise QueryError(f"{name!r} is not in this index.") from None
        clock = Stopwatch()
        clock.timings["encode"] = 0.0
        return self._search(gather_rows(self.store.vectors, np.array([row]))[0], "image", options, clock)

    def captions_for_image(self, image: Image.Image, options: SearchOptions = SearchOptions(k=5)) -> SearchResult:
        raise QueryError("This index holds images only; searching captions needs the gallery's hashed matcher.")

    def rank_captions(self, texts: list[str], owners: list[str], k: int, options: SearchOptions = SearchOptions(),
                      progress: Callable[[float], None] | None = None) -> Ranking:
        cap = min(max(self._c(options), k), self.store.count)
        queries = self.encoder.encode_texts(texts)
        _, order = self.store.search(queries, cap, cap)
        owner_rows = np.array([self._row(o) for o in owners])
        hit = order == owner_rows[:, None]
        ranks = np.where(hit.any(axis=1), hit.argmax(axis=1), cap)
        return Ranking([[self.store.names[j] for j in row[:k] if j >= 0] for row in order], ranks, cap)

    def _row(self, name: str) -> int:
        try:
            return self.store.names.index(name)
        except ValueError:
            return -2
