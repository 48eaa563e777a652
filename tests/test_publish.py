"""Protocol messages and the ZeroMQ publisher, with real sockets on loopback."""

from __future__ import annotations

import numpy as np
import pytest
from rtdecoder_client.client import ControlClient, ResultSubscriber
from rtdecoder_client.errors import ProtocolError
from rtdecoder_client.messages import SCHEMA_VERSION, Message, decode, encode, pack_map

from rtdecoder.config import PublishConfig
from rtdecoder.errors import ConfigError
from rtdecoder.publish.control import OnsetRequest
from rtdecoder.publish.keys import make_keys
from rtdecoder.publish.publisher import ResultPublisher

LOOPBACK = {"result_address": "tcp://127.0.0.1:*", "control_address": "tcp://127.0.0.1:*"}


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_message_round_trip_keeps_arrays_and_bytes(encoding: str) -> None:
    beta = np.arange(12, dtype=np.float32).reshape(3, 4)
    message = Message(
        "beta", "s1", 7, {"acquired": 1.0, "processed": 2.5}, {"trial_id": "r01-t003", "beta": beta, "png": b"\x89PNG"}
    )
    topic, body = encode(message, encoding)
    assert topic == b"beta"
    back = decode([topic, body], encoding)
    assert (back.topic, back.session, back.seq) == ("beta", "s1", 7)
    np.testing.assert_array_equal(back.data["beta"], beta)
    assert back.data["beta"].dtype == np.float32
    assert back.data["png"] == b"\x89PNG"
    assert back.t["acquired"] == 1.0 and back.t["published"] is None


def test_decode_rejects_other_schema_and_bad_bodies() -> None:
    raw = Message("status", "s", 0).to_dict()
    raw["schema"] = SCHEMA_VERSION + 1
    with pytest.raises(ProtocolError, match="schema: expected 1"):
        decode([b"status", pack_map(raw)])
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        decode([b"status", b"\xc1\xc1"])
    with pytest.raises(ProtocolError, match="frame says b'beta' but body says 'status'"):
        decode([b"beta", encode(Message("status", "s", 0))[1]])
    with pytest.raises(ProtocolError, match="topic: expected one of"):
        encode(Message("gossip", "s", 0))


def _connected_subscriber(publisher: ResultPublisher, **keys) -> ResultSubscriber:
    """Subscribe, then publish status pings until one arrives (the PUB/SUB join handshake)."""
    subscriber = ResultSubscriber(publisher.result_endpoint_, encoding=publisher.config.encoding, **keys)
    for _ in range(200):
        publisher.publish("status", {"state": "joining"}, {})
        if subscriber.receive(timeout_s=0.02) is not None:
            while subscriber.receive(timeout_s=0.05) is not None:
                pass
            return subscriber
    raise AssertionError("subscriber never received a ping")


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_publish_subscribe_and_history(encoding: str) -> None:
    config = PublishConfig(**LOOPBACK, encoding=encoding)
    with ResultPublisher(config, "session-a", status=lambda: {"run": 1}) as publisher:
        subscriber = _connected_subscriber(publisher)
        first = publisher.next_seq
        for i in range(5):
            publisher.publish("beta", {"trial_id": f"t{i}", "beta": np.full(3, i, np.float32)}, {"acquired": 1.0})
        got = [subscriber.receive(timeout_s=2.0) for _ in range(5)]
        assert [m.seq for m in got] == list(range(first, first + 5))
        assert all(m.t["published"] is not None for m in got)

        control = ControlClient(publisher.control_endpoint_, encoding=encoding)
        status = control.status()
        assert status["session"] == "session-a" and status["next_seq"] == first + 5
        assert status["status"] == {"run": 1}
        last_two = control.last(2, topic="beta")
        assert [m.data["trial_id"] for m in last_two] == ["t3", "t4"]
        resent = control.resend(first + 3)
        assert [m.seq for m in resent] == [first + 3, first + 4]
        np.testing.assert_array_equal(resent[0].data["beta"], np.full(3, 3, np.float32))
        with pytest.raises(ProtocolError, match="cmd: expected status"):
            control.request("explode")
        with pytest.raises(ProtocolError, match="'n' must be a non-negative integer"):
            control.request("last", n="all")
        control.close()
        subscriber.close()


