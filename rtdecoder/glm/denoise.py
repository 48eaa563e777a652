"""GLMdenoise: noise regressors from the principal components of a pool of task-unresponsive voxels.

After Kay et al. (2013), the noise step of GLMsingle, split as this project's live path needs it:
everything is learned on the calibration session and frozen, and each live volume is only
*projected*.

Calibration (:func:`fit_glmdenoise`):

1. **Noise pool.** Candidates are the voxels of a brain mask wider than the decoding mask (by
   default an EPI brain mask of the motion reference, :func:`epi_brain_mask`), read at their
   motion-corrected positions like the mask voxels, minus the decoding mask and a one-voxel
   margin around it (:func:`noise_pool_candidates`): those voxels carry stimulus-specific
   responses with little mean response, which an ON-OFF criterion would not see and the
   components would then remove from the betas. A candidate joins the pool when
   its leave-one-run-out R^2 of an ON-OFF model (all trials one regressor, canonical HRF, the
   run's drift and motion confounds) is below :data:`POOL_R2_CUTOFF_PCT`, as GLMdenoise's
   default: the task does not predict it.
2. **Normalisation.** Each pool voxel ``v`` is centred on its session mean signal
   ``pool_mean[v]`` and divided by ``pool_std[v]``, the root mean square over the session of its
   signal with each run's drift and motion confounds projected out, so that every pool voxel
   weighs alike (GLMdenoise scales each time series to unit length).
3. **Components.** The leading right singular vectors of the normalised, confound-projected pool
   data of all runs stacked in time: *spatial* components ``components`` (n_pool,
   max_components), orthonormal. GLMdenoise takes each run's own temporal PCs; here one set of
   spatial components serves the whole session, because the live run has only the volumes so far
   and cannot have PCs of its own. A run's noise regressors are its normalised pool values
   projected onto them (:meth:`NoiseComponents.regressors`), the same arithmetic the live path
   applies to each volume. They are not detrended: the GLM fits them together with the drift
   and motion columns, which are what the components were computed without, so the betas are
   those of the detrended regressors (Frisch-Waugh-Lovell).
4. **Count.** For ``n`` = 0 to ``max_components``: the leave-one-run-out R^2 of the ON-OFF model
   of the decoding-mask voxels (their own HRFs), with the first ``n`` regressors added to every
   run's confounds (fitted on the held-out run, as GLMdenoise does). The curve is the median
   over the voxels whose R^2 is positive at some count (GLMdenoise's ``pcR2cutoff`` of 0;
   the best 100 voxels when none is), and the count is GLMdenoise's rule
   (:func:`choose_n_components`): the fewest components within a factor :data:`PC_STOP` of the
   best gain over none. 0 is a valid outcome: then nothing changes.

Live (:class:`~rtdecoder.session.frontend.FrontEnd`): each volume's pool voxels are read at their
motion-corrected positions and projected (:meth:`NoiseComponents.regressors`); the values are
the volume's extra nuisance columns of the incremental GLM
(:class:`~rtdecoder.glm.incremental.IncrementalGLM` ``n_confounds``).

Units: ``pool_mean`` and ``pool_std`` are in the scanner's signal units; normalised values and
regressors are unitless (a regressor of a volume is the pool's normalised pattern's coordinate
along a component).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rtdecoder.errors import BundleError, ConfigError

logger = logging.getLogger(__name__)

#: Leave-one-run-out ON-OFF R^2, percent, below which a candidate voxel joins the noise pool.
POOL_R2_CUTOFF_PCT = 0.0
#: Voxels around the decoding mask (a dilation by this many voxels, 26-connected) left out of the
#: candidates with the mask: partial volume and the motion correction's interpolation carry the
#: mask's stimulus responses into them.
POOL_MARGIN_VOXELS = 1
#: GLMdenoise's ``pcstop``: the chosen count is the first whose gain is within this factor of the best.
PC_STOP = 1.05
#: Voxels whose cross-validated R^2 decides the count, when none has a positive R^2 at any count.
FALLBACK_VOXELS = 100
#: Fewer pool voxels than this many per component, and GLMdenoise is skipped (no stable components).
MIN_POOL_VOXELS_PER_COMPONENT = 5
# Randomised SVD (Halko, Martinsson & Tropp 2011): extra probe vectors and power iterations. With
# 8 iterations the leading subspace is accurate far below the noise of the data it comes from.
_OVERSAMPLES = 10
_POWER_ITERATIONS = 8
_SEED = 0
# A confound column whose part outside the columns before it is below this share of its norm adds
# nothing to the model (it is dropped from the cross-validation's basis).
_DEPENDENT_TOLERANCE = 1e-8


@dataclass
class NoiseComponents:
    """The frozen noise components of a calibration session, as the live path applies them.

    Attributes
    ----------
    pool_ijk : ndarray of shape (n_pool, 3), int
        Reference-grid voxel indices of the noise pool (C order of the grid).
    pool_mean : ndarray of shape (n_pool,), float32
        Each pool voxel's mean motion-corrected signal over the session, scanner units.
    pool_std : ndarray of shape (n_pool,), float32
        Its root-mean-square signal over the session with each run's drift and motion confounds
        projected out, scanner units; positive.
    components : ndarray of shape (n_pool, n_components), float32
        Orthonormal spatial components of the normalised pool signal, leading first.
    """

    pool_ijk: np.ndarray
    pool_mean: np.ndarray
    pool_std: np.ndarray
    components: np.ndarray

    @property
    def n_components(self) -> int:
        """Noise regressors per volume."""
        return int(self.components.shape[1])

    @property
    def n_pool(self) -> int:
        """Voxels in the noise pool."""
        return int(self.pool_ijk.shape[0])

    def regressors(self, pool_values: np.ndarray) -> np.ndarray:
        """Noise regressor values of volumes from their pool voxels' signal.

        Parameters
        ----------
        pool_values : ndarray of shape (n_pool,) or (n_volumes, n_pool)
            Motion-corrected signal of the pool voxels (in :attr:`pool_ijk` order), scanner units.
            NaN rows (missing volumes) give NaN rows.

        Returns
        -------
        ndarray of shape (n_components,) or (n_volumes, n_components), float64
            Unitless; the volume's normalised pool pattern projected onto each component.
        """
        values = np.asarray(pool_values, dtype=np.float64)
        if values.shape[-1:] != (self.n_pool,) or values.ndim > 2:
            raise ConfigError(
                f"glmdenoise: pool values: expected shape ({self.n_pool},) or (n_volumes, {self.n_pool}) for the "
                f"noise pool's voxels (got {values.shape})"
            )
        normalised = (values - self.pool_mean) / self.pool_std
        return normalised @ self.components.astype(np.float64)

    def first(self, n_components: int) -> NoiseComponents:
        """The same pool with only the ``n_components`` leading components."""
        return NoiseComponents(self.pool_ijk, self.pool_mean, self.pool_std, self.components[:, :n_components].copy())

    def check(self, grid_shape: tuple[int, int, int], where: str) -> None:
        """Raise :class:`~rtdecoder.errors.BundleError` naming ``where`` unless the arrays fit together and the grid.

        Parameters
        ----------
        grid_shape : tuple of int
            The reference grid ``(nx, ny, nz)`` the pool indices must lie in.
        where : str
            The file or object named in the message.
        """
        n = self.n_pool
        ijk = np.asarray(self.pool_ijk)
        if ijk.ndim != 2 or ijk.shape[1] != 3 or n < 1 or not np.issubdtype(ijk.dtype, np.integer):
            raise BundleError(
                f"{where}: pool_ijk: expected integer voxel indices of shape (n_pool, 3) (got {ijk.shape})"
            )
        if ijk.min() < 0 or np.any(ijk.max(axis=0) >= np.asarray(grid_shape)):
            raise BundleError(
                f"{where}: pool_ijk: expected voxel indices inside the reference grid {tuple(grid_shape)}"
            )
        for name in ("pool_mean", "pool_std"):
            value = np.asarray(getattr(self, name))
            if value.shape != (n,) or not np.all(np.isfinite(value)):
                raise BundleError(
                    f"{where}: {name}: expected {n} finite values, one per pool voxel (got {value.shape})"
                )
        if not np.all(np.asarray(self.pool_std) > 0):
            raise BundleError(f"{where}: pool_std: expected positive values")
        components = np.asarray(self.components)
        if components.ndim != 2 or components.shape[0] != n or components.shape[1] < 1:
            raise BundleError(
                f"{where}: components: expected shape ({n}, n_components >= 1), one row per pool voxel "
                f"(got {components.shape})"
            )
        if not np.all(np.isfinite(components)):
            raise BundleError(f"{where}: components: expected finite values")


@dataclass
class DenoiseRun:
    """One calibration run as GLMdenoise needs it.

    Attributes
    ----------
    data : ndarray of shape (n_volumes, n_voxels)
        Decoding-mask voxels, percent signal change; NaN rows are missing volumes.
    onoff : ndarray of shape (n_groups, n_volumes)
        The ON-OFF regressor (the sum of the trial regressors) of each HRF group of the run's GLM.
    nuisance : ndarray of shape (n_volumes, n_nuisance)
        The GLM's confounds (motion, drift), finite on every row.
    candidate_values : ndarray of shape (n_volumes, n_candidates)
        Motion-corrected signal of the noise-pool candidates, scanner units; NaN rows are missing.
    candidate_onoff : ndarray of shape (n_volumes,)
        The ON-OFF regressor with the canonical HRF, for the candidates.
    """

    data: np.ndarray
    onoff: np.ndarray
    nuisance: np.ndarray
    candidate_values: np.ndarray
    candidate_onoff: np.ndarray


@dataclass
class GLMDenoiseFit:
    """What :func:`fit_glmdenoise` learned.

    Attributes
    ----------
    components : NoiseComponents
        All ``max_components`` components (fewer when the pool or the data are smaller).
    n_chosen : int
        The cross-validated count, 0 to ``components.n_components``.
    cv_r2_pct : ndarray of shape (components.n_components + 1,)
        The curve the count was chosen on: median leave-one-run-out ON-OFF R^2, percent, of the
        chosen voxels, at 0, 1, ... components.
    n_candidates : int
        Candidate voxels (brain mask minus decoding mask).
    n_curve_voxels : int
        Decoding-mask voxels the curve is the median of.
    pool_index : ndarray of shape (n_pool,), int
        The pool voxels' columns among the candidates (``components.pool_ijk`` is
        ``candidate_ijk[pool_index]``).
    """

    components: NoiseComponents
    n_chosen: int
    cv_r2_pct: np.ndarray
    n_candidates: int
    n_curve_voxels: int
    pool_index: np.ndarray

    @property
    def chosen(self) -> NoiseComponents | None:
        """The chosen components, None when the count is 0."""
        return self.components.first(self.n_chosen) if self.n_chosen else None


def epi_brain_mask(reference: np.ndarray, affine: np.ndarray, opening: int = 2) -> np.ndarray:
    """A brain mask of an EPI volume (nilearn's ``compute_epi_mask``), on its grid.

    Parameters
    ----------
    reference : ndarray of shape (nx, ny, nz)
        The motion reference volume.
    affine : ndarray of shape (4, 4)
        Its voxel-to-world matrix, mm.
    opening : int, default=2
        Iterations of the morphological opening (nilearn's default 2); it removes specks outside
        the head and also erodes the brain's edge, where cortex lies.

    Returns
    -------
    ndarray of bool, shape (nx, ny, nz)
    """
    import nibabel as nib
    from nilearn.masking import compute_epi_mask

    image = nib.Nifti1Image(np.asarray(reference, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    return np.asarray(compute_epi_mask(image, opening=opening).get_fdata(), dtype=bool)


def noise_pool_candidates(brain: np.ndarray, mask: np.ndarray, margin_voxels: int | None = None) -> np.ndarray:
    """Reference-grid indices of GLMdenoise's candidates: brain voxels away from the decoding mask.

    Parameters
    ----------
    brain : ndarray of bool, shape (nx, ny, nz)
        The brain mask the pool is drawn from.
    mask : ndarray of bool, shape (nx, ny, nz)
        The decoding mask; it and ``margin_voxels`` voxels around it are left out.
    margin_voxels : int, optional
        Default :data:`POOL_MARGIN_VOXELS`.

    Returns
    -------
    ndarray of shape (n_candidates, 3), int64
        In the grid's C order.
    """
    from scipy import ndimage

    excluded = np.asarray(mask, dtype=bool)
    margin_voxels = POOL_MARGIN_VOXELS if margin_voxels is None else int(margin_voxels)
    if margin_voxels > 0:
        excluded = ndimage.binary_dilation(excluded, np.ones((3, 3, 3), dtype=bool), iterations=margin_voxels)
    return np.argwhere(np.asarray(brain, dtype=bool) & ~excluded).astype(np.int64)


def fit_glmdenoise(
    runs: Sequence[DenoiseRun],
    group_of_voxel: np.ndarray,
    candidate_ijk: np.ndarray,
    max_components: int,
) -> GLMDenoiseFit | None:
    """Noise pool, spatial components and their cross-validated count for a calibration session.

    Parameters
    ----------
    runs : sequence of DenoiseRun
        Every run of the session (two or more: the count is cross-validated across runs).
    group_of_voxel : ndarray of shape (n_voxels,), int
        The HRF group (row of each run's ``onoff``) of each decoding-mask voxel.
    candidate_ijk : ndarray of shape (n_candidates, 3), int
        Reference-grid indices of the candidates (columns of ``candidate_values``).
    max_components : int
        Most components tried (GLMdenoise's ``numpcstotry``), >= 1.

    Returns
    -------
    GLMDenoiseFit or None
        None when GLMdenoise cannot be fitted (one run, too small a pool); the reason is logged.
    """
    if max_components < 1:
        raise ConfigError(f"glm.glmdenoise_max_components: expected >= 1 (got {max_components})")
    if len(runs) < 2:
        logger.warning("GLMdenoise: one run; the count of noise components needs two or more runs to "
                       "cross-validate, so no noise regressors are used")
        return None
    group_of_voxel = np.asarray(group_of_voxel, dtype=np.int64)
    candidate_ijk = np.asarray(candidate_ijk, dtype=np.int64)
    n_candidates = candidate_ijk.shape[0]
    if n_candidates < MIN_POOL_VOXELS_PER_COMPONENT:
        logger.warning("GLMdenoise: %d noise-pool candidates (brain voxels away from the mask); too few for noise "
                       "components, none are used", n_candidates)
        return None
    # Percent R^2 is unchanged by a voxel's offset and scale, so the candidates' raw signal serves.
    candidate_r2 = crossvalidated_r2_pct(
        [r.candidate_values for r in runs], [r.candidate_onoff[None] for r in runs], [r.nuisance for r in runs],
        np.zeros(n_candidates, dtype=np.int64),
    )[0]
    mean = _session_mean([r.candidate_values for r in runs])
    in_pool = np.flatnonzero((candidate_r2 < POOL_R2_CUTOFF_PCT) & (mean > 0))
    logger.info("GLMdenoise: noise pool of %d of %d candidate voxels (leave-one-run-out ON-OFF R^2 < %g%%)",
                in_pool.size, n_candidates, POOL_R2_CUTOFF_PCT)
    if in_pool.size < MIN_POOL_VOXELS_PER_COMPONENT:
        logger.warning("GLMdenoise: a noise pool of %d voxels is too small for noise components; none are used",
                       in_pool.size)
        return None
    pool_values = [r.candidate_values[:, in_pool] for r in runs]
    pool_mean = mean[in_pool]
    pool_std = _confound_rms(pool_values, pool_mean, [r.nuisance for r in runs])
    keep = np.flatnonzero(pool_std > 0)
    n_present = sum(int((~np.isnan(v[:, 0])).sum()) for v in pool_values)
    n_components = min(max_components, keep.size // MIN_POOL_VOXELS_PER_COMPONENT, n_present - 1)
    if n_components < 1:
        logger.warning("GLMdenoise: a noise pool of %d voxels is too small for noise components; none are used",
                       keep.size)
        return None
    pool_values = [v[:, keep] for v in pool_values]
    pool_mean, pool_std = pool_mean[keep], pool_std[keep]
    spatial = principal_components(pool_values, pool_mean, pool_std, [r.nuisance for r in runs], n_components)
    components = NoiseComponents(
        candidate_ijk[in_pool[keep]], pool_mean.astype(np.float32), pool_std.astype(np.float32),
        spatial.astype(np.float32),
    )
    regressors = [components.regressors(v) for v in pool_values]
    del pool_values
    r2 = crossvalidated_r2_pct(
        [r.data for r in runs], [r.onoff for r in runs], [r.nuisance for r in runs], group_of_voxel, regressors
    )  # (n_components + 1, n_voxels)
    voxels = np.flatnonzero(np.any(r2 > 0.0, axis=0))
    if voxels.size == 0:
        voxels = np.argsort(-np.max(r2, axis=0), kind="stable")[:FALLBACK_VOXELS]
        logger.warning("GLMdenoise: no decoding-mask voxel has a positive cross-validated R^2; the count is chosen "
                       "on the best %d", voxels.size)
    curve = np.nanmedian(r2[:, voxels], axis=1)
    n_chosen = choose_n_components(curve)
    logger.info(
        "GLMdenoise: %d of %d noise components chosen (median cross-validated ON-OFF R^2 of %d voxels: %s %%)",
        n_chosen, n_components, voxels.size, " ".join(f"{value:.2f}" for value in curve),
    )
    return GLMDenoiseFit(components, n_chosen, curve, n_candidates, int(voxels.size), in_pool[keep])


def choose_n_components(curve: np.ndarray, pc_stop: float = PC_STOP) -> int:
    """GLMdenoise's choice of the number of components from a cross-validation curve.

    The gain of ``n`` components is ``curve[n] - curve[0]``; walking up from 0, the count moves to
    every new best gain and stops at the first whose gain times ``pc_stop`` reaches the largest.

    Parameters
    ----------
    curve : ndarray of shape (n_max + 1,)
        Cross-validated accuracy (higher is better) at 0, 1, ..., n_max components.
    pc_stop : float, default=1.05
        Above 1: how close to the best gain is enough.

    Returns
    -------
    int
        0 when no count beats none.

    Examples
    --------
    >>> choose_n_components(np.array([10.0, 14.0, 15.9, 16.0, 15.0]))
    2
    >>> choose_n_components(np.array([10.0, 9.0, 8.0]))
    0
    """
    gain = np.asarray(curve, dtype=np.float64) - float(curve[0])
    best_gain, chosen, best = float(gain.max()), 0, -np.inf
    for count, value in enumerate(gain):
        if value > best:
            chosen, best = count, float(value)
            if best * pc_stop >= best_gain:
                break
    return chosen


def crossvalidated_r2_pct(
    data: Sequence[np.ndarray],
    onoff: Sequence[np.ndarray],
    nuisance: Sequence[np.ndarray],
    group_of_voxel: np.ndarray,
    extra: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """Leave-one-run-out R^2 of an ON-OFF model, with 0, 1, ... extra confounds per run.

    Each held-out run's prediction is its ON-OFF regressor times the amplitude fitted on the other
    runs (every run with its own confounds); the R^2 is that of the held-out data with its own
    confounds projected out of data and prediction, summed over held-out runs:
    ``100 * (1 - sum |P (y - x b)|^2 / sum |P y|^2)``, ``P`` the projection off the run's confounds.

    Parameters
    ----------
    data : sequence of ndarray of shape (n_volumes, n_voxels)
        One per run; NaN rows (missing volumes) are left out.
    onoff : sequence of ndarray of shape (n_groups, n_volumes)
        One per run: each HRF group's ON-OFF regressor.
    nuisance : sequence of ndarray of shape (n_volumes, n_nuisance)
        One per run: the confounds every count has (drift, motion).
    group_of_voxel : ndarray of shape (n_voxels,), int
        Each voxel's row of ``onoff``.
    extra : sequence of ndarray of shape (n_volumes, n_extra), optional
        One per run: confounds added one at a time (noise regressors, leading first).

    Returns
    -------
    ndarray of shape (n_extra + 1, n_voxels), float64
        Percent; row ``n`` with the first ``n`` extra confounds. NaN for a voxel without variance.
    """
    n_extra = 0 if extra is None else int(extra[0].shape[1])
    n_voxels = int(data[0].shape[1])
    stats = [
        _onoff_statistics(y, x, q, None if extra is None else extra[number], group_of_voxel, n_extra)
        for number, (y, x, q) in enumerate(zip(data, onoff, nuisance, strict=True))
    ]
    total_xx = sum(s[0] for s in stats)  # (n_extra + 1, n_voxels)
    total_xy = sum(s[1] for s in stats)
    residual = np.zeros((n_extra + 1, n_voxels))
    variance = np.zeros((n_extra + 1, n_voxels))
    for xx, xy, yy in stats:
        train_xx, train_xy = total_xx - xx, total_xy - xy
        amplitude = np.divide(train_xy, train_xx, out=np.zeros_like(train_xy), where=train_xx > 0)
        residual += yy - 2.0 * amplitude * xy + amplitude**2 * xx
        variance += yy
    with np.errstate(invalid="ignore", divide="ignore"):
        return 100.0 * (1.0 - residual / variance)


def principal_components(
    pool_values: Sequence[np.ndarray],
    pool_mean: np.ndarray,
    pool_std: np.ndarray,
    nuisance: Sequence[np.ndarray],
    n_components: int,
) -> np.ndarray:
    """Leading spatial components of the normalised pool signal of all runs, confounds projected out.

    A randomised SVD (seeded, so calibration is repeatable) of the stacked matrix whose run block
    is ``P_r ((values_r - pool_mean) / pool_std)``, ``P_r`` the projection off run ``r``'s confounds
    on its present volumes; the blocks are formed on the fly, one run at a time.

    Parameters
    ----------
    pool_values : sequence of ndarray of shape (n_volumes, n_pool)
        One per run, scanner units; NaN rows are missing volumes.
    pool_mean, pool_std : ndarray of shape (n_pool,)
        Scanner units; ``pool_std`` positive.
    nuisance : sequence of ndarray of shape (n_volumes, n_nuisance)
        One per run.
    n_components : int
        How many.

    Returns
    -------
    ndarray of shape (n_pool, n_components), float64
        Orthonormal columns, leading first; each column's sign makes its largest loading positive.
    """
    blocks = []
    for values, confounds in zip(pool_values, nuisance, strict=True):
        rows = ~np.isnan(values[:, 0])
        blocks.append((values, rows, _orthonormal_basis(confounds[rows])))
    mean, scale = np.asarray(pool_mean, dtype=np.float64), 1.0 / np.asarray(pool_std, dtype=np.float64)

    def block(values: np.ndarray, rows: np.ndarray, basis: np.ndarray) -> np.ndarray:
        z = (values[rows].astype(np.float64) - mean) * scale
        return z - basis @ (basis.T @ z)

    def times(right: np.ndarray) -> np.ndarray:  # Z @ right: (n_rows, k)
        return np.concatenate([block(*b) @ right for b in blocks])

    def transposed_times(left: np.ndarray) -> np.ndarray:  # Z.T @ left: (n_pool, k)
        out, first = np.zeros((mean.size, left.shape[1])), 0
        for b in blocks:
            n = int(b[1].sum())
            out += block(*b).T @ left[first : first + n]
            first += n
        return out

    n_rows = sum(int(b[1].sum()) for b in blocks)
    width = min(n_components + _OVERSAMPLES, n_rows, mean.size)
    probe = np.random.default_rng(_SEED).standard_normal((mean.size, width))
    basis, _ = np.linalg.qr(times(probe))
    for _ in range(_POWER_ITERATIONS):
        basis, _ = np.linalg.qr(transposed_times(basis))
        basis, _ = np.linalg.qr(times(basis))
    small = transposed_times(basis).T  # (width, n_pool): Q' Z
    _, _, vt = np.linalg.svd(small, full_matrices=False)
    spatial = vt[:n_components].T
    signs = np.sign(spatial[np.argmax(np.abs(spatial), axis=0), np.arange(spatial.shape[1])])
    return spatial * np.where(signs == 0, 1.0, signs)


def _onoff_statistics(
    y: np.ndarray, x: np.ndarray, nuisance: np.ndarray, extra: np.ndarray | None, group_of_voxel: np.ndarray,
    n_extra: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One run's ``x'x``, ``x'y`` and ``y'y`` (each (n_extra + 1, n_voxels)) with 0..n_extra confounds out."""
    rows = ~np.isnan(y[:, 0])
    y = y[rows].astype(np.float64)
    x = np.asarray(x, dtype=np.float64)[:, rows].T  # (n_rows, n_groups)
    basis = _orthonormal_basis(nuisance[rows])
    # Widths of the nested confound bases: the base, then one more column per extra confound
    # (Gram-Schmidt, twice for rounding), unless it adds nothing.
    widths = [basis.shape[1]]
    columns = [basis]
    for k in range(n_extra):
        column = np.asarray(extra[rows, k], dtype=np.float64)
        norm = float(np.linalg.norm(column))
        for _ in range(2):
            for part in columns:
                column = column - part @ (part.T @ column)
        if norm > 0 and np.linalg.norm(column) > _DEPENDENT_TOLERANCE * norm:
            columns.append((column / np.linalg.norm(column))[:, None])
        widths.append(sum(c.shape[1] for c in columns))
    basis = np.hstack(columns)
    at = np.asarray(widths)
    basis_y = basis.T @ y  # (m, V)

    def nested(products: np.ndarray) -> np.ndarray:
        """Sums over the first widths[n] basis rows, for every n: (n_extra + 1, ...)."""
        cumulative = np.concatenate([np.zeros((1, *products.shape[1:])), np.cumsum(products, axis=0)])
        return cumulative[at]

    n_voxels = y.shape[1]
    xx, xy = np.empty((n_extra + 1, n_voxels)), np.empty((n_extra + 1, n_voxels))
    for group in np.unique(group_of_voxel):
        cols = group_of_voxel == group
        column = x[:, group]
        basis_x = basis.T @ column  # (m,)
        xx[:, cols] = (float(column @ column) - nested(basis_x**2))[:, None]
        xy[:, cols] = column @ y[:, cols] - nested(basis_x[:, None] * basis_y[:, cols])
    yy = (y**2).sum(axis=0) - nested(basis_y**2)
    return np.maximum(xx, 0.0), xy, np.maximum(yy, 0.0)


def _session_mean(values: Sequence[np.ndarray]) -> np.ndarray:
    """Mean over the present volumes of every run, (n_voxels,) float64."""
    total, count = 0.0, 0
    for v in values:
        rows = ~np.isnan(v[:, 0])
        total = total + v[rows].sum(axis=0, dtype=np.float64)
        count += int(rows.sum())
    return total / max(count, 1)


def _confound_rms(values: Sequence[np.ndarray], mean: np.ndarray, nuisance: Sequence[np.ndarray]) -> np.ndarray:
    """Root mean square over the session of each voxel's signal with its run's confounds projected out."""
    total, count = np.zeros(mean.size), 0
    for v, confounds in zip(values, nuisance, strict=True):
        rows = ~np.isnan(v[:, 0])
        basis = _orthonormal_basis(confounds[rows])
        z = v[rows].astype(np.float64) - mean
        z -= basis @ (basis.T @ z)
        total += (z**2).sum(axis=0)
        count += int(rows.sum())
    return np.sqrt(total / max(count, 1))


def _orthonormal_basis(columns: np.ndarray) -> np.ndarray:
    """An orthonormal basis (n_rows, rank) of the span of ``columns`` (all-zero columns add nothing)."""
    u, s, _ = np.linalg.svd(np.asarray(columns, dtype=np.float64), full_matrices=False)
    return u[:, s > s.max(initial=0.0) * max(columns.shape) * np.finfo(np.float64).eps]
