"""Read one volume file, whatever its format: choose the reader and fill the common fields.

NIfTI goes to :mod:`rtdecoder.ingest.nifti`. A DICOM file is read here (header and pixel
bytes), checked for completeness, and handed to :mod:`rtdecoder.ingest.enhanced` (multi-frame)
or :mod:`rtdecoder.ingest.mosaic` (Siemens MOSAIC); the index, series, TR of a classic file and
the acquisition time are common DICOM attributes and are read here. pydicom parses an enhanced
file's header only up to its per-frame functional groups; those are read from their bytes (the
fast path), and only a file that path does not expect is parsed again, whole, by pydicom.

A file caught while the scanner is still writing it raises :class:`IncompleteVolumeError`, so
the watcher can look again later; anything else that is wrong raises :class:`VolumeError`, and
so does a volume with NaN or infinite voxels. Header values are read through
:mod:`rtdecoder.ingest.dicom_fields`, so a malformed one is named by keyword and tag; nothing
but rtdecoder's own errors leaves :func:`read_volume`.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import re
import threading
import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.filereader import read_partial
from pydicom.valuerep import DA, DT, TM

from rtdecoder.errors import DecoderError, IncompleteVolumeError, VolumeError
from rtdecoder.ingest.dicom_fields import (
    UNDEFINED_LENGTH,
    MalformedBytesError,
    RawWalker,
    get_integer,
    get_number,
    get_strings,
    get_text,
    get_value,
    label,
)
from rtdecoder.ingest.enhanced import (
    FUNCTIONAL_GROUP_SEQUENCES,
    PER_FRAME_TAG,
    FrameFields,
    frame_fields_from_raw,
    is_enhanced,
    stack_frames,
)
from rtdecoder.ingest.mosaic import is_mosaic, mosaic_layout, untile_mosaic
from rtdecoder.ingest.nifti import is_nifti, read_nifti
from rtdecoder.ingest.volume import Volume

logger = logging.getLogger(__name__)

_DICOM_MAGIC_END = 132  # 128-byte preamble, then b"DICM"
_DEFER_BYTES = 64 * 1024  # elements larger than this are read only when used
_PIXEL_DATA_TAG = 0x7FE00010
_THREAD_BUFFERS = threading.local()  # per-thread buffer for the enhanced fast path's bytes
_MIN_VOXEL_MM3 = 1e-6  # a smaller voxel volume means a degenerate (singular) affine
_UTC_OFFSET = re.compile(r"(?P<sign>[+-]?)(?P<hours>\d{2})(?P<minutes>\d{2})")
_UNCOMPRESSED = {
    "1.2.840.10008.1.2": "<",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1": "<",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2": ">",  # Explicit VR Big Endian (retired)
}


def read_volume(path: str | Path, index_hint: int | None = None, default_tr_s: float | None = None) -> Volume:
    """Read one volume from a Siemens MOSAIC, enhanced DICOM or NIfTI file.

    Parameters
    ----------
    path : str or Path
        The file. NIfTI by suffix (``.nii``, ``.nii.gz``); anything else must be DICOM.
    index_hint : int, optional
        The 0-based volume index when the file does not carry one (3D NIfTI whose name does
        not end in a number), or which volume of a growing 4D NIfTI to read. DICOM files
        carry their own (``AcquisitionNumber - 1``, else ``InstanceNumber - 1``) and ignore it.
        A NIfTI index from a generic number in the file name is that number as written
        (``Volume.index_source == "name"``): :class:`rtdecoder.ingest.ordering.RunNumbering`
        maps it to the run's 0-based index.
    default_tr_s : float, optional
        The run's TR in s, for a NIfTI file that carries none (``Volume.tr_source == "default"``).

    Returns
    -------
    Volume
        ``data`` float32 of shape (nx, ny, nz) with its RAS+ affine, TR, slice times along the
        third axis, ``times.acquired_s`` (scanner clock, epoch s) and ``times.written_s`` (file
        modification time, epoch s).

    Raises
    ------
    IncompleteVolumeError
        The file is not completely written yet; read it again later.
    VolumeError
        The file cannot be read as a volume, or it has NaN or infinite voxels; the message names
        the file and what is wrong (for a malformed DICOM value: its keyword, tag and what was
        expected).
    """
    path = Path(path)
    try:
        if is_nifti(path):
            volume = read_nifti(path, index_hint, default_tr_s=default_tr_s)
        else:
            volume = _read_dicom_volume(path)
    except DecoderError:
        raise
    except Exception as err:  # a case no check foresaw: still one error that names the file
        logger.debug("unexpected error reading %s", path, exc_info=True)
        raise VolumeError(f"{path}: cannot read the volume: unexpected {type(err).__name__}: {err}") from err
    _check_volume(volume, path)
    try:
        volume.times.written_s = path.stat().st_mtime
    except OSError as err:
        raise VolumeError(f"{path}: cannot read the file: {err.strerror}") from None
    return volume


def _check_volume(volume: Volume, path: Path) -> None:
    """Reject a volume that is empty, has NaN or infinite voxels (a bad rescale, a NIfTI full of
    NaN), or a geometry or TR that is not finite, before it reaches motion correction and the GLM.

    Raises
    ------
    VolumeError
        Naming the file and how many voxels are not finite, or what is wrong with the shape,
        affine or TR.
    """
    data = volume.data
    if data.ndim != 3 or min(data.shape) < 1:
        raise VolumeError(
            f"{path}: data: expected a 3D volume with at least one voxel per axis (got shape {data.shape})"
        )
    affine = np.asarray(volume.affine, dtype=float)
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.add.reduce(data, axis=None)  # one pass; finite unless a voxel is not (or it overflows)
        finite_affine = affine.shape == (4, 4) and bool(np.all(np.isfinite(affine)))
        determinant = float(np.linalg.det(affine[:3, :3])) if finite_affine else np.nan
    if not np.isfinite(total):
        n_bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if n_bad:
            raise VolumeError(
                f"{path}: {n_bad} non-finite voxels (NaN or infinite) of {data.size}: expected finite values "
                "(check the rescale slope/intercept or the exporter)"
            )
    if not (np.isfinite(determinant) and abs(determinant) > _MIN_VOXEL_MM3):
        raise VolumeError(
            f"{path}: affine: expected a finite, invertible voxel-to-world transform (got "
            f"{np.round(affine, 4).tolist()})"
        )
    if not (isinstance(volume.tr_s, numbers.Real) and math.isfinite(volume.tr_s) and volume.tr_s > 0):
        raise VolumeError(f"{path}: TR: expected a finite repetition time > 0 s (got {volume.tr_s!r})")


def _read_dicom_volume(path: Path, fast_enhanced: bool = True) -> Volume:
    """Read a MOSAIC or enhanced DICOM file into a volume.

    ``fast_enhanced=False`` reads an enhanced file's per-frame groups through pydicom even when
    the fast path could (for tests that compare the two).
    """
    read = _read_dicom(path, fast_enhanced)
    ds = read.ds
    if read.fields is not None or is_enhanced(ds, path):
        stack = stack_frames(ds, read.pixels, path, fields=read.fields)
        data, affine, slice_times_s, tr_s = stack.data, stack.affine, stack.slice_times_s, stack.tr_s
        acquired_s = _acquired_s(ds, path)
        if acquired_s is None:
            acquired_s = stack.first_frame_s
    elif is_mosaic(ds, path):
        layout = mosaic_layout(ds, path)
        data = _rescale_in_place(ds, untile_mosaic(read.pixels[0], layout), path)
        affine, slice_times_s, tr_s = layout.affine, layout.slice_times_s, _tr_s(ds, path)
        acquired_s = _acquired_s(ds, path)
    else:
        raise VolumeError(
            f"{path}: ImageType {get_strings(ds, 'ImageType', path)}: expected a Siemens MOSAIC or an "
            "enhanced multi-frame image (one file per slice is not supported)"
        )
    series = get_value(ds, "SeriesInstanceUID", path) or get_value(ds, "SeriesNumber", path) or path.parent.name
    volume = Volume(
        data=data,
        affine=affine,
        tr_s=tr_s,
        index=_index(ds, path),
        slice_times_s=slice_times_s,
        series=str(series),
        source=path,
    )
    volume.times.acquired_s = acquired_s
    return volume


@dataclass(frozen=True)
class _DicomRead:
    """A DICOM file's header, stored pixels (n_frames, rows, cols) and, when the fast enhanced
    path read them, its functional group values (then ``ds`` stops before the per-frame group)."""

    ds: Dataset
    pixels: np.ndarray
    fields: FrameFields | None = None


def _read_dicom(path: Path, fast_enhanced: bool = True) -> _DicomRead:
    """Parse a DICOM file and return its header and stored pixels (n_frames, rows, cols).

    Large elements (the pixel data, the CSA series header) are not read with the header: the
    pixels go from the file straight into their array, one copy fewer at every volume. An
    enhanced file's per-frame functional groups are read from their bytes when they can be
    (:func:`rtdecoder.ingest.enhanced.frame_fields_from_raw`), else the header is read again,
    whole, by pydicom.
    """
    try:
        with open(path, "rb") as handle:
            file_bytes = os.fstat(handle.fileno()).st_size
            if file_bytes < _DICOM_MAGIC_END:
                raise IncompleteVolumeError(f"{path}: not complete yet: {file_bytes} bytes, no DICOM header")
            handle.seek(128)
            if handle.read(4) != b"DICM":
                raise VolumeError(f"{path}: not a DICOM file: expected 'DICM' at byte 128")
            handle.seek(0)
            ds, stopped = _parse_header(handle, file_bytes, path, stop_at_per_frame=fast_enhanced)
            if stopped:
                fast = _read_enhanced_rest(ds, handle, path)
                if fast is not None:
                    return fast
                handle.seek(0)  # something unexpected: pydicom reads it all and names the problem
                ds, _ = _parse_header(handle, file_bytes, path, stop_at_per_frame=False)
            element = ds.get_item(_PIXEL_DATA_TAG, keep_deferred=True)
            if element is None:  # checked first: a header cut short lacks the pixel attributes
                raise IncompleteVolumeError(f"{path}: not complete yet: no PixelData element yet")
            dtype, shape = _pixel_layout(ds, path)
            return _DicomRead(ds, _pixels(element, handle, file_bytes, dtype, shape, path))
    except OSError as err:
        raise VolumeError(f"{path}: cannot read the file: {err.strerror}") from None


def _parse_header(handle, file_bytes: int, path: Path, stop_at_per_frame: bool) -> tuple[Dataset, bool]:
    """pydicom's parse of the header (large values deferred); whether it stopped before the
    per-frame functional groups, leaving ``handle`` at that element."""
    stopped: list[bool] = []

    def stop_when(tag, vr, length) -> bool:
        if tag == PER_FRAME_TAG:
            stopped.append(True)
            return True
        return False

    try:
        with warnings.catch_warnings():
            # A file cut inside a text element makes pydicom warn about its encoding.
            warnings.simplefilter("ignore", UserWarning)
            ds = read_partial(handle, stop_when=stop_when if stop_at_per_frame else None, defer_size=_DEFER_BYTES)
    except Exception as err:  # pydicom raises many types for bytes it cannot parse
        position = handle.tell()
        if position >= file_bytes:
            # It ran into the end of the file: a header that breaks off is a file still being written.
            raise IncompleteVolumeError(f"{path}: not complete yet: header cut off ({err})") from None
        raise VolumeError(
            f"{path}: malformed DICOM header: the element before byte {position} cannot be parsed "
            f"({type(err).__name__}: {err})"
        ) from None
    return ds, bool(stopped)


def _read_enhanced_rest(ds: Dataset, handle, path: Path) -> _DicomRead | None:
    """The fast enhanced path, from the per-frame group to the pixels; ``None`` to fall back."""
    dtype, shape = _pixel_layout(ds, path)  # first: it rejects what the walker cannot read (deflate)
    implicit_vr, little_endian = ds.original_encoding
    rest = _read_rest(handle)  # the per-frame group, then the pixel data: one read, no other copy
    walker = RawWalker(rest, little_endian, implicit_vr, FUNCTIONAL_GROUP_SEQUENCES)
    try:
        tag, vr, length, value_pos = walker.element(0)
        if tag != PER_FRAME_TAG or vr not in (None, b"SQ"):
            return None
        per_frame, pos = walker.items(value_pos, length)
        while True:  # on to the pixel data, past whatever lies between
            tag, vr, length, value_pos = walker.element(pos)
            if tag == _PIXEL_DATA_TAG:
                break
            if tag > _PIXEL_DATA_TAG:
                return None
            pos = walker.items(value_pos, length)[1] if length == UNDEFINED_LENGTH else value_pos + length
    except MalformedBytesError:
        return None
    if length == UNDEFINED_LENGTH:
        return None  # encapsulated pixel data: the full path says why it is not supported
    count = math.prod(shape)
    _check_pixel_bytes(length, len(rest) - value_pos, count * dtype.itemsize, path)
    fields = frame_fields_from_raw(ds, walker, per_frame, shape[0], path)
    if fields is None:
        return None
    pixels = np.frombuffer(rest, dtype=dtype, count=count, offset=value_pos).reshape(shape)
    return _DicomRead(ds, pixels, fields)


def _thread_buffer(n_bytes: int) -> memoryview:
    """``n_bytes`` of this thread's reusable read buffer.

    A fresh multi-megabyte buffer per volume costs more in page faults than the read itself. The
    view is valid until this thread's next read; the readers copy pixels out of it into the volume
    (converting to float32) before they return.
    """
    buffer = getattr(_THREAD_BUFFERS, "buffer", None)
    if buffer is None or len(buffer) < n_bytes:
        buffer = _THREAD_BUFFERS.buffer = bytearray(n_bytes)
    return memoryview(buffer)[:n_bytes]


def _read_rest(handle) -> memoryview:
    """The rest of the file from the handle's position, in this thread's read buffer."""
    view = _thread_buffer(max(os.fstat(handle.fileno()).st_size - handle.tell(), 0))
    return view[: handle.readinto(view)]


def _pixel_layout(ds: Dataset, path: Path) -> tuple[np.dtype, tuple[int, int, int]]:
    syntax = get_text(ds.file_meta, "TransferSyntaxUID", path) or "1.2.840.10008.1.2.1"
    if syntax not in _UNCOMPRESSED:
        raise VolumeError(
            f"{path}: TransferSyntaxUID {syntax}: expected uncompressed pixel data "
            "(implicit/explicit VR little endian)"
        )
    bits = get_integer(ds, "BitsAllocated", path) or 0
    samples = get_integer(ds, "SamplesPerPixel", path)
    if bits not in (8, 16, 32) or samples not in (None, 1):
        raise VolumeError(
            f"{path}: BitsAllocated/SamplesPerPixel: expected 8, 16 or 32 bits, one sample "
            f"(got {bits}, {samples})"
        )
    representation = get_integer(ds, "PixelRepresentation", path) or 0
    if representation not in (0, 1):
        raise VolumeError(
            f"{path}: {label('PixelRepresentation')}: expected 0 (unsigned) or 1 (signed) (got {representation})"
        )
    dtype = np.dtype(f"{_UNCOMPRESSED[syntax]}{'i' if representation == 1 else 'u'}{bits // 8}")
    shape = (
        get_integer(ds, "NumberOfFrames", path, minimum=1) or 1,
        _image_size(ds, "Rows", path),
        _image_size(ds, "Columns", path),
    )
    return dtype, shape


def _image_size(ds: Dataset, keyword: str, path: Path) -> int:
    value = get_integer(ds, keyword, path, minimum=1)
    if value is None:
        raise VolumeError(f"{path}: {label(keyword)}: missing; needed to size the pixel data")
    return value


def _check_pixel_bytes(declared_bytes: int | None, available_bytes: int, expected_bytes: int, path: Path) -> None:
    """A PixelData element shorter than the image needs is an error; a file cut inside it is
    not complete yet."""
    if declared_bytes is not None and declared_bytes < expected_bytes:
        raise VolumeError(
            f"{path}: PixelData (7FE0,0010): the element holds {declared_bytes} bytes, but NumberOfFrames x "
            f"Rows x Columns x BitsAllocated/8 needs {expected_bytes}"
        )
    if available_bytes < expected_bytes:
        raise IncompleteVolumeError(
            f"{path}: not complete yet: PixelData has {max(available_bytes, 0)} of {expected_bytes} bytes"
        )


def _pixels(
    element, handle, file_bytes: int, dtype: np.dtype, shape: tuple[int, int, int], path: Path
) -> np.ndarray:
    count = math.prod(shape)
    expected_bytes = count * dtype.itemsize
    declared_bytes = getattr(element, "length", None)
    if declared_bytes == UNDEFINED_LENGTH:
        raise VolumeError(f"{path}: PixelData (7FE0,0010): undefined length: expected native (uncompressed) pixels")
    if element.value is not None:  # small enough to have been read with the header
        buffer = element.value
        if not isinstance(buffer, bytes | bytearray):
            raise VolumeError(f"{path}: PixelData (7FE0,0010): expected bytes (got {type(buffer).__name__})")
        _check_pixel_bytes(declared_bytes, len(buffer), expected_bytes, path)
        return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)
    _check_pixel_bytes(declared_bytes, file_bytes - element.value_tell, expected_bytes, path)
    handle.seek(element.value_tell)
    return np.fromfile(handle, dtype=dtype, count=count).reshape(shape)


def _rescale_in_place(ds: Dataset, data: np.ndarray, path: Path) -> np.ndarray:
    slope, intercept = get_number(ds, "RescaleSlope", path), get_number(ds, "RescaleIntercept", path)
    slope = 1.0 if slope is None else slope
    intercept = 0.0 if intercept is None else intercept
    with np.errstate(over="ignore"):  # an overflow to inf is rejected, with its count, by _check_finite
        if slope != 1.0:
            data *= np.float32(slope)
        if intercept != 0.0:
            data += np.float32(intercept)
    return data


def _index(ds: Dataset, path: Path) -> int:
    for keyword in ("AcquisitionNumber", "InstanceNumber"):
        value = get_integer(ds, keyword, path)
        if value is not None and value >= 1:
            return value - 1
    raise VolumeError(f"{path}: AcquisitionNumber/InstanceNumber: expected a number >= 1 (both missing)")


def _tr_s(ds: Dataset, path: Path) -> float:
    tr_ms = get_number(ds, "RepetitionTime", path)
    if tr_ms is None or tr_ms <= 0:
        raise VolumeError(f"{path}: RepetitionTime: expected a positive TR in ms (got {tr_ms!r})")
    return tr_ms / 1000.0


def _acquired_s(ds: Dataset, path: Path) -> float | None:
    """Epoch seconds of the acquisition; naive times are the scanner's local time."""
    date_time = get_text(ds, "AcquisitionDateTime", path)
    date = time_of_day = None
    if not date_time:
        date, time_of_day = get_text(ds, "AcquisitionDate", path), get_text(ds, "AcquisitionTime", path)
    try:
        if date_time:
            when = DT(date_time)
        elif date and time_of_day:
            when = datetime.combine(DA(date), TM(time_of_day))
        else:
            return None
    except (ValueError, TypeError, OverflowError):
        raise VolumeError(
            f"{path}: AcquisitionDateTime / AcquisitionDate+AcquisitionTime: expected DICOM "
            "DT/DA/TM values"
        ) from None
    offset = get_text(ds, "TimezoneOffsetFromUTC", path)
    if when.tzinfo is None and offset:
        match = _UTC_OFFSET.fullmatch(offset.strip())
        if match is None or int(match["hours"]) > 14 or int(match["minutes"]) > 59:
            raise VolumeError(
                f"{path}: {label('TimezoneOffsetFromUTC')}: expected &HHMM, e.g. +0100 (got {offset!r})"
            )
        sign = -1 if match["sign"] == "-" else 1
        minutes = int(match["hours"]) * 60 + int(match["minutes"])
        when = when.replace(tzinfo=timezone(sign * timedelta(minutes=minutes)))
    try:
        return when.timestamp()
    except (ValueError, OverflowError, OSError):
        raise VolumeError(f"{path}: AcquisitionDateTime: out of range ({when})") from None
