"""Design-matrix columns of a run, sampled at the volumes' acquisition times.

Three kinds of column, in nilearn's order: trial regressors (each trial's boxcar convolved with an
HRF kernel), then confounds (the six motion parameters), then drift (polynomial or cosine, with
the constant last).

Conventions, chosen so that a design built here equals
``nilearn.glm.first_level.make_first_level_design_matrix`` (and so ``FirstLevelModel``) to
rounding error:

- Frame times are the times the volumes' samples stand for, seconds from the start of the run's
  first volume: ``tr_index * tr_s + slice_time_ref_s``, for *every scheduled volume of the run*.
  A missing volume keeps its frame time (its row is dropped from the fit, nothing is shifted);
  nilearn's equivalent is a design for the whole run fitted with ``sample_masks``.
  ``slice_time_ref_s`` is nilearn's ``slice_time_ref * t_r``; :func:`slice_time_ref_from` gives it
  from the ``glm.slice_time_ref_s`` setting and the volumes' slice times, for calibration and the
  live session alike.
- Trial regressors are built on an oversampled grid that starts ``-min_onset_s`` (24 s) before the
  first frame and ends one TR after the last, with ``rint`` of the nominal number of samples, then
  linearly interpolated at the frame times. The grid depends on the whole run's frame times, so a
  trial's column is only defined once the run's length is known (the schedule gives it).
- Polynomial drift is ``(t / t_max) ** k`` over the whole run's frame times, each column made
  orthogonal to the lower orders (Gram-Schmidt, not normalised), the constant moved last.
- Cosine drift is the DCT-II basis below ``high_pass_hz`` for the whole run's length.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from rtdecoder.errors import ConfigError

DEFAULT_OVERSAMPLING = 50
DEFAULT_MIN_ONSET_S = -24.0
DRIFT_MODELS = ("polynomial", "cosine")
N_MOTION_PARAMS = 6
#: ``glm.slice_time_ref_s`` value that takes the reference from the volumes' slice times.
SLICE_TIME_REF_AUTO = "auto"
# Slice times a little past the TR (rounding in a sidecar or a DICOM header, in ms) are accepted.
_SLICE_TIME_TOLERANCE_S = 1e-3


class TrialLike(Protocol):
    """What the design reads of a trial (:class:`rtdecoder.glm.events.Trial` has it).

    ``onset_s`` is seconds from the start of the run's first volume, ``duration_s`` seconds
    (0 models an impulse).
    """

    @property
    def trial_id(self) -> str: ...

    @property
    def onset_s(self) -> float: ...

    @property
    def duration_s(self) -> float: ...


def frame_times_s(n_volumes: int, tr_s: float, slice_time_ref_s: float = 0.0) -> np.ndarray:
    """Acquisition time each volume's sample stands for, s.

    Parameters
    ----------
    n_volumes : int
        Volumes scheduled in the run (missing ones included).
    tr_s : float
        Repetition time, s.
    slice_time_ref_s : float, default=0.0
        Time within the TR of the reference slice, s (nilearn's ``slice_time_ref * t_r``).

    Returns
    -------
    ndarray of shape (n_volumes,), float64
        ``tr_index * tr_s + slice_time_ref_s``.

    Examples
    --------
    >>> frame_times_s(4, 2.0, 1.0).tolist()
    [1.0, 3.0, 5.0, 7.0]
    """
    if n_volumes < 2:
        raise ConfigError(f"n_volumes: expected at least 2 volumes in a run (got {n_volumes!r})")
    if tr_s <= 0:
        raise ConfigError(f"tr_s: expected a positive repetition time in seconds (got {tr_s!r})")
    if not 0.0 <= slice_time_ref_s <= tr_s:
        raise ConfigError(
            f"slice_time_ref_s: expected a time within the TR, 0 to {tr_s} s (got {slice_time_ref_s!r})"
        )
    return np.linspace(slice_time_ref_s, (n_volumes - 1) * tr_s + slice_time_ref_s, n_volumes)


def slice_time_ref_from(
    config_value: float | str,
    slice_times_s: np.ndarray | Sequence[float] | None,
    tr_s: float,
    source: str | Path | None = None,
) -> float:
    """Time within the TR that a volume's sample stands for, s, from ``glm.slice_time_ref_s``.

    The one rule calibration (:func:`rtdecoder.calibration.betas.estimate_session_betas`, from each run's
    first volume) and the live session (from the run's first live volume) both apply, so that the
    live GLM's design is the calibration's.

    A GLM samples its regressors once per volume, but a slice-by-slice acquisition samples each
    slice at its own time within the TR. With ``"auto"`` the reference is the median of the
    volume's slice acquisition times: the time that minimises the mean absolute timing error over
    the slices (so over voxels spread evenly over slices). For ``n`` slices spread evenly over the
    TR this is ``(n - 1) / (2 n) * tr_s``, just before nilearn's ``slice_time_ref=0.5``
    (``tr_s / 2``), which assumes the same middle but not the actual slice times. Volumes that
    carry no slice times give 0 (the start of the volume, nilearn's default): nothing says when
    their slices were acquired.

    Parameters
    ----------
    config_value : float or "auto"
        The ``glm.slice_time_ref_s`` setting: a time within the TR in s, or ``"auto"``.
    slice_times_s : array-like of shape (nz,) or None
        Acquisition time of each slice from the start of the volume, s
        (:attr:`rtdecoder.ingest.volume.Volume.slice_times_s`); None when the volume has none.
    tr_s : float
        Repetition time, s.
    source : str or Path, optional
        The volume the slice times come from, named in errors.

    Returns
    -------
    float
        In ``[0, tr_s]``, s.

    Raises
    ------
    ConfigError
        If ``config_value`` is neither ``"auto"`` nor a time within the TR, or the slice times are
        not finite times within the TR.

    Examples
    --------
    >>> slice_time_ref_from("auto", [0.0, 1.5, 0.5, 2.0, 1.0], 2.5)  # 5 slices, interleaved
    1.0
    >>> slice_time_ref_from("auto", None, 1.6), slice_time_ref_from(0.8, [0.0, 0.8], 1.6)
    (0.0, 0.8)
    """
    where = f"{source}: " if source is not None else ""
    if not (isinstance(tr_s, (int, float)) and np.isfinite(tr_s) and tr_s > 0):
        raise ConfigError(f"{where}tr_s: expected a positive repetition time in seconds (got {tr_s!r})")
    if isinstance(config_value, str):
        if config_value != SLICE_TIME_REF_AUTO:
            raise ConfigError(
                f"glm.slice_time_ref_s: expected {SLICE_TIME_REF_AUTO!r} or a time within the TR, 0 to {tr_s} s "
                f"(got {config_value!r})"
            )
        if slice_times_s is None:
            return 0.0
        times_s = np.asarray(slice_times_s, dtype=np.float64)
        if times_s.ndim != 1 or times_s.size == 0 or not np.all(np.isfinite(times_s)):
            raise ConfigError(
                f"{where}slice_times_s: expected one finite acquisition time per slice, s (got shape "
                f"{times_s.shape}{'' if np.all(np.isfinite(times_s)) else ' with non-finite values'})"
            )
        if times_s.min() < -_SLICE_TIME_TOLERANCE_S or times_s.max() > tr_s + _SLICE_TIME_TOLERANCE_S:
            raise ConfigError(
                f"{where}slice_times_s: expected acquisition times within the TR, 0 to {tr_s} s from the "
                f"volume's start (got {times_s.min():.6g} to {times_s.max():.6g} s; times in ms?)"
            )
        return float(np.clip(np.median(times_s), 0.0, tr_s))
    if isinstance(config_value, bool) or not isinstance(config_value, (int, float, np.floating, np.integer)):
        raise ConfigError(
            f"glm.slice_time_ref_s: expected {SLICE_TIME_REF_AUTO!r} or a time within the TR, 0 to {tr_s} s "
            f"(got {config_value!r})"
        )
    value_s = float(config_value)
    if not 0.0 <= value_s <= tr_s:
        raise ConfigError(
            f"{where}glm.slice_time_ref_s: expected {SLICE_TIME_REF_AUTO!r} or a time within the TR, 0 to {tr_s} s "
            f"(got {config_value!r})"
        )
    return value_s


def oversampled_grid_s(
    times_s: np.ndarray, oversampling: int = DEFAULT_OVERSAMPLING,
    min_onset_s: float = DEFAULT_MIN_ONSET_S,
) -> np.ndarray:
    """The fine time grid trial boxcars are convolved on, s.

    Parameters
    ----------
    times_s : ndarray of shape (n_volumes,)
        The run's frame times (:func:`frame_times_s`).
    oversampling : int, default=50
        Samples per TR.
    min_onset_s : float, default=-24.0
        Where the grid starts, relative to the first frame, s.

    Returns
    -------
    ndarray of shape (n_samples,), float64

    Examples
    --------
    >>> grid = oversampled_grid_s(frame_times_s(10, 1.6))
    >>> float(grid[0]), round(float(grid[-1]), 6), grid.size
    (-24.0, 16.0, 1251)
    """
    n_frames = times_s.size
    first_s, last_s = float(times_s.min()), float(times_s.max())
    end_s = last_s * (1.0 + 1.0 / (n_frames - 1))
    n_samples = (n_frames - 1) / (last_s - first_s) * (end_s - first_s - min_onset_s) * oversampling + 1
    return np.linspace(first_s + min_onset_s, end_s, int(np.rint(n_samples)))


def trial_regressors(
    trials: Sequence[TrialLike],
    times_s: np.ndarray,
    kernel: np.ndarray,
    oversampling: int = DEFAULT_OVERSAMPLING,
    min_onset_s: float = DEFAULT_MIN_ONSET_S,
) -> np.ndarray:
    """One column per trial: its boxcar convolved with ``kernel``, sampled at the frame times.

    Parameters
    ----------
    trials : sequence of TrialLike
        Onsets (s from the first volume) and durations (s).
    times_s : ndarray of shape (n_volumes,)
        The whole run's frame times.
    kernel : ndarray of shape (n_kernel_samples,)
        HRF sampled every ``tr_s / oversampling`` s (see :mod:`rtdecoder.glm.hrf`).
    oversampling : int, default=50
        Samples per TR of the fine grid.
    min_onset_s : float, default=-24.0
        Start of the fine grid relative to the first frame, s; earlier onsets are an error.

    Returns
    -------
    ndarray of shape (n_volumes, n_trials), float64

    Examples
    --------
    >>> from rtdecoder.glm.events import Trial
    >>> times_s = frame_times_s(20, 2.0)
    >>> impulse = np.array([1.0])  # no haemodynamics: the regressor is the boxcar itself
    >>> x = trial_regressors([Trial("a", 4.0, 4.0)], times_s, impulse)
    >>> x.shape, x[:5, 0].tolist()
    ((20, 1), [0.0, 0.0, 1.0, 1.0, 0.0])
    """
    grid_s = oversampled_grid_s(times_s, oversampling, min_onset_s)
    n_grid = grid_s.size
    onsets_s = np.array([float(t.onset_s) for t in trials], dtype=np.float64)
    durations_s = np.array([float(t.duration_s) for t in trials], dtype=np.float64)
    if np.any(onsets_s < grid_s[0]) or np.any(durations_s < 0):
        raise ConfigError(
            f"trials: expected onsets from {grid_s[0]:.3f} s and durations >= 0 s "
            f"(got onsets {onsets_s.min(initial=0.0):.3f}..{onsets_s.max(initial=0.0):.3f} s, "
            f"shortest duration {durations_s.min(initial=0.0):.3f} s)"
        )
    # Boxcar on the fine grid: on at the first sample at or after the onset, off at the first at
    # or after the offset, and an impulse (one sample) when both fall on the same sample.
    on = np.minimum(np.searchsorted(grid_s, onsets_s), n_grid - 1)
    off = np.minimum(np.searchsorted(grid_s, onsets_s + durations_s), n_grid - 1)
    off = np.where((off < n_grid - 1) & (off == on), off + 1, off)

    # Frame times fall between fine samples lo and lo + 1; interpolate linearly.
    lo = np.clip(np.searchsorted(grid_s, times_s, side="right") - 1, 0, n_grid - 2)
    weight = (times_s - grid_s[lo]) / (grid_s[lo + 1] - grid_s[lo])

    # A boxcar convolved with a kernel is a difference of the kernel's running sums, so only the
    # fine samples next to a frame time are ever computed: O(n_volumes) per trial, no convolution.
    cumulative = np.cumsum(np.asarray(kernel, dtype=np.float64))

    def running_sum(lag: np.ndarray) -> np.ndarray:
        inside = lag >= 0
        return np.where(inside, cumulative[np.clip(lag, 0, cumulative.size - 1)], 0.0)

    def convolved(at: np.ndarray) -> np.ndarray:
        # (n_volumes, n_trials): sum of kernel[at - m] for m in [on, off).
        return running_sum(at[:, None] - on[None, :]) - running_sum(at[:, None] - off[None, :])

    low, high = convolved(lo), convolved(lo + 1)
    return low + weight[:, None] * (high - low)


def polynomial_drift(times_s: np.ndarray, order: int) -> np.ndarray:
    """Polynomial drift up to degree ``order``, each column orthogonal to lower degrees.

    Parameters
    ----------
    times_s : ndarray of shape (n_volumes,)
        The whole run's frame times, s.
    order : int
        Highest degree (0: the constant only).

    Returns
    -------
    ndarray of shape (n_volumes, order + 1), float64
        Degrees 1..order, then the constant.

    Examples
    --------
    >>> d = polynomial_drift(frame_times_s(5, 1.0), 1)
    >>> np.round(d, 3).tolist()
    [[-0.5, 1.0], [-0.25, 1.0], [0.0, 1.0], [0.25, 1.0], [0.5, 1.0]]
    """
    if order < 0:
        raise ConfigError(f"drift_order: expected a degree >= 0 (got {order!r})")
    scaled = times_s / float(times_s.max())
    columns = np.stack([scaled**k for k in range(order + 1)], axis=1)
    for k in range(1, order + 1):
        lower = columns[:, :k]
        coef, *_ = np.linalg.lstsq(lower, columns[:, k], rcond=None)
        columns[:, k] -= lower @ coef
    return np.hstack([columns[:, 1:], columns[:, :1]])


def cosine_drift(times_s: np.ndarray, high_pass_hz: float) -> np.ndarray:
    """Discrete cosine (DCT-II) drift below ``high_pass_hz``, plus the constant.

    Parameters
    ----------
    times_s : ndarray of shape (n_volumes,)
        The whole run's frame times, s (evenly spaced).
    high_pass_hz : float
        Cut-off frequency, Hz.

    Returns
    -------
    ndarray of shape (n_volumes, n_cosines + 1), float64
        ``n_cosines = floor(2 * n_volumes * high_pass_hz * tr_s)`` (at most ``n_volumes - 1``)
        cosines scaled by ``sqrt(2 / n_volumes)``, then the constant.

    Examples
    --------
    >>> cosine_drift(frame_times_s(190, 1.6), 0.01).shape
    (190, 7)
    """
    if high_pass_hz <= 0:
        raise ConfigError(f"high_pass_hz: expected a positive frequency (got {high_pass_hz!r})")
    n_frames = times_s.size
    step_s = (times_s[-1] - times_s[0]) / (n_frames - 1)
    n_cosines = int(min(n_frames - 1, np.floor(2 * n_frames * high_pass_hz * step_s)))
    index = np.arange(n_frames)
    drift = np.ones((n_frames, n_cosines + 1))
    for k in range(1, n_cosines + 1):
        drift[:, k - 1] = np.sqrt(2.0 / n_frames) * np.cos(np.pi / n_frames * (index + 0.5) * k)
    return drift


def drift_regressors(
    times_s: np.ndarray, drift_model: str, drift_order: int = 2, high_pass_hz: float = 0.01
) -> np.ndarray:
    """The run's drift columns (constant last).

    Parameters
    ----------
    times_s : ndarray of shape (n_volumes,)
        The whole run's frame times, s.
    drift_model : {"polynomial", "cosine"}
        Which basis.
    drift_order : int, default=2
        Polynomial degree (polynomial model).
    high_pass_hz : float, default=0.01
        Cut-off, Hz (cosine model).

    Returns
    -------
    ndarray of shape (n_volumes, n_drift), float64

    Examples
    --------
    >>> drift_regressors(frame_times_s(100, 2.0), "polynomial", 3).shape
    (100, 4)
    """
    if drift_model == "polynomial":
        return polynomial_drift(times_s, drift_order)
    if drift_model == "cosine":
        return cosine_drift(times_s, high_pass_hz)
    raise ConfigError(f"drift_model: expected one of {', '.join(DRIFT_MODELS)} (got {drift_model!r})")


def lss_columns(trial_columns: np.ndarray, trial_index: int) -> np.ndarray:
    """The two task columns of trial ``trial_index``'s least-squares-separate model.

    Parameters
    ----------
    trial_columns : ndarray of shape (n_volumes, n_trials)
        From :func:`trial_regressors`.
    trial_index : int
        The trial modelled on its own.

    Returns
    -------
    ndarray of shape (n_volumes, 2), float64
        The trial's column, then the sum of every other trial's.

    Examples
    --------
    >>> lss_columns(np.eye(3), 1).tolist()
    [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]
    """
    own = trial_columns[:, trial_index]
    return np.stack([own, trial_columns.sum(axis=1) - own], axis=1)
