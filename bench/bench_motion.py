"""Per-volume cost of motion correction: estimate + resample of the mask voxels.

Two sizes: the NSD grid (81 x 104 x 83 at 1.8 mm, 15,000 mask voxels) and the phantom preset's
(48 x 56 x 46 at 3 mm, 2,500 mask voxels). Volumes are EPI-like images made from nilearn's bundled
MNI152 templates (``rtdecoder.phantom.anatomy.template_epi``), moved along a drifting trajectory
with a jump (up to 3 mm / 3 degrees) with noise, as in tests/test_motion.py. Each volume is timed
from its array to the corrected mask values with numpy's default threads (only the small BLAS
products may use a second core; set OPENBLAS_NUM_THREADS=1 to compare).

Run::

    python bench/bench_motion.py [--n-volumes 100] [--out bench/results/motion.json]

Prints a table (median, p95, p99 in ms; iterations; median absolute error against the true
motion) and writes the same figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from rtdecoder.phantom.anatomy import template_epi
from rtdecoder.preprocess.motion import MotionCorrector, rigid_matrix

SIZES = {
    "nsd": ((81, 104, 83), 1.8, 15000),
    "phantom": ((48, 56, 46), 3.0, 2500),
}


def acquire(image, image_affine, params, shape, affine) -> np.ndarray:
    """Sample ``image`` on the scanner grid with the head moved by ``params`` (no noise)."""
    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2) + affine[:3, 3]
    grid_to_image = np.linalg.inv(image_affine) @ np.linalg.inv(rigid_matrix(params, centre)) @ affine
    return ndimage.affine_transform(
        image, grid_to_image[:3, :3], grid_to_image[:3, 3], output_shape=shape, order=1
    ).astype(np.float32)


def trajectory(rng: np.random.Generator, n_volumes: int) -> np.ndarray:
    """Drift plus one jump, scaled to reach about 3 mm and 3 degrees, shape (n_volumes, 6)."""
    scale = np.r_[[0.3] * 3, [np.radians(0.3)] * 3]
    steps = rng.normal(size=(n_volumes, 6)) * scale
    steps[n_volumes // 3] += rng.choice([-1.0, 1.0], size=6) * 5 * scale
    steps[0] = 0.0
    path = np.cumsum(steps, axis=0)
    limit = np.r_[[3.0] * 3, [np.radians(3.0)] * 3]
    return path / np.maximum(np.abs(path).max(axis=0) / limit, 1.0)


def bench_size(name: str, anatomy, n_volumes: int, rng: np.random.Generator) -> dict:
    shape, voxel_mm, n_mask = SIZES[name]
    image, brain, image_affine = anatomy
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = np.array([0.0, -18.0, 10.0]) - voxel_mm * (np.asarray(shape) - 1) / 2
    brain_mask = acquire(brain, image_affine, np.zeros(6), shape, affine) > 0.5
    # The decoder's mask is visual cortex: the most posterior brain voxels stand in for it.
    brain_ijk = np.argwhere(brain_mask)
    mask_ijk = brain_ijk[np.argsort(brain_ijk[:, 1], kind="stable")[:n_mask]]

    true_params = trajectory(rng, n_volumes)
    reference = acquire(image, image_affine, np.zeros(6), shape, affine)
    reference += rng.normal(0.0, 0.01, shape).astype(np.float32)
    volumes = [
        acquire(image, image_affine, p, shape, affine) + rng.normal(0.0, 0.01, shape).astype(np.float32)
        for p in true_params
    ]

    corrector = MotionCorrector()
    start = time.perf_counter()
    corrector.set_reference(reference, affine, brain_mask)
    reference_ms = 1e3 * (time.perf_counter() - start)

    times_ms, estimates = [], []
    for volume in volumes:
        start = time.perf_counter()
        estimate = corrector.estimate(volume)
        corrector.resample_mask(volume, estimate.params, mask_ijk)
        times_ms.append(1e3 * (time.perf_counter() - start))
        estimates.append(estimate)
    params = np.array([e.params for e in estimates])
    error = np.median(np.abs(params - true_params), axis=0)
    return {
        "size": name,
        "grid": list(shape),
        "voxel_mm": voxel_mm,
        "n_mask_voxels": int(len(mask_ijk)),
        "n_samples": int(len(corrector.sample_ijk_)),
        "n_volumes": n_volumes,
        "set_reference_ms": reference_ms,
        "median_ms": float(np.median(times_ms)),
        "p95_ms": float(np.percentile(times_ms, 95)),
        "p99_ms": float(np.percentile(times_ms, 99)),
        "mean_iterations": float(np.mean([e.n_iterations for e in estimates])),
        "converged_fraction": float(np.mean([e.converged for e in estimates])),
        "median_abs_error_mm": float(error[:3].max()),
        "median_abs_error_deg": float(np.degrees(error[3:]).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-volumes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/motion.json"))
    args = parser.parse_args()

    anatomy = template_epi()
    rng = np.random.default_rng(args.seed)
    rows = [bench_size(name, anatomy, args.n_volumes, rng) for name in SIZES]

    header = (
        f"{'size':8} {'grid':>12} {'mask':>6} {'samples':>7} {'median':>7} {'p95':>7} {'p99':>7} "
        f"{'iters':>5} {'err mm':>7} {'err deg':>7}"
    )
    print(header)
    for row in rows:
        grid = "x".join(str(n) for n in row["grid"])
        print(
            f"{row['size']:8} {grid:>12} {row['n_mask_voxels']:>6} {row['n_samples']:>7} "
            f"{row['median_ms']:>7.2f} {row['p95_ms']:>7.2f} {row['p99_ms']:>7.2f} "
            f"{row['mean_iterations']:>5.1f} {row['median_abs_error_mm']:>7.4f} "
            f"{row['median_abs_error_deg']:>7.4f}"
        )
    print(
        "times in ms per volume (estimate + resample of the mask voxels); errors: worst axis of "
        "the per-axis median over volumes"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "motion",
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor(),
            "machine": platform.machine(),
            "numpy": np.__version__,
        },
        "results": rows,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
