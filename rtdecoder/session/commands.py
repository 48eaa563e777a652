"""``rtdecoder run``: the live session a lab starts before the scan."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from rtdecoder.errors import ConfigError

logger = logging.getLogger(__name__)


def add_session_commands(groups: argparse._SubParsersAction) -> None:
    """Register ``run`` on the top-level parser."""
    run = groups.add_parser(
        "run",
        help="run the closed loop on a scanner's export folder",
        description="Watch an export folder, estimate single-trial betas as volumes arrive, decode them, and "
        "publish everything over ZeroMQ. Starting again on the same --session-dir resumes after a crash.",
    )
    run.add_argument("--config", default="phantom", help="preset name or YAML file (default: phantom)")
    run.add_argument("--bundle", required=True, type=Path, help="subject bundle folder from 'rtdecoder calibrate'")
    run.add_argument("--watch", required=True, type=Path, help="the folder the scanner exports this run into")
    run.add_argument("--session-dir", required=True, type=Path, help="journal and reports (resumes if it exists)")
    schedule = run.add_mutually_exclusive_group(required=True)
    schedule.add_argument("--events", type=Path, help="BIDS events.tsv with this run's trials")
    schedule.add_argument(
        "--live-onsets", action="store_true", help="trials are announced on the control socket as they start"
    )
    run.add_argument("--n-volumes", type=int, required=True, help="volumes in the run")
    run.add_argument("--run-label", default="run-01", help="run name in messages and the journal")
    run.add_argument("--tr-s", type=float, default=None, help="repetition time, s (default: scanner.tr_s)")
    run.add_argument("--no-decode", action="store_true", help="publish volumes and betas only")
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
    demo.set_defaults(handler=_demo)


def _run(args: argparse.Namespace) -> int:
    from calibration.bundle import SubjectBundle
    from rtdecoder.config import load_config
    from rtdecoder.glm.events import read_events_tsv
    from rtdecoder.session.runner import LiveSession, RunPlan

    config = load_config(args.config)
    if args.n_volumes < 1:
        raise ConfigError(f"--n-volumes: expected a positive count (got {args.n_volumes})")
    bundle = SubjectBundle.load(args.bundle)
    trials = read_events_tsv(args.events) if args.events else []
    decoder = None
    if not args.no_decode:
        from rtdecoder.decode.live import LiveDecoder

        decoder = LiveDecoder.from_bundle(bundle, config)
    plan = RunPlan(
        run=args.run_label,
        watch_dir=args.watch,
        n_volumes=args.n_volumes,
        tr_s=args.tr_s or config.scanner.tr_s,
        trials=trials,
    )
    session = LiveSession(config, bundle, args.session_dir, decoder)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        summary = session.run(plan, stop)
    except KeyboardInterrupt:
        stop.set()
        raise
    print(
        f"{summary.run}: {summary.n_volumes} volumes ({summary.n_missing} missing), {summary.n_betas} betas, "
        f"{summary.n_decoded} decodes ({summary.n_skipped_reconstructions} reconstructions skipped)"
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from rtdecoder.config import load_config
    from rtdecoder.session.demo import run_demo

    if args.speed <= 0:
        raise ConfigError(f"--speed: expected a positive factor (got {args.speed})")
    figures = run_demo(load_config(args.config), args.work_dir, speed=args.speed,
                       calibration_runs=args.calibration_runs, pretrain_sessions=args.pretrain_sessions,
                       pretrain_epochs=args.pretrain_epochs)
    for key, value in figures.items():
        print(f"{key:36s} {value}")
    return 0 if figures["messages_missing_at_subscriber"] == 0 else 1
