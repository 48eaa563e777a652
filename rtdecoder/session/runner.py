"""The live session: ingest -> front end -> journal -> publish, with decoding beside it.

One :class:`LiveSession` serves a whole scanning session: the publisher, the journal, the decode
thread, the model and its candidates are set up once, and the runs follow one another.

Threads:

- the watcher thread (:class:`~rtdecoder.ingest.watcher.FolderWatcher`) reads complete files
  from the export folder and its sub-folders;
- the session thread (:meth:`LiveSession.run_session`) tells runs apart, orders volumes, runs
  the front end, journals and publishes volume and beta messages, and queues betas for decoding;
- the decode thread (:class:`~rtdecoder.session.decode_worker.DecodeWorker`).

Runs. A run starts with the first volume of a series not seen before (a new series number, or a
new sub-folder of the export folder) whose index is at most ``NEW_RUN_MAX_FIRST_INDEX`` (its
first volumes may be late); a file of an unknown series further into its numbering is a stray
and is reported as a ``file_problem``. A run ends, whichever comes first:

- at its planned length: ``n_volumes`` of its :class:`RunPlan`, or, without one, the end of its
  events (the last trial's end plus ``session.run_tail_s``);
- when the stimulus software asks (``run_end`` on the control socket, or ``run_start`` of the
  next run);
- when the next series starts;
- ``session.idle_timeout_s`` after its latest volume (counted from its first volume: before it
  the run is ``waiting`` and says so at every heartbeat).

A signal (``stop``) ends the session, not the run: the status says ``stopped``, no ``run_end``
is journaled, and a restart on the same session folder resumes the run.

Timing and geometry come from the data. The TR is the first volume's (header, sidecar or DICOM);
the run's plan (``--tr-s``), the config's ``scanner.tr_s`` and the bundle's calibration TR must
agree with it, or the run stops before its first beta with an error naming each value and where
it came from. Files that carry no TR take the plan's or the config's. Slice times of the first
volume set the GLM's ``slice_time_ref_s`` (``glm.slice_time_ref_s``).

Without a bundle the session is a front end only (motion correction, QA, single-trial betas,
journal), on the session's own geometry: the motion reference is the given reference volume or
the session's first volume, the mask the given one or an EPI brain mask of the reference
(:func:`nilearn.masking.compute_epi_mask`), and data are percent signal change of the reference.

Every message is journaled (with its sequence number and publish time) before it is sent, and
every volume's preprocessed mask values are journaled too. Starting again on the same session
folder after a crash replays the journal (:mod:`rtdecoder.session.resume`): the open run's GLM
is rebuilt from the journaled values, the sequence numbering continues, nothing already
published is sent again, betas that were published but not yet decoded are decoded, and files of
runs that already ended are recognised and left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rtdecoder_client.messages import Message, status_text
from rtdecoder_client.payloads import BetaData, VolumeData

from rtdecoder.bundle import SubjectBundle
from rtdecoder.config import RTDecoderConfig
from rtdecoder.decode.protocol import BetaDecoder, Decoded  # noqa: F401  (Decoded: re-exported for callers)
from rtdecoder.errors import ConfigError, DecoderError, JournalError, VolumeError
from rtdecoder.glm.design import TrialLike
from rtdecoder.glm.incremental import TrialBeta
from rtdecoder.ingest.ordering import MissingVolume, VolumeOrderer
from rtdecoder.ingest.volume import Volume
from rtdecoder.ingest.watcher import FolderWatcher
from rtdecoder.preprocess.mask import VoxelMask
from rtdecoder.preprocess.qa import RunningTSNR
from rtdecoder.publish.control import ControlRequest, OnsetRequest, RunEndRequest, RunStartRequest
from rtdecoder.publish.publisher import ResultPublisher
from rtdecoder.session.decode_worker import DecodeJob, DecodeWorker
from rtdecoder.session.frontend import FrontEnd, ProcessedVolume, build_run_frontend
from rtdecoder.session.journal import Journal
from rtdecoder.session.resume import JournalState, RunRecords, published_since

logger = logging.getLogger(__name__)

JOURNAL_NAME = "journal.bin"
#: A series not seen before starts a run only with one of its first volumes (0-based index at
#: most this): the first one or two may arrive late or be lost, but a file far into an unknown
#: series is a stray from another protocol, not the start of a run.
NEW_RUN_MAX_FIRST_INDEX = 2
_POLL_S = 0.02
_TR_TOLERANCE_S = 1e-3


@dataclass
class RunPlan:
    """What is known of a run before it starts.

    Attributes
    ----------
    run : str
        Run label used in messages and the journal (e.g. ``"run-01"``).
    watch_dir : Path or None
        The export folder (used by :meth:`LiveSession.run`; a session watches one folder).
    n_volumes : int or None
        Volumes the run will have. ``None``: the run ends at its events' end, when asked, at a
        new series or after the idle timeout.
    tr_s : float or None
        Repetition time given by the operator (``--tr-s``), s; checked against the volumes'.
    trials : sequence of TrialLike
        Trials known in advance (from ``events.tsv``); more can be announced live.
    """

    run: str
    watch_dir: Path | None = None
    n_volumes: int | None = None
    tr_s: float | None = None
    trials: Sequence[TrialLike] = ()


@dataclass
class RunSummary:
    """Counts and latencies of a finished run (latencies in ms)."""

    run: str
    n_volumes: int = 0
    n_missing: int = 0
    n_betas: int = 0
    n_decoded: int = 0
    n_reconstructed: int = 0
    n_skipped_reconstructions: int = 0
    resumed_from_tr_index: int = -1
    end_reason: str = ""
    tr_s: float | None = None
    volume_latency_ms: list[float] = field(default_factory=list)
    publish_latency_ms: list[float] = field(default_factory=list)
    decode_latency_ms: list[float] = field(default_factory=list)
    fd_mm: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class AnnouncedTrial:
    """A trial whose onset the stimulus software announced on the control socket."""

    trial_id: str
    onset_s: float
    duration_s: float
    stim_id: str | None = None


class SessionGeometry:
    """The voxels a session reads: mask, motion reference and the baseline of percent signal change.

    Parameters
    ----------
    mask : VoxelMask
    reference : ndarray of float32, shape (nx, ny, nz)
        Motion reference on the mask's grid.
    signal_mean : ndarray of shape (n_voxels,)
        Per-voxel baseline; data become ``100 * (v / signal_mean - 1)``.
    hrf_index : ndarray of int, shape (n_voxels,), or None
        Library HRF per voxel (a bundle's; ``None``: the config's HRF for every voxel).
    bundle : SubjectBundle or None
        Where it came from, when a calibration made it.
    source : str
        Named in logs and errors.
    """

    def __init__(
        self, mask: VoxelMask, reference: np.ndarray, signal_mean: np.ndarray, hrf_index: np.ndarray | None,
        bundle: SubjectBundle | None, source: str,
    ) -> None:
        self.mask = mask
        self.reference = np.asarray(reference, dtype=np.float32)
        self.signal_mean = np.asarray(signal_mean, dtype=np.float64)
        self.hrf_index = hrf_index
        self.bundle = bundle
        self.source = source

    @classmethod
    def from_bundle(cls, bundle: SubjectBundle) -> SessionGeometry:
        return cls(VoxelMask(bundle.mask, bundle.affine), bundle.reference, bundle.signal_mean, bundle.hrf_index,
                   bundle, f"bundle of {bundle.subject_id}")

    @classmethod
    def from_reference(cls, reference: Volume, mask: VoxelMask | None = None) -> SessionGeometry:
        """The session's own geometry: a reference volume and a mask on its grid (default: its EPI mask)."""
        if mask is None:
            mask = epi_mask(reference)
        else:  # a mask saved in another voxel order of the same grid is reoriented; another grid is an error
            mask = mask.on_grid(reference.shape, reference.affine, f"the motion reference ({reference.source})")
        values = reference.data[mask.grid].astype(np.float64)
        if not np.all(values > 0):
            # Percent signal change needs a positive baseline: voxels at or below 0 in the
            # reference are outside the head, whatever the mask says.
            raise VolumeError(
                f"{reference.source}: reference: {int(np.sum(values <= 0))} mask voxels are <= 0; expected a "
                f"mask inside the head ({mask.source})"
            )
        return cls(mask, reference.data, values, None, None, f"reference {reference.source}")

    def to_record(self) -> dict[str, Any]:
        return {"kind": "geometry", "grid": self.mask.grid.astype(np.uint8), "affine": self.mask.affine,
                "reference": self.reference, "signal_mean": self.signal_mean, "source": self.source}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SessionGeometry:
        mask = VoxelMask(np.asarray(record["grid"]).astype(bool), np.asarray(record["affine"]), record["source"])
        return cls(mask, record["reference"], record["signal_mean"], None, None, record["source"])

    def check_volume(self, volume: Volume) -> None:
        """Raise if a live volume is not on this geometry's grid."""
        if self.bundle is not None:
            self.bundle.check_volume(volume.shape, volume.affine, source=str(volume.source))
        else:
            self.mask.grid_transform(volume)  # flipped or permuted voxel axes are fine; another grid raises


