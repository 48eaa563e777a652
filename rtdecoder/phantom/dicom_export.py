"""Encode volumes as Siemens-style DICOM: classic MOSAIC with CSA headers, and XA enhanced.

The phantom scanner uses this to produce files that a reader written only from real Siemens
exports can read. Conventions copied from real VE11/VD13 mosaics and XA enhanced files:

Coordinates
    :class:`~rtdecoder.ingest.volume.Volume` affines are nibabel's: voxel ``(i, j, k)`` to RAS+
    millimetres. DICOM patient coordinates are LPS+, so ``affine_lps = diag(-1, -1, 1, 1) @
    affine_ras`` (x and y flip sign, z stays). Within a slice, ``i`` runs along the DICOM row
    direction cosine (``ImageOrientationPatient[:3]``, towards increasing column index) and ``j``
    along the column direction cosine (``ImageOrientationPatient[3:]``, increasing row index), so a
    slice's 2D pixel array is ``data[:, :, k].T``. Like Siemens, the in-plane axes are flipped when
    needed so that each direction cosine points along its dominant patient axis' positive side
    (for axial slices: rows run right-to-left, columns anterior-to-posterior).
Slice order
    F>>H (default): slices are stored along ``normal = row_cosine x column_cosine``; H>>F (a
    console option): stored along ``-normal``. The CSA ``SliceNormalVector`` always gives the
    direction in which stored slices advance, so a reader that follows it needs no other flag;
    the series CSA's Phoenix protocol also carries ``sSliceArray.ucImageNumbTra = 1`` for H>>F,
    as the console writes it.
Mosaic
    ``ceil(sqrt(n_slices))`` tiles per side, filled row-major; ``Rows``/``Columns`` are the mosaic
    size and unused tiles are zero. ``ImagePositionPatient`` is the "mosaic corner": the position
    the first slice's pixel (0, 0) would have if the whole mosaic were one slice, i.e. the first
    slice's corner moved by ``-(mosaic_rows - rows) / 2`` pixels along the column cosine and
    ``-(mosaic_cols - cols) / 2`` pixels along the row cosine.
Timing
    ``MosaicRefAcqTimes`` (CSA, ms, one per stored slice, in stored order) relative to the
    volume's first slice; XA frames carry ``FrameAcquisitionDateTime`` instead.
    ``AcquisitionNumber`` and ``InstanceNumber`` are the 1-based volume number.
Pixels
    Unsigned 16-bit with a linear :class:`PixelScaling` (``value = stored * slope +
    intercept``). An identity scaling writes no rescale tags, as Siemens does; any other writes
    ``RescaleSlope``/``RescaleIntercept`` (top level for MOSAIC, in the Pixel Value
    Transformation functional group for enhanced), which pydicom's ``apply_modality_lut`` honours.
"""

from __future__ import annotations

import io
import logging
import math
import struct
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import DSfloat

from rtdecoder.errors import VolumeError
from rtdecoder.ingest.volume import Volume

logger = logging.getLogger(__name__)

