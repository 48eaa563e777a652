"""The phantom world's parts for decoding: its stimulus bank as image tokens and candidates, its student as generator.

Production code never chooses these: the command-line modules, the demo and the benchmarks pass
them in (e.g. :func:`phantom_image_tokens` as ``calibrate``'s images for a session the phantom wrote).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rtdecoder.bundle import SubjectBundle
from rtdecoder.config import RTDecoderConfig
from rtdecoder.decode.live import LiveDecoder
from rtdecoder.decode.retrieval import CandidateBank
from rtdecoder.embedding.cache import ImageTokens

PHANTOM_BANK_SOURCE = "phantom stimulus bank"


def phantom_image_tokens(
    config: RTDecoderConfig, progress: bool = True, world: Any | None = None, embedding_name: str | None = None
) -> ImageTokens:
    """The phantom stimulus bank's tokens with their stim_ids (from the embedding cache), for calibration.

    Parameters
    ----------
    config : RTDecoderConfig
        ``phantom`` (the bank) and ``embedding`` (the embedder and its cache).
    progress : bool, default=True
        Progress bar while the bank is embedded (first use only).
    world : PhantomWorld, optional
        The world whose bank and embedding to use (e.g. one built with precomputed embeddings);
        default a new one from ``config``.
    embedding_name : str, optional
        The name to record for the tokens; default the configured embedder's
        :attr:`~rtdecoder.embedding.base.Embedder.name` (what the world's cache was computed with).

    Returns
    -------
    ImageTokens
        ``ids`` the bank's stim_ids, ``tokens`` (phantom.n_stimuli, n_tokens, token_dim) float32.
    """
    from rtdecoder.phantom.world import PhantomWorld

    world = world if world is not None else PhantomWorld(config, progress=progress)
    if embedding_name is None:
        from rtdecoder.embedding.base import make_embedder

        embedding_name = make_embedder(config.embedding).name
    return ImageTokens(list(world.bank.ids), world.embedding.tokens, embedding_name, PHANTOM_BANK_SOURCE)


def stimulus_bank_candidates(bank: Any, embedder: Any, cache_dir: str | Path, progress: bool = True) -> CandidateBank:
    """Candidates = every stimulus of a :class:`~rtdecoder.phantom.stimuli.StimulusBank` (embeddings cached)."""
    from rtdecoder.embedding.cache import EmbeddingCache

    embedding = EmbeddingCache(cache_dir).get_or_compute(embedder, bank, progress=progress)
    return CandidateBank(list(bank.ids), embedding.tokens)


def phantom_candidates(config: RTDecoderConfig, bundle: SubjectBundle, device: str = "cpu") -> CandidateBank:
    """The configured candidates when the config names some, else the phantom stimulus bank.

    The bank is embedded with the configured embedder, checked against the bundle's.
    """
    if config.candidates.images_dir or config.candidates.embeddings_file:
        from rtdecoder.compose import candidates_from_config

        return candidates_from_config(config, bundle, device)
    from rtdecoder.embedding.base import make_embedder
    from rtdecoder.phantom.stimuli import StimulusBank

    embedder = make_embedder(config.embedding, device=device)
    bundle.check_embedding(embedder.name)
    bank = StimulusBank.build(config.phantom.n_stimuli, config.phantom.image_size_px, config.phantom.seed)
    return stimulus_bank_candidates(bank, embedder, config.embedding.cache_dir)


def phantom_live_decoder(bundle: SubjectBundle, config: RTDecoderConfig, device: str = "cpu") -> LiveDecoder:
    """The demo's decoder: phantom candidates (or the configured ones), the distilled phantom student
    (or unCLIP when configured) and the phantom captioner (or the configured GIT, ``caption.git_weights_dir``)."""
    from rtdecoder.compose import build_live_decoder, load_generator
    from rtdecoder.phantom.distill import load_or_distill_phantom_student

    generator, steps = None, None
    if config.session.reconstruct:
        if config.generator.kind == "phantom":
            generator, steps = load_or_distill_phantom_student(config), config.generator.student_steps
        else:
            generator = load_generator(config, device)
    return build_live_decoder(bundle, config, phantom_candidates(config, bundle, device), generator,
                              generator_steps=steps, device=device, captioner=phantom_captioner(config, device))


def phantom_captioner(config: RTDecoderConfig, device: str = "cpu") -> Any:
    """The configured captioner (:func:`rtdecoder.compose.load_captioner`) when ``caption.git_weights_dir`` is
    set, else the phantom world's own (:func:`rtdecoder.phantom.captions.load_or_train_phantom_captioner`);
    ``None`` with ``caption.enabled: false``."""
    if not config.caption.enabled:
        return None
    if config.caption.git_weights_dir:
        from rtdecoder.compose import load_captioner

        return load_captioner(config, device)
    from rtdecoder.phantom.captions import load_or_train_phantom_captioner

    return load_or_train_phantom_captioner(config, device=device)