def epi_mask(reference: Volume) -> VoxelMask:
    """A brain mask of one EPI volume (nilearn's ``compute_epi_mask``), on its grid."""
    import nibabel as nib
    from nilearn.masking import compute_epi_mask

    image = nib.Nifti1Image(np.asarray(reference.data, dtype=np.float32), reference.affine)
    grid = np.asarray(compute_epi_mask(image).get_fdata(), dtype=bool)
    logger.info("no mask given: %d voxels of an EPI brain mask of %s", int(grid.sum()), reference.source)
    return VoxelMask(grid, reference.affine, source=f"EPI mask of {reference.source}")


class LiveSession:
    """Runs the closed loop for one subject, run after run.

    Parameters
    ----------
    config : RTDecoderConfig
    bundle : SubjectBundle or None
        From calibration: mask, reference, statistics, HRF choices, model. Without one the
        session is a front end on its own geometry (see the module notes).
    session_dir : Path
        Journal and reports go here; starting again on the same folder resumes.
    decoder : BetaDecoder, optional
        Without one, only volumes and betas are published.
    mask : VoxelMask, optional
        Without a bundle: the voxels to read (default: an EPI mask of the reference).
    reference : Volume, optional
        Without a bundle: the motion reference (default: the session's first volume).
    """

    def __init__(
        self,
        config: RTDecoderConfig,
        bundle: SubjectBundle | None,
        session_dir: str | Path,
        decoder: BetaDecoder | None = None,
        mask: VoxelMask | None = None,
        reference: Volume | None = None,
    ) -> None:
        if decoder is not None and bundle is None:
            raise ConfigError("LiveSession: a decoder needs the subject bundle it was calibrated with")
        if bundle is not None:  # the bundle's glm, preprocess, embedding and model sections govern the run
            bundle.check_run_config(config)
        self.config = config
        self.bundle = bundle
        self.session_dir = Path(session_dir)
        self.decoder = decoder
        self.mask = mask
        self.reference = reference
        self.publisher: ResultPublisher | None = None
        self.ready = threading.Event()
        self.geometry: SessionGeometry | None = SessionGeometry.from_bundle(bundle) if bundle is not None else None
        self._requests: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._worker: DecodeWorker | None = None
        self._publish_lock = threading.Lock()
        self._journal: Journal | None = None
        self._state: JournalState | None = None
        self._last_publish_s = 0.0
        self._run: _Run | None = None

    @property
    def _decode_queue(self) -> queue.Queue:
        """The decode worker's queue (tests watch its length)."""
        return self._worker.jobs if self._worker is not None else queue.Queue()

    # ----------------------------------------------------------------- the session loop

    def run(self, plan: RunPlan, stop: threading.Event | None = None) -> RunSummary:
        """Process one run to its end (see :meth:`run_session`); returns its counts and latencies."""
        if plan.watch_dir is None:
            raise ConfigError(f"RunPlan {plan.run}: watch_dir: expected the export folder")
        summaries = self.run_session(plan.watch_dir, [plan], stop=stop, until_ended=[plan.run])
        return summaries[-1] if summaries else RunSummary(plan.run, end_reason="already ended")

    def run_session(
        self,
        watch_dir: str | Path,
        plans: Sequence[RunPlan] = (),
        n_runs: int | None = None,
        stop: threading.Event | None = None,
        until_ended: Sequence[str] | None = None,
        defaults: RunPlan | None = None,
    ) -> list[RunSummary]:
        """Serve runs from one export folder until ``n_runs`` have ended, or ``stop`` is set.

        Parameters
        ----------
        watch_dir : str or Path
            The scanner's export folder; each series (or sub-folder) is one run.
        plans : sequence of RunPlan
            Runs known in advance, in order; a run takes the first plan not yet used (or the one
            a ``run_start`` request names). Runs beyond them are numbered ``run-NN``.
        n_runs : int, optional
            End the session once this many runs have ended (counting runs a resumed journal
            already ended). ``None``: until ``stop``.
        stop : threading.Event, optional
            Set by a signal handler: the session ends at once, ``stopped``.
        until_ended : sequence of str, optional
            End the session once these runs have ended.
        defaults : RunPlan, optional
            ``n_volumes`` and ``tr_s`` of the runs beyond ``plans`` (its label is not used).

        Returns
        -------
        list of RunSummary
            The runs that ended in this call, in order.
        """
        stop = stop or threading.Event()
        config = self.config
        state = JournalState(config.publish.history_size)
        journal = Journal(self.session_dir / JOURNAL_NAME, fsync=config.session.journal_fsync).open(
            on_record=state.take
        )
        self._journal, self._state = journal, state
        if state.session_id is None:
            state.session_id = uuid.uuid4().hex[:12]
            journal.append({"kind": "session_start", "session": state.session_id, "time": time.time()})
        if self.geometry is None and state.geometry is not None:
            self.geometry = SessionGeometry.from_record(state.geometry)
        self.publisher = ResultPublisher(
            config.publish,
            state.session_id,
            next_seq=state.next_seq,
            history=list(state.recent),
            on_onset=self._take_request,
            status=self._status,
            older_history=lambda from_seq: published_since(journal.path, from_seq),
        ).start()
        if self.decoder is not None:
            self._worker = DecodeWorker(self.decoder, config.session, self.publish, self._decoded).start()
        self.ready.set()
        driver = _SessionDriver(self, watch_dir, plans, n_runs, until_ended, stop, defaults or RunPlan(""))
        try:
            driver.serve()
        except DecoderError as err:
            self._publish_error(err)
            raise
        finally:
            if self._worker is not None:
                self._worker.stop()
            if stop.is_set() and self._run is not None:
                self.publish("status", {"state": "stopped", "run": self._run.plan.run,
                                        "tr_index": self._run.next_index}, {})
            self.publisher.close()
            journal.close()
            self._run = None
            if not driver.summaries:  # each ended run already gave its memory back
                release_freed_memory()
        return driver.summaries

    # ----------------------------------------------------------------- one publish path

    def publish(self, topic: str, data: dict[str, Any], t: dict[str, float | None]) -> Message:
        """Journal, then send, one message (the journal holds everything that may have been sent)."""
        # One lock across numbering, journaling and sending keeps the wire in sequence order
        # although the session and decode threads both publish.
        with self._publish_lock:
            message = self.publisher.make_message(topic, data, t)
            message.t["published"] = self._last_publish_s = time.time()
            self._journal.append({"kind": "published", "message": message.to_dict()})
            self.publisher.send(message)
        return message

    def _publish_error(self, err: DecoderError) -> None:
        """Tell the subscribers why the session stops, journaled when the journal can still be written."""
        data = {"state": "error", "run": self._run.plan.run if self._run is not None else None, "message": str(err)}
        try:
            self.publish("status", data, {})
        except JournalError:
            # The disk is full (or gone): the one message sent without a journal record. Its
            # sequence number is not on disk, so a resume may number another message the same.
            with self._publish_lock:
                message = self.publisher.make_message("status", data | {"journaled": False}, {})
                message.t["published"] = time.time()
                self.publisher.send(message)

    def _status(self) -> dict[str, Any]:
        run = self._run
        if run is None:
            return {"state": "waiting", "run": None}
        return {"state": run.state, "run": run.plan.run, "volumes": run.summary.n_volumes,
                "betas": run.summary.n_betas}

    def _take_request(self, request: ControlRequest) -> bool:
        self._requests.put(request)
        return True

    def _decoded(self, job: DecodeJob, data: dict[str, Any], message: Message) -> None:
        run = self._run
        if run is None or run.plan.run != job.run:
            return
        summary = run.summary
        summary.n_decoded += 1
        summary.n_reconstructed += data["reconstruction"] == "done"
        summary.n_skipped_reconstructions += data["reconstruction"] == "skipped_backlog"
        summary.decode_latency_ms.append(data["decode_ms"])
        if job.t.get("file_complete"):
            summary.publish_latency_ms.append(1000 * (message.t["published"] - job.t["file_complete"]))


