"""Fractional ridge calibration betas against OLS on one phantom session: fractions and reliability.

For the held-out phantom subject (subject 7, ``sub-08``) and one session, the calibration betas
are computed twice through the real path (:func:`rtdecoder.calibration.betas.estimate_session_betas`:
NIfTI volumes, motion correction, per-voxel HRF, offline GLM), once as OLS (the config's
``glm.method``) and once with ``glm.fracridge: true``. Reported:

- the distribution of the chosen fractions (share of voxels at each fraction, median, share left
  at 1, i.e. OLS);
- split-half reliability of test-image betas: for every test image shown in two different runs of
  the session, its first showing against its first showing in another run; per voxel, the Pearson
  correlation of the two over images; the median over voxels. Test images take no part in
  choosing the fractions, so this is an independent measure;
- the same for training images, whose repeats chose the fractions (so biased in ridge's favour;
  shown for comparison only);
- per voxel, the correlation over all trials (and over test trials) between the estimated and the
  simulated true betas (the true betas include a trial-to-trial part that does not repeat with
  the image), median over voxels;
- the median over voxels of std(ridge betas) / std(OLS betas) over trials: how much narrower the
  ridge betas are (the z-scoring statistics of a calibration follow them; live betas stay OLS);
- the seconds each estimate took.

``--method`` sets the OLS path's ``glm.method`` (fraction 1 keeps those betas; the ridge fits
are LSA either way) and ``--fractions`` the grid.

The session's volumes are shared with ``bench/bench_calibration.py`` (same cache folder and key).
Prints a table and writes ``bench/results/fracridge.json``. Run from the repository root::

    python bench/bench_fracridge.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
from bench_calibration import HELD_OUT, _write_session

from rtdecoder.calibration.betas import SessionBetas, estimate_session_betas
from rtdecoder.config import load_config
from rtdecoder.phantom.world import PhantomWorld


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="phantom")
    parser.add_argument("--work", default="rtdecoder-cache/bench-calibration", help="cache of session volumes")
    parser.add_argument("--session", type=int, default=0, help="0-based session of the held-out subject")
    parser.add_argument("--runs", type=int, help="runs of the session (default: all)")
    parser.add_argument("--fractions", help="comma-separated glm.fracridge_fractions (default: the config's)")
    parser.add_argument("--method", choices=("lss", "lsa"), help="glm.method of the OLS betas (default: the config's)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/fracridge.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("rtdecoder.glm.incremental").setLevel(logging.WARNING)

    glm: dict = {}
    if args.fractions:
        glm["fracridge_fractions"] = [float(f) for f in args.fractions.split(",")]
    if args.method:
        glm["method"] = args.method
    config = load_config(args.config, {"glm": glm} if glm else None)
    exp = config.experiment
    runs = list(range(args.runs if args.runs else exp.runs_per_session))
    world = PhantomWorld(config, progress=False)
    # The same folders as bench_calibration.py: volumes depend on the world, scanner and experiment.
    volumes_key = hashlib.sha256(json.dumps([config.phantom.model_dump(), config.scanner.model_dump(),
                                             config.experiment.model_dump()], sort_keys=True).encode()).hexdigest()[:12]
    session_dir = Path(args.work) / f"volumes-{volumes_key}" / f"session-{args.session}"
    started = time.perf_counter()
    _write_session(world, session_dir, args.session, runs)
    truth = np.concatenate([world.simulate_run(HELD_OUT, args.session, run).true_betas for run in runs])
    simulate_s = time.perf_counter() - started
    mask = world.subject(HELD_OUT).mask

    variants = {}
    for name, on in (("ols", False), ("fracridge", True)):
        variant = config.model_copy(update={"glm": config.glm.model_copy(update={"fracridge": on})})
        started = time.perf_counter()
        session = estimate_session_betas(session_dir, variant, mask, progress=False)
        seconds = time.perf_counter() - started
        variants[name] = (session, seconds)
    ols = variants["ols"][0]
    results = {name: _measure(session, ols, truth, seconds) for name, (session, seconds) in variants.items()}
    payload = {
        "benchmark": "fracridge",
        "config": args.config,
        "subject": f"sub-{HELD_OUT + 1:02d}",
        "session": args.session,
        "runs": len(runs),
        "n_trials": int(ols.betas.shape[0]),
        "n_voxels": int(ols.betas.shape[1]),
        "glm_method": config.glm.method,
        "fractions_grid": list(config.glm.fracridge_fractions),
        "fractions": _fraction_summary(variants["fracridge"][0].fracridge_fractions, config.glm.fracridge_fractions),
        "results": results,
        "simulate_and_truth_s": round(simulate_s, 1),
        "machine": {"python": platform.python_version(), "numpy": np.__version__, "cpu_count": os.cpu_count(),
                    "processor": platform.processor() or platform.machine()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    _print_table(payload)


def _measure(session: SessionBetas, ols: SessionBetas, truth: np.ndarray, seconds: float) -> dict:
    betas = session.betas
    finite = np.all(np.isfinite(betas), axis=1)
    test, train = session.is_test & finite, ~session.is_test & finite
    test_r, n_test_images = _split_half(betas, session.stim_index, test, session.run_labels)
    train_r, n_train_images = _split_half(betas, session.stim_index, train, session.run_labels)
    spread = np.std(betas[finite], axis=0) / np.std(ols.betas[finite], axis=0)
    return {
        "test_split_half_r_median": round(float(np.median(test_r)), 4),
        "test_images_in_two_runs": n_test_images,
        "train_split_half_r_median": round(float(np.median(train_r)), 4),
        "train_images_in_two_runs": n_train_images,
        "truth_r_median_all_trials": round(float(np.median(_column_r(betas[finite], truth[finite]))), 4),
        "truth_r_median_test_trials": round(float(np.median(_column_r(betas[test], truth[test]))), 4),
        "std_ratio_to_ols_median": round(float(np.median(spread)), 4),
        "seconds": round(seconds, 1),
    }


def _split_half(
    betas: np.ndarray, stim: np.ndarray, usable: np.ndarray, run_labels: list[str]
) -> tuple[np.ndarray, int]:
    """Per-voxel correlation over images between an image's first showing and its first in another run."""
    runs = np.array(run_labels)
    first, second = [], []
    for key in np.unique(stim[usable]):
        rows = np.flatnonzero(usable & (stim == key))
        later = rows[runs[rows] != runs[rows[0]]]
        if later.size:
            first.append(rows[0])
            second.append(later[0])
    if len(first) < 3:
        return np.array([np.nan]), len(first)
    return _column_r(betas[first], betas[second]), len(first)


