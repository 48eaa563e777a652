"""Rigid (6-parameter) head-motion correction of each volume to a reference, in-process.

The fit is an inverse-compositional Gauss-Newton registration on a fixed set of sample points:
the reference voxels with the strongest intensity gradient. Everything that depends only on the
reference (sample positions, gradients, the 7x7 Gauss-Newton matrix) is computed once in
:meth:`MotionCorrector.set_reference`; each iteration then samples the moving volume at those
points only and solves a 7x7 system, and the corrected time series is read by sampling only the
mask voxels at the estimated transform (trilinear), never by reslicing the whole volume.

Image model
-----------
Reference and moving volume are both seen through the same continuous image model, the cubic
B-spline whose coefficients are the voxel values (no prefilter):

    f(y) = sum_k data[k] beta3(y - k),      beta3 the cubic B-spline,

i.e. the data lightly smoothed (``[1, 4, 1] / 6`` along each axis at the grid points). The
reference's values and gradients at the sample points are this model's (computed once), and each
iteration evaluates the same model of the moving volume at the moved points
(:func:`sample_cubic_bspline`).

Why: the Gauss-Newton fixed point is unbiased only when the way the sampled moving values change
with the parameters is the way the reference gradients say they do. The first version sampled the
moving volume trilinearly but used central-difference gradients of the raw reference at the grid
points. For a sub-voxel shift a trilinear sample changes with the one-sided difference of the
data, while the moved image changes with its true derivative, so the fit answered ``w / sin(w)``
times the truth at spatial frequency ``w`` (radians per voxel): on real EPI volumes 0.1-0.5 mm /
0.1-0.5 degree motions came out 1.3-1.65 times the truth (worst parameter), and 2 mm ones within
8 %, since larger shifts put the sample points at all fractional offsets. With the B-spline model
on both sides the ratio is ``w (2 + cos w) / (3 sin w) = 1 + w^4 / 180 + ...``: within 4.2 % at
every size on the same volumes (``bench/bench_motion.py``; SimpleITK's rigid registration is
within 1.7-4 % there). A prefiltered (interpolating) spline does not do better: a discrete
prefilter scales the model's values and its derivative alike, which leaves that ratio as it is
(measured: 5-7 % against 2-3 % for quintic-spline moves), and costs a pass over the whole moving
volume (9 ms at NSD size); the unfiltered model costs 64 voxel reads per sample point instead of
8, and no per-volume pass.

Parameter convention
--------------------
A motion estimate is the 6-vector ``(tx, ty, tz, rx, ry, rz)``: translations in mm along the world
(RAS+) axes and rotations in radians about the world x, y and z axes through the centre of the
reference grid (the world position of voxel ``(shape - 1) / 2``). The rigid transform is

    T(p): x  ->  R (x - c) + c + t,     R = Rx(rx) @ Ry(ry) @ Rz(rz)

(the factors in SPM's order, but every angle right-handed: positive ``rz`` turns +x towards +y),
and it says where the head has gone: the tissue that was at world position ``x``
in the reference is at ``T(p)(x)`` in the moving volume, so ``moving(T(p)(x)) = reference(x)``.
:func:`rigid_matrix` builds ``T(p)`` as a 4x4 world-to-world matrix and :func:`rigid_params`
inverts it, which also converts from any other convention that can be written as such a matrix.

Framewise displacement follows Power et al. (2012): the sum of the absolute changes of the three
translations (mm) plus the three rotations converted to arc length on a 50 mm sphere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from rtdecoder.errors import ConfigError, OrderError, VolumeError
from rtdecoder.ingest.volume import Volume

logger = logging.getLogger(__name__)

FD_RADIUS_MM = 50.0
# Sample points and mask voxels must keep a margin from the grid edge so that the B-spline model's
# 3-voxel stencil fits and moderate motion does not push them out of the field of view.
_EDGE_MARGIN_VOXELS = 2
# The sampling region is the given mask grown by this much, so the brain's outer edge (the
# strongest gradients, and the ones that pin translations down) is included.
_MASK_DILATION_VOXELS = 2
_AFFINE_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class MotionEstimate:
    """The motion of one volume relative to the reference.

    Attributes
    ----------
    params : ndarray of shape (6,), float64
        ``(tx, ty, tz)`` in mm and ``(rx, ry, rz)`` in radians, in the module's convention.
    fd_mm : float
        Power framewise displacement from the previous estimate since the last reset, mm
        (0 for the first volume of a run).
    n_iterations : int
        Gauss-Newton iterations run.
    converged : bool
        Whether the last update moved points by less than the tolerance before the iteration
        limit.
    intensity_gain : float
        Estimated global intensity ratio moving / reference (1 when unchanged).
    """

    params: np.ndarray
    fd_mm: float
    n_iterations: int
    converged: bool
    intensity_gain: float = 1.0


def rotation_matrix(angles_rad: np.ndarray) -> np.ndarray:
    """Rotation ``Rx(rx) @ Ry(ry) @ Rz(rz)`` for angles about the world x, y, z axes.

    Parameters
    ----------
    angles_rad : array-like of shape (3,)
        ``(rx, ry, rz)`` in radians.

    Returns
    -------
    ndarray of shape (3, 3)

    Examples
    --------
    >>> np.round(rotation_matrix([0.0, 0.0, np.pi / 2]) @ [1.0, 0.0, 0.0], 6)
    array([0., 1., 0.])
    """
    rx, ry, rz = np.asarray(angles_rad, dtype=np.float64)
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    about_x = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    about_y = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    about_z = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    return about_x @ about_y @ about_z


def rigid_matrix(params: np.ndarray, centre_mm: np.ndarray) -> np.ndarray:
    """The world-to-world rigid transform ``T(p)`` of a parameter 6-vector.

    Parameters
    ----------
    params : array-like of shape (6,)
        ``(tx, ty, tz)`` in mm, ``(rx, ry, rz)`` in radians.
    centre_mm : array-like of shape (3,)
        World (RAS+) point the rotations are about, mm.

    Returns
    -------
    ndarray of shape (4, 4)
        Maps a reference world position to where that tissue is in the moving volume.

    Examples
    --------
    >>> rigid_matrix([1.0, 2.0, 3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0])[:3, 3]
    array([1., 2., 3.])
    """
    params = np.asarray(params, dtype=np.float64)
    centre_mm = np.asarray(centre_mm, dtype=np.float64)
    rotation = rotation_matrix(params[3:])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = centre_mm + params[:3] - rotation @ centre_mm
    return matrix


def rigid_params(matrix: np.ndarray, centre_mm: np.ndarray) -> np.ndarray:
    """The parameter 6-vector of a rigid world-to-world transform (inverse of :func:`rigid_matrix`).

    Parameters
    ----------
    matrix : array-like of shape (4, 4)
        A rigid transform (rotation and translation only).
    centre_mm : array-like of shape (3,)
        World point the rotations are about, mm.

    Returns
    -------
    ndarray of shape (6,)
        ``(tx, ty, tz)`` in mm, ``(rx, ry, rz)`` in radians with ``|ry| <= pi / 2``.

    Examples
    --------
    >>> p = np.array([0.5, -1.0, 2.0, 0.01, -0.02, 0.03])
    >>> bool(np.allclose(rigid_params(rigid_matrix(p, [10.0, 0, 5]), [10.0, 0, 5]), p))
    True
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    centre_mm = np.asarray(centre_mm, dtype=np.float64)
    rotation = matrix[:3, :3]
    ry = np.arcsin(np.clip(rotation[0, 2], -1.0, 1.0))
    rz = np.arctan2(-rotation[0, 1], rotation[0, 0])
    rx = np.arctan2(-rotation[1, 2], rotation[2, 2])
    translation = matrix[:3, 3] - centre_mm + rotation @ centre_mm
    return np.concatenate([translation, [rx, ry, rz]])


