"""The one error the client raises: a message or reply that does not follow the protocol."""

from __future__ import annotations


class ProtocolError(ValueError):
    """A message on the result or control sockets does not follow the protocol (docs/protocol.md).

    The session's own :class:`rtdecoder.errors.ProtocolError` derives from this one, so catching
    this class catches both.
    """
