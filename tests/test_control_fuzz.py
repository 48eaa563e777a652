"""A seeded fuzz of a live session's control socket, in both encodings: every request is answered,
nothing reaches the session unchecked, and the session answers a health check afterwards.

``RTDECODER_FUZZ_N`` sets the number of requests per encoding (default 300, about 2 s each).
"""

from __future__ import annotations

import json
import os
import threading

import msgpack
import numpy as np
import pytest
import zmq
from rtdecoder_client.client import ControlClient
from test_session import OVERRIDES, _synthetic_run

from rtdecoder.config import load_config
from rtdecoder.session.runner import LiveSession

N_REQUESTS = int(os.environ.get("RTDECODER_FUZZ_N", "300"))
COMMANDS = ["status", "last", "resend", "onset", "run_start", "run_end", "shutdown", "", None, 7]
FIELDS = ["n", "topic", "from_seq", "until_seq", "trial_id", "onset_s", "duration_s", "stim_id", "run", "cmd", "x"]


def _value(rng: np.random.Generator, depth: int = 0):
    kind = rng.integers(0, 11 if depth < 3 else 8)
    if kind == 0:
        return int(rng.integers(-2**63, 2**63 - 1))
    if kind == 1:
        return float(rng.choice([np.nan, np.inf, -np.inf, 1e300, -0.0, rng.normal() * 100]))
    if kind == 2:
        return "".join(chr(int(c)) for c in rng.integers(0, 0x2FF, rng.integers(0, 40)))
    if kind == 3:
        return None
    if kind == 4:
        return bool(rng.integers(0, 2))
    if kind == 5:
        return "x" * int(rng.integers(100, 5000))
    if kind == 6:
        return int(rng.integers(0, 100))
    if kind == 7:
        return float(rng.uniform(0, 300))
    if kind == 8:
        return [_value(rng, depth + 1) for _ in range(rng.integers(0, 5))]
    if kind == 9:
        return {str(_value(rng, depth + 1))[:10]: _value(rng, depth + 1) for _ in range(rng.integers(0, 4))}
    return rng.bytes(int(rng.integers(0, 50)))


def _request(rng: np.random.Generator, encoding: str) -> bytes:
    roll = rng.random()
    if roll < 0.1:
        return rng.bytes(int(rng.integers(0, 200)))  # not a request at all
    if roll < 0.15:
        return (b"[" if encoding == "json" else b"\x91") * int(rng.integers(1000, 200000))  # nesting
    request = {"cmd": COMMANDS[rng.integers(0, len(COMMANDS))]}
    for key in rng.choice(FIELDS, size=rng.integers(0, 5), replace=False):
        request[str(key)] = _value(rng)
    if encoding == "json":
        body = json.dumps(request, default=lambda v: v.hex() if isinstance(v, bytes) else str(v)).encode()
    else:
        body = msgpack.packb(request, use_bin_type=True)
    return body[: int(rng.integers(1, len(body) + 1))] if rng.random() < 0.1 else body


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_control_socket_fuzz_every_request_answered_and_the_session_lives(tmp_path, encoding: str) -> None:
    rng = np.random.default_rng(20261201 + len(encoding))
    _, _, _, bundle, _ = _synthetic_run(rng)
    config = load_config("phantom", overrides={**OVERRIDES, "publish": {**OVERRIDES["publish"], "encoding": encoding}})
    watch = tmp_path / "export"
    watch.mkdir()
    stop = threading.Event()
    session = LiveSession(config, bundle, tmp_path / "session")
    outcome: dict = {}

    def serve() -> None:
        try:
            outcome["summaries"] = session.run_session(watch, stop=stop)
        except Exception as err:  # handed to the test thread
            outcome["error"] = err

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert session.ready.wait(10)
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.connect(session.publisher.control_endpoint_)
    unanswered = []
    try:
        for number in range(N_REQUESTS):
            body = _request(rng, encoding)
            socket.send_multipart([b"", body])
            if not socket.poll(5000):
                unanswered.append((number, body[:60]))
                break
            frames = socket.recv_multipart()
            reply = json.loads(frames[-1]) if encoding == "json" else msgpack.unpackb(frames[-1], raw=False)
            assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
    finally:
        socket.close(linger=0)
    assert not unanswered, unanswered
    control = ControlClient(session.publisher.control_endpoint_, encoding=encoding)
    assert control.status()["ok"]
    control.close()
    assert session.publisher.failure_ is None
    stop.set()
    thread.join(20)
    assert "error" not in outcome, outcome.get("error")
