"""The decode thread: retrieval for every queued beta, a reconstruction when decoding keeps up.

It runs any :class:`~rtdecoder.decode.protocol.BetaDecoder`. A slow decode never delays a volume
or a beta: betas are queued by the session thread and decoded here; a reconstruction is skipped
(``reconstruction: skipped_backlog``) when more than ``session.max_decode_backlog`` betas of later
volumes wait behind it. Betas that one volume released together (a run's first trials, which
``glm.min_residual_dof`` holds back and releases at once) are a burst, not a decoder falling
behind: they do not count against each other. Retrievals are never dropped. A decoder with a
``caption`` method (the live decoder with a captioner) also captions every beta whose
reconstruction is made or is off (``caption``, ``caption_ms``); a caption that fails is logged
and reported, and the decode goes out without it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from rtdecoder_client.messages import Message
from rtdecoder_client.payloads import DecodeData, Retrieval

from rtdecoder.config import SessionConfig
from rtdecoder.decode.protocol import BetaDecoder

logger = logging.getLogger(__name__)


@dataclass
class DecodeJob:
    """One beta waiting to be decoded."""

    run: str
    trial_id: str
    stim_id: str | None
    beta: np.ndarray
    beta_seq: int
    t: dict[str, float | None]
    tr_index: int = -1  # the volume that released the beta (-1: unknown, counts as its own volume)


@dataclass
class DecodeCounts:
    """What the decode thread did in one run (latencies in ms)."""

    n_decoded: int = 0
    n_reconstructed: int = 0
    n_skipped_reconstructions: int = 0


Publish = Callable[[str, dict[str, Any], dict[str, float | None]], Message]


class DecodeWorker:
    """Decodes queued betas in a thread of its own and publishes each result.

    Parameters
    ----------
    decoder : BetaDecoder
    config : SessionConfig
        ``retrieval_top_k``, ``reconstruct``, ``max_decode_backlog``.
    publish : callable
        The session's one publish path ``(topic, data, t) -> Message``.
    on_decoded : callable, optional
        Called as ``on_decoded(job, data, message)`` after each decode message went out (the
        session's counters and latencies).
    """

    def __init__(
        self,
        decoder: BetaDecoder,
        config: SessionConfig,
        publish: Publish,
        on_decoded: Callable[[DecodeJob, dict[str, Any], Message], None] | None = None,
    ) -> None:
        self.decoder = decoder
        self.config = config
        self.publish = publish
        self.on_decoded = on_decoded
        self.jobs: queue.Queue[DecodeJob | None] = queue.Queue()
        self.failure: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> DecodeWorker:
        self._thread = threading.Thread(target=self._loop, name="rtdecoder-decode", daemon=True)
        self._thread.start()
        return self

    def put(self, job: DecodeJob) -> None:
        """Queue one beta."""
        self.jobs.put(job)

    def drain(self) -> None:
        """Wait until every queued beta is decoded (the run's end)."""
        self.jobs.join()

    def stop(self) -> None:
        """Decode what is queued, then end the thread."""
        if self._thread is not None:
            self.jobs.put(None)
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        try:
            while True:
                job = self.jobs.get()
                try:
                    if job is None:
                        return
                    self._decode_safely(job)
                finally:
                    self.jobs.task_done()
        except BaseException as err:  # the session sees it and ends the run loudly
            logger.exception("the decode thread stopped")
            self.failure = err

    def _decode_safely(self, job: DecodeJob) -> None:
        try:
            self._decode_one(job, backlog=self._later_backlog(job))
        except Exception as err:  # one bad decode must not stop the session
            logger.exception("decoding %s failed", job.trial_id)
            self.publish("status", {"state": "decode_error", "run": job.run, "trial_id": job.trial_id,
                                    "message": f"{type(err).__name__}: {err}"}, {})

    def _later_backlog(self, job: DecodeJob) -> int:
        """Queued betas behind ``job`` from later volumes (or another run)."""

        def same_volume(waiting: DecodeJob) -> bool:
            return waiting.tr_index >= 0 and (waiting.run, waiting.tr_index) == (job.run, job.tr_index)

        with self.jobs.mutex:  # the queue's own lock: a consistent look at what waits
            return sum(1 for waiting in self.jobs.queue if waiting is not None and not same_volume(waiting))

    def _decode_one(self, job: DecodeJob, backlog: int) -> None:
        config = self.config
        started = time.perf_counter()
        decoded = self.decoder.retrieve(job.beta, config.retrieval_top_k, shown_id=job.stim_id)
        retrieval = Retrieval(list(decoded.ids), [float(s) for s in decoded.scores], decoded.n_candidates,
                              decoded.shown_rank)
        payload = DecodeData(job.run, job.trial_id, job.stim_id, job.beta_seq, retrieval, decoded.retrieval_ms,
                             reconstruction="disabled")
        if not config.reconstruct:
            pass  # "disabled", as built
        elif backlog > config.max_decode_backlog:
            payload.reconstruction, payload.backlog = "skipped_backlog", backlog
            logger.warning("decode backlog %d: reconstruction of %s skipped, retrieval kept", backlog, job.trial_id)
        else:
            reconstruct_started = time.perf_counter()
            payload.image_png = self.decoder.reconstruct(decoded, seed=trial_seed(job.trial_id))
            payload.reconstruction = "done"
            payload.reconstruction_ms = 1000 * (time.perf_counter() - reconstruct_started)
        if payload.reconstruction != "skipped_backlog":
            self._caption(job, decoded, payload)
        payload.decode_ms = 1000 * (time.perf_counter() - started)
        data = payload.to_map()
        message = self.publish("decode", data, dict(job.t))
        if self.on_decoded is not None:
            self.on_decoded(job, data, message)
        logger.info("%s decode %s: top-1 %s (%s)", job.run, job.trial_id,
                    decoded.ids[0] if decoded.ids else "-", data["reconstruction"])

    def _caption(self, job: DecodeJob, decoded: Any, payload: DecodeData) -> None:
        """The caption stage, after the reconstruction (whose prior sample it reuses, same seed)."""
        caption = getattr(self.decoder, "caption", None)
        if not callable(caption):
            return
        started = time.perf_counter()
        try:
            text = caption(decoded, seed=trial_seed(job.trial_id))
        except Exception as err:  # the retrieval and the image still go out
            logger.exception("captioning %s failed", job.trial_id)
            self.publish("status", {"state": "decode_error", "run": job.run, "trial_id": job.trial_id,
                                    "message": f"caption: {type(err).__name__}: {err}"}, {})
            return
        if text is not None:
            payload.caption, payload.caption_ms = text, 1000 * (time.perf_counter() - started)


def trial_seed(trial_id: str) -> int:
    """The reconstruction seed of a trial: the same image for the same trial, run after run."""
    return int.from_bytes(trial_id.encode()[-8:].rjust(8, b"\0"), "little") % (2**31)
