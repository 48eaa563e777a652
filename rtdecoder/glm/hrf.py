"""Haemodynamic response functions: the canonical shapes, a 20-shape library and its per-voxel choice.

Every kernel here is sampled on the oversampled grid the design matrix convolves on: ``dt =
tr_s / oversampling`` seconds per sample, ``time_length_s`` long, and normalised to sum to 1 (so
a trial's regressor is in the units of the data per unit of response, whatever the shape).

The canonical kernels are the double-gamma forms of SPM and of Glover (1999) with the parameters
nilearn uses, sampled the way nilearn samples them, so that a design built from them agrees with
``nilearn.glm.first_level.make_first_level_design_matrix`` to rounding error.

The library is a one-parameter-per-axis family of double gammas, after GLMsingle's idea of
choosing, per voxel, the best of a fixed set of shapes on calibration data. Its 20 shapes run from
a time to peak of 3.5 s to 7.5 s (width growing with latency, as measured HRFs do), and each has
one of four undershoot depths.

Choosing a shape per voxel (:func:`library_scores`, :func:`choose_library_hrf`; calibration's
``glm.hrf_selection``), three rules (:data:`HRF_SELECTIONS`), each fitting every run with its own
drift and motion confounds:

- ``"crossval"`` (the default): an ON-OFF model, all trials sharing one regressor (the sum of
  their regressors), its amplitude fitted on the other runs and scored on the held-out run
  (leave-one-run-out R^2, averaged over runs); needs two or more runs.
- ``"onoff"``: the same ON-OFF model's in-sample R^2 per run, averaged over runs.
- ``"single_trial"``: the R^2 of the single-trial (LSA) model, one regressor per trial, averaged
  over runs: the rule of GLMsingle's FITHRF step, and this project's before issue 13.

Why not single trials: with one free amplitude per trial (62 in 166 volumes at NSD timing) the
model fits a good part of the noise, and can also mimic a shape it does not have by trading
amplitude between neighbouring trials; both favour broad, late shapes. On worlds whose HRFs are
not drawn from this library (inverse-logit shapes peaking at 5.5 s, NSD-like noise) it chose a
median 6.9 s with 20-25% of voxels at the latest shape, and betas worse than the canonical HRF's
(correlation with the truth 0.46 against 0.55 on the phantom, through calibration). One amplitude
per run cannot do either, so the ON-OFF rules choose by how well a shape describes the mean
response. Why cross-validated: the in-sample ON-OFF R^2 still favours shapes that happen to fit a
run's noise; scored on held-out runs, the choice gave betas as good or better than ``"onoff"``'s
in every world tried (by up to 0.016), at no extra cost.

The canonical shape as a candidate: no library row matches a typical HRF as well as Glover's
canonical shape does (the library's undershoot follows its peak by 10 s, measured ones by about
6 s), so where HRFs lie near the canonical, even the row nearest each voxel's true peak gave
betas slightly worse than the canonical HRF's, and the cross-validated choice among the library
alone cost 0.015 in correlation with the truth on the phantom. The choice is therefore among
:func:`hrf_candidates`, the library plus Glover's shape as row :data:`CANONICAL_CANDIDATE`, and
a voxel keeps the canonical shape unless a library row's lead over it is consistent over the runs
(:func:`choose_library_hrf`, :data:`CANONICAL_LEAD_Z`): a choice that is only noise costs more
than it gains.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from scipy.stats import gamma

from rtdecoder.errors import ConfigError, VolumeError
from rtdecoder.glm.design import (
    DEFAULT_OVERSAMPLING,
    TrialLike,
    drift_regressors,
    frame_times_s,
    trial_regressors,
)

logger = logging.getLogger(__name__)

DEFAULT_HRF_LENGTH_S = 32.0
HRF_LIBRARY_SIZE = 20
CANONICAL_HRFS = ("glover", "spm")
#: Rules of the per-voxel library choice (``glm.hrf_selection``); see :func:`library_scores`.
HRF_SELECTIONS = ("crossval", "onoff", "single_trial")
# Row of hrf_candidates that holds Glover's canonical shape (after the library's 20).
CANONICAL_CANDIDATE = 20
# How many standard errors (over runs) a library row's lead in the selection score must reach for a
# voxel to leave the canonical shape (a one-sided paired test over runs). Measured with crossval,
# betas' median correlation with the truth against the canonical HRF's, for z 1 / 2 / 2.5 / 3: on
# the phantom (6 runs) -0.006 / -0.001 / +0.001 / +0.001; on tests/test_hrf_selection.py's worlds
# (seeds 1-3), responses peaking at 6.3 s at least +0.010 / +0.003 / +0.002 / +0.002, and at 5.5 s
# at worst -0.003 / -0.0005 / -0.0005 / -0.0006. The library alone (no canonical row) gave -0.012
# on the phantom. 2.5 is the smallest with no loss on the phantom (docs/calibration.md).
CANONICAL_LEAD_Z = 2.5

# Library axes. Time to peak spans the range reported across cortex (about 3.5-7.5 s); the peak
# gamma's dispersion grows in proportion to latency (slower responses are also broader); the
# undershoot follows the peak by a fixed 10 s and cycles through four depths so that neighbouring
# latencies offer different undershoots.
_LIBRARY_PEAK_S = np.linspace(3.5, 7.5, HRF_LIBRARY_SIZE)
_LIBRARY_DISPERSION_PER_PEAK_S = 0.9 / 5.0
_LIBRARY_UNDERSHOOT_LAG_S = 10.0
_LIBRARY_UNDERSHOOT_RATIOS = (0.1, 0.25, 0.4, 0.55)

# The sampling parameters of the kernel builders below, written once; :func:`_with_sampling_doc`
# puts them where a docstring has a ``{sampling}`` line.
_SAMPLING_PARAMETERS_DOC = """\
tr_s : float
    Repetition time, s.
