"""Fractional ridge regression: the algorithm against direct solves, and its use for session betas."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from rtdecoder.calibration.betas import RunDesign, fracridge_session_betas, stimulus_keys
from rtdecoder.config import DEFAULT_FRACRIDGE_FRACTIONS, GLMConfig, config_from_dict
from rtdecoder.errors import ConfigError
from rtdecoder.glm.design import drift_regressors, frame_times_s, trial_regressors
from rtdecoder.glm.events import Trial
from rtdecoder.glm.fracridge import design_svd, fracridge
from rtdecoder.glm.hrf import canonical_hrf

FRACTIONS = np.array([0.01, 0.05, 0.2, 0.5, 0.77, 0.95, 0.999, 1.0])


def _problem(rng: np.random.Generator, n: int = 80, p: int = 12, v: int = 6, spread: float = 2.0):
    """A design whose columns differ in scale by 10**spread (condition number ~ that), and data."""
    X = rng.normal(size=(n, p)) * np.logspace(0, spread, p)
    Y = X @ rng.normal(size=(p, v)) + 5.0 * rng.normal(size=(n, v))
    return X, Y


def _ridge(X: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    return np.linalg.solve(X.T @ X + alpha * np.eye(X.shape[1]), X.T @ y)


def test_fraction_one_is_least_squares(rng) -> None:
    X, Y = _problem(rng)
    betas, alphas = fracridge(X, Y, 1.0)
    np.testing.assert_allclose(betas[0], np.linalg.lstsq(X, Y, rcond=None)[0], rtol=0, atol=1e-8)
    assert np.all(alphas == 0.0)


def test_rank_deficient_design_gives_minimum_norm_least_squares(rng) -> None:
    X, Y = _problem(rng, spread=0.0)
    X = np.hstack([X, X[:, :2] + X[:, 2:4]])  # two columns explained exactly by others
    betas, _ = fracridge(X, Y, [0.5, 1.0])
    np.testing.assert_allclose(betas[1], np.linalg.lstsq(X, Y, rcond=None)[0], rtol=0, atol=1e-8)
    ratio = np.linalg.norm(betas[0], axis=0) / np.linalg.norm(betas[1], axis=0)
    np.testing.assert_allclose(ratio, 0.5, atol=1e-3)


@pytest.mark.parametrize("spread", [0.0, 3.0])
def test_norm_ratio_is_the_requested_fraction(rng, spread: float) -> None:
    X, Y = _problem(rng, spread=spread)
    betas, _ = fracridge(X, Y, FRACTIONS)
    ols = np.linalg.lstsq(X, Y, rcond=None)[0]
    ratio = np.linalg.norm(betas, axis=1) / np.linalg.norm(ols, axis=0)  # (n_fractions, n_targets)
    np.testing.assert_allclose(ratio, np.broadcast_to(FRACTIONS[:, None], ratio.shape), rtol=0, atol=1e-3)


def test_solution_is_the_ridge_solution_at_its_alpha(rng) -> None:
    X, Y = _problem(rng, spread=1.5)
    betas, alphas = fracridge(X, Y, FRACTIONS)
    for f in range(FRACTIONS.size):
        for v in range(Y.shape[1]):
            direct = _ridge(X, Y[:, v], alphas[f, v])
            np.testing.assert_allclose(betas[f, :, v], direct, rtol=0, atol=1e-8 * np.linalg.norm(direct))
    # More shrinkage needs a larger penalty: alpha falls as the fraction grows, to 0 at 1.
    assert np.all(np.diff(alphas, axis=0) < 0) and np.all(alphas[-1] == 0.0) and np.all(alphas[:-1] > 0)


def test_fractions_in_any_order_and_one_dimensional_targets(rng) -> None:
    X, Y = _problem(rng)
    betas, alphas = fracridge(X, Y[:, 0], [0.8, 0.3])
    assert betas.shape == (2, X.shape[1]) and alphas.shape == (2,)
    sorted_betas, _ = fracridge(X, Y[:, :1], [0.3, 0.8])
    np.testing.assert_allclose(betas[::-1], sorted_betas[:, :, 0], rtol=0, atol=1e-12)


def test_zero_target_and_zero_design_give_zero(rng) -> None:
    X, Y = _problem(rng)
    Y[:, 2] = 0.0
    betas, alphas = fracridge(X, Y, [0.5, 1.0])
    assert np.all(betas[:, :, 2] == 0.0) and np.all(alphas[:, 2] == 0.0)
    assert np.all(np.isfinite(betas)) and np.all(alphas[0, [0, 1, 3]] > 0)
    zero_betas, zero_alphas = fracridge(np.zeros_like(X), Y, [0.5, 1.0])
    assert np.all(zero_betas == 0.0) and np.all(zero_alphas == 0.0)


def test_reused_svd_gives_the_same_solution(rng) -> None:
    X, Y = _problem(rng)
    again, _ = fracridge(X, Y, FRACTIONS, svd=design_svd(X))
    np.testing.assert_array_equal(again, fracridge(X, Y, FRACTIONS)[0])
    with pytest.raises(ValueError, match="svd: expected design_svd"):
        fracridge(X[:, :-1], Y, FRACTIONS, svd=design_svd(X))


@pytest.mark.parametrize(
    ("X", "Y", "fractions", "message"),
    [
        (np.ones(10), np.ones((10, 2)), 0.5, r"X: expected a design of shape \(n_samples, n_regressors\)"),
        (np.ones((10, 0)), np.ones((10, 2)), 0.5, r"X: expected a design .* \(got shape \(10, 0\)\)"),
        (np.full((10, 2), np.nan), np.ones((10, 2)), 0.5, "X: expected finite values"),
        (np.ones((10, 2)), np.ones((9, 2)), 0.5, r"Y: expected shape \(10, n_targets\)"),
        (np.ones((10, 2)), np.full(10, np.inf), 0.5, "Y: expected finite values"),
        (np.ones((10, 2)), np.ones(10), 0.0, r"fractions: expected values in \(0, 1\].*\(got \[0.0\]\)"),
        (np.ones((10, 2)), np.ones(10), [0.5, 1.5], r"fractions: expected values in \(0, 1\].*\(got \[1.5\]\)"),
        (np.ones((10, 2)), np.ones(10), [np.nan], r"fractions: expected values in \(0, 1\]"),
        (np.ones((10, 2)), np.ones(10), [], "fractions: expected a number or a 1-D sequence"),
        (np.ones((10, 2)), np.ones(10), [[0.5]], "fractions: expected a number or a 1-D sequence"),
    ],
)
def test_bad_arguments_are_named(X, Y, fractions, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fracridge(X, Y, fractions)


def test_config_defaults_and_validation() -> None:
    glm = GLMConfig()
    assert glm.fracridge is False
    assert glm.fracridge_fractions == DEFAULT_FRACRIDGE_FRACTIONS
    assert len(DEFAULT_FRACRIDGE_FRACTIONS) == 20 and DEFAULT_FRACRIDGE_FRACTIONS[0] == 0.05
    assert DEFAULT_FRACRIDGE_FRACTIONS[-1] == 1.0
    assert GLMConfig(fracridge_fractions=[1, 0.2, 0.2]).fracridge_fractions == (0.2, 1.0)
    for fractions, message in (
        ([0.5], r"glm\.fracridge_fractions: expected 1\.0 among the fractions"),
        ([0.0, 1.0], r"glm\.fracridge_fractions: expected each fraction in \(0, 1\]; out of range: \[0\.0\]"),
        ([1.0, 2.0], r"glm\.fracridge_fractions: expected each fraction in \(0, 1\]; out of range: \[2\.0\]"),
        ([], r"glm\.fracridge_fractions: expected at least one fraction"),
    ):
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"glm": {"fracridge_fractions": fractions}})


def test_stimulus_keys_match_ids_then_indices() -> None:
    trials = [Trial("a", 0.0, 1.0, stim_id="x", stim_index=3), Trial("b", 5.0, 1.0, stim_index=7),
              Trial("c", 9.0, 1.0), Trial("d", 13.0, 1.0, stim_id="x"), Trial("e", 17.0, 1.0, stim_index=7)]
    keys = stimulus_keys(trials)
    assert keys[0] == keys[3] and keys[1] == keys[4] and keys[0] != keys[1] and keys[2] == -1


# --------------------------------------------------------------------------------- session betas


def _session(seed: int, noise: float, n_runs: int = 6, n_trials: int = 30, n_voxels: int = 60, n_stimuli: int = 45):
    """Runs of back-to-back trials (4 s apart, as NSD) whose stimuli repeat across runs.

    Returns the runs, the true betas, the LSA OLS betas (what fraction 1 is for LSA) and the
    stimulus of each trial.
    """
    rng = np.random.default_rng(seed)
    tr_s = 1.6
    n_volumes = int((4.0 + 4.0 * n_trials + 14.0) / tr_s)
    times_s = frame_times_s(n_volumes, tr_s)
    kernel = canonical_hrf("glover", tr_s)
    stimulus = rng.permutation(np.resize(np.arange(n_stimuli), n_runs * n_trials))
    response = rng.normal(size=(n_stimuli, n_voxels))
    runs, truth, ols = [], [], []
    for run in range(n_runs):
        trials = [Trial(f"run{run}-{k}", 4.0 + 4.0 * k, 3.0) for k in range(n_trials)]
        x = trial_regressors(trials, times_s, kernel)
        drift = drift_regressors(times_s, "polynomial", 2)
        betas = response[stimulus[run * n_trials : (run + 1) * n_trials]]
        betas = betas + 0.3 * rng.normal(size=betas.shape)  # a part that does not repeat
        data = x @ betas + drift @ rng.normal(size=(drift.shape[1], n_voxels))
        data += noise * rng.normal(size=data.shape)
        data[7] = np.nan  # a missing volume
        rows = ~np.isnan(data[:, 0])
        full = np.hstack([x, drift])[rows]
        ols.append(np.linalg.lstsq(full, data[rows], rcond=None)[0][:n_trials])
        truth.append(betas)
        runs.append(RunDesign(x[None], drift, np.zeros(n_voxels, dtype=np.int64), data))
    return runs, np.concatenate(truth), np.concatenate(ols), stimulus


def _column_r(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a - a.mean(axis=0), b - b.mean(axis=0)
    return (a * b).sum(axis=0) / np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))


def test_cross_validated_fractions_beat_ols_at_low_snr() -> None:
    runs, truth, ols, stimulus = _session(seed=0, noise=3.0)
    betas, chosen = fracridge_session_betas(ols, runs, stimulus, np.ones(stimulus.size, bool),
                                            DEFAULT_FRACRIDGE_FRACTIONS)
    assert betas.shape == ols.shape and chosen.shape == (ols.shape[1],)
    assert np.all(np.isin(chosen, np.array(DEFAULT_FRACRIDGE_FRACTIONS, dtype=np.float32)))
    assert np.median(chosen) < 0.5
    r_ols, r_ridge = np.median(_column_r(ols, truth)), np.median(_column_r(betas, truth))
    assert r_ols < 0.25 and r_ridge > r_ols + 0.1
    # Rescaled onto OLS: each voxel keeps its mean OLS beta over trials (the least-squares offset).
    np.testing.assert_allclose(betas.mean(axis=0), ols.mean(axis=0), rtol=0, atol=1e-4)
    # Voxels left at fraction 1 keep their OLS betas exactly.
    kept = chosen == 1.0
    np.testing.assert_allclose(betas[:, kept], ols[:, kept], rtol=1e-6, atol=1e-6)


def test_fraction_one_of_the_lsa_ridge_is_the_lsa_fit() -> None:
    """With only 1 offered, ridge is not used, and the candidate equals what the runs' fit gives."""
    runs, _, ols, stimulus = _session(seed=1, noise=1.0, n_runs=3)
    betas, chosen = fracridge_session_betas(ols, runs, stimulus, np.ones(stimulus.size, bool), [1.0])
    assert np.all(chosen == 1.0)
    np.testing.assert_allclose(betas, ols, rtol=1e-6, atol=1e-6)
    # The confounds are projected out, not shrunk: the ridge fit at fraction 1 is the LSA fit.
    x = runs[0].trial_columns[0]
    rows = ~np.isnan(runs[0].data[:, 0])
    basis = np.linalg.svd(runs[0].nuisance[rows], full_matrices=False)[0]
    residual = lambda a: a - basis @ (basis.T @ a)  # noqa: E731
    ridge, _ = fracridge(residual(x[rows]), residual(runs[0].data[rows]), 1.0)
    np.testing.assert_allclose(ridge[0], ols[: x.shape[1]], rtol=0, atol=1e-8)


