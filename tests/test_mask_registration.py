"""Masks drawn on another volume of the subject, masks on another grid, and calibrate's mask options.

A mask drawn on another volume (an earlier run or session, a mean EPI) is registered to the motion
reference with the project's own rigid registration and carried onto its grid; the tests move an
EPI-like volume by a known rigid transform of a few mm and degrees (``scipy.ndimage``) and check
that the registration recovers it within 0.1 mm and 0.1 degree and that the mask lands on the right
voxels. A mask on another grid is resampled only when asked. Real data without a mask is an error
that says how to make one; the reference can be named and written before calibration.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from test_calibrate import small_config, tiny_world, write_two_runs

from rtdecoder.bundle import SubjectBundle
from rtdecoder.calibration.calibrate import calibrate, written_by_phantom
from rtdecoder.cli import main
from rtdecoder.errors import VolumeError
from rtdecoder.glm.events import Trial, write_events_tsv
from rtdecoder.ingest.readers import read_volume
from rtdecoder.phantom.anatomy import template_epi
from rtdecoder.phantom.scanner import volumes_from_array, write_run
from rtdecoder.preprocess.motion import rigid_matrix
from rtdecoder.preprocess.registration import MaskSource, mask_to_reference, register_rigid, resample_mask

# The head moved by 2-3 mm and 2-3 degrees between the two volumes: (tx, ty, tz) mm, (rx, ry, rz) rad.
TRUE_PARAMS = np.r_[2.5, -2.0, 3.0, np.radians([2.5, -2.0, 3.0])]
REFERENCE_GRID = ((48, 56, 46), 3.0)
OTHER_GRID = ((60, 70, 56), 2.5)  # e.g. another session's protocol
NOISE_STD = 0.01


def scanner_affine(shape, voxel_mm, centre_mm=(0.0, -18.0, 10.0)) -> np.ndarray:
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = np.asarray(centre_mm) - voxel_mm * (np.asarray(shape) - 1) / 2
    return affine


def grid_centre(shape, affine) -> np.ndarray:
    return affine[:3, :3] @ ((np.asarray(shape) - 1) / 2) + affine[:3, 3]


def acquire(image, image_affine, world_motion, shape, affine, order=1) -> np.ndarray:
    """``image`` sampled on a scanner grid with the head moved by ``world_motion`` (tissue at x goes to T(x))."""
    grid_to_image = np.linalg.inv(image_affine) @ np.linalg.inv(world_motion) @ affine
    return ndimage.affine_transform(
        image, grid_to_image[:3, :3], grid_to_image[:3, 3], output_shape=shape, order=order
    ).astype(np.float32)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def save(data: np.ndarray, affine: np.ndarray, path) -> None:
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)


@pytest.fixture(scope="module")
def head():
    """An EPI-like head (MNI152 template), an occipital ROI of it, and the reference grid's volume."""
    image, brain, image_affine = template_epi()
    world_y = (image_affine @ np.vstack([np.indices(image.shape).reshape(3, -1), np.ones(image.size)]))[1]
    roi = ((brain > 0.5) & (world_y.reshape(image.shape) < -60.0)).astype(np.float32)  # visual cortex-ish
    shape, voxel_mm = REFERENCE_GRID
    reference_affine = scanner_affine(shape, voxel_mm)
    reference = acquire(image, image_affine, np.eye(4), shape, reference_affine)
    reference += np.random.default_rng(1).normal(0.0, NOISE_STD, shape).astype(np.float32)
    return image, roi, image_affine, reference, reference_affine


def moved_volume_and_mask(head, grid, rng):
    """The head moved by TRUE_PARAMS, seen on ``grid``, and the ROI drawn on that volume."""
    image, roi, image_affine, reference, reference_affine = head
    motion = rigid_matrix(TRUE_PARAMS, grid_centre(reference.shape, reference_affine))
    shape, voxel_mm = grid
    affine = reference_affine if grid == REFERENCE_GRID else scanner_affine(shape, voxel_mm, (3.0, -15.0, 8.0))
    volume = acquire(image, image_affine, motion, shape, affine) + rng.normal(0.0, NOISE_STD, shape).astype(np.float32)
    drawn = acquire(roi, image_affine, motion, shape, affine) > 0.5
    return volume, drawn, affine, motion


def assert_recovered(params: np.ndarray) -> None:
    np.testing.assert_allclose(params[:3], TRUE_PARAMS[:3], atol=0.1)
    np.testing.assert_allclose(np.degrees(params[3:]), np.degrees(TRUE_PARAMS[3:]), atol=0.1)


