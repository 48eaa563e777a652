"""One run's per-volume path: motion correction -> mask -> normalisation -> incremental GLM.

:class:`FrontEnd` is what the live session calls for every volume, in acquisition order. It
touches only the mask voxels after motion estimation (no full reslice), so its cost is the motion
fit plus O(V·p) for the GLM: see ``bench/bench_frontend.py``.

Volumes may arrive in another voxel order than the bundle's grid (e.g. converted to NIfTI by SPM,
which reverses the DICOM's second axis): the same grid, so each volume is read through a view in
the grid's order (:class:`~rtdecoder.preprocess.orientation.VolumeReorienter`, decided once per
run from the first volume's affine and logged once). A volume on another grid is an error.

With GLMdenoise noise components (the bundle's :class:`~rtdecoder.glm.denoise.NoiseComponents`),
each volume's noise-pool voxels are also read at their motion-corrected positions and projected
onto the calibration's spatial components; the values are the volume's extra nuisance columns of
the GLM, exactly as calibration computed them for its own runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rtdecoder.config import RTDecoderConfig
from rtdecoder.errors import ConfigError, OrderError, VolumeError
from rtdecoder.glm.denoise import NoiseComponents
from rtdecoder.glm.design import TrialLike
from rtdecoder.glm.incremental import IncrementalGLM, TrialBeta
from rtdecoder.ingest.volume import Volume
from rtdecoder.preprocess.mask import OnlineNormaliser, VoxelMask
from rtdecoder.preprocess.motion import MotionCorrector, MotionEstimate
from rtdecoder.preprocess.orientation import VolumeReorienter, find_grid_transform

logger = logging.getLogger(__name__)


@dataclass
class ProcessedVolume:
    """What one volume did to the run.

    Attributes
    ----------
    tr_index : int
        0-based index in the run.
    values : ndarray of shape (n_voxels,), float32, or None
        Normalised mask values that entered the GLM (``None`` for a missing volume).
    motion : MotionEstimate or None
        Motion relative to the reference (``None`` when correction is off or the volume is missing).
    betas : list of TrialBeta
        Betas released or refined by this volume.
    confounds : ndarray of shape (n_components,), float64, or None
        The volume's GLMdenoise noise regressors (unitless), which entered the GLM with ``values``
        (and must be journaled with them to replay the volume); ``None`` without noise components.
    """

    tr_index: int
    values: np.ndarray | None
    motion: MotionEstimate | None
    betas: list[TrialBeta]
    confounds: np.ndarray | None = None

    @property
    def missing(self) -> bool:
        """True when the volume never arrived and was left out of the model."""
        return self.values is None


class FrontEnd:
    """Motion-correct, mask, normalise and feed one run's volumes to its GLM.

    Parameters
    ----------
    mask : VoxelMask
        The subject's voxels in the reference grid.
    glm : IncrementalGLM or None
        The run's estimator (not yet started); ``None`` for a run without trials (motion and QA only).
    normaliser : OnlineNormaliser
        Maps raw mask values to the units the GLM and the model expect.
    motion : MotionCorrector or None
        Its reference already set, on the mask's grid; ``None`` reads the mask voxels as they are.
    denoise : NoiseComponents or None
        GLMdenoise's frozen components (the bundle's ``glmdenoise``), their pool on the mask's grid;
        the GLM must have been built with ``n_confounds`` equal to their count.

    Raises
    ------
    VolumeError
        If the motion reference is not on the mask's grid.
    ConfigError
        If the GLM's extra confound columns do not match the noise components.
    """

    def __init__(
        self,
        mask: VoxelMask,
        glm: IncrementalGLM | None,
        normaliser: OnlineNormaliser,
        motion: MotionCorrector | None = None,
        denoise: NoiseComponents | None = None,
    ) -> None:
        self.mask = mask
        self.glm = glm
        self.normaliser = normaliser
        self.motion = motion
        self.denoise = denoise
        self._mask_ijk = mask.ijk
        n_components = denoise.n_components if denoise is not None else 0
        if glm is not None and int(glm.n_confounds) != n_components:
            raise ConfigError(
                f"FrontEnd: the GLM has {glm.n_confounds} extra confound columns but the GLMdenoise components "
                f"number {n_components}; expected IncrementalGLM(n_confounds={n_components})"
            )
        if denoise is not None:
            denoise.check(mask.shape, "FrontEnd: glmdenoise")
            self._pool_ijk = np.asarray(denoise.pool_ijk, dtype=np.intp)
        if motion is not None and hasattr(motion, "affine_"):
            match = find_grid_transform(motion.shape_, motion.affine_, mask.shape, mask.affine)
            if not (match.matches() and match.transform.is_identity):
                raise VolumeError(
                    f"mask {mask.source}: grid {mask.shape} does not match the motion reference's {motion.shape_} "
                    f"(largest difference {match.difference_mm:.4g} mm); expected the mask on the reference grid"
                )
        self._to_grid = VolumeReorienter(mask.shape, mask.affine, f"the reference grid (mask {mask.source})")
        self.started_ = False

    def start(self) -> FrontEnd:
        """Start the GLM for the mask's voxel count; call once per run."""
        if self.glm is not None:
            self.glm.start(self.mask.n_voxels)
        self._to_grid.reset()
        self.started_ = True
        return self

    def process(self, volume: Volume) -> ProcessedVolume:
        """Preprocess one volume and update the GLM; stamps ``volume.times.processed_s``."""
        self._require_started("process")
        # A view in the grid's voxel order (the volume itself when already so); raises off the grid.
        data = self._to_grid.data(volume)
        if self.motion is not None:
            # One contiguous float32 copy at most (only for a reoriented or non-float32 volume),
            # shared by the fit and the mask sampling.
            data = np.ascontiguousarray(data, dtype=np.float32)
            estimate = self.motion.estimate(data)
            raw, motion_params = self.motion.resample_mask(data, estimate.params, self._mask_ijk), estimate.params
        else:
            raw, estimate, motion_params = self.mask.values(data), None, np.zeros(6)
        values = self.normaliser.normalise(raw)
        confounds = None
        if self.denoise is not None and self.glm is not None:
            # The pool is read like the mask: at the positions its voxels had in the reference.
            if self.motion is not None:
                pool = self.motion.resample_mask(data, motion_params, self._pool_ijk)
            else:
                pool = np.asarray(data)[tuple(self._pool_ijk.T)].astype(np.float32)
            confounds = self.denoise.regressors(pool)
        betas = self.glm.update(volume.index, values, motion_params, confounds) if self.glm is not None else []
        volume.times.processed_s = time.time()
        return ProcessedVolume(volume.index, values, estimate, betas, confounds)

    def replay(
        self, tr_index: int, values: np.ndarray, motion_params: np.ndarray, confounds: np.ndarray | None = None
    ) -> list[TrialBeta]:
        """Feed an already-preprocessed volume (from the journal) to the GLM.

        ``confounds`` are the volume's journaled noise regressors (:attr:`ProcessedVolume.confounds`),
        required with GLMdenoise components.
        """
        self._require_started("replay")
        if self.motion is not None and motion_params is not None:
            # The next live volume's FD is measured from the last journaled estimate, not from zero.
            self.motion.continue_from(motion_params)
        if self.glm is None:
            return []
        return self.glm.update(
            tr_index, np.asarray(values, dtype=np.float32), np.asarray(motion_params),
            None if confounds is None else np.asarray(confounds, dtype=np.float64),
        )

    def missing(self, tr_index: int) -> ProcessedVolume:
        """Leave a volume that never arrived out of the model."""
        self._require_started("missing")
        if self.glm is not None:
            self.glm.mark_missing(tr_index)
        return ProcessedVolume(tr_index, None, None, [])

    def finish(self) -> list[TrialBeta]:
        """The final beta of every trial of the run."""
        self._require_started("finish")
        return self.glm.finish() if self.glm is not None else []

    def _require_started(self, method: str) -> None:
        if not self.started_:
            raise OrderError(f"FrontEnd.{method} called before start(); call start() first")