def _column_r(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    return (a * b).sum(axis=0) / np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))


def _fraction_summary(chosen: np.ndarray, grid: tuple[float, ...]) -> dict:
    counts = {f"{f:.2f}": round(float(np.mean(np.isclose(chosen, f))), 4) for f in grid}
    return {
        "median": round(float(np.median(chosen)), 3),
        "quartiles": [round(float(q), 3) for q in np.quantile(chosen, [0.25, 0.75])],
        "share_at_1": round(float(np.mean(chosen == 1.0)), 4),
        "share_per_fraction": counts,
    }


def _print_table(payload: dict) -> None:
    fractions = payload["fractions"]
    print(f"\n{payload['subject']} session {payload['session']}: {payload['runs']} runs, {payload['n_trials']} trials, "
          f"{payload['n_voxels']} voxels, glm.method {payload['glm_method']}")
    print(f"chosen fractions: median {fractions['median']}, quartiles {fractions['quartiles']}, "
          f"{100 * fractions['share_at_1']:.1f}% of voxels at 1 (OLS)")
    print("share of voxels per fraction: " + ", ".join(
        f"{k} {100 * v:.1f}%" for k, v in fractions["share_per_fraction"].items() if v > 0))
    rows = (
        ("test split-half r (images in 2 runs)", "test_split_half_r_median", "test_images_in_two_runs"),
        ("train split-half r (chose fractions)", "train_split_half_r_median", "train_images_in_two_runs"),
        ("r with true betas, all trials", "truth_r_median_all_trials", None),
        ("r with true betas, test trials", "truth_r_median_test_trials", None),
        ("std over trials / OLS std", "std_ratio_to_ols_median", None),
        ("seconds (whole estimate)", "seconds", None),
    )
    results = payload["results"]
    print(f"{'median over voxels':<40} {'OLS':>8} {'fracridge':>10}")
    for label, key, count in rows:
        extra = f"   ({results['ols'][count]} images)" if count else ""
        print(f"{label:<40} {results['ols'][key]:>8} {results['fracridge'][key]:>10}{extra}")


if __name__ == "__main__":
    main()
