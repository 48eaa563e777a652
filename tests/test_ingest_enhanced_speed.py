"""The fast enhanced DICOM path: the same volume as the pydicom path on every file, and faster.

The fast path (:func:`rtdecoder.ingest.enhanced.frame_fields_from_raw`) reads the per-frame
functional groups from their bytes; ``readers._read_dicom_volume(path, fast_enhanced=False)`` is
the pydicom path it must match bit for bit (data, affine, slice times, TR, index, series,
acquisition time). Files it does not expect must fall back to that path, not differ from it.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ImplicitVRLittleEndian

from rtdecoder.errors import VolumeError
from rtdecoder.ingest import readers
from rtdecoder.ingest.volume import Volume
from rtdecoder.phantom.dicom_export import PixelScaling, SeriesInfo, encode_volume, enhanced_dataset

ACQUIRED_AT = datetime(2026, 3, 4, 11, 22, 33, 125000)
NSD_GRID = (81, 104, 83)  # bench/bench_frontend.py's NSD size, 1.8 mm
NSD_VOXEL_MM = 1.8


def oblique_affine(voxel_mm=(2.0, 2.2, 2.5), degrees=(9.0, -4.0, 14.0), shift=(-60.0, -80.0, -30.0)) -> np.ndarray:
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ ry @ rx @ np.diag(voxel_mm)
    affine[:3, 3] = shift
    return affine


def multiband_times_s(n_slices: int, tr_s: float, multiband: int = 3) -> np.ndarray:
    """Interleaved slice times with ``multiband`` slices sharing each time, s, shape (n_slices,)."""
    per_band = -(-n_slices // multiband)
    shots = np.r_[np.arange(0, per_band, 2), np.arange(1, per_band, 2)]
    times = np.empty(per_band)
    times[shots] = np.arange(per_band) * tr_s / per_band
    return np.tile(times, multiband)[:n_slices]


def make_volume(rng, shape=(9, 8, 7), affine=None, index=3, integer=False) -> Volume:
    data = rng.normal(800.0, 80.0, size=shape).astype(np.float32)
    if integer:
        data = np.rint(data)
    affine = oblique_affine() if affine is None else affine
    return Volume(data=data, affine=affine, tr_s=1.6, index=index, slice_times_s=multiband_times_s(shape[2], 1.6))


def series_for(volume: Volume, identity: bool = False, **kwargs) -> SeriesInfo:
    scaling = PixelScaling() if identity else PixelScaling.for_range(float(volume.data.min()), float(volume.data.max()))
    return SeriesInfo(seed=5, series_number=7, pixel_scaling=scaling, **kwargs)


def assert_same_volume(fast: Volume, full: Volume) -> None:
    assert fast.data.dtype == full.data.dtype == np.float32
    np.testing.assert_array_equal(fast.data, full.data)
    np.testing.assert_array_equal(fast.affine, full.affine)
    if full.slice_times_s is None:
        assert fast.slice_times_s is None
    else:
        np.testing.assert_array_equal(fast.slice_times_s, full.slice_times_s)
    assert (fast.tr_s, fast.index, fast.series) == (full.tr_s, full.index, full.series)
    assert fast.times.acquired_s == full.times.acquired_s


def both_paths(path: Path) -> tuple[Volume, Volume, bool]:
    """(fast-path volume, pydicom-path volume, whether the fast path read the per-frame groups)."""
    took_fast = readers._read_dicom(path).fields is not None
    return readers._read_dicom_volume(path), readers._read_dicom_volume(path, fast_enhanced=False), took_fast


# ---- variants of a phantom enhanced file ---------------------------------------------------------


def _shuffle_frames(ds, rng) -> None:
    n_frames, rows, cols = int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns)
    order = rng.permutation(n_frames)
    frames = np.frombuffer(ds.PixelData, dtype="<u2").reshape(n_frames, rows, cols)
    ds.PixelData = np.ascontiguousarray(frames[order]).tobytes()
    items = list(ds.PerFrameFunctionalGroupsSequence)
    ds.PerFrameFunctionalGroupsSequence = Sequence([items[i] for i in order])


def _per_frame_rescale(ds, rng) -> None:
    transform = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    del ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        frame_transform = pydicom.Dataset()
        frame_transform.RescaleSlope = f"{float(transform.RescaleSlope) * (1 + 0.01 * k):.8g}"
        frame_transform.RescaleIntercept = f"{float(transform.RescaleIntercept) - k:.8g}"
        item.PixelValueTransformationSequence = Sequence([frame_transform])


def _per_frame_geometry(ds, rng) -> None:
    shared = ds.SharedFunctionalGroupsSequence[0]
    orientation, measures = shared.PlaneOrientationSequence[0], shared.PixelMeasuresSequence[0]
    del shared.PlaneOrientationSequence, shared.PixelMeasuresSequence
    for item in ds.PerFrameFunctionalGroupsSequence:
        item.PlaneOrientationSequence = Sequence([orientation])
        item.PixelMeasuresSequence = Sequence([measures])


def _undefined_lengths(ds, rng) -> None:
    def undefine(dataset) -> None:
        for element in dataset:
            if element.VR == "SQ":
                element.is_undefined_length = True
                for item in element.value:
                    item.is_undefined_length_sequence_item = True
                    undefine(item)

    undefine(ds)


def _large_per_frame_group(ds, rng) -> None:
    # 10 KB of private data per frame makes the group larger than the reader's 64 KB defer size.
    for item in ds.PerFrameFunctionalGroupsSequence:
        item.add_new((0x0021, 0x0010), "LO", "SIEMENS MR SDI 02")
        item.add_new((0x0021, 0x1010), "OB", rng.integers(0, 256, 10240, dtype=np.uint8).tobytes())


def _private_elements_before_pixels(ds, rng) -> None:
    ds.add_new((0x7FDF, 0x0010), "LO", "SIEMENS CSA NON-IMAGE")
    ds.add_new((0x7FDF, 0x1010), "OB", b"\x01\x02" * 50)


def _one_frame_without_time(ds, rng) -> None:
    del ds.PerFrameFunctionalGroupsSequence[2].FrameContentSequence[0].FrameAcquisitionDateTime


def _unusual_decimal(ds, rng) -> None:
    # Valid for pydicom's float() but not a plain decimal: the fast path must fall back.
    item = ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[0]
    x, y, z = (float(v) for v in item.ImagePositionPatient)
    text = f"{x:.6f}\\{y:.6f}\\{z:.4f}_0".encode()
    text += b" " * (len(text) % 2)  # values have an even length
    item[0x00200032] = RawDataElement(Tag(0x00200032), "DS", len(text), text, 0, False, True)


VARIANTS = {
    "as exported": (None, True),
    "frames shuffled": (_shuffle_frames, True),
    "rescale per frame": (_per_frame_rescale, True),
    "geometry per frame": (_per_frame_geometry, True),
    "undefined lengths": (_undefined_lengths, True),
    "per-frame group over 64 KB": (_large_per_frame_group, True),
    "private elements before pixels": (_private_elements_before_pixels, True),
    "one frame without a time": (_one_frame_without_time, True),
    "unusual decimal (falls back)": (_unusual_decimal, False),
}


def write_variant(path: Path, volume: Volume, series: SeriesInfo, change, rng, implicit: bool = False) -> Path:
    ds = enhanced_dataset(volume, series, ACQUIRED_AT)
    if change is not None:
        change(ds, rng)
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)
    else:
        ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize(
    ("name", "implicit"),
    [(name, False) for name in VARIANTS] + [(name, True) for name in VARIANTS if "falls back" not in name],
    ids=lambda value: ("implicit VR" if value else "explicit VR") if isinstance(value, bool) else value,
)
def test_fast_path_matches_the_pydicom_path_on_phantom_files(tmp_path, rng, name, implicit):
    change, fast_expected = VARIANTS[name]
    volume = make_volume(rng)
    path = write_variant(tmp_path / "enhanced.dcm", volume, series_for(volume), change, rng, implicit)
    fast, full, took_fast = both_paths(path)
    assert took_fast is fast_expected
    assert_same_volume(fast, full)
    if name == "one frame without a time":
        assert fast.slice_times_s is None


@pytest.mark.parametrize("tile_order", ["FH", "HF"])
@pytest.mark.parametrize("identity", [False, True], ids=["rescaled", "stored values"])
def test_fast_path_matches_on_orientations_and_scalings(tmp_path, rng, tile_order, identity):
    for k, affine in enumerate([np.diag([2.0, 2.0, 3.0, 1.0]), oblique_affine(), np.diag([-1.8, 1.8, -1.8, 1.0])]):
        volume = make_volume(rng, affine=affine, integer=identity)
        series = series_for(volume, identity=identity, tile_order=tile_order)
        path = write_variant(tmp_path / f"enhanced_{k}.dcm", volume, series, None, rng)
        fast, full, took_fast = both_paths(path)
        assert took_fast
        assert_same_volume(fast, full)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("uneven", "expected evenly spaced slices"),
        ("doubled", "expected one frame per slice position"),
        ("no position", r"PlanePositionSequence > ImagePositionPatient: missing"),
    ],
)
def test_irregular_files_raise_the_same_error_on_both_paths(tmp_path, rng, change, message):
    volume = make_volume(rng)
    ds = enhanced_dataset(volume, series_for(volume), ACQUIRED_AT)
    frames = ds.PerFrameFunctionalGroupsSequence
    if change == "uneven":
        position = frames[3].PlanePositionSequence[0]
        position.ImagePositionPatient = [float(v) + 0.5 for v in position.ImagePositionPatient]
    elif change == "doubled":
        doubled = frames[3].PlanePositionSequence[0].ImagePositionPatient
        frames[4].PlanePositionSequence[0].ImagePositionPatient = doubled
    else:
        del frames[5].PlanePositionSequence
    path = tmp_path / "irregular.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(VolumeError, match=message) as fast_error:
        readers._read_dicom_volume(path)
    with pytest.raises(VolumeError, match=message) as full_error:
        readers._read_dicom_volume(path, fast_enhanced=False)
    assert str(fast_error.value) == str(full_error.value)


REAL_MOSAICS = [
    "skyra-mosaic-rtcloud/001_000013_000003.dcm",
    "prisma-mosaic-dcmqa/ep2d_Asc_2/IM-0001-0002.dcm",
    "prisma-mosaic-dcmqa/ep2d_Int_HF_5/IM-0004-0003.dcm",
]


@pytest.mark.parametrize("relative", REAL_MOSAICS)
def test_fast_path_matches_on_real_scans_exported_as_enhanced(real_dicom_dir, tmp_path, rng, relative):
    real = readers.read_volume(real_dicom_dir / relative)
    for k, (change, tile_order) in enumerate([(None, "FH"), (_shuffle_frames, "HF"), (_undefined_lengths, "FH")]):
        path = write_variant(tmp_path / f"real_{k}.dcm", real, series_for(real, tile_order=tile_order), change, rng)
        fast, full, took_fast = both_paths(path)
        assert took_fast
        assert_same_volume(fast, full)
        np.testing.assert_allclose(fast.voxel_size_mm, real.voxel_size_mm, atol=1e-4)


def _median_read_ms(read, path: Path, n_reads: int) -> float:
    times_ms = []
    for _ in range(n_reads):
        start = time.perf_counter()
        read(path)
        times_ms.append(1e3 * (time.perf_counter() - start))
    return float(np.median(times_ms))


def test_fast_path_reads_an_nsd_sized_file_several_times_faster(tmp_path, rng):
    affine = np.diag([NSD_VOXEL_MM] * 3 + [1.0])
    volume = make_volume(rng, shape=NSD_GRID, affine=affine)
    path = tmp_path / "nsd_enhanced.dcm"
    path.write_bytes(encode_volume(volume, series_for(volume), ACQUIRED_AT, "enhanced"))
    fast, full, took_fast = both_paths(path)
    assert took_fast
    assert_same_volume(fast, full)

    # Interleaved, so both see the same load on a shared machine; the ratio is what is checked.
    fast_ms, full_ms = [], []
    for _ in range(5):
        fast_ms.append(_median_read_ms(readers.read_volume, path, 4))
        full_ms.append(_median_read_ms(lambda p: readers._read_dicom_volume(p, fast_enhanced=False), path, 4))
    fast_median_ms, full_median_ms = float(np.median(fast_ms)), float(np.median(full_ms))
    print(f"NSD-sized enhanced read: fast {fast_median_ms:.2f} ms, pydicom path {full_median_ms:.2f} ms (median)")
    assert fast_median_ms * 2.0 < full_median_ms
