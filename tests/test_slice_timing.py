"""Slice timing: ``glm.slice_time_ref_s``, :func:`slice_time_ref_from`, and its use in calibration and the live GLM."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.glm.first_level import FirstLevelModel, make_first_level_design_matrix
from test_calibrate import small_config, tiny_world, write_two_runs

from rtdecoder.calibration.betas import estimate_session_betas, find_runs, read_run_volumes
from rtdecoder.config import GLMConfig, config_from_dict
from rtdecoder.errors import ConfigError
from rtdecoder.glm.design import slice_time_ref_from
from rtdecoder.glm.events import Trial
from rtdecoder.glm.incremental import IncrementalGLM
from rtdecoder.phantom.schedule import slice_times_s
from rtdecoder.preprocess.mask import OnlineNormaliser
from rtdecoder.preprocess.motion import MotionCorrector
from rtdecoder.session.frontend import FrontEnd

pytestmark = pytest.mark.filterwarnings("ignore:.*mask has been requested.*")

TR_S = 2.0
N_VOLUMES = 90
N_SLICES = 16
N_TRIALS = 10


def test_slice_time_ref_from_the_setting_and_the_slice_times() -> None:
    interleaved = slice_times_s(N_SLICES, TR_S)  # Siemens even count: 1, 3, 5, ... then 0, 2, ...
    # the middle of the actual acquisition: (n - 1) / (2 n) * TR, not nilearn's TR / 2
    assert slice_time_ref_from("auto", interleaved, TR_S) == pytest.approx((N_SLICES - 1) / (2 * N_SLICES) * TR_S)
    assert slice_time_ref_from("auto", [0.0, 1.5, 0.5, 2.0, 1.0], 2.5) == pytest.approx(1.0)
    assert slice_time_ref_from("auto", None, TR_S) == 0.0  # no slice times: the volume's start
    assert slice_time_ref_from(0.8, interleaved, TR_S) == 0.8  # a number is taken as given
    assert slice_time_ref_from(0, None, TR_S) == 0.0
    with pytest.raises(ConfigError, match=r"glm\.slice_time_ref_s: expected 'auto' or a time within the TR, 0 to 2\.0"):
        slice_time_ref_from(2.5, interleaved, TR_S)
    with pytest.raises(ConfigError, match=r"glm\.slice_time_ref_s: expected 'auto'.*\(got 'middle'\)"):
        slice_time_ref_from("middle", interleaved, TR_S)
    with pytest.raises(ConfigError, match=r"vol_00000\.nii: slice_times_s: expected acquisition times within the TR"):
        slice_time_ref_from("auto", interleaved * 1000.0, TR_S, source="vol_00000.nii")  # ms, not s
    with pytest.raises(ConfigError, match=r"slice_times_s: expected one finite acquisition time per slice"):
        slice_time_ref_from("auto", [0.0, np.nan], TR_S)


def test_config_key_is_auto_or_seconds() -> None:
    assert GLMConfig().slice_time_ref_s == "auto"
    assert config_from_dict({"glm": {"slice_time_ref_s": 0.8}}).glm.slice_time_ref_s == 0.8
    assert config_from_dict({"glm": {"slice_time_ref_s": 1}}).glm.slice_time_ref_s == 1.0
    for bad in ("middle", -0.1, True, None):
        with pytest.raises(ConfigError, match=r"^my\.yaml: glm\.slice_time_ref_s: expected 'auto' or a time"):
            config_from_dict({"glm": {"slice_time_ref_s": bad}}, origin="my.yaml")


def test_from_config_resolves_the_setting_with_a_volumes_slice_times() -> None:
    trials = [Trial("a", 4.0, 3.0)]
    times = slice_times_s(N_SLICES, TR_S)
    glm = IncrementalGLM.from_config(GLMConfig(), trials, TR_S, 20, slice_times_s=times)
    assert glm.slice_time_ref_s == pytest.approx(np.median(times))
    assert IncrementalGLM.from_config(GLMConfig(), trials, TR_S, 20).slice_time_ref_s == 0.0
    fixed = GLMConfig(slice_time_ref_s=0.5)
    assert IncrementalGLM.from_config(fixed, trials, TR_S, 20, slice_times_s=times).slice_time_ref_s == 0.5
    with pytest.raises(ConfigError, match="slice_time_ref_s and slice_times_s: expected one of them"):
        IncrementalGLM.from_config(GLMConfig(), trials, TR_S, 20, slice_time_ref_s=0.0, slice_times_s=times)


def _interleaved_run(rng: np.random.Generator):
    """One voxel per slice of an interleaved acquisition, each sampled at its own slice's time.

    The data of the voxel in slice ``k`` are nilearn's design at ``slice_time_ref = times[k] / TR``
    times its true betas, plus a baseline (no noise: what is left is the timing error alone).
    """
    times = slice_times_s(N_SLICES, TR_S)
    onsets_s = np.sort(rng.uniform(4.0, N_VOLUMES * TR_S - 30.0, N_TRIALS))
    trials = [Trial(f"t{i:02d}", float(o), 3.0) for i, o in enumerate(onsets_s)]
    events = pd.DataFrame({"onset": onsets_s, "duration": 3.0, "trial_type": [t.trial_id for t in trials]})
    truth = rng.normal(scale=2.0, size=(N_TRIALS, N_SLICES))
    data = np.empty((N_VOLUMES, N_SLICES))
    for k, slice_time_s in enumerate(times):
        frame_times = np.arange(N_VOLUMES) * TR_S + slice_time_s
        design = make_first_level_design_matrix(frame_times, events, hrf_model="glover", drift_model=None)
        data[:, k] = 100.0 + design[[t.trial_id for t in trials]].to_numpy() @ truth[:, k]
    return times, trials, events, truth, data


def _ours(trials, data, slice_time_ref_s: float) -> np.ndarray:
    glm = IncrementalGLM(
        trials, TR_S, N_VOLUMES, slice_time_ref_s=slice_time_ref_s, method="lsa", hrf="glover",
        drift_model="polynomial", drift_order=2, motion_confounds=False,
    ).start(data.shape[1])
    for t in range(N_VOLUMES):
        glm.update(t, data[t])
    return np.stack([b.beta for b in glm.finish()]).astype(np.float64)


def _nilearn(trials, events, data, slice_time_ref_s: float) -> np.ndarray:
    n_voxels = data.shape[1]
    image = nib.Nifti1Image(data.T.reshape(n_voxels, 1, 1, N_VOLUMES), np.eye(4))
    mask = nib.Nifti1Image(np.ones((n_voxels, 1, 1), dtype=np.int8), np.eye(4))
    model = FirstLevelModel(
        t_r=TR_S, slice_time_ref=slice_time_ref_s / TR_S, hrf_model="glover", drift_model="polynomial",
        drift_order=2, noise_model="ols", signal_scaling=False, standardize=False, minimize_memory=False,
        mask_img=mask,
    ).fit(image, events=events)
    labels = model.labels_[0]
    names = list(model.design_matrices_[0].columns)
    theta = np.empty((len(names), n_voxels))
    for label, result in model.results_[0].items():
        theta[:, labels == label] = result.theta
    return theta[[names.index(t.trial_id) for t in trials]]


def test_interleaved_slice_timing_moves_the_betas_as_nilearns_slice_time_ref(rng: np.random.Generator) -> None:
    times, trials, events, truth, data = _interleaved_run(rng)
    auto_s = slice_time_ref_from(GLMConfig().slice_time_ref_s, times, TR_S)
    assert auto_s == pytest.approx(np.median(times))
    fits = {}
    for ref_s in (0.0, auto_s):
        ours = _ours(trials, data, ref_s)
        # the shift changes the betas exactly as nilearn's slice_time_ref does
        expected = _nilearn(trials, events, data, ref_s)
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
        fits[ref_s] = ours
    assert not np.allclose(fits[0.0], fits[auto_s], rtol=1e-2)

    def error(betas: np.ndarray) -> np.ndarray:  # per voxel, relative to the true betas' size
        return np.linalg.norm(betas - truth, axis=0) / np.linalg.norm(truth, axis=0)

    late = int(np.argmax(times))  # the slice acquired last, 1.875 s into the 2 s TR
    assert times[late] == pytest.approx(TR_S * (N_SLICES - 1) / N_SLICES)
    assert error(fits[auto_s])[late] < 0.6 * error(fits[0.0])[late]
    # over the whole volume (one voxel per slice) the median reference leaves the smaller error
    assert error(fits[auto_s]).mean() < error(fits[0.0]).mean()
    # and at a voxel's own slice time the model is the one that made its data
    own = _ours(trials, data, float(times[late]))
    assert error(own)[late] < 1e-4


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """Two phantom runs, one NIfTI per volume; the phantom samples each slice at its own time."""
    config = small_config()
    world = tiny_world(config)
    root = tmp_path_factory.mktemp("session")
    return config, world, root, write_two_runs(world, root)


@pytest.fixture(scope="module")
def auto_betas(session):
    """The session's calibration betas with the default ``glm.slice_time_ref_s: auto``."""
    config, world, root, _ = session
    return estimate_session_betas(root, config, world.subject(1).mask, progress=False)


