"""Named images to embed: what the embedding cache reads pixels from.

An :class:`ImageSource` is anything with ids, pixels on demand and a digest of what its images
look like (the cache key). :class:`ImageFolder` is a lab's folder of image files, one image per
``<stim_id>.<ext>``; the phantom's stimulus bank (:class:`rtdecoder.phantom.stimuli.StimulusBank`)
is another source with the same methods.

The folder's digest is the SHA-256 of every chosen file's bytes (read in full, in 1 MiB blocks,
once per :class:`ImageFolder`), not of names, sizes or modification times: a copied folder keeps
its cache, and an image rewritten with other pixels but the same size and time gets a new entry.
Hashing costs a read of the files, about a second per GB.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from rtdecoder.errors import BundleError

#: File name endings read as images (case-insensitive).
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: Edge every folder image is resized to, so that batches stack; both embedders take 224 px inputs.
FOLDER_IMAGE_SIZE_PX = 224
_HASH_BLOCK_BYTES = 1 << 20
_DIGEST_VERSION = "image-folder/1"


@runtime_checkable
class ImageSource(Protocol):
    """Images with ids that the embedding cache can embed.

    Attributes
    ----------
    ids : list of str
        One id per image, unique (a trial's ``stim_id`` names its image by it).
    """

    ids: list[str]

    def __len__(self) -> int:
        """Number of images."""
        ...

    def images(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Pixels of some images, shape (len(indices), H, W, 3), uint8 RGB, all one size."""
        ...

    def digest(self, indices: Sequence[int] | np.ndarray | None = None) -> str:
        """A hash of what the chosen images (default: all, in order) look like; equal digests, equal pixels."""
        ...


class ImageFolder:
    """The image files of one folder (not searched recursively), ids = file stems.

    Parameters
    ----------
    folder : str or Path
        Files ending in one of :data:`IMAGE_SUFFIXES`; hidden files (``.name``, e.g. macOS ``._x.png``
        resource forks) are skipped.
    size_px : int, default=224
        Edge in pixels that :meth:`images` resizes every image to (bicubic), so that they stack.

    Raises
    ------
    BundleError
        If the folder does not exist, holds no image file, or two files share a stem
        (``a.png`` and ``a.jpg`` would both be image ``a``).
    """

    def __init__(self, folder: str | Path, size_px: int = FOLDER_IMAGE_SIZE_PX) -> None:
        self.folder = Path(folder)
        self.size_px = int(size_px)
        files = (
            sorted(p for p in self.folder.iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
            if self.folder.is_dir() else []
        )
        if not files:
            raise BundleError(f"{self.folder}: expected a folder with image files ({', '.join(IMAGE_SUFFIXES)})")
        self.files: list[Path] = files
        self.ids: list[str] = [p.stem for p in files]
        self._row: dict[str, int] = {}
        for row, path in enumerate(files):
            if path.stem in self._row:
                raise BundleError(
                    f"{path}: same image id {path.stem!r} as {files[self._row[path.stem]].name}; "
                    "keep one file per stim_id"
                )
            self._row[path.stem] = row
        self._file_sha256: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.files)

    def rows(self, stim_ids: Sequence[str]) -> np.ndarray:
        """Positions of images by id, shape (len(stim_ids),), int64.

        Raises
        ------
        BundleError
            Naming the folder and the first ids that have no file.
        """
        missing = [s for s in stim_ids if s not in self._row]
        if missing:
            raise BundleError(
                f"{self.folder}: no image file for stim_id {missing[0]!r} (expected {missing[0]}.png, .jpg, ...; "
                f"{len(set(missing))} stim_ids without a file)"
            )
        return np.array([self._row[s] for s in stim_ids], dtype=np.int64)

    def images(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Read and resize some images.

        Parameters
        ----------
        indices : sequence of int
            Positions in the folder (``ids`` order).

        Returns
        -------
        ndarray of shape (len(indices), size_px, size_px, 3), uint8
        """
        rows = [int(i) for i in np.asarray(indices).reshape(-1)]
        out = np.empty((len(rows), self.size_px, self.size_px, 3), dtype=np.uint8)
        for k, row in enumerate(rows):
            out[k] = read_image(self.files[row], self.size_px)
        return out

    def digest(self, indices: Sequence[int] | np.ndarray | None = None) -> str:
        """SHA-256 over the chosen images' ids and the SHA-256 of each file's bytes, and the resize.

        Parameters
        ----------
        indices : sequence of int, optional
            Positions in the folder; default all, in ``ids`` order.

        Returns
        -------
        str
            64 hexadecimal characters.
        """
        chosen = range(len(self)) if indices is None else np.asarray(indices).reshape(-1)
        sha = hashlib.sha256(f"{_DIGEST_VERSION}\nsize_px={self.size_px}\nresize=bicubic\n".encode())
        for i in chosen:
            sha.update(f"{self.ids[int(i)]}\t{self.file_sha256(int(i))}\n".encode())
        return sha.hexdigest()

    def file_sha256(self, index: int) -> str:
        """SHA-256 of one file's bytes (computed once per instance), 64 hexadecimal characters."""
        if index not in self._file_sha256:
            sha = hashlib.sha256()
            try:
                with self.files[index].open("rb") as handle:
                    while block := handle.read(_HASH_BLOCK_BYTES):
                        sha.update(block)
            except OSError as err:
                raise BundleError(f"{self.files[index]}: cannot read image file: {err}") from None
            self._file_sha256[index] = sha.hexdigest()
        return self._file_sha256[index]


def read_image(path: str | Path, size_px: int = FOLDER_IMAGE_SIZE_PX) -> np.ndarray:
    """One image file as RGB, resized to ``size_px`` x ``size_px`` (bicubic), shape (size_px, size_px, 3), uint8.

    Raises
    ------
    BundleError
        If the file cannot be read as an image.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (size_px, size_px):
                image = image.resize((size_px, size_px), Image.Resampling.BICUBIC)
            return np.asarray(image, dtype=np.uint8)
    except OSError as err:  # PIL's UnidentifiedImageError is an OSError
        raise BundleError(f"{path}: cannot read image: {err}") from None
