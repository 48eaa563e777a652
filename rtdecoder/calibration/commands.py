"""``rtdecoder calibrate`` and ``rtdecoder pretrain``: build a subject bundle, build the shared model."""

from __future__ import annotations

import argparse


def add_calibration_commands(groups: argparse._SubParsersAction) -> None:
    """Register ``calibrate`` and ``pretrain`` on the top-level parser."""
    calibrate = groups.add_parser(
        "calibrate", help="one calibration session -> betas, statistics, fine-tuned model, subject bundle"
    )
    calibrate.add_argument("--config", default="phantom", help="preset name or YAML file (default: phantom)")
    calibrate.add_argument(
        "--session", required=True,
        help="run folders each with volumes + events.tsv, or a BIDS session (ses-XX, its func/, or sub-XX)",
    )
    calibrate.add_argument("--out", help="the subject bundle folder to write (required unless --write-reference)")
    calibrate.add_argument("--pretrained", help="pretrained model folder (rtdecoder pretrain); default: from scratch")
    calibrate.add_argument(
        "--images",
        help="the session's images, found by each trial's stim_id: a folder of <stim_id>.png/.jpg files, or a "
        ".safetensors embeddings file (tokens + ids + embedder); required, except for sessions the phantom wrote "
        "(then the phantom world's stimulus bank)",
    )
    calibrate.add_argument("--subject-id", default="sub-08", help="adapter name (default: sub-08)")
    calibrate.add_argument(
        "--mask",
        help="0/1 NIfTI of the voxels to decode, on the motion reference's grid in any voxel order; or 'auto': the "
        "voxel_selection.n_voxels most reliable voxels (repeated images' betas) of the session's EPI brain mask, "
        "their scores saved in the bundle as voxel_reliability.nii.gz (required, except for sessions the phantom "
        "wrote: then the phantom subject's visual-cortex mask)",
    )
    calibrate.add_argument(
        "--mask-space", metavar="VOLUME",
        help="the volume (NIfTI or DICOM) the --mask was drawn on, e.g. another run's or session's mean EPI: "
        "it is rigidly registered to the motion reference and the mask carried through that transform",
    )
    calibrate.add_argument(
        "--resample-mask", action="store_true",
        help="resample a --mask on another grid by world coordinates (trilinear, threshold 0.5); never done "
        "without this flag",
    )
    calibrate.add_argument(
        "--reference", metavar="VOLUME",
        help="motion reference volume file on the session's grid (default: the middle volume of the first run)",
    )
    calibrate.add_argument(
        "--write-reference", metavar="OUT.nii.gz",
        help="only write the motion reference calibration would use (to draw a mask on) and exit",
    )
    calibrate.add_argument(
        "--select", metavar="ENTITY=VALUE", action="append", default=[],
        help="BIDS sessions: take only runs with this entity value, e.g. --select task=nsd (repeatable)",
    )
    calibrate.add_argument(
        "--ensemble-size", type=int, metavar="N",
        help="calibrate N models (seeds training.seed, +1, ...) decoded together (default: the config's "
        "training.ensemble_size; 1 trains one)",
    )
    calibrate.add_argument("--no-progress", action="store_true", help="no progress bars")
    calibrate.set_defaults(handler=_calibrate)

    pretrain = groups.add_parser(
        "pretrain", help="train the shared model on a betas dataset (--data) or the phantom world's subjects"
    )
    pretrain.add_argument("--config", default="phantom", help="preset name or YAML file (default: phantom)")
    pretrain.add_argument("--out", required=True, help="cache folder; the model goes to OUT/model")
    pretrain.add_argument(
        "--data", metavar="DIR",
        help="a single-trial betas dataset (sub-XX/betas.safetensors + trials.tsv, stimuli/ or "
        "embeddings.safetensors; docs/pretraining.md); default: simulate the phantom world's subjects",
    )
    pretrain.add_argument(
        "--subjects",
        help="with --data: subject folders, e.g. sub-01,sub-02 (default: all); without: 0-based phantom "
        "subjects, e.g. 0-6 or 0,2 (default: 0-6)",
    )
    pretrain.add_argument(
        "--sessions", default="all",
        help="with --data: the session numbers of trials.tsv, e.g. 1-3; without: 0-based phantom sessions, "
        "e.g. 0-3 (default: all)",
    )
    pretrain.add_argument(
        "--device", default="cpu",
        help="torch device, e.g. cuda (under torchrun: each process's cuda:LOCAL_RANK) (default: cpu)",
    )
    pretrain.add_argument("--no-progress", action="store_true", help="no progress bars")
    pretrain.set_defaults(handler=_pretrain)

    evaluate = groups.add_parser(
        "evaluate",
        help="score a bundle on a recorded test session through the live front end: retrieval, live figures",
        description="Run a recorded session through the front end 'rtdecoder run' builds from the bundle (its "
        "motion reference, statistics and HRFs), then report retrieval of the test images (repeats averaged, "
        "both ways, top-1/top-5), the live figures (single trials at the first beta, after refinements and "
        "at the run's end, among the run's images and among the test set) and, with a generator, image "
        "metrics of reconstructions. A table on stdout; JSON in OUT/evaluation.json.",
    )
    evaluate.add_argument("--bundle", required=True, help="the subject bundle folder (rtdecoder calibrate)")
    evaluate.add_argument(
        "--session", required=True,
        help="the test session: run folders each with volumes + events.tsv, or a BIDS session",
    )
    evaluate.add_argument("--config", help="preset name or YAML file of the run (default: the bundle's own config)")
    evaluate.add_argument(
        "--images",
        help="the session's images by stim_id: a folder of <stim_id>.png/.jpg files (also scored against the "
        "reconstructions) or a .safetensors embeddings file; required, except for sessions the phantom wrote",
    )
    evaluate.add_argument("--out", help="folder for evaluation.json (default: print only)")
    evaluate.add_argument(
        "--select", metavar="ENTITY=VALUE", action="append", default=[],
        help="BIDS sessions: take only runs with this entity value, e.g. --select task=nsd (repeatable)",
    )
    evaluate.add_argument("--pool-size", type=int, default=300,
                          help="images per random pool of the averaged retrieval (default 300, as the field)")
    evaluate.add_argument("--n-pools", type=int, default=30, help="random pools averaged (default 30)")
    evaluate.add_argument(
        "--slow-s", type=float, default=29.5,
        help="the 'slow' live figure: the latest beta at most this many seconds after onset (default 29.5, "
        "real-time MindEye's); 0 or less: each trial's last refinement",
    )
    evaluate.add_argument("--no-reconstruct", action="store_true",
                          help="no reconstructions and image metrics, even with a generator configured")
    evaluate.add_argument("--max-reconstructions", type=int, default=100,
                          help="test images reconstructed for the image metrics (default 100)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")
    evaluate.set_defaults(handler=_evaluate)


