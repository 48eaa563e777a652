"""Which voxels the decoder reads, and how their values are put on a common scale.

:class:`VoxelMask` is a boolean grid in the reference (motion-corrected) space with its affine; it
checks that incoming volumes lie on the same grid and gives the voxel indices
(:attr:`VoxelMask.ijk`) that motion correction samples. :class:`OnlineNormaliser` turns a masked
volume into per-voxel z-scores.

Voxel order
-----------
A mask or a volume on the same grid stored in another voxel order (SPM, FSL and dcm2niix reverse
the DICOM's second axis) is the same voxels: :meth:`VoxelMask.on_grid` brings a mask into a
reference's order, :meth:`VoxelMask.grid_transform` gives the transform
(:mod:`rtdecoder.preprocess.orientation`) that brings such a volume into the mask's order and
:meth:`VoxelMask.volume_values` applies it. :meth:`VoxelMask.check_volume` stays strict (same
grid and same voxel order, as ``volume.data[mask.grid]`` needs) and says which of these to use.
A mask on another grid, or in another space, is an error here; registering or resampling it is
:mod:`rtdecoder.preprocess.registration`'s job.

Normalisation
-------------
The decoder was trained on betas of voxels z-scored with the calibration session's statistics,
so online data must be scaled the same way: :meth:`OnlineNormaliser.from_stats` (or
:meth:`OnlineNormaliser.load`) fixes the per-voxel mean and standard deviation saved at
calibration, and :meth:`OnlineNormaliser.normalise` applies them. When no calibration statistics
exist, ``OnlineNormaliser(n_voxels)`` keeps running per-voxel statistics instead (Welford's
algorithm: constant memory, numerically stable), updated with every volume before it is scaled;
its first volumes are scaled with few samples and are noisy, and its output is 0 until a voxel
has ``min_volumes`` samples and a non-zero spread. Running statistics can be saved at the end of
a calibration run and loaded as fixed statistics later. Standard deviations are population ones
(``ddof=0``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from rtdecoder.errors import BundleError, OrderError, VolumeError
from rtdecoder.ingest.volume import Volume
from rtdecoder.preprocess.orientation import GridTransform, describe_grid, find_grid_transform, match_grid

logger = logging.getLogger(__name__)

_AFFINE_TOLERANCE_MM = 1e-3
STATS_FORMAT_VERSION = 1


class VoxelMask:
    """A set of voxels on the reference grid.

    Parameters
    ----------
    grid : ndarray of bool, shape (nx, ny, nz)
        True for the voxels to read.
    affine : ndarray of shape (4, 4)
        Voxel-to-world (RAS+, mm) transform of the grid.
    source : str or Path, optional
        Where the mask came from, named in error messages.
    provenance : dict, optional
        How the mask reached this grid (JSON-ready; e.g. ``{"method": "registered", ...}`` from
        :func:`rtdecoder.preprocess.registration.mask_to_reference`); recorded in the bundle.

    Attributes
    ----------
    ijk : ndarray of shape (n_voxels, 3), intp
        Indices of the voxels, in C order of the grid (the order of every masked vector).
    provenance : dict

    Examples
    --------
    >>> grid = np.zeros((4, 4, 4), dtype=bool)
    >>> grid[1, 2, 3] = grid[0, 0, 1] = True
    >>> VoxelMask(grid, np.eye(4)).ijk.tolist()
    [[0, 0, 1], [1, 2, 3]]
    """

    def __init__(
        self,
        grid: np.ndarray,
        affine: np.ndarray,
        source: str | Path | None = None,
        provenance: dict | None = None,
    ) -> None:
        self.source = str(source) if source is not None else "<array mask>"
        self.provenance = dict(provenance) if provenance else {"file": self.source, "method": "as given"}
        grid = np.asarray(grid)
        if grid.ndim != 3:
            raise VolumeError(f"{self.source}: mask: expected a 3D grid (got shape {grid.shape})")
        if grid.dtype != bool:
            raise VolumeError(f"{self.source}: mask: expected a boolean grid (got dtype {grid.dtype})")
        if not grid.any():
            raise VolumeError(f"{self.source}: mask: expected at least one voxel (got an empty mask)")
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise VolumeError(f"{self.source}: affine: expected a finite (4, 4) matrix (got shape {affine.shape})")
        self.grid = grid.copy()
        self.grid.flags.writeable = False
        self.affine = affine
        self.ijk = np.argwhere(grid)
        self.ijk.flags.writeable = False

    @classmethod
    def from_nifti(
        cls,
        path: str | Path,
        reference_shape: tuple[int, ...] | None = None,
        reference_affine: np.ndarray | None = None,
        reference: str = "the reference grid",
    ) -> VoxelMask:
        """Read a mask from a NIfTI file of 0/1 values, optionally onto a reference grid.

        Parameters
        ----------
        path : str or Path
            A 3D NIfTI image (a 4D one with a single volume is accepted).
        reference_shape : tuple of int, optional
            ``(nx, ny, nz)`` of the grid the mask must be on; with ``reference_affine``, the mask
            is brought into that grid's voxel order (:meth:`on_grid`; an error on another grid).
        reference_affine : ndarray of shape (4, 4), optional
            Voxel-to-world (RAS+, mm) of that grid.
        reference : str, default="the reference grid"
            Named in messages.

        Returns
        -------
        VoxelMask
        """
        import nibabel as nib

        path = Path(path)
        try:
            image = nib.load(path)
            data = np.asarray(image.dataobj)
        except (OSError, ValueError, nib.filebasedimages.ImageFileError) as err:
            raise VolumeError(f"{path}: cannot read mask NIfTI: {err}") from None
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise VolumeError(f"{path}: mask: expected a 3D image (got shape {data.shape})")
        if not np.isin(data, (0, 1)).all():
            raise VolumeError(
                f"{path}: mask: expected only 0 and 1 values (got values in "
                f"[{data.min()}, {data.max()}]; threshold a probabilistic map first)"
            )
        mask = cls(data.astype(bool), image.affine, source=path)
        if reference_shape is None or reference_affine is None:
            return mask
        return mask.on_grid(reference_shape, reference_affine, reference)

    def to_nifti(self, path: str | Path) -> None:
        """Write the mask as a uint8 NIfTI image with its affine."""
        import nibabel as nib

        image = nib.Nifti1Image(self.grid.astype(np.uint8), self.affine)
        image.set_qform(self.affine, code=1)
        image.set_sform(self.affine, code=1)
        nib.save(image, str(path))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape ``(nx, ny, nz)``."""
        return tuple(self.grid.shape)  # type: ignore[return-value]

    @property
    def n_voxels(self) -> int:
        """Number of voxels in the mask."""
        return len(self.ijk)

    def on_grid(
        self,
        shape: tuple[int, ...],
        affine: np.ndarray,
        target: str = "the reference grid",
        hint: str = "",
    ) -> VoxelMask:
        """This mask in the voxel order of a reference grid that is the same grid stored another way.

        Parameters
        ----------
        shape : tuple of int
            ``(nx, ny, nz)`` of the reference.
        affine : ndarray of shape (4, 4)
            Voxel-to-world (RAS+, mm) of the reference; the returned mask takes it exactly.
        target : str, default="the reference grid"
            Named in messages (e.g. ``"the motion reference (run-01/vol_00100.nii)"``).
        hint : str, optional
            Appended to the error (what to do with a mask on another grid).

        Returns
        -------
        VoxelMask
            ``self`` when already in the reference's order; otherwise the reoriented mask (logged
            once at INFO, naming the file and the transform).

        Raises
        ------
        VolumeError
            Naming the mask's file, both grids and the largest difference in mm, when the mask is
            not on the reference grid up to the order and direction of its voxel axes.
        """
        affine = np.asarray(affine, dtype=np.float64)
        transform = match_grid(self.shape, self.affine, shape, affine, f"{self.source}: mask", target, hint=hint)
        if transform.is_identity and np.array_equal(affine, self.affine):
            return self
        provenance = dict(self.provenance)
        if not transform.is_identity:
            logger.info(
                "%s: mask on the grid of %s in another voxel order; reoriented (target axes = file axes %s, "
                "minus: reversed)", self.source, target, transform.describe(),
            )
            provenance["reoriented"] = transform.describe()
        return VoxelMask(
            np.ascontiguousarray(transform.apply(self.grid)), affine, source=self.source, provenance=provenance
        )

    def grid_transform(self, volume: Volume) -> GridTransform:
        """How a volume on the mask's grid, in any voxel order, maps into the mask's voxel order.

        Parameters
        ----------
        volume : Volume

        Returns
        -------
        GridTransform
            The identity when the volume is in the mask's order; apply it to the volume's data
            before indexing with the mask (:meth:`volume_values` does).

        Raises
        ------
        VolumeError
            Naming the volume's file, the mask's source, both grids and the mismatch (shape, or
            affine with the largest difference in mm), when the volume is on another grid.
        """
        where = str(volume.source) if volume.source is not None else f"volume {volume.index}"
        affine = np.asarray(volume.affine, dtype=np.float64)
        shape = tuple(volume.data.shape)
        if affine.shape != (4, 4):
            raise VolumeError(f"{where}: affine: expected a (4, 4) matrix (got shape {affine.shape})")
        match = find_grid_transform(shape, affine, self.shape, self.affine)
        if match.matches(_AFFINE_TOLERANCE_MM):
            return match.transform
        grids = f"volume grid {describe_grid(shape, affine)}, mask grid {describe_grid(self.shape, self.affine)}"
        if not match.shape_matches:
            raise VolumeError(
                f"{where}: data: shape {shape} does not match the mask {self.source} (expected {self.shape}); "
                f"{grids}"
            )
        raise VolumeError(
            f"{where}: affine: does not match the mask {self.source} ({grids}; expected the same voxels up to "
            f"the order and direction of the voxel axes within {_AFFINE_TOLERANCE_MM} mm; largest difference "
            f"{match.difference_mm:.4g} mm); the mask must be in the reference space of this run"
        )

    def check_volume(self, volume: Volume) -> None:
        """Raise unless a volume's data can be indexed with this mask as it is.

        The volume must be on the mask's grid in the mask's voxel order, because callers read
        ``volume.data[mask.grid]`` next. The same grid in another voxel order is an error that
        says so and what to use instead: :meth:`grid_transform` / :meth:`volume_values` for the
        volume, or :meth:`on_grid` to bring the mask into the volume's order.

        Parameters
        ----------
        volume : Volume

        Raises
        ------
        VolumeError
            Naming the volume's file, the mask's source, both grids and the mismatch.
        """
        transform = self.grid_transform(volume)
        if not transform.is_identity:
            where = str(volume.source) if volume.source is not None else f"volume {volume.index}"
            raise VolumeError(
                f"{where}: data: on the grid of the mask {self.source} but in another voxel order (mask axes = "
                f"volume axes {transform.describe()}, minus: reversed); reorient the volume "
                "(VoxelMask.volume_values, rtdecoder.preprocess.orientation.VolumeReorienter) or the mask "
                "(VoxelMask.on_grid) before reading it"
            )

    def volume_values(self, volume: Volume) -> np.ndarray:
        """The mask voxels of a volume on the mask's grid (any voxel order), without motion correction.

        Parameters
        ----------
        volume : Volume

        Returns
        -------
        ndarray of shape (n_voxels,), float32
        """
        return self.values(self.grid_transform(volume).apply(volume.data))

    def values(self, data: np.ndarray) -> np.ndarray:
        """The mask voxels of a volume on the same grid, without motion correction.

        Parameters
        ----------
        data : ndarray of shape (nx, ny, nz)

        Returns
        -------
        ndarray of shape (n_voxels,), float32
        """
        data = np.asarray(data)
        if data.shape != self.shape:
            raise VolumeError(f"data: expected shape {self.shape} like the mask {self.source} (got {data.shape})")
        return data[self.grid].astype(np.float32)


