"""Tests of the simulated subjects: masks, tuning, HRFs, noise, motion and single-trial betas."""

from __future__ import annotations

import numpy as np
import pytest

from rtdecoder.config import config_from_dict
from rtdecoder.errors import ConfigError
from rtdecoder.phantom.subjects import (
    PhantomSubject,
    boxcar_responses,
    double_gamma_hrf,
    hrf_library,
    move_volume,
    shared_latents,
)


def small_config(phantom=None, experiment=None):
    ph = {"grid_shape": [24, 28, 23], "voxel_size_mm": [6.0, 6.0, 6.0], "n_voxels": 300,
          "n_stimuli": 120, "latent_dim": 8, "seed": 11, "n_subjects": 3}
    ph.update(phantom or {})
    exp = {"trials_per_run": 20, "runs_per_session": 2, "sessions_per_subject": 2,
           "n_test_images": 10, "test_repeats": 3}
    exp.update(experiment or {})
    return config_from_dict({"phantom": ph, "experiment": exp})


@pytest.fixture(scope="module")
def pooled() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(120, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def subject() -> PhantomSubject:
    return PhantomSubject.build(small_config(), 0)


def test_shared_latents_are_white_and_seeded(pooled) -> None:
    z = shared_latents(pooled, 8, seed=1)
    assert z.shape == (120, 8) and z.dtype == np.float32
    np.testing.assert_allclose(np.cov(z.T, bias=True), np.eye(8), atol=1e-4)
    np.testing.assert_array_equal(z, shared_latents(pooled, 8, seed=1))
    assert not np.allclose(z, shared_latents(pooled, 8, seed=2))
    with pytest.raises(ConfigError, match="phantom.latent_dim: expected at most 32"):
        shared_latents(pooled, 40, seed=1)


def test_hrf_library_is_varied_and_realistic() -> None:
    t_s = np.arange(0.0, 30.0, 0.01)
    positive_lobe = double_gamma_hrf(t_s, 5.4, 0.9, 10.8, 0.0)
    assert t_s[positive_lobe.argmax()] == pytest.approx(5.4, abs=0.02)
    assert positive_lobe.max() == pytest.approx(1.0)
    canonical = double_gamma_hrf(t_s, 5.4, 0.9, 10.8, 0.35)
    assert 4.9 < t_s[canonical.argmax()] < 5.4 and canonical.min() < -0.05
    library = hrf_library(0)
    peaks = [t_s[double_gamma_hrf(t_s, *row).argmax()] for row in library]
    assert min(peaks) >= 3.9 and max(peaks) <= 7.1 and max(peaks) - min(peaks) > 2.5
    assert np.ptp(library[:, 3]) > 0.2                               # undershoots differ
    _, responses = boxcar_responses(library, 3.0, hrf=double_gamma_hrf)  # these rows are double-gamma parameters
    np.testing.assert_allclose(responses.max(axis=1), 1.0)


def test_subjects_differ_in_mask_size_and_place() -> None:
    config = small_config(phantom={"n_voxels_spread": 0.15})
    subjects = [PhantomSubject.build(config, i) for i in range(3)]
    sizes = {s.n_voxels for s in subjects}
    assert len(sizes) == 3 and all(200 < n < 400 for n in sizes)
    assert not np.allclose(subjects[0].anatomy.voxel_to_mni, subjects[1].anatomy.voxel_to_mni)
    for s in subjects:
        assert np.all(s.anatomy.brain_mask[s.mask]) and np.all(s.anatomy.gm[s.mask] > 0.35)
        assert s.anatomy.mni_coordinates(s.mask)[:, 1].mean() < -60      # occipital
    with pytest.raises(ConfigError, match=r"subject 3: expected 0..2 \(phantom.n_subjects\)"):
        PhantomSubject.build(config, 3)


def test_tuning_is_spatially_smooth(subject, pooled) -> None:
    rng = np.random.default_rng(0)
    trials = [t for session in subject.schedule.runs for run in session for t in run]
    betas, _ = subject.true_betas(trials, pooled, rng)
    ijk = np.argwhere(subject.mask)
    corr = np.corrcoef(betas.T)
    dist = np.abs(ijk[:, None, :] - ijk[None, :, :]).sum(axis=2)
    assert corr[dist == 1].mean() > corr[dist > 6].mean() + 0.2
    assert betas.mean() > 0                                           # images drive visual cortex


def test_simulate_run_shapes_and_determinism(subject, pooled) -> None:
    run = subject.simulate_run(1, 0, pooled)
    n_vol = run.volumes.shape[3]
    assert run.volumes.shape[:3] == (24, 28, 23) and run.volumes.dtype == np.float32
    assert n_vol == int(np.ceil((4.8 + 20 * 4 + 12.8) / 1.6))
    assert run.motion.shape == (n_vol, 6) and run.slice_times_s.shape == (23,)
    assert run.true_betas.shape == (20, subject.n_voxels) and run.latents.shape == (20, 8)
    assert run.hrfs.shape == (subject.n_voxels, 4) and len(run.trials) == 20
    assert len(np.unique(run.hrf_index)) > 5                            # not all canonical
    np.testing.assert_array_equal(run.volumes, subject.simulate_run(1, 0, pooled).volumes)
    other = subject.simulate_run(1, 1, pooled)
    assert not np.array_equal(run.volumes, other.volumes)


def test_evoked_signal_is_sampled_at_slice_times(subject, pooled) -> None:
    trials = subject.schedule.run(0, 0)
    designs = subject._trial_designs(trials, 40)
    t_s, responses = boxcar_responses(subject.hrf_library, 3.0)
    times = subject.slice_times_s
    slow, fast = int(times.argmax()), int(times.argmin())
    for slc in (slow, fast):
        expected = np.interp(np.arange(40) * 1.6 + times[slc] - trials[3].onset_s, t_s, responses[2],
                             left=0.0, right=0.0)
        np.testing.assert_allclose(designs[2, slc, :, 3], expected)
    assert not np.allclose(designs[2, slow], designs[2, fast])


def test_saved_motion_is_the_motion_applied(pooled) -> None:
    config = small_config(phantom={"motion_drift_mm": 1.5, "motion_jump_per_min": 3.0,
                                   "motion_jump_mm": 3.0})
    subject = PhantomSubject.build(config, 1)
    run = subject.simulate_run(0, 0, pooled)
    moved_most = int(np.abs(run.motion[:, :3]).sum(axis=1).argmax())
    observed = run.volumes[..., moved_most]
    head = subject.anatomy.brain_mask | (move_volume(subject.reference_volume, subject.affine,
                                                     run.motion[moved_most]) > 50)

    def misfit(params):
        predicted = move_volume(subject.reference_volume, subject.affine, params)
        return np.sqrt(np.mean((observed - predicted)[head] ** 2))

    right = misfit(run.motion[moved_most])
    assert right < 0.5 * misfit(np.zeros(6))
    assert right < 0.5 * misfit(run.motion[moved_most] * np.array([-1, -1, -1, 1, 1, 1]))
    # Noise (about 1.5 % of ~800) and evoked responses are all that remain.
    assert right < 40.0


def test_single_trial_betas_are_as_noisy_as_nsd(pooled) -> None:
    config = small_config(phantom={"n_voxels": 150},
                          experiment={"trials_per_run": 62, "runs_per_session": 3,
                                      "sessions_per_subject": 1, "n_test_images": 40})
    subject = PhantomSubject.build(config, 2)
    runs = [subject.simulate_betas(0, r, pooled) for r in range(3)]
    est = np.concatenate([r.betas for r in runs])
    true = np.concatenate([r.true_betas for r in runs])
    stim = np.array([t.stim_index for r in runs for t in r.trials])
    per_voxel = np.mean([np.corrcoef(est[:, v], true[:, v])[0, 1] for v in range(est.shape[1])])
    assert 0.15 < per_voxel < 0.6                                    # hard, like NSD single trials
    # Averaging the 3 repeats of the test images brings their mean response out.
    test_images = np.arange(40)
    rows = [np.flatnonzero(stim == i) for i in test_images]
    mean_true = np.stack([true[r].mean(axis=0) for r in rows])
    single = np.stack([est[r[0]] for r in rows])
    averaged = np.stack([est[r].mean(axis=0) for r in rows])

    def corr(a, b):
        return np.mean([np.corrcoef(a[:, v], b[:, v])[0, 1] for v in range(a.shape[1])])

    assert corr(averaged, mean_true) > corr(single, mean_true) + 0.05
