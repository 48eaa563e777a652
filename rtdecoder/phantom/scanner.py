"""The phantom scanner's export: volumes written into a folder one TR apart, as a share delivers them.

A network share makes a file visible while it is still being written, so by default each file is
written in place in two parts: the header and the first part of the voxel data, a flush, a short
pause, then the rest. A reader polling at the wrong moment sees a file whose pixel data is short,
as it would on a real scanner's export share. ``partial_write=False`` writes a hidden temporary
file and renames it instead (files appear complete).

Timing: volume ``s`` of a run (0-based position in the stream) is acquired during
``[t0 + s * tr_s / speed, t0 + (s + 1) * tr_s / speed)`` and its file is written at the end of that
slot. The file's acquisition date and time is the wall-clock start of its slot (local time), so
latency measured from it is right at any speed, while ``RepetitionTime`` keeps the true TR.

File names follow the Siemens online export for DICOM (``001_000013_000005.dcm``: session,
series, 1-based instance) and ``vol_00005.nii`` (0-based index) for 3D NIfTI, each with a BIDS
sidecar ``vol_00005.json`` (``RepetitionTime``, ``SliceTiming``, ``AcquisitionDateTime``) written
just before it. The growing 4D NIfTI mode (``bold.nii`` and ``bold.json``) rewrites the header's
``dim[4]`` first and then appends the new volume's voxels, so the newest volume can be seen short.

Faults for tests of the ingest side (:class:`FaultPlan`): a dropped volume's slot passes with no
file; a duplicated volume's file is written a second time right after the first; of a swapped
pair ``(a, b)`` volume ``a`` is held back and written right after ``b``; a truncated volume's file
keeps only its first part for good.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from rtdecoder.errors import ConfigError, OrderError, VolumeError
from rtdecoder.ingest.volume import Volume
from rtdecoder.phantom.dicom_export import PixelScaling, SeriesInfo, encode_volume

logger = logging.getLogger(__name__)

ExportFormat = Literal["mosaic", "enhanced", "nifti", "nifti4d"]
EXPORT_FORMATS: tuple[str, ...] = ("mosaic", "enhanced", "nifti", "nifti4d")
NIFTI_HEADER_BYTES = 352  # NIfTI-1 header (348) plus the 4-byte extension flag
NIFTI_4D_STEM = "bold"


@dataclass(frozen=True)
class FaultPlan:
    """Deliberate export faults, by 0-based volume index.

    Attributes
    ----------
    drop : frozenset of int
        Volumes never written.
    duplicate : frozenset of int
        Volumes written twice (the same file again, right after the first write).
    swap : tuple of (int, int)
        Pairs ``(a, b)``, ``a < b``: ``a`` is held back and written right after ``b``.
    truncate : frozenset of int
        Volumes whose file stays cut off after its first part.
    """

    drop: frozenset[int] = frozenset()
    duplicate: frozenset[int] = frozenset()
    swap: tuple[tuple[int, int], ...] = ()
    truncate: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "drop", frozenset(self.drop))
        object.__setattr__(self, "duplicate", frozenset(self.duplicate))
        object.__setattr__(self, "truncate", frozenset(self.truncate))
        pairs = tuple((min(a, b), max(a, b)) for a, b in self.swap)
        members = [index for pair in pairs for index in pair]
        if any(a == b for a, b in pairs) or len(set(members)) != len(members):
            raise ConfigError(f"faults.swap: expected disjoint pairs of two different volumes (got {self.swap})")
        object.__setattr__(self, "swap", pairs)

    @property
    def is_empty(self) -> bool:
        """True when no fault is planned."""
        return not (self.drop or self.duplicate or self.swap or self.truncate)


@dataclass(frozen=True)
class Delivery:
    """One file write done by the scanner.

    Attributes
    ----------
    path : Path
        The file written.
    volume_index : int
        0-based volume index it holds.
    due_s : float
        Clock time (the injected ``clock``) of the end of its slot.
    complete : bool
        False when it was left truncated on purpose.
    """

    path: Path
    volume_index: int
    due_s: float
    complete: bool = True


class PacedWriter:
    """Writes files into a folder at a fixed pace, the way an export share delivers them.

    Parameters
    ----------
    out_dir : str or Path
        Destination folder (created on :meth:`start`).
    interval_s : float
        Seconds between slots (``tr_s / speed``).
    clock : callable, default=time.monotonic
        Returns the current time in seconds.
    sleep : callable, default=time.sleep
        Waits the given number of seconds.
    partial_write : bool, default=True
        Write in place in two parts with a pause between (see module notes); else via rename.
    partial_pause_s : float, default=0.005
        Pause between the two parts, s.
    split_fraction : float, default=0.5
        Share of the voxel data written with the first part.
    """

    def __init__(
        self,
        out_dir: str | Path,
        interval_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        partial_write: bool = True,
        partial_pause_s: float = 0.005,
        split_fraction: float = 0.5,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.interval_s = interval_s
        self.clock = clock
        self.sleep = sleep
        self.partial_write = partial_write
        self.partial_pause_s = partial_pause_s
        self.split_fraction = split_fraction
        self.start_s_: float | None = None

    def start(self) -> float:
        """Check the settings, create the folder and start the clock; returns the start time."""
        if not self.interval_s > 0:
            raise ConfigError(f"interval_s: expected seconds > 0 (got {self.interval_s})")
        if not 0.0 < self.split_fraction < 1.0:
            raise ConfigError(f"split_fraction: expected a value in (0, 1) (got {self.split_fraction})")
        if self.partial_pause_s < 0:
            raise ConfigError(f"partial_pause_s: expected seconds >= 0 (got {self.partial_pause_s})")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.start_s_ = self.clock()
        return self.start_s_

    def wait_for_slot(self, slot: int) -> float:
        """Sleep until the end of slot ``slot`` (0-based); returns that clock time."""
        if self.start_s_ is None:
            raise OrderError("PacedWriter.wait_for_slot: call start() first")
        due_s = self.start_s_ + (slot + 1) * self.interval_s
        remaining_s = due_s - self.clock()
        if remaining_s > 0:
            self.sleep(remaining_s)
        return due_s

    def deliver(
        self, name: str, payload: bytes, data_offset: int, complete: bool = True, atomic: bool = False
    ) -> Path:
        """Write ``payload`` as ``out_dir / name``.

        Parameters
        ----------
        name : str
            File name inside the folder.
        payload : bytes
            The whole file.
        data_offset : int
            Where its voxel data starts; the first part ends inside the voxel data.
        complete : bool, default=True
            False writes the first part only and leaves the file so (a truncation fault).
        atomic : bool, default=False
            Write a hidden temporary file and rename it, even with ``partial_write`` (sidecars).
        """
        path = self.out_dir / name
        if atomic or (complete and not self.partial_write):
            temporary = self.out_dir / f".{name}.part"
            temporary.write_bytes(payload)
            os.replace(temporary, path)
            return path
        split = self._split(len(payload), data_offset)
        with open(path, "wb") as handle:
            handle.write(payload[:split])
            if complete:
                handle.flush()
                self.sleep(self.partial_pause_s)
                handle.write(payload[split:])
        return path

    def append(self, name: str, header: bytes, voxels: bytes, voxel_offset: int) -> Path:
        """Grow a file in place: rewrite its ``header`` at offset 0, then write ``voxels`` at
        ``voxel_offset`` (in two parts with a pause, when ``partial_write``)."""
        path = self.out_dir / name
        with open(path, "r+b" if path.exists() else "w+b") as handle:
            handle.write(header)
            handle.seek(voxel_offset)
            split = self._split(len(voxels), 0) if self.partial_write else len(voxels)
            handle.write(voxels[:split])
            if split < len(voxels):
                handle.flush()
                self.sleep(self.partial_pause_s)
                handle.write(voxels[split:])
        return path

    def _split(self, n_bytes: int, data_offset: int) -> int:
        split = data_offset + int((n_bytes - data_offset) * self.split_fraction)
        return min(max(split, 1), n_bytes - 1)


def default_series(first_volume: np.ndarray, series_number: int = 1) -> SeriesInfo:
    """:func:`write_run`'s series: ``SeriesInfo`` numbered ``series_number``, with a pixel scaling fitted
    to the first volume's range widened by half its span on each side."""
    data = np.asarray(first_volume)
    scaling = PixelScaling.for_range(float(data.min()), float(data.max()), headroom=0.5)
    return SeriesInfo(series_number=series_number, pixel_scaling=scaling)


