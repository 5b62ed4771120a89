"""Hash codes for any float encoder, made on first use: what a ``hashed:SPEC`` matcher searches.

HEI heads need captioned pairs that are *not* the gallery being searched or evaluated (training on
the test captions would be a leak), so they are trained on the training gallery
(``matcher.data.training``). The heads are cached on disk, keyed by the encoder's fingerprint, the
training gallery's content hash and the recipe, so a later start loads them.

Without such a gallery (none found, no captions, or it is the searched gallery itself) the codes
fall back to ITQ fitted on the searched gallery's own embeddings: unsupervised, so nothing leaks.
The log and the hashers' ``method`` (``hei`` / ``itq``) say which one is in use.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

from matcher.data.embed import embed_gallery
from matcher.data.gallery import Gallery
from matcher.data.training import training_gallery
from matcher.hashing.codes import Hasher, ITQHasher
from matcher.hashing.heads import base_probe, load_heads, save_heads
from matcher.hashing.train import HashRecipe, train_heads
from matcher.models.encoder import Encoder
from matcher.paths import cache_dir

log = logging.getLogger(__name__)

def _itq(encoder: Encoder, gallery: Gallery, recipe: HashRecipe) -> dict[int, Hasher]:
    emb = embed_gallery(encoder, gallery)
    # A gallery without captions centres text queries on the image mean: the best it has.
    texts = emb.captions if len(emb.caption_texts) else emb.images
    dim = emb.images.shape[1]
    return {bits: ITQHasher(emb.images, texts, bits, seed=recipe.seed) for bits in recipe.code_lengths() if bits <= dim}


def _cache_path(encoder: Encoder, train_gallery: Gallery, recipe: HashRecipe) -> Path:
    digest = hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "hash-heads" / f"{encoder.fingerprint()}-{train_gallery.fingerprint()}-{digest}.pt"


def auto_hashers(encoder: Encoder, searched: Gallery, recipe: HashRecipe | None = None) -> dict[int, Hasher]:
    """{bits: hasher} for ``encoder``: cached or freshly trained HEI heads, else ITQ (see module doc)."""
    recipe = recipe or HashRecipe()
    pair = training_gallery(searched)
    if pair is None:
        log.info("hashing %s with ITQ codes fitted on the searched gallery (no separate training gallery)", encoder.name)
        return _itq(encoder, searched, recipe)
    train_gallery, val_gallery = pair
    train, val = embed_gallery(encoder, train_gallery), embed_gallery(encoder, val_gallery)
    path = _cache_path(encoder, train_gallery, recipe)
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
