"""Motion correction: per-volume cost, bias on known motions of real volumes, and SimpleITK's answers.

Three parts, each printed as a table and written to the same JSON file.

1. **Cost.** Two sizes: the NSD grid (81 x 104 x 83 at 1.8 mm, 15,000 mask voxels) and the phantom
   preset's (48 x 56 x 46 at 3 mm, 2,500 mask voxels). Volumes are EPI-like images made from
   nilearn's bundled MNI152 templates (``rtdecoder.phantom.anatomy.template_epi``), moved along a
   drifting trajectory with a jump (up to 3 mm / 3 degrees) with noise, as in tests/test_motion.py.
   Each volume is timed from its array to the corrected mask values with numpy's default threads
   (only the small BLAS products may use a second core; set OPENBLAS_NUM_THREADS=1 to compare),
   as wall time and as this thread's CPU time (the load average is written with the figures).
2. **Known motions of real volumes.** A real EPI volume (the Prisma series ``ep2d_Asc_2``, volume
   3, 64 x 64 x 36 at 3.2 x 3.2 x 3.6 mm, and the Skyra series, volume 0, 64 x 64 x 27 at
   3 x 3 x 4 mm, from ``../shared/data/real-dicom``) is moved by known rigid transforms: each of the
   six parameters alone and all six at once (signs + - + + - +), at 0.1, 0.2, 0.5 and 2 mm / degrees,
   resampled with a quintic spline (``scipy.ndimage.affine_transform(order=5)``; not the cubic
   B-spline the estimator uses, so that the test is not circular), and for the translations also
   shifted exactly in k-space (``fourier_shift``: the band-limited shift an EPI acquisition would
   see). Both :class:`~rtdecoder.preprocess.motion.MotionCorrector` (cold start) and SimpleITK
   register the moved copy to the original; the table gives, per case, the worst ratio
   estimate / truth over the moved parameters and the largest spurious parameter (the unmoved
   ones, as displacement on the 50 mm FD sphere) as a fraction of the motion.
3. **The real Prisma series.** All 6 volumes registered to volume 3, by the corrector (run in
   order with its warm start, as live; and with 40 iterations allowed) and by SimpleITK;
   parameters in mm and degrees, FD from the previous volume, and the correlation with volume 3
   inside the head before and after undoing each estimate (cubic spline resampling).

SimpleITK (``pip install -e '.[bench]'``) is a rigid ``Euler3DTransform`` about the same centre as
the corrector's (the grid centre), B-spline interpolation, every voxel sampled, two levels
(shrink 2 then 1, smoothing 1 voxel then none), regular-step gradient descent scaled by physical
shift, with the normalized-correlation metric (the corrector's cost: squared differences after a
global gain) and with Mattes mutual information (robust to contrast changes); one thread. Its
transform maps reference points to moving ones, as the corrector's does, and is turned into the
corrector's parameters through the 4x4 world matrix, so both are in the same convention. Parts 2
and 3 are skipped when the real DICOM folder is absent; the SimpleITK columns with
``--no-sitk`` or when SimpleITK is not installed. SimpleITK takes seconds per registration, the
corrector milliseconds, so the full bench runs for about ten minutes (one minute without SimpleITK).

Run::

    python bench/bench_motion.py [--n-volumes 100] [--no-sitk] [--out bench/results/motion.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from rtdecoder.ingest.readers import read_volume
from rtdecoder.phantom.anatomy import template_epi
from rtdecoder.preprocess.motion import (
    FD_RADIUS_MM,
    MotionCorrector,
    framewise_displacement,
    rigid_matrix,
    rigid_params,
)

SIZES = {
    "nsd": ((81, 104, 83), 1.8, 15000),
    "phantom": ((48, 56, 46), 3.0, 2500),
}
REAL_DICOM_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-dicom"
PRISMA_SERIES = "prisma-mosaic-dcmqa/ep2d_Asc_2"
PRISMA_REFERENCE_INDEX = 3
SKYRA_SERIES = "skyra-mosaic-rtcloud"
KNOWN_SIZES = ((0.1, 0.1), (0.2, 0.2), (0.5, 0.5), (2.0, 2.0))  # (mm, degrees)
# Weights that turn a parameter vector into FD-like displacement, mm: rotations on the 50 mm sphere.
DISPLACEMENT_WEIGHTS = np.r_[1.0, 1.0, 1.0, [FD_RADIUS_MM] * 3]


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

    times_ms, cpu_ms, estimates = [], [], []
    for volume in volumes:
        start, start_cpu = time.perf_counter(), time.thread_time()
        estimate = corrector.estimate(volume)
        corrector.resample_mask(volume, estimate.params, mask_ijk)
        times_ms.append(1e3 * (time.perf_counter() - start))
        cpu_ms.append(1e3 * (time.thread_time() - start_cpu))
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
        # This thread's CPU time: less inflated than wall time when other work shares the cores.
        "median_cpu_ms": float(np.median(cpu_ms)),
        "mean_iterations": float(np.mean([e.n_iterations for e in estimates])),
        "converged_fraction": float(np.mean([e.converged for e in estimates])),
        "median_abs_error_mm": float(error[:3].max()),
        "median_abs_error_deg": float(np.degrees(error[3:]).max()),
    }


# --- known motions of real volumes ------------------------------------------------------------


def grid_centre(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """World position of voxel ``(shape - 1) / 2``, mm: the corrector's rotation centre."""
    return affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + affine[:3, 3]