@pytest.mark.parametrize("grid", [REFERENCE_GRID, OTHER_GRID], ids=["same-grid", "other-grid"])
def test_registration_recovers_a_known_rigid_transform(head, grid, rng) -> None:
    _, _, _, reference, reference_affine = head
    volume, _, affine, motion = moved_volume_and_mask(head, grid, rng)

    registration = register_rigid(volume, affine, reference, reference_affine)

    assert_recovered(registration.params)
    np.testing.assert_allclose(registration.centre_mm, grid_centre(reference.shape, reference_affine))
    # Where the two transforms put the reference's voxels differs by less than 0.1 mm anywhere.
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in reference.shape], indexing="ij")).reshape(3, -1)
    world = reference_affine @ np.vstack([corners, np.ones(corners.shape[1])])
    assert np.abs(registration.matrix() @ world - motion @ world)[:3].max() < 0.1 * np.sqrt(3)
    assert registration.converged and registration.cost < 0.1 * registration.cost_before
    summary = registration.summary()
    assert summary.startswith("shift (+2.") and ") mm" in summary and ") deg" in summary
    assert "cost (1 - correlation)" in summary


def test_real_epi_moved_by_a_known_transform_is_registered_back(real_dicom_dir) -> None:
    files = sorted((real_dicom_dir / "prisma-mosaic-dcmqa" / "ep2d_Asc_2").glob("*.dcm"))
    # One volume moved and registered back to itself: this series' volume 0 is itself turned by about
    # 25 degrees from the later ones, so another volume of the run would not give a known truth.
    epi = read_volume(files[3])
    motion = rigid_matrix(TRUE_PARAMS, grid_centre(epi.shape, epi.affine))
    voxel_map = np.linalg.inv(epi.affine) @ np.linalg.inv(motion) @ epi.affine
    moved = ndimage.affine_transform(epi.data, voxel_map[:3, :3], voxel_map[:3, 3], order=3).astype(np.float32)

    registration = register_rigid(moved, epi.affine, epi.data, epi.affine)

    assert_recovered(registration.params)


def test_mask_drawn_on_a_moved_volume_lands_on_the_right_voxels(head, rng, tmp_path, caplog) -> None:
    image, roi, image_affine, reference, reference_affine = head
    volume, drawn, affine, motion = moved_volume_and_mask(head, OTHER_GRID, rng)
    save(volume, affine, tmp_path / "ses-01_mean_bold.nii.gz")
    save(drawn.astype(np.uint8), affine, tmp_path / "ses-01_visual_mask.nii.gz")
    truth = acquire(roi, image_affine, np.eye(4), reference.shape, reference_affine) > 0.5
    with_true_transform = resample_mask(drawn, affine, reference.shape, reference_affine, motion)

    with caplog.at_level("INFO", logger="rtdecoder.preprocess.registration"):
        mask = mask_to_reference(
            MaskSource(tmp_path / "ses-01_visual_mask.nii.gz", space=tmp_path / "ses-01_mean_bold.nii.gz"),
            reference, reference_affine, "the motion reference",
        )

    assert mask.shape == reference.shape and np.allclose(mask.affine, reference_affine)
    # The registered mask is the one the true transform gives, up to a few voxels on its border.
    assert (mask.grid != with_true_transform).sum() <= 0.01 * with_true_transform.sum()
    assert dice(mask.grid, truth) > 0.9
    ignoring_motion = resample_mask(drawn, affine, reference.shape, reference_affine)
    assert dice(ignoring_motion, truth) < dice(mask.grid, truth) - 0.05
    record = mask.provenance
    assert record["method"] == "registered" and record["space"].endswith("ses-01_mean_bold.nii.gz")
    np.testing.assert_allclose(record["registration"]["shift_mm"], TRUE_PARAMS[:3], atol=0.1)
    np.testing.assert_allclose(record["registration"]["rotation_deg"], np.degrees(TRUE_PARAMS[3:]), atol=0.1)
    assert record["registration"]["cost"] < record["registration"]["cost_before"]
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "(--mask-space) registered to the motion reference: shift (+2." in logged
    assert "cost (1 - correlation)" in logged and "voxels drawn ->" in logged


