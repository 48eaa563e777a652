"""Tests of rtdecoder.glm.incremental: exactness against nilearn, release rules, state errors."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.glm.first_level import FirstLevelModel

from rtdecoder.config import GLMConfig
from rtdecoder.errors import ConfigError, OrderError, VolumeError
from rtdecoder.glm.design import (
    drift_regressors,
    frame_times_s,
    lss_columns,
    trial_regressors,
)
from rtdecoder.glm.events import Trial
from rtdecoder.glm.hrf import canonical_hrf, hrf_library
from rtdecoder.glm.incremental import IncrementalGLM, TrialBeta

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*mask has been requested.*", "ignore:.*null duration.*"
)

TR_S = 2.0
N_VOLUMES = 90
N_VOXELS = 12
N_TRIALS = 10


def _run(rng: np.random.Generator, slice_time_ref_s: float = 0.0):
    """A small run: trials, motion and data with trial responses, drift and noise."""
    onsets_s = np.sort(rng.uniform(2.0, N_VOLUMES * TR_S - 30.0, N_TRIALS))
    trials = [Trial(f"t{i:02d}", float(o), 3.0) for i, o in enumerate(onsets_s)]
    times_s = frame_times_s(N_VOLUMES, TR_S, slice_time_ref_s)
    motion = np.cumsum(rng.normal(scale=0.1, size=(N_VOLUMES, 6)), axis=0)
    data = 100.0 + rng.normal(size=(N_VOLUMES, N_VOXELS))
    data += trial_regressors(trials, times_s, canonical_hrf("glover", TR_S)) @ rng.normal(
        scale=2.0, size=(N_TRIALS, N_VOXELS)
    )
    data += motion @ rng.normal(scale=0.5, size=(6, N_VOXELS))
    return trials, motion, data


def _feed(glm: IncrementalGLM, data, motion, missing=(), order=None) -> list[TrialBeta]:
    released = []
    for t in order if order is not None else range(data.shape[0]):
        if t in missing:
            glm.mark_missing(t)
        else:
            released += glm.update(t, data[t], motion[t])
    return released


def _nilearn_theta(data, motion, events, hrf, drift_model, slice_time_ref_s, missing):
    """nilearn's OLS parameters (n_regressors, n_voxels) and design column names."""
    n_volumes, n_voxels = data.shape
    image = nib.Nifti1Image(data.T.reshape(n_voxels, 1, 1, n_volumes), np.eye(4))
    mask = nib.Nifti1Image(np.ones((n_voxels, 1, 1), dtype=np.int8), np.eye(4))
    model = FirstLevelModel(
        t_r=TR_S, slice_time_ref=slice_time_ref_s / TR_S, hrf_model=hrf, drift_model=drift_model,
        drift_order=2, high_pass=0.01, noise_model="ols", signal_scaling=False, standardize=False,
        minimize_memory=False, mask_img=mask,
    )
    keep = np.setdiff1d(np.arange(n_volumes), list(missing)) if missing else None
    confounds = pd.DataFrame(motion, columns=[f"motion_{i}" for i in range(6)])
    model.fit(image, events=events, confounds=confounds, sample_masks=keep)
    labels = model.labels_[0]
    theta = np.empty((model.design_matrices_[0].shape[1], n_voxels))
    for label, result in model.results_[0].items():
        theta[:, labels == label] = result.theta
    return theta, list(model.design_matrices_[0].columns)


