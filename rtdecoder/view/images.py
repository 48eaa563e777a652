"""Candidate images for the view and the report: where they come from, and small PNG thumbnails of them.

An image source is a callable ``source(stim_id) -> ndarray | None`` that returns an RGB image
(uint8, H×W×3) or ``None`` when it has no image of that id. The live decoder's candidates are a
folder (``candidates.images_dir``, :func:`folder_image_source`) or, for the phantom world, its
stimulus bank; the command line builds the latter, so nothing here imports the simulator.
"""

from __future__ import annotations

import io
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

ImageSource = Callable[[str], np.ndarray | None]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
#: What a stimulus id may look like to be looked up at all: ids travel in URLs, and a folder
#: source must never be asked for ``../`` or an absolute path.
STIM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def folder_image_source(images_dir: str | Path) -> ImageSource:
    """Images of a candidate folder, by file name (``cat.png``, the retrieval's ids) or by stem (``cat``).

    The folder is listed once, at the first request, and only files found in that listing are
    ever opened: an id is a key into the listing, never part of a path.

    Parameters
    ----------
    images_dir : str or Path
        The folder ``candidates.images_dir`` names (not searched recursively).
    """
    folder = Path(images_dir)
    index: dict[str, Path] = {}
    listed = threading.Event()
    lock = threading.Lock()

    def source(stim_id: str) -> np.ndarray | None:
        if not listed.is_set():
            with lock:
                if not listed.is_set():
                    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
                        if folder.is_dir() else []
                    if not files:
                        logger.warning("%s: no candidate images found for the view's thumbnails", folder)
                    for path in reversed(files):  # the first file of a stem wins, as sorted
                        index[path.stem] = path
                    index.update({path.name: path for path in files})
                    listed.set()
        path = index.get(stim_id)
        if path is None:
            return None
        from PIL import Image

        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)

    return source


def thumbnail_png(image: np.ndarray, size_px: int) -> bytes:
    """A square PNG thumbnail of an RGB (or grey) uint8 image, ``size_px`` pixels a side."""
    from PIL import Image

    pixels = np.asarray(image)
    if pixels.dtype != np.uint8:
        # float images in [0, 1] (what embedders take) are the other form images travel in here
        pixels = np.clip(np.asarray(pixels, dtype=np.float64) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    thumb = Image.fromarray(pixels).convert("RGB")
    thumb.thumbnail((size_px, size_px), Image.Resampling.BICUBIC)
    if thumb.size != (size_px, size_px):  # pad a non-square image so every thumbnail lines up
        square = Image.new("RGB", (size_px, size_px), (32, 32, 32))
        square.paste(thumb, ((size_px - thumb.size[0]) // 2, (size_px - thumb.size[1]) // 2))
        thumb = square
    buffer = io.BytesIO()
    thumb.save(buffer, format="PNG")
    return buffer.getvalue()


class ThumbnailCache:
    """Encoded thumbnails of one image source, the most recently used ``capacity`` of them kept.

    Parameters
    ----------
    source : callable
        ``source(stim_id)`` returns the image or ``None``; an exception it raises counts as no image.
    size_px : int
        Edge of each thumbnail, pixels.
    capacity : int
        Thumbnails kept (ids with no image are remembered too, so a missing one is not looked up
        again and again).
    """

    def __init__(self, source: ImageSource, size_px: int, capacity: int) -> None:
        self.source = source
        self.size_px = size_px
        self.capacity = capacity
        self._cache: OrderedDict[str, bytes | None] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, stim_id: str) -> bytes | None:
        """The PNG thumbnail of ``stim_id``, or ``None`` when the id is malformed or has no image."""
        if not STIM_ID.match(stim_id):
            return None
        with self._lock:
            if stim_id in self._cache:
                self._cache.move_to_end(stim_id)
                return self._cache[stim_id]
        try:
            image = self.source(stim_id)
            png = None if image is None else thumbnail_png(image, self.size_px)
        except Exception as err:  # a source that cannot give one image must not break the page
            logger.debug("thumbnail of %s: %s: %s", stim_id, type(err).__name__, err)
            png = None
        with self._lock:
            self._cache[stim_id] = png
            self._cache.move_to_end(stim_id)
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return png

    def __len__(self) -> int:
        return len(self._cache)
