"""The operator's live view without a browser: its digest of the stream, its bounds, its guard, its wiring."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from rtdecoder_client.client import ControlClient
from rtdecoder_client.messages import Message

from rtdecoder.config import PublishConfig, SessionConfig, ViewConfig, load_config
from rtdecoder.errors import ConfigError
from rtdecoder.publish.publisher import ResultPublisher
from rtdecoder.session.journal import Journal
from rtdecoder.session.report import write_report
from rtdecoder.view.server import PAGE_QUEUE, ViewServer, is_loopback
from rtdecoder.view.state import ViewState

LOOPBACK_PUBLISH = PublishConfig(result_address="tcp://127.0.0.1:*", control_address="tcp://127.0.0.1:*")


def _png(value: int, px: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((px, px, 3), value % 255, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _noise_png(seed: int, px: int) -> bytes:
    """A PNG that does not compress: px*px*3 bytes or so, for the image-memory bound."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (px, px, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class _Stream:
    """Publishes runs the way the session does (status, volumes, betas, decodes), to a publisher or a list."""

    def __init__(self, publish) -> None:
        self.publish = publish

    def run(self, label: str, n_volumes: int = 40, trial_every: int = 5, missing=(7,), problem_at: int | None = 12,
            png=lambda i: _png(i), end: bool = True, delay_s: float = 0.0) -> None:
        self.publish("status", {"state": "run_start", "run": label, "tr_s": 1.6, "n_volumes": n_volumes}, {})
        for i in range(n_volumes):
            now = time.time()
            gone = i in missing
            self.publish("volume", {
                "run": label, "tr_index": i, "missing": gone, "fd_mm": None if gone else 0.05 * (i % 30),
                "motion": None if gone else [0.01 * i, -0.01 * i, 0.02, 0.001, 0.0, -0.001], "tsnr": 40.0 + i,
                "n_betas": int(i % trial_every == trial_every - 1),
            }, {} if gone else {"file_complete": now - 0.040, "processed": now - 0.010})
            if problem_at is not None and i == problem_at:
                self.publish("status", {"state": "file_problem", "run": label,
                                        "message": "/export/vol0013.nii: truncated <b>header</b>"}, {})
            if i % trial_every == trial_every - 1:
                trial = f"t{i // trial_every:02d}"
                beta = self.publish("beta", {"run": label, "trial_id": trial, "stim_id": "cat", "is_update": False,
                                             "is_final": False, "tr_index": i, "onset_s": 1.6 * (i - 4)},
                                    {"file_complete": now - 0.040})
                self.publish("decode", {
                    "run": label, "trial_id": trial, "stim_id": "cat", "beta_seq": beta.seq,
                    "retrieval": {"ids": ["dog", "cat", "owl"], "scores": [0.31, 0.25, 0.1], "shown_rank": 2,
                                  "n_candidates": 3},
                    "retrieval_ms": 1.5, "reconstruction": "done", "image_png": png(i), "reconstruction_ms": 20.0,
                    "decode_ms": 22.0,
                }, {"file_complete": now - 0.040})
            if delay_s:
                time.sleep(delay_s)
        if end:
            self.publish("status", {"state": "run_end", "run": label, "reason": "n_volumes", "volumes": n_volumes}, {})


def _messages(session: str = "sess-a") -> tuple[list[Message], _Stream]:
    out: list[Message] = []

    def publish(topic, data, t):
        message = Message(topic, session, len(out), {**t, "published": time.time()}, data)
        out.append(message)
        return message

    return out, _Stream(publish)


