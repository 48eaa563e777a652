"""Tests of calibration: offline betas through the front end, bundle writing, pretraining cache, CLI."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from rtdecoder.bundle import SubjectBundle
from rtdecoder.calibration.betas import estimate_session_betas, find_runs, load_betas, save_betas
from rtdecoder.calibration.calibrate import (
    average_repeats,
    calibrate,
    predict_clip_tokens,
    retrieval_evaluation,
    zscore_stats,
)
from rtdecoder.calibration.hubness_reference import bundle_hubness_reference
from rtdecoder.calibration.pretrain import pretrain, subject_index
from rtdecoder.cli import main
from rtdecoder.config import config_from_dict
from rtdecoder.decode.hubness import unit_rows
from rtdecoder.embedding.base import Embedding
from rtdecoder.errors import BundleError, ConfigError, VolumeError
from rtdecoder.glm.events import write_events_tsv
from rtdecoder.glm.hrf import CANONICAL_CANDIDATE
from rtdecoder.glm.incremental import IncrementalGLM
from rtdecoder.phantom.scanner import volumes_from_array, write_run
from rtdecoder.phantom.world import PhantomWorld
from rtdecoder.preprocess.mask import OnlineNormaliser, VoxelMask
from rtdecoder.preprocess.motion import MotionCorrector
from rtdecoder.session.frontend import FrontEnd

N_STIMULI = 30
TOKEN_DIM = 12


def small_config(glm=None, training=None):
    return config_from_dict({
        "phantom": {"grid_shape": [24, 28, 23], "voxel_size_mm": [6.0, 6.0, 6.0], "n_voxels": 120,
                    "n_stimuli": N_STIMULI, "latent_dim": 6, "seed": 5, "n_subjects": 2, "image_size_px": 64,
                    "motion_drift_mm": 0.0, "motion_jump_per_min": 0.0, "snr": 3.0},
        "experiment": {"trials_per_run": 12, "runs_per_session": 2, "sessions_per_subject": 1,
                       "n_test_images": 4, "test_repeats": 2, "lead_out_s": 9.6},
        "embedding": {"n_tokens": 1, "token_dim": TOKEN_DIM},
        "preprocess": {"motion_n_samples": 2000},
        "glm": {"hrf": "library", "method": "lss", **(glm or {})},
        "model": {"hidden_dim": 16, "n_blocks": 1, "n_tokens": 1, "token_dim": TOKEN_DIM, "clip_head_layers": 1,
                  "use_prior": False},
        "training": {"epochs": 2, "batch_size": 4, "pretrain_epochs": 2, "pretrain_batch_size": 4,
                     "mixed_precision": False, **(training or {})},
    })


def tiny_world(config) -> PhantomWorld:
    rng = np.random.default_rng(2)
    pooled = rng.normal(size=(N_STIMULI, TOKEN_DIM)).astype(np.float32)
    return PhantomWorld(config, progress=False, embedding=Embedding(tokens=pooled[:, None, :].copy(), pooled=pooled))


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """Two runs of subject 1 written as one NIfTI per volume, as the phantom scanner exports."""
    config = small_config()
    world = tiny_world(config)
    root = tmp_path_factory.mktemp("session")
    return config, world, root, write_two_runs(world, root)


def write_two_runs(world, root):
    """Runs 1 and 2 of subject 1's session 0 under ``root``; returns the simulated runs."""
    truth = []
    for run in range(2):
        simulated = world.simulate_run(1, 0, run)
        run_dir = root / f"run-{run + 1:02d}"
        write_run(
            volumes_from_array(simulated.volumes, simulated.affine, simulated.tr_s, simulated.slice_times_s),
            run_dir, format="nifti", speed=1e6, sleep=lambda _s: None, partial_write=False,
        )
        write_events_tsv(simulated.trials, run_dir / "events.tsv")
        truth.append(simulated)
    return truth


@pytest.fixture(scope="module")
def betas(session):
    config, world, root, _ = session
    return estimate_session_betas(root, config, world.subject(1).mask, progress=False)


