"""Tests of pretraining on any betas: the on-disk format, its reader's errors, per-session z-scoring,
``rtdecoder pretrain --data`` without the simulator, and the phantom as one producer of the format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest

from rtdecoder.calibration.betas import SessionBetas, save_betas
from rtdecoder.calibration.dataset import (
    BetasDataset,
    BetasFolder,
    SubjectBetas,
    read_betas_dataset,
    stimulus_embeddings,
    training_betas,
    write_dataset_json,
    write_subject_betas,
    zscore_per_session,
)
from rtdecoder.calibration.pretrain import pretrain
from rtdecoder.config import config_from_dict, load_config
from rtdecoder.embedding.base import Embedding
from rtdecoder.embedding.cache import ImageTokens, write_embeddings_file
from rtdecoder.errors import BundleError, ConfigError
from rtdecoder.glm.events import Trial
from rtdecoder.preprocess.mask import VoxelMask

N_IMAGES = 12
TINY_MODEL = "model: {hidden_dim: 8, n_blocks: 0, clip_head_layers: 1, use_prior: false}\n"
TINY_TRAINING = ("training: {epochs: 1, batch_size: 4, pretrain_epochs: 1, pretrain_batch_size: 4, "
                 "mixed_precision: false}\n")


def fake_subject(rng, n_voxels: int, sessions=(1, 2), per_session: int = 10):
    """Betas with a per-session offset and scale (what per-session z-scoring removes)."""
    n = per_session * len(sessions)
    session = np.repeat(sessions, per_session)
    betas = rng.normal(size=(n, n_voxels)) * session[:, None] * 3.0 + 50.0 * session[:, None]
    stim = [f"img{rng.integers(N_IMAGES):02d}" for _ in range(n)]
    is_test = np.tile([False] * (per_session - 2) + [True] * 2, len(sessions))
    run = np.tile(np.repeat(["1", "2"], per_session // 2), len(sessions))
    return betas.astype(np.float32), stim, session, run, is_test


def write_dataset(root, rng, voxels=(9, 7)):
    for k, n_voxels in enumerate(voxels):
        write_subject_betas(root / f"sub-{k + 1:02d}", *fake_subject(rng, n_voxels))
    write_dataset_json(root, producer="test")


def tiny_config_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(f"preset: phantom\nembedding: {{cache_dir: '{tmp_path / 'cache'}'}}\n" + TINY_MODEL + TINY_TRAINING)
    return path


def test_pretrain_command_on_a_betas_folder_never_imports_the_phantom(tmp_path, rng) -> None:
    from rtdecoder.embedding.base import make_embedder

    data = tmp_path / "data"
    write_dataset(data, rng)
    config_file = tiny_config_file(tmp_path)
    config = load_config(config_file)
    tokens = rng.normal(size=(N_IMAGES, 49, 1280)).astype(np.float32)
    ids = [f"img{i:02d}" for i in range(N_IMAGES)]
    write_embeddings_file(data / "embeddings.safetensors", ids, tokens, make_embedder(config.embedding).name)
    script = textwrap.dedent(f"""
        import json, sys
        from rtdecoder.cli import main
        code = main(["pretrain", "--config", {str(config_file)!r}, "--data", {str(data)!r},
                     "--subjects", "sub-01,sub-02", "--out", {str(tmp_path / 'pre')!r}, "--no-progress"])
        print("PHANTOM", json.dumps(sorted(m for m in sys.modules if m.startswith("rtdecoder.phantom"))))
        sys.exit(code)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pretrained model:" in done.stdout
    imported = json.loads(done.stdout.split("PHANTOM", 1)[1])
    assert not imported, imported  # the production path never touches the simulator
    record = json.loads((tmp_path / "pre" / "pretrain.json").read_text())
    assert record["subjects"] == ["sub-01", "sub-02"]
    assert record["n_trials"] == {"sub-01": 16, "sub-02": 16}  # 2 sessions x (10 - 2 test trials)
    assert record["sessions"] == {"sub-01": [1, 2], "sub-02": [1, 2]}
    assert record["embedder"].startswith("efficientnet_lite0")
    from rtdecoder.decode.model import MindEye2

    model = MindEye2.from_pretrained(tmp_path / "pre" / "model")
    assert model.subjects == {"sub-01": 9, "sub-02": 7}
    # the same data again: the cache answers without training
    stamp = (tmp_path / "pre" / "model" / "model.safetensors").stat().st_mtime_ns
    assert pretrain(config, tmp_path / "pre", data=BetasFolder(data, ["sub-01", "sub-02"]), progress=False)
    assert (tmp_path / "pre" / "model" / "model.safetensors").stat().st_mtime_ns == stamp
    # other betas, or another selection, make another key
    before = BetasFolder(data, ["sub-01"]).fingerprint()
    assert BetasFolder(data, ["sub-01"], sessions=[1]).fingerprint() != before
    write_subject_betas(data / "sub-01", *fake_subject(rng, 9))
    assert BetasFolder(data, ["sub-01"]).fingerprint() != before


