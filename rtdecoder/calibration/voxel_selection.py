"""Decoding voxels chosen from the calibration session itself: ``calibrate --mask auto``.

A lab without a hand-drawn visual mask still gets a decoder. The brain is found in the session's
own motion reference (nilearn's ``compute_epi_mask``), every brain voxel's single-trial betas are
estimated once (the canonical HRF; no GLMdenoise or fractional ridge, which are for the decoding
voxels), and the ``voxel_selection.n_voxels`` voxels whose responses to the same image agree best
across repeats are kept: the split-half reliability of NSD's and MindEye's voxel selection, here
the correlation over the session's repeated images between the betas of a first and a second
showing. Voxels that answer the images consistently are the ones a decoder can read, wherever
they lie; task-unresponsive cortex, white matter and ventricles score near 0.

The kept voxels are the bundle's mask; the bundle records how they were chosen
(``metadata.calibration_mask``) and keeps every brain voxel's score as
``voxel_reliability.nii.gz`` on the reference grid (NaN outside the brain), to look at beside
the anatomy or to choose another count.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtdecoder.config import RTDecoderConfig
from rtdecoder.errors import BundleError
from rtdecoder.glm.events import Trial
from rtdecoder.preprocess.mask import VoxelMask

logger = logging.getLogger(__name__)

#: ``calibrate``'s ``mask`` value (``--mask auto``) that asks for a selection.
AUTO_MASK = "auto"
#: The file of the bundle that holds every brain voxel's reliability.
RELIABILITY_FILE = "voxel_reliability.nii.gz"
#: Fewer repeated images than this give a reliability too noisy to rank voxels by (its standard
#: error is about 1 / sqrt(n_images): 0.2 at 25).
MIN_REPEATED_IMAGES = 25


@dataclass(frozen=True)
class VoxelSelection:
    """The voxels kept and why.

    Attributes
    ----------
    mask : VoxelMask
        The kept voxels on the reference grid; its provenance says how they were chosen.
    reliability : ndarray of float32, shape (nx, ny, nz)
        Every brain voxel's split-half reliability (a correlation, -1 to 1); NaN outside the brain.
    """

    mask: VoxelMask
    reliability: np.ndarray

    def save_reliability(self, path: str | Path) -> Path:
        """Write :attr:`reliability` as a NIfTI on the mask's grid; returns the path."""
        import nibabel as nib

        path = Path(path)
        nib.save(nib.Nifti1Image(self.reliability.astype(np.float32), self.mask.affine), path)
        return path


