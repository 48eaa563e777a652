"""Watch the scanner's export folder and take each volume file once it is completely written.

Two layers, so the logic can be tested without threads or sleeping:

- :class:`VolumeCollector` is a plain object fed with "this file appeared or changed" calls and
  a clock. It reads the file; a file that is not complete yet stays pending and is read again
  on its next change (or :meth:`VolumeCollector.retry_pending`), until ``incomplete_timeout_s``
  after it was first seen, when it is reported as a :class:`FileProblem`. A reported file is
  not forgotten: if it changes again it is read again.
- :class:`FolderWatcher` runs a watchdog observer (inotify, or polling for network shares where
  inotify stays silent) whose events a worker thread feeds into the collector. Volumes come out
  of :meth:`FolderWatcher.get` in arrival order; :mod:`rtdecoder.ingest.ordering` puts them in
  acquisition order.

Each volume leaves the collector with its 0-based index in its run: a
:class:`~rtdecoder.ingest.ordering.RunNumbering` maps NIfTI files numbered from 1 (or from 0) by
their names, deciding each run's base from its first file. A file whose number cannot be mapped
is a :class:`FileProblem`; it is read again once a run's base gets decided by another file.
NIfTI files without a TR take the run's TR (``default_tr_s``) when given.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from rtdecoder.errors import IncompleteVolumeError, OrderError, VolumeError
from rtdecoder.ingest.nifti import is_nifti, is_nifti_series
from rtdecoder.ingest.ordering import RunNumbering
from rtdecoder.ingest.readers import read_volume
from rtdecoder.ingest.volume import Volume

logger = logging.getLogger(__name__)

# Names an exporter writes beside the volumes, or uses while a file is being written.
# Sidecars, notes and the events files labs (and the phantom scanner) leave beside the volumes.
_IGNORED_SUFFIXES = (".json", ".tmp", ".part", ".txt", ".log", ".lock", ".tsv", ".csv", ".md")


@dataclass(frozen=True)
class FileProblem:
    """A file that could not be taken: unreadable, or still incomplete after the timeout.

    Attributes
    ----------
    path : Path
    seen_s : float
        When the file was first seen (clock seconds).
    reported_s : float
        When the problem was reported (clock seconds).
    error : VolumeError
        What is wrong; an :class:`IncompleteVolumeError` when the file never completed.
    """

    path: Path
    seen_s: float
    reported_s: float
    error: VolumeError


@dataclass
class _Pending:
    seen_s: float | None  # None: a growing file with no change since its last volume
    next_volume: int = 0  # volumes already taken from a growing 4D NIfTI
    reported: bool = False
    numbering_failed: tuple[Path, str] | None = None  # (folder, series) whose numbering refused it
    reported_stamp: tuple[int, int] | None = None  # (size, mtime_ns) of the content reported


def is_volume_file(path: str | Path) -> bool:
    """Whether a file name may hold a volume (not hidden, not a sidecar or temporary file)."""
    name = Path(path).name
    return not name.startswith(".") and not name.lower().endswith(_IGNORED_SUFFIXES)


class VolumeCollector:
    """Turn "file seen or changed" notices into complete volumes; no threads, injected clock.

    Parameters
    ----------
    incomplete_timeout_s : float, default=10.0
        How long after it was first seen a file may stay incomplete before it is reported.
    clock : callable returning float, default=time.time
        Epoch seconds; stamps ``Volume.times.seen_s`` and ``complete_s``.
    read : callable, optional
        ``read(path, index_hint) -> Volume``; raises IncompleteVolumeError or VolumeError.
        Default :func:`~rtdecoder.ingest.readers.read_volume` with ``default_tr_s``; a reader
        given here takes care of the TR itself.
    on_volume : callable, optional
        Called with each volume taken.
    on_problem : callable, optional
        Called with each :class:`FileProblem`.
    default_tr_s : float, optional
        The run's TR in s, for NIfTI files that carry none (``Volume.tr_source == "default"``).
    numbering : RunNumbering, optional
        Maps each volume to its 0-based index in its run; a new one by default.
    """

    def __init__(
        self,
        incomplete_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
        read: Callable[[Path, int | None], Volume] | None = None,
        on_volume: Callable[[Volume], None] | None = None,
        on_problem: Callable[[FileProblem], None] | None = None,
        default_tr_s: float | None = None,
        numbering: RunNumbering | None = None,
    ) -> None:
        self.incomplete_timeout_s = incomplete_timeout_s
        self.clock = clock
        self.default_tr_s = default_tr_s
        self.read = read if read is not None else self._read_volume
        self.numbering = numbering if numbering is not None else RunNumbering()
        self.on_volume = on_volume
        self.on_problem = on_problem
        self.volumes_: list[Volume] = []
        self.problems_: list[FileProblem] = []
        self._pending: dict[Path, _Pending] = {}  # files not (or not yet fully) taken
        self._growing: dict[Path, _Pending] = {}  # 4D NIfTI files that may get more volumes
        self._done: set[Path] = set()

    def _read_volume(self, path: Path, index_hint: int | None) -> Volume:
        return read_volume(path, index_hint, default_tr_s=self.default_tr_s)

    @property
    def pending_paths(self) -> list[Path]:
        """Files seen but not taken yet (incomplete, or waiting after a reported problem)."""
        return sorted(self._pending)

    def file_changed(self, path: str | Path) -> list[Volume]:
        """A file appeared or changed: take it if complete, else keep it pending.

        Parameters
        ----------
        path : str or Path

        Returns
        -------
        list of Volume
            The volumes taken from it now (several for a 4D NIfTI that grew by several).
        """
        path = Path(path)
        if not is_volume_file(path):
            return []
        if path in self._growing:
            state = self._growing[path]
            if state.seen_s is None:  # the first change since its last volume was taken
                state.seen_s = self.clock()
            return self._take(path, state)
        if path in self._done:
            # Rewritten after it was taken: the scanner does not do that, so it is a copy or a
            # touch; the orderer would drop it as a duplicate anyway.
            logger.debug("%s changed after it was taken; ignored", path)
            return []
        state = self._pending.get(path)
        if state is None:
            state = self._pending[path] = _Pending(seen_s=self.clock())
        if state.reported and state.reported_stamp == _stamp(path):
            # More events for the bytes already reported (a close after a write, a touch): one
            # report per content, not one per event.
            return []
        state.reported = False  # a change after a report earns a new timeout window
        return self._take(path, state)

    def retry_pending(self) -> list[Volume]:
        """Read every pending file again, and report those incomplete for too long.

        Returns
        -------
        list of Volume
            Volumes taken now.
        """
        taken: list[Volume] = []
        for path, state in list(self._pending.items()):
            if not state.reported:
                taken.extend(self._take(path, state))
        return taken

    def _take(self, path: Path, state: _Pending) -> list[Volume]:
        taken: list[Volume] = []
        while True:
            if not path.exists():
                logger.debug("%s vanished before it was read (renamed or deleted)", path)
                self._pending.pop(path, None)
                self._growing.pop(path, None)
                return taken
            try:
                volume = self.read(path, state.next_volume if is_nifti(path) else None)
            except IncompleteVolumeError as err:
                if path in self._growing:
                    # Waiting for the next append is normal for a growing 4D file.
                    if taken:
                        state.seen_s = None
                    return taken
                self._check_timeout(path, state, err)
                return taken
            except VolumeError as err:
                self._report(path, state, err)
                return taken
            n_decided = self.numbering.n_decided
            try:
                self.numbering.assign(volume)
            except VolumeError as err:
                state.numbering_failed = (path.parent, volume.series)
                self._report(path, state, err)
                return taken
            if self.numbering.n_decided > n_decided:
                self._retry_numbering_failures((path.parent, volume.series))
            volume.times.seen_s = state.seen_s
            volume.times.complete_s = self.clock()
            taken.append(volume)
            self.volumes_.append(volume)
            if self.on_volume is not None:
                self.on_volume(volume)
            if not self._more_to_come(path, state):
                self._pending.pop(path, None)
                self._growing.pop(path, None)
                self._done.add(path)
                return taken
            state.next_volume += 1

    def _more_to_come(self, path: Path, state: _Pending) -> bool:
        if path not in self._growing:
            try:
                series = is_nifti(path) and is_nifti_series(path)
            except IncompleteVolumeError:
                # Rewritten since it was read (a duplicate export): the volume read is kept, and
                # the rewrite arrives as a new event, which ordering drops as a duplicate.
                series = False
            if not series:
                return False
        # A 4D file may grow until the run ends, so it is never done.
        self._growing[path] = state
        self._pending.pop(path, None)
        return True

    def _retry_numbering_failures(self, run: tuple[Path, str]) -> None:
        # A file refused while its run's base was undecided (it arrived before the run's first
        # file) can be numbered now: retry_pending reads it again instead of leaving it reported.
        for state in self._pending.values():
            if state.numbering_failed == run:
                state.numbering_failed, state.reported = None, False

    def _check_timeout(self, path: Path, state: _Pending, err: VolumeError) -> None:
        if not state.reported and self.clock() - state.seen_s >= self.incomplete_timeout_s:
            self._report(path, state, err)

    def _report(self, path: Path, state: _Pending, err: VolumeError) -> None:
        state.reported = True
        state.reported_stamp = _stamp(path)
        problem = FileProblem(path=path, seen_s=state.seen_s, reported_s=self.clock(), error=err)
        self.problems_.append(problem)
        logger.error("cannot take %s: %s", path, err)
        if self.on_problem is not None:
            self.on_problem(problem)


def _stamp(path: Path) -> tuple[int, int] | None:
    """A file's size and modification time (ns), which change when its content does."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns


