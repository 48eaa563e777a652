"""``rtdecoder demo``: the phantom world through the whole closed loop, in one command.

1. Build (or load from the cache) the phantom world: stimuli, embeddings, subjects.
2. Pretrain the shared model on the pretraining subjects (cached).
3. Scan one calibration session of the held-out subject and calibrate it into a bundle.
4. Start the phantom scanner on a new run, run the live session on its export folder with a
   subscriber attached, and check that the subscriber received every published message.
5. Write an HTML report of the run.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from rtdecoder.config import RTDecoderConfig, config_from_dict
from rtdecoder.errors import DecoderError

logger = logging.getLogger(__name__)


def run_demo(
    config: RTDecoderConfig,
    work_dir: str | Path,
    speed: float = 8.0,
    calibration_runs: int | None = None,
    pretrain_sessions: int = 1,
    pretrain_epochs: int | None = 2,
    calibration_epochs: int | None = 20,
    progress: bool = True,
    view: bool = False,
) -> dict[str, Any]:
    """Run the demo; returns the report's figures plus what the subscriber saw.

    Parameters
    ----------
    config : RTDecoderConfig
        Normally the ``phantom`` preset.
    work_dir : Path
        Everything the demo makes (bundle, session journal, report); reused when run again.
    speed : float, default=8.0
        The live run's scanner plays this many times faster than real time.
    calibration_runs : int, optional
        Runs of the calibration session (default: a whole session, ``runs_per_session``).
    pretrain_sessions : int, default=1
        Sessions of each pretraining subject (one keeps the demo within minutes on 2 cores;
        ``rtdecoder pretrain`` uses them all).
    pretrain_epochs : int or None, default=2
        Pretraining epochs for the demo (``None``: ``training.pretrain_epochs``). The demo's
        pretrained model is a quick one; ``bench/bench_calibration.py`` measures the full recipe.
    calibration_epochs : int or None, default=20
        Calibration epochs of each fine-tune (``None``: ``training.epochs``, 150 in the phantom
        preset): few, so that the demo's three fine-tunes take minutes, not most of an hour.
    view : bool, default=False
        Serve the operator's live view (:mod:`rtdecoder.view`, at ``view.host:view.port``) while
        the live run is scanned, with the stimulus bank's thumbnails; its URL is in the figures.
    """
    from rtdecoder.bundle import SubjectBundle
    from rtdecoder.calibration.calibrate import calibrate
    from rtdecoder.calibration.evaluate import LiveScorer
    from rtdecoder.calibration.pretrain import pretrain, subject_id
    from rtdecoder.glm.events import write_events_tsv
    from rtdecoder.phantom.decoding import phantom_image_tokens, phantom_live_decoder
    from rtdecoder.phantom.scanner import volumes_from_array, write_run
    from rtdecoder.phantom.world import PhantomWorld
    from rtdecoder.session.report import write_report
    from rtdecoder.session.runner import LiveSession, RunPlan

    work_dir = Path(work_dir)
    config = config.model_copy(update={
        "publish": config.publish.model_copy(
            update={"result_address": "tcp://127.0.0.1:*", "control_address": "tcp://127.0.0.1:*"}
        ),
    })
    demo_training = {key: value for key, value in (("pretrain_epochs", pretrain_epochs),
                                                   ("epochs", calibration_epochs)) if value is not None}
    if demo_training:
        # through the config's own validation, so that 0 epochs is refused as a config value would be
        raw = config.model_dump(mode="json")
        config = config_from_dict(raw | {"training": raw["training"] | demo_training}, origin="rtdecoder demo")
    started = time.monotonic()
    world = PhantomWorld(config, progress=progress)
    bank_tokens = phantom_image_tokens(config, world=world, progress=progress)  # the stimuli, as calibration sees them
    held_out = config.phantom.n_subjects - 1
    subject = subject_id(held_out)
    logger.info("demo: pretraining on subjects 0..%d (cached after the first time)", held_out - 1)
    pretrained = pretrain(config, work_dir / "pretrained", progress=progress,
                          data=world.pretraining_source(range(held_out), range(pretrain_sessions)))

    bundle_dir = work_dir / "bundle"
    if (bundle_dir / "metadata.json").is_file() and not _bundle_fits(bundle_dir, config):
        shutil.rmtree(bundle_dir)
    if not (bundle_dir / "metadata.json").is_file():
        n_runs = calibration_runs or config.experiment.runs_per_session
        session_dir = work_dir / "calibration-session"
        logger.info("demo: scanning %d calibration runs of %s", n_runs, subject)
        for run in range(n_runs):
            simulated = world.simulate_run(held_out, 0, run)
            run_dir = session_dir / f"run-{run + 1:02d}"
            if not (run_dir / "events.tsv").is_file():
                volumes = volumes_from_array(simulated.volumes, simulated.affine, simulated.tr_s,
                                             simulated.slice_times_s, series=f"run-{run + 1:02d}")
                # Exported as the live run will be (Siemens MOSAIC), so the bundle's grid and the
                # live volumes' grid are the same voxel axes.
                write_run(volumes, run_dir, format="mosaic", speed=1e9, sleep=lambda _s: None, partial_write=False)
                write_events_tsv(simulated.trials, run_dir / "events.tsv")
        calibrate(config, session_dir, bundle_dir, subject_id=subject,
                  mask=_mask_as_exported(world.subject(held_out), session_dir / "run-01"),
                  pretrained_dir=pretrained, images=bank_tokens, progress=progress)
    bundle = SubjectBundle.load(bundle_dir)
    decoder = phantom_live_decoder(bundle, config)

    live = world.simulate_run(held_out, 1, 0)
    watch_dir = work_dir / "live-export"
    session_dir = work_dir / "live-session"
    for folder in (watch_dir, session_dir):
        if folder.exists():
            for path in folder.iterdir():
                path.unlink()
    watch_dir.mkdir(parents=True, exist_ok=True)
    plan = RunPlan("run-01", watch_dir, live.volumes.shape[3], live.tr_s, live.trials)
    session = LiveSession(config, bundle, session_dir, decoder)
    bank = world.bank
    view_server = _start_view(config, session, world) if view else None
    logger.info("demo: scanning the live run (%d volumes) at %.0fx real time", plan.n_volumes, speed)
    try:
        _summary, received = scan_and_decode(session, plan, live, speed)
    finally:
        if view_server is not None:
            view_server.close()

    seqs = [m.seq for m in received]
    gaps = sorted(set(range(seqs[0], seqs[-1] + 1)) - set(seqs))
    # The live figures (fast / slow / end of run) score the journaled beta maps with the bundle's model.
    scorer = LiveScorer.from_bundle(bundle, bank_tokens, test_ids=list(bank.ids[: config.experiment.n_test_images]),
                                    hubness_k=config.candidates.hubness_k)  # ranked as the run's decoder ranks
    figures = write_report(
        session_dir, "run-01", work_dir / "report.html", live.tr_s,
        seen_image=lambda stim_id: bank.image(bank.index_of(stim_id)), live=scorer,
    )
    figures.update({
        "messages_received": len(received),
        "messages_missing_at_subscriber": len(gaps),
        "demo_seconds": time.monotonic() - started,
        "report": str(work_dir / "report.html"),
    })
    if view_server is not None:
        figures["view"] = view_server.url
    return figures


def _start_view(config: RTDecoderConfig, session: Any, world: Any) -> Any:
    """The live view of the demo's session, its thumbnails from the candidates' folder or the world's bank."""
    from rtdecoder.view.images import folder_image_source
    from rtdecoder.view.server import ViewServer, attach

    if config.candidates.images_dir:
        images = folder_image_source(config.candidates.images_dir)
    else:
        bank = world.bank

        def images(stim_id: str) -> Any:
            return bank.image(bank.index_of(stim_id))

    server = ViewServer(config.view, config.session, config.publish, image_source=images).start()
    attach(server, session)
    print(f"rtdecoder demo: live view at {server.url}", flush=True)
    return server


