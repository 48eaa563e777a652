"""The exceptions rtdecoder raises on purpose.

Every error a user can cause derives from :class:`DecoderError`, so the command line can print it
as one line and exit non-zero instead of showing a traceback. Messages name the file, the field
and what was expected.
"""

from __future__ import annotations


class DecoderError(Exception):
    """Root of every error rtdecoder raises about its inputs or state."""


class ConfigError(DecoderError):
    """A configuration file or value is wrong (unknown key, wrong type, value out of range)."""


class VolumeError(DecoderError):
    """A volume file cannot be read or does not match the run (shape, TR, orientation)."""


class IncompleteVolumeError(VolumeError):
    """A volume file is not completely written yet; try again later."""


class BundleError(DecoderError):
    """A subject bundle or model folder is missing a file or does not match the session."""


class ProtocolError(DecoderError):
    """A message on the control or result sockets does not follow the protocol."""


class OrderError(DecoderError):
    """A stateful object was used out of order (for example, read before it was started)."""
