"""Readers for Siemens MOSAIC, enhanced multi-frame DICOM and NIfTI, checked on real exports."""

from __future__ import annotations

import json
import warnings
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from rtdecoder.errors import IncompleteVolumeError, VolumeError
from rtdecoder.ingest.mosaic import mosaic_layout, parse_csa_header
from rtdecoder.ingest.readers import read_volume

PRISMA_SERIES = [("ep2d_Asc_2", "2_ep2d_Asc", "FH"), ("ep2d_Int_HF_5", "5_ep2d_Int_HF", "HF")]


def _canonical(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    return nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data, np.float32), affine))


def _slice_axis_flipped(affine: np.ndarray) -> bool:
    """Whether reorienting to RAS+ reverses the third voxel axis."""
    ornt = nib.orientations.io_orientation(affine)
    return bool(ornt[2, 1] < 0)


@pytest.mark.parametrize(("folder", "ref_stem", "tile_order"), PRISMA_SERIES)
def test_prisma_mosaic_matches_dcm2niix_reference(real_dicom_dir, folder, ref_stem, tile_order):
    root = real_dicom_dir / "prisma-mosaic-dcmqa"
    ref = nib.load(root / "Ref" / f"{ref_stem}.nii")
    ref_data = np.asarray(ref.dataobj)
    sidecar = json.loads((root / "Ref" / f"{ref_stem}.json").read_text())
    files = sorted((root / folder).glob("*.dcm"))
    assert len(files) == ref.shape[3]

    for t, path in enumerate(files):
        volume = read_volume(path)
        assert volume.index == t
        assert volume.shape == (64, 64, 36)
        assert volume.data.dtype == np.float32
        assert volume.tr_s == pytest.approx(sidecar["RepetitionTime"])
        mine = _canonical(volume.data, volume.affine)
        theirs = _canonical(ref_data[..., t], ref.affine)
        np.testing.assert_allclose(mine.affine, theirs.affine, atol=1e-3)
        np.testing.assert_array_equal(mine.get_fdata(), theirs.get_fdata())

    # Slice times follow the third axis, so they flip with it between the two orientations.
    mine_times = volume.slice_times_s[::-1] if _slice_axis_flipped(volume.affine) else volume.slice_times_s
    ref_times = np.asarray(sidecar["SliceTiming"])
    ref_times = ref_times[::-1] if _slice_axis_flipped(ref.affine) else ref_times
    np.testing.assert_allclose(mine_times, ref_times, atol=1e-6)

    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert mosaic_layout(ds, files[0]).tile_order == tile_order


def test_prisma_acquisition_times_step_by_tr(real_dicom_dir):
    files = sorted((real_dicom_dir / "prisma-mosaic-dcmqa" / "ep2d_Asc_2").glob("*.dcm"))
    volumes = [read_volume(path) for path in files]
    acquired_s = np.array([v.times.acquired_s for v in volumes])
    np.testing.assert_allclose(np.diff(acquired_s), 3.2, atol=1e-3)
    expected = datetime(2017, 10, 21, 9, 1, 26, 845000).timestamp()  # 20171021 090126.845
    assert acquired_s[0] == pytest.approx(expected, abs=1e-3)
    assert all(v.times.written_s == pytest.approx(p.stat().st_mtime) for v, p in zip(volumes, files, strict=True))
    assert len({v.series for v in volumes}) == 1


def test_skyra_mosaic_drops_empty_tiles_and_agrees_with_nibabel(real_dicom_dir):
    path = real_dicom_dir / "skyra-mosaic-rtcloud" / "001_000013_000003.dcm"
    volume = read_volume(path)
    assert volume.shape == (64, 64, 27)  # 27 slices out of a 6 x 6 grid
    assert volume.index == 2  # AcquisitionNumber 3
    assert volume.tr_s == pytest.approx(1.5)
    np.testing.assert_allclose(volume.voxel_size_mm, [3.0, 3.0, 4.0], atol=1e-4)
    csa = parse_csa_header(pydicom.dcmread(path, stop_before_pixels=True)[0x00291010].value)
    np.testing.assert_allclose(volume.slice_times_s, np.asarray(csa["MosaicRefAcqTimes"], float) / 1000)
    assert volume.slice_times_s.max() < volume.tr_s

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nibabel calls its DICOM reader experimental
        from nibabel.nicom import dicomwrappers

        wrapper = dicomwrappers.wrapper_from_file(str(path))
        nib_data, nib_affine_lps = wrapper.get_data(), wrapper.affine
    theirs = _canonical(nib_data, np.diag([-1.0, -1.0, 1.0, 1.0]) @ nib_affine_lps)
    mine = _canonical(volume.data, volume.affine)
    np.testing.assert_allclose(mine.affine, theirs.affine, atol=1e-3)
    np.testing.assert_array_equal(mine.get_fdata(), theirs.get_fdata())


