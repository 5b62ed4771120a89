"""The captioned gallery that fits what a user's models add (hash heads, distilled heads).

It must never be the gallery being searched or evaluated (its captions would leak into the
codes), so it is named separately: ``$MATCHER_TRAIN_GALLERY`` (``--train-gallery`` on the command
line), else Flickr8k beside the checkout. Its ``train`` split trains and its ``val`` split picks
the epoch; a gallery without splits holds out every 10th image for val.
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

from matcher.data.gallery import Gallery, GalleryError, open_gallery
from matcher.paths import DEFAULT_TRAIN_DATA

log = logging.getLogger(__name__)

TRAIN_GALLERY_ENV = "MATCHER_TRAIN_GALLERY"


def training_gallery(searched: Gallery | None = None) -> tuple[Gallery, Gallery] | None:
    """(train, val) galleries to fit heads on, or None where there is none usable (logged): none
    named or found, unreadable, without captions, or the ``searched`` gallery itself."""
    root = os.environ.get(TRAIN_GALLERY_ENV) or (str(DEFAULT_TRAIN_DATA) if DEFAULT_TRAIN_DATA.is_dir() else "")
    if not root:
        log.info("no training gallery (set %s or --train-gallery): no training data", TRAIN_GALLERY_ENV)
        return None
    try:
        gallery = open_gallery(root)
    except GalleryError as exc:
        log.warning("training gallery %s cannot be read (%s): no training data", root, exc)
        return None
    if searched is not None and searched.root is not None and Path(gallery.root).resolve() == Path(searched.root).resolve():
        log.warning("the training gallery is the searched gallery: its captions must not train what is evaluated on it")
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
        log.warning("training gallery %s has no captions to pair: no training data", root)
        return None
    return train, val


