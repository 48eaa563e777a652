"""The stimulus side's client installs alone (no torch, no rtdecoder) and follows a live run gap-free,
joining late."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import venv
from pathlib import Path

import pytest
from test_session import FakeDecoder, _synthetic_run, _write
from test_session_runs import _published

from rtdecoder.session.runner import LiveSession, RunPlan

CLIENT_DIR = Path(__file__).resolve().parents[1] / "client"

FOLLOW = """
import json, sys
from rtdecoder_client import SessionFollower
for forbidden in ("torch", "rtdecoder"):
    try:
        __import__(forbidden)
    except ImportError:
        pass
    else:
        sys.exit(f"{forbidden} is importable: the client environment is not alone")
seen = []
with SessionFollower(sys.argv[1], sys.argv[2]) as follower:
    print("joined", flush=True)
    for message in follower:
        payload = message.payload  # every message reads as its topic's typed record
        seen.append([message.seq, message.topic, type(payload).__name__])
        if message.topic == "status" and payload.state == "run_end":
            break
print(json.dumps(seen))
"""


@pytest.fixture(scope="module")
def client_python(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("client-venv")
    venv.EnvBuilder(with_pip=True).create(folder)
    python = folder / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", str(CLIENT_DIR)], capture_output=True,
                          text=True, timeout=600)
    if done.returncode != 0:
        pytest.skip(f"could not install the client and its dependencies into a virtualenv: {done.stderr[-500:]}")
    return python


def test_client_installed_alone_follows_a_live_run_gap_free_joining_late(tmp_path, rng, client_python) -> None:
    volumes, affine, trials, bundle, _ = _synthetic_run(rng)
    watch, session_dir = tmp_path / "export", tmp_path / "session"
    watch.mkdir()
    session = LiveSession(bundle.config, bundle, session_dir, FakeDecoder())
    thread = threading.Thread(target=lambda: session.run(RunPlan("run-01", watch, 36, 1.6, trials)), daemon=True)
    thread.start()
    assert session.ready.wait(10)
    _write(volumes[..., :15], affine, watch)
    deadline = time.monotonic() + 30
    while len([m for m in _published(session_dir) if m["topic"] == "volume"]) < 15 and time.monotonic() < deadline:
        time.sleep(0.05)
    follower = subprocess.Popen(
        [str(client_python), "-c", FOLLOW, session.publisher.result_endpoint_, session.publisher.control_endpoint_],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,  # not beside the project's source
    )
    assert follower.stdout.readline().strip() == "joined", follower.stderr.read()
    from rtdecoder.phantom.scanner import volumes_from_array, write_run

    rest = [v for v in volumes_from_array(volumes, affine, 1.6, None, series="run-01") if v.index >= 15]
    write_run(rest, watch, format="nifti", tr_s=1.6, speed=80.0)
    out, err = follower.communicate(timeout=60)
    thread.join(30)
    assert follower.returncode == 0, err
    seen = json.loads(out.strip().splitlines()[-1])
    published = _published(session_dir)
    # every message from the session's first on, once each and in order, although it joined late
    assert [s for s, _, _ in seen] == [m["seq"] for m in published][: len(seen)] == list(range(len(seen)))
    assert seen[-1][1] == "status" and len(seen) == len(published)
    assert {(topic, kind) for _, topic, kind in seen} >= {("volume", "VolumeData"), ("beta", "BetaData"),
                                                        ("decode", "DecodeData"), ("status", "StatusData")}
