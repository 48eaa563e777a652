"""The result messages and their wire format (schema version 1, see docs/protocol.md).

A message travels as two ZeroMQ frames, ``[topic, body]``. The topic frame is the ASCII topic
(``volume``, ``beta``, ``decode``, ``status``) so subscribers can filter on it. The body is a
msgpack (default) or JSON map::

    {"schema": 1, "topic": "beta", "session": "...", "seq": 17,
     "t": {"acquired": ..., "file_complete": ..., "processed": ..., "published": ...},
     "data": {...}}

Arrays inside ``data`` are encoded as ``{"__ndarray__": {"dtype", "shape", "data"}}`` (raw
little-endian bytes; base64 in JSON); images are PNG bytes. Nothing is ever pickled.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack
import numpy as np

from rtdecoder_client.errors import ProtocolError

SCHEMA_VERSION = 1
TOPICS = ("volume", "beta", "decode", "status")
TIMESTAMP_KEYS = ("acquired", "file_complete", "processed", "published")
Encoding = Literal["msgpack", "json"]


@dataclass
class Message:
    """One published result.

    Attributes
    ----------
    topic : str
        One of :data:`TOPICS`.
    session : str
        The session id; a subscriber can tell a restarted session from a new one.
    seq : int
        Sequence number, 0-based, gap-free within a session (across restarts too).
    t : dict of str to float or None
        Unix-epoch seconds for each of :data:`TIMESTAMP_KEYS` that applies.
    data : dict
        The topic's fields (see docs/protocol.md); numpy arrays and bytes allowed.
    """

    topic: str
    session: str
    seq: int
    t: dict[str, float | None] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def payload(self) -> Any:
        """``data`` as its topic's typed record (:mod:`rtdecoder_client.payloads`)."""
        from rtdecoder_client.payloads import payload_of

        return payload_of(self.topic, self.data)

    def to_dict(self) -> dict[str, Any]:
        """The message as a plain map, before array/bytes encoding."""
        return {
            "schema": SCHEMA_VERSION,
            "topic": self.topic,
            "session": self.session,
            "seq": self.seq,
            "t": {key: self.t.get(key) for key in TIMESTAMP_KEYS},
            "data": self.data,
        }


def encode(message: Message, encoding: Encoding = "msgpack") -> list[bytes]:
    """Frames ``[topic, body]`` for a message."""
    if message.topic not in TOPICS:
        raise ProtocolError(f"topic: expected one of {', '.join(TOPICS)} (got {message.topic!r})")
    return [message.topic.encode("ascii"), pack_map(message.to_dict(), encoding)]


def decode(frames: list[bytes], encoding: Encoding = "msgpack") -> Message:
    """Rebuild a message from its frames, checking the schema version and fields."""
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames [topic, body] (got {len(frames)})")
    topic, body = frames
    message = message_from_map(unpack_map(body, encoding))
    if message.topic.encode("ascii") != topic:
        raise ProtocolError(f"topic: frame says {topic!r} but body says {message.topic!r}")
    return message


def message_from_map(raw: Any) -> Message:
    """A message from its decoded body map (as found in ``last``/``resend`` replies too)."""
    if not isinstance(raw, dict):
        raise ProtocolError(f"body: expected a map (got {type(raw).__name__})")
    if raw.get("schema") != SCHEMA_VERSION:
        raise ProtocolError(f"schema: expected {SCHEMA_VERSION} (got {raw.get('schema')!r})")
    for key in ("topic", "session", "seq", "t", "data"):
        if key not in raw:
            raise ProtocolError(f"{key}: missing from message body")
    return Message(raw["topic"], raw["session"], int(raw["seq"]), dict(raw["t"]), raw["data"])


def pack_map(value: Any, encoding: Encoding = "msgpack") -> bytes:
    """Serialise a map that may hold numpy arrays and bytes (msgpack or JSON)."""
    if encoding == "msgpack":
        return msgpack.packb(value, default=_msgpack_default, use_bin_type=True)
    if encoding == "json":
        return json.dumps(_to_json_tree(value), separators=(",", ":")).encode()
    raise ProtocolError(f"encoding: expected 'msgpack' or 'json' (got {encoding!r})")


def unpack_map(body: bytes, encoding: Encoding = "msgpack") -> Any:
    """Inverse of :func:`pack_map`; raises :class:`ProtocolError` on malformed input."""
    try:
        if encoding == "msgpack":
            return msgpack.unpackb(body, raw=False, object_hook=_msgpack_object_hook)
        if encoding == "json":
            return _from_json_tree(json.loads(body))
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, msgpack.UnpackException) as err:
        raise ProtocolError(f"body: not valid {encoding}: {_one_line(err) or type(err).__name__}") from None
    except (RecursionError, MemoryError):
        # JSON nested thousands deep (``[[[[...``) exhausts the recursion limit, a huge length
        # header the memory: both are a bad body, not a reason for the reading thread to die.
        raise ProtocolError(f"body: not valid {encoding}: nested too deep or too large") from None
    raise ProtocolError(f"encoding: expected 'msgpack' or 'json' (got {encoding!r})")


def status_text(value: Any) -> str:
    """One line of text for a status message's ``message`` field, whatever it is given.

    Exceptions read as their message; a problem record with ``path`` and ``error`` (the file
    watcher's :class:`~rtdecoder.ingest.watcher.FileProblem`) as its error, prefixed with the
    path when the error does not start with it; anything else as its ``str``. Line breaks become
    spaces, so subscribers never see a Python repr or a multi-line dump.
    """
    if isinstance(value, str):
        text = value
    elif isinstance(value, BaseException):
        text = str(value) or type(value).__name__
    elif hasattr(value, "path") and hasattr(value, "error"):
        error = status_text(value.error)
        # rtdecoder's errors already start with the file they are about
        text = error if error.startswith(str(value.path)) else f"{value.path}: {error}"
    else:
        text = str(value)
    return _one_line(text)


def _one_line(value: Any) -> str:
    return " ".join(str(value).split())


def _array_fields(array: np.ndarray) -> dict[str, Any]:
    contiguous = np.ascontiguousarray(array)
    little = contiguous.astype(contiguous.dtype.newbyteorder("<"), copy=False)
    return {"dtype": little.dtype.str, "shape": list(little.shape), "data": little.tobytes()}


def _array_from_fields(fields: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(fields["data"], dtype=np.dtype(fields["dtype"])).reshape(fields["shape"])


def _msgpack_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return {"__ndarray__": _array_fields(value)}
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot encode {type(value).__name__} in a message")


def _msgpack_object_hook(obj: dict[str, Any]) -> Any:
    if "__ndarray__" in obj and len(obj) == 1:
        return _array_from_fields(obj["__ndarray__"])
    return obj


def _to_json_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _to_json_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json_tree(v) for v in value]
    if isinstance(value, np.ndarray):
        fields = _array_fields(value)
        fields["data"] = base64.b64encode(fields["data"]).decode("ascii")
        return {"__ndarray__": fields}
    if isinstance(value, bytes):
        return {"__bytes__": base64.b64encode(value).decode("ascii")}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _from_json_tree(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__ndarray__"}:
            fields = dict(value["__ndarray__"])
            fields["data"] = base64.b64decode(fields["data"])
            return _array_from_fields(fields)
        if set(value) == {"__bytes__"}:
            return base64.b64decode(value["__bytes__"])
        return {k: _from_json_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json_tree(v) for v in value]
    return value
