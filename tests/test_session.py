"""The live session end to end, with real files, a real watcher and real sockets."""

from __future__ import annotations

import gc
import io
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import yaml
from rtdecoder_client.client import ResultSubscriber
from scipy import ndimage

from rtdecoder.bundle import SubjectBundle
from rtdecoder.config import load_config
from rtdecoder.decode.protocol import Decoded
from rtdecoder.errors import BundleError
from rtdecoder.glm.design import trial_regressors
from rtdecoder.glm.events import Trial, write_events_tsv
from rtdecoder.glm.hrf import canonical_hrf
from rtdecoder.phantom.scanner import FaultPlan, volumes_from_array, write_run
from rtdecoder.session import runner as runner_module
from rtdecoder.session.journal import read_records
from rtdecoder.session.report import write_report
from rtdecoder.session.runner import JOURNAL_NAME, LiveSession, RunPlan

TR_S = 1.6
N_VOLUMES = 36
GRID = (18, 20, 14)
OVERRIDES = {
    # Runs of 36 volumes: the default release gate (glm.min_residual_dof) would hold every first beta
    # to volume 31; these tests are about faults and delivery, so betas come as soon as estimable.
    "glm": {"hrf": "canonical", "beta_wait_s": 6.0, "min_residual_dof": 0},
    "ingest": {"watch_mode": "inotify", "missing_volume_wait_s": 0.3},
    "publish": {"result_address": "tcp://127.0.0.1:*", "control_address": "tcp://127.0.0.1:*"},
    "session": {"idle_timeout_s": 5.0, "heartbeat_s": 0.05, "max_decode_backlog": 1},
}


def _synthetic_run(rng: np.random.Generator):
    """A small brain-like volume with trial responses in a block of 'visual' voxels."""
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = -np.array(GRID) * 1.5
    reference = ndimage.gaussian_filter(rng.random(GRID), 2.0)
    reference = (1000 * (reference - reference.min()) / np.ptp(reference) + 200).astype(np.float32)
    mask = np.zeros(GRID, bool)
    mask[6:12, 6:14, 4:10] = True
    # stim ids are FakeDecoder's two candidates, so every decode carries the shown image's rank
    trials = [Trial(f"t{i:02d}", 3.2 + 6.4 * i, 3.0, stim_id=("up", "down")[i % 2]) for i in range(7)]
    frame_times = np.arange(N_VOLUMES) * TR_S
    regressors = trial_regressors(trials, frame_times, canonical_hrf("glover", TR_S), 50)  # (T, n_trials)
    true_betas = rng.normal(0, 2.0, (len(trials), int(mask.sum())))
    psc = regressors @ true_betas + rng.normal(0, 0.5, (N_VOLUMES, int(mask.sum())))
    volumes = np.repeat(reference[..., None], N_VOLUMES, axis=3)
    volumes[mask] *= 1 + psc.T / 100.0
    bundle = SubjectBundle(
        subject_id="sub-test", config=load_config("phantom", overrides=OVERRIDES), mask=mask, affine=affine,
        reference=reference, signal_mean=reference[mask], beta_mean=np.zeros(int(mask.sum()), np.float32),
        beta_std=np.ones(int(mask.sum()), np.float32), hrf_index=np.zeros(int(mask.sum()), np.int32),
    )
    return volumes, affine, trials, bundle, true_betas


class FakeDecoder:
    """Ranks two candidates by the sign of the beta mean; draws a PNG; optionally slow."""

    def __init__(self, reconstruct_s: float = 0.0, hold_until=None) -> None:
        self.reconstruct_s = reconstruct_s
        self.hold_until = hold_until

    def retrieve(self, beta: np.ndarray, top_k: int, shown_id: str | None = None) -> Decoded:
        score = float(np.mean(beta))
        ids = ["up", "down"] if score > 0 else ["down", "up"]
        rank = ids.index(shown_id) + 1 if shown_id in ids else None
        return Decoded(ids[:top_k], [abs(score), -abs(score)][:top_k], 0.1, state=score, n_candidates=2,
                       shown_rank=rank)

    def reconstruct(self, decoded: Decoded, seed: int) -> bytes:
        from PIL import Image

        time.sleep(self.reconstruct_s)
        deadline = time.monotonic() + 20
        while self.hold_until is not None and not self.hold_until() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.hold_until = None
        buffer = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), seed % 255, np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()