def release_freed_memory() -> bool:
    """Free what a finished run left behind and hand it back to the operating system.

    A run leaves reference cycles behind (the session and its publisher's callbacks, the
    publisher's message history with its beta maps and PNGs, the scanner files' datasets);
    Python's cyclic collector frees them only when it next runs a full collection, so a process
    running a whole session grew from run to run (``bench/bench_soak.py``). ``gc.collect()``
    frees them now. glibc then keeps the freed blocks in its per-thread arenas; ``malloc_trim``
    returns them. Called between runs, never on the real-time path. Returns whether
    ``malloc_trim`` could be called (False where the C library is not glibc).
    """
    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return False
    trim(0)
    return True


def series_key(volume: Volume, watch_dir: Path) -> str:
    """Which run a volume belongs to: its sub-folder of the export folder and its series."""
    folder = ""
    if volume.source is not None:
        try:
            folder = str(Path(volume.source).parent.relative_to(watch_dir))
        except ValueError:
            folder = str(Path(volume.source).parent)
    return f"{'' if folder == '.' else folder}|{volume.series}"


class _SessionDriver:
    """The session thread's loop: routes volumes and requests to the current run, starts and ends runs."""

    def __init__(
        self, session: LiveSession, watch_dir: str | Path, plans: Sequence[RunPlan], n_runs: int | None,
        until_ended: Sequence[str] | None, stop: threading.Event, defaults: RunPlan,
    ) -> None:
        self.session = session
        self.state: JournalState = session._state
        self.watch_dir = Path(watch_dir)
        self.plans = list(plans)
        self.n_runs = n_runs
        self.until_ended = set(until_ended) if until_ended is not None else None
        self.stop = stop
        self.defaults = defaults
        self.summaries: list[RunSummary] = []
        self.next_label: str | None = None  # from a run_start request
        self.pending_onsets: list[OnsetRequest] = []  # announced before the run's first volume
        self.strays_reported: set[str] = set()
        self.held_for_reference: list[Volume] = []

    def done(self) -> bool:
        ended = set(self.state.ended_runs)
        if self.until_ended is not None and self.until_ended <= ended:
            return True
        return self.n_runs is not None and len(ended) >= self.n_runs

    def serve(self) -> None:
        session = self.session
        for label, records in list(self.state.open_runs.items()):
            session._run = _Run.resumed(session, self._plan_named(label, records.start), records)
        if self.done():
            logger.info("every run asked for already ended in this session's journal; nothing to do")
            return
        # Files that carry no TR take the operator's or the config's; run_tr_s says which was used.
        default_tr_s = next((p.tr_s for p in (*self.plans, self.defaults) if p.tr_s is not None),
                            session.config.scanner.tr_s)
        watcher = FolderWatcher.from_config(self.watch_dir, session.config.ingest, include_existing=True,
                                            recursive=True, default_tr_s=default_tr_s)
        watcher.start()
        try:
            while not self.stop.is_set() and not self.done():
                worker = session._worker
                if worker is not None and worker.failure is not None:
                    raise DecoderError(f"the decode thread stopped: {worker.failure!r}; see the log")
                session.publisher.check_alive()
                self._take_requests()
                volume = watcher.get(timeout_s=_POLL_S)
                if volume is not None:
                    self._route(volume)
                while not watcher.problems.empty():
                    problem = watcher.problems.get()
                    logger.warning("%s", status_text(problem))
                    self._file_problem(status_text(problem))
                run = session._run
                if run is not None:
                    run.poll()
                    if run.end_reason:
                        self._end_run()
                        continue  # the session may be done: no heartbeat after its last run_end
                if time.time() - session._last_publish_s > session.config.session.heartbeat_s:
                    self._heartbeat()
        finally:
            watcher.stop()

    # ----------------------------------------------------------------- runs

    def _route(self, volume: Volume) -> None:
        session = self.session
        key = series_key(volume, self.watch_dir)
        run = session._run
        if run is not None and key == run.key:
            run.accept(volume)
            return
        held = self.held_for_reference
        if held and series_key(held[0], self.watch_dir) == key:
            self._await_reference(volume, key)
            return
        if key in self.state.ended_series:
            if key not in self.strays_reported:
                self.strays_reported.add(key)
                logger.info("%s: series %s belongs to a run that already ended; its files are left alone",
                            volume.source, key)
            return
        if volume.index > NEW_RUN_MAX_FIRST_INDEX:
            self._file_problem(
                f"{volume.source}: series {volume.series!r} (volume {volume.index}) is not this run's "
                f"({run.key if run else 'none yet'}) and is too far into its numbering to start a run; ignored"
            )
            return
        if run is not None:
            run.request_end("new_series")
            self._end_run()
        if session.geometry is None and session.reference is None:
            self._await_reference(volume, key)
            return
        self._start_run(key, [volume])

    def _start_run(self, key: str, volumes: list[Volume]) -> None:
        session = self.session
        first = min(volumes, key=lambda v: v.index)
        session._run = run = _Run.started(session, self._next_plan(), key, first, self.pending_onsets)
        self.pending_onsets = []
        for volume in volumes:
            run.accept(volume)

    def _await_reference(self, volume: Volume, key: str) -> None:
        """Without a bundle or a given reference, hold the first run's first volumes until its reference comes.

        The first volumes of a run are not at steady state (brighter, other contrast) when the
        scanner runs no dummy scans: registering the session to one of them makes every later
        volume look moved. The reference is the volume at ``session.reference_index``; the volumes
        before it wait (a few TRs, before any trial's beta is due) and are then processed in order.
        """
        held = self.held_for_reference
        if held and series_key(held[0], self.watch_dir) != key:
            self._file_problem(f"{volume.source}: series {volume.series!r} arrived while the first run waits for "
                               "its reference volume; ignored")
            return
        held.append(volume)
        wanted = self.session.config.session.reference_index
        if volume.index >= wanted or len(held) > wanted:
            self.session.reference = volume
            logger.info("session reference: %s (volume %d of the first run)", volume.source, volume.index)
            self.held_for_reference = []
            self._start_run(key, held)

    def _next_plan(self) -> RunPlan:
        used = set(self.state.ended_runs) | set(self.state.open_runs)
        label = self.next_label
        self.next_label = None
        if label is not None:
            return self._plan_named(label, {})
        for plan in self.plans:
            if plan.run not in used:
                return plan
        number = self.state.n_runs_started + 1
        while f"run-{number:02d}" in used:
            number += 1
        return self._plan_named(f"run-{number:02d}", {})

    def _plan_named(self, label: str, start: dict[str, Any]) -> RunPlan:
        for plan in self.plans:
            if plan.run == label:
                return plan
        declared = start.get("n_volumes_declared", self.defaults.n_volumes)
        return RunPlan(label, n_volumes=declared, tr_s=self.defaults.tr_s)

    def _end_run(self) -> None:
        session = self.session
        run = session._run
        summary = run.finish()
        if session._worker is not None:
            session._worker.drain()  # the run's decodes go out before its run_end
        run.finish_status()
        self.state.take({"kind": "run_end", "run": run.plan.run})
        self.summaries.append(summary)
        session._run = None
        release_freed_memory()

    # ----------------------------------------------------------------- control requests

    def _take_requests(self) -> None:
        session = self.session
        while True:
            try:
                request = session._requests.get_nowait()
            except queue.Empty:
                return
            run = session._run
            if isinstance(request, RunEndRequest):
                if run is not None and request.run not in (None, run.plan.run):
                    logger.warning("run_end for %s while %s is running; ignored", request.run, run.plan.run)
                elif run is not None:
                    run.request_end("run_end_request")
            elif isinstance(request, RunStartRequest):
                if run is not None:
                    run.request_end("run_start_request")
                    self._end_run()
                self.next_label = request.run
            elif run is not None:
                run.take_onset(request)
            else:
                self.pending_onsets.append(request)

    def _file_problem(self, message: str) -> None:
        run = self.session._run
        self.session.publish("status", {"state": "file_problem", "run": run.plan.run if run else None,
                                        "message": message}, {})

    def _heartbeat(self) -> None:
        run = self.session._run
        if run is None:
            self.session.publish("status", {"state": "waiting", "run": None, "tr_index": 0}, {})
        else:
            self.session.publish("status", {"state": run.state, "run": run.plan.run, "tr_index": run.next_index}, {})