TileOrder = Literal["FH", "HF"]

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""Multiply a RAS+ affine on the left to get the LPS+ (DICOM patient) affine, and back."""

UINT16_MAX = 65535

# Syngo data-type codes by VR, as found in real CSA headers.
_SYNGO_DT = {
    "AE": 1, "AS": 2, "DS": 3, "FD": 4, "FL": 5, "IS": 6, "SL": 7, "SS": 8, "UL": 9, "US": 10,
    "CS": 16, "LT": 20, "LO": 19, "SH": 22, "ST": 23, "UI": 25, "UT": 27, "UN": 0,
}
_CSA_ITEM_USED = 77
_CSA_ITEM_EMPTY = 205
_CSA_SPARE_ITEMS = 3
_CSA_MIN_ITEMS = 6


# --------------------------------------------------------------------------------------------
# CSA headers


@dataclass(frozen=True)
class CsaElement:
    """One tag of a Siemens CSA header.

    Attributes
    ----------
    name : str
        Tag name, at most 63 ASCII characters (``"NumberOfImagesInMosaic"``).
    vr : str
        Two-letter DICOM VR of the values (``"US"``, ``"FD"``, ``"DS"``, ``"IS"``, ``"LO"``...).
    values : tuple of str
        Values already formatted as text (see :func:`csa_numbers`); empty for a tag present
        without a value, as real headers have many.
    vm : int
        Declared value multiplicity; 0 means "variable" (real files use 0 for
        ``MosaicRefAcqTimes``).
    """

    name: str
    vr: str
    values: tuple[str, ...] = ()
    vm: int = 1


def csa_numbers(values: np.ndarray | list[float] | tuple[float, ...], vr: str) -> tuple[str, ...]:
    """Format numbers the way Siemens writes them into CSA items.

    Integers (IS, US, SL, UL, SS) are left-aligned in 8 characters (``"27      "``); floating
    values (DS, FD, FL) have 8 decimals (``"765.00000000"``).

    >>> csa_numbers([27], "US")
    ('27      ',)
    >>> csa_numbers([0.5, -1.0], "FD")
    ('0.50000000', '-1.00000000')
    """
    if vr in ("IS", "US", "SL", "UL", "SS"):
        return tuple(f"{int(round(float(v))):<8d}" for v in values)
    if vr in ("DS", "FD", "FL"):
        return tuple(f"{float(v):.8f}" for v in values)
    raise ValueError(f"csa_numbers: vr must be a numeric VR (IS, US, SL, UL, SS, DS, FD, FL), got {vr!r}")


def build_csa_header(elements: list[CsaElement]) -> bytes:
    """Encode tags as a CSA header in the "SV10" format of (0029,1010) and (0029,1020).

    Layout (little endian): ``b"SV10\\x04\\x03\\x02\\x01"``, uint32 tag count, uint32 77; then per
    tag: name (64 bytes, NUL padded), int32 vm, VR (4 bytes), int32 syngo data type, int32 item
    count, int32 77 (or 205 when the tag has no items); then per item: four int32
    ``(length, length, 77, length)`` (``(0, 0, 205, 0)`` for an empty item) and the value with a
    terminating NUL, padded to a multiple of 4 bytes. Like the console, a tag with values gets
    ``max(6, n_values + 3)`` items, the spare ones empty; the header ends with 4 zero bytes.

    Parameters
    ----------
    elements : list of CsaElement

    Returns
    -------
    bytes
        Length a multiple of 4, ready to store as the OB value of the element.
    """
    out = [b"SV10\x04\x03\x02\x01", struct.pack("<II", len(elements), _CSA_ITEM_USED)]
    for element in elements:
        name = element.name.encode("ascii")
        if len(name) > 63:
            raise ValueError(f"CSA tag name {element.name!r} is longer than 63 characters")
        if element.vr not in _SYNGO_DT:
            raise ValueError(f"CSA tag {element.name}: unknown vr {element.vr!r}")
        n_items = max(_CSA_MIN_ITEMS, len(element.values) + _CSA_SPARE_ITEMS) if element.values else 0
        out.append(name.ljust(64, b"\0"))
        out.append(
            struct.pack(
                "<i4siii",
                element.vm,
                element.vr.encode("ascii").ljust(4, b"\0"),
                _SYNGO_DT[element.vr],
                n_items,
                _CSA_ITEM_USED if n_items else _CSA_ITEM_EMPTY,
            )
        )
        for value in element.values:
            data = value.encode("latin-1") + b"\0"
            out.append(struct.pack("<4i", len(data), len(data), _CSA_ITEM_USED, len(data)))
            out.append(data.ljust((len(data) + 3) // 4 * 4, b"\0"))
        for _ in range(n_items - len(element.values)):
            out.append(struct.pack("<4i", 0, 0, _CSA_ITEM_EMPTY, 0))
    out.append(b"\0" * 4)
    return b"".join(out)


# --------------------------------------------------------------------------------------------
# Geometry


@dataclass(frozen=True)
class SliceGeometry:
    """A volume's grid described the DICOM way (LPS+ millimetres).

    Attributes
    ----------
    row_cosine : ndarray of shape (3,)
        ``ImageOrientationPatient[:3]``: direction of increasing column index.
    column_cosine : ndarray of shape (3,)
        ``ImageOrientationPatient[3:]``: direction of increasing row index.
    slice_normal : ndarray of shape (3,)
        Direction in which stored slices advance (CSA ``SliceNormalVector``).
    pixel_spacing_mm : tuple of float
        ``(between rows, between columns)``, as ``PixelSpacing``.
    slice_spacing_mm : float
        Centre-to-centre distance of adjacent slices.
    slice_positions_mm : ndarray of shape (n_slices, 3)
        Centre of pixel (0, 0) of each stored slice, in stored order.
    stored_data : ndarray of shape (n_columns, n_rows, n_slices)
        The volume's data with in-plane flips applied and slices in stored order; stored slice
        ``t`` as a 2D image is ``stored_data[:, :, t].T``.
    stored_slice_times_s : ndarray of shape (n_slices,) or None
        Slice acquisition times in stored order, s.
    """

    row_cosine: np.ndarray
    column_cosine: np.ndarray
    slice_normal: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    slice_spacing_mm: float
    slice_positions_mm: np.ndarray
    stored_data: np.ndarray
    stored_slice_times_s: np.ndarray | None


def slice_geometry(volume: Volume, tile_order: TileOrder = "FH") -> SliceGeometry:
    """Describe a volume's grid as Siemens stores it.

    Parameters
    ----------
    volume : Volume
        ``data`` of shape (nx, ny, nz) and a RAS+ ``affine`` whose columns are orthogonal.
    tile_order : {"FH", "HF"}, default="FH"
        Stored slice order: along ``row_cosine x column_cosine`` (F>>H) or against it (H>>F).

    Returns
    -------
    SliceGeometry

    Raises
    ------
    VolumeError
        If the data is not 3D or the affine is sheared (a slice stack cannot be sheared).
    """
    data = np.asarray(volume.data)
    if data.ndim != 3:
        raise VolumeError(f"volume {volume.index}: data: expected 3 dimensions (nx, ny, nz), got shape {data.shape}")
    affine = LPS_FROM_RAS @ np.asarray(volume.affine, dtype=np.float64)
    steps = affine[:3, :3].copy()
    origin = affine[:3, 3].copy()
    sizes = np.linalg.norm(steps, axis=0)
    if np.any(sizes <= 0):
        raise VolumeError(f"volume {volume.index}: affine: expected non-zero voxel sizes, got {sizes}")
    cosines = steps / sizes
    gram = cosines.T @ cosines
    if np.abs(gram - np.eye(3)).max() > 1e-4:
        raise VolumeError(
            f"volume {volume.index}: affine: expected orthogonal axes (no shear) to write DICOM slices"
        )
    # Siemens orients each in-plane axis towards the positive side of its dominant patient axis.
    for axis in (0, 1):
        if cosines[np.argmax(np.abs(cosines[:, axis])), axis] < 0:
            origin = origin + steps[:, axis] * (data.shape[axis] - 1)
            steps[:, axis] = -steps[:, axis]
            cosines[:, axis] = -cosines[:, axis]
            data = np.flip(data, axis=axis)
    cross = np.cross(cosines[:, 0], cosines[:, 1])
    want = 1.0 if tile_order == "FH" else -1.0
    order = np.arange(data.shape[2])
    if np.sign(cosines[:, 2] @ cross) != want:
        order = order[::-1]
    positions = origin[None, :] + order[:, None] * steps[:, 2][None, :]
    times = None
    if volume.slice_times_s is not None:
        times = np.asarray(volume.slice_times_s, dtype=np.float64)
        if times.shape != (data.shape[2],):
            raise VolumeError(
                f"volume {volume.index}: slice_times_s: expected shape ({data.shape[2]},), got {times.shape}"
            )
        times = times[order]
    return SliceGeometry(
        row_cosine=cosines[:, 0],
        column_cosine=cosines[:, 1],
        slice_normal=want * cross,
        pixel_spacing_mm=(float(sizes[1]), float(sizes[0])),
        slice_spacing_mm=float(sizes[2]),
        slice_positions_mm=positions,
        stored_data=data[:, :, order],
        stored_slice_times_s=times,
    )


def mosaic_tiles_per_side(n_slices: int) -> int:
    """Tiles along each side of a Siemens mosaic: ``ceil(sqrt(n_slices))``.

    >>> mosaic_tiles_per_side(27), mosaic_tiles_per_side(36), mosaic_tiles_per_side(37)
    (6, 6, 7)
    """
    return int(math.ceil(math.sqrt(n_slices)))


def mosaic_corner_mm(geometry: SliceGeometry, tile_shape: tuple[int, int], mosaic_shape: tuple[int, int]) -> np.ndarray:
    """``ImagePositionPatient`` of a mosaic (the Siemens "mosaic corner"), LPS+ mm, shape (3,).

    Parameters
    ----------
    geometry : SliceGeometry
    tile_shape : (rows, columns)
        One slice's size in pixels.
    mosaic_shape : (rows, columns)
        The whole mosaic's size in pixels.
    """
    row_shift = (mosaic_shape[0] - tile_shape[0]) / 2 * geometry.pixel_spacing_mm[0]
    col_shift = (mosaic_shape[1] - tile_shape[1]) / 2 * geometry.pixel_spacing_mm[1]
    return (
        geometry.slice_positions_mm[0]
        - row_shift * geometry.column_cosine
        - col_shift * geometry.row_cosine
    )


# --------------------------------------------------------------------------------------------
# Pixel scaling


@dataclass(frozen=True)
class PixelScaling:
    """Linear map from stored uint16 values to data values: ``value = stored * slope + intercept``.

    Attributes
    ----------
    slope : float
    intercept : float
    """

    slope: float = 1.0
    intercept: float = 0.0

    @classmethod
    def for_range(cls, low: float, high: float, headroom: float = 0.0) -> PixelScaling:
        """The scaling that spreads ``[low, high]`` (widened by ``headroom`` times its span on
        each side) over the full uint16 range.

        Rounding error is at most ``slope / 2``, i.e. ``span * (1 + 2 * headroom) / 131070``.

        >>> PixelScaling.for_range(0.0, 65535.0)
        PixelScaling(slope=1.0, intercept=0.0)
        """
        if not (np.isfinite(low) and np.isfinite(high)):
            raise VolumeError(f"pixel range: expected finite values, got [{low}, {high}]")
        span = max(float(high) - float(low), 1e-6)
        low = float(low) - headroom * span
        span = span * (1.0 + 2.0 * headroom)
        return cls(slope=span / UINT16_MAX, intercept=low)

    @property
    def is_identity(self) -> bool:
        """True when stored values are the data values (no rescale tags are written)."""
        return self.slope == 1.0 and self.intercept == 0.0

    def encode(self, data: np.ndarray) -> tuple[np.ndarray, int]:
        """Stored uint16 values of ``data``, and how many voxels had to be clipped."""
        stored = np.rint((np.asarray(data, dtype=np.float64) - self.intercept) / self.slope)
        n_clipped = int(np.count_nonzero((stored < 0) | (stored > UINT16_MAX)))
        return np.clip(stored, 0, UINT16_MAX).astype(np.uint16), n_clipped


# --------------------------------------------------------------------------------------------
# Series description and UIDs


@dataclass(frozen=True)
class SeriesInfo:
    """What stays the same for every volume of one exported run.

    Attributes
    ----------
    seed : int
        Entropy for the deterministic UIDs: the same seed and numbers give identical files.
    session_number : int
        First part of Siemens online-export file names (``001_...``).
    series_number : int
        ``SeriesNumber``; second part of file names.
    description : str
        ``SeriesDescription`` and ``ProtocolName``.
    patient_id : str
        ``PatientID`` and ``PatientName``.
    study_id : str
        Names the study; with ``seed`` it fixes the Study Instance UID.
    tile_order : {"FH", "HF"}
        Stored slice order (see module notes).
    slice_mode : {"ascending", "descending", "interleaved"}
        Written into the Phoenix protocol (``sSliceArray.ucMode``) for information; the slice
        times themselves come from the volume.
    echo_time_ms : float
        ``EchoTime``.
    flip_angle_deg : float
        ``FlipAngle``.
    pixel_scaling : PixelScaling
        Stored-value scaling shared by the whole series.
    """

    seed: int = 0
    session_number: int = 1
    series_number: int = 1
    description: str = "rtdecoder_phantom_bold"
    patient_id: str = "phantom"
    study_id: str = "phantom"
    tile_order: TileOrder = "FH"
    slice_mode: Literal["ascending", "descending", "interleaved"] = "interleaved"
    echo_time_ms: float = 30.0
    flip_angle_deg: float = 52.0
    pixel_scaling: PixelScaling = field(default_factory=PixelScaling)

    def uid(self, *parts: object) -> str:
        """A UID that depends only on the seed, the study and ``parts``."""
        return generate_uid(entropy_srcs=[str(self.seed), self.study_id, *map(str, parts)])

    @property
    def study_uid(self) -> str:
        """``StudyInstanceUID``."""
        return self.uid("study")

    @property
    def series_uid(self) -> str:
        """``SeriesInstanceUID``."""
        return self.uid("series", self.session_number, self.series_number)

    @property
    def frame_of_reference_uid(self) -> str:
        """``FrameOfReferenceUID`` (shared by all runs of the study: same scanner space)."""
        return self.uid("frame-of-reference")

    def sop_instance_uid(self, volume_index: int) -> str:
        """``SOPInstanceUID`` of the 0-based volume ``volume_index``."""
        return self.uid("instance", self.session_number, self.series_number, volume_index)

    def file_name(self, volume_index: int) -> str:
        """Siemens online-export name ``SSS_NNNNNN_IIIIII.dcm`` (session, series, 1-based instance).

        >>> SeriesInfo(session_number=1, series_number=13).file_name(4)
        '001_000013_000005.dcm'
        """
        return f"{self.session_number:03d}_{self.series_number:06d}_{volume_index + 1:06d}.dcm"


# --------------------------------------------------------------------------------------------
# Datasets


def _ds(values: np.ndarray | list[float]) -> list[DSfloat]:
    return [DSfloat(float(v), auto_format=True) for v in values]


def _tm(moment: datetime) -> str:
    return moment.strftime("%H%M%S.%f")


def _dt(moment: datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%S.%f")


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "RTDECODER_01"
    return meta


def _common_dataset(
    volume: Volume, series: SeriesInfo, acquired_at: datetime, sop_class: str, model: str, software: str
) -> Dataset:
    """Patient, study, series, equipment and timing tags shared by both encodings."""
    sop_instance = series.sop_instance_uid(volume.index)
    created = acquired_at + timedelta(seconds=float(volume.tr_s))
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_instance)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstanceCreationDate = created.strftime("%Y%m%d")
    ds.InstanceCreationTime = _tm(created)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = acquired_at.strftime("%Y%m%d")
    ds.AcquisitionTime = _tm(acquired_at)
    ds.ContentTime = _tm(created)
    ds.Modality = "MR"
    ds.Manufacturer = "SIEMENS"
    ds.InstitutionName = "rtdecoder phantom"
    ds.StationName = "PHANTOM"
    ds.StudyDescription = series.study_id
    ds.SeriesDescription = series.description
    ds.ManufacturerModelName = model
    ds.PatientName = series.patient_id
    ds.PatientID = series.patient_id
    ds.BodyPartExamined = "BRAIN"
    ds.ScanningSequence = "EP"
    ds.SequenceVariant = "SK"
    ds.MRAcquisitionType = "2D"
    ds.EchoTime = DSfloat(series.echo_time_ms, auto_format=True)
    ds.RepetitionTime = DSfloat(float(volume.tr_s) * 1000.0, auto_format=True)
    ds.FlipAngle = DSfloat(series.flip_angle_deg, auto_format=True)
    ds.MagneticFieldStrength = DSfloat(3.0)
    ds.SoftwareVersions = software
    ds.ProtocolName = series.description
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = series.study_uid
    ds.SeriesInstanceUID = series.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series.series_number
    ds.AcquisitionNumber = volume.index + 1
    ds.InstanceNumber = volume.index + 1
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def _encoded_pixels(volume: Volume, data: np.ndarray, series: SeriesInfo) -> np.ndarray:
    stored, n_clipped = series.pixel_scaling.encode(data)
    if n_clipped:
        logger.warning(
            "volume %d: %d voxels fall outside the series' pixel range and were clipped "
            "(slope %.6g, intercept %.6g)",
            volume.index, n_clipped, series.pixel_scaling.slope, series.pixel_scaling.intercept,
        )
    return stored


def _phoenix_protocol(volume: Volume, geometry: SliceGeometry, series: SeriesInfo) -> str:
    """The ASCCONV part of ``MrPhoenixProtocol`` with the slice array, as the console writes it
    (zero values omitted; positions are slice centres in LPS mm, "Sag/Cor/Tra" = x/y/z)."""
    ncols, nrows, nslices = geometry.stored_data.shape
    mode = {"ascending": 1, "descending": 2, "interleaved": 4}[series.slice_mode]
    lines = [
        "### ASCCONV BEGIN object=MrProtDataImpl@MrProtocolData version=51130001 ###",
        "ulVersion\t = \t51130001",
        f'tProtocolName\t = \t""{series.description}""',
        f"alTR[0]\t = \t{int(round(float(volume.tr_s) * 1e6))}",
        f"sKSpace.lBaseResolution\t = \t{ncols}",
        f"sKSpace.lPhaseEncodingLines\t = \t{nrows}",
        f"sSliceArray.lSize\t = \t{nslices}",
        f"sSliceArray.ucMode\t = \t{mode}",
    ]
    if series.tile_order == "HF":
        lines.append("sSliceArray.ucImageNumbTra\t = \t1")
    centre_shift = (
        (ncols - 1) / 2 * geometry.pixel_spacing_mm[1] * geometry.row_cosine
        + (nrows - 1) / 2 * geometry.pixel_spacing_mm[0] * geometry.column_cosine
    )
    # The protocol lists slices foot to head (along row x column) whatever the tile order.
    positions = geometry.slice_positions_mm + centre_shift
    normal = geometry.slice_normal
    if series.tile_order == "HF":
        positions, normal = positions[::-1], -normal
    for index, position in enumerate(positions):
        prefix = f"sSliceArray.asSlice[{index}]"
        for name, value in zip(("dSag", "dCor", "dTra"), position, strict=True):
            if abs(value) > 1e-9:
                lines.append(f"{prefix}.sPosition.{name}\t = \t{value:.10g}")
        for name, value in zip(("dSag", "dCor", "dTra"), normal, strict=True):
            if abs(value) > 1e-9:
                lines.append(f"{prefix}.sNormal.{name}\t = \t{value:.10g}")
        lines.append(f"{prefix}.dThickness\t = \t{geometry.slice_spacing_mm:.10g}")
        lines.append(f"{prefix}.dPhaseFOV\t = \t{nrows * geometry.pixel_spacing_mm[0]:.10g}")
        lines.append(f"{prefix}.dReadoutFOV\t = \t{ncols * geometry.pixel_spacing_mm[1]:.10g}")
    lines.append("### ASCCONV END ###")
    return "\n".join(lines) + "\n"


def mosaic_dataset(volume: Volume, series: SeriesInfo, acquired_at: datetime) -> Dataset:
    """A classic Siemens MOSAIC (MR Image Storage) for one volume.

    Parameters
    ----------
    volume : Volume
        ``data`` (nx, ny, nz), RAS+ ``affine``, ``tr_s``, ``index`` (0-based) and, when known,
        ``slice_times_s`` (nz,) relative to the volume start.
    series : SeriesInfo
        Run-wide tags, UIDs, tile order and pixel scaling.
    acquired_at : datetime
        Local wall-clock time the volume's first slice was acquired (``AcquisitionTime``).

    Returns
    -------
    pydicom.dataset.Dataset
        With file meta (explicit VR little endian), ready for :func:`encode_dataset`.
    """
    geometry = slice_geometry(volume, series.tile_order)
    ncols, nrows, nslices = geometry.stored_data.shape
    per_side = mosaic_tiles_per_side(nslices)
    mosaic_shape = (per_side * nrows, per_side * ncols)
    stored = _encoded_pixels(volume, geometry.stored_data, series)
    mosaic = np.zeros(mosaic_shape, dtype=np.uint16)
    for tile in range(nslices):
        r, c = divmod(tile, per_side)
        mosaic[r * nrows : (r + 1) * nrows, c * ncols : (c + 1) * ncols] = stored[:, :, tile].T
    corner = mosaic_corner_mm(geometry, (nrows, ncols), mosaic_shape)

    ds = _common_dataset(volume, series, acquired_at, MRImageStorage, "Skyra", "syngo MR E11")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
    ds.SequenceName = f"*epfid2d1_{ncols}"
    ds.SliceThickness = DSfloat(geometry.slice_spacing_mm, auto_format=True)
    ds.SpacingBetweenSlices = DSfloat(geometry.slice_spacing_mm, auto_format=True)
    ds.NumberOfPhaseEncodingSteps = nrows
    ds.AcquisitionMatrix = [ncols, 0, 0, nrows]
    ds.InPlanePhaseEncodingDirection = "COL"
    ds.ImagePositionPatient = _ds(corner)
    ds.ImageOrientationPatient = _ds(np.concatenate([geometry.row_cosine, geometry.column_cosine]))
    centre0 = geometry.slice_positions_mm[0] + (
        (ncols - 1) / 2 * geometry.pixel_spacing_mm[1] * geometry.row_cosine
        + (nrows - 1) / 2 * geometry.pixel_spacing_mm[0] * geometry.column_cosine
    )
    ds.SliceLocation = DSfloat(float(centre0 @ geometry.slice_normal), auto_format=True)
    ds.Rows, ds.Columns = mosaic_shape
    ds.PixelSpacing = _ds(geometry.pixel_spacing_mm)
    if not series.pixel_scaling.is_identity:
        ds.RescaleIntercept = DSfloat(series.pixel_scaling.intercept, auto_format=True)
        ds.RescaleSlope = DSfloat(series.pixel_scaling.slope, auto_format=True)
        ds.RescaleType = "US"

    times_ms = (
        geometry.stored_slice_times_s * 1000.0
        if geometry.stored_slice_times_s is not None
        else np.zeros(nslices)
    )
    image_csa = build_csa_header(
        [
            CsaElement("NumberOfImagesInMosaic", "US", csa_numbers([nslices], "US")),
            CsaElement("SliceNormalVector", "FD", csa_numbers(geometry.slice_normal, "FD"), vm=3),
            CsaElement("MosaicRefAcqTimes", "FD", csa_numbers(times_ms, "FD"), vm=0),
            CsaElement("AcquisitionMatrixText", "SH", (f"{nrows}*{ncols}",)),
            CsaElement("PhaseEncodingDirectionPositive", "IS", csa_numbers([1], "IS")),
            CsaElement("ProtocolSliceNumber", "IS", csa_numbers([0], "IS")),
            CsaElement("TimeAfterStart", "DS", csa_numbers([volume.index * float(volume.tr_s)], "DS")),
            CsaElement("SlicePosition_PCS", "FD", csa_numbers(corner, "FD"), vm=3),
            CsaElement("ICE_Dims", "LO", (f"X_1_1_1_{volume.index + 1}_1_1_1_1_1_1_1_1",)),
            CsaElement("B_value", "IS"),
            CsaElement("DiffusionGradientDirection", "FD", vm=3),
        ]
    )
    series_csa = build_csa_header(
        [
            CsaElement("MrPhoenixProtocol", "UN", (_phoenix_protocol(volume, geometry, series),)),
            CsaElement("PositivePCSDirections", "SH", ("+LPH",)),
            CsaElement("SliceArrayConcatenations", "IS", csa_numbers([1], "IS")),
        ]
    )
    ds.add_new((0x0029, 0x0010), "LO", "SIEMENS CSA HEADER")
    ds.add_new((0x0029, 0x1008), "CS", "IMAGE NUM 4")
    ds.add_new((0x0029, 0x1009), "LO", acquired_at.strftime("%Y%m%d"))
    ds.add_new((0x0029, 0x1010), "OB", image_csa)
    ds.add_new((0x0029, 0x1018), "CS", "MR")
    ds.add_new((0x0029, 0x1019), "LO", acquired_at.strftime("%Y%m%d"))
    ds.add_new((0x0029, 0x1020), "OB", series_csa)
    ds.PixelData = mosaic.tobytes()
    return ds


def enhanced_dataset(volume: Volume, series: SeriesInfo, acquired_at: datetime) -> Dataset:
    """A Siemens XA-style enhanced multi-frame MR image (one frame per slice) for one volume.

    Parameters
    ----------
    volume : Volume
        As for :func:`mosaic_dataset`.
    series : SeriesInfo
    acquired_at : datetime
        Local wall-clock time the volume's acquisition started.

    Returns
    -------
    pydicom.dataset.Dataset
        Enhanced MR Image Storage; ``NumberOfFrames`` = slices in stored order (see module
        notes); per-frame ``ImagePositionPatient`` and ``FrameAcquisitionDateTime`` (volume start
        plus the slice's time), ``TemporalPositionIndex`` = volume number (1-based),
        ``StackID`` "1" and ``InStackPositionNumber`` = frame number.
    """
    geometry = slice_geometry(volume, series.tile_order)
    ncols, nrows, nslices = geometry.stored_data.shape
    stored = _encoded_pixels(volume, geometry.stored_data, series)
    frames = np.ascontiguousarray(np.transpose(stored, (2, 1, 0)))  # (frames, rows, columns)

    ds = _common_dataset(volume, series, acquired_at, EnhancedMRImageStorage, "MAGNETOM Vida", "syngo MR XA30")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "FMRI", "NONE"]
    ds.AcquisitionDateTime = _dt(acquired_at)
    ds.ContentQualification = "PRODUCT"
    ds.ImageComments = ""
    ds.NumberOfFrames = nslices
    ds.Rows, ds.Columns = nrows, ncols
    ds.PulseSequenceName = "epfid2d1"
    ds.EchoPulseSequence = "GRADIENT"
    ds.MultipleSpinEcho = "NO"
    ds.PhaseContrast = "NO"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = "UNKNOWN"
    ds.PresentationLUTShape = "IDENTITY"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"

    dimension_uid = series.uid("dimension-organization", series.series_number)
    organization = Dataset()
    organization.DimensionOrganizationUID = dimension_uid
    ds.DimensionOrganizationSequence = Sequence([organization])
    ds.DimensionOrganizationType = "3D"
    indices = []
    for pointer, functional_group in ((0x00209056, 0x00209111), (0x00209057, 0x00209111)):
        index = Dataset()
        index.DimensionOrganizationUID = dimension_uid
        index.DimensionIndexPointer = pointer
        index.FunctionalGroupPointer = functional_group
        indices.append(index)
    ds.DimensionIndexSequence = Sequence(indices)

    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = _ds(geometry.pixel_spacing_mm)
    measures.SliceThickness = DSfloat(geometry.slice_spacing_mm, auto_format=True)
    measures.SpacingBetweenSlices = DSfloat(geometry.slice_spacing_mm, auto_format=True)
    shared.PixelMeasuresSequence = Sequence([measures])
    orientation = Dataset()
    orientation.ImageOrientationPatient = _ds(np.concatenate([geometry.row_cosine, geometry.column_cosine]))
    shared.PlaneOrientationSequence = Sequence([orientation])
    timing = Dataset()
    timing.RepetitionTime = float(volume.tr_s) * 1000.0
    timing.FlipAngle = float(series.flip_angle_deg)
    timing.EchoTrainLength = nrows
    timing.RFEchoTrainLength = 0
    timing.GradientEchoTrainLength = nrows
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    echo = Dataset()
    echo.EffectiveEchoTime = float(series.echo_time_ms)
    shared.MREchoSequence = Sequence([echo])
    frame_type = Dataset()
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "FMRI", "NONE"]
    frame_type.PixelPresentation = "MONOCHROME"
    frame_type.VolumetricProperties = "VOLUME"
    frame_type.VolumeBasedCalculationTechnique = "NONE"
    frame_type.ComplexImageComponent = "MAGNITUDE"
    frame_type.AcquisitionContrast = "UNKNOWN"
    shared.MRImageFrameTypeSequence = Sequence([frame_type])
    if not series.pixel_scaling.is_identity:
        transform = Dataset()
        transform.RescaleIntercept = DSfloat(series.pixel_scaling.intercept, auto_format=True)
        transform.RescaleSlope = DSfloat(series.pixel_scaling.slope, auto_format=True)
        transform.RescaleType = "US"
        shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])

    times_s = (
        geometry.stored_slice_times_s
        if geometry.stored_slice_times_s is not None
        else np.zeros(nslices)
    )
    duration_ms = float(volume.tr_s) * 1000.0 / nslices
    per_frame = []
    for frame in range(nslices):
        item = Dataset()
        content = Dataset()
        frame_time = acquired_at + timedelta(seconds=float(times_s[frame]))
        content.FrameReferenceDateTime = _dt(frame_time)
        content.FrameAcquisitionDateTime = _dt(frame_time)
        content.FrameAcquisitionDuration = duration_ms
        content.FrameAcquisitionNumber = volume.index + 1
        content.StackID = "1"
        content.InStackPositionNumber = frame + 1
        content.TemporalPositionIndex = volume.index + 1
        content.DimensionIndexValues = [1, frame + 1]
        item.FrameContentSequence = Sequence([content])
        position = Dataset()
        position.ImagePositionPatient = _ds(geometry.slice_positions_mm[frame])
        item.PlanePositionSequence = Sequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = frames.tobytes()
    return ds


def encode_dataset(ds: Dataset) -> bytes:
    """The bytes of a DICOM Part 10 file (preamble, file meta, explicit VR little endian)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def encode_volume(
    volume: Volume, series: SeriesInfo, acquired_at: datetime, fmt: Literal["mosaic", "enhanced"]
) -> bytes:
    """One volume as a complete DICOM file in ``fmt`` ("mosaic" or "enhanced")."""
    if fmt == "mosaic":
        return encode_dataset(mosaic_dataset(volume, series, acquired_at))
    if fmt == "enhanced":
        return encode_dataset(enhanced_dataset(volume, series, acquired_at))
    raise ValueError(f"fmt: expected 'mosaic' or 'enhanced', got {fmt!r}")