def move_rigid(volume: np.ndarray, affine: np.ndarray, params: np.ndarray, order: int = 5) -> np.ndarray:
    """The volume with its content moved by ``params`` (the corrector's convention), spline-resampled.

    Parameters
    ----------
    volume : ndarray of shape (nx, ny, nz)
    affine : ndarray of shape (4, 4)
        Voxel-to-world, mm.
    params : ndarray of shape (6,)
        ``(tx, ty, tz)`` mm, ``(rx, ry, rz)`` radians: tissue at world ``x`` goes to ``T(params)(x)``.
    order : int, default=5
        Spline order of ``scipy.ndimage.affine_transform`` (edges repeat the nearest voxel).

    Returns
    -------
    ndarray of shape (nx, ny, nz), float32
    """
    motion = rigid_matrix(params, grid_centre(volume.shape, affine))
    grid_to_grid = np.linalg.inv(affine) @ np.linalg.inv(motion) @ affine
    moved = ndimage.affine_transform(
        np.asarray(volume, dtype=np.float64), grid_to_grid[:3, :3], grid_to_grid[:3, 3], order=order, mode="nearest"
    )
    return moved.astype(np.float32)


def shift_fourier(volume: np.ndarray, affine: np.ndarray, shift_mm: np.ndarray, pad_voxels: int = 8) -> np.ndarray:
    """The volume with its content translated by ``shift_mm`` (world, mm), exactly in k-space.

    Parameters
    ----------
    volume : ndarray of shape (nx, ny, nz)
    affine : ndarray of shape (4, 4)
    shift_mm : ndarray of shape (3,)
        World translation of the content, mm.
    pad_voxels : int, default=8
        Edge-repeat padding before the FFT, so content leaving one side does not wrap to the other.

    Returns
    -------
    ndarray of shape (nx, ny, nz), float32
    """
    shift_voxels = np.linalg.solve(affine[:3, :3], np.asarray(shift_mm, dtype=np.float64))
    padded = np.pad(np.asarray(volume, dtype=np.float64), pad_voxels, mode="edge")
    shifted = np.fft.ifftn(ndimage.fourier_shift(np.fft.fftn(padded), shift_voxels)).real
    inner = (slice(pad_voxels, -pad_voxels),) * 3
    return shifted[inner].astype(np.float32)


def known_motions(size_mm: float, size_deg: float) -> list[np.ndarray]:
    """Each parameter alone, then all six at once (signs + - + + - +), shape (6,) each."""
    motions = []
    for axis in range(6):
        params = np.zeros(6)
        params[axis] = size_mm if axis < 3 else np.radians(size_deg)
        motions.append(params)
    motions.append(np.r_[[size_mm, -size_mm, size_mm], np.radians([size_deg, -size_deg, size_deg])])
    return motions