def _start(session: LiveSession, plan: RunPlan):
    result: dict = {}

    def target() -> None:
        try:
            result["summary"] = session.run(plan)
        except Exception as err:  # handed to the test thread
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    assert session.ready.wait(10)
    return thread, result


def _subscribe(session: LiveSession) -> ResultSubscriber:
    subscriber = ResultSubscriber(session.publisher.result_endpoint_)
    for _ in range(400):  # heartbeats arrive every 50 ms once the subscription is through
        if subscriber.receive(timeout_s=0.05) is not None:
            return subscriber
    raise AssertionError("no heartbeat reached the subscriber")


def _collect(subscriber: ResultSubscriber, timeout_s: float = 60.0) -> list:
    messages, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = subscriber.receive(timeout_s=0.5)
        if message is None:
            continue
        messages.append(message)
        if message.topic == "status" and message.data.get("state") == "run_end":
            return messages
    raise AssertionError(f"no run_end within {timeout_s} s; got {len(messages)} messages")


def _write(volumes, affine, folder: Path, faults: FaultPlan | None = None) -> None:
    write_run(list(volumes_from_array(volumes, affine, TR_S, None, series="run-01")), folder, format="nifti",
              tr_s=TR_S, speed=80.0, faults=faults)


def test_end_to_end_with_faults_every_result_arrives(tmp_path, rng) -> None:
    volumes, affine, trials, bundle, true_betas = _synthetic_run(rng)
    watch = tmp_path / "export"
    watch.mkdir()
    session = LiveSession(bundle.config, bundle, tmp_path / "session", FakeDecoder())
    plan = RunPlan("run-01", watch, N_VOLUMES, TR_S, trials)
    thread, result = _start(session, plan)
    subscriber = _subscribe(session)
    _write(volumes, affine, watch, FaultPlan(drop=(10,), duplicate=(5,), swap=((20, 21),)))
    messages = _collect(subscriber)
    thread.join(30)
    assert "error" not in result, result.get("error")
    seqs = [m.seq for m in messages]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a message was lost or duplicated"

    volume_messages = [m for m in messages if m.topic == "volume"]
    assert [m.data["tr_index"] for m in volume_messages] == list(range(N_VOLUMES))
    assert [m.data["tr_index"] for m in volume_messages if m.data["missing"]] == [10]
    for m in volume_messages:
        if not m.data["missing"]:
            assert m.t["file_complete"] <= m.t["processed"] <= m.t["published"]

    first = {m.data["trial_id"]: m for m in messages if m.topic == "beta" and not m.data["is_update"]
             and not m.data["is_final"]}
    final = {m.data["trial_id"]: m for m in messages if m.topic == "beta" and m.data["is_final"]}
    assert set(first) == set(final) == {t.trial_id for t in trials}
    estimated = np.stack([final[t.trial_id].data["beta"] for t in trials])
    assert np.corrcoef(estimated.ravel(), true_betas.ravel())[0, 1] > 0.5

    decodes = [m for m in messages if m.topic == "decode"]
    assert sorted(m.data["trial_id"] for m in decodes) == sorted(first)
    assert all(m.data["reconstruction"] == "done" and m.data["image_png"].startswith(b"\x89PNG") for m in decodes)
    for m in decodes:
        retrieval = m.data["retrieval"]
        assert retrieval["n_candidates"] == 2
        assert retrieval["shown_rank"] == retrieval["ids"].index(m.data["stim_id"]) + 1
    assert result["summary"].n_missing == 1
    subscriber.close()

    figures = write_report(tmp_path / "session", "run-01", tmp_path / "report.html", TR_S)
    assert (figures["volumes"], figures["missing"], figures["decoded"]) == (N_VOLUMES - 1, 1, len(trials))
    assert figures["volume_latency_ms_median"] > 0
    ranks = [m.data["retrieval"]["shown_rank"] for m in decodes]
    assert figures["shown_rank_median"] == np.median(ranks)
    assert figures["retrieval_top1"] == np.mean(np.array(ranks) == 1)
    assert (figures["retrieval_candidates"], figures["retrieval_chance_top1"], figures["shown_rank_chance_median"]) \
        == (2, 0.5, 1.5)
    page = (tmp_path / "report.html").read_text()
    assert page.count("<img") >= 4 + len(trials)


