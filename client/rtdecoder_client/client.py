"""Client side of the protocol, for stimulus software and tests: subscribe and ask for history.

Only pyzmq, msgpack and numpy are needed: ``pip install ./client`` installs this package alone on a
stimulus machine (no torch). :class:`SessionFollower` is what most stimulus programs want: every
message of the session, in order and gap-free, from wherever they join.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from rtdecoder_client.errors import ProtocolError
from rtdecoder_client.messages import Encoding, Message, decode, message_from_map, pack_map, unpack_map


def _apply_client_curve(socket: zmq.Socket, client_secret_file: Path, server_public_file: Path) -> None:
    public, secret = zmq.auth.load_certificate(client_secret_file)
    server_public, _ = zmq.auth.load_certificate(server_public_file)
    socket.curve_publickey = public
    socket.curve_secretkey = secret
    socket.curve_serverkey = server_public


class ResultSubscriber:
    """Receives result messages from the session's PUB socket.

    Parameters
    ----------
    address : str
        The session's result address, e.g. ``tcp://127.0.0.1:5555``.
    topics : iterable of str, default=("",)
        Topic prefixes to receive; ``""`` means all.
    encoding : {"msgpack", "json"}
    client_secret_file, server_public_file : Path, optional
        CURVE keys (``rtdecoder keys make``), when the session requires them.
    """

    def __init__(
        self,
        address: str,
        topics: Iterable[str] = ("",),
        encoding: Encoding = "msgpack",
        client_secret_file: Path | None = None,
        server_public_file: Path | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self.encoding = encoding
        self._context = context or zmq.Context.instance()
        self.socket = self._context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        if client_secret_file is not None and server_public_file is not None:
            _apply_client_curve(self.socket, Path(client_secret_file), Path(server_public_file))
        for topic in topics:
            self.socket.setsockopt(zmq.SUBSCRIBE, topic.encode("ascii"))
        self.socket.connect(address)

    def receive(self, timeout_s: float | None = None) -> Message | None:
        """The next message, or ``None`` if none arrives within ``timeout_s``."""
        timeout_ms = None if timeout_s is None else int(timeout_s * 1000)
        if not self.socket.poll(timeout_ms):
            return None
        return decode(self.socket.recv_multipart(), self.encoding)

    def close(self) -> None:
        """Close the socket."""
        self.socket.close()


class ControlClient:
    """Asks the session's control socket for status and history, and announces trial onsets.

    Parameters
    ----------
    address : str
        The session's control address, e.g. ``tcp://127.0.0.1:5556``.
    encoding : {"msgpack", "json"}
    timeout_s : float, default=5.0
        How long to wait for each reply.
    client_secret_file, server_public_file : Path, optional
        CURVE keys (``rtdecoder keys make``), when the session requires them.
    """

    def __init__(
        self,
        address: str,
        encoding: Encoding = "msgpack",
        timeout_s: float = 5.0,
        client_secret_file: Path | None = None,
        server_public_file: Path | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self.address = address
        self.encoding = encoding
        self.timeout_s = timeout_s
        self._keys = (client_secret_file, server_public_file)
        self._context = context or zmq.Context.instance()
        self.socket = self._connect()

    def request(self, cmd: str, **fields: Any) -> dict[str, Any]:
        """Send one request and wait for its reply; raises ProtocolError on timeout or refusal."""
        self.socket.send(pack_map({"cmd": cmd, **fields}, self.encoding))
        if not self.socket.poll(int(self.timeout_s * 1000)):
            # A REQ socket that lost its reply is stuck in the wrong state: start a fresh one.
            self.socket.close()
            self.socket = self._connect()
            raise ProtocolError(f"{cmd}: no reply from {self.address} within {self.timeout_s} s")
        reply = unpack_map(self.socket.recv(), self.encoding)
        if not isinstance(reply, dict):
            raise ProtocolError(f"{cmd}: reply: expected a map (got {type(reply).__name__})")
        if not reply.get("ok"):
            raise ProtocolError(f"{cmd}: refused by the session: {reply.get('error')}")
        return reply

    def status(self) -> dict[str, Any]:
        """The session's status map, with ``session`` and ``next_seq``."""
        return self.request("status")

    def last(self, n: int, topic: str | None = None) -> list[Message]:
        """The last ``n`` published messages (of one topic, if given), at most one reply's page of them."""
        fields: dict[str, Any] = {"n": n} if topic is None else {"n": n, "topic": topic}
        return [message_from_map(raw) for raw in self.request("last", **fields)["messages"]]

    def resend(self, from_seq: int, until_seq: int | None = None) -> list[Message]:
        """Every message from sequence number ``from_seq`` on (before ``until_seq``, if given), to fill a gap.

        Asks page after page until the session says there is no more; :meth:`resend_pages` gives
        the pages one at a time instead.
        """
        return [message for page in self.resend_pages(from_seq, until_seq) for message in page]

    def resend_pages(self, from_seq: int, until_seq: int | None = None) -> Iterator[list[Message]]:
        """The pages of a resend, in order: each reply's messages, asking again while ``more`` is true.

        Raises
        ------
        ProtocolError
            When a reply says ``more`` but its ``next_seq`` does not move past the page asked for.
        """
        next_from = from_seq
        while True:
            fields: dict[str, Any] = {"from_seq": next_from}
            if until_seq is not None:
                fields["until_seq"] = until_seq
            reply = self.request("resend", **fields)
            yield [message_from_map(raw) for raw in reply["messages"]]
            # a session from before paging sends neither field: its one reply was everything
            if not reply.get("more"):
                return
            following = reply.get("next_seq")
            if isinstance(following, bool) or not isinstance(following, int) or following <= next_from:
                raise ProtocolError(
                    f"resend: reply says more but next_seq {following!r} does not move past from_seq {next_from}"
                )
            next_from = following

    def announce_onset(
        self, trial_id: str, onset_s: float, stim_id: str | None = None, duration_s: float | None = None
    ) -> bool:
        """Tell the session a trial started at ``onset_s`` (seconds from the run's first volume)."""
        fields: dict[str, Any] = {"trial_id": trial_id, "onset_s": onset_s, "stim_id": stim_id}
        if duration_s is not None:
            fields["duration_s"] = duration_s
        return bool(self.request("onset", **fields)["accepted"])

    def start_run(self, run: str | None = None) -> bool:
        """Tell the session a run starts (the current one ends); ``run`` labels it."""
        return bool(self.request("run_start", **({} if run is None else {"run": run}))["accepted"])

    def end_run(self, run: str | None = None) -> bool:
        """Tell the session the current run ended."""
        return bool(self.request("run_end", **({} if run is None else {"run": run}))["accepted"])

    def close(self) -> None:
        """Close the socket."""
        self.socket.close()

    def _connect(self) -> zmq.Socket:
        socket = self._context.socket(zmq.REQ)
        socket.setsockopt(zmq.LINGER, 0)
        secret, server = self._keys
        if secret is not None and server is not None:
            _apply_client_curve(socket, Path(secret), Path(server))
        socket.connect(self.address)
        return socket


