"""Release the volumes of one run in acquisition order, whatever order they arrive in.

Volumes arrive late, out of order, twice or never. The orderer holds a volume that arrives
ahead of a gap, releases it as soon as the gap fills, drops (and logs) duplicates, and when a
gap has lasted ``missing_wait_s`` since a later volume arrived, declares the missing index with
an explicit :class:`MissingVolume` marker, so the GLM can leave that scan out of its model
instead of silently shifting every later volume by one TR.

A gap is only known once a later volume has arrived; a run's final volumes, if lost, are
declared by :meth:`VolumeOrderer.flush` at the end of the run.

Before ordering, every volume needs its 0-based index in its run. Most files carry it (DICOM
numbers, a 4D NIfTI's positions, converters' numbers that count from 1), but a NIfTI file name
that merely ends in a number (``vol_00001.nii.gz``) may count from 0 or from 1, and a one-TR
shift is silent downstream. :class:`RunNumbering` decides that once per run, from the run's first
file, and refuses to guess when the first number is neither 0 nor 1.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rtdecoder.errors import OrderError, VolumeError
from rtdecoder.ingest.nifti import VolumeName, is_nifti, parse_volume_name
from rtdecoder.ingest.volume import Volume

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MissingVolume:
    """Marker for a volume that never arrived; downstream drops this scan from the model.

    Attributes
    ----------
    index : int
        0-based acquisition index of the missing volume.
    series : str
        The run it belongs to (as in :attr:`Volume.series`).
    declared_s : float
        Clock time at which it was declared missing, s.
    """

    index: int
    series: str
    declared_s: float


class VolumeOrderer:
    """Reorder one run's volumes by acquisition index and declare the ones that never came.

    Parameters
    ----------
    first_index : int, default=0
        Index of the run's first volume.
    missing_wait_s : float, default=4.0
        How long a gap may stay open after a later volume arrived before it is declared
        missing, in seconds of ``clock``.
    clock : callable returning float, default=time.monotonic
        Time source in seconds; tests inject a fake one.

    Examples
    --------
    >>> import numpy as np
    >>> def vol(i):
    ...     return Volume(data=np.zeros((2, 2, 2), np.float32), affine=np.eye(4), tr_s=1.0, index=i)
    >>> now = [0.0]
    >>> orderer = VolumeOrderer(first_index=0, missing_wait_s=2.0, clock=lambda: now[0])
    >>> [v.index for v in orderer.push(vol(1))]  # held: 0 has not come yet
    []
    >>> [v.index for v in orderer.push(vol(0))]
    [0, 1]
    >>> orderer.push(vol(3))
    []
    >>> now[0] = 2.5
    >>> [type(v).__name__ for v in orderer.poll()]
    ['MissingVolume', 'Volume']
    """

    def __init__(
        self,
        first_index: int = 0,
        missing_wait_s: float = 4.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if first_index < 0:
            raise ValueError(f"first_index must be >= 0 (got {first_index})")
        if missing_wait_s < 0:
            raise ValueError(f"missing_wait_s must be >= 0 seconds (got {missing_wait_s})")
        self.first_index = first_index
        self.missing_wait_s = missing_wait_s
        self.clock = clock
        self.next_index_ = first_index
        self.series_: str | None = None
        self._held: dict[int, tuple[Volume, float]] = {}  # index -> (volume, arrival clock time)
        self.n_duplicates_ = 0
        self.n_missing_ = 0

    @property
    def n_held(self) -> int:
        """Volumes received but waiting for an earlier one."""
        return len(self._held)

    def push(self, volume: Volume) -> list[Volume | MissingVolume]:
        """Take one arrived volume; return what can now be released, in order.

        Parameters
        ----------
        volume : Volume

        Returns
        -------
        list of Volume or MissingVolume
            Consecutive items starting at the next expected index; empty when it must wait.

        Raises
        ------
        OrderError
            When the volume belongs to another run than the ones before it.
        """
        if self.series_ is None:
            self.series_ = volume.series
        elif volume.series != self.series_:
            raise OrderError(
                f"volume {volume.index} from {volume.source}: series {volume.series!r} differs "
                f"from this run's {self.series_!r}; start a new VolumeOrderer for each run"
            )
        if volume.index < self.next_index_ or volume.index in self._held:
            self.n_duplicates_ += 1
            why = "already held" if volume.index in self._held else "already released or declared missing"
            logger.warning(
                "dropping volume %d from %s: %s (next expected %d)",
                volume.index, volume.source, why, self.next_index_,
            )
            return self.poll()
        self._held[volume.index] = (volume, self.clock())
        return self.poll()

    def poll(self) -> list[Volume | MissingVolume]:
        """Release what is ready, declaring gaps that waited ``missing_wait_s``; call it regularly.

        Returns
        -------
        list of Volume or MissingVolume
            In index order; empty when nothing is ready.
        """
        released: list[Volume | MissingVolume] = self._release_consecutive()
        while self._held:
            oldest_arrival_s = min(arrived for _, arrived in self._held.values())
            now = self.clock()
            if now - oldest_arrival_s < self.missing_wait_s:
                break
            released.extend(self._declare_up_to(min(self._held), now))
            released.extend(self._release_consecutive())
        return released

    def flush(self) -> list[Volume | MissingVolume]:
        """End of run: declare every remaining gap at once and release all held volumes.

        Returns
        -------
        list of Volume or MissingVolume
            In index order.
        """
        released = self._release_consecutive()
        now = self.clock()
        while self._held:
            released.extend(self._declare_up_to(min(self._held), now))
            released.extend(self._release_consecutive())
        return released

    def _release_consecutive(self) -> list[Volume | MissingVolume]:
        released: list[Volume | MissingVolume] = []
        while self.next_index_ in self._held:
            released.append(self._held.pop(self.next_index_)[0])
            self.next_index_ += 1
        return released

    def _declare_up_to(self, stop_index: int, now: float) -> list[MissingVolume]:
        missing = [
            MissingVolume(index=i, series=self.series_ or "", declared_s=now)
            for i in range(self.next_index_, stop_index)
        ]
        for marker in missing:
            logger.warning(
                "volume %d of series %r declared missing after %.2f s", marker.index,
                marker.series, self.missing_wait_s,
            )
        self.n_missing_ += len(missing)
        self.next_index_ = stop_index
        return missing


@dataclass
class _RunNumbers:
    base: int | None = None  # a generic number minus this is the 0-based index
    decided_by: Path | None = None  # the file whose number decided the base
    sidecar_files: dict[int, Path | None] = field(default_factory=dict)  # sidecar index -> first file
    sidecar_trusted: bool = True


class RunNumbering:
    """Give each volume its 0-based index in its run, deciding once per run how its files count.

    Volumes whose index the file fixes pass unchanged: DICOM numbers, a 4D NIfTI's positions, a
    sidecar's ``AcquisitionNumber`` and SPM's and dcm2niix's numbers (which count from 1, already
    mapped by the reader: see :mod:`rtdecoder.ingest.nifti`). A generic number at the end of a NIfTI
    file name (``Volume.index_source == "name"``) is mapped by its run's base, decided from the
    run's first file: the lowest number among the run's files in its folder when the first of
    them is read (the first file alone with ``look_in_folder=False``). 0 or 1 is the base, logged
    once at INFO naming that file. Any other number cannot tell a late start from lost files, so
    it is a :class:`VolumeError` naming the file and how to fix it, and the base stays undecided
    (a lower-numbered file read later may still decide it).

    It also guards against one sidecar copied beside every volume: when two files whose names
    carry different numbers have the same sidecar ``AcquisitionNumber``, the run's sidecars do not
    number its volumes, and its volumes are numbered by their names from then on (warned once).

    A run is a series (:attr:`Volume.series`) in one folder. Use one object for a whole session
    (the watcher keeps one) or one per run (calibration): runs never share a base.

    Parameters
    ----------
    look_in_folder : bool, default=True
        Let the run's files already in its folder decide the base, so a run whose files arrive
        out of order, or that is read again after a restart, is numbered the same.

    Examples
    --------
    >>> import numpy as np
    >>> def vol(name, number):
    ...     return Volume(data=np.zeros((2, 2, 2), np.float32), affine=np.eye(4), tr_s=1.0, index=number,
    ...                   series="vol", source=Path("/no/such/folder", name), index_source="name")
    >>> numbering = RunNumbering()
    >>> numbering.index_of(vol("vol_00001.nii.gz", 1)), numbering.index_of(vol("vol_00002.nii.gz", 2))
    (0, 1)
    """

    def __init__(self, look_in_folder: bool = True) -> None:
        self.look_in_folder = look_in_folder
        self._runs: dict[tuple[str, str], _RunNumbers] = {}

    @property
    def n_decided(self) -> int:
        """Runs whose base is decided so far."""
        return sum(state.base is not None for state in self._runs.values())

    def base_of(self, volume: Volume) -> int | None:
        """The number the run of ``volume`` gives its first file (0 or 1), or None while undecided."""
        state = self._runs.get(self._key(volume))
        return None if state is None else state.base

    def index_of(self, volume: Volume) -> int:
        """The 0-based index of ``volume`` in its run; decides the run's base at its first file.

        Parameters
        ----------
        volume : Volume
            As a reader returned it (``index`` and ``index_source`` as read).

        Returns
        -------
        int

        Raises
        ------
        VolumeError
            When the run's first file is numbered neither 0 nor 1, or a file's number is below
            its run's base; the message names the file and says how to fix it.
        """
        state = self._runs.setdefault(self._key(volume), _RunNumbers())
        if volume.index_source == "sidecar":
            return self._sidecar_index(volume, state)
        if volume.index_source != "name":
            return volume.index
        return self._name_index(volume, state, self._name(volume))

    def assign(self, volume: Volume) -> Volume:
        """Set ``volume.index`` to :meth:`index_of` (safe to call twice); returns ``volume``.

        Raises
        ------
        VolumeError
            As :meth:`index_of`.
        """
        volume.index = self.index_of(volume)
        state = self._runs[self._key(volume)]
        if volume.index_source == "sidecar" and not state.sidecar_trusted:
            volume.index_source = "name"
        return volume

    @staticmethod
    def _key(volume: Volume) -> tuple[str, str]:
        folder = str(volume.source.parent) if volume.source is not None else ""
        return folder, volume.series

    @staticmethod
    def _name(volume: Volume) -> VolumeName:
        if volume.source is None:  # a volume made in memory: its index is the number as read
            return VolumeName("name", volume.series, volume.index, None, "number")
        return parse_volume_name(volume.source)

    def _sidecar_index(self, volume: Volume, state: _RunNumbers) -> int:
        if state.sidecar_trusted:
            earlier = state.sidecar_files.setdefault(volume.index, volume.source)
            if earlier == volume.source or earlier is None or volume.source is None:
                return volume.index
            mine, theirs = parse_volume_name(volume.source), parse_volume_name(earlier)
            if mine.number is None or theirs.number is None or mine.number == theirs.number:
                return volume.index  # the same volume exported twice: the orderer drops the copy
            state.sidecar_trusted = False
            logger.warning(
                "%s: sidecar AcquisitionNumber %d is also %s's, whose name has another number: the sidecars of "
                "series %r do not number its volumes (one sidecar copied beside each?); its volumes are "
                "numbered by their file names from now on", volume.source, volume.index + 1, earlier.name,
                volume.series,
            )
        name = self._name(volume)
        if name.number is None:
            return volume.index
        return self._name_index(volume, state, name)

    def _name_index(self, volume: Volume, state: _RunNumbers, name: VolumeName) -> int:
        assert name.number is not None
        first = name.first_number
        if first is None:
            if state.base is None:
                self._decide_base(volume, state, name)
            first = state.base
        index = name.number - first
        if index < 0:
            by_run = name.first_number is None and state.decided_by is not None
            decided = f", decided from {state.decided_by.name}" if by_run else ""
            raise VolumeError(
                f"{volume.source}: file name ({name.field}): expected a number >= {first}, the number of the "
                f"run's first volume{decided} (got {name.number}); rename the file, or give it a sidecar JSON "
                "with its AcquisitionNumber (from 1)"
            )
        return index

    def _decide_base(self, volume: Volume, state: _RunNumbers, name: VolumeName) -> None:
        lowest, lowest_path = name.number, volume.source
        if self.look_in_folder and volume.source is not None:
            try:
                entries = [entry.name for entry in os.scandir(volume.source.parent)]
            except OSError:
                entries = []  # a folder that cannot be listed leaves the decision to this file
            for entry in entries:
                if entry.startswith(".") or not is_nifti(entry):
                    continue
                other = parse_volume_name(entry)
                if other.scheme == "name" and other.series == name.series and other.number < lowest:
                    lowest, lowest_path = other.number, volume.source.with_name(entry)
        shown = lowest_path.name if lowest_path is not None else "this volume"
        if lowest not in (0, 1):
            stem = Path(volume.source.name.removesuffix(".gz")).stem if volume.source is not None else "<file>"
            raise VolumeError(
                f"{volume.source}: file name ({name.field}): expected the run's first file numbered 0 or 1 "
                f"(the lowest of series {name.series!r} is {lowest}, {shown}), so that its number says which "
                f"volume of the run each file is; rename the files so the run starts at 0 or 1, or give each "
                f"file a sidecar JSON ({stem}.json) with its AcquisitionNumber (from 1)"
            )
        state.base, state.decided_by = lowest, lowest_path
        logger.info(
            "%s: series %r numbers its files from %d (%s), so a file's volume index is its number - %d",
            volume.source, name.series, lowest, shown, lowest,
        )
