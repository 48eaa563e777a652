"""NIfTI volumes: one 3D file per volume, or one 4D file that grows as volumes are appended.

Timing comes from a BIDS sidecar (same name, ``.json``) when there is one (``RepetitionTime``
and ``SliceTiming`` in s), else from the header (``pixdim[4]`` with its time unit;
``slice_code``, ``slice_duration`` and ``slice_dim`` for slice times). A 3D file's index is the
number at the end of its name (``run1_0007.nii`` is volume 7), else the caller's hint.

An uncompressed file is checked against its size, so a file still being written, or a 4D file
whose newest volume is only partly appended, is "not complete yet" rather than an error.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np

from rtdecoder.errors import IncompleteVolumeError, VolumeError
from rtdecoder.ingest.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_TIME_UNIT_S = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}
_TRAILING_NUMBER = re.compile(r"^(.*?)[_\-.]?(\d+)$")
_MIN_HEADER_BYTES = 348  # a NIfTI-1 header; shorter files cannot be parsed yet


def is_nifti(path: str | Path) -> bool:
    """Whether a file name has a NIfTI suffix (``.nii`` or ``.nii.gz``)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_nifti_series(path: str | Path) -> bool:
    """Whether a NIfTI file holds a 4D series (which may grow), judged from its header.

    Raises
    ------
    IncompleteVolumeError
        When the header cannot be read yet.
    """
    try:
        return len(nib.load(Path(path), mmap=False).shape) == 4
    except (EOFError, OSError, zlib.error, ValueError, nib.wrapstruct.WrapStructError,
            nib.filebasedimages.ImageFileError) as err:
        raise IncompleteVolumeError(f"{path}: not complete yet: header unreadable ({err})") from None


def read_nifti(path: str | Path, index_hint: int | None = None) -> Volume:
    """Read one volume from a 3D or growing 4D NIfTI file.

    Parameters
    ----------
    path : str or Path
        A ``.nii`` or ``.nii.gz`` file.
    index_hint : int, optional
        3D: the volume's 0-based index when the file name ends without a number.
        4D: which volume to read; ``None`` reads the newest complete one. A volume not written
        yet (or past ``dim[4]``, which some exporters raise as they append) is "not complete".

    Returns
    -------
    Volume
        ``data`` as stored (float32, scaled by ``scl_slope``/``scl_inter``) with nibabel's affine;
        ``times.acquired_s`` from the sidecar's ``AcquisitionDateTime`` when present.

    Raises
    ------
    IncompleteVolumeError
        When the file (or the requested volume of a 4D file) is not completely written yet.
    VolumeError
        When the file is not NIfTI, has no TR, or the requested 4D volume is past its length.
    """
    path = Path(path)
    compressed = path.name.lower().endswith(".gz")
    try:
        file_bytes = path.stat().st_size
    except OSError as err:
        raise VolumeError(f"{path}: cannot read the file: {err.strerror}") from None
    if not compressed and file_bytes < _MIN_HEADER_BYTES:
        raise IncompleteVolumeError(f"{path}: not complete yet: {file_bytes} bytes, header needs 348")
    try:
        image = nib.load(path, mmap=False)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise IncompleteVolumeError(f"{path}: not complete yet: header cut off ({err})") from None
    except Exception as err:  # nibabel raises several types for files that are not NIfTI
        raise VolumeError(f"{path}: not a readable NIfTI file: {err}") from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise VolumeError(f"{path}: expected a NIfTI-1 or NIfTI-2 image (got {type(image).__name__})")

    shape = image.shape
    if len(shape) < 3 or len(shape) > 4 or (len(shape) == 4 and shape[3] < 1):
        raise VolumeError(f"{path}: dim: expected a 3D or 4D image (got shape {shape})")
    n_declared = shape[3] if len(shape) == 4 else 1
    volume_bytes = int(np.prod(shape[:3])) * image.get_data_dtype().itemsize
    offset = int(image.dataobj.offset)  # the loaded header's vox_offset is reset to 0
    n_written = n_declared if compressed else (file_bytes - offset) // max(volume_bytes, 1)
    n_available = min(n_declared, n_written)

    if len(shape) == 4:
        t = n_available - 1 if index_hint is None else int(index_hint)
        if t < 0:
            raise IncompleteVolumeError(f"{path}: not complete yet: no volume written")
        if t >= n_available:
            # Some exporters raise dim[4] as they append, so a volume past it may still come.
            raise IncompleteVolumeError(
                f"{path}: not complete yet: volume {t} requested, {max(n_available, 0)} written "
                f"(dim[4] = {n_declared})"
            )
    elif n_available < 1:
        raise IncompleteVolumeError(
            f"{path}: not complete yet: {file_bytes} bytes, expected {offset + volume_bytes}"
        )

    try:
        data = (
            np.asarray(image.dataobj[..., t], dtype=np.float32)
            if len(shape) == 4
            else np.asarray(image.dataobj, dtype=np.float32)
        )
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise IncompleteVolumeError(f"{path}: not complete yet: data cut off ({err})") from None
    except (OSError, ValueError) as err:
        raise VolumeError(f"{path}: cannot read the voxel data: {err}") from None

    sidecar = _read_sidecar(path)
    stem = _stem(path)
    if len(shape) == 4:
        index, series = t, stem
    else:
        index, series = _index_from_name(stem, index_hint, path)
    volume = Volume(
        data=data,
        affine=np.asarray(image.affine, dtype=float),
        tr_s=_tr_s(image, sidecar, path),
        index=index,
        slice_times_s=_slice_times_s(image, sidecar, path),
        series=series,
        source=path,
    )
    volume.times.acquired_s = _acquired_s(sidecar, path)
    return volume


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _index_from_name(stem: str, index_hint: int | None, path: Path) -> tuple[int, str]:
    match = _TRAILING_NUMBER.match(stem)
    if match is not None:
        return int(match.group(2)), match.group(1)
    if index_hint is None:
        raise VolumeError(
            f"{path}: file name: expected a volume number at the end of a 3D file's name "
            "(e.g. run1_0007.nii), or an index hint"
        )
    return int(index_hint), stem