def test_z_scoring_is_per_session_over_training_trials(rng) -> None:
    betas, stim, session, run, is_test = fake_subject(rng, 5)
    betas[is_test] += 1000.0  # test trials must not move the statistics
    betas[3, 2] = np.nan       # a trial the GLM could not estimate
    subject = SubjectBetas("sub-01", betas, stim, session, run, is_test)
    trials = training_betas(subject)
    assert trials.n_test == 4 and trials.n_nonfinite == 1 and trials.sessions == [1, 2]
    assert trials.betas.shape == (15, 5) and trials.betas.dtype == np.float32
    keep = ~is_test & np.isfinite(betas).all(axis=1)
    for label in (1, 2):
        z = trials.betas[session[keep] == label]
        np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-5)
        np.testing.assert_allclose(z.std(axis=0), 1.0, atol=1e-5)
    assert trials.stim_id.tolist() == np.asarray(stim)[keep].tolist()
    with pytest.raises(BundleError, match="session 2: expected at least 2 training trials"):
        zscore_per_session(betas[:11], session[:11], np.ones(11, bool), "sub-01")


def test_reader_names_file_field_and_expectation(tmp_path, rng) -> None:
    write_dataset(tmp_path, rng)
    trials = tmp_path / "sub-01" / "trials.tsv"
    text = trials.read_text()

    def fails(match, **kwargs):
        with pytest.raises(BundleError, match=match):
            read_betas_dataset(tmp_path, **kwargs)

    with pytest.raises(BundleError, match="expected the stimuli's tokens"):
        read_betas_dataset(tmp_path)
    (tmp_path / "stimuli").mkdir()
    assert list(read_betas_dataset(tmp_path).subjects) == ["sub-01", "sub-02"]
    fails(r"--subjects: no subject folder with betas for sub-09 \(have sub-01, sub-02\)", subjects=["sub-09"])
    fails(r"--sessions: none of \[7\]", sessions=[7])
    trials.write_text(text.replace("session", "block", 1))
    fails(r"trials.tsv: missing column\(s\) session")
    trials.write_text("\n".join(text.splitlines()[:-1]) + "\n")
    fails(r"trials.tsv: 19 rows, but .*betas.safetensors has 20 trials")
    trials.write_text(text.replace("\t1\t", "\tfirst\t", 1))
    fails(r"line 2: session: expected an integer like 3 or ses-03 \(got 'first'\)")
    trials.write_text(text.replace("false", "maybe", 1))
    fails(r"line 2: is_test: expected true or false \(got 'maybe'\)")
    trials.write_text(text)
    from safetensors.numpy import save_file

    save_file({"betas": np.zeros((20, 9), np.int16)}, str(tmp_path / "sub-01" / "betas.safetensors"))
    fails(r"betas.safetensors: betas: expected float32 \(got int16; NSD's int16 betas")
    save_file({"beta": np.zeros((20, 9), np.float32)}, str(tmp_path / "sub-01" / "betas.safetensors"))
    fails(r"betas.safetensors: expected a tensor named 'betas' \(got \['beta'\]\)")
    (tmp_path / "sub-01" / "betas.safetensors").write_bytes(b"not safetensors")
    fails("betas.safetensors: cannot read safetensors file")
    with pytest.raises(BundleError, match="mask has 8 voxels, betas 9 columns"):
        write_subject_betas(tmp_path / "sub-01", *fake_subject(rng, 9),
                            mask=VoxelMask(np.ones((2, 2, 2), bool), np.eye(4)))
    write_subject_betas(tmp_path / "sub-01", *fake_subject(rng, 9))
    mask = np.zeros((3, 3, 3), bool)
    mask.flat[:4] = True
    VoxelMask(mask, np.eye(4)).to_nifti(tmp_path / "sub-01" / "mask.nii.gz")
    fails(r"mask.nii.gz: 4 voxels, but .*betas.safetensors has 9 \(columns of betas\)")
    (tmp_path / "sub-01" / "mask.nii.gz").unlink()
    (tmp_path / "dataset.json").write_text('{"format": "other/2"}')
    fails(r"dataset.json: format: expected 'rtdecoder-betas/1' \(got 'other/2'\)")
    (tmp_path / "dataset.json").unlink()
    (tmp_path / "sub-02" / "betas.safetensors").unlink()
    fails("no subject folder with betas for sub-02", subjects=["sub-01", "sub-02"])
    with pytest.raises(BundleError, match="--data: no such folder"):
        BetasFolder(tmp_path / "nowhere")


