"""What the view remembers of a session: a bounded digest of its message stream.

:class:`ViewState` turns each published :class:`~rtdecoder_client.messages.Message` into the
small JSON-ready events the page draws, and keeps what a page opened (or reloaded) later needs
to show the session so far. Every list is bounded by the ``view`` config section, whatever the
session's length: ``history_runs`` runs, each with its latest ``run_volumes`` volumes,
``run_trials`` decoded trials and ``run_events`` notable events, reconstructions up to
``image_memory_mb``, and the betas still waiting for their decode.

Events (``k`` is the kind; every one carries the ``seq`` of the message it came from):

- ``vol``: ``run``, ``v`` = ``[tr_index, missing, fd_mm, motion (6: x, y, z mm; rotations about
  x, y, z, rad), tsnr, latency_ms (file complete to processed), publish_ms (file complete to
  published), backlog (betas waiting for their decode), seq]``;
- ``trial``: one decode (``trial_id``, ``stim_id``, top-k ``ids`` and ``scores``, ``shown_rank``
  of ``n_candidates``, ``margin`` = first minus second score, ``reconstruction`` state and
  ``image`` (whether ``/recon/<seq>`` has it), ``caption`` (the decoded caption or ``None``) and
  ``caption_ms``, ``decode_ms``, ``latency_ms`` (file complete to
  decode published), ``backlog`` (the decoder's, when it skipped the reconstruction), ``waiting``
  (betas still waiting after it), ``tr_index`` = the run's latest volume);
- ``state``: a status message worth keeping (a run started, ended or stopped, a file problem,
  an error), with ``tr_index`` = the volume where it happened (the next one expected);
- ``beat``: a heartbeat or a beta (``beta``: its kind), live only (never kept): ``state``, ``run``,
  ``backlog``;
- ``note``: something the view itself has to say (a gap it could not fill).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from typing import Any

import numpy as np
from rtdecoder_client.messages import Message

from rtdecoder.config import SessionConfig, ViewConfig

#: Status states kept in a run's event list; the others (heartbeats) only update what is shown now.
NOTABLE_STATES = frozenset({"run_start", "resumed", "file_problem", "decode_error", "error", "run_end", "stopped"})
#: What a run's state becomes on each status state (states not listed leave it as it is).
RUN_STATE = {"waiting": "waiting", "run_start": "running", "running": "running", "resumed": "running",
             "run_end": "run_end", "stopped": "stopped", "error": "error"}
_MAX_PENDING = 1000  # betas waiting for a decode remembered per run: more means decoding has stopped
_MIB = 1024 * 1024


def finite(value: Any, digits: int = 4) -> float | None:
    """``value`` rounded to ``digits`` decimals, or ``None`` when it is missing or not finite (JSON has no NaN)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return round(number, digits) if math.isfinite(number) else None


def _caption(value: Any) -> str | None:
    """A decode's caption as the page shows it: one line, at most 300 characters (a bounded event)."""
    if not isinstance(value, str) or not value.strip():
        return None
    return " ".join(value.split())[:300]


def _ms(later: Any, earlier: Any) -> float | None:
    if later is None or earlier is None:
        return None
    return finite(1000.0 * (float(later) - float(earlier)), 2)


class RunView:
    """One run as the view keeps it: its latest volumes, trials and events, and its counts."""

    def __init__(self, label: str, config: ViewConfig, seq: int, t: float | None) -> None:
        self.label = label
        self.state = "waiting"
        self.first_seq = seq
        self.started_t = t
        self.volumes: deque[list[Any]] = deque(maxlen=config.run_volumes)
        self.trials: deque[dict[str, Any]] = deque(maxlen=config.run_trials)
        self.events: deque[dict[str, Any]] = deque(maxlen=config.run_events)
        self.pending: OrderedDict[int, str] = OrderedDict()  # beta seq -> kind, awaiting its decode
        self.last_tr = -1
        self.counts = {"volumes": 0, "missing": 0, "fd_over": 0, "betas": 0, "decoded": 0, "reconstructed": 0,
                       "skipped": 0, "problems": 0}
        self.info: dict[str, Any] = {}  # tr_s, n_volumes, end reason

    def summary(self) -> dict[str, Any]:
        """The run's line in the session list."""
        return {"run": self.label, "state": self.state, "first_seq": self.first_seq, "started_t": self.started_t,
                "last_tr": self.last_tr, "backlog": len(self.pending), **self.counts, **self.info}

    def snapshot(self) -> dict[str, Any]:
        return {"summary": self.summary(), "volumes": list(self.volumes), "trials": list(self.trials),
                "events": list(self.events)}


