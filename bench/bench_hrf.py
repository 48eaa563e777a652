"""Per-voxel HRF choice on the phantom: canonical HRF against the library's three selection rules.

For the held-out phantom subject (subject 7, ``sub-08``), a few runs of one session go through
the real calibration path (:func:`rtdecoder.calibration.betas.estimate_session_betas`: one NIfTI
per volume, motion correction, masking, percent signal change, HRF choice, the offline LSS GLM)
once per HRF setting:

- ``canonical``: ``glm.hrf: canonical`` (Glover);
- ``single_trial``: ``glm.hrf: library``, ``glm.hrf_selection: single_trial`` (the rule before
  issue 13: the best single-trial R^2);
- ``onoff``: the best ON-OFF R^2 (all trials one regressor);
- ``crossval``: the ON-OFF model fitted on the other runs and scored on each held-out run (the
  default), choosing among the library and the canonical shape, which a voxel keeps unless a
  library row's lead is consistent over runs (:data:`rtdecoder.glm.hrf.CANONICAL_LEAD_Z`
  standard errors).

``--lead-z 1,2,2.5,3`` adds a ``crossval`` row per value of that threshold (``crossval_z1`` ...),
and ``crossval_library`` chooses among the library alone (no canonical candidate), the rule
before the canonical shape was one.

The phantom's HRFs are inverse-logit shapes (:func:`rtdecoder.phantom.subjects.inverse_logit_hrf`),
not members of the library, so the library can only approximate them. Reported per setting:

- ``r``: per voxel, the Pearson correlation over all trials between the estimated and the true
  betas, median over voxels (``r_test``: test-image trials only);
- for the library rules, the median time to peak of the chosen shapes against the median true
  time to peak (the impulse response's maximum, s), the median absolute error per voxel, their
  correlation over voxels, and the share of voxels at the library's latest (7.5 s) and earliest
  (3.5 s) shapes;
- the seconds each estimate took (volumes read and motion-corrected each time).

The volumes are cached under ``--work``, keyed by the preset's phantom, scanner and experiment
sections and the subject's HRF shapes (so a change of the HRF generator gets fresh volumes).
Prints a table and writes ``bench/results/hrf.json``. Run from the repository root (about 1.5
min per setting for 3 runs on 2 shared cores)::

    python bench/bench_hrf.py --runs 3
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np

import rtdecoder.calibration.betas as betas_module
import rtdecoder.glm.hrf as hrf_module
from rtdecoder.calibration.betas import SessionBetas, estimate_session_betas
from rtdecoder.config import RTDecoderConfig, load_config
from rtdecoder.glm.events import write_events_tsv
from rtdecoder.glm.hrf import CANONICAL_CANDIDATE, HRF_LIBRARY_SIZE, hrf_candidates, hrf_library, hrf_time_to_peak_s
from rtdecoder.phantom.scanner import volumes_from_array, write_run
from rtdecoder.phantom.subjects import PhantomSubject, inverse_logit_hrf
from rtdecoder.phantom.world import PhantomWorld

HELD_OUT = 7
SETTINGS = ("canonical", "single_trial", "onoff", "crossval")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="phantom")
    parser.add_argument("--work", type=Path, default=Path("rtdecoder-cache/bench-hrf"), help="cache of session volumes")
    parser.add_argument("--subject", type=int, default=HELD_OUT, help="0-based phantom subject (default: held out)")
    parser.add_argument("--session", type=int, default=0, help="0-based session")
    parser.add_argument("--runs", type=int, default=3, help="runs of the session (few: each setting re-reads them)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {SETTINGS}")
    parser.add_argument("--lead-z", default="", help="comma-separated CANONICAL_LEAD_Z values for extra crossval rows")
    parser.add_argument("--out", type=Path, default=Path("bench/results/hrf.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("rtdecoder.glm.incremental").setLevel(logging.WARNING)
    settings = [s for s in args.settings.split(",") if s]
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        parser.error(f"--settings: expected names among {', '.join(SETTINGS)} (got {', '.join(unknown)})")

    config = load_config(args.config)
    world = PhantomWorld(config, progress=False)
    subject = world.subject(args.subject)
    started = time.perf_counter()
    session_dir = _session_dir(args.work, config, subject, args.session)
    truth = np.concatenate([
        _write_run(world, subject, args.session, run, session_dir) for run in range(args.runs)
    ])
    simulate_s = time.perf_counter() - started
    tr_s = config.scanner.tr_s
    true_peak_s = true_time_to_peak_s(subject)

    results = {}
    for name in settings:
        started = time.perf_counter()
        session = estimate_session_betas(session_dir, _variant(config, name), subject.mask, progress=False)
        results[name] = _measure(session, truth, true_peak_s, tr_s, name != "canonical")
        results[name]["seconds"] = round(time.perf_counter() - started, 1)
    lead_zs = [float(z) for z in args.lead_z.split(",") if z]
    if lead_zs:
        extra = {f"crossval_z{z:g}": z for z in lead_zs} | {"crossval_library": None}
        for name, z in extra.items():
            started = time.perf_counter()
            with _lead_rule(z):
                session = estimate_session_betas(session_dir, _variant(config, "crossval"), subject.mask,
                                                 progress=False)
            results[name] = _measure(session, truth, true_peak_s, tr_s, True)
            results[name]["seconds"] = round(time.perf_counter() - started, 1)
    payload = {
        "benchmark": "hrf",
        "config": args.config,
        "subject": f"sub-{args.subject + 1:02d}",
        "session": args.session,
        "runs": args.runs,
        "n_trials": int(truth.shape[0]),
        "n_voxels": int(truth.shape[1]),
        "glm_method": config.glm.method,
        "hrf_family": "inverse_logit (phantom), double-gamma library of 20 (glm)",
        "true_time_to_peak_s": {"median": round(float(np.median(true_peak_s)), 2),
                                "quartiles": [round(float(q), 2) for q in np.quantile(true_peak_s, [0.25, 0.75])]},
        "library_time_to_peak_s": [round(float(p), 2) for p in hrf_time_to_peak_s(hrf_library(tr_s), tr_s)],
        "results": results,
        "simulate_s": round(simulate_s, 1),
        "machine": {"python": platform.python_version(), "numpy": np.__version__, "cpu_count": os.cpu_count(),
                    "processor": platform.processor() or platform.machine()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    _print_table(payload)


@contextlib.contextmanager
def _lead_rule(z: float | None):
    """Calibration's HRF choice with threshold ``z``, or among the library alone (``None``), for a while."""
    saved = hrf_module.CANONICAL_LEAD_Z, hrf_module.choose_library_hrf
    if z is None:
        def library_only(runs, tr_s, selection="crossval", *args, **kwargs):
            return saved[1](runs, tr_s, selection, *args[:3], kernels=hrf_library(tr_s), **kwargs)
        # calibration imports the function by name
        betas_module.choose_library_hrf = library_only
    else:
        hrf_module.CANONICAL_LEAD_Z = z
    try:
        yield
    finally:
        hrf_module.CANONICAL_LEAD_Z = saved[0]
        betas_module.choose_library_hrf = saved[1]


