"""Motion correction on real scanner volumes: known motions, and the real Prisma series.

The volumes are the real Siemens exports in ``../shared/data/real-dicom`` (see its README; the
tests skip when the folder is absent): the Prisma series ``prisma-mosaic-dcmqa/ep2d_Asc_2`` (6
volumes, 64 x 64 x 36 at 3.2 x 3.2 x 3.6 mm, oblique) and the first volume of the Skyra series
(64 x 64 x 27 at 3 x 3 x 4 mm).

Known motions: a real volume is moved by a known rigid transform, resampled with a quintic spline
(``scipy.ndimage.affine_transform(order=5)``, not the cubic B-spline the corrector uses, so the
test is not circular) or, for translations, shifted exactly in k-space (``fourier_shift``, the
band-limited shift an EPI acquisition sees), and registered back to the original. No noise is
added: the moved copy keeps the volume's own noise, so what is measured is the estimator's bias.

The SimpleITK figures below come from ``bench/bench_motion.py`` (SimpleITK 2.5.7: rigid
``Euler3DTransform`` about the grid centre, normalized correlation, B-spline interpolation, all
voxels, two levels); the tests do not need SimpleITK.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from test_motion import known_motions

from rtdecoder.ingest.readers import read_volume
from rtdecoder.preprocess.motion import FD_RADIUS_MM, MotionCorrector, framewise_displacement, rigid_matrix

PRISMA_SERIES = "prisma-mosaic-dcmqa/ep2d_Asc_2"
SKYRA_SERIES = "skyra-mosaic-rtcloud"
REFERENCE_INDEX = 3  # the Prisma volume the series is registered to, as in issue 13
DISPLACEMENT_WEIGHTS = np.r_[1.0, 1.0, 1.0, [FD_RADIUS_MM] * 3]  # rotations on the FD sphere, mm

# SimpleITK (normalized correlation) on the Prisma series registered to volume 3:
# (tx, ty, tz) mm, (rx, ry, rz) degrees, in the corrector's convention.
SITK_PRISMA_MM_DEG = {
    0: (4.484, -1.517, 4.228, 4.486, 4.653, -25.137),
    2: (-0.515, -0.400, 0.120, 0.185, -0.436, 0.339),
    4: (0.181, 0.161, 0.031, -0.045, 0.082, -0.348),
    5: (0.146, 0.124, 0.084, -0.023, 0.114, -0.436),
}


def load_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Volumes (n, nx, ny, nz) float32 and the shared affine of a DICOM folder (no truncated file)."""
    paths = sorted(p for p in folder.glob("*.dcm") if not p.name.startswith("truncated"))
    volumes = [read_volume(p) for p in paths]
    return np.stack([v.data for v in volumes]).astype(np.float32), np.asarray(volumes[0].affine, dtype=np.float64)


@pytest.fixture(scope="module")
def prisma(real_dicom_dir) -> tuple[np.ndarray, np.ndarray]:
    return load_series(real_dicom_dir / PRISMA_SERIES)


@pytest.fixture(scope="module")
def real_volumes(real_dicom_dir, prisma) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    skyra, skyra_affine = load_series(real_dicom_dir / SKYRA_SERIES)
    return {"prisma": (prisma[0][REFERENCE_INDEX], prisma[1]), "skyra": (skyra[0], skyra_affine)}


