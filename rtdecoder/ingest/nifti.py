"""NIfTI volumes as converters write them: one 3D file per volume, or one 4D file that grows.

Timing
------
The TR is, first that applies: the BIDS sidecar's ``RepetitionTime`` (same name, ``.json``, in s);
the header's ``pixdim[4]`` with its time unit in ``xyzt_units``; the run's TR given by the caller
as ``default_tr_s`` (``--tr-s`` / ``scanner.tr_s``). :attr:`Volume.tr_source` says which
(``"sidecar"``, ``"header"``, ``"default"``). Slice times come from the sidecar's ``SliceTiming``
(s, in ``SliceEncodingDirection`` order, ``"k"`` or ``"k-"``), else from the header's
``slice_code``, ``slice_duration`` and ``slice_dim``; the acquisition time from the sidecar's
``AcquisitionDateTime`` (ISO 8601 as BIDS writes it, or DICOM ``DT`` as some tools copy it).

The sidecar's fields are optional: one that cannot be used (``SliceTiming: []``, a date that is
neither ISO 8601 nor DICOM) is logged as a warning once per run and field, naming the file, the
field and what was expected, and the volume is kept without it. Only a field the volume cannot do
without is an error: ``RepetitionTime`` unreadable while the header has no TR.

Volume order
------------
A 4D file's volumes are numbered by their position in it (``index_source="volume"``). dicm2nii
(``ep2d_bold.nii``, ``ep2d_bold_s005.nii``) and dcm2niix (``5_ep2d_bold.nii``) write a run as one
such file, which may grow while the run goes on; its sidecar's ``AcquisitionNumber`` is the first
volume's and is not used. A 3D file's index is, first that applies:

1. its sidecar's ``AcquisitionNumber`` (DICOM numbering, from 1) minus 1 (``"sidecar"``); one
   sidecar copied beside every volume (the same number in all) is caught by
   :class:`rtdecoder.ingest.ordering.RunNumbering`, which numbers that run by its names instead;
2. its converter's naming scheme (:func:`parse_volume_name`):

   - SPM (``spm_dicom_convert``):
     ``<prefix><PatientID>-<series>-<acquisition>-<instance>[-<echo>].nii``, zero-padded to 4, 5,
     6 and 2 digits, e.g. ``fanon-0007-00002-000002-01.nii``. Index = acquisition - 1 (numbered
     from 1); series ``fanon-0007``, with ``-<echo>`` added for echoes after the first (``"spm"``).
   - dcm2niix's instance post-fix: ``<name>[_e<echo>]_i<instance>.nii`` (``_i00005``); index =
     instance - 1 (``"dcm2niix"``).
   - dcm2niix's post-fixes ``_e<echo>``, ``_ph``, ``_real``, ``_imaginary`` belong to the series,
     never to the volume number: ``run_00007_e2.nii`` is number 7 of series ``run_e2``.
   - any other name ending in a number: ``run1_0007.nii`` (series ``run1``), ``vol0000.nii.gz``
     (FSL's ``fslsplit``), ``ep2d_00001.nii`` (dcm2niix ``-f %p_%5r``, or dicm2nii's "SPM 3D"
     output). Whether such a run counts from 0 or from 1 only the run as a whole tells, so
     :func:`read_nifti` takes the number as it is (``"name"``) and
     :class:`rtdecoder.ingest.ordering.RunNumbering` decides each run's base from its first file.

3. the caller's ``index_hint`` (``"hint"``).

Completeness
------------
An uncompressed file is checked against its size, so a file still being written, or a 4D file
whose newest volume is only partly appended, is "not complete yet" rather than an error.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import re
import zlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.valuerep import DT

from rtdecoder.errors import ConfigError, IncompleteVolumeError, VolumeError
from rtdecoder.ingest.volume import Volume

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_TIME_UNIT_S = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}
_MIN_HEADER_BYTES = 348  # a NIfTI-1 header; shorter files cannot be parsed yet
_TR_HELP = "pass the run's TR (--tr-s, or scanner.tr_s in the config) to use it for files that carry none"

# spm_dicom_convert ('flat'): sprintf('%s%s-%.4d-%.5d-%.6d-%.2d', prefix, PatientID, SeriesNumber,
# AcquisitionNumber, InstanceNumber, EchoNumbers), then an optional coil (-%.3d) and GE image type.
# PatientID keeps only letters and digits, which is what makes the pattern safe to recognise.
_SPM_NAME = re.compile(
    r"^(?P<who>[A-Za-z0-9]+)-(?P<series>\d{4,})-(?P<acquisition>\d{5,})-(?P<instance>\d{6,})"
    r"(?:-(?P<echo>\d{2}))?(?P<extra>(?:-\d{3})?(?:-(?:Phase|Real|Imag))?)$"
)
# dcm2niix appends _e<echo>, then _i%05d (images it could not stack), then the image type.
_DCM2NIIX_TYPE = r"(?:_imaginary|_fieldmaphz|_real|_ph(?:Mag)?)?"
_DCM2NIIX_INSTANCE = re.compile(rf"^(?P<body>.+?)_i(?P<instance>\d{{5,}})(?P<post>{_DCM2NIIX_TYPE})$")
_DCM2NIIX_POSTFIX = re.compile(rf"^(?P<body>.*?)(?P<post>(?:_e\d{{1,2}})?{_DCM2NIIX_TYPE})$")
_TRAILING_NUMBER = re.compile(r"^(?P<series>.*?)[_\-.]?(?P<number>\d+)$")
_SCHEME_NAMES = {"spm": "SPM", "dcm2niix": "dcm2niix"}

# (folder, series, field) already warned about: an unusable sidecar field is usually the same in
# every sidecar of a run, and one warning per run says it without flooding the log at every TR.
_warned: set[tuple[str, str, str]] = set()


@dataclass(frozen=True)
class VolumeName:
    """What a 3D NIfTI file's name says about its volume (see the module docstring).

    Attributes
    ----------
    scheme : {"spm", "dcm2niix", "name", "none"}
        The naming scheme recognised; ``"none"`` when the name carries no volume number.
    series : str
        The run the name belongs to (the name without its volume number).
    number : int or None
        The volume number as written in the name.
    first_number : int or None
        The number the converter gives a run's first volume (1 for SPM and dcm2niix); ``None``
        for a generic number, whose base only the run as a whole tells.
    field : str
        Which part of the name holds the number, for messages.
    """

    scheme: str
    series: str
    number: int | None
    first_number: int | None
    field: str


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


def parse_volume_name(path: str | Path) -> VolumeName:
    """Recognise a converter's naming scheme in a 3D NIfTI file name; the name alone, no file read.

    Parameters
    ----------
    path : str or Path
        The file (its folder is ignored), with or without the ``.nii``/``.nii.gz`` suffix.

    Returns
    -------
    VolumeName

    Examples
    --------
    >>> parse_volume_name("fanon-0007-00002-000002-01.nii")
    VolumeName(scheme='spm', series='fanon-0007', number=2, first_number=1, field='SPM acquisition number')
    >>> parse_volume_name("run_00007_e2.nii.gz")
    VolumeName(scheme='name', series='run_e2', number=7, first_number=None, field='number at the end')
    """
    stem = _stem(Path(path))
    spm = _SPM_NAME.match(stem)
    if spm is not None:
        series = f"{spm['who']}-{spm['series']}"
        if spm["echo"] is not None and int(spm["echo"]) != 1:
            series += f"-{spm['echo']}"  # echoes are separate runs for the decoder; never mix them
        return VolumeName("spm", series + spm["extra"], int(spm["acquisition"]), 1, "SPM acquisition number")
    instance = _DCM2NIIX_INSTANCE.match(stem)
    if instance is not None:
        return VolumeName(
            "dcm2niix", instance["body"] + instance["post"], int(instance["instance"]), 1,
            "dcm2niix _i instance number",
        )
    postfix = _DCM2NIIX_POSTFIX.match(stem)  # always matches (both groups may be empty)
    trailing = _TRAILING_NUMBER.match(postfix["body"])
    if trailing is not None:
        return VolumeName(
            "name", trailing["series"] + postfix["post"], int(trailing["number"]), None, "number at the end"
        )
    return VolumeName("none", stem, None, None, "")


def read_nifti(path: str | Path, index_hint: int | None = None, default_tr_s: float | None = None) -> Volume:
    """Read one volume from a 3D or growing 4D NIfTI file.

    Parameters
    ----------
    path : str or Path
        A ``.nii`` or ``.nii.gz`` file.
    index_hint : int, optional
        3D: the volume's 0-based index when neither the sidecar nor the file name give one.
        4D: which volume to read; ``None`` reads the newest complete one. A volume not written
        yet (or past ``dim[4]``, which some exporters raise as they append) is "not complete".
    default_tr_s : float, optional
        The run's TR in s, taken when neither the sidecar nor the header carry one
        (``tr_source="default"``).

    Returns
    -------
    Volume
        ``data`` as stored (float32 of shape (nx, ny, nz), scaled by ``scl_slope``/``scl_inter``)
        with nibabel's affine; ``tr_source`` and ``index_source`` say where the TR and the index
        came from; ``times.acquired_s`` from the sidecar's ``AcquisitionDateTime`` when usable.
        An index from a generic number in the name (``index_source="name"``) is that number as
        written: :class:`rtdecoder.ingest.ordering.RunNumbering` maps it to the run's 0-based index.

    Raises
    ------
    IncompleteVolumeError
        When the file (or the requested volume of a 4D file) is not completely written yet.
    VolumeError
        When the file is not NIfTI, has no TR and none is given, carries a converter's volume
        number below 1, or the requested 4D volume is past its length.
    ValueError
        When ``default_tr_s`` is not a positive number (ConfigError).
    """
    if default_tr_s is not None and not (math.isfinite(default_tr_s) and default_tr_s > 0):
        raise ConfigError(
            f"default_tr_s: expected the run's TR in seconds > 0 (--tr-s / scanner.tr_s) (got {default_tr_s})"
        )
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
    if len(shape) == 4:
        index, index_source, series = t, "volume", _stem(path)
    else:
        index, index_source, series = _index_3d(path, sidecar, index_hint)
    tr_s, tr_source = _tr_s(image, sidecar, path, series, default_tr_s)
    volume = Volume(
        data=data,
        affine=np.asarray(image.affine, dtype=float),
        tr_s=tr_s,
        index=index,
        slice_times_s=_slice_times_s(image, sidecar, path, series),
        series=series,
        source=path,
        tr_source=tr_source,
        index_source=index_source,
    )
    volume.times.acquired_s = _acquired_s(sidecar, path, series)
    return volume


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _index_3d(path: Path, sidecar: dict, index_hint: int | None) -> tuple[int, str, str]:
    """A 3D file's (index, index_source, series), in the order of the module docstring."""
    name = parse_volume_name(path)
    sidecar_number = _sidecar_int(sidecar, "AcquisitionNumber", path, name.series)
    if sidecar_number is not None:
        return sidecar_number - 1, "sidecar", name.series
    if name.number is None:
        if index_hint is None:
            raise VolumeError(
                f"{path}: file name: expected a volume number at the end of a 3D file's name "
                "(e.g. run1_0007.nii), an AcquisitionNumber in its sidecar JSON, or an index hint"
            )
        return int(index_hint), "hint", name.series
    if name.first_number is None:
        return name.number, "name", name.series
    if name.number < name.first_number:
        raise VolumeError(
            f"{path}: file name ({name.field}): expected a number >= {name.first_number}, as "
            f"{_SCHEME_NAMES[name.scheme]} numbers a run's volumes from {name.first_number} (got {name.number}); "
            "rename the file, or give it a sidecar JSON with its AcquisitionNumber (from 1)"
        )
    return name.number - name.first_number, name.scheme, name.series


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


