"""Fractional ridge calibration betas on a small phantom session: the path, the saved fractions."""

from __future__ import annotations

import numpy as np
import pytest
from test_calibrate import small_config, tiny_world, write_two_runs

from rtdecoder.calibration.betas import (
    FRACTIONS_NAME,
    estimate_session_betas,
    load_betas,
    load_fracridge_fractions,
    save_betas,
)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """Two runs of phantom subject 1, one NIfTI per volume; training images repeat across them."""
    world = tiny_world(small_config())
    root = tmp_path_factory.mktemp("session")
    write_two_runs(world, root)
    return world, root


@pytest.mark.parametrize("method", ["lss", "lsa"])
def test_fracridge_betas_keep_the_ols_units(session, method: str) -> None:
    world, root = session
    mask = world.subject(1).mask
    ols = estimate_session_betas(root, small_config(glm={"method": method}), mask, progress=False)
    ridge = estimate_session_betas(root, small_config(glm={"method": method, "fracridge": True}), mask,
                                   progress=False)
    assert ols.fracridge_fractions is None
    fractions = ridge.fracridge_fractions
    assert fractions.shape == (mask.sum(),) and fractions.dtype == np.float32
    assert np.all(np.isin(fractions, np.array(small_config().glm.fracridge_fractions, dtype=np.float32)))
    assert np.any(fractions < 1.0)
    assert ridge.betas.shape == ols.betas.shape and np.all(np.isfinite(ridge.betas))
    # Everything but the betas is the OLS path's.
    np.testing.assert_array_equal(ridge.signal_mean, ols.signal_mean)
    np.testing.assert_array_equal(ridge.hrf_index, ols.hrf_index)
    # Rescaled onto the OLS betas: same mean per voxel; voxels at fraction 1 unchanged.
    np.testing.assert_allclose(ridge.betas.mean(axis=0), ols.betas.mean(axis=0), rtol=0, atol=1e-3)
    kept = fractions == 1.0
    np.testing.assert_array_equal(ridge.betas[:, kept], ols.betas[:, kept])
    assert not np.allclose(ridge.betas[:, ~kept], ols.betas[:, ~kept])


def test_fractions_are_saved_beside_the_betas(tmp_path, session) -> None:
    world, root = session
    mask = world.subject(1).mask
    ridge = estimate_session_betas(root, small_config(glm={"fracridge": True}), mask, progress=False)
    save_betas(ridge, tmp_path)
    betas, rows, loaded_mask = load_betas(tmp_path)
    np.testing.assert_array_equal(betas, ridge.betas)
    assert len(rows) == betas.shape[0] and loaded_mask.n_voxels == mask.sum()
    np.testing.assert_array_equal(load_fracridge_fractions(tmp_path), ridge.fracridge_fractions)
    # OLS betas saved into the same folder leave no stale fractions behind.
    ols = estimate_session_betas(root, small_config(), mask, progress=False)
    save_betas(ols, tmp_path)
    assert not (tmp_path / FRACTIONS_NAME).exists() and load_fracridge_fractions(tmp_path) is None
    np.testing.assert_array_equal(load_betas(tmp_path)[0], ols.betas)