class OnlineNormaliser:
    """Per-voxel z-scoring of masked volumes.

    ``OnlineNormaliser(n_voxels)`` keeps running (Welford) statistics; use
    :meth:`from_stats` or :meth:`load` for fixed calibration statistics. See the module notes.

    Parameters
    ----------
    n_voxels : int
        Length of each masked vector.
    min_volumes : int, default=2
        Running mode: a voxel's output stays 0 until it has this many samples.

    Attributes
    ----------
    mean_ : ndarray of shape (n_voxels,), float64
        Current per-voxel mean.
    std_ : ndarray of shape (n_voxels,), float64
        Current per-voxel standard deviation (``ddof=0``).
    n_volumes_ : int
        Volumes the statistics are based on.
    fixed_ : bool
        True for calibration statistics, False for running ones.

    Examples
    --------
    >>> normaliser = OnlineNormaliser.from_stats(np.array([10.0, 0.0]), np.array([2.0, 0.5]))
    >>> normaliser.normalise(np.array([12.0, -1.0]))
    array([ 1., -2.], dtype=float32)
    >>> running = OnlineNormaliser(2)
    >>> for values in ([1.0, 5.0], [3.0, 5.0]):
    ...     z = running.normalise(np.array(values))
    >>> z
    array([1., 0.], dtype=float32)
    """

    def __init__(self, n_voxels: int, min_volumes: int = 2) -> None:
        if not isinstance(n_voxels, (int, np.integer)) or n_voxels < 1:
            raise VolumeError(f"n_voxels: expected a positive integer (got {n_voxels!r})")
        if not isinstance(min_volumes, (int, np.integer)) or min_volumes < 2:
            raise VolumeError(f"min_volumes: expected an integer >= 2 (got {min_volumes!r})")
        self.n_voxels = int(n_voxels)
        self.min_volumes = int(min_volumes)
        self.fixed_ = False
        self.reset()

    @classmethod
    def from_stats(
        cls, mean: np.ndarray, std: np.ndarray, n_volumes: int = 0, source: str = "stats"
    ) -> OnlineNormaliser:
        """Fix the statistics saved at calibration.

        Parameters
        ----------
        mean : array-like of shape (n_voxels,)
            Per-voxel mean.
        std : array-like of shape (n_voxels,)
            Per-voxel standard deviation; all must be positive.
        n_volumes : int, default=0
            How many volumes they came from (kept for the record).
        source : str, default="stats"
            Named in error messages (e.g. the file they were read from).

        Returns
        -------
        OnlineNormaliser
        """
        mean = np.asarray(mean, dtype=np.float64)
        std = np.asarray(std, dtype=np.float64)
        if mean.ndim != 1 or mean.size == 0:
            raise BundleError(f"{source}: mean: expected shape (n_voxels,) (got {mean.shape})")
        if std.shape != mean.shape:
            raise BundleError(f"{source}: std: expected shape {mean.shape} like mean (got {std.shape})")
        if not np.all(np.isfinite(mean)):
            raise BundleError(f"{source}: mean: expected finite values (found NaN or inf)")
        bad = ~(np.isfinite(std) & (std > 0))
        if bad.any():
            raise BundleError(
                f"{source}: std: expected finite positive values ({int(bad.sum())} of "
                f"{std.size} voxels are not, e.g. voxel {int(np.flatnonzero(bad)[0])})"
            )
        normaliser = cls(mean.size)
        normaliser.fixed_ = True
        normaliser.mean_ = mean.copy()
        normaliser._scale = 1.0 / std
        normaliser.n_volumes_ = int(n_volumes)
        return normaliser

    @classmethod
    def load(cls, path: str | Path) -> OnlineNormaliser:
        """Read statistics written by :meth:`save` as fixed statistics.

        Parameters
        ----------
        path : str or Path
            An ``.npz`` file with ``mean``, ``std``, ``n_volumes`` and ``format_version``.

        Returns
        -------
        OnlineNormaliser
        """
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as archive:
                contents = {key: archive[key] for key in archive.files}
        except (OSError, ValueError) as err:
            raise BundleError(f"{path}: cannot read normalisation statistics: {err}") from None
        missing = [key for key in ("mean", "std", "n_volumes", "format_version") if key not in contents]
        if missing:
            raise BundleError(
                f"{path}: missing {', '.join(missing)}; expected mean, std, n_volumes and "
                "format_version (written by OnlineNormaliser.save)"
            )
        version = int(contents["format_version"])
        if version != STATS_FORMAT_VERSION:
            raise BundleError(f"{path}: format_version: expected {STATS_FORMAT_VERSION} (got {version})")
        return cls.from_stats(contents["mean"], contents["std"], n_volumes=int(contents["n_volumes"]), source=str(path))

    def save(self, path: str | Path) -> None:
        """Write the current statistics to an ``.npz`` file (loadable as fixed statistics).

        Raises
        ------
        OrderError
            If running statistics have fewer than ``min_volumes`` volumes.
        """
        if not self.fixed_ and self.n_volumes_ < self.min_volumes:
            raise OrderError(
                f"OnlineNormaliser.save(): running statistics have {self.n_volumes_} volumes; "
                f"call normalise() or update() with at least {self.min_volumes} volumes first"
            )
        np.savez(
            Path(path),
            mean=self.mean_,
            std=self.std_,
            n_volumes=np.int64(self.n_volumes_),
            format_version=np.int64(STATS_FORMAT_VERSION),
        )

    @property
    def std_(self) -> np.ndarray:
        """Per-voxel standard deviation, shape (n_voxels,); 0 where running statistics lack data."""
        if self.fixed_:
            return 1.0 / self._scale
        if self.n_volumes_ == 0:
            return np.zeros(self.n_voxels)
        return np.sqrt(self._sum_squares / self.n_volumes_)

    def reset(self) -> None:
        """Forget running statistics (start of a new run); fixed statistics are kept."""
        if self.fixed_:
            return
        self.mean_ = np.zeros(self.n_voxels)
        self._sum_squares = np.zeros(self.n_voxels)
        self.n_volumes_ = 0

    def update(self, values: np.ndarray) -> None:
        """Add one masked volume to the running statistics (Welford).

        Parameters
        ----------
        values : array-like of shape (n_voxels,)
        """
        if self.fixed_:
            raise OrderError(
                "OnlineNormaliser.update() on fixed calibration statistics; build a running "
                "normaliser with OnlineNormaliser(n_voxels) to accumulate statistics"
            )
        values = self._check_values(values)
        self.n_volumes_ += 1
        delta = values - self.mean_
        self.mean_ += delta / self.n_volumes_
        self._sum_squares += delta * (values - self.mean_)

    def normalise(self, values: np.ndarray) -> np.ndarray:
        """Z-score one masked volume.

        Running statistics are first updated with ``values``.

        Parameters
        ----------
        values : array-like of shape (n_voxels,)

        Returns
        -------
        ndarray of shape (n_voxels,), float32
        """
        if self.fixed_:
            values = self._check_values(values)
            return ((values - self.mean_) * self._scale).astype(np.float32)
        self.update(values)
        if self.n_volumes_ < self.min_volumes:
            return np.zeros(self.n_voxels, dtype=np.float32)
        std = self.std_
        # A voxel with no spread yet carries no information; 0 keeps it neutral.
        scale = np.divide(1.0, std, out=np.zeros_like(std), where=std > 0)
        return ((np.asarray(values, dtype=np.float64) - self.mean_) * scale).astype(np.float32)

    def _check_values(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (self.n_voxels,):
            raise VolumeError(f"values: expected shape ({self.n_voxels},) (got {values.shape})")
        if not np.all(np.isfinite(values)):
            raise VolumeError("values: expected finite values (found NaN or inf)")
        return values