def test_betas_have_one_row_per_trial_and_follow_the_truth(session, betas) -> None:
    config, world, _, truth = session
    n_voxels = world.subject(1).n_voxels
    assert betas.betas.shape == (24, n_voxels) and np.all(np.isfinite(betas.betas))
    assert betas.run_labels == ["run-01"] * 12 + ["run-02"] * 12
    assert [t.trial_id for t in betas.trials] == [t.trial_id for s in truth for t in s.trials]
    assert betas.hrf_index.shape == (n_voxels,)
    assert 0 <= betas.hrf_index.min() <= betas.hrf_index.max() <= CANONICAL_CANDIDATE
    assert np.all(betas.signal_mean > 0) and betas.reference.shape == tuple(config.phantom.grid_shape)
    true = np.concatenate([s.true_betas for s in truth])
    # Across trials, each voxel's estimate tracks its true amplitude (the image-driven part).
    est_c, true_c = betas.betas - betas.betas.mean(0), true - true.mean(0)
    r = (est_c * true_c).sum(0) / np.sqrt((est_c**2).sum(0) * (true_c**2).sum(0))
    assert np.median(r) > 0.4


def test_live_front_end_reproduces_calibration_betas(session, betas) -> None:
    """A run fed through the live FrontEnd with the calibration's statistics gives the same betas."""
    config, _, root, truth = session
    mask = betas.mask
    motion = MotionCorrector(10, 0.005, 2000).set_reference(betas.reference, mask.affine)
    normaliser = OnlineNormaliser.from_stats(betas.signal_mean, betas.signal_mean / 100.0)
    simulated = truth[1]
    runs = find_runs(root)
    from rtdecoder.calibration.betas import read_run_volumes

    volumes = read_run_volumes(runs[1])
    # The slice-time reference as the live session takes it: from the run's first volume.
    glm = IncrementalGLM.from_config(config.glm, simulated.trials, simulated.tr_s, simulated.volumes.shape[3],
                                     slice_times_s=volumes[0].slice_times_s, hrf_per_voxel=betas.hrf_index)
    frontend = FrontEnd(mask, glm, normaliser, motion).start()
    for volume in volumes:
        frontend.process(volume)
    live = np.stack([b.beta for b in frontend.finish()])
    np.testing.assert_allclose(live, betas.betas[12:], rtol=1e-3, atol=1e-3)


def test_betas_save_and_load_round_trip(tmp_path, betas) -> None:
    save_betas(betas, tmp_path)
    loaded, rows, mask = load_betas(tmp_path)
    np.testing.assert_array_equal(loaded, betas.betas)
    assert [r["trial_id"] for r in rows] == [t.trial_id for t in betas.trials]
    assert rows[0]["run"] == "run-01" and mask.n_voxels == betas.mask.n_voxels


def test_find_runs_names_the_problem(tmp_path) -> None:
    with pytest.raises(BundleError, match="no such folder"):
        find_runs(tmp_path / "absent")
    with pytest.raises(BundleError, match="expected run folders"):
        find_runs(tmp_path)
    (tmp_path / "run-01").mkdir()
    (tmp_path / "run-01" / "events.tsv").write_text("onset\n")
    with pytest.raises(BundleError, match="expected volume files"):
        find_runs(tmp_path)


def test_mask_on_another_grid_is_rejected(session) -> None:
    config, _, root, _ = session
    with pytest.raises(VolumeError, match="does not match the session's volumes"):
        estimate_session_betas(root, config, np.ones((4, 4, 4), dtype=bool), progress=False)


def test_zscore_and_repeat_averaging(rng) -> None:
    x = rng.normal(3.0, 2.0, size=(50, 4))
    mean, std = zscore_stats(x)
    z = (x - mean) / std
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-5)
    with pytest.raises(ConfigError, match="n_trials >= 2"):
        zscore_stats(x[:1])
    images, averaged = average_repeats(np.arange(6.0)[:, None], np.array([3, 1, 3, 1, 2, 3]))
    assert images.tolist() == [1, 2, 3] and np.allclose(averaged.ravel(), [2.0, 4.0, 7 / 3])