@pytest.mark.parametrize(("folder", "tile_order"), [("ep2d_Asc_2", "FH"), ("ep2d_Int_HF_5", "HF")])
def test_tile_order_from_the_protocol_when_the_slice_normal_is_absent(
    real_dicom_dir, tmp_path, folder, tile_order
):
    source = sorted((real_dicom_dir / "prisma-mosaic-dcmqa" / folder).glob("*.dcm"))[0]
    ds = pydicom.dcmread(source)
    csa = ds[0x00291010].value
    ds[0x00291010].value = csa.replace(b"SliceNormalVector\0", b"SliceNormalVectoX\0")  # hide it
    assert "SliceNormalVector" not in parse_csa_header(ds[0x00291010].value)
    path = tmp_path / "no_normal.dcm"
    ds.save_as(path)

    assert mosaic_layout(pydicom.dcmread(path), path).tile_order == tile_order
    np.testing.assert_allclose(read_volume(path).affine, read_volume(source).affine, atol=1e-4)


def test_truncated_real_file_is_incomplete(real_dicom_dir):
    path = real_dicom_dir / "skyra-mosaic-rtcloud" / "truncated_001_000013_000005.dcm"
    with pytest.raises(IncompleteVolumeError, match=r"truncated_001_000013_000005\.dcm: not complete yet"):
        read_volume(path)


def test_file_cut_anywhere_is_incomplete_never_another_error(real_dicom_dir, tmp_path, rng):
    raw = (real_dicom_dir / "skyra-mosaic-rtcloud" / "001_000013_000005.dcm").read_bytes()
    cuts = np.concatenate([[0, 100, 131, 132, 140, 143, 150], rng.integers(132, len(raw) - 1, size=40)])
    path = tmp_path / "partial.dcm"
    for cut in cuts:
        path.write_bytes(raw[: int(cut)])
        with pytest.raises(IncompleteVolumeError, match="not complete yet"):
            read_volume(path)
    path.write_bytes(raw)
    assert read_volume(path).shape == (64, 64, 27)


def test_unreadable_files_raise_volume_error_naming_the_file(real_dicom_dir, tmp_path):
    not_dicom = tmp_path / "notes.dcm"
    not_dicom.write_bytes(b"x" * 500)
    with pytest.raises(VolumeError, match=r"notes\.dcm: not a DICOM file"):
        read_volume(not_dicom)
    with pytest.raises(VolumeError, match=r"absent\.dcm: cannot read the file"):
        read_volume(tmp_path / "absent.dcm")

    ds = pydicom.dcmread(real_dicom_dir / "skyra-mosaic-rtcloud" / "001_000013_000003.dcm")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    single = tmp_path / "single.dcm"
    ds.save_as(single)
    with pytest.raises(VolumeError, match=r"single\.dcm: ImageType .*expected a Siemens MOSAIC"):
        read_volume(single)

    ds = pydicom.dcmread(real_dicom_dir / "skyra-mosaic-rtcloud" / "001_000013_000003.dcm")
    del ds[0x00291010]
    no_csa = tmp_path / "no_csa.dcm"
    ds.save_as(no_csa)
    with pytest.raises(VolumeError, match=r"no_csa\.dcm: \(0029,1010\) CSA image header: missing"):
        read_volume(no_csa)