def _get(url: str, method: str = "GET", headers: dict | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, method=method, headers=headers or {},
                                     data=b"{}" if method in ("POST", "PUT") else None)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def _wait(predicate, timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _base(server: ViewServer) -> str:
    return server.url.split("?")[0].rstrip("/")


@pytest.fixture
def publisher():
    pub = ResultPublisher(LOOPBACK_PUBLISH, "sess-a").start()
    yield pub
    pub.close()


@pytest.fixture
def server(publisher):
    view = ViewServer(ViewConfig(port=0), image_source=lambda stim_id: np.full((40, 30, 3), 90, np.uint8)
                      if stim_id in ("cat", "dog") else None).start()
    view.follow(publisher.result_endpoint_, publisher.control_endpoint_)
    _until(publisher, lambda: view.state.last_seq >= 0, "the view's subscription")
    yield view
    view.close()


# ----------------------------------------------------------------- the digest


def test_state_digests_volumes_trials_problems_and_backlog() -> None:
    messages, stream = _messages()
    stream.run("run-01", n_volumes=20, end=False)
    state = ViewState(ViewConfig(fd_threshold_mm=0.5))
    events = [event for message in messages for event in state.take(message)]
    snapshot = state.snapshot()
    run = snapshot["runs"][0]
    summary = run["summary"]
    assert (summary["run"], summary["state"], summary["volumes"], summary["missing"]) == ("run-01", "running", 19, 1)
    assert summary["fd_over"] == sum(1 for i in range(20) if i != 7 and 0.05 * (i % 30) > 0.5)
    assert summary["n_volumes"] == 20 and summary["tr_s"] == 1.6
    volumes = run["volumes"]
    assert [v[0] for v in volumes] == list(range(20))
    missing = volumes[7]
    assert missing[1] is True and missing[2] is None and missing[3] is None
    assert volumes[3][5] == pytest.approx(30.0, abs=0.5)  # file complete to processed, ms
    assert volumes[3][6] >= volumes[3][5]  # to published: later still
    trial = run["trials"][0]
    assert trial["trial_id"] == "t00" and trial["ids"] == ["dog", "cat", "owl"]
    assert trial["margin"] == pytest.approx(0.06) and trial["shown_rank"] == 2 and trial["n_candidates"] == 3
    assert trial["image"] and state.image(trial["seq"]).startswith(b"\x89PNG")
    assert trial["latency_ms"] >= 40.0 and trial["waiting"] == 0
    problem = [e for e in run["events"] if e["state"] == "file_problem"]
    assert problem and problem[0]["tr_index"] == 13  # where it happened: after volume 12
    # a beta waits for its decode: the backlog counts it until the decode comes
    beats = [e for e in events if e["k"] == "beat" and e.get("beta")]
    assert beats and all(e["backlog"] == 1 for e in beats)
    json.dumps(snapshot)  # JSON-ready: no NaN, no bytes, no arrays


def test_backlog_counts_betas_the_session_decodes_and_run_end_clears_it() -> None:
    state = ViewState(ViewConfig(), SessionConfig(decode_updates=True))
    seq = iter(range(100))

    def take(topic, data):
        return state.take(Message(topic, "s", next(seq), {"published": time.time()}, {"run": "run-01", **data}))

    take("beta", {"trial_id": "a", "is_update": False, "is_final": False, "beta": np.ones(3, np.float32)})
    take("beta", {"trial_id": "a", "is_update": True, "is_final": False})
    take("beta", {"trial_id": "b", "is_update": False, "is_final": True})  # finals are not decoded here
    take("beta", {"trial_id": "c", "is_update": False, "is_final": False, "beta": np.full(3, np.nan, np.float32)})
    assert state.snapshot()["runs"][0]["summary"]["backlog"] == 2
    [trial] = take("decode", {"trial_id": "a", "beta_seq": 1, "retrieval": {"ids": ["x"], "scores": [0.2]},
                              "reconstruction": "skipped_backlog", "backlog": 3})
    assert (trial["kind"], trial["waiting"], trial["backlog"], trial["margin"], trial["image"]) == \
        ("update", 1, 3, None, False)
    take("status", {"state": "run_end", "reason": "n_volumes"})
    assert state.snapshot()["runs"][0]["summary"]["backlog"] == 0
    without = ViewState(ViewConfig(), decoding=False)
    without.take(Message("beta", "s", 0, {}, {"run": "r", "trial_id": "a", "is_update": False, "is_final": False}))
    assert without.snapshot()["runs"][0]["summary"]["backlog"] == 0


def test_heartbeats_update_the_state_but_are_not_kept() -> None:
    state = ViewState(ViewConfig())
    for seq in range(500):
        state.take(Message("status", "s", seq, {"published": time.time()}, {"state": "waiting", "run": None}))
    assert state.snapshot()["now"]["state"] == "waiting"
    assert state.sizes()["events"] == 0
    state.take(Message("status", "s", 500, {}, {"state": "run_start", "run": "run-01"}))
    state.take(Message("status", "s", 501, {}, {"state": "error", "run": "run-01", "message": "boom"}))
    snapshot = state.snapshot()
    assert snapshot["now"]["state"] == "error" and snapshot["runs"][0]["summary"]["state"] == "error"
    assert [e["state"] for e in snapshot["runs"][0]["events"]] == ["run_start", "error"]


def test_another_session_on_the_stream_starts_the_view_afresh() -> None:
    state = ViewState(ViewConfig())
    first, stream = _messages("sess-a")
    stream.run("run-01", n_volumes=10)
    for message in first:
        state.take(message)
    second, stream = _messages("sess-b")
    stream.run("run-01", n_volumes=5, end=False)
    events = state.take(second[0])
    assert events[0]["k"] == "reset"
    for message in second[1:]:
        state.take(message)
    snapshot = state.snapshot()
    assert snapshot["session"] == "sess-b" and snapshot["runs"][0]["summary"]["volumes"] == 5


def test_history_stays_bounded_over_a_long_session_through_the_server() -> None:
    # 30 runs through a real publisher and the view's own subscriber, with bounds a 12-run session
    # fills: runs, volumes, trials, events and image bytes stop growing, and so does the memory.
    config = ViewConfig(port=0, history_runs=12, run_volumes=150, run_trials=20, run_events=10, image_memory_mb=0.25)
    publisher = ResultPublisher(LOOPBACK_PUBLISH.model_copy(update={"history_size": 200}), "long").start()
    view = ViewServer(config).start()
    try:
        view.follow(publisher.result_endpoint_, publisher.control_endpoint_)
        stream = _Stream(publisher.publish)
        _until(publisher, lambda: view.state.last_seq >= 0, "the view's subscription")
        memory = []
        tracemalloc.start()
        for run in range(30):
            stream.run(f"run-{run + 1:02d}", n_volumes=200, trial_every=4, missing=(50,), problem_at=60,
                       png=lambda i: _noise_png(i, 24))
            _wait(lambda: view.state.last_seq == publisher.next_seq - 1, what="the view to catch up")
            if run in (14, 29):
                memory.append(tracemalloc.take_snapshot())
            sizes = view.state.sizes()
            assert sizes["runs"] <= 12 and sizes["max_run_volumes"] <= 150 and sizes["max_run_trials"] <= 20
            assert sizes["events"] <= 12 * 10 + 10 and sizes["image_bytes"] <= 0.25 * 1024 * 1024
        tracemalloc.stop()
        growth = sum(stat.size_diff for stat in memory[1].compare_to(memory[0], "filename"))
        print(f"view memory growth from run 15 to run 30: {growth} bytes")
        assert growth < 2 * 1024 * 1024, f"the view grew by {growth / 1e6:.1f} MB from run 15 to run 30"
        snapshot = json.loads(_get(_base(view) + "/state")[2])
        assert [r["summary"]["run"] for r in snapshot["runs"]] == [f"run-{k:02d}" for k in range(19, 31)]
        assert len(json.dumps(snapshot)) < 2_000_000
        assert view.follower.unfilled_ == 0
    finally:
        view.close()
        publisher.close()


def _until(publisher: ResultPublisher, predicate, what: str, timeout_s: float = 20.0) -> None:
    """Send heartbeats (as the session does) until ``predicate()``: a subscriber joins, then fills its gap."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        publisher.publish("status", {"state": "waiting", "run": None}, {})
        time.sleep(0.05)


def test_a_page_that_stops_reading_costs_a_bounded_queue(server, publisher) -> None:
    server.page_queue = 100  # the socket's own buffers hold the rest; small, so they fill within the test
    connection = http.client.HTTPConnection("127.0.0.1", int(_base(server).rsplit(":", 1)[1]), timeout=10)
    connection.request("GET", "/events")
    reply = connection.getresponse()
    assert reply.status == 200 and reply.getheader("content-type").startswith("text/event-stream")
    _wait(lambda: server.n_pages == 1, what="the page to register")
    stream = _Stream(publisher.publish)
    for run in range(6):  # never read: the socket buffers fill, then the page's queue
        stream.run(f"run-{run}", n_volumes=400, trial_every=400, png=lambda i: _png(i))
    _wait(lambda: server.state.last_seq == publisher.next_seq - 1, what="the view to catch up")
    [page] = list(server._pages)
    assert page.queue.qsize() <= 100 < PAGE_QUEUE
    assert page.resyncs >= 1  # it was dropped to a fresh snapshot, not left to grow
    connection.close()


# ----------------------------------------------------------------- live and late


def _read_events(reply, kinds: set[str], timeout_s: float = 20.0) -> list[tuple[str, dict]]:
    """Read SSE events until one of ``kinds`` arrives; returns every (event, data) read."""
    out, kind, deadline = [], None, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = reply.readline().decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            out.append((kind, json.loads(line[6:])))
            if kind in kinds:
                return out
    raise AssertionError(f"no {kinds} event within {timeout_s} s; got {[k for k, _ in out]}")


def test_event_stream_sends_a_snapshot_then_live_events(server, publisher) -> None:
    stream = _Stream(publisher.publish)
    stream.run("run-01", n_volumes=10)
    _wait(lambda: server.state.last_seq == publisher.next_seq - 1, what="the view to catch up")
    connection = http.client.HTTPConnection("127.0.0.1", int(_base(server).rsplit(":", 1)[1]), timeout=10)
    connection.request("GET", "/events")
    reply = connection.getresponse()
    [(kind, snapshot)] = _read_events(reply, {"snapshot"})
    assert kind == "snapshot" and snapshot["runs"][0]["summary"]["volumes"] == 9
    assert snapshot["config"]["fd_threshold_mm"] == 0.9 and snapshot["config"]["thumbnails"] is True
    stream.run("run-02", n_volumes=3, missing=(), problem_at=None, end=False)
    events = _read_events(reply, {"vol"})
    assert events[-1][1]["run"] == "run-02" and events[-1][1]["v"][0] == 0
    assert all(data["seq"] > snapshot["seq"] for _, data in events)  # nothing the snapshot holds comes twice
    connection.close()


def test_a_view_started_late_shows_the_session_so_far(publisher) -> None:
    stream = _Stream(publisher.publish)
    for run in range(3):
        stream.run(f"run-{run + 1:02d}", n_volumes=30)
    view = ViewServer(ViewConfig(port=0)).start()
    try:
        view.follow(publisher.result_endpoint_, publisher.control_endpoint_)
        _until(publisher, lambda: view.state.sizes()["runs"] == 3, "the history")
        summaries = [r["summary"] for r in view.state.snapshot()["runs"]]
        assert [(s["run"], s["volumes"], s["missing"], s["decoded"], s["state"]) for s in summaries] == [
            (f"run-{k:02d}", 29, 1, 6, "run_end") for k in (1, 2, 3)]
        assert view.follower.filled_ >= publisher.next_seq - 2
    finally:
        view.close()


def test_the_view_asks_the_control_socket_for_history_only(publisher, monkeypatch) -> None:
    sent: list[str] = []
    original = ControlClient.request

    def recording(self, cmd, **fields):
        sent.append(cmd)
        return original(self, cmd, **fields)

    monkeypatch.setattr(ControlClient, "request", recording)
    taken: list = []
    publisher.on_onset = lambda request: taken.append(request) or True
    _Stream(publisher.publish).run("run-01", n_volumes=20)
    view = ViewServer(ViewConfig(port=0)).start()
    try:
        view.follow(publisher.result_endpoint_, publisher.control_endpoint_)
        _until(publisher, lambda: view.state.sizes()["volumes"] == 20, "the history")
    finally:
        view.close()
    assert sent and set(sent) == {"resend"}
    assert taken == []  # no onset, run_start or run_end ever reached the session


# ----------------------------------------------------------------- images


def test_thumbnails_come_from_the_candidates_folder(tmp_path, publisher) -> None:
    from rtdecoder.view.images import folder_image_source

    folder = tmp_path / "candidates"
    folder.mkdir()
    Image.fromarray(np.full((50, 80, 3), 200, np.uint8)).save(folder / "cat.png")
    Image.fromarray(np.full((60, 60, 3), 10, np.uint8)).save(folder / "dog.jpg")
    (tmp_path / "secret.png").write_bytes(_png(1))
    view = ViewServer(ViewConfig(port=0, thumbnail_px=48), image_source=folder_image_source(folder)).start()
    try:
        base = _base(view)
        for name in ("cat", "cat.png", "dog", "dog.jpg"):
            status, headers, body = _get(f"{base}/thumb/{name}")
            assert status == 200 and headers["content-type"] == "image/png", name
            assert Image.open(io.BytesIO(body)).size == (48, 48)
        for name in ("owl", "..%2Fsecret.png", "%2Fetc%2Fpasswd", "..", ".hidden"):
            assert _get(f"{base}/thumb/{name}")[0] == 404, name
    finally:
        view.close()


def test_reconstructions_are_served_while_kept(server, publisher) -> None:
    _Stream(publisher.publish).run("run-01", n_volumes=10, png=lambda i: _png(7, 16))
    _wait(lambda: server.state.last_seq == publisher.next_seq - 1, what="the view to catch up")
    trial = server.state.snapshot()["runs"][0]["trials"][0]
    status, headers, body = _get(f"{_base(server)}/recon/{trial['seq']}")
    assert status == 200 and headers["content-type"] == "image/png" and body == _png(7, 16)
    assert _get(f"{_base(server)}/recon/999999")[0] == 404


def test_report_shows_the_retrieved_thumbnails(tmp_path) -> None:
    messages, stream = _messages()
    stream.run("run-01", n_volumes=20)
    with Journal(tmp_path / "journal.bin", fsync=False) as journal:
        for message in messages:
            journal.append({"kind": "published", "message": message.to_dict()})
    shown = {"cat": 200, "dog": 30, "owl": 120}
    figures = write_report(tmp_path, "run-01", tmp_path / "report.html", 1.6,
                           seen_image=lambda i: np.full((32, 32, 3), shown[i], np.uint8))
    page = (tmp_path / "report.html").read_text()
    assert figures["decoded"] == 4
    # per trial: the shown image, the reconstruction and three candidates; the shown one framed
    assert page.count('<figure class="cand') == 4 * 3 and page.count('<figure class="cand hit">') == 4
    assert page.count('title="2. cat (0.250)"') == 4
    assert "shown image: rank 2 of 3" in page
    without = write_report(tmp_path, "run-01", tmp_path / "plain.html", 1.6)
    assert without == figures and "1. dog (0.310)" in (tmp_path / "plain.html").read_text()


# ----------------------------------------------------------------- the guard


def test_bound_beyond_loopback_every_request_needs_the_token(publisher) -> None:
    view = ViewServer(ViewConfig(host="0.0.0.0", port=0)).start()
    try:
        assert re.search(r"\?token=[A-Za-z0-9_-]{24,}$", view.url)
        port = view.url.split(":")[2].split("/")[0]
        base = f"http://127.0.0.1:{port}"  # traffic stays on this machine
        for path in ("/", "/events", "/state", "/static/view.js", "/recon/1", "/thumb/cat"):
            for query in ("", "?token=wrong-token-wrong-token"):
                status, _headers, body = _get(base + path + query)
                assert status == 403 and b"token" in body, (path, query)
        status, headers, body = _get(f"{base}/?token={view.token}")
        assert status == 200 and b"rtdecoder live view" in body
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert headers["referrer-policy"] == "no-referrer"
        assert _get(f"{base}/state?token={view.token}")[0] == 200
    finally:
        view.close()


def test_on_loopback_a_foreign_host_name_is_refused(server) -> None:
    base = _base(server)
    assert _get(base + "/state")[0] == 200
    assert _get(base + "/state", headers={"Host": "localhost:1234"})[0] == 200
    for host in ("rebind.example.com", "192.168.1.10:8765", "evil.localhost.example"):
        assert _get(base + "/state", headers={"Host": host})[0] == 403, host


def test_a_token_set_in_the_config_is_asked_for_on_loopback_too() -> None:
    view = ViewServer(ViewConfig(port=0, token="a-lab-chosen-token-0123")).start()
    try:
        assert view.url.endswith("?token=a-lab-chosen-token-0123")
        assert _get(_base(view) + "/state")[0] == 403
        assert _get(_base(view) + "/state?token=a-lab-chosen-token-0123")[0] == 200
    finally:
        view.close()


def test_nothing_on_the_page_can_change_the_session(server) -> None:
    base = _base(server)
    for path in ("/", "/events", "/state", "/recon/1", "/thumb/cat", "/static/view.js"):
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            assert _get(base + path, method=method)[0] == 405, (path, method)
    for route in server.app().app.routes:
        assert set(route.methods) <= {"GET", "HEAD"}, route.path
    script = (Path(__file__).resolve().parents[1] / "rtdecoder/view/static/view.js").read_text()
    for forbidden in ("fetch(", "XMLHttpRequest", "WebSocket", "method:", ".send(", "innerHTML", "eval("):
        assert forbidden not in script, forbidden


def test_config_and_binding_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"view\.token"):
        load_config("phantom", overrides={"view": {"token": "short"}})
    with pytest.raises(ConfigError, match=r"view\.token"):
        load_config("phantom", overrides={"view": {"token": "has spaces and more than sixteen"}})
    with pytest.raises(ConfigError, match=r"view\.fd_threshold_mm"):
        load_config("phantom", overrides={"view": {"fd_threshold_mm": 0}})
    assert load_config("phantom").view.fd_threshold_mm == 0.9
    first = ViewServer(ViewConfig(port=0)).start()
    try:
        port = int(_base(first).rsplit(":", 1)[1])
        with pytest.raises(ConfigError, match=r"view\.port: cannot serve on 127\.0\.0\.1:\d+"):
            ViewServer(ViewConfig(port=port)).start()
    finally:
        first.close()
    with pytest.raises(ConfigError, match=r"view\.client_secret_key_file"):
        ViewServer(ViewConfig(), publish_config=PublishConfig(curve=True, server_secret_key_file="s",
                                                              client_public_keys_dir="d"))
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("example.org")


def test_closing_the_view_ends_the_open_event_streams(publisher) -> None:
    view = ViewServer(ViewConfig(port=0)).start()
    view.follow(publisher.result_endpoint_, publisher.control_endpoint_)
    connection = http.client.HTTPConnection("127.0.0.1", int(_base(view).rsplit(":", 1)[1]), timeout=10)
    connection.request("GET", "/events")
    reply = connection.getresponse()
    _read_events(reply, {"snapshot"})
    started = time.monotonic()
    view.close()
    assert time.monotonic() - started < 3.0
    reply.read()  # the stream has ended: reading to its end returns instead of timing out
    connection.close()


# ----------------------------------------------------------------- the command line


def test_candidate_images_for_the_command_line(tmp_path) -> None:
    from rtdecoder.session.commands import candidate_images

    folder = tmp_path / "candidates"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "cat.png")
    config = load_config("phantom", overrides={"candidates": {"images_dir": str(folder)}})
    assert candidate_images(config)("cat").shape == (8, 8, 3)
    assert candidate_images(config)("dog") is None
    assert callable(candidate_images(load_config("phantom")))  # the phantom bank, built at first use
    assert candidate_images(load_config("nsd")) is None  # unCLIP and no images_dir: ids only


def test_the_demo_view_follows_its_session_with_the_bank_thumbnails(publisher) -> None:
    from types import SimpleNamespace

    from rtdecoder.session.demo import _start_view

    class Bank:
        def index_of(self, stim_id):
            return {"cat": 0}[stim_id]

        def image(self, index):
            return np.full((20, 20, 3), 150, np.uint8)

    config = load_config("phantom", overrides={"view": {"port": 0}})
    session = SimpleNamespace(ready=threading.Event(), publisher=publisher)
    view = _start_view(config, session, SimpleNamespace(bank=Bank()))
    try:
        session.ready.set()
        _until(publisher, lambda: view.state.last_seq >= 0, "the demo view's subscription")
        assert _get(_base(view) + "/thumb/cat")[0] == 200
        assert _get(_base(view) + "/thumb/owl")[0] == 404
    finally:
        view.close()


def test_run_with_view_serves_the_session(tmp_path, rng) -> None:
    from test_session import N_VOLUMES, OVERRIDES, _synthetic_run, _write

    volumes, affine, trials, bundle, _ = _synthetic_run(rng)
    watch, session_dir = tmp_path / "export", tmp_path / "session"
    watch.mkdir()
    bundle.save(tmp_path / "bundle")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump({"preset": "phantom", **OVERRIDES, "view": {"port": 0}}))
    from rtdecoder.glm.events import write_events_tsv

    write_events_tsv(trials, tmp_path / "events.tsv")
    command = [sys.executable, "-m", "rtdecoder.cli", "run", "--config", str(config_path),
               "--bundle", str(tmp_path / "bundle"), "--watch", str(watch), "--session-dir", str(session_dir),
               "--events", str(tmp_path / "events.tsv"), "--n-volumes", str(N_VOLUMES), "--n-runs", "1",
               "--no-decode", "--view"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    try:
        _wait(lambda: any("live view at" in line for line in lines) or process.poll() is not None, 120,
              "the view's URL")
        url = next(line for line in lines if "live view at" in line).split("live view at ")[1].strip()
        assert url.startswith("http://127.0.0.1:")
        _write(volumes, affine, watch)
        state: dict = {}

        def ended() -> bool:
            nonlocal state
            try:
                state = json.loads(_get(url.rstrip("/") + "/state")[2])
            except (OSError, ValueError):
                return False
            return bool(state.get("runs")) and state["runs"][0]["summary"]["state"] == "run_end"

        _wait(ended, 60, "run_end in the view")
        summary = state["runs"][0]["summary"]
        assert (summary["run"], summary["volumes"], summary["missing"]) == ("run-01", N_VOLUMES, 0)
        assert state["config"]["decoding"] is False
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(5)
    # the console: one line per volume at most, and nothing from the web server per request
    volume_lines = [line for line in lines if re.search(r"run-01 vol +\d+ ", line)]
    assert len(volume_lines) == N_VOLUMES
    assert not [line for line in lines if "GET /" in line or "uvicorn" in line]
