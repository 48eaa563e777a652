"""Tests of ``phantom generate``: files read back, determinism, and betas a plain GLM recovers."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from rtdecoder.cli import main
from rtdecoder.config import config_from_dict
from rtdecoder.embedding.base import Embedding
from rtdecoder.errors import ConfigError
from rtdecoder.glm.events import read_events_tsv
from rtdecoder.phantom.generate import generate, parse_index_list, run_stem
from rtdecoder.phantom.schedule import slice_times_s
from rtdecoder.phantom.subjects import boxcar_responses
from rtdecoder.phantom.world import PhantomWorld

N_STIMULI = 40


def small_config(**phantom):
    ph = {"grid_shape": [24, 28, 23], "voxel_size_mm": [6.0, 6.0, 6.0], "n_voxels": 250,
          "n_stimuli": N_STIMULI, "latent_dim": 8, "seed": 3, "n_subjects": 2, "image_size_px": 64,
          "motion_drift_mm": 0.0, "motion_jump_per_min": 0.0, "snr": 1.0}
    ph.update(phantom)
    return config_from_dict({
        "phantom": ph,
        "experiment": {"trials_per_run": 24, "runs_per_session": 2, "sessions_per_subject": 1,
                       "n_test_images": 4, "test_repeats": 3},
    })


def world_for(config) -> PhantomWorld:
    rng = np.random.default_rng(1)
    pooled = rng.normal(size=(N_STIMULI, 24)).astype(np.float32)
    return PhantomWorld(config, progress=False,
                        embedding=Embedding(tokens=pooled[:, None, :].copy(), pooled=pooled))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    config = small_config()
    out = tmp_path_factory.mktemp("phantom")
    files = generate(config, out, subjects=[0], sessions=[0], runs=[0, 1], world=world_for(config),
                     progress=False)
    return config, out, files


def test_volumes_read_back_with_geometry_and_timing(written) -> None:
    config, out, files = written
    func = out / "sub-01" / "ses-01" / "func"
    image = nib.load(func / f"{run_stem(0, 0, 1)}_bold.nii.gz")
    n_vol = int(np.ceil((4.8 + 24 * 4.0 + 12.8) / 1.6))
    assert image.shape == (24, 28, 23, n_vol) and image.get_data_dtype() == np.int16
    mask_image = nib.load(out / "sub-01" / "truth" / "sub-01_mask-visual.nii.gz")
    np.testing.assert_allclose(image.affine, mask_image.affine)
    np.testing.assert_allclose(image.header.get_zooms(), (6.0, 6.0, 6.0, 1.6))
    assert image.header.get_xyzt_units() == ("mm", "sec")
    expected_times = slice_times_s(23, 1.6, "interleaved")
    np.testing.assert_allclose(image.header.get_slice_times(), expected_times, atol=1e-6)
    sidecar = json.loads((func / f"{run_stem(0, 0, 1)}_bold.json").read_text())
    assert sidecar["RepetitionTime"] == 1.6
    np.testing.assert_allclose(sidecar["SliceTiming"], expected_times, atol=1e-6)
    events = read_events_tsv(func / f"{run_stem(0, 0, 1)}_events.tsv")
    truth = np.load(out / "sub-01" / "ses-01" / "truth" / f"{run_stem(0, 0, 1)}_truth.npz")
    assert [t.trial_id for t in events] == truth["trial_id"].tolist()
    assert truth["true_betas"].shape == (24, int(mask_image.get_fdata().sum()))
    assert truth["motion"].shape == (n_vol, 6) and np.all(truth["motion"] == 0)
    assert (out / "config.json").is_file() and len(files) == 1 + 3 + 2 * 4


def test_same_seed_writes_identical_files(written, tmp_path) -> None:
    config, out, files = written
    again = generate(config, tmp_path, subjects=[0], sessions=[0], runs=[0, 1],
                     world=world_for(config), progress=False)
    assert [p.relative_to(tmp_path) for p in again] == [p.relative_to(out) for p in files]
    for first, second in zip(files, again, strict=True):
        assert first.read_bytes() == second.read_bytes(), first.name
    other = small_config(seed=4)
    changed = generate(other, tmp_path / "other", subjects=[0], sessions=[0], runs=[0],
                       world=world_for(other), progress=False)
    bold = [p for p in changed if p.name.endswith("_bold.nii.gz")][0]
    assert bold.read_bytes() != (out / bold.relative_to(tmp_path / "other")).read_bytes()


def _lsa_betas(data_psc: np.ndarray, onsets_s: np.ndarray, n_vol: int) -> np.ndarray:
    """Plain least-squares LSA: canonical (Glover) HRF per trial, cubic drift; (n_trials, n_vox)."""
    t_s, response = boxcar_responses(np.array([[5.4, 0.9, 10.8, 0.35]]), 3.0)
    lag = np.arange(n_vol)[:, None] * 1.6 + 0.8 - onsets_s[None, :]
    design = np.interp(lag, t_s, response[0], left=0.0, right=0.0)
    drift = np.polynomial.legendre.legvander(np.linspace(-1, 1, n_vol), 3)
    solution, *_ = np.linalg.lstsq(np.hstack([design, drift]), data_psc.T, rcond=None)
    return solution[: onsets_s.size]


def test_true_betas_are_recoverable_by_a_plain_glm(written) -> None:
    _, out, _ = written
    stem = run_stem(0, 0, 0)
    data = nib.load(out / "sub-01" / "ses-01" / "func" / f"{stem}_bold.nii.gz").get_fdata()
    mask = nib.load(out / "sub-01" / "truth" / "sub-01_mask-visual.nii.gz").get_fdata() > 0
    series = data[mask]                                                # (n_vox, n_vol)
    psc = 100.0 * (series / series.mean(axis=1, keepdims=True) - 1.0)
    events = read_events_tsv(out / "sub-01" / "ses-01" / "func" / f"{stem}_events.tsv")
    true = np.load(out / "sub-01" / "ses-01" / "truth" / f"{stem}_truth.npz")["true_betas"]
    onsets = np.array([t.onset_s for t in events])

    def mean_corr(estimated):
        return np.mean([np.corrcoef(estimated[:, v], true[:, v])[0, 1] for v in range(true.shape[1])])

    assert mean_corr(_lsa_betas(psc, onsets, psc.shape[1])) > 0.3
    scrambled = np.random.default_rng(0).permutation(onsets)
    assert mean_corr(_lsa_betas(psc, scrambled, psc.shape[1])) < 0.1


def test_betas_level_writes_single_trial_betas(tmp_path) -> None:
    config = small_config()
    files = generate(config, tmp_path, subjects=[0, 1], sessions=[0], runs=[1], level="betas",
                     world=world_for(config), progress=False)
    betas_files = sorted(p for p in files if p.name.endswith("_betas.npz"))
    assert [p.name for p in betas_files] == [f"{run_stem(s, 0, 1)}_betas.npz" for s in (0, 1)]
    loaded = np.load(betas_files[1])
    assert loaded["betas"].shape == loaded["true_betas"].shape and loaded["betas"].shape[0] == 24
    assert not np.allclose(loaded["betas"], loaded["true_betas"])
    assert loaded["is_test"].sum() == np.sum(loaded["stim_index"] < 4)


def test_index_lists_and_bad_arguments(tmp_path, capsys) -> None:
    assert parse_index_list("all", 3, "--subjects") == [0, 1, 2]
    assert parse_index_list("2,0-1", 5, "--runs") == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"--runs: expected indices in 0..11 \(got '12'\)"):
        parse_index_list("0,12", 12, "--runs")
    with pytest.raises(ConfigError, match="--sessions: expected indices like 0,2"):
        parse_index_list("first", 4, "--sessions")
    assert main(["phantom", "generate", "--out", str(tmp_path), "--runs", "3-1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--runs: expected indices like" in err


def test_command_line_uses_real_stimuli_and_embeddings(tmp_path, capsys) -> None:
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(
        "preset: phantom\n"
        "phantom: {grid_shape: [24, 28, 23], voxel_size_mm: [6.0, 6.0, 6.0], n_voxels: 150,\n"
        "          n_stimuli: 12, latent_dim: 4, n_subjects: 1, image_size_px: 64}\n"
        "experiment: {trials_per_run: 8, runs_per_session: 1, sessions_per_subject: 1,\n"
        "             n_test_images: 2}\n"
        f"embedding: {{cache_dir: '{tmp_path / 'cache'}'}}\n"
    )
    status = main(["phantom", "generate", "--config", str(config_file), "--out",
                   str(tmp_path / "out"), "--level", "betas"])
    assert status == 0 and "wrote" in capsys.readouterr().out
    loaded = np.load(tmp_path / "out" / "sub-01" / "ses-01" / "betas" / f"{run_stem(0, 0, 0)}_betas.npz")
    assert loaded["betas"].shape[0] == 8 and np.all(np.isfinite(loaded["betas"]))
