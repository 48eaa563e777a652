"""Publishing results on a ZeroMQ PUB socket and answering control requests on a ROUTER socket.

The PUB socket is used only by the thread that calls :meth:`ResultPublisher.publish` (under a
lock); the ROUTER socket only by the control thread. Both bind to loopback unless the config
says otherwise, and both require CURVE authentication when ``publish.curve`` is set: a client
whose public key is not in ``client_public_keys_dir`` can connect but receives nothing.

Control requests are maps (msgpack or JSON, as the results) with a ``cmd``; docs/protocol.md
has the fields and replies of each:

- ``status``: ``session``, ``next_seq``, ``status`` map;
- ``last`` (``n``, optional ``topic``): ``messages``, the last n bodies (at most one page);
- ``resend`` (``from_seq``, optional ``until_seq``): one page of ``messages`` with seq >=
  from_seq, ``next_seq`` to ask from next and ``more``;
- ``onset`` (``trial_id``, ``onset_s``, optional ``duration_s``, ``stim_id``), ``run_start``
  (optional ``run``), ``run_end`` (optional ``run``): ``accepted``, whether the session took it.

Every reply has ``ok`` (bool) and, when false, ``error`` (one line). The control thread answers
every request it can read, whatever is wrong with it: a body it cannot decode (including one
nested too deep, or larger than :data:`~rtdecoder.publish.control.MAX_REQUEST_BYTES`), a field
out of range, or an exception while answering (logged with its traceback, counted in
``control_errors_``) is an ``ok: false`` reply. Requests for the session (``onset``,
``run_start``, ``run_end``) reach it as checked, typed requests
(:mod:`rtdecoder.publish.control`), never as raw maps.

History replies are paged so that a 20-byte request cannot ask for the whole session at once: at
most ``page_messages`` messages and about ``page_bytes`` bytes per reply, with ``more: true``
and the ``next_seq`` to ask from next. Each client's replies waiting to leave are bounded too
(``reply_hwm``): replies to a client that sends requests without reading the answers are dropped
(counted in ``dropped_replies_``), so the session's memory does not grow with them.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from rtdecoder_client.errors import ProtocolError as WireProtocolError
from rtdecoder_client.messages import TOPICS, Message, encode, pack_map, status_text, unpack_map
from zmq.auth.thread import ThreadAuthenticator

from rtdecoder.config import PublishConfig
from rtdecoder.errors import ConfigError, OrderError, ProtocolError, PublisherError
from rtdecoder.publish.control import MAX_REQUEST_BYTES, SESSION_REQUESTS, ControlRequest, shown

logger = logging.getLogger(__name__)

OnsetHandler = Callable[[ControlRequest], bool]
HistorySource = Callable[[int], Iterable[Message]]
FailureHandler = Callable[[BaseException], None]

PAGE_MESSAGES = 200
"""Most messages in one ``resend`` or ``last`` reply."""
PAGE_BYTES = 1024 * 1024
"""Encoded bytes after which a ``resend`` or ``last`` reply stops (it holds at least one message)."""
REPLY_HWM = 4
"""Replies queued for one client before further replies to it are dropped."""
_MAX_FRAME_BYTES = 1024 * 1024
# Beyond this ZeroMQ itself drops the sender's connection before the message is in memory; up to
# it, a request larger than MAX_REQUEST_BYTES is read and answered ``ok: false``.
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
        Called from the control thread with each checked session request: an
        :class:`~rtdecoder.publish.control.OnsetRequest`, ``RunStartRequest`` or ``RunEndRequest``
        (tell them apart by type or by their ``cmd``); returns whether the session took it. An
        exception it raises is logged and answered ``ok: false``.
    status : callable, optional
        Returns a map for ``status`` requests.
    older_history : callable, optional
        ``older_history(from_seq)`` returns the messages from ``from_seq`` on that are older than
        the in-memory history (the journal), in sequence order, so ``resend`` can go back to the
        start of the session. Only one page is taken from it: an iterator (a generator) keeps a
        request from reading more than that; it is closed after each page.
    page_messages : int, default=PAGE_MESSAGES
        Most messages in one ``resend`` or ``last`` reply.
    page_bytes : int, default=PAGE_BYTES
        Encoded size after which such a reply stops (a reply holds at least one message).
    reply_hwm : int, default=REPLY_HWM
        Replies queued for one client before further replies to it are dropped.
    on_failure : callable, optional
        Called (from the control thread, once) with the exception that stopped the control thread,
        e.g. to end the session loudly; the exception is kept in ``failure_`` either way.

    Attributes
    ----------
    failure_ : BaseException or None
        What stopped the control thread, if it stopped other than by :meth:`close`;
        :meth:`check_alive` raises it as a :class:`~rtdecoder.errors.PublisherError`.
    control_errors_ : int
        Requests whose answering raised (each logged with its traceback, answered ``ok: false``).
    dropped_replies_ : int
        Replies dropped because their client had ``reply_hwm`` replies unread, or had gone.
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
        page_messages: int = PAGE_MESSAGES,
        page_bytes: int = PAGE_BYTES,
        reply_hwm: int = REPLY_HWM,
        on_failure: FailureHandler | None = None,
    ) -> None:
        for name, value in (("page_messages", page_messages), ("page_bytes", page_bytes), ("reply_hwm", reply_hwm)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ResultPublisher: {name}: expected a positive integer (got {value!r})")
        self.config = config
        self.session_id = session_id
        self.next_seq = next_seq
        self.history: collections.deque[Message] = collections.deque(history, maxlen=config.history_size)
        self.on_onset = on_onset
        self.status = status
        self.older_history = older_history
        self.page_messages = page_messages
        self.page_bytes = page_bytes
        self.reply_hwm = reply_hwm
        self.on_failure = on_failure
        self.failure_: BaseException | None = None
        self.control_errors_ = 0
        self.dropped_replies_ = 0
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
        # checked before binding: ZeroMQ takes port 99999 modulo 65536 and binds that one silently
        check_address(self.config.result_address, "publish.result_address")
        check_address(self.config.control_address, "publish.control_address")
        self._context = zmq.Context()
        self._pub = self._context.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, self.config.send_hwm)
        self._pub.setsockopt(zmq.LINGER, 1000)
        router = self._context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.SNDHWM, self.reply_hwm)
        # so that a full reply queue (or a client gone) is an error to count, not a silent drop
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.MAXMSGSIZE, _MAX_FRAME_BYTES)
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
        """Assign the next sequence number without sending (so the journal can write it first).

        A status message's ``message`` becomes one line of text (:func:`status_text`): an
        exception or a file problem can be passed as it is.
        """
        if topic == "status" and "message" in data:
            data = {**data, "message": status_text(data["message"])}
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

    def check_alive(self) -> None:
        """Raise :class:`~rtdecoder.errors.PublisherError` if the control thread has stopped on an error.

        The session calls it in its loop so that a control socket that no longer answers ends the
        session loudly instead of leaving the stimulus software waiting.
        """
        failure = self.failure_
        if failure is not None:
            raise PublisherError(
                f"publish.control_address: the control thread stopped ({type(failure).__name__}: "
                f"{status_text(failure)}); control requests are no longer answered"
            ) from failure

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

    # ----------------------------------------------------------------- the control thread

    def _serve_control(self, router: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not dict(poller.poll(_CONTROL_POLL_MS)):
                    continue
                self._serve_one(router, router.recv_multipart())
        except BaseException as err:  # recorded (and logged) so that the session can end loudly
            if not self._stop.is_set():
                self._fail(err)
        finally:
            router.close()

    def _serve_one(self, router: zmq.Socket, frames: list[bytes]) -> None:
        """Answer one request; nothing short of a BaseException leaves here."""
        identity, *rest = frames
        try:
            reply = self._answer(rest[-1] if rest else b"")
        except Exception as err:  # a bug or a failing callback must not stop the control thread
            self.control_errors_ += 1
            logger.exception("control request: answering it failed; replied ok: false")
            reply = {"ok": False, "error": f"internal error answering the request: {type(err).__name__}: "
                                           f"{status_text(err)[:200]}"}
        try:
            body = self._pack(reply)
        except Exception as err:  # e.g. a status map holding something that cannot be encoded
            self.control_errors_ += 1
            logger.exception("control request: the reply could not be encoded; replied ok: false")
            body = self._pack({"ok": False, "error": f"internal error encoding the reply: {type(err).__name__}"})
        try:
            router.send_multipart([identity, b"", body], flags=zmq.NOBLOCK)
        except zmq.Again:
            self._drop_reply("it has %d replies unread", self.reply_hwm)
        except zmq.ZMQError as err:
            if err.errno != zmq.EHOSTUNREACH:
                raise
            self._drop_reply("it disconnected before its reply")

    def _drop_reply(self, why: str, *args: object) -> None:
        self.dropped_replies_ += 1
        # the first drop, then every hundredth: a flooding client must not flood the log as well
        if self.dropped_replies_ == 1 or self.dropped_replies_ % 100 == 0:
            logger.warning("control: reply dropped (%d so far): " + why, self.dropped_replies_, *args)

    def _fail(self, err: BaseException) -> None:
        self.failure_ = err
        logger.critical("control thread stopped: control requests are no longer answered", exc_info=err)
        if self.on_failure is not None:
            try:
                self.on_failure(err)
            except Exception:
                logger.exception("publisher on_failure callback failed")

    def _answer(self, body: bytes) -> dict[str, Any]:
        if len(body) > MAX_REQUEST_BYTES:
            return {"ok": False, "error": f"request: {len(body)} bytes; at most {MAX_REQUEST_BYTES} are read"}
        try:
            request = self._decode_request(body)
            if not isinstance(request, dict) or "cmd" not in request:
                raise ProtocolError("request: expected a map with a 'cmd' field")
            return {"ok": True, **self._handle(request)}
        except WireProtocolError as err:
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
            return self._last(_int_field(request, "n"), request.get("topic"))
        if cmd == "resend":
            from_seq = _int_field(request, "from_seq")
            until_seq = _int_field(request, "until_seq") if request.get("until_seq") is not None else None
            return self._resend(from_seq, until_seq)
        if isinstance(cmd, str) and cmd in SESSION_REQUESTS:
            typed = SESSION_REQUESTS[cmd].from_map(request)
            return {"accepted": bool(self.on_onset(typed)) if self.on_onset else False}
        raise ProtocolError(
            f"cmd: expected status, last, resend, {', '.join(SESSION_REQUESTS)} (got {shown(cmd)})"
        )

    def _last(self, n: int, topic: Any) -> dict[str, Any]:
        if topic is not None and topic not in TOPICS:
            raise ProtocolError(f"last: field 'topic': expected one of {', '.join(TOPICS)} (got {shown(topic)})")
        with self._lock:
            newest_first = [m for m in reversed(self.history) if topic is None or m.topic == topic]
        page, cut = self._page(newest_first, min(n, self.page_messages))
        page.reverse()
        return {"messages": page, "more": cut and len(page) < n}

    def _resend(self, from_seq: int, until_seq: int | None) -> dict[str, Any]:
        source = self._messages_from(from_seq)
        try:
            wanted = source if until_seq is None else itertools.takewhile(lambda m: m.seq < until_seq, source)
            page, more = self._page(wanted, self.page_messages)
        finally:
            source.close()  # and with it the journal reader behind it
        return {"messages": page, "next_seq": page[-1]["seq"] + 1 if page else from_seq, "more": more}

    def _page(self, messages: Iterable[Message], max_messages: int) -> tuple[list[dict[str, Any]], bool]:
        """Bodies of the first messages that fit one reply, and whether any were left out."""
        page: list[dict[str, Any]] = []
        size_bytes = 0
        for message in messages:
            if len(page) >= max_messages:
                return page, True
            body = message.to_dict()
            body_bytes = len(self._pack(body))
            if page and size_bytes + body_bytes > self.page_bytes:
                return page, True
            page.append(body)
            size_bytes += body_bytes
        return page, False

    def _messages_from(self, from_seq: int) -> Iterator[Message]:
        """Messages with seq >= from_seq in order: the journal's older ones, then those in memory."""
        with self._lock:
            in_memory = sorted(self.history, key=lambda m: m.seq)
        oldest = in_memory[0].seq if in_memory else self.next_seq
        if self.older_history is not None and from_seq < oldest:
            older = self.older_history(from_seq)
            try:
                for message in older:
                    if message.seq >= oldest:
                        break
                    if message.seq >= from_seq:
                        yield message
            finally:
                close = getattr(older, "close", None)
                if close is not None:
                    close()
        for message in in_memory:
            if message.seq >= from_seq:
                yield message

    def _pack(self, value: dict[str, Any]) -> bytes:
        return pack_map(value, self.config.encoding)

    def _decode_request(self, body: bytes) -> Any:
        try:
            return unpack_map(body, self.config.encoding)
        except WireProtocolError:
            raise
        except Exception as err:  # whatever a crafted body makes the decoder raise, it is a bad request
            raise ProtocolError(f"body: not valid {self.config.encoding}: {type(err).__name__}") from None


