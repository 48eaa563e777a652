"""The per-voxel HRF choice meets HRFs that are not in its library (issue 13, item 1).

The worlds here draw each voxel's HRF from the inverse-logit family the phantom now uses
(:func:`rtdecoder.phantom.subjects.inverse_logit_hrf`), not from the GLM library's double gammas:
NSD-like runs (62 images of 3 s and 13 blank trials in 75 slots of 4 s, TR 1.6 s), a positive mean
response with trial-to-trial variation, AR(1) noise and a cubic drift (the model's drift is
quadratic), small motion confounds, and single trials about as hard to read as NSD's (true betas'
spread 0.35 times that of the single-trial estimation noise; canonical betas correlate about 0.25
with the truth). Betas come from the calibration's GLM (LSS, quadratic drift, motion confounds) with the
chosen HRFs, and are scored as the median over voxels of their correlation with the true
amplitudes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pytest
from scipy import signal

from rtdecoder.config import GLMConfig, config_from_dict
from rtdecoder.errors import ConfigError
from rtdecoder.glm.design import drift_regressors, frame_times_s, trial_regressors
from rtdecoder.glm.events import Trial
from rtdecoder.glm.hrf import (
    HRF_LIBRARY_SIZE,
    HRFRun,
    choose_library_hrf,
    glover_hrf,
    hrf_candidates,
    hrf_library,
    hrf_time_to_peak_s,
    library_r2,
    library_scores,
)
from rtdecoder.glm.incremental import IncrementalGLM
from rtdecoder.phantom.subjects import (
    HRF_PARAMETERS,
    N_HRF_SHAPES,
    PhantomSubject,
    boxcar_responses,
    inverse_logit_hrf,
    subject_hrf_shapes,
)

TR_S = 1.6
IMAGE_S = 3.0
SLOT_S = 4.0
N_IMAGES, N_BLANKS = 62, 13
LEAD_IN_S, LEAD_OUT_S = 4.8, 12.8
N_RUNS = 4
N_VOXELS = 300
SNR = 0.35
NOISE_AR1 = 0.4
LIBRARY_PEAK_S = hrf_time_to_peak_s(hrf_candidates(TR_S), TR_S)


@dataclass
class World:
    """Runs of one simulated subject and their truth."""

    runs: list[HRFRun]
    true_betas: np.ndarray  # (n_trials, n_voxels), runs in order
    true_peak_s: np.ndarray  # (n_voxels,)
    n_volumes: int


def _simulate(mean_peak_s: float, seed: int) -> World:
    """NSD-like runs of voxels whose inverse-logit HRFs peak ``mean_peak_s`` +- 0.8 s after the impulse."""
    rng = np.random.default_rng(seed)
    n_volumes = int(np.ceil((LEAD_IN_S + SLOT_S * (N_IMAGES + N_BLANKS) + LEAD_OUT_S) / TR_S))
    # Per-voxel shapes drawn as the phantom draws a subject's (subject_hrf_shapes), continuous here.
    peak_s = np.clip(mean_peak_s + 0.8 * rng.normal(size=N_VOXELS), 3.5, 8.0)
    width_s = np.clip(5.0 + 0.4 * (peak_s - 5.5) + 0.5 * rng.normal(size=N_VOXELS), 3.0, np.minimum(6.5, 0.9 * peak_s))
    shapes = np.column_stack([peak_s, width_s, rng.uniform(4.0, 8.0, N_VOXELS), rng.uniform(0.1, 0.5, N_VOXELS)])
    t_s, responses = boxcar_responses(shapes, IMAGE_S)  # (n_voxels, n_t), peak 1
    times_s = frame_times_s(n_volumes, TR_S)
    drift = drift_regressors(times_s, "polynomial", 3)[:, :3]  # linear to cubic, not the constant
    runs, truths, designs = [], [], []
    for number in range(N_RUNS):
        slots = np.sort(rng.choice(N_IMAGES + N_BLANKS, N_IMAGES, replace=False))
        trials = [Trial(f"r{number}t{j}", LEAD_IN_S + SLOT_S * float(k), IMAGE_S) for j, k in enumerate(slots)]
        lag_s = times_s[:, None] - np.array([t.onset_s for t in trials])[None, :]
        amplitudes = 1.5 + rng.normal(size=(N_IMAGES, N_VOXELS))  # a mean response and its variation
        task = np.stack(
            [np.interp(lag_s, t_s, responses[v], left=0.0, right=0.0) @ amplitudes[:, v] for v in range(N_VOXELS)],
            axis=1,
        )
        noise = signal.lfilter([np.sqrt(1.0 - NOISE_AR1**2)], [1.0, -NOISE_AR1], rng.normal(size=task.shape), axis=0)
        motion = np.cumsum(rng.normal(scale=0.02, size=(n_volumes, 6)), axis=0)
        nuisance = drift @ rng.normal(scale=0.5, size=(3, N_VOXELS)) + motion @ rng.normal(size=(6, N_VOXELS))
        runs.append((task, noise + nuisance + 100.0, trials, motion))
        truths.append(amplitudes)
        designs.append(trial_regressors(trials, times_s, glover_hrf(TR_S)))
    # Scale the responses so that the true betas' spread is SNR times the single-trial (LSA)
    # estimation noise of unit noise, as phantom.snr is defined; the regressors' peak is 1.
    x = designs[0] / designs[0].max()
    design = np.hstack([x, drift_regressors(times_s, "polynomial", 2)])
    estimation_std = np.sqrt(np.mean(np.diag(np.linalg.inv(design.T @ design))[:N_IMAGES]))
    scale = SNR * estimation_std
    hrf_runs = [HRFRun(scale * task + rest, trials, motion) for task, rest, trials, motion in runs]
    t_fine_s = np.arange(0.0, 30.0, 0.005)
    true_peak_s = np.array([t_fine_s[np.argmax(inverse_logit_hrf(t_fine_s, *row))] for row in shapes])
    return World(hrf_runs, np.concatenate(truths), true_peak_s, n_volumes)


def _betas(world: World, hrf_index: np.ndarray | None) -> np.ndarray:
    """The calibration's offline GLM (LSS, quadratic drift, motion) with a canonical or per-voxel HRF."""
    glm = GLMConfig(
        method="lss", hrf="canonical" if hrf_index is None else "library", slice_time_ref_s=0.0,
        beta_wait_s=1e9, publish_refinements=False,
    )
    betas = []
    for run in world.runs:
        estimator = IncrementalGLM.from_config(
            glm, run.trials, TR_S, world.n_volumes, slice_time_ref_s=0.0, hrf_per_voxel=hrf_index
        ).start(N_VOXELS)
        for tr_index in range(world.n_volumes):
            estimator.update(tr_index, run.data[tr_index], run.motion_params[tr_index])
        betas += [beta.beta for beta in estimator.finish()]
    return np.stack(betas)


