"""The stimulus side of rtdecoder: the result protocol's messages, typed payloads and a gap-free subscriber.

Installs alone (``pip install ./client``: pyzmq, msgpack and numpy), for stimulus machines
that should not need torch. The protocol is docs/protocol.md in the rtdecoder project.
"""

from rtdecoder_client.client import ControlClient, ResultSubscriber, SessionFollower
from rtdecoder_client.errors import ProtocolError
from rtdecoder_client.messages import SCHEMA_VERSION, Message
from rtdecoder_client.payloads import BetaData, DecodeData, Retrieval, StatusData, VolumeData

__all__ = [
    "SCHEMA_VERSION", "BetaData", "ControlClient", "DecodeData", "Message", "ProtocolError", "ResultSubscriber",
    "Retrieval", "SessionFollower", "StatusData", "VolumeData",
]