def _assert_relative_close(ours: np.ndarray, expected: np.ndarray, rtol: float = 1e-4) -> None:
    assert np.all(np.isfinite(ours))
    scale = np.abs(expected).max()
    np.testing.assert_allclose(ours, expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize(
    ("hrf", "drift_model", "slice_time_ref_s", "missing"),
    [("glover", "polynomial", 1.0, (37,)), ("spm", "cosine", 0.0, ())],
)
def test_lsa_final_betas_equal_nilearn(
    rng: np.random.Generator, hrf: str, drift_model: str, slice_time_ref_s: float, missing: tuple
) -> None:
    trials, motion, data = _run(rng, slice_time_ref_s)
    glm = IncrementalGLM(
        trials, TR_S, N_VOLUMES, slice_time_ref_s=slice_time_ref_s, method="lsa", hrf=hrf,
        drift_model=drift_model, drift_order=2, high_pass_hz=0.01,
    ).start(N_VOXELS)
    _feed(glm, data, motion, missing)
    final = glm.finish()

    events = pd.DataFrame({
        "onset": [t.onset_s for t in trials], "duration": [t.duration_s for t in trials],
        "trial_type": [t.trial_id for t in trials],
    })
    theta, names = _nilearn_theta(data, motion, events, hrf, drift_model, slice_time_ref_s, missing)
    expected = theta[[names.index(t.trial_id) for t in trials]]
    assert [b.trial_id for b in final] == [t.trial_id for t in trials]
    assert all(b.is_final and b.beta.dtype == np.float32 for b in final)
    assert final[0].n_volumes_used == N_VOLUMES - len(missing)
    _assert_relative_close(np.stack([b.beta for b in final]), expected)


@pytest.mark.parametrize(("hrf", "missing"), [("glover", (20, 61)), ("spm", ())])
def test_lss_final_betas_equal_nilearn_per_trial_models(
    rng: np.random.Generator, hrf: str, missing: tuple
) -> None:
    trials, motion, data = _run(rng)
    glm = IncrementalGLM(trials, TR_S, N_VOLUMES, method="lss", hrf=hrf).start(N_VOXELS)
    _feed(glm, data, motion, missing)
    ours = np.stack([b.beta for b in glm.finish()])

    expected = np.empty_like(ours)
    for j in range(N_TRIALS):
        events = pd.DataFrame({
            "onset": [t.onset_s for t in trials], "duration": [t.duration_s for t in trials],
            "trial_type": ["target" if i == j else "others" for i in range(N_TRIALS)],
        })
        theta, names = _nilearn_theta(data, motion, events, hrf, "polynomial", 0.0, missing)
        expected[j] = theta[names.index("target")]
    _assert_relative_close(ours, expected)


def _ols(design: np.ndarray, data: np.ndarray) -> np.ndarray:
    return np.linalg.lstsq(design, data, rcond=None)[0]


@pytest.mark.parametrize("method", ["lss", "lsa"])
def test_mid_run_betas_equal_the_fit_of_the_rows_so_far(rng: np.random.Generator, method: str) -> None:
    trials, motion, data = _run(rng)
    glm = IncrementalGLM(trials, TR_S, N_VOLUMES, method=method).start(N_VOXELS)
    n_seen, missing = 48, (30,)
    _feed(glm, data[:n_seen], motion[:n_seen], missing)
    betas = glm.get_betas()

    times_s = frame_times_s(N_VOLUMES, TR_S)
    columns = trial_regressors(trials, times_s, canonical_hrf("glover", TR_S))
    nuisance = np.hstack([motion, drift_regressors(times_s, "polynomial", 2)])
    rows = np.setdiff1d(np.arange(n_seen), missing)
    started = [j for j in range(N_TRIALS) if np.any(columns[rows, j] != 0.0)]
    assert 0 < len(started) < N_TRIALS
    if method == "lsa":
        expected = _ols(np.hstack([columns[:, started], nuisance])[rows], data[rows])[: len(started)]
    else:
        expected = np.stack([
            _ols(np.hstack([lss_columns(columns, j), nuisance])[rows], data[rows])[0] for j in started
        ])
    _assert_relative_close(betas[started], expected)
    not_started = np.setdiff1d(np.arange(N_TRIALS), started)
    assert np.all(np.isnan(betas[not_started]))


@pytest.mark.parametrize("method", ["lss", "lsa"])
def test_library_hrf_groups_each_use_their_own_design(rng: np.random.Generator, method: str) -> None:
    trials, motion, data = _run(rng)
    hrf_per_voxel = np.array([3, 3, 15, 3, 9, 15, 9, 9, 3, 15, 15, 3])
    glm = IncrementalGLM(
        trials, TR_S, N_VOLUMES, method=method, hrf="library", hrf_per_voxel=hrf_per_voxel
    ).start(N_VOXELS)
    _feed(glm, data, motion)
    ours = np.stack([b.beta for b in glm.finish()])
    assert len(glm.group_slices_) == 3

    times_s = frame_times_s(N_VOLUMES, TR_S)
    nuisance = np.hstack([motion, drift_regressors(times_s, "polynomial", 2)])
    library = hrf_library(TR_S)
    for shape in (3, 9, 15):
        voxels = hrf_per_voxel == shape
        columns = trial_regressors(trials, times_s, library[shape])
        if method == "lsa":
            expected = _ols(np.hstack([columns, nuisance]), data[:, voxels])[:N_TRIALS]
        else:
            expected = np.stack([
                _ols(np.hstack([lss_columns(columns, j), nuisance]), data[:, voxels])[0]
                for j in range(N_TRIALS)
            ])
        _assert_relative_close(ours[:, voxels], expected)


def test_release_waits_for_beta_wait_and_refines(rng: np.random.Generator) -> None:
    trials, motion, data = _run(rng)
    glm = IncrementalGLM(trials, TR_S, N_VOLUMES, beta_wait_s=8.0).start(N_VOXELS)
    released = _feed(glm, data, motion)
    times_s = frame_times_s(N_VOLUMES, TR_S)

    first = {b.trial_id: b for b in released if not b.is_update}
    assert sorted(first) == [t.trial_id for t in trials]
    for j, trial in enumerate(trials):
        beta = first[trial.trial_id]
        due = int(np.flatnonzero(times_s >= trial.onset_s + 8.0)[0])
        # Released at the first volume 8 s after onset, or later if not estimable by then.
        assert beta.tr_index >= due and beta.trial_index == j
        assert beta.volume_time_s == pytest.approx(times_s[beta.tr_index])
        assert beta.onset_s == trial.onset_s and not beta.is_final
    on_time = [first[t.trial_id].tr_index == np.flatnonzero(times_s >= t.onset_s + 8.0)[0] for t in trials]
    assert sum(on_time) >= N_TRIALS - 1
    updates = [b for b in released if b.is_update]
    assert updates, "refinements are on by default"
    for b in updates:
        assert b.tr_index > first[b.trial_id].tr_index
        assert b.n_volumes_used == b.tr_index + 1

    final = glm.finish()
    assert all(b.is_final and b.is_update for b in final)
    np.testing.assert_array_equal(np.stack([b.beta for b in final]), glm.get_betas())


def test_refinements_can_be_switched_off(rng: np.random.Generator) -> None:
    trials, motion, data = _run(rng)
    glm = IncrementalGLM(trials, TR_S, N_VOLUMES, publish_refinements=False).start(N_VOXELS)
    released = _feed(glm, data, motion)
    assert [b.trial_id for b in released] == [t.trial_id for t in trials]
    assert not any(b.is_update for b in released)


def test_first_trial_waits_until_estimable(rng: np.random.Generator) -> None:
    # With 6 motion + 3 drift columns, the first trial's LSA model needs more volumes than the
    # 4 that have passed 8 s after an onset at 0.5 s.
    trials = [Trial("early", 0.5, 3.0), Trial("late", 60.0, 3.0)]
    motion = rng.normal(size=(N_VOLUMES, 6))
    data = rng.normal(size=(N_VOLUMES, N_VOXELS))
    glm = IncrementalGLM(trials, TR_S, N_VOLUMES, method="lsa").start(N_VOXELS)
    released = _feed(glm, data[:20], motion[:20])
    early = [b for b in released if b.trial_id == "early" and not b.is_update]
    assert len(early) == 1
    assert early[0].n_volumes_used >= 1 + 6 + 3


def _first_release_correlations(min_residual_dof: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """First-release betas' correlation with the truth across voxels per trial, NSD-like timing; volumes used."""
    rng = np.random.default_rng(seed)
    tr_s, n_volumes, n_voxels = 1.6, 166, 400
    trials = [Trial(f"t{j:02d}", 4.8 + 4.0 * j, 3.0) for j in range(32)]
    times_s = frame_times_s(n_volumes, tr_s)
    motion = np.cumsum(rng.normal(scale=0.05, size=(n_volumes, 6)), axis=0)
    truth = rng.normal(size=(len(trials), n_voxels))
    data = trial_regressors(trials, times_s, canonical_hrf("glover", tr_s)) @ truth
    data += rng.normal(scale=2.0, size=(n_volumes, n_voxels)) + motion @ rng.normal(size=(6, n_voxels))
    glm = IncrementalGLM(trials, tr_s, n_volumes, min_residual_dof=min_residual_dof).start(n_voxels)
    first = {}
    for b in _feed(glm, data, motion):
        first.setdefault(b.trial_index, b)
    betas = np.stack([first[j].beta for j in range(len(trials))])
    b, t = betas - betas.mean(axis=1, keepdims=True), truth - truth.mean(axis=1, keepdims=True)
    r = (b * t).sum(axis=1) / np.sqrt((b * b).sum(axis=1) * (t * t).sum(axis=1))
    return r, [first[j].n_volumes_used for j in range(len(trials))]


def test_first_betas_of_a_run_wait_for_residual_degrees_of_freedom() -> None:
    # Released as soon as just estimable (the former rule), a run's first betas were mostly noise:
    # the drift and motion columns have had few volumes to be told apart from the trials.
    runs = [_first_release_correlations(GLMConfig().min_residual_dof, seed) for seed in range(3)]
    # 2 trial columns (LSS), 3 drift, 6 motion: 20 residual degrees of freedom need 31 volumes.
    assert min(min(used) for _, used in runs) >= 11 + GLMConfig().min_residual_dof
    early, later = np.mean([r[:6] for r, _ in runs]), np.median([r[8:] for r, _ in runs])
    assert early > 0.75 * later
    just_estimable = np.mean([_first_release_correlations(0, seed)[0][:6] for seed in range(3)])
    assert just_estimable < 0.5 * later


def test_out_of_order_volumes_give_the_same_betas(rng: np.random.Generator) -> None:
    trials, motion, data = _run(rng)
    in_order = IncrementalGLM(trials, TR_S, N_VOLUMES, method="lsa").start(N_VOXELS)
    _feed(in_order, data, motion)
    shuffled = IncrementalGLM(trials, TR_S, N_VOLUMES, method="lsa").start(N_VOXELS)
    _feed(shuffled, data, motion, order=rng.permutation(N_VOLUMES))
    np.testing.assert_allclose(shuffled.get_betas(), in_order.get_betas(), rtol=1e-5, atol=1e-5)


def test_reset_replays_the_run(rng: np.random.Generator) -> None:
    trials, motion, data = _run(rng)
    glm = IncrementalGLM(trials, TR_S, N_VOLUMES).start(N_VOXELS)
    first = _feed(glm, data, motion)
    glm.finish()
    glm.reset()
    assert np.all(np.isnan(glm.get_betas()))
    again = _feed(glm, data, motion)
    assert [(b.trial_id, b.tr_index) for b in again] == [(b.trial_id, b.tr_index) for b in first]


def test_memory_stays_constant_over_the_run(rng: np.random.Generator) -> None:
    trials, motion, data = _run(rng)
    glm = IncrementalGLM(trials, TR_S, N_VOLUMES).start(N_VOXELS)

    def array_bytes() -> dict[str, int]:
        return {k: v.nbytes for k, v in vars(glm).items() if isinstance(v, np.ndarray)}

    before = array_bytes()
    _feed(glm, data, motion)
    assert array_bytes() == before
    # No per-volume data is kept: nothing scales with n_volumes * n_voxels.
    assert max(before.values()) < N_VOLUMES * N_VOXELS * 8


def test_motion_confounds_off_needs_no_motion(rng: np.random.Generator) -> None:
    trials, _, data = _run(rng)
    glm = IncrementalGLM(trials, TR_S, N_VOLUMES, motion_confounds=False).start(N_VOXELS)
    for t in range(N_VOLUMES):
        glm.update(t, data[t])
    assert glm.n_nuisance_ == 3
    assert np.all(np.isfinite(glm.get_betas()))


def test_from_config_takes_the_glm_section() -> None:
    config = GLMConfig(method="lsa", drift_model="cosine", beta_wait_s=5.0, publish_refinements=False)
    glm = IncrementalGLM.from_config(config, [Trial("a", 4.0, 3.0)], 1.6, 50)
    assert (glm.method, glm.drift_model, glm.beta_wait_s, glm.publish_refinements) == (
        "lsa", "cosine", 5.0, False
    )


def test_update_before_start_says_to_call_start() -> None:
    glm = IncrementalGLM([Trial("a", 4.0, 3.0)], TR_S, 20)
    with pytest.raises(OrderError, match=r"update: the GLM is not started; call start\(n_voxels\) first"):
        glm.update(0, np.zeros(3), np.zeros(6))
    with pytest.raises(OrderError, match="get_betas: the GLM is not started"):
        glm.get_betas()


def test_state_errors(rng: np.random.Generator) -> None:
    trials, motion, data = _run(rng)
    glm = IncrementalGLM(trials, TR_S, N_VOLUMES).start(N_VOXELS)
    glm.update(0, data[0], motion[0])
    glm.mark_missing(1)
    with pytest.raises(OrderError, match="update: volume 0 was already added; each volume counts once"):
        glm.update(0, data[0], motion[0])
    with pytest.raises(OrderError, match="update: volume 1 was already marked missing"):
        glm.update(1, data[1], motion[1])
    glm.finish()
    with pytest.raises(OrderError, match=r"the run is finished; call reset\(\)"):
        glm.update(2, data[2], motion[2])
    with pytest.raises(OrderError, match="finish: the run is already finished"):
        glm.finish()


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((N_VOLUMES, np.zeros(N_VOXELS), np.zeros(6)), VolumeError, r"tr_index: expected 0 to 89, .*\(got 90\)"),
        ((0, np.zeros(N_VOXELS + 1), np.zeros(6)), VolumeError, r"values: expected shape \(12,\)"),
        ((0, np.full(N_VOXELS, np.nan), np.zeros(6)), VolumeError, "12 NaN or infinite voxels"),
        ((0, np.zeros(N_VOXELS), None), VolumeError, "motion_params of volume 0: expected shape .6,. because"),
        ((0, np.zeros(N_VOXELS), np.zeros(5)), VolumeError, r"expected 6 finite values \(got shape \(5,\)\)"),
    ],
)
def test_update_rejects_bad_volumes(rng: np.random.Generator, args, error, match: str) -> None:
    trials, _, _ = _run(rng)
    glm = IncrementalGLM(trials, TR_S, N_VOLUMES).start(N_VOXELS)
    with pytest.raises(error, match=match):
        glm.update(*args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "lsq"}, "glm.method: expected one of lss, lsa .got 'lsq'"),
        ({"hrf": "boynton"}, "glm.hrf: expected one of canonical, glover, spm, library"),
        ({"drift_model": "spline"}, "glm.drift_model: expected one of polynomial, cosine"),
        ({"beta_wait_s": -1.0}, "glm.beta_wait_s: expected >= 0 s"),
        ({"hrf": "library"}, "hrf_per_voxel: glm.hrf is 'library' but no per-voxel HRF choice"),
        (
            {"hrf": "library", "hrf_per_voxel": np.zeros(3, dtype=int)},
            r"expected 12 integer library indices \(got shape \(3,\)",
        ),
        (
            {"hrf": "library", "hrf_per_voxel": np.full(12, 21)},
            "hrf_per_voxel: expected indices 0 to 20 .got 21 to 21.",
        ),
        ({"min_residual_dof": -1}, r"glm.min_residual_dof: expected a whole number >= 0 \(got -1\)"),
        ({"hrf_per_voxel": np.zeros(12, dtype=int)}, "hrf_per_voxel: given, but glm.hrf is 'canonical'"),
    ],
)
def test_start_rejects_bad_settings(kwargs: dict, match: str) -> None:
    glm = IncrementalGLM([Trial("a", 4.0, 3.0)], TR_S, N_VOLUMES, **kwargs)
    with pytest.raises(ConfigError, match=match):
        glm.start(N_VOXELS)