def grid_centre(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    return affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + affine[:3, 3]


def move_rigid(volume: np.ndarray, affine: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Content moved by ``params`` (tissue at x goes to T(params)(x)), quintic-spline resampled."""
    motion = rigid_matrix(params, grid_centre(volume.shape, affine))
    grid_to_grid = np.linalg.inv(affine) @ np.linalg.inv(motion) @ affine
    moved = ndimage.affine_transform(
        volume.astype(np.float64), grid_to_grid[:3, :3], grid_to_grid[:3, 3], order=5, mode="nearest"
    )
    return moved.astype(np.float32)


def shift_fourier(volume: np.ndarray, affine: np.ndarray, shift_mm: np.ndarray, pad: int = 8) -> np.ndarray:
    """Content translated by ``shift_mm`` (world, mm) exactly in k-space (edge-padded against wrap)."""
    shift_voxels = np.linalg.solve(affine[:3, :3], shift_mm)
    padded = np.pad(volume.astype(np.float64), pad, mode="edge")
    shifted = np.fft.ifftn(ndimage.fourier_shift(np.fft.fftn(padded), shift_voxels)).real
    return shifted[pad:-pad, pad:-pad, pad:-pad].astype(np.float32)


def moved_copies(volume: np.ndarray, affine: np.ndarray, size: float, generator: str) -> list[tuple]:
    if generator == "spline5":
        return [(p, move_rigid(volume, affine, p)) for p in known_motions(size, size)]
    return [(p, shift_fourier(volume, affine, p[:3])) for p in known_motions(size, size)[:3]]


def assert_within_fraction(estimate: np.ndarray, truth: np.ndarray, fraction: float) -> None:
    """Each moved parameter within ``fraction`` of its truth; each unmoved one within ``fraction``
    of the motion's size (as displacement, rotations on the 50 mm sphere)."""
    moved = truth != 0
    ratios = estimate[moved] / truth[moved]
    assert np.all(np.abs(ratios - 1.0) <= fraction), f"estimate / truth {ratios} for truth {truth}"
    size_mm = np.max(np.abs(truth) * DISPLACEMENT_WEIGHTS)
    spurious_mm = np.abs(estimate[~moved]) * DISPLACEMENT_WEIGHTS[~moved]
    assert np.all(spurious_mm <= fraction * size_mm), f"unmoved parameters {estimate[~moved]} for truth {truth}"


@pytest.mark.parametrize("generator", ["spline5", "fourier"])
@pytest.mark.parametrize("size", [0.1, 0.2, 0.5], ids=lambda s: f"{s}mm-deg")
@pytest.mark.parametrize("source", ["prisma", "skyra"])
def test_small_known_motion_of_real_volumes_within_5_percent(real_volumes, source, size, generator) -> None:
    # Before the fix the worst parameter came out 1.3-1.65 times the truth (trilinear samples of
    # the moving volume against central-difference gradients of the raw reference).
    volume, affine = real_volumes[source]
    corrector = MotionCorrector().set_reference(volume, affine, None)
    for truth, moved in moved_copies(volume, affine, size, generator):
        corrector.reset()
        estimate = corrector.estimate(moved)
        assert estimate.converged
        assert_within_fraction(estimate.params, truth, 0.05)


@pytest.mark.parametrize("generator", ["spline5", "fourier"])
@pytest.mark.parametrize("source", ["prisma", "skyra"])
def test_large_known_motion_of_real_volumes_within_5_percent(real_volumes, source, generator) -> None:
    # 2 mm / 2 degrees: the bias was smaller here but still 5-8 % on the worst parameter.
    volume, affine = real_volumes[source]
    corrector = MotionCorrector().set_reference(volume, affine, None)
    for truth, moved in moved_copies(volume, affine, 2.0, generator):
        corrector.reset()
        estimate = corrector.estimate(moved)
        assert estimate.converged
        assert_within_fraction(estimate.params, truth, 0.05)


def test_prisma_small_motions_agree_with_simpleitk(prisma) -> None:
    # Volumes 2, 4 and 5 are within 1 mm / 0.5 degree of volume 3. Before the fix volume 4 came
    # out 0.94 mm FD from volume 3 (tz 0.12 mm, rz -0.41 degree) against SimpleITK's 0.78 mm.
    data, affine = prisma
    corrector = MotionCorrector().set_reference(data[REFERENCE_INDEX], affine, None)
    for index in (2, 4, 5):
        corrector.reset()
        estimate = corrector.estimate(data[index])
        assert estimate.converged
        expected = np.asarray(SITK_PRISMA_MM_DEG[index])
        np.testing.assert_allclose(estimate.params[:3], expected[:3], atol=0.05, err_msg=f"volume {index}, mm")
        np.testing.assert_allclose(np.degrees(estimate.params[3:]), expected[3:], atol=0.05, err_msg=f"volume {index}")
        truth_fd_mm = framewise_displacement(np.stack([np.zeros(6), np.r_[expected[:3], np.radians(expected[3:])]]))[1]
        own_fd_mm = framewise_displacement(np.stack([np.zeros(6), estimate.params]))[1]
        assert own_fd_mm == pytest.approx(truth_fd_mm, rel=0.08), f"volume {index}"


def test_prisma_first_volume_is_a_real_25_degree_turn(prisma) -> None:
    # Issue 13 saw ~20 mm FD and 0.19 rad for volume 0 and suspected the estimator. SimpleITK
    # finds the same head turned 25 degrees about z (correlation with volume 3 inside the head
    # 0.49 -> 0.9 once undone): the motion is real, and 10 iterations stop half-way, reported
    # as not converged. Given the iterations, the corrector reaches SimpleITK's answer.
    data, affine = prisma
    stopped = MotionCorrector().set_reference(data[REFERENCE_INDEX], affine, None).estimate(data[0])
    assert not stopped.converged

    estimate = MotionCorrector(max_iterations=40).set_reference(data[REFERENCE_INDEX], affine, None).estimate(data[0])

    assert estimate.converged
    expected = np.asarray(SITK_PRISMA_MM_DEG[0])
    np.testing.assert_allclose(estimate.params[:3], expected[:3], atol=0.5)
    np.testing.assert_allclose(np.degrees(estimate.params[3:]), expected[3:], atol=0.7)


def test_prisma_series_in_order_recovers_after_the_failed_first_volume(prisma) -> None:
    # Live order with the warm start: volume 0's unconverged fit used to be volume 1's start,
    # and volume 1 then failed too (10 iterations, not converged, 0.2 mm / 1.1 degrees from its cold-start answer).
    data, affine = prisma
    corrector = MotionCorrector().set_reference(data[REFERENCE_INDEX], affine, None)

    estimates = [corrector.estimate(volume) for volume in data]

    assert [e.converged for e in estimates] == [False, True, True, True, True, True]
    cold = MotionCorrector().set_reference(data[REFERENCE_INDEX], affine, None).estimate(data[1])
    np.testing.assert_allclose(estimates[1].params, cold.params, atol=1e-4)
