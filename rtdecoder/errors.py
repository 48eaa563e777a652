"""The exceptions rtdecoder raises on purpose.

Every error a user can cause derives from :class:`DecoderError`, so the command line can print it
as one line and exit non-zero instead of showing a traceback. Messages name the file, the field
and what was expected.

The errors about a bad value (:class:`ConfigError`, :class:`VolumeError`, :class:`BundleError`,
:class:`ProtocolError`) are :class:`ValueError` too, so a library caller can catch either the
rtdecoder root or the standard exception it already handles.
"""

from __future__ import annotations

from rtdecoder_client.errors import ProtocolError as WireProtocolError


class DecoderError(Exception):
    """Root of every error rtdecoder raises about its inputs or state."""


class ConfigError(DecoderError, ValueError):
    """A configuration file or value is wrong (unknown key, wrong type, value out of range)."""


class VolumeError(DecoderError, ValueError):
    """A volume file cannot be read or does not match the run (shape, TR, orientation)."""


class IncompleteVolumeError(VolumeError):
    """A volume file is not completely written yet; try again later."""


class BundleError(DecoderError, ValueError):
    """A subject bundle or model folder is missing a file or does not match the session."""


class ProtocolError(DecoderError, WireProtocolError):
    """A message on the control or result sockets does not follow the protocol.

    It derives from the client's :class:`rtdecoder_client.errors.ProtocolError` (a ``ValueError``),
    which the wire-format code shared with the client raises: catch that one to catch both.
    """


class OrderError(DecoderError):
    """A stateful object was used out of order (for example, read before it was started)."""


class JournalError(DecoderError):
    """A session journal is damaged before its end, or was written in a format this version cannot append to.

    The file is left as it is; the message names it, says where the damage is and how to go on
    (move the file aside and start a new ``--session-dir``).
    """


class PublisherError(DecoderError):
    """The publisher's control thread stopped: control requests are no longer answered."""