def test_retrieval_evaluation_is_perfect_for_exact_tokens(rng) -> None:
    tokens = rng.normal(size=(10, 2, 5)).astype(np.float32)
    result = retrieval_evaluation(tokens, tokens)
    assert result["image_top1"] == 1.0 and result["brain_top1"] == 1.0 and result["pool_size"] == 10
    shuffled = retrieval_evaluation(tokens, tokens[::-1].copy())
    assert shuffled["image_top1"] < 0.5


def test_retrieval_evaluation_scores_random_pools_of_the_given_size(rng) -> None:
    tokens = rng.normal(size=(120, 2, 5)).astype(np.float32)
    noisy = tokens + rng.normal(scale=1.5, size=tokens.shape).astype(np.float32)
    among_all = retrieval_evaluation(noisy, tokens)
    among_10 = retrieval_evaluation(noisy, tokens, pool_size=10)
    assert among_all["pool_size"] == 120 and among_all["n_pools"] == 1
    assert among_10["pool_size"] == 10 and among_10["n_pools"] == 30 and among_10["chance"] == 0.1
    # fewer candidates, fewer confusions
    assert among_10["image_top1"] > among_all["image_top1"] and among_10["brain_top1"] > among_all["brain_top1"]


def test_calibrate_writes_a_bundle_the_live_decoder_loads(tmp_path, session, betas) -> None:
    config, world, root, truth = session
    report = calibrate(
        config, root, tmp_path / "bundle", "sub-02", betas.mask, progress=False, session=betas,
        bank_tokens=world.embedding.tokens, embedding_name="test-embedder",
    )
    bundle = SubjectBundle.load(tmp_path / "bundle")
    assert bundle.subject_id == "sub-02" and bundle.n_voxels == betas.mask.n_voxels
    np.testing.assert_allclose(bundle.signal_mean, betas.signal_mean)
    np.testing.assert_array_equal(bundle.hrf_index, betas.hrf_index)
    train_rows = ~betas.is_test
    np.testing.assert_allclose(bundle.beta_mean, betas.betas[train_rows].mean(0), rtol=1e-4, atol=1e-5)
    model = bundle.load_model()
    assert model.subjects == {"sub-02": betas.mask.n_voxels}
    bundle.check_volume(truth[0].volumes.shape[:3], truth[0].affine)
    assert report.n_train_trials == int(train_rows.sum())
    evaluation = json.loads((tmp_path / "bundle" / "evaluation.json").read_text())
    assert {"image_top1", "brain_top1", "pool_size", "n_test_images"} <= set(evaluation)
    assert evaluation["n_test_images"] == len(set(betas.stim_index[betas.is_test].tolist()))
    assert (tmp_path / "bundle" / "betas" / "betas.nii.gz").is_file()
    assert bundle.metadata["calibration_runs"] == ["run-01", "run-02"]
    assert bundle.embedding_name == "test-embedder"
    # retrieval scored as the live decoder ranks (CSLS), the plain-cosine figures beside it
    assert evaluation["scores"] == "csls k=10" and evaluation["cosine"]["scores"] == "cosine"
    # the live decoder rebuilds the hubness reference from the saved betas: the training trials' predictions
    reference = bundle_hubness_reference(bundle, model, 10)
    z = (betas.betas[train_rows] - bundle.beta_mean) / bundle.beta_std
    direct = predict_clip_tokens(model, "sub-02", z)
    np.testing.assert_allclose(reference.predictions.numpy(), unit_rows(direct).numpy(), atol=1e-5)