def _mean_correlation_with_truth(betas: np.ndarray, true: np.ndarray, voxels: np.ndarray) -> float:
    est, true = betas[:, voxels] - betas[:, voxels].mean(0), true[:, voxels] - true[:, voxels].mean(0)
    return float(np.mean((est * true).sum(0) / np.sqrt((est**2).sum(0) * (true**2).sum(0))))


def test_calibration_takes_the_reference_from_the_volumes_slice_times(session) -> None:
    _, world, root, truth = session
    # The canonical HRF for both: a per-voxel HRF choice would absorb part of a slice's delay (a later
    # shape for a later slice), hiding what the reference time alone does.
    auto = estimate_session_betas(root, small_config(glm={"hrf": "canonical"}), world.subject(1).mask, progress=False)
    zero = estimate_session_betas(root, small_config(glm={"hrf": "canonical", "slice_time_ref_s": 0.0}),
                                  world.subject(1).mask, progress=False)
    times = truth[0].slice_times_s
    assert auto.slice_time_ref_s == pytest.approx({"run-01": np.median(times), "run-02": np.median(times)}, abs=1e-5)
    assert zero.slice_time_ref_s == {"run-01": 0.0, "run-02": 0.0}
    # Voxels of slices acquired in the last quarter of the TR track their true betas better when the
    # model samples at the acquisition's middle than at its start.
    true = np.concatenate([s.true_betas for s in truth])
    late = times[auto.mask.ijk[:, 2]] >= 0.75 * truth[0].tr_s
    assert late.sum() >= 10
    # measured 0.442 -> 0.499 on this session; with the reference at 0 nothing changes, so any clear gain shows it
    assert _mean_correlation_with_truth(auto.betas, true, late) > _mean_correlation_with_truth(
        zero.betas, true, late
    ) + 0.03


def test_live_glm_from_the_first_volumes_slice_times_reproduces_calibration(session, auto_betas) -> None:
    """The live path's rule: the GLM built from the first live volume's slice times gives the calibration betas."""
    config, _, root, truth = session
    betas = auto_betas
    mask = betas.mask
    motion = MotionCorrector(10, 0.005, 2000).set_reference(betas.reference, mask.affine)
    normaliser = OnlineNormaliser.from_stats(betas.signal_mean, betas.signal_mean / 100.0)
    volumes = read_run_volumes(find_runs(root)[1])
    simulated = truth[1]
    glm = IncrementalGLM.from_config(
        config.glm, simulated.trials, simulated.tr_s, simulated.volumes.shape[3],
        hrf_per_voxel=betas.hrf_index, slice_times_s=volumes[0].slice_times_s,
    )
    assert glm.slice_time_ref_s == pytest.approx(betas.slice_time_ref_s["run-02"])
    frontend = FrontEnd(mask, glm, normaliser, motion).start()
    for volume in volumes:
        frontend.process(volume)
    live = np.stack([b.beta for b in frontend.finish()])
    np.testing.assert_allclose(live, betas.betas[12:], rtol=1e-3, atol=1e-3)
