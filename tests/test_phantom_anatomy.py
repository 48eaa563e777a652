"""Tests of the simulated heads built from nilearn's MNI152 templates."""

from __future__ import annotations

import numpy as np
import pytest

from rtdecoder.phantom.anatomy import build_anatomy, grid_affine, rotation_matrix

GRID = (24, 28, 23)
VOXEL_MM = (6.0, 6.0, 6.0)


@pytest.fixture(scope="module")
def anatomy():
    return build_anatomy(GRID, VOXEL_MM, np.random.default_rng(3))


def test_grid_affine_centres_the_grid() -> None:
    affine = grid_affine((10, 12, 8), (3.0, 2.0, 2.5))
    centre = affine @ np.array([4.5, 5.5, 3.5, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-12)
    np.testing.assert_allclose(np.diag(affine)[:3], (3.0, 2.0, 2.5))


def test_rotation_matrix_is_a_rotation(rng: np.random.Generator) -> None:
    rot = rotation_matrix(rng.uniform(-0.5, 0.5, 3))
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(rot) == pytest.approx(1.0)


def test_head_has_epi_contrast_and_no_skull(anatomy) -> None:
    ref = anatomy.reference_volume
    assert ref.shape == GRID and ref.dtype == np.float32
    brain = anatomy.brain_mask
    assert 2000 < brain.sum() < 0.6 * ref.size
    means = {name: ref[brain & (getattr(anatomy, name) > 0.7)].mean() for name in ("csf", "gm", "wm")}
    # T2*-weighted EPI: CSF brightest, white matter darkest.
    assert means["csf"] > means["gm"] > means["wm"] > 300
    # Nothing outside the brain's tissue maps (no skull or scalp).
    tissue = anatomy.gm + anatomy.wm + anatomy.csf
    assert np.all(ref[tissue < 1e-3] < 1.0)
    assert ref[0, 0, -1] == 0 and ref[-1, -1, -1] == 0


def test_heads_differ_between_subjects_and_repeat_per_seed(anatomy) -> None:
    again = build_anatomy(GRID, VOXEL_MM, np.random.default_rng(3))
    other = build_anatomy(GRID, VOXEL_MM, np.random.default_rng(4))
    np.testing.assert_array_equal(again.reference_volume, anatomy.reference_volume)
    assert not np.array_equal(other.brain_mask, anatomy.brain_mask)
    assert not np.allclose(other.voxel_to_mni, anatomy.voxel_to_mni)


def test_mni_coordinates_put_occipital_cortex_at_the_back(anatomy) -> None:
    coords = anatomy.mni_coordinates(anatomy.brain_mask)
    ijk = np.argwhere(anatomy.brain_mask)
    # The grid's second axis runs posterior to anterior, as MNI y does.
    assert np.corrcoef(ijk[:, 1], coords[:, 1])[0, 1] > 0.95
    assert coords[:, 1].min() < -85 and coords[:, 1].max() > 45