def build_run_frontend(
    config: RTDecoderConfig,
    geometry: Any,
    trials: Sequence[TrialLike],
    tr_s: float,
    n_volumes: int,
    slice_time_ref_s: float,
    publish_refinements: bool | None = None,
) -> FrontEnd:
    """A started front end for one run, as the live session and ``rtdecoder evaluate`` both build it.

    Parameters
    ----------
    config : RTDecoderConfig
        The run's config (``preprocess`` and ``glm``).
    geometry : SessionGeometry
        :meth:`rtdecoder.session.runner.SessionGeometry.from_bundle`: mask, reference,
        ``signal_mean`` and HRFs (and its bundle's GLMdenoise components, when it has them).
    trials : sequence of TrialLike
        The run's trials (none: motion and QA only, no GLM).
    tr_s : float
        The run's TR, s.
    n_volumes : int
        Volumes the GLM is planned for.
    slice_time_ref_s : float
        The run's resolved slice-time reference, s.
    publish_refinements : bool, optional
        Overrides ``glm.publish_refinements`` (refinements never change first or final betas).

    Returns
    -------
    FrontEnd
        Started.
    """
    motion = None
    pre = config.preprocess
    if pre.motion_correction:
        motion = MotionCorrector(
            max_iterations=pre.motion_max_iterations, tolerance_mm=pre.motion_tolerance_mm,
            n_samples=pre.motion_n_samples,
        ).set_reference(geometry.reference, geometry.mask.affine)
    # Percent signal change of the bundle's baseline: the units calibration's GLM used.
    normaliser = OnlineNormaliser.from_stats(geometry.signal_mean, geometry.signal_mean / 100.0)
    glm_config = config.glm
    if publish_refinements is not None:
        glm_config = glm_config.model_copy(update={"publish_refinements": publish_refinements})
    if glm_config.hrf == "library" and geometry.hrf_index is None:
        # Per-voxel HRFs are chosen at calibration; without a bundle there is no choice to use.
        logger.info("glm.hrf 'library' needs a calibrated bundle; the canonical HRF is used")
        glm_config = glm_config.model_copy(update={"hrf": "canonical"})
    # GLMdenoise's frozen noise components, when the bundle has them: their regressors are extra
    # confounds of the GLM, as calibration fitted them.
    denoise = geometry.bundle.glmdenoise if geometry.bundle is not None else None
    # Live contrasts are referenced to the calibration's mean beta; without a bundle, to 0.
    live_level = geometry.bundle.beta_mean if geometry.bundle is not None else np.zeros(geometry.mask.n_voxels)
    glm = None if not trials else IncrementalGLM.from_config(
        glm_config, trials, float(tr_s), int(n_volumes), slice_time_ref_s=float(slice_time_ref_s),
        hrf_per_voxel=geometry.hrf_index if glm_config.hrf == "library" else None,
        n_confounds=denoise.n_components if denoise is not None else 0, live_level=live_level,
    )
    return FrontEnd(geometry.mask, glm, normaliser, motion, denoise=denoise).start()
