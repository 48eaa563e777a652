"""Tests of rtdecoder.glm.design against nilearn's make_first_level_design_matrix."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from nilearn.glm.first_level import make_first_level_design_matrix

from rtdecoder.errors import ConfigError
from rtdecoder.glm.design import (
    cosine_drift,
    drift_regressors,
    frame_times_s,
    lss_columns,
    oversampled_grid_s,
    polynomial_drift,
    trial_regressors,
)
from rtdecoder.glm.events import Trial
from rtdecoder.glm.hrf import canonical_hrf


def _random_trials(rng: np.random.Generator, n_trials: int, last_onset_s: float) -> list[Trial]:
    onsets_s = np.sort(rng.uniform(0.0, last_onset_s, n_trials))
    durations_s = rng.choice([0.0, 1.0, 3.0], n_trials)
    return [Trial(f"t{i:03d}", float(o), float(d)) for i, (o, d) in enumerate(zip(onsets_s, durations_s, strict=True))]


def _events(trials: list[Trial], names: list[str] | None = None) -> pd.DataFrame:
    return pd.DataFrame({
        "onset": [t.onset_s for t in trials],
        "duration": [t.duration_s for t in trials],
        "trial_type": names or [t.trial_id for t in trials],
    })


def _nilearn_design(times_s, events, hrf, drift_model, motion, order=2, high_pass_hz=0.01):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-duration events are meant
        # A design nilearn regularises (rank deficient) would not compare.
        warnings.filterwarnings("error", message="Matrix is singular")
        return make_first_level_design_matrix(
            times_s, events, hrf_model=hrf, drift_model=drift_model, drift_order=order,
            high_pass=high_pass_hz, add_regs=motion,
        )


@pytest.mark.parametrize(
    ("tr_s", "slice_time_ref_s", "n_volumes"), [(1.6, 0.0, 150), (2.0, 1.0, 90), (0.8, 0.2, 240), (1.3, 0.0, 97)]
)
@pytest.mark.parametrize("hrf", ["glover", "spm"])
@pytest.mark.parametrize("drift_model", ["polynomial", "cosine"])
def test_design_equals_nilearn(
    rng: np.random.Generator, tr_s: float, slice_time_ref_s: float, n_volumes: int, hrf: str,
    drift_model: str,
) -> None:
    times_s = frame_times_s(n_volumes, tr_s, slice_time_ref_s)
    trials = _random_trials(rng, 12, n_volumes * tr_s - 10.0)
    motion = np.cumsum(rng.normal(scale=0.1, size=(n_volumes, 6)), axis=0)
    expected = _nilearn_design(times_s, _events(trials), hrf, drift_model, motion, order=3).to_numpy()
    ours = np.hstack([
        trial_regressors(trials, times_s, canonical_hrf(hrf, tr_s)),
        motion,
        drift_regressors(times_s, drift_model, drift_order=3, high_pass_hz=0.01),
    ])
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)


def test_lss_columns_equal_nilearn_two_condition_design(rng: np.random.Generator) -> None:
    tr_s, n_volumes = 1.6, 120
    times_s = frame_times_s(n_volumes, tr_s)
    trials = _random_trials(rng, 10, 160.0)
    j = 4
    names = ["others"] * len(trials)
    names[j] = "target"
    motion = rng.normal(size=(n_volumes, 6))
    expected = _nilearn_design(times_s, _events(trials, names), "glover", "polynomial", motion)
    columns = lss_columns(trial_regressors(trials, times_s, canonical_hrf("glover", tr_s)), j)
    np.testing.assert_allclose(columns[:, 0], expected["target"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(columns[:, 1], expected["others"], rtol=0, atol=1e-12)


def test_frame_times_follow_slice_time_reference() -> None:
    np.testing.assert_allclose(frame_times_s(4, 1.6, 0.8), [0.8, 2.4, 4.0, 5.6])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((1, 1.6, 0.0), "n_volumes: expected at least 2 volumes"),
        ((10, 0.0, 0.0), "tr_s: expected a positive repetition time"),
        ((10, 1.6, 2.0), "slice_time_ref_s: expected a time within the TR, 0 to 1.6 s"),
    ],
)
def test_frame_times_reject_bad_arguments(args: tuple, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        frame_times_s(*args)


def test_oversampled_grid_covers_run_at_the_fine_step() -> None:
    tr_s, n_volumes = 1.6, 100
    grid_s = oversampled_grid_s(frame_times_s(n_volumes, tr_s), oversampling=50)
    assert grid_s[0] == pytest.approx(-24.0)
    assert grid_s[-1] == pytest.approx(n_volumes * tr_s)
    np.testing.assert_allclose(np.diff(grid_s), tr_s / 50)


def test_trial_regressor_is_linear_in_trials(rng: np.random.Generator) -> None:
    times_s = frame_times_s(80, 2.0)
    trials = _random_trials(rng, 6, 120.0)
    kernel = canonical_hrf("glover", 2.0)
    each = trial_regressors(trials, times_s, kernel)
    for j, trial in enumerate(trials):
        np.testing.assert_array_equal(each[:, j], trial_regressors([trial], times_s, kernel)[:, 0])
    # A trial's regressor is zero before its onset and rises after it.
    for j, trial in enumerate(trials):
        assert np.all(each[times_s <= trial.onset_s, j] == 0.0)
        assert np.any(each[times_s > trial.onset_s + 4.0, j] > 0.0)


def test_trial_regressors_reject_onsets_before_the_grid() -> None:
    times_s = frame_times_s(50, 2.0)
    with pytest.raises(ConfigError, match=r"trials: expected onsets from -24.000 s and durations >= 0 s"):
        trial_regressors([Trial("early", -30.0, 3.0)], times_s, canonical_hrf("glover", 2.0))
    with pytest.raises(ConfigError, match="shortest duration -1.000 s"):
        trial_regressors([Trial("neg", 3.0, -1.0)], times_s, canonical_hrf("glover", 2.0))


def test_polynomial_drift_is_orthogonal_with_constant_last() -> None:
    drift = polynomial_drift(frame_times_s(60, 2.0), 3)
    assert drift.shape == (60, 4)
    np.testing.assert_array_equal(drift[:, -1], 1.0)
    gram = drift.T @ drift
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-10)


def test_polynomial_drift_order_zero_is_the_constant() -> None:
    np.testing.assert_array_equal(polynomial_drift(frame_times_s(5, 1.0), 0), np.ones((5, 1)))


def test_cosine_drift_count_follows_cut_off() -> None:
    drift = cosine_drift(frame_times_s(190, 1.6), 0.01)
    # floor(2 * 190 * 0.01 * 1.6) = 6 cosines, then the constant.
    assert drift.shape == (190, 7)
    np.testing.assert_allclose(drift[:, :6].T @ drift[:, :6], np.eye(6), atol=1e-10)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda t: drift_regressors(t, "spline"), "drift_model: expected one of polynomial, cosine .got 'spline'"),
        (lambda t: polynomial_drift(t, -1), "drift_order: expected a degree >= 0"),
        (lambda t: cosine_drift(t, 0.0), "high_pass_hz: expected a positive frequency"),
    ],
)
def test_drift_rejects_bad_settings(call, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        call(frame_times_s(20, 2.0))