def write_run(
    volumes: Iterable[Volume],
    out_dir: str | Path,
    format: ExportFormat = "mosaic",
    tr_s: float | None = None,
    speed: float = 1.0,
    *,
    series: SeriesInfo | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    wall_clock: Callable[[], float] = time.time,
    partial_write: bool = True,
    partial_pause_s: float = 0.005,
    faults: FaultPlan | None = None,
) -> list[Delivery]:
    """Export a run's volumes into ``out_dir`` one TR apart (or ``speed`` times faster).

    Parameters
    ----------
    volumes : iterable of Volume
        In acquisition order; each ``data`` (nx, ny, nz), RAS+ ``affine``, ``index`` (0-based),
        ``slice_times_s`` (nz,) in s. Consumed lazily, one at a time.
    out_dir : str or Path
        The export folder.
    format : {"mosaic", "enhanced", "nifti", "nifti4d"}, default="mosaic"
        Siemens classic MOSAIC, Siemens XA enhanced DICOM, one 3D NIfTI per volume, or one
        growing 4D NIfTI.
    tr_s : float, optional
        Repetition time in s; default: the first volume's ``tr_s``.
    speed : float, default=1.0
        How many times faster than real time to write.
    series : SeriesInfo, optional
        DICOM run tags, UIDs, tile order and pixel scaling. Default: :func:`default_series` of the
        first volume (voxels outside its scaling are clipped, with a warning).
    clock, sleep : callable
        Injected time source and wait (seconds), for tests.
    wall_clock : callable, default=time.time
        Unix time of the run's start, for the files' acquisition times.
    partial_write : bool, default=True
        Files become visible before they are complete (see module notes).
    partial_pause_s : float, default=0.005
        Pause inside a partial write, s.
    faults : FaultPlan, optional
        Drops, duplicates, swaps and truncations to inject (not with "nifti4d").

    Returns
    -------
    list of Delivery
        Every write, in the order done.

    Raises
    ------
    ConfigError
        For an unknown format, a speed or TR that is not positive, or faults with "nifti4d".
    """
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"format: expected one of {', '.join(EXPORT_FORMATS)} (got {format!r})")
    if not speed > 0:
        raise ConfigError(f"speed: expected a factor > 0 (got {speed})")
    faults = faults or FaultPlan()
    if format == "nifti4d" and not faults.is_empty:
        raise ConfigError("faults: a growing 4D NIfTI has no per-volume files; use format 'nifti' to inject faults")
    iterator = iter(volumes)
    first = next(iterator, None)
    if first is None:
        return []
    tr_s = float(first.tr_s if tr_s is None else tr_s)
    if not tr_s > 0:
        raise ConfigError(f"tr_s: expected seconds > 0 (got {tr_s})")
    if series is None:
        series = default_series(first.data)
    writer = PacedWriter(
        out_dir, tr_s / speed, clock=clock, sleep=sleep,
        partial_write=partial_write, partial_pause_s=partial_pause_s,
    )
    writer.start()
    wall_start_s = wall_clock()
    encode = _Encoder(format, series, tr_s, wall_start_s, writer.interval_s)
    held_back = {b: a for a, b in faults.swap}
    waiting: dict[int, Volume] = {}
    deliveries: list[Delivery] = []

    def write(volume: Volume, due_s: float) -> None:
        complete = volume.index not in faults.truncate
        if format == "nifti4d":
            path = _append_4d(writer, encode, volume, n_written=len(deliveries))
        else:
            for name, payload, offset in encode(volume):
                is_sidecar = name.endswith(".json")
                path = writer.deliver(name, payload, offset, complete=complete or is_sidecar, atomic=is_sidecar)
        deliveries.append(Delivery(path, volume.index, due_s, complete))
        logger.info(
            "volume %d -> %s%s (%.3f s after start)",
            volume.index, path.name, "" if complete else " [truncated on purpose]", due_s - writer.start_s_,
        )

    for slot, volume in enumerate(_chain(first, iterator)):
        due_s = writer.wait_for_slot(slot)
        if volume.index in faults.drop:
            logger.info("volume %d dropped on purpose", volume.index)
            continue
        if volume.index in held_back.values():
            waiting[volume.index] = volume
            logger.info("volume %d held back on purpose (swap)", volume.index)
            continue
        write(volume, due_s)
        if volume.index in faults.duplicate:
            write(volume, due_s)
        if volume.index in held_back and held_back[volume.index] in waiting:
            write(waiting.pop(held_back[volume.index]), due_s)
    for volume in waiting.values():
        logger.warning("volume %d: its swap partner never came; written last", volume.index)
        write(volume, writer.clock())
    return deliveries


