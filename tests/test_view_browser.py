"""The live view in a real browser: Debian's headless Chromium, driven by Playwright (never its own browser build).

``.ci/run`` installs ``chromium`` (apt) and the ``playwright`` package (the test extra); the tests
skip, saying why, only where neither can be had. Each test saves a screenshot under its
``tmp_path``; with ``RTDECODER_ARTIFACTS_DIR`` set it is copied there too (``view.png``,
``view-long-session.png``).
"""

from __future__ import annotations

import io
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rtdecoder.config import PublishConfig, ViewConfig
from rtdecoder.phantom.scanner import volumes_from_array, write_run
from rtdecoder.publish.publisher import ResultPublisher
from rtdecoder.session.runner import LiveSession, RunPlan
from rtdecoder.view.server import ViewServer, attach

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("RTDECODER_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def playwright():
    if not CHROMIUM.is_file():
        pytest.skip(f"no browser: {CHROMIUM} not found (install Debian's 'chromium' with apt-get, as .ci/run does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("no browser driver: the 'playwright' package is missing (pip install -e '.[test]')")
    with sync_playwright() as driver:
        yield driver


def _page(playwright, profile: Path):
    """A page in a fresh headless Chromium with an empty profile (its --user-data-dir)."""
    profile.mkdir()
    context = playwright.chromium.launch_persistent_context(
        str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
        viewport={"width": 1400, "height": 1000},
    )
    page = context.pages[0] if context.pages else context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    return context, page, errors


def _save(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    artifacts = os.environ.get("RTDECODER_ARTIFACTS_DIR")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(artifacts) / name)
    return path


def _stats(page) -> dict:
    return page.evaluate("window.rtview.stats()")


def _wait(page, predicate, what: str, timeout_s: float = 30.0) -> dict:
    """Poll the page's stats (and DOM) until ``predicate(stats)``; returns the stats that passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = _stats(page)
        stats["state"] = page.text_content("#state")
        stats["points"] = int(page.get_attribute("#translation", "data-points"))
        if predicate(stats):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"the page did not show {what} within {timeout_s:g} s; it shows {stats}")
        time.sleep(0.05)


def _candidate(stim_id: str) -> np.ndarray | None:
    """FakeDecoder's two candidates: an arrow up and an arrow down."""
    if stim_id not in ("up", "down"):
        return None
    image = np.full((48, 48, 3), 40, np.uint8)
    for row in range(8, 40):
        half = (row - 8) // 2 if stim_id == "up" else (39 - row) // 2
        image[row, 24 - half:24 + half + 1] = (240, 200, 60)
    return image


def _painting(decoder_class):
    """FakeDecoder whose reconstructions can be seen in the screenshot (a colour ramp per trial)."""

    class Painting(decoder_class):
        def reconstruct(self, decoded, seed: int) -> bytes:
            super().reconstruct(decoded, seed)  # its timing
            ramp = np.linspace(0, 255, 32, dtype=np.uint8)
            pixels = np.stack([np.tile(ramp, (32, 1)), np.tile(ramp[:, None], (1, 32)),
                               np.full((32, 32), seed % 200 + 55, np.uint8)], axis=-1)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            return buffer.getvalue()

    return Painting


def test_live_view_follows_a_run_in_chromium(tmp_path, rng, playwright) -> None:
    from test_session import N_VOLUMES, TR_S, FakeDecoder, _start, _synthetic_run

    volumes, affine, trials, bundle, _ = _synthetic_run(rng)
    watch = tmp_path / "export"
    watch.mkdir()
    config = bundle.config
    session = LiveSession(config, bundle, tmp_path / "session", _painting(FakeDecoder)(reconstruct_s=0.05))
    view = ViewServer(config.view.model_copy(update={"port": 0}), config.session, config.publish,
                      image_source=_candidate).start()
    context = None
    try:
        attach(view, session)
        thread, result = _start(session, RunPlan("run-01", watch, N_VOLUMES, TR_S, trials))
        context, page, errors = _page(playwright, tmp_path / "profile")
        page.goto(view.url)
        _wait(page, lambda s: s["snapshots"] >= 1 and s["state"] == "waiting", "the session waiting")

        # the scanner at 5x real time: 36 volumes in about 12 s (time for the page to be seen
        # advancing on a busy machine), one of them never written, and a stray file the watcher
        # cannot read halfway through
        exported = list(volumes_from_array(volumes, affine, TR_S, None, series="run-01"))
        from rtdecoder.phantom.scanner import FaultPlan

        scanner = threading.Thread(target=write_run, args=(exported, watch), kwargs={
            "format": "nifti", "tr_s": TR_S, "speed": 5.0, "faults": FaultPlan(drop=(10,))})
        scanner.start()
        _wait(page, lambda s: s["points"] >= 4 and s["state"] == "running", "the motion trace")
        assert page.text_content("#run-label") == "run-01"
        card = _wait(page, lambda s: s["cards"] >= 1, "a decode card")
        page.wait_for_function("[...document.querySelectorAll('.trial-card img.recon')]"
                               ".some((img) => img.complete && img.naturalWidth > 0)", timeout=10_000)
        (watch / "stray.nii").write_bytes(b"not a NIfTI file at all" * 20)
        # it advances while the run goes on: more volumes, more cards, still running
        assert card["cards"] < len(trials), "the first card should come while the run goes on"
        later = _wait(page, lambda s: s["points"] >= card["points"] + 4 and s["cards"] > card["cards"],
                      "the trace and the cards advancing")
        assert later["state"] == "running", "the page should be updating before the run ends"
        assert page.evaluate("document.querySelector('.trial-card .cand img').naturalWidth") > 0
        first_card = page.locator(".trial-card").first
        assert "shown image: rank" in first_card.text_content()
        assert "confidence (score 1 − score 2)" in first_card.text_content()
        _wait(page, lambda s: s["state"] == "run end", "the run's end")
        scanner.join(30)
        thread.join(30)
        assert "error" not in result, result.get("error")
        summary = result["summary"]
        final = _wait(page, lambda s: s["cards"] == summary.n_decoded, "every decode")
        assert final["maxRunVolumes"] == N_VOLUMES
        text = page.text_content("#summary")
        assert "missing 1" in text and "decoded 7" in text
        page.wait_for_function("document.querySelector('#events').textContent.includes('file_problem')",
                               timeout=15_000)
        shot = _save(page, tmp_path, "view.png")
        assert Image.open(shot).size[0] >= 1200
        # a reload shows the whole session so far, from the server's history
        page.reload()
        again = _wait(page, lambda s: s["snapshots"] == 1 and s["cards"] == summary.n_decoded,
                      "the session after a reload")
        assert again["maxRunVolumes"] == N_VOLUMES and again["points"] == N_VOLUMES
        # the session waits for its next run (a heartbeat after run_end says so); the run list keeps its end
        assert again["state"] in ("run end", "waiting") and "missing 1" in page.text_content("#summary")
        assert page.get_attribute("button.run-item[data-run='run-01']", "data-state") == "run_end"
        assert not errors, errors
    finally:
        if context is not None:
            context.close()
        view.close()


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _publish_run(publisher: ResultPublisher, label: str, n_volumes: int, rng: np.random.Generator) -> None:
    """One run of a session as the session publishes it, as fast as it can (far faster than 20x real time)."""
    publisher.publish("status", {"state": "run_start", "run": label, "tr_s": 1.6, "n_volumes": n_volumes}, {})
    motion = np.zeros(6)
    for i in range(n_volumes):
        now = time.time()
        motion += rng.normal(0, [0.02, 0.02, 0.02, 3e-4, 3e-4, 3e-4])
        publisher.publish("volume", {"run": label, "tr_index": i, "missing": False,
                                     "fd_mm": float(abs(rng.normal(0, 0.2))), "motion": motion.tolist(), "tsnr": 50.0},
                          {"file_complete": now - 0.03, "processed": now})
        if i == 20:
            publisher.publish("status", {"state": "file_problem", "run": label, "message": f"{label}: bad file"}, {})
        if i % 3 == 2:
            beta = publisher.publish("beta", {"run": label, "trial_id": f"t{i:03d}", "stim_id": "up",
                                              "is_update": False, "is_final": False}, {})
            publisher.publish("decode", {
                "run": label, "trial_id": f"t{i:03d}", "stim_id": "up", "beta_seq": beta.seq,
                "retrieval": {"ids": ["down", "up"], "scores": [0.3, 0.2], "shown_rank": 2, "n_candidates": 2},
                "reconstruction": "done", "image_png": _png(i), "decode_ms": 30.0,
            }, {"file_complete": now - 0.03})
    publisher.publish("status", {"state": "run_end", "run": label, "reason": "n_volumes"}, {})


def test_page_stays_bounded_over_a_long_session(tmp_path, playwright) -> None:
    # 24 runs of 190 volumes (two NSD sessions' worth), with bounds a session reaches early: the
    # page's lists, its DOM and its heap stop growing once the bounds are reached.
    bounds = {"history_runs": 6, "run_volumes": 120, "run_trials": 12, "run_events": 8}
    publisher = ResultPublisher(PublishConfig(result_address="tcp://127.0.0.1:*",
                                              control_address="tcp://127.0.0.1:*"), "long-session").start()
    view = ViewServer(ViewConfig(port=0, **bounds), image_source=_candidate).start()
    context = None
    rng = np.random.default_rng(0)
    try:
        view.follow(publisher.result_endpoint_, publisher.control_endpoint_)
        while view.state.last_seq < 0:  # the session's heartbeats, until the view has joined
            publisher.publish("status", {"state": "waiting", "run": None}, {})
            time.sleep(0.05)
        context, page, errors = _page(playwright, tmp_path / "profile")
        page.goto(view.url)
        _wait(page, lambda s: s["snapshots"] >= 1, "the snapshot")
        cdp = context.new_cdp_session(page)
        cdp.send("HeapProfiler.enable")
        measured = {}
        for run in range(24):
            _publish_run(publisher, f"run-{run + 1:02d}", 190, rng)
            stats = _wait(page, lambda s: s["lastSeq"] == publisher.next_seq - 1, f"run {run + 1}", 60)
            assert stats["runs"] <= bounds["history_runs"] and stats["maxRunVolumes"] <= bounds["run_volumes"]
            assert stats["cards"] <= bounds["run_trials"] and stats["trials"] <= 6 * bounds["run_trials"]
            assert stats["eventItems"] <= bounds["run_events"]
            if run + 1 in (12, 24):
                page.wait_for_timeout(300)  # the last frame drawn, the last images decoded
                cdp.send("HeapProfiler.collectGarbage")
                heap = cdp.send("Runtime.getHeapUsage")["usedSize"]
                nodes = cdp.send("Memory.getDOMCounters")["nodes"]
                measured[run + 1] = (heap, nodes)
        heap_growth = measured[24][0] - measured[12][0]
        print("view heap and DOM nodes at runs 12 and 24:", measured)
        assert heap_growth < 3 * 1024 * 1024, f"the page's heap grew {heap_growth / 1e6:.1f} MB from run 12 to 24"
        assert measured[24][1] <= measured[12][1] * 1.2 + 200, f"DOM nodes grew: {measured}"
        final = _stats(page)
        assert final["runs"] == 6 and final["selected"] == "run-24" and final["snapshots"] == 1
        assert view.state.sizes()["runs"] == 6 and view.n_pages == 1
        _save(page, tmp_path, "view-long-session.png")
        assert not errors, errors
    finally:
        if context is not None:
            context.close()
        view.close()
        publisher.close()


def test_page_with_a_token_loads_everything(tmp_path, playwright) -> None:
    # bound beyond loopback, the page, its script, its stream and its images all need the token
    publisher = ResultPublisher(PublishConfig(result_address="tcp://127.0.0.1:*",
                                              control_address="tcp://127.0.0.1:*"), "with-token").start()
    view = ViewServer(ViewConfig(host="0.0.0.0", port=0), image_source=_candidate).start()
    context = None
    try:
        view.follow(publisher.result_endpoint_, publisher.control_endpoint_)
        while view.state.last_seq < 0:
            publisher.publish("status", {"state": "waiting", "run": None}, {})
            time.sleep(0.05)
        _publish_run(publisher, "run-01", 12, np.random.default_rng(1))
        port = view.url.split(":")[2].split("/")[0]
        context, page, errors = _page(playwright, tmp_path / "profile")
        page.goto(f"http://127.0.0.1:{port}/?token={view.token}")  # this machine only
        _wait(page, lambda s: s["snapshots"] >= 1 and s["cards"] == 4, "the run, with the token")
        page.wait_for_function("[...document.querySelectorAll('.trial-card img')]"
                               ".every((img) => img.complete && img.naturalWidth > 0)", timeout=10_000)
        assert not errors, errors
        refused = context.new_page()
        response = refused.goto(f"http://127.0.0.1:{port}/")
        assert response.status == 403
    finally:
        if context is not None:
            context.close()
        view.close()
        publisher.close()
