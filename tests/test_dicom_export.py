"""Siemens MOSAIC / XA enhanced encoding: round trips read back with plain pydicom and numpy, the
CSA "SV10" layout, determinism, and rewriting real Siemens mosaics with the same geometry."""

from __future__ import annotations

import io
import struct
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from rtdecoder.errors import VolumeError
from rtdecoder.ingest.volume import Volume
from rtdecoder.phantom.dicom_export import (
    CsaElement,
    PixelScaling,
    SeriesInfo,
    build_csa_header,
    csa_numbers,
    encode_volume,
    enhanced_dataset,
    mosaic_dataset,
)
from rtdecoder.phantom.scanner import nifti_bytes

ACQUIRED_AT = datetime(2026, 1, 2, 9, 30, 0, 250000)
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


# ---- test-side readers: only pydicom, struct and numpy --------------------------------------


def parse_csa(raw: bytes) -> dict[str, list[str]]:
    """Values of every tag of an "SV10" CSA header."""
    assert raw[:8] == b"SV10\x04\x03\x02\x01"
    n_tags, _ = struct.unpack_from("<II", raw, 8)
    offset, tags = 16, {}
    for _ in range(n_tags):
        name = raw[offset : offset + 64].split(b"\0")[0].decode()
        n_items = struct.unpack_from("<i", raw, offset + 76)[0]
        offset += 84
        values = []
        for _ in range(n_items):
            length = struct.unpack_from("<i", raw, offset + 4)[0]
            offset += 16
            if length:
                values.append(raw[offset : offset + length].rstrip(b"\0").decode("latin-1").strip())
            offset += (length + 3) // 4 * 4
        tags[name] = values
    return tags


def read_mosaic(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data (nx, ny, nz), RAS affine, slice times s) of a MOSAIC, stored slice order."""
    csa = parse_csa(ds[0x0029, 0x1010].value)
    n_slices = int(csa["NumberOfImagesInMosaic"][0])
    per_side = int(np.ceil(np.sqrt(n_slices)))
    rows, cols = ds.Rows // per_side, ds.Columns // per_side
    pixels = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1.0)) + float(
        ds.get("RescaleIntercept", 0.0)
    )
    data = np.stack(
        [pixels[(t // per_side) * rows : (t // per_side + 1) * rows,
                (t % per_side) * cols : (t % per_side + 1) * cols].T for t in range(n_slices)],
        axis=2,
    )
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    spacing = np.asarray(ds.PixelSpacing, dtype=float)
    first = (
        np.asarray(ds.ImagePositionPatient, dtype=float)
        + (ds.Rows - rows) / 2 * spacing[0] * iop[3:]
        + (ds.Columns - cols) / 2 * spacing[1] * iop[:3]
    )
    affine = np.eye(4)
    affine[:3, 0] = iop[:3] * spacing[1]
    affine[:3, 1] = iop[3:] * spacing[0]
    affine[:3, 2] = np.asarray(csa["SliceNormalVector"], dtype=float) * float(ds.SpacingBetweenSlices)
    affine[:3, 3] = first
    times_s = np.asarray(csa["MosaicRefAcqTimes"], dtype=float) / 1000.0
    return data, LPS @ affine, times_s


def read_enhanced(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data (nx, ny, nz), RAS affine, slice times s) of an enhanced MR image, frame order."""
    shared = ds.SharedFunctionalGroupsSequence[0]
    transform = shared.get("PixelValueTransformationSequence")
    slope = float(transform[0].RescaleSlope) if transform else 1.0
    intercept = float(transform[0].RescaleIntercept) if transform else 0.0
    data = np.transpose(ds.pixel_array.astype(np.float64) * slope + intercept, (2, 1, 0))
    iop = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    spacing = np.asarray(shared.PixelMeasuresSequence[0].PixelSpacing, dtype=float)
    frames = ds.PerFrameFunctionalGroupsSequence
    positions = np.array([f.PlanePositionSequence[0].ImagePositionPatient for f in frames], dtype=float)
    affine = np.eye(4)
    affine[:3, 0] = iop[:3] * spacing[1]
    affine[:3, 1] = iop[3:] * spacing[0]
    affine[:3, 2] = positions[1] - positions[0]
    affine[:3, 3] = positions[0]
    stamps = [
        datetime.strptime(f.FrameContentSequence[0].FrameAcquisitionDateTime, "%Y%m%d%H%M%S.%f")
        for f in frames
    ]
    start = datetime.strptime(ds.AcquisitionDateTime, "%Y%m%d%H%M%S.%f")
    times_s = np.array([(s - start).total_seconds() for s in stamps])
    return data, LPS @ affine, times_s


