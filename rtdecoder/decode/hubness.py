"""Hubness correction of retrieval scores: no candidate image may win for most trials.

Predicted embeddings crowd into a small cone, so a few candidate images ("hubs") lie close to
almost every prediction and are retrieved whatever the subject saw. Cross-domain similarity local
scaling (CSLS; Lample et al., 2018, "Word translation without parallel data") scores a predicted
token set ``q`` against a candidate image ``c`` as::

    csls(q, c) = 2 cos(q, c) - r_pred(c) - r_image(q)

where ``r_pred(c)`` is the mean cosine of ``c`` to its ``k`` nearest *reference predictions* (the
model's predictions for the calibration session's training trials) and ``r_image(q)`` the mean
cosine of ``q`` to its ``k`` nearest *reference images* (the calibration's training images). A
candidate close to every prediction has a large ``r_pred`` and loses the lead it had from that
alone. Ranking the candidates of one query (image retrieval, the live decoder's) needs only
``r_pred``, because ``r_image(q)`` is the same for all of them; ranking the trials of one image
(brain retrieval) needs only ``r_image``.

The functions that score retrieval (:class:`~rtdecoder.decode.retrieval.CandidateBank`,
:mod:`rtdecoder.decode.metrics`, :mod:`rtdecoder.calibration.evaluate`) take the two as
*penalties* in cosine units, half of the above, so that ``cos - (image_penalty + query_penalty)``
ranks as CSLS does; no penalties is plain cosine. ``candidates.hubness_k`` sets ``k`` (0 turns the
correction off); docs/calibration.md ("Hubness correction") has the measurements behind it.
:mod:`rtdecoder.calibration.hubness_reference` builds the reference of a calibration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rtdecoder.errors import ConfigError

# Rows of queries (or predictions) compared at a time: bounds the (rows, n_reference) block in memory.
_BLOCK_ROWS = 512


def unit_rows(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Rows flattened and L2-normalised: (n, T, D) or (n, F) -> float32 (n, T*D)."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, torch.Tensor) else x)
    return torch.nn.functional.normalize(x.detach().float().cpu().reshape(len(x), -1), dim=1)


def mean_top_k_cosine(queries: np.ndarray | torch.Tensor, reference: torch.Tensor, k: int) -> np.ndarray:
    """Each query's mean cosine to its ``k`` most similar reference rows.

    Parameters
    ----------
    queries : array of shape (n, T, D) or (n, F)
        Any scale: rows are normalised here.
    reference : torch.Tensor of shape (m, F)
        Unit rows (:func:`unit_rows`).
    k : int
        Neighbours averaged; at most ``m`` are used.

    Returns
    -------
    numpy.ndarray of shape (n,), float32

    Examples
    --------
    >>> reference = unit_rows(np.eye(3))
    >>> mean_top_k_cosine(np.array([[1.0, 0.0, 0.0]]), reference, 2).tolist()
    [0.5]
    """
    if k < 1:
        raise ConfigError(f"hubness: k: expected >= 1 (got {k})")
    n_values = int(np.prod(queries.shape[1:]))
    if n_values != reference.shape[1]:
        raise ConfigError(f"hubness: queries have {n_values} values per row, the reference {reference.shape[1]}")
    k = min(k, len(reference))
    out = np.empty(len(queries), dtype=np.float32)
    for start in range(0, len(queries), _BLOCK_ROWS):
        # block by block: a memory-mapped or large bank is never copied whole
        similarity = unit_rows(queries[start : start + _BLOCK_ROWS]) @ reference.T  # (block, m)
        out[start : start + len(similarity)] = similarity.topk(k, dim=1).values.mean(dim=1).numpy()
    return out


def scoring_name(reference: HubnessReference | None) -> str:
    """How retrieval is scored, for JSON and tables: ``"cosine"`` or ``"csls k=<k>"``."""
    return "cosine" if reference is None else f"csls k={reference.k}"


@dataclass
class HubnessReference:
    """What the hubness penalties are measured against (see the module notes).

    Attributes
    ----------
    predictions : torch.Tensor of shape (n_reference, F)
        Unit rows: the model's predicted retrieval tokens of the calibration's training trials.
    images : torch.Tensor of shape (n_images, F) or None
        Unit rows: the tokens of the calibration's training images (the query side; ``None``
        when they are not known: brain retrieval is then plain cosine).
    k : int
        Neighbours averaged (``candidates.hubness_k``).
    """

    predictions: torch.Tensor
    images: torch.Tensor | None
    k: int

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"candidates.hubness_k: expected >= 1 for a hubness reference (got {self.k})")
        if len(self.predictions) == 0:
            raise ConfigError("hubness: expected at least one reference prediction (got none)")

    @classmethod
    def from_predictions(
        cls, predictions: np.ndarray | torch.Tensor, images: np.ndarray | torch.Tensor | None, k: int
    ) -> HubnessReference:
        """From predicted tokens (n, T, D) and image tokens (m, T, D) at any scale."""
        return cls(unit_rows(predictions), None if images is None or len(images) == 0 else unit_rows(images), k)

    def image_penalty(self, candidate_tokens: np.ndarray | torch.Tensor) -> np.ndarray:
        """Half of ``r_pred`` for each candidate image (N, T, D) -> (N,), float32."""
        return 0.5 * mean_top_k_cosine(candidate_tokens, self.predictions, self.k)

    def query_penalty(self, predicted: np.ndarray | torch.Tensor) -> np.ndarray:
        """Half of ``r_image`` for each predicted token set (n, T, D) -> (n,), float32 (zeros without images)."""
        if self.images is None:
            return np.zeros(len(predicted), dtype=np.float32)
        return 0.5 * mean_top_k_cosine(predicted, self.images, self.k)