def _bundle_fits(bundle_dir: Path, config: Any) -> bool:
    """Whether a cached demo bundle was calibrated with what this config governs (else it is made again)."""
    from rtdecoder.bundle import SubjectBundle

    try:
        SubjectBundle.load(bundle_dir).check_run_config(config)
    except DecoderError as err:
        logger.info("demo: the cached bundle does not fit this config (%s); calibrating again", err)
        return False
    return True


def _mask_as_exported(subject: Any, run_dir: Path) -> Any:
    """The subject's visual mask in the voxel axes of its exported DICOMs.

    Siemens MOSAIC files store rows and columns in the scanner's LPS-based order, so the reader's
    array is the phantom's grid with axes flipped (same world positions, different voxel order).
    """
    import nibabel as nib
    import numpy as np

    from rtdecoder.ingest.readers import read_volume

    first = read_volume(next(p for p in sorted(run_dir.iterdir()) if p.suffix == ".dcm"))
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(subject.affine), nib.orientations.io_orientation(first.affine)
    )
    mask = nib.orientations.apply_orientation(subject.mask, transform).astype(bool)
    expected = nib.orientations.inv_ornt_aff(transform, subject.mask.shape)
    if not np.allclose(subject.affine @ expected, first.affine, atol=1e-3):
        raise DecoderError(f"{first.source}: the exported grid is not the phantom subject's grid re-ordered")
    return mask


