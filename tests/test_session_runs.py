"""A whole scanning session in one process: runs told apart, timing from the data, no bundle needed."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from nilearn.masking import compute_epi_mask
from rtdecoder_client.client import ControlClient, ResultSubscriber
from test_session import OVERRIDES, TR_S, _synthetic_run

from rtdecoder.config import load_config
from rtdecoder.errors import ConfigError, DecoderError
from rtdecoder.glm.events import Trial, write_events_tsv
from rtdecoder.phantom.scanner import replay_dicom_folder, volumes_from_array, write_run
from rtdecoder.session.journal import read_records
from rtdecoder.session.runner import JOURNAL_NAME, LiveSession, RunPlan


def _published(session_dir: Path) -> list[dict]:
    return [r["message"] for r in read_records(session_dir / JOURNAL_NAME) if r["kind"] == "published"]


def _write_nifti(volumes, affine, folder: Path, tr_s: float = TR_S, n: int | None = None) -> None:
    n = volumes.shape[3] if n is None else n
    write_run(list(volumes_from_array(volumes[..., :n], affine, tr_s, None)), folder, format="nifti", tr_s=tr_s,
              speed=80.0)


def _volume_indices(published: list[dict], run: str) -> list[int]:
    return [m["data"]["tr_index"] for m in published if m["topic"] == "volume" and m["data"]["run"] == run]


def test_a_tr_that_disagrees_with_the_volumes_stops_the_run_before_any_beta(tmp_path, rng) -> None:
    volumes, affine, trials, bundle, _ = _synthetic_run(rng)
    watch = tmp_path / "export"
    watch.mkdir()
    _write_nifti(volumes, affine, watch, tr_s=1.97)  # every sidecar says 1.97 s; the config says 1.6 s
    session = LiveSession(bundle.config, bundle, tmp_path / "session")
    with pytest.raises(ConfigError, match=r"says 1\.97 s \(sidecar\).*scanner\.tr_s is 1\.6 s"):
        session.run(RunPlan("run-01", watch, trials=trials))
    published = _published(tmp_path / "session")
    assert not [m for m in published if m["topic"] == "beta"]
    assert [m["data"]["state"] for m in published if m["topic"] == "status"][-1] == "error"


def test_the_volumes_tr_replaces_a_config_that_gave_none(tmp_path, rng) -> None:
    # Explicit --tr-s agrees with the volumes: used, and the events' design follows it.
    volumes, affine, trials, bundle, _ = _synthetic_run(rng)
    watch = tmp_path / "export"
    watch.mkdir()
    _write_nifti(volumes, affine, watch, tr_s=TR_S)
    summary = LiveSession(bundle.config, bundle, tmp_path / "session").run(RunPlan("run-01", watch, 36, TR_S, trials))
    assert summary.tr_s == TR_S and summary.n_volumes == 36
    starts = [m for m in _published(tmp_path / "session") if m["topic"] == "status"
              and m["data"]["state"] == "run_start"]
    assert starts[0]["data"]["tr_s"] == TR_S and "sidecar" in starts[0]["data"]["tr_source"]


def test_events_beyond_the_declared_run_are_refused_naming_the_tr(tmp_path, rng) -> None:
    volumes, affine, trials, bundle, _ = _synthetic_run(rng)
    watch = tmp_path / "export"
    watch.mkdir()
    _write_nifti(volumes, affine, watch)
    late = [*trials, Trial("late", 70.0, 3.0)]
    with pytest.raises(ConfigError, match=r"trial late starts at 70 s, after the run's end \(36 volumes x TR 1\.6"):
        LiveSession(bundle.config, bundle, tmp_path / "session").run(RunPlan("run-01", watch, 36, trials=late))


def test_four_runs_in_one_process_each_ended_by_another_rule(tmp_path, rng) -> None:
    volumes, affine, trials, bundle, _ = _synthetic_run(rng)
    config = load_config("phantom", overrides={**OVERRIDES, "session": {**OVERRIDES["session"], "idle_timeout_s": 1.5}})
    watch, session_dir = tmp_path / "export", tmp_path / "session"
    watch.mkdir()
    short = trials[:3]  # ends at 19 s: with run_tail_s 12 s, 20 volumes of the 36 written
    plans = [RunPlan("run-01", trials=short), RunPlan("run-02", trials=trials), RunPlan("run-03", trials=trials),
             RunPlan("run-04", trials=trials)]
    session = LiveSession(config, bundle, session_dir)
    outcome: dict = {}

    def serve() -> None:
        try:
            outcome["summaries"] = session.run_session(watch, plans, n_runs=4)
        except Exception as err:  # handed to the test thread
            outcome["error"] = err

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert session.ready.wait(10)
    _write_nifti(volumes, affine, watch / "series-1")
    _write_nifti(volumes, affine, watch / "series-2", n=30)  # its events last 36 volumes: the next series ends it
    _write_nifti(volumes, affine, watch / "series-3", n=20)
    deadline = time.monotonic() + 30
    while len(_volume_indices(_published(session_dir), "run-03")) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    control = ControlClient(session.publisher.control_endpoint_)
    assert control.request("run_end")["ok"]
    control.close()
    while not any(m["data"].get("state") == "run_end" and m["data"]["run"] == "run-03"
                  for m in _published(session_dir) if m["topic"] == "status") and time.monotonic() < deadline:
        time.sleep(0.05)
    _write_nifti(volumes, affine, watch / "series-3", n=24)  # the scanner goes on: run-03 has ended, ignored
    _write_nifti(volumes, affine, watch / "series-4", n=10)  # then stops: the idle timeout ends run-04
    thread.join(60)
    assert "error" not in outcome, outcome.get("error")
    summaries = outcome["summaries"]
    assert [s.end_reason for s in summaries] == ["events_end", "new_series", "run_end_request", "idle_timeout"]
    published = _published(session_dir)
    assert [m["seq"] for m in published] == list(range(len(published)))
    assert _volume_indices(published, "run-01") == list(range(20))
    assert _volume_indices(published, "run-02") == list(range(30))
    assert _volume_indices(published, "run-03") == list(range(20))
    assert _volume_indices(published, "run-04") == list(range(10))
    for run, expected in (("run-01", short), ("run-02", trials)):
        finals = [m["data"]["trial_id"] for m in published if m["topic"] == "beta" and m["data"]["run"] == run
                  and m["data"]["is_final"]]
        assert finals == [t.trial_id for t in expected]
    states = [(m["data"]["state"], m["data"]["run"]) for m in published if m["topic"] == "status"
              and m["data"]["state"] in ("run_start", "run_end")]
    assert states == [(s, f"run-0{n}") for n in range(1, 5) for s in ("run_start", "run_end")]


def test_a_restart_resumes_the_open_run_and_leaves_ended_runs_alone(tmp_path, rng) -> None:
    volumes, affine, trials, bundle, _ = _synthetic_run(rng)
    watch, session_dir = tmp_path / "export", tmp_path / "session"
    watch.mkdir()
    _write_nifti(volumes, affine, watch / "series-1")
    _write_nifti(volumes, affine, watch / "series-2", n=30)
    stop = threading.Event()
    session = LiveSession(bundle.config, bundle, session_dir)
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(s=session.run_session(watch, stop=stop, defaults=RunPlan(
        "", n_volumes=36))), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while len(_volume_indices(_published(session_dir), "run-02")) < 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(20)
    assert [s.run for s in outcome["s"]] == ["run-01"]
    statuses = [m["data"]["state"] for m in _published(session_dir) if m["topic"] == "status"]
    assert statuses[-1] == "stopped" and statuses.count("run_end") == 1

    _write_nifti(volumes, affine, watch / "series-2")  # the rest of run-02 arrives while nobody listens
    summaries = LiveSession(bundle.config, bundle, session_dir).run_session(
        watch, n_runs=2, defaults=RunPlan("", n_volumes=36))
    assert [(s.run, s.resumed_from_tr_index) for s in summaries] == [("run-02", 30)]
    published = _published(session_dir)
    assert [m["seq"] for m in published] == list(range(len(published)))
    assert _volume_indices(published, "run-01") == list(range(36))
    assert _volume_indices(published, "run-02") == list(range(36))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _front_end_config(tmp_path: Path, tr_s: float) -> tuple[Path, str]:
    result = f"tcp://127.0.0.1:{_free_port()}"
    overrides = {
        **OVERRIDES, "scanner": {"tr_s": tr_s},
        "publish": {"result_address": result, "control_address": f"tcp://127.0.0.1:{_free_port()}"},
        "session": {**OVERRIDES["session"], "idle_timeout_s": 2.0},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"preset": "phantom", **overrides}))
    return path, result


def test_run_without_a_bundle_publishes_volumes_qa_and_betas(tmp_path, rng) -> None:
    volumes, affine, trials, _bundle, _ = _synthetic_run(rng)
    watch, session_dir = tmp_path / "export", tmp_path / "session"
    watch.mkdir()
    write_events_tsv(trials, tmp_path / "sub-01_task-x_run-01_events.tsv")
    config_path, result_address = _front_end_config(tmp_path, TR_S)
    command = [sys.executable, "-m", "rtdecoder.cli", "run", "--config", str(config_path), "--watch", str(watch),
               "--session-dir", str(session_dir), "--events", str(tmp_path / "sub-01_task-x_run-01_events.tsv"),
               "--n-runs", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    subscriber = ResultSubscriber(result_address)
    try:
        deadline = time.monotonic() + 60
        while subscriber.receive(timeout_s=0.1) is None and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
        _write_nifti(volumes, affine, watch)
        received = []
        while time.monotonic() < deadline:
            message = subscriber.receive(timeout_s=0.5)
            if message is not None:
                received.append(message)
                if message.topic == "status" and message.data.get("state") == "run_end":
                    break
        out, err = process.communicate(timeout=30)
    finally:
        subscriber.close()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "run-01: 36 volumes (0 missing)" in out
    volume_messages = [m for m in received if m.topic == "volume"]
    assert [m.data["tr_index"] for m in volume_messages] == list(range(36))
    assert all(m.data["tsnr"] > 10 for m in volume_messages[3:])
    assert all(m.data["fd_mm"] is not None for m in volume_messages)
    finals = {m.data["trial_id"]: m.data["beta"] for m in received if m.topic == "beta" and m.data["is_final"]}
    assert sorted(finals) == [t.trial_id for t in trials]
    first_beta = next(m for m in received if m.topic == "beta")
    epi = compute_epi_mask(nib.Nifti1Image(volumes[..., 0].astype(np.float32), affine))
    assert first_beta.data["beta"].size == int(epi.get_fdata().sum())  # the session's own EPI mask
    assert not [m for m in received if m.topic == "decode"]


def test_real_dicom_series_replayed_through_run_front_end(tmp_path, real_dicom_dir) -> None:
    # A real Prisma series exported twice, each into a folder of its own, as two runs of one
    # process: every volume once and in order, the second run on the first one's reference.
    watch, session_dir = tmp_path / "export", tmp_path / "session"
    watch.mkdir()
    config_path, _ = _front_end_config(tmp_path, 3.2)
    session = LiveSession(load_config(config_path), None, session_dir)
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(s=session.run_session(watch, n_runs=2)), daemon=True)
    thread.start()
    assert session.ready.wait(10)
    for folder in ("series-a", "series-b"):
        replay_dicom_folder(real_dicom_dir / "prisma-mosaic-dcmqa" / "ep2d_Asc_2", watch / folder, speed=16.0)
    thread.join(60)
    assert not thread.is_alive()
    summaries = outcome["s"]
    assert [(s.run, s.n_volumes, s.n_missing, s.tr_s) for s in summaries] == [("run-01", 6, 0, 3.2),
                                                                            ("run-02", 6, 0, 3.2)]
    assert [s.end_reason for s in summaries] == ["new_series", "idle_timeout"]
    published = _published(session_dir)
    assert _volume_indices(published, "run-01") == list(range(6))
    assert _volume_indices(published, "run-02") == list(range(6))
    fd = np.array([[m["data"]["fd_mm"] for m in published if m["topic"] == "volume" and m["data"]["run"] == run]
                   for run in ("run-01", "run-02")])
    # Both exports of the series give the same motion trace, on the same (session) reference.
    assert np.all(np.isfinite(fd)) and np.allclose(fd[0], fd[1])
    assert fd[0, 3] == fd[1, 3] > 0 and np.all(fd[:, 0] == 0)  # FD of the reference volume: vs volume 2


def test_a_series_on_another_grid_stops_the_session_naming_both_grids(tmp_path, real_dicom_dir) -> None:
    # The interleaved series was prescribed elsewhere (10 mm away): it cannot share the reference.
    watch = tmp_path / "export"
    watch.mkdir()
    config_path, _ = _front_end_config(tmp_path, 3.2)
    prisma = real_dicom_dir / "prisma-mosaic-dcmqa"
    replay_dicom_folder(prisma / "ep2d_Asc_2", watch, speed=1000.0)
    replay_dicom_folder(prisma / "ep2d_Int_HF_5", watch, speed=1000.0)
    session = LiveSession(load_config(config_path), None, tmp_path / "session")
    with pytest.raises(DecoderError, match=r"IM-0004-0001\.dcm: affine: does not match .*largest difference"):
        session.run_session(watch, n_runs=2)
    statuses = [m["data"] for m in _published(tmp_path / "session") if m["topic"] == "status"]
    assert statuses[-1]["state"] == "error" and "IM-0004-0001.dcm" in statuses[-1]["message"]
    assert _volume_indices(_published(tmp_path / "session"), "run-01") == list(range(6))


def test_real_skyra_run_through_the_cli_without_a_bundle(tmp_path, real_dicom_dir) -> None:
    watch, session_dir = tmp_path / "export", tmp_path / "session"
    watch.mkdir()
    config_path, _ = _front_end_config(tmp_path, 1.5)
    command = [sys.executable, "-m", "rtdecoder.cli", "run", "--config", str(config_path), "--watch", str(watch),
               "--session-dir", str(session_dir), "--n-runs", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (session_dir / JOURNAL_NAME).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        replay_dicom_folder(real_dicom_dir / "skyra-mosaic-rtcloud", watch, speed=10.0)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    published = _published(session_dir)
    # volumes 0-9 (the truncated copy of volume 5 is not complete and never replaces it)
    assert _volume_indices(published, "run-01") == list(range(10))
    assert "ended by idle_timeout" in out


def test_the_first_volume_after_a_resume_measures_fd_from_the_last_journaled_motion(rng) -> None:
    from scipy import ndimage

    from rtdecoder.ingest.volume import Volume
    from rtdecoder.preprocess.mask import OnlineNormaliser, VoxelMask
    from rtdecoder.preprocess.motion import MotionCorrector
    from rtdecoder.session.frontend import FrontEnd

    volumes, affine, _trials, bundle, _ = _synthetic_run(rng)
    shifts_vox = [0.0, 0.0, 0.3, 0.3, 0.6, 0.6]  # the head moves along x between volumes 1-2 and 3-4
    moved = [ndimage.shift(volumes[..., i], (s, 0, 0), order=3, mode="nearest") for i, s in enumerate(shifts_vox)]

    def frontend() -> FrontEnd:
        motion = MotionCorrector(n_samples=2000).set_reference(bundle.reference, affine)
        mask = VoxelMask(bundle.mask, affine)
        normaliser = OnlineNormaliser.from_stats(bundle.signal_mean, bundle.signal_mean / 100.0)
        return FrontEnd(mask, None, normaliser, motion).start()

    def volume(i: int) -> Volume:
        return Volume(moved[i].astype(np.float32), affine, TR_S, i)

    whole = frontend()
    uninterrupted = [whole.process(volume(i)) for i in range(6)]
    resumed = frontend()
    for processed in uninterrupted[:4]:  # what the journal held when the process was killed
        resumed.replay(processed.tr_index, processed.values, processed.motion.params)
    after = resumed.process(volume(4))
    assert uninterrupted[4].motion.fd_mm > 0.5
    assert after.motion.fd_mm == pytest.approx(uninterrupted[4].motion.fd_mm, rel=1e-3)
