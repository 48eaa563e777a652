"""``rtdecoder calibrate`` and ``rtdecoder pretrain``: build a subject bundle, build the shared model."""

from __future__ import annotations

import argparse


def add_calibration_commands(groups: argparse._SubParsersAction) -> None:
    """Register ``calibrate`` and ``pretrain`` on the top-level parser."""
    calibrate = groups.add_parser(
        "calibrate", help="one calibration session -> betas, statistics, fine-tuned model, subject bundle"
    )
    calibrate.add_argument("--config", default="phantom", help="preset name or YAML file (default: phantom)")
    calibrate.add_argument("--session", required=True, help="folder of run folders, each with volumes + events.tsv")
    calibrate.add_argument("--out", required=True, help="the subject bundle folder to write")
    calibrate.add_argument("--pretrained", help="pretrained model folder (rtdecoder pretrain); default: from scratch")
    calibrate.add_argument(
        "--images", help="folder of <stim_id>.png/.jpg stimulus images (default: the phantom world's bank)"
    )
    calibrate.add_argument("--subject-id", default="sub-08", help="adapter name (default: sub-08)")
    calibrate.add_argument(
        "--mask", help="0/1 NIfTI on the volumes' grid (default: the phantom subject's visual-cortex mask)"
    )
    calibrate.add_argument("--no-progress", action="store_true", help="no progress bars")
    calibrate.set_defaults(handler=_calibrate)

    pretrain = groups.add_parser("pretrain", help="train the shared model on the phantom world's pretraining subjects")
    pretrain.add_argument("--config", default="phantom", help="preset name or YAML file (default: phantom)")
    pretrain.add_argument("--out", required=True, help="cache folder; the model goes to OUT/model")
    pretrain.add_argument("--subjects", default="0-6", help="0-based subjects, e.g. 0-6 or 0,2 (default: 0-6)")
    pretrain.add_argument("--sessions", default="all", help="0-based sessions, e.g. 0-3 (default: all)")
    pretrain.add_argument("--no-progress", action="store_true", help="no progress bars")
    pretrain.set_defaults(handler=_pretrain)


def _calibrate(args: argparse.Namespace) -> int:
    import torch

    from calibration.betas import find_runs
    from calibration.calibrate import calibrate
    from calibration.pretrain import subject_index
    from rtdecoder.config import load_config
    from rtdecoder.errors import BundleError

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    config = load_config(args.config)
    find_runs(args.session)  # a wrong folder fails now, not after the mask is built
    mask = args.mask
    if mask is None:
        if args.images is not None:
            raise BundleError("calibrate: --mask: required with --images (the phantom mask fits phantom data only)")
        from rtdecoder.phantom.subjects import PhantomSubject

        mask = PhantomSubject.build(config, subject_index(args.subject_id, config.phantom.n_subjects)).mask
    report = calibrate(
        config, args.session, args.out, args.subject_id, mask,
        pretrained_dir=args.pretrained, images_dir=args.images, progress=not args.no_progress,
    )
    evaluation = report.evaluation
    print(f"bundle: {report.bundle_dir}")
    print(f"training trials: {report.n_train_trials}; time: " + ", ".join(
        f"{k} {v:.0f} s" for k, v in report.seconds.items()))
    if "image_top1" in evaluation:
        print(
            f"held-out retrieval among {evaluation['pool_size']} ({evaluation['n_test_images']} images): "
            f"image {100 * evaluation['image_top1']:.1f}%, brain {100 * evaluation['brain_top1']:.1f}% "
            f"(chance {100 * evaluation['chance']:.1f}%)"
        )
    else:
        print(f"evaluation: {evaluation.get('note', 'none')}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    import torch

    from calibration.pretrain import pretrain
    from rtdecoder.config import load_config
    from rtdecoder.phantom.generate import parse_index_list

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    config = load_config(args.config)
    subjects = parse_index_list(args.subjects, config.phantom.n_subjects, "--subjects")
    sessions = parse_index_list(args.sessions, config.experiment.sessions_per_subject, "--sessions")
    model_dir = pretrain(config, args.out, subjects, sessions, progress=not args.no_progress)
    print(f"pretrained model: {model_dir}")
    return 0
