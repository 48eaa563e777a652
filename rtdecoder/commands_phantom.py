"""``rtdecoder phantom ...``: the simulated world's subcommands.

It lives outside :mod:`rtdecoder.phantom` so that building the command line imports no
simulator module: each handler imports what it needs when its command runs.
"""

from __future__ import annotations

import argparse


def add_phantom_commands(groups: argparse._SubParsersAction) -> None:
    """Register ``phantom`` and its subcommands on the top-level parser."""
    phantom = groups.add_parser("phantom", help="simulated subjects and scanner")
    actions = phantom.add_subparsers(dest="phantom_command", metavar="ACTION", required=True)
    _add_stimuli_command(actions)
    _add_generate_command(actions)
    _add_scan_command(actions)


def _add_stimuli_command(actions: argparse._SubParsersAction) -> None:
    stimuli = actions.add_parser(
        "stimuli", help="cut the natural-image stimuli; write a contact sheet and/or the crops"
    )
    stimuli.add_argument("--config", default="phantom", help="preset name or YAML file (default: phantom)")
    stimuli.add_argument("--n-stimuli", type=int, help="number of crops (default: phantom.n_stimuli)")
    stimuli.add_argument("--seed", type=int, help="crop seed (default: phantom.seed)")
    stimuli.add_argument("--size-px", type=int, help="crop edge in pixels (default: phantom.image_size_px)")
    stimuli.add_argument("--sheet", help="PNG file for a contact sheet of the first crops")
    stimuli.add_argument("--sheet-count", type=int, default=100, help="crops on the sheet (default: 100)")
    stimuli.add_argument("--out-dir", help="folder for <stim_id>.png files and stimuli.tsv")
    stimuli.add_argument("--count", type=int, help="crops written to --out-dir (default: all)")
    stimuli.set_defaults(handler=_stimuli)


def _stimuli(args: argparse.Namespace) -> int:
    from rtdecoder.config import load_config
    from rtdecoder.errors import DecoderError
    from rtdecoder.phantom.stimuli import StimulusBank, export_stimuli, write_contact_sheet

    if not args.sheet and not args.out_dir:
        raise DecoderError("phantom stimuli: give --sheet PNG and/or --out-dir FOLDER")
    for flag, value in (("--sheet-count", args.sheet_count), ("--count", args.count)):
        if value is not None and value < 1:
            raise DecoderError(f"phantom stimuli: {flag} must be >= 1 (got {value})")
    phantom = load_config(args.config).phantom
    bank = StimulusBank.build(
        args.n_stimuli if args.n_stimuli is not None else phantom.n_stimuli,
        size_px=args.size_px if args.size_px is not None else phantom.image_size_px,
        seed=args.seed if args.seed is not None else phantom.seed,
    )
    print(f"{len(bank)} stimuli from {len(bank.source_photos)} photos: {', '.join(bank.source_photos)}")
    if args.sheet:
        path = write_contact_sheet(bank, args.sheet, indices=range(min(args.sheet_count, len(bank))))
        print(f"contact sheet: {path}")
    if args.out_dir:
        count = len(bank) if args.count is None else min(args.count, len(bank))
        tsv = export_stimuli(bank, args.out_dir, indices=range(count))
        print(f"{count} crops and their ids: {tsv}")
    return 0


def _add_generate_command(actions: argparse._SubParsersAction) -> None:
    generate = actions.add_parser(
        "generate", help="write whole simulated sessions (volumes or betas) without pacing"
    )
    generate.add_argument("--config", default="phantom", help="preset name or YAML file (default: phantom)")
    generate.add_argument("--out", required=True, help="output folder (BIDS-like layout)")
    generate.add_argument("--subjects", default="all", help="0-based, e.g. 0,1 or 0-7 (default: all)")
    generate.add_argument("--sessions", help="0-based, e.g. 0 or 0-3 (default: 0 for volumes, all for betas)")
    generate.add_argument("--runs", default="all", help="0-based, e.g. 0-11 (default: all)")
    generate.add_argument("--level", default="volumes", choices=("volumes", "betas"),
                          help="volumes: int16 4D NIfTI per run; betas: single-trial betas per run")
    generate.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> int:
    from rtdecoder.config import load_config
    from rtdecoder.phantom.generate import generate, parse_index_list

    config = load_config(args.config)
    exp = config.experiment
    sessions_text = args.sessions or ("0" if args.level == "volumes" else "all")
    written = generate(
        config, args.out,
        subjects=parse_index_list(args.subjects, config.phantom.n_subjects, "--subjects"),
        sessions=parse_index_list(sessions_text, exp.sessions_per_subject, "--sessions"),
        runs=parse_index_list(args.runs, exp.runs_per_session, "--runs"),
        level=args.level,
    )
    print(f"wrote {len(written)} files under {args.out}")
    return 0


