"""One-session calibration on the phantom world: retrieval of the held-out subject, four ways.

For the held-out subject (phantom subject 7, ``sub-08``), test images averaged over their repeats,
image and brain retrieval top-1 among 300 (all test images when fewer) for

(a) the shared model pretrained on subjects 0-6, then calibrated on one session (``calibrate``);
(b) the same session, trained from scratch with the same recipe;
(c) ridge regression voxels -> flattened image tokens (sklearn ``RidgeCV``, alpha by
    leave-one-out CV), the Brain-Diffuser approach, on the same session's betas;
(d) the pretrained model fine-tuned on all of the subject's sessions (the same number of optimiser
    steps as (a): ``training.epochs`` divided by the number of sessions).

Data paths. Every session of the held-out subject goes through the real path: simulated volumes
written as one NIfTI per volume, read back, motion-corrected, masked, per-voxel HRF and offline
GLM (:func:`rtdecoder.calibration.betas.estimate_session_betas`), then z-scored per session with that
session's training trials. (a), (b), (c) train on session 0; (d) on every session; the test set
is the shared images (``experiment.n_test_images`` x ``test_repeats``) of every session, repeats
averaged, never trained on. Pretraining subjects come from direct simulation (``phantom generate
--level betas``), as MindEye2 pretrains on released betas.

``--seeds N`` calibrates (a) and (b) N times, with ``training.seed`` = seed, seed+1, ... (the
new adapter's initial weights, the shuffling, mixup and dropout draws), and reports the means
with each seed's figures in the JSON: one calibration is a single draw, and its figures move by
a few points from seed to seed.

Also measured: pretraining seconds per epoch, calibration seconds (betas, training) and the peak
resident memory of the process (``resource.getrusage``). Prints a table and writes
``bench/results/calibration.json``. Sizes can be reduced for a quick run (``--runs``,
``--pretrain-sessions``, ``--epochs``, ``--hidden-dim``); the JSON records what was used.

Run from the repository root::

    python bench/bench_calibration.py --seeds 3         # the phantom preset as configured, 3 seeds
    python bench/bench_calibration.py --runs 4 --pretrain-sessions 0 --epochs 10 --hidden-dim 128 \
        --no-prior --pretrain-batch-size 42
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

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
from rtdecoder.config import load_config
from rtdecoder.embedding.cache import ImageTokens
from rtdecoder.glm.events import write_events_tsv
from rtdecoder.phantom.decoding import phantom_image_tokens
from rtdecoder.phantom.generate import parse_index_list
from rtdecoder.phantom.scanner import volumes_from_array, write_run
from rtdecoder.phantom.world import PhantomWorld

logger = logging.getLogger("bench_calibration")
HELD_OUT = 7


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="phantom")
    parser.add_argument("--work", default="rtdecoder-cache/bench-calibration", help="cache of sessions and models")
    parser.add_argument("--runs", type=int, help="runs of the calibration session (default: all)")
    parser.add_argument("--pretrain-sessions", default="all", help="sessions of each pretraining subject")
    parser.add_argument("--pretrain-runs", type=int, help="runs per session for pretraining and (d) (default: --runs)")
    parser.add_argument("--epochs", type=int, help="override training.epochs")
    parser.add_argument("--hidden-dim", type=int, help="override model.hidden_dim")
    parser.add_argument("--no-prior", action="store_true", help="model.use_prior: false (retrieval needs no prior)")
    parser.add_argument("--pretrain-batch-size", type=int, help="training.batch_size for pretraining only")
    parser.add_argument("--seeds", type=int, default=1,
                        help="calibrate (a) and (b) with this many training seeds (seed, seed+1, ...); means reported")
    parser.add_argument("--out", default="bench/results/calibration.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)

    overrides: dict = {}
    if args.epochs:
        overrides["training"] = {"epochs": args.epochs}
    if args.hidden_dim or args.no_prior:
        overrides["model"] = {k: v for k, v in (("hidden_dim", args.hidden_dim), ("use_prior", False if
                              args.no_prior else None)) if v is not None}
    config = load_config(args.config, overrides or None)
    exp = config.experiment
    runs = list(range(args.runs if args.runs else exp.runs_per_session))
    pre_sessions = parse_index_list(args.pretrain_sessions, exp.sessions_per_subject, "--pretrain-sessions")
    work = Path(args.work)
    world = PhantomWorld(config, progress=False)
    # The bank's tokens with their stim_ids: trials are matched to images by stim_id, as a lab's are.
    tokens = phantom_image_tokens(config, world=world)
    sid = subject_id(HELD_OUT)
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    pre_config = config
    if args.pretrain_batch_size:
        pre_config = config.model_copy(update={"training": config.training.model_copy(
            update={"pretrain_batch_size": args.pretrain_batch_size})})
    # fewer runs per session for pretraining and (d) only to save time; recorded in the JSON
    pretrain_runs = args.pretrain_runs or args.runs
    runs_arg = list(range(pretrain_runs)) if pretrain_runs else None
    model_dir = pretrain(pre_config, work / "pretrained", range(7), pre_sessions, world=world, runs=runs_arg)
    record = json.loads((work / "pretrained" / "pretrain.json").read_text())
    seconds["pretrain_total_incl_cache"] = time.perf_counter() - started

    started = time.perf_counter()
    n_sessions = exp.sessions_per_subject
    session_dirs = held_out_session_dirs(config, world, work, runs)
    seconds["simulate_and_write_volumes_all_sessions"] = time.perf_counter() - started
    mask = world.subject(HELD_OUT).mask
    started = time.perf_counter()
    session = estimate_session_betas(session_dirs[0], config, mask, progress=True)
    seconds["calibration_betas"] = time.perf_counter() - started
    sessions = [session] + [
        estimate_session_betas(session_dirs[k], config, mask, progress=True) for k in range(1, n_sessions)
    ]

    test_z, test_tokens = test_set(sessions, tokens)
    results = {}
    seeds = [config.training.seed + k for k in range(args.seeds)]
    for name, pretrained in (("a_pretrained_1_session", model_dir), ("b_scratch_1_session", None)):
        per_seed = []
        for seed in seeds:
            seeded = config.model_copy(update={"training": config.training.model_copy(update={"seed": seed})})
            bundle_dir = work / f"bundle-{name[0]}" if seed == seeds[0] else work / f"bundle-{name[0]}-seed{seed}"
            started = time.perf_counter()
            report = calibrate(seeded, session_dirs[0], bundle_dir, sid, mask, pretrained_dir=pretrained,
                               session=session, images=tokens)
            seconds[f"calibration_training_{name[0]}_seed{seed}"] = time.perf_counter() - started
            per_seed.append(evaluate_bundle(bundle_dir, sid, test_z, test_tokens, report) | {"seed": seed})
        results[name] = _mean_over_seeds(per_seed)
    started = time.perf_counter()
    results["c_ridge_1_session"] = _ridge(session, tokens, test_z, test_tokens)
    seconds["ridge"] = time.perf_counter() - started
    started = time.perf_counter()
    results["d_pretrained_all_sessions"] = _all_sessions(sessions, tokens, model_dir, config, work, test_z, test_tokens)
    seconds["all_sessions_training"] = time.perf_counter() - started

    payload = {
        "benchmark": "calibration",
        "config": args.config,
        "overrides": overrides,
        "calibration_runs": len(runs),
        "pretrain_and_d_runs_per_session": len(runs_arg) if runs_arg else exp.runs_per_session,
        "calibration_train_trials": report.n_train_trials,
        "seeds": seeds,
        "pretrain": record,
        "n_test_images": int(len(test_z)),
        "results": results,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "processor": platform.processor()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    _print_table(payload)


def held_out_session_dirs(
    config, world: PhantomWorld, work: Path, runs: list[int], subject: int = HELD_OUT
) -> list[Path]:
    """A subject's session folders under ``work`` (the held-out one by default), written when missing."""
    # The volumes depend on the world, scanner and experiment; a changed preset gets fresh folders.
    volumes_key = hashlib.sha256(json.dumps([config.phantom.model_dump(), config.scanner.model_dump(),
                                             config.experiment.model_dump()], sort_keys=True).encode()).hexdigest()[:12]
    root = work / (f"volumes-{volumes_key}" if subject == HELD_OUT else f"volumes-{volumes_key}-{subject_id(subject)}")
    session_dirs = [root / f"session-{k}" for k in range(config.experiment.sessions_per_subject)]
    for session_index, session_dir in enumerate(session_dirs):
        _write_session(world, session_dir, subject, session_index, runs)
    return session_dirs