def test_csa_parser_rejects_other_layouts_and_cut_headers(real_dicom_dir):
    raw = pydicom.dcmread(
        real_dicom_dir / "skyra-mosaic-rtcloud" / "001_000013_000003.dcm", stop_before_pixels=True
    )[0x00291010].value
    tags = parse_csa_header(raw)
    assert tags["NumberOfImagesInMosaic"] == ["27"]
    with pytest.raises(VolumeError, match="expected the 'SV10' layout"):
        parse_csa_header(b"SV09" + raw[4:], "f.dcm")
    with pytest.raises(VolumeError, match=r"f\.dcm: CSA header \(0029,1010\): truncated"):
        parse_csa_header(raw[: len(raw) // 2], "f.dcm")


def _write_enhanced(path: Path, volume, frame_order: np.ndarray, tr_ms: float) -> None:
    """Write ``volume`` as an enhanced MR DICOM, one frame per slice, in ``frame_order``."""
    affine_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine
    spacing = np.sqrt((affine_lps[:3, :3] ** 2).sum(axis=0))
    row_dir, col_dir = affine_lps[:3, 0] / spacing[0], affine_lps[:3, 1] / spacing[1]
    start = datetime(2024, 5, 6, 10, 20, 30)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.AcquisitionNumber = volume.index + 1
    ds.AcquisitionDateTime = start.strftime("%Y%m%d%H%M%S.%f")
    ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
    ds.NumberOfFrames = volume.shape[2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0

    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [float(spacing[1]), float(spacing[0])]
    measures.SliceThickness = float(spacing[2])
    orientation = Dataset()
    orientation.ImageOrientationPatient = [*row_dir.tolist(), *col_dir.tolist()]
    timing = Dataset()
    timing.RepetitionTime = tr_ms
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = 2.0, -10.0
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])

    frames = []
    for k in frame_order:
        item = Dataset()
        position = Dataset()
        position.ImagePositionPatient = (affine_lps @ [0, 0, k, 1])[:3].tolist()
        content = Dataset()
        content.InStackPositionNumber = int(k) + 1
        when = start.timestamp() + float(volume.slice_times_s[k])
        content.FrameAcquisitionDateTime = datetime.fromtimestamp(when).strftime("%Y%m%d%H%M%S.%f")
        item.PlanePositionSequence = Sequence([position])
        item.FrameContentSequence = Sequence([content])
        frames.append(item)
        # stored = (real + 10) / 2, axes (row, col)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    stored = ((volume.data[:, :, frame_order] + 10.0) / 2.0).transpose(2, 1, 0)
    ds.PixelData = np.ascontiguousarray(stored).astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_enhanced_frames_are_sorted_along_the_slice_normal(real_dicom_dir, tmp_path, rng):
    mosaic = read_volume(real_dicom_dir / "prisma-mosaic-dcmqa" / "ep2d_Int_HF_5" / "IM-0004-0002.dcm")
    mosaic.data = np.round(mosaic.data / 2) * 2  # even values survive the 2x rescale exactly
    path = tmp_path / "enhanced.dcm"
    _write_enhanced(path, mosaic, frame_order=rng.permutation(mosaic.shape[2]), tr_ms=3200.0)

    volume = read_volume(path)
    assert volume.index == mosaic.index
    assert volume.tr_s == pytest.approx(3.2)
    assert volume.series == "1.2.3.4"
    # The mosaic runs H>>F; the enhanced reader stacks along row x column (F>>H): same world.
    assert np.linalg.det(volume.affine[:3, :3]) * np.linalg.det(mosaic.affine[:3, :3]) < 0
    mine, theirs = _canonical(volume.data, volume.affine), _canonical(mosaic.data, mosaic.affine)
    np.testing.assert_allclose(mine.affine, theirs.affine, atol=1e-3)
    np.testing.assert_array_equal(mine.get_fdata(), theirs.get_fdata())
    np.testing.assert_allclose(volume.slice_times_s, mosaic.slice_times_s[::-1], atol=2e-6)
    assert volume.times.acquired_s == pytest.approx(datetime(2024, 5, 6, 10, 20, 30).timestamp())

    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(IncompleteVolumeError, match="PixelData has"):
        read_volume(path)


def test_enhanced_with_two_frames_at_one_position_is_rejected(real_dicom_dir, tmp_path):
    mosaic = read_volume(real_dicom_dir / "prisma-mosaic-dcmqa" / "ep2d_Asc_2" / "IM-0001-0001.dcm")
    path = tmp_path / "doubled.dcm"
    order = np.arange(mosaic.shape[2])
    order[1] = 0
    _write_enhanced(path, mosaic, frame_order=order, tr_ms=3200.0)
    with pytest.raises(VolumeError, match=r"doubled\.dcm: PlanePositionSequence: expected one frame per"):
        read_volume(path)


def _nifti_4d(rng, n_volumes: int = 4) -> nib.Nifti1Image:
    data = rng.normal(100, 10, size=(6, 5, 4, n_volumes)).astype(np.float32)
    affine = np.array([[-2.0, 0, 0, 10], [0, 2.0, 0, -20], [0, 0, 2.5, 5], [0, 0, 0, 1]])
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm", "msec")
    image.header["pixdim"][4] = 1600.0
    image.header.set_dim_info(slice=2)
    image.header["slice_code"] = 1  # sequential increasing
    image.header["slice_duration"] = 400.0
    image.header["slice_start"], image.header["slice_end"] = 0, 3
    return image


def test_nifti_3d_with_sidecar(tmp_path, rng):
    image = _nifti_4d(rng)
    path = tmp_path / "run2_0007.nii.gz"
    nib.save(nib.Nifti1Image(image.get_fdata()[..., 1].astype(np.float32), image.affine), path)
    (tmp_path / "run2_0007.json").write_text(
        json.dumps(
            {
                "RepetitionTime": 1.6,
                "SliceTiming": [0.0, 0.8, 0.4, 1.2],
                "SliceEncodingDirection": "k-",
                "AcquisitionDateTime": "2024-05-06T10:20:30.500000",
            }
        )
    )
    volume = read_volume(path)
    assert volume.index == 7
    assert volume.series == "run2"
    assert volume.tr_s == pytest.approx(1.6)
    np.testing.assert_allclose(volume.slice_times_s, [1.2, 0.4, 0.8, 0.0])
    np.testing.assert_allclose(volume.data, image.get_fdata()[..., 1], rtol=1e-6)
    np.testing.assert_allclose(volume.affine, image.affine)
    assert volume.times.acquired_s == pytest.approx(datetime(2024, 5, 6, 10, 20, 30, 500000).timestamp())


def test_nifti_3d_without_tr_or_number_is_rejected(tmp_path, rng):
    path = tmp_path / "anat.nii"
    nib.save(nib.Nifti1Image(rng.normal(size=(4, 4, 3)).astype(np.float32), np.eye(4)), path)
    with pytest.raises(VolumeError, match=r"anat\.nii: pixdim\[4\]: expected the TR"):
        read_volume(path, index_hint=0)
    (tmp_path / "anat.json").write_text('{"RepetitionTime": 2.0}')
    with pytest.raises(VolumeError, match=r"anat\.nii: file name: expected a volume number"):
        read_volume(path)
    assert read_volume(path, index_hint=3).index == 3


def test_growing_4d_nifti_reads_each_volume_once_written(tmp_path, rng):
    image = _nifti_4d(rng, n_volumes=4)
    full = tmp_path / "full.nii"
    nib.save(image, full)
    raw = full.read_bytes()
    volume_bytes = 6 * 5 * 4 * 4
    header_bytes = len(raw) - 4 * volume_bytes
    growing = tmp_path / "bold.nii"

    growing.write_bytes(raw[: header_bytes + 2 * volume_bytes + 17])  # third volume half written
    newest = read_volume(growing)
    assert newest.index == 1
    np.testing.assert_allclose(newest.data, image.get_fdata()[..., 1], rtol=1e-6)
    assert newest.tr_s == pytest.approx(1.6)
    np.testing.assert_allclose(newest.slice_times_s, [0.0, 0.4, 0.8, 1.2])
    with pytest.raises(IncompleteVolumeError, match=r"bold\.nii: not complete yet: volume 2 requested, 2"):
        read_volume(growing, index_hint=2)

    growing.write_bytes(raw)
    third = read_volume(growing, index_hint=2)
    assert third.index == 2
    np.testing.assert_allclose(third.data, image.get_fdata()[..., 2], rtol=1e-6)

    growing.write_bytes(raw[:200])
    with pytest.raises(IncompleteVolumeError, match="header needs 348"):
        read_volume(growing)


def test_nifti_that_is_not_nifti_raises(tmp_path):
    path = tmp_path / "junk_0001.nii"
    path.write_bytes(b"\x01" * 400)
    with pytest.raises(VolumeError, match=r"junk_0001\.nii: not a readable NIfTI file"):
        read_volume(path)
