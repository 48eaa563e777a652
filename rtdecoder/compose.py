"""The one place the live decoder is wired: a bundle, a config and a candidate set -> a LiveDecoder.

The parts stay apart (the model and its prior in :mod:`rtdecoder.decode`, the inference backends
in :mod:`rtdecoder.engines`, the generators in :mod:`rtdecoder.decode.generators`); this module
chooses between them from the config, the captioner (:func:`load_captioner`) too. The phantom world's
candidates, generator and captioner come from
:mod:`rtdecoder.phantom.decoding`, which calls :func:`build_live_decoder` with its own parts, so
nothing here depends on the simulator.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from rtdecoder.bundle import SubjectBundle
from rtdecoder.calibration.hubness_reference import bundle_hubness_reference
from rtdecoder.config import RTDecoderConfig
from rtdecoder.decode.caption import Captioner
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
    captioner: Captioner | None = None,
) -> LiveDecoder:
    """The live decoder of a calibrated subject.

    Parameters
    ----------
    bundle : SubjectBundle
        Model, statistics and the embedding its model predicts.
    config : RTDecoderConfig
        ``generator.engine_backend`` picks the engine (built once into the bundle, see
        :func:`make_engine`); ``model.prior_sample_steps`` and ``model.prior_sample_eta`` the
        prior's sampling; ``generator.lowlevel_weight`` the share of the low-level image in each
        reconstruction when the bundle's model has the low-level head.
    candidates : CandidateBank
        Retrieval candidates, embedded with the bundle's embedder; ranked by CSLS against the bundle's
        hubness reference when ``candidates.hubness_k`` is above 0 (:mod:`rtdecoder.decode.hubness`).
    generator : Generator or None
        Tokens -> images; ``None`` disables reconstruction.
    generator_steps : int, optional
        Sampling steps of the generator (default :func:`default_generator_steps`: ``generator.n_steps``,
        or ``generator.student_steps`` with a distilled unCLIP student).
    device : str, default="cpu"
    captioner : Captioner, optional
        Prior tokens -> caption (:func:`load_captioner`); ``None``: no captions.

    Raises
    ------
    BundleError
        A model without a prior, or candidates or a captioner of another token shape.
    ConfigError
        A low-level latent that the generator has no VAE for (with ``generator.lowlevel_weight`` > 0).
    """
    from rtdecoder.decode.generators.base import lowlevel_vae_for

    model = bundle.load_model(device)
    if model.prior is None:
        raise BundleError(f"{bundle.model_dir}: the model has no diffusion prior (model.use_prior: false)")
    if candidates.token_shape != (model.config.n_tokens, model.config.token_dim):
        raise BundleError(
            f"candidates: tokens of shape {candidates.token_shape} but the model of {bundle.subject_id} predicts "
            f"{(model.config.n_tokens, model.config.token_dim)}; embed the candidates with the bundle's embedder"
        )
    if captioner is not None and tuple(captioner.input_shape) != (model.config.n_tokens, model.config.token_dim):
        raise BundleError(
            f"caption.map_path: captioner {captioner.name!r} takes tokens of shape {tuple(captioner.input_shape)} but "
            f"the model of {bundle.subject_id} predicts {(model.config.n_tokens, model.config.token_dim)}; fit a "
            "caption map from the bundle's embedder (python -m rtdecoder.decode.caption fit-map)"
        )
    started = time.perf_counter()
    candidates.correct_hubness(bundle_hubness_reference(bundle, model, config.candidates.hubness_k))
    if candidates.hubness_penalty is not None:
        logger.info("retrieval: CSLS hubness correction, k = %d, over %d candidates (%.1f s)",
                    config.candidates.hubness_k, len(candidates), time.perf_counter() - started)
    # The bundle's model, not the run's model section, says whether the encoder gives a low-level output.
    lowlevel_weight = config.generator.lowlevel_weight if model.config.lowlevel and generator is not None else 0.0
    lowlevel_vae = lowlevel_vae_for(generator, model.config.lowlevel_channels) if lowlevel_weight > 0 else None
    return LiveDecoder(
        make_engine(config, model, bundle.subject_id, device, bundle=bundle), candidates, generator,
        bundle.beta_mean, bundle.beta_std, prior_steps=config.model.prior_sample_steps,
        generator_steps=generator_steps or default_generator_steps(config), prior_eta=config.model.prior_sample_eta,
        lowlevel_weight=lowlevel_weight, lowlevel_vae=lowlevel_vae, captioner=captioner,
    )


def make_engine(
    config: RTDecoderConfig, model: Any, subject_id: str, device: str = "cpu", bundle: SubjectBundle | None = None
) -> Engine:
    """The inference engine ``generator.engine_backend`` names, for one subject's model.

    ONNX Runtime and TensorRT engines are files keyed by the model's digest and the engine
    settings (:mod:`rtdecoder.engines.store`): the folder ``rtdecoder engines build`` (or an
    earlier run) made is loaded as it is; when there is none for this key (absent, or built from
    other weights or settings) it is built once, logged, into ``<bundle>/engines`` or, when the
    bundle folder is read-only, into ``generator.engine_dir``.

    Parameters
    ----------
    config : RTDecoderConfig
        ``generator.engine_backend``, ``engine_dir``, ``onnx_opset``, ``tensorrt_fp16``, ``max_batch``.
    model : MindEye2
        The subject's model (from ``bundle.load_model``). Exporting moves it to the CPU.
    subject_id : str
    device : str, default="cpu"
        For the torch backend.
    bundle : SubjectBundle, optional
        The bundle ``model`` came from: its engines are used, and its model files' digest keys them.
        Without it the key is the digest of the model's state dict, and engines live in ``engine_dir``.

    Returns
    -------
    Engine
    """
    backend = config.generator.engine_backend
    if backend == "torch":
        from rtdecoder.engines.torch_backend import TorchEngine

        return TorchEngine(model, subject_id, device)
    from rtdecoder.engines.store import engine_key, ensure_engine, state_digest

    in_bundle = bundle is not None and bundle.directory is not None and bundle.model_dir is not None
    weights = bundle.model_sha256() if in_bundle else state_digest(model)
    key = engine_key(weights, subject_id, config.generator)
    folder = ensure_engine(model, key, bundle.directory if in_bundle else None, config.generator.engine_dir)
    if backend == "onnxruntime":
        from rtdecoder.engines.onnx_runtime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(folder)
    from rtdecoder.engines.tensorrt import TensorRTEngine

    return TensorRTEngine(folder)


def default_generator_steps(config: RTDecoderConfig) -> int:
    """Sampling steps of the configured generator: ``generator.student_steps`` for a distilled unCLIP student
    (``generator.unclip_student_path``), else ``generator.n_steps``."""
    gen = config.generator
    return gen.student_steps if gen.kind == "unclip" and gen.unclip_student_path else gen.n_steps


def load_generator(config: RTDecoderConfig, device: str = "cpu") -> Generator | None:
    """The configured generator from local weights, or ``None`` when reconstruction is off.

    unCLIP samples with ``generator.guidance_scale`` (MindEye2: 5) at ``generator.image_size_px``; with
    ``generator.unclip_student_path`` set, the distilled student renders instead (unguided, at
    ``generator.student_steps``; the teacher's weights are then not read).
    """
    if not config.session.reconstruct:
        return None
    if config.generator.kind != "unclip":
        raise ConfigError(
            f"generator.kind: {config.generator.kind!r} is the phantom world's; build its decoder with "
            "rtdecoder.phantom.decoding.phantom_live_decoder, or set generator.kind: unclip"
        )
    if config.generator.unclip_student_path:
        from rtdecoder.decode.generators.unclip import load_unclip_student

        return load_unclip_student(config.generator.unclip_student_path, config.generator.image_size_px,
                                   config.generator.student_steps, device=device)
    if not config.generator.unclip_weights_path:
        raise ConfigError("generator.unclip_weights_path: a local file is needed for kind 'unclip'")
    from rtdecoder.decode.generators.unclip import load_unclip_generator

    return load_unclip_generator(config.generator.unclip_weights_path, config.generator.image_size_px,
                                 guidance_scale=config.generator.guidance_scale, device=device)


def candidates_from_config(
    config: RTDecoderConfig, bundle: SubjectBundle, device: str = "cpu", progress: bool = True
) -> CandidateBank:
    """The retrieval candidates the config names: ``candidates.embeddings_file`` or ``candidates.images_dir``.

    Parameters
    ----------
    config : RTDecoderConfig
        ``candidates`` (the source, ``embed_batch_size``), ``embedding`` (the embedder of a folder
        and ``cache_dir``).
    bundle : SubjectBundle
        Its ``embedding_name`` and model token shape (n_tokens, token_dim) are what the candidates must have.
    device : str, default="cpu"
        Where a folder's images are embedded.
    progress : bool, default=True
        Progress bar while a folder is embedded (once: the cache key is the files' content).

    Returns
    -------
    CandidateBank
        Ids are the images' ``stim_id`` (file stems, or the file's ``ids``).

    Raises
    ------
    ConfigError
        If neither is set.
    BundleError
        If the embedder or the token shape differ from the bundle's (naming the file or folder and
        the field), or an image or the file cannot be read.
    """
    from rtdecoder.embedding.base import make_embedder
    from rtdecoder.embedding.cache import load_image_tokens

    section = config.candidates
    token_shape = (bundle.config.model.n_tokens, bundle.config.model.token_dim)
    expected_by = f"bundle {bundle.subject_id}"
    if section.embeddings_file:
        tokens = load_image_tokens(section.embeddings_file, embedding_name=bundle.embedding_name or None,
                                   token_shape=token_shape, expected_by=expected_by)
    elif section.images_dir:
        embedder = make_embedder(config.embedding, device=device)
        bundle.check_embedding(embedder.name)
        tokens = load_image_tokens(section.images_dir, embedder, config.embedding.cache_dir,
                                   batch_size=section.embed_batch_size, progress=progress,
                                   token_shape=token_shape, expected_by=expected_by)
    else:
        raise ConfigError(
            "candidates: expected images_dir (a folder of candidate images) or embeddings_file (their "
            "precomputed tokens) to retrieve among"
        )
    logger.info("retrieval candidates: %d images from %s", len(tokens), tokens.source)
    return CandidateBank.from_image_tokens(tokens)


def load_captioner(config: RTDecoderConfig, device: str = "cpu") -> Captioner | None:
    """The configured GIT captioner from local weights, or ``None`` when captions are off.

    Off (``None``) when ``caption.enabled`` is false, and, with a log message naming the key, when
    ``caption.git_weights_dir`` is not set or holds no model, or the caption map
    (``caption.map_path``, default ``<git_weights_dir>/caption_map.safetensors``) is missing: a
    missing captioner never stops a session. Weights that are there but do not load raise.
    """
    from pathlib import Path

    section = config.caption
    if not section.enabled:
        return None
    if not section.git_weights_dir:
        logger.info("captions off: caption.git_weights_dir is not set (a local folder of GIT captioner weights); "
                    "set caption.enabled: false to say so")
        return None
    folder = Path(section.git_weights_dir)
    if not (folder / "config.json").is_file():
        logger.warning("captions off: caption.git_weights_dir: %s holds no GIT model (no config.json)", folder)
        return None
    from rtdecoder.decode.caption import CAPTION_MAP_NAME, load_git_captioner

    map_path = Path(section.map_path) if section.map_path else folder / CAPTION_MAP_NAME
    if not map_path.is_file():
        logger.warning("captions off: caption.map_path: %s not found (the linear map from the predicted tokens to "
                       "the captioner's; python -m rtdecoder.decode.caption fit-map makes one)", map_path)
        return None
    return load_git_captioner(folder, map_path, max_new_tokens=section.max_new_tokens, num_beams=section.num_beams,
                              device=device)


def live_decoder_from_config(bundle: SubjectBundle, config: RTDecoderConfig, device: str = "cpu") -> LiveDecoder:
    """A lab's decoder: candidates from ``candidates.images_dir``, the generator and captioner from local weights."""
    return build_live_decoder(bundle, config, candidates_from_config(config, bundle, device),
                              load_generator(config, device), device=device, captioner=load_captioner(config, device))