def true_time_to_peak_s(subject: PhantomSubject) -> np.ndarray:
    """Time to peak of each visual voxel's impulse response, s, shape (n_voxels,).

    The maximum of :func:`inverse_logit_hrf` on a 5 ms grid, as :func:`hrf_time_to_peak_s` finds
    the library's (whose grid is ``tr_s / 50`` = 32 ms at TR 1.6 s).
    """
    t_s = np.arange(0.0, 30.0, 0.005)
    peaks_s = np.array([t_s[np.argmax(inverse_logit_hrf(t_s, *row))] for row in subject.hrf_library])
    return peaks_s[subject.hrf_index]


def _variant(config: RTDecoderConfig, name: str) -> RTDecoderConfig:
    """The config with the HRF setting ``name`` (one of :data:`SETTINGS`)."""
    update = {"hrf": "canonical"} if name == "canonical" else {"hrf": "library", "hrf_selection": name}
    return config.model_copy(update={"glm": config.glm.model_copy(update=update)})


def _session_dir(work: Path, config: RTDecoderConfig, subject: PhantomSubject, session: int) -> Path:
    """Where the session's volumes are cached: keyed by what the volumes depend on."""
    # The HRF shapes go into the key as well as the config: a change of the phantom's generator
    # (issue 13) changes the volumes without changing the config.
    digest = hashlib.sha256(json.dumps([config.phantom.model_dump(), config.scanner.model_dump(),
                                        config.experiment.model_dump()], sort_keys=True).encode())
    digest.update(np.ascontiguousarray(subject.hrf_library, dtype=np.float64).tobytes())
    return work / f"volumes-{digest.hexdigest()[:12]}" / f"sub-{subject.index + 1:02d}" / f"session-{session}"


