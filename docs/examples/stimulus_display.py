"""A PsychoPy stimulus script that shows each reconstruction as soon as it arrives.

    python stimulus_display.py --address tcp://127.0.0.1:5555

It subscribes to the ``decode`` topic only, decodes the PNG bytes in each message and draws the
reconstruction beside the top retrieved image id, without blocking the frame loop (the socket is
polled with a zero timeout once per frame). Needs PsychoPy (``pip install psychopy``), pyzmq,
msgpack, numpy and Pillow. Press Escape to quit.
"""

from __future__ import annotations

import argparse
import io

import msgpack
import numpy as np
import zmq
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="tcp://127.0.0.1:5555")
    args = parser.parse_args()

    from psychopy import core, event, visual  # imported here so --help works without PsychoPy

    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"decode")
    sub.connect(args.address)

    window = visual.Window(size=(900, 500), color="black", units="pix")
    caption = visual.TextStim(window, text="waiting for the first reconstruction", pos=(0, -220), height=18)
    picture = None
    clock = core.Clock()
    while "escape" not in event.getKeys():
        if sub.poll(0):
            _topic, body = sub.recv_multipart()
            data = msgpack.unpackb(body, raw=False)["data"]
            if data.get("image_png"):
                rgb = np.asarray(Image.open(io.BytesIO(data["image_png"])).convert("RGB"), dtype=np.float32)
                # PsychoPy wants values in [-1, 1] with the first row at the bottom.
                picture = visual.ImageStim(window, image=np.flipud(rgb / 127.5 - 1.0), size=(384, 384))
            top = (data.get("retrieval", {}).get("ids") or ["?"])[0]
            caption.text = f"trial {data.get('trial_id')}  top retrieval: {top}  ({clock.getTime():.1f} s)"
        if picture is not None:
            picture.draw()
        caption.draw()
        window.flip()
    sub.close()
    context.term()
    window.close()


if __name__ == "__main__":
    main()