def framewise_displacement(params: np.ndarray, radius_mm: float = FD_RADIUS_MM) -> np.ndarray:
    """Power framewise displacement of a run's motion parameters.

    Parameters
    ----------
    params : array-like of shape (n_volumes, 6)
        Per-volume ``(tx, ty, tz)`` in mm and ``(rx, ry, rz)`` in radians.
    radius_mm : float, default=50.0
        Sphere radius that turns rotations into displacements, mm.

    Returns
    -------
    ndarray of shape (n_volumes,)
        FD in mm; the first volume's is 0.

    Examples
    --------
    >>> framewise_displacement([[0, 0, 0, 0, 0, 0], [0.1, -0.2, 0, 0.001, 0, 0]])
    array([0.  , 0.35])
    """
    params = np.asarray(params, dtype=np.float64)
    if params.ndim != 2 or params.shape[1] != 6:
        raise VolumeError(f"params: expected shape (n_volumes, 6) (got {params.shape})")
    steps = np.abs(np.diff(params, axis=0))
    fd_mm = steps[:, :3].sum(axis=1) + radius_mm * steps[:, 3:].sum(axis=1)
    return np.concatenate([[0.0], fd_mm])


def sample_trilinear(flat_data: np.ndarray, shape: tuple[int, int, int], ijk: np.ndarray) -> np.ndarray:
    """Trilinear values of a C-ordered volume at fractional voxel positions.

    Positions outside the grid take the value of the nearest edge.

    Parameters
    ----------
    flat_data : ndarray of shape (nx * ny * nz,)
        The volume raveled in C order.
    shape : tuple of int
        ``(nx, ny, nz)``.
    ijk : ndarray of shape (3, n_points)
        Fractional voxel indices.

    Returns
    -------
    ndarray of shape (n_points,), float32

    Examples
    --------
    >>> volume = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    >>> sample_trilinear(volume.ravel(), (2, 2, 2), np.array([[0.5], [0.5], [0.5]]))
    array([3.5], dtype=float32)
    """
    upper = np.asarray(shape, dtype=np.float64)[:, None] - 1.0
    ijk = np.clip(ijk, 0.0, upper)
    base = np.minimum(np.floor(ijk), np.maximum(upper - 1.0, 0.0))
    frac = (ijk - base).astype(np.float32)
    base = base.astype(np.intp)
    stride_x, stride_y = shape[1] * shape[2], shape[2]
    # A step of one voxel along an axis of length 1 must stay inside the array.
    step_x = stride_x if shape[0] > 1 else 0
    step_y = stride_y if shape[1] > 1 else 0
    step_z = 1 if shape[2] > 1 else 0
    index = base[0] * stride_x + base[1] * stride_y + base[2]
    fx, fy, fz = frac
    c00 = _lerp(flat_data, index, index + step_z, fz)
    c01 = _lerp(flat_data, index + step_y, index + step_y + step_z, fz)
    c10 = _lerp(flat_data, index + step_x, index + step_x + step_z, fz)
    c11 = _lerp(flat_data, index + step_x + step_y, index + step_x + step_y + step_z, fz)
    low = c00 + (c01 - c00) * fy
    high = c10 + (c11 - c10) * fy
    return (low + (high - low) * fx).astype(np.float32, copy=False)


