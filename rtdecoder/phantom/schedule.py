"""NSD-shaped sessions: which image each trial shows, when, and the BIDS ``events.tsv`` files.

A subject's experiment is ``sessions_per_subject`` sessions of ``runs_per_session`` runs of
``trials_per_run`` trials (NSD: 12 runs of 62 trials). Each trial shows one image for ``image_s``
(3 s) followed by ``blank_s`` (1 s) of blank screen; a run starts with ``lead_in_s`` of rest and
ends with ``lead_out_s`` so the last response decays. The first ``n_test_images`` stimuli of the
bank are the test set shared by every subject (like NSD's shared1000) and each is shown
``test_repeats`` times over the subject's sessions; the other trials show training images drawn
per subject from the rest of the bank, each up to 3 times. Everything follows from the seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rtdecoder.config import ExperimentConfig, RTDecoderConfig
from rtdecoder.errors import ConfigError
from rtdecoder.glm.events import Trial

#: How many times NSD shows each training image at most.
TRAIN_REPEATS = 3


@dataclass(frozen=True)
class SubjectSchedule:
    """All trials of one subject.

    Attributes
    ----------
    subject_index : int
        0-based subject number.
    runs : list of list of list of Trial
        ``runs[session][run]`` is one run's trials in presentation order.
    """

    subject_index: int
    runs: list[list[list[Trial]]]

    @property
    def n_sessions(self) -> int:
        """Number of sessions."""
        return len(self.runs)

    @property
    def runs_per_session(self) -> int:
        """Number of runs in each session."""
        return len(self.runs[0])

    def run(self, session: int, run: int) -> list[Trial]:
        """The trials of one run (0-based session and run numbers)."""
        if not 0 <= session < self.n_sessions:
            raise ConfigError(
                f"session {session}: expected 0..{self.n_sessions - 1} "
                f"(experiment.sessions_per_subject is {self.n_sessions})"
            )
        if not 0 <= run < self.runs_per_session:
            raise ConfigError(
                f"run {run}: expected 0..{self.runs_per_session - 1} "
                f"(experiment.runs_per_session is {self.runs_per_session})"
            )
        return self.runs[session][run]


def trial_period_s(experiment: ExperimentConfig) -> float:
    """Onset-to-onset interval of trials, s (NSD: 4 s)."""
    return experiment.image_s + experiment.blank_s


def run_n_volumes(experiment: ExperimentConfig, tr_s: float) -> int:
    """Number of volumes acquired in one run.

    Examples
    --------
    >>> run_n_volumes(ExperimentConfig(), 1.6)
    166
    """
    duration_s = (experiment.lead_in_s + experiment.trials_per_run * trial_period_s(experiment)
                  + experiment.lead_out_s)
    return math.ceil(round(duration_s / tr_s, 9))


def slice_times_s(n_slices: int, tr_s: float, order: str = "interleaved") -> np.ndarray:
    """Acquisition time of each slice relative to the volume's start, s.

    Parameters
    ----------
    n_slices : int
        Slices along the third grid axis.
    tr_s : float
        Repetition time, s; slices are spread evenly over it.
    order : {"interleaved", "ascending", "descending"}
        ``"interleaved"`` follows Siemens: odd slice counts acquire 0, 2, 4, ... then 1, 3, ...;
        even counts acquire 1, 3, 5, ... then 0, 2, ...

    Returns
    -------
    ndarray of shape (n_slices,)
        ``times[k]`` is when slice ``k`` (0-based, inferior first) was acquired.

    Examples
    --------
    >>> slice_times_s(5, 2.5).tolist()
    [0.0, 1.5, 0.5, 2.0, 1.0]
    """
    if order == "ascending":
        acquisition = np.arange(n_slices)
    elif order == "descending":
        acquisition = np.arange(n_slices)[::-1]
    elif order == "interleaved":
        first = 0 if n_slices % 2 else 1
        acquisition = np.concatenate([np.arange(first, n_slices, 2), np.arange(1 - first, n_slices, 2)])
    else:
        raise ConfigError(
            f"scanner.slice_order: expected 'interleaved', 'ascending' or 'descending' (got {order!r})"
        )
    times = np.empty(n_slices)
    times[acquisition] = np.arange(n_slices) * tr_s / n_slices
    return times


def default_stim_ids(n_stimuli: int) -> list[str]:
    """Identifiers used when no stimulus bank is given: ``stim-00000``, ``stim-00001``, ..."""
    return [f"stim-{i:05d}" for i in range(n_stimuli)]


def build_schedule(config: RTDecoderConfig, subject_index: int,
                   stim_ids: Sequence[str] | None = None) -> SubjectSchedule:
    """Draw one subject's sessions, runs and trials.

    Parameters
    ----------
    config : RTDecoderConfig
        Uses ``experiment`` (shape of sessions), ``phantom.seed`` and ``phantom.n_stimuli``.
    subject_index : int
        0-based subject number; different subjects get different training images and orders.
    stim_ids : sequence of str, optional
        Identifier of each stimulus (``phantom.n_stimuli`` of them); default
        :func:`default_stim_ids`.

    Returns
    -------
    SubjectSchedule

    Raises
    ------
    ConfigError
        If the test presentations do not fit in the subject's trials, or the bank is too small.
    """
    exp = config.experiment
    n_stimuli = config.phantom.n_stimuli
    ids = list(stim_ids) if stim_ids is not None else default_stim_ids(n_stimuli)
    if len(ids) != n_stimuli:
        raise ConfigError(f"stim_ids: expected phantom.n_stimuli = {n_stimuli} ids (got {len(ids)})")
    n_trials = exp.sessions_per_subject * exp.runs_per_session * exp.trials_per_run
    n_test_trials = exp.n_test_images * exp.test_repeats
    if n_test_trials > n_trials:
        raise ConfigError(
            f"experiment.n_test_images: {exp.n_test_images} x test_repeats {exp.test_repeats} "
            f"presentations expected to fit in the subject's {n_trials} trials"
        )
    if exp.n_test_images >= n_stimuli and n_trials > n_test_trials:
        raise ConfigError(
            f"experiment.n_test_images: expected fewer than phantom.n_stimuli ({n_stimuli}) "
            "so that training images remain"
        )
    rng = np.random.default_rng([config.phantom.seed, 3, subject_index])
    test = np.repeat(np.arange(exp.n_test_images), exp.test_repeats)
    n_train_trials = n_trials - n_test_trials
    pool = np.arange(exp.n_test_images, n_stimuli)
    n_unique = min(pool.size, math.ceil(n_train_trials / TRAIN_REPEATS))
    chosen = rng.choice(pool, size=n_unique, replace=False) if n_train_trials else pool[:0]
    train = np.tile(chosen, math.ceil(n_train_trials / max(n_unique, 1)))[:n_train_trials]
    order = _spread_repeats(rng.permutation(np.concatenate([test, train])), rng)

    period_s = trial_period_s(exp)
    runs: list[list[list[Trial]]] = []
    position = 0
    for session in range(exp.sessions_per_subject):
        session_runs = []
        for run in range(exp.runs_per_session):
            trials = []
            for k in range(exp.trials_per_run):
                stim = int(order[position])
                position += 1
                trials.append(Trial(
                    trial_id=(f"sub-{subject_index + 1:02d}_ses-{session + 1:02d}"
                              f"_run-{run + 1:02d}_trial-{k + 1:03d}"),
                    onset_s=round(exp.lead_in_s + k * period_s, 6),
                    duration_s=exp.image_s,
                    stim_index=stim,
                    stim_id=ids[stim],
                    is_test=stim < exp.n_test_images,
                ))
            session_runs.append(trials)
        runs.append(session_runs)
    return SubjectSchedule(subject_index=subject_index, runs=runs)


def _spread_repeats(order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Swap away back-to-back repeats of an image, which NSD's design never has."""
    order = order.copy()
    for i in range(1, order.size):
        if order[i] != order[i - 1]:
            continue
        for j in rng.permutation(order.size):
            neighbours = order[max(j - 1, 0):j + 2]
            if order[j] != order[i] and order[i] not in neighbours and order[j] not in order[i - 1:i + 2]:
                order[i], order[j] = order[j], order[i]
                break
    return order
