"""A simulated subject's head: an EPI-like volume built from the MNI152 templates nilearn ships.

Each subject's brain is the MNI152 (2009a, symmetric) tissue templates bundled inside nilearn,
scaled, rotated and shifted by a per-subject random transform and sampled on the subject's
acquisition grid. Intensities follow T2*-weighted EPI contrast (CSF brightest, grey matter above
white matter), times a smooth receive-coil bias field; there is no skull or scalp, as after the
brain-extracting reconstruction many real-time pipelines apply. Nothing is downloaded.

World coordinates are the scanner's RAS+ millimetres; ``affine`` maps voxel indices to them.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

#: EPI intensity (scanner units) of pure CSF, grey and white matter before the bias field.
TISSUE_INTENSITY = {"csf": 1000.0, "gm": 760.0, "wm": 560.0}

_MNI_RESOLUTION_MM = 2


@dataclass(frozen=True)
class SubjectAnatomy:
    """One subject's static head on its acquisition grid.

    Attributes
    ----------
    reference_volume : ndarray of shape (nx, ny, nz), float32
        Noise-free EPI-like intensity (scanner units, about 0-1100), zero outside the head.
    brain_mask : ndarray of shape (nx, ny, nz), bool
        Voxels inside the brain (tissue probability sum above 0.5).
    gm : ndarray of shape (nx, ny, nz), float32
        Grey-matter probability, 0-1.
    wm : ndarray of shape (nx, ny, nz), float32
        White-matter probability, 0-1.
    csf : ndarray of shape (nx, ny, nz), float32
        CSF probability, 0-1 (brain mask minus grey and white matter).
    affine : ndarray of shape (4, 4)
        Voxel index to scanner RAS+ mm.
    voxel_to_mni : ndarray of shape (4, 4)
        Voxel index to MNI152 mm, so regions can be chosen by template coordinates.
    """

    reference_volume: np.ndarray
    brain_mask: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    affine: np.ndarray
    voxel_to_mni: np.ndarray

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """Grid shape ``(nx, ny, nz)``."""
        return tuple(self.reference_volume.shape)  # type: ignore[return-value]

    def mni_coordinates(self, mask: np.ndarray) -> np.ndarray:
        """MNI152 mm coordinates of the voxels of ``mask``, shape (n_voxels, 3), C order."""
        ijk = np.argwhere(mask).astype(float)
        return ijk @ self.voxel_to_mni[:3, :3].T + self.voxel_to_mni[:3, 3]


def grid_affine(grid_shape: tuple[int, int, int], voxel_size_mm: tuple[float, float, float],
                centre_mm: np.ndarray | None = None) -> np.ndarray:
    """RAS+ affine of an axial grid whose centre sits at ``centre_mm`` (default the origin).

    Parameters
    ----------
    grid_shape : tuple of 3 int
        ``(nx, ny, nz)``; the first axis runs left to right, the second posterior to anterior,
        the third inferior to superior (slices are along the third axis).
    voxel_size_mm : tuple of 3 float
        Voxel edge lengths in mm.
    centre_mm : ndarray of shape (3,), optional
        World position of the grid centre.

    Returns
    -------
    ndarray of shape (4, 4)

    Examples
    --------
    >>> grid_affine((4, 4, 2), (3.0, 3.0, 3.0))[:3, 3].tolist()
    [-4.5, -4.5, -1.5]
    """
    zooms = np.asarray(voxel_size_mm, dtype=float)
    centre = np.zeros(3) if centre_mm is None else np.asarray(centre_mm, dtype=float)
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = centre - zooms * (np.asarray(grid_shape, dtype=float) - 1) / 2
    return affine


def build_anatomy(grid_shape: tuple[int, int, int], voxel_size_mm: tuple[float, float, float],
                  rng: np.random.Generator) -> SubjectAnatomy:
    """Draw one subject's head and sample it on the acquisition grid.

    The subject's brain is the template scaled by 0.88-0.98 per axis (real brains are smaller
    than MNI152's), rotated by up to 4 degrees and shifted by up to 5 mm from the grid centre.
    The bias field is a random smooth gain of about +-15 % across the head.

    Parameters
    ----------
    grid_shape : tuple of 3 int
        ``(nx, ny, nz)`` voxels.
    voxel_size_mm : tuple of 3 float
        Voxel edge lengths in mm.
    rng : numpy.random.Generator
        The subject's own generator; the same state gives the same head.

    Returns
    -------
    SubjectAnatomy
    """
    affine = grid_affine(grid_shape, voxel_size_mm)
    scale = rng.uniform(0.88, 0.98, size=3)
    angles_rad = np.deg2rad(rng.uniform(-4.0, 4.0, size=3))
    # The MNI brain's centre of mass is ~18 mm behind and ~15 mm above the template origin;
    # put it near the grid centre so occipital cortex stays inside a 168 mm field of view.
    shift_mm = rng.uniform(-5.0, 5.0, size=3) + np.array([0.0, 0.0, -8.0])
    world_to_mni = np.eye(4)
    world_to_mni[:3, :3] = rotation_matrix(angles_rad) / scale[:, None]
    world_to_mni[:3, 3] = np.array([0.0, -18.0, 15.0]) - world_to_mni[:3, :3] @ shift_mm
    voxel_to_mni = world_to_mni @ affine

    templates, template_affine = _templates()
    smooth_vox = max(0.0, 0.42 * (min(voxel_size_mm) / _MNI_RESOLUTION_MM - 1.0) + 0.2)
    to_template = np.linalg.inv(template_affine) @ voxel_to_mni
    sampled = {}
    for name, data in templates.items():
        source = ndimage.gaussian_filter(data, smooth_vox) if smooth_vox > 0 else data
        sampled[name] = ndimage.affine_transform(
            source, to_template[:3, :3], to_template[:3, 3], output_shape=tuple(grid_shape),
            order=1, mode="constant", cval=0.0,
        ).astype(np.float32)
    gm = np.clip(sampled["gm"], 0.0, 1.0)
    wm = np.clip(sampled["wm"], 0.0, 1.0)
    brain = np.clip(sampled["brain"], 0.0, 1.0)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    brain_mask = brain > 0.5

    intensity = (TISSUE_INTENSITY["csf"] * csf + TISSUE_INTENSITY["gm"] * gm
                 + TISSUE_INTENSITY["wm"] * wm)
    reference = (intensity * _bias_field(grid_shape, rng)).astype(np.float32)
    logger.debug("anatomy: %d brain voxels on a %s grid", int(brain_mask.sum()), grid_shape)
    return SubjectAnatomy(
        reference_volume=reference, brain_mask=brain_mask, gm=gm, wm=wm, csf=csf,
        affine=affine, voxel_to_mni=voxel_to_mni,
    )


def template_epi(blur_vox: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An EPI-like image of the MNI152 template head itself, on the template's own 2 mm grid.

    A fixed, subject-free anatomy for testing and timing image registration (motion correction):
    T2*-like contrast (CSF > grey > white matter, plus a small floor so the background is not
    exactly zero), blurred to an EPI point spread. Unlike :func:`build_anatomy` there is no random
    head pose, resampling or bias field.

    Parameters
    ----------
    blur_vox : float, default=1.0
        Standard deviation of the Gaussian blur, in template voxels (2 mm).

    Returns
    -------
    image : ndarray of shape (nx, ny, nz), float32
        Intensity in arbitrary units: 0.05 outside the head, about 0.4-1.05 in the brain. The
        grid is nilearn's template's (99 x 117 x 95 for its 2009 MNI152).
    brain : ndarray of shape (nx, ny, nz), float32
        The template's brain mask, 0-1.
    affine : ndarray of shape (4, 4)
        Template voxel index to MNI152 mm.
    """
    templates, affine = _templates()
    gm, wm, brain = templates["gm"], templates["wm"], templates["brain"]
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    epi = 0.75 * gm + 0.45 * wm + 1.0 * csf + 0.05
    # copies: the template arrays are cached and shared with build_anatomy
    return ndimage.gaussian_filter(epi, blur_vox).astype(np.float32), brain.copy(), affine.copy()


