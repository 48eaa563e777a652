"""Grids that are the same voxels stored in another order, and bringing data from one into the other.

The same acquisition reaches the decoder in more than one voxel order: the project's DICOM reader
keeps the scanner's storage order (rows top to bottom, so the second voxel axis runs from anterior
to posterior), while SPM, FSL and dcm2niix write NIfTI files with that axis reversed; other tools
transpose axes. Two such grids put the same voxel centres at the same world positions, so data on
one is data on the other after reversing and/or permuting voxel axes: a view of the array, no
resampling. :func:`match_grid` finds that transform (or says how far apart the grids really are),
:func:`reorient_to_grid` applies it to one array (a mask, a reference volume) and
:class:`VolumeReorienter` to every volume of a run, deciding once per affine.

Transform convention
--------------------
A :class:`GridTransform` holds a nibabel orientation array ``ornt`` of shape (3, 2): row ``i`` says
that the source's voxel axis ``i`` becomes the target's axis ``ornt[i, 0]``, reversed when
``ornt[i, 1] == -1`` (as :func:`nibabel.orientations.apply_orientation` takes it). The source
affine times :func:`nibabel.orientations.inv_ornt_aff` is then the target affine.

Grid distance
-------------
Two grids are compared by where they put the target grid's eight corner voxels: the largest
distance, in mm, between the world position a corner has in the target affine and the one the
(reoriented) source affine gives the same voxel index. It is a real distance, unlike a difference
of matrix entries, and it is 0 for the same grid stored in another voxel order.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nibabel import orientations

from rtdecoder.errors import VolumeError
from rtdecoder.ingest.volume import Volume

logger = logging.getLogger(__name__)

AFFINE_TOLERANCE_MM = 1e-3
_AXIS_NAMES = "ijk"


@dataclass(frozen=True, eq=False)
class GridTransform:
    """A reversal and/or permutation of voxel axes from a source grid to the same grid in another order.

    Parameters
    ----------
    ornt : ndarray of shape (3, 2)
        Row ``i``: ``(target axis of source axis i, +1 or -1 for kept or reversed)``.
    source_shape : tuple of int
        ``(nx, ny, nz)`` of the source grid.

    Examples
    --------
    >>> flip_y = GridTransform(np.array([[0, 1], [1, -1], [2, 1]]), (2, 3, 1))
    >>> flip_y.apply(np.arange(6).reshape(2, 3, 1))[..., 0].tolist()
    [[2, 1, 0], [5, 4, 3]]
    >>> flip_y.describe(), flip_y.is_identity
    ('(i, -j, k)', False)
    """

    ornt: np.ndarray
    source_shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        ornt = np.asarray(self.ornt, dtype=np.int64).reshape(3, 2)
        if sorted(ornt[:, 0].tolist()) != [0, 1, 2] or not np.all(np.isin(ornt[:, 1], (-1, 1))):
            raise VolumeError(f"ornt: expected a signed permutation of the axes 0, 1, 2 (got {ornt.tolist()})")
        object.__setattr__(self, "ornt", ornt)
        object.__setattr__(self, "source_shape", tuple(int(n) for n in self.source_shape))
        # Precomputed once so that apply() is a slice and a transpose: a view, a few microseconds.
        object.__setattr__(self, "_slices", tuple(slice(None, None, -1) if f < 0 else slice(None) for f in ornt[:, 1]))
        object.__setattr__(self, "_axes", tuple(int(a) for a in np.argsort(ornt[:, 0])))

    @classmethod
    def identity(cls, shape: tuple[int, ...]) -> GridTransform:
        """The transform that changes nothing on a grid of ``shape``."""
        return cls(np.array([[0, 1], [1, 1], [2, 1]]), tuple(shape[:3]))  # type: ignore[arg-type]

    @property
    def is_identity(self) -> bool:
        """True when the source already is in the target's voxel order."""
        return bool(np.array_equal(self.ornt, [[0, 1], [1, 1], [2, 1]]))

    @property
    def target_shape(self) -> tuple[int, int, int]:
        """Shape of the data once in the target's voxel order."""
        return tuple(self.source_shape[a] for a in self._axes)  # type: ignore[return-value]

    def apply(self, data: np.ndarray) -> np.ndarray:
        """Source-ordered data in the target's voxel order.

        Parameters
        ----------
        data : ndarray of shape (nx, ny, nz, ...)
            On the source grid; axes after the third (e.g. time) are kept as they are.

        Returns
        -------
        ndarray of shape ``target_shape + data.shape[3:]``
            A view of ``data`` (no copy); the data itself when the transform is the identity.
        """
        data = np.asarray(data)
        if self.is_identity:
            return data
        return data[self._slices].transpose(self._axes + tuple(range(3, data.ndim)))

    def affine(self, source_affine: np.ndarray) -> np.ndarray:
        """The voxel-to-world matrix of the reoriented data, shape (4, 4)."""
        return np.asarray(source_affine, dtype=np.float64) @ orientations.inv_ornt_aff(self.ornt, self.source_shape)

    def slice_times(self, slice_times_s: np.ndarray | None) -> np.ndarray | None:
        """Slice times (along the third axis) after reorientation.

        Parameters
        ----------
        slice_times_s : ndarray of shape (nz,) or None
            Acquisition time of each source slice, s.

        Returns
        -------
        ndarray of shape (nz,) or None
            Reversed with a reversed third axis; None when the third axis comes from another
            source axis (a target slice then mixes voxels acquired at different times).
        """
        if slice_times_s is None or self.is_identity:
            return slice_times_s
        source_axis = self._axes[2]
        if source_axis != 2:
            return None
        times = np.asarray(slice_times_s)
        return times[::-1].copy() if self.ornt[2, 1] < 0 else times

    def describe(self) -> str:
        """The target's axes in terms of the source's, e.g. ``"(i, -j, k)"`` (minus: reversed)."""
        names = [("-" if self.ornt[a, 1] < 0 else "") + _AXIS_NAMES[a] for a in self._axes]
        return "(" + ", ".join(names) + ")"