oversampling : int, default=50
    Samples per TR.
time_length_s : float, default=32.0
    Kernel length, s."""

_F = TypeVar("_F", bound=Callable[..., np.ndarray])


def _with_sampling_doc(function: _F) -> _F:
    """Replace the ``{sampling}`` line of ``function``'s docstring by :data:`_SAMPLING_PARAMETERS_DOC`."""
    # cleandoc first: the block is unindented, and Python 3.13+ dedents docstrings itself.
    # ``python -OO`` strips docstrings, hence the guard.
    if function.__doc__:
        function.__doc__ = inspect.cleandoc(function.__doc__).replace("{sampling}", _SAMPLING_PARAMETERS_DOC)
    return function


def gamma_difference_hrf(
    tr_s: float,
    oversampling: int = DEFAULT_OVERSAMPLING,
    time_length_s: float = DEFAULT_HRF_LENGTH_S,
    onset_s: float = 0.0,
    delay_s: float = 6.0,
    undershoot_s: float = 16.0,
    dispersion: float = 1.0,
    undershoot_dispersion: float = 1.0,
    ratio: float = 0.167,
) -> np.ndarray:
    """A double-gamma HRF (peak gamma minus a scaled undershoot gamma), sampled and normalised.

    Parameters
    ----------
    tr_s : float
        Repetition time, s.
    oversampling : int, default=50
        Samples per TR; the kernel's nominal step is ``tr_s / oversampling`` s.
    time_length_s : float, default=32.0
        Kernel length, s.
    onset_s : float, default=0.0
        Delay of the whole response, s.
    delay_s, undershoot_s : float
        Shape times scale of the peak and undershoot gammas, s (their means, before the one-sample
        shift both get).
    dispersion, undershoot_dispersion : float
        Scale parameters of the two gammas, s.
    ratio : float
        Undershoot amplitude relative to the peak's.

    Returns
    -------
    ndarray of shape (round(time_length_s * oversampling / tr_s),), float64
        The kernel; sums to 1.

    Examples
    --------
    >>> k = gamma_difference_hrf(2.0, oversampling=1, time_length_s=20.0)
    >>> k.shape, round(float(k.sum()), 6)
    ((10,), 1.0)
    """
    if tr_s <= 0 or oversampling < 1 or time_length_s <= 0:
        raise ConfigError(
            f"HRF sampling: expected tr_s > 0, oversampling >= 1 and time_length_s > 0 "
            f"(got {tr_s!r}, {oversampling!r}, {time_length_s!r})"
        )
    dt_s = tr_s / oversampling
    # The grid spans [0, time_length_s] inclusive with rint(length / dt) points, which makes the
    # step slightly longer than dt; nilearn samples the same way, and exact agreement needs it.
    times_s = np.linspace(0.0, time_length_s, int(np.rint(time_length_s / dt_s))) - onset_s
    peak = gamma.pdf(times_s, delay_s / dispersion, loc=dt_s, scale=dispersion)
    undershoot = gamma.pdf(
        times_s, undershoot_s / undershoot_dispersion, loc=dt_s, scale=undershoot_dispersion
    )
    kernel = peak - ratio * undershoot
    return kernel / kernel.sum()


