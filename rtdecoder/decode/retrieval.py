"""Top-k retrieval: which candidate images best match the predicted retrieval tokens.

Candidates are a bank of images with their embedder tokens: the phantom stimulus bank, or a
folder of the user's own images, embedded once and cached next to the other embeddings. Scores
are cosines between the flattened, L2-normalised (T*D) token vectors, as in MindEye2's retrieval.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rtdecoder.errors import BundleError, DecoderError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class RetrievalResult:
    """The best candidates per query, best first.

    Attributes
    ----------
    indices : numpy.ndarray of int64, shape (B, k)
        Rows of the candidate bank.
    ids : list of list of str
        Their candidate ids.
    scores : numpy.ndarray of float32, shape (B, k)
        Cosine similarities in [-1, 1].
    """

    indices: np.ndarray
    ids: list[list[str]]
    scores: np.ndarray


class CandidateBank:
    """Candidate images' tokens, normalised once for fast cosine search.

    Parameters
    ----------
    ids : list of str
        One id per candidate.
    tokens : numpy.ndarray or torch.Tensor of shape (N, T, D)
        Their embedder tokens.
    """

    def __init__(self, ids: list[str], tokens: np.ndarray | torch.Tensor) -> None:
        tokens = torch.as_tensor(np.asarray(tokens, dtype=np.float32))
        if tokens.ndim != 3 or len(ids) != tokens.shape[0]:
            raise DecoderError(
                f"candidate bank: tokens: expected shape ({len(ids)}, T, D) for {len(ids)} ids "
                f"(got {tuple(tokens.shape)})"
            )
        self.ids = list(ids)
        self.token_shape = tuple(tokens.shape[1:])
        self._unit = torch.nn.functional.normalize(tokens.flatten(1), dim=1)  # (N, T*D)

    def __len__(self) -> int:
        return len(self.ids)

    def top_k(self, predicted: torch.Tensor, k: int) -> RetrievalResult:
        """The ``k`` candidates with the highest cosine to each predicted (B, T, D) token set."""
        if tuple(predicted.shape[1:]) != self.token_shape:
            raise DecoderError(
                f"retrieval: predicted tokens: expected shape (B, {self.token_shape[0]}, {self.token_shape[1]}) "
                f"(got {tuple(predicted.shape)})"
            )
        if not 1 <= k <= len(self):
            raise DecoderError(f"retrieval: k: expected 1..{len(self)} (got {k})")
        query = torch.nn.functional.normalize(predicted.detach().float().cpu().flatten(1), dim=1)
        scores, indices = (query @ self._unit.T).topk(k, dim=1)  # (B, k)
        indices_np = indices.numpy().astype(np.int64)
        return RetrievalResult(indices_np, [[self.ids[i] for i in row] for row in indices_np], scores.numpy())

    @classmethod
    def from_stimulus_bank(cls, bank, embedder, cache_dir: str | Path, progress: bool = True) -> CandidateBank:
        """Candidates = every stimulus of a :class:`~rtdecoder.phantom.stimuli.StimulusBank`."""
        from rtdecoder.embedding.cache import EmbeddingCache

        embedding = EmbeddingCache(cache_dir).get_or_compute(embedder, bank, progress=progress)
        return cls(list(bank.ids), embedding.tokens)

    @classmethod
    def from_folder(cls, folder: str | Path, embedder, cache_dir: str | Path, batch_size: int = 32) -> CandidateBank:
        """Candidates = the images in a folder (ids: file names), embedded once and cached.

        The cache file's name hashes the embedder name and every file's name, size and
        modification time, so adding or changing an image makes a new one.

        Parameters
        ----------
        folder : str or Path
            PNG/JPEG/BMP/WebP files (not searched recursively).
        embedder : Embedder
        cache_dir : str or Path
            Where the ``.safetensors`` cache goes (``embedding.cache_dir``).
        """
        from PIL import Image
        from safetensors.torch import load_file, save_file

        folder = Path(folder)
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not files:
            raise BundleError(f"{folder}: expected a folder with image files ({', '.join(IMAGE_SUFFIXES)})")
        digest = hashlib.sha256(embedder.name.encode())
        for path in files:
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        cache = Path(cache_dir) / f"folder-{digest.hexdigest()[:24]}.safetensors"
        ids = [p.name for p in files]
        if cache.is_file():
            tokens = load_file(str(cache))["tokens"]
            if tokens.shape[0] == len(ids):
                return cls(ids, tokens.float().numpy())
            logger.warning("%s: stale candidate cache; embedding again", cache)
        chunks = []
        for start in range(0, len(files), batch_size):
            images = []
            for path in files[start:start + batch_size]:
                try:
                    with Image.open(path) as image:
                        images.append(np.asarray(image.convert("RGB").resize((224, 224), Image.BICUBIC)))
                except OSError as err:
                    raise BundleError(f"{path}: cannot read image: {err}") from None
            chunks.append(embedder.embed(np.stack(images)).tokens)
        tokens = np.concatenate(chunks).astype(np.float32)
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({"tokens": torch.from_numpy(tokens).half()}, str(cache))
        return cls(ids, tokens)