def split_half_reliability(betas: np.ndarray, trials: Sequence[Trial], run_labels: Sequence[str]) -> tuple[
    np.ndarray, int
]:
    """Per voxel, the correlation over repeated images of a first and a second showing's betas.

    Each run's betas are z-scored per voxel first (runs differ in scale and offset, which would
    otherwise count as agreement or disagreement between showings in different runs).

    Parameters
    ----------
    betas : ndarray of shape (n_trials, n_voxels)
        Single-trial betas; rows with any NaN (trials not estimable) are left out.
    trials : sequence of Trial
        The rows' trials; an image is named by ``stim_id`` (or ``stim_index`` when it has none).
    run_labels : sequence of str
        Each row's run.

    Returns
    -------
    reliability : ndarray of shape (n_voxels,), float64
        Pearson correlation, -1 to 1 (0 for a voxel with constant betas).
    n_images : int
        The repeated images it was computed over.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> pattern = rng.normal(size=(30, 2)) * [1.0, 0.0]  # voxel 0 answers the image, voxel 1 not
    >>> trials = [Trial(f"t{k}", 0.0, 3.0, stim_id=str(k % 30)) for k in range(60)]
    >>> betas = np.tile(pattern, (2, 1)) + 0.3 * rng.normal(size=(60, 2))
    >>> r, n = split_half_reliability(betas, trials, ["run-01"] * 60)
    >>> n, bool(r[0] > 0.8), bool(abs(r[1]) < 0.4)
    (30, True, True)
    """
    betas = np.asarray(betas, dtype=np.float64)
    labels = np.asarray(run_labels)
    z = np.full_like(betas, np.nan)
    finite = np.all(np.isfinite(betas), axis=1)
    for label in np.unique(labels):
        rows = np.flatnonzero((labels == label) & finite)
        if rows.size > 1:
            block = betas[rows]
            spread = block.std(axis=0)
            z[rows] = (block - block.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    showings: dict[str, list[int]] = {}
    for row, trial in enumerate(trials):
        if finite[row]:
            key = trial.stim_id if trial.stim_id else f"index:{trial.stim_index}"
            showings.setdefault(key, []).append(row)
    pairs = [rows[:2] for rows in showings.values() if len(rows) >= 2]
    if not pairs:
        return np.zeros(betas.shape[1]), 0
    first, second = z[[p[0] for p in pairs]], z[[p[1] for p in pairs]]
    first, second = first - first.mean(axis=0), second - second.mean(axis=0)
    denominator = np.sqrt((first * first).sum(axis=0) * (second * second).sum(axis=0))
    r = np.divide((first * second).sum(axis=0), denominator, out=np.zeros(betas.shape[1]), where=denominator > 0)
    return r, len(pairs)


def select_reliable_voxels(
    session_dir: str | Path,
    config: RTDecoderConfig,
    progress: bool = True,
    reference: str | Path | None = None,
    select: Mapping[str, str | int] | None = None,
) -> VoxelSelection:
    """The ``voxel_selection.n_voxels`` most reliable brain voxels of a calibration session.

    Parameters
    ----------
    session_dir : str or Path
        The calibration session (:func:`rtdecoder.calibration.betas.find_runs`).
    config : RTDecoderConfig
        ``voxel_selection.n_voxels``; ``preprocess`` and ``glm`` as calibration uses them (the
        screening GLM takes the canonical HRF, without GLMdenoise or fractional ridge).
    progress : bool, default=True
        A progress bar over the session's volumes.
    reference, select
        As in :func:`rtdecoder.calibration.betas.estimate_session_betas` (the same reference the
        calibration then uses).

    Returns
    -------
    VoxelSelection

    Raises
    ------
    BundleError
        If the session repeats fewer than :data:`MIN_REPEATED_IMAGES` images, or its brain has
        fewer voxels than ``voxel_selection.n_voxels``.
    """
    from rtdecoder.calibration.betas import estimate_session_betas, session_reference
    from rtdecoder.glm.denoise import epi_brain_mask

    n_keep = config.voxel_selection.n_voxels
    reference_volume = session_reference(session_dir, reference, select, config.scanner.tr_s)
    affine = np.asarray(reference_volume.affine, dtype=np.float64)
    # No opening: it erodes the brain's edge, where cortex lies (on the phantom it left out 7% of
    # the visual voxels); what is not brain has no reliable responses and is not chosen.
    brain = epi_brain_mask(reference_volume.data, affine, opening=0)
    n_brain = int(brain.sum())
    if n_brain < n_keep:
        raise BundleError(
            f"{session_dir}: voxel_selection.n_voxels: expected at most the {n_brain} voxels of the EPI brain mask "
            f"(got {n_keep})"
        )
    screening = config.model_copy(update={"glm": config.glm.model_copy(
        update={"hrf": "canonical", "glmdenoise": False, "fracridge": False})})
    brain_mask = VoxelMask(brain, affine, source=f"{session_dir}: EPI brain mask of the motion reference")
    logger.info("voxel selection: estimating the betas of %d brain voxels", n_brain)
    session = estimate_session_betas(session_dir, screening, brain_mask, progress=progress,
                                     reference=reference_volume, select=select)
    reliability, n_images = split_half_reliability(session.betas, session.trials, session.run_labels)
    if n_images < MIN_REPEATED_IMAGES:
        raise BundleError(
            f"{session_dir}: --mask auto: the session shows {n_images} images more than once (stim_id in the "
            f"events files); expected at least {MIN_REPEATED_IMAGES} to rank voxels by the reliability of their "
            "responses; give a mask (--mask MASK.nii.gz)"
        )
    # Order by reliability, ties by voxel index, so that the same session always gives the same mask.
    order = np.lexsort((np.arange(reliability.size), -reliability))
    kept = order[:n_keep]
    ijk = np.argwhere(session.mask.grid)  # the brain voxels in the betas' column order
    grid = np.zeros(brain.shape, dtype=bool)
    grid[tuple(ijk[kept].T)] = True
    scores = np.full(brain.shape, np.nan, dtype=np.float32)
    scores[tuple(ijk.T)] = reliability
    threshold = float(reliability[kept[-1]])
    logger.info(
        "voxel selection: kept %d of %d brain voxels, reliability %.3f and above (median kept %.3f, %d repeated "
        "images)", n_keep, n_brain, threshold, float(np.median(reliability[kept])), n_images,
    )
    provenance = {
        "file": str(session_dir),
        "method": "automatic (--mask auto): nilearn compute_epi_mask of the motion reference (no opening), then the "
        "voxel_selection.n_voxels voxels of highest split-half reliability (correlation over repeated images of "
        "a first and a second showing's betas, canonical HRF)",
        "n_brain_voxels": n_brain,
        "n_voxels": int(n_keep),
        "n_repeated_images": int(n_images),
        "min_reliability": round(threshold, 4),
        "median_reliability": round(float(np.median(reliability[kept])), 4),
        "scores": RELIABILITY_FILE,
    }
    mask = VoxelMask(grid, affine, source=f"{session_dir}: --mask auto", provenance=provenance)
    return VoxelSelection(mask, scores)