@_with_sampling_doc
def glover_hrf(
    tr_s: float,
    oversampling: int = DEFAULT_OVERSAMPLING,
    time_length_s: float = DEFAULT_HRF_LENGTH_S,
    onset_s: float = 0.0,
) -> np.ndarray:
    """Glover's (1999) canonical HRF, as nilearn's ``glover_hrf``.

    Parameters
    ----------
    {sampling}
    onset_s : float, default=0.0
        Delay of the response, s.

    Returns
    -------
    ndarray of shape (n_samples,), float64
        Sums to 1.

    Examples
    --------
    >>> np.round(glover_hrf(2.0, oversampling=1, time_length_s=20.0), 3).tolist()[:5]
    [0.0, 0.0, 0.226, 0.741, 0.5]
    """
    return gamma_difference_hrf(
        tr_s, oversampling, time_length_s, onset_s, delay_s=6.0, undershoot_s=12.0,
        dispersion=0.9, undershoot_dispersion=0.9, ratio=0.48,
    )


@_with_sampling_doc
def spm_hrf(
    tr_s: float,
    oversampling: int = DEFAULT_OVERSAMPLING,
    time_length_s: float = DEFAULT_HRF_LENGTH_S,
    onset_s: float = 0.0,
) -> np.ndarray:
    """SPM's canonical HRF, as nilearn's ``spm_hrf``.

    Parameters
    ----------
    {sampling}
    onset_s : float, default=0.0
        Delay of the response, s.

    Returns
    -------
    ndarray of shape (n_samples,), float64
        Sums to 1.

    Examples
    --------
    >>> np.round(spm_hrf(2.0, oversampling=1, time_length_s=20.0), 3).tolist()[:5]
    [0.0, 0.0, 0.161, 0.443, 0.335]
    """
    return gamma_difference_hrf(tr_s, oversampling, time_length_s, onset_s)


@_with_sampling_doc
def canonical_hrf(
    name: str, tr_s: float, oversampling: int = DEFAULT_OVERSAMPLING,
    time_length_s: float = DEFAULT_HRF_LENGTH_S,
) -> np.ndarray:
    """The canonical kernel called ``name`` (``"glover"`` or ``"spm"``).

    Parameters
    ----------
    name : {"glover", "spm"}
        Which canonical shape.
    {sampling}

    Returns
    -------
    ndarray of shape (n_samples,), float64

    Examples
    --------
    >>> canonical_hrf("spm", 1.6).shape
    (1000,)
    """
    if name == "glover":
        return glover_hrf(tr_s, oversampling, time_length_s)
    if name == "spm":
        return spm_hrf(tr_s, oversampling, time_length_s)
    raise ConfigError(f"hrf: expected one of {', '.join(CANONICAL_HRFS)} (got {name!r})")


@_with_sampling_doc
def hrf_library(
    tr_s: float,
    oversampling: int = DEFAULT_OVERSAMPLING,
    time_length_s: float = DEFAULT_HRF_LENGTH_S,
) -> np.ndarray:
    """The 20-shape HRF library, ordered by time to peak.

    Parameters
    ----------
    {sampling}

    Returns
    -------
    ndarray of shape (20, n_samples), float64
        One kernel per row, each summing to 1. Row ``k`` peaks about ``3.5 + k * 4 / 19`` s after
        onset (see :func:`hrf_time_to_peak_s`).

    Examples
    --------
    >>> lib = hrf_library(1.6)
    >>> lib.shape
    (20, 1000)
    >>> bool(np.all(np.diff(hrf_time_to_peak_s(lib, 1.6)) > 0))
    True
    """
    rows = []
    for k, peak_s in enumerate(_LIBRARY_PEAK_S):
        dispersion = _LIBRARY_DISPERSION_PER_PEAK_S * peak_s
        undershoot_dispersion = 1.0
        undershoot_peak_s = peak_s + _LIBRARY_UNDERSHOOT_LAG_S
        rows.append(
            gamma_difference_hrf(
                tr_s, oversampling, time_length_s,
                # A gamma's mode is (shape - 1) * scale, i.e. delay - dispersion here.
                delay_s=peak_s + dispersion,
                undershoot_s=undershoot_peak_s + undershoot_dispersion,
                dispersion=dispersion,
                undershoot_dispersion=undershoot_dispersion,
                ratio=_LIBRARY_UNDERSHOOT_RATIOS[k % len(_LIBRARY_UNDERSHOOT_RATIOS)],
            )
        )
    return np.stack(rows)


