"""Print every result an rtdecoder session publishes (plain pyzmq + msgpack, nothing else).

    python subscriber.py --address tcp://127.0.0.1:5555 --control tcp://127.0.0.1:5556

The wire format is in docs/protocol.md: two frames, [topic, msgpack body]. A gap in the sequence
numbers (a late join, a dropped connection) is filled by asking the control socket to resend,
one page at a time.
"""

from __future__ import annotations

import argparse

import msgpack
import numpy as np
import zmq


def unpack(body: bytes) -> dict:
    def arrays(obj: dict):
        if set(obj) == {"__ndarray__"}:
            spec = obj["__ndarray__"]
            return np.frombuffer(spec["data"], dtype=spec["dtype"]).reshape(spec["shape"])
        return obj

    return msgpack.unpackb(body, raw=False, object_hook=arrays)


def describe(message: dict) -> str:
    data = message["data"]
    topic = message["topic"]
    if topic == "volume":
        return f"volume run {data.get('run')} tr {data.get('tr_index')} fd {data.get('fd_mm')} mm"
    if topic == "beta":
        kind = "update" if data.get("is_update") else "first"
        return f"beta {data.get('trial_id')} ({kind}) at tr {data.get('tr_index')}"
    if topic == "decode":
        top = data.get("retrieval", {}).get("ids", [])[:3]
        image = "image" if data.get("image_png") else f"no image ({data.get('reconstruction')})"
        return f"decode {data.get('trial_id')}: top-3 {top}, {image}"
    return f"status {data.get('state')}: {data.get('message', '')}"


def fill_gap(control: zmq.Socket, from_seq: int, until_seq: int) -> None:
    """Print the messages from_seq .. until_seq - 1, asking the control socket page by page."""
    while from_seq < until_seq:
        control.send(msgpack.packb({"cmd": "resend", "from_seq": from_seq, "until_seq": until_seq}))
        reply = unpack(control.recv())
        if not reply.get("ok"):
            print("(resend refused:", reply.get("error"), ")")
            return
        for missed in reply["messages"]:
            print("(resent)", describe(missed))
        if not reply.get("more"):  # the session has nothing more before until_seq
            return
        from_seq = reply["next_seq"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="tcp://127.0.0.1:5555")
    parser.add_argument("--control", default="tcp://127.0.0.1:5556")
    args = parser.parse_args()

    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(args.address)
    control = context.socket(zmq.REQ)
    control.setsockopt(zmq.LINGER, 0)
    control.connect(args.control)

    expected_seq = None
    try:
        while True:
            _topic, body = sub.recv_multipart()
            message = unpack(body)
            if expected_seq is not None and message["seq"] > expected_seq:
                fill_gap(control, expected_seq, message["seq"])
            print(f"#{message['seq']}", describe(message))
            expected_seq = message["seq"] + 1
    except KeyboardInterrupt:
        pass
    finally:
        sub.close()
        control.close()
        context.term()


if __name__ == "__main__":
    main()