class _EventForwarder(FileSystemEventHandler):
    """Puts the path of every created, written, closed or moved-in file on a queue."""

    def __init__(self, paths: queue.SimpleQueue[Path]) -> None:
        self.paths = paths

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type not in ("created", "modified", "closed", "moved"):
            return
        target = event.dest_path if event.event_type == "moved" else event.src_path
        self.paths.put(Path(os.fsdecode(target)))


class FolderWatcher:
    """Watch one folder in a background thread and queue each complete volume.

    Parameters
    ----------
    folder : str or Path
        The export folder.
    watch_mode : {"inotify", "polling"}, default="inotify"
        "polling" compares directory listings every ``poll_interval_s``; needed on network
        shares written by another machine, where inotify never fires.
    poll_interval_s : float, default=0.02
        Polling period, and how often pending files are re-read and timeouts checked.
    incomplete_timeout_s : float, default=10.0
        See :class:`VolumeCollector`.
    include_existing : bool, default=False
        Also take files already in the folder at :meth:`start`.
    recursive : bool, default=False
        Watch sub-folders too (a scanner or converter that writes each series into a folder of its own).
    clock : callable returning float, default=time.time
    default_tr_s : float, optional
        The run's TR in s (``--tr-s`` / ``scanner.tr_s``), for NIfTI files that carry none.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     with FolderWatcher(folder, watch_mode="polling") as watcher:
    ...         watcher.get(timeout_s=0.05) is None
    True
    """

    def __init__(
        self,
        folder: str | Path,
        watch_mode: Literal["inotify", "polling"] = "inotify",
        poll_interval_s: float = 0.02,
        incomplete_timeout_s: float = 10.0,
        include_existing: bool = False,
        recursive: bool = False,
        clock: Callable[[], float] = time.time,
        default_tr_s: float | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.default_tr_s = default_tr_s
        self.watch_mode = watch_mode
        self.poll_interval_s = poll_interval_s
        self.incomplete_timeout_s = incomplete_timeout_s
        self.include_existing = include_existing
        self.recursive = recursive
        self.clock = clock
        self.problems: queue.SimpleQueue[FileProblem] = queue.SimpleQueue()
        self._volumes: queue.SimpleQueue[Volume] = queue.SimpleQueue()
        self._paths: queue.SimpleQueue[Path] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._observer = None
        self._thread: threading.Thread | None = None
        self._failure: Exception | None = None

    @classmethod
    def from_config(cls, folder: str | Path, config, **kwargs) -> FolderWatcher:
        """Build from an :class:`rtdecoder.config.IngestConfig` section."""
        return cls(
            folder,
            watch_mode=config.watch_mode,
            poll_interval_s=config.poll_interval_s,
            incomplete_timeout_s=config.incomplete_timeout_s,
            **kwargs,
        )

    def start(self) -> FolderWatcher:
        """Start watching; returns ``self``.

        Raises
        ------
        VolumeError
            When the folder does not exist.
        OrderError
            When already started.
        ValueError
            When ``watch_mode`` or ``poll_interval_s`` is invalid.
        """
        if self._thread is not None:
            raise OrderError("FolderWatcher.start: already started; call stop() first")
        if self.watch_mode not in ("inotify", "polling"):
            raise ValueError(f"watch_mode must be 'inotify' or 'polling' (got {self.watch_mode!r})")
        if self.poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0 seconds (got {self.poll_interval_s})")
        if not self.folder.is_dir():
            raise VolumeError(f"{self.folder}: export folder: expected an existing directory")
        collector = VolumeCollector(
            incomplete_timeout_s=self.incomplete_timeout_s,
            clock=self.clock,
            on_volume=self._volumes.put,
            on_problem=self.problems.put,
            default_tr_s=self.default_tr_s,
        )
        observer = (
            PollingObserver(timeout=self.poll_interval_s)
            if self.watch_mode == "polling"
            else Observer(timeout=self.poll_interval_s)
        )
        observer.schedule(_EventForwarder(self._paths), str(self.folder), recursive=self.recursive)
        observer.start()  # before listing the folder, so no file falls between the two
        if self.include_existing:
            for path in self._existing_files():
                self._paths.put(path)
        self._observer = observer
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(collector,), name="rtdecoder-watcher", daemon=True
        )
        self._thread.start()
        logger.info("watching %s (%s)", self.folder, self.watch_mode)
        return self

    def _existing_files(self) -> list[Path]:
        """Files already in the folder (and its sub-folders when recursive), folder by folder in name order."""
        if not self.recursive:
            return [Path(e.path) for e in sorted(os.scandir(self.folder), key=lambda e: e.name) if e.is_file()]
        found = []
        for root, dirs, files in os.walk(self.folder):
            dirs.sort()
            found += [Path(root) / name for name in sorted(files)]
        return found

    def get(self, timeout_s: float | None = None) -> Volume | None:
        """Next complete volume in arrival order, or ``None`` after ``timeout_s`` seconds."""
        try:
            return self._volumes.get(timeout=timeout_s)
        except queue.Empty:
            if self._failure is not None:
                raise OrderError(
                    f"FolderWatcher for {self.folder}: its thread stopped on {self._failure!r}; "
                    "see the log, then start a new watcher"
                ) from self._failure
            return None

    def __iter__(self) -> Iterator[Volume]:
        """Volumes as they come, until :meth:`stop` (then whatever is left is yielded)."""
        while True:
            volume = self.get(timeout_s=self.poll_interval_s)
            if volume is not None:
                yield volume
            elif self._stop.is_set():
                return

    def stop(self) -> None:
        """Stop the observer and the worker thread and wait for them; safe to call twice."""
        self._stop.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
            self._observer = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> FolderWatcher:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self, collector: VolumeCollector) -> None:
        try:
            self._feed(collector)
        except Exception as err:  # a bug must not leave get() waiting forever on a dead thread
            logger.exception("watcher thread for %s stopped", self.folder)
            self._failure = err
            self._stop.set()

    def _feed(self, collector: VolumeCollector) -> None:
        while not self._stop.is_set():
            try:
                path = self._paths.get(timeout=self.poll_interval_s)
            except queue.Empty:
                path = None
            seen = set()
            while path is not None:
                if path not in seen:  # one burst of events for a file means one read
                    seen.add(path)
                    collector.file_changed(path)
                try:
                    path = self._paths.get_nowait()
                except queue.Empty:
                    path = None
            collector.retry_pending()