@_with_sampling_doc
def hrf_candidates(
    tr_s: float,
    oversampling: int = DEFAULT_OVERSAMPLING,
    time_length_s: float = DEFAULT_HRF_LENGTH_S,
) -> np.ndarray:
    """The shapes a voxel's HRF is chosen from: the 20-shape library, then Glover's canonical HRF.

    A calibrated voxel's ``hrf_index`` is a row of this array (bundles made before the canonical
    row existed hold rows 0-19 only, which mean the same shapes here).

    Parameters
    ----------
    {sampling}

    Returns
    -------
    ndarray of shape (21, n_samples), float64
        Rows 0-19 are :func:`hrf_library`, row :data:`CANONICAL_CANDIDATE` is :func:`glover_hrf`.

    Examples
    --------
    >>> candidates = hrf_candidates(1.6)
    >>> candidates.shape
    (21, 1000)
    >>> bool(np.array_equal(candidates[CANONICAL_CANDIDATE], glover_hrf(1.6)))
    True
    """
    return np.vstack([hrf_library(tr_s, oversampling, time_length_s),
                      glover_hrf(tr_s, oversampling, time_length_s)[None, :]])


def hrf_time_to_peak_s(kernels: np.ndarray, tr_s: float, oversampling: int = DEFAULT_OVERSAMPLING) -> np.ndarray:
    """Time from onset to the maximum of each kernel, s.

    Parameters
    ----------
    kernels : ndarray of shape (n_samples,) or (n_kernels, n_samples)
        Kernels sampled every ``tr_s / oversampling`` s.
    tr_s : float
        Repetition time, s.
    oversampling : int, default=50
        Samples per TR.

    Returns
    -------
    ndarray of shape () or (n_kernels,), float64
        Seconds.

    Examples
    --------
    >>> round(float(hrf_time_to_peak_s(glover_hrf(1.6), 1.6)), 1)
    5.0
    """
    return np.argmax(kernels, axis=-1) * (tr_s / oversampling)