def test_mask_on_another_grid_is_resampled_only_when_asked(head, tmp_path) -> None:
    image, roi, image_affine, reference, reference_affine = head
    shape, voxel_mm = OTHER_GRID
    affine = scanner_affine(shape, voxel_mm, centre_mm=(3.0, -15.0, 8.0))
    save((acquire(roi, image_affine, np.eye(4), shape, affine) > 0.5).astype(np.uint8), affine, tmp_path / "m.nii")

    with pytest.raises(VolumeError) as caught:
        mask_to_reference(tmp_path / "m.nii", reference, reference_affine, "the motion reference (vol_0005.nii)")
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'm.nii'}: mask: grid (60, 70, 56) voxels of 2.5 x 2.5 x 2.5 mm")
    assert "does not match the motion reference (vol_0005.nii) (48, 56, 46) voxels of 3 x 3 x 3 mm" in message
    assert "--mask-space" in message and "--resample-mask" in message

    mask = mask_to_reference(MaskSource(tmp_path / "m.nii", resample=True), reference, reference_affine)
    truth = acquire(roi, image_affine, np.eye(4), reference.shape, reference_affine) > 0.5
    assert dice(mask.grid, truth) > 0.9 and mask.provenance["method"] == "resampled"

    # With --mask-space, the mask must be on that volume's grid (or --resample-mask given).
    save(reference, reference_affine, tmp_path / "space.nii.gz")
    save(truth[:, :, :-1].astype(np.uint8), reference_affine, tmp_path / "cut_mask.nii.gz")
    with pytest.raises(VolumeError, match=r"cut_mask\.nii\.gz: mask: grid .* does not match the volume it was drawn "
                       r"on \(.*space\.nii\.gz, --mask-space\).*--resample-mask"):
        mask_to_reference(MaskSource(tmp_path / "cut_mask.nii.gz", space=tmp_path / "space.nii.gz"),
                          reference, reference_affine)


def test_mask_drawn_on_a_real_nifti_or_dicom_volume(real_dicom_dir, tmp_path) -> None:
    """``--mask-space`` read from dcm2niix's NIfTI or from the DICOM itself: no motion, same voxels."""
    root = real_dicom_dir / "prisma-mosaic-dcmqa"
    dicom = read_volume(root / "ep2d_Asc_2" / "IM-0001-0004.dcm")
    ref = nib.load(root / "Ref" / "2_ep2d_Asc.nii")
    save(np.asarray(ref.dataobj)[..., 3], ref.affine, tmp_path / "volume3_nifti_order.nii")
    drawn = np.asarray(ref.dataobj)[..., 3] > np.percentile(np.asarray(ref.dataobj)[..., 3], 85)
    save(drawn.astype(np.uint8), ref.affine, tmp_path / "mask_nifti_order.nii.gz")
    expected = dicom.data > np.percentile(dicom.data, 85)
    save(expected.astype(np.uint8), dicom.affine, tmp_path / "mask_dicom_order.nii.gz")

    for mask_name, space in (("mask_nifti_order.nii.gz", tmp_path / "volume3_nifti_order.nii"),
                             ("mask_dicom_order.nii.gz", root / "ep2d_Asc_2" / "IM-0001-0004.dcm")):
        mask = mask_to_reference(MaskSource(tmp_path / mask_name, space=space), dicom.data, dicom.affine)
        registration = mask.provenance["registration"]
        assert np.abs(registration["shift_mm"]).max() < 0.01 and np.abs(registration["rotation_deg"]).max() < 0.01
        np.testing.assert_array_equal(mask.grid, expected)


# ------------------------------------------------------------------ calibrate's options


def write_real_session(real_dicom_dir, root):
    """A one-run session of real Prisma DICOM files (links, not copies) with one trial."""
    run = root / "run-01"
    run.mkdir(parents=True)
    files = sorted((real_dicom_dir / "prisma-mosaic-dcmqa" / "ep2d_Asc_2").glob("*.dcm"))
    for path in files:
        os.symlink(path, run / path.name)
    write_events_tsv([Trial("t1", 3.2, 3.0, stim_id="img1")], run / "events.tsv")
    return files


def test_calibrate_without_mask_on_real_data_says_how_to_make_one(real_dicom_dir, tmp_path, capsys) -> None:
    write_real_session(real_dicom_dir, tmp_path / "session")
    code = main(["calibrate", "--session", str(tmp_path / "session"), "--out", str(tmp_path / "bundle"),
                 "--images", str(tmp_path)])
    assert code == 1
    code = main(["calibrate", "--session", str(tmp_path / "session"), "--out", str(tmp_path / "bundle")])
    assert code == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert "--mask: required" in err and "not written by the rtdecoder phantom" in err
    assert "--write-reference" in err and "--mask-space" in err and "--mask auto" in err
    assert not (tmp_path / "bundle").exists()
    assert not written_by_phantom(tmp_path / "session")


