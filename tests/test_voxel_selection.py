"""Automatic voxel selection (``calibrate --mask auto``): the EPI brain mask, then the most reliable voxels."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from test_calibrate import TOKEN_DIM, session, small_config  # noqa: F401

from rtdecoder.bundle import SubjectBundle
from rtdecoder.calibration.calibrate import calibrate
from rtdecoder.calibration.voxel_selection import (
    MIN_REPEATED_IMAGES,
    RELIABILITY_FILE,
    select_reliable_voxels,
    split_half_reliability,
)
from rtdecoder.cli import main
from rtdecoder.config import config_from_dict
from rtdecoder.embedding.base import Embedding
from rtdecoder.errors import BundleError
from rtdecoder.glm.events import Trial
from rtdecoder.phantom.world import PhantomWorld

N_KEEP = 100
N_STIMULI = 80


def _repeating_config():
    """A small phantom whose session shows 40 images twice (the test set), over 4 runs, at a high SNR."""
    base = small_config().model_dump()
    base["phantom"] |= {"n_stimuli": N_STIMULI, "snr": 3.0}
    base["experiment"] |= {"trials_per_run": 25, "runs_per_session": 4, "n_test_images": 40, "test_repeats": 2}
    base["voxel_selection"] = {"n_voxels": N_KEEP}
    return config_from_dict(base)


@pytest.fixture(scope="module")
def repeating_session(tmp_path_factory):
    from rtdecoder.glm.events import write_events_tsv
    from rtdecoder.phantom.scanner import volumes_from_array, write_run

    config = _repeating_config()
    pooled = np.random.default_rng(2).normal(size=(N_STIMULI, TOKEN_DIM)).astype(np.float32)
    world = PhantomWorld(config, progress=False, embedding=Embedding(tokens=pooled[:, None, :].copy(), pooled=pooled))
    root = tmp_path_factory.mktemp("repeating")
    for run in range(4):
        simulated = world.simulate_run(1, 0, run)
        run_dir = root / f"run-{run + 1:02d}"
        write_run(volumes_from_array(simulated.volumes, simulated.affine, simulated.tr_s, simulated.slice_times_s),
                  run_dir, format="nifti", speed=1e6, sleep=lambda _s: None, partial_write=False)
        write_events_tsv(simulated.trials, run_dir / "events.tsv")
    return config, world, root


def test_reliability_is_the_correlation_of_two_showings(rng: np.random.Generator) -> None:
    n_images = 40
    pattern = rng.normal(size=(n_images, 3))
    noise = rng.normal(size=(2 * n_images, 3)) * [0.2, 1.0, 5.0]
    betas = np.tile(pattern, (2, 1)) + noise
    betas[:, 2] = rng.normal(size=2 * n_images)  # a voxel that does not answer the images
    trials = [Trial(f"t{k}", 0.0, 3.0, stim_id=f"img{k % n_images}") for k in range(2 * n_images)]
    runs = ["run-01"] * n_images + ["run-02"] * n_images
    r, n = split_half_reliability(betas, trials, runs)
    assert n == n_images
    expected = [np.corrcoef(betas[:n_images, v], betas[n_images:, v])[0, 1] for v in range(3)]
    np.testing.assert_allclose(r, expected, atol=1e-12)  # each showing in its own run: z-scoring changes nothing
    assert r[0] > 0.9 and r[0] > r[1] > r[2] - 0.3
    # An offset between runs is not agreement between showings: it is z-scored away per run.
    shifted = betas.copy()
    shifted[n_images:] += 100.0
    np.testing.assert_allclose(split_half_reliability(shifted, trials, runs)[0], r, atol=1e-9)
    # Trials not estimable (NaN rows) are left out, with their image's pair.
    betas[0] = np.nan
    assert split_half_reliability(betas, trials, runs)[1] == n_images - 1


def test_calibration_chooses_its_own_voxels_and_the_bundle_records_them(repeating_session, tmp_path) -> None:
    config, world, root = repeating_session
    visual = world.subject(1).mask
    selection = select_reliable_voxels(root, config, progress=False)
    assert selection.mask.n_voxels == N_KEEP
    # No visual mask went in: the reliable voxels are found in the brain, and are mostly the visual
    # ones (73 of 100 here; 2 expected by chance: 146 visual voxels among about 7,000 brain voxels).
    assert (selection.mask.grid & visual).sum() >= 0.6 * N_KEEP
    scores = selection.reliability
    assert np.nanmedian(scores[visual]) > 0.3 > np.nanmedian(scores[~visual & np.isfinite(scores)])
    assert selection.mask.provenance["n_repeated_images"] >= 40  # the test images, and some training ones

    tokens = world.embedding.tokens
    report = calibrate(config, root, tmp_path / "bundle", "sub-02", "auto", progress=False, bank_tokens=tokens,
                       embedding_name="tiny")
    bundle = SubjectBundle.load(tmp_path / "bundle")
    np.testing.assert_array_equal(bundle.mask, selection.mask.grid)  # the same session gives the same voxels
    recorded = bundle.metadata["calibration_mask"]
    assert recorded["method"].startswith("automatic (--mask auto)")
    assert recorded["n_voxels"] == N_KEEP and recorded["scores"] == RELIABILITY_FILE
    assert report.mask == recorded
    saved = nib.load(tmp_path / "bundle" / RELIABILITY_FILE)
    np.testing.assert_allclose(saved.affine, bundle.affine)
    np.testing.assert_array_equal(np.asarray(saved.dataobj), scores)


def test_a_session_without_enough_repeats_is_refused_saying_what_to_do(session) -> None:  # noqa: F811 (the fixture)
    config, _, root, _ = session
    config = config.model_copy(update={"voxel_selection": config.voxel_selection.model_copy(update={"n_voxels": 50})})
    with pytest.raises(BundleError, match=rf"shows \d+ images more than once .*at least {MIN_REPEATED_IMAGES}.*--mask"):
        select_reliable_voxels(root, config, progress=False)


def test_more_voxels_than_the_brain_has_is_refused(session) -> None:  # noqa: F811 (the fixture)
    config, _, root, _ = session
    config = config.model_copy(update={"voxel_selection": config.voxel_selection.model_copy(
        update={"n_voxels": 10**7})})
    with pytest.raises(BundleError, match=r"voxel_selection.n_voxels: expected at most the \d+ voxels of the EPI "
                                          r"brain mask \(got 10000000\)"):
        select_reliable_voxels(root, config, progress=False)


def test_auto_mask_with_mask_space_is_refused_on_the_command_line(session, tmp_path, capsys) -> None:  # noqa: F811 (the fixture)
    _, _, root, _ = session
    code = main(["calibrate", "--session", str(root), "--out", str(tmp_path / "b"), "--mask", "auto",
                 "--mask-space", str(tmp_path / "other.nii.gz")])
    assert code != 0
    assert "--mask auto: chosen on the session's own grid" in capsys.readouterr().err