def _median_correlation(betas: np.ndarray, truth: np.ndarray) -> float:
    b, t = betas - betas.mean(axis=0), truth - truth.mean(axis=0)
    return float(np.median((b * t).sum(axis=0) / np.sqrt((b * b).sum(axis=0) * (t * t).sum(axis=0))))


def _figures(world: World) -> dict[str, dict[str, float]]:
    """Betas' median correlation with the truth, median chosen time to peak and share at the latest shape."""
    out = {"canonical": {"r": _median_correlation(_betas(world, None), world.true_betas)}}
    for selection in ("crossval", "onoff", "single_trial"):
        # single_trial as GLMsingle's FITHRF step and this project before issue 13 chose: the best
        # library row, no canonical candidate; the others as calibration chooses now.
        kernels = hrf_library(TR_S) if selection == "single_trial" else None
        chosen = choose_library_hrf(world.runs, TR_S, selection, kernels=kernels)
        out[selection] = {
            "r": _median_correlation(_betas(world, chosen), world.true_betas),
            "peak_s": float(np.median(LIBRARY_PEAK_S[chosen])),
            "at_latest": float(np.mean(chosen == HRF_LIBRARY_SIZE - 1)),
        }
    return out


@pytest.fixture(scope="module")
def late_subject() -> tuple[World, dict]:
    world = _simulate(mean_peak_s=6.3, seed=1)
    return world, _figures(world)


@pytest.fixture(scope="module")
def canonical_subject() -> tuple[World, dict]:
    world = _simulate(mean_peak_s=5.5, seed=2)
    return world, _figures(world)


def test_crossval_choice_beats_canonical_and_single_trial_does_worse(late_subject) -> None:
    # A subject whose responses peak about a second after the canonical's 5 s (within the spread
    # between subjects that Handwerker et al. 2004 report): a per-voxel choice has something to gain.
    # (Over seeds 1-3 crossval beat the canonical by 0.002-0.005, by 0.006-0.013 choosing among the library
    # alone; single_trial lost 0.005-0.018.)
    world, figures = late_subject
    canonical, crossval, single = figures["canonical"], figures["crossval"], figures["single_trial"]
    assert 0.2 < canonical["r"] < 0.45  # single trials about as hard to read as NSD's
    assert crossval["r"] >= canonical["r"]
    assert figures["onoff"]["r"] >= canonical["r"]
    # The old rule overfits: a quarter or more of the voxels at the latest shape, betas worse than
    # with the canonical HRF.
    assert single["r"] < canonical["r"]
    assert crossval["r"] > single["r"] + 0.01
    assert single["at_latest"] > 0.2 > crossval["at_latest"]