def test_report_figures_read_as_numbers_without_exponents() -> None:
    from rtdecoder.session.report import format_figure

    # the demo's report had shown a decode p95 of 1,412 ms as "1.41e+03" and chance as "1.5e+03"
    assert [format_figure(v) for v in (1412.4485, 1500.5, 3000.0, 861.156, 21.3379, 0.000333, None, 62)] == \
        ["1,412.4", "1,500.5", "3,000", "861", "21.3", "0.000333", "-", "62"]


def test_the_demos_printout_gives_the_live_figures_as_a_table() -> None:
    from rtdecoder.session.report import format_figures

    # the demo printed its live figures as one long Python dict, unrounded
    scores = {"image_top1": 0.2097, "image_top5": 0.5323, "brain_top1": 0.2419, "brain_top5": 0.5323}
    entry = {"n_trials": 62, "after_onset_s_median": 8.8, "run": scores | {"pool_size_mean": 60.0},
             "test_set": scores | {"image_pool_size": 300, "brain_pool_size": 22}}
    text = format_figures({"decode_latency_ms_p95": 1412.4485611915584, "volumes": 166,
                           "live": {stage: entry for stage in ("fast", "slow", "end_of_run")}})
    lines = text.splitlines()
    assert lines[0].split() == ["decode_latency_ms_p95", "1,412.4"] and lines[1].split() == ["volumes", "166"]
    assert lines[2].startswith("live figures, single trials")
    assert [line.split()[0] for line in lines[4:]] == ["fast", "slow", "end_of_run"]
    assert "21.0 /  53.2 /  24.2 /  53.2" in lines[4] and "{" not in text


class _Holder:
    pass


def test_release_freed_memory_frees_reference_cycles_now() -> None:
    # A finished run leaves cycles (session <-> publisher callbacks, message history); they must be
    # freed between runs, not whenever Python's collector next runs a full collection.
    gc.disable()
    try:
        holder = _Holder()
        holder.self_reference = holder
        holder.payload = np.zeros(1000)
        alive = weakref.ref(holder)
        del holder
        assert alive() is not None
        runner_module.release_freed_memory()
        assert alive() is None
    finally:
        gc.enable()


def test_slow_decoder_skips_reconstructions_not_retrievals(tmp_path, rng, monkeypatch) -> None:
    released = []
    monkeypatch.setattr(runner_module, "release_freed_memory", lambda: released.append(True) or True)
    volumes, affine, trials, bundle, _ = _synthetic_run(rng)
    watch = tmp_path / "export"
    watch.mkdir()
    _write(volumes, affine, watch)  # everything is there at once: betas pile up
    decoder = FakeDecoder()
    session = LiveSession(bundle.config, bundle, tmp_path / "session", decoder)
    # The first reconstruction takes until three more betas wait: a decoder that fell behind.
    decoder.hold_until = lambda: session._decode_queue.qsize() >= 3
    summary = session.run(RunPlan("run-01", watch, N_VOLUMES, TR_S, trials))
    records = read_records(tmp_path / "session" / JOURNAL_NAME)
    decodes = [r["message"]["data"] for r in records if r["kind"] == "published" and r["message"]["topic"] == "decode"]
    assert sorted(d["trial_id"] for d in decodes) == [t.trial_id for t in trials]
    assert all(d["retrieval"]["ids"] for d in decodes)
    states = {d["reconstruction"] for d in decodes}
    assert "skipped_backlog" in states
    assert summary.n_skipped_reconstructions == sum(d["reconstruction"] == "skipped_backlog" for d in decodes) > 0
    assert released == [True]  # a run's freed memory goes back to the system when it ends


def test_bundle_that_does_not_match_the_volumes_is_refused(tmp_path, rng) -> None:
    volumes, affine, trials, bundle, _ = _synthetic_run(rng)
    watch = tmp_path / "export"
    watch.mkdir()
    _write(volumes[:, :, :-1], affine, watch)
    session = LiveSession(bundle.config, bundle, tmp_path / "session")
    with pytest.raises(BundleError, match=r"grid \(18, 20, 13\) does not match the bundle's mask grid"):
        session.run(RunPlan("run-01", watch, N_VOLUMES, TR_S, trials))


def _published(session_dir: Path) -> list[dict]:
    return [r["message"] for r in read_records(session_dir / JOURNAL_NAME) if r["kind"] == "published"]


