"""Trials and BIDS ``events.tsv`` files: what was shown, when, for how long.

A lab's own events file needs only ``onset`` and ``duration`` (seconds from the start of the run's
first volume). ``trial_id``, ``stim_id``, ``stim_index`` and ``is_test`` are read when present;
``trial_type`` is kept as written. The phantom world writes all of them.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rtdecoder.errors import DecoderError

REQUIRED_COLUMNS = ("onset", "duration")
EVENTS_COLUMNS = ("onset", "duration", "trial_type", "stim_id", "stim_index", "trial_id", "is_test")


class EventsFileError(DecoderError):
    """An ``events.tsv`` file is missing a column or has a value of the wrong type."""


@dataclass(frozen=True)
class Trial:
    """One stimulus presentation.

    Attributes
    ----------
    trial_id : str
        Unique within the session; names the trial in published results.
    onset_s : float
        Onset from the start of the run's first volume, s.
    duration_s : float
        Time on screen, s (0 models an impulse).
    stim_id : str or None
        The image's identifier (in the stimulus bank, or the file name).
    stim_index : int
        Row of the image in the stimulus bank, -1 when not from one.
    is_test : bool
        True for held-out test images (shown several times).
    """

    trial_id: str
    onset_s: float
    duration_s: float
    stim_id: str | None = None
    stim_index: int = -1
    is_test: bool = False


def write_events_tsv(trials: Sequence[Trial], path: str | Path) -> None:
    """Write one run's trials as a BIDS ``events.tsv`` with every column of :data:`EVENTS_COLUMNS`.

    ``trial_type`` is ``"test"`` or ``"train"``; times have millisecond precision.
    """
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(EVENTS_COLUMNS)
        for trial in trials:
            writer.writerow([
                f"{trial.onset_s:.3f}", f"{trial.duration_s:.3f}", "test" if trial.is_test else "train",
                trial.stim_id or "n/a", trial.stim_index, trial.trial_id, "true" if trial.is_test else "false",
            ])


def read_events_tsv(path: str | Path) -> list[Trial]:
    """Read a BIDS ``events.tsv``; only ``onset`` and ``duration`` are required.

    Raises
    ------
    EventsFileError
        Naming the file, the line and column, and what was expected.
    """
    path = Path(path)
    try:
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle, delimiter="\t"))
    except OSError as err:
        raise EventsFileError(f"{path}: cannot read events file: {err.strerror}") from None
    if not rows:
        raise EventsFileError(f"{path}: empty; expected a header row with at least onset and duration")
    header = rows[0]
    for column in REQUIRED_COLUMNS:
        if column not in header:
            raise EventsFileError(f"{path}: column {column!r} missing; expected at least onset and duration")
    col = {name: header.index(name) for name in header}
    trials = []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise EventsFileError(f"{path}: line {line}: expected {len(header)} tab-separated values (got {len(row)})")

        def cell(name: str, row: list[str] = row) -> str | None:
            value = row[col[name]] if name in col else None
            return None if value in (None, "", "n/a") else value

        trials.append(Trial(
            trial_id=cell("trial_id") or f"trial-{len(trials) + 1:03d}",
            onset_s=_parse(path, line, "onset", cell("onset"), float),
            duration_s=_parse(path, line, "duration", cell("duration"), float),
            stim_id=cell("stim_id"),
            stim_index=_parse(path, line, "stim_index", cell("stim_index") or "-1", int),
            is_test=_parse(path, line, "is_test", cell("is_test") or "false", _boolean),
        ))
    ids = [t.trial_id for t in trials]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise EventsFileError(f"{path}: column 'trial_id': {duplicate!r} appears twice; ids must be unique")
    return trials


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "1"):
        return True
    if text.lower() in ("false", "0"):
        return False
    raise ValueError(text)


def _parse(path: Path, line: int, column: str, text: str | None, kind: type | object) -> object:
    try:
        if text is None:
            raise ValueError(text)
        return kind(text)  # type: ignore[operator]
    except ValueError:
        expected = {"float": "a number", "int": "an integer"}.get(getattr(kind, "__name__", ""), "true or false")
        raise EventsFileError(f"{path}: line {line}: column {column!r}: expected {expected} (got {text!r})") from None
