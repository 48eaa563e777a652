"""Image embeddings on disk: the embedding cache and embeddings files of named images.

Cache entries
-------------
A cache entry is one safetensors file holding ``tokens`` (N, T, D) and ``pooled`` (N, D) of some
images of an :class:`~rtdecoder.embedding.images.ImageSource`. Its key is the embedder's
:attr:`~rtdecoder.embedding.base.Embedder.name` (model, weights fingerprint, image range,
preprocessing) together with the source's digest of the chosen images (for an image folder the
SHA-256 of the files' bytes, see :mod:`rtdecoder.embedding.images`), so a changed model, weight
file, convention or image never reads a stale entry. Entries are written batch by batch straight
into the file (memory: one batch of images, whatever the number of images), under a temporary
name that is renamed at the end, so an interrupted run leaves no half-written entry.

Embeddings files
----------------
A lab's precomputed embeddings (``candidates.embeddings_file``, or ``calibrate --images``) are a
safetensors file with

* tensor ``tokens`` of shape (n, n_tokens, token_dim), float16 or float32;
* optional tensor ``pooled`` of shape (n, token_dim);
* metadata ``ids``: a JSON list of the n image ids (the trials' ``stim_id``), row for row;
* metadata ``embedder``: the :attr:`Embedder.name` that made them (it must be the subject
  bundle's ``embedding.name``).

:func:`write_embeddings_file` writes one; every cache entry is one too. Reading one maps the
tokens from the file (:class:`ImageTokens`), so only the rows used are read into memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from rtdecoder.embedding.base import Embedder, Embedding
from rtdecoder.embedding.images import ImageFolder, ImageSource
from rtdecoder.errors import BundleError, DecoderError

logger = logging.getLogger(__name__)

CACHE_FORMAT = "rtdecoder-embedding-cache/1"
EMBEDDINGS_FILE_FORMAT = "rtdecoder-embeddings/1"  # as rtdecoder.calibration.dataset writes them
_SAFETENSORS_DTYPES = {np.dtype("<f2"): "F16", np.dtype("<f4"): "F32"}
_NUMPY_DTYPES = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}
# Rows read at a time when copying tokens out of a file (bounds memory for any number of images).
_COPY_ROWS = 256


@dataclass
class ImageTokens:
    """Embedder tokens of named images: a session's stimuli, or the live decoder's candidates.

    Attributes
    ----------
    ids : list of str
        One unique id per image (a trial's ``stim_id``).
    tokens : ndarray of shape (n_images, n_tokens, token_dim), float16 or float32
        Often a read-only memory map of the file that holds them: rows are read when indexed.
    embedding_name : str
        The :attr:`~rtdecoder.embedding.base.Embedder.name` of the embedder that made them.
    source : str
        Where they come from, for messages: a folder, a file, ``"phantom stimulus bank"``.
    """

    ids: list[str]
    tokens: np.ndarray
    embedding_name: str
    source: str
    _row: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.ids = [str(i) for i in self.ids]
        if self.tokens.ndim != 3 or self.tokens.shape[0] != len(self.ids):
            raise BundleError(
                f"{self.source}: tokens: expected shape ({len(self.ids)}, n_tokens, token_dim) for {len(self.ids)} "
                f"ids (got {tuple(self.tokens.shape)})"
            )
        self._row = {image_id: row for row, image_id in enumerate(self.ids)}
        if len(self._row) != len(self.ids):
            repeated = next(i for i in self.ids if self.ids.count(i) > 1)
            raise BundleError(f"{self.source}: ids: expected unique image ids (got {repeated!r} more than once)")

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, stim_id: object) -> bool:
        return stim_id in self._row

    @property
    def token_shape(self) -> tuple[int, int]:
        """(n_tokens, token_dim) of each image."""
        return int(self.tokens.shape[1]), int(self.tokens.shape[2])

    def rows(self, stim_ids: Sequence[str]) -> np.ndarray:
        """Rows of images by id, shape (len(stim_ids),), int64.

        Raises
        ------
        BundleError
            Naming the source and the first id it lacks.
        """
        missing = [s for s in stim_ids if s not in self._row]
        if missing:
            raise BundleError(
                f"{self.source}: no image with stim_id {missing[0]!r} ({len(set(missing))} of "
                f"{len(set(stim_ids))} stim_ids missing among its {len(self)} images)"
            )
        return np.array([self._row[s] for s in stim_ids], dtype=np.int64)

    def tokens_of(self, stim_ids: Sequence[str]) -> np.ndarray:
        """Tokens of images by id, shape (len(stim_ids), n_tokens, token_dim), float32."""
        return self.take(self.rows(stim_ids))

    def take(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Tokens of some rows, shape (len(rows), n_tokens, token_dim), float32 (reads only those rows)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        return np.asarray(self.tokens[rows], dtype=np.float32).reshape(len(rows), *self.token_shape)

    def chunks(self, n_rows: int = _COPY_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """``(first_row, tokens)`` of consecutive blocks of rows, float32, for whole-set passes in bounded memory."""
        for start in range(0, len(self), n_rows):
            yield start, np.asarray(self.tokens[start : start + n_rows], dtype=np.float32)

    def check(
        self,
        embedding_name: str | None = None,
        token_shape: tuple[int, int] | None = None,
        expected_by: str = "the decoder",
    ) -> None:
        """Raise unless the tokens come from the expected embedder and have the expected shape.

        Parameters
        ----------
        embedding_name : str, optional
            The embedder's name they must have been made with (e.g. a bundle's ``embedding_name``);
            ``None`` or ``""`` checks nothing.
        token_shape : (int, int), optional
            (n_tokens, token_dim) they must have.
        expected_by : str, default="the decoder"
            Who expects them, for the message (e.g. ``"bundle sub-08"``).

        Raises
        ------
        BundleError
            Naming the source, the field (``embedder`` or ``tokens``), what was expected and what was found.
        """
        check_tokens(self.source, self.embedding_name, tuple(self.tokens.shape), embedding_name, token_shape,
                     expected_by)


def check_tokens(
    source: str,
    found_embedding: str,
    found_shape: tuple[int, ...],
    embedding_name: str | None,
    token_shape: tuple[int, int] | None,
    expected_by: str,
) -> None:
    """Raise a :class:`BundleError` naming ``source`` and the field when the embedder or the token shape differ.

    ``found_shape`` is (n, n_tokens, token_dim) (``n`` is not checked); see :meth:`ImageTokens.check`.
    """
    if embedding_name and found_embedding != embedding_name:
        raise BundleError(
            f"{source}: embedder: expected {embedding_name!r} (the embedder of {expected_by}) "
            f"(got {found_embedding!r}); embed the images with that embedder"
        )
    if token_shape is not None and tuple(found_shape[1:]) != tuple(token_shape):
        raise BundleError(
            f"{source}: tokens: expected shape (n, {token_shape[0]}, {token_shape[1]}) for {expected_by} "
            f"(got {tuple(found_shape)})"
        )


class EmbeddingCache:
    """Embeddings on disk, keyed by embedder and images.

    Parameters
    ----------
    cache_dir : str or Path
        Folder of the cache files (created on first write); ``embedding.cache_dir``.
    storage_dtype : {"float16", "float32"}, default="float16"
        How values are stored. float16 halves the disk use (3000 EfficientNet-Lite0 embeddings:
        about 0.38 GB instead of 0.75 GB) at a relative precision of about 1e-3. Values are
        always returned as float32, and the first call returns the stored (rounded) values too,
        so every call gives the same arrays.
    """

    def __init__(
        self, cache_dir: str | Path, storage_dtype: Literal["float16", "float32"] = "float16"
    ) -> None:
        if storage_dtype not in ("float16", "float32"):
            raise DecoderError(
                f"EmbeddingCache: storage_dtype must be 'float16' or 'float32' (got {storage_dtype!r})"
            )
        self.cache_dir = Path(cache_dir)
        self.storage_dtype = storage_dtype

    def path_for(
        self,
        embedder: Embedder,
        source: ImageSource,
        indices: Sequence[int] | np.ndarray | None = None,
    ) -> Path:
        """The cache file that holds (or would hold) these embeddings."""
        return self._path(embedder, source.digest(indices))

    def get_or_compute(
        self,
        embedder: Embedder,
        source: ImageSource,
        indices: Sequence[int] | np.ndarray | None = None,
        batch_size: int = 32,
        progress: bool = True,
    ) -> Embedding:
        """Load the embeddings of some images, computing and storing them if absent.

        Parameters
        ----------
        embedder : Embedder
        source : ImageSource
            E.g. an :class:`~rtdecoder.embedding.images.ImageFolder` or the phantom's stimulus bank.
        indices : sequence of int, optional
            Which images, in the order wanted; default all, in source order.
        batch_size : int, default=32
            Images read and embedded at a time (bounds memory).
        progress : bool, default=True
            Show a tqdm progress bar while computing.

        Returns
        -------
        Embedding
            ``tokens`` (N, T, D) and ``pooled`` (N, D), float32, row ``i`` for ``indices[i]``.

        Raises
        ------
        BundleError
            If the cache file exists but cannot be read or does not match the request.
        """
        path = self.ensure(embedder, source, indices, batch_size, progress)
        return self._load(path)

    def ensure(
        self,
        embedder: Embedder,
        source: ImageSource,
        indices: Sequence[int] | np.ndarray | None = None,
        batch_size: int = 32,
        progress: bool = True,
    ) -> Path:
        """The cache file of these embeddings, computed batch by batch when absent (see :meth:`get_or_compute`).

        Returns
        -------
        Path
            A checked cache entry; also an embeddings file (:func:`read_embeddings_file`).
        """
        if batch_size < 1:
            raise DecoderError(f"get_or_compute: batch_size must be >= 1 (got {batch_size})")
        chosen = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        digest = source.digest(chosen)
        path = self._path(embedder, digest)
        if path.is_file():
            logger.info("embedding cache: using %s", path)
            self._check(path, embedder, digest, len(chosen))
            return path
        ids = [source.ids[int(i)] for i in chosen]
        metadata = {"format": CACHE_FORMAT, "embedder": embedder.name, "stimuli_digest": digest,
                    "n_stimuli": str(len(ids)), "ids": json.dumps(ids)}
        dtype = np.dtype(self.storage_dtype).newbyteorder("<")
        layout = {"tokens": (dtype, (len(ids), embedder.n_tokens, embedder.token_dim)),
                  "pooled": (dtype, (len(ids), embedder.token_dim))}
        from tqdm.auto import tqdm

        with _stream_safetensors(path, layout, metadata) as write, tqdm(
            total=len(chosen), desc=f"embedding {embedder.name.split('[', 1)[0]}", unit="img", disable=not progress
        ) as bar:
            for start in range(0, len(chosen), batch_size):
                batch = chosen[start : start + batch_size]
                result = embedder.embed(source.images(batch))
                if result.tokens.shape != (len(batch), embedder.n_tokens, embedder.token_dim):
                    raise DecoderError(
                        f"{embedder.name}: embed: expected tokens of shape ({len(batch)}, {embedder.n_tokens}, "
                        f"{embedder.token_dim}) (got {result.tokens.shape})"
                    )
                write("tokens", start, result.tokens)
                write("pooled", start, result.pooled)
                bar.update(len(batch))
        logger.info("embedding cache: wrote %s (%d images)", path, len(ids))
        return path

    def _path(self, embedder: Embedder, digest: str) -> Path:
        key = hashlib.sha256(f"{embedder.name}\n{digest}".encode()).hexdigest()
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", embedder.name.split("[", 1)[0]) or "embedder"
        return self.cache_dir / f"{slug}-{key[:24]}.safetensors"

    def _check(self, path: Path, embedder: Embedder, digest: str, n_stimuli: int) -> None:
        metadata, shapes, _ = _read_header(path, "embedding cache file", remedy="delete it to recompute")
        expected = {"format": CACHE_FORMAT, "embedder": embedder.name, "stimuli_digest": digest,
                    "n_stimuli": str(n_stimuli)}
        for key, value in expected.items():
            if metadata.get(key) != value:
                raise BundleError(
                    f"{path}: {key}: expected {value!r} (got {metadata.get(key)!r}); delete the file to recompute"
                )
        shape = (n_stimuli, embedder.n_tokens, embedder.token_dim)
        if shapes.get("tokens") != shape or shapes.get("pooled") != (n_stimuli, embedder.token_dim):
            raise BundleError(
                f"{path}: tokens: expected shape {shape} (got {shapes.get('tokens')}, pooled {shapes.get('pooled')}); "
                "delete the file to recompute"
            )

    def _load(self, path: Path) -> Embedding:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="np") as handle:
                tokens = handle.get_tensor("tokens")
                pooled = handle.get_tensor("pooled")
        except Exception as err:  # safetensors raises several unrelated types for a bad file
            raise BundleError(f"{path}: cannot read embedding cache file ({err}); delete it to recompute") from None
        return Embedding(tokens=tokens.astype(np.float32), pooled=pooled.astype(np.float32))


def read_embeddings_file(path: str | Path) -> ImageTokens:
    """The image tokens of an embeddings file (format in the module docstring), memory-mapped.

    Parameters
    ----------
    path : str or Path
        A ``.safetensors`` file with ``tokens`` and metadata ``ids`` and ``embedder``.

    Returns
    -------
    ImageTokens
        ``tokens`` is a read-only memory map of the file (float16 or float32, as stored).

    Raises
    ------
    BundleError
        Naming the file and the field (``tokens``, ``ids`` or ``embedder``) that is missing or wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: no such embeddings file (expected a .safetensors with tokens, ids and embedder)")
    metadata, shapes, offsets = _read_header(path, "embeddings file")
    if "tokens" not in shapes:
        raise BundleError(f"{path}: tokens: missing (expected a tensor of shape (n, n_tokens, token_dim))")
    dtype_name, shape, begin = offsets["tokens"]
    if dtype_name not in _NUMPY_DTYPES or len(shape) != 3:
        raise BundleError(
            f"{path}: tokens: expected float16 or float32 of shape (n, n_tokens, token_dim) "
            f"(got {dtype_name} {tuple(shape)})"
        )
    embedder = metadata.get("embedder")
    if not embedder:
        raise BundleError(f"{path}: embedder: missing from the metadata (expected the name of the embedder "
                          "that made the tokens, rtdecoder.embedding.base.Embedder.name)")
    raw_ids = metadata.get("ids", metadata.get("stim_ids"))
    try:
        ids = json.loads(raw_ids) if raw_ids is not None else None
    except json.JSONDecodeError:
        ids = None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise BundleError(f"{path}: ids: expected a JSON list of strings in the metadata, one per tokens row "
                          f"(got {str(raw_ids)[:60]!r})")
    if len(ids) != shape[0]:
        raise BundleError(f"{path}: ids: expected {shape[0]} ids, one per tokens row (got {len(ids)})")
    tokens = np.memmap(path, dtype=_NUMPY_DTYPES[dtype_name], mode="r", offset=begin, shape=tuple(shape)) \
        if shape[0] else np.zeros(tuple(shape), dtype=_NUMPY_DTYPES[dtype_name])
    return ImageTokens(ids, tokens, embedder, str(path))