def library_r2(
    data: np.ndarray,
    trials: Sequence[TrialLike],
    tr_s: float,
    slice_time_ref_s: float = 0.0,
    motion_params: np.ndarray | None = None,
    drift_model: str = "polynomial",
    drift_order: int = 2,
    high_pass_hz: float = 0.01,
    kernels: np.ndarray | None = None,
    oversampling: int = DEFAULT_OVERSAMPLING,
) -> np.ndarray:
    """R^2 of a single-trial (LSA) fit of each voxel with each library HRF.

    The model is one regressor per trial convolved with the kernel, plus the motion parameters and
    the drift, fitted by ordinary least squares. R^2 is ``1 - RSS / TSS`` with TSS about the
    voxel's mean, so only the trial regressors distinguish the shapes. This is the
    ``"single_trial"`` score of :func:`library_scores`, which overfits (see the module's notes).

    Parameters
    ----------
    data : ndarray of shape (n_volumes, n_voxels)
        One run's time series.
    trials : sequence of TrialLike
        The run's trials (``onset_s`` from the first volume, ``duration_s``).
    tr_s : float
        Repetition time, s.
    slice_time_ref_s : float, default=0.0
        Time within the TR that a volume's sample stands for, s.
    motion_params : ndarray of shape (n_volumes, 6) or None
        Motion confounds; None fits without them.
    drift_model : {"polynomial", "cosine"}, default="polynomial"
        The drift basis.
    drift_order : int, default=2
        Polynomial degree.
    high_pass_hz : float, default=0.01
        Cosine cut-off, Hz.
    kernels : ndarray of shape (n_kernels, n_samples) or None
        Shapes to compare; default :func:`hrf_library`.
    oversampling : int, default=50
        Samples per TR of the kernels.

    Returns
    -------
    ndarray of shape (n_kernels, n_voxels), float64

    Examples
    --------
    >>> from rtdecoder.glm.events import Trial
    >>> rng = np.random.default_rng(0)
    >>> trials = [Trial(f"t{i}", 6.0 + 8.0 * i, 3.0) for i in range(6)]
    >>> library_r2(rng.normal(size=(40, 3)), trials, 1.6).shape
    (20, 3)
    """
    data = _as_series(data, "library_r2")
    n_volumes = data.shape[0]
    if kernels is None:
        kernels = hrf_library(tr_s, oversampling)
    times_s, nuisance_matrix = _confounds(
        n_volumes, tr_s, slice_time_ref_s, motion_params, drift_model, drift_order, high_pass_hz, "library_r2"
    )
    centred = data - data.mean(axis=0)
    tss = np.einsum("tv,tv->v", centred, centred)
    r2 = np.empty((len(kernels), data.shape[1]))
    for k, kernel in enumerate(kernels):
        design = np.hstack([trial_regressors(trials, times_s, kernel, oversampling), nuisance_matrix])
        if design.shape[1] >= n_volumes:
            raise VolumeError(
                f"library_r2: data: {n_volumes} volumes cannot fit {design.shape[1]} regressors"
            )
        # Residuals via an orthonormal basis of the design: RSS = |y|^2 - |Q'y|^2 is unstable when
        # the fit is near-perfect, so project explicitly.
        q = _column_basis(design)
        residual = data - q @ (q.T @ data)
        rss = np.einsum("tv,tv->v", residual, residual)
        r2[k] = 1.0 - rss / np.where(tss > 0, tss, np.inf)
    return r2


@dataclass(frozen=True)
class HRFRun:
    """One run as the HRF choice reads it.

    Attributes
    ----------
    data : ndarray of shape (n_volumes, n_voxels)
        The run's time series, every scheduled volume (interpolate missing ones first).
    trials : sequence of TrialLike
        The run's trials (``onset_s`` from the first volume, ``duration_s``, s).
    motion_params : ndarray of shape (n_volumes, 6) or None
        Motion confounds; None fits without them.
    slice_time_ref_s : float
        Time within the TR that a volume's sample stands for, s.
    """

    data: np.ndarray
    trials: Sequence[TrialLike]
    motion_params: np.ndarray | None = None
    slice_time_ref_s: float = 0.0


