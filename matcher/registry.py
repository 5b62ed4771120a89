"""The one table from a spec to what it opens: an encoder, a matcher, its evaluation rows.

A spec is one of
- a registered name: a JSON file in ``matcher/models/configs/`` (``offline-teacher`` ...) whose
  ``type`` is a key of ``KINDS``;
- ``open_clip:MODEL@TAG`` for a hub pretrained tag (validated against ``open_clip.list_pretrained()``
  before anything is downloaded), ``open_clip:MODEL@PATH`` for a local open_clip checkpoint,
  ``open_clip:MODEL`` for random init (or a project config such as ``matcher-tiny-vit``);
- a path to a matcher dual-encoder checkpoint (``.pt``) written by the training commands;
- ``hashed:BASE`` for the hashed tier of any float spec ``BASE``: HEI heads trained on ``BASE``'s
  embeddings of a captioned training gallery (``$MATCHER_TRAIN_GALLERY`` / ``--train-gallery``,
  default Flickr8k train) on first use and cached, or ITQ codes where no such gallery exists;
- ``distilled:STUDENT from TEACHER``: the float spec ``STUDENT`` with projection heads distilled
  from ``TEACHER``'s similarity matrices on that training gallery (``matcher.train.heads``);
- ``index:DIR`` for an index directory written by ``python -m matcher index build``
  (``matcher.search.store``; ``DIR`` relative to the current directory, like ``--out``): its items
  are searched as stored (mmap, nothing re-encoded), its queries encoded by the encoder spec its
  manifest records.

``parse_spec`` is the only place spec strings are read; ``KINDS`` the only dispatch on a config's
type. Adding a tier is one ``Kind`` entry: how its queries are encoded (``base``), how it opens
over a gallery (``open``), and which rows it adds to the evaluation report (``report``).
Presets (role -> spec) and the rule for what runs when a preset cannot are in ``matcher.presets``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

from matcher.data.gallery import Gallery
from matcher.eval import rows as report_rows
from matcher.models.encoder import Encoder
from matcher.paths import PACKAGE_DIR, REPO_ROOT
from matcher.search.protocol import Matcher

CONFIG_DIR = PACKAGE_DIR / "models" / "configs"


@dataclass(frozen=True)
class Spec:
    """A parsed spec: what the user wrote, the kind it names and that kind's settings."""

    text: str
    kind: str
    config: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def parts(self) -> list[str]:
        """The specs this one is built from (a hashed tier's base, a distilled student's pair)."""
        return [self.config[k] for k in ("base", "student", "teacher", "rerank_by") if self.config.get(k)]

    @property
    def base(self) -> str:
        """The float encoder spec that encodes this matcher's queries (itself for a float kind)."""
        return self.config.get("base", self.text)

    def path(self, key: str) -> Path:
        """A file the config names, relative to the repository unless absolute."""
        path = Path(self.config[key])
        return path if path.is_absolute() else REPO_ROOT / path