def write_embeddings_file(
    path: str | Path,
    ids: Sequence[str],
    tokens: np.ndarray,
    embedding_name: str,
    pooled: np.ndarray | None = None,
    storage_dtype: Literal["float16", "float32"] = "float16",
) -> Path:
    """Write an embeddings file (format in the module docstring), a block of rows at a time.

    Parameters
    ----------
    path : str or Path
        The ``.safetensors`` file to write (replaced atomically).
    ids : sequence of str
        One unique id per row (the images' ``stim_id``).
    tokens : array of shape (n, n_tokens, token_dim)
        May be a memory map; it is copied ``256`` rows at a time.
    embedding_name : str
        :attr:`Embedder.name` of the embedder that made them.
    pooled : array of shape (n, token_dim), optional
    storage_dtype : {"float16", "float32"}, default="float16"

    Returns
    -------
    Path
    """
    ImageTokens(list(ids), tokens, embedding_name, str(path))  # same checks as on reading
    dtype = np.dtype(storage_dtype).newbyteorder("<")
    layout: dict[str, tuple[np.dtype, tuple[int, ...]]] = {"tokens": (dtype, tuple(tokens.shape))}
    if pooled is not None:
        if pooled.shape != (tokens.shape[0], tokens.shape[2]):
            raise BundleError(f"{path}: pooled: expected shape {(tokens.shape[0], tokens.shape[2])} "
                              f"(got {tuple(pooled.shape)})")
        layout["pooled"] = (dtype, tuple(pooled.shape))
    metadata = {"format": EMBEDDINGS_FILE_FORMAT, "embedder": embedding_name, "ids": json.dumps(list(ids))}
    path = Path(path)
    with _stream_safetensors(path, layout, metadata) as write:
        for start in range(0, len(tokens), _COPY_ROWS):
            write("tokens", start, np.asarray(tokens[start : start + _COPY_ROWS]))
            if pooled is not None:
                write("pooled", start, np.asarray(pooled[start : start + _COPY_ROWS]))
    return path


