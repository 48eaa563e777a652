"""The live session: ingest -> front end -> journal -> publish, with decoding beside it.

Three threads share the work so that a slow decode never delays a volume or a beta:

- the watcher thread (:class:`~rtdecoder.ingest.watcher.FolderWatcher`) reads complete files;
- the session thread (:meth:`LiveSession.run`) orders volumes, runs the front end, journals and
  publishes volume and beta messages, and queues betas for decoding;
- the decode thread retrieves every queued beta and reconstructs an image unless more than
  ``session.max_decode_backlog`` betas wait behind it; then it says ``skipped_backlog`` in the
  decode message instead. Volumes, betas and retrievals are never dropped.

Every message is journaled (with its sequence number and publish time) before it is sent, and
every volume's preprocessed mask values are journaled too. Starting again on the same session
folder after a crash replays the journal: the GLM is rebuilt from the journaled values, the
sequence numbering continues, nothing already published is sent again, and betas that were
published but not yet decoded are decoded.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import gc
import logging
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from calibration.bundle import SubjectBundle
from rtdecoder.config import RTDecoderConfig
from rtdecoder.errors import DecoderError
from rtdecoder.glm.design import TrialLike
from rtdecoder.glm.incremental import IncrementalGLM, TrialBeta
from rtdecoder.ingest.ordering import MissingVolume, VolumeOrderer
from rtdecoder.ingest.volume import Volume
from rtdecoder.ingest.watcher import FolderWatcher
from rtdecoder.preprocess.mask import OnlineNormaliser, VoxelMask
from rtdecoder.preprocess.motion import MotionCorrector
from rtdecoder.publish.messages import Message, message_from_map
from rtdecoder.publish.publisher import ResultPublisher
from rtdecoder.session.frontend import FrontEnd, ProcessedVolume
from rtdecoder.session.journal import Journal, read_records

logger = logging.getLogger(__name__)

JOURNAL_NAME = "journal.bin"
_POLL_S = 0.02


@dataclass
class Decoded:
    """What a decoder found for one beta."""

    ids: list[str]
    scores: list[float]
    retrieval_ms: float
    state: Any = None  # whatever the decoder needs to reconstruct (e.g. backbone tokens)
    n_candidates: int | None = None
    shown_rank: int | None = None  # 1-based rank of the image the subject saw, when known


class BetaDecoder(Protocol):
    """Turns a beta map into a retrieval ranking and, on request, an image."""

    def retrieve(self, beta: np.ndarray, top_k: int, shown_id: str | None = None) -> Decoded:
        """Rank the candidate images for one beta (raw GLM units; the decoder z-scores).

        ``shown_id``, the image the trial showed, asks for its rank among all candidates.
        """

    def reconstruct(self, decoded: Decoded, seed: int) -> bytes:
        """A PNG of the reconstruction for a retrieved beta."""


@dataclass
class RunPlan:
    """One run to process.

    Attributes
    ----------
    run : str
        Run label used in messages and the journal (e.g. ``"run-01"``).
    watch_dir : Path
        The folder the scanner exports this run's volumes into.
    n_volumes : int
        Volumes the run will have; the run ends after the last (or after an idle timeout).
    tr_s : float
        Repetition time, s.
    trials : sequence of TrialLike
        Trials known in advance (from ``events.tsv``); more can be announced live.
    """

    run: str
    watch_dir: Path
    n_volumes: int
    tr_s: float
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
    volume_latency_ms: list[float] = field(default_factory=list)
    publish_latency_ms: list[float] = field(default_factory=list)
    decode_latency_ms: list[float] = field(default_factory=list)
    fd_mm: list[float] = field(default_factory=list)


@dataclass
class _DecodeJob:
    trial_id: str
    stim_id: str | None
    beta: np.ndarray
    beta_seq: int
    t: dict[str, float | None]


class LiveSession:
    """Runs the closed loop for one subject.

    Parameters
    ----------
    config : RTDecoderConfig
    bundle : SubjectBundle
        From calibration: mask, reference, statistics, HRF choices, model.
    session_dir : Path
        Journal and reports go here; starting again on the same folder resumes.
    decoder : BetaDecoder, optional
        Without one, only volumes and betas are published.
    """

    def __init__(
        self,
        config: RTDecoderConfig,
        bundle: SubjectBundle,
        session_dir: str | Path,
        decoder: BetaDecoder | None = None,
    ) -> None:
        self.config = config
        self.bundle = bundle
        self.session_dir = Path(session_dir)
        self.decoder = decoder
        self.publisher: ResultPublisher | None = None
        self.ready = threading.Event()
        self._onsets: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._decode_queue: queue.Queue[_DecodeJob | None] = queue.Queue()

    def run(self, plan: RunPlan, stop: threading.Event | None = None) -> RunSummary:
        """Process one run to its end; returns counts and latencies."""
        stop = stop or threading.Event()
        state = _JournalState(run=plan.run, recent=collections.deque(maxlen=self.config.publish.history_size))
        # one record at a time: what a resume needs goes into ``state``, the rest stays on disk
        journal = Journal(self.session_dir / JOURNAL_NAME, fsync=self.config.session.journal_fsync).open(
            on_record=state.take
        )
        if state.session_id is None:
            state.session_id = uuid.uuid4().hex[:12]
            journal.append({"kind": "session_start", "session": state.session_id, "time": time.time()})
        summary = RunSummary(plan.run)
        self.publisher = ResultPublisher(
            self.config.publish,
            state.session_id,
            next_seq=state.next_seq,
            history=list(state.recent),
            on_onset=self._take_onset,
            status=lambda: {"run": plan.run, "volumes": summary.n_volumes, "betas": summary.n_betas},
            older_history=lambda from_seq: _published_since(journal.path, from_seq),
        ).start()
        self.ready.set()
        run = _Run(self, plan, journal, state, summary)
        decode_thread = threading.Thread(target=run.decode_loop, name="rtdecoder-decode", daemon=True)
        decode_thread.start()
        try:
            run.process(stop)
        except DecoderError as err:
            run.publish("status", {"state": "error", "run": plan.run, "message": str(err)}, {})
            raise
        finally:
            self._decode_queue.put(None)
            decode_thread.join()
            run.finish_status()
            self.publisher.close()
            journal.close()
            release_freed_memory()
        return summary

    def _take_onset(self, request: dict[str, Any]) -> bool:
        self._onsets.put(request)
        return True


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


@dataclass
class _JournalState:
    """What the journal says already happened (for resuming).

    Only this run's messages and the newest ``history_size`` are kept in memory; older ones are
    read back from the journal file when a client asks to resend them, so memory does not grow
    with the length of the session.
    """

    run: str
    session_id: str | None = None
    messages: list[Message] = field(default_factory=list)
    recent: collections.deque[Message] = field(default_factory=collections.deque)
    volumes: list[dict[str, Any]] = field(default_factory=list)
    announced_trials: list[dict[str, Any]] = field(default_factory=list)
    run_ended: bool = False
    next_seq: int = 0

    def take(self, record: dict[str, Any]) -> None:
        """Fold in the next journal record."""
        kind = record["kind"]
        if kind == "session_start":
            self.session_id = record["session"]
        elif kind == "published":
            message = message_from_map(record["message"])
            self.next_seq = message.seq + 1
            self.recent.append(message)
            if message.data.get("run") == self.run:
                self.messages.append(message)
        elif kind in ("volume", "missing") and record["run"] == self.run:
            self.volumes.append(record)
        elif kind == "onset" and record["run"] == self.run:
            self.announced_trials.append(record)
        elif kind == "run_end" and record["run"] == self.run:
            self.run_ended = True


def _published_since(journal_path: Path, from_seq: int) -> list[Message]:
    """Published messages from ``from_seq`` on, read back from the journal file."""
    return [
        message_from_map(r["message"]) for r in read_records(journal_path)
        if r["kind"] == "published" and r["message"]["seq"] >= from_seq
    ]


class _Run:
    """The state of one run inside :meth:`LiveSession.run` (session thread + decode thread)."""

    def __init__(
        self, session: LiveSession, plan: RunPlan, journal: Journal, state: _JournalState, summary: RunSummary
    ) -> None:
        self.session = session
        self.config = session.config
        self.plan = plan
        self.journal = journal
        self.state = state
        self.summary = summary
        self.publisher = session.publisher
        self.trials: list[TrialLike] = list(plan.trials)
        self.trials += [_announced_trial(r) for r in state.announced_trials]
        self.history: list[tuple[int, np.ndarray | None, np.ndarray | None]] = []
        self.published_betas: set[tuple[str, str]] = set()
        self.decoded: set[str] = set()
        self.first_volume_checked = False
        for message in state.messages:
            if message.data.get("run") != plan.run:
                continue
            if message.topic == "beta":
                self.published_betas.add((message.data["trial_id"], _beta_kind(message.data)))
            elif message.topic == "decode":
                self.decoded.add(message.data["trial_id"])
        self.frontend = self._new_frontend()
        self.next_index = 0
        self.last_publish_s = 0.0
        self._publish_lock = threading.Lock()

    # ----------------------------------------------------------------- session thread

    def process(self, stop: threading.Event) -> None:
        self._replay_journal()
        if self.state.run_ended:
            logger.info("%s already ended in this session's journal; nothing to do", self.plan.run)
            return
        watcher = FolderWatcher.from_config(self.plan.watch_dir, self.config.ingest, include_existing=True).start()
        orderer = VolumeOrderer(first_index=self.next_index, missing_wait_s=self.config.ingest.missing_volume_wait_s)
        last_arrival = time.monotonic()
        try:
            while self.next_index < self.plan.n_volumes and not stop.is_set():
                self._take_onsets()
                volume = watcher.get(timeout_s=_POLL_S)
                items: list[Volume | MissingVolume] = []
                if volume is not None:
                    last_arrival = time.monotonic()
                    items += self._accept(volume, orderer)
                items += orderer.poll()
                for item in items:
                    self._handle(item)
                while not watcher.problems.empty():
                    problem = watcher.problems.get()
                    logger.warning("%s", problem)
                    self.publish("status", {"state": "file_problem", "run": self.plan.run, "message": str(problem)}, {})
                if time.time() - self.last_publish_s > self.config.session.heartbeat_s:
                    state = "running" if self.next_index else "waiting"
                    self.publish("status", {"state": state, "run": self.plan.run, "tr_index": self.next_index}, {})
                if time.monotonic() - last_arrival > self.config.session.idle_timeout_s:
                    logger.warning(
                        "%s: no volume for %.0f s; ending the run at volume %d of %d",
                        self.plan.run, self.config.session.idle_timeout_s, self.next_index, self.plan.n_volumes,
                    )
                    break
        finally:
            watcher.stop()
        if stop.is_set():
            return
        for item in orderer.flush():
            self._handle(item)
        for tr_index in range(self.next_index, self.plan.n_volumes):
            self._handle(MissingVolume(tr_index, "", time.monotonic()))
        for beta in self.frontend.finish():
            self._publish_beta(beta, {})
        self.journal.append({"kind": "run_end", "run": self.plan.run, "time": time.time()})

    def _accept(self, volume: Volume, orderer: VolumeOrderer) -> list[Volume | MissingVolume]:
        if not self.first_volume_checked:
            self.session.bundle.check_volume(volume.shape, volume.affine, source=str(volume.source))
            self.first_volume_checked = True
        if not 0 <= volume.index < self.plan.n_volumes:
            logger.warning(
                "%s: volume index %d is outside this run's 0..%d; ignored",
                volume.source, volume.index, self.plan.n_volumes - 1,
            )
            return []
        return orderer.push(volume)

    def _handle(self, item: Volume | MissingVolume) -> None:
        if item.index < self.next_index:
            return
        if isinstance(item, MissingVolume):
            processed = self.frontend.missing(item.index)
            self.journal.append({"kind": "missing", "run": self.plan.run, "tr_index": item.index})
            self.summary.n_missing += 1
            times: dict[str, float | None] = {}
            logger.warning("%s vol %3d missing: left out of the GLM", self.plan.run, item.index)
        else:
            processed = self.frontend.process(item)
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
            logger.info("%s vol %3d  fd %5.2f mm  latency %6.1f ms", self.plan.run, item.index, fd, latency_ms)
        self.history.append(_history_entry(processed))
        self.next_index = item.index + 1
        message = self.publish("volume", _volume_data(self.plan.run, processed), times)
        if times.get("file_complete"):
            self.summary.publish_latency_ms.append(1000 * (message.t["published"] - times["file_complete"]))
        for beta in processed.betas:
            self._publish_beta(beta, times)

    def _journal_volume(self, processed: ProcessedVolume, times: dict[str, float | None]) -> None:
        motion = processed.motion
        self.journal.append({
            "kind": "volume",
            "run": self.plan.run,
            "tr_index": processed.tr_index,
            "values": processed.values,
            "motion": motion.params if motion is not None else np.zeros(6),
            "fd_mm": motion.fd_mm if motion is not None else 0.0,
            "t": times,
        })

    def _publish_beta(self, beta: TrialBeta, times: dict[str, float | None]) -> None:
        kind = _beta_kind({"is_update": beta.is_update, "is_final": beta.is_final})
        key = (beta.trial_id, kind)
        if key in self.published_betas and kind != "update":
            return
        self.published_betas.add(key)
        stim_id = getattr(self.trials[beta.trial_index], "stim_id", None)
        data = {
            "run": self.plan.run,
            "trial_id": beta.trial_id,
            "trial_index": beta.trial_index,
            "stim_id": stim_id,
            "onset_s": beta.onset_s,
            "tr_index": beta.tr_index,
            "n_volumes_used": beta.n_volumes_used,
            "is_update": beta.is_update,
            "is_final": beta.is_final,
        }
        if self.config.session.publish_beta_maps:
            data["beta"] = beta.beta.astype(np.float32)
        message = self.publish("beta", data, times)
        self.summary.n_betas += 1
        logger.info(
            "%s beta %s (%s) at vol %d from %d volumes", self.plan.run, beta.trial_id, kind, beta.tr_index,
            beta.n_volumes_used,
        )
        wanted = kind == "first" or (kind == "update" and self.config.session.decode_updates) or (
            kind == "final" and self.config.session.decode_final
        )
        if wanted and self.session.decoder is not None and np.all(np.isfinite(beta.beta)):
            self.session._decode_queue.put(_DecodeJob(beta.trial_id, stim_id, beta.beta, message.seq, dict(times)))

    def publish(self, topic: str, data: dict[str, Any], t: dict[str, float | None]) -> Message:
        """Journal, then send, one message (the journal holds everything that may have been sent)."""
        # One lock across numbering, journaling and sending keeps the wire in sequence order
        # although the session and decode threads both publish.
        with self._publish_lock:
            message = self.publisher.make_message(topic, data, t)
            message.t["published"] = self.last_publish_s = time.time()
            self.journal.append({"kind": "published", "message": message.to_dict()})
            self.publisher.send(message)
        return message

    def finish_status(self) -> None:
        summary = self.summary
        self.publish("status", {
            "state": "run_end",
            "run": self.plan.run,
            "volumes": summary.n_volumes,
            "missing": summary.n_missing,
            "betas": summary.n_betas,
            "decoded": summary.n_decoded,
            "skipped_reconstructions": summary.n_skipped_reconstructions,
        }, {})

    # ----------------------------------------------------------------- resuming and live onsets

    def _new_frontend(self) -> FrontEnd:
        bundle, config = self.session.bundle, self.config
        mask = VoxelMask(bundle.mask, bundle.affine)
        motion = None
        if config.preprocess.motion_correction:
            motion = MotionCorrector(
                max_iterations=config.preprocess.motion_max_iterations,
                tolerance_mm=config.preprocess.motion_tolerance_mm,
                n_samples=config.preprocess.motion_n_samples,
            ).set_reference(bundle.reference, bundle.affine)
        # Percent signal change of the calibration mean: the units the calibration GLM used.
        normaliser = OnlineNormaliser.from_stats(bundle.signal_mean, bundle.signal_mean / 100.0)
        glm = IncrementalGLM.from_config(
            config.glm, self.trials, self.plan.tr_s, self.plan.n_volumes,
            hrf_per_voxel=bundle.hrf_index if config.glm.hrf == "library" else None,
        )
        return FrontEnd(mask, glm, normaliser, motion).start()

    def _replay_journal(self) -> None:
        """Rebuild the GLM from journaled volumes; queue decodes the crash interrupted."""
        if not self.state.volumes:
            return
        released: list[TrialBeta] = []
        announced = {
            m.data["tr_index"] for m in self.state.messages
            if m.topic == "volume" and m.data.get("run") == self.plan.run
        }
        for record in sorted(self.state.volumes, key=lambda r: r["tr_index"]):
            released += self._replay_one(record.get("values"), record.get("motion"), record["tr_index"])
            if record["tr_index"] not in announced:
                # Journaled, then killed before its message went out: send it now.
                self.publish("volume", _replayed_volume_data(self.plan.run, record), dict(record.get("t") or {}))
        self.summary.resumed_from_tr_index = self.next_index
        # A crash between journaling a volume and publishing the betas it released loses
        # nothing: the replay releases them again and the ones never published go out now.
        for beta in released:
            if not beta.is_update and (beta.trial_id, "first") not in self.published_betas:
                self._publish_beta(beta, {})
        pending = [
            m for m in self.state.messages
            if m.topic == "beta" and m.data.get("run") == self.plan.run and _beta_kind(m.data) == "first"
            and m.data["trial_id"] not in self.decoded and "beta" in m.data
        ]
        if self.session.decoder is not None:
            for message in pending:
                self.session._decode_queue.put(
                    _DecodeJob(message.data["trial_id"], message.data.get("stim_id"),
                               np.asarray(message.data["beta"]), message.seq, dict(message.t))
                )
        logger.info(
            "%s: resumed from the journal at volume %d (%d volumes, %d decodes to redo)",
            self.plan.run, self.next_index, len(self.state.volumes), len(pending),
        )
        self.publish("status", {"state": "resumed", "run": self.plan.run, "tr_index": self.next_index}, {})

    def _replay_one(self, values: np.ndarray | None, motion: np.ndarray | None, tr_index: int) -> list[TrialBeta]:
        released: list[TrialBeta] = []
        if values is None:
            self.frontend.missing(tr_index)
        else:
            released = self.frontend.replay(tr_index, values, motion)
        self.history.append((tr_index, values, motion))
        self.next_index = max(self.next_index, tr_index + 1)
        return released

    def _take_onsets(self) -> None:
        added = False
        while True:
            try:
                request = self.session._onsets.get_nowait()
            except queue.Empty:
                break
            record = {
                "kind": "onset", "run": self.plan.run, "trial_id": str(request["trial_id"]),
                "onset_s": float(request["onset_s"]), "duration_s": float(request.get("duration_s") or 0.0),
                "stim_id": request.get("stim_id"),
            }
            if any(t.trial_id == record["trial_id"] for t in self.trials):
                logger.warning("onset for %s announced twice; the first is kept", record["trial_id"])
                continue
            self.journal.append(record)
            self.trials.append(_announced_trial(record))
            added = True
        if added:
            self._rebuild_with_trials()

    def _rebuild_with_trials(self) -> None:
        """A new trial changes the design: rebuild the GLM and replay this run's volumes."""
        history, self.history = self.history, []
        self.frontend = self._new_frontend()
        self.next_index = 0
        released: list[TrialBeta] = []
        for tr_index, values, motion in history:
            released += self._replay_one(values, motion, tr_index)
        for beta in released:
            if (beta.trial_id, "first") not in self.published_betas and not beta.is_update:
                self._publish_beta(beta, {})

    # ----------------------------------------------------------------- decode thread

    def decode_loop(self) -> None:
        decoder = self.session.decoder
        jobs = self.session._decode_queue
        while True:
            job = jobs.get()
            if job is None:
                return
            try:
                self._decode_one(decoder, job, backlog=jobs.qsize())
            except Exception as err:  # one bad decode must not stop the session
                logger.exception("decoding %s failed", job.trial_id)
                self.publish("status", {"state": "decode_error", "run": self.plan.run, "trial_id": job.trial_id,
                                        "message": f"{type(err).__name__}: {err}"}, {})

    def _decode_one(self, decoder: BetaDecoder, job: _DecodeJob, backlog: int) -> None:
        started = time.perf_counter()
        decoded = decoder.retrieve(job.beta, self.config.session.retrieval_top_k, shown_id=job.stim_id)
        retrieval: dict[str, Any] = {"ids": decoded.ids, "scores": [float(s) for s in decoded.scores]}
        if decoded.n_candidates is not None:
            retrieval["n_candidates"] = decoded.n_candidates
        if decoded.shown_rank is not None:
            retrieval["shown_rank"] = decoded.shown_rank
        data: dict[str, Any] = {
            "run": self.plan.run,
            "trial_id": job.trial_id,
            "stim_id": job.stim_id,
            "beta_seq": job.beta_seq,
            "retrieval": retrieval,
            "retrieval_ms": decoded.retrieval_ms,
        }
        if not self.config.session.reconstruct:
            data["reconstruction"] = "disabled"
        elif backlog > self.config.session.max_decode_backlog:
            data["reconstruction"] = "skipped_backlog"
            data["backlog"] = backlog
            self.summary.n_skipped_reconstructions += 1
            logger.warning("decode backlog %d: reconstruction of %s skipped, retrieval kept", backlog, job.trial_id)
        else:
            reconstruct_started = time.perf_counter()
            data["image_png"] = decoder.reconstruct(decoded, seed=_seed(job.trial_id))
            data["reconstruction"] = "done"
            data["reconstruction_ms"] = 1000 * (time.perf_counter() - reconstruct_started)
            self.summary.n_reconstructed += 1
        data["decode_ms"] = 1000 * (time.perf_counter() - started)
        message = self.publish("decode", data, dict(job.t))
        self.summary.n_decoded += 1
        self.summary.decode_latency_ms.append(data["decode_ms"])
        if job.t.get("file_complete"):
            self.summary.publish_latency_ms.append(1000 * (message.t["published"] - job.t["file_complete"]))
        logger.info("%s decode %s: top-1 %s (%s)", self.plan.run, job.trial_id,
                    decoded.ids[0] if decoded.ids else "-", data["reconstruction"])