def _read_sidecar(path: Path) -> dict:
    sidecar = path.with_name(_stem(path) + ".json")
    if not sidecar.is_file():
        return {}
    try:
        payload = json.loads(sidecar.read_text())
    except json.JSONDecodeError as err:
        raise IncompleteVolumeError(f"{sidecar}: not complete yet: invalid JSON ({err})") from None
    except OSError as err:
        raise VolumeError(f"{sidecar}: cannot read the sidecar: {err.strerror}") from None
    if not isinstance(payload, dict):
        raise VolumeError(f"{sidecar}: expected a JSON object at the top level")
    return payload


def _tr_s(image: nib.Nifti1Image, sidecar: dict, path: Path) -> float:
    if "RepetitionTime" in sidecar:
        tr_s = float(sidecar["RepetitionTime"])
        if tr_s <= 0:
            raise VolumeError(f"{path}: sidecar RepetitionTime: expected seconds > 0 (got {tr_s})")
        return tr_s
    _, time_unit = image.header.get_xyzt_units()
    pixdim_t = float(image.header["pixdim"][4])
    if pixdim_t > 0 and time_unit in _TIME_UNIT_S:
        return pixdim_t * _TIME_UNIT_S[time_unit]
    raise VolumeError(
        f"{path}: pixdim[4]: expected the TR with a time unit in xyzt_units "
        f"(got {pixdim_t} {time_unit}), or RepetitionTime in a sidecar JSON"
    )


def _slice_times_s(image: nib.Nifti1Image, sidecar: dict, path: Path) -> np.ndarray | None:
    n_slices = image.shape[2]
    if "SliceTiming" in sidecar:
        times = np.asarray(sidecar["SliceTiming"], dtype=float)
        direction = sidecar.get("SliceEncodingDirection", "k")
        if direction not in ("k", "k-"):
            raise VolumeError(
                f"{path}: sidecar SliceEncodingDirection: expected 'k' or 'k-' (slices along the "
                f"third axis), got {direction!r}"
            )
        if times.shape != (n_slices,):
            raise VolumeError(
                f"{path}: sidecar SliceTiming: expected {n_slices} values (got {times.size})"
            )
        # BIDS lists times in slice-encoding order; "k-" runs from the last slice to the first.
        return times[::-1].copy() if direction == "k-" else times
    header = image.header
    if header.get_dim_info()[2] != 2 or not header["slice_code"] or header["slice_duration"] <= 0:
        return None
    try:
        times = np.asarray(header.get_slice_times(), dtype=float)
    except nib.spatialimages.HeaderDataError as err:
        raise VolumeError(f"{path}: slice_code/slice_duration: inconsistent ({err})") from None
    _, time_unit = header.get_xyzt_units()
    return times * _TIME_UNIT_S.get(time_unit, 1.0)


def _acquired_s(sidecar: dict, path: Path) -> float | None:
    text = sidecar.get("AcquisitionDateTime")
    if not text:
        return None
    try:
        return datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        raise VolumeError(
            f"{path}: sidecar AcquisitionDateTime: expected ISO 8601 (got {text!r})"
        ) from None
