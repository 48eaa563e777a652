"""Publishing results on a ZeroMQ PUB socket and answering control requests on a ROUTER socket.

The PUB socket is used only by the thread that calls :meth:`ResultPublisher.publish` (under a
lock); the ROUTER socket only by the control thread. Both bind to loopback unless the config
says otherwise, and both require CURVE authentication when ``publish.curve`` is set: a client
whose public key is not in ``client_public_keys_dir`` can connect but receives nothing.

Control requests are maps (msgpack or JSON, as the results) with a ``cmd``:

========  =====================================  ==========================================
cmd       fields                                 reply
========  =====================================  ==========================================
status    -                                      ``session``, ``next_seq``, ``status`` map
last      ``n``, optional ``topic``              ``messages``: the last n message bodies
resend    ``from_seq``                           ``messages``: every body with seq >= from_seq
onset     ``trial_id``, ``onset_s``, ``stim_id`` ``accepted``: the session took the onset
========  =====================================  ==========================================

Every reply has ``ok`` (bool) and, when false, ``error`` (one line).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from rtdecoder.config import PublishConfig
from rtdecoder.errors import ConfigError, OrderError, ProtocolError
from rtdecoder.publish.messages import Message, encode, pack_map, unpack_map

logger = logging.getLogger(__name__)

OnsetHandler = Callable[[dict[str, Any]], bool]
HistorySource = Callable[[int], list[Message]]
_CONTROL_POLL_MS = 50


class ResultPublisher:
    """The session's outgoing side: results on PUB, history and onsets on ROUTER.

    Parameters
    ----------
    config : PublishConfig
        Addresses, encoding, queue sizes and CURVE settings.
    session_id : str
        Stamped on every message.
    next_seq : int, default=0
        Sequence number of the next message (a resumed session continues its numbering).
    history : iterable of Message, optional
        Messages already published (from the journal), served by ``last`` and ``resend``.
    on_onset : callable, optional
        Called from the control thread with each ``onset`` request; returns whether it was taken.
    status : callable, optional
        Returns a map for ``status`` requests.
    older_history : callable, optional
        ``older_history(from_seq)`` returns messages older than the in-memory history (the
        journal), so ``resend`` can go back to the start of the session.
    """

    def __init__(
        self,
        config: PublishConfig,
        session_id: str,
        next_seq: int = 0,
        history: Iterable[Message] = (),
        on_onset: OnsetHandler | None = None,
        status: Callable[[], dict[str, Any]] | None = None,
        older_history: HistorySource | None = None,
    ) -> None:
        self.config = config
        self.session_id = session_id
        self.next_seq = next_seq
        self.history: collections.deque[Message] = collections.deque(history, maxlen=config.history_size)
        self.on_onset = on_onset
        self.status = status
        self.older_history = older_history
        self._lock = threading.Lock()
        self._context: zmq.Context | None = None
        self._pub: zmq.Socket | None = None
        self._auth: ThreadAuthenticator | None = None
        self._control_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.result_endpoint_: str | None = None
        self.control_endpoint_: str | None = None

    def start(self) -> ResultPublisher:
        """Bind both sockets and start the control thread."""
        self._context = zmq.Context()
        self._pub = self._context.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, self.config.send_hwm)
        self._pub.setsockopt(zmq.LINGER, 1000)
        router = self._context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        try:
            if self.config.curve:
                self._start_curve([self._pub, router])
            else:
                for address in (self.config.result_address, self.config.control_address):
                    if not _is_loopback(address):
                        logger.warning("binding %s without CURVE: anyone on the network can read it", address)
            self.result_endpoint_ = _bind(self._pub, self.config.result_address, "publish.result_address")
            self.control_endpoint_ = _bind(router, self.config.control_address, "publish.control_address")
        except Exception:
            router.close()
            self.close()
            raise
        self._control_thread = threading.Thread(
            target=self._serve_control, args=(router,), name="rtdecoder-control", daemon=True
        )
        self._control_thread.start()
        return self

    def publish(self, topic: str, data: dict[str, Any], t: dict[str, float | None]) -> Message:
        """Stamp, encode and send one message; returns it with its sequence number."""
        message = self.make_message(topic, data, t)
        self.send(message)
        return message

    def make_message(self, topic: str, data: dict[str, Any], t: dict[str, float | None]) -> Message:
        """Assign the next sequence number without sending (so the journal can write it first)."""
        with self._lock:
            message = Message(topic, self.session_id, self.next_seq, dict(t), data)
            self.next_seq += 1
        return message

    def send(self, message: Message) -> None:
        """Send a message made by :meth:`make_message`, stamping its publish time."""
        if self._pub is None:
            raise OrderError("ResultPublisher.send called before start(); call start() first")
        if message.t.get("published") is None:
            message.t["published"] = time.time()
        frames = encode(message, self.config.encoding)
        with self._lock:
            self._pub.send_multipart(frames)
            self.history.append(message)

    def close(self) -> None:
        """Stop the control thread and close the sockets (pending messages get 1 s to leave)."""
        self._stop.set()
        if self._control_thread is not None:
            self._control_thread.join(timeout=2.0)
        if self._pub is not None:
            self._pub.close()
            self._pub = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._context is not None:
            self._context.term()
            self._context = None

    def __enter__(self) -> ResultPublisher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start_curve(self, sockets: list[zmq.Socket]) -> None:
        secret_file = Path(str(self.config.server_secret_key_file))
        clients_dir = Path(str(self.config.client_public_keys_dir))
        if not secret_file.is_file():
            raise ConfigError(f"publish.server_secret_key_file: no such file {secret_file}")
        if not clients_dir.is_dir():
            raise ConfigError(f"publish.client_public_keys_dir: no such folder {clients_dir}")
        try:
            public, secret = zmq.auth.load_certificate(secret_file)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{secret_file}: not a ZeroMQ secret key file: {err}") from None
        if secret is None:
            raise ConfigError(f"{secret_file}: holds no secret key (use the .key_secret file)")
        self._auth = ThreadAuthenticator(self._context)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(clients_dir))
        for socket in sockets:
            socket.curve_secretkey = secret
            socket.curve_publickey = public
            socket.curve_server = True

    def _serve_control(self, router: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not dict(poller.poll(_CONTROL_POLL_MS)):
                    continue
                identity, *frames = router.recv_multipart()
                reply = self._answer(frames[-1] if frames else b"")
                router.send_multipart([identity, b"", self._pack(reply)])
        finally:
            router.close()

    def _answer(self, body: bytes) -> dict[str, Any]:
        try:
            request = self._unpack(body)
            if not isinstance(request, dict) or "cmd" not in request:
                raise ProtocolError("request: expected a map with a 'cmd' field")
            return {"ok": True, **self._handle(request)}
        except ProtocolError as err:
            return {"ok": False, "error": str(err)}

    def _handle(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request["cmd"]
        if cmd == "status":
            return {
                "session": self.session_id,
                "next_seq": self.next_seq,
                "status": self.status() if self.status else {},
            }
        if cmd == "last":
            n = _int_field(request, "n")
            topic = request.get("topic")
            with self._lock:
                chosen = [m for m in self.history if topic is None or m.topic == topic]
            return {"messages": [m.to_dict() for m in chosen[-n:]] if n else []}
        if cmd == "resend":
            from_seq = _int_field(request, "from_seq")
            return {"messages": [m.to_dict() for m in self._messages_from(from_seq)]}
        if cmd == "onset":
            for key in ("trial_id", "onset_s"):
                if key not in request:
                    raise ProtocolError(f"onset: missing field {key!r}")
            accepted = bool(self.on_onset(request)) if self.on_onset else False
            return {"accepted": accepted}
        raise ProtocolError(f"cmd: expected status, last, resend or onset (got {cmd!r})")

    def _messages_from(self, from_seq: int) -> list[Message]:
        with self._lock:
            in_memory = list(self.history)
        oldest = in_memory[0].seq if in_memory else self.next_seq
        older = self.older_history(from_seq) if (self.older_history and from_seq < oldest) else []
        return [m for m in older if m.seq < oldest] + [m for m in in_memory if m.seq >= from_seq]

    def _pack(self, value: dict[str, Any]) -> bytes:
        return pack_map(value, self.config.encoding)

    def _unpack(self, body: bytes) -> Any:
        return unpack_map(body, self.config.encoding)


def _int_field(request: dict[str, Any], key: str) -> int:
    value = request.get(key)
    if not isinstance(value, int) or value < 0:
        raise ProtocolError(f"{request.get('cmd')}: field {key!r} must be a non-negative integer (got {value!r})")
    return value


def _bind(socket: zmq.Socket, address: str, field: str) -> str:
    try:
        socket.bind(address)
    except zmq.ZMQError as err:
        raise ConfigError(f"{field}: cannot bind {address!r}: {err}") from None
    return socket.getsockopt_string(zmq.LAST_ENDPOINT)


def _is_loopback(address: str) -> bool:
    return address.startswith(("ipc://", "inproc://", "tcp://127.", "tcp://localhost", "tcp://[::1]"))
