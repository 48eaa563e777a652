"""Siemens XA enhanced multi-frame DICOM: one file per volume, one frame per slice.

Geometry and timing sit in functional groups (DICOM PS3.3 C.7.6.16): the shared group holds what
every frame has in common (pixel spacing, orientation, TR), the per-frame group what differs
(``ImagePositionPatient``, ``FrameAcquisitionDateTime``, ``InStackPositionNumber``); a value may
be in either. Frames are not guaranteed to be stored in spatial order, so they are sorted by
their position along the slice normal (the cross product of the row and column directions).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.valuerep import DT

from rtdecoder.errors import VolumeError
from rtdecoder.ingest.mosaic import LPS_TO_RAS

ENHANCED_MR_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
    }
)
_SPACING_TOLERANCE_MM = 1e-2


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


def is_enhanced(ds: Dataset) -> bool:
    """Whether a dataset is a multi-frame (enhanced) MR image."""
    return str(ds.get("SOPClassUID", "")) in ENHANCED_MR_SOP_CLASSES or (
        "PerFrameFunctionalGroupsSequence" in ds
    )


def stack_frames(ds: Dataset, frames: np.ndarray, source: str | Path) -> EnhancedStack:
    """Order the frames of an enhanced DICOM into a volume with its affine and slice times.

    Parameters
    ----------
    ds : pydicom Dataset
        The header, with its functional group sequences.
    frames : ndarray of shape (n_frames, rows, cols)
        Stored pixel values, frames in file order.
    source : str or Path
        Names the file in error messages.

    Returns
    -------
    EnhancedStack

    Raises
    ------
    VolumeError
        When a geometry attribute is missing, frames share a position, or their spacing is uneven.
    """
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence", []))
    n_frames = frames.shape[0]
    if len(per_frame) != n_frames:
        raise VolumeError(
            f"{source}: PerFrameFunctionalGroupsSequence: expected one item per frame "
            f"({n_frames}), got {len(per_frame)}"
        )
    orientation = np.asarray(
        _frame_value(ds, per_frame[0], "PlaneOrientationSequence", "ImageOrientationPatient", source),
        dtype=float,
    )
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    row_spacing_mm, col_spacing_mm = (
        float(v)
        for v in _frame_value(ds, per_frame[0], "PixelMeasuresSequence", "PixelSpacing", source)
    )
    positions = np.array(
        [
            _frame_value(ds, item, "PlanePositionSequence", "ImagePositionPatient", source)
            for item in per_frame
        ],
        dtype=float,
    )
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
        measures = _group(ds, per_frame[0], "PixelMeasuresSequence")
        slice_spacing_mm = float(
            (measures.get("SpacingBetweenSlices") or measures.get("SliceThickness") or 1.0)
            if measures is not None
            else 1.0
        )

    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * col_spacing_mm
    affine_lps[:3, 1] = col_dir * row_spacing_mm
    affine_lps[:3, 2] = normal * slice_spacing_mm
    affine_lps[:3, 3] = positions[order[0]]

    data = _rescaled(ds, per_frame, frames)
    # (n_frames, rows, cols) -> (cols, rows, n_frames)
    data = np.ascontiguousarray(data[order].transpose(2, 1, 0))

    frame_times_s = _frame_times_s(per_frame, source)
    slice_times_s = first_frame_s = None
    if frame_times_s is not None:
        first_frame_s = float(frame_times_s.min())
        slice_times_s = frame_times_s[order] - first_frame_s
    return EnhancedStack(
        data=data,
        affine=LPS_TO_RAS @ affine_lps,
        slice_times_s=slice_times_s,
        tr_s=_tr_s(ds, per_frame[0], source),
        first_frame_s=first_frame_s,
    )


def _group(ds: Dataset, frame_item: Dataset, sequence: str) -> Dataset | None:
    """First item of a functional group macro, per-frame first, then shared."""
    for holder in (frame_item, *ds.get("SharedFunctionalGroupsSequence", [])[:1]):
        items = holder.get(sequence)
        if items:
            return items[0]
    return None


def _frame_value(ds: Dataset, frame_item: Dataset, sequence: str, keyword: str, source: str | Path):
    item = _group(ds, frame_item, sequence)
    value = None if item is None else item.get(keyword)
    if value is None or value == "":
        raise VolumeError(
            f"{source}: {sequence} > {keyword}: missing in both the per-frame and the shared "
            "functional groups"
        )
    return value


def _rescaled(ds: Dataset, per_frame: list[Dataset], frames: np.ndarray) -> np.ndarray:
    slopes = np.ones(len(per_frame))
    intercepts = np.zeros(len(per_frame))
    for i, item in enumerate(per_frame):
        transform = _group(ds, item, "PixelValueTransformationSequence")
        if transform is not None:
            slopes[i] = float(transform.get("RescaleSlope", 1.0))
            intercepts[i] = float(transform.get("RescaleIntercept", 0.0))
    data = frames.astype(np.float32)
    if np.any(slopes != 1.0) or np.any(intercepts != 0.0):
        data = data * slopes[:, None, None].astype(np.float32) + intercepts[:, None, None].astype(
            np.float32
        )
    return data


def _frame_times_s(per_frame: list[Dataset], source: str | Path) -> np.ndarray | None:
    times = []
    for item in per_frame:
        content = item.get("FrameContentSequence")
        text = content[0].get("FrameAcquisitionDateTime") if content else None
        if not text:
            return None
        try:
            times.append(DT(str(text)).timestamp())
        except ValueError:
            raise VolumeError(
                f"{source}: FrameContentSequence > FrameAcquisitionDateTime: expected a DICOM "
                f"DT value (got {text!r})"
            ) from None
    return np.asarray(times)


def _tr_s(ds: Dataset, frame_item: Dataset, source: str | Path) -> float:
    timing = _group(ds, frame_item, "MRTimingAndRelatedParametersSequence")
    tr_ms = timing.get("RepetitionTime") if timing is not None else None
    if tr_ms is None:
        tr_ms = ds.get("RepetitionTime")
    if tr_ms is None or float(tr_ms) <= 0:
        raise VolumeError(
            f"{source}: MRTimingAndRelatedParametersSequence > RepetitionTime: expected a positive "
            f"TR in ms (got {tr_ms!r})"
        )
    return float(tr_ms) / 1000.0
