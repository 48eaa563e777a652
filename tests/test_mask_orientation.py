"""Masks, references and live volumes on the same grid stored in another voxel order.

SPM, FSL and dcm2niix write NIfTI with the DICOM's second voxel axis reversed; such a file is the
same voxels as the project's own DICOM reading, so it must be accepted (reoriented by a view, with
one INFO line), never rejected as another grid nor silently misread. A grid that really differs is
still an error naming the file, both grids and the distance in mm.
"""

from __future__ import annotations

import itertools
import json
import logging
import time

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations

from rtdecoder.bundle import SubjectBundle
from rtdecoder.calibration.betas import choose_reference, estimate_session_betas
from rtdecoder.config import load_config
from rtdecoder.errors import BundleError, VolumeError
from rtdecoder.glm.events import Trial
from rtdecoder.glm.incremental import IncrementalGLM
from rtdecoder.ingest.readers import read_volume
from rtdecoder.ingest.volume import Volume
from rtdecoder.phantom.subjects import PhantomSubject
from rtdecoder.preprocess.mask import OnlineNormaliser, VoxelMask
from rtdecoder.preprocess.motion import MotionCorrector
from rtdecoder.preprocess.orientation import VolumeReorienter, find_grid_transform, reorient_to_grid
from rtdecoder.session.frontend import FrontEnd

SHAPE = (10, 12, 9)
PRISMA_SERIES = [("ep2d_Asc_2", "2_ep2d_Asc"), ("ep2d_Int_HF_5", "5_ep2d_Int_HF")]


@pytest.fixture
def oblique_affine() -> np.ndarray:
    """A DICOM-like grid: second axis anterior to posterior, tilted 7 degrees about x."""
    angle = np.radians(7.0)
    rotation = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(angle), -np.sin(angle)], [0.0, np.sin(angle), np.cos(angle)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-3.2, -3.1, 3.6])
    affine[:3, 3] = [15.0, 40.0, -20.0]
    return affine


