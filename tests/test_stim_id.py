"""Trials are identified by stim_id: a lab's session without stim_index calibrates and is evaluated."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from test_calibrate import small_config, tiny_world, write_two_runs
from test_candidates import QuadrantColourEmbedder, write_images

from rtdecoder.bundle import SubjectBundle
from rtdecoder.calibration.betas import estimate_session_betas
from rtdecoder.calibration.calibrate import average_repeats, calibrate
from rtdecoder.cli import main
from rtdecoder.decode.metrics import candidate_ranks, mean_over_repeats
from rtdecoder.embedding.cache import load_image_tokens, write_embeddings_file
from rtdecoder.errors import BundleError
from rtdecoder.preprocess.mask import VoxelMask

LAB_COLUMNS = ("onset", "duration", "trial_type", "stim_id", "trial_id", "is_test")


@pytest.fixture(scope="module")
def lab_session(tmp_path_factory):
    """Two phantom runs whose events.tsv name each trial's image by stim_id only (no stim_index column),
    an images folder of one small PNG per stim_id, and the session's betas."""
    root = tmp_path_factory.mktemp("lab-session")
    config = small_config()
    config = config.model_copy(update={"embedding": config.embedding.model_copy(
        update={"cache_dir": str(root / "cache")})})
    world = tiny_world(config)
    truth = write_two_runs(world, root / "session")
    for run, simulated in enumerate(truth):
        with open(root / "session" / f"run-{run + 1:02d}" / "events.tsv", "w", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            writer.writerow(LAB_COLUMNS)
            for t in simulated.trials:
                writer.writerow([f"{t.onset_s:.3f}", f"{t.duration_s:.3f}", "test" if t.is_test else "train",
                                 t.stim_id, t.trial_id, "true" if t.is_test else "false"])
    stim_ids = sorted({t.stim_id for simulated in truth for t in simulated.trials})
    write_images(root / "images", stim_ids, seed=1)
    betas = estimate_session_betas(root / "session", config, world.subject(1).mask, progress=False)
    return config, world, root, betas


def test_lab_events_carry_stim_id_only(lab_session) -> None:
    _, _, _, betas = lab_session
    assert np.all(betas.stim_index == -1) and all(t.stim_id for t in betas.trials)


def test_stim_id_only_session_is_evaluated(tmp_path, lab_session) -> None:
    config, _, root, betas = lab_session
    config = config.model_copy(update={"embedding": config.embedding.model_copy(
        update={"cache_dir": str(tmp_path / "cache")})})
    embedder = QuadrantColourEmbedder()
    report = calibrate(config, root / "session", tmp_path / "bundle", "sub-02", betas.mask, progress=False,
                       session=betas, images=root / "images", embedder=embedder)
    evaluation = json.loads((tmp_path / "bundle" / "evaluation.json").read_text())
    test_ids = {t.stim_id for t in betas.trials if t.is_test}
    assert {"image_top1", "brain_top1", "pool_size", "chance"} <= set(evaluation) == set(report.evaluation)
    assert evaluation["n_test_images"] == len(test_ids) == 4 and evaluation["pool_size"] == 4
    assert evaluation["n_test_trials"] == sum(t.is_test for t in betas.trials) == 8
    bundle = SubjectBundle.load(tmp_path / "bundle")
    assert bundle.embedding_name == embedder.name
    assert bundle.metadata["calibration_images"] == str(root / "images")
    # only the session's images were embedded, once
    assert sum(embedder.batch_sizes) == len({t.stim_id for t in betas.trials})


def test_held_out_images_are_ranked_among_the_configured_candidates(tmp_path, lab_session) -> None:
    config, _, root, betas = lab_session
    embedder = QuadrantColourEmbedder()
    shown = load_image_tokens(root / "images", embedder, tmp_path / "cache", progress=False)
    distractors = np.random.default_rng(4).normal(0, 60, size=(50, 1, 12)).astype(np.float32)
    path = write_embeddings_file(tmp_path / "candidates.safetensors", shown.ids + [f"d{i}" for i in range(50)],
                                 np.concatenate([shown.take(range(len(shown))), distractors]), embedder.name)
    config = config.model_copy(update={"candidates": config.candidates.model_copy(
        update={"embeddings_file": str(path)})})
    report = calibrate(config, root / "session", tmp_path / "bundle", "sub-02", betas.mask, progress=False,
                       session=betas, images=root / "images", embedder=embedder)
    ranked = report.evaluation["candidates"]
    assert ranked["n_candidates"] == len(shown) + 50 and ranked["n_ranked"] == 4
    assert {"top1", "top5", "median_rank"} <= set(ranked) and ranked["chance_median_rank"] == (len(shown) + 51) / 2
    other = write_embeddings_file(tmp_path / "other.safetensors", ["a"], np.zeros((1, 1, 12), np.float32), "other")
    config = config.model_copy(update={"candidates": config.candidates.model_copy(
        update={"embeddings_file": str(other)})})
    with pytest.raises(BundleError, match=rf"{other}: embedder: expected 'quadrant-colour\[test\]'"):
        calibrate(config, root / "session", tmp_path / "b2", "sub-02", betas.mask, progress=False,
                  session=betas, images=root / "images", embedder=embedder)


def test_calibrate_needs_images_and_every_image(tmp_path, lab_session) -> None:
    config, _, root, betas = lab_session
    with pytest.raises(BundleError, match="images: expected the session's images"):
        calibrate(config, root / "session", tmp_path / "b", "sub-02", betas.mask, progress=False, session=betas)
    partial = tmp_path / "partial"
    partial.mkdir()
    for path in sorted((root / "images").glob("*.png"))[1:]:
        (partial / path.name).write_bytes(path.read_bytes())
    missing = sorted((root / "images").glob("*.png"))[0].stem
    with pytest.raises(BundleError, match=rf"{partial}: no image file for stim_id '{missing}'"):
        calibrate(config, root / "session", tmp_path / "b", "sub-02", betas.mask, progress=False, session=betas,
                  images=partial, embedder=QuadrantColourEmbedder())


def test_calibrate_command_with_an_images_folder(tmp_path, lab_session, capsys) -> None:
    """The lab's path on the command line: --mask and --images, EfficientNet tokens of the folder."""
    _, world, root, betas = lab_session
    mask = tmp_path / "mask.nii.gz"
    VoxelMask(betas.mask.grid, betas.mask.affine).to_nifti(mask)
    config = tmp_path / "lab.yaml"
    config.write_text(
        "preset: phantom\n"
        "phantom: {grid_shape: [24, 28, 23], voxel_size_mm: [6.0, 6.0, 6.0], n_voxels: 120, n_stimuli: 30,\n"
        "          latent_dim: 6, seed: 5, n_subjects: 2, image_size_px: 64}\n"
        f"embedding: {{cache_dir: {tmp_path / 'cache'}}}\n"
        "glm: {hrf: library}\n"
        "preprocess: {motion_n_samples: 2000}\n"
        "model: {hidden_dim: 8, n_blocks: 0, clip_head_layers: 1, use_prior: false}\n"
        "training: {epochs: 1, batch_size: 4}\n"
    )
    out = tmp_path / "bundle"
    code = main(["calibrate", "--config", str(config), "--session", str(root / "session"), "--out", str(out),
                 "--mask", str(mask), "--images", str(root / "images"), "--no-progress"])
    assert code == 0
    assert "held-out retrieval among 4 (4 images)" in capsys.readouterr().out
    assert SubjectBundle.load(out).embedding_name.startswith("efficientnet")


def test_calibrate_command_outside_the_phantom_world_needs_images(tmp_path, lab_session, capsys) -> None:
    _, _, root, betas = lab_session
    session = tmp_path / "scanner"
    for run in ("run-01", "run-02"):
        (session / run).mkdir(parents=True)
        for path in (root / "session" / run).iterdir():
            data = path.read_bytes()
            if path.suffix == ".json":  # as a real scanner's converter writes it
                data = data.replace(b'"rtdecoder phantom"', b'"Siemens"')
            (session / run / path.name).write_bytes(data)
    mask = tmp_path / "mask.nii.gz"
    VoxelMask(betas.mask.grid, betas.mask.affine).to_nifti(mask)
    code = main(["calibrate", "--session", str(session), "--out", str(tmp_path / "b"), "--mask", str(mask),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "--images: required" in err and "not written by the rtdecoder phantom" in err


def test_repeats_are_grouped_by_stim_id() -> None:
    betas = np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [7.0, 6.0]])
    images, mean = average_repeats(betas, ["shared0042", "img-7", "shared0042", "img-7"])
    assert images.tolist() == ["img-7", "shared0042"]
    np.testing.assert_allclose(mean, [[5.0, 4.0], [3.0, 2.0]])
    tokens_images, tokens_mean = mean_over_repeats(np.arange(12.0).reshape(3, 2, 2), ["b", "a", "b"])
    assert tokens_images.tolist() == ["a", "b"] and tokens_mean.shape == (2, 2, 2)


def test_candidate_ranks_in_blocks(rng) -> None:
    candidates = rng.normal(size=(500, 3, 4)).astype(np.float32)
    predicted = candidates[[10, 400]] + 0.01
    ranks = candidate_ranks(predicted, candidates, [10, 400], block_bytes=4 * 12 * 7)  # 7 rows per block
    assert ranks.tolist() == [1, 1]
    flat = candidates.reshape(500, -1)
    cosine = flat @ flat[3] / np.linalg.norm(flat, axis=1) / np.linalg.norm(flat[3])
    expected = 1 + int((cosine > cosine[77]).sum())
    assert candidate_ranks(candidates[[3]], candidates, [77]).tolist() == [expected]