def load_image_tokens(
    source: str | Path,
    embedder: Embedder | Callable[[], Embedder] | None = None,
    cache_dir: str | Path | None = None,
    ids: Sequence[str] | None = None,
    batch_size: int = 32,
    progress: bool = True,
    embedding_name: str | None = None,
    token_shape: tuple[int, int] | None = None,
    expected_by: str = "the decoder",
) -> ImageTokens:
    """Tokens of a folder of images (embedded and cached) or of an embeddings file (read).

    Parameters
    ----------
    source : str or Path
        A folder of ``<stim_id>.<ext>`` image files, or a ``.safetensors`` embeddings file.
    embedder : Embedder or callable returning one, optional
        Embeds a folder's images; a callable is called only for a folder, so an embeddings file
        never loads a model. Required for a folder.
    cache_dir : str or Path, optional
        The embedding cache (``embedding.cache_dir``); required for a folder.
    ids : sequence of str, optional
        Only these images (a folder embeds only them; a file is checked to have them); default all.
    batch_size : int, default=32
        Images read and embedded at a time (``candidates.embed_batch_size``); bounds memory.
    progress : bool, default=True
        Progress bar while embedding.
    embedding_name, token_shape, expected_by
        What the tokens must be (see :meth:`ImageTokens.check`); a folder's embedder is checked
        before any image is embedded.

    Returns
    -------
    ImageTokens
        Rows in folder (file name) order, or the file's order; only ``ids`` when given.

    Raises
    ------
    BundleError
        If the source is neither, an image is missing or unreadable, or the tokens do not match.
    """
    path = Path(source)
    if path.is_dir():
        if embedder is None or cache_dir is None:
            raise DecoderError(f"{path}: load_image_tokens: an image folder needs an embedder and a cache_dir")
        folder = ImageFolder(path)
        model = embedder if isinstance(embedder, Embedder) else embedder()
        # before any image is embedded: a wrong embedder would waste the whole pass
        check_tokens(str(path), model.name, (len(folder), model.n_tokens, model.token_dim), embedding_name,
                     token_shape, expected_by)
        rows = None if ids is None else folder.rows(sorted(set(ids)))
        entry = EmbeddingCache(cache_dir).ensure(model, folder, rows, batch_size=batch_size, progress=progress)
        found = read_embeddings_file(entry)
        return ImageTokens(found.ids, found.tokens, found.embedding_name, str(path))
    if path.is_file():
        found = read_embeddings_file(path)
        found.check(embedding_name, token_shape, expected_by)
        if ids is not None:
            found.rows(list(ids))
        return found
    raise BundleError(f"{path}: expected a folder with image files or a .safetensors embeddings file (no such path)")