def test_calibrate_mask_options_are_checked_before_any_work(real_dicom_dir, tmp_path, capsys) -> None:
    write_real_session(real_dicom_dir, tmp_path / "session")
    ref = nib.load(real_dicom_dir / "prisma-mosaic-dcmqa" / "Ref" / "2_ep2d_Asc.nii")
    save((np.asarray(ref.dataobj)[:, :, :-2, 0] > 300).astype(np.uint8), ref.affine, tmp_path / "cut_mask.nii.gz")
    (tmp_path / "images").mkdir()  # the images are checked once the mask is: the mask comes first
    base = ["calibrate", "--session", str(tmp_path / "session"), "--out", str(tmp_path / "bundle"), "--no-progress",
            "--images", str(tmp_path / "images")]

    assert main([*base, "--mask-space", str(tmp_path / "mean.nii")]) == 1
    assert "--mask: expected the mask file that --mask-space/--resample-mask apply to" in capsys.readouterr().err
    assert main([*base, "--mask", str(tmp_path / "cut_mask.nii.gz")]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert "cut_mask.nii.gz: mask: grid (64, 64, 34) voxels" in err
    assert "does not match the session's volumes (motion reference" in err and "(64, 64, 36) voxels" in err
    assert "add --mask-space VOLUME" in err and "add --resample-mask" in err
    assert not (tmp_path / "bundle" / "metadata.json").exists()


def test_write_reference_writes_the_volume_calibration_would_use(real_dicom_dir, tmp_path, capsys) -> None:
    files = write_real_session(real_dicom_dir, tmp_path / "session")
    out = tmp_path / "reference.nii.gz"
    assert main(["calibrate", "--session", str(tmp_path / "session"), "--write-reference", str(out)]) == 0
    assert "motion reference:" in capsys.readouterr().out
    middle = read_volume(files[len(files) // 2])
    written = nib.load(out)
    np.testing.assert_array_equal(np.asarray(written.dataobj), middle.data)
    np.testing.assert_allclose(written.affine, middle.affine, atol=1e-4)

    # A named reference in dcm2niix's voxel order is written in the session's (DICOM) order.
    ref = nib.load(real_dicom_dir / "prisma-mosaic-dcmqa" / "Ref" / "2_ep2d_Asc.nii")
    save(np.asarray(ref.dataobj)[..., 1], ref.affine, tmp_path / "volume1_nifti_order.nii")
    assert main(["calibrate", "--session", str(tmp_path / "session"), "--write-reference", str(out),
                 "--reference", str(tmp_path / "volume1_nifti_order.nii")]) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), read_volume(files[1]).data)


def test_phantom_sessions_are_recognised(tmp_path, rng) -> None:
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    data = rng.random((8, 8, 6, 2)).astype(np.float32) + 1.0
    for fmt in ("nifti", "mosaic"):
        run = tmp_path / fmt / "run-01"
        write_run(volumes_from_array(data, affine, 1.5, None), run, format=fmt, speed=1e6,
                  sleep=lambda _s: None, partial_write=False)
        write_events_tsv([Trial("t1", 0.0, 1.0)], run / "events.tsv")
        assert written_by_phantom(tmp_path / fmt), fmt
    # A 'phantom generate' tree: the subject folder holds the ground-truth mask.
    subject = tmp_path / "generated" / "sub-02"
    (subject / "truth").mkdir(parents=True)
    save(np.ones((2, 2, 2), np.uint8), affine, subject / "truth" / "sub-02_mask-visual.nii.gz")
    run = subject / "ses-01" / "run-01"
    run.mkdir(parents=True)
    save(data[..., 0], affine, run / "vol_00000.nii")
    write_events_tsv([Trial("t1", 0.0, 1.0)], run / "events.tsv")
    assert written_by_phantom(subject / "ses-01")


def test_calibrate_registers_a_mask_drawn_on_another_volume(tmp_path) -> None:
    """The phantom session calibrated with its visual mask drawn on a shifted copy of the head."""
    config = small_config()
    world = tiny_world(config)
    write_two_runs(world, tmp_path / "session")
    subject = world.subject(1)
    # Another run's mean, one voxel (6 mm) off along the first axis; the mask drawn on it moves along.
    shifted = ndimage.shift(subject.reference_volume, (1, 0, 0), order=0, mode="nearest")
    save(shifted, subject.affine, tmp_path / "run-00_mean.nii.gz")
    save(ndimage.shift(subject.mask.astype(np.uint8), (1, 0, 0), order=0), subject.affine, tmp_path / "mask.nii.gz")

    report = calibrate(
        config, tmp_path / "session", tmp_path / "bundle", "sub-02",
        MaskSource(tmp_path / "mask.nii.gz", space=tmp_path / "run-00_mean.nii.gz"),
        progress=False, bank_tokens=world.embedding.tokens,
    )

    bundle = SubjectBundle.load(tmp_path / "bundle")
    np.testing.assert_array_equal(bundle.mask, subject.mask)  # back on the voxels the truth is known for
    record = bundle.metadata["calibration_mask"]
    assert record == report.mask and record["method"] == "registered"
    np.testing.assert_allclose(record["registration"]["shift_mm"], subject.affine[:3, 0], atol=0.5)
    assert bundle.metadata["calibration_reference"] == "middle volume of the first run"