class ViewState:
    """The view's bounded memory of one session, fed message by message.

    Parameters
    ----------
    config : ViewConfig
        The bounds and the FD threshold.
    session_config : SessionConfig, optional
        Which betas the session decodes (``decode_updates``, ``decode_final``): the backlog counts
        the ones still waiting. Default: first betas only.
    decoding : bool, default=True
        Whether the session decodes at all (without a decoder there is no backlog).

    Attributes
    ----------
    lock : threading.Lock
        Held by :meth:`take` and :meth:`snapshot`; the server holds it to register a page at a
        consistent point of the stream.
    session : str or None
        The session id of the stream; a message of another session starts the view afresh.
    last_seq : int
        Sequence number of the latest message taken (-1 before the first).
    """

    def __init__(self, config: ViewConfig, session_config: SessionConfig | None = None, decoding: bool = True) -> None:
        self.config = config
        session_config = session_config or SessionConfig()
        self.decoded_kinds = {"first"} | ({"update"} if session_config.decode_updates else set()) | (
            {"final"} if session_config.decode_final else set())
        self.decoding = decoding
        self.thumbnails = False  # whether the server can show candidate images (told to the page)
        self.lock = threading.Lock()
        self._reset(None)

    def _reset(self, session: str | None) -> None:
        self.session = session
        self.last_seq = -1
        self.runs: OrderedDict[str, RunView] = OrderedDict()
        self.session_events: deque[dict[str, Any]] = deque(maxlen=self.config.run_events)
        self.images: OrderedDict[int, tuple[str, bytes]] = OrderedDict()  # decode seq -> (run, PNG)
        self.image_bytes = 0
        self.now: dict[str, Any] = {"state": "connecting", "run": None, "tr_index": None, "t": None, "seq": -1}

    # ----------------------------------------------------------------- feeding

    def take(self, message: Message) -> list[dict[str, Any]]:
        """Digest one message; returns the events to push to the pages now.

        A message of another session clears the view first and returns ``[{"k": "reset"}]``
        ahead of its events (the pages then need a whole snapshot, not events).
        """
        with self.lock:
            events: list[dict[str, Any]] = []
            if message.session != self.session:
                if self.session is not None:
                    events.append({"k": "reset", "seq": message.seq})
                self._reset(message.session)
            self.last_seq = max(self.last_seq, message.seq)
            handler = {"volume": self._volume, "beta": self._beta, "decode": self._decode,
                       "status": self._status}.get(message.topic)
            if handler is not None:
                event = handler(message)
                if event is not None:
                    events.append(event)
            return events

    def note(self, text: str) -> dict[str, Any]:
        """Something the view has to say itself (kept with the session's events); returns its event."""
        with self.lock:
            event = {"k": "note", "message": text, "seq": self.last_seq, "run": None, "t": None}
            self.session_events.append(event)
            return event

    def _run(self, label: Any, message: Message) -> RunView | None:
        if label is None:
            return None
        label = str(label)
        run = self.runs.get(label)
        if run is None:
            run = self.runs[label] = RunView(label, self.config, message.seq, message.t.get("published"))
            while len(self.runs) > self.config.history_runs:
                old, _ = self.runs.popitem(last=False)
                for seq in [seq for seq, (owner, _png) in self.images.items() if owner == old]:
                    self._drop_image(seq)
        return run

    def _volume(self, message: Message) -> dict[str, Any] | None:
        data, t = message.data, message.t
        run = self._run(data.get("run"), message)
        if run is None:
            return None
        missing = bool(data.get("missing"))
        fd = finite(data.get("fd_mm"))
        motion = data.get("motion")
        motion = [finite(p, 6) for p in motion] if isinstance(motion, list | tuple) and len(motion) == 6 else None
        tr_index = int(data.get("tr_index", run.last_tr + 1))
        run.last_tr = max(run.last_tr, tr_index)
        run.counts["volumes" if not missing else "missing"] += 1
        if fd is not None and fd > self.config.fd_threshold_mm:
            run.counts["fd_over"] += 1
        entry = [tr_index, missing, fd, motion, finite(data.get("tsnr"), 2),
                 _ms(t.get("processed"), t.get("file_complete")), _ms(t.get("published"), t.get("file_complete")),
                 len(run.pending), message.seq]
        run.volumes.append(entry)
        if run.state == "waiting":
            run.state = "running"
        self.now.update({"state": "running", "run": run.label, "tr_index": tr_index, "t": t.get("published"),
                         "seq": message.seq})
        return {"k": "vol", "run": run.label, "v": entry, "seq": message.seq}

    def _beta(self, message: Message) -> dict[str, Any] | None:
        data = message.data
        run = self._run(data.get("run"), message)
        if run is None:
            return None
        run.counts["betas"] += 1
        kind = "final" if data.get("is_final") else "update" if data.get("is_update") else "first"
        beta = data.get("beta")
        # the session does not decode a beta that is not finite: it would never leave the backlog
        usable = not isinstance(beta, np.ndarray) or bool(np.all(np.isfinite(beta)))
        if self.decoding and kind in self.decoded_kinds and usable:
            run.pending[message.seq] = kind
            while len(run.pending) > _MAX_PENDING:
                run.pending.popitem(last=False)
        return {"k": "beat", "run": run.label, "state": run.state, "backlog": len(run.pending), "beta": kind,
                "trial_id": data.get("trial_id"), "seq": message.seq}

    def _decode(self, message: Message) -> dict[str, Any] | None:
        data, t = message.data, message.t
        run = self._run(data.get("run"), message)
        if run is None:
            return None
        kind = run.pending.pop(data.get("beta_seq"), "first") if data.get("beta_seq") is not None else "first"
        retrieval = data.get("retrieval") or {}
        ids = [str(i) for i in retrieval.get("ids") or []]
        scores = [finite(s) for s in retrieval.get("scores") or []]
        margin = None
        if len(scores) >= 2 and scores[0] is not None and scores[1] is not None:
            margin = round(scores[0] - scores[1], 4)
        png = data.get("image_png")
        has_image = isinstance(png, bytes | bytearray) and len(png) > 0
        if has_image:
            self._keep_image(message.seq, run.label, bytes(png))
        reconstruction = str(data.get("reconstruction") or "-")
        run.counts["decoded"] += 1
        run.counts["reconstructed"] += reconstruction == "done"
        run.counts["skipped"] += reconstruction == "skipped_backlog"
        trial = {
            "k": "trial", "run": run.label, "trial_id": str(data.get("trial_id")),
            "stim_id": None if data.get("stim_id") in (None, "") else str(data.get("stim_id")),
            "kind": kind, "ids": ids, "scores": scores,
            "shown_rank": retrieval.get("shown_rank"), "n_candidates": retrieval.get("n_candidates"),
            "margin": margin, "reconstruction": reconstruction, "image": has_image,
            "decode_ms": finite(data.get("decode_ms"), 1), "retrieval_ms": finite(data.get("retrieval_ms"), 1),
            "reconstruction_ms": finite(data.get("reconstruction_ms"), 1),
            "caption": _caption(data.get("caption")), "caption_ms": finite(data.get("caption_ms"), 1),
            "latency_ms": _ms(t.get("published"), t.get("file_complete")),
            "backlog": data.get("backlog", len(run.pending)), "waiting": len(run.pending), "tr_index": run.last_tr,
            "seq": message.seq, "t": t.get("published"),
        }
        run.trials.append(trial)
        return trial

    def _status(self, message: Message) -> dict[str, Any] | None:
        data, t = message.data, message.t
        state = str(data.get("state") or "")
        run = self._run(data.get("run"), message)
        # a file problem or a failed decode is an event, not a state: what is shown now stays
        self.now.update({"run": run.label if run else self.now["run"], "t": t.get("published"), "seq": message.seq})
        if state in RUN_STATE:
            self.now["state"] = RUN_STATE[state]
        changed = False
        if run is not None:
            new_state = RUN_STATE.get(state, run.state)
            changed, run.state = new_state != run.state, new_state
            if state == "run_start":
                run.info.update({"tr_s": finite(data.get("tr_s")), "n_volumes": data.get("n_volumes"),
                                 "series": data.get("series")})
            elif state == "run_end":
                run.info["reason"] = data.get("reason")
                run.pending.clear()  # the session drains its decodes before it ends a run
            elif state in ("file_problem", "decode_error"):
                run.counts["problems"] += 1
        if state not in NOTABLE_STATES and not changed:
            return {"k": "beat", "run": run.label if run else None, "state": state,
                    "backlog": len(run.pending) if run else 0, "seq": message.seq}
        event = {"k": "state", "run": run.label if run else None, "state": state,
                 "message": data.get("message"), "reason": data.get("reason"),
                 "tr_index": (run.last_tr + 1) if run else None, "seq": message.seq, "t": t.get("published")}
        if state == "run_start" and run is not None:
            event.update(run.info)
        (run.events if run is not None else self.session_events).append(event)
        return event

    # ----------------------------------------------------------------- images

    def _keep_image(self, seq: int, run: str, png: bytes) -> None:
        budget = self.config.image_memory_mb * _MIB
        if len(png) > budget:
            return
        self.images[seq] = (run, png)
        self.image_bytes += len(png)
        while self.image_bytes > budget:
            self._drop_image(next(iter(self.images)))

    def _drop_image(self, seq: int) -> None:
        _run, png = self.images.pop(seq)
        self.image_bytes -= len(png)

    def image(self, seq: int) -> bytes | None:
        """The reconstruction PNG of the decode message ``seq``, while it is kept."""
        with self.lock:
            kept = self.images.get(seq)
            return kept[1] if kept is not None else None

    # ----------------------------------------------------------------- reading

    def snapshot(self) -> dict[str, Any]:
        """Everything a page needs to show the session so far (the ``snapshot`` event)."""
        with self.lock:
            return {
                "k": "snapshot", "session": self.session, "seq": self.last_seq, "now": dict(self.now),
                "config": self.page_config(), "runs": [run.snapshot() for run in self.runs.values()],
                "session_events": list(self.session_events),
            }

    def page_config(self) -> dict[str, Any]:
        """The settings the page draws with, bounds included (the page keeps no more than the server)."""
        config = self.config
        return {"fd_threshold_mm": config.fd_threshold_mm, "history_runs": config.history_runs,
                "run_volumes": config.run_volumes, "run_trials": config.run_trials, "run_events": config.run_events,
                "thumbnail_px": config.thumbnail_px, "decoding": self.decoding, "thumbnails": self.thumbnails}

    def sizes(self) -> dict[str, int]:
        """How much is kept now: runs, volumes, trials, events, images and their bytes (for bounds checks)."""
        with self.lock:
            runs = list(self.runs.values())
            return {
                "runs": len(runs),
                "volumes": sum(len(r.volumes) for r in runs),
                "max_run_volumes": max((len(r.volumes) for r in runs), default=0),
                "trials": sum(len(r.trials) for r in runs),
                "max_run_trials": max((len(r.trials) for r in runs), default=0),
                "events": sum(len(r.events) for r in runs) + len(self.session_events),
                "pending": sum(len(r.pending) for r in runs),
                "images": len(self.images),
                "image_bytes": self.image_bytes,
            }
