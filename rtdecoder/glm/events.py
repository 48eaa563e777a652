"""Trials and BIDS ``events.tsv`` files: what was shown, when, for how long.

A lab's own events file needs only ``onset`` and ``duration`` (seconds from the start of the run's
first volume). ``trial_id``, ``stim_id``, ``stim_index`` and ``is_test`` are read when present;
``trial_type`` is kept as written. The phantom world writes all of them. BIDS's own column for the
image, ``stim_file`` (a path under the dataset's ``stimuli/``, e.g. ``images/nsd_00123.png``),
names the trial's image when there is no ``stim_id``: the stim_id is the file's stem
(``nsd_00123``), which is how :mod:`rtdecoder.calibration.calibrate` looks images up
(``<stim_id>.png``/``.jpg`` in its images folder).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from rtdecoder.errors import DecoderError

REQUIRED_COLUMNS = ("onset", "duration")
EVENTS_COLUMNS = ("onset", "duration", "trial_type", "stim_id", "stim_index", "trial_id", "is_test")
#: BIDS's column for the stimulus file; read into ``stim_id`` (the file's stem) when ``stim_id`` is absent.
STIM_FILE_COLUMN = "stim_file"


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

    A row without a ``stim_id`` (no such column, or ``n/a``) takes the stem of its ``stim_file``
    as its ``stim_id``, so that trials named by image file match the images by name.

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
    except UnicodeDecodeError as err:
        raise EventsFileError(
            f"{path}: byte {err.start}: not text; expected a tab-separated BIDS events.tsv in UTF-8"
        ) from None
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
            stim_id=cell("stim_id") or _stem_of(cell(STIM_FILE_COLUMN)),
            stim_index=_parse(path, line, "stim_index", cell("stim_index") or "-1", int),
            is_test=_parse(path, line, "is_test", cell("is_test") or "false", _boolean),
        ))
    ids = [t.trial_id for t in trials]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise EventsFileError(f"{path}: column 'trial_id': {duplicate!r} appears twice; ids must be unique")
    return trials


def _stem_of(stim_file: str | None) -> str | None:
    """The file name without its last suffix, as :attr:`pathlib.PurePath.stem`: ``images/nsd_00123.png`` ->
    ``nsd_00123`` (either slash). None stays None."""
    if stim_file is None:
        return None
    return PurePosixPath(stim_file.replace("\\", "/")).stem or None


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
