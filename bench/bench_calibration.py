"""One-session calibration on the phantom world: retrieval of the held-out subject, four ways.

For the held-out subject (phantom subject 7, ``sub-08``), test images averaged over their repeats,
image and brain retrieval top-1 among 300 (all test images when fewer; among 100 beside it) for

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

``--steps`` adds the betas' table: for the calibration session, each trial's betas against the
simulation's true betas (per voxel, the correlation over trials, median over voxels) for each step
of the GLM: the canonical HRF; the HRF library chosen by single-trial R^2 (the rule before issue
13); the library with the canonical shape chosen by cross-validation (the preset); + GLMdenoise;
+ fractional ridge.

``--variants`` adds retrieval rows of (a) (one seed each, the first) with the betas of those last
steps, every session's betas estimated the same way: (a) + GLMdenoise; (a) + GLMdenoise +
fractional ridge; and (a) with the automatic mask (``calibrate --mask auto``: the
``voxel_selection.n_voxels`` most reliable voxels of the EPI brain mask, no phantom mask), whose
test betas are estimated on the bundle's mask. Names after it measure only those rows
(``--variants a_auto_mask``).

``--ceiling`` adds (c) trained and scored on the simulation's true response amplitudes instead of
the measured betas (no scanner noise, motion or GLM; the brain's own trial-to-trial variability
kept): the ridge's ceiling on this world, as the NSD-like world's "noiseless betas" row.

``--live`` adds the live figures of (a) (first seed) on the held-out subject's session 1, a
session the bundle never saw, through the front end ``rtdecoder run`` builds from the bundle (its
motion reference, statistics and HRFs; :func:`rtdecoder.calibration.evaluate.evaluate_session`):
single-trial image and brain retrieval, top-1 and top-5, at the first beta ("fast", about 8 s
after onset), at the latest beta at most 29.5 s after onset ("slow") and at the run's end, among
each run's images and among the session's test images; with the same session's test repeats
averaged (final betas) beside them, and those of the offline calibration path on the same session
(its own motion reference), z-scored with the bundle's statistics, for comparison.
``--live-only`` measures (a) and the live figures only (no (b), (c), (d); ``--seeds`` seeds, one by
default, and their ensemble; JSON in ``bench/results/calibration-live.json``).

``--seeds N`` calibrates (a) and (b) N times as single models (``training.ensemble_size`` 1),
with ``training.seed`` = seed, seed+1, ... (the new adapter's initial weights, the shuffling,
mixup and dropout draws), and reports the means with each seed's figures in the JSON: one
calibration is a single draw, and its figures move by a few points from seed to seed. With N > 1,
the ``_seed_ensemble`` rows score the bundle of the N models decoded together
(:class:`~rtdecoder.decode.ensemble.ModelEnsemble`): what ``calibrate`` writes with
``training.ensemble_size`` N (the phantom preset's 3), its members being exactly these
calibrations. ``--live`` then measures both bundle (a) of the first seed and the ensemble.

``--reuse-bundles`` scores the (a) and (b) bundles already in ``--work`` whose saved
``config.json`` is this run's config, seed included, instead of calibrating them again (a run
with more seeds then trains only the new ones; their rows carry ``"reused": true`` and no
training seconds). The pretrained model and the sessions' volumes are cached either way.

Retrieval ranks as the live decoder ranks (``candidates.hubness_k`` above 0: CSLS against the
bundle's hubness reference, :mod:`rtdecoder.decode.hubness`); the rows of (a), (b) and the variants
carry the same models' plain-cosine figures beside them (``cosine`` in the JSON, "(plain cosine)"
in the table), and ``--live`` then adds the live figures of the same bundles ranked by plain
cosine (``a_first_seed_cosine``, ``a_seed_ensemble_cosine``). The ridge (c) is scored by plain cosine.

Also measured: pretraining seconds per epoch, calibration seconds (betas, training) and the peak
resident memory of the process (``resource.getrusage``). Prints a table and writes
``bench/results/calibration.json``. Sizes can be reduced for a quick run (``--runs``,
``--pretrain-sessions``, ``--epochs``, ``--hidden-dim``); the JSON records what was used.

Run from the repository root::

    python bench/bench_calibration.py --seeds 3 --steps --variants   # the tables of docs/calibration.md
    python bench/bench_calibration.py --seeds 3         # the phantom preset as configured, 3 seeds
    python bench/bench_calibration.py --live-only       # (a) and its live figures
    python bench/bench_calibration.py --runs 4 --pretrain-sessions 0 --epochs 10 --hidden-dim 128 \
        --no-prior --pretrain-batch-size 42
"""

