"""Small JPEG copies of large gallery photos for the result grids.

A result answer shows up to 4 x K photos; a user's zip of 12-megapixel phone photos would send
megabytes per answer. Photos already small (the bundled 224 px Flickr8k photos: ~20 KB) are served
as they are; bigger ones get a ``THUMB_SIDE`` px JPEG, made once (EXIF orientation applied) and
kept in ``<cache>/thumbs`` (under the disk budget, ``matcher.dashboard.disk``), named by the
photo's path, size and modification time so that a changed photo gets a new one.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

from PIL import Image

from matcher.atomic import atomic_path
from matcher.data.images import upright

log = logging.getLogger(__name__)

THUMB_SIDE = 384
SMALL_BYTES = 150_000        # photos up to this size are served as they are
SMALL_SIDE = 512


class Thumbnails:
    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root is not None else None
        self._known: dict[tuple[str, int, int], Path] = {}
        self._lock = threading.Lock()

    def __call__(self, path: str | Path) -> Path:
        """The path to show for a photo: itself when small (or on any problem), else its thumbnail."""
        path = Path(path)
        try:
            stat = path.stat()
        except OSError:
            return path
        if self.root is None or stat.st_size <= SMALL_BYTES:
            return path
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        known = self._known.get(key)
        if known is not None and known.exists():
            return known
        digest = hashlib.sha1(repr(key).encode()).hexdigest()[:24]
        out = self.root / f"{digest}.jpg"
        if not out.exists():
            try:
                with Image.open(path) as image:
                    if max(image.size) <= SMALL_SIDE:
                        return path
                    image.draft("RGB", (THUMB_SIDE, THUMB_SIDE))
                    image = upright(image)
                    image.thumbnail((THUMB_SIDE, THUMB_SIDE))
                    image = image.convert("RGB")
                    self.root.mkdir(parents=True, exist_ok=True)
                    with atomic_path(out) as tmp:
                        image.save(tmp, "JPEG", quality=82)
            except Exception as exc:  # noqa: BLE001 - an unreadable photo or a full disk: show the original
                log.debug("no thumbnail for %s: %s", path, exc)
                return path
        with self._lock:
            if len(self._known) > 100_000:
                self._known.clear()
            self._known[key] = out
        return out