def test_embeddings_file_is_checked_against_the_config(tmp_path, rng) -> None:
    ids = [f"img{i:02d}" for i in range(N_IMAGES)]
    write_subject_betas(tmp_path / "sub-01", *fake_subject(rng, 4))
    write_embeddings_file(tmp_path / "embeddings.safetensors", ids, rng.normal(size=(N_IMAGES, 2, 8)),
                          "some-embedder[v1]")
    dataset = read_betas_dataset(tmp_path)
    config = load_config("phantom")  # EfficientNet-Lite0: 49 x 1280 tokens
    with pytest.raises(BundleError, match=r"embeddings.safetensors: embedder: expected 'efficientnet_lite0\[.*"
                                          r"\(got 'some-embedder\[v1\]'\).*or add stimuli/<stim_id>.png images"):
        stimulus_embeddings(dataset, config, ids)
    small = config_from_dict({"embedding": {"n_tokens": 2, "token_dim": 8}, "model": {"n_tokens": 2, "token_dim": 8}})
    memory = BetasDataset(dataset.subjects, ImageTokens(ids, rng.normal(size=(N_IMAGES, 2, 8)), "", "memory"))
    assert stimulus_embeddings(memory, small, ["img03", "img01"]).rows(["img03"]).tolist() == [3]
    with pytest.raises(BundleError, match=r"memory: tokens: expected shape \(n, 49, 1280\)"):
        stimulus_embeddings(memory, config, ids)
    with pytest.raises(BundleError, match="memory: no image with stim_id 'other'"):
        stimulus_embeddings(memory, small, ["img01", "other"])


def test_phantom_betas_level_is_the_dataset_format(tmp_path) -> None:
    """``phantom generate --level betas`` writes what the reader reads, equal to the pretraining source."""
    from rtdecoder.phantom.generate import generate, run_stem
    from rtdecoder.phantom.world import PhantomWorld

    config = config_from_dict({
        "phantom": {"grid_shape": [24, 28, 23], "voxel_size_mm": [6.0, 6.0, 6.0], "n_voxels": 120,
                    "n_stimuli": 16, "latent_dim": 4, "seed": 3, "n_subjects": 2, "image_size_px": 64},
        "experiment": {"trials_per_run": 8, "runs_per_session": 2, "sessions_per_subject": 2,
                       "n_test_images": 2, "test_repeats": 2},
        "embedding": {"cache_dir": str(tmp_path / "cache")},
    })
    pooled = np.random.default_rng(1).normal(size=(16, 1280)).astype(np.float32)
    world = PhantomWorld(config, progress=False, embedding=Embedding(np.repeat(pooled[:, None], 49, axis=1), pooled))
    generate(config, tmp_path / "out", subjects=[0, 1], sessions=[0, 1], runs=[0, 1], level="betas",
             world=world, progress=False)
    dataset = read_betas_dataset(tmp_path / "out")
    source = world.pretraining_source([0, 1]).load(progress=False)
    assert list(dataset.subjects) == list(source.subjects) == ["sub-01", "sub-02"]
    for sid, read in dataset.subjects.items():
        simulated = source.subjects[sid]
        np.testing.assert_array_equal(read.betas, simulated.betas)
        assert read.stim_id.tolist() == simulated.stim_id.tolist()
        assert read.session.tolist() == simulated.session.tolist() == [1] * 16 + [2] * 16
        assert read.is_test.tolist() == simulated.is_test.tolist() and read.is_test.any()
        truth = np.load(tmp_path / "out" / sid / "ses-02" / "betas" / f"{run_stem(int(sid[-1]) - 1, 1, 1)}_betas.npz")
        np.testing.assert_array_equal(read.betas[-8:], truth["betas"])
        mask = nib.load(tmp_path / "out" / sid / "mask.nii.gz").get_fdata()
        assert int(mask.sum()) == read.n_voxels == world.subject(int(sid[-1]) - 1).n_voxels
    # no embedder name for the given embeddings: the images are written, and embedded on use
    assert dataset.embeddings_file is None and not (tmp_path / "out" / "embeddings.safetensors").exists()
    needed = sorted({s for sub in dataset.subjects.values() for s in sub.stim_id.tolist()})
    tokens = stimulus_embeddings(dataset, config, needed, progress=False)
    assert tokens.tokens.shape == (len(needed), 49, 1280) and tokens.embedding_name.startswith("efficientnet_lite0")
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1  # cached for the next pretraining
    again = stimulus_embeddings(dataset, config, needed, progress=False)
    np.testing.assert_array_equal(again.take(again.rows(needed)), tokens.take(tokens.rows(needed)))