def check_address(address: str, field: str) -> None:
    """Check a ZeroMQ address before binding it; a TCP port must be 1-65535 or ``*``.

    Raises
    ------
    ConfigError
        Naming ``field`` (e.g. ``publish.control_address``) and what was expected.
    """
    if not isinstance(address, str) or "://" not in address:
        raise ConfigError(f"{field}: expected an address like tcp://127.0.0.1:5555 (got {shown(address)})")
    transport, _, rest = address.partition("://")
    if transport != "tcp":
        return
    host, colon, port = rest.rpartition(":")
    if not colon or not host:
        raise ConfigError(f"{field}: expected tcp://HOST:PORT (got {address!r})")
    if port == "*":
        return
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ConfigError(
            f"{field}: port: expected 1 to 65535, or * for any free port (got {port!r} in {address!r})"
        )


def _int_field(request: dict[str, Any], key: str) -> int:
    value = request.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError(
            f"{request.get('cmd')}: field {key!r} must be a non-negative integer (got {shown(value)})"
        )
    return value


def _bind(socket: zmq.Socket, address: str, field: str) -> str:
    try:
        socket.bind(address)
    except zmq.ZMQError as err:
        raise ConfigError(f"{field}: cannot bind {address!r}: {err}") from None
    return socket.getsockopt_string(zmq.LAST_ENDPOINT)


def _is_loopback(address: str) -> bool:
    return address.startswith(("ipc://", "inproc://", "tcp://127.", "tcp://localhost", "tcp://[::1]"))
