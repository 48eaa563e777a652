"""Malformed files through ``read_volume``: only rtdecoder's errors come out, naming the file.

A live run reads whatever lands in the export folder; a bare ``ValueError`` from a malformed
header stops the watcher thread without naming the file, and a NaN volume fails much later. Here
seeded mutations of real Siemens exports and of phantom MOSAIC, enhanced and NIfTI files (byte
flips, truncations, tag value edits, CSA header damage, broken VRs and lengths, NaN voxels) go
through :func:`read_volume`, which must return a finite volume or raise a
:class:`~rtdecoder.errors.DecoderError` naming the file, each within a time bound.

``RTDECODER_FUZZ_N`` sets the mutations per test (default 2500; e.g. ``RTDECODER_FUZZ_N=50000``
for a long run), ``RTDECODER_FUZZ_SEED`` the seed.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import threading
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from rtdecoder.errors import DecoderError, IncompleteVolumeError, VolumeError
from rtdecoder.ingest.readers import read_volume
from rtdecoder.ingest.volume import Volume
from rtdecoder.phantom.dicom_export import PixelScaling, SeriesInfo, encode_volume
from rtdecoder.phantom.scanner import nifti_bytes

FUZZ_N = int(os.environ.get("RTDECODER_FUZZ_N", "2500"))
FUZZ_SEED = int(os.environ.get("RTDECODER_FUZZ_SEED", "20261201"))
PER_CALL_LIMIT_S = 5.0  # a read of these small files takes milliseconds; this catches a hang or a blow-up
ACQUIRED_AT = datetime(2026, 2, 3, 8, 15, 0, 500000)
CSA_TAG = 0x00291010
PIXEL_DATA_TAG = 0x7FE00010

# Bad values by kind of VR; each stands for a failure seen in the field or in a fuzzing campaign.
BAD_TEXT = [
    "3Q0\\3.0", "", " ", "nan", "inf", "-inf", "1e400", "\\", "abc", "1\\2\\3\\4\\5\\6\\7", "0", "-1", "-0",
    "99999999999999", "1\\2", "0\\0\\0\\0\\0\\0", "1\\0\\0\\1\\0\\0", "1.5", "\xe9", "20261399", "+2500", "1_0",
]
BAD_US = [0, 1, 2, 3, 7, 64, 255, 4096, 32768, 65535]
# (keyword, where) pairs worth breaking; "top" is the top level, "shared"/"frame" the functional groups.
TOP_KEYWORDS = [
    "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "NumberOfFrames", "Rows", "Columns",
    "RescaleSlope", "RescaleIntercept", "SliceThickness", "SpacingBetweenSlices", "RepetitionTime",
    "AcquisitionNumber", "InstanceNumber", "AcquisitionDateTime", "AcquisitionDate", "AcquisitionTime",
    "TimezoneOffsetFromUTC", "BitsAllocated", "PixelRepresentation", "SamplesPerPixel", "ImageType",
    "SOPClassUID", "SeriesInstanceUID", "SeriesNumber",
]
GROUP_KEYWORDS = [
    "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "RescaleSlope", "RescaleIntercept",
    "RepetitionTime", "SliceThickness", "SpacingBetweenSlices", "FrameAcquisitionDateTime",
]
CSA_NAMES = [b"NumberOfImagesInMosaic", b"SliceNormalVector", b"MosaicRefAcqTimes"]
LONG_VRS = (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")


@dataclass(frozen=True)
class Source:
    """One unmutated file: its bytes, the name to write it under, and a sidecar if it has one."""

    name: str
    raw: bytes
    kind: str  # "dicom" or "nifti"
    sidecar: bytes | None = None
    index_hint: int | None = None


@dataclass
class Outcome:
    """What the mutations did, and what went wrong (a non-project error, a slow call, a bad volume)."""

    counts: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    slowest_s: float = 0.0


# ---- sources --------------------------------------------------------------------------------------


def _phantom_volume(rng: np.random.Generator, shape=(8, 7, 5)) -> Volume:
    affine = np.diag([2.0, 2.1, 2.5, 1.0])
    affine[:3, 3] = [-8.0, -9.0, -6.0]
    return Volume(
        data=rng.normal(900.0, 60.0, size=shape).astype(np.float32), affine=affine, tr_s=1.6, index=2,
        slice_times_s=np.arange(shape[2]) * 0.3,
    )


def _dicom_sources_from(volume: Volume, stem: str) -> list[Source]:
    scaling = PixelScaling.for_range(float(volume.data.min()), float(volume.data.max()))
    sources = []
    for fmt, tile_order in (("mosaic", "FH"), ("mosaic", "HF"), ("enhanced", "FH")):
        series = SeriesInfo(seed=11, series_number=4, pixel_scaling=scaling, tile_order=tile_order)
        raw = encode_volume(volume, series, ACQUIRED_AT, fmt)
        sources.append(Source(f"{stem}_{fmt}_{tile_order}.dcm", raw, "dicom"))
    return sources


def phantom_sources(rng: np.random.Generator) -> list[Source]:
    volume = _phantom_volume(rng)
    sources = _dicom_sources_from(volume, "phantom")
    identity = SeriesInfo(seed=11, series_number=4)  # no rescale tags at all
    integer_volume = Volume(np.rint(volume.data), volume.affine, volume.tr_s, volume.index, volume.slice_times_s)
    sources.append(Source("phantom_identity.dcm", encode_volume(integer_volume, identity, ACQUIRED_AT, "enhanced"),
                          "dicom"))
    sidecar = json.dumps({"RepetitionTime": 1.6, "SliceTiming": [0.0, 0.3, 0.6, 0.9, 1.2],
                          "AcquisitionDateTime": "2026-02-03T08:15:00.5"}).encode()
    sources.append(Source("vol_00002.nii", nifti_bytes(volume), "nifti", sidecar=sidecar))
    four_d = nib.Nifti1Image(np.stack([volume.data] * 3, axis=3), volume.affine)
    four_d.header.set_xyzt_units("mm", "sec")
    four_d.header["pixdim"][4] = 1.6
    sources.append(Source("bold.nii", four_d.to_bytes(), "nifti", index_hint=1))
    return sources


def real_sources(root: Path) -> list[Source]:
    picks = [
        "skyra-mosaic-rtcloud/001_000013_000003.dcm",
        "prisma-mosaic-dcmqa/ep2d_Asc_2/IM-0001-0002.dcm",
        "prisma-mosaic-dcmqa/ep2d_Int_HF_5/IM-0004-0003.dcm",
    ]
    sources = [Source(Path(p).name, (root / p).read_bytes(), "dicom") for p in picks]
    # The same scans as XA enhanced files, and a real dcm2niix conversion as NIfTI.
    sources += _dicom_sources_from(read_volume(root / picks[1]), "prisma_as")[2:]
    reference = nib.load(root / "prisma-mosaic-dcmqa" / "Ref" / "2_ep2d_Asc.nii")
    small = nib.Nifti1Image(np.asarray(reference.dataobj)[..., :2], reference.affine, reference.header)
    sources.append(Source("2_ep2d_Asc.nii", small.to_bytes(), "nifti", index_hint=1))
    return sources


# ---- mutations ------------------------------------------------------------------------------------


def _header_end(raw: bytes) -> int:
    """Where the pixel data element starts (the end of the header), or the file's end."""
    marker = raw.find(b"\xe0\x7f\x10\x00OW")
    return marker if marker > 132 else len(raw)