def _chain(first: Volume, rest: Iterable[Volume]) -> Iterable[Volume]:
    yield first
    yield from rest


class _Encoder:
    """Turns a volume into the files of a per-volume format: (name, bytes, voxel offset) tuples,
    the sidecar (if any) first."""

    def __init__(self, fmt: str, series: SeriesInfo, tr_s: float, wall_start_s: float, interval_s: float) -> None:
        self.fmt = fmt
        self.series = series
        self.tr_s = tr_s
        self.wall_start_s = wall_start_s
        self.interval_s = interval_s

    def acquired_at(self, volume_index: int) -> datetime:
        """Local wall-clock start of the volume's slot."""
        return datetime.fromtimestamp(self.wall_start_s + volume_index * self.interval_s)

    def with_run_tr(self, volume: Volume) -> Volume:
        return Volume(
            data=volume.data, affine=volume.affine, tr_s=self.tr_s, index=volume.index,
            slice_times_s=volume.slice_times_s, series=volume.series,
        )

    def __call__(self, volume: Volume) -> list[tuple[str, bytes, int]]:
        volume = self.with_run_tr(volume)
        if self.fmt in ("mosaic", "enhanced"):
            payload = encode_volume(volume, self.series, self.acquired_at(volume.index), self.fmt)
            n_voxel_bytes = _dicom_pixel_bytes(payload)
            return [(self.series.file_name(volume.index), payload, len(payload) - n_voxel_bytes)]
        stem = f"vol_{volume.index:05d}"
        return [
            (f"{stem}.json", self.sidecar(volume, volume.index), 0),
            (f"{stem}.nii", nifti_bytes(volume), NIFTI_HEADER_BYTES),
        ]

    def sidecar(self, volume: Volume, acquired_index: int) -> bytes:
        """BIDS sidecar: TR (s), slice times (s, along the third axis), acquisition start."""
        payload: dict = {"RepetitionTime": self.tr_s, "Manufacturer": "rtdecoder phantom"}
        if volume.slice_times_s is not None:
            payload["SliceTiming"] = [round(float(t), 6) for t in volume.slice_times_s]
            payload["SliceEncodingDirection"] = "k"
        payload["AcquisitionDateTime"] = self.acquired_at(acquired_index).isoformat()
        return (json.dumps(payload, indent=2) + "\n").encode()


