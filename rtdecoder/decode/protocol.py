"""What the live session asks of a decoder, and what a decoder answers.

The session's decode thread (:mod:`rtdecoder.session.decode_worker`) runs any object with these
two methods; :class:`rtdecoder.decode.live.LiveDecoder` is the MindEye2 one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass
class Decoded:
    """What a decoder found for one beta."""

    ids: list[str]
    scores: list[float]
    retrieval_ms: float
    state: Any = None  # whatever the decoder needs to reconstruct (e.g. backbone tokens)
    n_candidates: int | None = None
    shown_rank: int | None = None  # 1-based rank of the image the subject saw, when known


class BetaDecoder(Protocol):
    """Turns a beta map into a retrieval ranking and, on request, an image."""

    def retrieve(self, beta: np.ndarray, top_k: int, shown_id: str | None = None) -> Decoded:
        """Rank the candidate images for one beta (raw GLM units; the decoder z-scores).

        ``shown_id``, the image the trial showed, asks for its rank among all candidates.
        """

    def reconstruct(self, decoded: Decoded, seed: int) -> bytes:
        """A PNG of the reconstruction for a retrieved beta."""