@dataclass(frozen=True, eq=False)
class GridMatch:
    """The best voxel-axis transform from one grid to another and how well it fits.

    Attributes
    ----------
    transform : GridTransform
        The signed axis permutation that brings the source closest to the target.
    shape_matches : bool
        Whether the source's shape, so reoriented, equals the target's.
    difference_mm : float
        Largest distance between the target's corner voxels and the same voxel indices of the
        reoriented source, mm (see the module notes).
    """

    transform: GridTransform
    shape_matches: bool
    difference_mm: float

    def matches(self, tolerance_mm: float = AFFINE_TOLERANCE_MM) -> bool:
        """Same grid up to axis order and direction, within ``tolerance_mm``."""
        return self.shape_matches and self.difference_mm <= tolerance_mm


def describe_grid(shape: tuple[int, ...], affine: np.ndarray) -> str:
    """A one-line description of a grid for messages: shape, voxel size, axis directions, first voxel.

    Examples
    --------
    >>> describe_grid((4, 5, 6), np.diag([-2.0, 2.0, 3.0, 1.0]))
    '(4, 5, 6) voxels of 2 x 2 x 3 mm, axes LAS, voxel 0 at (0, 0, 0) mm'
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        return f"{tuple(int(n) for n in shape)} voxels with an invalid affine of shape {affine.shape}"
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    try:
        codes = "".join(str(c) for c in orientations.aff2axcodes(affine))
    except (ValueError, np.linalg.LinAlgError):
        codes = "???"
    origin = ", ".join(f"{v:.4g}" for v in affine[:3, 3])
    return (
        f"{tuple(int(n) for n in shape)} voxels of {' x '.join(f'{s:.4g}' for s in sizes)} mm, axes {codes}, "
        f"voxel 0 at ({origin}) mm"
    )


def grid_distance_mm(affine: np.ndarray, target_shape: tuple[int, ...], target_affine: np.ndarray) -> float:
    """Largest distance between the target grid's corner voxels under two affines, mm.

    Parameters
    ----------
    affine : ndarray of shape (4, 4)
        Voxel-to-world matrix of the (already reoriented) source.
    target_shape : tuple of int
    target_affine : ndarray of shape (4, 4)

    Returns
    -------
    float

    Examples
    --------
    >>> moved = np.eye(4)
    >>> moved[2, 3] = 1.5
    >>> grid_distance_mm(moved, (3, 3, 3), np.eye(4))
    1.5
    """
    corners = np.array(list(itertools.product(*[(0, max(int(n) - 1, 0)) for n in target_shape[:3]])), float)
    corners_h = np.column_stack([corners, np.ones(len(corners))]).T
    delta = (np.asarray(affine, np.float64) @ corners_h - np.asarray(target_affine, np.float64) @ corners_h)[:3]
    return float(np.sqrt((delta**2).sum(axis=0)).max())


def find_grid_transform(
    shape: tuple[int, ...], affine: np.ndarray, target_shape: tuple[int, ...], target_affine: np.ndarray
) -> GridMatch:
    """The signed voxel-axis permutation that best maps a source grid onto a target grid.

    Two candidates are tried: the rounding of ``inv(affine) @ target_affine`` to a signed
    permutation (exact for the same grid in another order, however oblique), and nibabel's
    ``ornt_transform`` between the two grids' closest orientations (a sensible guess for grids
    that differ, so that the error names a meaningful difference).

    Parameters
    ----------
    shape : tuple of int
        ``(nx, ny, nz)`` of the source.
    affine : ndarray of shape (4, 4)
        Voxel-to-world (RAS+, mm) of the source.
    target_shape : tuple of int
    target_affine : ndarray of shape (4, 4)

    Returns
    -------
    GridMatch
    """
    shape = tuple(int(n) for n in shape[:3])
    target_shape = tuple(int(n) for n in target_shape[:3])
    affine = np.asarray(affine, dtype=np.float64)
    target_affine = np.asarray(target_affine, dtype=np.float64)
    if affine.shape != (4, 4) or target_affine.shape != (4, 4) or not (
        np.all(np.isfinite(affine)) and np.all(np.isfinite(target_affine))
    ):
        return GridMatch(GridTransform.identity(shape), shape == target_shape, float("inf"))
    candidates = [GridTransform.identity(shape)]
    for ornt in (_rounded_ornt(affine, target_affine), _closest_ornt(affine, target_affine)):
        if ornt is not None:
            candidates.append(GridTransform(ornt, shape))
    best: GridMatch | None = None
    for transform in candidates:
        match = GridMatch(
            transform,
            transform.target_shape == target_shape,
            grid_distance_mm(transform.affine(affine), target_shape, target_affine),
        )
        if best is None or (match.shape_matches, -match.difference_mm) > (best.shape_matches, -best.difference_mm):
            best = match
    assert best is not None
    return best


def match_grid(
    shape: tuple[int, ...],
    affine: np.ndarray,
    target_shape: tuple[int, ...],
    target_affine: np.ndarray,
    source: str | Path,
    target: str = "the target grid",
    tolerance_mm: float = AFFINE_TOLERANCE_MM,
    hint: str = "",
) -> GridTransform:
    """The transform bringing a source grid into a target's voxel order, or an error if there is none.

    Parameters
    ----------
    shape : tuple of int
        ``(nx, ny, nz)`` of the source.
    affine : ndarray of shape (4, 4)
        Voxel-to-world (RAS+, mm) of the source.
    target_shape : tuple of int
    target_affine : ndarray of shape (4, 4)
    source : str or Path
        The source's file (or a name), first in the error message.
    target : str, default="the target grid"
        What the target is, for the error message (e.g. ``"the motion reference (ref.nii.gz)"``).
    tolerance_mm : float, default=0.001
        Largest accepted grid distance (module notes), mm.
    hint : str, optional
        Appended to the error message (what to do instead).

    Returns
    -------
    GridTransform

    Raises
    ------
    VolumeError
        Naming the source, both grids and the largest difference in mm, when the grids are not
        the same voxels up to the order and direction of the voxel axes.
    """
    match = find_grid_transform(shape, affine, target_shape, target_affine)
    if match.matches(tolerance_mm):
        return match.transform
    if match.shape_matches:
        problem = f"largest difference {match.difference_mm:.4g} mm"
    else:
        source_shape, wanted = tuple(int(n) for n in shape[:3]), tuple(int(n) for n in target_shape[:3])
        problem = f"shape {source_shape} cannot be reordered into {wanted}"
    raise VolumeError(
        f"{source}: grid {describe_grid(shape, affine)} does not match {target} "
        f"{describe_grid(target_shape, target_affine)}; expected the same voxels up to the order and direction "
        f"of the voxel axes within {tolerance_mm:g} mm ({problem}){hint}"
    )


def reorient_to_grid(
    data: np.ndarray,
    affine: np.ndarray,
    target_shape: tuple[int, ...],
    target_affine: np.ndarray,
    source: str | Path,
    target: str = "the target grid",
    tolerance_mm: float = AFFINE_TOLERANCE_MM,
    hint: str = "",
) -> np.ndarray:
    """Data of a grid in the voxel order of the same grid stored another way.

    Logs once at INFO, naming the file and the transform, when the voxel order differs.

    Parameters
    ----------
    data : ndarray of shape (nx, ny, nz, ...)
        On the source grid.
    affine : ndarray of shape (4, 4)
        Its voxel-to-world (RAS+, mm) matrix.
    target_shape : tuple of int
    target_affine : ndarray of shape (4, 4)
    source, target, tolerance_mm, hint
        As for :func:`match_grid`.

    Returns
    -------
    ndarray of shape ``target_shape + data.shape[3:]``
        A view of ``data`` in the target's voxel order (``data`` itself when already so).

    Raises
    ------
    VolumeError
        As :func:`match_grid`.

    Examples
    --------
    >>> flipped = np.diag([2.0, -2.0, 2.0, 1.0])
    >>> flipped[1, 3] = 4.0  # voxel j = 2 of this grid is voxel j = 0 of the identity-ordered one
    >>> data = np.arange(9.0).reshape(1, 3, 3)
    >>> reorient_to_grid(data, flipped, (1, 3, 3), np.diag([2.0, 2.0, 2.0, 1.0]), "mask.nii")[0, 0].tolist()
    [6.0, 7.0, 8.0]
    """
    data = np.asarray(data)
    if data.ndim < 3:
        raise VolumeError(f"{source}: data: expected at least 3 dimensions (got shape {data.shape})")
    transform = match_grid(data.shape, affine, target_shape, target_affine, source, target, tolerance_mm, hint)
    if not transform.is_identity:
        logger.info(
            "%s: same grid as %s in another voxel order; reoriented (target axes = file axes %s, minus: reversed)",
            source, target, transform.describe(),
        )
    return transform.apply(data)


class VolumeReorienter:
    """Brings every volume of a run into a target grid's voxel order.

    The transform is decided from the first volume's affine and reused while the affines stay the
    same (an exact comparison of 16 numbers), so each volume costs a few microseconds: a view of
    its array. A volume with another affine is matched again (and rejected when off the grid).
    The first non-identity transform of a run is logged at INFO.

    Parameters
    ----------
    target_shape : tuple of int
        ``(nx, ny, nz)`` of the target (e.g. the motion reference).
    target_affine : ndarray of shape (4, 4)
    target : str, default="the reference grid"
        Named in messages.
    tolerance_mm : float, default=0.001
        Largest accepted grid distance, mm.

    Examples
    --------
    >>> to_grid = VolumeReorienter((2, 3, 1), np.eye(4))
    >>> flipped = np.diag([1.0, -1.0, 1.0, 1.0])
    >>> flipped[1, 3] = 2.0
    >>> to_grid.data(Volume(np.arange(6.0).reshape(2, 3, 1), flipped, 1.0, 0))[..., 0].tolist()
    [[2.0, 1.0, 0.0], [5.0, 4.0, 3.0]]
    """

    def __init__(
        self,
        target_shape: tuple[int, ...],
        target_affine: np.ndarray,
        target: str = "the reference grid",
        tolerance_mm: float = AFFINE_TOLERANCE_MM,
    ) -> None:
        self.target_shape = tuple(int(n) for n in target_shape[:3])
        self.target_affine = np.asarray(target_affine, dtype=np.float64)
        self.target = target
        self.tolerance_mm = tolerance_mm
        self.reset()

    def reset(self) -> None:
        """Forget the cached transform (start of a run)."""
        self._key: tuple[tuple[int, ...], bytes] | None = None
        self.transform_: GridTransform | None = None
        self._logged: set[str] = set()

    def transform(self, volume: Volume) -> GridTransform:
        """The transform of a volume's grid into the target's voxel order (cached per affine).

        Raises
        ------
        VolumeError
            Naming the volume's file and both grids when it is not on the target grid.
        """
        affine = np.asarray(volume.affine, dtype=np.float64)
        key = (tuple(volume.data.shape), affine.tobytes())
        if key == self._key and self.transform_ is not None:
            return self.transform_
        where = str(volume.source) if volume.source is not None else f"volume {volume.index}"
        if volume.data.ndim != 3:
            raise VolumeError(f"{where}: data: expected a 3D volume (got shape {tuple(volume.data.shape)})")
        transform = match_grid(
            volume.data.shape, affine, self.target_shape, self.target_affine, where, self.target, self.tolerance_mm
        )
        described = transform.describe()
        if not transform.is_identity and described not in self._logged:
            self._logged.add(described)
            logger.info(
                "%s: same grid as %s in another voxel order; every volume of this affine is reoriented "
                "(target axes = file axes %s, minus: reversed; a view, no resampling)",
                where, self.target, described,
            )
        self._key, self.transform_ = key, transform
        return transform

    def data(self, volume: Volume) -> np.ndarray:
        """The volume's voxel values in the target's order, shape ``target_shape`` (a view)."""
        return self.transform(volume).apply(volume.data)

    def volume(self, volume: Volume) -> Volume:
        """The volume on the target grid: reoriented data, the target's affine, slice times to match.

        Returns ``volume`` itself when it already is in the target's order; otherwise a new
        :class:`Volume` sharing its ``times`` (so timestamps stamped on either show on both).
        """
        transform = self.transform(volume)
        if transform.is_identity:
            return volume
        # replace() keeps every other field, and the same VolumeTimes object.
        return dataclasses.replace(
            volume,
            data=transform.apply(volume.data),
            affine=self.target_affine.copy(),
            slice_times_s=transform.slice_times(volume.slice_times_s),
        )


def _rounded_ornt(affine: np.ndarray, target_affine: np.ndarray) -> np.ndarray | None:
    """``inv(affine) @ target_affine`` rounded to a signed permutation, as an ornt; None if it is not one."""
    try:
        steps = np.linalg.solve(affine[:3, :3], target_affine[:3, :3])  # source voxel steps per target step
    except np.linalg.LinAlgError:
        return None
    rounded = np.rint(steps)
    if not (np.all(np.abs(rounded).sum(axis=0) == 1) and np.all(np.abs(rounded).sum(axis=1) == 1)):
        return None
    ornt = np.zeros((3, 2))
    for source_axis in range(3):
        target_axis = int(np.flatnonzero(rounded[source_axis])[0])
        ornt[source_axis] = (target_axis, rounded[source_axis, target_axis])
    return ornt


def _closest_ornt(affine: np.ndarray, target_affine: np.ndarray) -> np.ndarray | None:
    try:
        ornt = orientations.ornt_transform(
            orientations.io_orientation(affine), orientations.io_orientation(target_affine)
        )
    except (ValueError, np.linalg.LinAlgError):
        return None
    return None if np.any(np.isnan(ornt)) else ornt
