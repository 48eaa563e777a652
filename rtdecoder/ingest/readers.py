"""Read one volume file, whatever its format: choose the reader and fill the common fields.

NIfTI goes to :mod:`rtdecoder.ingest.nifti`. A DICOM file is read once here (header and pixel
bytes), checked for completeness, and handed to :mod:`rtdecoder.ingest.enhanced` (multi-frame)
or :mod:`rtdecoder.ingest.mosaic` (Siemens MOSAIC); the index, series, TR of a classic file and
the acquisition time are common DICOM attributes and are read here.

A file caught while the scanner is still writing it raises :class:`IncompleteVolumeError`, so
the watcher can look again later; anything else that is wrong raises :class:`VolumeError`.
"""

from __future__ import annotations

import logging
import os
import struct
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException
from pydicom.valuerep import DA, DT, TM

from rtdecoder.errors import IncompleteVolumeError, VolumeError
from rtdecoder.ingest.enhanced import is_enhanced, stack_frames
from rtdecoder.ingest.mosaic import is_mosaic, mosaic_layout, untile_mosaic
from rtdecoder.ingest.nifti import is_nifti, read_nifti
from rtdecoder.ingest.volume import Volume

logger = logging.getLogger(__name__)

_DICOM_MAGIC_END = 132  # 128-byte preamble, then b"DICM"
_DEFER_BYTES = 64 * 1024  # elements larger than this are read only when used
_PIXEL_DATA_TAG = 0x7FE00010
_UNCOMPRESSED = {
    "1.2.840.10008.1.2": "<",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1": "<",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2": ">",  # Explicit VR Big Endian (retired)
}


def read_volume(path: str | Path, index_hint: int | None = None) -> Volume:
    """Read one volume from a Siemens MOSAIC, enhanced DICOM or NIfTI file.

    Parameters
    ----------
    path : str or Path
        The file. NIfTI by suffix (``.nii``, ``.nii.gz``); anything else must be DICOM.
    index_hint : int, optional
        The 0-based volume index when the file does not carry one (3D NIfTI whose name does
        not end in a number), or which volume of a growing 4D NIfTI to read. DICOM files
        carry their own (``AcquisitionNumber - 1``, else ``InstanceNumber - 1``) and ignore it.

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
        The file cannot be read as a volume; the message names the file and what is wrong.
    """
    path = Path(path)
    if is_nifti(path):
        volume = read_nifti(path, index_hint)
    else:
        volume = _read_dicom_volume(path)
    try:
        volume.times.written_s = path.stat().st_mtime
    except OSError as err:
        raise VolumeError(f"{path}: cannot read the file: {err.strerror}") from None
    return volume


def _read_dicom_volume(path: Path) -> Volume:
    ds, pixels = _read_dicom(path)
    if is_enhanced(ds):
        stack = stack_frames(ds, pixels, path)
        data, affine, slice_times_s, tr_s = stack.data, stack.affine, stack.slice_times_s, stack.tr_s
        acquired_s = _acquired_s(ds, path)
        if acquired_s is None:
            acquired_s = stack.first_frame_s
    elif is_mosaic(ds):
        layout = mosaic_layout(ds, path)
        data = _rescale_in_place(ds, untile_mosaic(pixels[0], layout))
        affine, slice_times_s, tr_s = layout.affine, layout.slice_times_s, _tr_s(ds, path)
        acquired_s = _acquired_s(ds, path)
    else:
        raise VolumeError(
            f"{path}: ImageType {list(ds.get('ImageType', []))}: expected a Siemens MOSAIC or an "
            "enhanced multi-frame image (one file per slice is not supported)"
        )
    volume = Volume(
        data=data,
        affine=affine,
        tr_s=tr_s,
        index=_index(ds, path),
        slice_times_s=slice_times_s,
        series=str(ds.get("SeriesInstanceUID") or ds.get("SeriesNumber") or path.parent.name),
        source=path,
    )
    volume.times.acquired_s = acquired_s
    return volume


