"""The operator's live view: a read-only web page following the session, served by Starlette on uvicorn.

``rtdecoder run --view`` (or ``view.enabled: true``) serves it at ``http://127.0.0.1:8765/``
(``view.host``, ``view.port``). The server is one more subscriber of the session's result stream
(:mod:`rtdecoder.view.follow`); it keeps a bounded digest of it (:mod:`rtdecoder.view.state`) and
pushes it to each page as Server-Sent Events: first a snapshot of the session so far (so a reload
shows everything kept), then every event as it happens. Nothing polls files.

Routes, all ``GET`` (any other method is refused, so nothing on the page can change the session):

- ``/``: the page; ``/static/<file>``: its script and style (package data, no build step, nothing
  fetched from elsewhere);
- ``/events``: the event stream (``text/event-stream``): ``snapshot``, then ``vol``, ``trial``,
  ``state``, ``beat`` and ``note`` events (JSON; fields in :mod:`rtdecoder.view.state`);
- ``/state``: the snapshot as one JSON document;
- ``/recon/<seq>``: the reconstruction PNG of decode message ``seq`` (while kept);
- ``/thumb/<stim_id>``: a candidate's thumbnail PNG (from ``candidates.images_dir`` or the image
  source the command line passes).

Security. Bound to loopback (the default) the page needs no token, but requests must name a
loopback host (``Host: 127.0.0.1:8765``), so a web page elsewhere cannot read it through a DNS
name pointed at 127.0.0.1. Bound to any other interface, every request must carry the token in
its URL (``?token=...``; ``view.token``, or one drawn at start and printed in the URL); so must
every request when ``view.token`` is set. Responses forbid framing and outside scripts, and send
no referrer, so the token does not leak from the page.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from rtdecoder.config import PublishConfig, SessionConfig, ViewConfig
from rtdecoder.errors import ConfigError
from rtdecoder.view.follow import StreamFollower
from rtdecoder.view.images import ImageSource, ThumbnailCache
from rtdecoder.view.state import ViewState

logger = logging.getLogger(__name__)

#: Events queued for one page before it counts as too slow: its queue is then emptied and it gets
#: a fresh snapshot instead, so a stalled browser costs the server a bounded queue, never more.
PAGE_QUEUE = 2000
#: A comment is sent this often on a quiet event stream, so a page that has gone is noticed, s.
KEEPALIVE_S = 10.0
_STATIC = {"view.js": "application/javascript", "view.css": "text/css", "index.html": "text/html"}
_SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                 b"connect-src 'self'; frame-ancestors 'none'; form-action 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}
_RESYNC = "resync"  # queued for a page that fell behind: it gets a new snapshot


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine only."""
    name = host.strip("[]").lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(eq=False)
class _Page:
    """One page following the stream: its queue of (seq, kind, text) and the seq its snapshot covers."""

    queue: asyncio.Queue
    covered_seq: int = -1
    resyncs: int = 0