def _beta_kind(data: dict[str, Any]) -> str:
    if data.get("is_final"):
        return "final"
    return "update" if data.get("is_update") else "first"


@dataclass(frozen=True)
class AnnouncedTrial:
    """A trial whose onset the stimulus software announced on the control socket."""

    trial_id: str
    onset_s: float
    duration_s: float
    stim_id: str | None = None


def _announced_trial(record: dict[str, Any]) -> AnnouncedTrial:
    return AnnouncedTrial(
        record["trial_id"], float(record["onset_s"]), float(record.get("duration_s") or 0.0), record.get("stim_id")
    )


def _history_entry(processed: ProcessedVolume) -> tuple[int, np.ndarray | None, np.ndarray | None]:
    motion = processed.motion.params if processed.motion is not None else (None if processed.missing else np.zeros(6))
    return processed.tr_index, processed.values, motion


def _volume_data(run: str, processed: ProcessedVolume) -> dict[str, Any]:
    motion = processed.motion
    return {
        "run": run,
        "tr_index": processed.tr_index,
        "missing": processed.missing,
        "fd_mm": None if motion is None else float(motion.fd_mm),
        "motion": None if motion is None else [float(p) for p in motion.params],
        "n_betas": len(processed.betas),
    }


def _replayed_volume_data(run: str, record: dict[str, Any]) -> dict[str, Any]:
    missing = record["kind"] == "missing"
    return {
        "run": run,
        "tr_index": record["tr_index"],
        "missing": missing,
        "fd_mm": None if missing else float(record["fd_mm"]),
        "motion": None if missing else [float(p) for p in record["motion"]],
        "n_betas": None,
    }


def _seed(trial_id: str) -> int:
    return int.from_bytes(trial_id.encode()[-8:].rjust(8, b"\0"), "little") % (2**31)

