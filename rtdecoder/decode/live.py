"""The live decoder: one beta -> retrieval ranking, and on request -> prior tokens -> image.

It holds the calibrated subject's model behind an inference engine (torch, ONNX Runtime or
TensorRT), the candidate bank for retrieval, and a generator; :mod:`rtdecoder.compose` builds one
from a bundle, a config and a candidate set. The session calls
:meth:`LiveDecoder.retrieve` for every beta and :meth:`LiveDecoder.reconstruct` when the decode
queue is short enough (see :mod:`rtdecoder.session.runner`).
"""

from __future__ import annotations

import io
import logging
import time

import numpy as np
import torch
from PIL import Image

from rtdecoder.decode.engine import Engine, sample_prior
from rtdecoder.decode.generators.base import Generator
from rtdecoder.decode.protocol import Decoded
from rtdecoder.decode.retrieval import CandidateBank
from rtdecoder.errors import BundleError

logger = logging.getLogger(__name__)


class LiveDecoder:
    """Decode single betas of one subject.

    Parameters
    ----------
    engine : Engine
        Runs the subject's encoder (adapter + backbone + heads) and the prior's denoiser.
    bank : CandidateBank
        Candidate images for retrieval.
    generator : Generator or None
        Tokens -> image; ``None`` disables reconstruction.
    beta_mean, beta_std : ndarray of shape (n_voxels,)
        Calibration statistics; betas are z-scored with them, as in training.
    prior_steps : int
        Denoiser evaluations per reconstruction.
    generator_steps : int
        Sampling steps of the generator.
    prior_eta : float, default=0.0
        DDIM eta of the prior (0: deterministic for a given seed).
    """

    def __init__(
        self,
        engine: Engine,
        bank: CandidateBank,
        generator: Generator | None,
        beta_mean: np.ndarray,
        beta_std: np.ndarray,
        prior_steps: int,
        generator_steps: int,
        prior_eta: float = 0.0,
    ) -> None:
        self.engine = engine
        self.bank = bank
        self.generator = generator
        self.beta_mean = np.asarray(beta_mean, dtype=np.float32)
        self.beta_std = np.asarray(beta_std, dtype=np.float32)
        self.prior_steps = prior_steps
        self.generator_steps = generator_steps
        self.prior_eta = prior_eta

    def retrieve(self, beta: np.ndarray, top_k: int, shown_id: str | None = None) -> Decoded:
        """Rank the bank's images for one raw beta map (``n_voxels``,); with ``shown_id``, also
        the rank of the image the trial showed."""
        started = time.perf_counter()
        z = (np.asarray(beta, dtype=np.float32) - self.beta_mean) / self.beta_std
        encoded = self.engine.encode(torch.from_numpy(z[None]))
        result = self.bank.top_k(encoded.clip_tokens.cpu(), min(top_k, len(self.bank)), shown_ids=[shown_id])
        elapsed_ms = 1000 * (time.perf_counter() - started)
        return Decoded(result.ids[0], result.scores[0].tolist(), elapsed_ms, state=encoded.backbone_tokens,
                       n_candidates=len(self.bank), shown_rank=result.shown_ranks[0])

    def reconstruct(self, decoded: Decoded, seed: int) -> bytes:
        """Sample the prior from the backbone tokens, render them, and return PNG bytes."""
        if self.generator is None:
            raise BundleError("reconstruction requested but no generator is loaded (session.reconstruct: false)")
        tokens = sample_prior(self.engine, decoded.state, self.prior_steps, eta=self.prior_eta, seed=seed)
        image = self.generator.generate(tokens.float().cpu(), n_steps=self.generator_steps, seed=seed)[0]
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()