def _add_scan_command(actions: argparse._SubParsersAction) -> None:
    scan = actions.add_parser(
        "scan", help="export one simulated run into a folder at the TR, as a scanner does (or replay real DICOMs)"
    )
    scan.add_argument("--config", default="phantom", help="preset name or YAML file (default: phantom)")
    scan.add_argument("--out", required=True, help="the export folder to fill")
    scan.add_argument("--subject", type=int, default=0, help="0-based subject (default: 0)")
    scan.add_argument("--session", type=int, default=0, help="0-based session (default: 0)")
    scan.add_argument("--run", type=int, default=0, help="0-based run (default: 0)")
    scan.add_argument(
        "--format", choices=("mosaic", "enhanced", "nifti", "nifti4d"),
        help="file format (default: scanner.export_format)",
    )
    scan.add_argument("--speed", type=float, default=1.0, help="times faster than real time (default: 1)")
    scan.add_argument("--replay", metavar="DICOM_DIR", help="replay this folder of real DICOM volumes instead")
    scan.add_argument(
        "--atomic", action="store_true",
        help="files appear complete (written then renamed) instead of growing in place",
    )
    scan.set_defaults(handler=_scan)


def _scan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rtdecoder.errors import DecoderError
    from rtdecoder.phantom.scanner import replay_dicom_folder

    if not args.speed > 0:
        raise DecoderError(f"phantom scan: --speed must be > 0 (got {args.speed})")
    if args.replay:
        deliveries = replay_dicom_folder(args.replay, args.out, speed=args.speed, partial_write=not args.atomic)
        print(f"replayed {len(deliveries)} volumes from {args.replay} into {args.out}")
        return 0

    from rtdecoder.config import load_config
    from rtdecoder.glm.events import write_events_tsv
    from rtdecoder.phantom.dicom_export import PixelScaling, SeriesInfo
    from rtdecoder.phantom.scanner import volumes_from_array, write_run
    from rtdecoder.phantom.world import PhantomWorld

    config = load_config(args.config)
    for flag, value in (("--session", args.session), ("--run", args.run)):
        if value < 0:
            raise DecoderError(f"phantom scan: {flag} must be >= 0 (got {value})")
    simulated = PhantomWorld(config).simulate_run(args.subject, args.session, args.run)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_events_tsv(simulated.trials, out_dir / "events.tsv")
    series = SeriesInfo(
        seed=config.phantom.seed,
        session_number=args.session + 1,
        series_number=args.run + 1,
        description=f"func_sub-{args.subject:02d}_ses-{args.session:02d}_run-{args.run:02d}",
        patient_id=f"phantom-sub-{args.subject:02d}",
        study_id=f"phantom-sub-{args.subject:02d}-ses-{args.session:02d}",
        tile_order=config.scanner.tile_order,
        slice_mode=config.scanner.slice_order,
        pixel_scaling=PixelScaling.for_range(float(simulated.volumes.min()), float(simulated.volumes.max())),
    )
    volumes = volumes_from_array(
        simulated.volumes, simulated.affine, simulated.tr_s, simulated.slice_times_s, series=series.description
    )
    deliveries = write_run(
        volumes, out_dir, format=args.format or config.scanner.export_format, tr_s=simulated.tr_s,
        speed=args.speed, series=series, partial_write=not args.atomic,
    )
    print(f"wrote {len(deliveries)} volumes and events.tsv into {out_dir}")
    return 0
