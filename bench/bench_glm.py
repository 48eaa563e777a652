"""Per-volume cost of the incremental single-trial GLM at NSD size.

Feeds a synthetic run (V = 15,000 voxels, 62 trials of 3 s in 75 slots of 4 s, TR 1.6 s, 199
volumes, 6 motion + 3 polynomial drift columns) through :class:`IncrementalGLM` and times each
``update`` call (statistics update + release/refinement of due trials), for LSS and LSA, with the
canonical HRF and with a per-voxel choice from the 20-shape library. Prints a table of median /
p95 / p99 milliseconds and writes it to ``bench/results/glm.json``.

Run from the repository root::

    python bench/bench_glm.py
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from rtdecoder.glm.events import Trial
from rtdecoder.glm.incremental import IncrementalGLM

logger = logging.getLogger("bench_glm")


def nsd_run(
    rng: np.random.Generator, n_trials: int, n_slots: int, tr_s: float, lead_in_s: float,
    lead_out_s: float,
) -> tuple[list[Trial], int]:
    """An NSD-like run: 4 s slots (3 s image + 1 s blank), some left blank; trials and volumes."""
    slots = np.sort(rng.choice(n_slots, size=n_trials, replace=False))
    trials = [Trial(f"trial-{i:03d}", lead_in_s + 4.0 * s, 3.0) for i, s in enumerate(slots)]
    n_volumes = int(np.ceil((lead_in_s + 4.0 * n_slots + lead_out_s) / tr_s))
    return trials, n_volumes


def time_run(
    glm: IncrementalGLM, data: np.ndarray, motion: np.ndarray
) -> tuple[np.ndarray, int, float]:
    """Per-volume ``update`` times (ms), betas released, and ``finish`` time (ms)."""
    times_ms = np.empty(data.shape[0])
    n_released = 0
    for t in range(data.shape[0]):
        start = time.perf_counter()
        n_released += len(glm.update(t, data[t], motion[t]))
        times_ms[t] = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    glm.finish()
    return times_ms, n_released, (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-voxels", type=int, default=15000)
    parser.add_argument("--n-trials", type=int, default=62)
    parser.add_argument("--tr-s", type=float, default=1.6)
    parser.add_argument("--n-slots", type=int, default=75, help="4 s slots per run (NSD: 75)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration")
    parser.add_argument(
        "--blas-threads", type=int, default=1,
        help="BLAS threads (1: the GLM leaves the second core to motion correction)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/glm.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    rng = np.random.default_rng(0)
    trials, n_volumes = nsd_run(rng, args.n_trials, args.n_slots, args.tr_s, 4.8, 12.8)
    data = rng.normal(size=(n_volumes, args.n_voxels)).astype(np.float32)
    motion = np.cumsum(rng.normal(scale=0.02, size=(n_volumes, 6)), axis=0)
    hrf_per_voxel = rng.integers(0, 20, size=args.n_voxels)

    rows = []
    with threadpool_limits(limits=args.blas_threads, user_api="blas"):
        for method in ("lss", "lsa"):
            for hrf in ("canonical", "library"):
                per_volume_ms, finish_ms, n_released = [], [], 0
                for _ in range(args.repeats):
                    glm = IncrementalGLM(
                        trials, args.tr_s, n_volumes, method=method, hrf=hrf,
                        hrf_per_voxel=hrf_per_voxel if hrf == "library" else None,
                    ).start(args.n_voxels)
                    times_ms, n_released, finish = time_run(glm, data, motion)
                    per_volume_ms.append(times_ms)
                    finish_ms.append(finish)
                all_ms = np.concatenate(per_volume_ms)
                rows.append({
                    "method": method, "hrf": hrf, "n_groups": len(glm.group_slices_),
                    "median_ms": float(np.median(all_ms)), "p95_ms": float(np.percentile(all_ms, 95)),
                    "p99_ms": float(np.percentile(all_ms, 99)), "max_ms": float(all_ms.max()),
                    "finish_ms": float(np.median(finish_ms)), "betas_per_run": n_released,
                })

    header = (
        f"{'method':6} {'hrf':9} {'groups':>6} {'median':>8} {'p95':>8} {'p99':>8} {'max':>8} "
        f"{'finish':>8} {'betas':>6}"
    )
    print(f"incremental GLM per-volume update + release, ms ({args.n_voxels} voxels, "
          f"{args.n_trials} trials, {n_volumes} volumes, {args.blas_threads} BLAS thread(s), "
          f"{os.cpu_count()} CPUs)")
    print(header)
    for r in rows:
        print(f"{r['method']:6} {r['hrf']:9} {r['n_groups']:>6} {r['median_ms']:8.2f} {r['p95_ms']:8.2f} "
              f"{r['p99_ms']:8.2f} {r['max_ms']:8.2f} {r['finish_ms']:8.2f} {r['betas_per_run']:>6}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "glm", "n_voxels": args.n_voxels, "n_trials": args.n_trials,
        "n_volumes": n_volumes, "tr_s": args.tr_s, "repeats": args.repeats,
        "blas_threads": args.blas_threads,
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "numpy": np.__version__, "results": rows,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
