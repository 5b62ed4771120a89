"""Hash codes for any float encoder, made on first use: what a ``hashed:SPEC`` matcher searches.

HEI heads need captioned pairs that are *not* the gallery being searched or evaluated (training on
the test captions would be a leak), so they are trained on a separate training gallery:
``$MATCHER_TRAIN_GALLERY`` (``--train-gallery`` on the command line), else Flickr8k beside the
checkout. Its ``train`` split trains and its ``val`` split picks the epoch; a gallery without
splits holds out every 10th image for val. The heads are cached on disk, keyed by the encoder's
fingerprint, the training gallery's content hash and the recipe, so a later start loads them.

Without such a gallery (none found, no captions, or it is the searched gallery itself) the codes
fall back to ITQ fitted on the searched gallery's own embeddings: unsupervised, so nothing leaks.
The log and the hashers' ``method`` (``hei`` / ``itq``) say which one is in use.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from matcher.data.embed import GalleryEmbeddings, embed_gallery
from matcher.data.gallery import Gallery, GalleryError, open_gallery
from matcher.hashing.codes import Hasher, ITQHasher
from matcher.hashing.heads import base_probe, load_heads, save_heads
from matcher.hashing.train import HashRecipe, train_heads
from matcher.models.encoder import Encoder
from matcher.paths import DEFAULT_TRAIN_DATA, cache_dir

log = logging.getLogger(__name__)

TRAIN_GALLERY_ENV = "MATCHER_TRAIN_GALLERY"


def training_gallery(searched: Gallery) -> tuple[Gallery, Gallery] | None:
    """(train, val) galleries to fit heads on, or None where there is no usable one (logged)."""
    root = os.environ.get(TRAIN_GALLERY_ENV) or (str(DEFAULT_TRAIN_DATA) if DEFAULT_TRAIN_DATA.is_dir() else "")
    if not root:
        log.info("no training gallery (set %s or --train-gallery): hashing falls back to ITQ", TRAIN_GALLERY_ENV)
        return None
    try:
        gallery = open_gallery(root)
    except GalleryError as exc:
        log.warning("training gallery %s cannot be read (%s): hashing falls back to ITQ", root, exc)
        return None
    if searched.root is not None and Path(gallery.root).resolve() == Path(searched.root).resolve():
        log.warning("the training gallery is the searched gallery: its captions must not train the codes; ITQ instead")
        return None
    if gallery.splits and "train" in set(gallery.splits.values()):
        train = gallery.select("train")
        val = gallery.select("val") if "val" in set(gallery.splits.values()) else None
    else:
        train, val = gallery, None
    if val is None:  # hold out every 10th image, deterministically
        names = list(train.names)
        held = set(names[::10])
        val = replace(train, names=[n for n in names if n in held])
        train = replace(train, names=[n for n in names if n not in held])
    if not any(train.captions.values()) or not any(val.captions.values()):
        log.warning("training gallery %s has no captions to pair: hashing falls back to ITQ", root)
        return None
    return train, val


def _itq(encoder: Encoder, gallery: Gallery, recipe: HashRecipe) -> dict[int, Hasher]:
    emb = embed_gallery(encoder, gallery)
    # A gallery without captions centres text queries on the image mean: the best it has.
    texts = emb.captions if len(emb.caption_texts) else emb.images
    dim = emb.images.shape[1]
    return {bits: ITQHasher(emb.images, texts, bits, seed=recipe.seed) for bits in recipe.code_lengths() if bits <= dim}


def _cache_path(encoder: Encoder, train: GalleryEmbeddings, train_gallery: Gallery, recipe: HashRecipe) -> Path:
    digest = hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "hash-heads" / f"{encoder.fingerprint()}-{train_gallery.fingerprint()}-{digest}.pt"


def auto_hashers(encoder: Encoder, searched: Gallery, recipe: HashRecipe | None = None) -> dict[int, Hasher]:
    """{bits: hasher} for ``encoder``: cached or freshly trained HEI heads, else ITQ (see module doc)."""
    recipe = recipe or HashRecipe()
    pair = training_gallery(searched)
    if pair is None:
        return _itq(encoder, searched, recipe)
    train_gallery, val_gallery = pair
    train, val = embed_gallery(encoder, train_gallery), embed_gallery(encoder, val_gallery)
    path = _cache_path(encoder, train, train_gallery, recipe)
    if path.exists():
        try:
            hashers, _ = load_heads(path)
            return hashers
        except Exception as exc:  # a damaged cache file is retrained, never fatal
            log.warning("cached hash heads %s are unreadable (%s); retraining", path, exc)
    heads, epochs = {}, {}
    for bits in recipe.code_lengths():
        heads[bits], record = train_heads(train, train, val, bits, recipe)
        epochs[bits] = record["best_epoch"]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_heads(path, heads, {"base": encoder.name, "base_fingerprint": encoder.fingerprint(),
                             "base_probe": base_probe(encoder), "target": encoder.name, "recipe": asdict(recipe),
                             "data": str(train_gallery.root), "best_epochs": epochs})
    log.info("trained HEI heads for %s on %s (%d images): %s", encoder.name, train_gallery.root, len(train.names), path)
    hashers, _ = load_heads(path)
    return hashers