def _write_session(world: PhantomWorld, session_dir: Path, subject: int, session: int, runs: list[int]) -> None:
    """One session of a subject, one NIfTI per volume per run folder (kept if present)."""
    for run in runs:
        run_dir = session_dir / f"run-{run + 1:02d}"
        if (run_dir / "events.tsv").is_file():
            continue
        simulated = world.simulate_run(subject, session, run)
        write_run(
            volumes_from_array(simulated.volumes, simulated.affine, simulated.tr_s, simulated.slice_times_s),
            run_dir, format="nifti", speed=1e6, sleep=lambda _s: None, partial_write=False,
        )
        write_events_tsv(simulated.trials, run_dir / "events.tsv")


def _zscored(session) -> tuple[np.ndarray, np.ndarray]:
    """A session's finite betas z-scored with its own training trials, and which rows those are."""
    finite = np.all(np.isfinite(session.betas), axis=1)
    mean, std = zscore_stats(session.betas[finite & ~session.is_test])
    return (session.betas - mean) / std, finite


def trial_tokens(trials: list, tokens: ImageTokens | np.ndarray) -> np.ndarray:
    """Image tokens of each trial, shape (n_trials, T, D), float32: by stim_id from an :class:`ImageTokens`,
    or by stim_index from a bare phantom bank array (``world.embedding.tokens``)."""
    if isinstance(tokens, ImageTokens):
        return tokens.tokens_of([t.stim_id for t in trials])
    return np.asarray(tokens[[t.stim_index for t in trials]], dtype=np.float32)