def registered_models() -> dict[str, dict]:
    """Registered model configs by name (file stem)."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(CONFIG_DIR.glob("*.json"))}


def parse_spec(text: str) -> Spec:
    """The one parser of spec strings; ``ValueError`` naming the accepted forms otherwise."""
    text = (text or "").strip()
    if text.startswith("hashed:"):
        base = text[len("hashed:"):]
        parse_spec(base)  # the base must be a float spec itself; its error names the accepted forms
        return Spec(text, "hashed", {"base": base})
    if text.startswith("distilled:"):
        student, sep, teacher = text[len("distilled:"):].partition(" from ")
        if not sep or not student.strip() or not teacher.strip():
            raise ValueError(f"write a distilled student as 'distilled:STUDENT from TEACHER' (got {text!r})")
        parse_spec(student), parse_spec(teacher)
        return Spec(text, "distilled", {"student": student.strip(), "teacher": teacher.strip()})
    if text.startswith("index:"):
        return _parse_index(text)
    if text.startswith("open_clip:"):
        model, _, pretrained = text[len("open_clip:"):].partition("@")
        return Spec(text, "open_clip", {"model": model, "pretrained": pretrained or None})
    registry = registered_models()
    if text in registry:
        config = registry[text]
        if config.get("type") not in KINDS:
            raise ValueError(f"model config {text!r} has unknown type {config.get('type')!r} "
                             f"(expected one of: {', '.join(KINDS)})")
        return Spec(text, config["type"], config)
    if text.endswith(".pt"):
        return Spec(text, "checkpoint", {"checkpoint": text})
    raise ValueError(f"unknown model {text!r}: use a registered name ({', '.join(registry) or 'none'}), "
                     "open_clip:MODEL@TAG, open_clip:MODEL@PATH, a .pt checkpoint path, hashed:SPEC, "
                     "'distilled:STUDENT from TEACHER' or index:DIR")


def _parse_index(text: str) -> Spec:
    """``index:DIR``. The directory is only looked at, not checked: a readable manifest gives the
    spec of the encoder its queries need (``base``); a missing directory is reported by
    ``missing_weights`` and a damaged or mismatched one when it is opened, each with its reason."""
    from matcher.search.store import recorded_encoder_spec

    directory = text[len("index:"):].strip()
    if not directory:
        raise ValueError("write an index directory as index:DIR, e.g. index:idx/photos (built by "
                         "`python -m matcher index build --out DIR`)")
    path = Path(directory).expanduser().absolute()
    config = {"index": str(path)}
    base = recorded_encoder_spec(path)
    if base:
        try:
            parse_spec(base)  # the recorded encoder must be a spec this code reads
        except ValueError as exc:
            raise ValueError(f"index {path} records query encoder {base!r}, which cannot be read here: {exc}") from None
        config["base"] = base
    return Spec(text, "index", config)


# -- encoders --------------------------------------------------------------------------------------

def _towers(spec: Spec) -> Encoder:
    from matcher.models.dual_encoder import load_checkpoint

    name = spec.text if spec.kind == "towers" else None  # a bare .pt path is named by its file stem
    return load_checkpoint(spec.path("checkpoint"), name=name)


def _open_clip(spec: Spec) -> Encoder:
    from matcher.models.openclip import OpenClipEncoder

    return OpenClipEncoder(spec.config["model"], spec.config.get("pretrained"))


def _distilled(spec: Spec) -> Encoder:
    from matcher.train.heads import distil_student

    return distil_student(spec.text, cached_encoder(spec.config["student"]), cached_encoder(spec.config["teacher"]))


def _index_encoder(spec: Spec) -> Encoder:
    if "base" not in spec.config:   # the manifest could not be read, or records no encoder: say which
        from matcher.search.store import StoreError, read_manifest

        read_manifest(spec.path("index"))
        raise StoreError(f"index {spec.config['index']} does not record the spec of its query encoder; search "
                         "it with `python -m matcher index search DIR --model SPEC`, or rebuild it")
    return cached_encoder(spec.base)


def _base_encoder(spec: Spec) -> Encoder:
    # The base's memoised instance: a preset with student and hashed roles holds one student, not two.
    return cached_encoder(spec.base)


def load_encoder(text: str) -> Encoder:
    """The float encoder a spec's queries are encoded with (see module docstring)."""
    spec = parse_spec(text)
    return KINDS[spec.kind].encoder(spec)


@lru_cache(maxsize=8)
def cached_encoder(text: str) -> Encoder:
    """``load_encoder`` memoised per process: the app and the CLI load each model once."""
    return load_encoder(text)


# -- matchers --------------------------------------------------------------------------------------

def _open_exact(spec: Spec, gallery: Gallery) -> Matcher:
    from matcher.search.exact import ExactMatcher

    return ExactMatcher(cached_encoder(spec.text), gallery, name=spec.text)


def _open_distilled(spec: Spec, gallery: Gallery) -> Matcher:
    from matcher.data.training import training_gallery

    if training_gallery(gallery) is None:  # None also when it is this gallery: its captions trained the heads
        raise ValueError("the distilled student's training gallery is missing or is the gallery being searched")
    return _open_exact(spec, gallery)


def load_hashers(spec: Spec, gallery: Gallery):
    """The hashers of a ``hashed`` spec: the heads its config names (checked against its base
    encoder: codes from any other encoder would be meaningless, so a different base is an error
    rather than silently bad results), or, without ``heads``, heads trained for the base on the
    training gallery (``matcher.hashing.auto``)."""
    from matcher.hashing.auto import auto_hashers
    from matcher.hashing.heads import check_base, load_heads

    if "heads" not in spec.config:
        return auto_hashers(cached_encoder(spec.base), gallery)
    hashers, meta = load_heads(spec.path("heads"))
    check_base(cached_encoder(spec.base), meta, spec.config["heads"])
    return hashers