def motion_errors(estimate: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Worst ratio estimate / truth over the moved parameters; largest spurious one / motion size.

    The spurious part is the largest unmoved parameter as displacement (mm, rotations on the FD
    sphere) over the largest moved one's displacement; 0 when all six moved.
    """
    moved = truth != 0
    ratios = estimate[moved] / truth[moved]
    worst_ratio = float(ratios[np.argmax(np.abs(ratios - 1.0))])
    if moved.all():
        return worst_ratio, 0.0
    size_mm = float(np.max(np.abs(truth[moved]) * DISPLACEMENT_WEIGHTS[moved]))
    spurious = float(np.max(np.abs(estimate[~moved]) * DISPLACEMENT_WEIGHTS[~moved])) / size_mm
    return worst_ratio, spurious


def load_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """All volumes of a DICOM folder (not the ``truncated_*`` file): data (n, nx, ny, nz) and affine."""
    paths = sorted(p for p in folder.glob("*.dcm") if not p.name.startswith("truncated"))
    volumes = [read_volume(p) for p in paths]
    return np.stack([v.data for v in volumes]).astype(np.float32), np.asarray(volumes[0].affine, dtype=np.float64)


def bench_known_motions(real_dir: Path, sitk_metrics: tuple[str, ...]) -> list[dict]:
    prisma, prisma_affine = load_series(real_dir / PRISMA_SERIES)
    skyra, skyra_affine = load_series(real_dir / SKYRA_SERIES)
    sources = {
        "prisma vol 3": (prisma[PRISMA_REFERENCE_INDEX], prisma_affine),
        "skyra vol 0": (skyra[0], skyra_affine),
    }
    rows = []
    for source, (reference, affine) in sources.items():
        corrector = MotionCorrector().set_reference(reference, affine, None)
        for size_mm, size_deg in KNOWN_SIZES:
            cases = [("spline5", p, move_rigid(reference, affine, p)) for p in known_motions(size_mm, size_deg)]
            cases += [
                ("fourier", p, shift_fourier(reference, affine, p[:3])) for p in known_motions(size_mm, size_deg)[:3]
            ]
            for generator in ("spline5", "fourier"):
                chosen = [(p, moved) for g, p, moved in cases if g == generator]
                row: dict[str, Any] = {
                    "volume": source, "size_mm": size_mm, "size_deg": size_deg, "generator": generator,
                    "n_motions": len(chosen),
                }
                for method in ("rtdecoder", *sitk_metrics):
                    worst_ratio, worst_spurious, elapsed_ms = 1.0, 0.0, []
                    for truth, moved in chosen:
                        start = time.perf_counter()
                        if method == "rtdecoder":
                            corrector.reset()
                            estimate = corrector.estimate(moved).params
                        else:
                            estimate = sitk_rigid(reference, moved, affine, method)
                        elapsed_ms.append(1e3 * (time.perf_counter() - start))
                        ratio, spurious = motion_errors(estimate, truth)
                        worst_ratio = ratio if abs(ratio - 1) > abs(worst_ratio - 1) else worst_ratio
                        worst_spurious = max(worst_spurious, spurious)
                    row[method] = {
                        "worst_ratio": worst_ratio,
                        "worst_spurious": worst_spurious,
                        "median_ms": float(np.median(elapsed_ms)),
                    }
                rows.append(row)
    return rows


# --- the real Prisma series -------------------------------------------------------------------


def undo_motion(volume: np.ndarray, affine: np.ndarray, params: np.ndarray) -> np.ndarray:
    """The moving volume resampled onto the reference's tissue positions (cubic spline)."""
    grid_to_grid = np.linalg.inv(affine) @ rigid_matrix(params, grid_centre(volume.shape, affine)) @ affine
    return ndimage.affine_transform(volume, grid_to_grid[:3, :3], grid_to_grid[:3, 3], order=3, mode="nearest")


def bench_prisma_series(real_dir: Path, sitk_metrics: tuple[str, ...]) -> dict:
    data, affine = load_series(real_dir / PRISMA_SERIES)
    reference = data[PRISMA_REFERENCE_INDEX]
    # The head: voxels brighter than a tenth of the robust maximum, holes filled.
    head = ndimage.binary_fill_holes(reference > 0.1 * np.percentile(reference, 99))

    def correlation(volume: np.ndarray) -> float:
        return float(np.corrcoef(volume[head], reference[head])[0, 1])

    methods: dict[str, list[dict]] = {}
    for name, max_iterations in (("rtdecoder", 10), ("rtdecoder, 40 iterations", 40)):
        corrector = MotionCorrector(max_iterations=max_iterations).set_reference(reference, affine, None)
        rows = []
        for volume in data:
            start = time.perf_counter()
            estimate = corrector.estimate(volume)
            elapsed_ms = 1e3 * (time.perf_counter() - start)
            rows.append({
                "params": estimate.params, "converged": estimate.converged,
                "n_iterations": estimate.n_iterations, "ms": elapsed_ms,
            })
        methods[name] = rows
    for metric in sitk_metrics:
        rows = []
        for volume in data:
            start = time.perf_counter()
            params = sitk_rigid(reference, volume, affine, metric)
            rows.append({"params": params, "ms": 1e3 * (time.perf_counter() - start)})
        methods[metric] = rows
    out: dict[str, Any] = {
        "series": PRISMA_SERIES, "reference_index": PRISMA_REFERENCE_INDEX,
        "correlation_before": [correlation(v) for v in data], "methods": {},
    }
    for name, rows in methods.items():
        params = np.array([row["params"] for row in rows])
        fd_mm = framewise_displacement(params)
        out["methods"][name] = [
            {
                **{k: v for k, v in row.items() if k != "params"},
                "translation_mm": params[i, :3].tolist(),
                "rotation_deg": np.degrees(params[i, 3:]).tolist(),
                "fd_mm": float(fd_mm[i]),
                "correlation_after": correlation(undo_motion(data[i], affine, params[i])),
            }
            for i, row in enumerate(rows)
        ]
    return out


# --- SimpleITK --------------------------------------------------------------------------------


def sitk_rigid(reference: np.ndarray, moving: np.ndarray, affine: np.ndarray, metric: str) -> np.ndarray:
    """SimpleITK's rigid registration of ``moving`` to ``reference``, in the corrector's parameters.

    Parameters
    ----------
    reference, moving : ndarray of shape (nx, ny, nz)
        Volumes on the same grid.
    affine : ndarray of shape (4, 4)
        Their voxel-to-world, mm (columns orthogonal, as scanner grids are).
    metric : {"sitk-cc", "sitk-mi"}
        Normalized correlation or Mattes mutual information (50 bins).

    Returns
    -------
    ndarray of shape (6,)
        ``(tx, ty, tz)`` mm, ``(rx, ry, rz)`` radians about the grid centre.
    """
    sitk = _simpleitk()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    registration = sitk.ImageRegistrationMethod()
    if metric == "sitk-cc":
        registration.SetMetricAsCorrelation()
    elif metric == "sitk-mi":
        registration.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    else:
        raise ValueError(f"metric: expected 'sitk-cc' or 'sitk-mi' (got {metric!r})")
    registration.SetMetricSamplingStrategy(registration.NONE)
    registration.SetInterpolator(sitk.sitkBSpline)
    registration.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-5, numberOfIterations=300, relaxationFactor=0.7, gradientMagnitudeTolerance=1e-8
    )
    registration.SetOptimizerScalesFromPhysicalShift()
    registration.SetShrinkFactorsPerLevel([2, 1])
    registration.SetSmoothingSigmasPerLevel([1.0, 0.0])
    registration.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    centre_mm = grid_centre(reference.shape, affine)
    initial = sitk.Euler3DTransform()
    initial.SetCenter(centre_mm.tolist())
    registration.SetInitialTransform(initial, inPlace=False)
    result = registration.Execute(_sitk_image(reference, affine), _sitk_image(moving, affine))
    if result.GetName() == "CompositeTransform":
        result = sitk.CompositeTransform(result).GetNthTransform(0)
    euler = sitk.Euler3DTransform(result)
    rotation = np.array(euler.GetMatrix()).reshape(3, 3)
    centre = np.array(euler.GetCenter())
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = np.array(euler.GetTranslation()) + centre - rotation @ centre
    # ITK's transform maps fixed (reference) points to moving ones, like T(params).
    return rigid_params(matrix, centre_mm)