class ViewServer:
    """The live view of one session: HTTP server, stream follower and bounded state.

    Parameters
    ----------
    config : ViewConfig
        Address, token, FD threshold and the history bounds.
    session_config : SessionConfig, optional
        Which betas the session decodes (for the backlog).
    publish_config : PublishConfig, optional
        The stream's encoding and whether it needs CURVE keys (``view.client_secret_key_file``,
        ``view.server_public_key_file``).
    image_source : callable, optional
        ``image_source(stim_id)`` returns a candidate image (uint8 H×W×3) or ``None``: the
        thumbnails of retrieved and shown images. Without one the page shows ids only.
    decoding : bool, default=True
        Whether the session decodes (without a decoder the page shows no backlog).

    Attributes
    ----------
    state : ViewState
    url : str
        Where the page is, with its token when one is needed (after :meth:`start`).
    """

    def __init__(
        self,
        config: ViewConfig,
        session_config: SessionConfig | None = None,
        publish_config: PublishConfig | None = None,
        image_source: ImageSource | None = None,
        decoding: bool = True,
    ) -> None:
        self.config = config
        self.publish_config = publish_config or PublishConfig()
        self._keys: tuple[str | None, str | None] = (None, None)
        if self.publish_config.curve:
            if not (config.client_secret_key_file and config.server_public_key_file):
                raise ConfigError("view: publish.curve is on: set view.client_secret_key_file (an authorised "
                                  "client's .key_secret) and view.server_public_key_file (the session's server.key)")
            self._keys = (config.client_secret_key_file, config.server_public_key_file)
        self.state = ViewState(config, session_config, decoding)
        self.state.thumbnails = image_source is not None
        self.thumbnails = None if image_source is None else ThumbnailCache(
            image_source, config.thumbnail_px, config.thumbnail_cache)
        self.loopback = is_loopback(config.host)
        # beyond loopback a token is a must; one set in the config is asked for on loopback too
        self.token = config.token or (None if self.loopback else secrets.token_urlsafe(24))
        self.url = ""
        self.page_queue = PAGE_QUEUE  # events queued per page (a test makes it small)
        self.follower: StreamFollower | None = None
        self._pages: set[_Page] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._static = {name: (resources.files("rtdecoder.view") / "static" / name).read_bytes() for name in _STATIC}
        if self.token:  # the page's own script and style are asked for with the token too
            page = self._static["index.html"].decode()
            for name in ("view.css", "view.js"):
                page = page.replace(f'"static/{name}"', f'"static/{name}?token={self.token}"')
            self._static["index.html"] = page.encode()

    # ----------------------------------------------------------------- life cycle

    def start(self, timeout_s: float = 10.0) -> ViewServer:
        """Bind ``view.host:view.port`` and serve in a thread of its own; returns when it answers.

        Raises
        ------
        ConfigError
            When the address cannot be bound (in use, or not this machine's), naming the keys to change.
        """
        import uvicorn

        sock = self._bind()
        host, port = sock.getsockname()[:2]
        shown_host = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown_host}:{port}/" + (f"?token={self.token}" if self.token else "")
        uv_config = uvicorn.Config(
            self.app(), log_level="warning", access_log=False, lifespan="off", ws="none", http="h11",
            loop="asyncio", timeout_graceful_shutdown=1, server_header=False,
        )
        self._server = uvicorn.Server(uv_config)
        started = threading.Event()

        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            started.set()
            await self._server.serve(sockets=[sock])

        self._thread = threading.Thread(target=lambda: asyncio.run(serve()), name="rtdecoder-view", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._server.started:
            self.close()
            raise ConfigError(f"view: the web server did not start on {host}:{port} within {timeout_s:g} s")
        if not self.loopback:
            logger.warning("view: serving on %s (beyond loopback): share the URL with its token only with viewers",
                           host)
        logger.debug("view: %s", self.url)  # the command line prints it once (it may hold the token)
        return self

    def follow(self, result_endpoint: str, control_endpoint: str | None = None) -> StreamFollower:
        """Start following a session's stream (its PUB and control endpoints)."""
        secret, server = self._keys
        if self.follower is not None:
            self.follower.stop()
        self.follower = StreamFollower(self.state, result_endpoint, control_endpoint, self.push,
                                       self.publish_config.encoding, client_secret_file=secret,
                                       server_public_file=server).start()
        return self.follower

    def close(self) -> None:
        """Stop following, end every page's stream and stop the web server."""
        if self.follower is not None:
            self.follower.stop()
            self.follower = None
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._end_pages)
            except RuntimeError:  # the loop closed meanwhile
                pass
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def __enter__(self) -> ViewServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _bind(self) -> socket.socket:
        config = self.config
        try:
            infos = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError as err:
            raise ConfigError(f"view.host: {config.host!r} is not an address of this machine: {err}") from None
        family, kind, proto, _name, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as err:
            sock.close()
            raise ConfigError(
                f"view.port: cannot serve on {config.host}:{config.port}: {err.strerror or err}; set view.port to a "
                "free port (0: any)"
            ) from None
        return sock

    # ----------------------------------------------------------------- pushing to the pages

    @property
    def n_pages(self) -> int:
        """Pages following the stream now."""
        return len(self._pages)

    def push(self, events: list[dict[str, Any]]) -> None:
        """Send events to every page (from any thread); each is encoded once, whatever the number of pages."""
        loop = self._loop
        if loop is None or loop.is_closed() or not events:
            return
        items = [(int(e.get("seq", -1)), e["k"], _sse(e["k"], e)) for e in events]
        try:
            loop.call_soon_threadsafe(self._deliver, items)
        except RuntimeError:  # the loop closed between the check and the call
            pass

    def _deliver(self, items: list[tuple[int, str, str]]) -> None:
        for page in list(self._pages):
            for item in items:
                if item[1] == "reset":
                    item = (item[0], _RESYNC, "")
                try:
                    page.queue.put_nowait(item)
                except asyncio.QueueFull:  # a page that stopped reading: drop its queue, resend the whole
                    _empty(page.queue)
                    page.resyncs += 1
                    page.queue.put_nowait((-1, _RESYNC, ""))
                    logger.info("view: a page fell %d events behind; it gets a fresh snapshot", page.queue.maxsize)
                    break

    def _end_pages(self) -> None:
        for page in list(self._pages):
            _empty(page.queue)
            page.queue.put_nowait(None)

    # ----------------------------------------------------------------- the web app

    def app(self) -> Any:
        """The ASGI application (routes behind the guard)."""
        from starlette.applications import Starlette
        from starlette.routing import Route

        routes = [
            Route("/", self._index, methods=["GET"]),
            Route("/static/{name}", self._static_file, methods=["GET"]),
            Route("/events", self._events, methods=["GET"]),
            Route("/state", self._state, methods=["GET"]),
            Route("/recon/{seq:int}", self._recon, methods=["GET"]),
            Route("/thumb/{stim_id}", self._thumb, methods=["GET"]),
            Route("/favicon.ico", self._no_icon, methods=["GET"]),
        ]
        return _Guard(Starlette(routes=routes), self.token, self.loopback)

    async def _index(self, request: Any) -> Any:
        from starlette.responses import Response

        return Response(self._static["index.html"], media_type="text/html",
                        headers={"cache-control": "no-store"})

    async def _no_icon(self, request: Any) -> Any:
        from starlette.responses import Response

        return Response(status_code=204)  # browsers ask for one; a 404 would read as an error in the console

    async def _static_file(self, request: Any) -> Any:
        from starlette.responses import PlainTextResponse, Response

        name = request.path_params["name"]
        if name not in _STATIC or name == "index.html":
            return PlainTextResponse("not found", status_code=404)
        return Response(self._static[name], media_type=_STATIC[name], headers={"cache-control": "no-cache"})

    async def _state(self, request: Any) -> Any:
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import Response

        text = await run_in_threadpool(lambda: json.dumps(self.state.snapshot(), separators=(",", ":")))
        return Response(text, media_type="application/json", headers={"cache-control": "no-store"})

    async def _recon(self, request: Any) -> Any:
        from starlette.responses import PlainTextResponse, Response

        png = self.state.image(request.path_params["seq"])
        if png is None:
            return PlainTextResponse("no such reconstruction (not kept, or none made)", status_code=404)
        return Response(png, media_type="image/png", headers={"cache-control": "private, max-age=3600"})

    async def _thumb(self, request: Any) -> Any:
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import PlainTextResponse, Response

        if self.thumbnails is None:
            return PlainTextResponse("no candidate images configured (candidates.images_dir)", status_code=404)
        png = await run_in_threadpool(self.thumbnails.get, request.path_params["stim_id"])
        if png is None:
            return PlainTextResponse("no image of that candidate", status_code=404)
        return Response(png, media_type="image/png", headers={"cache-control": "private, max-age=3600"})

    async def _events(self, request: Any) -> Any:
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import PlainTextResponse, StreamingResponse

        if len(self._pages) >= self.config.max_clients:
            return PlainTextResponse(f"{self.config.max_clients} pages already follow this session "
                                     "(view.max_clients)", status_code=503)
        page = _Page(asyncio.Queue(maxsize=self.page_queue))
        # registered before the snapshot is taken, so no event falls between the two; the events
        # the snapshot already covers are skipped by seq
        self._pages.add(page)

        def snapshot() -> str:
            body = self.state.snapshot()
            page.covered_seq = body["seq"]
            return _sse("snapshot", body)

        async def stream() -> Any:
            try:
                yield "retry: 1000\n\n"
                yield await run_in_threadpool(snapshot)
                while True:
                    try:
                        item = await asyncio.wait_for(page.queue.get(), timeout=KEEPALIVE_S)
                    except asyncio.TimeoutError:  # noqa: UP041  (not TimeoutError before Python 3.11)
                        yield ": keep-alive\n\n"
                        continue
                    if item is None:
                        return
                    seq, kind, text = item
                    if kind == _RESYNC:
                        yield await run_in_threadpool(snapshot)
                    elif kind == "note" or seq > page.covered_seq:
                        yield text
            finally:
                self._pages.discard(page)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})


