"""Choose ``training.finetune_shared_lr_scale`` without looking at the held-out subject's test images.

Two protocols, neither of which touches ``sub-08``'s test images (the table of
``bench_calibration.py``):

``dev-subject`` (default): as a development subject, take the last pretraining subject
(``sub-07``). Pretrain on the other six (``sub-01``..``sub-06``). Then calibrate ``sub-07`` on its
session 0, through the real volume path, once per candidate scale. Score each on ``sub-07``'s
test images, repeats over all sessions averaged, exactly as ``bench_calibration.py`` scores
``sub-08``. This measures what the table measures, on another subject.

``within-session``: split ``sub-08``'s calibration session by image. Fine-tune on 80% of its
training images and score on the other 20% (``--val-fraction``), among all of them. A lab can
do this with its own session, but it sees only one session: it cannot tell how a model carries
over to other sessions, which the test set averages.

The chosen scale is the one with the best mean of image and brain top-1. Prints a table and writes
``bench/results/finetune_lr_scale-<protocol>.json``. It uses the cache of ``bench_calibration.py``
and adds its own (the dev-subject pretraining and volumes). On 2 cores, ``dev-subject`` takes
about an hour from an empty cache (35 minutes of it the preset's 16 pretraining epochs; its table
in docs/calibration.md was measured with 8); ``within-session`` takes about 5 minutes once
``bench_calibration.py`` has run::

    python bench/bench_finetune_lr_scale.py                                # dev-subject, scales 1, 0.3, 0.1
    python bench/bench_finetune_lr_scale.py --protocol within-session --pretrained DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_calibration import HELD_OUT, evaluate_bundle, held_out_session_dirs, single_model, test_set

from rtdecoder.calibration.betas import estimate_session_betas
from rtdecoder.calibration.calibrate import (
    average_repeats,
    calibrate,
    predict_clip_tokens,
    retrieval_evaluation,
    zscore_stats,
)
from rtdecoder.calibration.pretrain import pretrain, subject_id
from rtdecoder.calibration.train import SubjectDataset, finetune
from rtdecoder.config import RTDecoderConfig, load_config
from rtdecoder.phantom.world import PhantomWorld

logger = logging.getLogger("bench_finetune_lr_scale")
DEV_SUBJECT = 6


def split_by_image(stim_index: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """True for rows whose image is in the validation share (every repeat of an image on one side)."""
    images = np.unique(stim_index)
    rng = np.random.default_rng(seed)
    n_val = max(2, round(val_fraction * len(images)))
    return np.isin(stim_index, rng.choice(images, size=n_val, replace=False))


def with_scale(config: RTDecoderConfig, scale: float) -> RTDecoderConfig:
    """One model (``training.ensemble_size`` 1) whose pretrained weights learn at ``scale``."""
    training = single_model(config, config.training.seed).training.model_copy(
        update={"finetune_shared_lr_scale": scale})
    return config.model_copy(update={"training": training})


def dev_subject_sessions(
    config: RTDecoderConfig, world: PhantomWorld, work: Path, pretrained_name: str = "pretrained-dev"
) -> tuple[list[int], Path, list[Path], np.ndarray, list]:
    """The development protocol's data: the pretraining subjects (all but ``sub-07``), the model
    pretrained on them (cached in ``work / pretrained_name``), ``sub-07``'s session folders, its
    mask and each session's betas."""
    pretrained = [s for s in range(7) if s != DEV_SUBJECT]
    model_dir = pretrain(config, work / pretrained_name, pretrained, range(config.experiment.sessions_per_subject),
                         world=world)
    runs = list(range(config.experiment.runs_per_session))
    session_dirs = held_out_session_dirs(config, world, work, runs, subject=DEV_SUBJECT)
    mask = world.subject(DEV_SUBJECT).mask
    sessions = [estimate_session_betas(d, config, mask, progress=False) for d in session_dirs]
    return pretrained, model_dir, session_dirs, mask, sessions


def dev_subject(config: RTDecoderConfig, world: PhantomWorld, work: Path, scales: list[float]) -> tuple[dict, list]:
    """Calibrate the development subject per scale; score on its test images over all sessions."""
    pretrained, model_dir, session_dirs, mask, sessions = dev_subject_sessions(config, world, work)
    test_z, test_tokens = test_set(sessions, world.embedding.tokens)
    sid = subject_id(DEV_SUBJECT)
    results = []
    for scale in scales:
        started = time.perf_counter()
        bundle_dir = work / f"bundle-dev-scale-{scale:g}"
        report = calibrate(with_scale(config, scale), session_dirs[0], bundle_dir, sid, mask, pretrained_dir=model_dir,
                           session=sessions[0], bank_tokens=world.embedding.tokens, embedding_name="phantom",
                           progress=False)
        scores = evaluate_bundle(bundle_dir, sid, test_z, test_tokens, report)
        scores.update(scale=scale, seconds=round(time.perf_counter() - started, 1),
                      n_train_trials=report.n_train_trials)
        results.append(scores)
        logger.info("scale %g: %s", scale, scores)
    setup = {"subject": sid, "pretrained_on": [subject_id(s) for s in pretrained], "pretrained": str(model_dir),
             "calibration_trials": results[0]["n_train_trials"], "scored_on": "test images, all sessions"}
    return setup, results