def _warn_once(path: Path, series: str, field: str, message: str) -> None:
    key = (str(path.parent), series, field)
    if key in _warned:
        logger.debug("%s", message)
        return
    _warned.add(key)
    logger.warning("%s (said once for series %r)", message, series)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _finite_float(value: object) -> float | None:
    """The value as a finite float (JSON numbers, or numbers written as strings), else None."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _sidecar_int(sidecar: dict, field: str, path: Path, series: str) -> int | None:
    """A sidecar's DICOM-style number (an integer >= 1), or None (absent, or unusable: warned)."""
    value = sidecar.get(field)
    if value is None:
        return None
    number = _finite_float(value)
    if number is not None and number == int(number) and number >= 1:
        return int(number)
    _warn_once(
        path, series, field,
        f"{path}: sidecar {field}: expected an integer >= 1 (DICOM numbering) (got {_shown(value)}); "
        "ignored, the volume number is taken from the file name",
    )
    return None


def _time_unit(image: nib.Nifti1Image) -> str:
    """The header's time unit (``xyzt_units``), or ``"unknown"`` for a code NIfTI does not define."""
    try:
        return image.header.get_xyzt_units()[1]
    except KeyError:  # nibabel raises on codes outside the standard's table; the TR is then not in the header
        return "unknown"


