"""Top-k retrieval: which candidate images best match the predicted retrieval tokens.

Candidates are a bank of images with their embedder tokens: the phantom stimulus bank, or a
folder of the user's own images, embedded once and cached next to the other embeddings. Scores
are cosines between the flattened, L2-normalised (T*D) token vectors, as in MindEye2's retrieval.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
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
    shown_ranks : list of (int or None), optional
        Per query, the 1-based rank among all candidates of the image the subject saw (when it
        was asked for and is in the bank): 1 is a top-1 hit, ``(N + 1) / 2`` is chance on average.
    """

    indices: np.ndarray
    ids: list[list[str]]
    scores: np.ndarray
    shown_ranks: list[int | None] | None = None


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
        self._row = {candidate_id: row for row, candidate_id in enumerate(self.ids)}
        self.token_shape = tuple(tokens.shape[1:])
        self._unit = torch.nn.functional.normalize(tokens.flatten(1), dim=1)  # (N, T*D)

    def __len__(self) -> int:
        return len(self.ids)

    def top_k(
        self, predicted: torch.Tensor, k: int, shown_ids: Sequence[str | None] | None = None
    ) -> RetrievalResult:
        """The ``k`` candidates with the highest cosine to each predicted (B, T, D) token set.

        With ``shown_ids`` (one per query; ``None`` or an id not in the bank gives no rank), the
        result also holds each shown image's rank among all candidates.
        """
        if tuple(predicted.shape[1:]) != self.token_shape:
            raise DecoderError(
                f"retrieval: predicted tokens: expected shape (B, {self.token_shape[0]}, {self.token_shape[1]}) "
                f"(got {tuple(predicted.shape)})"
            )
        if not 1 <= k <= len(self):
            raise DecoderError(f"retrieval: k: expected 1..{len(self)} (got {k})")
        query = torch.nn.functional.normalize(predicted.detach().float().cpu().flatten(1), dim=1)
        similarity = query @ self._unit.T  # (B, N)
        scores, indices = similarity.topk(k, dim=1)  # (B, k)
        indices_np = indices.numpy().astype(np.int64)
        shown_ranks = None
        if shown_ids is not None:
            if len(shown_ids) != len(similarity):
                raise DecoderError(f"retrieval: shown_ids: expected {len(similarity)} (got {len(shown_ids)})")
            shown_ranks = []
            for row, shown_id in zip(similarity, shown_ids, strict=True):
                index = self._row.get(shown_id)
                shown_ranks.append(None if index is None else 1 + int((row > row[index]).sum()))
        return RetrievalResult(
            indices_np, [[self.ids[i] for i in row] for row in indices_np], scores.numpy(), shown_ranks
        )

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
