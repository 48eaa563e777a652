"""Single-trial betas (LSS or LSA) updated volume by volume from sufficient statistics.

The estimator never refits the run. Each volume adds one row ``x_t`` of the design and one row
``y_t`` (V,) of data to running sums, and betas are solved from the sums when they are asked for.
The sums are, per HRF group ``g`` (voxels sharing a library HRF; one group for a canonical HRF),
with ``X_g`` the trial columns, ``N`` the nuisance columns (motion, then any extra confounds given
with each volume, such as GLMdenoise's noise regressors, then drift) and ``Y`` the data::

    G_g = X_g' X_g   (n_trials, n_trials)      B_g = X_g' Y_g   (n_trials, V_g)
    C_g = X_g' N     (n_trials, n_nuisance)    NY  = N' Y       (n_nuisance, V)
    NN  = N' N       (n_nuisance, n_nuisance)  s_g = (X_g 1)' Y_g (V_g,)

A volume touches only the trials whose regressor is non-zero at its time (a dozen or so: a trial's
regressor lasts its duration plus the 32 s HRF), so an update costs O(V * (k + n_nuisance)) with
``k`` such trials. Memory is fixed at :meth:`IncrementalGLM.start`: O(V * (n_trials +
n_nuisance)) for the sums plus the run's design columns (O(n_volumes * n_trials) per HRF group).
No raw time series is kept.

LSA (all trials in one model) solves the model of the trials started so far: trials whose columns
are still all zero are left out, which is the same model with ``p`` growing, and is why the sums
can be allocated for every trial at the start. LSS for trial ``j`` uses ``[x_j, o_j, N]`` with
``o_j`` the sum of the other trials' columns; all its cross products are sums of entries of the
same statistics (``o_j' o_j = 1'G1 - 2 (G1)_j + G_jj``, ``o_j' Y = s - B_j``, ...), so LSS needs
nothing more than LSA.

Exactness
---------
The drift columns and the trial regressors depend on the whole run's frame times, which the
schedule gives in advance (``n_volumes``), so every row is final when its volume arrives. The
betas at any moment are therefore *exactly* (to rounding) the OLS betas of the whole-run design
restricted to the rows received so far; after the last volume, they equal nilearn's
``FirstLevelModel`` (same HRF, drift, motion confounds, ``noise_model="ols"``, no scaling) on the
same data. A volume marked missing is a dropped row, which nilearn expresses with
``sample_masks`` (the design is still built on the whole run's frame times).

Not equal to an offline fit:

- A fit of a *truncated* run (nilearn given only the volumes so far) builds its design from the
  truncated frame times: the cosine basis changes with the run length, and nilearn's fine grid for
  the trial regressors can shift by a fraction of a sample. A polynomial drift spans the same space
  whatever the run length, so with it only the trial-regressor grid differs.
- Columns that are entirely zero so far (trials not started, motion never non-zero, an LSS "other
  trials" column before a second trial starts) are dropped rather than regularised; nilearn
  regularises a design whose condition number exceeds 1e15 instead. Designs that are rank
  deficient in any other way report the trial as not estimable (NaN).
- Only the OLS noise model: nilearn's AR(1) prewhitening needs the residuals' autocorrelation and
  then a second pass over the data, which would mean keeping the raw time series.

Live contrasts (``live_level``)
------------------------------
In a fast event-related design the trials' regressors sum to an almost constant plateau, so an
LSS model's trial column ``x_j`` and "other trials" column ``o_j`` are nearly collinear with the
intercept: the difference ``b_j - b_others`` is well determined, but the common level is fixed
only by the rest at the run's start and, at the end, by the lead-out. Until the lead-out arrives
every live beta of the run carries the same per-voxel level error (on a phantom development
subject the live betas' errors against their final betas were 0.6-0.8 correlated with the other
trials' errors at the same volume). With ``live_level`` (per voxel, data units: the calibration's
mean beta) first releases and refinements are ``b_j - b_others + live_level`` instead: the
contrast, referenced to the level calibration measured. Final betas are plain LSS either way, as
calibration fits them.

Speed
-----
At NSD size (15,000 voxels, 62 trials) an update with its releases is about a millisecond of small
matrix products (``bench/bench_glm.py``). Multi-threaded BLAS does not help at that size and, on a
busy 2-core machine, makes it an order of magnitude slower; callers on the real-time path should
limit BLAS to one thread (for example with ``threadpoolctl.threadpool_limits(1, "blas")``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from rtdecoder.errors import ConfigError, OrderError, VolumeError
from rtdecoder.glm.design import (
    DEFAULT_OVERSAMPLING,
    DRIFT_MODELS,
    N_MOTION_PARAMS,
    TrialLike,
    drift_regressors,
    frame_times_s,
    slice_time_ref_from,
    trial_regressors,
)
from rtdecoder.glm.hrf import CANONICAL_CANDIDATE, DEFAULT_HRF_LENGTH_S, canonical_hrf, hrf_candidates

if TYPE_CHECKING:
    from rtdecoder.config import GLMConfig

logger = logging.getLogger(__name__)

METHODS = ("lss", "lsa")
HRF_CHOICES = ("canonical", "glover", "spm", "library")
# A model is estimable when, after scaling its normal matrix to a unit diagonal, the smallest
# eigenvalue (LSS) or squared Cholesky pivot (LSA) exceeds this: no column is explained by the
# others with an uncentred R^2 above 1 - 1e-10. Below it the betas are rounding noise.
_RANK_TOLERANCE = 1e-10


@dataclass(frozen=True)
class TrialBeta:
    """One trial's single-trial beta map, as released by :class:`IncrementalGLM`.

    Attributes
    ----------
    trial_id : str
        The trial's id from the schedule.
    trial_index : int
        Its position in the ``trials`` given to the estimator.
    beta : ndarray of shape (n_voxels,), float32
        Response amplitude per voxel, in data units per unit regressor.
    tr_index : int
        The latest volume (0-based) when it was computed (-1 at a finish with no volumes).
    n_volumes_used : int
        Volumes in the model then (missing ones excluded).
    is_update : bool
        True when this trial was released before and this is a refinement with more volumes.
    is_final : bool
        True for the values at the end of the run (:meth:`IncrementalGLM.finish`).
    onset_s : float
        The trial's onset, s from the start of the run's first volume.
    volume_time_s : float
        Frame time of ``tr_index``, s from the start of the run's first volume.
    """

    trial_id: str
    trial_index: int
    beta: np.ndarray
    tr_index: int
    n_volumes_used: int
    is_update: bool
    is_final: bool
    onset_s: float
    volume_time_s: float


class IncrementalGLM:
    """Single-trial GLM of one run, updated one volume at a time.

    Parameters
    ----------
    trials : sequence of TrialLike
        The run's trials (``trial_id``, ``onset_s`` from the start of the first volume,
        ``duration_s``); ids must be unique.
    tr_s : float
        Repetition time, s.
    n_volumes : int
        Volumes scheduled in the run; the design is built for all of them.
    slice_time_ref_s : float, default=0.0
        Time within the TR that a volume's sample stands for, s.
    method : {"lss", "lsa"}, default="lss"
        Least-squares-separate (one model per trial) or least-squares-all.
    hrf : {"canonical", "glover", "spm", "library"}, default="canonical"
        HRF of the trial regressors; "canonical" is Glover's. "library" needs ``hrf_per_voxel``.
    hrf_per_voxel : ndarray of shape (n_voxels,) of int, optional
        Row of ``hrf_library`` per voxel (calibration's choice, :func:`rtdecoder.glm.hrf.choose_library_hrf`).
    hrf_library : ndarray of shape (n_shapes, n_samples), optional
        Kernels sampled every ``tr_s / oversampling`` s; default
        :func:`rtdecoder.glm.hrf.hrf_candidates` (the library, then the canonical shape).
    drift_model : {"polynomial", "cosine"}, default="polynomial"
        Drift basis over the run.
    drift_order : int, default=2
        Polynomial degree.
    high_pass_hz : float, default=0.01
        Cosine cut-off, Hz.
    motion_confounds : bool, default=True
        Add the six motion parameters of each volume as confounds.
    n_confounds : int, default=0
        Extra nuisance columns whose values come with each volume (``confounds`` of :meth:`update`),
        e.g. the noise regressors of :class:`rtdecoder.glm.denoise.NoiseComponents`.
    beta_wait_s : float, default=8.0
        A trial's beta is released once the latest volume's frame time is this long after onset.
    publish_refinements : bool, default=True
        After release, publish a refined beta at every volume during which the trial's regressor
        is still non-zero (``is_update=True``).
    min_residual_dof : int, default=0
        A due trial's first beta also waits until the volumes used exceed its model's columns
        (trial, other trials or every started trial for LSA, drift, motion, extra confounds) by
        this many. Just estimable, the first betas of a run carry most of the noise the confounds
        could not absorb; refinements and final betas are not held back.
    oversampling : int, default=50
        Samples per TR of the fine grid the regressors are convolved on.

    Examples
    --------
    >>> from rtdecoder.glm.events import Trial
    >>> rng = np.random.default_rng(0)
    >>> trials = [Trial(f"t{i}", 4.0 + 6.0 * i, 3.0) for i in range(5)]
    >>> glm = IncrementalGLM(trials, 2.0, 30, motion_confounds=False).start(n_voxels=4)
    >>> released = []
    >>> for i in range(30):
    ...     released += glm.update(i, rng.normal(size=4))
    >>> [(b.trial_id, b.tr_index) for b in released if not b.is_update][:2]
    [('t0', 6), ('t1', 9)]
    >>> glm.get_betas().shape
    (5, 4)
    """

    def __init__(
        self,
        trials: Sequence[TrialLike],
        tr_s: float,
        n_volumes: int,
        slice_time_ref_s: float = 0.0,
        method: str = "lss",
        hrf: str = "canonical",
        hrf_per_voxel: np.ndarray | None = None,
        hrf_library: np.ndarray | None = None,
        drift_model: str = "polynomial",
        drift_order: int = 2,
        high_pass_hz: float = 0.01,
        motion_confounds: bool = True,
        beta_wait_s: float = 8.0,
        publish_refinements: bool = True,
        oversampling: int = DEFAULT_OVERSAMPLING,
        n_confounds: int = 0,
        min_residual_dof: int = 0,
        live_level: np.ndarray | None = None,
    ) -> None:
        self.trials = trials
        self.tr_s = tr_s
        self.n_volumes = n_volumes
        self.slice_time_ref_s = slice_time_ref_s
        self.method = method
        self.hrf = hrf
        self.hrf_per_voxel = hrf_per_voxel
        self.hrf_library = hrf_library
        self.drift_model = drift_model
        self.drift_order = drift_order
        self.high_pass_hz = high_pass_hz
        self.motion_confounds = motion_confounds
        self.beta_wait_s = beta_wait_s
        self.publish_refinements = publish_refinements
        self.oversampling = oversampling
        self.n_confounds = n_confounds
        self.min_residual_dof = min_residual_dof
        self.live_level = live_level
        self.n_voxels_: int | None = None

    @classmethod
    def from_config(
        cls,
        config: GLMConfig,
        trials: Sequence[TrialLike],
        tr_s: float,
        n_volumes: int,
        slice_time_ref_s: float | None = None,
        hrf_per_voxel: np.ndarray | None = None,
        hrf_library: np.ndarray | None = None,
        slice_times_s: np.ndarray | None = None,
        n_confounds: int = 0,
        live_level: np.ndarray | None = None,
    ) -> IncrementalGLM:
        """An estimator with the settings of a ``glm:`` config section.

        Parameters
        ----------
        config : GLMConfig
            The section (method, hrf, drift, motion, release settings, ``slice_time_ref_s``).
        trials, tr_s, n_volumes, hrf_per_voxel, hrf_library
            As in :class:`IncrementalGLM`.
        slice_time_ref_s : float, optional
            Time within the TR that a volume's sample stands for, s, when already resolved (as
            calibration stores it). Default: ``config.slice_time_ref_s`` resolved with
            ``slice_times_s`` by :func:`~rtdecoder.glm.design.slice_time_ref_from`.
        slice_times_s : ndarray of shape (nz,), optional
            The run's first volume's slice acquisition times, s from the volume's start
            (``Volume.slice_times_s``), for ``config.slice_time_ref_s = "auto"``; without them
            ``"auto"`` is 0. Not with ``slice_time_ref_s``.
        n_confounds : int, default=0
            Extra nuisance columns given with each volume (GLMdenoise's noise regressors: the
            bundle's ``glmdenoise.n_components``).
        live_level : ndarray of shape (n_voxels,), optional
            With ``config.live_contrast``: the level live betas are referenced to (the bundle's
            ``beta_mean``; see the module notes). Ignored when ``live_contrast`` is off.

        Returns
        -------
        IncrementalGLM
            Not started.

        Raises
        ------
        ConfigError
            If both ``slice_time_ref_s`` and ``slice_times_s`` are given, or the reference is not
            within the TR.

        Examples
        --------
        >>> from rtdecoder.config import GLMConfig
        >>> from rtdecoder.glm.events import Trial
        >>> IncrementalGLM.from_config(GLMConfig(), [Trial("a", 4.0, 3.0)], 1.6, 20).method
        'lss'
        >>> IncrementalGLM.from_config(GLMConfig(), [Trial("a", 4.0, 3.0)], 1.6, 20,
        ...                            slice_times_s=np.array([0.0, 1.0, 0.5, 1.5])).slice_time_ref_s
        0.75
        """
        if slice_time_ref_s is None:
            slice_time_ref_s = slice_time_ref_from(config.slice_time_ref_s, slice_times_s, tr_s)
        elif slice_times_s is not None:
            raise ConfigError(
                "from_config: slice_time_ref_s and slice_times_s: expected one of them (a resolved reference, "
                "or the slice times glm.slice_time_ref_s is resolved with), not both"
            )
        return cls(
            trials, tr_s, n_volumes, slice_time_ref_s=slice_time_ref_s, method=config.method,
            hrf=config.hrf, hrf_per_voxel=hrf_per_voxel, hrf_library=hrf_library,
            drift_model=config.drift_model, drift_order=config.drift_order,
            high_pass_hz=config.high_pass_hz, motion_confounds=config.motion_confounds,
            beta_wait_s=config.beta_wait_s, publish_refinements=config.publish_refinements,
            n_confounds=n_confounds, min_residual_dof=config.min_residual_dof,
            live_level=live_level if config.live_contrast else None,
        )

    # ------------------------------------------------------------------ set-up

    def start(self, n_voxels: int) -> IncrementalGLM:
        """Check the settings, build the run's design and allocate the statistics.

        Parameters
        ----------
        n_voxels : int
            Length of every ``values`` vector passed to :meth:`update`.

        Returns
        -------
        IncrementalGLM
            ``self``.
        """
        self._check_settings(n_voxels)
        self.n_voxels_ = int(n_voxels)
        self.trial_ids_ = [str(t.trial_id) for t in self.trials]
        self.onsets_s_ = np.array([float(t.onset_s) for t in self.trials])
        self.frame_times_s_ = frame_times_s(self.n_volumes, self.tr_s, self.slice_time_ref_s)

        kernels, group_of_voxel = self._kernels_and_groups()
        # Voxels are stored sorted by HRF group, so each group's statistics are a column slice.
        self.voxel_order_ = np.argsort(group_of_voxel, kind="stable")
        bounds = np.searchsorted(group_of_voxel[self.voxel_order_], np.arange(len(kernels) + 1))
        self.group_slices_ = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        self.group_sizes_ = np.diff(bounds)
        # (n_groups, n_volumes, n_trials)
        self.trial_columns_ = np.stack(
            [trial_regressors(self.trials, self.frame_times_s_, k, self.oversampling) for k in kernels]
        )
        self.drift_ = drift_regressors(
            self.frame_times_s_, self.drift_model, self.drift_order, self.high_pass_hz
        )
        # live_[t, j]: trial j's regressor is non-zero at volume t in some group's design.
        self.live_ = np.any(self.trial_columns_ != 0.0, axis=0)  # (n_volumes, n_trials)
        self.row_ranges_ = []
        for row in self.live_:
            hits = np.flatnonzero(row)
            self.row_ranges_.append((int(hits[0]), int(hits[-1]) + 1) if hits.size else (0, 0))
        n_motion = N_MOTION_PARAMS if self.motion_confounds else 0
        self.n_nuisance_ = n_motion + int(self.n_confounds) + self.drift_.shape[1]
        logger.info(
            "GLM started: %s, %d trials, %d volumes, %d voxels in %d HRF group(s), %d nuisance columns",
            self.method, len(self.trial_ids_), self.n_volumes, self.n_voxels_, len(kernels),
            self.n_nuisance_,
        )
        self.reset()
        return self

    def reset(self) -> None:
        """Forget all volumes and releases; the design and voxel count stay (same run again)."""
        self._require_started("reset")
        n_groups, n_trials = len(self.group_slices_), len(self.trial_ids_)
        n_nuisance, n_voxels = self.n_nuisance_, self.n_voxels_
        self.gram_ = np.zeros((n_groups, n_trials, n_trials))
        self.cross_ = np.zeros((n_groups, n_trials, n_nuisance))
        self.nuisance_gram_ = np.zeros((n_nuisance, n_nuisance))
        self.trial_data_ = np.zeros((n_trials, n_voxels))
        self.nuisance_data_ = np.zeros((n_nuisance, n_voxels))
        self.total_data_ = np.zeros(n_voxels)
        self.seen_ = np.zeros(self.n_volumes, dtype=bool)
        self.missing_ = np.zeros(self.n_volumes, dtype=bool)
        self.released_ = np.zeros(n_trials, dtype=bool)
        self.n_volumes_used_ = 0
        self.latest_tr_index_ = -1
        self.finished_ = False

    # ------------------------------------------------------------------ streaming

    def update(
        self,
        tr_index: int,
        values: np.ndarray,
        motion_params: np.ndarray | None = None,
        confounds: np.ndarray | None = None,
    ) -> list[TrialBeta]:
        """Add one volume and return the betas it releases or refines.

        Parameters
        ----------
        tr_index : int
            0-based volume index in the run; each index at most once, in any order.
        values : ndarray of shape (n_voxels,)
            The volume's masked, preprocessed voxel values.
        motion_params : ndarray of shape (6,), optional
            The volume's motion parameters; required when ``motion_confounds`` is on, ignored
            otherwise.
        confounds : ndarray of shape (n_confounds,), optional
            The volume's values of the extra nuisance columns; required when ``n_confounds`` > 0.

        Returns
        -------
        list of TrialBeta
            Trials due for release (``beta_wait_s`` after onset has passed by this volume's frame
            time, and estimable), then refinements of released trials (``is_update=True``).
        """
        tr_index = self._check_index("update", tr_index)
        y = self._check_values(values)
        nuisance_row = self._nuisance_row(tr_index, motion_params, confounds)

        lo, hi = self.row_ranges_[tr_index]
        if hi > lo:
            x = self.trial_columns_[:, tr_index, lo:hi]  # (n_groups, k)
            self.gram_[:, lo:hi, lo:hi] += x[:, :, None] * x[:, None, :]
            self.cross_[:, lo:hi] += x[:, :, None] * nuisance_row
            if x.shape[0] == 1:
                self.trial_data_[lo:hi] += np.outer(x[0], y)
                self.total_data_ += x[0].sum() * y
            else:
                # Each voxel's design row is its group's: expand (n_groups, k) to (k, V).
                self.trial_data_[lo:hi] += np.repeat(x.T, self.group_sizes_, axis=1) * y
                self.total_data_ += np.repeat(x.sum(axis=1), self.group_sizes_) * y
        self.nuisance_gram_ += np.outer(nuisance_row, nuisance_row)
        self.nuisance_data_ += np.outer(nuisance_row, y)

        self.seen_[tr_index] = True
        self.n_volumes_used_ += 1
        self.latest_tr_index_ = max(self.latest_tr_index_, tr_index)
        return self._release(tr_index)

    def mark_missing(self, tr_index: int) -> None:
        """Record that a volume will never arrive: its row stays out of the model.

        Its time still counts as passed, so trials that became due release at the next
        :meth:`update` (or :meth:`finish`).

        Parameters
        ----------
        tr_index : int
            0-based volume index in the run.
        """
        tr_index = self._check_index("mark_missing", tr_index)
        self.missing_[tr_index] = True
        self.latest_tr_index_ = max(self.latest_tr_index_, tr_index)
        logger.info("volume %d marked missing; left out of the GLM", tr_index)

    def get_betas(self) -> np.ndarray:
        """Current single-trial betas of every trial.

        Returns
        -------
        ndarray of shape (n_trials, n_voxels), float32
            NaN rows for trials not estimable yet (not started, or too few volumes).
        """
        self._require_started("get_betas")
        betas, _ = self._estimate(np.arange(len(self.trial_ids_)))
        return betas.astype(np.float32)

    def finish(self) -> list[TrialBeta]:
        """End the run: the final beta of every trial (NaN maps for those never estimable).

        Returns
        -------
        list of TrialBeta
            One per trial, in schedule order, with ``is_final=True``.
        """
        self._require_started("finish")
        if self.finished_:
            raise OrderError("finish: the run is already finished; call reset() to run it again")
        indices = np.arange(len(self.trial_ids_))
        betas, estimable = self._estimate(indices)
        if not estimable.all():
            logger.warning(
                "GLM finished with %d of %d trials not estimable: %s", int((~estimable).sum()),
                indices.size, ", ".join(self.trial_ids_[j] for j in indices[~estimable][:5]),
            )
        results = [
            self._trial_beta(j, betas[n], is_update=bool(self.released_[j]), is_final=True)
            for n, j in enumerate(indices)
        ]
        self.released_[:] = True
        self.finished_ = True
        return results

    # ------------------------------------------------------------------ internals

    def _release(self, tr_index: int) -> list[TrialBeta]:
        latest_time_s = self.frame_times_s_[self.latest_tr_index_]
        due = ~self.released_ & (self.onsets_s_ + self.beta_wait_s <= latest_time_s)
        if due.any() and self.n_volumes_used_ - self._n_model_columns() < self.min_residual_dof:
            due[:] = False
        refine = np.zeros_like(due)
        if self.publish_refinements:
            refine = self.released_ & self.live_[tr_index]
        indices = np.flatnonzero(due | refine)
        if indices.size == 0:
            return []
        betas, estimable = self._estimate(indices, live=True)
        results = []
        for n, j in enumerate(indices):
            if not estimable[n]:
                continue
            results.append(self._trial_beta(j, betas[n], bool(self.released_[j]), is_final=False))
            self.released_[j] = True
        waiting = indices[due[indices] & ~estimable]
        if waiting.size:
            logger.debug("volume %d: %d due trial(s) not estimable yet", tr_index, waiting.size)
        return results

    def _n_model_columns(self) -> int:
        """Columns of a trial's model as the data stand: LSS trial + others, LSA every started trial; nuisance."""
        n_nuisance = int(np.count_nonzero(np.diag(self.nuisance_gram_) > 0.0))
        started = np.einsum("gii->gi", self.gram_) > 0.0
        n_trials = 2 if self.method == "lss" else int(started.sum(axis=1).max(initial=0))
        return n_trials + n_nuisance

    def _trial_beta(self, j: int, beta: np.ndarray, is_update: bool, is_final: bool) -> TrialBeta:
        tr_index = max(self.latest_tr_index_, 0)
        return TrialBeta(
            trial_id=self.trial_ids_[j], trial_index=int(j), beta=beta.astype(np.float32),
            tr_index=int(self.latest_tr_index_), n_volumes_used=self.n_volumes_used_,
            is_update=is_update, is_final=is_final, onset_s=float(self.onsets_s_[j]),
            volume_time_s=float(self.frame_times_s_[tr_index]),
        )

    def _estimate(self, indices: np.ndarray, live: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Betas (len(indices), n_voxels) in the caller's voxel order, and which are estimable.

        A trial is estimable when its model is estimable in every HRF group. ``live`` (releases
        before the run's end) with ``live_level`` gives the LSS contrasts (module notes).
        """
        nuisance = np.flatnonzero(np.diag(self.nuisance_gram_) > 0.0)
        contrast = live and self.live_level is not None
        if self.method == "lss":
            sorted_betas, estimable = self._solve_lss(indices, nuisance, contrast)
        else:
            sorted_betas, estimable = self._solve_lsa(indices, nuisance)
        sorted_betas[~estimable] = np.nan
        betas = np.empty_like(sorted_betas)
        betas[:, self.voxel_order_] = sorted_betas
        if contrast:
            betas += self.live_level[None, :]
        return betas, estimable

    def _solve_lss(
        self, indices: np.ndarray, nuisance: np.ndarray, contrast: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """LSS betas of the trials ``indices`` in every HRF group at once (voxels sorted);
        ``contrast``: ``b_j - b_others`` instead of ``b_j``."""
        gram = self.gram_  # (n_groups, n_trials, n_trials)
        cross = self.cross_[:, :, nuisance]  # (n_groups, n_trials, q)
        n_groups, n, m = gram.shape[0], indices.size, 2 + nuisance.size
        own = gram[:, indices, indices]  # (n_groups, n)
        row_sums = gram[:, indices].sum(axis=2)
        cross_own = cross[:, indices]  # (n_groups, n, q)
        normal = np.zeros((n_groups, n, m, m))
        normal[..., 0, 0] = own
        normal[..., 0, 1] = normal[..., 1, 0] = row_sums - own
        normal[..., 1, 1] = gram.sum(axis=(1, 2))[:, None] - 2.0 * row_sums + own
        normal[..., 0, 2:] = normal[..., 2:, 0] = cross_own
        normal[..., 1, 2:] = normal[..., 2:, 1] = cross.sum(axis=1)[:, None] - cross_own
        normal[..., 2:, 2:] = self.nuisance_gram_[np.ix_(nuisance, nuisance)]
        # Before a second trial starts the "other trials" column is exactly zero: drop it by
        # giving it a unit diagonal (its beta is then 0 and the others are unaffected).
        no_others = normal[..., 1, 1] <= 0.0
        normal[no_others, 1, :] = 0.0
        normal[no_others, :, 1] = 0.0
        normal[no_others, 1, 1] = 1.0
        diag = np.einsum("...ii->...i", normal)
        scale = 1.0 / np.sqrt(np.where(diag > 0.0, diag, 1.0))
        scaled = normal * scale[..., :, None] * scale[..., None, :]
        ok = own > 0.0
        scaled[~ok] = np.eye(m)
        ok &= np.linalg.eigvalsh(scaled)[..., 0] > _RANK_TOLERANCE
        scaled[~ok] = np.eye(m)
        unit = np.zeros((n_groups, n, m, 1))
        unit[..., 0, 0] = scale[..., 0]
        if contrast:  # minus the second row: b_others (0 while there are no others, as dropped above)
            unit[..., 1, 0] = -scale[..., 1]
        # First row of the inverse normal matrix: the weights that map [x_j'Y, o_j'Y, N'Y] to
        # trial j's beta (with contrast, the first minus the second).
        weights = np.linalg.solve(scaled, unit)[..., 0] * scale  # (n_groups, n, m)
        betas = np.empty((n, self.n_voxels_))
        for g, cols in enumerate(self.group_slices_):
            own_data = self.trial_data_[indices, cols]
            w = weights[g]
            betas[:, cols] = w[:, :1] * own_data
            betas[:, cols] += w[:, 1:2] * (self.total_data_[cols] - own_data)
            betas[:, cols] += w[:, 2:] @ self.nuisance_data_[nuisance, cols]
        return betas, ok.all(axis=0)

    def _solve_lsa(self, indices: np.ndarray, nuisance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """LSA betas of the trials ``indices`` (voxels sorted); the model holds started trials."""
        betas = np.full((indices.size, self.n_voxels_), np.nan)
        diag = np.einsum("gii->gi", self.gram_)
        active_mask = diag > 0.0
        if not np.all(active_mask == active_mask[0]):
            # A trial started in one group's design but not another's; solve the groups apart.
            ok = np.ones(indices.size, dtype=bool)
            for g in range(len(self.group_slices_)):
                ok &= self._solve_lsa_groups([g], indices, nuisance, betas)
            return betas, ok
        ok = self._solve_lsa_groups(list(range(len(self.group_slices_))), indices, nuisance, betas)
        return betas, ok

    def _solve_lsa_groups(
        self, groups: list[int], indices: np.ndarray, nuisance: np.ndarray, betas: np.ndarray
    ) -> np.ndarray:
        """Fill ``betas`` for ``groups`` (which share their started trials); which are estimable."""
        active = np.flatnonzero(np.diag(self.gram_[groups[0]]) > 0.0)
        ok = np.isin(indices, active)
        if not ok.any():
            return ok
        gram = self.gram_[groups][:, active][:, :, active]
        cross = self.cross_[groups][:, active][:, :, nuisance]
        nuisance_gram = np.broadcast_to(
            self.nuisance_gram_[np.ix_(nuisance, nuisance)], (len(groups), nuisance.size, nuisance.size)
        )
        normal = np.concatenate([
            np.concatenate([gram, cross], axis=2),
            np.concatenate([cross.transpose(0, 2, 1), nuisance_gram], axis=2),
        ], axis=1)
        scale = 1.0 / np.sqrt(np.einsum("gii->gi", normal))
        scaled = normal * scale[:, :, None] * scale[:, None, :]
        factor = self._cholesky(scaled)
        if factor is None:
            return np.zeros_like(ok)
        wanted = indices[ok]
        position = np.searchsorted(active, wanted)
        rhs = np.zeros((len(groups), normal.shape[1], wanted.size))
        rhs[:, position, np.arange(wanted.size)] = scale[:, position]
        # Rows of the inverse normal matrix for the wanted trials (it is symmetric).
        weights = np.linalg.solve(factor.transpose(0, 2, 1), np.linalg.solve(factor, rhs))
        weights *= scale[:, :, None]
        # Solved over the range [lo, hi) of started trials so the data rows are a view; trials
        # inside the range that have not started (unsorted schedules) get zero weight.
        lo, hi = int(active[0]), int(active[-1]) + 1
        trial_weights = np.zeros((len(groups), wanted.size, hi - lo))
        trial_weights[:, :, active - lo] = weights[:, : active.size].transpose(0, 2, 1)
        nuisance_weights = weights[:, active.size :].transpose(0, 2, 1)
        rows = np.flatnonzero(ok)
        for n, g in enumerate(groups):
            cols = self.group_slices_[g]
            betas[rows, cols] = trial_weights[n] @ self.trial_data_[lo:hi, cols]
            betas[rows, cols] += nuisance_weights[n] @ self.nuisance_data_[nuisance, cols]
        return ok

    @staticmethod
    def _cholesky(scaled: np.ndarray) -> np.ndarray | None:
        """Cholesky factors of unit-diagonal normal matrices, or None if any is rank deficient."""
        try:
            factor = np.linalg.cholesky(scaled)
        except np.linalg.LinAlgError:
            return None
        pivots = np.einsum("gii->gi", factor)
        if np.min(pivots) ** 2 <= _RANK_TOLERANCE:
            return None
        return factor

    def _nuisance_row(
        self, tr_index: int, motion_params: np.ndarray | None, confounds: np.ndarray | None = None
    ) -> np.ndarray:
        drift = self.drift_[tr_index]
        extra = self._confound_values(tr_index, confounds)
        if not self.motion_confounds:
            return np.concatenate([extra, drift])
        if motion_params is None:
            raise VolumeError(
                f"update: motion_params of volume {tr_index}: expected shape (6,) because "
                "motion_confounds is on (got None)"
            )
        motion = np.asarray(motion_params, dtype=np.float64).reshape(-1)
        if motion.shape != (N_MOTION_PARAMS,) or not np.all(np.isfinite(motion)):
            raise VolumeError(
                f"update: motion_params of volume {tr_index}: expected 6 finite values "
                f"(got shape {np.shape(motion_params)})"
            )
        return np.concatenate([motion, extra, drift])

    def _confound_values(self, tr_index: int, confounds: np.ndarray | None) -> np.ndarray:
        n = int(self.n_confounds)
        if n == 0:
            if confounds is not None and np.size(confounds):
                raise VolumeError(
                    f"update: confounds of volume {tr_index}: the GLM has no extra confound columns "
                    f"(n_confounds 0) but {np.size(confounds)} values were given"
                )
            return np.empty(0)
        if confounds is None:
            raise VolumeError(
                f"update: confounds of volume {tr_index}: expected {n} values because n_confounds is {n} (got None)"
            )
        values = np.asarray(confounds, dtype=np.float64).reshape(-1)
        if values.shape != (n,) or not np.all(np.isfinite(values)):
            raise VolumeError(
                f"update: confounds of volume {tr_index}: expected {n} finite values (got shape "
                f"{np.shape(confounds)})"
            )
        return values

    def _check_values(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values)
        if values.shape != (self.n_voxels_,):
            raise VolumeError(
                f"update: values: expected shape ({self.n_voxels_},), the n_voxels given to "
                f"start() (got {values.shape})"
            )
        y = values[self.voxel_order_].astype(np.float64)
        if not np.all(np.isfinite(y)):
            raise VolumeError(
                f"update: values: expected finite numbers (got {int((~np.isfinite(y)).sum())} "
                "NaN or infinite voxels); mark the volume missing instead"
            )
        return y

    def _check_index(self, caller: str, tr_index: int) -> int:
        self._require_started(caller)
        if self.finished_:
            raise OrderError(f"{caller}: the run is finished; call reset() to run it again")
        if not 0 <= int(tr_index) < self.n_volumes:
            raise VolumeError(
                f"{caller}: tr_index: expected 0 to {self.n_volumes - 1}, the run's scheduled "
                f"volumes (got {tr_index!r})"
            )
        tr_index = int(tr_index)
        if self.seen_[tr_index] or self.missing_[tr_index]:
            state = "added" if self.seen_[tr_index] else "marked missing"
            raise OrderError(f"{caller}: volume {tr_index} was already {state}; each volume counts once")
        return tr_index

    def _require_started(self, caller: str) -> None:
        if self.n_voxels_ is None:
            raise OrderError(f"{caller}: the GLM is not started; call start(n_voxels) first")

    def _kernels_and_groups(self) -> tuple[list[np.ndarray], np.ndarray]:
        if self.hrf != "library":
            name = "glover" if self.hrf == "canonical" else self.hrf
            kernel = canonical_hrf(name, self.tr_s, self.oversampling, DEFAULT_HRF_LENGTH_S)
            return [kernel], np.zeros(self.n_voxels_, dtype=np.int64)
        library = self.hrf_library
        if library is None:
            library = hrf_candidates(self.tr_s, self.oversampling)
        library = np.asarray(library, dtype=np.float64)
        per_voxel = np.asarray(self.hrf_per_voxel, dtype=np.int64)
        # Only the shapes some voxel uses get a design (and statistics).
        used, group_of_voxel = np.unique(per_voxel, return_inverse=True)
        return [library[k] for k in used], group_of_voxel.astype(np.int64)

    def _check_settings(self, n_voxels: int) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"glm.method: expected one of {', '.join(METHODS)} (got {self.method!r})")
        if self.hrf not in HRF_CHOICES:
            raise ConfigError(f"glm.hrf: expected one of {', '.join(HRF_CHOICES)} (got {self.hrf!r})")
        if self.drift_model not in DRIFT_MODELS:
            raise ConfigError(
                f"glm.drift_model: expected one of {', '.join(DRIFT_MODELS)} (got {self.drift_model!r})"
            )
        if self.beta_wait_s < 0:
            raise ConfigError(f"glm.beta_wait_s: expected >= 0 s (got {self.beta_wait_s!r})")
        dof = self.min_residual_dof
        if isinstance(dof, bool) or not isinstance(dof, (int, np.integer)) or dof < 0:
            raise ConfigError(f"glm.min_residual_dof: expected a whole number >= 0 (got {dof!r})")
        n_confounds = self.n_confounds
        if isinstance(n_confounds, bool) or not isinstance(n_confounds, (int, np.integer)) or n_confounds < 0:
            raise ConfigError(f"n_confounds: expected a whole number >= 0 (got {n_confounds!r})")
        if int(n_voxels) < 1:
            raise ConfigError(f"start: n_voxels: expected at least 1 voxel (got {n_voxels!r})")
        if self.live_level is not None:
            if self.method != "lss":
                raise ConfigError(
                    f"glm.live_contrast: expected glm.method 'lss' (the contrast is against LSS's other-trials "
                    f"column; got {self.method!r})")
            level = np.asarray(self.live_level, dtype=np.float64)
            if level.shape != (int(n_voxels),) or not np.all(np.isfinite(level)):
                raise ConfigError(
                    f"live_level: expected {int(n_voxels)} finite values, one per voxel (got shape {level.shape})")
            self.live_level = level
        if len(self.trials) == 0:
            raise ConfigError("trials: expected at least one trial in the run (got none)")
        ids = [str(t.trial_id) for t in self.trials]
        if len(set(ids)) != len(ids):
            duplicated = sorted({i for i in ids if ids.count(i) > 1})
            raise ConfigError(f"trials: trial_id: expected unique ids (repeated: {', '.join(duplicated[:5])})")
        if self.hrf == "library":
            self._check_library(int(n_voxels))
        elif self.hrf_per_voxel is not None:
            raise ConfigError(f"hrf_per_voxel: given, but glm.hrf is {self.hrf!r}; expected hrf='library'")

    def _check_library(self, n_voxels: int) -> None:
        if self.hrf_per_voxel is None:
            raise ConfigError(
                "hrf_per_voxel: glm.hrf is 'library' but no per-voxel HRF choice was given; "
                "expected the calibration's (n_voxels,) indices"
            )
        per_voxel = np.asarray(self.hrf_per_voxel)
        if self.hrf_library is not None and np.ndim(self.hrf_library) != 2:
            raise ConfigError(
                f"hrf_library: expected shape (n_shapes, n_samples) (got {np.shape(self.hrf_library)})"
            )
        n_shapes = len(self.hrf_library) if self.hrf_library is not None else CANONICAL_CANDIDATE + 1
        if per_voxel.shape != (n_voxels,) or not np.issubdtype(per_voxel.dtype, np.integer):
            raise ConfigError(
                f"hrf_per_voxel: expected {n_voxels} integer library indices (got shape "
                f"{per_voxel.shape}, dtype {per_voxel.dtype})"
            )
        if per_voxel.min() < 0 or per_voxel.max() >= n_shapes:
            raise ConfigError(
                f"hrf_per_voxel: expected indices 0 to {n_shapes - 1} (got {per_voxel.min()} "
                f"to {per_voxel.max()})"
            )