def _append_4d(writer: PacedWriter, encode: _Encoder, volume: Volume, n_written: int) -> Path:
    """Grow ``bold.nii`` by one volume: the header with the new ``dim[4]`` first, then the voxels."""
    volume = encode.with_run_tr(volume)
    if n_written == 0:
        writer.deliver(f"{NIFTI_4D_STEM}.json", encode.sidecar(volume, 0), 0, atomic=True)
    header = _nifti_header(volume, n_volumes=n_written + 1).binaryblock + b"\0" * 4
    voxels = np.asarray(volume.data, dtype=np.float32).tobytes(order="F")
    return writer.append(f"{NIFTI_4D_STEM}.nii", header, voxels, NIFTI_HEADER_BYTES + n_written * len(voxels))


def _nifti_header(volume: Volume, n_volumes: int | None = None) -> nib.Nifti1Header:
    """Float32 NIfTI-1 header: qform = sform = affine (scanner space), mm and s, slice axis 2,
    ``pixdim[4]`` = TR; 4D with ``n_volumes`` volumes when given."""
    data = np.asarray(volume.data)
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape if n_volumes is None else (*data.shape, n_volumes))
    header.set_data_dtype(np.float32)
    header.set_qform(volume.affine, code=1)
    header.set_sform(volume.affine, code=1)
    header.set_xyzt_units("mm", "sec")
    header.set_dim_info(slice=2)
    header["pixdim"][4] = float(volume.tr_s)
    header["vox_offset"] = NIFTI_HEADER_BYTES
    return header


def nifti_bytes(volume: Volume) -> bytes:
    """One volume as an uncompressed 3D NIfTI-1 file (float32 voxels, qform = sform = affine,
    ``pixdim[4]`` = TR in s, slice axis 2)."""
    image = nib.Nifti1Image(np.asarray(volume.data, dtype=np.float32), volume.affine, _nifti_header(volume))
    return image.to_bytes()


def _dicom_pixel_bytes(payload: bytes) -> int:
    """Length of the voxel data at the end of a file made by :func:`encode_volume`."""
    # Pixel data is the last element: its 12-byte explicit-VR header holds the length just before.
    marker = payload.rfind(b"\xe0\x7f\x10\x00OW\x00\x00")
    if marker < 0:
        raise VolumeError("encoded DICOM has no (7FE0,0010) OW pixel data element")
    return len(payload) - (marker + 12)


