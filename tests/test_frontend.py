"""End-to-end tests of the per-volume front end on a small phantom run, and a smoke run of its bench."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from rtdecoder.config import load_config
from rtdecoder.errors import ConfigError, OrderError
from rtdecoder.glm.incremental import IncrementalGLM
from rtdecoder.ingest.ordering import MissingVolume, VolumeOrderer
from rtdecoder.ingest.readers import read_volume
from rtdecoder.ingest.watcher import is_volume_file
from rtdecoder.phantom.scanner import FaultPlan, volumes_from_array, write_run
from rtdecoder.phantom.subjects import PhantomSubject
from rtdecoder.preprocess.mask import OnlineNormaliser, VoxelMask
from rtdecoder.preprocess.motion import MotionCorrector
from rtdecoder.session.frontend import FrontEnd

REPO_ROOT = Path(__file__).resolve().parents[1]
DROPPED = 9


@pytest.fixture(scope="module")
def phantom():
    """A 20-trial run of a small subject, its config, and the pieces a front end is built from."""
    config = load_config("phantom", overrides={
        "phantom": {"grid_shape": [24, 28, 23], "voxel_size_mm": [6.0, 6.0, 6.0], "n_voxels": 300,
                    "n_voxels_spread": 0.0, "n_stimuli": 60, "latent_dim": 8, "seed": 5, "n_subjects": 1,
                    "snr": 1.0},
        "experiment": {"trials_per_run": 20, "sessions_per_subject": 1, "runs_per_session": 1,
                       "n_test_images": 2},
        "glm": {"hrf": "canonical"},
    })
    subject = PhantomSubject.build(config, 0)
    pooled = np.random.default_rng(3).normal(size=(60, 16)).astype(np.float32)
    run = subject.simulate_run(0, 0, pooled)
    return config, subject, run


def new_frontend(config, subject, run) -> FrontEnd:
    mask = VoxelMask(subject.mask, subject.affine)
    motion = MotionCorrector(n_samples=2000).set_reference(
        subject.reference_volume, subject.affine, subject.anatomy.brain_mask)
    baseline = subject.reference_volume[subject.mask].astype(np.float64)
    normaliser = OnlineNormaliser.from_stats(baseline, baseline / 100.0)
    glm = IncrementalGLM.from_config(config.glm, run.trials, run.tr_s, run.volumes.shape[3])
    return FrontEnd(mask, glm, normaliser, motion)


@pytest.fixture(scope="module")
def processed_run(phantom, tmp_path_factory):
    """The run exported as NIfTI with one volume dropped, read back, ordered and processed."""
    config, subject, run = phantom
    folder = tmp_path_factory.mktemp("export")
    volumes = volumes_from_array(run.volumes, run.affine, run.tr_s, run.slice_times_s, "run-1")
    write_run(volumes, folder, format="nifti", speed=1000.0, partial_write=False,
              faults=FaultPlan(drop={DROPPED}))
    frontend = new_frontend(config, subject, run).start()
    orderer = VolumeOrderer()
    released = []
    for path in sorted(p for p in folder.iterdir() if is_volume_file(p)):
        released += orderer.push(read_volume(path))
    released += orderer.flush()
    outputs, volumes_read = [], {}
    for item in released:
        if isinstance(item, MissingVolume):
            outputs.append(frontend.missing(item.index))
        else:
            volumes_read[item.index] = item
            outputs.append(frontend.process(item))
    return frontend, outputs, volumes_read, frontend.finish()


def test_every_volume_is_processed_or_marked_missing(phantom, processed_run) -> None:
    _, _, run = phantom
    _, outputs, volumes_read, _ = processed_run
    assert [o.tr_index for o in outputs] == list(range(run.volumes.shape[3]))
    assert [o.tr_index for o in outputs if o.missing] == [DROPPED]
    assert all(v.times.processed_s is not None for v in volumes_read.values())
    assert sum(len(o.betas) for o in outputs) >= len(run.trials)  # every trial released at least once


def test_final_betas_equal_a_glm_fed_the_same_corrected_values(phantom, processed_run) -> None:
    config, subject, run = phantom
    _, outputs, volumes_read, final = processed_run
    # The same values computed here without FrontEnd: motion fit, mask resample, PSC.
    corrector = MotionCorrector(n_samples=2000).set_reference(
        subject.reference_volume, subject.affine, subject.anatomy.brain_mask)
    baseline = subject.reference_volume[subject.mask].astype(np.float64)
    glm = IncrementalGLM.from_config(config.glm, run.trials, run.tr_s, run.volumes.shape[3])
    glm.start(subject.n_voxels)
    ijk = np.argwhere(subject.mask)
    for output in outputs:
        if output.missing:
            glm.mark_missing(output.tr_index)
            continue
        volume = volumes_read[output.tr_index]
        estimate = corrector.estimate(volume.data)
        np.testing.assert_allclose(output.motion.params, estimate.params, atol=1e-9)
        raw = corrector.resample_mask(volume.data, estimate.params, ijk)
        psc = ((raw - baseline) * (100.0 / baseline)).astype(np.float32)
        np.testing.assert_allclose(output.values, psc, rtol=1e-5, atol=1e-4)
        glm.update(output.tr_index, psc, estimate.params)
    expected = np.stack([b.beta for b in glm.finish()])
    got = np.stack([b.beta for b in final])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert {b.n_volumes_used for b in final} == {run.volumes.shape[3] - 1}


def test_missing_volume_leaves_its_row_out(phantom, processed_run) -> None:
    config, subject, run = phantom
    frontend, outputs, _, final = processed_run
    assert frontend.glm.missing_[DROPPED] and not frontend.glm.seen_[DROPPED]
    # Filling the gap with the values of a neighbour changes the betas: the row really is absent.
    glm = IncrementalGLM.from_config(config.glm, run.trials, run.tr_s, run.volumes.shape[3])
    glm.start(subject.n_voxels)
    for output in outputs:
        source = outputs[DROPPED - 1] if output.missing else output
        glm.update(output.tr_index, source.values, source.motion.params)
    assert not np.allclose(glm.get_betas(), np.stack([b.beta for b in final]), atol=1e-3)


def test_betas_track_the_true_betas_above_chance(phantom, processed_run) -> None:
    _, _, run = phantom
    _, _, _, final = processed_run
    est = np.stack([b.beta for b in final])
    # Remove each voxel's mean over trials so the response shared by all images does not count.
    est = est - est.mean(axis=0)
    true = run.true_betas - run.true_betas.mean(axis=0)
    n = len(est)

    def mean_corr(shift: int) -> float:
        return float(np.mean([np.corrcoef(est[j], true[(j + shift) % n])[0, 1] for j in range(n)]))

    matched = mean_corr(0)
    null = [mean_corr(shift) for shift in range(1, n)]
    assert matched > 0.2
    assert matched > max(null)


def test_process_before_start_is_an_order_error(phantom) -> None:
    config, subject, run = phantom
    frontend = new_frontend(config, subject, run)
    volume = next(volumes_from_array(run.volumes, run.affine, run.tr_s, run.slice_times_s))
    with pytest.raises(OrderError, match=r"FrontEnd.process called before start\(\)"):
        frontend.process(volume)


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_frontend", REPO_ROOT / "bench" / "bench_frontend.py")
    module = importlib.util.module_from_spec(spec)
    # Dataclasses look their module up by name while the class is built.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_quick_runs_end_to_end(tmp_path) -> None:
    bench = load_bench()
    out = tmp_path / "frontend.json"
    payload = bench.main(["--quick", "--speed", "100", "--n-refits", "2",
                          "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(payload))
    assert saved["n_processed"] + saved["n_missing"] == saved["n_volumes"]
    assert saved["n_processed"] >= saved["n_volumes"] - 1
    assert saved["live"]["complete_to_processed"]["n"] == saved["n_processed"]
    assert saved["stages_sequential"]["glm_update"]["n"] == saved["n_processed"]
    assert saved["nilearn_refit"]["n"] == 2
    assert saved["refit_over_per_volume"] > 0
    assert saved["n_betas_released"] >= saved["n_trials"]
    assert np.isfinite(saved["beta_true_correlation"])


def test_bench_rejects_an_unknown_format(tmp_path) -> None:
    bench = load_bench()
    with pytest.raises(ConfigError, match="--format: expected one of"):
        bench.main(["--quick", "--format", "jpeg", "--out", str(tmp_path / "x.json")])
