"""The requests the control socket hands to the session, checked where they enter.

The publisher's control thread turns each ``onset``, ``run_start`` and ``run_end`` request map
into one of the frozen dataclasses below before the session sees it, so the session thread never
parses wire values: a request with a missing field, a wrong type, a value out of range or a field
the protocol does not have is answered ``ok: false`` with an ``error`` naming the field, and never
reaches the session. Constructing a request directly checks the same things.
"""

from __future__ import annotations

import math
import re
import reprlib
from dataclasses import dataclass
from typing import Any, ClassVar

from rtdecoder.errors import ProtocolError

MAX_REQUEST_BYTES = 64 * 1024
"""Largest control request body answered; larger ones get ``ok: false`` (requests are a few fields)."""
MAX_ID_CHARS = 128
"""Longest ``trial_id`` or ``stim_id`` accepted (they end up in messages, logs and reports)."""
MAX_ONSET_S = 86400.0
"""Latest onset or longest duration accepted, in seconds from the run's first volume (one day)."""
_RUN_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

_short = reprlib.Repr()
_short.maxstring = 40
_short.maxother = 40
_short.maxlevel = 2  # a deeply nested value in a request must not recurse in the error message


def shown(value: Any) -> str:
    """A short, bounded repr of a request value for a one-line error message."""
    return _short.repr(value)


def _text(cmd: str, key: str, value: Any, required: bool) -> str | None:
    """A string-able identifier field: a non-empty, printable str (or an int) of bounded length."""
    if value is None or value == "":
        if required:
            raise ProtocolError(f"{cmd}: field {key!r}: expected a non-empty string (got {shown(value)})")
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ProtocolError(f"{cmd}: field {key!r}: expected a string (got {type(value).__name__} {shown(value)})")
    if len(value) > MAX_ID_CHARS:
        raise ProtocolError(f"{cmd}: field {key!r}: expected at most {MAX_ID_CHARS} characters (got {len(value)})")
    if not value.strip() or not value.isprintable():
        raise ProtocolError(
            f"{cmd}: field {key!r}: expected printable text without control characters (got {shown(value)})"
        )
    return value


def _seconds(cmd: str, key: str, value: Any) -> float:
    """A finite number of seconds in [0, MAX_ONSET_S]."""
    expected = f"a finite number of seconds from 0 to {MAX_ONSET_S:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{cmd}: field {key!r}: expected {expected} (got {type(value).__name__} {shown(value)})")
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        raise ProtocolError(f"{cmd}: field {key!r}: expected {expected} (got {shown(value)})") from None
    if not (math.isfinite(seconds) and 0.0 <= seconds <= MAX_ONSET_S):
        raise ProtocolError(f"{cmd}: field {key!r}: expected {expected} (got {shown(value)})")
    return seconds


def _fields(cmd: str, request: dict[str, Any], required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    for key in required:
        if key not in request:
            raise ProtocolError(f"{cmd}: missing field {key!r}")
    unknown = sorted(str(k) for k in request if k not in ("cmd", *required, *optional))
    if unknown:
        allowed = ", ".join((*required, *optional)) or "none"
        raise ProtocolError(f"{cmd}: unknown field {shown(unknown[0])} (fields: {allowed})")


@dataclass(frozen=True)
class OnsetRequest:
    """A trial the stimulus software announces while the run goes on (``cmd: onset``).

    Attributes
    ----------
    trial_id : str
        Non-empty printable text, at most :data:`MAX_ID_CHARS` characters (an int is taken as its
        decimal text).
    onset_s : float
        Seconds from the run's first volume; finite, in [0, :data:`MAX_ONSET_S`].
    duration_s : float, default=0.0
        Finite, in [0, :data:`MAX_ONSET_S`]; 0 for an event.
    stim_id : str or None, default=None
        The stimulus shown, as ``trial_id``; ``None`` (or ``""`` on the wire) when not given.

    Raises
    ------
    ProtocolError
        When a field is missing, of the wrong type or out of range (the message names it).
    """

    cmd: ClassVar[str] = "onset"
    trial_id: str
    onset_s: float
    duration_s: float = 0.0
    stim_id: str | None = None

    def __post_init__(self) -> None:
        # frozen: the checked, normalised values replace the given ones once, here
        object.__setattr__(self, "trial_id", _text("onset", "trial_id", self.trial_id, required=True))
        object.__setattr__(self, "onset_s", _seconds("onset", "onset_s", self.onset_s))
        duration = 0.0 if self.duration_s is None else self.duration_s
        object.__setattr__(self, "duration_s", _seconds("onset", "duration_s", duration))
        object.__setattr__(self, "stim_id", _text("onset", "stim_id", self.stim_id, required=False))

    @classmethod
    def from_map(cls, request: dict[str, Any]) -> OnsetRequest:
        """The request from a decoded control map (``cmd`` and unknown fields checked too)."""
        _fields("onset", request, ("trial_id", "onset_s"), ("duration_s", "stim_id"))
        return cls(request["trial_id"], request["onset_s"], request.get("duration_s"), request.get("stim_id"))


@dataclass(frozen=True)
class RunStartRequest:
    """The stimulus software starts a run (``cmd: run_start``): the current run ends, the next gets ``run``.

    Attributes
    ----------
    run : str or None, default=None
        Label for the next run (letters, digits, ``.``, ``_``, ``-``; at most 64 characters;
        it names files), or ``None`` to number it.
    """

    cmd: ClassVar[str] = "run_start"
    run: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "run", _run_label("run_start", self.run))

    @classmethod
    def from_map(cls, request: dict[str, Any]) -> RunStartRequest:
        """The request from a decoded control map."""
        _fields("run_start", request, (), ("run",))
        return cls(request.get("run"))


@dataclass(frozen=True)
class RunEndRequest:
    """The stimulus software ends the current run (``cmd: run_end``).

    Attributes
    ----------
    run : str or None, default=None
        The run meant, as a check; ``None`` for whichever run is going on.
    """

    cmd: ClassVar[str] = "run_end"
    run: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "run", _run_label("run_end", self.run))

    @classmethod
    def from_map(cls, request: dict[str, Any]) -> RunEndRequest:
        """The request from a decoded control map."""
        _fields("run_end", request, (), ("run",))
        return cls(request.get("run"))


ControlRequest = OnsetRequest | RunStartRequest | RunEndRequest
"""What the publisher hands to the session (``ResultPublisher(on_onset=...)``)."""
SESSION_REQUESTS: dict[str, type[OnsetRequest] | type[RunStartRequest] | type[RunEndRequest]] = {
    "onset": OnsetRequest,
    "run_start": RunStartRequest,
    "run_end": RunEndRequest,
}
"""The control commands passed on to the session, and the type each becomes."""


def _run_label(cmd: str, value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _RUN_LABEL.fullmatch(value):
        raise ProtocolError(
            f"{cmd}: field 'run': expected a label of letters, digits, '.', '_' or '-' (at most 64, "
            f"starting with a letter or digit) (got {shown(value)})"
        )
    return value