def _header_tr_s(image: nib.Nifti1Image) -> float | None:
    time_unit = _time_unit(image)
    pixdim_t = float(image.header["pixdim"][4])
    # Without a time unit pixdim[4] may be s or ms (or nibabel's placeholder 1), so it is no TR.
    if pixdim_t > 0 and math.isfinite(pixdim_t) and time_unit in _TIME_UNIT_S:
        return pixdim_t * _TIME_UNIT_S[time_unit]
    return None


def _tr_s(
    image: nib.Nifti1Image, sidecar: dict, path: Path, series: str, default_tr_s: float | None
) -> tuple[float, str]:
    header_tr_s = _header_tr_s(image)
    time_unit = _time_unit(image)
    header_says = f"pixdim[4] = {float(image.header['pixdim'][4]):g} {time_unit}"
    value = sidecar.get("RepetitionTime")
    if value is not None:
        tr_s = _finite_float(value)
        if tr_s is not None and tr_s > 0:
            return tr_s, "sidecar"
        expected = f"sidecar RepetitionTime: expected the TR as a number of seconds > 0 (got {_shown(value)})"
        if header_tr_s is None:
            # The file says it carries its TR but it cannot be read: not a case for the default.
            raise VolumeError(f"{path}: {expected}, and the header has no TR ({header_says})")
        _warn_once(path, series, "RepetitionTime", f"{path}: {expected}; the header's TR {header_tr_s:g} s is used")
        return header_tr_s, "header"
    if header_tr_s is not None:
        return header_tr_s, "header"
    if default_tr_s is not None:
        key = (str(path.parent), series, "default TR")
        if key not in _warned:
            _warned.add(key)
            logger.info(
                "%s: no TR in the file (%s, no RepetitionTime in a sidecar); series %r takes the run's TR %g s",
                path, header_says, series, default_tr_s,
            )
        return float(default_tr_s), "default"
    raise VolumeError(
        f"{path}: pixdim[4]: expected the TR with a time unit in xyzt_units (got {header_says}), "
        f"or RepetitionTime in a sidecar JSON; {_TR_HELP}"
    )