class _Guard:
    """ASGI middleware: GET and HEAD only, the token (or a loopback Host) checked, security headers added."""

    def __init__(self, app: Any, token: str | None, loopback: bool) -> None:
        self.app = app
        self.token = token
        self.loopback = loopback

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            status, text = refusal
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"), *_SECURITY_HEADERS]})
            await send({"type": "http.response.body", "body": text.encode()})
            return

        async def send_with_headers(event: dict[str, Any]) -> None:
            if event["type"] == "http.response.start":
                event = {**event, "headers": [*event.get("headers", []), *_SECURITY_HEADERS]}
            await send(event)

        await self.app(scope, receive, send_with_headers)

    def _refusal(self, scope: dict[str, Any]) -> tuple[int, str] | None:
        if scope["method"] not in ("GET", "HEAD"):
            return 405, "the view is read-only: GET only"
        if self.token is not None:
            from urllib.parse import parse_qs

            given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return 403, "this view needs its token: open the URL rtdecoder printed (…/?token=…)"
            return None
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if not is_loopback(name):
            return 403, "the view answers requests for this machine's loopback address only"
        return None


def _sse(kind: str, body: dict[str, Any]) -> str:
    # one line of JSON: a data field may not hold a line break
    return f"event: {kind}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n"


def _empty(queue: asyncio.Queue) -> None:
    while True:
        try:
            queue.get_nowait()
        except asyncio.QueueEmpty:
            return


def attach(server: ViewServer, session: Any, timeout_s: float = 600.0) -> threading.Thread:
    """Follow a :class:`~rtdecoder.session.runner.LiveSession` once its publisher is bound.

    Returns the (daemon) thread that waits for ``session.ready``; the session's endpoints are
    known only then (a port ``*`` is chosen at bind time).
    """

    def wait_and_follow() -> None:
        if not session.ready.wait(timeout_s):
            logger.warning("view: the session did not start within %.0f s; the view shows nothing", timeout_s)
            return
        publisher = session.publisher
        server.follow(publisher.result_endpoint_, publisher.control_endpoint_)

    thread = threading.Thread(target=wait_and_follow, name="rtdecoder-view-attach", daemon=True)
    thread.start()
    return thread