class _Run:
    """One run inside a session: its plan, front end, ordering and what it published."""

    def __init__(self, session: LiveSession, plan: RunPlan, key: str) -> None:
        self.session = session
        self.config = session.config
        self.plan = plan
        self.key = key
        self.summary = RunSummary(plan.run)
        self.trials: list[TrialLike] = list(plan.trials)
        # (tr_index, values, motion, confounds) of every volume so far: a new trial replays them
        self.history: list[tuple[int, np.ndarray | None, np.ndarray | None, np.ndarray | None]] = []
        self.published_betas: set[tuple[str, str]] = set()
        self.decoded: set[str] = set()
        self.next_index = 0
        self.first_arrival_s: float | None = None
        self.last_arrival_s = time.monotonic()
        self.end_reason = ""
        self.start_record: dict[str, Any] = {}
        self.frontend: FrontEnd | None = None
        self.orderer: VolumeOrderer | None = None
        self.tsnr: RunningTSNR | None = None
        self.n_volumes_planned = 0
        self.bad_tr_reported = False

    # ----------------------------------------------------------------- construction

    @classmethod
    def started(
        cls, session: LiveSession, plan: RunPlan, key: str, first: Volume, onsets: list[OnsetRequest],
    ) -> _Run:
        """A new run, at the first volume of its series: timing and geometry checked, then journaled."""
        run = cls(session, plan, key)
        if session.geometry is None:
            reference = session.reference if session.reference is not None else first
            session.geometry = SessionGeometry.from_reference(reference, session.mask)
            session._journal.append(session.geometry.to_record())
            logger.info("session geometry: %d voxels, motion reference %s", session.geometry.mask.n_voxels,
                        session.geometry.source)
        session.geometry.check_volume(first)
        tr_s, tr_source = run_tr_s(first, plan, session.config, session.bundle)
        slice_ref_s = _slice_time_ref_s(session.config, first, tr_s)
        n_planned, n_declared = run._planned_length(tr_s, tr_source)
        run.start_record = {
            "kind": "run_start", "run": plan.run, "series_key": key, "series": first.series,
            "tr_s": tr_s, "tr_source": tr_source, "slice_time_ref_s": slice_ref_s,
            "n_volumes_planned": n_planned, "n_volumes_declared": n_declared, "time": time.time(),
        }
        session._journal.append(run.start_record)
        session._state.take(run.start_record)
        run._open()
        session.publish("status", {
            "state": "run_start", "run": plan.run, "series": first.series, "tr_s": tr_s, "tr_source": tr_source,
            "slice_time_ref_s": slice_ref_s, "n_volumes": n_declared,
        }, {})
        logger.info("%s: started by %s (series %s): TR %.3f s (%s), %s volumes", plan.run, first.source,
                    first.series, tr_s, tr_source, n_declared if n_declared else f"up to {n_planned}")
        for request in onsets:
            run.take_onset(request)
        return run

    @classmethod
    def resumed(cls, session: LiveSession, plan: RunPlan, records: RunRecords) -> _Run:
        """The run a crash interrupted, rebuilt from the journal."""
        run = cls(session, plan, records.start["series_key"])
        run.start_record = records.start
        run.trials += [_announced_trial(r) for r in records.announced_trials]
        run.n_volumes_planned = int(records.start["n_volumes_planned"])
        for message in records.messages:
            if message.topic == "beta":
                run.published_betas.add((message.data["trial_id"], _beta_kind(message.data)))
            elif message.topic == "decode":
                run.decoded.add(message.data["trial_id"])
        run._open()
        run._replay(records)
        return run

    def _planned_length(self, tr_s: float, tr_source: str) -> tuple[int, int | None]:
        """Volumes the GLM's design covers, and the count declared in advance (None when not known)."""
        plan, config = self.plan, self.config
        if plan.n_volumes is not None:
            if plan.n_volumes < 1:
                raise ConfigError(f"{plan.run}: n_volumes: expected a positive count (got {plan.n_volumes})")
            run_end_s = plan.n_volumes * tr_s
            late = [t for t in self.trials if t.onset_s >= run_end_s]
            if late:
                raise ConfigError(
                    f"{plan.run}: events: trial {late[0].trial_id} starts at {late[0].onset_s:g} s, after the run's "
                    f"end ({plan.n_volumes} volumes x TR {tr_s:g} s from {tr_source} = {run_end_s:g} s); "
                    "check the TR and --n-volumes"
                )
            return plan.n_volumes, plan.n_volumes
        if self.trials:
            end_s = max(t.onset_s + t.duration_s for t in self.trials) + config.session.run_tail_s
            return math.ceil(end_s / tr_s), None
        return config.session.max_run_volumes, None

    def _open(self) -> None:
        start = self.start_record
        self.n_volumes_planned = int(start["n_volumes_planned"])
        self.orderer = VolumeOrderer(first_index=0, missing_wait_s=self.config.ingest.missing_volume_wait_s)
        self.frontend = self._new_frontend()

    def _new_frontend(self) -> FrontEnd:
        start = self.start_record
        self.tsnr = RunningTSNR(self.session.geometry.mask.n_voxels)
        return build_run_frontend(self.config, self.session.geometry, self.trials, float(start["tr_s"]),
                                  self.n_volumes_planned, float(start["slice_time_ref_s"]))

    # ----------------------------------------------------------------- volumes

    @property
    def started_volumes(self) -> bool:
        return self.frontend is not None

    @property
    def state(self) -> str:
        return "running" if self.first_arrival_s is not None or self.next_index else "waiting"

    def accept(self, volume: Volume) -> None:
        now = time.monotonic()
        self.last_arrival_s = now
        if self.first_arrival_s is None:
            self.first_arrival_s = now
        tr_s = float(self.start_record["tr_s"])
        if volume.tr_source != "default" and abs(volume.tr_s - tr_s) > _TR_TOLERANCE_S:
            self.session.publish("status", {"state": "file_problem", "run": self.plan.run, "message": (
                f"{volume.source}: RepetitionTime {volume.tr_s:g} s differs from the run's {tr_s:g} s; volume "
                "ignored")}, {})
            return
        if not 0 <= volume.index < self.n_volumes_planned:
            logger.warning("%s: volume index %d is outside this run's 0..%d; ignored",
                           volume.source, volume.index, self.n_volumes_planned - 1)
            return
        for item in self.orderer.push(volume):
            self._handle(item)

    def poll(self) -> None:
        for item in self.orderer.poll():
            self._handle(item)
        if self.end_reason:
            return
        declared = self.start_record.get("n_volumes_declared")
        if self.next_index >= self.n_volumes_planned:
            self.end_reason = "n_volumes" if declared else "events_end"
        elif self.first_arrival_s is not None and (
            time.monotonic() - self.last_arrival_s > self.config.session.idle_timeout_s
        ):
            logger.warning("%s: no volume for %.0f s; ending the run at volume %d", self.plan.run,
                           self.config.session.idle_timeout_s, self.next_index)
            self.end_reason = "idle_timeout"

    def request_end(self, reason: str) -> None:
        if not self.end_reason:
            self.end_reason = reason

    def finish(self) -> RunSummary:
        """Flush held volumes, fill declared gaps, publish every final beta; journal the run's end."""
        for item in self.orderer.flush():
            self._handle(item)
        declared = self.start_record.get("n_volumes_declared")
        if declared:
            for tr_index in range(self.next_index, int(declared)):
                self._handle(MissingVolume(tr_index, "", time.monotonic()))
        last_time_s = (self.next_index - 1) * float(self.start_record["tr_s"])
        for beta in self.frontend.finish():
            if beta.onset_s > last_time_s:
                logger.info("%s: trial %s starts after the run's last volume; no final beta", self.plan.run,
                            beta.trial_id)
                continue
            self._publish_beta(beta, {})
        self.summary.end_reason = self.end_reason
        self.summary.tr_s = float(self.start_record["tr_s"])
        self.session._journal.append({"kind": "run_end", "run": self.plan.run, "reason": self.end_reason,
                                      "time": time.time()})
        return self.summary

    def finish_status(self) -> None:
        summary = self.summary
        self.session.publish("status", {
            "state": "run_end", "run": self.plan.run, "reason": self.end_reason, "volumes": summary.n_volumes,
            "missing": summary.n_missing, "betas": summary.n_betas, "decoded": summary.n_decoded,
            "skipped_reconstructions": summary.n_skipped_reconstructions,
        }, {})

    def _handle(self, item: Volume | MissingVolume) -> None:
        if item.index < self.next_index:
            return
        session, run = self.session, self.plan.run
        if isinstance(item, MissingVolume):
            processed = self.frontend.missing(item.index)
            session._journal.append({"kind": "missing", "run": run, "tr_index": item.index})
            self.summary.n_missing += 1
            times: dict[str, float | None] = {}
            tsnr = self.tsnr.value()
            logger.warning("%s vol %3d missing: left out of the GLM", run, item.index)
        else:
            processed = self.frontend.process(item)
            tsnr = self.tsnr.update(processed.values)
            times = {
                "acquired": item.times.acquired_s,
                "file_complete": item.times.complete_s,
                "processed": item.times.processed_s,
            }
            self._journal_volume(processed, times)
            self.summary.n_volumes += 1
            latency_ms = 1000 * (item.times.processed_s - item.times.complete_s) if item.times.complete_s else np.nan
            self.summary.volume_latency_ms.append(latency_ms)
            fd = processed.motion.fd_mm if processed.motion is not None else 0.0
            self.summary.fd_mm.append(fd)
            logger.info("%s vol %3d  fd %5.2f mm  tsnr %5.1f  latency %6.1f ms", run, item.index, fd,
                        tsnr if tsnr is not None else float("nan"), latency_ms)
        self.history.append(_history_entry(processed))
        self.next_index = item.index + 1
        message = session.publish("volume", _volume_data(run, processed, tsnr), times)
        if times.get("file_complete"):
            self.summary.publish_latency_ms.append(1000 * (message.t["published"] - times["file_complete"]))
        for beta in processed.betas:
            self._publish_beta(beta, times)

    def _journal_volume(self, processed: ProcessedVolume, times: dict[str, float | None]) -> None:
        motion = processed.motion
        self.session._journal.append({
            "kind": "volume",
            "run": self.plan.run,
            "tr_index": processed.tr_index,
            "values": processed.values,
            "motion": motion.params if motion is not None else np.zeros(6),
            "fd_mm": motion.fd_mm if motion is not None else 0.0,
            "confounds": processed.confounds,  # GLMdenoise's noise regressors, so a resume needs no raw volume
            "t": times,
        })

    def _publish_beta(self, beta: TrialBeta, times: dict[str, float | None]) -> None:
        kind = _beta_kind({"is_update": beta.is_update, "is_final": beta.is_final})
        key = (beta.trial_id, kind)
        if key in self.published_betas and kind != "update":
            return
        self.published_betas.add(key)
        stim_id = getattr(self.trials[beta.trial_index], "stim_id", None)
        data = BetaData(
            self.plan.run, beta.trial_id, beta.trial_index, stim_id, beta.onset_s, beta.tr_index,
            beta.n_volumes_used, beta.is_update, beta.is_final,
            beta=beta.beta.astype(np.float32) if self.config.session.publish_beta_maps else None,
        )
        message = self.session.publish("beta", data.to_map(), times)
        self.summary.n_betas += 1
        if kind == "first":  # refinements and the run's final betas would be a burst of lines: debug only
            logger.info("%s beta %s (%s) at vol %d from %d volumes", self.plan.run, beta.trial_id, kind,
                        beta.tr_index, beta.n_volumes_used)
        wanted = kind == "first" or (kind == "update" and self.config.session.decode_updates) or (
            kind == "final" and self.config.session.decode_final
        )
        worker = self.session._worker
        if wanted and worker is not None and np.all(np.isfinite(beta.beta)):
            worker.put(DecodeJob(self.plan.run, beta.trial_id, stim_id, beta.beta, message.seq, dict(times),
                                 tr_index=beta.tr_index))

    # ----------------------------------------------------------------- resuming and live onsets

    def _replay(self, records: RunRecords) -> None:
        """Rebuild the GLM from journaled volumes; queue decodes the crash interrupted."""
        session = self.session
        released: list[TrialBeta] = []
        announced = {m.data["tr_index"] for m in records.messages if m.topic == "volume"}
        for record in sorted(records.volumes, key=lambda r: r["tr_index"]):
            released += self._replay_one(record.get("values"), record.get("motion"), record["tr_index"],
                                         record.get("confounds"))
            if record["tr_index"] not in announced:
                # Journaled, then killed before its message went out: send it now.
                session.publish("volume", _replayed_volume_data(self.plan.run, record), dict(record.get("t") or {}))
        self.summary.resumed_from_tr_index = self.next_index
        if records.volumes:
            self.first_arrival_s = time.monotonic()
        self.orderer = VolumeOrderer(first_index=self.next_index,
                                     missing_wait_s=self.config.ingest.missing_volume_wait_s)
        # A crash between journaling a volume and publishing the betas it released loses
        # nothing: the replay releases them again and the ones never published go out now.
        for beta in released:
            if not beta.is_update and (beta.trial_id, "first") not in self.published_betas:
                self._publish_beta(beta, {})
        pending = [
            m for m in records.messages
            if m.topic == "beta" and _beta_kind(m.data) == "first" and m.data["trial_id"] not in self.decoded
            and "beta" in m.data
        ]
        if session._worker is not None:
            for message in pending:
                session._worker.put(DecodeJob(self.plan.run, message.data["trial_id"], message.data.get("stim_id"),
                                              np.asarray(message.data["beta"]), message.seq, dict(message.t),
                                              tr_index=int(message.data["tr_index"])))
        logger.info("%s: resumed from the journal at volume %d (%d volumes, %d decodes to redo)",
                    self.plan.run, self.next_index, len(records.volumes), len(pending))
        session.publish("status", {"state": "resumed", "run": self.plan.run, "tr_index": self.next_index}, {})

    def _replay_one(
        self, values: np.ndarray | None, motion: np.ndarray | None, tr_index: int, confounds: np.ndarray | None = None,
    ) -> list[TrialBeta]:
        released: list[TrialBeta] = []
        if values is None:
            self.frontend.missing(tr_index)
        else:
            released = self.frontend.replay(tr_index, values, motion, confounds)
            self.tsnr.update(np.asarray(values))
        self.history.append((tr_index, values, motion, confounds))
        self.next_index = max(self.next_index, tr_index + 1)
        return released

    def take_onset(self, request: OnsetRequest) -> None:
        """Add a trial announced on the control socket (checked there); the GLM is rebuilt with it."""
        if any(t.trial_id == request.trial_id for t in self.trials):
            logger.warning("onset for %s announced twice; the first is kept", request.trial_id)
            return
        record = {"kind": "onset", "run": self.plan.run, "trial_id": request.trial_id, "onset_s": request.onset_s,
                  "duration_s": request.duration_s, "stim_id": request.stim_id}
        self.session._journal.append(record)
        self.trials.append(_announced_trial(record))
        self._rebuild_with_trials()

    def _rebuild_with_trials(self) -> None:
        """A new trial changes the design: rebuild the GLM and replay this run's volumes."""
        history, self.history = self.history, []
        self.frontend = self._new_frontend()
        self.next_index = 0
        released: list[TrialBeta] = []
        for tr_index, values, motion, confounds in history:
            released += self._replay_one(values, motion, tr_index, confounds)
        for beta in released:
            if (beta.trial_id, "first") not in self.published_betas and not beta.is_update:
                self._publish_beta(beta, {})