def scan_and_decode(
    session: Any, plan: Any, simulated: Any, speed: float, series_number: int = 1
) -> tuple[Any, list[Any]]:
    """Play one simulated run through the phantom scanner while ``session`` decodes it live.

    A subscriber joins first (it waits for a heartbeat, so nothing is published before it
    listens), then the scanner writes ``simulated`` as Siemens MOSAIC into ``plan.watch_dir`` at
    ``speed`` times real time, as series ``series_number`` (a scanner numbers each run's series
    anew; a session that journaled an ended run takes a later run's files of the same series for
    that run's and leaves them alone). Returns the run's summary and every message the subscriber
    got.
    """
    from rtdecoder_client.client import ResultSubscriber

    from rtdecoder.phantom.scanner import default_series, volumes_from_array, write_run

    outcome: dict[str, Any] = {}

    def run_session() -> None:
        try:
            outcome["summary"] = session.run(plan)
        except Exception as err:  # re-raised in the calling thread
            outcome["error"] = err

    session_thread = threading.Thread(target=run_session, name="rtdecoder-live-session")
    session_thread.start()
    if not session.ready.wait(60):
        raise DecoderError("the live session did not start within 60 s")
    subscriber = ResultSubscriber(session.publisher.result_endpoint_)
    received = []
    while not received:
        message = subscriber.receive(timeout_s=0.2)
        if message is not None:
            received.append(message)
    volumes = volumes_from_array(simulated.volumes, simulated.affine, simulated.tr_s, simulated.slice_times_s,
                                 series=plan.run)
    series = default_series(simulated.volumes[..., 0], series_number)
    scanner = threading.Thread(target=write_run, args=(volumes, plan.watch_dir), name="rtdecoder-phantom-scanner",
                               kwargs={"format": "mosaic", "tr_s": simulated.tr_s, "speed": speed, "series": series})
    scanner.start()
    while True:
        message = subscriber.receive(timeout_s=1.0)
        if message is not None:
            received.append(message)
            if message.topic == "status" and message.data.get("state") == "run_end":
                break
        elif not session_thread.is_alive():
            break
    scanner.join()
    session_thread.join()
    subscriber.close()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["summary"], received
