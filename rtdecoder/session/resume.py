"""What the journal says already happened: the state a restarted session resumes from.

:class:`JournalState` folds the journal's records in order (``Journal.open(on_record=...)``), one
at a time, so a long session's journal is never held in memory whole. It keeps:

- the session id and the next sequence number, so numbering continues and is never reused;
- the newest ``history_size`` published messages, for clients asking for ``last N``;
- for every run that started and has not ended: its ``run_start`` record (label, series, TR,
  slice-time reference, planned length), its journaled volumes, its announced onsets and its
  published messages (to know which betas and decodes already went out);
- the series keys of the runs that ended, so their files, seen again when the watcher lists the
  export folder at a restart, are recognised and left alone;
- the session's own geometry (``geometry`` record), when it runs without a bundle.

A run's messages and volumes are dropped as soon as its ``run_end`` record is folded in: memory
follows the current run, not the session's length.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtdecoder_client.messages import Message, message_from_map

from rtdecoder.session.journal import iter_records


@dataclass
class RunRecords:
    """The journal's records of one run that has not ended."""

    start: dict[str, Any]
    messages: list[Message] = field(default_factory=list)
    volumes: list[dict[str, Any]] = field(default_factory=list)
    announced_trials: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class JournalState:
    """The folded journal (see the module notes).

    Parameters
    ----------
    history_size : int
        How many of the newest published messages to keep (``publish.history_size``).
    """

    history_size: int
    session_id: str | None = None
    next_seq: int = 0
    recent: collections.deque[Message] = field(init=False)
    open_runs: dict[str, RunRecords] = field(default_factory=dict)
    ended_runs: list[str] = field(default_factory=list)
    ended_series: set[str] = field(default_factory=set)
    geometry: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.recent = collections.deque(maxlen=self.history_size)

    @property
    def n_runs_started(self) -> int:
        """Runs that started in this session, ended or not."""
        return len(self.ended_runs) + len(self.open_runs)

    def take(self, record: dict[str, Any]) -> None:
        """Fold in the next journal record."""
        kind = record["kind"]
        run = record.get("run")
        if kind == "session_start":
            self.session_id = record["session"]
        elif kind == "geometry":
            self.geometry = record
        elif kind == "run_start":
            self.open_runs[run] = RunRecords(record)
        elif kind == "published":
            message = message_from_map(record["message"])
            self.next_seq = message.seq + 1
            self.recent.append(message)
            records = self.open_runs.get(message.data.get("run"))
            if records is not None:
                records.messages.append(message)
        elif kind in ("volume", "missing") and run in self.open_runs:
            self.open_runs[run].volumes.append(record)
        elif kind == "onset" and run in self.open_runs:
            self.open_runs[run].announced_trials.append(record)
        elif kind == "run_end":
            records = self.open_runs.pop(run, None)
            self.ended_runs.append(run)
            if records is not None:
                self.ended_series.add(records.start["series_key"])


def published_since(journal_path: Path, from_seq: int) -> Iterator[Message]:
    """Published messages from ``from_seq`` on, streamed from the journal file (the publisher takes one page)."""
    for record in iter_records(journal_path):
        if record["kind"] == "published" and record["message"]["seq"] >= from_seq:
            yield message_from_map(record["message"])