def test_single_trial_choice_peaks_late_and_crossval_does_not(canonical_subject) -> None:
    # Responses peaking at 5.5 s, as in the NSD-like simulation of issue 13, where the single-trial
    # rule chose a median 6.9 s, 22% at the latest shape, and betas well below the canonical's.
    world, figures = canonical_subject
    true_peak_s = float(np.median(world.true_peak_s))
    single, crossval, canonical = figures["single_trial"], figures["crossval"], figures["canonical"]
    assert single["peak_s"] > true_peak_s + 0.25 and single["at_latest"] > 0.15
    assert crossval["peak_s"] < true_peak_s + 0.25 and crossval["at_latest"] < 0.05
    assert single["r"] < canonical["r"] - 0.02
    assert crossval["r"] > single["r"] + 0.015
    # Near the canonical shape no library row does better than the canonical itself (the library's
    # undershoot follows its peak by 10 s); the library alone cost 0.006-0.012 here (seeds 1-3).
    # With the canonical shape kept unless a row clearly beats it, within 0.001 of it.
    assert crossval["r"] > canonical["r"] - 0.002


def test_onoff_and_crossval_scores_equal_explicit_fits(rng: np.random.Generator) -> None:
    n_volumes = 60
    times_s = frame_times_s(n_volumes, TR_S)
    kernels = hrf_library(TR_S)[[2, 9, 16]]
    runs = []
    for number in range(3):
        trials = [Trial(f"t{j}", 4.0 + 7.0 * j + rng.uniform(0.0, 2.0), 3.0) for j in range(12)]
        motion = rng.normal(size=(n_volumes, 6))
        runs.append(HRFRun(rng.normal(size=(n_volumes, 4)) + number, trials, motion, slice_time_ref_s=0.8))

    def explicit(run: HRFRun, kernel: np.ndarray, amplitude: np.ndarray | None = None) -> np.ndarray:
        run_times_s = times_s + run.slice_time_ref_s
        onoff = trial_regressors(run.trials, run_times_s, kernel).sum(axis=1, keepdims=True)
        nuisance = np.hstack([run.motion_params, drift_regressors(run_times_s, "polynomial", 2)])
        tss = ((run.data - run.data.mean(axis=0)) ** 2).sum(axis=0)
        if amplitude is None:  # in-sample fit of the whole model
            design = np.hstack([onoff, nuisance])
            fitted = design @ np.linalg.lstsq(design, run.data, rcond=None)[0]
        else:  # the amplitude given, the confounds fitted to what it leaves
            rest = run.data - onoff * amplitude
            fitted = onoff * amplitude + nuisance @ np.linalg.lstsq(nuisance, rest, rcond=None)[0]
        return 1.0 - ((run.data - fitted) ** 2).sum(axis=0) / tss

    def residual(run: HRFRun, columns: np.ndarray) -> np.ndarray:
        run_times_s = times_s + run.slice_time_ref_s
        nuisance = np.hstack([run.motion_params, drift_regressors(run_times_s, "polynomial", 2)])
        return columns - nuisance @ np.linalg.lstsq(nuisance, columns, rcond=None)[0]

    onoff = library_scores(runs, TR_S, "onoff", kernels=kernels)
    crossval = library_scores(runs, TR_S, "crossval", kernels=kernels)
    for k, kernel in enumerate(kernels):
        np.testing.assert_allclose(onoff[k], np.mean([explicit(run, kernel) for run in runs], axis=0), atol=1e-10)
        held_out = []
        for out in range(len(runs)):
            # The held-out run's amplitude: least squares on the other runs, confounds projected out.
            x = [residual(r, trial_regressors(r.trials, times_s + r.slice_time_ref_s, kernel).sum(1, keepdims=True))
                 for i, r in enumerate(runs) if i != out]
            y = [residual(r, r.data) for i, r in enumerate(runs) if i != out]
            amplitude = sum(a.T @ b for a, b in zip(x, y, strict=True)) / sum(float((a * a).sum()) for a in x)
            held_out.append(explicit(runs[out], kernel, amplitude))
        np.testing.assert_allclose(crossval[k], np.mean(held_out, axis=0), atol=1e-10)
    single = library_scores(runs, TR_S, "single_trial", kernels=kernels)
    np.testing.assert_allclose(
        single, np.mean([library_r2(r.data, r.trials, TR_S, 0.8, r.motion_params, kernels=kernels) for r in runs],
                        axis=0),
    )


def test_all_zero_motion_columns_leave_the_scores_unchanged(rng: np.random.Generator) -> None:
    # A session without motion correction has all-zero motion parameters; QR would give each zero
    # column an arbitrary direction and project it out of the data.
    trials = [Trial(f"t{j}", 4.0 + 6.0 * j, 3.0) for j in range(10)]
    data = rng.normal(size=(50, 5))
    for selection in ("onoff", "single_trial"):
        with_zeros = library_scores([HRFRun(data, trials, np.zeros((50, 6)))], TR_S, selection)
        without = library_scores([HRFRun(data, trials)], TR_S, selection)
        np.testing.assert_allclose(with_zeros, without, atol=1e-12)


