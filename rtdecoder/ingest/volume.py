"""The one value every reader returns: a volume with its geometry and timing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class VolumeTimes:
    """Wall-clock timestamps of one volume on its way through the decoder.

    All are ``time.time()`` seconds (Unix epoch), ``None`` until the step happens.

    Attributes
    ----------
    acquired_s : float or None
        When the scanner acquired it (from the file's acquisition date and time).
    seen_s : float or None
        When the watcher first saw the file.
    complete_s : float or None
        When the file was found complete and read.
    processed_s : float or None
        When motion correction, masking and the GLM update were done.
    written_s : float or None
        When the file was last written into the export folder (its modification time): the
        volume's arrival.
    """

    acquired_s: float | None = None
    seen_s: float | None = None
    complete_s: float | None = None
    processed_s: float | None = None
    written_s: float | None = None


@dataclass
class Volume:
    """One acquired 3D volume.

    Attributes
    ----------
    data : ndarray of shape (nx, ny, nz), float32
        Voxel values, indexed so that ``affine`` maps ``(i, j, k, 1)`` to RAS+ millimetres.
    affine : ndarray of shape (4, 4)
        Voxel-to-world (RAS+, mm) transform, as nibabel uses.
    tr_s : float
        Repetition time in seconds.
    index : int
        0-based acquisition index within the run (from the instance or acquisition number).
    slice_times_s : ndarray of shape (nz,) or None
        Acquisition time of each slice (along the third axis) relative to the volume start, s.
    series : str
        Identifies the run (series number, series UID or file stem) so runs are not mixed.
    source : Path or None
        The file it was read from.
    times : VolumeTimes
        Timestamps for the latency report.
    tr_source : str
        Where ``tr_s`` came from: ``"header"`` (the file's own header: DICOM ``RepetitionTime``,
        NIfTI ``pixdim[4]``), ``"sidecar"`` (a BIDS JSON's ``RepetitionTime``) or ``"default"``
        (the run's TR from the configuration, for a file that carries none). The session compares
        the volumes' TR with its configuration; only a ``"default"`` TR is the configuration's own.
    index_source : str
        Where ``index`` came from: ``"header"`` (DICOM ``AcquisitionNumber``/``InstanceNumber``),
        ``"volume"`` (position in a 4D NIfTI), ``"sidecar"`` (``AcquisitionNumber`` in a BIDS JSON),
        ``"spm"`` / ``"dcm2niix"`` (a converter's 1-based number in the file name), ``"name"`` (a
        generic number at the end of the file name, numbered from 0 or 1 as the run decides: see
        :class:`rtdecoder.ingest.ordering.RunNumbering`) or ``"hint"`` (the caller's index hint).
    """

    data: np.ndarray
    affine: np.ndarray
    tr_s: float
    index: int
    slice_times_s: np.ndarray | None = None
    series: str = ""
    source: Path | None = None
    times: VolumeTimes = field(default_factory=VolumeTimes)
    tr_source: str = "header"
    index_source: str = "header"

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape ``(nx, ny, nz)``."""
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def voxel_size_mm(self) -> np.ndarray:
        """Voxel edge lengths in mm, shape (3,)."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
