"""Bringing a mask drawn elsewhere onto the motion reference's grid: reoriented, registered or resampled.

The decoder reads its voxels on the grid of the motion reference (the volume calibration
registers every volume to). A lab's mask rarely starts there. :func:`mask_to_reference` takes a
:class:`MaskSource` and handles the three cases, never silently:

1. The mask is on the reference grid, maybe in another voxel order (SPM, FSL and dcm2niix
   reverse the DICOM's second axis): it is reoriented, a view of the array, no resampling
   (:mod:`rtdecoder.preprocess.orientation`).
2. It was drawn on another volume of the subject (an earlier run or session, a mean EPI),
   named by ``space``: that volume is rigidly registered to the reference
   (:func:`register_rigid`, with the project's own motion correction,
   :class:`~rtdecoder.preprocess.motion.MotionCorrector`), and the mask is carried through the
   estimated transform onto the reference grid (:func:`resample_mask`: trilinear interpolation of
   the 0/1 mask, then a threshold of 0.5). The residual transform and the registration cost are
   logged and recorded in the mask's provenance.
3. It is on another grid in the same world space and ``resample`` is set: it is resampled by
   world coordinates (:func:`resample_mask` without a transform).

Anything else is an error naming both grids and the options.

Transform convention
--------------------
:class:`RigidRegistration` uses the motion module's convention: ``params`` maps a reference world
position ``x`` to the position ``T(p)(x)`` where the same tissue is in the other volume, so
``other(T(p)(x)) = reference(x)``; a mask drawn on the other volume is read on the reference grid
at ``T(p)`` of each reference voxel's world position.

Registration cost
-----------------
``1 - r``, with ``r`` the Pearson correlation between the reference and the registered volume at
the fit's sample points (the reference voxels with the strongest gradient): 0 for a perfect match,
about 1 for unrelated images. Recorded before and after the fit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from rtdecoder.errors import VolumeError
from rtdecoder.preprocess.mask import VoxelMask
from rtdecoder.preprocess.motion import MotionCorrector, rigid_matrix
from rtdecoder.preprocess.orientation import describe_grid, find_grid_transform, match_grid

logger = logging.getLogger(__name__)

MASK_THRESHOLD = 0.5
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Coarse to fine: a smoothed pass first widens the capture range of the Gauss-Newton fit (masks
# from another session can be several mm and degrees off), the unsmoothed pass then refines.
_SMOOTHING_VOXELS = (2.0, 0.0)
# The other volume may not cover the reference's whole field of view; sample points are kept this
# far inside the covered part so that the fit never reads the padding.
_COVERAGE_MARGIN_VOXELS = 3


@dataclass(frozen=True)
class MaskSource:
    """A mask file and how to bring it onto the reference grid.

    Attributes
    ----------
    path : Path
        A 0/1 NIfTI mask.
    space : Path or None
        The volume the mask was drawn on (NIfTI or DICOM); it is registered to the reference.
    resample : bool
        Resample a mask on another grid by world coordinates (without ``space``: same world
        space assumed; with it: a mask not on that volume's grid is accepted too).
    """

    path: Path
    space: Path | None = None
    resample: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.space is not None:
            object.__setattr__(self, "space", Path(self.space))


@dataclass(frozen=True, eq=False)
class RigidRegistration:
    """A rigid registration of a volume to a reference.

    Attributes
    ----------
    params : ndarray of shape (6,)
        ``(tx, ty, tz)`` in mm and ``(rx, ry, rz)`` in radians, in the motion module's convention
        (see the module notes).
    centre_mm : ndarray of shape (3,)
        World point the rotations are about (the reference grid's centre), mm.
    cost_before, cost : float
        ``1 - correlation`` at the sample points before (identity) and after the fit.
    converged : bool
        Whether the last Gauss-Newton update was below the tolerance.
    n_iterations : int
        Gauss-Newton iterations over all levels.
    """

    params: np.ndarray
    centre_mm: np.ndarray
    cost_before: float
    cost: float
    converged: bool
    n_iterations: int

    @property
    def shift_mm(self) -> np.ndarray:
        """Translation ``(tx, ty, tz)``, mm, shape (3,)."""
        return np.asarray(self.params[:3], dtype=np.float64)

    @property
    def rotation_deg(self) -> np.ndarray:
        """Rotation ``(rx, ry, rz)`` about the world axes, degrees, shape (3,)."""
        return np.degrees(np.asarray(self.params[3:], dtype=np.float64))

    def matrix(self) -> np.ndarray:
        """The world-to-world transform ``T(p)``, shape (4, 4)."""
        return rigid_matrix(self.params, self.centre_mm)

    def summary(self) -> str:
        """One line: translation in mm, rotation in degrees, cost before and after."""
        shift = ", ".join(f"{v:+.2f}" for v in self.shift_mm)
        rotation = ", ".join(f"{v:+.2f}" for v in self.rotation_deg)
        return (
            f"shift ({shift}) mm (|t| {np.linalg.norm(self.shift_mm):.2f} mm), rotation ({rotation}) deg "
            f"about the reference grid centre; cost (1 - correlation) {self.cost_before:.4f} -> {self.cost:.4f}"
            + ("" if self.converged else " (not converged)")
        )

    def as_dict(self) -> dict:
        """JSON-ready record (for the bundle's metadata)."""
        return {
            "shift_mm": [round(float(v), 4) for v in self.shift_mm],
            "rotation_deg": [round(float(v), 4) for v in self.rotation_deg],
            "cost_before": round(self.cost_before, 6),
            "cost": round(self.cost, 6),
            "converged": self.converged,
            "n_iterations": self.n_iterations,
        }


def read_volume_file(path: str | Path, what: str = "volume") -> tuple[np.ndarray, np.ndarray]:
    """A 3D volume and its affine from a NIfTI or DICOM file (e.g. a mean EPI, a reference).

    Parameters
    ----------
    path : str or Path
        NIfTI (``.nii``, ``.nii.gz``; 3D, or 4D with one volume) or a DICOM volume (MOSAIC or
        enhanced, read with :func:`rtdecoder.ingest.readers.read_volume`).
    what : str, default="volume"
        The option or field the file was given as, named in errors (e.g. ``"--mask-space"``).

    Returns
    -------
    data : ndarray of shape (nx, ny, nz), float32
    affine : ndarray of shape (4, 4)
        Voxel-to-world (RAS+, mm).
    """
    path = Path(path)
    if not path.is_file():
        raise VolumeError(f"{path}: {what}: expected a NIfTI or DICOM volume file (no such file)")
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        try:
            image = nib.load(path)
            data = np.asarray(image.dataobj, dtype=np.float32)
        except (OSError, ValueError, EOFError, nib.filebasedimages.ImageFileError) as err:
            raise VolumeError(f"{path}: {what}: cannot read NIfTI: {err}") from None
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise VolumeError(
                f"{path}: {what}: expected one 3D volume (got shape {data.shape}); give one volume of the "
                "series or its mean (e.g. nilearn.image.mean_img)"
            )
        affine = np.asarray(image.affine, dtype=np.float64)
    else:
        from rtdecoder.ingest.readers import read_volume

        volume = read_volume(path, index_hint=0)
        data, affine = np.asarray(volume.data, dtype=np.float32), np.asarray(volume.affine, dtype=np.float64)
    if not np.all(np.isfinite(data)):
        raise VolumeError(f"{path}: {what}: expected finite voxel values (found NaN or inf)")
    return data, affine


def resample_to_grid(
    data: np.ndarray,
    affine: np.ndarray,
    target_shape: tuple[int, ...],
    target_affine: np.ndarray,
    world_transform: np.ndarray | None = None,
    order: int = 1,
    cval: float = 0.0,
) -> np.ndarray:
    """Resample a volume onto another grid by world coordinates.

    The value at target voxel ``v`` is ``data`` at voxel ``inv(affine) @ W @ target_affine @ v``,
    with ``W`` the world transform (identity when None).

    Parameters
    ----------
    data : ndarray of shape (nx, ny, nz)
    affine : ndarray of shape (4, 4)
        Voxel-to-world of ``data`` (RAS+, mm).
    target_shape : tuple of int
    target_affine : ndarray of shape (4, 4)
    world_transform : ndarray of shape (4, 4), optional
        Maps a target world position to where the same tissue is in ``data``'s world
        (:meth:`RigidRegistration.matrix`).
    order : int, default=1
        Spline order: 0 nearest, 1 trilinear.
    cval : float, default=0.0
        Value outside ``data``'s field of view.

    Returns
    -------
    ndarray of shape target_shape, float32
    """
    world = np.eye(4) if world_transform is None else np.asarray(world_transform, dtype=np.float64)
    voxel_map = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ world @ np.asarray(target_affine, np.float64)
    return ndimage.affine_transform(
        np.asarray(data, dtype=np.float32), voxel_map[:3, :3], voxel_map[:3, 3],
        # "grid-constant": beyond the edge is cval, but a point a hair outside the edge voxel still
        # interpolates with it (plain "constant" would drop the edge voxels of an unmoved mask).
        output_shape=tuple(int(n) for n in target_shape[:3]), order=order, mode="grid-constant", cval=cval,
    ).astype(np.float32)


def resample_mask(
    mask: np.ndarray,
    mask_affine: np.ndarray,
    target_shape: tuple[int, ...],
    target_affine: np.ndarray,
    world_transform: np.ndarray | None = None,
    method: str = "linear",
) -> np.ndarray:
    """A 0/1 mask carried onto another grid (optionally through a rigid transform).

    Parameters
    ----------
    mask : ndarray of bool, shape (nx, ny, nz)
    mask_affine : ndarray of shape (4, 4)
    target_shape : tuple of int
    target_affine : ndarray of shape (4, 4)
    world_transform : ndarray of shape (4, 4), optional
        As for :func:`resample_to_grid`.
    method : {"linear", "nearest"}, default="linear"
        ``"linear"``: trilinear interpolation of the 0/1 mask, then ``>= 0.5`` (keeps the mask's
        volume about the same when voxel sizes differ); ``"nearest"``: nearest voxel.

    Returns
    -------
    ndarray of bool, shape target_shape

    Examples
    --------
    >>> mask = np.zeros((4, 4, 4), dtype=bool)
    >>> mask[1, 2, 3] = True
    >>> shift = np.eye(4)
    >>> shift[0, 3] = 1.0  # the target's voxel i sits where the mask's voxel i + 1 is
    >>> np.argwhere(resample_mask(mask, np.eye(4), (4, 4, 4), shift)).tolist()
    [[0, 2, 3]]
    """
    if method not in ("linear", "nearest"):
        raise VolumeError(f"method: expected 'linear' or 'nearest' (got {method!r})")
    values = resample_to_grid(
        np.asarray(mask, dtype=np.float32), mask_affine, target_shape, target_affine, world_transform,
        order=1 if method == "linear" else 0,
    )
    # A hair below 0.5 so that a voxel exactly half inside (e.g. half-voxel shifts) stays in.
    return values >= MASK_THRESHOLD - 1e-6


def register_rigid(
    moving: np.ndarray,
    moving_affine: np.ndarray,
    reference: np.ndarray,
    reference_affine: np.ndarray,
    n_samples: int = 30000,
    max_iterations: int = 100,
    tolerance_mm: float = 1e-3,
    smoothing_voxels: Sequence[float] = _SMOOTHING_VOXELS,
    moving_name: str = "moving volume",
) -> RigidRegistration:
    """Rigidly register a volume of the subject to the motion reference.

    The volume is first put on the reference grid: reoriented when it is the same grid in another
    voxel order, otherwise resampled by world coordinates (trilinear; the fit then samples only
    where it covers the reference's field of view). The rigid transform is then estimated by
    :class:`~rtdecoder.preprocess.motion.MotionCorrector` (inverse-compositional Gauss-Newton with
    a global intensity gain), coarse to fine over Gaussian-smoothed copies of both volumes.

    Parameters
    ----------
    moving : ndarray of shape (mx, my, mz)
        The other volume (e.g. the mean EPI a mask was drawn on).
    moving_affine : ndarray of shape (4, 4)
        Its voxel-to-world (RAS+, mm).
    reference : ndarray of shape (nx, ny, nz)
        The motion reference.
    reference_affine : ndarray of shape (4, 4)
    n_samples : int, default=30000
        Sample points of the fit (reference voxels with the strongest gradient).
    max_iterations : int, default=100
        Gauss-Newton iterations per smoothing level at most.
    tolerance_mm : float, default=0.001
        Convergence threshold of an update, mm (as :class:`MotionCorrector`).
    smoothing_voxels : sequence of float, default=(2.0, 0.0)
        Gaussian standard deviation of each level, in reference voxels (0: unsmoothed).
    moving_name : str
        Named in errors.

    Returns
    -------
    RigidRegistration
    """
    reference = np.asarray(reference, dtype=np.float32)
    reference_affine = np.asarray(reference_affine, dtype=np.float64)
    moving = np.asarray(moving, dtype=np.float32)
    moving_affine = np.asarray(moving_affine, dtype=np.float64)
    if moving.ndim != 3:
        raise VolumeError(f"{moving_name}: expected a 3D volume (got shape {moving.shape})")
    match = find_grid_transform(moving.shape, moving_affine, reference.shape, reference_affine)
    if match.matches():
        on_grid = np.ascontiguousarray(match.transform.apply(moving))
        region = None
    else:
        on_grid = resample_to_grid(moving, moving_affine, reference.shape, reference_affine)
        covered = resample_to_grid(np.ones(moving.shape, np.float32), moving_affine, reference.shape, reference_affine)
        region = ndimage.binary_erosion(covered > 0.999, iterations=_COVERAGE_MARGIN_VOXELS)
        if region.sum() < 1000:
            raise VolumeError(
                f"{moving_name}: grid {describe_grid(moving.shape, moving_affine)} hardly overlaps the reference "
                f"grid {describe_grid(reference.shape, reference_affine)} ({int(region.sum())} voxels in common); "
                "expected a volume of the same subject covering the same part of the head"
            )
    params = np.zeros(6)
    corrector = MotionCorrector(max_iterations=max_iterations, tolerance_mm=tolerance_mm, n_samples=n_samples)
    n_iterations, converged = 0, False
    for sigma in smoothing_voxels:
        fixed = ndimage.gaussian_filter(reference, sigma) if sigma > 0 else reference
        other = ndimage.gaussian_filter(on_grid, sigma) if sigma > 0 else on_grid
        corrector.set_reference(fixed, reference_affine, region)
        corrector.params_ = params  # warm start from the coarser level
        estimate = corrector.estimate(other)
        params, converged = estimate.params, estimate.converged
        n_iterations += estimate.n_iterations
    # The cost is measured on the unsmoothed images, at the last level's sample points.
    if smoothing_voxels[-1] > 0:
        corrector.set_reference(reference, reference_affine, region)
    sample_values = reference[tuple(corrector.sample_ijk_.T)]
    cost_before = _cost(sample_values, corrector.resample_mask(on_grid, np.zeros(6), corrector.sample_ijk_))
    cost = _cost(sample_values, corrector.resample_mask(on_grid, params, corrector.sample_ijk_))
    return RigidRegistration(
        params=np.asarray(params, dtype=np.float64).copy(),
        centre_mm=corrector.centre_mm_.copy(),
        cost_before=cost_before,
        cost=cost,
        converged=converged,
        n_iterations=n_iterations,
    )


def mask_to_reference(
    source: MaskSource | str | Path,
    reference: np.ndarray,
    reference_affine: np.ndarray,
    reference_name: str = "the motion reference",
) -> VoxelMask:
    """A mask file on the motion reference's grid: as is, reoriented, registered or resampled.

    See the module notes for the three cases.

    Parameters
    ----------
    source : MaskSource, str or Path
        The mask file (a path alone: case 1 only).
    reference : ndarray of shape (nx, ny, nz)
        The motion reference volume (used to register ``source.space``).
    reference_affine : ndarray of shape (4, 4)
        Its voxel-to-world (RAS+, mm); the returned mask takes it exactly.
    reference_name : str
        Named in messages (e.g. ``"the motion reference (run-01/vol_00100.nii)"``).

    Returns
    -------
    VoxelMask
        On the reference grid; :attr:`VoxelMask.provenance` says how it got there (for a
        registration: the transform in mm and degrees and the cost).

    Raises
    ------
    VolumeError
        Naming the file, both grids and what to do, when the mask is on another grid and neither
        ``space`` nor ``resample`` is given, or when nothing of it lands on the reference grid.
    """
    if not isinstance(source, MaskSource):
        source = MaskSource(Path(source))
    reference = np.asarray(reference, dtype=np.float32)
    reference_affine = np.asarray(reference_affine, dtype=np.float64)
    shape = tuple(reference.shape)
    drawn = VoxelMask.from_nifti(source.path)
    if source.space is None:
        match = find_grid_transform(drawn.shape, drawn.affine, shape, reference_affine)
        if match.matches() or not source.resample:
            return drawn.on_grid(shape, reference_affine, reference_name, hint=_hint(reference_name))
        grid = resample_mask(drawn.grid, drawn.affine, shape, reference_affine)
        provenance = {"file": str(source.path), "method": "resampled", "interpolation": "trilinear >= 0.5"}
        logger.info(
            "%s: mask on another grid (%s) resampled by world coordinates onto %s",
            source.path, describe_grid(drawn.shape, drawn.affine), reference_name,
        )
        return _resampled_mask(grid, drawn, reference_affine, reference_name, provenance)

    space_data, space_affine = read_volume_file(source.space, "--mask-space")
    if not source.resample:
        match_grid(
            drawn.shape, drawn.affine, space_data.shape, space_affine, f"{source.path}: mask",
            f"the volume it was drawn on ({source.space}, --mask-space)",
            hint="; a mask drawn on that volume is on its grid (add --resample-mask to resample a mask on "
            "another grid in that volume's space)",
        )
    registration = register_rigid(
        space_data, space_affine, reference, reference_affine, moving_name=f"{source.space}: --mask-space"
    )
    logger.info(
        "%s (--mask-space) registered to %s: %s", source.space, reference_name, registration.summary()
    )
    if not registration.converged or registration.cost > registration.cost_before:
        logger.warning(
            "%s: the registration to %s %s; check the mask on the reference before decoding with it",
            source.space, reference_name,
            "did not converge" if not registration.converged else "did not lower the cost",
        )
    grid = resample_mask(drawn.grid, drawn.affine, shape, reference_affine, registration.matrix())
    provenance = {
        "file": str(source.path),
        "method": "registered",
        "space": str(source.space),
        "interpolation": "trilinear >= 0.5",
        "registration": registration.as_dict(),
    }
    return _resampled_mask(grid, drawn, reference_affine, reference_name, provenance)


def describe_provenance(provenance: dict) -> str:
    """One line for the command line: how the mask reached the reference grid."""
    method = provenance.get("method", "as given")
    line = f"mask {provenance.get('file', '?')}: {method}"
    if "reoriented" in provenance:
        line += f", reoriented to the reference's voxel order as file axes {provenance['reoriented']}"
    registration = provenance.get("registration")
    if registration:
        shift = ", ".join(f"{v:+.2f}" for v in registration["shift_mm"])
        rotation = ", ".join(f"{v:+.2f}" for v in registration["rotation_deg"])
        line += (
            f" from {provenance.get('space')}: shift ({shift}) mm, rotation ({rotation}) deg, cost (1 - correlation) "
            f"{registration['cost_before']:.4f} -> {registration['cost']:.4f}"
        )
    if "n_voxels_drawn" in provenance:
        line += f"; {provenance['n_voxels_drawn']} voxels drawn -> {provenance['n_voxels']} on the reference grid"
    return line


def _resampled_mask(
    grid: np.ndarray,
    drawn: VoxelMask,
    reference_affine: np.ndarray,
    reference_name: str,
    provenance: dict,
) -> VoxelMask:
    if not grid.any():
        raise VolumeError(
            f"{drawn.source}: mask: no voxel lands on {reference_name} "
            f"{describe_grid(grid.shape, reference_affine)} (mask grid {describe_grid(drawn.shape, drawn.affine)}); "
            "expected a mask of the part of the head the reference covers"
        )
    # Expected count: the drawn volume in mm^3 over the reference's voxel volume.
    expected = drawn.n_voxels * abs(np.linalg.det(drawn.affine[:3, :3])) / abs(np.linalg.det(reference_affine[:3, :3]))
    provenance.update({"n_voxels_drawn": drawn.n_voxels, "n_voxels": int(grid.sum())})
    if grid.sum() < 0.8 * expected:
        logger.warning(
            "%s: only %d voxels on %s where about %.0f were expected from the mask's volume; part of the mask "
            "lies outside the reference's field of view", drawn.source, int(grid.sum()), reference_name, expected,
        )
    logger.info("%s", describe_provenance(provenance))
    return VoxelMask(grid, reference_affine, source=drawn.source, provenance=provenance)


def _cost(reference_values: np.ndarray, values: np.ndarray) -> float:
    a = np.asarray(reference_values, np.float64) - np.mean(reference_values)
    b = np.asarray(values, np.float64) - np.mean(values)
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float(1.0 - (a * b).sum() / denominator) if denominator > 0 else 1.0


def _hint(reference_name: str) -> str:
    return (
        f"; a mask drawn on another volume of the subject: add --mask-space VOLUME (registered to {reference_name}); "
        "a mask on another grid in the same world space: add --resample-mask"
    )