def test_set(sessions: list, tokens: ImageTokens | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Test-image betas of every session (GLM path), repeats (trials of one stim_id) averaged, and their tokens."""
    betas, trials = [], []
    for session in sessions:
        z, finite = _zscored(session)
        keep = finite & session.is_test
        betas.append(z[keep])
        trials.extend(t for t, k in zip(session.trials, keep, strict=True) if k)
    images, mean_z = average_repeats(np.concatenate(betas), [t.stim_id for t in trials])
    first = {}
    for trial in trials:
        first.setdefault(trial.stim_id, trial)
    return mean_z, trial_tokens([first[str(image)] for image in images], tokens)


def evaluate_bundle(bundle_dir: Path, sid: str, test_z, test_tokens, report) -> dict:
    """Retrieval of a saved bundle on the averaged test betas, with its in-session evaluation."""
    from rtdecoder.bundle import SubjectBundle

    model = SubjectBundle.load(bundle_dir).load_model()
    result = retrieval_evaluation(predict_clip_tokens(model, sid, test_z), test_tokens)
    result["in_session_held_out"] = report.evaluation
    result["seconds"] = {k: round(v, 1) for k, v in report.seconds.items()}
    return result


def _mean_over_seeds(per_seed: list[dict]) -> dict:
    """Mean image and brain top-1 over calibrations that differ only in ``training.seed``."""
    result = {key: round(float(np.mean([r[key] for r in per_seed])), 4) for key in ("image_top1", "brain_top1")}
    result.update(pool_size=per_seed[0]["pool_size"], per_seed=per_seed)
    return result


def _ridge(session, tokens: ImageTokens | np.ndarray, test_z: np.ndarray, test_tokens: np.ndarray) -> dict:
    from sklearn.linear_model import RidgeCV

    z, finite = _zscored(session)
    keep = finite & ~session.is_test
    y = trial_tokens([t for t, k in zip(session.trials, keep, strict=True) if k], tokens).reshape(int(keep.sum()), -1)
    ridge = RidgeCV(alphas=np.logspace(1, 6, 11)).fit(z[keep], y)
    predicted = ridge.predict(test_z).reshape(test_tokens.shape).astype(np.float32)
    result = retrieval_evaluation(predicted, test_tokens)
    result["alpha"] = float(ridge.alpha_)
    return result


def _all_sessions(sessions: list, tokens, model_dir, config, work: Path, test_z, test_tokens) -> dict:
    sid = subject_id(HELD_OUT)
    betas, trials = [], []
    for session in sessions:
        z, finite = _zscored(session)
        keep = finite & ~session.is_test
        betas.append(z[keep].astype(np.float32))
        trials.extend(t for t, k in zip(session.trials, keep, strict=True) if k)
    betas_all = np.concatenate(betas)
    _, image_codes = np.unique([t.stim_id for t in trials], return_inverse=True)
    dataset = SubjectDataset(sid, torch.from_numpy(betas_all), torch.from_numpy(trial_tokens(trials, tokens)),
                             torch.from_numpy(image_codes.astype(np.int64)))
    # As many optimiser steps as the one-session calibration: the epochs are shared over the sessions.
    recipe = config.training.model_copy(update={"epochs": max(1, config.training.epochs // len(sessions))})
    model, _ = finetune(model_dir, dataset, recipe, work / "all-sessions")
    result = retrieval_evaluation(predict_clip_tokens(model, sid, test_z), test_tokens)
    result["n_train_trials"] = int(len(betas_all))
    result["epochs"] = recipe.epochs
    return result


def _print_table(payload: dict) -> None:
    print(f"\nheld-out subject sub-08, {payload['n_test_images']} test images (repeats averaged), "
          f"calibration: {payload['calibration_runs']} runs, {payload['calibration_train_trials']} training trials")
    print(f"{'setting':<30} {'image top-1':>12} {'brain top-1':>12} {'pool':>6}")
    for name, result in payload["results"].items():
        spread = ""
        if len(result.get("per_seed", [])) > 1:
            spread = "  seeds: " + ", ".join(f"{100 * r['image_top1']:.1f}/{100 * r['brain_top1']:.1f}"
                                             for r in result["per_seed"])
        print(f"{name:<30} {100 * result['image_top1']:>11.1f}% {100 * result['brain_top1']:>11.1f}% "
              f"{result['pool_size']:>6}{spread}")
    pre = payload["pretrain"]
    print(f"pretraining: {pre['train_s_per_epoch']} s/epoch ({pre['epochs']} epochs, {sum(pre['n_trials'].values())} "
          f"trials of {len(pre['subjects'])} subjects)")
    print("seconds: " + ", ".join(f"{k} {v}" for k, v in payload["seconds"].items()))
    print(f"peak memory: {payload['peak_rss_mb']} MB")


if __name__ == "__main__":
    main()