class SessionFollower:
    """Every message of a session, in sequence order with no gap and no repeat, as a context manager.

    It subscribes to the result stream at once, and asks the control socket to ``resend`` what it
    missed: the messages before it joined (from ``from_seq``; 0, the default, is the whole
    session) and any gap a slow link or a full queue left. Each message's schema is checked
    (:func:`~rtdecoder_client.messages.decode`); ``message.payload`` is its typed record.

    Parameters
    ----------
    result_address, control_address : str
        The session's ``publish.result_address`` and ``publish.control_address``.
    from_seq : int, default=0
        The first sequence number wanted; ``None`` starts with the first live message.
    encoding : {"msgpack", "json"}
    timeout_s : float, default=5.0
        How long a control request may take.
    client_secret_file, server_public_file : Path, optional
        CURVE keys, when the session requires them.

    Examples
    --------
    ::

        with SessionFollower("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556") as follower:
            for message in follower:
                if message.topic == "decode":
                    show(message.payload.retrieval.ids[0])
    """

    def __init__(
        self,
        result_address: str,
        control_address: str,
        from_seq: int | None = 0,
        encoding: Encoding = "msgpack",
        timeout_s: float = 5.0,
        client_secret_file: Path | None = None,
        server_public_file: Path | None = None,
    ) -> None:
        self.next_seq = from_seq
        self.session: str | None = None
        keys = {"client_secret_file": client_secret_file, "server_public_file": server_public_file}
        self.subscriber = ResultSubscriber(result_address, encoding=encoding, **keys)
        self.control = ControlClient(control_address, encoding=encoding, timeout_s=timeout_s, **keys)
        self._held: dict[int, Message] = {}

    def receive(self, timeout_s: float | None = None) -> Message | None:
        """The next message in sequence, or ``None`` if none is due within ``timeout_s``."""
        while True:
            if self.next_seq in self._held:
                return self._take(self._held.pop(self.next_seq))
            live = self.subscriber.receive(timeout_s)
            if live is None:
                return None
            if self.session is not None and live.session != self.session:
                raise ProtocolError(f"session: expected {self.session} (got {live.session}): another session")
            self.session = live.session
            if self.next_seq is None:
                self.next_seq = live.seq
            if live.seq < self.next_seq:
                continue  # already had it from a resend
            self._held[live.seq] = live
            if live.seq > self.next_seq:  # a gap, or what came before this client joined
                for page in self.control.resend_pages(self.next_seq, until_seq=live.seq):
                    for message in page:
                        self._held.setdefault(message.seq, message)
                if self.next_seq not in self._held:
                    raise ProtocolError(f"resend: the session did not send seq {self.next_seq}")

    def __iter__(self) -> Iterator[Message]:
        """Messages as they come, forever (break out of the loop to stop)."""
        while True:
            message = self.receive(timeout_s=1.0)
            if message is not None:
                yield message

    def close(self) -> None:
        """Close both sockets."""
        self.subscriber.close()
        self.control.close()

    def __enter__(self) -> SessionFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take(self, message: Message) -> Message:
        self.next_seq = message.seq + 1
        return message
