"""Following the session's result stream: a ZeroMQ subscriber that fills its gaps from the history.

The view is one more subscriber of the session's PUB socket: it needs nothing from the session
but its addresses. A subscriber misses what was published before it joined (and what its
socket dropped if it fell behind); a gap in ``seq`` is filled by asking the control socket's
``resend`` pages, so a view started late, or one that lost messages, still shows the session
so far. ``resend`` is the only request it ever sends: the view never changes the session.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
from rtdecoder_client.client import ControlClient, ResultSubscriber
from rtdecoder_client.errors import ProtocolError as WireProtocolError
from rtdecoder_client.messages import Encoding, Message

from rtdecoder.view.state import ViewState

logger = logging.getLogger(__name__)

EventSink = Callable[[list[dict[str, Any]]], None]

#: Most messages asked for to fill one gap: the view keeps a bounded history anyway, so the
#: messages further back than this could not all be shown (a late view of a long session).
BACKFILL_MAX_MESSAGES = 50_000
_RECEIVE_S = 0.1
# Messages the subscriber socket holds before dropping (a gap filled from the history after).
_RECEIVE_HWM = 20_000


class StreamFollower:
    """Reads a session's messages into a :class:`ViewState` in a thread of its own.

    Parameters
    ----------
    state : ViewState
    result_endpoint : str
        The session's PUB address (``session.publisher.result_endpoint_``).
    control_endpoint : str, optional
        Its control address, to fill gaps with ``resend``; without one gaps stay (and are noted).
    on_events : callable
        Called (from the follower thread) with the events of each message taken.
    encoding : {"msgpack", "json"}
    client_secret_file, server_public_file : Path, optional
        CURVE keys, when the session requires them (``publish.curve``).
    timeout_s : float, default=5.0
        How long to wait for each ``resend`` reply, s.
    """

    def __init__(
        self,
        state: ViewState,
        result_endpoint: str,
        control_endpoint: str | None,
        on_events: EventSink,
        encoding: Encoding = "msgpack",
        client_secret_file: str | Path | None = None,
        server_public_file: str | Path | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        self.state = state
        self.result_endpoint = result_endpoint
        self.control_endpoint = control_endpoint
        self.on_events = on_events
        self.encoding = encoding
        self._keys = (client_secret_file, server_public_file)
        self.timeout_s = timeout_s
        self.expected_seq: int | None = None
        self.filled_ = 0
        self.unfilled_ = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._context = zmq.Context()
        secret, server = self._keys
        self._subscriber = ResultSubscriber(
            result_endpoint, topics=("volume", "beta", "decode", "status"), encoding=encoding,
            client_secret_file=secret, server_public_file=server, context=self._context,
        )
        self._subscriber.socket.setsockopt(zmq.RCVHWM, _RECEIVE_HWM)
        self._control: ControlClient | None = None
        if control_endpoint is not None:
            self._control = ControlClient(control_endpoint, encoding, timeout_s, client_secret_file=secret,
                                          server_public_file=server, context=self._context)

    def start(self) -> StreamFollower:
        self._thread = threading.Thread(target=self._loop, name="rtdecoder-view-follow", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the thread and close its sockets."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            self._thread = None
        self._subscriber.close()
        if self._control is not None:
            self._control.close()
        self._context.term()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                message = self._subscriber.receive(timeout_s=_RECEIVE_S)
            except WireProtocolError as err:  # a message we cannot read: the next seq shows the gap, filled below
                logger.warning("view: a message from %s could not be read: %s", self.result_endpoint, err)
                continue
            except zmq.ZMQError:
                if self._stop.is_set():
                    return
                raise
            if message is not None:
                try:
                    self.take(message)
                except Exception:  # one message the view cannot digest must not stop it following
                    logger.exception("view: message %d (%s) could not be shown", message.seq, message.topic)

    def take(self, message: Message) -> None:
        """Take one live message, first filling the gap before it (if any) from the history."""
        if self.state.session not in (None, message.session):
            self.expected_seq = None  # another session on the same address: it starts afresh
        expected = 0 if self.expected_seq is None else self.expected_seq
        if message.seq < expected:
            return  # already taken from a resend page
        if message.seq > expected:
            self._fill(expected, message.seq, message.session)
        self._take(message)

    def _take(self, message: Message) -> None:
        events = self.state.take(message)
        self.expected_seq = message.seq + 1
        if events:
            self.on_events(events)

    def _fill(self, from_seq: int, until_seq: int, session: str) -> None:
        start = max(from_seq, until_seq - BACKFILL_MAX_MESSAGES)
        if self._control is None:
            self._gap(from_seq, until_seq, "no control address to ask")
            return
        try:
            for page in self._control.resend_pages(start, until_seq):
                for message in page:
                    if self._stop.is_set():
                        return
                    if message.session == session and message.seq >= start:
                        self._take(message)
                        self.filled_ += 1
        except WireProtocolError as err:
            self._gap(from_seq, until_seq, str(err))
            return
        if start > from_seq:
            self._gap(from_seq, start, f"older than the {BACKFILL_MAX_MESSAGES} messages the view asks for")

    def _gap(self, from_seq: int, until_seq: int, why: str) -> None:
        self.unfilled_ += until_seq - from_seq
        text = f"messages {from_seq}..{until_seq - 1} are not shown: {why}"
        logger.warning("view: %s", text)
        self.on_events([self.state.note(text)])
