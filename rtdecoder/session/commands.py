"""``rtdecoder run``: the live session a lab starts before the scan."""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rtdecoder.errors import ConfigError

if TYPE_CHECKING:  # for the annotations only: the web server is imported when the view is asked for
    import numpy as np

    from rtdecoder.config import RTDecoderConfig
    from rtdecoder.view.images import ImageSource
    from rtdecoder.view.server import ViewServer

logger = logging.getLogger(__name__)

_RUN_ENTITY = re.compile(r"(?:^|_)run-(\w+?)(?:_|$)")


def add_session_commands(groups: argparse._SubParsersAction) -> None:
    """Register ``run`` on the top-level parser."""
    run = groups.add_parser(
        "run",
        help="run the closed loop on a scanner's export folder, run after run",
        description="Watch an export folder, estimate single-trial betas as volumes arrive, decode them, and "
        "publish everything over ZeroMQ. One process serves the whole scanning session: each new series (or "
        "sub-folder) is the next run. Without --bundle it is a front end only (motion, QA, betas). Starting "
        "again on the same --session-dir resumes after a crash.",
    )
    run.add_argument("--config", default="phantom", help="preset name or YAML file (default: phantom)")
    run.add_argument("--bundle", type=Path, help="subject bundle from 'rtdecoder calibrate' (default: no decoding)")
    run.add_argument("--watch", required=True, type=Path, help="the folder the scanner exports into")
    run.add_argument("--session-dir", required=True, type=Path, help="journal and reports (resumes if it exists)")
    run.add_argument(
        "--events", type=Path, nargs="+", default=[],
        help="BIDS events.tsv of the runs, in order (a run-NN in a file name labels its run)",
    )
    run.add_argument(
        "--live-onsets", action="store_true", help="trials are announced on the control socket as they start"
    )
    run.add_argument("--n-volumes", type=int, help="volumes in every run (default: until the events' end, "
                     "run_end, a new series or the idle timeout)")
    run.add_argument("--n-runs", type=int, help="end the session after this many runs (default: until stopped)")
    run.add_argument("--run-label", help="label of the first run (default: from the events file name, or run-01)")
    run.add_argument("--tr-s", type=float, default=None,
                     help="repetition time, s: checked against the volumes; used for files that carry none")
    run.add_argument("--no-decode", action="store_true", help="publish volumes and betas only")
    run.add_argument("--mask", type=Path, help="without --bundle: 0/1 NIfTI of the voxels to read "
                     "(default: an EPI brain mask of the reference)")
    run.add_argument("--reference", type=Path, help="without --bundle: motion reference volume file "
                     "(default: the session's first volume)")
    run.add_argument("--view", action="store_true", help="serve the operator's live view (a read-only web page; "
                     "view.host and view.port in the config, default http://127.0.0.1:8765/)")
    run.set_defaults(handler=_run)

    demo = groups.add_parser(
        "demo",
        help="the phantom world through the whole loop, with an HTML report",
        description="Pretrain on phantom subjects, calibrate a held-out one from one session, scan a new run, "
        "decode it live with a subscriber attached, and write an HTML report. Assets are cached in --work-dir.",
    )
    demo.add_argument("--config", default="phantom", help="preset name or YAML file (default: phantom)")
    demo.add_argument("--work-dir", type=Path, default=Path("rtdecoder-demo"), help="default: ./rtdecoder-demo")
    demo.add_argument("--speed", type=float, default=8.0, help="live scanner speed-up over real time (default 8)")
    demo.add_argument("--calibration-runs", type=int, default=None, help="default: a whole session")
    demo.add_argument("--pretrain-sessions", type=int, default=1, help="sessions per pretraining subject (default 1)")
    demo.add_argument("--pretrain-epochs", type=int, default=2, help="pretraining epochs of the demo (default 2)")
    demo.add_argument("--calibration-epochs", type=int, default=20,
                      help="epochs of each calibration fine-tune in the demo (default 20)")
    demo.add_argument("--view", action="store_true", help="serve the live view of the demo's run (view.port)")
    demo.set_defaults(handler=_demo)