def test_pretrain_caches_and_calibration_fine_tunes_it(tmp_path, session, betas) -> None:
    config, world, root, _ = session
    config = small_config(training={"epochs": 1, "batch_size": 4, "pretrain_epochs": 1})
    first = pretrain(config, tmp_path / "pre", subjects=[0], world=world, progress=False)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = pretrain(config, tmp_path / "pre", subjects=[0], world=world, progress=False)
    assert again == first and (first / "model.safetensors").stat().st_mtime_ns == stamp
    record = json.loads((tmp_path / "pre" / "pretrain.json").read_text())
    n_train = sum(not t.is_test for run in range(2) for t in world.subject(0).schedule.run(0, run))
    assert record["subjects"] == ["sub-01"] and record["n_trials"]["sub-01"] == n_train
    report = calibrate(
        config, root, tmp_path / "bundle", "sub-02", betas.mask, pretrained_dir=first, progress=False,
        session=betas, bank_tokens=world.embedding.tokens,
    )
    model = SubjectBundle.load(report.bundle_dir).load_model()
    from safetensors.torch import load_file

    shared_before = load_file(str(first / "model.safetensors"))["token_proj.weight"]
    assert not torch.equal(model.token_proj.weight.detach(), shared_before)  # fine-tuned, not frozen
    bigger = small_config(training={"epochs": 1, "batch_size": 4, "pretrain_epochs": 1}).model_copy(
        update={"model": config.model.model_copy(update={"hidden_dim": 32})}
    )
    with pytest.raises(BundleError, match="hidden_dim differ"):
        calibrate(bigger, root, tmp_path / "b2", "sub-02", betas.mask, pretrained_dir=first, progress=False,
                  session=betas, bank_tokens=world.embedding.tokens)


def test_an_ensemble_calibration_trains_one_model_per_seed_and_scores_each(tmp_path, session, betas) -> None:
    from rtdecoder.decode.ensemble import ModelEnsemble

    config, world, root, _ = session
    single = calibrate(config, root, tmp_path / "single", "sub-02", betas.mask, progress=False, session=betas,
                       bank_tokens=world.embedding.tokens, embedding_name="test-embedder")
    ensemble_config = small_config(training={"ensemble_size": 2, "seed": 0})
    report = calibrate(ensemble_config, root, tmp_path / "pair", "sub-02", betas.mask, progress=False,
                       session=betas, bank_tokens=world.embedding.tokens, embedding_name="test-embedder")
    bundle = SubjectBundle.load(report.bundle_dir)
    model = bundle.load_model()
    assert isinstance(model, ModelEnsemble) and bundle.n_models == 2
    first, second = (m.state_dict() for m in model.members)
    # Member 0 is the single calibration of seed 0; member 1 another seed's.
    single_state = SubjectBundle.load(single.bundle_dir).load_model().state_dict()
    assert all(torch.equal(first[k], single_state[k]) for k in first)
    assert not torch.equal(first["adapters.sub-02.weight"], second["adapters.sub-02.weight"])
    assert [m["seed"] for m in report.evaluation["members"]] == [0, 1]
    assert report.evaluation["members"][0]["image_top1"] == single.evaluation["image_top1"]


def test_subject_index_parses_phantom_ids() -> None:
    assert subject_index("sub-08", 8) == 7
    with pytest.raises(ConfigError, match="expected sub-01 .. sub-08"):
        subject_index("sub-09", 8)