def run_tr_s(
    first: Volume, plan: RunPlan, config: RTDecoderConfig, bundle: SubjectBundle | None,
) -> tuple[float, str]:
    """The run's TR from its first volume, checked against the operator's, the config's and the bundle's.

    Returns
    -------
    tr_s : float
        Repetition time, s.
    source : str
        Where it came from (named in messages and errors).

    Raises
    ------
    ConfigError
        When two of them disagree by more than 1 ms, naming both values and their sources.
    """
    given = [(plan.tr_s, "--tr-s")] if plan.tr_s is not None else []
    given.append((config.scanner.tr_s, "the config's scanner.tr_s"))
    volume_source = first.tr_source
    if volume_source == "default":
        tr_s, source = given[0][0], given[0][1]
    else:
        tr_s, source = float(first.tr_s), f"{first.source} ({volume_source})"
        for value, where in given:
            if abs(value - tr_s) > _TR_TOLERANCE_S:
                raise ConfigError(
                    f"{plan.run}: TR: {first.source} says {tr_s:g} s ({volume_source}) but {where} is {value:g} s; "
                    f"set scanner.tr_s: {tr_s:g} in the config (or --tr-s {tr_s:g}) if the volumes are right"
                )
    calibrated = bundle.metadata.get("calibration_tr_s") if bundle is not None else None
    if calibrated is not None and abs(float(calibrated) - tr_s) > _TR_TOLERANCE_S:
        raise ConfigError(
            f"{plan.run}: TR: the run's is {tr_s:g} s ({source}) but the bundle of {bundle.subject_id} was calibrated "
            f"at {float(calibrated):g} s (metadata.json calibration_tr_s); calibrate at the protocol's TR"
        )
    return tr_s, source