def _read_dicom(path: Path) -> tuple[Dataset, np.ndarray]:
    """Parse a DICOM file and return its header and stored pixels (n_frames, rows, cols).

    Large elements (the pixel data, the CSA series header) are not read with the header: the
    pixels go from the file straight into their array, one copy fewer at every volume.
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
            try:
                with warnings.catch_warnings():
                    # A file cut inside a text element makes pydicom warn about its encoding.
                    warnings.simplefilter("ignore", UserWarning)
                    ds = pydicom.dcmread(handle, defer_size=_DEFER_BYTES)
            except (OSError, EOFError, struct.error, ValueError, BytesLengthException) as err:
                # A preamble followed by a header that breaks off is a file still being written.
                raise IncompleteVolumeError(f"{path}: not complete yet: header cut off ({err})") from None
            element = ds.get_item(_PIXEL_DATA_TAG, keep_deferred=True)
            if element is None:  # checked first: a header cut short lacks the pixel attributes
                raise IncompleteVolumeError(f"{path}: not complete yet: no PixelData element yet")
            dtype, shape = _pixel_layout(ds, path)
            return ds, _pixels(element, handle, file_bytes, dtype, shape, path)
    except OSError as err:
        raise VolumeError(f"{path}: cannot read the file: {err.strerror}") from None


def _pixel_layout(ds: Dataset, path: Path) -> tuple[np.dtype, tuple[int, int, int]]:
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2.1"))
    if syntax not in _UNCOMPRESSED:
        raise VolumeError(
            f"{path}: TransferSyntaxUID {syntax}: expected uncompressed pixel data "
            "(implicit/explicit VR little endian)"
        )
    bits = int(ds.get("BitsAllocated", 0))
    if bits not in (8, 16, 32) or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise VolumeError(
            f"{path}: BitsAllocated/SamplesPerPixel: expected 8, 16 or 32 bits, one sample "
            f"(got {bits}, {ds.get('SamplesPerPixel')})"
        )
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    dtype = np.dtype(f"{_UNCOMPRESSED[syntax]}{'i' if signed else 'u'}{bits // 8}")
    shape = (int(ds.get("NumberOfFrames") or 1), int(ds.get("Rows", 0)), int(ds.get("Columns", 0)))
    return dtype, shape


def _pixels(
    element, handle, file_bytes: int, dtype: np.dtype, shape: tuple[int, int, int], path: Path
) -> np.ndarray:
    count = int(np.prod(shape))
    expected_bytes = count * dtype.itemsize
    if element.value is not None:  # small enough to have been read with the header
        buffer = element.value
        if len(buffer) < expected_bytes:
            raise IncompleteVolumeError(
                f"{path}: not complete yet: PixelData has {len(buffer)} of {expected_bytes} bytes"
            )
        return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)
    available = file_bytes - element.value_tell
    if available < expected_bytes:
        raise IncompleteVolumeError(
            f"{path}: not complete yet: PixelData has {max(available, 0)} of {expected_bytes} bytes"
        )
    handle.seek(element.value_tell)
    return np.fromfile(handle, dtype=dtype, count=count).reshape(shape)


def _rescale_in_place(ds: Dataset, data: np.ndarray) -> np.ndarray:
    slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
    if slope != 1.0:
        data *= np.float32(slope)
    if intercept != 0.0:
        data += np.float32(intercept)
    return data


def _index(ds: Dataset, path: Path) -> int:
    for keyword in ("AcquisitionNumber", "InstanceNumber"):
        value = ds.get(keyword)
        if value not in (None, "") and int(value) >= 1:
            return int(value) - 1
    raise VolumeError(f"{path}: AcquisitionNumber/InstanceNumber: expected a number >= 1 (both missing)")


def _tr_s(ds: Dataset, path: Path) -> float:
    tr_ms = ds.get("RepetitionTime")
    if tr_ms in (None, "") or float(tr_ms) <= 0:
        raise VolumeError(f"{path}: RepetitionTime: expected a positive TR in ms (got {tr_ms!r})")
    return float(tr_ms) / 1000.0


def _acquired_s(ds: Dataset, path: Path) -> float | None:
    """Epoch seconds of the acquisition; naive times are the scanner's local time."""
    try:
        if ds.get("AcquisitionDateTime"):
            when = DT(str(ds.AcquisitionDateTime))
        elif ds.get("AcquisitionDate") and ds.get("AcquisitionTime"):
            when = datetime.combine(DA(str(ds.AcquisitionDate)), TM(str(ds.AcquisitionTime)))
        else:
            return None
    except ValueError:
        raise VolumeError(
            f"{path}: AcquisitionDateTime / AcquisitionDate+AcquisitionTime: expected DICOM "
            "DT/DA/TM values"
        ) from None
    offset = ds.get("TimezoneOffsetFromUTC")
    if when.tzinfo is None and offset:
        text = str(offset)
        sign = -1 if text.startswith("-") else 1
        minutes = int(text[-4:-2]) * 60 + int(text[-2:])
        when = when.replace(tzinfo=timezone(sign * timedelta(minutes=minutes)))
    return when.timestamp()