def test_start_rejects_bad_trials() -> None:
    with pytest.raises(ConfigError, match="trials: expected at least one trial"):
        IncrementalGLM([], TR_S, N_VOLUMES).start(N_VOXELS)
    twice = [Trial("a", 4.0, 3.0), Trial("a", 10.0, 3.0)]
    with pytest.raises(ConfigError, match=r"trials: trial_id: expected unique ids \(repeated: a\)"):
        IncrementalGLM(twice, TR_S, N_VOLUMES).start(N_VOXELS)


def test_live_contrasts_equal_the_lss_contrast_of_the_rows_so_far(rng: np.random.Generator) -> None:
    trials, motion, data = _run(rng)
    level = rng.normal(size=N_VOXELS)
    glm = IncrementalGLM(trials, TR_S, N_VOLUMES, live_level=level).start(N_VOXELS)
    plain = IncrementalGLM(trials, TR_S, N_VOLUMES).start(N_VOXELS)
    released = _feed(glm, data, motion)
    _feed(plain, data, motion)
    times_s = frame_times_s(N_VOLUMES, TR_S)
    columns = trial_regressors(trials, times_s, canonical_hrf("glover", TR_S))
    nuisance = np.hstack([motion, drift_regressors(times_s, "polynomial", 2)])
    checked = 0
    for beta in released:
        rows = np.arange(beta.tr_index + 1)
        design = np.hstack([lss_columns(columns, beta.trial_index), nuisance])[rows]
        keep = np.any(design != 0.0, axis=0)  # an "other trials" column still all zero is dropped
        theta = np.zeros((design.shape[1], N_VOXELS))
        theta[keep] = _ols(design[:, keep], data[rows])
        _assert_relative_close(beta.beta - level, theta[0] - theta[1])
        checked += 1
    assert checked > N_TRIALS  # first releases and refinements
    final = {b.trial_id: b.beta for b in glm.finish()}
    for b in plain.finish():  # final betas are plain LSS, as calibration fits them
        np.testing.assert_array_equal(final[b.trial_id], b.beta)