def rotation_matrix(angles_rad: np.ndarray) -> np.ndarray:
    """3x3 rotation ``Rz @ Ry @ Rx`` for angles (rad) about the x, y and z axes, in that order.

    Examples
    --------
    >>> np.round(rotation_matrix(np.array([0.0, 0.0, np.pi / 2])) @ [1.0, 0.0, 0.0], 6).tolist()
    [0.0, 1.0, 0.0]
    """
    cx, cy, cz = np.cos(angles_rad)
    sx, sy, sz = np.sin(angles_rad)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _bias_field(grid_shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative gain: a radial falloff from a random centre plus a linear tilt."""
    axes = [np.linspace(-1.0, 1.0, n) for n in grid_shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    centre = rng.uniform(-0.2, 0.2, size=3)
    radius2 = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2
    tilt = rng.uniform(-0.08, 0.08, size=3)
    return (1.12 - 0.2 * radius2 + tilt[0] * x + tilt[1] * y + tilt[2] * z).clip(0.5, 1.3)


@functools.lru_cache(maxsize=1)
def _templates() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The MNI152 grey-matter, white-matter and brain-mask maps bundled with nilearn (2 mm)."""
    from nilearn import datasets

    maps = {
        "gm": datasets.load_mni152_gm_template(resolution=_MNI_RESOLUTION_MM),
        "wm": datasets.load_mni152_wm_template(resolution=_MNI_RESOLUTION_MM),
        "brain": datasets.load_mni152_brain_mask(resolution=_MNI_RESOLUTION_MM),
    }
    affine = maps["gm"].affine.copy()
    return {k: np.asarray(v.get_fdata(), dtype=np.float32) for k, v in maps.items()}, affine