def _open_hashed(spec: Spec, gallery: Gallery) -> Matcher:
    """``{"type": "hashed", "base": SPEC, "heads": PATH (optional), "rerank_by": null | SPEC}``."""
    from matcher.data.embed import embed_gallery
    from matcher.search.hashed import HashedMatcher

    reranker = None
    if spec.config.get("rerank_by"):
        other = cached_encoder(spec.config["rerank_by"])
        reranker = (other, embed_gallery(other, gallery))
    return HashedMatcher(cached_encoder(spec.base), gallery, load_hashers(spec, gallery), reranker=reranker,
                         name=spec.text)


def _open_fine(spec: Spec, gallery: Gallery) -> Matcher:
    """``{"type": "fine-rerank", "base": SPEC, "scorer": PATH, "fuse": float | null, "candidates": C}``: the
    base's top C re-scored by the scorer, an alignment scorer (``offline-fine``) or a vl-cross
    cross-encoder (``offline-vl-cross``); which one is read from the checkpoint."""
    from matcher.search.exact import ExactMatcher
    from matcher.search.fine import DEFAULT_CANDIDATES, FineRerankMatcher, load_rerank_scorer

    base = ExactMatcher(cached_encoder(spec.base), gallery)
    scorer = load_rerank_scorer(spec.path("scorer"), base.encoder.module)
    return FineRerankMatcher(base, scorer, spec.config.get("fuse"),
                             int(spec.config.get("candidates", DEFAULT_CANDIDATES)), name=spec.text)


def _open_index(spec: Spec, gallery: Gallery) -> Matcher:
    """The index's own items, served over ``gallery`` (which must hold them: it supplies the image
    files and captions). The directory is checked before any model loads."""
    from matcher.search.store import IndexedMatcher, IndexStore

    store = IndexStore.open(spec.path("index"))
    return IndexedMatcher(store, _index_encoder(spec), name=spec.text, gallery=gallery)


def open_matcher(text: str, gallery: Gallery) -> Matcher:
    """The matcher a spec names, serving ``gallery``."""
    spec = parse_spec(text)
    return KINDS[spec.kind].open(spec, gallery)


# -- the table -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    """What one kind of spec opens. ``report(role, matcher, base_entry)`` returns the evaluation rows
    of the opened matcher (``matcher.eval.rows``), given its base encoder's float row."""

    encoder: Callable[[Spec], Encoder]
    open: Callable[[Spec, Gallery], Matcher]
    report: Callable[..., dict[str, dict]]
    needs_files: tuple[str, ...] = ()   # config keys naming files that must exist (where given) before it loads


KINDS: dict[str, Kind] = {
    "towers": Kind(_towers, _open_exact, report_rows.float_rows, ("checkpoint",)),
    "checkpoint": Kind(_towers, _open_exact, report_rows.float_rows, ("checkpoint",)),
    "open_clip": Kind(_open_clip, _open_exact, report_rows.float_rows),
    "hashed": Kind(_base_encoder, _open_hashed, report_rows.hashed_rows, ("heads",)),
    "fine-rerank": Kind(_base_encoder, _open_fine, report_rows.fine_rows, ("scorer",)),
    "distilled": Kind(_distilled, _open_distilled, report_rows.float_rows),
    "index": Kind(_index_encoder, _open_index, report_rows.index_rows, ("index",)),
}


def needs_hub(text: str) -> bool:
    """Whether loading a spec downloads weights from the hub (its own or its base's)."""
    spec = parse_spec(text)
    if spec.kind == "open_clip":
        tag = spec.config.get("pretrained") or ""
        return bool(tag) and not Path(tag).suffix
    return any(needs_hub(part) for part in spec.parts if part != spec.text)


def missing_weights(text: str) -> str | None:
    """Why a spec cannot load from local files (None if it looks loadable)."""
    try:
        spec = parse_spec(text)
    except ValueError as exc:
        return str(exc)
    for key in KINDS[spec.kind].needs_files:
        if key in spec.config and not spec.path(key).exists():
            return f"{spec.config[key]} not found"
    if spec.kind == "open_clip":
        tag = spec.config.get("pretrained") or ""
        if tag and Path(tag).suffix and not Path(tag).exists():
            return f"{tag} not found"
    return next((reason for part in spec.parts if part != spec.text
                 for reason in [missing_weights(part)] if reason), None)
