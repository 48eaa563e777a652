"""Does averaging several calibrations' predictions help? Measured on the development subject only.

On the held-out subject the three seeds' calibrations of ``bench_calibration.py``, their predicted
tokens averaged, retrieved about 3 points better than each alone. A recipe is chosen on a
development subject, never on the held-out one, so this bench repeats the measurement on
``sub-07`` with the ``dev-subject`` protocol of ``bench_finetune_lr_scale.py``: pretrain on
``sub-01``..``sub-06``, calibrate ``sub-07`` on its session 0 through the real volume path once per
training seed (the preset's recipe otherwise), and score on its test images, repeats over all
sessions averaged, among 300: each seed (one model each, ``training.ensemble_size`` 1), their
mean, and the ensemble: the bundle of the seeds' models decoded together, as ``calibrate`` writes it
with ``training.ensemble_size`` N (:class:`~rtdecoder.decode.ensemble.ModelEnsemble`). This is the
measurement the phantom preset's ``ensemble_size: 3`` was chosen on.

``--sizes 2,3,4,5`` (with ``--seeds 5``) also scores the ensembles of the first 2, 3, ... seeds:
how many models are worth their calibration time.

``--live`` adds the live figures (fast / slow / end of run; ``rtdecoder evaluate``'s path) of the
first seed's bundle and of the ensemble on ``sub-07``'s session 1, which neither saw.

``--pretrain-epochs N`` pretrains for N epochs instead of the preset's ``training.pretrain_epochs``,
into its own cache folders (``pretrained-dev-<N>ep``, ``bundle-dev-<N>ep-*``) and JSON
(``seed_ensemble-dev-subject-pretrain<N>ep.json``): how the pretraining length was chosen.
``--epochs N`` calibrates for N epochs instead of the preset's ``training.epochs`` (the same pretrained
model; bundles ``bundle-dev[-<P>ep]-cal<N>ep-*``, JSON ``...-cal<N>ep.json``): how the calibration
length was chosen. ``--live-beta-fraction F`` calibrates with ``training.live_beta_fraction`` F (bundles
``bundle-dev[...]-live<F>-*``, JSON ``...-live<F>.json``; ``0``: final betas only): how the live betas' share was
chosen.

Every figure is also given among 100 (``among_100`` in the JSON; the last column of the table).

Prints a table and writes ``bench/results/seed_ensemble-dev-subject.json``. It shares
``bench_finetune_lr_scale.py``'s cache (the dev pretraining and volumes); about 50 minutes on 2
cores from an empty cache (35 of them the preset's 16 pretraining epochs), 15 with it::

    python bench/bench_seed_ensemble.py --seeds 3 [--live] [--sizes 2,3 --seeds 3] [--pretrain-epochs 16]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch
from bench_calibration import (
    ensemble_bundle,
    evaluate_bundle,
    live_evaluation,
    percent_pair,
    print_live,
    seed_means,
    single_model,
    test_set,
)
from bench_finetune_lr_scale import DEV_SUBJECT, dev_subject_sessions

from rtdecoder.calibration.calibrate import calibrate
from rtdecoder.calibration.pretrain import subject_id
from rtdecoder.config import load_config
from rtdecoder.phantom.decoding import phantom_image_tokens
from rtdecoder.phantom.world import PhantomWorld

logger = logging.getLogger("bench_seed_ensemble")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="phantom")
    parser.add_argument("--work", default="rtdecoder-cache/bench-calibration", help="cache of bench_calibration.py")
    parser.add_argument("--seeds", type=int, default=3, help="calibrations, training.seed = seed, seed+1, ...")
    parser.add_argument("--live", action="store_true", help="also the live figures on sub-07's session 1")
    parser.add_argument("--sizes", default="", help="also the ensembles of the first N seeds, e.g. 2,3,4,5")
    parser.add_argument("--pretrain-epochs", type=int,
                        help="override training.pretrain_epochs (its own cache folders: pretrained-dev-<N>ep, ...)")
    parser.add_argument("--epochs", type=int,
                        help="override training.epochs, the calibration's (its own bundles: bundle-dev-cal<N>ep-*)")
    parser.add_argument("--live-beta-fraction", type=float,
                        help="override training.live_beta_fraction (its own bundles: bundle-dev[...]-live<F>-*)")
    parser.add_argument("--out",
                        help="JSON (default bench/results/seed_ensemble-dev-subject[-pretrain<N>ep][-cal<N>ep].json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)

    training = {key: value for key, value in (("pretrain_epochs", args.pretrain_epochs), ("epochs", args.epochs),
                                              ("live_beta_fraction", args.live_beta_fraction))
                if value is not None}
    config = load_config(args.config, {"training": training} if training else None)
    # Another pretraining length gets its own pretrained model and bundles, beside the preset's;
    # another calibration length its own bundles.
    tag = f"-{args.pretrain_epochs}ep" if args.pretrain_epochs else ""
    calibration_tag = ((f"-cal{args.epochs}ep" if args.epochs else "")
                       + (f"-live{args.live_beta_fraction:g}" if args.live_beta_fraction is not None else ""))
    bundle_tag = tag + calibration_tag
    work = Path(args.work)
    world = PhantomWorld(config, progress=False)
    tokens = phantom_image_tokens(config, world=world)
    pretrained, model_dir, session_dirs, mask, sessions = dev_subject_sessions(config, world, work,
                                                                               f"pretrained-dev{tag}")
    test_z, test_tokens = test_set(sessions, tokens)
    sid = subject_id(DEV_SUBJECT)
    per_seed, bundle_dirs = [], []
    for seed in range(config.training.seed, config.training.seed + args.seeds):
        started = time.perf_counter()
        seeded = single_model(config, seed)
        bundle_dir = work / f"bundle-dev{bundle_tag}-seed{seed}"
        report = calibrate(seeded, session_dirs[0], bundle_dir, sid, mask, pretrained_dir=model_dir,
                           session=sessions[0], images=tokens, progress=False)
        scores = evaluate_bundle(bundle_dir, sid, test_z, test_tokens, report, image_tokens=tokens)
        scores.update(seed=seed, seconds=round(time.perf_counter() - started, 1))
        per_seed.append(scores)
        bundle_dirs.append(bundle_dir)
        logger.info("seed %d: image %.3f, brain %.3f", seed, scores["image_top1"], scores["brain_top1"])
    ensemble_dir, ensemble = None, {}
    if len(bundle_dirs) > 1:  # one seed: no ensemble to score
        ensemble_dir = ensemble_bundle(bundle_dirs, work / f"bundle-dev{bundle_tag}-ensemble")
        ensemble = evaluate_bundle(ensemble_dir, sid, test_z, test_tokens, image_tokens=tokens) | {
            "n_models": len(bundle_dirs)}
    by_size = {}
    for size in sorted({int(n) for n in args.sizes.split(",") if n.strip()}):
        if not 2 <= size <= len(bundle_dirs):
            raise SystemExit(f"--sizes: {size} is not between 2 and --seeds {len(bundle_dirs)}")
        folder = ensemble_bundle(bundle_dirs[:size], work / f"bundle-dev{bundle_tag}-ensemble-{size}")
        by_size[size] = evaluate_bundle(folder, sid, test_z, test_tokens, image_tokens=tokens)
    live = {}
    if args.live:
        for name, bundle_dir in (("first_seed", bundle_dirs[0]), ("seed_ensemble", ensemble_dir)):
            if bundle_dir is not None:
                live[name] = live_evaluation(config, bundle_dir, session_dirs[1], sessions[1], tokens)
    mean = seed_means(per_seed)
    payload = {
        "benchmark": "seed_ensemble",
        "protocol": "dev-subject",
        "config": args.config,
        "subject": sid,
        "pretrained_on": [subject_id(s) for s in pretrained],
        "pretrain_epochs": config.training.pretrain_epochs,
        "calibration_epochs": config.training.epochs,
        "live_beta_fraction": config.training.live_beta_fraction,
        "per_seed": per_seed,
        "mean_of_seeds": mean,
        "ensemble": ensemble,
        **({"ensembles_of_the_first_seeds": by_size} if by_size else {}),
        **({"live": live} if live else {}),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "processor": platform.processor()},
    }
    default_out = ("bench/results/seed_ensemble-dev-subject" + (f"-pretrain{tag[1:]}" if tag else "")
                   + calibration_tag + ".json")
    out = Path(args.out or default_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\n{sid} (development subject), retrieval among {per_seed[0]['pool_size']} test images, repeats averaged "
          f"(among 100 beside it), pretrained {config.training.pretrain_epochs} epochs, "
          f"calibrated {config.training.epochs}")
    print(f"{'calibration':<30} {'image top-1':>12} {'brain top-1':>12} {'among 100':>12}")

    def row(label: str, scores: dict) -> None:
        among_100 = scores.get("among_100")
        beside = percent_pair(among_100) if among_100 else ""
        print(f"{label:<30} {scores['image_top1']:>12.1%} {scores['brain_top1']:>12.1%} {beside:>12}")

    for r in per_seed:
        row(f"seed {r['seed']}", r)
    row("mean of the seeds", mean)
    if ensemble:
        row("ensemble (one bundle)", ensemble)
    for size, scores in by_size.items():
        row(f"first {size} seeds in one bundle", scores)
    for name, figures in live.items():
        print_live(name, figures)


if __name__ == "__main__":
    main()