def replay_dicom_folder(
    src_dir: str | Path,
    out_dir: str | Path,
    speed: float = 1.0,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    partial_write: bool = True,
    partial_pause_s: float = 0.005,
) -> list[Delivery]:
    """Copy a folder of real DICOM volumes into ``out_dir`` in acquisition order, one TR apart.

    Files are ordered by series, ``AcquisitionNumber``, ``InstanceNumber`` and then name, keep
    their names, and are paced at the first file's ``RepetitionTime`` divided by ``speed``, with
    the same partial writes as :func:`write_run`. Files that are not DICOM are ignored; files
    whose pixel data is short (caught mid-copy) are skipped with a warning.

    Parameters
    ----------
    src_dir : str or Path
        Folder of one run's DICOM files (MOSAIC or enhanced; one volume per file).
    out_dir : str or Path
        The export folder to fill.
    speed : float, default=1.0
    clock, sleep, partial_write, partial_pause_s
        As for :func:`write_run`.

    Returns
    -------
    list of Delivery
        ``volume_index`` is ``AcquisitionNumber - 1``.

    Raises
    ------
    VolumeError
        When the folder holds no complete DICOM volume or the first one has no TR.
    """
    src_dir = Path(src_dir)
    if not speed > 0:
        raise ConfigError(f"speed: expected a factor > 0 (got {speed})")
    if not src_dir.is_dir():
        raise VolumeError(f"{src_dir}: expected a folder of DICOM files")
    found = []
    for path in sorted(p for p in src_dir.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, EOFError, ValueError) as err:
            logger.debug("%s: not a DICOM file, ignored (%s)", path, err)
            continue
        n_pixel_bytes = len(ds.get("PixelData") or b"")
        if n_pixel_bytes < _expected_pixel_bytes(ds):
            logger.warning("%s: pixel data is short (%d bytes), skipped", path, n_pixel_bytes)
            continue
        key = (int(ds.get("SeriesNumber") or 0), int(ds.get("AcquisitionNumber") or 0),
               int(ds.get("InstanceNumber") or 0), path.name)
        found.append((key, path, ds, n_pixel_bytes))
    if not found:
        raise VolumeError(f"{src_dir}: expected complete DICOM volumes, found none")
    found.sort(key=lambda item: item[0])
    tr_s = _repetition_time_s(found[0][2], found[0][1])
    writer = PacedWriter(
        out_dir, tr_s / speed, clock=clock, sleep=sleep,
        partial_write=partial_write, partial_pause_s=partial_pause_s,
    )
    writer.start()
    deliveries = []
    for slot, (key, path, _ds, n_pixel_bytes) in enumerate(found):
        due_s = writer.wait_for_slot(slot)
        payload = path.read_bytes()
        written = writer.deliver(path.name, payload, max(len(payload) - n_pixel_bytes, 0))
        deliveries.append(Delivery(written, key[1] - 1, due_s))
        logger.info("replayed %s (acquisition %d) at %.3f s", path.name, key[1], due_s - writer.start_s_)
    return deliveries


def _expected_pixel_bytes(ds: pydicom.Dataset) -> int:
    frames = int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    bits = int(ds.get("BitsAllocated") or 16)
    return int(ds.get("Rows") or 0) * int(ds.get("Columns") or 0) * frames * samples * bits // 8


def _repetition_time_s(ds: pydicom.Dataset, path: Path) -> float:
    tr_ms = ds.get("RepetitionTime")
    if tr_ms is None and "SharedFunctionalGroupsSequence" in ds:
        shared = ds.SharedFunctionalGroupsSequence[0]
        if "MRTimingAndRelatedParametersSequence" in shared:
            tr_ms = shared.MRTimingAndRelatedParametersSequence[0].get("RepetitionTime")
    if tr_ms is None or float(tr_ms) <= 0:
        raise VolumeError(f"{path}: RepetitionTime: expected the TR in ms > 0 (got {tr_ms})")
    return float(tr_ms) / 1000.0


def volumes_from_array(
    volumes: np.ndarray, affine: np.ndarray, tr_s: float, slice_times_s: np.ndarray | None, series: str = ""
) -> Iterator[Volume]:
    """The volumes of a 4D run array, one :class:`Volume` at a time (views, no copies).

    Parameters
    ----------
    volumes : ndarray of shape (nx, ny, nz, n_volumes)
    affine : ndarray of shape (4, 4)
        Voxel to RAS+ mm.
    tr_s : float
        Repetition time, s.
    slice_times_s : ndarray of shape (nz,) or None
        Slice acquisition times after each volume's start, s.
    series : str
        Run name put in each volume.
    """
    volumes = np.asarray(volumes)
    if volumes.ndim != 4:
        raise VolumeError(f"volumes: expected shape (nx, ny, nz, n_volumes), got {volumes.shape}")
    for index in range(volumes.shape[3]):
        yield Volume(
            data=volumes[..., index], affine=affine, tr_s=tr_s, index=index,
            slice_times_s=slice_times_s, series=series,
        )