def _simpleitk():
    """The SimpleITK module, imported only when the comparison runs (it is an optional extra)."""
    import SimpleITK

    return SimpleITK


def _sitk_image(data: np.ndarray, affine: np.ndarray):
    sitk = _simpleitk()
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    # SimpleITK arrays are (z, y, x); its index (i, j, k) is then the corrector's (i, j, k). The
    # world frame is RAS+ rather than ITK's LPS, which is a rotation and so changes no rigid fit.
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data, dtype=np.float32).transpose(2, 1, 0)))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(affine[:3, 3].tolist())
    image.SetDirection((affine[:3, :3] / spacing).ravel().tolist())
    return image


# --- output -----------------------------------------------------------------------------------


def print_cost(rows: list[dict]) -> None:
    print(
        f"{'size':8} {'grid':>12} {'mask':>6} {'samples':>7} {'median':>7} {'p95':>7} {'p99':>7} {'cpu':>7} "
        f"{'iters':>5} {'err mm':>7} {'err deg':>7}"
    )
    for row in rows:
        grid = "x".join(str(n) for n in row["grid"])
        print(
            f"{row['size']:8} {grid:>12} {row['n_mask_voxels']:>6} {row['n_samples']:>7} "
            f"{row['median_ms']:>7.2f} {row['p95_ms']:>7.2f} {row['p99_ms']:>7.2f} {row['median_cpu_ms']:>7.2f} "
            f"{row['mean_iterations']:>5.1f} {row['median_abs_error_mm']:>7.4f} "
            f"{row['median_abs_error_deg']:>7.4f}"
        )
    print(
        "times in ms per volume (estimate + resample of the mask voxels; cpu: median of this thread's CPU "
        "time); errors: worst axis of the per-axis median over volumes\n"
    )