def test_calibration_betas_folder_is_a_subject(tmp_path, rng) -> None:
    grid = np.zeros((3, 3, 2), bool)
    grid.flat[:6] = True
    trials = [Trial(f"t{i}", 4.0 * i, 3.0, stim_id=f"img{i % 4:02d}", is_test=i % 4 == 0) for i in range(8)]
    session = SessionBetas(rng.normal(size=(8, 6)).astype(np.float32), trials, ["run-01"] * 4 + ["run-02"] * 4,
                           VoxelMask(grid, np.eye(4)), np.zeros((3, 3, 2), np.float32), np.ones(6, np.float32),
                           np.zeros(6, np.int32), 1.6)
    save_betas(session, tmp_path / "sub-09")
    (tmp_path / "stimuli").mkdir()
    subject = read_betas_dataset(tmp_path).subjects["sub-09"]
    np.testing.assert_array_equal(subject.betas, session.betas)
    assert subject.session.tolist() == [1] * 8 and subject.run.tolist()[-1] == "run-02"
    assert subject.is_test.tolist() == [t.is_test for t in trials]


def test_pretrain_takes_either_data_or_a_world(tmp_path, rng) -> None:
    config = load_config("phantom")
    with pytest.raises(ConfigError, match=r"expected data \(a betas dataset folder: --data DIR\) or a phantom world"):
        pretrain(config, tmp_path)
    with pytest.raises(ConfigError, match="give the subjects and sessions to the data source"):
        pretrain(config, tmp_path, subjects=[0], data=tmp_path)
    subject = SubjectBetas("sub-01", *fake_subject(rng, 4))
    with pytest.raises(BundleError, match=r"expected the stimuli's tokens"):
        BetasDataset({"sub-01": subject})
    dataset = BetasDataset({"sub-01": subject}, ImageTokens(["img00"], np.zeros((1, 2, 3)), "", "memory"))
    assert dataset.fingerprint() == BetasDataset({"sub-01": subject}, dataset.embeddings).fingerprint()


def test_test_trial_betas_are_z_scored_with_their_sessions_training_trials() -> None:
    from rtdecoder.calibration.dataset import SubjectBetas, test_trial_betas

    betas = np.array([[1.0], [3.0], [5.0], [np.nan], [10.0], [30.0], [50.0]])
    subject = SubjectBetas("sub-01", betas, ["a", "b", "t1", "t2", "c", "d", "t1"], [1, 1, 1, 1, 2, 2, 2],
                           ["1"] * 7, [False, False, True, True, False, False, True])
    z, stim_id = test_trial_betas(subject)
    # session 1's training trials have mean 2 and std 1, session 2's mean 20 and std 10; the NaN trial is left out
    assert z.ravel().tolist() == [3.0, 3.0] and stim_id.tolist() == ["t1", "t1"]
