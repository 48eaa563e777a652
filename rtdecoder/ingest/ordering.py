"""Release the volumes of one run in acquisition order, whatever order they arrive in.

Volumes arrive late, out of order, twice or never. The orderer holds a volume that arrives
ahead of a gap, releases it as soon as the gap fills, drops (and logs) duplicates, and when a
gap has lasted ``missing_wait_s`` since a later volume arrived, declares the missing index with
an explicit :class:`MissingVolume` marker, so the GLM can leave that scan out of its model
instead of silently shifting every later volume by one TR.

A gap is only known once a later volume has arrived; a run's final volumes, if lost, are
declared by :meth:`VolumeOrderer.flush` at the end of the run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from rtdecoder.errors import OrderError
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