def library_scores(
    runs: Sequence[HRFRun],
    tr_s: float,
    selection: str = "crossval",
    drift_model: str = "polynomial",
    drift_order: int = 2,
    high_pass_hz: float = 0.01,
    kernels: np.ndarray | None = None,
    oversampling: int = DEFAULT_OVERSAMPLING,
    per_run: bool = False,
) -> np.ndarray:
    """How well each library HRF describes each voxel over a session's runs; higher is better.

    Every rule fits each run with its own drift and motion confounds. With ``x`` a run's task
    regressor and ``y`` a voxel's series, both with the confounds projected out (Frisch-Waugh-
    Lovell, so the confounds are fitted as in the full model), and TSS the series' sum of squares
    about its mean:

    - ``"onoff"``: ``x`` is the sum of the run's trial regressors (every trial the same
      condition); the run's R^2 is ``1 - (y'y - (x'y)^2 / x'x) / TSS``.
    - ``"crossval"``: the same ``x``; the amplitude ``a = sum(x'y) / sum(x'x)`` is fitted on the
      other runs, and the held-out run scores ``1 - |y - a x|^2 / TSS``.
    - ``"single_trial"``: one regressor per trial (:func:`library_r2`).

    The score is the mean over runs (an R^2, possibly negative for ``"crossval"``), or with
    ``per_run`` each run's term (for ``"crossval"``, run ``r``'s held-out R^2).

    Parameters
    ----------
    runs : sequence of HRFRun
        The session's runs, with the same voxels.
    tr_s : float
        Repetition time, s.
    selection : {"crossval", "onoff", "single_trial"}, default="crossval"
        The rule; ``"crossval"`` needs two or more runs.
    drift_model, drift_order, high_pass_hz
        The drift basis, as in :func:`library_r2`.
    kernels : ndarray of shape (n_kernels, n_samples) or None
        Shapes to compare; default :func:`hrf_library`.
    oversampling : int, default=50
        Samples per TR of the kernels.
    per_run : bool, default=False
        Return each run's scores instead of their mean.

    Returns
    -------
    ndarray of shape (n_kernels, n_voxels), float64, or (n_runs, n_kernels, n_voxels) with ``per_run``
        A voxel with a constant series scores the same for every shape (so it gets row 0).

    Raises
    ------
    ConfigError
        For an unknown ``selection``, no runs, or ``"crossval"`` with one run.
    VolumeError
        If a run's arrays do not match, or it has too few volumes for its regressors.

    Examples
    --------
    >>> from rtdecoder.glm.events import Trial
    >>> trials = [Trial(f"t{i}", 6.0 + 8.0 * i, 3.0) for i in range(6)]
    >>> late = trial_regressors(trials, frame_times_s(40, 1.6), hrf_library(1.6)[15]).sum(axis=1)
    >>> runs = [HRFRun(late[:, None] + 1.0, trials), HRFRun(2.0 * late[:, None] + 5.0, trials)]
    >>> scores = library_scores(runs, 1.6, "crossval")
    >>> scores.shape, int(scores.argmax())
    ((20, 1), 15)
    """
    if selection not in HRF_SELECTIONS:
        raise ConfigError(f"hrf_selection: expected one of {', '.join(HRF_SELECTIONS)} (got {selection!r})")
    if not runs:
        raise ConfigError("hrf_selection: expected at least one run (got none)")
    if selection == "crossval" and len(runs) < 2:
        raise ConfigError(
            f"hrf_selection: crossval holds out one run at a time and needs two or more runs (got {len(runs)}); "
            "use onoff"
        )
    if kernels is None:
        kernels = hrf_library(tr_s, oversampling)
    if selection == "single_trial":
        scores = [
            library_r2(
                run.data, run.trials, tr_s, run.slice_time_ref_s, run.motion_params, drift_model, drift_order,
                high_pass_hz, kernels, oversampling,
            )
            for run in runs
        ]
        return np.stack(scores) if per_run else np.mean(scores, axis=0)
    stats = [
        _onoff_statistics(run, tr_s, drift_model, drift_order, high_pass_hz, kernels, oversampling) for run in runs
    ]
    if selection == "onoff":
        scores = [
            1.0 - (syy - np.divide(sxy**2, sxx[:, None], out=np.zeros_like(sxy), where=sxx[:, None] > 0)) / tss
            for sxy, sxx, syy, tss in stats
        ]
        return np.stack(scores) if per_run else np.mean(scores, axis=0)
    # Leave one run out: the amplitude pooled over the other runs predicts the held-out run.
    total_xy = sum(sxy for sxy, _, _, _ in stats)
    total_xx = sum(sxx for _, sxx, _, _ in stats)
    scores = []
    for sxy, sxx, syy, tss in stats:
        rest_xx = (total_xx - sxx)[:, None]
        amplitude = np.divide(total_xy - sxy, rest_xx, out=np.zeros_like(sxy), where=rest_xx > 0)
        press = syy - 2.0 * amplitude * sxy + amplitude**2 * sxx[:, None]
        scores.append(1.0 - press / tss)
    return np.stack(scores) if per_run else np.mean(scores, axis=0)