def assert_same_volume(data, affine, times_s, volume: Volume, value_tol: float) -> None:
    """Every read voxel lands on an original voxel (to 1e-4 mm) with its value and slice time."""
    assert data.shape == volume.data.shape
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in data.shape], indexing="ij"), axis=-1).reshape(-1, 3)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    original = (world - volume.affine[:3, 3]) @ np.linalg.inv(volume.affine[:3, :3]).T
    np.testing.assert_allclose(original, np.rint(original), atol=1e-4 / 3.0)
    o = np.rint(original).astype(int)
    np.testing.assert_allclose(
        data[ijk[:, 0], ijk[:, 1], ijk[:, 2]], volume.data[o[:, 0], o[:, 1], o[:, 2]], atol=value_tol
    )
    np.testing.assert_allclose(times_s[ijk[:, 2]], volume.slice_times_s[o[:, 2]], atol=1e-6)


# ---- fixtures ------------------------------------------------------------------------------


def oblique_affine(voxel_mm=(3.0, 3.2, 3.5), degrees=(8.0, -5.0, 12.0), shift=(-90.0, -110.0, -40.0)):
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ ry @ rx @ np.diag(voxel_mm)
    affine[:3, 3] = shift
    return affine


@pytest.fixture
def volume(rng) -> Volume:
    nz = 7
    order = np.r_[np.arange(0, nz, 2), np.arange(1, nz, 2)]
    times = np.empty(nz)
    times[order] = np.arange(nz) * 1.6 / nz
    return Volume(
        data=rng.normal(900.0, 60.0, size=(6, 5, nz)).astype(np.float32),
        affine=oblique_affine(),
        tr_s=1.6,
        index=4,
        slice_times_s=times,
    )


def series_for(volume: Volume, **kwargs) -> SeriesInfo:
    scaling = PixelScaling.for_range(float(volume.data.min()), float(volume.data.max()))
    return SeriesInfo(seed=3, series_number=13, pixel_scaling=scaling, **kwargs)


# ---- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("tile_order", ["FH", "HF"])
@pytest.mark.parametrize("flip_axes", [(), (0,), (0, 1, 2)])
def test_mosaic_round_trip(volume, tile_order, flip_axes):
    for axis in flip_axes:  # the writer must handle any axis direction, not only RAS-like ones
        volume.affine = volume.affine @ _flip(axis, volume.data.shape[axis])
        volume.data = np.flip(volume.data, axis=axis)
        volume.slice_times_s = volume.slice_times_s[::-1] if axis == 2 else volume.slice_times_s
    series = series_for(volume, tile_order=tile_order)
    ds = pydicom.dcmread(io.BytesIO(encode_volume(volume, series, ACQUIRED_AT, "mosaic")))

    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage
    assert list(ds.ImageType)[-1] == "MOSAIC"
    assert (ds.Rows, ds.Columns) == (3 * 5, 3 * 6)  # 7 slices -> 3 x 3 tiles of 5 rows x 6 columns
    assert ds.AcquisitionNumber == ds.InstanceNumber == 5
    assert float(ds.RepetitionTime) == pytest.approx(1600.0)
    assert ds.AcquisitionTime == "093000.250000"
    data, affine, times_s = read_mosaic(ds)
    assert_same_volume(data, affine, times_s, volume, value_tol=series.pixel_scaling.slope)
    # H>>F stores slices head first: the CSA normal points against row x column
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    normal = np.asarray(parse_csa(ds[0x0029, 0x1010].value)["SliceNormalVector"], dtype=float)
    assert np.sign(normal @ np.cross(iop[:3], iop[3:])) == (1 if tile_order == "FH" else -1)


def _flip(axis: int, n: int) -> np.ndarray:
    flip = np.eye(4)
    flip[axis, axis] = -1
    flip[axis, 3] = n - 1
    return flip


