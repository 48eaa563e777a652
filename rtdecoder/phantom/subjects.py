"""A simulated subject: how its visual cortex answers images, how it moves, and its noise.

The forward model for one run, in percent signal change (PSC) of each brain voxel's baseline:

* **Responses.** Images are first mapped to a latent shared by all subjects
  (:func:`shared_latents`: z-scored pooled embeddings, PCA to ``phantom.latent_dim``, whitened and
  turned by a seeded random rotation). Visual voxel ``v`` answers trial ``j`` with the amplitude
  ``beta[j, v] = mean_v + gain_v * (w_v . latent[stim_j]) + nonvisual[j, v]``: ``w_v`` is a unit
  vector from spatially smooth random fields (neighbours are tuned alike), ``gain_v`` a smooth
  tuning strength, ``mean_v`` the response to any image, and ``nonvisual`` a trial-to-trial
  part that does not repeat with the image (an arousal factor shared by voxels plus a part
  independent per voxel). Its spread over trials is ``phantom.snr`` times the spread of
  the noise of least-squares single-trial estimates
  (:attr:`PhantomSubject.estimation_noise_std_psc`), so ``snr`` sets how hard single trials are
  to read, as in NSD.
* **HRF.** Each subject has :data:`N_HRF_SHAPES` shapes of its own (:func:`subject_hrf_shapes`),
  drawn from the inverse-logit family (:func:`inverse_logit_hrf`, Lindquist & Wager 2007), not
  from the double gammas of the GLM's library (:mod:`rtdecoder.glm.hrf`), so that choosing HRFs
  from that library is tested on shapes it does not contain. Time to peak, width and undershoot
  vary between subjects and within a subject by about as much as measured HRFs do (a subject's
  mean time to peak is drawn around 5.5 s, its shapes spread about 0.7 s around it). Each voxel
  takes one shape, by a smooth field so that neighbours peak at similar times. A trial's response
  is the HRF convolved with the ``image_s`` boxcar, scaled to a peak of 1, so a beta is the
  response's peak height in PSC. Responses are sampled at each slice's acquisition time.
* **Noise** (every brain voxel): AR(1) noise, cardiac (~1.1 Hz) and respiratory (~0.3 Hz) signals
  sampled at the slice times (so aliased at the TR) and strongest near CSF, and a polynomial
  drift of degree 3. Total noise std is :data:`NOISE_PSC` percent; ``phantom.physio_fraction``
  of its variance is physiological; the drift's std is ``phantom.drift_fraction`` of it.
* **Motion.** Six rigid parameters per volume (:data:`MOTION_PARAMETERS`): a smooth random walk,
  a per-run offset, and sudden jumps that partly recover. The head moves in scanner space, and
  every volume is resampled (trilinear) by :func:`move_volume`; thermal noise is added after.

Voxel order: "mask voxel order" is the C order of ``np.nonzero(mask)``, i.e. ``volume[mask]``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, signal, special, stats

from rtdecoder.config import RTDecoderConfig
from rtdecoder.errors import ConfigError
from rtdecoder.glm.events import Trial
from rtdecoder.phantom.anatomy import SubjectAnatomy, build_anatomy, rotation_matrix
from rtdecoder.phantom.schedule import (
    SubjectSchedule,
    build_schedule,
    run_n_volumes,
    slice_times_s,
)

logger = logging.getLogger(__name__)

#: Order and units of the six motion parameters of :attr:`SimulatedRun.motion`.
MOTION_PARAMETERS = ("trans_x_mm", "trans_y_mm", "trans_z_mm", "rot_x_rad", "rot_y_rad", "rot_z_rad")
#: Columns of :attr:`SimulatedRun.hrfs` and :attr:`PhantomSubject.hrf_library` (see :func:`inverse_logit_hrf`).
HRF_PARAMETERS = ("peak_s", "width_s", "undershoot_lag_s", "undershoot_ratio")
#: The parametric family of the subjects' HRFs (:func:`inverse_logit_hrf`).
HRF_FAMILY = "inverse_logit"
#: Number of HRF shapes of a subject.
N_HRF_SHAPES = 20
#: Std of all noise in a brain voxel, percent of its baseline.
NOISE_PSC = 1.5
#: Std of the thermal noise added to every voxel after motion, scanner units.
THERMAL_NOISE = 3.0
#: Mean response to any image, in units of the image-specific response std.
MEAN_RESPONSE_RATIO = 1.5
#: Share of the trial-to-trial response variance that repeats with the image.
STIMULUS_SHARE = 0.8
#: Distance (mm) that turns rotations into mm when sizing motion (a head radius, as for FD).
HEAD_RADIUS_MM = 50.0
_SMOOTH_FIELD_MM = 6.0
# Dispersion of the inverse-logit HRF's recovery from its undershoot, s: a slow return to baseline.
_RECOVERY_DISPERSION_S = 1.6


@dataclass
class SimulatedRun:
    """One simulated run, as the scanner would acquire it, with its ground truth.

    Attributes
    ----------
    volumes : ndarray of shape (nx, ny, nz, n_volumes), float32
        Image intensities, scanner units (about 0-1200).
    affine : ndarray of shape (4, 4)
        Voxel to scanner RAS+ mm.
    tr_s : float
        Repetition time, s.
    slice_times_s : ndarray of shape (nz,)
        Acquisition time of each slice after the volume's start, s.
    trials : list of Trial
        The run's trials; onsets are from the start of volume 0.
    motion : ndarray of shape (n_volumes, 6)
        Head pose of each volume, in :data:`MOTION_PARAMETERS` order (mm, rad), relative to
        the subject's ``reference_volume``; see :func:`rigid_transform`.
    true_betas : ndarray of shape (n_trials, n_voxels), float32
        Response amplitude of each trial in each visual voxel, PSC, mask voxel order.
    latents : ndarray of shape (n_trials, latent_dim), float32
        The shared latent of each trial's image.
    hrfs : ndarray of shape (n_voxels, 4)
        Each visual voxel's HRF, columns :data:`HRF_PARAMETERS` (:func:`inverse_logit_hrf`).
    hrf_index : ndarray of shape (n_voxels,), int
        Each visual voxel's row in the subject's HRF shapes (:attr:`PhantomSubject.hrf_library`).
    """

    volumes: np.ndarray
    affine: np.ndarray
    tr_s: float
    slice_times_s: np.ndarray
    trials: list[Trial]
    motion: np.ndarray
    true_betas: np.ndarray
    latents: np.ndarray
    hrfs: np.ndarray
    hrf_index: np.ndarray


@dataclass
class SimulatedBetas:
    """NSD-style single-trial betas of one run, estimated from a simulated visual time series.

    Attributes
    ----------
    betas : ndarray of shape (n_trials, n_voxels), float32
        Least-squares single-trial (LSA) estimates, PSC, mask voxel order.
    true_betas : ndarray of shape (n_trials, n_voxels), float32
        The amplitudes that generated the data.
    latents : ndarray of shape (n_trials, latent_dim), float32
        The shared latent of each trial's image.
    trials : list of Trial
        The run's trials.
    """

    betas: np.ndarray
    true_betas: np.ndarray
    latents: np.ndarray
    trials: list[Trial]


def shared_latents(pooled: np.ndarray, latent_dim: int, seed: int) -> np.ndarray:
    """Project image embeddings onto the latent every subject's visual cortex encodes.

    Parameters
    ----------
    pooled : ndarray of shape (n_stimuli, D)
        Pooled image embeddings of the whole stimulus bank.
    latent_dim : int
        Latent size; at most ``min(n_stimuli - 1, D)``.
    seed : int
        Seeds the rotation; the world seed, so that all subjects share it.

    Returns
    -------
    ndarray of shape (n_stimuli, latent_dim), float32
        Zero mean, unit variance and uncorrelated columns.

    Examples
    --------
    >>> z = shared_latents(np.random.default_rng(0).normal(size=(50, 8)), 4, seed=0)
    >>> z.shape, bool(np.allclose(np.cov(z.T, bias=True), np.eye(4), atol=1e-5))
    ((50, 4), True)
    """
    pooled = np.asarray(pooled, dtype=np.float64)
    if pooled.ndim != 2:
        raise ConfigError(f"pooled embeddings: expected shape (n_stimuli, D) (got {pooled.shape})")
    n, d = pooled.shape
    if latent_dim > min(n - 1, d):
        raise ConfigError(
            f"phantom.latent_dim: expected at most {min(n - 1, d)} for {n} stimuli with "
            f"{d}-dim embeddings (got {latent_dim})"
        )
    centred = pooled - pooled.mean(axis=0)
    std = centred.std(axis=0)
    centred = centred / np.where(std > 0, std, 1.0)
    u, _, _ = np.linalg.svd(centred, full_matrices=False)
    # Fix each component's sign so the projection does not depend on the LAPACK build.
    u = u[:, :latent_dim] * np.sign(u[np.abs(u[:, :latent_dim]).argmax(axis=0),
                                      np.arange(latent_dim)])
    whitened = u * np.sqrt(n)
    rotation, _ = np.linalg.qr(np.random.default_rng([seed, 7]).normal(size=(latent_dim,) * 2))
    return (whitened @ rotation).astype(np.float32)


def double_gamma_hrf(t_s: np.ndarray, peak_s: float, peak_width_s: float, undershoot_s: float,
                     undershoot_ratio: float) -> np.ndarray:
    """Glover's double-gamma haemodynamic response, peak value 1 before the undershoot.

    ``h(t) = (t/p)^(p/w) exp(-(t-p)/w) - r (t/u)^(u/w2) exp(-(t-u)/w2)`` with ``w2 = 0.9 s``;
    Glover (1999)'s canonical shape is ``peak_s=5.4, peak_width_s=0.9, undershoot_s=10.8,
    undershoot_ratio=0.35``.

    Parameters
    ----------
    t_s : ndarray
        Times after the impulse, s.
    peak_s, peak_width_s, undershoot_s, undershoot_ratio : float
        Time of the peak (s), its width scale (s), time of the undershoot (s), its depth.

    Returns
    -------
    ndarray, same shape as ``t_s``
    """
    t = np.clip(np.asarray(t_s, dtype=float), 0.0, None)
    w2 = 0.9
    with np.errstate(divide="ignore"):
        peak = np.exp((peak_s / peak_width_s) * np.log(t / peak_s) - (t - peak_s) / peak_width_s)
        under = np.exp((undershoot_s / w2) * np.log(t / undershoot_s) - (t - undershoot_s) / w2)
    return np.where(t > 0, peak - undershoot_ratio * under, 0.0)


def hrf_library(seed: int) -> np.ndarray:
    """The phantom's earlier HRF shapes (:func:`double_gamma_hrf` parameters), sorted by peak time.

    Double gammas, the family of the GLM's own library, so a world built from them could not show
    an HRF choice that fails on shapes outside the library. Subjects now draw their shapes with
    :func:`subject_hrf_shapes`; these stay for comparison.

    Returns
    -------
    ndarray of shape (N_HRF_SHAPES, 4)
        Columns :data:`HRF_PARAMETERS`; responses peak between about 4 and 7 s, undershoots
        come 5-9 s after the peak with depth 0.1-0.6.
    """
    rng = np.random.default_rng([seed, 5])
    # The undershoot pulls the response's peak ~0.1-0.2 s before the first gamma's peak.
    peak_s = np.sort(np.linspace(4.2, 7.1, N_HRF_SHAPES) + rng.uniform(-0.1, 0.1, N_HRF_SHAPES))
    peak_s = peak_s.clip(4.2, 7.1)
    width_s = rng.uniform(0.75, 1.1, N_HRF_SHAPES)
    undershoot_s = peak_s + rng.uniform(5.0, 9.0, N_HRF_SHAPES)
    ratio = rng.uniform(0.1, 0.6, N_HRF_SHAPES)
    return np.column_stack([peak_s, width_s, undershoot_s, ratio])


def inverse_logit_hrf(t_s: np.ndarray, peak_s: float, width_s: float, undershoot_lag_s: float,
                      undershoot_ratio: float) -> np.ndarray:
    """An inverse-logit haemodynamic response (Lindquist & Wager 2007), peak at ``peak_s``.

    Three logistic steps, ``L(x) = 1 / (1 + exp(-x))``: a rise to 1, a fall to ``-r`` and a
    recovery to 0, ``h(t) = L((t - T1) / d1) - (1 + r) L((t - T2) / d2) + r L((t - T3) / d3)``
    with ``T2 = T1 + width_s``, ``T3 = T2 + undershoot_lag_s``, ``r = undershoot_ratio``, rise and
    fall dispersions growing with the width (``d1 = width_s / 8``, ``d2 = width_s / 5``: the fall
    is slower than the rise) and ``d3 = 1.6 s``. ``T1`` is set so that the maximum falls at
    ``peak_s`` (to 1 ms). Unlike a gamma, the response rises and falls as logistic curves, with a
    flatter top, so it is no member of the GLM library's double-gamma family.

    Parameters
    ----------
    t_s : ndarray
        Times after the impulse, s; the response is 0 before 0.
    peak_s : float
        Time of the maximum, s.
    width_s : float
        Time from the rise to the fall (the first two steps), s; the full width at half maximum
        is within about 10% of it.
    undershoot_lag_s : float
        Time from the fall to the recovery from the undershoot, s.
    undershoot_ratio : float
        Level of the undershoot relative to the rise's 1; the trough is 0.3 to 1 times as deep,
        relative to the peak, the shorter the lag the shallower.

    Returns
    -------
    ndarray, same shape as ``t_s``
        Peak value just under 1 (the fall starts before the rise has ended).

    Examples
    --------
    >>> t_s = np.arange(0.0, 30.0, 0.01)
    >>> h = inverse_logit_hrf(t_s, 5.5, 4.5, 6.0, 0.3)
    >>> round(float(t_s[h.argmax()]), 2), bool(h.min() < -0.1), bool(abs(h[0]) < 1e-2)
    (5.5, True, True)
    """
    rise_s, fall_s = width_s / 8.0, width_s / 5.0

    def centred(t: np.ndarray) -> np.ndarray:  # the rise centred on 0
        return (special.expit(t / rise_s) - (1.0 + undershoot_ratio) * special.expit((t - width_s) / fall_s)
                + undershoot_ratio * special.expit((t - width_s - undershoot_lag_s) / _RECOVERY_DISPERSION_S))

    # The maximum lies between the rise and the fall; find it on a 1 ms grid.
    grid_s = np.arange(0.0, width_s, 1e-3)
    rise_at_s = peak_s - grid_s[np.argmax(centred(grid_s))]
    t = np.asarray(t_s, dtype=float)
    return np.where(t >= 0.0, centred(t - rise_at_s), 0.0)


def subject_hrf_shapes(seed: int, subject: int) -> np.ndarray:
    """A subject's HRF shapes (:func:`inverse_logit_hrf` parameters), sorted by time to peak.

    Drawn so that they vary as measured HRFs do, more between subjects than within one
    (Aguirre et al. 1998; Handwerker et al. 2004): the subject's mean time to peak is
    ``N(5.5, 0.4)`` s and its shapes spread ``N(0, 0.7)`` s about it (clipped to 3.5-8 s); the
    width grows with latency, ``5 + 0.4 (peak - 5.5) + N(0, 0.5)`` s (clipped to 3 s and to the
    lesser of 6.5 s and 0.9 times the time to peak; the full width at half maximum is about 0.2 s
    less); the undershoot recovers 4-8 s after the fall, with level 0.1-0.5 (both uniform), its
    trough 9-15 s after the impulse.

    Parameters
    ----------
    seed : int
        ``phantom.seed``.
    subject : int
        0-based subject index.

    Returns
    -------
    ndarray of shape (N_HRF_SHAPES, 4)
        Columns :data:`HRF_PARAMETERS`.

    Examples
    --------
    >>> shapes = subject_hrf_shapes(0, 0)
    >>> shapes.shape, bool(np.all(np.diff(shapes[:, 0]) >= 0))
    ((20, 4), True)
    """
    # Its own stream, so that drawing the HRFs leaves every other field of the subject unchanged.
    rng = np.random.default_rng([seed, 5, subject])
    subject_peak_s = 5.5 + 0.4 * rng.normal()
    peak_s = np.sort(np.clip(subject_peak_s + 0.7 * rng.normal(size=N_HRF_SHAPES), 3.5, 8.0))
    width_s = 5.0 + 0.4 * (peak_s - 5.5) + 0.5 * rng.normal(size=N_HRF_SHAPES)
    # At most 0.9 of the time to peak: a wider early response would have begun before the impulse.
    width_s = np.clip(width_s, 3.0, np.minimum(6.5, 0.9 * peak_s))
    lag_s = rng.uniform(4.0, 8.0, N_HRF_SHAPES)
    ratio = rng.uniform(0.1, 0.5, N_HRF_SHAPES)
    return np.column_stack([peak_s, width_s, lag_s, ratio])


def boxcar_responses(hrfs: np.ndarray, duration_s: float, dt_s: float = 0.02,
                     length_s: float = 40.0,
                     hrf: Callable[..., np.ndarray] = inverse_logit_hrf) -> tuple[np.ndarray, np.ndarray]:
    """Each HRF convolved with a ``duration_s`` boxcar, scaled to peak 1.

    Parameters
    ----------
    hrfs : ndarray of shape (n_hrfs, n_parameters)
        Parameters of ``hrf``, one row per shape.
    duration_s : float
        Boxcar length, s.
    dt_s, length_s : float
        Sampling step and length of the responses, s.
    hrf : callable, default=inverse_logit_hrf
        ``hrf(t_s, *row)``; :func:`double_gamma_hrf` for the rows of :func:`hrf_library`.

    Returns
    -------
    t_s : ndarray of shape (n_t,)
        Time after the onset, s.
    responses : ndarray of shape (n_hrfs, n_t)
    """
    t_s = np.arange(0.0, length_s, dt_s)
    box = np.ones(max(int(round(duration_s / dt_s)), 1))
    responses = np.empty((len(hrfs), t_s.size))
    for row, params in enumerate(hrfs):
        conv = np.convolve(hrf(t_s, *params), box)[: t_s.size]
        responses[row] = conv / conv.max()
    return t_s, responses


def rigid_transform(params: np.ndarray) -> np.ndarray:
    """Scanner-space (RAS+ mm) 4x4 matrix of one head pose.

    A point ``x`` of the head at rest is at ``R @ x + t`` in the moved head, with ``t`` the three
    translations (mm) and ``R = Rz @ Ry @ Rx`` from the three rotations (rad) about the
    scanner's x, y and z axes through the scanner origin (the grid centre).

    Parameters
    ----------
    params : ndarray of shape (6,)
        :data:`MOTION_PARAMETERS`.

    Returns
    -------
    ndarray of shape (4, 4)
    """
    matrix = np.eye(4)
    matrix[:3, :3] = rotation_matrix(np.asarray(params[3:6], dtype=float))
    matrix[:3, 3] = params[:3]
    return matrix


def move_volume(volume: np.ndarray, affine: np.ndarray, params: np.ndarray,
                order: int = 1) -> np.ndarray:
    """Resample a volume as the scanner sees it after the head moved by ``params``.

    Parameters
    ----------
    volume : ndarray of shape (nx, ny, nz)
        The head at rest.
    affine : ndarray of shape (4, 4)
        Voxel to scanner mm.
    params : ndarray of shape (6,)
        The pose (:func:`rigid_transform`).
    order : int
        Spline order of the interpolation (1: trilinear).

    Returns
    -------
    ndarray of shape (nx, ny, nz), float32
    """
    # Output voxel i shows the resting head at A^-1 T^-1 A i.
    to_rest = np.linalg.inv(affine) @ np.linalg.inv(rigid_transform(params)) @ affine
    return ndimage.affine_transform(
        volume, to_rest[:3, :3], to_rest[:3, 3], order=order, mode="constant", cval=0.0,
        output=np.float32,
    )


class PhantomSubject:
    """One simulated subject: anatomy, visual mask, tuning, HRFs, noise and motion.

    Build with :meth:`build`; everything follows from ``(phantom.seed, subject_index)``.

    Attributes
    ----------
    index : int
        0-based subject number.
    anatomy : SubjectAnatomy
        The head on the acquisition grid.
    mask : ndarray of shape (nx, ny, nz), bool
        Visual-cortex voxels (occipital grey matter).
    schedule : SubjectSchedule
        The subject's trials.
    """

    def __init__(self, config: RTDecoderConfig, index: int, anatomy: SubjectAnatomy,
                 mask: np.ndarray, schedule: SubjectSchedule, fields: dict[str, np.ndarray]):
        self.config = config
        self.index = index
        self.anatomy = anatomy
        self.mask = mask
        self.schedule = schedule
        self._fields = fields
        self._latent_cache: tuple[str, np.ndarray] | None = None

    @classmethod
    def build(cls, config: RTDecoderConfig, index: int,
              stim_ids: list[str] | None = None) -> PhantomSubject:
        """Draw subject ``index`` of the world described by ``config``.

        Parameters
        ----------
        config : RTDecoderConfig
            Uses ``phantom``, ``experiment`` and ``scanner``.
        index : int
            0-based, below ``phantom.n_subjects``.
        stim_ids : list of str, optional
            The stimulus bank's identifiers, written into the trials.
        """
        ph = config.phantom
        if not 0 <= index < ph.n_subjects:
            raise ConfigError(f"subject {index}: expected 0..{ph.n_subjects - 1} (phantom.n_subjects)")
        rng = np.random.default_rng([ph.seed, 1, index])
        anatomy = build_anatomy(ph.grid_shape, ph.voxel_size_mm, rng)
        smooth_vox = _SMOOTH_FIELD_MM / np.asarray(ph.voxel_size_mm)
        n_target = int(round(ph.n_voxels * (1.0 + ph.n_voxels_spread * np.clip(rng.normal(), -2, 2))))
        mask = _visual_mask(anatomy, max(n_target, 10), smooth_vox, rng)
        fields = _voxel_fields(config, anatomy, mask, smooth_vox, rng, subject_hrf_shapes(ph.seed, index))
        schedule = build_schedule(config, index, stim_ids)
        logger.info("subject %d: %d visual voxels of %d brain voxels", index, int(mask.sum()),
                    int(anatomy.brain_mask.sum()))
        return cls(config, index, anatomy, mask, schedule, fields)

    @property
    def affine(self) -> np.ndarray:
        """Voxel to scanner RAS+ mm, shape (4, 4)."""
        return self.anatomy.affine

    @property
    def reference_volume(self) -> np.ndarray:
        """Noise-free EPI-like head at rest, shape (nx, ny, nz), float32."""
        return self.anatomy.reference_volume

    @property
    def n_voxels(self) -> int:
        """Number of visual-cortex voxels."""
        return int(self.mask.sum())

    @property
    def hrfs(self) -> np.ndarray:
        """Each visual voxel's HRF parameters, shape (n_voxels, 4), :data:`HRF_PARAMETERS`."""
        return self._fields["library"][self._fields["hrf_index"][self._fields["visual_rows"]]]

    @property
    def hrf_library(self) -> np.ndarray:
        """The subject's HRF shapes, shape (N_HRF_SHAPES, 4), :data:`HRF_PARAMETERS` (:func:`subject_hrf_shapes`)."""
        return self._fields["library"]

    @property
    def hrf_index(self) -> np.ndarray:
        """Each visual voxel's row in :attr:`hrf_library`, shape (n_voxels,)."""
        return self._fields["hrf_index"][self._fields["visual_rows"]]

    @property
    def slice_times_s(self) -> np.ndarray:
        """Acquisition time of each slice, s, shape (nz,)."""
        return slice_times_s(self.anatomy.grid_shape[2], self.config.scanner.tr_s,
                             self.config.scanner.slice_order)

    @property
    def estimation_noise_std_psc(self) -> float:
        """Std over trials of the noise of least-squares single-trial betas (PSC).

        ``phantom.snr`` is the ratio of the true betas' std over trials to this. Exact for
        the AR(1) part of the noise and the physiological part taken as white, for this
        subject's run design, the library's middle HRF and a cubic drift model.
        """
        if "estimation_noise_std" not in self._fields:
            ph = self.config.phantom
            trials = self.schedule.run(0, 0)
            n_vol = run_n_volumes(self.config.experiment, self.config.scanner.tr_s)
            t_s, responses = boxcar_responses(self._fields["library"][N_HRF_SHAPES // 2][None],
                                              self.config.experiment.image_s)
            lag = (np.arange(n_vol)[:, None] * self.config.scanner.tr_s
                   - np.array([t.onset_s for t in trials])[None, :])
            design = np.hstack([np.interp(lag, t_s, responses[0], left=0.0, right=0.0),
                                _legendre(n_vol, 3)])
            steps = np.abs(np.subtract.outer(np.arange(n_vol), np.arange(n_vol)))
            noise_cov = NOISE_PSC**2 * ((1.0 - ph.physio_fraction) * ph.noise_ar1**steps
                                        + ph.physio_fraction * np.eye(n_vol))
            # Centre over trials: the error common to all trials of a voxel (the mean response
            # is nearly collinear with the baseline) does not blur which image was seen.
            n_trials = len(trials)
            centre = np.eye(n_trials) - 1.0 / n_trials
            estimator = centre @ np.linalg.pinv(design)[:n_trials]
            beta_cov = estimator @ noise_cov @ estimator.T
            self._fields["estimation_noise_std"] = np.array(np.sqrt(np.mean(np.diag(beta_cov))))
        return float(self._fields["estimation_noise_std"])

    def latents(self, pooled: np.ndarray) -> np.ndarray:
        """The shared latents of the whole bank, shape (n_stimuli, latent_dim) (cached)."""
        pooled = np.ascontiguousarray(pooled)
        digest = hashlib.blake2b(pooled.tobytes(), digest_size=16).hexdigest() + str(pooled.shape)
        if self._latent_cache is None or self._latent_cache[0] != digest:
            latent = shared_latents(pooled, self.config.phantom.latent_dim, self.config.phantom.seed)
            self._latent_cache = (digest, latent)
        return self._latent_cache[1]

    def true_betas(self, trials: list[Trial], pooled: np.ndarray,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Response amplitudes of the visual voxels to ``trials``.

        Returns
        -------
        betas : ndarray of shape (n_trials, n_voxels), float32
            PSC, mask voxel order.
        latents : ndarray of shape (n_trials, latent_dim), float32
        """
        latent_all = self.latents(pooled)
        stim = np.array([t.stim_index for t in trials])
        if stim.size and stim.max() >= latent_all.shape[0]:
            raise ConfigError(f"pooled embeddings: expected at least {stim.max() + 1} rows "
                              f"(phantom.n_stimuli) (got {latent_all.shape[0]})")
        latents = latent_all[stim]
        f = self._fields
        response_std = self.config.phantom.snr * self.estimation_noise_std_psc
        tuned = latents @ f["weights"]                                    # (n_trials, n_voxels)
        n_trials, n_vox = tuned.shape
        arousal = rng.normal(size=(n_trials, 1)) * f["arousal_loading"][None, :]
        independent = rng.normal(size=(n_trials, n_vox))
        nonvisual = np.sqrt(0.4) * arousal + np.sqrt(0.6) * independent
        betas = response_std * (
            MEAN_RESPONSE_RATIO * f["mean_gain"][None, :]
            + f["gain"][None, :] * (np.sqrt(STIMULUS_SHARE) * tuned
                                    + np.sqrt(1 - STIMULUS_SHARE) * nonvisual)
        )
        return betas.astype(np.float32), latents.astype(np.float32)

    def simulate_run(self, session: int, run: int, pooled: np.ndarray) -> SimulatedRun:
        """Simulate one run's volumes.

        Parameters
        ----------
        session, run : int
            0-based; the same pair always gives the same run.
        pooled : ndarray of shape (n_stimuli, D)
            Pooled embeddings of the whole stimulus bank.

        Returns
        -------
        SimulatedRun
        """
        cfg = self.config
        ph = cfg.phantom
        trials = self.schedule.run(session, run)
        rng = np.random.default_rng([ph.seed, 2, self.index, session, run])
        true_betas, latents = self.true_betas(trials, pooled, rng)
        n_vol = run_n_volumes(cfg.experiment, cfg.scanner.tr_s)
        f = self._fields
        brain_psc = self._noise_psc(rng, n_vol)                          # (n_brain, n_vol)
        brain_psc[f["visual_rows"]] += self._task_psc(trials, true_betas, n_vol)
        motion = self._motion(rng, n_vol)

        reference = self.reference_volume
        brain_idx = np.flatnonzero(self.anatomy.brain_mask)
        baseline = reference.ravel()[brain_idx]
        volumes = np.empty((*reference.shape, n_vol), dtype=np.float32)
        still = reference.copy().ravel()
        for n in range(n_vol):
            still[brain_idx] = baseline * (1.0 + brain_psc[:, n] / 100.0)
            moved = move_volume(still.reshape(reference.shape), self.affine, motion[n])
            moved += rng.normal(scale=THERMAL_NOISE, size=moved.shape).astype(np.float32)
            volumes[..., n] = np.abs(moved)
        return SimulatedRun(
            volumes=volumes, affine=self.affine.copy(), tr_s=cfg.scanner.tr_s,
            slice_times_s=self.slice_times_s, trials=list(trials), motion=motion,
            true_betas=true_betas, latents=latents, hrfs=self.hrfs, hrf_index=self.hrf_index,
        )

    def simulate_betas(self, session: int, run: int, pooled: np.ndarray) -> SimulatedBetas:
        """NSD-style single-trial betas of one run, without simulating whole volumes.

        The visual voxels' time series (responses and noise as in :meth:`simulate_run`, no
        motion) are fitted by least squares with one regressor per trial, convolved with each
        voxel's own HRF (as GLMsingle's per-voxel HRF choice does), plus a cubic drift, so the
        betas carry realistic single-trial estimation noise, correlated between
        neighbouring trials.
        """
        cfg = self.config
        ph = cfg.phantom
        trials = self.schedule.run(session, run)
        rng = np.random.default_rng([ph.seed, 4, self.index, session, run])
        true_betas, latents = self.true_betas(trials, pooled, rng)
        n_vol = run_n_volumes(cfg.experiment, cfg.scanner.tr_s)
        rows = self._fields["visual_rows"]
        series = self._noise_psc(rng, n_vol, rows) + self._task_psc(trials, true_betas, n_vol)
        betas = np.empty_like(true_betas)
        designs = self._trial_designs(trials, n_vol)                      # (n_lib, n_slices, n_vol, n_trials)
        drift = _legendre(n_vol, 3)
        for (lib, slc), cols in self._groups().items():
            design = np.hstack([designs[lib, slc], drift])
            solution, *_ = np.linalg.lstsq(design, series[cols].T, rcond=None)
            betas[:, cols] = solution[: len(trials)]
        return SimulatedBetas(betas=betas.astype(np.float32), true_betas=true_betas,
                              latents=latents, trials=list(trials))

    # --- the pieces of the forward model --------------------------------------------------

    def _groups(self) -> dict[tuple[int, int], np.ndarray]:
        """Visual voxels (mask order) grouped by (HRF row, slice), which share a design."""
        f = self._fields
        keys = self.hrf_index * 10_000 + f["slice"][f["visual_rows"]]
        groups = {}
        for key in np.unique(keys):
            groups[(int(key // 10_000), int(key % 10_000))] = np.flatnonzero(keys == key)
        return groups

    def _trial_designs(self, trials: list[Trial], n_vol: int) -> np.ndarray:
        """Trial regressors of each HRF sampled at each slice's times.

        Returns
        -------
        ndarray of shape (n_hrfs, n_slices, n_vol, n_trials)
        """
        t_s, responses = boxcar_responses(self._fields["library"], self.config.experiment.image_s)
        acq_s = (np.arange(n_vol)[None, :] * self.config.scanner.tr_s
                 + self.slice_times_s[:, None])                           # (n_slices, n_vol)
        onsets = np.array([t.onset_s for t in trials])
        lag = acq_s[:, :, None] - onsets[None, None, :]                   # (n_slices, n_vol, n_trials)
        out = np.empty((len(responses), *lag.shape))
        for row, response in enumerate(responses):
            out[row] = np.interp(lag, t_s, response, left=0.0, right=0.0)
        return out

    def _task_psc(self, trials: list[Trial], betas: np.ndarray, n_vol: int) -> np.ndarray:
        """Evoked signal of the visual voxels, shape (n_voxels, n_vol), PSC."""
        designs = self._trial_designs(trials, n_vol)
        out = np.empty((betas.shape[1], n_vol))
        for (lib, slc), cols in self._groups().items():
            out[cols] = (designs[lib, slc] @ betas[:, cols]).T
        return out

    def _noise_psc(self, rng: np.random.Generator, n_vol: int,
                   rows: np.ndarray | None = None) -> np.ndarray:
        """AR(1) + physiological + drift noise of brain voxels, shape (n_rows, n_vol), PSC.

        ``rows`` picks brain voxels (C order of the brain mask); default all.
        """
        ph = self.config.phantom
        f = self._fields
        rows = np.arange(f["slice"].size) if rows is None else rows
        n = rows.size
        ar_std = NOISE_PSC * np.sqrt(1.0 - ph.physio_fraction)
        innovations = rng.normal(size=(n, n_vol))
        innovations[:, 0] /= np.sqrt(1.0 - ph.noise_ar1**2)
        ar = signal.lfilter([np.sqrt(1.0 - ph.noise_ar1**2)], [1.0, -ph.noise_ar1], innovations, axis=1)
        noise = ar_std * ar

        tr_s = self.config.scanner.tr_s
        acq_s = np.arange(n_vol)[None, :] * tr_s + self.slice_times_s[f["slice"][rows], None]
        physio_var = ph.physio_fraction * NOISE_PSC**2
        for name, rate_hz, share in (("cardiac", rng.uniform(1.0, 1.3), 0.4),
                                     ("resp", rng.uniform(0.22, 0.33), 0.6)):
            phase = _wandering_phase(rng, rate_hz, n_vol * tr_s + tr_s)
            amplitude = np.sqrt(2.0 * share * physio_var) * f[f"{name}_amplitude"][rows]
            noise += amplitude[:, None] * np.sin(phase(acq_s) + f[f"{name}_phase"][rows, None])

        legendre = _legendre(n_vol, 3)[:, 1:]                               # (n_vol, 3)
        coef = f["drift"][rows] + rng.normal(scale=0.5, size=(n, 3))
        drift = coef @ legendre.T
        drift *= ph.drift_fraction * NOISE_PSC / max(float(drift.std()), 1e-12)
        return noise + drift

    def _motion(self, rng: np.random.Generator, n_vol: int) -> np.ndarray:
        """Head pose of each volume, shape (n_vol, 6), :data:`MOTION_PARAMETERS`."""
        ph = self.config.phantom
        tr_s = self.config.scanner.tr_s
        to_units = np.array([1.0, 1.0, 1.0] + [1.0 / HEAD_RADIUS_MM] * 3)
        walk = np.cumsum(rng.normal(size=(n_vol, 6)), axis=0)
        walk = ndimage.gaussian_filter1d(walk, sigma=3.0, axis=0)
        walk -= walk[0]
        walk *= ph.motion_drift_mm / max(float(walk.std()), 1e-12)
        offset = rng.normal(scale=ph.motion_drift_mm, size=6)
        jumps = np.zeros((n_vol, 6))
        n_jumps = rng.poisson(ph.motion_jump_per_min * n_vol * tr_s / 60.0)
        for at in rng.integers(1, n_vol, size=n_jumps):
            direction = rng.normal(size=6)
            step = ph.motion_jump_mm * direction / np.linalg.norm(direction)
            recovery = np.exp(-np.arange(n_vol - at) * tr_s / 10.0)
            jumps[at:] += step[None, :] * (0.5 + 0.5 * recovery[:, None])
        return (walk + offset + jumps) * to_units


def _visual_mask(anatomy: SubjectAnatomy, n_voxels: int, smooth_vox: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
    """The ``n_voxels`` most posterior cortical grey-matter voxels, with an uneven border."""
    candidates = anatomy.brain_mask & (anatomy.gm > 0.35)
    if candidates.sum() < n_voxels:
        raise ConfigError(
            f"phantom.n_voxels: expected at most {int(candidates.sum())} visual voxels on this "
            f"grid (a subject drew {n_voxels})"
        )
    mni = anatomy.mni_coordinates(candidates)
    border = _smooth_field(anatomy.grid_shape, smooth_vox * 2, rng)[candidates]
    # Below the tentorium (MNI z < -20 behind y = -40) is cerebellum, not visual cortex.
    cerebellum = (mni[:, 2] < -20.0) & (mni[:, 1] < -40.0)
    score = mni[:, 1] + 12.0 * border + 200.0 * cerebellum
    chosen = np.argsort(score, kind="stable")[:n_voxels]
    mask = np.zeros(anatomy.grid_shape, dtype=bool)
    ijk = np.argwhere(candidates)[chosen]
    mask[tuple(ijk.T)] = True
    return mask


def _voxel_fields(config: RTDecoderConfig, anatomy: SubjectAnatomy, mask: np.ndarray,
                  smooth_vox: np.ndarray, rng: np.random.Generator, library: np.ndarray) -> dict[str, np.ndarray]:
    """Per-voxel parameters: tuning of visual voxels, HRF rows (into ``library``) and noise of all brain voxels."""
    ph = config.phantom
    shape = anatomy.grid_shape
    brain = anatomy.brain_mask
    visual_rows = np.flatnonzero(mask[brain])
    hrf_field = _smooth_field(shape, smooth_vox, rng)[brain]
    hrf_index = np.minimum((stats.norm.cdf(hrf_field) * N_HRF_SHAPES).astype(int), N_HRF_SHAPES - 1)

    weights = _smooth_fields_in_mask(mask, ph.latent_dim, smooth_vox, rng)  # (latent, n_vox)
    weights /= np.linalg.norm(weights, axis=0, keepdims=True)
    gain = np.exp(0.35 * _smooth_field(shape, smooth_vox, rng)[mask])
    mean_gain = np.exp(0.3 * _smooth_field(shape, smooth_vox, rng)[mask])
    arousal_loading = 1.0 + 0.3 * _smooth_field(shape, smooth_vox, rng)[mask]

    csf = anatomy.csf[brain]
    fields = {
        "library": library,
        "hrf_index": hrf_index,
        "visual_rows": visual_rows,
        "slice": np.nonzero(brain)[2],
        "weights": weights,
        "gain": gain / gain.mean(),
        "mean_gain": mean_gain / mean_gain.mean(),
        "arousal_loading": arousal_loading,
        "drift": np.column_stack([_smooth_field(shape, smooth_vox * 3, rng)[brain] for _ in range(3)]),
    }
    for name in ("cardiac", "resp"):
        raw = (0.4 + csf) * np.exp(0.3 * _smooth_field(shape, smooth_vox, rng)[brain])
        fields[f"{name}_amplitude"] = raw / np.sqrt(np.mean(raw**2))
        fields[f"{name}_phase"] = np.pi * _smooth_field(shape, smooth_vox * 2, rng)[brain]
    return fields


def _smooth_field(shape: tuple[int, int, int], sigma_vox: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    """Gaussian random field with unit variance, smooth over ``sigma_vox`` voxels."""
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma_vox, mode="wrap")
    return field / field.std()


def _smooth_fields_in_mask(mask: np.ndarray, n_fields: int, sigma_vox: np.ndarray,
                           rng: np.random.Generator) -> np.ndarray:
    """``n_fields`` smooth random fields sampled at the mask voxels, shape (n_fields, n_voxels).

    Only the mask's bounding box (plus a margin) is filled, so NSD-sized grids stay cheap.
    """
    ijk = np.argwhere(mask)
    margin = np.ceil(3 * sigma_vox).astype(int)
    low = np.maximum(ijk.min(axis=0) - margin, 0)
    high = ijk.max(axis=0) + margin + 1
    box = tuple(int(h - l) for l, h in zip(low, high, strict=True))
    noise = rng.normal(size=(*box, n_fields))
    smooth = ndimage.gaussian_filter(noise, (*sigma_vox, 0.0), mode="nearest")
    local = ijk - low
    values = smooth[local[:, 0], local[:, 1], local[:, 2]]                 # (n_voxels, n_fields)
    return (values / values.std(axis=0)).T


def _wandering_phase(rng: np.random.Generator, rate_hz: float, duration_s: float):
    """Phase (rad) of a rhythm whose rate drifts by a few percent; returns phase(t_s)."""
    dt_s = 0.05
    t_s = np.arange(0.0, duration_s + dt_s, dt_s)
    wander = ndimage.gaussian_filter1d(rng.normal(size=t_s.size), sigma=200.0)
    rate = rate_hz * (1.0 + 0.05 * wander / max(float(wander.std()), 1e-12))
    phase = 2 * np.pi * np.cumsum(rate) * dt_s + rng.uniform(0, 2 * np.pi)

    def at(times_s: np.ndarray) -> np.ndarray:
        return np.interp(times_s, t_s, phase)

    return at


def _legendre(n_vol: int, degree: int) -> np.ndarray:
    """Legendre polynomials 0..degree over the run, shape (n_vol, degree + 1)."""
    x = np.linspace(-1.0, 1.0, n_vol)
    return np.polynomial.legendre.legvander(x, degree)
