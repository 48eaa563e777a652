"""Image embeddings of a stimulus bank, computed once and kept on disk.

A cache entry is one safetensors file holding ``tokens`` (N, T, D) and ``pooled`` (N, D). Its
key is the embedder's :attr:`~rtdecoder.embedding.base.Embedder.name` (model, weights
fingerprint, image range, preprocessing) together with the bank's
:meth:`~rtdecoder.phantom.stimuli.StimulusBank.digest` of the chosen stimuli (ids, crop boxes,
flips, size), so a changed model, weight file, convention or stimulus set never reads a stale
entry. The header also records the stimulus ids. Files are written to a temporary name and
renamed, so an interrupted run leaves no half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from rtdecoder.embedding.base import Embedder, Embedding
from rtdecoder.errors import BundleError, DecoderError

if TYPE_CHECKING:
    from rtdecoder.phantom.stimuli import StimulusBank

logger = logging.getLogger(__name__)

CACHE_FORMAT = "rtdecoder-embedding-cache/1"


class EmbeddingCache:
    """Embeddings on disk, keyed by embedder and stimuli.

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
        bank: StimulusBank,
        indices: Sequence[int] | np.ndarray | None = None,
    ) -> Path:
        """The cache file that holds (or would hold) these embeddings."""
        key = hashlib.sha256(f"{embedder.name}\n{bank.digest(indices)}".encode()).hexdigest()
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", embedder.name.split("[", 1)[0]) or "embedder"
        return self.cache_dir / f"{slug}-{key[:24]}.safetensors"

    def get_or_compute(
        self,
        embedder: Embedder,
        bank: StimulusBank,
        indices: Sequence[int] | np.ndarray | None = None,
        batch_size: int = 32,
        progress: bool = True,
    ) -> Embedding:
        """Load the embeddings of some stimuli, computing and storing them if absent.

        Parameters
        ----------
        embedder : Embedder
        bank : StimulusBank
        indices : sequence of int, optional
            Which stimuli, in the order wanted; default all, in bank order.
        batch_size : int, default=32
            Images rendered and embedded at a time (bounds memory).
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
        if batch_size < 1:
            raise DecoderError(f"get_or_compute: batch_size must be >= 1 (got {batch_size})")
        chosen = np.arange(len(bank)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        path = self.path_for(embedder, bank, chosen)
        digest = bank.digest(chosen)
        if path.is_file():
            logger.info("embedding cache: loading %s", path)
            return self._load(path, embedder, digest, len(chosen))
        embedding = self._compute(embedder, bank, chosen, batch_size, progress)
        self._save(path, embedding, embedder, digest, [bank.ids[int(i)] for i in chosen])
        return Embedding(tokens=embedding.tokens.astype(np.float32), pooled=embedding.pooled.astype(np.float32))

    def _compute(
        self,
        embedder: Embedder,
        bank: StimulusBank,
        chosen: np.ndarray,
        batch_size: int,
        progress: bool,
    ) -> Embedding:
        from tqdm.auto import tqdm

        dtype = np.dtype(self.storage_dtype)
        tokens = np.empty((len(chosen), embedder.n_tokens, embedder.token_dim), dtype=dtype)
        pooled = np.empty((len(chosen), embedder.token_dim), dtype=dtype)
        with tqdm(total=len(chosen), desc=f"embedding {embedder.name.split('[', 1)[0]}",
                  unit="img", disable=not progress) as bar:
            for start in range(0, len(chosen), batch_size):
                batch = chosen[start : start + batch_size]
                result = embedder.embed(bank.images(batch))
                tokens[start : start + len(batch)] = result.tokens
                pooled[start : start + len(batch)] = result.pooled
                bar.update(len(batch))
        return Embedding(tokens=tokens, pooled=pooled)

    def _save(
        self, path: Path, embedding: Embedding, embedder: Embedder, digest: str, ids: list[str]
    ) -> None:
        from safetensors.numpy import save_file

        metadata = {
            "format": CACHE_FORMAT,
            "embedder": embedder.name,
            "stimuli_digest": digest,
            "n_stimuli": str(len(ids)),
            "stim_ids": json.dumps(ids),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        save_file({"tokens": embedding.tokens, "pooled": embedding.pooled}, str(partial), metadata=metadata)
        os.replace(partial, path)
        logger.info("embedding cache: wrote %s (%d stimuli)", path, len(ids))

    def _load(self, path: Path, embedder: Embedder, digest: str, n_stimuli: int) -> Embedding:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="np") as handle:
                metadata = handle.metadata() or {}
                tokens = handle.get_tensor("tokens")
                pooled = handle.get_tensor("pooled")
        except Exception as err:  # safetensors raises several unrelated types for a bad file
            raise BundleError(f"{path}: cannot read embedding cache file ({err}); delete it to recompute") from None
        expected = {
            "format": CACHE_FORMAT,
            "embedder": embedder.name,
            "stimuli_digest": digest,
            "n_stimuli": str(n_stimuli),
        }
        for field, value in expected.items():
            if metadata.get(field) != value:
                raise BundleError(
                    f"{path}: {field}: expected {value!r} (got {metadata.get(field)!r}); "
                    "delete the file to recompute"
                )
        shape = (n_stimuli, embedder.n_tokens, embedder.token_dim)
        if tokens.shape != shape or pooled.shape != (n_stimuli, embedder.token_dim):
            raise BundleError(
                f"{path}: tokens: expected shape {shape} (got {tokens.shape}, pooled {pooled.shape}); "
                "delete the file to recompute"
            )
        return Embedding(tokens=tokens.astype(np.float32), pooled=pooled.astype(np.float32))