from __future__ import annotations

import argparse
import dataclasses
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
    parser.add_argument("--live", action="store_true",
                        help="also the live figures of (a) on the held-out subject's session 1 (fast/slow/end of run)")
    parser.add_argument("--live-only", action="store_true", help="(a) and its live figures only: no (b), (c), (d)")
    parser.add_argument("--steps", action="store_true",
                        help="the betas' correlation with the truth for each GLM step on the calibration session")
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS),
                        help="(a) with GLMdenoise, + fractional ridge, and with --mask auto (first seed each); "
                        "names: only those rows")
    parser.add_argument("--ceiling", action="store_true",
                        help="also (c) on the simulation's true betas: this world's ceiling for the ridge")
    parser.add_argument("--reuse-bundles", action="store_true",
                        help="score (a) and (b) bundles already in --work whose config.json is this run's config "
                        "instead of calibrating them again (the pretrained model and sessions are cached anyway)")
    parser.add_argument("--out", help="JSON (default bench/results/calibration.json; with --live-only "
                        "bench/results/calibration-live.json)")
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
    settings = (("a_pretrained_1_session", model_dir),) if args.live_only else (
        ("a_pretrained_1_session", model_dir), ("b_scratch_1_session", None))
    for name, pretrained in settings:
        per_seed = []
        for seed in seeds:
            seeded = single_model(config, seed)
            bundle_dir = work / f"bundle-{name[0]}" if seed == seeds[0] else work / f"bundle-{name[0]}-seed{seed}"
            if args.reuse_bundles and saved_with(bundle_dir, seeded):
                logger.info("reusing %s: saved with this config", bundle_dir)
                per_seed.append(evaluate_bundle(bundle_dir, sid, test_z, test_tokens, image_tokens=tokens)
                                | {"seed": seed, "reused": True})
                continue
            started = time.perf_counter()
            report = calibrate(seeded, session_dirs[0], bundle_dir, sid, mask, pretrained_dir=pretrained,
                               session=session, images=tokens)
            seconds[f"calibration_training_{name[0]}_seed{seed}"] = time.perf_counter() - started
            per_seed.append(evaluate_bundle(bundle_dir, sid, test_z, test_tokens, report, image_tokens=tokens)
                            | {"seed": seed})
        results[name] = _mean_over_seeds(per_seed)
        if len(seeds) > 1:
            bundle_dirs = [work / f"bundle-{name[0]}"] + [work / f"bundle-{name[0]}-seed{s}" for s in seeds[1:]]
            ensemble_dir = ensemble_bundle(bundle_dirs, work / f"bundle-{name[0]}-ensemble")
            results[f"{name}_seed_ensemble"] = evaluate_bundle(ensemble_dir, sid, test_z, test_tokens,
                                                               image_tokens=tokens) | {"n_models": len(bundle_dirs)}
    if not args.live_only:
        started = time.perf_counter()
        results["c_ridge_1_session"] = _ridge(session, tokens, test_z, test_tokens)
        seconds["ridge"] = time.perf_counter() - started
        started = time.perf_counter()
        results["d_pretrained_all_sessions"] = _all_sessions(sessions, tokens, model_dir, config, work, test_z,
                                                             test_tokens)
        seconds["all_sessions_training"] = time.perf_counter() - started
    if args.ceiling:
        started = time.perf_counter()
        results["c_ridge_true_betas_ceiling"] = ridge_ceiling(world, sessions, runs, tokens)
        seconds["ceiling"] = time.perf_counter() - started
    steps = None
    if args.steps:
        started = time.perf_counter()
        steps = beta_steps(config, world, session_dirs[0], runs, mask)
        seconds["steps"] = time.perf_counter() - started
    if args.variants is not None and not args.live_only:
        started = time.perf_counter()
        results.update(variants(config, session_dirs, mask, model_dir, work, sid, tokens, seeds[0],
                                args.variants or list(VARIANTS)))
        seconds["variants"] = time.perf_counter() - started
    live = None
    if (args.live or args.live_only) and n_sessions > 1:
        started = time.perf_counter()
        bundles = {"a_first_seed": work / "bundle-a"}
        if (work / "bundle-a-ensemble").is_dir() and len(seeds) > 1:
            bundles["a_seed_ensemble"] = work / "bundle-a-ensemble"
        cosine = config.model_copy(update={"candidates": config.candidates.model_copy(update={"hubness_k": 0})})
        live = {}
        for name, bundle_dir in bundles.items():
            live[name] = live_evaluation(config, bundle_dir, session_dirs[1], sessions[1], tokens)
            if config.candidates.hubness_k:  # the same bundle ranked by plain cosine
                live[f"{name}_cosine"] = live_evaluation(cosine, bundle_dir, session_dirs[1], sessions[1], tokens)
        seconds["live_session_1"] = time.perf_counter() - started

    payload = {
        "benchmark": "calibration",
        "config": args.config,
        "overrides": overrides,
        "calibration_runs": len(runs),
        "pretrain_and_d_runs_per_session": len(runs_arg) if runs_arg else exp.runs_per_session,
        "calibration_train_trials": results["a_pretrained_1_session"]["per_seed"][0]["in_session_held_out"][
            "n_train_trials"],
        "seeds": seeds,
        "pretrain": record,
        "n_test_images": int(len(test_z)),
        "results": results,
        **({"beta_steps": steps} if steps is not None else {}),
        **({"live": live} if live is not None else {}),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "processor": platform.processor()},
    }
    out = Path(args.out or ("bench/results/calibration-live.json" if args.live_only else
                            "bench/results/calibration.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    _print_table(payload)


#: The GLM steps of ``--steps``: name -> glm section updates, each on top of the preset's glm section.
BETA_STEPS = {
    "canonical": {"hrf": "canonical", "glmdenoise": False, "fracridge": False},
    "library_single_trial": {"hrf": "library", "hrf_selection": "single_trial", "glmdenoise": False,
                             "fracridge": False},
    "library_crossval": {"hrf": "library", "hrf_selection": "crossval", "glmdenoise": False, "fracridge": False},
    "plus_glmdenoise": {"hrf": "library", "hrf_selection": "crossval", "glmdenoise": True, "fracridge": False},
    "plus_fracridge": {"hrf": "library", "hrf_selection": "crossval", "glmdenoise": True, "fracridge": True},
}


def _with_glm(config, update: dict):
    return config.model_copy(update={"glm": config.glm.model_copy(update=update)})


def beta_steps(config, world: PhantomWorld, session_dir: Path, runs: list[int], mask: np.ndarray) -> dict:
    """Betas of the held-out subject's calibration session against the simulation's truth, per GLM step."""
    from rtdecoder.glm.hrf import CANONICAL_CANDIDATE

    truth = np.concatenate([world.simulate_run(HELD_OUT, 0, run).true_betas for run in runs])
    out = {}
    for name, update in BETA_STEPS.items():
        started = time.perf_counter()
        session = estimate_session_betas(session_dir, _with_glm(config, update), mask, progress=False)
        finite = np.all(np.isfinite(session.betas), axis=1)
        test = finite & session.is_test
        out[name] = {
            "r": round(float(np.median(_column_r(session.betas[finite], truth[finite]))), 4),
            "r_test": round(float(np.median(_column_r(session.betas[test], truth[test]))), 4),
            "seconds": round(time.perf_counter() - started, 1),
        }
        if update["hrf"] == "library":
            out[name]["canonical_share"] = round(float(np.mean(session.hrf_index == CANONICAL_CANDIDATE)), 3)
        if session.glmdenoise is not None:
            out[name]["glmdenoise_components"] = int(session.glmdenoise.n_components)
        logger.info("betas step %s: %s", name, out[name])
    return out


def _column_r(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column of ``a`` with the same column of ``b``."""
    a, b = a - a.mean(axis=0), b - b.mean(axis=0)
    return (a * b).sum(axis=0) / np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))


#: The rows of ``--variants``: name -> the GLM step of :data:`BETA_STEPS` (None: the preset's GLM, automatic mask).
VARIANTS = {"a_plus_glmdenoise": "plus_glmdenoise", "a_plus_glmdenoise_fracridge": "plus_fracridge",
            "a_auto_mask": None}


def variants(config, session_dirs: list[Path], mask: np.ndarray, model_dir: Path, work: Path, sid: str,
             tokens: ImageTokens, seed: int, names: list[str]) -> dict:
    """(a) with the betas of later GLM steps, and with the automatic mask; one seed each; the rows ``names``."""
    from rtdecoder.calibration.voxel_selection import select_reliable_voxels

    seeded = single_model(config, seed)
    out = {}
    for name in names:
        step = VARIANTS[name]
        started = time.perf_counter()
        variant = _with_glm(seeded, BETA_STEPS[step]) if step else seeded
        bundle_dir = work / f"bundle-{name}"
        variant_mask, overlap = mask, None
        if step is None:  # what calibrate --mask auto chooses, its betas estimated once with the other sessions'
            variant_mask = select_reliable_voxels(session_dirs[0], variant, progress=False).mask
            overlap = float((variant_mask.grid & mask).sum() / variant_mask.n_voxels)
        sessions = [estimate_session_betas(d, variant, variant_mask, progress=False) for d in session_dirs]
        report = calibrate(variant, session_dirs[0], bundle_dir, sid, variant_mask, pretrained_dir=model_dir,
                           session=sessions[0], images=tokens)
        test_z, test_tokens = test_set(sessions, tokens)
        scores = evaluate_bundle(bundle_dir, sid, test_z, test_tokens, report, image_tokens=tokens)
        out[name] = _mean_over_seeds([scores | {"seed": seed}])
        out[name]["seconds"] = round(time.perf_counter() - started, 1)
        if overlap is not None:
            out[name]["share_of_voxels_in_the_phantom_visual_mask"] = round(overlap, 3)
            out[name]["n_voxels"] = int(variant_mask.n_voxels)
        logger.info("variant %s: %s", name, {k: v for k, v in out[name].items() if k != "per_seed"})
    return out


def live_evaluation(config, bundle_dir: Path, session_dir: Path, offline_session, tokens: ImageTokens) -> dict:
    """Bundle (a) on a session it never saw, through its live front end; and the offline path for comparison.

    ``offline_session`` is the same session's betas from the offline calibration path (its own
    motion reference, ``signal_mean`` and HRFs): its test repeats, z-scored with the bundle's
    statistics and averaged, are scored as the live path's are.
    """
    from rtdecoder.bundle import SubjectBundle
    from rtdecoder.calibration.evaluate import evaluate_session, pooled_retrieval

    bundle = SubjectBundle.load(bundle_dir)
    result = evaluate_session(config, bundle, session_dir, tokens, progress=True)
    finite = np.all(np.isfinite(offline_session.betas), axis=1)
    keep = finite & offline_session.is_test
    trials = [t for t, k in zip(offline_session.trials, keep, strict=True) if k]
    z = (offline_session.betas[keep] - bundle.beta_mean) / bundle.beta_std
    images, mean_z = average_repeats(z, [t.stim_id for t in trials])
    model = bundle.load_model()
    predicted = predict_clip_tokens(model, bundle.subject_id, mean_z)
    targets = trial_tokens([next(t for t in trials if t.stim_id == str(i)) for i in images], tokens)
    result["offline_own_reference"] = {
        "what": "the same session's offline betas (estimate_session_betas: its own motion reference, signal_mean "
        "and HRFs), z-scored with the bundle's statistics, test repeats averaged",
        "test_set": pooled_retrieval(predicted, targets, len(images), 1),
    }
    return result


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


def single_model(config, seed: int):
    """The config with ``training.seed`` = seed and one model (``training.ensemble_size`` 1)."""
    return config.model_copy(update={"training": config.training.model_copy(update={"seed": seed,
                                                                                     "ensemble_size": 1})})


def scored(predicted: np.ndarray, test_tokens: np.ndarray, hubness=None) -> dict:
    """Retrieval among 300 (:func:`retrieval_evaluation`), with the figures among 100 in ``among_100``:
    the pool size of the NSD-like world's figures and of the goal they are held to. With a hubness
    reference the figures are CSLS (as the live decoder ranks) and the plain-cosine ones are in ``cosine``."""
    result = retrieval_evaluation(predicted, test_tokens, hubness=hubness)
    among_100 = retrieval_evaluation(predicted, test_tokens, pool_size=100, hubness=hubness)
    result["among_100"] = {key: among_100[key] for key in ("image_top1", "brain_top1", "pool_size", "n_pools")}
    if hubness is not None:
        result["cosine"] = scored(predicted, test_tokens)
    return result


def evaluate_bundle(bundle_dir: Path, sid: str, test_z, test_tokens, report=None,
                    image_tokens: ImageTokens | None = None) -> dict:
    """Retrieval of a saved bundle on the averaged test betas, with its in-session evaluation (its
    ``evaluation.json``) and, given the calibration's ``report``, its seconds; ranked as the bundle's
    ``candidates.hubness_k`` says (CSLS, with the plain-cosine figures beside them, or plain cosine);
    ``image_tokens`` (by stim_id) give the query side's reference images, for brain retrieval."""
    from rtdecoder.bundle import SubjectBundle
    from rtdecoder.calibration.hubness_reference import bundle_hubness_reference

    bundle = SubjectBundle.load(bundle_dir)
    model = bundle.load_model()
    # the phantom bank's tokens by stim_id: the calibration's training images among them are the query side
    hubness = bundle_hubness_reference(bundle, model, bundle.config.candidates.hubness_k, image_tokens)
    result = scored(predict_clip_tokens(model, sid, test_z), test_tokens, hubness)
    result["in_session_held_out"] = bundle.evaluation
    if report is not None:
        result["seconds"] = {k: round(v, 1) for k, v in report.seconds.items()}
    return result


def saved_with(bundle_dir: Path, config) -> bool:
    """Whether ``bundle_dir`` holds a bundle calibrated with exactly ``config`` (its saved config.json)."""
    from rtdecoder.bundle import SubjectBundle
    from rtdecoder.errors import BundleError

    if not (bundle_dir / "config.json").is_file():
        return False
    try:
        saved = SubjectBundle.load(bundle_dir).config
    except BundleError as error:  # an interrupted or damaged bundle is calibrated again
        logger.info("not reusing %s: %s", bundle_dir, error)
        return False
    return saved.model_dump(mode="json") == config.model_dump(mode="json")


def ensemble_bundle(bundle_dirs: list[Path], out_dir: Path) -> Path:
    """The bundle ``calibrate`` writes with ``training.ensemble_size`` N, from N single calibrations of one
    session's betas with seeds seed, seed+1, ... (the same models: each member is trained as one of them).

    The first bundle's statistics, mask and betas are every bundle's (one session, one GLM); the
    ensemble's in-session evaluation is not repeated here.
    """
    import shutil

    from rtdecoder.bundle import SubjectBundle
    from rtdecoder.decode.ensemble import ModelEnsemble

    bundles = [SubjectBundle.load(d) for d in bundle_dirs]
    first = bundles[0]
    training = first.config.training.model_copy(update={"ensemble_size": len(bundles)})
    first.config = first.config.model_copy(update={"training": training})
    first.evaluation = {"note": f"seed ensemble of {', '.join(str(d) for d in bundle_dirs)}"}
    models = ModelEnsemble([b.load_model() for b in bundles])
    shutil.rmtree(out_dir, ignore_errors=True)
    first.save(out_dir, model=models)
    shutil.copytree(bundle_dirs[0] / "betas", out_dir / "betas")
    return out_dir


def seed_means(per_seed: list[dict]) -> dict:
    """Mean image and brain top-1 (and among 100) over calibrations that differ only in ``training.seed``."""
    def mean(rows: list[dict]) -> dict:
        return {key: round(float(np.mean([r[key] for r in rows])), 4) for key in ("image_top1", "brain_top1")}

    means = mean(per_seed) | {"among_100": mean([r["among_100"] for r in per_seed])}
    if all("cosine" in r for r in per_seed):  # CSLS rows: the plain-cosine figures of the same models
        means["cosine"] = seed_means([r["cosine"] for r in per_seed])
    return means


def _mean_over_seeds(per_seed: list[dict]) -> dict:
    return seed_means(per_seed) | {"pool_size": per_seed[0]["pool_size"], "per_seed": per_seed}


def _ridge(session, tokens: ImageTokens | np.ndarray, test_z: np.ndarray, test_tokens: np.ndarray) -> dict:
    from sklearn.linear_model import RidgeCV

    z, finite = _zscored(session)
    keep = finite & ~session.is_test
    y = trial_tokens([t for t, k in zip(session.trials, keep, strict=True) if k], tokens).reshape(int(keep.sum()), -1)
    ridge = RidgeCV(alphas=np.logspace(1, 6, 11)).fit(z[keep], y)
    predicted = ridge.predict(test_z).reshape(test_tokens.shape).astype(np.float32)
    result = scored(predicted, test_tokens)
    result["alpha"] = float(ridge.alpha_)
    return result


def ridge_ceiling(world: PhantomWorld, sessions: list, runs: list[int], tokens: ImageTokens) -> dict:
    """(c) with every trial's betas replaced by the simulation's true response amplitudes.

    What is left of the world's variability is the brain's own: the trial-to-trial share of the
    response that does not repeat with the image (``STIMULUS_SHARE``) and the voxels' tuning to
    the image's latent; no scanner noise, motion, drift or GLM error. The ridge's retrieval on
    these betas bounds what (c) could reach with perfect betas, as the NSD-like world's
    "noiseless betas" row; it bounds the ridge, not the model (which passes it in the image
    direction on the phantom).
    """
    truths = [
        dataclasses.replace(session, betas=np.concatenate(
            [world.simulate_run(HELD_OUT, k, run).true_betas for run in runs]).astype(np.float32))
        for k, session in enumerate(sessions)
    ]
    test_z, test_tokens = test_set(truths, tokens)
    return _ridge(truths[0], tokens, test_z, test_tokens)


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
    result = scored(predict_clip_tokens(model, sid, test_z), test_tokens)
    result["n_train_trials"] = int(len(betas_all))
    result["epochs"] = recipe.epochs
    return result


def percent_pair(scores: dict) -> str:
    """Image / brain top-1 as ``"28.3/29.0"`` (percent)."""
    return f"{100 * scores['image_top1']:.1f}/{100 * scores['brain_top1']:.1f}"


def _print_table(payload: dict) -> None:
    print(f"\nheld-out subject sub-08, {payload['n_test_images']} test images (repeats averaged), "
          f"calibration: {payload['calibration_runs']} runs, {payload['calibration_train_trials']} training trials")
    print(f"{'setting':<30} {'image top-1':>12} {'brain top-1':>12} {'pool':>6} {'among 100':>12}")
    for name, result in payload["results"].items():
        spread = ""
        if len(result.get("per_seed", [])) > 1:
            spread = "  seeds: " + ", ".join(percent_pair(r) for r in result["per_seed"])
        among_100 = result.get("among_100")
        beside = percent_pair(among_100) if among_100 else ""
        print(f"{name:<30} {100 * result['image_top1']:>11.1f}% {100 * result['brain_top1']:>11.1f}% "
              f"{result['pool_size']:>6} {beside:>12}{spread}")
        if "cosine" in result:  # ranked by CSLS above; the same predictions by plain cosine
            cosine = result["cosine"]
            print(f"{'  (plain cosine)':<30} {100 * cosine['image_top1']:>11.1f}% {100 * cosine['brain_top1']:>11.1f}% "
                  f"{result['pool_size']:>6} {percent_pair(cosine['among_100']):>12}")
    steps = payload.get("beta_steps")
    if steps:
        print("\ncalibration session betas against the truth (median over voxels of the correlation over trials)")
        print(f"{'step':<24} {'r':>7} {'r_test':>7} {'canonical':>10} {'s':>6}")
        for name, row in steps.items():
            print(f"{name:<24} {row['r']:>7} {row['r_test']:>7} {row.get('canonical_share', '-'):>10} "
                  f"{row['seconds']:>6}")
    pre = payload["pretrain"]
    print(f"pretraining: {pre['train_s_per_epoch']} s/epoch ({pre['epochs']} epochs, {sum(pre['n_trials'].values())} "
          f"trials of {len(pre['subjects'])} subjects)")
    for name, live in payload.get("live", {}).items():
        print_live(name, live)
    print("seconds: " + ", ".join(f"{k} {v}" for k, v in payload["seconds"].items()))
    print(f"peak memory: {payload['peak_rss_mb']} MB")


def print_live(name: str, live: dict) -> None:
    """The live table of one bundle, with the offline path on the same session beside it."""
    from rtdecoder.calibration.evaluate import format_table

    print(f"\n{name} on the held-out session, through the bundle's live front end:\n{format_table(live)}")
    offline = live["offline_own_reference"]["test_set"]
    if "image_top1" in offline:
        print(f"offline path on the same session (its own reference), repeats averaged, among the test set of "
              f"{offline['pool_size']}: image {100 * offline['image_top1']:.1f}% / top-5 "
              f"{100 * offline['image_top5']:.1f}%, brain {100 * offline['brain_top1']:.1f}% / top-5 "
              f"{100 * offline['brain_top5']:.1f}%")


if __name__ == "__main__":
    main()