def _live_correlations(live_level: bool, seed: int) -> np.ndarray:
    """Per voxel, the first releases' correlation with the truth across trials, NSD-like timing."""
    rng = np.random.default_rng(seed)
    tr_s, n_volumes, n_voxels = 1.6, 166, 300
    trials = [Trial(f"t{j:02d}", 4.8 + 4.0 * j, 3.0) for j in range(62)]
    times_s = frame_times_s(n_volumes, tr_s)
    motion = np.cumsum(rng.normal(scale=0.05, size=(n_volumes, 6)), axis=0)
    mean_response = rng.uniform(1.0, 3.0, n_voxels)  # every image drives visual cortex
    truth = mean_response + rng.normal(scale=0.5, size=(len(trials), n_voxels))
    data = trial_regressors(trials, times_s, canonical_hrf("glover", tr_s)) @ truth
    x = np.linspace(-1.0, 1.0, n_volumes)[:, None]
    drift = np.hstack([x, x**2, x**3]) @ rng.normal(size=(3, n_voxels))  # cubic: the model's drift is quadratic
    data += rng.normal(size=(n_volumes, n_voxels)) + drift + motion @ rng.normal(size=(6, n_voxels))
    level = mean_response if live_level else None
    glm = IncrementalGLM(trials, tr_s, n_volumes, min_residual_dof=20, live_level=level).start(n_voxels)
    first = {}
    for b in _feed(glm, data, motion):
        first.setdefault(b.trial_index, b.beta)
    betas = np.stack([first[j] for j in range(len(trials))])
    b, t = betas - betas.mean(axis=0), truth - truth.mean(axis=0)
    return (b * t).sum(axis=0) / np.sqrt((b * b).sum(axis=0) * (t * t).sum(axis=0))