def _slice_time_ref_s(config: RTDecoderConfig, first: Volume, tr_s: float) -> float:
    """The GLM's slice-time reference for a run, from the config and the first volume's slice times."""
    try:
        from rtdecoder.glm.design import slice_time_ref_from
    except ImportError:  # the GLM without slice-time support: frame times at the volume start
        return 0.0
    return float(slice_time_ref_from(config.glm.slice_time_ref_s, first.slice_times_s, tr_s))


def _beta_kind(data: dict[str, Any]) -> str:
    if data.get("is_final"):
        return "final"
    return "update" if data.get("is_update") else "first"


def _announced_trial(record: dict[str, Any]) -> AnnouncedTrial:
    return AnnouncedTrial(
        record["trial_id"], float(record["onset_s"]), float(record.get("duration_s") or 0.0), record.get("stim_id")
    )


def _history_entry(
    processed: ProcessedVolume,
) -> tuple[int, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    motion = processed.motion.params if processed.motion is not None else (None if processed.missing else np.zeros(6))
    return processed.tr_index, processed.values, motion, processed.confounds


def _volume_data(run: str, processed: ProcessedVolume, tsnr: float | None) -> dict[str, Any]:
    motion = processed.motion
    return VolumeData(
        run, processed.tr_index, processed.missing, fd_mm=None if motion is None else float(motion.fd_mm),
        motion=None if motion is None else [float(p) for p in motion.params], tsnr=tsnr, n_betas=len(processed.betas),
    ).to_map()


def _replayed_volume_data(run: str, record: dict[str, Any]) -> dict[str, Any]:
    missing = record["kind"] == "missing"
    return VolumeData(
        run, record["tr_index"], missing, fd_mm=None if missing else float(record["fd_mm"]),
        motion=None if missing else [float(p) for p in record["motion"]],
    ).to_map()