def _lerp(flat_data: np.ndarray, index0: np.ndarray, index1: np.ndarray, frac: np.ndarray) -> np.ndarray:
    value0 = flat_data.take(index0)
    return value0 + (flat_data.take(index1) - value0) * frac


def sample_cubic_bspline(data: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Values of the cubic B-spline whose coefficients are the voxel values, at fractional positions.

    This is the image model of the motion fit (see the module notes): no prefilter, so at the
    grid points it is the data smoothed by ``[1, 4, 1] / 6`` along each axis, and the same
    model of reference and moving volume keeps small-shift estimates unbiased. Beyond the grid the
    coefficients repeat the nearest edge voxel.

    Parameters
    ----------
    data : ndarray of shape (nx, ny, nz), float32
        The volume (its values are the spline coefficients).
    ijk : ndarray of shape (3, n_points)
        Fractional voxel indices.

    Returns
    -------
    ndarray of shape (n_points,), float32

    Examples
    --------
    >>> volume = np.zeros((5, 5, 5), dtype=np.float32)
    >>> volume[2, 2, 2] = 216.0
    >>> sample_cubic_bspline(volume, np.array([[2.0, 3.0, 2.5], [2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]))
    array([64., 16., 46.], dtype=float32)
    """
    return ndimage.map_coordinates(data, ijk, order=3, prefilter=False, mode="nearest", output=np.float32)


def bspline_model(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cubic B-spline model of :func:`sample_cubic_bspline` and its gradient at every grid point.

    Parameters
    ----------
    data : ndarray of shape (nx, ny, nz), float32

    Returns
    -------
    values : ndarray of shape (nx, ny, nz), float32
        The model at the grid points: ``[1, 4, 1] / 6`` along each axis.
    gradient : ndarray of shape (nx, ny, nz, 3), float32
        Its derivative along each voxel axis, per voxel: the central difference along that axis,
        smoothed by ``[1, 4, 1] / 6`` along the other two (the exact derivative of the spline).

    Examples
    --------
    >>> ramp = np.broadcast_to(np.arange(6.0, dtype=np.float32)[:, None, None], (6, 6, 6))
    >>> values, gradient = bspline_model(ramp)
    >>> float(values[3, 3, 3]), gradient[3, 3, 3].tolist()
    (3.0, [1.0, 0.0, 0.0])
    """
    data = np.asarray(data, dtype=np.float32)
    smooth = np.array([1.0, 4.0, 1.0]) / 6.0
    derivative = np.array([-0.5, 0.0, 0.5])

    def along(array: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
        return ndimage.correlate1d(array, weights, axis=axis, mode="nearest")

    smooth_z = along(data, smooth, 2)
    smooth_yz = along(smooth_z, smooth, 1)
    smooth_xy = along(along(data, smooth, 0), smooth, 1)
    values = along(smooth_yz, smooth, 0)
    gradient = np.stack(
        [
            along(smooth_yz, derivative, 0),
            along(along(smooth_z, smooth, 0), derivative, 1),
            along(smooth_xy, derivative, 2),
        ],
        axis=-1,
    )
    return values, gradient


class MotionCorrector:
    """Rigid motion correction of each volume of a run to one reference volume.

    Use: :meth:`set_reference` once (it does all the reference-only work), then per volume
    :meth:`estimate` and :meth:`resample_mask`, or :meth:`correct` for both. :meth:`reset` starts
    a new run (clears the warm start and the framewise-displacement history).

    Parameters
    ----------
    max_iterations : int, default=10
        Gauss-Newton iterations per volume at most.
    tolerance_mm : float, default=0.005
        Stop when an update moves points by less than this, measured like FD (translation
        changes in mm plus rotation changes as arc length on a 50 mm sphere).
    n_samples : int, default=10000
        How many reference voxels the fit samples (those with the strongest gradient).

    Attributes
    ----------
    centre_mm_ : ndarray of shape (3,)
        World point the rotations are about (centre of the reference grid), mm.
    sample_ijk_ : ndarray of shape (n_samples, 3), int
        Voxel indices of the sample points.
    params_ : ndarray of shape (6,)
        The warm start of the next volume: the last estimate (or, after one that did not
        converge, whichever of it and the last converged estimate fits the next volume better).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> reference = ndimage.gaussian_filter(rng.random((24, 24, 24)), 2.0).astype(np.float32)
    >>> affine = np.diag([3.0, 3.0, 3.0, 1.0])
    >>> corrector = MotionCorrector(n_samples=3000).set_reference(reference, affine, None)
    >>> float(corrector.estimate(reference).fd_mm)
    0.0
    """

    def __init__(self, max_iterations: int = 10, tolerance_mm: float = 0.005, n_samples: int = 10000) -> None:
        self.max_iterations = max_iterations
        self.tolerance_mm = tolerance_mm
        self.n_samples = n_samples

    def set_reference(
        self, reference: np.ndarray, affine: np.ndarray, mask: np.ndarray | None = None
    ) -> MotionCorrector:
        """Fix the reference volume and precompute everything that depends only on it.

        Parameters
        ----------
        reference : ndarray of shape (nx, ny, nz)
            The reference volume (e.g. the first volume of the session, or a mean).
        affine : ndarray of shape (4, 4)
            Voxel-to-world (RAS+, mm) transform of the reference and of every volume to correct.
        mask : ndarray of bool, shape (nx, ny, nz), optional
            Region whose motion is estimated, normally the brain mask; it is grown by two voxels
            so that the brain's edge is included. ``None`` samples the whole field of view.

        Returns
        -------
        MotionCorrector
            ``self``.
        """
        self._check_settings()
        reference = _as_volume_array(reference, "reference")
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise VolumeError(f"affine: expected a finite (4, 4) matrix (got shape {affine.shape})")
        if np.linalg.matrix_rank(affine[:3, :3]) < 3:
            raise VolumeError("affine: the 3x3 voxel-to-world part is singular")
        shape = reference.shape
        if min(shape) < 2 * _EDGE_MARGIN_VOXELS + 2:
            raise VolumeError(
                f"reference: expected at least {2 * _EDGE_MARGIN_VOXELS + 2} voxels along each axis (got shape {shape})"
            )
        region = self._sampling_region(shape, mask)

        voxel_to_world = affine[:3, :3]
        # d/dx of I(A^-1 x) is A^-T times the gradient in voxel steps.
        world_from_voxel_gradient = np.linalg.inv(voxel_to_world).T
        # Values and gradients of the same B-spline model that estimate() samples the moving
        # volume with: a model mismatch between the two sides biases small motions (module notes).
        model_values, gradient_voxel = bspline_model(reference)
        gradient_world = gradient_voxel @ world_from_voxel_gradient.T
        magnitude = np.linalg.norm(gradient_world, axis=-1)
        candidates = np.flatnonzero(region & (magnitude > 0))
        if candidates.size < 50:
            raise VolumeError(
                f"reference: too little contrast to register ({candidates.size} voxels with a "
                "non-zero gradient in the sampling region; expected at least 50)"
            )
        n_keep = min(self.n_samples, candidates.size)
        # Strongest gradients carry most of the information about the motion.
        strongest = candidates[np.argpartition(magnitude.ravel()[candidates], -n_keep)[-n_keep:]]
        strongest.sort()
        sample_ijk = np.stack(np.unravel_index(strongest, shape), axis=1)

        centre_mm = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + affine[:3, 3]
        world = sample_ijk @ voxel_to_world.T + affine[:3, 3]
        offset = world - centre_mm
        grad = gradient_world.reshape(-1, 3)[strongest]
        reference_values = model_values.ravel()[strongest]
        # Columns: 3 translations, 3 small rotations (grad . (w x d) = w . (d x grad)) and a
        # global intensity gain, so a drifting scanner gain is not mistaken for motion.
        steepest = np.column_stack([grad, np.cross(offset, grad), reference_values]).astype(np.float64)
        hessian = steepest.T @ steepest
        if np.linalg.cond(hessian) > 1e12:
            raise VolumeError(
                "reference: the sampled gradients do not constrain all 6 motion parameters; "
                "use a reference with anatomy (not a flat or one-dimensional image)"
            )

        self.affine_ = affine
        self.world_to_voxel_ = np.linalg.inv(affine)
        self.shape_ = shape
        self.centre_mm_ = centre_mm
        self.sample_ijk_ = sample_ijk
        self._sample_world_h = np.column_stack([world, np.ones(len(world))]).T  # (4, n_samples)
        self._reference_values = reference_values.astype(np.float32)
        self._update_operator = np.linalg.solve(hessian, steepest.T)  # (7, n_samples)
        self._reference_values_centred = self._reference_values - self._reference_values.mean()
        self.reset()
        logger.debug("motion reference set: shape %s, %d sample points", shape, n_keep)
        return self

    def reset(self) -> None:
        """Start a new run: warm start from zero motion and restart framewise displacement."""
        self._require_reference("reset")
        self.params_ = np.zeros(6)
        self._previous_params: np.ndarray | None = None
        # The last estimate that converged: the fallback warm start after one that did not.
        self._converged_params = np.zeros(6)
        self._last_fit_converged = True

    def continue_from(self, params: np.ndarray) -> None:
        """Take up a run after a restart: the last estimate before it is the warm start and the FD baseline."""
        self._require_reference("continue_from")
        params = np.asarray(params, dtype=np.float64)
        if params.shape != (6,) or not np.all(np.isfinite(params)):
            raise VolumeError(f"motion parameters: expected 6 finite values (got shape {params.shape})")
        self.params_ = params.copy()
        self._previous_params = params.copy()
        # Whether that fit converged is not known; it is the best start there is.
        self._converged_params = params.copy()
        self._last_fit_converged = True

    def estimate(self, volume_data: np.ndarray) -> MotionEstimate:
        """Estimate the rigid motion of one volume relative to the reference.

        The fit starts from the previous volume's estimate (see :attr:`params_`); a volume whose
        fit does not converge within ``max_iterations`` is still reported (``converged=False``),
        e.g. a sudden turn of tens of degrees, which needs more iterations.

        Parameters
        ----------
        volume_data : ndarray of shape (nx, ny, nz)
            The moving volume on the reference's grid (same shape and affine).

        Returns
        -------
        MotionEstimate
        """
        self._require_reference("estimate")
        data = self._volume_array(volume_data, "volume_data")
        centre = self.centre_mm_
        transform = rigid_matrix(self._warm_start(data), centre)
        converged = False
        gain = 1.0
        n_iterations = 0
        while n_iterations < self.max_iterations:
            n_iterations += 1
            moving_values = sample_cubic_bspline(data, self._sample_positions(transform))
            solution = self._update_operator @ (moving_values - self._reference_values)
            if not np.all(np.isfinite(solution)):
                raise VolumeError(
                    "volume_data: the motion fit gave non-finite parameters; expected finite "
                    "voxel values (the volume holds NaN or inf)"
                )
            step, gain = solution[:6], 1.0 + float(solution[6])
            # Inverse-compositional update: T <- T o T(step)^-1.
            transform = transform @ np.linalg.inv(rigid_matrix(step, centre))
            step_mm = np.abs(step[:3]).sum() + FD_RADIUS_MM * np.abs(step[3:]).sum()
            if step_mm < self.tolerance_mm:
                converged = True
                break
        params = rigid_params(transform, centre)
        previous = self._previous_params
        fd_mm = 0.0 if previous is None else float(framewise_displacement([previous, params])[1])
        self.params_ = params
        self._previous_params = params
        self._last_fit_converged = converged
        if converged:
            self._converged_params = params
        else:
            logger.debug("motion fit did not converge in %d iterations: %s", n_iterations, params)
        return MotionEstimate(
            params=params.copy(),
            fd_mm=fd_mm,
            n_iterations=n_iterations,
            converged=converged,
            intensity_gain=gain,
        )

    def _sample_positions(self, transform: np.ndarray) -> np.ndarray:
        """Voxel positions (3, n_samples) in the moving volume of the sample points under ``transform``."""
        return (self.world_to_voxel_ @ transform @ self._sample_world_h)[:3]

    def _warm_start(self, data: np.ndarray) -> np.ndarray:
        """Starting parameters for ``data``: the last estimate, unless that one did not converge.

        A fit that stopped at the iteration limit can be far off (e.g. a large sudden motion, or
        a volume that no rigid transform fits); starting the next volume there made its fit
        start far from the answer and fail too. Then the start is whichever of that estimate and
        the last converged one (zero motion if none) correlates better with the reference at the
        sample points, so that a real, lasting large motion is still followed from where the
        last fit got to. Costs one extra sampling of the volume, only after a failed fit.
        """
        start, fallback = self.params_, self._converged_params
        if self._last_fit_converged or np.array_equal(start, fallback):
            return start
        scores = []
        for candidate in (start, fallback):
            values = sample_cubic_bspline(data, self._sample_positions(rigid_matrix(candidate, self.centre_mm_)))
            scores.append(_correlation(values, self._reference_values_centred))
        return start if scores[0] >= scores[1] else fallback

    def resample_mask(self, volume_data: np.ndarray, params: np.ndarray, mask_ijk: np.ndarray) -> np.ndarray:
        """Values of the moving volume at the mask voxels, undoing the estimated motion.

        Parameters
        ----------
        volume_data : ndarray of shape (nx, ny, nz)
            The moving volume.
        params : array-like of shape (6,)
            Its motion (from :meth:`estimate`).
        mask_ijk : ndarray of shape (n_voxels, 3), int
            Reference-grid indices of the voxels to read (e.g. :attr:`VoxelMask.ijk`).

        Returns
        -------
        ndarray of shape (n_voxels,), float32
            Trilinear values at the tissue positions the mask voxels had in the reference.
        """
        self._require_reference("resample_mask")
        flat = self._volume_array(volume_data, "volume_data").ravel()
        params = np.asarray(params, dtype=np.float64)
        if params.shape != (6,) or not np.all(np.isfinite(params)):
            raise VolumeError(f"params: expected 6 finite numbers (got shape {params.shape})")
        mask_ijk = self._check_mask_ijk(mask_ijk)
        voxel_transform = self.world_to_voxel_ @ rigid_matrix(params, self.centre_mm_) @ self.affine_
        positions = voxel_transform[:3, :3] @ mask_ijk.T + voxel_transform[:3, 3:4]
        return sample_trilinear(flat, self.shape_, positions)

    def correct(self, volume: Volume, mask_ijk: np.ndarray) -> tuple[np.ndarray, MotionEstimate]:
        """Estimate a volume's motion and read its mask voxels at the corrected positions.

        Parameters
        ----------
        volume : Volume
            The moving volume; its shape and affine must match the reference.
        mask_ijk : ndarray of shape (n_voxels, 3), int
            Reference-grid indices of the voxels to read.

        Returns
        -------
        values : ndarray of shape (n_voxels,), float32
        estimate : MotionEstimate
        """
        self._require_reference("correct")
        where = str(volume.source) if volume.source is not None else f"volume {volume.index}"
        if tuple(volume.data.shape) != self.shape_:
            raise VolumeError(
                f"{where}: data: expected shape {self.shape_} like the motion reference "
                f"(got {tuple(volume.data.shape)})"
            )
        affine = np.asarray(volume.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.allclose(affine, self.affine_, atol=_AFFINE_TOLERANCE_MM):
            raise VolumeError(
                f"{where}: affine: expected the motion reference's voxel-to-world matrix within "
                f"{_AFFINE_TOLERANCE_MM} mm (largest difference "
                f"{_largest_difference(affine, self.affine_)})"
            )
        estimate = self.estimate(volume.data)
        return self.resample_mask(volume.data, estimate.params, mask_ijk), estimate

    def _check_settings(self) -> None:
        if not isinstance(self.max_iterations, int) or self.max_iterations < 1:
            raise ConfigError(f"max_iterations: expected an integer >= 1 (got {self.max_iterations!r})")
        if not self.tolerance_mm > 0:
            raise ConfigError(f"tolerance_mm: expected a positive number (got {self.tolerance_mm!r})")
        if not isinstance(self.n_samples, int) or self.n_samples < 100:
            raise ConfigError(f"n_samples: expected an integer >= 100 (got {self.n_samples!r})")

    def _sampling_region(self, shape: tuple[int, int, int], mask: np.ndarray | None) -> np.ndarray:
        region = np.zeros(shape, dtype=bool)
        m = _EDGE_MARGIN_VOXELS
        region[m:-m, m:-m, m:-m] = True
        if mask is None:
            return region
        mask = np.asarray(mask)
        if mask.shape != shape:
            raise VolumeError(f"mask: expected shape {shape} like the reference (got {mask.shape})")
        if mask.dtype != bool:
            raise VolumeError(f"mask: expected a boolean array (got dtype {mask.dtype})")
        if not mask.any():
            raise VolumeError("mask: expected at least one True voxel (got an empty mask)")
        grown = ndimage.binary_dilation(mask, iterations=_MASK_DILATION_VOXELS)
        return region & grown

    def _require_reference(self, method: str) -> None:
        if not hasattr(self, "affine_"):
            raise OrderError(
                f"MotionCorrector.{method}() called before set_reference(); call "
                "set_reference(reference, affine, mask) first"
            )

    def _volume_array(self, volume_data: np.ndarray, name: str) -> np.ndarray:
        volume_data = np.asarray(volume_data)
        if volume_data.shape != self.shape_:
            raise VolumeError(
                f"{name}: expected shape {self.shape_} like the motion reference (got {volume_data.shape})"
            )
        return np.ascontiguousarray(volume_data, dtype=np.float32)

    def _check_mask_ijk(self, mask_ijk: np.ndarray) -> np.ndarray:
        mask_ijk = np.asarray(mask_ijk)
        if mask_ijk.ndim != 2 or mask_ijk.shape[1] != 3:
            raise VolumeError(f"mask_ijk: expected shape (n_voxels, 3) (got {mask_ijk.shape})")
        if not np.issubdtype(mask_ijk.dtype, np.integer):
            raise VolumeError(f"mask_ijk: expected integer voxel indices (got dtype {mask_ijk.dtype})")
        if mask_ijk.size and (mask_ijk.min() < 0 or np.any(mask_ijk.max(axis=0) >= self.shape_)):
            raise VolumeError(
                f"mask_ijk: expected indices inside the reference grid {self.shape_} "
                f"(got range {mask_ijk.min(axis=0).tolist()}..{mask_ijk.max(axis=0).tolist()})"
            )
        return mask_ijk.astype(np.float64)


def _as_volume_array(data: np.ndarray, name: str) -> np.ndarray:
    data = np.asarray(data)
    if data.ndim != 3:
        raise VolumeError(f"{name}: expected a 3D array (nx, ny, nz) (got shape {data.shape})")
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise VolumeError(f"{name}: expected real numbers (got dtype {data.dtype})")
    data = data.astype(np.float32)
    if not np.all(np.isfinite(data)):
        raise VolumeError(f"{name}: expected finite values (found NaN or inf)")
    return data


def _correlation(values: np.ndarray, centred_reference: np.ndarray) -> float:
    """Pearson correlation of sampled values with mean-removed reference values (-1 when flat)."""
    centred = values - values.mean()
    norm = float(np.linalg.norm(centred) * np.linalg.norm(centred_reference))
    return float(centred @ centred_reference) / norm if norm > 0 else -1.0


def _largest_difference(a: np.ndarray, b: np.ndarray) -> str:
    if a.shape != b.shape:
        return f"shape {a.shape} vs {b.shape}"
    return f"{np.abs(a - b).max():.4g}"
