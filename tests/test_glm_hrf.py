"""Tests of rtdecoder.glm.hrf: canonical kernels, the 20-shape library and the per-voxel choice."""

from __future__ import annotations

import numpy as np
import pytest
from nilearn.glm.first_level import glover_hrf as nilearn_glover_hrf
from nilearn.glm.first_level import spm_hrf as nilearn_spm_hrf

from rtdecoder.errors import ConfigError, VolumeError
from rtdecoder.glm.design import drift_regressors, frame_times_s, trial_regressors
from rtdecoder.glm.events import Trial
from rtdecoder.glm.hrf import (
    HRF_LIBRARY_SIZE,
    canonical_hrf,
    choose_hrf_per_voxel,
    gamma_difference_hrf,
    glover_hrf,
    hrf_library,
    hrf_time_to_peak_s,
    library_r2,
    spm_hrf,
)


@pytest.mark.parametrize("tr_s", [0.8, 1.6, 2.0])
@pytest.mark.parametrize("oversampling", [1, 16, 50])
def test_canonical_kernels_equal_nilearn(tr_s: float, oversampling: int) -> None:
    np.testing.assert_allclose(
        glover_hrf(tr_s, oversampling), nilearn_glover_hrf(tr_s, oversampling), rtol=0, atol=1e-14
    )
    np.testing.assert_allclose(
        spm_hrf(tr_s, oversampling), nilearn_spm_hrf(tr_s, oversampling), rtol=0, atol=1e-14
    )


def test_canonical_hrf_names_and_shapes() -> None:
    glover = canonical_hrf("glover", 1.6)
    assert glover.shape == (1000,)  # 32 s at 1.6 / 50 s per sample
    assert glover.sum() == pytest.approx(1.0)
    assert 4.5 < float(hrf_time_to_peak_s(glover, 1.6)) < 5.5
    assert not np.allclose(canonical_hrf("spm", 1.6), glover)


def test_canonical_hrf_rejects_unknown_name() -> None:
    with pytest.raises(ConfigError, match="hrf: expected one of glover, spm .got 'boynton'"):
        canonical_hrf("boynton", 1.6)


def test_gamma_difference_rejects_bad_sampling() -> None:
    with pytest.raises(ConfigError, match="expected tr_s > 0"):
        gamma_difference_hrf(0.0)


def test_library_spans_peaks_and_undershoots() -> None:
    tr_s, oversampling = 1.6, 50
    library = hrf_library(tr_s, oversampling)
    assert library.shape == (HRF_LIBRARY_SIZE, 1000)
    np.testing.assert_allclose(library.sum(axis=1), 1.0)
    peaks_s = hrf_time_to_peak_s(library, tr_s, oversampling)
    step_s = tr_s / oversampling
    assert abs(peaks_s[0] - 3.5) <= 2 * step_s and abs(peaks_s[-1] - 7.5) <= 2 * step_s
    assert np.all(np.diff(peaks_s) > 0)
    # Undershoot depth relative to the peak: four distinct levels, each used five times.
    depth = np.round(-library.min(axis=1) / library.max(axis=1), 2)
    assert len(np.unique(depth[:4])) == 4
    assert np.all(depth > 0)
    # All shapes are distinct from one another.
    distance = np.linalg.norm(library[:, None] - library[None, :], axis=2)
    assert np.all(distance[~np.eye(HRF_LIBRARY_SIZE, dtype=bool)] > 1e-4)


def _calibration_run(rng: np.random.Generator, shape_per_voxel: np.ndarray, noise: float):
    tr_s, n_volumes = 1.6, 160
    trials = [Trial(f"t{i:02d}", 6.0 + 8.0 * i + rng.uniform(0.0, 2.0), 3.0) for i in range(28)]
    times_s = frame_times_s(n_volumes, tr_s)
    library = hrf_library(tr_s)
    motion = np.cumsum(rng.normal(scale=0.05, size=(n_volumes, 6)), axis=0)
    amplitudes = rng.uniform(1.0, 3.0, size=(len(trials), shape_per_voxel.size))
    data = np.empty((n_volumes, shape_per_voxel.size))
    for v, k in enumerate(shape_per_voxel):
        data[:, v] = trial_regressors(trials, times_s, library[k]) @ amplitudes[:, v]
    data += motion @ rng.normal(scale=0.3, size=(6, shape_per_voxel.size))
    data += drift_regressors(times_s, "polynomial", 2) @ rng.normal(size=(3, shape_per_voxel.size))
    data += rng.normal(scale=noise, size=data.shape)
    return data, trials, tr_s, motion


def test_choose_hrf_per_voxel_recovers_the_simulated_shapes(rng: np.random.Generator) -> None:
    truth = np.repeat(np.array([1, 8, 13, 19]), 5)
    data, trials, tr_s, motion = _calibration_run(rng, truth, noise=0.02)
    chosen = choose_hrf_per_voxel(data, trials, tr_s, motion_params=motion)
    assert chosen.shape == truth.shape and chosen.dtype.kind == "i"
    np.testing.assert_array_equal(chosen, truth)


def test_choose_hrf_per_voxel_is_close_under_noise(rng: np.random.Generator) -> None:
    truth = np.repeat(np.array([2, 17]), 20)
    data, trials, tr_s, motion = _calibration_run(rng, truth, noise=0.5)
    chosen = choose_hrf_per_voxel(data, trials, tr_s, motion_params=motion)
    peaks_s = hrf_time_to_peak_s(hrf_library(tr_s), tr_s)
    # Noise can trade a shape for a neighbour, but early and late responses stay apart.
    error_s = np.abs(peaks_s[chosen] - peaks_s[truth])
    assert np.mean(error_s < 1.0) >= 0.9
    for k in (2, 17):
        assert abs(np.median(peaks_s[chosen[truth == k]]) - peaks_s[k]) < 0.5


def test_library_r2_is_one_for_a_noise_free_voxel(rng: np.random.Generator) -> None:
    data, trials, tr_s, motion = _calibration_run(rng, np.array([5]), noise=0.0)
    r2 = library_r2(data, trials, tr_s, motion_params=motion)
    assert r2.shape == (HRF_LIBRARY_SIZE, 1)
    assert r2[5, 0] == pytest.approx(1.0, abs=1e-9)
    assert np.all(r2[:, 0] <= r2[5, 0])


def test_library_r2_rejects_mismatched_inputs(rng: np.random.Generator) -> None:
    trials = [Trial("a", 6.0, 3.0)]
    with pytest.raises(VolumeError, match=r"data: expected shape \(n_volumes, n_voxels\)"):
        library_r2(rng.normal(size=40), trials, 1.6)
    with pytest.raises(VolumeError, match=r"motion_params: expected shape \(40, 6\)"):
        library_r2(rng.normal(size=(40, 3)), trials, 1.6, motion_params=np.zeros((39, 6)))
    many = [Trial(f"t{i}", 2.0 + i, 1.0) for i in range(40)]
    with pytest.raises(VolumeError, match="40 volumes cannot fit 43 regressors"):
        library_r2(rng.normal(size=(40, 3)), many, 1.6)
