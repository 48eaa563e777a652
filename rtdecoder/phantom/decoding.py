"""The phantom world's live decoder: its stimulus bank as candidates, its distilled student as generator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rtdecoder.bundle import SubjectBundle
from rtdecoder.config import RTDecoderConfig
from rtdecoder.decode.live import LiveDecoder
from rtdecoder.decode.retrieval import CandidateBank


def stimulus_bank_candidates(bank: Any, embedder: Any, cache_dir: str | Path, progress: bool = True) -> CandidateBank:
    """Candidates = every stimulus of a :class:`~rtdecoder.phantom.stimuli.StimulusBank` (embeddings cached)."""
    from rtdecoder.embedding.cache import EmbeddingCache

    embedding = EmbeddingCache(cache_dir).get_or_compute(embedder, bank, progress=progress)
    return CandidateBank(list(bank.ids), embedding.tokens)


def phantom_candidates(config: RTDecoderConfig, bundle: SubjectBundle, device: str = "cpu") -> CandidateBank:
    """The phantom stimulus bank, embedded with the configured embedder (checked against the bundle's)."""
    from rtdecoder.embedding.base import make_embedder
    from rtdecoder.phantom.stimuli import StimulusBank

    embedder = make_embedder(config.embedding, device=device)
    bundle.check_embedding(embedder.name)
    bank = StimulusBank.build(config.phantom.n_stimuli, config.phantom.image_size_px, config.phantom.seed)
    return stimulus_bank_candidates(bank, embedder, config.embedding.cache_dir)


def phantom_live_decoder(bundle: SubjectBundle, config: RTDecoderConfig, device: str = "cpu") -> LiveDecoder:
    """The demo's decoder: phantom candidates and the distilled phantom student (or unCLIP when configured)."""
    from rtdecoder.compose import build_live_decoder, load_generator
    from rtdecoder.phantom.distill import load_or_distill_phantom_student

    generator, steps = None, None
    if config.session.reconstruct:
        if config.generator.kind == "phantom":
            generator, steps = load_or_distill_phantom_student(config), config.generator.student_steps
        else:
            generator = load_generator(config, device)
    return build_live_decoder(bundle, config, phantom_candidates(config, bundle, device), generator,
                              generator_steps=steps, device=device)
