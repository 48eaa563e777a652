"""Tests of the voxel mask (grid checks, NIfTI round trip) and per-voxel online normalisation."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from rtdecoder.errors import BundleError, OrderError, VolumeError
from rtdecoder.ingest.volume import Volume
from rtdecoder.preprocess.mask import OnlineNormaliser, VoxelMask
from rtdecoder.preprocess.motion import MotionCorrector

SHAPE = (10, 12, 9)


@pytest.fixture
def affine() -> np.ndarray:
    matrix = np.diag([-3.0, 3.0, 3.2, 1.0])
    matrix[:3, 3] = [14.0, -20.0, -12.0]
    return matrix


@pytest.fixture
def grid(rng) -> np.ndarray:
    return rng.random(SHAPE) > 0.7


def test_ijk_lists_mask_voxels_in_grid_order(grid, affine, rng) -> None:
    mask = VoxelMask(grid, affine)
    assert mask.n_voxels == grid.sum() and mask.shape == SHAPE
    assert mask.ijk.shape == (grid.sum(), 3)
    np.testing.assert_array_equal(np.ravel_multi_index(mask.ijk.T, SHAPE), np.flatnonzero(grid))
    data = rng.normal(size=SHAPE)
    np.testing.assert_array_equal(mask.values(data), data[tuple(mask.ijk.T)].astype(np.float32))
    with pytest.raises(ValueError, match="read-only"):
        mask.ijk[0, 0] = 5


def test_ijk_agrees_with_motion_resampling(grid, affine, rng) -> None:
    from scipy import ndimage

    data = ndimage.gaussian_filter(rng.random(SHAPE), 1.5).astype(np.float32)
    mask = VoxelMask(grid, affine)
    corrector = MotionCorrector(n_samples=200).set_reference(data, affine)
    np.testing.assert_array_equal(corrector.resample_mask(data, np.zeros(6), mask.ijk), mask.values(data))


def test_nifti_round_trip(grid, affine, tmp_path: Path) -> None:
    path = tmp_path / "visual_mask.nii.gz"
    VoxelMask(grid, affine).to_nifti(path)
    loaded = VoxelMask.from_nifti(path)
    np.testing.assert_array_equal(loaded.grid, grid)
    np.testing.assert_allclose(loaded.affine, affine, atol=1e-5)
    assert loaded.source == str(path)


def test_nifti_with_one_volume_in_fourth_axis_is_accepted(grid, affine, tmp_path: Path) -> None:
    path = tmp_path / "mask4d.nii.gz"
    nib.save(nib.Nifti1Image(grid[..., None].astype(np.float32), affine), str(path))
    np.testing.assert_array_equal(VoxelMask.from_nifti(path).grid, grid)


def test_bad_nifti_masks_name_the_file(grid, affine, tmp_path: Path) -> None:
    probabilistic = tmp_path / "prob.nii.gz"
    nib.save(nib.Nifti1Image(grid * 0.6, affine), str(probabilistic))
    with pytest.raises(VolumeError, match=r"prob\.nii\.gz: mask: expected only 0 and 1 values"):
        VoxelMask.from_nifti(probabilistic)
    series = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([grid, grid], axis=-1).astype(np.uint8), affine), str(series))
    with pytest.raises(VolumeError, match=r"series\.nii\.gz: mask: expected a 3D image \(got shape \(10, 12, 9, 2\)\)"):
        VoxelMask.from_nifti(series)
    with pytest.raises(VolumeError, match=r"missing\.nii\.gz: cannot read mask NIfTI"):
        VoxelMask.from_nifti(tmp_path / "missing.nii.gz")
    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, dtype=np.uint8), affine), str(empty))
    with pytest.raises(VolumeError, match=r"empty\.nii\.gz: mask: expected at least one voxel"):
        VoxelMask.from_nifti(empty)


def test_bad_grids_are_rejected(grid, affine) -> None:
    with pytest.raises(VolumeError, match=r"mask: expected a 3D grid \(got shape \(10, 12\)\)"):
        VoxelMask(grid[:, :, 0], affine)
    with pytest.raises(VolumeError, match="mask: expected a boolean grid"):
        VoxelMask(grid.astype(np.uint8), affine)
    with pytest.raises(VolumeError, match=r"affine: expected a finite \(4, 4\) matrix"):
        VoxelMask(grid, np.eye(3))


def test_check_volume_names_volume_mask_and_mismatch(grid, affine, tmp_path: Path) -> None:
    mask = VoxelMask(grid, affine, source=tmp_path / "visual.nii.gz")
    source = tmp_path / "run2" / "0012.dcm"
    mask.check_volume(Volume(np.zeros(SHAPE, np.float32), affine + 1e-5, 1.6, 12, source=source))

    with pytest.raises(
        VolumeError,
        match=r"0012\.dcm: data: shape \(10, 12, 8\) does not match the mask .*visual\.nii\.gz "
        r"\(expected \(10, 12, 9\)\)",
    ):
        mask.check_volume(Volume(np.zeros((10, 12, 8), np.float32), affine, 1.6, 12, source=source))
    moved = affine.copy()
    moved[2, 3] += 1.5
    with pytest.raises(
        VolumeError, match=r"0012\.dcm: affine: does not match the mask .*visual\.nii\.gz .*largest difference 1\.5 mm"
    ):
        mask.check_volume(Volume(np.zeros(SHAPE, np.float32), moved, 1.6, 12, source=source))
    with pytest.raises(VolumeError, match=r"volume 3: data: shape"):
        mask.check_volume(Volume(np.zeros((4, 4, 4), np.float32), affine, 1.6, 3))
    with pytest.raises(VolumeError, match=r"data: expected shape \(10, 12, 9\) like the mask"):
        mask.values(np.zeros((4, 4, 4)))


def test_fixed_statistics_z_score(rng) -> None:
    mean = rng.normal(100.0, 10.0, 50)
    std = rng.uniform(1.0, 5.0, 50)
    normaliser = OnlineNormaliser.from_stats(mean, std, n_volumes=120)
    values = rng.normal(100.0, 10.0, 50)
    z = normaliser.normalise(values)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z, (values - mean) / std, rtol=1e-6)
    np.testing.assert_allclose(normaliser.std_, std)
    assert normaliser.fixed_ and normaliser.n_volumes_ == 120
    normaliser.reset()  # fixed statistics survive a new run
    np.testing.assert_allclose(normaliser.normalise(values), z)


def test_running_statistics_match_batch_statistics(rng) -> None:
    # A large offset with a small spread is where a naive sum-of-squares loses precision.
    series = 1e6 + rng.normal(0.0, 0.01, (40, 30))
    series[:, 0] = 7.0  # a voxel without spread stays neutral
    normaliser = OnlineNormaliser(30)
    outputs = [normaliser.normalise(values) for values in series]

    assert normaliser.n_volumes_ == 40
    assert normaliser.mean_.shape == (30,) and normaliser._sum_squares.shape == (30,)
    np.testing.assert_allclose(normaliser.mean_, series.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(normaliser.std_, series.std(axis=0), rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(outputs[0], np.zeros(30, np.float32))
    for t in (1, 9, 39):
        seen = series[: t + 1]
        expected = (series[t, 1:] - seen[:, 1:].mean(axis=0)) / seen[:, 1:].std(axis=0)
        np.testing.assert_allclose(outputs[t][1:], expected, rtol=1e-4)
        assert outputs[t][0] == 0.0


def test_running_reset_and_min_volumes(rng) -> None:
    normaliser = OnlineNormaliser(5, min_volumes=3)
    for values in rng.normal(size=(2, 5)):
        np.testing.assert_array_equal(normaliser.normalise(values), np.zeros(5))
    assert np.any(normaliser.normalise(rng.normal(size=5)) != 0)
    normaliser.reset()
    assert normaliser.n_volumes_ == 0
    np.testing.assert_array_equal(normaliser.mean_, np.zeros(5))
    np.testing.assert_array_equal(normaliser.std_, np.zeros(5))


def test_save_and_load(rng, tmp_path: Path) -> None:
    running = OnlineNormaliser(20)
    for values in rng.normal(5.0, 2.0, (15, 20)):
        running.update(values)
    path = tmp_path / "calibration_stats.npz"
    running.save(path)
    loaded = OnlineNormaliser.load(path)
    assert loaded.fixed_ and loaded.n_volumes_ == 15
    np.testing.assert_allclose(loaded.mean_, running.mean_)
    np.testing.assert_allclose(loaded.std_, running.std_)
    probe = rng.normal(5.0, 2.0, 20)
    np.testing.assert_allclose(loaded.normalise(probe), (probe - running.mean_) / running.std_, rtol=1e-6)

    again = tmp_path / "again.npz"
    loaded.save(again)
    np.testing.assert_allclose(OnlineNormaliser.load(again).std_, running.std_)


def test_statistics_errors(rng, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"stats: std: expected shape \(4,\) like mean"):
        OnlineNormaliser.from_stats(np.zeros(4), np.ones(5))
    with pytest.raises(BundleError, match=r"stats: mean: expected shape \(n_voxels,\)"):
        OnlineNormaliser.from_stats(np.zeros((2, 2)), np.ones((2, 2)))
    with pytest.raises(
        BundleError, match=r"std: expected finite positive values \(1 of 4 voxels are not, e\.g\. voxel 2\)"
    ):
        OnlineNormaliser.from_stats(np.zeros(4), np.array([1.0, 1.0, 0.0, 2.0]))
    with pytest.raises(BundleError, match="mean: expected finite values"):
        OnlineNormaliser.from_stats(np.array([np.nan, 0.0]), np.ones(2))

    bad_std = tmp_path / "bad_std.npz"
    np.savez(bad_std, mean=np.zeros(3), std=np.zeros(3), n_volumes=np.int64(4), format_version=np.int64(1))
    with pytest.raises(BundleError, match=r"bad_std\.npz: std: expected finite positive values"):
        OnlineNormaliser.load(bad_std)
    no_std = tmp_path / "no_std.npz"
    np.savez(no_std, mean=np.zeros(3))
    with pytest.raises(BundleError, match=r"no_std\.npz: missing std, n_volumes, format_version"):
        OnlineNormaliser.load(no_std)
    future = tmp_path / "future.npz"
    np.savez(future, mean=np.zeros(3), std=np.ones(3), n_volumes=np.int64(4), format_version=np.int64(9))
    with pytest.raises(BundleError, match=r"future\.npz: format_version: expected 1 \(got 9\)"):
        OnlineNormaliser.load(future)
    with pytest.raises(BundleError, match=r"absent\.npz: cannot read normalisation statistics"):
        OnlineNormaliser.load(tmp_path / "absent.npz")


def test_normaliser_misuse(rng, tmp_path: Path) -> None:
    fixed = OnlineNormaliser.from_stats(np.zeros(3), np.ones(3))
    with pytest.raises(OrderError, match=r"update\(\) on fixed calibration statistics"):
        fixed.update(np.zeros(3))
    with pytest.raises(VolumeError, match=r"values: expected shape \(3,\) \(got \(4,\)\)"):
        fixed.normalise(np.zeros(4))
    running = OnlineNormaliser(3)
    running.update(np.zeros(3))
    with pytest.raises(
        OrderError, match=r"save\(\): running statistics have 1 volumes; call normalise\(\) or update\(\)"
    ):
        running.save(tmp_path / "early.npz")
    with pytest.raises(VolumeError, match="values: expected finite values"):
        running.update(np.array([0.0, np.inf, 1.0]))
    with pytest.raises(VolumeError, match="n_voxels: expected a positive integer"):
        OnlineNormaliser(0)
    with pytest.raises(VolumeError, match="min_volumes: expected an integer >= 2"):
        OnlineNormaliser(3, min_volumes=1)