def test_selection_names_what_is_wrong(rng: np.random.Generator) -> None:
    run = HRFRun(rng.normal(size=(40, 3)), [Trial("a", 6.0, 3.0)])
    with pytest.raises(ConfigError, match="hrf_selection: expected one of crossval, onoff, single_trial .got 'fir'"):
        library_scores([run], TR_S, "fir")
    with pytest.raises(ConfigError, match="crossval holds out one run at a time and needs two or more runs .got 1"):
        library_scores([run], TR_S, "crossval")
    with pytest.raises(ConfigError, match="expected at least one run"):
        library_scores([], TR_S)


def test_session_choice_follows_the_config_and_falls_back_with_one_run(caplog, late_subject) -> None:
    from rtdecoder.calibration.betas import RunFolder, choose_session_hrf

    world, _ = late_subject
    runs = [HRFRun(run.data[:, :40], run.trials, run.motion_params) for run in world.runs]
    psc_runs = [(RunFolder(f"run-{i}", None, [], run.trials), run.data, run.motion_params)  # type: ignore[arg-type]
                for i, run in enumerate(runs)]
    for selection in ("crossval", "onoff", "single_trial"):
        config = config_from_dict({"glm": {"hrf": "library", "hrf_selection": selection}})
        chosen = choose_session_hrf(psc_runs, config, TR_S)
        assert chosen.dtype == np.int32
        np.testing.assert_array_equal(chosen, choose_library_hrf(runs, TR_S, selection))
    assert config_from_dict({}).glm.hrf_selection == "crossval"
    with caplog.at_level(logging.WARNING, logger="rtdecoder.calibration.betas"):
        one = choose_session_hrf(psc_runs[:1], config_from_dict({"glm": {"hrf": "library"}}), TR_S)
    assert "session has one run; choosing the HRFs by onoff" in caplog.text
    np.testing.assert_array_equal(one, choose_library_hrf(runs[:1], TR_S, "onoff"))
    with pytest.raises(ValueError, match="hrf_selection"):
        config_from_dict({"glm": {"hrf_selection": "fir"}})


def test_phantom_hrfs_come_from_another_family_than_the_library() -> None:
    t_s = np.arange(0.0, 32.0, TR_S / 50)
    library = hrf_library(TR_S)
    box = np.ones(int(round(IMAGE_S / (TR_S / 50))))
    library_responses = np.stack([np.convolve(k, box)[: t_s.size] for k in library])
    library_responses -= library_responses.mean(axis=1, keepdims=True)
    best_match = []
    peaks_s = []
    for subject in range(8):
        shapes = subject_hrf_shapes(0, subject)
        assert shapes.shape == (N_HRF_SHAPES, len(HRF_PARAMETERS)) and np.all(np.diff(shapes[:, 0]) >= 0)
        peaks_s.append(np.median(shapes[:, 0]))
        for row in shapes:
            h = inverse_logit_hrf(t_s, *row)
            assert t_s[np.argmax(h)] == pytest.approx(row[0], abs=TR_S / 50)  # peak_s is the time to peak
            assert abs(h[0]) < 0.01 and h.min() < 0.0  # starts at rest, has an undershoot
            response = np.convolve(h, box)[: t_s.size]
            response -= response.mean()
            r = library_responses @ response / np.linalg.norm(library_responses, axis=1) / np.linalg.norm(response)
            best_match.append(r.max())
    # Subjects differ (their mean latency is drawn), and the shapes are not library shapes.
    assert np.ptp(peaks_s) > 1.0 and 5.0 < np.median(peaks_s) < 6.0
    assert np.median(best_match) < 0.99
    np.testing.assert_array_equal(subject_hrf_shapes(0, 3), subject_hrf_shapes(0, 3))


def test_phantom_subject_uses_its_own_shapes() -> None:
    config = config_from_dict({
        "phantom": {"grid_shape": [24, 28, 23], "voxel_size_mm": [6.0, 6.0, 6.0], "n_voxels": 300, "n_stimuli": 120,
                    "latent_dim": 8, "seed": 11, "n_subjects": 2},
        "experiment": {"trials_per_run": 20, "runs_per_session": 2, "sessions_per_subject": 1, "n_test_images": 10},
    })
    subject = PhantomSubject.build(config, 1)
    np.testing.assert_array_equal(subject.hrf_library, subject_hrf_shapes(11, 1))
    np.testing.assert_array_equal(subject.hrfs, subject.hrf_library[subject.hrf_index])
    assert len(np.unique(subject.hrf_index)) > 5
