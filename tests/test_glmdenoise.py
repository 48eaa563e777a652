"""GLMdenoise: planted noise components are found and removed; the live path applies the same ones.

Covers :mod:`rtdecoder.glm.denoise` (noise pool, spatial components, cross-validated count), the
extra nuisance columns of :class:`~rtdecoder.glm.incremental.IncrementalGLM`, calibration with
``glm.glmdenoise`` (:func:`~rtdecoder.calibration.betas.estimate_session_betas`), the live
:class:`~rtdecoder.session.frontend.FrontEnd` with the calibration's components, and the bundle's
``glmdenoise.safetensors``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.linalg import subspace_angles
from scipy.ndimage import gaussian_filter1d

from rtdecoder.bundle import GLMDENOISE_NAME, SubjectBundle
from rtdecoder.calibration.betas import estimate_session_betas, find_runs, read_run_volumes
from rtdecoder.config import config_from_dict, load_config
from rtdecoder.embedding.base import Embedding
from rtdecoder.errors import BundleError, ConfigError, VolumeError
from rtdecoder.glm.denoise import (
    DenoiseRun,
    NoiseComponents,
    choose_n_components,
    crossvalidated_r2_pct,
    fit_glmdenoise,
    noise_pool_candidates,
)
from rtdecoder.glm.design import frame_times_s, polynomial_drift, trial_regressors
from rtdecoder.glm.events import Trial, write_events_tsv
from rtdecoder.glm.hrf import canonical_hrf
from rtdecoder.glm.incremental import IncrementalGLM
from rtdecoder.phantom.scanner import volumes_from_array, write_run
from rtdecoder.phantom.world import PhantomWorld
from rtdecoder.preprocess.mask import OnlineNormaliser
from rtdecoder.preprocess.motion import MotionCorrector
from rtdecoder.session.frontend import FrontEnd

TR_S = 1.6
N_VOLUMES = 160
N_RUNS = 4
N_TRIALS = 36
N_MASK = 60  # decoding-mask voxels
N_CANDIDATES = 300  # noise-pool candidates, the first N_RESPONSIVE of which answer the task
N_RESPONSIVE = 40
N_PLANTED = 3
BASELINE = 1000.0  # scanner units


def _synthetic_session(seed: int = 3):
    """Runs with known spatial noise components added to task and candidate voxels.

    Returns the runs, the true single-trial betas (per run, (N_TRIALS, N_MASK), PSC), the trials
    per run and the planted patterns (N_MASK + N_CANDIDATES, N_PLANTED), PSC per unit time course.
    """
    rng = np.random.default_rng(seed)
    patterns = rng.normal(size=(N_MASK + N_CANDIDATES, N_PLANTED))
    kernel = canonical_hrf("glover", TR_S)
    times_s = frame_times_s(N_VOLUMES, TR_S)
    runs, truth, trials_per_run = [], [], []
    for run in range(N_RUNS):
        onsets_s = 4.8 + 6.0 * np.arange(N_TRIALS) + rng.uniform(0.0, 1.0, N_TRIALS)
        trials = [Trial(f"r{run}t{i:02d}", float(o), 3.0) for i, o in enumerate(onsets_s)]
        x = trial_regressors(trials, times_s, kernel)
        betas = 1.0 + 0.7 * rng.normal(size=(N_TRIALS, N_MASK))
        # Smooth (physiology-like) time courses of the planted components, unit variance.
        courses = gaussian_filter1d(rng.normal(size=(N_VOLUMES, N_PLANTED)), 1.0, axis=0)
        courses /= courses.std(axis=0)
        drift = polynomial_drift(times_s, 2)[:, :2] @ rng.normal(size=(2, N_MASK + N_CANDIDATES))
        psc = courses @ patterns.T + drift + 0.8 * rng.normal(size=(N_VOLUMES, N_MASK + N_CANDIDATES))
        psc[:, :N_MASK] += x @ betas
        psc[:, N_MASK : N_MASK + N_RESPONSIVE] += x @ (2.0 + 0.3 * rng.normal(size=(N_TRIALS, N_RESPONSIVE)))
        raw = BASELINE * (1.0 + psc / 100.0)
        runs.append(DenoiseRun(
            data=psc[:, :N_MASK], onoff=x.sum(axis=1)[None], nuisance=polynomial_drift(times_s, 2),
            candidate_values=raw[:, N_MASK:].astype(np.float32), candidate_onoff=x.sum(axis=1),
        ))
        truth.append(betas)
        trials_per_run.append(trials)
    return runs, truth, trials_per_run, patterns


def _candidate_ijk() -> np.ndarray:
    return np.argwhere(np.ones((10, 10, 3), dtype=bool))


def _lsa_betas(trials, data, components: NoiseComponents | None, candidates: np.ndarray, pool_index) -> np.ndarray:
    n = 0 if components is None else components.n_components
    glm = IncrementalGLM(trials, TR_S, N_VOLUMES, method="lsa", motion_confounds=False, n_confounds=n).start(N_MASK)
    regressors = None if components is None else components.regressors(candidates[:, pool_index])
    for t in range(N_VOLUMES):
        glm.update(t, data[t], None, None if regressors is None else regressors[t])
    return np.stack([b.beta for b in glm.finish()])


def test_glmdenoise_recovers_planted_noise_components() -> None:
    runs, truth, trials, patterns = _synthetic_session()
    fit = fit_glmdenoise(runs, np.zeros(N_MASK, dtype=np.int64), _candidate_ijk(), max_components=8)
    assert fit is not None
    # The count: the planted three (the curve flattens after them), never fewer.
    assert fit.n_chosen == N_PLANTED, fit.cv_r2_pct
    assert fit.cv_r2_pct[N_PLANTED] > fit.cv_r2_pct[0] + 2.0
    # The pool: task-unresponsive candidates, not the ones answering the task.
    in_pool = np.isin(np.arange(N_CANDIDATES), fit.pool_index)
    assert in_pool[N_RESPONSIVE:].mean() > 0.5 and in_pool[:N_RESPONSIVE].mean() < 0.1
    np.testing.assert_array_equal(fit.components.pool_ijk, _candidate_ijk()[fit.pool_index])
    # The components span the planted patterns (in the pool's normalised units).
    found = fit.components.components[:, :N_PLANTED].astype(np.float64)
    np.testing.assert_allclose(found.T @ found, np.eye(N_PLANTED), atol=1e-5)
    planted = patterns[N_MASK + fit.pool_index] / fit.components.pool_std[:, None].astype(np.float64)
    assert np.degrees(subspace_angles(found, planted)).max() < 5.0
    # And the single-trial betas' error drops with them as confounds.
    chosen = fit.chosen
    error = {}
    for name, components in (("plain", None), ("denoised", chosen)):
        estimates = [
            _lsa_betas(t, run.data, components, run.candidate_values, fit.pool_index)
            for t, run in zip(trials, runs, strict=True)
        ]
        error[name] = float(np.sqrt(np.mean((np.concatenate(estimates) - np.concatenate(truth)) ** 2)))
    assert error["denoised"] < 0.5 * error["plain"], error


def test_without_shared_noise_the_components_gain_nothing() -> None:
    """Without shared noise the components only fit noise: the cross-validation curve stays flat.

    (GLMdenoise's rule may still take a component or two for a gain of hundredths of a percent;
    each costs one degree of freedom of the run's ~160.)
    """
    rng = np.random.default_rng(11)
    runs, _, _, _ = _synthetic_session()
    quiet = []
    for run in runs:
        raw = BASELINE + BASELINE / 100.0 * rng.normal(size=run.candidate_values.shape)
        data = run.onoff[0][:, None] * np.ones(N_MASK) + rng.normal(size=run.data.shape)
        quiet.append(DenoiseRun(data, run.onoff, run.nuisance, raw.astype(np.float32), run.candidate_onoff))
    fit = fit_glmdenoise(quiet, np.zeros(N_MASK, dtype=np.int64), _candidate_ijk(), max_components=6)
    assert fit is not None
    assert np.max(np.abs(fit.cv_r2_pct - fit.cv_r2_pct[0])) < 0.2, fit.cv_r2_pct


def test_one_run_or_a_tiny_pool_skips_glmdenoise() -> None:
    runs, _, _, _ = _synthetic_session()
    assert fit_glmdenoise(runs[:1], np.zeros(N_MASK, dtype=np.int64), _candidate_ijk(), 4) is None
    few = [DenoiseRun(r.data, r.onoff, r.nuisance, r.candidate_values[:, N_RESPONSIVE : N_RESPONSIVE + 3],
                      r.candidate_onoff) for r in runs]
    assert fit_glmdenoise(few, np.zeros(N_MASK, dtype=np.int64), _candidate_ijk()[:3], 4) is None
    none = [DenoiseRun(r.data, r.onoff, r.nuisance, r.candidate_values[:, :0], r.candidate_onoff) for r in runs]
    assert fit_glmdenoise(none, np.zeros(N_MASK, dtype=np.int64), _candidate_ijk()[:0], 4) is None
    with pytest.raises(ConfigError, match="glmdenoise_max_components"):
        fit_glmdenoise(runs, np.zeros(N_MASK, dtype=np.int64), _candidate_ijk(), 0)


def test_noise_pool_candidates_keep_away_from_the_mask() -> None:
    brain = np.zeros((9, 9, 9), dtype=bool)
    brain[1:8, 1:8, 1:8] = True
    mask = np.zeros_like(brain)
    mask[4, 4, 4] = True
    candidates = noise_pool_candidates(brain, mask)
    assert candidates.shape == (7**3 - 27, 3)  # the mask voxel and its 26 neighbours are left out
    assert np.all(np.abs(candidates - 4).max(axis=1) >= 2)
    assert noise_pool_candidates(brain, mask, margin_voxels=0).shape == (7**3 - 1, 3)
    np.testing.assert_array_equal(candidates, np.argwhere(brain & ~np.pad(np.ones((3, 3, 3), bool), 3)))


def test_choose_n_components_follows_glmdenoise_rule() -> None:
    assert choose_n_components(np.array([5.0, 6.0, 8.0, 9.9, 10.0, 10.1])) == 3  # within 5% of the best gain
    assert choose_n_components(np.array([5.0, 6.0, 5.5, 6.0])) == 1  # ties keep the fewer
    assert choose_n_components(np.array([5.0, 4.0, 3.0])) == 0  # nothing beats none
    assert choose_n_components(np.array([5.0])) == 0


def test_crossvalidated_r2_matches_a_direct_fit(rng) -> None:
    """The sufficient-statistics cross-validation equals fitting each fold by least squares."""
    n_runs, n_volumes, n_voxels = 3, 40, 5
    data, onoff, nuisance, extra = [], [], [], []
    for _ in range(n_runs):
        x = np.abs(rng.normal(size=(2, n_volumes)))
        q = np.column_stack([np.ones(n_volumes), np.linspace(-1, 1, n_volumes)])
        e = rng.normal(size=(n_volumes, 2))
        y = rng.normal(size=(n_volumes, n_voxels)) + x[[0, 1, 0, 1, 0]].T
        y[5] = np.nan  # a missing volume
        data.append(y), onoff.append(x), nuisance.append(q), extra.append(e)
    group = np.array([0, 1, 0, 1, 0])
    r2 = crossvalidated_r2_pct(data, onoff, nuisance, group, extra)
    assert r2.shape == (3, n_voxels)
    for k in range(3):
        for v in range(n_voxels):
            residual = total = 0.0
            parts = []
            for r in range(n_runs):
                rows = ~np.isnan(data[r][:, 0])
                confounds = np.column_stack([nuisance[r], extra[r][:, :k]])[rows]
                project = np.eye(rows.sum()) - confounds @ np.linalg.pinv(confounds)
                parts.append((project @ onoff[r][group[v], rows], project @ data[r][rows, v]))
            for r in range(n_runs):
                xs = np.concatenate([p[0] for i, p in enumerate(parts) if i != r])
                ys = np.concatenate([p[1] for i, p in enumerate(parts) if i != r])
                amplitude = xs @ ys / (xs @ xs)
                residual += np.sum((parts[r][1] - amplitude * parts[r][0]) ** 2)
                total += np.sum(parts[r][1] ** 2)
            assert r2[k, v] == pytest.approx(100.0 * (1.0 - residual / total), rel=1e-8, abs=1e-8)


def test_incremental_glm_extra_confounds_are_ols_columns(rng) -> None:
    n_volumes, n_voxels = 80, 6
    trials = [Trial(f"t{i}", 4.0 + 9.0 * i, 3.0) for i in range(7)]
    times_s = frame_times_s(n_volumes, 2.0)
    x = trial_regressors(trials, times_s, canonical_hrf("glover", 2.0))
    confounds = rng.normal(size=(n_volumes, 2))
    drift = polynomial_drift(times_s, 2)
    data = rng.normal(size=(n_volumes, n_voxels)) + confounds @ rng.normal(scale=3.0, size=(2, n_voxels))
    glm = IncrementalGLM(trials, 2.0, n_volumes, method="lsa", motion_confounds=False, n_confounds=2).start(n_voxels)
    for t in range(n_volumes):
        glm.update(t, data[t], None, confounds[t])
    design = np.column_stack([x, confounds, drift])
    expected = np.linalg.lstsq(design, data, rcond=None)[0][: len(trials)]
    np.testing.assert_allclose(glm.get_betas(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(VolumeError, match="expected 2 values because n_confounds is 2"):
        IncrementalGLM(trials, 2.0, n_volumes, n_confounds=2).start(n_voxels).update(0, data[0], np.zeros(6))
    with pytest.raises(VolumeError, match="no extra confound columns"):
        IncrementalGLM(trials, 2.0, n_volumes).start(n_voxels).update(0, data[0], np.zeros(6), confounds[0])
    with pytest.raises(ConfigError, match="n_confounds"):
        IncrementalGLM(trials, 2.0, n_volumes, n_confounds=-1).start(n_voxels)


# --------------------------------------------------------------------------- calibration and live path

N_STIMULI = 30
TOKEN_DIM = 12
TRIALS_PER_RUN = 24
PLANTED_FRACTION = 0.03


def _phantom_config(glmdenoise: bool):
    return config_from_dict({
        "phantom": {"grid_shape": [24, 28, 23], "voxel_size_mm": [6.0, 6.0, 6.0], "n_voxels": 120,
                    "n_stimuli": N_STIMULI, "latent_dim": 6, "seed": 5, "n_subjects": 2, "image_size_px": 64,
                    "motion_drift_mm": 0.0, "motion_jump_per_min": 0.0, "snr": 3.0},
        "experiment": {"trials_per_run": TRIALS_PER_RUN, "runs_per_session": 2, "sessions_per_subject": 1,
                       "n_test_images": 4, "test_repeats": 2, "lead_out_s": 9.6},
        "embedding": {"n_tokens": 1, "token_dim": TOKEN_DIM},
        "preprocess": {"motion_n_samples": 2000},
        "glm": {"hrf": "library", "method": "lss", "glmdenoise": glmdenoise, "glmdenoise_max_components": 4},
        "model": {"hidden_dim": 16, "n_blocks": 1, "n_tokens": 1, "token_dim": TOKEN_DIM, "clip_head_layers": 1,
                  "use_prior": False},
    })


@pytest.fixture(scope="module")
def noisy_session(tmp_path_factory):
    """Two phantom runs of subject 1 with two planted spatial noise components over the whole head."""
    config = _phantom_config(glmdenoise=True)
    rng = np.random.default_rng(2)
    pooled = rng.normal(size=(N_STIMULI, TOKEN_DIM)).astype(np.float32)
    world = PhantomWorld(config, progress=False, embedding=Embedding(tokens=pooled[:, None, :].copy(), pooled=pooled))
    root = tmp_path_factory.mktemp("noisy-session")
    noise_rng = np.random.default_rng(7)
    shape = tuple(config.phantom.grid_shape)
    # Spatially white patterns: a smooth intensity change would look like motion to the motion fit,
    # and the motion confounds (the fit's parameters) would then absorb it before GLMdenoise sees it.
    patterns = noise_rng.normal(size=(*shape, 2))
    simulated_runs = []
    for run in range(2):
        simulated = world.simulate_run(1, 0, run)
        n_volumes = simulated.volumes.shape[3]
        # White time courses, which the drift and motion confounds cannot absorb.
        courses = noise_rng.normal(size=(n_volumes, 2))
        # 3% of each voxel's signal per unit pattern and course, shared by all voxels.
        mean = simulated.volumes.mean(axis=3, keepdims=True)
        volumes = simulated.volumes + PLANTED_FRACTION * mean * (patterns @ courses.T)
        run_dir = root / f"run-{run + 1:02d}"
        write_run(
            volumes_from_array(volumes.astype(np.float32), simulated.affine, simulated.tr_s, simulated.slice_times_s),
            run_dir, format="nifti", speed=1e6, sleep=lambda _s: None, partial_write=False,
        )
        write_events_tsv(simulated.trials, run_dir / "events.tsv")
        simulated_runs.append(simulated)
    return config, world, root, simulated_runs


@pytest.fixture(scope="module")
def denoised_betas(noisy_session):
    config, world, root, _ = noisy_session
    return estimate_session_betas(root, config, world.subject(1).mask, progress=False)


def test_calibration_finds_components_outside_the_mask(noisy_session, denoised_betas) -> None:
    config, world, root, _ = noisy_session
    components = denoised_betas.glmdenoise
    assert components is not None and 1 <= components.n_components <= 4
    curve = denoised_betas.glmdenoise_cv_r2_pct
    assert curve.shape == (5,) and curve[components.n_components] > curve[0]
    mask = denoised_betas.mask
    assert not np.any(mask.grid[tuple(components.pool_ijk.T)]), "the decoding mask stays out of the noise pool"
    # Without the key, the same session gives the plain betas and no components.
    plain = estimate_session_betas(root, _phantom_config(glmdenoise=False), world.subject(1).mask, progress=False)
    assert plain.glmdenoise is None and plain.glmdenoise_cv_r2_pct is None
    assert not np.allclose(plain.betas, denoised_betas.betas)


def test_live_front_end_reproduces_denoised_calibration_betas(noisy_session, denoised_betas) -> None:
    """Run 2 through the live FrontEnd with the calibration's components gives the calibration's betas."""
    config, _, root, simulated_runs = noisy_session
    betas = denoised_betas
    components = betas.glmdenoise
    mask = betas.mask
    motion = MotionCorrector(10, 0.005, 2000).set_reference(betas.reference, mask.affine)
    normaliser = OnlineNormaliser.from_stats(betas.signal_mean, betas.signal_mean / 100.0)
    simulated = simulated_runs[1]
    volumes = read_run_volumes(find_runs(root)[1])
    glm = IncrementalGLM.from_config(
        config.glm, simulated.trials, simulated.tr_s, simulated.volumes.shape[3],
        slice_times_s=volumes[0].slice_times_s, hrf_per_voxel=betas.hrf_index, n_confounds=components.n_components,
    )
    frontend = FrontEnd(mask, glm, normaliser, motion, denoise=components).start()
    processed = [frontend.process(volume) for volume in volumes]
    assert processed[0].confounds.shape == (components.n_components,)
    live = np.stack([b.beta for b in frontend.finish()])
    np.testing.assert_allclose(live, betas.betas[TRIALS_PER_RUN:], rtol=1e-3, atol=1e-3)
    # Replaying the journaled values, motion and noise regressors rebuilds the same GLM.
    glm_again = IncrementalGLM.from_config(
        config.glm, simulated.trials, simulated.tr_s, simulated.volumes.shape[3],
        slice_times_s=volumes[0].slice_times_s, hrf_per_voxel=betas.hrf_index, n_confounds=components.n_components,
    )
    again = FrontEnd(mask, glm_again, normaliser, None, denoise=components).start()
    for p in processed:
        again.replay(p.tr_index, p.values, p.motion.params, p.confounds)
    np.testing.assert_allclose(np.stack([b.beta for b in again.finish()]), live, rtol=1e-6, atol=1e-6)


def test_front_end_needs_matching_confound_columns(denoised_betas) -> None:
    betas = denoised_betas
    trials = [Trial("a", 4.0, 3.0)]
    normaliser = OnlineNormaliser.from_stats(betas.signal_mean, betas.signal_mean / 100.0)
    with pytest.raises(ConfigError, match="extra confound columns"):
        FrontEnd(betas.mask, IncrementalGLM(trials, 1.6, 20), normaliser, denoise=betas.glmdenoise)
    with pytest.raises(ConfigError, match="extra confound columns"):
        FrontEnd(betas.mask, IncrementalGLM(trials, 1.6, 20, n_confounds=2), normaliser)


# --------------------------------------------------------------------------- bundle


def _bundle(rng: np.random.Generator, glmdenoise: NoiseComponents | None) -> SubjectBundle:
    mask = np.zeros((6, 7, 5), bool)
    mask[2:5, 2:6, 1:4] = True
    n = int(mask.sum())
    config = load_config("phantom", overrides={"glm": {"glmdenoise": glmdenoise is not None}})
    return SubjectBundle(
        subject_id="sub-08", config=config, mask=mask, affine=np.diag([3.0, 3.0, 3.0, 1.0]),
        reference=rng.random(mask.shape).astype(np.float32), signal_mean=(100 + rng.random(n)).astype(np.float32),
        beta_mean=rng.random(n).astype(np.float32), beta_std=(1 + rng.random(n)).astype(np.float32),
        hrf_index=np.zeros(n, np.int32), glmdenoise=glmdenoise,
    )


def _components(rng: np.random.Generator, n_pool: int = 20, n_components: int = 3) -> NoiseComponents:
    ijk = np.argwhere(np.ones((6, 7, 5), bool))[rng.choice(210, n_pool, replace=False)]
    basis, _ = np.linalg.qr(rng.normal(size=(n_pool, n_components)))
    return NoiseComponents(np.sort(ijk, axis=0), (500 + rng.random(n_pool)).astype(np.float32),
                           (1 + rng.random(n_pool)).astype(np.float32), basis.astype(np.float32))


def test_bundle_keeps_the_noise_components(tmp_path, rng) -> None:
    components = _components(rng)
    _bundle(rng, components).save(tmp_path / "b")
    back = SubjectBundle.load(tmp_path / "b")
    assert back.metadata["glmdenoise_n_components"] == 3 and back.config.glm.glmdenoise
    for name in ("pool_ijk", "pool_mean", "pool_std", "components"):
        np.testing.assert_array_equal(getattr(back.glmdenoise, name), getattr(components, name))
    values = rng.normal(500, 5, size=(4, components.n_pool))
    np.testing.assert_allclose(back.glmdenoise.regressors(values), components.regressors(values))
    # Saved again without components into the same folder: the stale file goes.
    _bundle(rng, None).save(tmp_path / "b")
    assert not (tmp_path / "b" / GLMDENOISE_NAME).exists()
    assert SubjectBundle.load(tmp_path / "b").glmdenoise is None


def test_bundle_noise_components_are_checked(tmp_path, rng) -> None:
    components = _components(rng)
    outside = NoiseComponents(components.pool_ijk + np.array([0, 0, 5]), components.pool_mean, components.pool_std,
                              components.components)
    with pytest.raises(BundleError, match=r"pool_ijk: expected voxel indices inside the reference grid"):
        _bundle(rng, outside).save(tmp_path / "a")
    plain_config = _bundle(rng, components)
    plain_config.config = load_config("phantom", overrides={"glm": {"glmdenoise": False}})
    with pytest.raises(BundleError, match="glm.glmdenoise false"):
        plain_config.save(tmp_path / "c")
    _bundle(rng, components).save(tmp_path / "b")
    (tmp_path / "b" / GLMDENOISE_NAME).unlink()
    with pytest.raises(BundleError, match="missing, but metadata.json records glmdenoise_n_components 3"):
        SubjectBundle.load(tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "metadata.json").read_text())
    assert meta["glmdenoise_n_components"] == 3


def test_glmdenoise_max_components_is_calibration_only(rng) -> None:
    bundle = _bundle(rng, _components(rng))
    run = load_config("phantom", overrides={"glm": {"glmdenoise": True, "glmdenoise_max_components": 4}})
    bundle.check_run_config(run)
    with pytest.raises(ConfigError, match=r"glm\.glmdenoise: bundle True, run False"):
        bundle.check_run_config(load_config("phantom", overrides={"glm": {"glmdenoise": False}}))


def test_glmdenoise_config_keys() -> None:
    glm = load_config("phantom").glm
    assert isinstance(glm.glmdenoise, bool) and glm.glmdenoise_max_components == 10
    with pytest.raises(ConfigError):
        load_config("phantom", overrides={"glm": {"glmdenoise_max_components": 0}})