def print_known(rows: list[dict], methods: tuple[str, ...]) -> None:
    header = f"{'volume':13} {'size':>9} {'generator':>9}"
    for method in methods:
        header += f" | {method + ' ratio':>17} {'spurious':>8} {'ms':>6}"
    print(header)
    for row in rows:
        line = f"{row['volume']:13} {row['size_mm']:>4.1f}mm/deg {row['generator']:>8}"
        for method in methods:
            cell = row[method]
            line += f" | {cell['worst_ratio']:>17.3f} {cell['worst_spurious']:>8.3f} {cell['median_ms']:>6.0f}"
        print(line)
    print(
        "ratio: worst estimate / truth over the moved parameters (6 single-parameter motions and all six "
        "at once; fourier: the 3 translations); spurious: largest unmoved parameter / motion size\n"
    )


def print_prisma(result: dict) -> None:
    print(f"{result['series']}, registered to volume {result['reference_index']}")
    print(f"{'method':25} {'vol':>3} {'tx,ty,tz mm':>22} {'rx,ry,rz deg':>24} {'FD mm':>7} {'corr':>11} {'conv':>5}")
    for name, rows in result["methods"].items():
        for index, row in enumerate(rows):
            translation = ",".join(f"{v:6.2f}" for v in row["translation_mm"])
            rotation = ",".join(f"{v:7.2f}" for v in row["rotation_deg"])
            converged = "" if "converged" not in row else ("yes" if row["converged"] else "NO")
            corr = f"{result['correlation_before'][index]:.2f}>{row['correlation_after']:.2f}"
            print(
                f"{name:25} {index:>3} {translation:>22} {rotation:>24} {row['fd_mm']:>7.3f} {corr:>11} {converged:>5}"
            )
    print("corr: correlation with the reference inside the head, before > after undoing the estimate\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-volumes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real-dicom", type=Path, default=REAL_DICOM_DIR)
    parser.add_argument("--no-sitk", action="store_true", help="skip the SimpleITK comparison")
    parser.add_argument("--out", type=Path, default=Path("bench/results/motion.json"))
    args = parser.parse_args()

    sitk_metrics: tuple[str, ...] = ()
    if not args.no_sitk:
        try:
            sitk_version = _simpleitk().Version_VersionString()
            sitk_metrics = ("sitk-cc", "sitk-mi")
        except ImportError:
            print("SimpleITK not installed (pip install -e '.[bench]'): its columns are left out\n")
    load_average_start = os.getloadavg()
    anatomy = template_epi()
    rng = np.random.default_rng(args.seed)
    cost = [bench_size(name, anatomy, args.n_volumes, rng) for name in SIZES]
    print_cost(cost)
    payload: dict[str, Any] = {
        "benchmark": "motion",
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor(),
            "machine": platform.machine(),
            "numpy": np.__version__,
            "simpleitk": sitk_version if sitk_metrics else None,
            "cpu_count": os.cpu_count(),
            "load_average_start": load_average_start,
        },
        "results": cost,
    }
    if args.real_dicom.is_dir():
        known = bench_known_motions(args.real_dicom, sitk_metrics)
        print_known(known, ("rtdecoder", *sitk_metrics))
        prisma = bench_prisma_series(args.real_dicom, sitk_metrics)
        print_prisma(prisma)
        payload["known_motions"] = known
        payload["prisma_series"] = prisma
    else:
        print(f"real DICOM folder not found at {args.real_dicom}: known-motion and Prisma parts skipped")
    payload["machine"]["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    print(f"wrote {args.out}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    main()