def stored_otherwise(data: np.ndarray, affine: np.ndarray, ornt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels written in another voxel order, as another tool would: data and affine."""
    return orientations.apply_orientation(data, ornt), affine @ orientations.inv_ornt_aff(ornt, data.shape)


def y_flipped(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Standard NIfTI order of DICOM-ordered data: the second voxel axis reversed."""
    return stored_otherwise(data, affine, np.array([[0, 1], [1, -1], [2, 1]]))


def all_signed_permutations() -> list[np.ndarray]:
    return [
        np.column_stack([axes, signs])
        for axes in itertools.permutations(range(3))
        for signs in itertools.product((1, -1), repeat=3)
    ]


def test_every_flip_and_permutation_is_undone_exactly(oblique_affine, rng) -> None:
    data = rng.normal(size=SHAPE).astype(np.float32)
    for ornt in all_signed_permutations():
        other, other_affine = stored_otherwise(data, oblique_affine, ornt)
        back = reorient_to_grid(other, other_affine, SHAPE, oblique_affine, "other.nii")
        np.testing.assert_array_equal(back, data, err_msg=str(ornt.tolist()))
        assert np.shares_memory(back, other)  # a view, not a resample


def test_another_grid_is_an_error_naming_file_grids_and_distance(oblique_affine, rng) -> None:
    data = rng.normal(size=SHAPE)
    other, other_affine = y_flipped(data, oblique_affine)
    moved = other_affine.copy()
    moved[2, 3] += 1.5
    with pytest.raises(VolumeError) as caught:
        reorient_to_grid(other, moved, SHAPE, oblique_affine, "sub-01_mask.nii.gz", "the motion reference")
    message = str(caught.value)
    assert message.startswith("sub-01_mask.nii.gz: grid (10, 12, 9) voxels of 3.2 x 3.1 x 3.6 mm")
    assert "does not match the motion reference (10, 12, 9) voxels" in message
    assert "largest difference 1.5 mm" in message
    with pytest.raises(VolumeError, match=r"shape \(10, 12, 8\) cannot be reordered into \(10, 12, 9\)"):
        reorient_to_grid(other[:, :, :8], other_affine, SHAPE, oblique_affine, "cut.nii")
    with pytest.raises(VolumeError, match=r"largest difference"):  # same shape, another voxel size
        reorient_to_grid(data, oblique_affine @ np.diag([1.1, 1.0, 1.0, 1.0]), SHAPE, oblique_affine, "big.nii")


def test_y_flipped_mask_file_gives_the_values_of_the_unflipped_mask(oblique_affine, rng, tmp_path, caplog) -> None:
    grid = rng.random(SHAPE) > 0.6
    data = rng.normal(size=SHAPE).astype(np.float32)
    flipped_grid, flipped_affine = y_flipped(grid, oblique_affine)
    path = tmp_path / "mask_spm_order.nii.gz"
    nib.save(nib.Nifti1Image(flipped_grid.astype(np.uint8), flipped_affine), path)

    with caplog.at_level(logging.INFO, logger="rtdecoder.preprocess.mask"):
        mask = VoxelMask.from_nifti(path, SHAPE, oblique_affine, "the motion reference")

    np.testing.assert_array_equal(mask.grid, grid)
    np.testing.assert_array_equal(mask.values(data), VoxelMask(grid, oblique_affine).values(data))
    np.testing.assert_allclose(mask.affine, oblique_affine)
    assert mask.provenance["reoriented"] == "(i, -j, k)"
    notes = [r for r in caplog.records if "another voxel order" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO
    assert "mask_spm_order.nii.gz" in notes[0].getMessage() and "(i, -j, k)" in notes[0].getMessage()


def test_mask_reads_a_flipped_volume_through_its_grid_transform(oblique_affine, rng) -> None:
    grid = rng.random(SHAPE) > 0.6
    data = rng.normal(size=SHAPE).astype(np.float32)
    mask = VoxelMask(grid, oblique_affine, source="mask.nii.gz")
    flipped, flipped_affine = y_flipped(data, oblique_affine)
    volume = Volume(flipped, flipped_affine, 1.5, 3, source="vol_0003.nii")
    assert mask.grid_transform(volume).describe() == "(i, -j, k)"
    np.testing.assert_array_equal(mask.volume_values(volume), mask.values(data))
    # check_volume guards volume.data[mask.grid]: another voxel order is an error saying what to use.
    with pytest.raises(VolumeError, match=r"vol_0003\.nii: data: on the grid of the mask mask\.nii\.gz but in "
                       r"another voxel order .*VoxelMask\.volume_values.*VoxelMask\.on_grid"):
        mask.check_volume(volume)
    mask.check_volume(Volume(data, oblique_affine, 1.5, 3))
    moved = flipped_affine.copy()
    moved[0, 3] += 2.0
    with pytest.raises(VolumeError, match=r"vol_0003\.nii: affine: does not match the mask mask\.nii\.gz .*"
                       r"largest difference 2 mm"):
        mask.grid_transform(Volume(flipped, moved, 1.5, 3, source="vol_0003.nii"))


def test_bundle_accepts_a_flipped_live_volume_but_not_a_moved_one(oblique_affine, rng) -> None:
    mask = np.zeros(SHAPE, bool)
    mask[3:7, 4:9, 2:6] = True
    n = int(mask.sum())
    bundle = SubjectBundle(
        subject_id="sub-01", config=load_config("phantom"), mask=mask, affine=oblique_affine,
        reference=rng.random(SHAPE).astype(np.float32), signal_mean=np.full(n, 100.0, np.float32),
        beta_mean=np.zeros(n, np.float32), beta_std=np.ones(n, np.float32), hrf_index=np.zeros(n, np.int32),
    )
    flipped, flipped_affine = y_flipped(bundle.reference, oblique_affine)
    transform = bundle.check_volume(flipped.shape, flipped_affine, source="spm/vol_0001.nii")
    np.testing.assert_array_equal(transform.apply(flipped), bundle.reference)
    assert bundle.check_volume(SHAPE, oblique_affine).is_identity
    permuted, permuted_affine = stored_otherwise(bundle.reference, oblique_affine, np.array([[2, 1], [0, -1], [1, 1]]))
    assert bundle.check_volume(permuted.shape, permuted_affine).target_shape == SHAPE
    moved = flipped_affine.copy()
    moved[1, 3] += 5.0
    with pytest.raises(BundleError, match=r"spm/vol_0001\.nii: voxel-to-world affine differs from the bundle's by "
                       r"5\.000 mm"):
        bundle.check_volume(flipped.shape, moved, source="spm/vol_0001.nii")


def test_reorienter_decides_once_and_costs_a_view(oblique_affine, rng, caplog) -> None:
    data = rng.normal(size=(64, 64, 36)).astype(np.float32)
    affine = oblique_affine
    flipped, flipped_affine = y_flipped(data, affine)
    reorienter = VolumeReorienter(data.shape, affine, "the bundle's grid")
    volumes = [Volume(flipped, flipped_affine.copy(), 1.5, i, slice_times_s=np.arange(36) * 0.04) for i in range(200)]
    with caplog.at_level(logging.INFO, logger="rtdecoder.preprocess.orientation"):
        reorienter.data(volumes[0])
        started = time.perf_counter()
        views = [reorienter.data(volume) for volume in volumes]
        per_volume_s = (time.perf_counter() - started) / len(volumes)
    assert all(np.shares_memory(view, flipped) for view in views)
    np.testing.assert_array_equal(views[-1], data)
    assert per_volume_s < 200e-6, per_volume_s  # microseconds in practice; generous for a shared CPU
    assert sum("another voxel order" in r.getMessage() for r in caplog.records) == 1
    reoriented = reorienter.volume(volumes[0])
    np.testing.assert_allclose(reoriented.affine, affine)
    assert reoriented.times is volumes[0].times
    np.testing.assert_array_equal(reoriented.slice_times_s, volumes[0].slice_times_s)  # j flips, k does not


@pytest.fixture(scope="module")
def phantom_run():
    """A short run of a small phantom subject and the pieces a front end is built from."""
    config = load_config("phantom", overrides={
        "phantom": {"grid_shape": [24, 28, 23], "voxel_size_mm": [6.0, 6.0, 6.0], "n_voxels": 200,
                    "n_voxels_spread": 0.0, "n_stimuli": 30, "latent_dim": 6, "seed": 7, "n_subjects": 1,
                    "snr": 1.0},
        "experiment": {"trials_per_run": 10, "sessions_per_subject": 1, "runs_per_session": 1,
                       "n_test_images": 2},
        "glm": {"hrf": "canonical"},
    })
    subject = PhantomSubject.build(config, 0)
    pooled = np.random.default_rng(3).normal(size=(30, 16)).astype(np.float32)
    return config, subject, subject.simulate_run(0, 0, pooled)


def run_frontend(config, subject, run, flip: bool, motion: bool) -> tuple[np.ndarray, np.ndarray]:
    """Every volume of the run through a FrontEnd (stored y-flipped when ``flip``): values and betas."""
    mask = VoxelMask(subject.mask, subject.affine)
    corrector = None
    if motion:
        corrector = MotionCorrector(n_samples=2000).set_reference(
            subject.reference_volume, subject.affine, subject.anatomy.brain_mask)
    baseline = subject.reference_volume[subject.mask].astype(np.float64)
    normaliser = OnlineNormaliser.from_stats(baseline, baseline / 100.0)
    glm = IncrementalGLM.from_config(config.glm, run.trials, run.tr_s, run.volumes.shape[3])
    frontend = FrontEnd(mask, glm, normaliser, corrector).start()
    values = []
    for index in range(run.volumes.shape[3]):
        data, affine = run.volumes[..., index], run.affine
        if flip:
            data, affine = y_flipped(data, affine)
        values.append(frontend.process(Volume(data, affine, run.tr_s, index)).values)
    return np.stack(values), np.stack([beta.beta for beta in frontend.finish()])


@pytest.mark.parametrize("motion", [True, False], ids=["motion-corrected", "no-motion-correction"])
def test_y_flipped_live_volumes_give_the_same_values_and_betas(phantom_run, motion, caplog) -> None:
    config, subject, run = phantom_run
    values, betas = run_frontend(config, subject, run, flip=False, motion=motion)
    with caplog.at_level(logging.INFO, logger="rtdecoder.preprocess.orientation"):
        flipped_values, flipped_betas = run_frontend(config, subject, run, flip=True, motion=motion)
    np.testing.assert_allclose(flipped_values, values, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(flipped_betas, betas, rtol=1e-6, atol=1e-6)
    assert sum("another voxel order" in r.getMessage() for r in caplog.records) == 1


def test_frontend_rejects_a_live_volume_on_another_grid(phantom_run) -> None:
    config, subject, run = phantom_run
    mask = VoxelMask(subject.mask, subject.affine, source="visual.nii.gz")
    glm = IncrementalGLM.from_config(config.glm, run.trials, run.tr_s, run.volumes.shape[3])
    baseline = subject.reference_volume[subject.mask].astype(np.float64)
    frontend = FrontEnd(mask, glm, OnlineNormaliser.from_stats(baseline, baseline / 100.0)).start()
    moved = run.affine.copy()
    moved[0, 3] += 3.0
    with pytest.raises(VolumeError, match=r"vol_0000\.nii: grid .* does not match the reference grid \(mask "
                       r"visual\.nii\.gz\) .*largest difference 3 mm"):
        frontend.process(Volume(run.volumes[..., 0], moved, run.tr_s, 0, source="vol_0000.nii"))


def test_calibration_with_a_y_flipped_mask_file_gives_the_same_betas(phantom_run, tmp_path) -> None:
    """``calibrate --mask`` with the mask in standard NIfTI order: accepted, same voxels, same betas."""
    from rtdecoder.glm.events import write_events_tsv
    from rtdecoder.phantom.scanner import volumes_from_array, write_run

    config, subject, run = phantom_run
    session = tmp_path / "session"
    write_run(volumes_from_array(run.volumes, run.affine, run.tr_s, run.slice_times_s), session / "run-01",
              format="nifti", speed=1e6, sleep=lambda _s: None, partial_write=False)
    write_events_tsv(run.trials, session / "run-01" / "events.tsv")
    flipped_mask, flipped_affine = y_flipped(subject.mask, subject.affine)
    path = tmp_path / "mask_nifti_order.nii.gz"
    nib.save(nib.Nifti1Image(flipped_mask.astype(np.uint8), flipped_affine), path)

    given = estimate_session_betas(session, config, subject.mask, progress=False)
    from_file = estimate_session_betas(session, config, path, progress=False)

    np.testing.assert_array_equal(from_file.mask.grid, subject.mask)
    np.testing.assert_array_equal(from_file.betas, given.betas)


def test_reference_file_in_another_voxel_order_is_brought_into_the_session_order(phantom_run, tmp_path) -> None:
    _, _, run = phantom_run
    volumes = [Volume(run.volumes[..., i], run.affine, run.tr_s, i, source=f"vol_{i:04d}.nii") for i in range(5)]
    flipped, flipped_affine = y_flipped(run.volumes[..., 1], run.affine)
    path = tmp_path / "mean_spm_order.nii"
    nib.save(nib.Nifti1Image(flipped, flipped_affine), path)
    reference = choose_reference(volumes, path)
    np.testing.assert_array_equal(reference.data, run.volumes[..., 1])
    np.testing.assert_allclose(reference.affine, run.affine)
    assert reference.source == path
    assert choose_reference(volumes) is volumes[2]  # default: the middle volume of the first run
    nib.save(nib.Nifti1Image(run.volumes[:-1, ..., 1], run.affine), tmp_path / "cropped.nii")
    with pytest.raises(VolumeError, match=r"cropped\.nii: --reference: grid .* does not match the session's volumes"):
        choose_reference(volumes, tmp_path / "cropped.nii")


# ------------------------------------------------------------------ real data


@pytest.mark.parametrize(("folder", "ref_stem"), PRISMA_SERIES)
def test_dcm2niix_conversion_is_the_dicom_grid_in_another_voxel_order(real_dicom_dir, folder, ref_stem) -> None:
    """dcm2niix's NIfTI of a series vs the project's DICOM reader: only the voxel order differs."""
    root = real_dicom_dir / "prisma-mosaic-dcmqa"
    ref = nib.load(root / "Ref" / f"{ref_stem}.nii")
    ref_data = np.asarray(ref.dataobj, dtype=np.float32)
    files = sorted((root / folder).glob("*.dcm"))
    dicom = [read_volume(path) for path in files]
    match = find_grid_transform(ref.shape[:3], ref.affine, dicom[0].shape, dicom[0].affine)
    assert match.matches() and not match.transform.is_identity  # same grid, other order: the case to accept
    assert match.difference_mm < 1e-3

    for t, volume in enumerate(dicom):
        back = reorient_to_grid(ref_data[..., t], ref.affine, volume.shape, volume.affine, f"{ref_stem}.nii")
        np.testing.assert_array_equal(back, volume.data)

    # A mask drawn on the dcm2niix image (standard NIfTI order) lands on the same voxels.
    drawn = ref_data[..., 0] > np.percentile(ref_data[..., 0], 80)
    mask = VoxelMask(drawn, ref.affine, source=f"{ref_stem}_mask.nii").on_grid(dicom[0].shape, dicom[0].affine)
    np.testing.assert_array_equal(mask.grid, dicom[0].data > np.percentile(ref_data[..., 0], 80))
    np.testing.assert_array_equal(np.sort(mask.values(dicom[3].data)), np.sort(ref_data[..., 3][drawn]))


@pytest.mark.parametrize(("folder", "ref_stem"), PRISMA_SERIES)
def test_live_nifti_volumes_of_a_dicom_calibrated_subject(real_dicom_dir, folder, ref_stem, rng) -> None:
    """Bundle and front end on the DICOM grid; live volumes arrive as dcm2niix NIfTI: same values."""
    root = real_dicom_dir / "prisma-mosaic-dcmqa"
    dicom = [read_volume(path) for path in sorted((root / folder).glob("*.dcm"))]
    ref_path = root / "Ref" / f"{ref_stem}.nii"
    assert json.loads((root / "Ref" / f"{ref_stem}.json").read_text())["RepetitionTime"] > 0
    live = [read_volume(ref_path, index_hint=t) for t in range(len(dicom))]
    reference = dicom[len(dicom) // 2]
    brain = reference.data > np.percentile(reference.data, 70)
    n = int(brain.sum())
    bundle = SubjectBundle(
        subject_id="sub-01", config=load_config("phantom"), mask=brain, affine=reference.affine,
        reference=reference.data, signal_mean=np.full(n, 100.0, np.float32), beta_mean=np.zeros(n, np.float32),
        beta_std=np.ones(n, np.float32), hrf_index=np.zeros(n, np.int32),
    )
    assert not bundle.check_volume(live[0].shape, live[0].affine, source=str(live[0].source)).is_identity

    outputs, betas = [], []
    for volumes in (dicom, live):
        mask = VoxelMask(bundle.mask, bundle.affine)
        motion = MotionCorrector(n_samples=3000).set_reference(bundle.reference, bundle.affine)
        glm = IncrementalGLM.from_config(
            load_config("phantom").glm.model_copy(update={"hrf": "canonical"}), [Trial("t1", 3.2, 3.0)], 3.2,
            len(volumes),
        )
        frontend = FrontEnd(mask, glm, OnlineNormaliser.from_stats(bundle.signal_mean, bundle.signal_mean), motion)
        frontend.start()
        outputs.append(np.stack([frontend.process(volume).values for volume in volumes]))
        betas.append(np.stack([beta.beta for beta in frontend.finish()]))
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(betas[1], betas[0], rtol=1e-4, atol=1e-5)
