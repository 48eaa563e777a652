"""Plain cosine against CSLS hubness correction (``candidates.hubness_k``), on the development subject.

How ``candidates.hubness_k`` was chosen (:mod:`rtdecoder.decode.hubness`). The model is the
pretrained model of ``bench_calibration.py``'s cache (``<work>/pretrained``: ``sub-01``..``sub-07``,
all sessions), whose ``sub-07`` adapter stands for a calibrated development subject; ``sub-08``,
the held-out subject, is not touched. ``sub-07``'s betas are simulated directly, as pretraining
reads them (``phantom generate --level betas``), z-scored per session with its training trials.
The hubness reference is what ``calibrate`` builds: the model's predictions of the training trials
and the training images' tokens. Caveat: this adapter was trained on all four of ``sub-07``'s
sessions (about four times a calibration's trials), so its predictions are better than a
one-session calibration's; the held-out figures of the change are in ``bench_calibration.py``'s
rows (CSLS, with the plain-cosine figures beside them).

Scored: image and brain top-1 (``rtdecoder.decode.metrics.retrieval_top1``, 30 random pools) of the
test images with their repeats averaged, among 100 and 300, and of single trials among 100 (each
repeat scored apart, then averaged), for plain cosine and for CSLS with each ``k`` of ``--ks``.

Prints a table and writes ``bench/results/hubness-dev-subject.json``; about a minute with the cache
(the pretrained model comes from ``python bench/bench_calibration.py``, which makes it)::

    python bench/bench_hubness.py [--ks 1,5,10,20,50]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np
import torch

from rtdecoder.calibration.calibrate import predict_clip_tokens
from rtdecoder.calibration.dataset import test_trial_betas, training_betas
from rtdecoder.calibration.pretrain import subject_id
from rtdecoder.config import load_config
from rtdecoder.decode.hubness import HubnessReference
from rtdecoder.decode.metrics import mean_over_repeats, retrieval_top1
from rtdecoder.decode.model import MindEye2
from rtdecoder.phantom.decoding import phantom_image_tokens
from rtdecoder.phantom.world import PhantomWorld, simulate_subject_betas

logger = logging.getLogger("bench_hubness")

DEV_SUBJECT = 6  # sub-07


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="phantom")
    parser.add_argument("--work", default="rtdecoder-cache/bench-calibration", help="bench_calibration.py's cache")
    parser.add_argument("--ks", default="1,5,10,20,50", help="CSLS neighbourhood sizes")
    parser.add_argument("--out", default="bench/results/hubness-dev-subject.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    started = time.perf_counter()

    config = load_config(args.config)
    model_dir = Path(args.work) / "pretrained" / "model"
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"{model_dir}: no pretrained model; run python bench/bench_calibration.py first")
    model = MindEye2.from_pretrained(model_dir)
    world = PhantomWorld(config, progress=False)
    tokens = phantom_image_tokens(config, world=world)
    sid = subject_id(DEV_SUBJECT)
    exp = config.experiment
    subject, _ = simulate_subject_betas(world, DEV_SUBJECT, range(exp.sessions_per_subject),
                                        range(exp.runs_per_session))
    train = training_betas(subject)
    test_z, test_ids = test_trial_betas(subject)
    train_predicted = predict_clip_tokens(model, sid, train.betas)
    test_predicted = predict_clip_tokens(model, sid, test_z)
    images, averaged = mean_over_repeats(test_predicted, test_ids)
    targets = tokens.tokens_of([str(i) for i in images])
    train_images = tokens.tokens_of(sorted({str(s) for s in train.stim_id}))
    repeats = repeat_rows(test_ids, images)

    rows: dict[str, dict] = {"cosine": scores(averaged, targets, test_predicted, repeats, None)}
    for k in (int(k) for k in args.ks.split(",") if k.strip()):
        reference = HubnessReference.from_predictions(train_predicted, train_images, k)
        rows[f"csls_k{k}"] = scores(averaged, targets, test_predicted, repeats, reference)

    payload = {
        "benchmark": "hubness",
        "subject": sid,
        "model": str(model_dir),
        "n_train_trials": int(len(train.betas)),
        "n_train_images": int(len(train_images)),
        "n_test_images": int(len(images)),
        "n_test_trials": int(len(test_ids)),
        "results": rows,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "processor": platform.processor()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\n{sid} (development subject), {len(images)} test images x {len(test_ids) // len(images)}, reference: "
          f"{len(train.betas)} training trials' predictions, {len(train_images)} training images")
    print(f"{'scores':<12} {'averaged, among 100':>20} {'averaged, among 300':>20} {'single trial, among 100':>24}")
    for name, row in rows.items():
        print(f"{name:<12} {pair(row['averaged_100']):>20} {pair(row['averaged_300']):>20} "
              f"{pair(row['single_trial_100']):>24}")
    print("image / brain top-1, %")


def repeat_rows(test_ids: np.ndarray, images: np.ndarray) -> list[np.ndarray]:
    """Rows of ``test_ids`` for the r-th repeat of each image (in ``images`` order), r = 0, 1, ...;
    only repeats every image has."""
    by_image = [np.flatnonzero(test_ids == image) for image in images]
    n_repeats = min(len(rows) for rows in by_image)
    return [np.array([rows[r] for rows in by_image]) for r in range(n_repeats)]


def scores(averaged, targets, single, repeats, reference: HubnessReference | None) -> dict:
    """Top-1 both ways: averaged repeats among 100 and 300, single trials among 100 (mean over repeats)."""

    def top1(predicted: np.ndarray, pool_size: int) -> dict:
        penalties = {} if reference is None else {"image_penalty": reference.image_penalty(targets),
                                                  "query_penalty": reference.query_penalty(predicted)}
        result = retrieval_top1(predicted, targets, pool_size, 30, **penalties)
        return {"image_top1": round(result.image, 4), "brain_top1": round(result.brain, 4),
                "pool_size": result.pool_size}

    per_repeat = [top1(single[rows], 100) for rows in repeats]
    return {
        "averaged_100": top1(averaged, 100),
        "averaged_300": top1(averaged, 300),
        "single_trial_100": {key: round(float(np.mean([r[key] for r in per_repeat])), 4)
                             for key in ("image_top1", "brain_top1")} | {"n_repeats": len(per_repeat)},
    }


def pair(row: dict) -> str:
    return f"{100 * row['image_top1']:.1f}/{100 * row['brain_top1']:.1f}"


if __name__ == "__main__":
    main()
