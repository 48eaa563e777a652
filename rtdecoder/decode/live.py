"""The live decoder: one beta -> retrieval ranking, and on request -> prior tokens -> image.

It holds the calibrated subject's model behind an inference engine (torch, ONNX Runtime or
TensorRT), the candidate bank for retrieval, and a generator. The session calls
:meth:`LiveDecoder.retrieve` for every beta and :meth:`LiveDecoder.reconstruct` when the decode
queue is short enough (see :mod:`rtdecoder.session.runner`).
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from engines.base import Engine, sample_prior
from rtdecoder.config import RTDecoderConfig
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

    @classmethod
    def from_bundle(cls, bundle: Any, config: RTDecoderConfig, device: str = "cpu") -> LiveDecoder:
        """Model from the bundle, candidates from the stimulus bank, generator from config.

        For the phantom world (``generator.kind: phantom``) the candidates are the phantom
        stimulus bank and the generator is the distilled phantom student, both built on first
        use and cached. For ``unclip`` the generator is loaded from
        ``generator.unclip_weights_path``.
        """
        from engines.torch_backend import TorchEngine
        from rtdecoder.decode.generators.distill import load_or_distill_phantom_student
        from rtdecoder.decode.generators.unclip import load_unclip_generator
        from rtdecoder.embedding.base import make_embedder
        from rtdecoder.phantom.stimuli import StimulusBank

        model = bundle.load_model(device)
        if model.prior is None:
            raise BundleError(f"{bundle.model_dir}: the model has no diffusion prior (model.use_prior: false)")
        engine = _make_engine(config, model, bundle.subject_id, device) if config.generator.engine_backend != "torch" \
            else TorchEngine(model, bundle.subject_id, device)
        embedder = make_embedder(config.embedding, device=device)
        bundle.check_embedding(embedder.name)
        bank = CandidateBank.from_stimulus_bank(
            StimulusBank.build(config.phantom.n_stimuli, config.phantom.image_size_px, config.phantom.seed),
            embedder,
            config.embedding.cache_dir,
        )
        generator: Generator | None = None
        steps = config.generator.n_steps
        if config.session.reconstruct:
            if config.generator.kind == "phantom":
                generator, steps = load_or_distill_phantom_student(config), config.generator.student_steps
            else:
                if not config.generator.unclip_weights_path:
                    raise BundleError("generator.unclip_weights_path: a local file is needed for kind 'unclip'")
                generator = load_unclip_generator(
                    config.generator.unclip_weights_path, config.generator.image_size_px, device=device
                )
        return cls(
            engine, bank, generator, bundle.beta_mean, bundle.beta_std,
            prior_steps=config.model.prior_sample_steps, generator_steps=steps,
        )

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


def _make_engine(config: RTDecoderConfig, model: Any, subject_id: str, device: str) -> Engine:
    from engines.onnx_export import export_onnx
    from engines.onnx_runtime import OnnxRuntimeEngine

    folder = export_onnx(
        model, subject_id, f"{config.generator.engine_dir}/{subject_id}", opset=config.generator.onnx_opset
    )
    if config.generator.engine_backend == "onnxruntime":
        return OnnxRuntimeEngine(folder)
    from engines.tensorrt import TensorRTEngine, build_tensorrt_engines

    build_tensorrt_engines(folder, max_batch=config.generator.max_batch, fp16=config.generator.tensorrt_fp16)
    return TensorRTEngine(folder)