def _flip_bytes(raw: bytes, rng, low: int, high: int) -> tuple[bytes, str]:
    data = bytearray(raw)
    positions = rng.integers(low, max(high, low + 1), size=int(rng.integers(1, 9)))
    for pos in positions:
        data[pos] = int(rng.integers(256))
    return bytes(data), f"bytes flipped at {sorted(positions.tolist())}"


def _truncate(raw: bytes, rng) -> tuple[bytes, str]:
    cut = int(rng.integers(0, len(raw)))
    return raw[:cut], f"cut at byte {cut} of {len(raw)}"


def _holders(ds: pydicom.Dataset, rng) -> list[tuple[str, pydicom.Dataset]]:
    """The top-level dataset and the items of its functional groups (some frames), to edit in."""
    holders = [("top", ds)]
    for sequence, tag in (("shared", "SharedFunctionalGroupsSequence"), ("frame", "PerFrameFunctionalGroupsSequence")):
        items = list(ds.get(tag, []))
        for k in sorted({0, len(items) // 2, len(items) - 1}) if items else []:
            for element in items[k]:
                if element.VR == "SQ":
                    holders.extend((f"{sequence}[{k}] > {element.keyword}", inner) for inner in element.value)
    return holders


def _raw_element(tag: int, vr: str, value: bytes) -> RawDataElement:
    value += b" " * (len(value) % 2)  # DICOM values have an even length
    return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def _edit_value(raw: bytes, rng) -> tuple[bytes, str]:
    ds = pydicom.dcmread(io.BytesIO(raw))
    holders = _holders(ds, rng)
    where, holder = holders[int(rng.integers(len(holders)))]
    keywords = TOP_KEYWORDS if where == "top" else GROUP_KEYWORDS
    present = [k for k in keywords if k in holder]
    if not present:
        return raw, "no edit"
    keyword = present[int(rng.integers(len(present)))]
    element = holder[keyword]
    if element.VR in ("US", "UL", "SS", "SL"):
        number = BAD_US[int(rng.integers(len(BAD_US)))]
        holder[element.tag] = _raw_element(element.tag, element.VR, struct.pack("<H", number))
        text = str(number)
    else:
        text = BAD_TEXT[int(rng.integers(len(BAD_TEXT)))]
        holder[element.tag] = _raw_element(element.tag, element.VR, text.encode("latin-1"))
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue(), f"{where} > {keyword} := {text!r}"


def _edit_csa(raw: bytes, rng) -> tuple[bytes, str]:
    ds = pydicom.dcmread(io.BytesIO(raw))
    if CSA_TAG not in ds:
        return _edit_value(raw, rng)
    csa = bytearray(ds[CSA_TAG].value)
    action = int(rng.integers(4))
    if action == 0:
        for pos in rng.integers(0, len(csa), size=int(rng.integers(1, 6))):
            csa[pos] = int(rng.integers(256))
        what = "CSA bytes flipped"
    elif action == 1:
        csa = csa[: int(rng.integers(0, len(csa)))]
        what = f"CSA cut to {len(csa)} bytes"
    elif action == 2:
        struct.pack_into("<I", csa, 8, int(rng.choice([0, 1, 2**31, 2**32 - 1])))
        what = "CSA tag count changed"
    else:
        name = CSA_NAMES[int(rng.integers(len(CSA_NAMES)))]
        at = csa.find(name + b"\0")
        if at < 0:
            return raw, "no edit"
        item = at + 84 + 16  # the tag's first item value, after its 84-byte header and a 16-byte item header
        garbage = rng.choice([b"abc", b"nan", b"-5", b"1e9", b"0", b"\xff\xfe"])
        csa[item : item + len(garbage)] = garbage
        what = f"CSA {name.decode()} value := {garbage!r}"
    ds[CSA_TAG] = _raw_element(CSA_TAG, "OB", bytes(csa))
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue(), what


def _element_headers(raw: bytes) -> list[tuple[int, int, bool]]:
    """(header offset, tag, long form) of the top-level elements after the file meta."""
    ds = pydicom.dcmread(io.BytesIO(raw), defer_size=256)
    headers = []
    for tag in ds.keys():
        element = ds.get_item(tag, keep_deferred=True)
        value_tell = getattr(element, "value_tell", None)
        if value_tell is None:
            continue
        short_vr = raw[value_tell - 4 : value_tell - 2]
        long_form = not (short_vr.isalpha() and short_vr.isupper()) or short_vr in LONG_VRS
        headers.append((value_tell - (12 if long_form else 8), int(tag), long_form))
    return headers


def _break_vr_or_length(raw: bytes, rng) -> tuple[bytes, str]:
    headers = [h for h in _element_headers(raw) if h[1] != PIXEL_DATA_TAG] or _element_headers(raw)
    offset, tag, long_form = headers[int(rng.integers(len(headers)))]
    data = bytearray(raw)
    if rng.random() < 0.5:
        vr = [b"MS", b"ZZ", b"\x44\x9f", b"SQ", b"UN", b"OB", b"US", b"DS", b"\x00\x00"][int(rng.integers(9))]
        data[offset + 4 : offset + 6] = vr
        return bytes(data), f"VR of ({tag >> 16:04X},{tag & 0xFFFF:04X}) := {vr!r}"
    if long_form:
        length = int(rng.choice([0, 1, 3, 2**31, 2**32 - 1, int(rng.integers(0, 2**20))]))
        struct.pack_into("<I", data, offset + 8, length)
    else:
        length = int(rng.choice([0, 1, 3, 65535, int(rng.integers(0, 2**16))]))
        struct.pack_into("<H", data, offset + 6, length)
    return bytes(data), f"length of ({tag >> 16:04X},{tag & 0xFFFF:04X}) := {length}"


def mutate_dicom(raw: bytes, rng) -> tuple[bytes, str]:
    """One seeded mutation of a DICOM file; returns the bytes and what was done."""
    action = int(rng.integers(7))
    header_end = _header_end(raw)
    if action in (0, 1):
        return _flip_bytes(raw, rng, 128 if action == 0 else header_end, header_end if action == 0 else len(raw))
    if action == 2:
        return _truncate(raw, rng)
    if action in (3, 4):
        return _edit_value(raw, rng)
    if action == 5:
        return _edit_csa(raw, rng)
    return _break_vr_or_length(raw, rng)


# Offsets in a NIfTI-1 header (and their struct formats) worth breaking.
NIFTI_FIELDS = {
    "sizeof_hdr": (0, "<i"), "dim": (40, "<8h"), "datatype": (70, "<h"), "bitpix": (72, "<h"),
    "slice_start": (74, "<h"), "pixdim": (76, "<8f"), "vox_offset": (108, "<f"), "scl_slope": (112, "<f"),
    "scl_inter": (116, "<f"), "slice_end": (120, "<h"), "slice_code": (122, "<b"), "xyzt_units": (123, "<b"),
    "slice_duration": (132, "<f"), "qform_code": (252, "<h"), "sform_code": (254, "<h"), "quatern": (256, "<6f"),
    "srow": (280, "<12f"), "dim_info": (39, "<b"),
}
BAD_FLOATS = [0.0, -1.0, float("nan"), float("inf"), 1e38, -3.0, 2.0**31, 1e-30]
BAD_INTS = [0, -1, 1, 2, 3, 5, 7, 8, 16, 64, 127, 255, 1024, 32767, -32768]


def mutate_nifti(raw: bytes, sidecar: bytes | None, rng) -> tuple[bytes, bytes | None, str]:
    """One seeded mutation of a NIfTI file (or its sidecar); returns both and what was done."""
    action = int(rng.integers(6))
    if action == 0:
        data, what = _flip_bytes(raw, rng, 0, 352)
        return data, sidecar, what
    if action == 1:
        data, what = _truncate(raw, rng)
        return data, sidecar, what
    if action == 2:
        name = list(NIFTI_FIELDS)[int(rng.integers(len(NIFTI_FIELDS)))]
        offset, fmt = NIFTI_FIELDS[name]
        n_values = struct.calcsize(fmt) // struct.calcsize("<" + fmt[-1])
        if fmt[-1] == "f":
            values = [BAD_FLOATS[int(rng.integers(len(BAD_FLOATS)))] for _ in range(n_values)]
        else:
            limit = 127 if fmt[-1] == "b" else 32767
            values = [max(-limit - 1, min(limit, BAD_INTS[int(rng.integers(len(BAD_INTS)))])) for _ in range(n_values)]
        keep = struct.unpack_from(fmt, raw, offset)
        if n_values > 1 and rng.random() < 0.7:  # often break one value only
            k = int(rng.integers(n_values))
            values = [v if i == k else keep[i] for i, v in enumerate(values)]
        data = bytearray(raw)
        struct.pack_into(fmt, data, offset, *values)
        return bytes(data), sidecar, f"{name} := {values}"
    if action == 3:
        voxels = np.frombuffer(raw, dtype="<f4", offset=352).copy()
        n_bad = int(rng.choice([1, 7, voxels.size]))
        voxels[rng.choice(voxels.size, size=n_bad, replace=False)] = rng.choice([np.nan, np.inf, -np.inf])
        return raw[:352] + voxels.tobytes(), sidecar, f"{n_bad} voxels made non-finite"
    if action == 4 and sidecar is not None:
        fields = json.loads(sidecar)
        key = ["RepetitionTime", "SliceTiming", "AcquisitionDateTime", "SliceEncodingDirection"][int(rng.integers(4))]
        fields[key] = [None, "abc", -1, 0, [1, 2], {"a": 1}, "nan", 1e400, [0.0] * 9][int(rng.integers(9))]
        return raw, json.dumps(fields).encode(), f"sidecar {key} := {fields[key]!r}"
    if action == 5 and sidecar is not None:
        data, what = _truncate(sidecar, rng)
        return raw, data, f"sidecar {what}"
    data, what = _flip_bytes(raw, rng, 0, 352)
    return data, sidecar, what


# ---- running them ---------------------------------------------------------------------------------


class _HangError(Exception):
    """Raised by the alarm when a read runs past the time bound."""


@contextmanager
def time_bound(limit_s: float) -> Iterator[None]:
    """Interrupt the block after ``limit_s`` (main thread only; elsewhere only the elapsed time counts)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def alarm(signum, frame):
        raise _HangError(f"no answer after {limit_s} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_read(path: Path, index_hint: int | None, what: str, outcome: Outcome, is_dicom: bool) -> None:
    """Read one mutated file; record its outcome, and a failure for anything outside the contract."""
    start = time.perf_counter()
    try:
        with time_bound(PER_CALL_LIMIT_S), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom and nibabel warn about odd values; errors are the point
            volume = read_volume(path, index_hint)
    except _HangError as err:
        outcome.failures.append(f"{what}: {err}")
        return
    except DecoderError as err:
        outcome.counts[type(err).__name__] += 1
        message = str(err)
        if path.stem not in message:
            outcome.failures.append(f"{what}: {type(err).__name__} does not name the file: {message}")
        elif "unexpected" in message:  # the safety net in read_volume caught it: no check named the field
            outcome.counts["caught by the safety net"] += 1
            if is_dicom:
                outcome.failures.append(f"{what}: only the safety net caught it: {message}")
    except Exception as err:
        frame = traceback.extract_tb(err.__traceback__)[-1]
        outcome.failures.append(
            f"{what}: {type(err).__name__}: {err} (at {Path(frame.filename).name}:{frame.lineno})"
        )
    else:
        outcome.counts["read"] += 1
        problems = []
        if volume.data.ndim != 3 or volume.data.size == 0 or not np.all(np.isfinite(volume.data)):
            problems.append(f"data of shape {volume.data.shape} not a finite 3D array")
        if not np.all(np.isfinite(volume.affine)) or abs(np.linalg.det(volume.affine[:3, :3])) < 1e-9:
            problems.append("affine not finite and invertible")
        if not (np.isfinite(volume.tr_s) and volume.tr_s > 0):
            problems.append(f"TR {volume.tr_s}")
        if problems:
            outcome.failures.append(f"{what}: read, but {', '.join(problems)}")
    elapsed_s = time.perf_counter() - start
    outcome.slowest_s = max(outcome.slowest_s, elapsed_s)
    if elapsed_s > PER_CALL_LIMIT_S:
        outcome.failures.append(f"{what}: took {elapsed_s:.2f} s")


def run_fuzz(sources: list[Source], n_mutations: int, seed: int, folder: Path) -> Outcome:
    """Apply ``n_mutations`` seeded mutations, spread over ``sources``, and read each result."""
    rng = np.random.default_rng(seed)
    outcome = Outcome()
    for i in range(n_mutations):
        source = sources[i % len(sources)]
        path = folder / source.name
        sidecar_path = path.with_suffix(".json")
        try:
            if source.kind == "dicom":
                raw, what = mutate_dicom(source.raw, rng)
                sidecar = None
            else:
                raw, sidecar, what = mutate_nifti(source.raw, source.sidecar, rng)
        except Exception as err:  # a mutation pydicom cannot write is skipped, not a reader failure
            outcome.counts["mutation not writable"] += 1
            outcome.counts[f"  ({type(err).__name__})"] += 1
            continue
        path.write_bytes(raw)
        if sidecar is not None:
            sidecar_path.write_bytes(sidecar)
        elif sidecar_path.exists():
            sidecar_path.unlink()
        check_read(path, source.index_hint, f"#{i} {source.name}: {what}", outcome, source.kind == "dicom")
    return outcome


def assert_contract(outcome: Outcome, n_mutations: int) -> None:
    shown = "\n".join(outcome.failures[:15])
    assert not outcome.failures, f"{len(outcome.failures)} of {n_mutations} mutations broke the contract:\n{shown}"
    # The mix must exercise both errors and successful reads, or the mutations are too weak or too strong.
    assert outcome.counts["VolumeError"] > n_mutations // 10
    assert outcome.counts["IncompleteVolumeError"] > n_mutations // 20
    assert outcome.counts["read"] > n_mutations // 20


def test_fuzzed_phantom_files_raise_only_project_errors(tmp_path):
    sources = phantom_sources(np.random.default_rng(FUZZ_SEED))
    outcome = run_fuzz(sources, FUZZ_N, FUZZ_SEED, tmp_path)
    print(f"{FUZZ_N} phantom mutations: {dict(outcome.counts)}; slowest read {1e3 * outcome.slowest_s:.1f} ms")
    assert_contract(outcome, FUZZ_N)


def test_fuzzed_real_files_raise_only_project_errors(real_dicom_dir, tmp_path):
    sources = real_sources(real_dicom_dir)
    outcome = run_fuzz(sources, FUZZ_N, FUZZ_SEED + 1, tmp_path)
    print(f"{FUZZ_N} real-file mutations: {dict(outcome.counts)}; slowest read {1e3 * outcome.slowest_s:.1f} ms")
    assert_contract(outcome, FUZZ_N)


# ---- the defects the fuzzing found, one by one ----------------------------------------------------


def _edited(raw: bytes, edit: Callable[[pydicom.Dataset], None]) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(raw))
    edit(ds)
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


@pytest.fixture
def phantom_files(tmp_path) -> dict[str, Source]:
    return {s.name: s for s in phantom_sources(np.random.default_rng(3))}


def test_malformed_pixel_spacing_names_the_file_and_the_tag(tmp_path, phantom_files):
    mosaic = phantom_files["phantom_mosaic_FH.dcm"].raw
    path = tmp_path / "spacing.dcm"
    bad_spacing = _raw_element(0x00280030, "DS", b"3Q0\\3.0")
    path.write_bytes(_edited(mosaic, lambda ds: ds.__setitem__(0x00280030, bad_spacing)))
    with pytest.raises(VolumeError, match=r"spacing\.dcm: PixelSpacing \(0028,0030\): expected 2 finite numbers"):
        read_volume(path)

    def shared_spacing(ds):
        measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        measures[0x00280030] = _raw_element(0x00280030, "DS", b"3Q0\\3.0")

    path = tmp_path / "enhanced_spacing.dcm"
    path.write_bytes(_edited(phantom_files["phantom_enhanced_FH.dcm"].raw, shared_spacing))
    with pytest.raises(
        VolumeError,
        match=r"enhanced_spacing\.dcm: SharedFunctionalGroupsSequence > PixelMeasuresSequence > PixelSpacing "
        r"\(0028,0030\): expected 2 finite numbers",
    ):
        read_volume(path)


def test_real_mosaic_with_a_malformed_orientation_names_the_tag(real_dicom_dir, tmp_path):
    raw = (real_dicom_dir / "skyra-mosaic-rtcloud" / "001_000013_000003.dcm").read_bytes()
    path = tmp_path / "orientation.dcm"
    path.write_bytes(_edited(raw, lambda ds: ds.__setitem__(0x00200037, _raw_element(0x00200037, "DS", b"1\\0\\0"))))
    with pytest.raises(VolumeError, match=r"orientation\.dcm: ImageOrientationPatient \(0020,0037\): expected 6"):
        read_volume(path)


def test_unknown_vr_names_the_file_and_the_tag(tmp_path, phantom_files):
    raw = bytearray(phantom_files["phantom_mosaic_FH.dcm"].raw)
    header = raw.find(b"\x20\x00\x12\x00IS")  # (0020,0012) AcquisitionNumber
    raw[header + 4 : header + 6] = b"MS"  # pydicom: NotImplementedError, unknown VR
    path = tmp_path / "vr.dcm"
    path.write_bytes(bytes(raw))
    with pytest.raises(VolumeError, match=r"vr\.dcm: AcquisitionNumber \(0020,0012\): cannot decode the value"):
        read_volume(path)


def test_pixel_data_shorter_than_the_image_is_an_error_not_incomplete(tmp_path, phantom_files):
    raw = phantom_files["phantom_enhanced_FH.dcm"].raw
    path = tmp_path / "rows.dcm"
    path.write_bytes(_edited(raw, lambda ds: setattr(ds, "Rows", int(ds.Rows) * 2)))
    with pytest.raises(VolumeError, match=r"rows\.dcm: PixelData \(7FE0,0010\): the element holds") as error:
        read_volume(path)
    assert not isinstance(error.value, IncompleteVolumeError)


@pytest.mark.parametrize("name", ["phantom_mosaic_FH.dcm", "phantom_enhanced_FH.dcm"])
def test_rescale_that_overflows_is_rejected_at_read_time(tmp_path, phantom_files, name):
    def huge_slope(ds):
        holder = ds
        if "SharedFunctionalGroupsSequence" in ds:
            holder = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
        holder[0x00281053] = _raw_element(0x00281053, "DS", b"1e38")

    path = tmp_path / name
    path.write_bytes(_edited(phantom_files[name].raw, huge_slope))
    with pytest.raises(VolumeError, match=rf"{name}: \d+ non-finite voxels"):
        read_volume(path)


def test_nifti_full_of_nan_is_rejected_at_read_time(tmp_path, phantom_files):
    source = phantom_files["vol_00002.nii"]
    path = tmp_path / source.name
    voxels = np.full((len(source.raw) - 352) // 4, np.nan, dtype="<f4")
    path.write_bytes(source.raw[:352] + voxels.tobytes())
    path.with_suffix(".json").write_bytes(source.sidecar)
    with pytest.raises(VolumeError, match=rf"vol_00002\.nii: {voxels.size} non-finite voxels"):
        read_volume(path)
