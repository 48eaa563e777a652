"""Control requests are checked where they enter; the control thread answers anything and survives.

Real sockets on 127.0.0.1 with free ports (``tcp://127.0.0.1:*``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from rtdecoder_client.client import ControlClient, ResultSubscriber
from rtdecoder_client.errors import ProtocolError
from rtdecoder_client.messages import Message, pack_map, unpack_map

from rtdecoder.config import PublishConfig
from rtdecoder.errors import ConfigError, PublisherError, VolumeError
from rtdecoder.errors import ProtocolError as SessionProtocolError
from rtdecoder.ingest.watcher import FileProblem
from rtdecoder.publish.control import MAX_REQUEST_BYTES, OnsetRequest, RunEndRequest, RunStartRequest
from rtdecoder.publish.publisher import ResultPublisher

LOOPBACK = {"result_address": "tcp://127.0.0.1:*", "control_address": "tcp://127.0.0.1:*"}


def _raw_request(endpoint: str, body: bytes, encoding: str = "msgpack", timeout_s: float = 5.0) -> dict:
    """Send raw bytes as one request on a fresh REQ socket and decode the reply."""
    socket = zmq.Context.instance().socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    try:
        socket.send(body)
        assert socket.poll(int(timeout_s * 1000)), "no reply: the control thread is not answering"
        return unpack_map(socket.recv(), encoding)
    finally:
        socket.close()


@pytest.fixture(scope="module")
def onset_publisher():
    """One publisher for the many refused-request cases; ``taken`` collects what reached the session."""
    taken: list = []
    with ResultPublisher(PublishConfig(**LOOPBACK), "s", on_onset=lambda r: taken.append(r) or True) as publisher:
        control = ControlClient(publisher.control_endpoint_)
        yield publisher, control, taken
        control.close()


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"trial_id": "x1", "onset_s": "abc"}, "field 'onset_s': expected a finite number of seconds"),
        ({"trial_id": "x1", "onset_s": math.nan}, "field 'onset_s': expected a finite number"),
        ({"trial_id": "x1", "onset_s": math.inf}, "field 'onset_s'"),
        ({"trial_id": "x1", "onset_s": 1e300}, "field 'onset_s'.*from 0 to 86400"),
        ({"trial_id": "x1", "onset_s": -0.5}, "field 'onset_s'"),
        ({"trial_id": "x1", "onset_s": True}, "field 'onset_s'"),
        ({"trial_id": "x1", "onset_s": 2**63}, "field 'onset_s'"),
        ({"onset_s": 4.0}, "missing field 'trial_id'"),
        ({"trial_id": "x1"}, "missing field 'onset_s'"),
        ({"trial_id": "", "onset_s": 4.0}, "field 'trial_id': expected a non-empty string"),
        ({"trial_id": "   ", "onset_s": 4.0}, "field 'trial_id'"),
        ({"trial_id": "x" * 1000, "onset_s": 4.0}, "field 'trial_id': expected at most 128 characters"),
        ({"trial_id": ["x"], "onset_s": 4.0}, "field 'trial_id': expected a string"),
        ({"trial_id": "a\nb", "onset_s": 4.0}, "field 'trial_id'.*control characters"),
        ({"trial_id": "x1", "onset_s": 4.0, "duration_s": -1.0}, "field 'duration_s'"),
        ({"trial_id": "x1", "onset_s": 4.0, "duration_s": math.nan}, "field 'duration_s'"),
        ({"trial_id": "x1", "onset_s": 4.0, "stim_id": 5.5}, "field 'stim_id': expected a string"),
        ({"trial_id": "x1", "onset_s": 4.0, "onset": 3.0}, "unknown field 'onset'"),
    ],
)
def test_bad_onsets_are_refused_and_never_reach_the_session(onset_publisher, fields: dict, match: str) -> None:
    _publisher, control, taken = onset_publisher
    before = len(taken)
    with pytest.raises(ProtocolError, match=match):
        control.request("onset", **fields)
    assert len(taken) == before


def test_a_good_onset_reaches_the_session_typed(onset_publisher) -> None:
    _publisher, control, taken = onset_publisher
    taken.clear()
    assert control.announce_onset("r01-t002", 12, stim_id="", duration_s=3)
    assert control.request("onset", trial_id=7, onset_s=0.0, stim_id="coffee")["accepted"]
    assert taken == [OnsetRequest("r01-t002", 12.0, 3.0, None), OnsetRequest("7", 0.0, 0.0, "coffee")]
    assert isinstance(taken[0].onset_s, float) and OnsetRequest.cmd == "onset"


def test_onset_request_checks_its_fields_when_built_directly() -> None:
    with pytest.raises(ProtocolError, match="onset_s"):
        OnsetRequest("t", float("nan"))
    with pytest.raises(ValueError, match="trial_id"):  # a ProtocolError is a ValueError too
        OnsetRequest("", 1.0)


def test_run_requests_reach_the_session_typed(onset_publisher) -> None:
    _publisher, control, taken = onset_publisher
    taken.clear()
    assert control.start_run("run-02")
    assert control.end_run()
    assert taken == [RunStartRequest("run-02"), RunEndRequest(None)]
    with pytest.raises(ProtocolError, match="run_start: field 'run'"):
        control.request("run_start", run="../../etc")
    assert len(taken) == 2


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_undecodable_requests_are_answered_and_the_thread_lives_on(encoding: str) -> None:
    config = PublishConfig(**LOOPBACK, encoding=encoding)
    with ResultPublisher(config, "s", status=lambda: {"run": 1}) as publisher:
        endpoint = publisher.control_endpoint_
        nested = b"[" * 100_000 if encoding == "json" else b"\x91" * 100_000
        bad_bodies = [
            nested[: MAX_REQUEST_BYTES - 1],  # nested tens of thousands deep, within the size limit
            b"\xff\xfe{",  # neither valid UTF-8 JSON nor msgpack
            b"",
            b"[1, 2]" if encoding == "json" else msgpack.packb([1, 2]),  # not a map
            b'{"cmd": "onset", "trial_id": "x", "onset_s": NaN}' if encoding == "json"
            else msgpack.packb({"cmd": "onset", "trial_id": "x", "onset_s": math.nan}),
            b'{"cmd": [[[[[[[[["deep"]]]]]]]]]}' if encoding == "json" else msgpack.packb({"cmd": {"a": [[[1]]]}}),
        ]
        for body in bad_bodies:
            reply = _raw_request(endpoint, body, encoding)
            assert reply["ok"] is False and isinstance(reply["error"], str) and "\n" not in reply["error"]
            assert len(reply["error"]) < 300
        oversized = _raw_request(endpoint, pack_map({"cmd": "status", "pad": "x" * 100_000}, encoding), encoding)
        assert oversized == {"ok": False, "error": oversized["error"]}
        assert f"at most {MAX_REQUEST_BYTES}" in oversized["error"]
        assert _raw_request(endpoint, pack_map({"cmd": "status"}, encoding), encoding)["status"] == {"run": 1}
        assert publisher.failure_ is None and publisher.control_errors_ == 0


def test_exceptions_while_answering_are_replies_not_a_dead_thread(caplog) -> None:
    calls = {"status": 0}

    def status() -> dict:
        calls["status"] += 1
        if calls["status"] == 1:
            raise RuntimeError("status source broke")
        if calls["status"] == 2:
            return {"path": Path("/x")}  # cannot be encoded
        return {"run": 1}

    def refuse(_request) -> bool:
        raise KeyError("queue gone")

    with ResultPublisher(PublishConfig(**LOOPBACK), "s", status=status, on_onset=refuse) as publisher:
        control = ControlClient(publisher.control_endpoint_)
        with pytest.raises(ProtocolError, match="internal error answering the request: RuntimeError: status source"):
            control.status()
        with pytest.raises(ProtocolError, match="internal error encoding the reply: TypeError"):
            control.status()
        with pytest.raises(ProtocolError, match="internal error answering the request: KeyError"):
            control.announce_onset("t1", 1.0)
        assert control.status()["status"] == {"run": 1}
        assert publisher.control_errors_ == 3 and publisher.failure_ is None
        publisher.check_alive()
        control.close()
    assert "Traceback" in caplog.text or any(r.exc_info for r in caplog.records)


class _Fatal(BaseException):
    """Stands for what no handler should swallow (SystemExit, KeyboardInterrupt)."""


def test_a_dead_control_thread_is_recorded_for_the_session() -> None:
    failures: list[BaseException] = []

    def status() -> dict:
        raise _Fatal("gone")

    with ResultPublisher(PublishConfig(**LOOPBACK), "s", status=status, on_failure=failures.append) as publisher:
        control = ControlClient(publisher.control_endpoint_, timeout_s=0.5)
        with pytest.raises(ProtocolError, match="no reply"):
            control.status()
        deadline = time.monotonic() + 5
        while publisher.failure_ is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert isinstance(publisher.failure_, _Fatal) and failures == [publisher.failure_]
        with pytest.raises(PublisherError, match="publish.control_address: the control thread stopped"):
            publisher.check_alive()
        control.close()


def _history(n: int, payload_bytes: int) -> list[Message]:
    return [Message("beta", "s", seq, {}, {"k": seq, "pad": b"\x00" * payload_bytes}) for seq in range(n)]


def test_resend_is_paged_and_the_client_follows_the_pages() -> None:
    config = PublishConfig(**LOOPBACK)
    with ResultPublisher(config, "s", next_seq=50, history=_history(50, 10), page_messages=8) as publisher:
        endpoint = publisher.control_endpoint_
        first = _raw_request(endpoint, pack_map({"cmd": "resend", "from_seq": 0}))
        assert [m["seq"] for m in first["messages"]] == list(range(8))
        assert first["more"] is True and first["next_seq"] == 8
        last = _raw_request(endpoint, pack_map({"cmd": "resend", "from_seq": 48}))
        assert [m["seq"] for m in last["messages"]] == [48, 49] and last["more"] is False
        control = ControlClient(endpoint)
        assert [m.seq for m in control.resend(0)] == list(range(50))
        assert [m.seq for m in control.resend(5, until_seq=21)] == list(range(5, 21))
        assert [len(page) for page in control.resend_pages(30)] == [8, 8, 4]
        assert len(control.last(1000)) == 8  # ``last`` is one page too
        control.close()


def test_resend_pages_stop_at_a_byte_budget() -> None:
    with ResultPublisher(
        PublishConfig(**LOOPBACK), "s", next_seq=10, history=_history(10, 10_000), page_bytes=25_000
    ) as publisher:
        reply = _raw_request(publisher.control_endpoint_, pack_map({"cmd": "resend", "from_seq": 0}))
        assert [m["seq"] for m in reply["messages"]] == [0, 1] and reply["more"] is True
        control = ControlClient(publisher.control_endpoint_)
        assert [m.seq for m in control.resend(0)] == list(range(10))
        control.close()


def test_resend_reads_only_one_page_from_the_journal() -> None:
    read: list[int] = []
    closed: list[bool] = []

    def older(from_seq: int):
        try:
            for seq in range(from_seq, 1000):
                read.append(seq)
                yield Message("beta", "s", seq, {}, {"k": seq})
        finally:
            closed.append(True)

    history = [Message("beta", "s", seq, {}, {"k": seq}) for seq in range(1000, 1005)]
    config = PublishConfig(**LOOPBACK, history_size=5)
    with ResultPublisher(
        config, "s", next_seq=1005, history=history, older_history=older, page_messages=10
    ) as publisher:
        control = ControlClient(publisher.control_endpoint_)
        reply = control.request("resend", from_seq=0)
        assert [m["seq"] for m in reply["messages"]] == list(range(10)) and reply["more"]
        assert len(read) <= 11 and closed == [True]
        assert [m.seq for m in control.resend(995)] == list(range(995, 1005))
        control.close()


def test_replies_a_client_does_not_read_are_bounded() -> None:
    """60 unread 1 MB replies used to queue in the session; now a client gets at most a few queued."""
    config = PublishConfig(**LOOPBACK)
    with ResultPublisher(
        config, "s", next_seq=30, history=_history(30, 100_000), page_bytes=1_000_000
    ) as publisher:
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.RCVHWM, 1)  # a client that does not read: its queue fills at once
        dealer.setsockopt(zmq.RCVBUF, 65536)
        dealer.connect(publisher.control_endpoint_)
        request = pack_map({"cmd": "resend", "from_seq": 0})
        for _ in range(60):
            dealer.send_multipart([b"", request])
        deadline = time.monotonic() + 20
        while publisher.dropped_replies_ < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert publisher.dropped_replies_ >= 30
        received = 0
        while dealer.poll(500):
            dealer.recv_multipart()
            received += 1
        assert received + publisher.dropped_replies_ == 60 and received < 30
        dealer.close()
        control = ControlClient(publisher.control_endpoint_)
        assert control.status()["next_seq"] == 30
        control.close()


@pytest.mark.parametrize(
    ("field", "address"),
    [
        ("control_address", "tcp://127.0.0.1:99999"),
        ("control_address", "tcp://127.0.0.1:0"),
        ("result_address", "tcp://127.0.0.1:-5"),
        ("result_address", "tcp://127.0.0.1"),
        ("control_address", "127.0.0.1:5556"),
    ],
)
def test_addresses_with_bad_ports_are_refused(field: str, address: str) -> None:
    config = PublishConfig(**{**LOOPBACK, field: address})
    with pytest.raises(ConfigError, match=f"publish.{field}: "):
        ResultPublisher(config, "s").start()


def test_status_messages_are_one_line_of_text() -> None:
    problem = FileProblem(Path("/scans/run-01/vol0007.nii"), 1.0, 2.0, VolumeError("vol0007.nii: header cut\noff"))
    with ResultPublisher(PublishConfig(**LOOPBACK), "s") as publisher:
        subscriber = ResultSubscriber(publisher.result_endpoint_)
        for _ in range(200):  # the PUB/SUB join handshake
            publisher.publish("status", {"state": "joining"}, {})
            if subscriber.receive(timeout_s=0.02) is not None:
                break
        while subscriber.receive(timeout_s=0.05) is not None:
            pass
        publisher.publish("status", {"state": "file_problem", "message": problem}, {})
        named = FileProblem(Path("/scans/v8.nii"), 1.0, 2.0, VolumeError("/scans/v8.nii: not complete yet"))
        publisher.publish("status", {"state": "file_problem", "message": named}, {})
        publisher.publish("status", {"state": "error", "message": ValueError("two\nlines")}, {})
        got = [subscriber.receive(timeout_s=2.0).data["message"] for _ in range(3)]
        subscriber.close()
    assert got == [
        "/scans/run-01/vol0007.nii: vol0007.nii: header cut off", "/scans/v8.nii: not complete yet", "two lines"
    ]


def test_errors_about_values_are_value_errors() -> None:
    from rtdecoder.errors import BundleError, DecoderError

    for error in (ConfigError, VolumeError, BundleError, SessionProtocolError):
        assert issubclass(error, ValueError) and issubclass(error, DecoderError)
    with pytest.raises(ValueError, match="publish.control_address"):
        ResultPublisher(PublishConfig(**{**LOOPBACK, "control_address": "tcp://127.0.0.1:99999"}), "s").start()


def test_json_round_trip_of_reply_is_plain() -> None:
    """A JSON client reads resend replies with nothing but the json module."""
    config = PublishConfig(**LOOPBACK, encoding="json")
    history = [Message("beta", "s", 0, {}, {"beta": np.zeros(2, np.float32)})]
    with ResultPublisher(config, "s", next_seq=1, history=history) as publisher:
        socket = zmq.Context.instance().socket(zmq.REQ)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(publisher.control_endpoint_)
        socket.send(json.dumps({"cmd": "resend", "from_seq": 0}).encode())
        assert socket.poll(5000)
        reply = json.loads(socket.recv())
        socket.close()
    assert reply["ok"] and reply["more"] is False and reply["next_seq"] == 1
    assert reply["messages"][0]["data"]["beta"]["__ndarray__"]["shape"] == [2]