def _slice_times_s(image: nib.Nifti1Image, sidecar: dict, path: Path, series: str) -> np.ndarray | None:
    n_slices = image.shape[2]
    value = sidecar.get("SliceTiming")
    if value is not None:
        times = _sidecar_slice_times_s(value, sidecar.get("SliceEncodingDirection", "k"), n_slices, path, series)
        if times is not None:
            return times
    header = image.header
    if header.get_dim_info()[2] != 2 or not header["slice_code"] or header["slice_duration"] <= 0:
        return None
    try:
        times = np.asarray(header.get_slice_times(), dtype=float)
    except nib.spatialimages.HeaderDataError as err:
        raise VolumeError(f"{path}: slice_code/slice_duration: inconsistent ({err})") from None
    return times * _TIME_UNIT_S.get(_time_unit(image), 1.0)


def _sidecar_slice_times_s(
    value: object, direction: object, n_slices: int, path: Path, series: str
) -> np.ndarray | None:
    """The sidecar's slice times along the third axis, s; None (warned) when they cannot be used."""
    numbers = [_finite_float(v) for v in value] if isinstance(value, list) else [None]
    fallback = "ignored, slice times from the header if it has them"
    if not numbers or any(n is None or n < 0 for n in numbers):
        _warn_once(
            path, series, "SliceTiming",
            f"{path}: sidecar SliceTiming: expected a list of {n_slices} slice times in s >= 0 "
            f"(got {_shown(value)}); {fallback}",
        )
        return None
    if len(numbers) != n_slices:
        _warn_once(
            path, series, "SliceTiming",
            f"{path}: sidecar SliceTiming: expected {n_slices} values, one per slice along the third axis "
            f"(got {len(numbers)}); {fallback}",
        )
        return None
    if direction not in ("k", "k-"):
        _warn_once(
            path, series, "SliceEncodingDirection",
            f"{path}: sidecar SliceEncodingDirection: expected 'k' or 'k-' (slices along the third axis) "
            f"(got {_shown(direction)}); the sidecar's SliceTiming is {fallback}",
        )
        return None
    times = np.asarray(numbers, dtype=float)
    # BIDS lists times in slice-encoding order; "k-" runs from the last slice to the first.
    return times[::-1].copy() if direction == "k-" else times


def _acquired_s(sidecar: dict, path: Path, series: str) -> float | None:
    value = sidecar.get("AcquisitionDateTime")
    if value in (None, ""):
        return None
    text = str(value)
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        pass
    try:
        # DICOM DT (YYYYMMDDHHMMSS.FFFFFF&ZZXX), as tools copying the DICOM header write it.
        return DT(text).timestamp()
    except (ValueError, TypeError, OverflowError):
        _warn_once(
            path, series, "AcquisitionDateTime",
            f"{path}: sidecar AcquisitionDateTime: expected ISO 8601 (2024-05-06T10:20:30.5) or DICOM DT "
            f"(20240506102030.5) (got {_shown(value)}); ignored, the volume has no acquisition time",
        )
        return None
