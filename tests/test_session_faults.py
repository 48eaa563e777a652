"""What ends a session from outside, and how it says so: signals, full disks, hostile input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from rtdecoder_client.client import ResultSubscriber
from rtdecoder_client.errors import ProtocolError
from test_session import _synthetic_run, _write
from test_session_runs import _front_end_config, _published, _volume_indices

from rtdecoder.errors import JournalError
from rtdecoder.glm.events import write_events_tsv
from rtdecoder.session.journal import read_records
from rtdecoder.session.runner import JOURNAL_NAME, LiveSession, RunPlan


def test_sigterm_stops_the_session_without_ending_the_run_and_a_restart_resumes(tmp_path, rng) -> None:
    volumes, affine, trials, _, _ = _synthetic_run(rng)
    watch, session_dir = tmp_path / "export", tmp_path / "session"
    watch.mkdir()
    write_events_tsv(trials, tmp_path / "events.tsv")
    config_path, _ = _front_end_config(tmp_path, 1.6)
    command = [sys.executable, "-m", "rtdecoder.cli", "run", "--config", str(config_path), "--watch", str(watch),
               "--session-dir", str(session_dir), "--events", str(tmp_path / "events.tsv"), "--n-volumes", "36",
               "--n-runs", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (session_dir / JOURNAL_NAME).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    _write(volumes[..., :20], affine, watch)
    while len(_volume_indices(_published(session_dir), "run-01")) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=30)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "stopped by signal" in err
    records = read_records(session_dir / JOURNAL_NAME)
    assert not [r for r in records if r["kind"] == "run_end"]
    statuses = [m["data"]["state"] for m in _published(session_dir) if m["topic"] == "status"]
    assert statuses[-1] == "stopped" and "run_end" not in statuses

    _write(volumes, affine, watch)  # the rest of the run arrives; a restart takes it up
    process = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    published = _published(session_dir)
    assert [m["seq"] for m in published] == list(range(len(published)))
    assert _volume_indices(published, "run-01") == list(range(36))
    assert [m["data"]["state"] for m in published if m["topic"] == "status"].count("run_end") == 1


def test_a_full_disk_stops_the_session_with_an_error_the_subscribers_get(tmp_path, rng) -> None:
    volumes, affine, trials, bundle, _ = _synthetic_run(rng)
    watch = tmp_path / "export"
    watch.mkdir()
    session = LiveSession(bundle.config, bundle, tmp_path / "session")
    outcome: dict = {}

    def serve() -> None:
        try:
            session.run(RunPlan("run-01", watch, 36, trials=trials))
        except Exception as err:  # handed to the test thread
            outcome["error"] = err

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert session.ready.wait(10)
    subscriber = ResultSubscriber(session.publisher.result_endpoint_)
    while subscriber.receive(timeout_s=0.1) is None:
        pass
    _write(volumes[..., :10], affine, watch)
    deadline = time.monotonic() + 30
    while len(_volume_indices(_published(tmp_path / "session"), "run-01")) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    # From here on every write fails as on a full disk: the kernel's /dev/full answers ENOSPC.
    session._journal._file = open("/dev/full", "wb", buffering=0)  # noqa: SIM115
    _write(volumes[..., 10:12], affine, watch)
    thread.join(30)
    assert isinstance(outcome.get("error"), JournalError)
    assert "No space left on device" in str(outcome["error"]) and "--session-dir" in str(outcome["error"])
    messages = []
    while (message := subscriber.receive(timeout_s=0.5)) is not None:
        messages.append(message)
    errors = [m for m in messages if m.topic == "status" and m.data["state"] == "error"]
    assert errors and "No space left on device" in errors[-1].data["message"]
    assert errors[-1].data["journaled"] is False
    subscriber.close()


def test_binary_or_misplaced_inputs_are_one_line_errors(tmp_path) -> None:
    garbage = bytes(np.random.default_rng(0).integers(128, 256, 300, dtype=np.uint8))
    (tmp_path / "config.yaml").write_bytes(garbage)
    (tmp_path / "events.tsv").write_bytes(garbage)
    (tmp_path / "export").mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "cfg").mkdir()
    config_path, _ = _front_end_config(tmp_path / "cfg", 1.6)
    cases = {
        ("--config", str(tmp_path / "config.yaml")): "not text; expected a YAML config file",
        ("--events", str(tmp_path / "events.tsv")): "not text; expected a tab-separated BIDS events.tsv",
        ("--session-dir", str(tmp_path / "a-file")): "cannot open the session journal",
    }
    for (flag, value), expected in cases.items():
        args = {"--config": str(config_path), "--session-dir": str(tmp_path / "session"), flag: value}
        command = [sys.executable, "-m", "rtdecoder.cli", "run", "--watch", str(tmp_path / "export"), "--n-runs", "1"]
        for key, item in args.items():
            command += [key, item]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1, (flag, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rtdecoder: error:") and expected in lines[0], lines


def test_one_run_survives_every_kind_of_hostile_input(tmp_path, rng, real_dicom_dir) -> None:
    import shutil

    import nibabel as nib
    import zmq
    from rtdecoder_client.client import ControlClient
    from test_session import OVERRIDES, FakeDecoder

    from rtdecoder.config import load_config
    from rtdecoder.phantom.scanner import volumes_from_array, write_run

    volumes, affine, trials, bundle, _ = _synthetic_run(rng)
    watch, session_dir = tmp_path / "export", tmp_path / "session"
    watch.mkdir()
    config = load_config("phantom", overrides={**OVERRIDES, "publish": {**OVERRIDES["publish"], "encoding": "json"}})
    session = LiveSession(config, bundle, session_dir, FakeDecoder())
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(s=session.run(RunPlan("run-01", watch, 36, 1.6, trials))),
                              daemon=True)
    thread.start()
    assert session.ready.wait(10)
    control = ControlClient(session.publisher.control_endpoint_, encoding="json")
    _write(volumes[..., :7], affine, watch)
    # 1. a NaN volume in the place of volume 7
    nan_volume = np.full(volumes.shape[:3], np.nan, np.float32)
    image = nib.Nifti1Image(nan_volume, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.header["pixdim"][4] = 1.6
    nib.save(image, str(watch / "vol_00007.nii"))
    # 2. a malformed DICOM, 3. a stray volume of another series (a real Skyra file, volume 4)
    # A malformed header value, as fuzzing found: PixelSpacing (0028,0030) '3\\3 ' becomes '3\\Q '.
    raw = (real_dicom_dir / "skyra-mosaic-rtcloud" / "001_000013_000003.dcm").read_bytes()
    spacing = b"(\x000\x00DS\x04\x003\\3 "
    assert raw.count(spacing) == 1
    (watch / "broken.dcm").write_bytes(raw.replace(spacing, spacing[:-2] + b"Q "))
    shutil.copy(real_dicom_dir / "skyra-mosaic-rtcloud" / "001_000013_000005.dcm", watch / "stray.dcm")
    # 4. a bad onset request, 5. a deeply nested JSON request
    with pytest.raises(ProtocolError, match="field 'onset_s': expected a finite number"):
        control.request("onset", trial_id="x1", onset_s="abc")
    raw = zmq.Context.instance().socket(zmq.REQ)
    raw.connect(session.publisher.control_endpoint_)
    raw.send(b"[" * 100000)
    assert raw.poll(5000) and json.loads(raw.recv())["ok"] is False
    raw.close(linger=0)
    assert control.status()["ok"]  # the control thread lives on
    control.close()
    rest = [v for v in volumes_from_array(volumes, affine, 1.6, None, series="run-01") if v.index >= 8]
    write_run(rest, watch, format="nifti", tr_s=1.6, speed=80.0)
    thread.join(60)
    assert not thread.is_alive() and "s" in outcome
    published = _published(session_dir)
    assert [m["seq"] for m in published] == list(range(len(published)))
    volume_messages = [m["data"] for m in published if m["topic"] == "volume"]
    assert [v["tr_index"] for v in volume_messages] == list(range(36))
    assert [v["tr_index"] for v in volume_messages if v["missing"]] == [7]
    problems = " ".join(m["data"]["message"] for m in published if m["topic"] == "status"
                        and m["data"]["state"] == "file_problem")
    assert "vol_00007.nii" in problems and "non-finite" in problems
    assert "broken.dcm" in problems and "stray.dcm" in problems
    for name in ("vol_00007.nii", "broken.dcm", "stray.dcm"):  # each reported once, not once per file event
        assert problems.count(f"{name}:") == 1, (name, problems)
    firsts = {m["data"]["trial_id"] for m in published if m["topic"] == "beta" and not m["data"]["is_update"]
              and not m["data"]["is_final"]}
    assert firsts == {t.trial_id for t in trials}
    assert {m["data"]["trial_id"] for m in published if m["topic"] == "decode"} == firsts
