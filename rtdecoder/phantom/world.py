"""The phantom world: stimulus bank, its embeddings and the simulated subjects, built lazily.

It is also one producer of pretraining data: :meth:`PhantomWorld.pretraining_source` gives its
subjects' simulated betas as a :class:`~rtdecoder.calibration.dataset.BetasSource`, the same data
``rtdecoder phantom generate --level betas`` writes in the on-disk format.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence

import numpy as np

from rtdecoder.calibration.dataset import BetasDataset, SubjectBetas, subject_id
from rtdecoder.config import RTDecoderConfig
from rtdecoder.embedding.base import Embedding, make_embedder
from rtdecoder.embedding.cache import EmbeddingCache, ImageTokens
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
    embedding_name : str, optional
        The :attr:`Embedder.name` that computed a given ``embedding``; without one, such
        embeddings are not written to disk as a dataset's ``embeddings.safetensors``.

    Examples
    --------
    >>> world = PhantomWorld(load_config("phantom"))  # doctest: +SKIP
    >>> run = world.simulate_run(subject=0, session=0, run=0)  # doctest: +SKIP
    >>> run.volumes.shape  # doctest: +SKIP
    (48, 56, 46, 166)
    """

    def __init__(self, config: RTDecoderConfig, progress: bool = True,
                 embedding: Embedding | None = None, embedding_name: str | None = None) -> None:
        self.config = config
        self.progress = progress
        self._bank: StimulusBank | None = None
        self._embedding = embedding
        self._embedding_name = embedding_name
        self._embedding_given = embedding is not None
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
            self._embedding_name = embedder.name
        if len(self._embedding) != self.config.phantom.n_stimuli:
            raise ConfigError(
                f"embedding: expected one row per stimulus (phantom.n_stimuli = "
                f"{self.config.phantom.n_stimuli}) (got {len(self._embedding)})"
            )
        return self._embedding

    @property
    def embedding_name(self) -> str | None:
        """:attr:`Embedder.name` of :attr:`embedding`; None for embeddings given without a name."""
        if self._embedding is None:
            _ = self.embedding  # computing them names them
        return self._embedding_name

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

    def pretraining_source(self, subjects: Sequence[int], sessions: Sequence[int] | None = None,
                           runs: Sequence[int] | None = None) -> PhantomBetasSource:
        """Simulated betas of some subjects as pretraining data (see :class:`PhantomBetasSource`)."""
        return PhantomBetasSource(self, subjects, sessions, runs)


class PhantomBetasSource:
    """The world's simulated single-trial betas as a :class:`~rtdecoder.calibration.dataset.BetasSource`.

    Parameters
    ----------
    world : PhantomWorld
    subjects : sequence of int
        0-based subjects; subject ``i`` becomes ``sub-{i+1:02d}``.
    sessions, runs : sequence of int, optional
        0-based; default all. Trials are labelled 1-based (``session`` 1 is session 0), as
        ``phantom generate --level betas`` writes them.

    Raises
    ------
    ConfigError
        If an index is out of range.
    """

    def __init__(self, world: PhantomWorld, subjects: Sequence[int], sessions: Sequence[int] | None = None,
                 runs: Sequence[int] | None = None) -> None:
        exp = world.config.experiment
        self.world = world
        self.subjects = _indices(subjects, world.n_subjects, "--subjects", "phantom.n_subjects")
        self.sessions = _indices(range(exp.sessions_per_subject) if sessions is None else sessions,
                                 exp.sessions_per_subject, "--sessions", "experiment.sessions_per_subject")
        self.runs = _indices(range(exp.runs_per_session) if runs is None else runs, exp.runs_per_session,
                             "--runs", "experiment.runs_per_session")

    def fingerprint(self) -> str:
        """Hash of the world's parameters and the selection, without simulating anything.

        The betas are a pure function of the ``phantom``, ``experiment`` and ``scanner`` sections
        and the bank's embeddings (those of the configured embedder, or of given embeddings).
        """
        cfg = self.world.config
        parts = {name: getattr(cfg, name).model_dump(mode="json") for name in ("phantom", "experiment", "scanner")}
        parts.update(subjects=self.subjects, sessions=self.sessions, runs=self.runs)
        if not self.world._embedding_given:
            parts["embedder"] = cfg.embedding.model_dump(mode="json")  # computed by the configured embedder
        elif self.world._embedding_name is not None:
            parts["embedder"] = self.world._embedding_name
        else:  # embeddings handed over without a name: only their values identify them
            parts["tokens"] = hashlib.sha256(np.ascontiguousarray(self.world.embedding.tokens).tobytes()).hexdigest()
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def load(self, progress: bool = True) -> BetasDataset:
        """Simulate the betas (as estimated, not z-scored) with the bank's tokens."""
        subjects = {}
        for index in self.subjects:
            subject, _ = simulate_subject_betas(self.world, index, self.sessions, self.runs)
            subjects[subject.subject_id] = subject
        world = self.world
        # in memory and made for this config (or handed over with the world): not re-checked by name
        embeddings = ImageTokens(world.bank.ids, world.embedding.tokens, world.embedding_name or "",
                                 "phantom stimulus bank")
        return BetasDataset(subjects, embeddings, name=self.describe())

    def describe(self) -> str:
        """``phantom world (sub-01, ...; sessions [...], runs [...])``."""
        ids = ", ".join(subject_id(i) for i in self.subjects)
        return f"phantom world ({ids}; 0-based sessions {self.sessions}, runs {self.runs})"


def simulate_subject_betas(world: PhantomWorld, index: int, sessions: Sequence[int],
                           runs: Sequence[int]) -> tuple[SubjectBetas, list[SimulatedBetas]]:
    """Direct-simulation betas of one subject's runs, in session then run order.

    Parameters
    ----------
    world : PhantomWorld
    index : int
        0-based subject.
    sessions, runs : sequence of int
        0-based.

    Returns
    -------
    subject : SubjectBetas
        All the runs' trials; ``session`` and ``run`` 1-based, betas as estimated (not z-scored).
    runs : list of SimulatedBetas
        Each run's simulation (with its ground truth), in the same order.
    """
    simulated, session_of, run_of = [], [], []
    for session in sessions:
        for run in runs:
            betas = world.simulate_betas(index, session, run)
            simulated.append(betas)
            session_of += [session + 1] * len(betas.trials)
            run_of += [str(run + 1)] * len(betas.trials)
    trials = [t for s in simulated for t in s.trials]
    subject = SubjectBetas(
        subject_id(index), np.concatenate([s.betas for s in simulated]), [t.stim_id for t in trials],
        session_of, run_of, [t.is_test for t in trials], source=f"phantom {subject_id(index)}",
    )
    return subject, simulated


def _indices(indices: Sequence[int], count: int, option: str, field: str) -> list[int]:
    chosen = [int(i) for i in indices]
    if not chosen or any(not 0 <= i < count for i in chosen):
        raise ConfigError(f"{option}: expected indices in 0..{count - 1} ({field}) (got {chosen})")
    return chosen