def choose_library_hrf(
    runs: Sequence[HRFRun],
    tr_s: float,
    selection: str = "crossval",
    drift_model: str = "polynomial",
    drift_order: int = 2,
    high_pass_hz: float = 0.01,
    kernels: np.ndarray | None = None,
    oversampling: int = DEFAULT_OVERSAMPLING,
    canonical_lead_z: float | None = None,
) -> np.ndarray:
    """The HRF per voxel over a session's runs: the canonical shape unless a library row clearly beats it.

    With the default ``kernels`` the shapes are :func:`hrf_candidates`. The best library row (by
    the mean of :func:`library_scores` over runs) replaces the canonical shape only where its lead in
    each run's score is consistent: the mean lead exceeds ``canonical_lead_z`` standard errors of
    the per-run leads (a one-sided paired test over runs). With one run there is nothing to test
    the lead against, and the best of all candidates is taken. With ``kernels`` given, the plain
    argmax of :func:`library_scores` over them.

    Parameters
    ----------
    runs : sequence of HRFRun
        The session's runs.
    tr_s : float
        Repetition time, s.
    selection : {"crossval", "onoff", "single_trial"}, default="crossval"
        The rule (see :func:`library_scores`).
    drift_model, drift_order, high_pass_hz, kernels, oversampling
        As in :func:`library_scores`.
    canonical_lead_z : float or None
        Standard errors of lead a library row needs; default :data:`CANONICAL_LEAD_Z`. Only with
        the default ``kernels``.

    Returns
    -------
    ndarray of shape (n_voxels,), int64
        Row indices into the candidates (:data:`CANONICAL_CANDIDATE` for the canonical shape) or
        into ``kernels``; ties go to the lower row.

    Examples
    --------
    >>> from rtdecoder.glm.events import Trial
    >>> trials = [Trial(f"t{i}", 6.0 + 8.0 * i, 3.0) for i in range(6)]
    >>> times_s = frame_times_s(40, 1.6)
    >>> late = trial_regressors(trials, times_s, hrf_library(1.6)[15]).sum(axis=1)
    >>> usual = trial_regressors(trials, times_s, glover_hrf(1.6)).sum(axis=1)
    >>> noise = np.random.default_rng(0).normal(scale=0.05, size=(3, 40, 1))
    >>> runs = [HRFRun(np.hstack([late[:, None], usual[:, None]]) + n, trials) for n in noise]
    >>> choose_library_hrf(runs, 1.6).tolist()
    [15, 20]
    """
    if kernels is not None:
        if canonical_lead_z is not None:
            raise ConfigError("canonical_lead_z: only with the default candidates (kernels=None)")
        scores = library_scores(runs, tr_s, selection, drift_model, drift_order, high_pass_hz, kernels, oversampling)
        return np.argmax(scores, axis=0)
    z = CANONICAL_LEAD_Z if canonical_lead_z is None else float(canonical_lead_z)
    per_run = library_scores(
        runs, tr_s, selection, drift_model, drift_order, high_pass_hz, hrf_candidates(tr_s, oversampling),
        oversampling, per_run=True,
    )  # (n_runs, 21, n_voxels)
    if len(runs) < 2:
        return np.argmax(per_run[0], axis=0)
    library = per_run.mean(axis=0)[:CANONICAL_CANDIDATE]
    best = np.argmax(library, axis=0)
    lead = per_run[:, best, np.arange(best.size)] - per_run[:, CANONICAL_CANDIDATE]  # (n_runs, n_voxels)
    standard_error = lead.std(axis=0, ddof=1) / np.sqrt(len(runs))
    return np.where(lead.mean(axis=0) > z * standard_error, best, CANONICAL_CANDIDATE)


def choose_hrf_per_voxel(
    data: np.ndarray,
    trials: Sequence[TrialLike],
    tr_s: float,
    slice_time_ref_s: float = 0.0,
    motion_params: np.ndarray | None = None,
    drift_model: str = "polynomial",
    drift_order: int = 2,
    high_pass_hz: float = 0.01,
    kernels: np.ndarray | None = None,
    oversampling: int = DEFAULT_OVERSAMPLING,
    selection: str = "single_trial",
) -> np.ndarray:
    """Index of the best library HRF per voxel in one run.

    The default rule is the single-trial R^2 this function has always used; it recovers a
    library shape exactly from noise-free data, but overfits noisy data (see the module's notes).
    Calibration chooses with :func:`choose_library_hrf` over all its runs, by
    ``glm.hrf_selection`` (default ``"crossval"``).

    Parameters
    ----------
    data : ndarray of shape (n_volumes, n_voxels)
        One run's time series.
    trials : sequence of TrialLike
        The run's trials.
    tr_s : float
        Repetition time, s.
    slice_time_ref_s, motion_params, drift_model, drift_order, high_pass_hz, kernels, oversampling
        As in :func:`library_r2`.
    selection : {"single_trial", "onoff"}, default="single_trial"
        The rule (see :func:`library_scores`).

    Returns
    -------
    ndarray of shape (n_voxels,), int64
        Row indices into the library.

    Examples
    --------
    >>> from rtdecoder.glm.events import Trial
    >>> trials = [Trial(f"t{i}", 6.0 + 8.0 * i, 3.0) for i in range(6)]
    >>> times_s = frame_times_s(40, 1.6)
    >>> slow = trial_regressors(trials, times_s, hrf_library(1.6)[18]).sum(axis=1)
    >>> int(choose_hrf_per_voxel(slow[:, None] + 1.0, trials, 1.6)[0])
    18
    """
    run = HRFRun(data, trials, motion_params, slice_time_ref_s)
    return choose_library_hrf([run], tr_s, selection, drift_model, drift_order, high_pass_hz, kernels, oversampling)