def _write_run(world: PhantomWorld, subject: PhantomSubject, session: int, run: int, session_dir: Path) -> np.ndarray:
    """Write one run as one NIfTI per volume (kept if present); its true betas (n_trials, n_voxels)."""
    run_dir = session_dir / f"run-{run + 1:02d}"
    # Beside the session, not in the run folder: everything there but tables is read as a volume.
    truth_path = session_dir.parent / f"truth-session-{session}" / f"run-{run + 1:02d}_true_betas.npy"
    if (run_dir / "events.tsv").is_file() and truth_path.is_file():
        return np.load(truth_path)
    simulated = world.simulate_run(subject.index, session, run)
    write_run(
        volumes_from_array(simulated.volumes, simulated.affine, simulated.tr_s, simulated.slice_times_s),
        run_dir, format="nifti", speed=1e6, sleep=lambda _s: None, partial_write=False,
    )
    truth_path.parent.mkdir(parents=True, exist_ok=True)
    np.save(truth_path, simulated.true_betas)
    # Last, so that an interrupted write is redone (the events file marks a complete run).
    write_events_tsv(simulated.trials, run_dir / "events.tsv")
    return simulated.true_betas


def _measure(session: SessionBetas, truth: np.ndarray, true_peak_s: np.ndarray, tr_s: float, library: bool) -> dict:
    """Correlation with the truth and, for a library choice, where the chosen shapes peak."""
    finite = np.all(np.isfinite(session.betas), axis=1)
    test = finite & session.is_test
    out = {
        "r": round(float(np.median(_column_r(session.betas[finite], truth[finite]))), 4),
        "r_test": round(float(np.median(_column_r(session.betas[test], truth[test]))), 4),
    }
    if library:
        chosen_s = hrf_time_to_peak_s(hrf_candidates(tr_s), tr_s)[session.hrf_index]
        out |= {
            "time_to_peak_s_median": round(float(np.median(chosen_s)), 2),
            "time_to_peak_abs_error_s_median": round(float(np.median(np.abs(chosen_s - true_peak_s))), 2),
            "time_to_peak_r": round(float(np.corrcoef(chosen_s, true_peak_s)[0, 1]), 3),
            "at_latest": round(float(np.mean(session.hrf_index == HRF_LIBRARY_SIZE - 1)), 3),
            "at_earliest": round(float(np.mean(session.hrf_index == 0)), 3),
            "canonical": round(float(np.mean(session.hrf_index == CANONICAL_CANDIDATE)), 3),
        }
    return out


def _column_r(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column of ``a`` with the same column of ``b``."""
    a, b = a - a.mean(axis=0), b - b.mean(axis=0)
    return (a * b).sum(axis=0) / np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))


def _print_table(payload: dict) -> None:
    true = payload["true_time_to_peak_s"]
    print(f"\n{payload['subject']} session {payload['session']}: {payload['runs']} runs, {payload['n_trials']} trials, "
          f"{payload['n_voxels']} voxels, GLM {payload['glm_method']}; true time to peak median {true['median']} s "
          f"(quartiles {true['quartiles'][0]}-{true['quartiles'][1]})")
    print(f"{'setting':<14} {'r':>7} {'r_test':>7} {'peak_s':>7} {'|err|_s':>8} {'r_peak':>7} {'latest':>7} "
          f"{'earliest':>8} {'s':>6}")
    for name, row in payload["results"].items():
        cells = [f"{row.get(k, '-'):>7}" for k in ("time_to_peak_s_median", "time_to_peak_abs_error_s_median",
                                                   "time_to_peak_r", "at_latest")]
        print(f"{name:<14} {row['r']:>7} {row['r_test']:>7} {cells[0]} {cells[1]:>8} {cells[2]} {cells[3]} "
              f"{row.get('at_earliest', '-'):>8} {row['seconds']:>6}")


if __name__ == "__main__":
    main()
