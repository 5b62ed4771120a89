"""Read user images robustly: odd modes are converted to RGB, unusable files raise ``UnreadableImage``.

Galleries come from users (zips, folders, uploads), so every failure mode has to end in either
a usable RGB image or a one-line reason that can be shown to them. Phone photos are often stored
sideways with an EXIF orientation tag; ``load_rgb`` applies it before anything else looks at the
pixels, so what is embedded is what a viewer shows.
"""
from __future__ import annotations

import os
import warnings
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

MIN_SIDE = 8                  # smaller images carry no content worth matching (e.g. 1x1 trackers)
MAX_PIXELS = 120_000_000      # refuse decompression bombs before decoding them
WORKING_SIDE = 1024           # large photos are reduced to this on load; models use <= 260 px
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class UnreadableImage(ValueError):
    """The file cannot be used as an image; the message says why in plain words."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels become white rather than black."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def upright(image: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: its EXIF orientation applied (a no-op without the tag)."""
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block must not make the photo unusable
        return image
    if orientation in (None, 1):
        return image
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001
        return image


def load_rgb(source: str | os.PathLike | BinaryIO) -> Image.Image:
    """Open, fully decode and convert an image to RGB, or raise ``UnreadableImage``."""
    if isinstance(source, (str, os.PathLike)) and "\x00" in os.fspath(source):
        raise UnreadableImage("not a file name that can be opened")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
            w, h = image.size
            if w * h > MAX_PIXELS:
                raise UnreadableImage(f"too large ({w}x{h} pixels; the limit is {MAX_PIXELS // 1_000_000} megapixels)")
            if min(w, h) < MIN_SIDE:
                raise UnreadableImage(f"too small ({w}x{h} pixels; needs at least {MIN_SIDE} on each side)")
            if max(w, h) > WORKING_SIDE:
                image.draft("RGB", (WORKING_SIDE, WORKING_SIDE))  # JPEG decodes at reduced scale
            image.load()
            image = upright(image)
            if max(image.size) > WORKING_SIDE:
                image.thumbnail((WORKING_SIDE, WORKING_SIDE))
            return _to_rgb(image)
    except UnreadableImage:
        raise
    except UnidentifiedImageError:
        raise UnreadableImage("not an image file (unrecognised format)") from None
    except Image.DecompressionBombError:
        raise UnreadableImage("too large (decompression bomb guard)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        reason = "truncated or damaged file" if "truncated" in str(exc) or "broken" in str(exc) else f"cannot decode ({exc})"
        raise UnreadableImage(reason) from None
