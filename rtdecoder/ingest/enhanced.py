"""Siemens XA enhanced multi-frame DICOM: one file per volume, one frame per slice.

Geometry and timing sit in functional groups (DICOM PS3.3 C.7.6.16): the shared group holds what
every frame has in common (pixel spacing, orientation, TR), the per-frame group what differs
(``ImagePositionPatient``, ``FrameAcquisitionDateTime``, ``InStackPositionNumber``); a value may
be in either. Frames are not guaranteed to be stored in spatial order, so they are sorted by
their position along the slice normal (the cross product of the row and column directions).

The per-frame group is most of the header: at NSD size (84 frames) pydicom needs 15-30 ms to turn
it into datasets, longer than everything else in a read. :func:`frame_fields_from_raw` reads the
few values needed straight from its encoded bytes instead, and gives up (returns ``None``) at
anything it does not expect, so the caller falls back to :func:`frame_fields`, the pydicom path,
which reports the problem precisely. Both give the same :class:`FrameFields` on every file the
fast path accepts, and :func:`stack_frames` builds the volume from those.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.valuerep import DT

from rtdecoder.errors import VolumeError
from rtdecoder.ingest.dicom_fields import (
    MalformedBytesError,
    RawItem,
    RawWalker,
    check_direction_cosines,
    first_item,
    get_items,
    get_number,
    get_numbers,
    get_text,
    get_value,
    label,
    parse_decimal,
)
from rtdecoder.ingest.mosaic import LPS_TO_RAS

ENHANCED_MR_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
    }
)
PER_FRAME_TAG = 0x52009230  # PerFrameFunctionalGroupsSequence
_SPACING_TOLERANCE_MM = 1e-2

# Functional group macros read here, and the attributes read from them.
_PLANE_POSITION = 0x00209113  # PlanePositionSequence
_PLANE_ORIENTATION = 0x00209116  # PlaneOrientationSequence
_PIXEL_MEASURES = 0x00289110  # PixelMeasuresSequence
_VALUE_TRANSFORM = 0x00289145  # PixelValueTransformationSequence
_MR_TIMING = 0x00189112  # MRTimingAndRelatedParametersSequence
_FRAME_CONTENT = 0x00209111  # FrameContentSequence
FUNCTIONAL_GROUP_SEQUENCES = frozenset(
    {_PLANE_POSITION, _PLANE_ORIENTATION, _PIXEL_MEASURES, _VALUE_TRANSFORM, _MR_TIMING, _FRAME_CONTENT}
)
_KEYWORDS = {
    _PLANE_POSITION: "PlanePositionSequence",
    _PLANE_ORIENTATION: "PlaneOrientationSequence",
    _PIXEL_MEASURES: "PixelMeasuresSequence",
    _VALUE_TRANSFORM: "PixelValueTransformationSequence",
    _MR_TIMING: "MRTimingAndRelatedParametersSequence",
}
_IMAGE_POSITION = 0x00200032
_IMAGE_ORIENTATION = 0x00200037
_PIXEL_SPACING = 0x00280030
_RESCALE_SLOPE = 0x00281053
_RESCALE_INTERCEPT = 0x00281052
_REPETITION_TIME = 0x00180080
_FRAME_ACQUISITION_DATETIME = 0x00189074


@dataclass(frozen=True)
class EnhancedStack:
    """The frames of one enhanced DICOM stacked into a volume.

    Attributes
    ----------
    data : ndarray of shape (cols, rows, n_frames), float32
        Axes (column, row, slice) with slices in ascending position along the slice normal,
        rescaled to real values.
    affine : ndarray of shape (4, 4)
        Voxel-to-world RAS+ mm transform.
    slice_times_s : ndarray of shape (n_frames,) or None
        Acquisition time of each slice from the earliest one, s.
    tr_s : float
        Repetition time, s.
    first_frame_s : float or None
        Epoch seconds of the earliest frame (acquisition time when the header has none).
    """

    data: np.ndarray
    affine: np.ndarray
    slice_times_s: np.ndarray | None
    tr_s: float
    first_frame_s: float | None


@dataclass(frozen=True)
class FrameFields:
    """What stacking needs from the functional groups, frames in file order.

    Values are as decoded, not yet checked for sense (that is :func:`stack_frames`' job, so both
    ways of reading them reject the same files).

    Attributes
    ----------
    orientation : ndarray of shape (6,)
        ``ImageOrientationPatient`` of the first frame (LPS row and column direction cosines).
    pixel_spacing_mm : ndarray of shape (2,)
        ``PixelSpacing`` of the first frame: between rows, between columns, mm.
    positions_mm : ndarray of shape (n_frames, 3)
        ``ImagePositionPatient`` of each frame, LPS mm.
    slopes, intercepts : ndarray of shape (n_frames,)
        Rescale of each frame (1 and 0 where the file has none).
    frame_times_s : ndarray of shape (n_frames,) or None
        ``FrameAcquisitionDateTime`` of each frame as epoch s; ``None`` unless every frame has one.
    tr_ms : float or None
        ``RepetitionTime`` of the first frame (or the top-level one), ms.
    single_spacing_mm : float or None
        Slice spacing of a one-frame file (``SpacingBetweenSlices``, else ``SliceThickness``).
    """

    orientation: np.ndarray
    pixel_spacing_mm: np.ndarray
    positions_mm: np.ndarray
    slopes: np.ndarray
    intercepts: np.ndarray
    frame_times_s: np.ndarray | None
    tr_ms: float | None
    single_spacing_mm: float | None = None


def is_enhanced(ds: Dataset, source: str | Path = "<dataset>") -> bool:
    """Whether a dataset is a multi-frame (enhanced) MR image.

    Raises
    ------
    VolumeError
        When ``SOPClassUID`` cannot be decoded.
    """
    return str(get_value(ds, "SOPClassUID", source) or "") in ENHANCED_MR_SOP_CLASSES or (
        "PerFrameFunctionalGroupsSequence" in ds
    )


def stack_frames(
    ds: Dataset, frames: np.ndarray, source: str | Path, fields: FrameFields | None = None
) -> EnhancedStack:
    """Order the frames of an enhanced DICOM into a volume with its affine and slice times.

    Parameters
    ----------
    ds : pydicom Dataset
        The header, with its functional group sequences (the per-frame one is not needed when
        ``fields`` is given).
    frames : ndarray of shape (n_frames, rows, cols)
        Stored pixel values, frames in file order.
    source : str or Path
        Names the file in error messages.
    fields : FrameFields, optional
        The functional group values, already read (by :func:`frame_fields_from_raw`); default:
        read them from ``ds`` with :func:`frame_fields`.

    Returns
    -------
    EnhancedStack

    Raises
    ------
    VolumeError
        When a geometry attribute is missing or malformed, frames share a position, or their
        spacing is uneven.
    """
    n_frames = frames.shape[0]
    if fields is None:
        fields = frame_fields(ds, n_frames, source)
    orientation = fields.orientation
    check_direction_cosines(orientation, source, label("ImageOrientationPatient", "PlaneOrientationSequence > "))
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    if not np.all(fields.pixel_spacing_mm > 0):
        raise VolumeError(
            f"{source}: {label('PixelSpacing', 'PixelMeasuresSequence > ')}: expected 2 finite numbers > 0 "
            f"(got {fields.pixel_spacing_mm.tolist()})"
        )
    row_spacing_mm, col_spacing_mm = (float(v) for v in fields.pixel_spacing_mm)
    positions = fields.positions_mm
    distances_mm = positions @ normal
    order = np.argsort(distances_mm, kind="stable")
    steps_mm = np.diff(distances_mm[order])
    if n_frames > 1:
        if steps_mm.min() <= _SPACING_TOLERANCE_MM:
            raise VolumeError(
                f"{source}: PlanePositionSequence: expected one frame per slice position, "
                "but two frames share a position (several volumes in one file are not supported)"
            )
        if steps_mm.max() - steps_mm.min() > _SPACING_TOLERANCE_MM:
            raise VolumeError(
                f"{source}: PlanePositionSequence: expected evenly spaced slices "
                f"(steps from {steps_mm.min():.4f} to {steps_mm.max():.4f} mm)"
            )
        slice_spacing_mm = float(steps_mm.mean())
    else:
        slice_spacing_mm = 1.0 if fields.single_spacing_mm is None else fields.single_spacing_mm
        if not slice_spacing_mm > 0:
            raise VolumeError(
                f"{source}: {label('SpacingBetweenSlices', 'PixelMeasuresSequence > ')}: expected a slice "
                f"spacing > 0 mm (got {slice_spacing_mm})"
            )

    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * col_spacing_mm
    affine_lps[:3, 1] = col_dir * row_spacing_mm
    affine_lps[:3, 2] = normal * slice_spacing_mm
    affine_lps[:3, 3] = positions[order[0]]

    data = _rescaled_volume(frames, order, fields.slopes, fields.intercepts)

    slice_times_s = first_frame_s = None
    if fields.frame_times_s is not None:
        first_frame_s = float(fields.frame_times_s.min())
        slice_times_s = fields.frame_times_s[order] - first_frame_s
    tr_ms = fields.tr_ms
    if tr_ms is None or not tr_ms > 0:
        raise VolumeError(
            f"{source}: MRTimingAndRelatedParametersSequence > RepetitionTime: expected a positive "
            f"TR in ms (got {tr_ms!r})"
        )
    return EnhancedStack(
        data=data,
        affine=LPS_TO_RAS @ affine_lps,
        slice_times_s=slice_times_s,
        tr_s=float(tr_ms) / 1000.0,
        first_frame_s=first_frame_s,
    )


def _rescaled_volume(frames: np.ndarray, order: np.ndarray, slopes: np.ndarray, intercepts: np.ndarray) -> np.ndarray:
    """(n_frames, rows, cols) stored values -> (cols, rows, n_frames) float32, sorted and rescaled.

    One conversion pass into the result, then the rescale in place: each voxel is
    ``float32(stored) * float32(slope) + float32(intercept)``, rounded after each step, as a
    float32 multiply and add over a temporary array would give.
    """
    n_frames, rows, cols = frames.shape
    data = np.empty((cols, rows, n_frames), dtype=np.float32)
    in_order = np.array_equal(order, np.arange(n_frames))
    np.copyto(data, (frames if in_order else frames[order]).transpose(2, 1, 0), casting="unsafe")
    if np.any(slopes != 1.0) or np.any(intercepts != 0.0):
        with np.errstate(over="ignore"):  # values cast to float32 overflow to inf, which the reader rejects
            slopes32, intercepts32 = slopes[order].astype(np.float32), intercepts[order].astype(np.float32)
            if np.all(slopes32 == slopes32[0]) and np.all(intercepts32 == intercepts32[0]):
                data *= slopes32[0]  # a scalar multiply is several times faster than a broadcast one
                data += intercepts32[0]
            else:
                data *= slopes32
                data += intercepts32
    return data


# --------------------------------------------------------------------------------------------
# Reading the functional groups with pydicom


def frame_fields(ds: Dataset, n_frames: int, source: str | Path) -> FrameFields:
    """Read the functional group values of every frame through pydicom (the exact path).

    Parameters
    ----------
    ds : pydicom Dataset
        The whole header, with ``PerFrameFunctionalGroupsSequence``.
    n_frames : int
        ``NumberOfFrames``: the per-frame group must have that many items.
    source : str or Path
        Names the file in error messages.

    Returns
    -------
    FrameFields

    Raises
    ------
    VolumeError
        When an attribute is missing, cannot be decoded or has the wrong number of values.
    """
    per_frame = get_items(ds, "PerFrameFunctionalGroupsSequence", source)
    if len(per_frame) != n_frames:
        raise VolumeError(
            f"{source}: PerFrameFunctionalGroupsSequence: expected one item per frame "
            f"({n_frames}), got {len(per_frame)}"
        )
    shared = first_item(ds, "SharedFunctionalGroupsSequence", source)

    def group(i: int, sequence: str) -> tuple[Dataset | None, str]:
        """First item of a functional group macro, per-frame first, then shared, and its path."""
        where = f"PerFrameFunctionalGroupsSequence[{i}] > "
        item = first_item(per_frame[i], sequence, source, where)
        if item is not None:
            return item, f"{where}{sequence} > "
        where = "SharedFunctionalGroupsSequence > "
        item = first_item(shared, sequence, source, where) if shared is not None else None
        return item, f"{where}{sequence} > "

    def required(i: int, sequence: str, keyword: str, count: int) -> np.ndarray:
        item, where = group(i, sequence)
        value = None if item is None else get_numbers(item, keyword, source, count=count, where=where)
        if value is None:
            raise VolumeError(
                f"{source}: {sequence} > {keyword}: missing in both the per-frame and the shared "
                "functional groups"
            )
        return value

    orientation = required(0, "PlaneOrientationSequence", "ImageOrientationPatient", 6)
    pixel_spacing_mm = required(0, "PixelMeasuresSequence", "PixelSpacing", 2)
    positions = np.array(
        [required(i, "PlanePositionSequence", "ImagePositionPatient", 3) for i in range(n_frames)], dtype=float
    ).reshape(n_frames, 3)
    slopes, intercepts = np.ones(n_frames), np.zeros(n_frames)
    for i in range(n_frames):
        transform, where = group(i, "PixelValueTransformationSequence")
        if transform is not None:
            slope = get_number(transform, "RescaleSlope", source, where)
            intercept = get_number(transform, "RescaleIntercept", source, where)
            slopes[i] = 1.0 if slope is None else slope
            intercepts[i] = 0.0 if intercept is None else intercept

    times = []
    for i, item in enumerate(per_frame):
        where = f"PerFrameFunctionalGroupsSequence[{i}] > FrameContentSequence > "
        content = first_item(item, "FrameContentSequence", source, f"PerFrameFunctionalGroupsSequence[{i}] > ")
        text = get_text(content, "FrameAcquisitionDateTime", source, where) if content is not None else None
        if not text:
            times = None
            break
        times.append(_epoch_s(text, source, where))

    timing, where = group(0, "MRTimingAndRelatedParametersSequence")
    tr_ms = get_number(timing, "RepetitionTime", source, where) if timing is not None else None
    if tr_ms is None:
        tr_ms = get_number(ds, "RepetitionTime", source)

    single_spacing_mm = None
    if n_frames == 1:
        measures, where = group(0, "PixelMeasuresSequence")
        if measures is not None:
            single_spacing_mm = get_number(measures, "SpacingBetweenSlices", source, where) or get_number(
                measures, "SliceThickness", source, where
            )
    return FrameFields(
        orientation=orientation,
        pixel_spacing_mm=pixel_spacing_mm,
        positions_mm=positions,
        slopes=slopes,
        intercepts=intercepts,
        frame_times_s=None if times is None else np.asarray(times),
        tr_ms=tr_ms,
        single_spacing_mm=single_spacing_mm or None,
    )


def _epoch_s(text: str, source: str | Path, where: str) -> float:
    try:
        return DT(text).timestamp()
    except (ValueError, OverflowError, OSError):
        raise VolumeError(
            f"{source}: {label('FrameAcquisitionDateTime', where)}: expected a DICOM DT value (got {text!r})"
        ) from None


# --------------------------------------------------------------------------------------------
# Reading the functional groups from their bytes (the fast path)


def frame_fields_from_raw(
    ds: Dataset, walker: RawWalker, per_frame: list[RawItem], n_frames: int, source: str | Path
) -> FrameFields | None:
    """Read the functional group values from the encoded per-frame items; ``None`` to fall back.

    Gives exactly what :func:`frame_fields` gives for the same file, or ``None`` wherever it
    might not: a value that is not a plain decimal or a single date-time, a VR or a structure it
    does not expect, fewer than two frames, pydicom set to convert numbers or dates otherwise, or
    anything :func:`frame_fields` would reject.

    Parameters
    ----------
    ds : pydicom Dataset
        The header read up to the per-frame group (the shared group and top-level attributes).
    walker : RawWalker
        Over the bytes the items were parsed from, with :data:`FUNCTIONAL_GROUP_SEQUENCES`.
    per_frame : list of dict
        The items of ``PerFrameFunctionalGroupsSequence`` from :meth:`RawWalker.items`.
    n_frames : int
        ``NumberOfFrames``.
    source : str or Path
        Names the file in error messages.

    Returns
    -------
    FrameFields or None
    """
    if pydicom_config.use_DS_numpy or pydicom_config.use_DS_decimal or pydicom_config.datetime_conversion:
        return None  # pydicom would hand back other types; only the pydicom path matches them
    if n_frames < 2 or len(per_frame) != n_frames:
        return None
    try:
        return _fields_from_raw(ds, walker, per_frame, n_frames, source)
    except (MalformedBytesError, VolumeError):
        return None


def _fields_from_raw(
    ds: Dataset, walker: RawWalker, per_frame: list[RawItem], n_frames: int, source: str | Path
) -> FrameFields:
    shared = first_item(ds, "SharedFunctionalGroupsSequence", source)
    shared_groups: dict[int, Dataset | None] = {}

    def group(item: RawItem, sequence: int) -> RawItem | Dataset | None:
        items = item.get(sequence)
        if items is not None:
            if not isinstance(items, list):
                raise MalformedBytesError("a functional group that is not a sequence")
            if items:
                return items[0]
        if sequence not in shared_groups:
            shared_groups[sequence] = (
                first_item(shared, _KEYWORDS[sequence], source) if shared is not None else None
            )
        return shared_groups[sequence]

    shared_numbers: dict[tuple[int, str], np.ndarray | None] = {}

    def numbers(holder: RawItem | Dataset | None, tag: int, keyword: str, count: int) -> np.ndarray | None:
        if holder is None:
            return None
        if isinstance(holder, Dataset):  # from the shared group: what pydicom gives, as frame_fields reads it
            key = (id(holder), keyword)
            if key not in shared_numbers:  # the same for every frame; decoded once
                shared_numbers[key] = get_numbers(holder, keyword, source, count=count)
            return shared_numbers[key]
        element = holder.get(tag)
        if element is None:
            return None
        # pydicom: strip, drop trailing padding, split at backslashes, float() of each part.
        text = walker.text(element, b"DS").strip().rstrip(" \x00")
        if not text:
            return None
        values = [parse_decimal(part) for part in text.split("\\")]
        if len(values) != count:
            raise MalformedBytesError(f"{keyword}: {len(values)} values, expected {count}")
        return np.array(values)

    def required(holder: RawItem | Dataset | None, tag: int, keyword: str, count: int) -> np.ndarray:
        value = numbers(holder, tag, keyword, count)
        if value is None:
            raise MalformedBytesError(f"{keyword} missing")  # frame_fields names it
        return value

    first = per_frame[0]
    orientation = required(group(first, _PLANE_ORIENTATION), _IMAGE_ORIENTATION, "ImageOrientationPatient", 6)
    pixel_spacing_mm = required(group(first, _PIXEL_MEASURES), _PIXEL_SPACING, "PixelSpacing", 2)
    positions = np.empty((n_frames, 3))
    slopes, intercepts = np.ones(n_frames), np.zeros(n_frames)
    times: list[float] | None = []
    for i, item in enumerate(per_frame):
        positions[i] = required(group(item, _PLANE_POSITION), _IMAGE_POSITION, "ImagePositionPatient", 3)
        transform = group(item, _VALUE_TRANSFORM)
        if transform is not None:
            slope = numbers(transform, _RESCALE_SLOPE, "RescaleSlope", 1)
            intercept = numbers(transform, _RESCALE_INTERCEPT, "RescaleIntercept", 1)
            slopes[i] = 1.0 if slope is None else slope[0]
            intercepts[i] = 0.0 if intercept is None else intercept[0]
        if times is not None:
            times = _append_frame_time(times, walker, item)

    timing = group(first, _MR_TIMING)
    tr = numbers(timing, _REPETITION_TIME, "RepetitionTime", 1)
    tr_ms = float(tr[0]) if tr is not None else get_number(ds, "RepetitionTime", source)
    return FrameFields(
        orientation=orientation,
        pixel_spacing_mm=pixel_spacing_mm,
        positions_mm=positions,
        slopes=slopes,
        intercepts=intercepts,
        frame_times_s=None if times is None else np.asarray(times),
        tr_ms=tr_ms,
    )


def _append_frame_time(times: list[float], walker: RawWalker, item: RawItem) -> list[float] | None:
    """Add one frame's ``FrameAcquisitionDateTime`` (epoch s); ``None`` when it has none."""
    content = item.get(_FRAME_CONTENT)
    if content is None or (isinstance(content, list) and not content):
        return None
    if not isinstance(content, list):
        raise MalformedBytesError("FrameContentSequence is not a sequence")
    element = content[0].get(_FRAME_ACQUISITION_DATETIME)
    if element is None:
        return None
    text = walker.text(element, b"DT").rstrip(" \x00")  # pydicom keeps DT as such a string
    if not text:
        return None
    if "\\" in text:
        raise MalformedBytesError("several FrameAcquisitionDateTime values")
    try:
        times.append(DT(text).timestamp())
    except (ValueError, OverflowError, OSError):
        raise MalformedBytesError(f"FrameAcquisitionDateTime {text!r}") from None
    return times
