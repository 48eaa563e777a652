"""Top-k retrieval: which candidate images best match the predicted retrieval tokens.

Candidates are a bank of images with their embedder tokens: a folder of the lab's images or an
embeddings file (``candidates.images_dir`` / ``candidates.embeddings_file``, see
:mod:`rtdecoder.embedding.cache`), or the phantom world's stimulus bank. Their ids are the images'
``stim_id`` (file stems), so that the shown image of a trial is found among them. Scores are
cosines between the flattened, L2-normalised (T*D) token vectors, as in MindEye2's retrieval;
with a hubness reference (:meth:`CandidateBank.correct_hubness`, ``candidates.hubness_k``) the
candidates are ranked by CSLS instead (:mod:`rtdecoder.decode.hubness`), and the scores reported
are still their cosines.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from rtdecoder.errors import DecoderError

if TYPE_CHECKING:
    from rtdecoder.decode.hubness import HubnessReference
    from rtdecoder.embedding.base import Embedder
    from rtdecoder.embedding.cache import ImageTokens

logger = logging.getLogger(__name__)

# Rows normalised at a time when a bank is built (the float32 copy of a whole bank is never made twice).
_NORMALISE_ROWS = 256


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
        Cosine similarities in [-1, 1] (also when the ranking is hubness-corrected).
    shown_ranks : list of (int or None), optional
        Per query, the 1-based rank among all candidates of the image the subject saw (when it
        was asked for and is in the bank), in the bank's ranking: 1 is a top-1 hit, ``(N + 1) / 2``
        is chance on average.
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
        Their embedder tokens; a memory map (e.g. :class:`~rtdecoder.embedding.cache.ImageTokens`'
        tokens) is read block by block.
    """

    def __init__(self, ids: list[str], tokens: np.ndarray | torch.Tensor) -> None:
        if not hasattr(tokens, "shape"):
            tokens = np.asarray(tokens, dtype=np.float32)
        shape = tuple(int(n) for n in tokens.shape)
        if len(shape) != 3 or len(ids) != shape[0]:
            raise DecoderError(
                f"candidate bank: tokens: expected shape ({len(ids)}, T, D) for {len(ids)} ids (got {shape})"
            )
        self.ids = list(ids)
        self._row = {candidate_id: row for row, candidate_id in enumerate(self.ids)}
        self.token_shape: tuple[int, ...] = shape[1:]
        # Block by block, so that a memory-mapped bank is read once and only the unit vectors are held.
        self._unit = torch.empty((shape[0], shape[1] * shape[2]), dtype=torch.float32)  # (N, T*D)
        for start in range(0, shape[0], _NORMALISE_ROWS):
            block = tokens[start : start + _NORMALISE_ROWS]
            # a copy: a memory map's block is read-only, and torch wants writable arrays
            block = torch.from_numpy(np.array(block.detach().cpu() if isinstance(block, torch.Tensor) else block,
                                              dtype=np.float32))
            self._unit[start : start + len(block)] = torch.nn.functional.normalize(block.flatten(1), dim=1)
        # Half of each candidate's CSLS neighbourhood term; None ranks by plain cosine.
        self.hubness_penalty: torch.Tensor | None = None

    def correct_hubness(self, reference: HubnessReference | None) -> None:
        """Rank by CSLS against ``reference`` from now on (``None``: plain cosine again)."""
        if reference is None:
            self.hubness_penalty = None
            return
        if reference.predictions.shape[1] != self._unit.shape[1]:
            raise DecoderError(
                f"candidate bank: hubness reference has {reference.predictions.shape[1]} values per prediction, "
                f"the candidates {self._unit.shape[1]}"
            )
        self.hubness_penalty = torch.from_numpy(reference.image_penalty(self._unit))

    @classmethod
    def from_image_tokens(cls, image_tokens: ImageTokens) -> CandidateBank:
        """Candidates = the images of an :class:`~rtdecoder.embedding.cache.ImageTokens` (ids and tokens)."""
        return cls(image_tokens.ids, image_tokens.tokens)

    def __len__(self) -> int:
        return len(self.ids)

    def top_k(
        self, predicted: torch.Tensor, k: int, shown_ids: Sequence[str | None] | None = None
    ) -> RetrievalResult:
        """The ``k`` best candidates for each predicted (B, T, D) token set: highest cosine, or highest
        CSLS with a hubness reference (:meth:`correct_hubness`).

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
        cosine = query @ self._unit.T  # (B, N)
        similarity = cosine if self.hubness_penalty is None else cosine - self.hubness_penalty[None, :]
        indices = similarity.topk(k, dim=1).indices  # (B, k)
        scores = cosine.gather(1, indices)
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
    def from_folder(
        cls, folder: str | Path, embedder: Embedder, cache_dir: str | Path, batch_size: int = 32, progress: bool = False
    ) -> CandidateBank:
        """Candidates = the images in a folder (ids: file stems), embedded once and cached.

        The cache entry's key is the embedder's name and the SHA-256 of every file's bytes, so
        adding, removing or changing an image makes a new one (see :mod:`rtdecoder.embedding.images`).

        Parameters
        ----------
        folder : str or Path
            Image files (PNG, JPEG, BMP, TIFF, WebP; not searched recursively).
        embedder : Embedder
        cache_dir : str or Path
            Where the ``.safetensors`` cache goes (``embedding.cache_dir``).
        batch_size : int, default=32
            Images read and embedded at a time (bounds memory).
        progress : bool, default=False
            Progress bar while embedding.
        """
        from rtdecoder.embedding.cache import load_image_tokens

        return cls.from_image_tokens(
            load_image_tokens(folder, embedder, cache_dir, batch_size=batch_size, progress=progress)
        )

    @classmethod
    def from_embeddings_file(
        cls, path: str | Path, embedding_name: str | None = None, token_shape: tuple[int, int] | None = None
    ) -> CandidateBank:
        """Candidates = the rows of an embeddings file (:func:`rtdecoder.embedding.cache.read_embeddings_file`).

        Parameters
        ----------
        path : str or Path
        embedding_name : str, optional
            The embedder the file must name (metadata ``embedder``); ``None`` checks nothing.
        token_shape : (int, int), optional
            (n_tokens, token_dim) its ``tokens`` must have.
        """
        from rtdecoder.embedding.cache import load_image_tokens

        return cls.from_image_tokens(load_image_tokens(path, embedding_name=embedding_name, token_shape=token_shape))
