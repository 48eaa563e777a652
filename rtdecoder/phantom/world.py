"""The phantom world: stimulus bank, its embeddings and the simulated subjects, built lazily."""

from __future__ import annotations

import logging

import numpy as np

from rtdecoder.config import RTDecoderConfig
from rtdecoder.embedding.base import Embedding, make_embedder
from rtdecoder.embedding.cache import EmbeddingCache
from rtdecoder.errors import ConfigError
from rtdecoder.phantom.stimuli import StimulusBank
from rtdecoder.phantom.subjects import PhantomSubject, SimulatedBetas, SimulatedRun

logger = logging.getLogger(__name__)


class PhantomWorld:
    """Everything the simulated scanner needs, each part built on first use and kept.

    Parameters
    ----------
    config : RTDecoderConfig
        ``phantom`` (bank size, seed, subjects), ``embedding`` (model and cache folder),
        ``experiment`` and ``scanner``.
    progress : bool, default=True
        Show a progress bar while embeddings are computed.
    embedding : Embedding, optional
        Embeddings of the bank computed elsewhere (one row per stimulus, bank order); by default
        they come from the cache, computed there on first use.

    Examples
    --------
    >>> world = PhantomWorld(load_config("phantom"))  # doctest: +SKIP
    >>> run = world.simulate_run(subject=0, session=0, run=0)  # doctest: +SKIP
    >>> run.volumes.shape  # doctest: +SKIP
    (48, 56, 46, 166)
    """

    def __init__(self, config: RTDecoderConfig, progress: bool = True,
                 embedding: Embedding | None = None) -> None:
        self.config = config
        self.progress = progress
        self._bank: StimulusBank | None = None
        self._embedding = embedding
        self._subjects: dict[int, PhantomSubject] = {}

    @property
    def bank(self) -> StimulusBank:
        """The natural-image stimuli (``phantom.n_stimuli`` crops)."""
        if self._bank is None:
            ph = self.config.phantom
            self._bank = StimulusBank.build(ph.n_stimuli, size_px=ph.image_size_px, seed=ph.seed)
        return self._bank

    @property
    def embedding(self) -> Embedding:
        """Embeddings of the whole bank, from the cache in ``embedding.cache_dir``."""
        if self._embedding is None:
            embedder = make_embedder(self.config.embedding)
            cache = EmbeddingCache(self.config.embedding.cache_dir)
            self._embedding = cache.get_or_compute(embedder, self.bank, progress=self.progress)
        if len(self._embedding) != self.config.phantom.n_stimuli:
            raise ConfigError(
                f"embedding: expected one row per stimulus (phantom.n_stimuli = "
                f"{self.config.phantom.n_stimuli}) (got {len(self._embedding)})"
            )
        return self._embedding

    @property
    def pooled(self) -> np.ndarray:
        """Pooled embeddings, shape (n_stimuli, D), float32; what the subjects' cortex encodes."""
        return self.embedding.pooled

    @property
    def n_subjects(self) -> int:
        """Number of subjects (``phantom.n_subjects``)."""
        return self.config.phantom.n_subjects

    def subject(self, index: int) -> PhantomSubject:
        """Subject ``index`` (0-based), built on first use."""
        if not 0 <= index < self.n_subjects:
            raise ConfigError(
                f"subject {index}: expected 0..{self.n_subjects - 1} (phantom.n_subjects)"
            )
        if index not in self._subjects:
            self._subjects[index] = PhantomSubject.build(self.config, index, self.bank.ids)
        return self._subjects[index]

    def simulate_run(self, subject: int, session: int, run: int) -> SimulatedRun:
        """Volumes of one run of one subject (see :meth:`PhantomSubject.simulate_run`)."""
        return self.subject(subject).simulate_run(session, run, self.pooled)

    def simulate_betas(self, subject: int, session: int, run: int) -> SimulatedBetas:
        """Single-trial betas of one run (see :meth:`PhantomSubject.simulate_betas`)."""
        return self.subject(subject).simulate_betas(session, run, self.pooled)