def within_session(config: RTDecoderConfig, world: PhantomWorld, work: Path, scales: list[float],
                   model_dir: Path, val_fraction: float, seed: int) -> tuple[dict, list]:
    """Fine-tune on part of sub-08's calibration session per scale; score on the rest of its images."""
    tokens = world.embedding.tokens
    sid = subject_id(HELD_OUT)
    session_dir = held_out_session_dirs(config, world, work, list(range(config.experiment.runs_per_session)))[0]
    session = estimate_session_betas(session_dir, config, world.subject(HELD_OUT).mask, progress=False)
    finite = np.all(np.isfinite(session.betas), axis=1)
    rows = np.flatnonzero(finite & ~session.is_test)  # test images stay untouched
    is_val = split_by_image(session.stim_index[rows], val_fraction, seed)
    fit_rows, val_rows = rows[~is_val], rows[is_val]
    mean, std = zscore_stats(session.betas[fit_rows])
    z = ((session.betas - mean) / std).astype(np.float32)
    val_images, val_z = average_repeats(z[val_rows], session.stim_index[val_rows])
    val_tokens = np.asarray(tokens[val_images], dtype=np.float32)
    dataset = SubjectDataset(sid, torch.from_numpy(z[fit_rows]), torch.from_numpy(tokens[session.stim_index[fit_rows]]),
                             torch.from_numpy(session.stim_index[fit_rows]))
    results = []
    for scale in scales:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="lr-scale-") as tmp:
            model, _ = finetune(model_dir, dataset, with_scale(config, scale).training, tmp, progress=False)
        scores = retrieval_evaluation(predict_clip_tokens(model, sid, val_z), val_tokens)
        scores.update(scale=scale, seconds=round(time.perf_counter() - started, 1))
        results.append(scores)
        logger.info("scale %g: %s", scale, scores)
    setup = {"subject": sid, "pretrained": str(model_dir), "fit_trials": int(fit_rows.size),
             "val_trials": int(val_rows.size), "val_images": int(len(val_images)), "split_seed": seed,
             "scored_on": f"{len(val_images)} training-type images of the calibration session held out"}
    return setup, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--protocol", choices=["dev-subject", "within-session"], default="dev-subject")
    parser.add_argument("--config", default="phantom")
    parser.add_argument("--work", default="rtdecoder-cache/bench-calibration", help="cache of bench_calibration.py")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.3, 0.1])
    parser.add_argument("--val-fraction", type=float, default=0.2, help="within-session: share of images held out")
    parser.add_argument("--seed", type=int, default=0, help="within-session: seed of the image split")
    parser.add_argument("--pretrained", help="within-session: a pretrained model folder (default: pretrain or cache)")
    parser.add_argument("--out", help="default bench/results/finetune_lr_scale-<protocol>.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)

    config = load_config(args.config)
    work = Path(args.work)
    world = PhantomWorld(config, progress=False)
    if args.protocol == "dev-subject":
        setup, results = dev_subject(config, world, work, args.scales)
    else:
        model_dir = Path(args.pretrained) if args.pretrained else pretrain(
            config, work / "pretrained", range(7), range(config.experiment.sessions_per_subject), world=world)
        setup, results = within_session(config, world, work, args.scales, model_dir, args.val_fraction, args.seed)
    best = max(results, key=lambda r: (r["image_top1"] + r["brain_top1"]) / 2)

    payload = {
        "benchmark": "finetune_lr_scale",
        "protocol": args.protocol,
        "config": args.config,
        "preset_scale": config.training.finetune_shared_lr_scale,
        "chosen_scale": best["scale"],
        "setup": setup,
        "results": results,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "processor": platform.processor()},
    }
    out = Path(args.out or f"bench/results/finetune_lr_scale-{args.protocol}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\n{args.protocol}: {setup['subject']}, scored on {setup['scored_on']}; "
          f"retrieval among {results[0]['pool_size']}")
    print(f"{'scale':>6} {'image top-1':>12} {'brain top-1':>12} {'seconds':>8}")
    for r in results:
        print(f"{r['scale']:>6g} {r['image_top1']:>12.1%} {r['brain_top1']:>12.1%} {r['seconds']:>8.0f}")
    print(f"chosen: {best['scale']:g} (preset: {config.training.finetune_shared_lr_scale:g})")


if __name__ == "__main__":
    main()