def test_cli_errors_are_one_line(tmp_path, capsys) -> None:
    assert main(["calibrate", "--session", str(tmp_path / "nope"), "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such folder" in err
    assert main(["pretrain", "--out", str(tmp_path / "p"), "--subjects", "0-9"]) == 1
    assert "--subjects" in capsys.readouterr().err


def test_voxel_mask_from_given_file(tmp_path, session, betas) -> None:
    config, _, root, _ = session
    path = tmp_path / "mask.nii.gz"
    VoxelMask(betas.mask.grid, betas.mask.affine).to_nifti(path)
    again = estimate_session_betas(root, config.model_copy(update={"glm": config.glm.model_copy(
        update={"hrf": "canonical"})}), path, progress=False)
    assert again.mask.n_voxels == betas.mask.n_voxels and np.all(again.hrf_index == 0)


def test_calibrate_command_end_to_end(tmp_path, session, capsys) -> None:
    """The command on the phantom world: default mask and stimulus bank, EfficientNet tokens."""
    _, _, root, _ = session
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "preset: phantom\n"
        "phantom: {grid_shape: [24, 28, 23], voxel_size_mm: [6.0, 6.0, 6.0], n_voxels: 120, n_stimuli: 30,\n"
        "          latent_dim: 6, seed: 5, n_subjects: 2, image_size_px: 64, motion_drift_mm: 0.0,\n"
        "          motion_jump_per_min: 0.0, snr: 3.0}\n"
        "experiment: {trials_per_run: 12, runs_per_session: 2, sessions_per_subject: 1, n_test_images: 4,\n"
        "             test_repeats: 2, lead_out_s: 9.6}\n"
        f"embedding: {{cache_dir: {tmp_path / 'cache'}}}\n"
        "preprocess: {motion_n_samples: 2000}\n"
        "model: {hidden_dim: 8, n_blocks: 0, clip_head_layers: 1, use_prior: false}\n"
        "training: {epochs: 1, batch_size: 4, pretrain_epochs: 1, pretrain_batch_size: 4}\n"
    )
    out = tmp_path / "bundle"
    code = main(["calibrate", "--config", str(config), "--session", str(root), "--out", str(out),
                 "--subject-id", "sub-02", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "held-out retrieval among" in printed
    bundle = SubjectBundle.load(out)
    assert bundle.embedding_name.startswith("efficientnet") and bundle.load_model().config.n_tokens == 49


def test_live_training_betas_are_each_trials_own_live_releases(tmp_path, session, betas, caplog) -> None:
    from rtdecoder.calibration.calibrate import live_training_betas

    config, world, root, _ = session
    train_rows = np.flatnonzero(~betas.is_test)
    mean, std = zscore_stats(betas.betas[train_rows])
    bundle = SubjectBundle("sub-02", config, betas.mask.grid, betas.mask.affine, betas.reference, betas.signal_mean,
                           mean, std, betas.hrf_index)
    live_z, live_rows = live_training_betas(config, bundle, betas, root, train_rows)
    assert live_z.shape == (live_rows.size, betas.mask.n_voxels) and np.all(np.isfinite(live_z))
    trials_with_live = set(live_rows.tolist())
    assert trials_with_live <= set(range(train_rows.size)) and len(trials_with_live) > train_rows.size // 2
    # a first release or refinement follows its own trial's final beta, not the others'
    final_z = (betas.betas[train_rows] - mean) / std
    corr = np.corrcoef(live_z, final_z)[: live_rows.size, live_rows.size:]
    own = corr[np.arange(live_rows.size), live_rows]
    assert np.median(own) > 0.3 and np.median(own) > np.median(corr) + 0.2
    late = config.model_copy(update={"training": config.training.model_copy(
        update={"live_beta_max_after_onset_s": 1.0})})
    with caplog.at_level(logging.WARNING, logger="rtdecoder.calibration.calibrate"):
        none_z, none_rows = live_training_betas(late, bundle, betas, root, train_rows)
    assert none_z.shape == (0, betas.mask.n_voxels) and none_rows.size == 0
    assert "live_beta_max_after_onset_s = 1.0 s" in caplog.text and "final betas only" in caplog.text


def test_calibrate_trains_on_live_betas_when_asked(tmp_path, session, betas) -> None:
    config, world, root, _ = session
    kwargs = dict(progress=False, session=betas, bank_tokens=world.embedding.tokens, embedding_name="test-embedder")
    plain = calibrate(config, root, tmp_path / "plain", "sub-02", betas.mask, **kwargs)
    live = calibrate(small_config(training={"live_beta_fraction": 1.0}), root, tmp_path / "live", "sub-02",
                     betas.mask, **kwargs)
    assert "n_live_training_betas" not in plain.evaluation and live.evaluation["n_live_training_betas"] > 0
    assert "live_betas" in live.seconds
    a = SubjectBundle.load(plain.bundle_dir).load_model().state_dict()
    b = SubjectBundle.load(live.bundle_dir).load_model().state_dict()
    assert not torch.equal(a["adapters.sub-02.weight"], b["adapters.sub-02.weight"])


def test_the_live_beta_settings_leave_the_pretraining_cache_alone() -> None:
    """Calibration-only: turning live betas on reuses the pretrained model instead of pretraining again."""
    from rtdecoder.calibration.pretrain import pretraining_key

    config = small_config()
    live = small_config(training={"live_beta_fraction": 0.5, "live_beta_max_after_onset_s": 20.0})
    assert pretraining_key(config, "data") == pretraining_key(live, "data")