def test_without_repeats_in_other_runs_every_voxel_keeps_ols(caplog) -> None:
    runs, _, ols, stimulus = _session(seed=2, noise=3.0, n_runs=3)
    unique = np.arange(stimulus.size)
    with caplog.at_level(logging.WARNING, logger="rtdecoder.calibration.betas"):
        betas, chosen = fracridge_session_betas(ols, runs, unique, np.ones(stimulus.size, bool), [0.1, 1.0])
    assert np.all(chosen == 1.0)
    np.testing.assert_array_equal(betas, ols.astype(np.float32))
    assert "keeps its OLS betas (fraction 1)" in caplog.text
    # Repeats among trials that may not choose (test images) do not count either.
    betas, chosen = fracridge_session_betas(ols, runs, stimulus, np.zeros(stimulus.size, bool), [0.1, 1.0])
    assert np.all(chosen == 1.0)


def test_trials_not_estimable_stay_nan() -> None:
    runs, _, ols, stimulus = _session(seed=3, noise=3.0, n_runs=3)
    ols[4] = np.nan
    betas, _ = fracridge_session_betas(ols, runs, stimulus, np.ones(stimulus.size, bool), [0.2, 1.0])
    assert np.all(np.isnan(betas[4])) and np.all(np.isfinite(np.delete(betas, 4, axis=0)))


def test_session_arguments_are_checked() -> None:
    runs, _, ols, stimulus = _session(seed=4, noise=1.0, n_runs=2)
    everyone = np.ones(stimulus.size, bool)
    with pytest.raises(ConfigError, match=r"glm\.fracridge_fractions: expected fractions in \(0, 1\] including 1"):
        fracridge_session_betas(ols, runs, stimulus, everyone, [0.5])
    with pytest.raises(ConfigError, match=r"ols_betas: expected shape \(60, n_voxels\)"):
        fracridge_session_betas(ols[1:], runs, stimulus, everyone, [0.5, 1.0])
    with pytest.raises(ConfigError, match=r"stimulus, choose_on: expected shape \(60,\)"):
        fracridge_session_betas(ols, runs, stimulus[1:], everyone, [0.5, 1.0])
