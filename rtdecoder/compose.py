"""The one place the live decoder is wired: a bundle, a config and a candidate set -> a LiveDecoder.

The parts stay apart (the model and its prior in :mod:`rtdecoder.decode`, the inference backends
in :mod:`rtdecoder.engines`, the generators in :mod:`rtdecoder.decode.generators`); this module
chooses between them from the config. The phantom world's candidates and generator come from
:mod:`rtdecoder.phantom.decoding`, which calls :func:`build_live_decoder` with its own parts, so
nothing here depends on the simulator.
"""

from __future__ import annotations

import logging
from typing import Any

from rtdecoder.bundle import SubjectBundle
from rtdecoder.config import RTDecoderConfig
from rtdecoder.decode.engine import Engine
from rtdecoder.decode.generators.base import Generator
from rtdecoder.decode.live import LiveDecoder
from rtdecoder.decode.retrieval import CandidateBank
from rtdecoder.errors import BundleError, ConfigError

logger = logging.getLogger(__name__)


def build_live_decoder(
    bundle: SubjectBundle,
    config: RTDecoderConfig,
    candidates: CandidateBank,
    generator: Generator | None,
    generator_steps: int | None = None,
    device: str = "cpu",
) -> LiveDecoder:
    """The live decoder of a calibrated subject.

    Parameters
    ----------
    bundle : SubjectBundle
        Model, statistics and the embedding its model predicts.
    config : RTDecoderConfig
        ``generator.engine_backend`` picks the engine; ``model.prior_sample_steps`` and
        ``model.prior_sample_eta`` the prior's sampling.
    candidates : CandidateBank
        Retrieval candidates, embedded with the bundle's embedder.
    generator : Generator or None
        Tokens -> images; ``None`` disables reconstruction.
    generator_steps : int, optional
        Sampling steps of the generator (default ``generator.n_steps``).
    device : str, default="cpu"
    """
    model = bundle.load_model(device)
    if model.prior is None:
        raise BundleError(f"{bundle.model_dir}: the model has no diffusion prior (model.use_prior: false)")
    if candidates.token_shape != (model.config.n_tokens, model.config.token_dim):
        raise BundleError(
            f"candidates: tokens of shape {candidates.token_shape} but the model of {bundle.subject_id} predicts "
            f"{(model.config.n_tokens, model.config.token_dim)}; embed the candidates with the bundle's embedder"
        )
    return LiveDecoder(
        make_engine(config, model, bundle.subject_id, device), candidates, generator,
        bundle.beta_mean, bundle.beta_std, prior_steps=config.model.prior_sample_steps,
        generator_steps=generator_steps or config.generator.n_steps, prior_eta=config.model.prior_sample_eta,
    )


def make_engine(config: RTDecoderConfig, model: Any, subject_id: str, device: str = "cpu") -> Engine:
    """The inference engine ``generator.engine_backend`` names, for one subject's model."""
    backend = config.generator.engine_backend
    if backend == "torch":
        from rtdecoder.engines.torch_backend import TorchEngine

        return TorchEngine(model, subject_id, device)
    from rtdecoder.engines.onnx_export import export_onnx
    from rtdecoder.engines.onnx_runtime import OnnxRuntimeEngine

    folder = export_onnx(
        model, subject_id, f"{config.generator.engine_dir}/{subject_id}", opset=config.generator.onnx_opset
    )
    if backend == "onnxruntime":
        return OnnxRuntimeEngine(folder)
    from rtdecoder.engines.tensorrt import TensorRTEngine, build_tensorrt_engines

    build_tensorrt_engines(folder, max_batch=config.generator.max_batch, fp16=config.generator.tensorrt_fp16)
    return TensorRTEngine(folder)


def load_generator(config: RTDecoderConfig, device: str = "cpu") -> Generator | None:
    """The configured generator from local weights, or ``None`` when reconstruction is off."""
    if not config.session.reconstruct:
        return None
    if config.generator.kind != "unclip":
        raise ConfigError(
            f"generator.kind: {config.generator.kind!r} is the phantom world's; build its decoder with "
            "rtdecoder.phantom.decoding.phantom_live_decoder, or set generator.kind: unclip"
        )
    if not config.generator.unclip_weights_path:
        raise ConfigError("generator.unclip_weights_path: a local file is needed for kind 'unclip'")
    from rtdecoder.decode.generators.unclip import load_unclip_generator

    return load_unclip_generator(config.generator.unclip_weights_path, config.generator.image_size_px, device=device)


def candidates_from_config(config: RTDecoderConfig, bundle: SubjectBundle, device: str = "cpu") -> CandidateBank:
    """The retrieval candidates ``candidates.images_dir`` names, embedded (and cached) with the bundle's embedder."""
    from rtdecoder.embedding.base import make_embedder

    folder = config.candidates.images_dir
    if not folder:
        raise ConfigError("candidates.images_dir: expected the folder of candidate images to retrieve among")
    embedder = make_embedder(config.embedding, device=device)
    bundle.check_embedding(embedder.name)
    return CandidateBank.from_folder(folder, embedder, config.embedding.cache_dir)


def live_decoder_from_config(bundle: SubjectBundle, config: RTDecoderConfig, device: str = "cpu") -> LiveDecoder:
    """A lab's decoder: candidates from ``candidates.images_dir``, the generator from its local weights."""
    return build_live_decoder(bundle, config, candidates_from_config(config, bundle, device),
                              load_generator(config, device), device=device)