def _calibrate(args: argparse.Namespace) -> int:
    import torch

    from rtdecoder.calibration.betas import find_runs
    from rtdecoder.calibration.calibrate import calibrate, missing_mask_message, write_reference, written_by_phantom
    from rtdecoder.calibration.pretrain import subject_index
    from rtdecoder.calibration.voxel_selection import AUTO_MASK
    from rtdecoder.config import load_config
    from rtdecoder.errors import BundleError
    from rtdecoder.preprocess.mask import VoxelMask
    from rtdecoder.preprocess.registration import MaskSource, describe_provenance

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    overrides = {"training": {"ensemble_size": args.ensemble_size}} if args.ensemble_size is not None else None
    config = load_config(args.config, overrides)
    select = _entity_selection(args.select)
    find_runs(args.session, select)  # a wrong folder fails now, not after the mask is built
    if args.write_reference:
        path = write_reference(args.session, args.write_reference, args.reference, select)
        print(f"motion reference: {path} (draw the mask on it, then calibrate with --mask MASK.nii.gz"
              + (f" --reference {args.reference}" if args.reference else "") + ")")
        return 0
    if args.out is None:
        raise BundleError("calibrate: --out: required (the subject bundle folder to write), unless --write-reference")
    if args.mask is None:
        if args.mask_space is not None or args.resample_mask:
            raise BundleError("calibrate: --mask: expected the mask file that --mask-space/--resample-mask apply to")
        if args.images is not None:
            raise BundleError("calibrate: --mask: required with --images (the phantom mask fits phantom data only)")
        if not written_by_phantom(args.session):
            raise BundleError(missing_mask_message(args.session))
        from rtdecoder.phantom.subjects import PhantomSubject

        subject = PhantomSubject.build(config, subject_index(args.subject_id, config.phantom.n_subjects))
        mask = VoxelMask(
            subject.mask, subject.affine, source=f"phantom {args.subject_id} ground-truth visual mask",
            provenance={"file": f"phantom {args.subject_id} ground-truth visual mask", "method": "phantom default"},
        )
    elif args.mask == AUTO_MASK:
        if args.mask_space is not None or args.resample_mask:
            raise BundleError("calibrate: --mask auto: chosen on the session's own grid; expected no --mask-space "
                              "or --resample-mask with it")
        mask = AUTO_MASK
    else:
        mask = MaskSource(args.mask, args.mask_space, args.resample_mask)
    images = args.images
    if images is None:
        if not written_by_phantom(args.session):
            raise BundleError(
                f"{args.session}: --images: required (the session's volumes were not written by the rtdecoder "
                "phantom, so its stimulus bank does not apply): pass the folder of the images shown, one "
                "<stim_id>.png/.jpg per trial's stim_id, or an embeddings file of them"
            )
        # The phantom world: its bank is what the phantom's trials saw (their stim_ids are its ids).
        from rtdecoder.phantom.decoding import phantom_image_tokens

        images = phantom_image_tokens(config, progress=not args.no_progress)
    report = calibrate(
        config, args.session, args.out, args.subject_id, mask,
        pretrained_dir=args.pretrained, images=images, progress=not args.no_progress,
        reference=args.reference, select=select,
    )
    evaluation = report.evaluation
    print(f"bundle: {report.bundle_dir}")
    print(describe_provenance(report.mask))
    print(f"training trials: {report.n_train_trials}; time: " + ", ".join(
        f"{k} {v:.0f} s" for k, v in report.seconds.items()))
    if "image_top1" in evaluation:
        print(
            f"held-out retrieval among {evaluation['pool_size']} ({evaluation['n_test_images']} images): "
            f"image {100 * evaluation['image_top1']:.1f}%, brain {100 * evaluation['brain_top1']:.1f}% "
            f"(chance {100 * evaluation['chance']:.1f}%)"
            + (f" for the {len(evaluation['members'])} models decoded together; each alone: " + ", ".join(
                f"seed {m['seed']} {100 * m['image_top1']:.1f}% / {100 * m['brain_top1']:.1f}%"
                for m in evaluation["members"]) if "members" in evaluation else "")
        )
    else:
        print(f"evaluation: {evaluation.get('note', 'none')}")
    ranked = evaluation.get("candidates", {})
    if "top1" in ranked:
        print(
            f"held-out images among the {ranked['n_candidates']} live candidates ({ranked['n_ranked']} ranked): "
            f"top-1 {100 * ranked['top1']:.1f}%, top-5 {100 * ranked['top5']:.1f}%, median rank "
            f"{ranked['median_rank']:g} (chance {ranked['chance_median_rank']:g})"
        )
    elif ranked:
        print(f"live candidates: {ranked['note']}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    import torch

    from rtdecoder.calibration.pretrain import pretrain
    from rtdecoder.config import load_config

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    config = load_config(args.config)
    progress = not args.no_progress
    if args.data is not None:
        # a lab's own betas: the simulator is never imported on this path
        from rtdecoder.calibration.dataset import BetasFolder, parse_number_list

        names = [] if args.subjects in (None, "all") else [s.strip() for s in args.subjects.split(",")]
        subjects = [s for s in names if s] or None
        data = BetasFolder(args.data, subjects, parse_number_list(args.sessions, "--sessions"))
    else:
        from rtdecoder.phantom.generate import parse_index_list
        from rtdecoder.phantom.world import PhantomWorld

        subjects = parse_index_list(args.subjects or "0-6", config.phantom.n_subjects, "--subjects")
        sessions = parse_index_list(args.sessions, config.experiment.sessions_per_subject, "--sessions")
        data = PhantomWorld(config, progress=progress).pretraining_source(subjects, sessions)
    model_dir = pretrain(config, args.out, data=data, progress=progress, device=args.device)
    print(f"pretrained model: {model_dir}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from rtdecoder.bundle import SubjectBundle
    from rtdecoder.calibration.betas import find_runs
    from rtdecoder.calibration.calibrate import written_by_phantom
    from rtdecoder.calibration.evaluate import evaluate_session, format_table, session_images
    from rtdecoder.config import load_config
    from rtdecoder.errors import BundleError, ConfigError

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    for name in ("pool_size", "n_pools"):
        if getattr(args, name) < (2 if name == "pool_size" else 1):
            raise ConfigError(f"--{name.replace('_', '-')}: expected a positive count (got {getattr(args, name)})")
    bundle = SubjectBundle.load(args.bundle)
    config = load_config(args.config) if args.config else bundle.config
    bundle.check_run_config(config)  # a wrong config fails before any volume is read
    select = _entity_selection(args.select)
    find_runs(args.session, select)
    progress = not args.no_progress
    if args.images is not None:
        tokens, seen_image = session_images(config, args.session, args.images, select, progress=progress)
    elif written_by_phantom(args.session):
        # The phantom world: its bank is what the phantom's trials saw (their stim_ids are its ids).
        from rtdecoder.phantom.decoding import phantom_image_tokens
        from rtdecoder.phantom.world import PhantomWorld

        world = PhantomWorld(config, progress=progress)
        bank, known = world.bank, set(world.bank.ids)
        tokens = phantom_image_tokens(config, progress=progress, world=world)

        def seen_image(stim_id: str) -> object:  # uint8 (H, W, 3) or None
            return bank.image(bank.index_of(stim_id)) if stim_id in known else None
    else:
        raise BundleError(
            f"{args.session}: --images: required (the session's volumes were not written by the rtdecoder "
            "phantom, so its stimulus bank does not apply): pass the folder of the images shown, one "
            "<stim_id>.png/.jpg per trial's stim_id, or an embeddings file of them"
        )
    decoder = None
    if config.session.reconstruct and not args.no_reconstruct:
        # the decoder 'rtdecoder run' would use, generator included
        if config.generator.kind == "phantom":
            from rtdecoder.phantom.decoding import phantom_live_decoder

            decoder = phantom_live_decoder(bundle, config)
        else:
            from rtdecoder.compose import live_decoder_from_config

            decoder = live_decoder_from_config(bundle, config)
    result = evaluate_session(
        config, bundle, args.session, tokens, select=select, pool_size=args.pool_size, n_pools=args.n_pools,
        slow_after_onset_s=args.slow_s if args.slow_s > 0 else None, decoder=decoder, seen_image=seen_image,
        max_reconstructions=args.max_reconstructions, out_dir=args.out, progress=progress,
    )
    print(format_table(result))
    if args.out:
        print(f"\nJSON: {args.out}/evaluation.json")
    return 0


def _entity_selection(pairs: list[str]) -> dict[str, str] | None:
    """``--select task=nsd --select acq=mb`` as ``{"task": "nsd", "acq": "mb"}``."""
    from rtdecoder.errors import ConfigError

    selection = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not (sep and key.strip() and value.strip()):
            raise ConfigError(f"--select: expected ENTITY=VALUE, e.g. task=nsd (got {pair!r})")
        selection[key.strip()] = value.strip()
    return selection or None
