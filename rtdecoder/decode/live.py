"""The live decoder: one beta -> retrieval ranking, and on request -> prior tokens -> image.

It holds the calibrated subject's model behind an inference engine (torch, ONNX Runtime or
TensorRT), the candidate bank for retrieval, and a generator; :mod:`rtdecoder.compose` builds one
from a bundle, a config and a candidate set. The session calls
:meth:`LiveDecoder.retrieve` for every beta and :meth:`LiveDecoder.reconstruct` when the decode
queue is short enough (see :mod:`rtdecoder.session.runner`). When the model has the low-level
head, its image is blended into each reconstruction (MindEye2's 0.75 / 0.25 mix). With a
captioner, :meth:`LiveDecoder.caption` captions the prior's tokens (the caption stage after the
prior, :mod:`rtdecoder.decode.caption`); a trial's reconstruction and caption share one prior sample.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from rtdecoder.decode.caption import Captioner
from rtdecoder.decode.engine import Engine, sample_prior
from rtdecoder.decode.generators.base import Generator, blend_lowlevel, lowlevel_images
from rtdecoder.decode.protocol import Decoded
from rtdecoder.decode.retrieval import CandidateBank
from rtdecoder.errors import BundleError, ConfigError

logger = logging.getLogger(__name__)


@dataclass
class LiveState:
    """What :meth:`LiveDecoder.retrieve` keeps for reconstructing (``Decoded.state``).

    Attributes
    ----------
    backbone_tokens : Tensor of shape (1, T, D)
        The prior's condition.
    lowlevel : Tensor of shape (1, C, S, S) or None
        The low-level head's output, kept only when it is blended in.
    prior_tokens : Tensor of shape (1, T, D) or None
        The prior's sample once drawn (by the reconstruction or the caption, whichever comes first),
        with ``prior_seed``, the seed it was drawn with.
    """

    backbone_tokens: torch.Tensor
    lowlevel: torch.Tensor | None = None
    prior_tokens: torch.Tensor | None = None
    prior_seed: int | None = None


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
    lowlevel_weight : float, default=0.0
        Share of the low-level image in each reconstruction, in [0, 1] (0: none). Needs an
        engine whose encoder gives ``lowlevel`` (a model with ``model.lowlevel``).
    lowlevel_vae : diffusers.AutoencoderKL, optional
        Decodes a low-level latent (see :func:`~rtdecoder.decode.generators.base.lowlevel_vae_for`);
        ``None``: the low-level output is an RGB image.
    captioner : Captioner, optional
        Prior tokens -> caption (:class:`~rtdecoder.decode.caption.GitCaptioner`); ``None``: no captions.
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
        lowlevel_weight: float = 0.0,
        lowlevel_vae: torch.nn.Module | None = None,
        captioner: Captioner | None = None,
    ) -> None:
        if not 0.0 <= lowlevel_weight <= 1.0:
            raise ConfigError(f"generator.lowlevel_weight: expected a value in [0, 1] (got {lowlevel_weight})")
        self.engine = engine
        self.bank = bank
        self.generator = generator
        self.beta_mean = np.asarray(beta_mean, dtype=np.float32)
        self.beta_std = np.asarray(beta_std, dtype=np.float32)
        self.prior_steps = prior_steps
        self.generator_steps = generator_steps
        self.prior_eta = prior_eta
        self.lowlevel_weight = lowlevel_weight
        self.lowlevel_vae = lowlevel_vae
        self.captioner = captioner

    def retrieve(self, beta: np.ndarray, top_k: int, shown_id: str | None = None) -> Decoded:
        """Rank the bank's images for one raw beta map (``n_voxels``,); with ``shown_id``, also
        the rank of the image the trial showed."""
        started = time.perf_counter()
        z = (np.asarray(beta, dtype=np.float32) - self.beta_mean) / self.beta_std
        encoded = self.engine.encode(torch.from_numpy(z[None]))
        result = self.bank.top_k(encoded.clip_tokens.cpu(), min(top_k, len(self.bank)), shown_ids=[shown_id])
        elapsed_ms = 1000 * (time.perf_counter() - started)
        blended = self.lowlevel_weight > 0 and self.generator is not None
        state = LiveState(encoded.backbone_tokens, encoded.lowlevel if blended else None)
        return Decoded(result.ids[0], result.scores[0].tolist(), elapsed_ms, state=state,
                       n_candidates=len(self.bank), shown_rank=result.shown_ranks[0])

    def reconstruct(self, decoded: Decoded, seed: int) -> bytes:
        """Sample the prior from the backbone tokens, render them, blend in the low-level image
        (when ``lowlevel_weight`` > 0), and return PNG bytes."""
        if self.generator is None:
            raise BundleError("reconstruction requested but no generator is loaded (session.reconstruct: false)")
        state = decoded.state
        tokens = self.prior_tokens(decoded, seed)
        images = self.generator.generate(tokens.float().cpu(), n_steps=self.generator_steps, seed=seed)
        if self.lowlevel_weight > 0:
            if state.lowlevel is None:
                # Retrieval went on without it; only the reconstruction can say what is missing.
                raise BundleError(
                    f"{self.engine.name}: lowlevel_weight is {self.lowlevel_weight} but the encoder gives no "
                    "low-level output (a model without model.lowlevel)"
                )
            blurry = lowlevel_images(state.lowlevel, self.lowlevel_vae)
            images = blend_lowlevel(images, blurry, self.lowlevel_weight)
        buffer = io.BytesIO()
        Image.fromarray(images[0]).save(buffer, format="PNG")
        return buffer.getvalue()

    def prior_tokens(self, decoded: Decoded, seed: int) -> torch.Tensor:
        """The prior's image tokens for a retrieved beta, shape (1, T, D): sampled once per seed and kept in
        ``decoded.state``, so that the reconstruction and the caption of a trial read the same sample."""
        state = decoded.state
        if state.prior_tokens is None or state.prior_seed != seed:
            state.prior_tokens = sample_prior(self.engine, state.backbone_tokens, self.prior_steps,
                                              eta=self.prior_eta, seed=seed)
            state.prior_seed = seed
        return state.prior_tokens

    def caption(self, decoded: Decoded, seed: int) -> str | None:
        """The caption of a retrieved beta: the prior's tokens (the reconstruction's, for the same ``seed``)
        through the captioner; ``None`` without a captioner."""
        if self.captioner is None:
            return None
        return self.captioner.caption(self.prior_tokens(decoded, seed).float())[0]