def _read_header(
    path: Path, what: str, remedy: str = ""
) -> tuple[dict[str, str], dict[str, tuple[int, ...]], dict[str, tuple[str, list[int], int]]]:
    """Metadata, tensor shapes and (dtype, shape, absolute byte offset) of a safetensors file, tensors unread."""
    from safetensors import safe_open

    suffix = f"; {remedy}" if remedy else ""
    try:
        with safe_open(str(path), framework="np") as handle:  # validates the header and the data layout
            metadata = dict(handle.metadata() or {})
        with path.open("rb") as stream:
            header_bytes = int.from_bytes(stream.read(8), "little")
            header = json.loads(stream.read(header_bytes))
    except Exception as err:  # safetensors raises several unrelated types for a bad file
        raise BundleError(f"{path}: cannot read {what} ({err}){suffix}") from None
    offsets = {
        name: (entry["dtype"], list(entry["shape"]), 8 + header_bytes + int(entry["data_offsets"][0]))
        for name, entry in header.items() if name != "__metadata__"
    }
    return metadata, {name: tuple(shape) for name, (_, shape, _) in offsets.items()}, offsets


@contextmanager
def _stream_safetensors(
    path: Path, layout: dict[str, tuple[np.dtype, tuple[int, ...]]], metadata: dict[str, str]
) -> Iterator[Callable[[str, int, np.ndarray], None]]:
    """Write a safetensors file block by block: yields ``write(name, first_row, rows)``.

    The header is known up front (shapes and dtypes), so each block goes straight to its place in
    the file and nothing larger than a block is held. The file is written under a temporary name
    and renamed when the block ends without error (removed otherwise).
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    begin = 0
    for name, (dtype, shape) in layout.items():
        n_bytes = dtype.itemsize * math.prod(shape)
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [begin, begin + n_bytes]}
        begin += n_bytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes with spaces
    data_start = 8 + len(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with partial.open("wb") as handle:
            handle.write(len(text).to_bytes(8, "little"))
            handle.write(text)
            handle.truncate(data_start + begin)

            def write(name: str, first_row: int, rows: np.ndarray) -> None:
                dtype, shape = layout[name]
                rows = np.ascontiguousarray(rows, dtype=dtype)
                if rows.shape[1:] != shape[1:] or first_row + len(rows) > shape[0]:
                    raise DecoderError(f"{path}: {name}: rows of shape {rows.shape} do not fit {shape} at {first_row}")
                row_bytes = dtype.itemsize * math.prod(shape[1:])
                handle.seek(data_start + header[name]["data_offsets"][0] + first_row * row_bytes)
                handle.write(rows.tobytes())

            yield write
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