def _run(args: argparse.Namespace) -> int:
    from rtdecoder.bundle import SubjectBundle
    from rtdecoder.config import load_config
    from rtdecoder.session.runner import LiveSession, RunPlan

    config = load_config(args.config)
    for name in ("n_volumes", "n_runs", "tr_s"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ConfigError(f"--{name.replace('_', '-')}: expected a positive value (got {value})")
    if args.bundle is not None and (args.mask is not None or args.reference is not None):
        raise ConfigError("--mask/--reference: only without --bundle (a bundle brings its own mask and reference)")
    bundle = SubjectBundle.load(args.bundle) if args.bundle is not None else None
    if bundle is not None:  # before any model or engine is loaded: a wrong config fails in a second
        bundle.check_run_config(config)
    decoder = None
    if bundle is not None and not args.no_decode:
        decoder = _live_decoder(bundle, config)
    mask = reference = None
    if args.reference is not None:
        from rtdecoder.ingest.readers import read_volume

        reference = read_volume(args.reference)
    if args.mask is not None:
        from rtdecoder.preprocess.mask import VoxelMask

        mask = VoxelMask.from_nifti(args.mask)
    session = LiveSession(config, bundle, args.session_dir, decoder, mask=mask, reference=reference)
    # started before the session, so a port in use stops the command before the scan, not during it
    view = start_view(config, session, decoding=decoder is not None) if args.view or config.view.enabled else None
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    defaults = RunPlan("", n_volumes=args.n_volumes, tr_s=args.tr_s)  # for runs beyond the events files
    try:
        summaries = session.run_session(args.watch, run_plans(args), n_runs=args.n_runs, stop=stop,
                                        defaults=defaults)
    finally:
        if view is not None:
            view.close()
    for summary in summaries:
        print(
            f"{summary.run}: {summary.n_volumes} volumes ({summary.n_missing} missing), {summary.n_betas} betas, "
            f"{summary.n_decoded} decodes ({summary.n_skipped_reconstructions} reconstructions skipped); "
            f"ended by {summary.end_reason}"
        )
    if received:
        print(f"rtdecoder: stopped by signal {received[0]}; start again on {args.session_dir} to resume",
              file=sys.stderr)
        return 128 + received[0]
    return 0


def start_view(
    config: RTDecoderConfig, session: Any, decoding: bool = True, image_source: ImageSource | None = None,
) -> ViewServer:
    """Serve the live view of ``session`` (it follows the session once its publisher is bound).

    ``image_source`` gives the candidates' thumbnails; default :func:`candidate_images`.
    """
    from rtdecoder.view.server import ViewServer, attach

    if image_source is None:
        image_source = candidate_images(config)
    server = ViewServer(config.view, config.session, config.publish, image_source=image_source,
                        decoding=decoding).start()
    attach(server, session)
    print(f"rtdecoder: live view at {server.url}", file=sys.stderr)
    return server


def candidate_images(config: RTDecoderConfig) -> ImageSource | None:
    """The retrieval candidates' images for thumbnails: ``candidates.images_dir``, else the phantom bank.

    ``None`` with only ``candidates.embeddings_file`` (there are no images to show, only ids).
    """
    if config.candidates.images_dir:
        from rtdecoder.view.images import folder_image_source

        return folder_image_source(config.candidates.images_dir)
    if getattr(config.candidates, "embeddings_file", None) or config.generator.kind != "phantom":
        return None
    return _phantom_bank_images(config)


def _phantom_bank_images(config: RTDecoderConfig) -> ImageSource:
    """The phantom stimulus bank's images, the bank built at the first thumbnail asked for (it takes seconds)."""
    lock = threading.Lock()
    built: list = []

    def image(stim_id: str) -> np.ndarray:
        with lock:
            if not built:
                from rtdecoder.phantom.stimuli import StimulusBank

                built.append(StimulusBank.build(config.phantom.n_stimuli, config.phantom.image_size_px,
                                                config.phantom.seed))
        bank = built[0]
        return bank.image(bank.index_of(stim_id))

    return image


def _live_decoder(bundle, config):
    """The lab's decoder; the phantom world's candidates and student under the phantom generator."""
    if config.generator.kind == "phantom":
        from rtdecoder.phantom.decoding import phantom_live_decoder

        return phantom_live_decoder(bundle, config)
    from rtdecoder.compose import live_decoder_from_config

    return live_decoder_from_config(bundle, config)


def run_plans(args: argparse.Namespace) -> list:
    """The runs known before the session: one per events file (or one, from the flags alone)."""
    from rtdecoder.glm.events import read_events_tsv
    from rtdecoder.session.runner import RunPlan

    plans = []
    for number, path in enumerate(args.events, start=1):
        match = _RUN_ENTITY.search(path.name)
        label = f"run-{match.group(1)}" if match else f"run-{number:02d}"
        plans.append(RunPlan(label, n_volumes=args.n_volumes, tr_s=args.tr_s, trials=read_events_tsv(path)))
    if not plans:
        plans.append(RunPlan(args.run_label or "run-01", n_volumes=args.n_volumes, tr_s=args.tr_s))
    elif args.run_label:
        plans[0].run = args.run_label
    labels = [plan.run for plan in plans]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--events: expected one file per run; run labels repeat: {', '.join(labels)}")
    return plans


def _demo(args: argparse.Namespace) -> int:
    from rtdecoder.config import load_config
    from rtdecoder.session.demo import run_demo
    from rtdecoder.session.report import format_figures

    if args.speed <= 0:
        raise ConfigError(f"--speed: expected a positive factor (got {args.speed})")
    for flag, epochs in (("--pretrain-epochs", args.pretrain_epochs),
                         ("--calibration-epochs", args.calibration_epochs)):
        if epochs < 1:
            raise ConfigError(f"{flag}: expected at least 1 epoch (got {epochs})")
    figures = run_demo(load_config(args.config), args.work_dir, speed=args.speed,
                       calibration_runs=args.calibration_runs, pretrain_sessions=args.pretrain_sessions,
                       pretrain_epochs=args.pretrain_epochs,
                       calibration_epochs=args.calibration_epochs, view=args.view)
    print(format_figures(figures))
    return 0 if figures["messages_missing_at_subscriber"] == 0 else 1