def test_sigkill_and_resume_loses_and_duplicates_nothing(tmp_path, rng) -> None:
    volumes, affine, trials, bundle, _ = _synthetic_run(rng)
    watch, session_dir = tmp_path / "export", tmp_path / "session"
    watch.mkdir()
    bundle.save(tmp_path / "bundle")
    write_events_tsv(trials, tmp_path / "events.tsv")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump({"preset": "phantom", **OVERRIDES}))
    command = [
        sys.executable, "-m", "rtdecoder.cli", "run", "--config", str(config_path),
        "--bundle", str(tmp_path / "bundle"),
        "--watch", str(watch), "--session-dir", str(session_dir), "--events", str(tmp_path / "events.tsv"),
        "--n-volumes", str(N_VOLUMES), "--no-decode",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    writer = threading.Thread(target=_write, args=(volumes, affine, watch))
    deadline = time.monotonic() + 60
    while not (session_dir / JOURNAL_NAME).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    writer.start()
    while time.monotonic() < deadline:
        done = [m for m in _published(session_dir) if m["topic"] == "volume"]
        if len(done) >= 15:
            break
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    writer.join()
    killed_at = len([m for m in _published(session_dir) if m["topic"] == "volume"])
    assert 15 <= killed_at < N_VOLUMES, "the kill should land mid-run"

    config = load_config(config_path)
    summary = LiveSession(config, SubjectBundle.load(tmp_path / "bundle"), session_dir).run(
        RunPlan("run-01", watch, N_VOLUMES, TR_S, trials)
    )
    assert summary.resumed_from_tr_index >= 15
    published = _published(session_dir)
    assert [m["seq"] for m in published] == list(range(len(published)))
    assert len({m["session"] for m in published}) == 1
    volume_indices = [m["data"]["tr_index"] for m in published if m["topic"] == "volume"]
    assert volume_indices == list(range(N_VOLUMES))
    firsts = [m["data"]["trial_id"] for m in published if m["topic"] == "beta" and not m["data"]["is_update"]
              and not m["data"]["is_final"]]
    assert sorted(firsts) == [t.trial_id for t in trials]
    finals = [m["data"]["trial_id"] for m in published if m["topic"] == "beta" and m["data"]["is_final"]]
    assert sorted(finals) == [t.trial_id for t in trials]


def test_slow_subscriber_never_delays_the_session(tmp_path, rng) -> None:
    volumes, affine, trials, bundle, _ = _synthetic_run(rng)
    watch = tmp_path / "export"
    watch.mkdir()
    session = LiveSession(bundle.config, bundle, tmp_path / "session", FakeDecoder())
    thread, result = _start(session, RunPlan("run-01", watch, N_VOLUMES, TR_S, trials))
    slow = _subscribe(session)
    _write(volumes, affine, watch)
    thread.join(60)  # the session ends while the subscriber has read almost nothing
    assert not thread.is_alive() and "error" not in result
    published = [m["seq"] for m in _published(tmp_path / "session")]
    received = []
    while (message := slow.receive(timeout_s=0.5)) is not None:
        received.append(message.seq)
        time.sleep(0.002)
    assert received == [s for s in published if s >= received[0]], "queued messages arrive in order, none lost"
    assert received[-1] == published[-1]
    slow.close()


def test_the_phantom_harness_replays_runs_one_after_another_into_one_session(tmp_path) -> None:
    # bench_soak.py replays a session run by run, a LiveSession per run on one session folder.
    # Every run was written as series 1, so the second run's files were taken for the journaled,
    # ended run-01's and the replay waited for ever; each run now has its series number.
    from types import SimpleNamespace

    from rtdecoder.session.demo import scan_and_decode

    volumes, affine, trials, bundle, _ = _synthetic_run(np.random.default_rng(3))
    simulated = SimpleNamespace(volumes=volumes, affine=affine, tr_s=TR_S, slice_times_s=None, trials=trials)
    outcome: dict = {}

    def replay() -> None:
        for run in range(2):
            plan = RunPlan(f"run-{run + 1:02d}", tmp_path / f"export-{run + 1}", N_VOLUMES, TR_S, trials)
            plan.watch_dir.mkdir()
            session = LiveSession(bundle.config, bundle, tmp_path / "session", FakeDecoder())
            outcome[plan.run] = scan_and_decode(session, plan, simulated, speed=40.0, series_number=run + 1)

    thread = threading.Thread(target=replay, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), f"the replay hung after {sorted(outcome)}"
    for run in ("run-01", "run-02"):
        summary, received = outcome[run]
        assert summary.n_volumes == N_VOLUMES and summary.n_decoded == len(trials), run
        assert [m.data["tr_index"] for m in received if m.topic == "volume"] == list(range(N_VOLUMES))