def test_onset_requests_reach_the_session() -> None:
    onsets = []
    config = PublishConfig(**LOOPBACK)
    with ResultPublisher(config, "s", on_onset=lambda req: onsets.append(req) or True) as publisher:
        control = ControlClient(publisher.control_endpoint_)
        assert control.announce_onset("r01-t001", 4.8, "coffee-0001")
        with pytest.raises(ProtocolError, match="missing field 'onset_s'"):
            control.request("onset", trial_id="x")
        control.close()
    assert onsets == [OnsetRequest("r01-t001", 4.8, 0.0, "coffee-0001")]


def test_resend_reaches_back_into_older_history() -> None:
    older = [Message("beta", "s", seq, {}, {"k": seq}) for seq in range(3)]
    config = PublishConfig(**LOOPBACK, history_size=2)
    with ResultPublisher(
        config, "s", next_seq=5, history=[Message("beta", "s", s, {}, {"k": s}) for s in (3, 4)],
        older_history=lambda from_seq: [m for m in older if m.seq >= from_seq],
    ) as publisher:
        control = ControlClient(publisher.control_endpoint_)
        assert [m.seq for m in control.resend(1)] == [1, 2, 3, 4]
        control.close()


def test_curve_gives_unauthenticated_clients_nothing(tmp_path) -> None:
    keys = make_keys(tmp_path / "keys", ("lab",))
    stranger = make_keys(tmp_path / "stranger", ("other",))
    config = PublishConfig(
        **LOOPBACK,
        curve=True,
        server_secret_key_file=str(keys["server_secret"]),
        client_public_keys_dir=str(keys["authorized"]),
    )
    with ResultPublisher(config, "secure") as publisher:
        trusted = _connected_subscriber(
            publisher, client_secret_file=keys["lab_secret"], server_public_file=keys["server_public"]
        )
        untrusted = ResultSubscriber(
            publisher.result_endpoint_,
            client_secret_file=stranger["other_secret"],
            server_public_file=keys["server_public"],
        )
        plain = ResultSubscriber(publisher.result_endpoint_)
        for i in range(20):
            publisher.publish("beta", {"i": i}, {})
        assert trusted.receive(timeout_s=2.0) is not None
        assert untrusted.receive(timeout_s=0.3) is None
        assert plain.receive(timeout_s=0.3) is None
        refused = ControlClient(publisher.control_endpoint_, timeout_s=0.3)
        with pytest.raises(ProtocolError, match="no reply"):
            refused.status()
        allowed = ControlClient(
            publisher.control_endpoint_, client_secret_file=keys["lab_secret"], server_public_file=keys["server_public"]
        )
        assert allowed.status()["session"] == "secure"
        for client in (trusted, untrusted, plain, refused, allowed):
            client.close()


def test_curve_config_errors_name_the_field(tmp_path) -> None:
    with pytest.raises(ValueError, match="curve: true needs server_secret_key_file"):
        PublishConfig(curve=True)
    config = PublishConfig(
        **LOOPBACK, curve=True, server_secret_key_file=str(tmp_path / "none"), client_public_keys_dir=str(tmp_path)
    )
    with pytest.raises(ConfigError, match="publish.server_secret_key_file: no such file"):
        ResultPublisher(config, "s").start()


def test_bind_error_names_the_field() -> None:
    with pytest.raises(ConfigError, match="publish.result_address: cannot bind 'tcp://nowhere:1'"):
        ResultPublisher(PublishConfig(result_address="tcp://nowhere:1"), "s").start()


def test_keys_never_overwritten(tmp_path) -> None:
    make_keys(tmp_path)
    with pytest.raises(ConfigError, match="already exists"):
        make_keys(tmp_path)