def test_live_contrasts_remove_the_level_error_live_betas_share() -> None:
    # Trials every 4 s sum to a plateau that the intercept can stand for: before the run's end the
    # common level of all live betas is poorly fixed, and its error is the same for every trial.
    plain = [np.median(_live_correlations(False, seed)) for seed in range(3)]
    contrast = [np.median(_live_correlations(True, seed)) for seed in range(3)]
    assert all(c > p for p, c in zip(plain, contrast, strict=True)), (plain, contrast)
    assert np.mean(contrast) > np.mean(plain) + 0.015, (plain, contrast)


def test_live_contrast_comes_from_the_glm_section_and_needs_lss() -> None:
    trials, level = [Trial("a", 4.0, 3.0)], np.zeros(N_VOXELS)
    assert IncrementalGLM.from_config(GLMConfig(live_contrast=True), trials, TR_S, N_VOLUMES,
                                      live_level=level).live_level is level
    assert IncrementalGLM.from_config(GLMConfig(), trials, TR_S, N_VOLUMES, live_level=level).live_level is None
    with pytest.raises(ConfigError, match="glm.live_contrast: expected glm.method 'lss'"):
        IncrementalGLM(trials, TR_S, N_VOLUMES, method="lsa", live_level=level).start(N_VOXELS)
    with pytest.raises(ConfigError, match=r"live_level: expected 12 finite values, one per voxel \(got shape \(3,\)"):
        IncrementalGLM(trials, TR_S, N_VOLUMES, live_level=np.zeros(3)).start(N_VOXELS)