@pytest.mark.parametrize("tile_order", ["FH", "HF"])
def test_enhanced_round_trip(volume, tile_order):
    series = series_for(volume, tile_order=tile_order)
    ds = pydicom.dcmread(io.BytesIO(encode_volume(volume, series, ACQUIRED_AT, "enhanced")))

    assert ds.SOPClassUID == pydicom.uid.EnhancedMRImageStorage
    assert ds.NumberOfFrames == 7 and (ds.Rows, ds.Columns) == (5, 6)
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert shared.MRTimingAndRelatedParametersSequence[0].RepetitionTime == pytest.approx(1600.0)
    contents = [f.FrameContentSequence[0] for f in ds.PerFrameFunctionalGroupsSequence]
    assert [c.InStackPositionNumber for c in contents] == list(range(1, 8))
    assert {c.TemporalPositionIndex for c in contents} == {5}
    assert {c.StackID for c in contents} == {"1"}
    data, affine, times_s = read_enhanced(ds)
    assert_same_volume(data, affine, times_s, volume, value_tol=series.pixel_scaling.slope)


def test_nifti_round_trip(volume):
    image = nib.Nifti1Image.from_bytes(nifti_bytes(volume))
    np.testing.assert_allclose(image.affine, volume.affine, atol=1e-4)
    np.testing.assert_array_equal(image.get_fdata(dtype=np.float32), volume.data)
    assert float(image.header["pixdim"][4]) == pytest.approx(1.6)
    assert image.header.get_xyzt_units() == ("mm", "sec")


def test_identity_scaling_writes_no_rescale_and_keeps_integers(volume):
    volume.data = np.rint(volume.data)
    ds = mosaic_dataset(volume, SeriesInfo(), ACQUIRED_AT)
    assert "RescaleSlope" not in ds and "RescaleIntercept" not in ds
    data, _, _ = read_mosaic(pydicom.dcmread(io.BytesIO(encode_volume(volume, SeriesInfo(), ACQUIRED_AT, "mosaic"))))
    assert data.sum() == pytest.approx(float(volume.data.sum()))


def test_pixel_scaling_precision():
    scaling = PixelScaling.for_range(-5.0, 5.0)
    values = np.linspace(-5.0, 5.0, 1001)
    stored, n_clipped = scaling.encode(values)
    assert n_clipped == 0 and stored.dtype == np.uint16
    np.testing.assert_allclose(stored * scaling.slope + scaling.intercept, values, atol=scaling.slope / 2 + 1e-12)
    assert scaling.encode(np.array([6.0]))[1] == 1


# ---- CSA header ----------------------------------------------------------------------------


def test_csa_header_layout():
    raw = build_csa_header(
        [
            CsaElement("NumberOfImagesInMosaic", "US", csa_numbers([27], "US")),
            CsaElement("MosaicRefAcqTimes", "FD", csa_numbers([0.0, 765.0], "FD"), vm=0),
            CsaElement("B_value", "IS"),
        ]
    )
    assert raw[:16] == b"SV10\x04\x03\x02\x01" + struct.pack("<II", 3, 77)
    assert len(raw) % 4 == 0 and raw.endswith(b"\0" * 4)
    name, vm, vr, syngodt, n_items, marker = struct.unpack_from("<64si4siii", raw, 16)
    assert name.rstrip(b"\0") == b"NumberOfImagesInMosaic"
    assert (vm, vr, syngodt, n_items, marker) == (1, b"US\0\0", 10, 6, 77)
    assert struct.unpack_from("<4i", raw, 100) == (9, 9, 77, 9)
    assert raw[116:128] == b"27      \0\0\0\0"
    assert struct.unpack_from("<4i", raw, 128) == (0, 0, 205, 0)
    tags = parse_csa(raw)
    assert tags == {
        "NumberOfImagesInMosaic": ["27"], "MosaicRefAcqTimes": ["0.00000000", "765.00000000"], "B_value": []
    }


def test_csa_rejects_long_names():
    with pytest.raises(ValueError, match="longer than 63"):
        build_csa_header([CsaElement("x" * 64, "IS", ("1",))])


# ---- determinism and errors ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["mosaic", "enhanced"])
def test_same_seed_gives_identical_files(volume, fmt):
    first = encode_volume(volume, series_for(volume), ACQUIRED_AT, fmt)
    again = encode_volume(volume, series_for(volume), ACQUIRED_AT, fmt)
    other = pydicom.dcmread(io.BytesIO(encode_volume(volume, SeriesInfo(seed=4), ACQUIRED_AT, fmt)))
    assert first == again
    ds = pydicom.dcmread(io.BytesIO(first))
    assert pydicom.uid.UID(ds.SOPInstanceUID).is_valid
    assert other.SOPInstanceUID != ds.SOPInstanceUID and other.StudyInstanceUID != ds.StudyInstanceUID


