"""The ``data`` of each topic as a typed record: what the session sends and what a client reads.

One dataclass per topic (docs/protocol.md), each with ``to_map`` (the wire map: optional fields
that are ``None`` are left out) and ``from_map`` (fields this version does not know are kept in
``extra``, so a newer session's messages still read). The session builds its messages from
these, and the client hands them back: both sides share one definition of the payloads.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from rtdecoder_client.errors import ProtocolError


@dataclass
class _Payload:
    topic: ClassVar[str] = ""
    #: fields sent only when they have a value (the others are sent as null when None)
    optional: ClassVar[tuple[str, ...]] = ()
    extra: dict[str, Any] = field(default_factory=dict, kw_only=True)

    def to_map(self) -> dict[str, Any]:
        """The wire map of this payload."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        for name in self.optional:
            if data[name] is None:
                del data[name]
        return {**data, **self.extra}

    @classmethod
    def from_map(cls, data: dict[str, Any]) -> Any:
        """The payload of a received ``data`` map; raises ProtocolError when a required field is missing."""
        if not isinstance(data, dict):
            raise ProtocolError(f"{cls.topic}: data: expected a map (got {type(data).__name__})")
        known = {f.name for f in fields(cls) if f.name != "extra"}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ProtocolError(f"{cls.topic}: data: missing field {missing[0]!r}")
        values = {key: value for key, value in data.items() if key in known}
        return cls(**values, extra={key: value for key, value in data.items() if key not in known})


@dataclass
class VolumeData(_Payload):
    """``volume``: one volume of a run, in acquisition order (``missing`` when it never arrived)."""

    topic: ClassVar[str] = "volume"
    run: str
    tr_index: int
    missing: bool
    fd_mm: float | None = None  # framewise displacement from the previous volume, mm
    motion: list[float] | None = None  # x, y, z (mm, world RAS), rotations about x, y, z (rad)
    tsnr: float | None = None  # running temporal SNR, median over the mask voxels
    n_betas: int | None = None  # betas this volume released


@dataclass
class BetaData(_Payload):
    """``beta``: a trial's beta map, first when released, then refinements and the run's final."""

    topic: ClassVar[str] = "beta"
    optional: ClassVar[tuple[str, ...]] = ("beta",)
    run: str
    trial_id: str
    trial_index: int
    stim_id: str | None
    onset_s: float
    tr_index: int  # the volume it was computed at
    n_volumes_used: int
    is_update: bool
    is_final: bool
    beta: np.ndarray | None = None  # float32 over the mask voxels (session.publish_beta_maps)

    @property
    def kind(self) -> str:
        """``first``, ``update`` or ``final``."""
        return "final" if self.is_final else "update" if self.is_update else "first"


@dataclass
class Retrieval:
    """The retrieval ranking of one decode."""

    ids: list[str]
    scores: list[float]
    n_candidates: int | None = None
    shown_rank: int | None = None  # 1-based rank of the image the trial showed, when a candidate

    def to_map(self) -> dict[str, Any]:
        data: dict[str, Any] = {"ids": list(self.ids), "scores": [float(s) for s in self.scores]}
        for name in ("n_candidates", "shown_rank"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        return data

    @classmethod
    def from_map(cls, data: dict[str, Any]) -> Retrieval:
        if not isinstance(data, dict) or "ids" not in data or "scores" not in data:
            raise ProtocolError("decode: retrieval: expected a map with ids and scores")
        return cls(list(data["ids"]), list(data["scores"]), data.get("n_candidates"), data.get("shown_rank"))

    @property
    def margin(self) -> float | None:
        """The first score minus the second: the decode's confidence (None with fewer than 2)."""
        return float(self.scores[0] - self.scores[1]) if len(self.scores) >= 2 else None


@dataclass
class DecodeData(_Payload):
    """``decode``: a beta decoded into a retrieval ranking and, when decoding keeps up, an image."""

    topic: ClassVar[str] = "decode"
    optional: ClassVar[tuple[str, ...]] = ("image_png", "reconstruction_ms", "backlog", "decode_ms", "caption",
                                           "caption_ms")
    run: str
    trial_id: str
    stim_id: str | None
    beta_seq: int  # seq of the beta message decoded
    retrieval: Retrieval
    retrieval_ms: float
    reconstruction: str  # done, skipped_backlog or disabled
    image_png: bytes | None = None
    reconstruction_ms: float | None = None
    backlog: int | None = None
    decode_ms: float | None = None
    caption: str | None = None  # the seen image described, from the prior's tokens (when captions are on)
    caption_ms: float | None = None  # the caption stage alone (with the prior when reconstruction is off)

    def to_map(self) -> dict[str, Any]:
        return {**super().to_map(), "retrieval": self.retrieval.to_map()}

    @classmethod
    def from_map(cls, data: dict[str, Any]) -> DecodeData:
        payload = super().from_map(data)
        payload.retrieval = Retrieval.from_map(payload.retrieval)
        return payload


@dataclass
class StatusData(_Payload):
    """``status``: heartbeats and events (``state``); the other fields depend on the state."""

    topic: ClassVar[str] = "status"
    optional: ClassVar[tuple[str, ...]] = ("message",)
    state: str
    run: str | None = None
    message: str | None = None  # one line of text


PAYLOADS: dict[str, type[_Payload]] = {p.topic: p for p in (VolumeData, BetaData, DecodeData, StatusData)}


def payload_of(topic: str, data: dict[str, Any]) -> _Payload:
    """The typed payload of a message's ``data`` map."""
    if topic not in PAYLOADS:
        raise ProtocolError(f"topic: expected one of {', '.join(PAYLOADS)} (got {topic!r})")
    return PAYLOADS[topic].from_map(data)