def _as_series(data: np.ndarray, where: str) -> np.ndarray:
    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 2:
        raise VolumeError(f"{where}: data: expected shape (n_volumes, n_voxels) (got {data.shape})")
    return data


def _confounds(
    n_volumes: int, tr_s: float, slice_time_ref_s: float, motion_params: np.ndarray | None, drift_model: str,
    drift_order: int, high_pass_hz: float, where: str,
) -> tuple[np.ndarray, np.ndarray]:
    """A run's frame times (n_volumes,) s and confound columns (n_volumes, n_confounds): motion, then drift."""
    times_s = frame_times_s(n_volumes, tr_s, slice_time_ref_s)
    nuisance = [drift_regressors(times_s, drift_model, drift_order, high_pass_hz)]
    if motion_params is not None:
        motion_params = np.asarray(motion_params, dtype=np.float64)
        if motion_params.shape != (n_volumes, 6):
            raise VolumeError(
                f"{where}: motion_params: expected shape ({n_volumes}, 6) (got {motion_params.shape})"
            )
        nuisance.insert(0, motion_params)
    return times_s, np.hstack(nuisance)


def _column_basis(columns: np.ndarray) -> np.ndarray:
    """An orthonormal basis (n_rows, rank) of the span of ``columns``.

    QR, unless a column depends on the others: QR then returns an arbitrary unit vector for it
    (an all-zero motion column of a session without motion correction, say), and projecting that
    out would remove a direction the design does not hold, so such designs go through an SVD.
    (Not the SVD always: it is several times slower, and far slower on a loaded machine.)
    """
    q, r = np.linalg.qr(columns)
    diagonal = np.abs(np.diag(r))
    tolerance = max(columns.shape) * np.finfo(np.float64).eps
    if diagonal.size == 0 or diagonal.min() > tolerance * diagonal.max():
        return q
    u, s, _ = np.linalg.svd(columns, full_matrices=False)
    return u[:, s > tolerance * s.max(initial=0.0)]


def _onoff_statistics(
    run: HRFRun, tr_s: float, drift_model: str, drift_order: int, high_pass_hz: float, kernels: np.ndarray,
    oversampling: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One run's ON-OFF sufficient statistics, confounds projected out of regressor and data.

    Returns ``(xy, xx, yy, tss)``: ``x'y`` (n_kernels, n_voxels), ``x'x`` (n_kernels,), ``y'y``
    (n_voxels,) and the sum of squares about the mean (n_voxels,; ``inf`` where it is 0, so that
    such voxels score the same for every shape).
    """
    data = _as_series(run.data, "hrf_selection")
    n_volumes = data.shape[0]
    times_s, nuisance = _confounds(
        n_volumes, tr_s, run.slice_time_ref_s, run.motion_params, drift_model, drift_order, high_pass_hz,
        "hrf_selection",
    )
    if nuisance.shape[1] + 1 >= n_volumes:
        raise VolumeError(f"hrf_selection: data: {n_volumes} volumes cannot fit {nuisance.shape[1] + 1} regressors")
    # Every trial the same condition: the ON-OFF regressor is the sum of the trial regressors.
    onoff = np.stack(
        [trial_regressors(run.trials, times_s, kernel, oversampling).sum(axis=1) for kernel in kernels], axis=1
    )  # (n_volumes, n_kernels)
    q = _column_basis(nuisance)
    x = onoff - q @ (q.T @ onoff)
    y = data - q @ (q.T @ data)
    centred = data - data.mean(axis=0)
    tss = np.einsum("tv,tv->v", centred, centred)
    return x.T @ y, np.einsum("tk,tk->k", x, x), np.einsum("tv,tv->v", y, y), np.where(tss > 0, tss, np.inf)