def test_file_name_is_siemens_online_export():
    assert SeriesInfo(session_number=1, series_number=13).file_name(4) == "001_000013_000005.dcm"


def test_sheared_affine_is_rejected(volume):
    volume.affine = volume.affine.copy()
    volume.affine[0, 2] += 1.0
    with pytest.raises(VolumeError, match="volume 4: affine: expected orthogonal axes"):
        mosaic_dataset(volume, SeriesInfo(), ACQUIRED_AT)


def test_wrong_slice_times_are_rejected(volume):
    volume.slice_times_s = np.zeros(3)
    with pytest.raises(VolumeError, match=r"slice_times_s: expected shape \(7,\)"):
        enhanced_dataset(volume, SeriesInfo(), ACQUIRED_AT)


# ---- real Siemens files: reading and rewriting keeps the geometry ---------------------------


@pytest.mark.parametrize(
    ("relative", "tile_order"),
    [
        ("skyra-mosaic-rtcloud/001_000013_000003.dcm", "FH"),
        ("prisma-mosaic-dcmqa/ep2d_Asc_2/IM-0001-0002.dcm", "FH"),
        ("prisma-mosaic-dcmqa/ep2d_Int_HF_5/IM-0004-0002.dcm", "HF"),
    ],
)
def test_rewriting_a_real_mosaic_keeps_its_geometry(real_dicom_dir: Path, relative, tile_order):
    real = pydicom.dcmread(real_dicom_dir / relative)
    data, affine, times_s = read_mosaic(real)
    volume = Volume(
        data=data, affine=affine, tr_s=float(real.RepetitionTime) / 1000.0,
        index=int(real.AcquisitionNumber) - 1, slice_times_s=times_s,
    )
    acquired = datetime.strptime(real.AcquisitionDate + real.AcquisitionTime, "%Y%m%d%H%M%S.%f")
    ours = pydicom.dcmread(
        io.BytesIO(encode_volume(volume, SeriesInfo(tile_order=tile_order), acquired, "mosaic"))
    )

    np.testing.assert_allclose(
        np.asarray(ours.ImagePositionPatient, float), np.asarray(real.ImagePositionPatient, float), atol=2e-3
    )
    np.testing.assert_allclose(
        np.asarray(ours.ImageOrientationPatient, float), np.asarray(real.ImageOrientationPatient, float), atol=1e-5
    )
    for keyword in ("Rows", "Columns", "AcquisitionNumber", "InstanceNumber", "AcquisitionTime"):
        assert ours.get(keyword) == real.get(keyword), keyword
    # we write SliceThickness = spacing (no gap known); the real files may have a gap
    assert float(ours.SliceThickness) == pytest.approx(float(real.SpacingBetweenSlices), abs=1e-6)
    for keyword in ("SpacingBetweenSlices", "RepetitionTime"):
        assert float(ours.get(keyword)) == pytest.approx(float(real.get(keyword)), abs=1e-6)
    np.testing.assert_allclose(np.asarray(ours.PixelSpacing, float), np.asarray(real.PixelSpacing, float))
    ours_csa, real_csa = parse_csa(ours[0x0029, 0x1010].value), parse_csa(real[0x0029, 0x1010].value)
    assert ours_csa["NumberOfImagesInMosaic"] == real_csa["NumberOfImagesInMosaic"]
    np.testing.assert_allclose(
        np.asarray(ours_csa["SliceNormalVector"], float), np.asarray(real_csa["SliceNormalVector"], float), atol=1e-4
    )
    np.testing.assert_allclose(
        np.asarray(ours_csa["MosaicRefAcqTimes"], float), np.asarray(real_csa["MosaicRefAcqTimes"], float), atol=1e-6
    )
    # same tile layout and values: the stored mosaics are identical
    np.testing.assert_array_equal(ours.pixel_array, real.pixel_array)
    assert ("ucImageNumbTra" in parse_csa(ours[0x0029, 0x1020].value)["MrPhoenixProtocol"][0]) == (tile_order == "HF")
