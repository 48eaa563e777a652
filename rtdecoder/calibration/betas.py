"""Offline single-trial betas of a calibration session, computed exactly as the live front end does.

Input (:func:`find_runs`), one session in either of two layouts:

- Run folders, as the scanner wrote them: each run is a sub-folder holding its volume files
  (Siemens MOSAIC or enhanced DICOM, or one NIfTI per volume; a single 4D NIfTI also works but is
  re-read per volume) and an ``events.tsv``. Runs are taken in name order; a session folder that
  holds an ``events.tsv`` itself is one run.
- A BIDS session (:mod:`rtdecoder.calibration.bids`): the ``ses-XX`` folder, its ``func/`` folder, or a
  ``sub-XX`` folder with one session. Each run is a 4D ``*_bold.nii.gz`` (with its
  ``_bold.json`` sidecar) or a folder of volumes named like the run, with the run's
  ``*_events.tsv`` beside it; runs are ordered by the ``run`` entity, numerically; a session of
  several tasks, acquisitions or echoes needs ``select`` (e.g. ``{"task": "nsd"}``). File names
  are parsed by hand, not with pybids or bidsschematools (the reasons are in
  :mod:`rtdecoder.calibration.bids`).

Events files need ``onset`` and ``duration``, and for calibration ``stim_id`` (or BIDS's
``stim_file``, whose stem is taken as the stim_id) or ``stim_index``, and ``is_test``; see
:func:`rtdecoder.glm.events.read_events_tsv`.

Steps (:func:`estimate_session_betas`), each the one the live session uses so that live betas are
in the units of calibration betas:

1. Motion reference (:func:`choose_reference`): the middle volume of the first run (read with
   :func:`rtdecoder.ingest.readers.read_volume`), or a named volume file on the session's grid.
   It is saved in the bundle and the live :class:`~rtdecoder.preprocess.motion.MotionCorrector`
   registers to it.
2. Mask: a given 0/1 NIfTI on the reference grid, in any voxel order (for real data, e.g. a
   visual-cortex mask drawn on the reference), one drawn on another volume of the subject and
   registered to the reference, or one resampled from another grid
   (:func:`rtdecoder.preprocess.registration.mask_to_reference`); for the phantom world the
   subject's ground-truth visual mask (the phantom's volumes are on the subject's grid).
3. Every volume is motion-corrected to the reference and its mask voxels read at the corrected
   positions (:meth:`MotionCorrector.estimate` and :meth:`MotionCorrector.resample_mask`, as
   :class:`~rtdecoder.session.frontend.FrontEnd`; a run in another voxel order is reoriented first).
4. ``signal_mean``: the mean corrected signal of each mask voxel over the whole session. Every
   time series is turned into percent signal change of it, ``100 * (v / signal_mean - 1)``, with
   the same :class:`~rtdecoder.preprocess.mask.OnlineNormaliser` the live session builds.
5. HRF per voxel (``glm.hrf: library``), by ``glm.hrf_selection`` (:func:`choose_session_hrf`,
   :func:`rtdecoder.glm.hrf.library_scores`): by default the library shape whose ON-OFF model (all
   trials one regressor, with the drift and motion confounds) best predicts each run from the
   other runs. Missing volumes are linearly interpolated for this choice only.
6. Betas: one :class:`~rtdecoder.glm.incremental.IncrementalGLM` per run with the config's method
   (LSS/LSA), drift and motion confounds, fed every volume and finished; the final betas are the
   whole-run OLS fit (missing volumes left out). The frame times (and the HRF choice of step 5)
   use the run's slice-time reference, :func:`rtdecoder.glm.design.slice_time_ref_from` of
   ``glm.slice_time_ref_s`` and the slice times of the run's first volume (``"auto"``: their
   median; 0 without slice times; for a folder of volumes without them, the ``SliceTiming`` of
   the run's BIDS ``_bold.json``). The live session applies the same rule to its first volume.
7. Optional, ``glm.fracridge: true`` (off by default): GLMsingle's fractional ridge regression
   (:func:`fracridge_session_betas`). Each run's single-trial design (every trial its own
   regressor, as LSA, with the same HRFs) is fitted by ridge regression at every fraction of
   ``glm.fracridge_fractions`` (:func:`rtdecoder.glm.fracridge.fracridge`). The drift and motion
   confounds are projected out of design and data first, so only the trial regressors are
   shrunk. Each voxel's ridge betas are then mapped onto its OLS betas of step 6 by a
   least-squares scale and offset over the session's trials, as GLMsingle does, so that they stay
   in the units of the OLS betas the live GLM produces. One fraction per voxel is chosen by
   cross-validation on stimuli shown in two or more runs (GLMsingle also chooses on repeated
   conditions; the criterion here is a correlation): the fraction whose betas of such trials
   correlate best with the mean of the same stimulus's betas in the other runs. Only training
   trials (``is_test`` false) take part in the choice, so the held-out evaluation stays
   independent of it. Fraction 1 is always a candidate and means *unchanged*: such voxels keep
   their step-6 betas exactly (for LSS, the LSS betas, not the LSA fit). Without any stimulus in
   two runs, every voxel keeps its OLS betas, with a warning.

Units with fractional ridge: the rescaling keeps each voxel's mean and its linear relation to the
OLS betas, but ridge betas vary less from trial to trial than OLS betas (that is the denoising),
so the z-scoring statistics of :mod:`rtdecoder.calibration.calibrate` computed on them are narrower than
those of the live OLS betas the model will see. The live GLM stays OLS: fractional ridge needs
the whole session.

GLMdenoise (``glm.glmdenoise``, :mod:`rtdecoder.glm.denoise`), between the HRF choice (step 5) and
the betas (step 6): the voxels of a brain mask wider than the decoding mask (``noise_pool_mask``,
default an EPI brain mask of the reference), minus the decoding mask and a one-voxel margin around
it, are read at their motion-corrected positions in step 3 with the mask voxels. Those whose
leave-one-run-out ON-OFF R^2 is below 0 form the noise pool; the leading spatial principal components of its normalised,
confound-projected signal (at most ``glm.glmdenoise_max_components``) are found over the whole
session, and their count, 0 allowed, is chosen by the leave-one-run-out R^2 of the mask voxels'
ON-OFF model (GLMdenoise's rule). Each volume's pool signal projected onto the chosen components
gives that volume's noise regressors, extra nuisance columns of the run's GLM (and of fractional
ridge's confounds). The live front end applies the same components, kept in the bundle
(:attr:`SessionBetas.glmdenoise`), to each live volume, so live betas are the same denoised betas.

Output (:func:`save_betas`): ``betas.nii.gz``, float32 of shape ``(n_voxels, 1, 1, n_trials)``
(mask space: voxel ``i`` is row ``i`` of the mask's C-order voxel list, ``mask.nii.gz`` beside it)
and ``trials.tsv`` (one row per volume of the fourth axis); with fractional ridge also
``fracridge_fractions.nii.gz``, float32 of shape ``(n_voxels, 1, 1)``, each voxel's chosen
fraction (:func:`load_fracridge_fractions`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from rtdecoder.calibration.bids import find_bids_runs, find_func_dir
from rtdecoder.config import RTDecoderConfig
from rtdecoder.errors import BundleError, ConfigError, VolumeError
from rtdecoder.glm.denoise import DenoiseRun, NoiseComponents, epi_brain_mask, fit_glmdenoise, noise_pool_candidates
from rtdecoder.glm.design import slice_time_ref_from, trial_regressors
from rtdecoder.glm.events import Trial, read_events_tsv
from rtdecoder.glm.fracridge import design_svd, fracridge
from rtdecoder.glm.hrf import CANONICAL_CANDIDATE, HRF_LIBRARY_SIZE, HRFRun, choose_library_hrf
from rtdecoder.glm.incremental import IncrementalGLM
from rtdecoder.ingest.ordering import RunNumbering
from rtdecoder.ingest.readers import read_volume
from rtdecoder.ingest.volume import Volume
from rtdecoder.preprocess.mask import OnlineNormaliser, VoxelMask
from rtdecoder.preprocess.motion import MotionCorrector
from rtdecoder.preprocess.orientation import VolumeReorienter, reorient_to_grid
from rtdecoder.preprocess.registration import MaskSource, mask_to_reference, read_volume_file

logger = logging.getLogger(__name__)

EVENTS_NAME = "events.tsv"
BETAS_NAME = "betas.nii.gz"
TRIALS_NAME = "trials.tsv"
MASK_NAME = "mask.nii.gz"
FRACTIONS_NAME = "fracridge_fractions.nii.gz"
TRIALS_COLUMNS = ("column", "run", "trial_id", "onset", "duration", "stim_id", "stim_index", "is_test")
# Offline, nothing needs releasing before the run ends: the final betas do not depend on release
# settings, and skipping releases avoids solving every trial at every volume.
_NEVER_RELEASE_S = 1e9
_SKIPPED_SUFFIXES = (".json", ".tsv", ".txt", ".md")
# Fractional ridge holds a few (n_fractions, n_trials, chunk) float64 arrays of candidates at a
# time: voxels are taken in chunks of at most this many elements each (2**23: 64 MB).
_FRACRIDGE_CHUNK_ELEMENTS = 2**23


@dataclass
class RunFolder:
    """One run of a calibration session on disk.

    Attributes
    ----------
    label : str
        The run folder's name (e.g. ``"run-01"``); for a BIDS run, its name without suffix
        (``"sub-08_ses-01_task-nsd_run-01"``).
    directory : Path
        The folder of the run's volumes (for a BIDS 4D file, its ``func/`` folder).
    volume_paths : list of Path
        The volume files, in name order (the readers give each its index); a BIDS 4D run has its
        one ``*_bold.nii.gz``.
    trials : list of Trial
        From the run's events file; onsets from the start of the first volume, s.
    events_path : Path or None
        The run's ``events.tsv`` or ``*_events.tsv``.
    entities : dict of str to str
        A BIDS run's entities (``{"sub": "08", "ses": "01", "task": "nsd", "run": "01"}``); empty
        for a run folder.
    sidecar_path : Path or None
        A BIDS run's ``*_bold.json``. For a folder of volumes, its ``SliceTiming`` stands in when
        the volumes carry no slice times of their own (:func:`run_slice_times_s`).
    """

    label: str
    directory: Path
    volume_paths: list[Path]
    trials: list[Trial]
    events_path: Path | None = None
    entities: dict[str, str] = field(default_factory=dict)
    sidecar_path: Path | None = None

    @property
    def source(self) -> Path:
        """What errors name: the run's one 4D file, else its folder of volumes."""
        return self.volume_paths[0] if len(self.volume_paths) == 1 else self.directory


@dataclass
class RunDesign:
    """One run's single-trial (LSA) design and data, as fractional ridge fits them.

    Attributes
    ----------
    trial_columns : ndarray of shape (n_groups, n_volumes, n_trials)
        Each HRF group's trial regressors over the whole run (one group with a canonical HRF).
    nuisance : ndarray of shape (n_volumes, n_nuisance)
        Confounds that are fitted but not shrunk (motion parameters, GLMdenoise's noise
        regressors, drift).
    group_of_voxel : ndarray of shape (n_voxels,), int
        The HRF group (first axis of ``trial_columns``) of each voxel.
    data : ndarray of shape (n_volumes, n_voxels)
        Percent signal change; NaN rows are missing volumes, left out of the fit.
    """

    trial_columns: np.ndarray
    nuisance: np.ndarray
    group_of_voxel: np.ndarray
    data: np.ndarray

    @classmethod
    def from_estimator(
        cls,
        estimator: IncrementalGLM,
        data: np.ndarray,
        motion_params: np.ndarray,
        motion_confounds: bool,
        confounds: np.ndarray | None = None,
    ) -> RunDesign:
        """The design a started :class:`IncrementalGLM` built, with the same confound columns.

        ``confounds`` (n_volumes, n_confounds) are the extra nuisance columns the estimator was fed
        (GLMdenoise's noise regressors; NaN rows of missing volumes are never used).
        """
        group_of_voxel = np.empty(estimator.n_voxels_, dtype=np.int64)
        for group, cols in enumerate(estimator.group_slices_):
            group_of_voxel[estimator.voxel_order_[cols]] = group
        nuisance = estimator.drift_
        if confounds is not None and confounds.shape[1]:
            nuisance = np.hstack([np.nan_to_num(confounds), nuisance])
        if motion_confounds:
            nuisance = np.hstack([np.nan_to_num(motion_params), nuisance])
        return cls(estimator.trial_columns_, nuisance, group_of_voxel, data)


@dataclass
class SessionBetas:
    """Single-trial betas of a calibration session and what produced them.

    Attributes
    ----------
    betas : ndarray of shape (n_trials, n_voxels), float32
        Percent signal change per unit regressor, mask voxel order, trials in run then schedule
        order. Rows of trials the GLM could not estimate are NaN.
    trials : list of Trial
    run_labels : list of str
        The run of each trial.
    mask : VoxelMask
        On the reference grid.
    reference : ndarray of shape (nx, ny, nz), float32
        The motion reference volume.
    signal_mean : ndarray of shape (n_voxels,), float32
        Mean motion-corrected signal per mask voxel over the session.
    hrf_index : ndarray of shape (n_voxels,), int32
        Library HRF per voxel (all 0 with a canonical HRF).
    tr_s : float
        Repetition time, s.
    motion_params : dict of str to ndarray of shape (n_volumes, 6)
        Per run: each volume's rigid motion to the reference (NaN rows for missing volumes).
    n_missing : dict of str to int
        Per run: volumes that were not found.
    fracridge_fractions : ndarray of shape (n_voxels,), float32, or None
        With ``glm.fracridge``: the fraction of the OLS norm chosen for each voxel (1: the voxel
        kept its OLS betas). None when the betas are OLS.
    slice_time_ref_s : dict of str to float
        Per run: the time within the TR its volumes' samples stood for in the GLM, s
        (:func:`rtdecoder.glm.design.slice_time_ref_from`).
    glmdenoise : NoiseComponents or None
        With ``glm.glmdenoise``: the chosen noise components, whose regressors the betas' GLMs had
        as confounds and the live front end applies to each volume. None without GLMdenoise, or
        when it chose 0 components (the betas are then the plain ones).
    glmdenoise_cv_r2_pct : ndarray of shape (n_tried + 1,), or None
        With ``glm.glmdenoise``: the median leave-one-run-out ON-OFF R^2, percent, at 0, 1, ...
        components, that the count was chosen on; None when GLMdenoise could not be fitted.
    """

    betas: np.ndarray
    trials: list[Trial]
    run_labels: list[str]
    mask: VoxelMask
    reference: np.ndarray
    signal_mean: np.ndarray
    hrf_index: np.ndarray
    tr_s: float
    motion_params: dict[str, np.ndarray] = field(default_factory=dict)
    n_missing: dict[str, int] = field(default_factory=dict)
    fracridge_fractions: np.ndarray | None = None
    slice_time_ref_s: dict[str, float] = field(default_factory=dict)
    glmdenoise: NoiseComponents | None = None
    glmdenoise_cv_r2_pct: np.ndarray | None = None

    @property
    def stim_index(self) -> np.ndarray:
        """Stimulus-bank row of each trial, shape (n_trials,), int64."""
        return np.array([t.stim_index for t in self.trials], dtype=np.int64)

    @property
    def is_test(self) -> np.ndarray:
        """True for test-image trials, shape (n_trials,), bool."""
        return np.array([t.is_test for t in self.trials], dtype=bool)


def find_runs(session_dir: str | Path, select: Mapping[str, str | int] | None = None) -> list[RunFolder]:
    """The runs of a calibration session: run folders, or a BIDS session's runs.

    Parameters
    ----------
    session_dir : str or Path
        Either a folder of run folders, each with its volume files and an ``events.tsv`` (taken in
        name order; a folder holding an ``events.tsv`` itself is a single run), or a BIDS session:
        the ``ses-XX`` folder, its ``func/`` folder, or a ``sub-XX`` folder with ``func/`` or one
        ``ses-XX`` (:func:`rtdecoder.calibration.bids.find_func_dir`). A BIDS run is a 4D
        ``*_bold.nii.gz`` or a folder of volumes named like the run, with its ``*_events.tsv``
        beside it; runs are ordered by the ``run`` entity, numerically
        (:func:`rtdecoder.calibration.bids.find_bids_runs`).
    select : mapping of str to str or int, optional
        BIDS only: entity values the runs must have (``{"task": "nsd"}``, ``{"echo": 2}``), for a
        session with several tasks, acquisitions or echoes.

    Returns
    -------
    list of RunFolder

    Raises
    ------
    BundleError
        If the folder does not exist, holds no run, a run holds no volume file, ``select`` is
        given for run folders, or a BIDS session is ambiguous (several sessions, tasks,
        acquisitions or echoes) or has an events file without data.
    """
    session_dir = Path(session_dir)
    if not session_dir.is_dir():
        raise BundleError(f"{session_dir}: --session: expected a folder of runs (no such folder)")
    if (session_dir / EVENTS_NAME).is_file():
        candidates = [session_dir]
    else:
        candidates = sorted(p for p in session_dir.iterdir() if p.is_dir() and (p / EVENTS_NAME).is_file())
    if candidates:
        if select:
            raise BundleError(
                f"{session_dir}: select: BIDS entities {dict(select)} given, but the session is run folders with "
                f"an {EVENTS_NAME} each; expected no selection (or a BIDS session)"
            )
        return [
            RunFolder(
                directory.name, directory, _volume_files(directory, EVENTS_NAME),
                read_events_tsv(directory / EVENTS_NAME), events_path=directory / EVENTS_NAME,
            )
            for directory in candidates
        ]
    func_dir = find_func_dir(session_dir)
    if func_dir is None:
        raise BundleError(
            f"{session_dir}: --session: expected run folders each holding volume files and an {EVENTS_NAME}, "
            "or a BIDS session (a ses-XX folder, its func/ folder, or a sub-XX folder with one session) with a "
            "*_bold.nii.gz or a folder of volumes per run and its *_events.tsv beside it (found none)"
        )
    runs = []
    for bids_run in find_bids_runs(func_dir, select):
        if bids_run.data_path.is_dir():
            directory, paths = bids_run.data_path, _volume_files(bids_run.data_path, bids_run.events_path.name)
        else:
            directory, paths = func_dir, [bids_run.data_path]
        runs.append(RunFolder(
            bids_run.label, directory, paths, read_events_tsv(bids_run.events_path),
            events_path=bids_run.events_path, entities=bids_run.entities, sidecar_path=bids_run.sidecar_path,
        ))
    return runs


def _volume_files(directory: Path, events_name: str) -> list[Path]:
    """A run folder's volume files in name order (not sidecars, tables or hidden files)."""
    paths = sorted(
        p for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".") and not p.name.lower().endswith(_SKIPPED_SUFFIXES)
    )
    if not paths:
        raise BundleError(f"{directory}: expected volume files (DICOM or NIfTI) for {events_name} (found none)")
    return paths


def read_run_volumes(run: RunFolder, default_tr_s: float | None = None) -> list[Volume]:
    """Read a run's volumes with the front end's reader, in index order.

    A single 4D NIfTI file is read volume by volume (``index_hint``); otherwise each file is one
    volume and carries its own index, numbered as the live watcher numbers it
    (:class:`~rtdecoder.ingest.ordering.RunNumbering`: a run named from 1 is not one TR late).
    ``default_tr_s`` is the TR of files that carry none. One run is held in memory at a time.
    """
    if len(run.volume_paths) == 1 and _is_series(run.volume_paths[0]):
        path = run.volume_paths[0]
        return [read_volume(path, index_hint=index, default_tr_s=default_tr_s)
                for index in range(int(nib.load(path).shape[3]))]
    numbering = RunNumbering()
    volumes: dict[int, Volume] = {}
    for position, path in enumerate(run.volume_paths):
        volume = numbering.assign(read_volume(path, index_hint=position, default_tr_s=default_tr_s))
        if volume.index in volumes:
            raise VolumeError(
                f"{path}: index {volume.index} also in {volumes[volume.index].source}; expected one file per volume"
            )
        volumes[volume.index] = volume
    return [volumes[index] for index in sorted(volumes)]


def run_slice_times_s(run: RunFolder, volumes: Sequence[Volume]) -> tuple[np.ndarray | None, str]:
    """The slice acquisition times of a run, as its first volume gives them.

    The first volume's own ``slice_times_s`` (from its DICOM header, NIfTI header or sidecar),
    as the live session takes its first volume's. A BIDS folder of volumes whose files carry none
    takes the ``SliceTiming`` of the run's ``*_bold.json`` (with ``SliceEncodingDirection`` ``k``
    or ``k-``).

    Parameters
    ----------
    run : RunFolder
    volumes : sequence of Volume
        The run's volumes in index order (:func:`read_run_volumes`).

    Returns
    -------
    slice_times_s : ndarray of shape (nz,) or None
        Seconds from the start of the volume, one per slice along the third axis; None when
        neither volumes nor sidecar carry them.
    source : str
        The file they came from (for messages).

    Raises
    ------
    VolumeError
        If the sidecar cannot be read, or its ``SliceTiming`` is not one time per slice.
    """
    if not volumes:
        return None, str(run.directory)
    first = volumes[0]
    if first.slice_times_s is not None:
        return np.asarray(first.slice_times_s, dtype=np.float64), str(first.source)
    path = run.sidecar_path
    if path is None:
        return None, str(first.source)
    try:
        sidecar = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise VolumeError(f"{path}: cannot read the run's sidecar: {err}") from None
    if not isinstance(sidecar, dict) or "SliceTiming" not in sidecar:
        return None, str(first.source)
    n_slices = first.data.shape[2]
    try:
        times_s = np.asarray(sidecar["SliceTiming"], dtype=np.float64)
    except (TypeError, ValueError):
        times_s = np.empty(0)
    if times_s.shape != (n_slices,):
        raise VolumeError(
            f"{path}: SliceTiming: expected {n_slices} times in s, one per slice of {first.source} "
            f"(got {sidecar['SliceTiming']!r:.80})"
        )
    direction = sidecar.get("SliceEncodingDirection", "k")
    if direction not in ("k", "k-"):
        raise VolumeError(
            f"{path}: SliceEncodingDirection: expected 'k' or 'k-' (slices along the third axis) (got {direction!r})"
        )
    # BIDS lists the times in slice-encoding order; "k-" runs from the last slice to the first.
    return (times_s[::-1].copy() if direction == "k-" else times_s), str(path)


def estimate_session_betas(
    session_dir: str | Path,
    config: RTDecoderConfig,
    mask: np.ndarray | VoxelMask | MaskSource | str | Path,
    progress: bool = True,
    reference: str | Path | Volume | None = None,
    select: Mapping[str, str | int] | None = None,
    noise_pool_mask: np.ndarray | VoxelMask | MaskSource | str | Path | None = None,
) -> SessionBetas:
    """Motion-correct, mask, normalise and fit single-trial betas for a whole session.

    Parameters
    ----------
    session_dir : str or Path
        Runs as :func:`find_runs` finds them.
    config : RTDecoderConfig
        Uses ``preprocess`` (motion correction) and ``glm`` (method, HRF, drift, confounds,
        ``slice_time_ref_s``).
    mask : ndarray of bool (nx, ny, nz), VoxelMask, MaskSource, str or Path
        The voxels to model, on the reference grid (in any voxel order: it is reoriented); a path
        is read as a 0/1 NIfTI; a :class:`~rtdecoder.preprocess.registration.MaskSource` may also
        be registered or resampled (:func:`~rtdecoder.preprocess.registration.mask_to_reference`).
        An array takes the reference's affine.
    progress : bool, default=True
        Show a tqdm bar over volumes.
    reference : str, Path or Volume, optional
        The motion reference (:func:`choose_reference`); default: the middle volume of the first run.
    select : mapping of str to str or int, optional
        BIDS entity values the runs must have (``{"task": "nsd"}``); see :func:`find_runs`.
    noise_pool_mask : like ``mask``, optional
        With ``glm.glmdenoise``: the brain voxels the noise pool is drawn from (the decoding mask's
        voxels and a one-voxel margin around them are left out); default an EPI brain mask of the
        reference
        (:func:`rtdecoder.glm.denoise.epi_brain_mask`).

    Returns
    -------
    SessionBetas
    """
    from tqdm.auto import tqdm

    runs = find_runs(session_dir, select)
    first_run = read_run_volumes(runs[0], config.scanner.tr_s)
    reference = choose_reference(first_run, reference)
    affine = np.asarray(reference.affine, dtype=np.float64)
    voxel_mask = _as_voxel_mask(mask, reference)
    glm = config.glm
    candidate_ijk = None  # GLMdenoise's noise-pool candidates: brain voxels outside the decoding mask
    if glm.glmdenoise:
        if noise_pool_mask is None:
            brain = epi_brain_mask(reference.data, affine)
        else:
            brain = _as_voxel_mask(noise_pool_mask, reference).grid
        candidate_ijk = noise_pool_candidates(brain, voxel_mask.grid)
        logger.info("GLMdenoise: %d noise-pool candidates (%s, away from the %d mask voxels)", candidate_ijk.shape[0],
                    "EPI brain mask of the reference" if noise_pool_mask is None else "noise_pool_mask",
                    voxel_mask.n_voxels)
    pre = config.preprocess
    motion = None
    if pre.motion_correction:
        motion = MotionCorrector(pre.motion_max_iterations, pre.motion_tolerance_mm, pre.motion_n_samples)
        motion.set_reference(reference.data, affine)
    raw_runs: list[tuple[RunFolder, np.ndarray, np.ndarray, float]] = []
    candidate_runs: list[np.ndarray] = []  # per run (n_volumes, n_candidates), with glm.glmdenoise
    slice_timing: list[tuple[np.ndarray | None, str]] = []  # each run's slice times, s, and where they are from
    # a single 4D file per run has no per-volume file count; the bar then counts without a total
    n_files = None if len(runs[0].volume_paths) == 1 else sum(len(run.volume_paths) for run in runs)
    with tqdm(total=n_files, desc="calibration volumes", unit="vol", disable=not progress) as bar:
        for number, run in enumerate(runs):
            volumes = first_run if number == 0 else read_run_volumes(run, config.scanner.tr_s)
            first_run = []
            values, params, tr_s, candidates = _correct_run(run, volumes, voxel_mask, motion, bar, candidate_ijk)
            raw_runs.append((run, values, params, tr_s))
            if candidates is not None:
                candidate_runs.append(candidates)
            slice_timing.append(run_slice_times_s(run, volumes))
            del volumes
    tr_s = raw_runs[0][3]
    for run, _, _, run_tr_s in raw_runs:
        if abs(run_tr_s - tr_s) > 1e-3:
            raise VolumeError(f"{run.source}: TR {run_tr_s} s differs from the first run's {tr_s} s")
    # Each run's own reference (slice timing could differ between runs); the live session takes
    # its run's from the first live volume by the same rule.
    slice_time_refs_s = [
        slice_time_ref_from(glm.slice_time_ref_s, times_s, tr_s, source=source) for times_s, source in slice_timing
    ]
    for run, ref_s, (times_s, _) in zip(runs, slice_time_refs_s, slice_timing, strict=True):
        logger.info(
            "%s: slice-time reference %.4g s (glm.slice_time_ref_s: %s; %s)", run.label, ref_s, glm.slice_time_ref_s,
            "no slice times" if times_s is None else f"slices acquired {times_s.min():.4g} to {times_s.max():.4g} s",
        )

    signal_mean = np.nanmean(np.concatenate([values for _, values, _, _ in raw_runs]), axis=0)
    if not np.all(signal_mean > 0):
        bad = int(np.sum(~(signal_mean > 0)))
        raise VolumeError(
            f"{voxel_mask.source}: mask: {bad} voxels have a non-positive mean signal over the session; "
            "expected brain voxels (percent signal change needs a positive mean)"
        )
    normaliser = OnlineNormaliser.from_stats(signal_mean, signal_mean / 100.0)
    psc_runs = [
        (run, _normalise_rows(normaliser, values), params) for run, values, params, _ in raw_runs
    ]
    hrf_index = np.zeros(voxel_mask.n_voxels, dtype=np.int32)
    if glm.hrf == "library":
        hrf_index = choose_session_hrf(psc_runs, config, tr_s, slice_time_refs_s)
    offline = glm.model_copy(update={"beta_wait_s": _NEVER_RELEASE_S, "publish_refinements": False})

    def run_estimator(run: RunFolder, n_volumes: int, slice_time_ref_s: float, n_confounds: int) -> IncrementalGLM:
        return IncrementalGLM.from_config(
            offline, run.trials, tr_s, n_volumes, slice_time_ref_s=slice_time_ref_s,
            hrf_per_voxel=hrf_index if glm.hrf == "library" else None, n_confounds=n_confounds,
        ).start(voxel_mask.n_voxels)

    denoise, denoise_curve, noise_regressors = None, None, [None] * len(psc_runs)
    if glm.glmdenoise:
        fit = _session_glmdenoise(psc_runs, candidate_runs, candidate_ijk, slice_time_refs_s, run_estimator, config)
        del candidate_runs
        if fit is not None:
            denoise, denoise_curve, noise_regressors = fit
    betas, trials, labels = [], [], []
    designs: list[RunDesign] = []
    for (run, psc, params), slice_time_ref_s, confounds in zip(
        psc_runs, slice_time_refs_s, noise_regressors, strict=True
    ):
        estimator = run_estimator(run, psc.shape[0], slice_time_ref_s, 0 if confounds is None else confounds.shape[1])
        for tr_index in range(psc.shape[0]):
            if np.isnan(psc[tr_index, 0]):
                estimator.mark_missing(tr_index)
            else:
                estimator.update(
                    tr_index, psc[tr_index], np.nan_to_num(params[tr_index]),
                    None if confounds is None else confounds[tr_index],
                )
        for beta in estimator.finish():
            betas.append(beta.beta)
        trials += run.trials
        labels += [run.label] * len(run.trials)
        if glm.fracridge:
            designs.append(RunDesign.from_estimator(estimator, psc, params, glm.motion_confounds, confounds))
    session_betas = np.stack(betas).astype(np.float32)
    fractions = None
    if glm.fracridge:
        is_test = np.array([t.is_test for t in trials], dtype=bool)
        session_betas, fractions = fracridge_session_betas(
            session_betas, designs, stimulus_keys(trials), ~is_test, glm.fracridge_fractions
        )
    result = SessionBetas(
        betas=session_betas,
        trials=trials,
        run_labels=labels,
        mask=voxel_mask,
        reference=np.asarray(reference.data, dtype=np.float32),
        signal_mean=signal_mean.astype(np.float32),
        hrf_index=hrf_index,
        tr_s=tr_s,
        motion_params={run.label: params for run, _, params, _ in raw_runs},
        n_missing={run.label: int(np.isnan(values[:, 0]).sum()) for run, values, _, _ in raw_runs},
        fracridge_fractions=fractions,
        slice_time_ref_s={run.label: ref_s for run, ref_s in zip(runs, slice_time_refs_s, strict=True)},
        glmdenoise=denoise,
        glmdenoise_cv_r2_pct=denoise_curve,
    )
    logger.info(
        "calibration betas: %d trials x %d voxels from %d runs", len(trials), voxel_mask.n_voxels, len(runs)
    )
    return result


def _session_glmdenoise(
    psc_runs: Sequence[tuple[RunFolder, np.ndarray, np.ndarray]],
    candidate_runs: Sequence[np.ndarray],
    candidate_ijk: np.ndarray,
    slice_time_refs_s: Sequence[float],
    run_estimator: Callable[[RunFolder, int, float, int], IncrementalGLM],
    config: RTDecoderConfig,
) -> tuple[NoiseComponents | None, np.ndarray, list[np.ndarray | None]] | None:
    """GLMdenoise for a session: the chosen components, the count's curve and each run's regressors.

    The ON-OFF designs and confounds are those of the runs' own GLMs (a plain estimator is started
    per run for them). Returns None when GLMdenoise cannot be fitted (logged); the regressors are
    None per run when it chose 0 components.
    """
    from rtdecoder.glm.hrf import DEFAULT_HRF_LENGTH_S, canonical_hrf

    glm = config.glm
    runs, group_of_voxel = [], None
    for (run, psc, params), slice_time_ref_s, candidates in zip(
        psc_runs, slice_time_refs_s, candidate_runs, strict=True
    ):
        estimator = run_estimator(run, psc.shape[0], slice_time_ref_s, 0)
        design = RunDesign.from_estimator(estimator, psc, params, glm.motion_confounds)
        group_of_voxel = design.group_of_voxel
        # The candidates have no HRF choice of their own: the canonical (Glover) shape.
        kernel = canonical_hrf("glover", estimator.tr_s, estimator.oversampling, DEFAULT_HRF_LENGTH_S)
        candidate_onoff = trial_regressors(run.trials, estimator.frame_times_s_, kernel, estimator.oversampling)
        runs.append(DenoiseRun(
            data=psc, onoff=design.trial_columns.sum(axis=2), nuisance=design.nuisance,
            candidate_values=candidates, candidate_onoff=candidate_onoff.sum(axis=1),
        ))
    fit = fit_glmdenoise(runs, group_of_voxel, candidate_ijk, glm.glmdenoise_max_components)
    if fit is None:
        return None
    chosen = fit.chosen
    if chosen is None:
        return None, fit.cv_r2_pct, [None] * len(runs)
    # The regressors the live front end computes from each volume, by the same arithmetic.
    regressors = [chosen.regressors(r.candidate_values[:, fit.pool_index]) for r in runs]
    return chosen, fit.cv_r2_pct, regressors


def stimulus_keys(trials: Sequence[Trial]) -> np.ndarray:
    """An integer per trial, equal for trials of the same stimulus; -1 for trials with none.

    Trials are matched on ``stim_id`` when they have one, otherwise on ``stim_index``.

    Parameters
    ----------
    trials : sequence of Trial

    Returns
    -------
    ndarray of shape (n_trials,), int64

    Examples
    --------
    >>> from rtdecoder.glm.events import Trial
    >>> stimulus_keys([Trial("a", 0.0, 1.0, stim_id="x"), Trial("b", 5.0, 1.0),
    ...                Trial("c", 9.0, 1.0, stim_id="x")]).tolist()
    [0, -1, 0]
    """
    names = [t.stim_id if t.stim_id else (f"#{t.stim_index}" if t.stim_index >= 0 else "") for t in trials]
    known = sorted({name for name in names if name})
    code = {name: number for number, name in enumerate(known)}
    return np.array([code.get(name, -1) for name in names], dtype=np.int64)


def fracridge_session_betas(
    ols_betas: np.ndarray,
    runs: Sequence[RunDesign],
    stimulus: np.ndarray,
    choose_on: np.ndarray,
    fractions: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """GLMsingle-style fractional ridge betas of a session, one fraction per voxel.

    For every run and HRF group, the confounds are projected out of the trial regressors and the
    data, and :func:`~rtdecoder.glm.fracridge.fracridge` fits the trial betas at every fraction
    (only trial regressors are shrunk). For every fraction and voxel, the ridge betas are mapped
    onto ``ols_betas`` by least squares, ``ols ~ scale * ridge + offset`` over the estimable
    trials, and the fraction-1 candidate is ``ols_betas`` itself. Each voxel then takes the
    candidate whose betas are most reliable over repeated stimuli: over the ``choose_on`` trials
    ``i`` whose stimulus was also shown in another run, the Pearson correlation between the
    candidate's beta of ``i`` and the mean of its betas of the same stimulus in the other runs
    (other runs only, so that the two sides' noise is independent; a correlation, not a squared
    error, because a squared error rewards whatever varies least, and the least reliable
    candidates, fitted onto OLS, vary least). Ties go to the larger fraction.

    Parameters
    ----------
    ols_betas : ndarray of shape (n_trials, n_voxels)
        The session's OLS betas (PSC), trials in run order; NaN rows (trials not estimable) stay
        NaN and take no part.
    runs : sequence of RunDesign
        The runs, in the order of ``ols_betas``'s rows; their trial counts must add up.
    stimulus : ndarray of shape (n_trials,), int
        Equal values for trials of the same stimulus, -1 for none (:func:`stimulus_keys`).
    choose_on : ndarray of shape (n_trials,), bool
        The trials whose repeats choose the fractions (e.g. not the held-out test images).
    fractions : sequence of float
        Candidate fractions of the OLS norm, each in (0, 1], 1 among them.

    Returns
    -------
    betas : ndarray of shape (n_trials, n_voxels), float32
        In the units of ``ols_betas``.
    chosen : ndarray of shape (n_voxels,), float32
        The fraction each voxel took (all 1 when no stimulus is shown in two runs).

    Raises
    ------
    ConfigError
        If the fractions are out of range or lack 1, or the arrays do not match the runs.
    """
    grid = np.unique(np.asarray(fractions, dtype=np.float64))
    if grid.size == 0 or not np.all((grid > 0.0) & (grid <= 1.0)) or grid[-1] != 1.0:
        raise ConfigError(
            f"glm.fracridge_fractions: expected fractions in (0, 1] including 1.0 (got {list(fractions)})"
        )
    ols = np.asarray(ols_betas, dtype=np.float64)
    counts = [design.trial_columns.shape[2] for design in runs]
    n_trials = int(sum(counts))
    if ols.ndim != 2 or ols.shape[0] != n_trials:
        raise ConfigError(
            f"fracridge: ols_betas: expected shape ({n_trials}, n_voxels), one row per trial of the runs "
            f"(got {ols.shape})"
        )
    stimulus, choose_on = np.asarray(stimulus), np.asarray(choose_on, dtype=bool)
    if stimulus.shape != (n_trials,) or choose_on.shape != (n_trials,):
        raise ConfigError(
            f"fracridge: stimulus, choose_on: expected shape ({n_trials},) (got {stimulus.shape}, {choose_on.shape})"
        )
    run_of_trial = np.repeat(np.arange(len(runs)), counts)
    estimable = np.all(np.isfinite(ols), axis=1)
    average = _repeat_average(stimulus, choose_on & estimable, run_of_trial)
    n_voxels = ols.shape[1]
    if average is None:
        logger.warning(
            "fractional ridge: no training stimulus is shown in two different runs, so no fraction can be "
            "cross-validated; every voxel keeps its OLS betas (fraction 1)"
        )
        return ols.astype(np.float32), np.ones(n_voxels, dtype=np.float32)
    targets, weights = average
    betas = np.full_like(ols, np.nan)
    chosen = np.ones(n_voxels)
    chunk = max(1, _FRACRIDGE_CHUNK_ELEMENTS // (grid.size * n_trials))
    fits: dict = {}  # each run's confound basis and each (run, HRF group)'s design SVD, across chunks
    for start in range(0, n_voxels, chunk):
        cols = np.arange(start, min(start + chunk, n_voxels))
        candidates = _ridge_candidates(runs, cols, grid, n_trials, fits)
        candidates = _rescale_onto(candidates, ols[:, cols], estimable)
        candidates[-1] = ols[:, cols]  # fraction 1: the OLS betas themselves
        scores = np.stack([_column_correlation(c[targets], weights @ c) for c in candidates])
        scores[~np.isfinite(scores)] = -np.inf
        # argmax over the reversed grid: ties (e.g. voxels with no signal) keep the least shrinkage
        best = grid.size - 1 - np.argmax(scores[::-1], axis=0)
        betas[:, cols] = candidates[best, :, np.arange(cols.size)].T
        chosen[cols] = grid[best]
    betas[~estimable] = np.nan
    logger.info(
        "fractional ridge: fractions cross-validated on %d trials of %d repeated stimuli; median fraction "
        "%.2f, %.0f%% of %d voxels kept OLS (fraction 1)", targets.size, np.unique(stimulus[targets]).size,
        float(np.median(chosen)), 100.0 * float(np.mean(chosen == 1.0)), n_voxels,
    )
    return betas.astype(np.float32), chosen.astype(np.float32)


def _repeat_average(
    stimulus: np.ndarray, usable: np.ndarray, run_of_trial: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Trials with a repeat in another run, and the matrix averaging those repeats for each.

    Returns ``(targets, weights)``: ``targets`` (n_targets,) trial rows; ``weights`` a sparse
    (n_targets, n_trials) matrix whose row ``n`` averages the other runs' trials of the stimulus of
    ``targets[n]``. None when no trial has such a repeat.
    """
    from scipy import sparse

    targets, rows, sources, values = [], [], [], []
    for key in np.unique(stimulus[usable & (stimulus >= 0)]):
        members = np.flatnonzero(usable & (stimulus == key))
        for i in members:
            others = members[run_of_trial[members] != run_of_trial[i]]
            if others.size:
                rows += [len(targets)] * others.size
                targets.append(i)
                sources += others.tolist()
                values += [1.0 / others.size] * others.size
    if not targets:
        return None
    weights = sparse.csr_matrix((values, (rows, sources)), shape=(len(targets), stimulus.size))
    return np.array(targets, dtype=np.int64), weights


def _ridge_candidates(
    runs: Sequence[RunDesign], cols: np.ndarray, grid: np.ndarray, n_trials: int, fits: dict
) -> np.ndarray:
    """Ridge betas (n_fractions, n_trials, len(cols)) of voxels ``cols``, run by run, group by group.

    ``fits`` caches what does not depend on the voxels (confound bases, residual designs and their
    SVDs) from one chunk of voxels to the next.
    """
    candidates = np.empty((grid.size, n_trials, cols.size))
    first = 0
    for number, design in enumerate(runs):
        n_run = design.trial_columns.shape[2]
        if number not in fits:
            rows = ~np.isnan(design.data[:, 0])
            # Projecting the confounds out of design and data leaves them unpenalised (Frisch-
            # Waugh-Lovell): the ridge solution on the residuals is that of the full model with only
            # the trial betas penalised.
            fits[number] = (rows, _orthonormal_basis(design.nuisance[rows]))
        rows, basis = fits[number]
        y = design.data[rows][:, cols].astype(np.float64)
        y -= basis @ (basis.T @ y)
        groups = design.group_of_voxel[cols]
        for group in np.unique(groups):
            if (number, group) not in fits:
                x = design.trial_columns[group][rows]
                x = x - basis @ (basis.T @ x)
                fits[number, group] = (x, design_svd(x))
            x, svd = fits[number, group]
            members = groups == group
            candidates[:, first : first + n_run, members] = fracridge(x, y[:, members], grid, svd=svd)[0]
        first += n_run
    return candidates


def _rescale_onto(candidates: np.ndarray, ols: np.ndarray, estimable: np.ndarray) -> np.ndarray:
    """Each fraction's betas mapped per voxel onto ``ols`` by a least-squares scale and offset.

    The fit uses the estimable trials only; a voxel whose ridge betas do not vary gets scale 0
    (every trial then takes the voxel's mean OLS beta).
    """
    fitted = candidates[:, estimable]  # (n_fractions, n, V)
    target = ols[estimable]  # (n, V)
    fitted_mean, target_mean = fitted.mean(axis=1), target.mean(axis=0)
    centred = fitted - fitted_mean[:, None]
    variance = (centred**2).sum(axis=1)
    covariance = (centred * (target - target_mean)[None]).sum(axis=1)
    scale = np.divide(covariance, variance, out=np.zeros_like(variance), where=variance > 0.0)
    offset = target_mean[None] - scale * fitted_mean
    return candidates * scale[:, None] + offset[:, None]


def _column_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column of ``a`` with the same column of ``b`` (NaN if one is constant)."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(axis=0) / np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))


def _orthonormal_basis(columns: np.ndarray) -> np.ndarray:
    """An orthonormal basis (n_rows, rank) of the span of ``columns`` (all-zero columns add nothing)."""
    u, s, _ = np.linalg.svd(columns, full_matrices=False)
    return u[:, s > s.max(initial=0.0) * max(columns.shape) * np.finfo(np.float64).eps]


def choose_session_hrf(
    psc_runs: Sequence[tuple[RunFolder, np.ndarray, np.ndarray]],
    config: RTDecoderConfig,
    tr_s: float,
    slice_time_refs_s: Sequence[float] | None = None,
) -> np.ndarray:
    """Library HRF per voxel over the session's runs, by ``glm.hrf_selection``.

    ``"crossval"`` (the default): the shape whose ON-OFF model, its amplitude fitted on the other
    runs, best predicts each held-out run (a one-run session falls back to ``"onoff"``, with a
    warning); ``"onoff"``: the best ON-OFF R^2, averaged over runs; ``"single_trial"``: the best
    single-trial R^2 (the rule before, which overfits). See
    :func:`rtdecoder.glm.hrf.library_scores`.

    Parameters
    ----------
    psc_runs : sequence of (RunFolder, ndarray (n_volumes, n_voxels), ndarray (n_volumes, 6))
        Each run's percent-signal-change series and motion (NaN rows: missing volumes).
    config : RTDecoderConfig
        ``glm`` HRF selection, drift and confound settings.
    tr_s : float
        Repetition time, s.
    slice_time_refs_s : sequence of float, optional
        Each run's slice-time reference, s, as its betas' GLM uses it; default 0 for every run.

    Returns
    -------
    ndarray of shape (n_voxels,), int32
    """
    glm = config.glm
    if slice_time_refs_s is None:
        slice_time_refs_s = [0.0] * len(psc_runs)
    runs = [
        HRFRun(_fill_missing(psc), run.trials, _fill_missing(params) if glm.motion_confounds else None, ref_s)
        for (run, psc, params), ref_s in zip(psc_runs, slice_time_refs_s, strict=True)
    ]
    selection = glm.hrf_selection
    if selection == "crossval" and len(runs) < 2:
        logger.warning(
            "glm.hrf_selection: crossval holds out one run at a time, but the session has one run; "
            "choosing the HRFs by onoff (the ON-OFF model's R^2) instead"
        )
        selection = "onoff"
    hrf_index = choose_library_hrf(runs, tr_s, selection, glm.drift_model, glm.drift_order, glm.high_pass_hz)
    logger.info(
        "HRF choice (%s): %d voxels, %.0f%% kept the canonical shape, %d of %d library shapes used, %.0f%% at the "
        "latest", selection, hrf_index.size, 100.0 * float(np.mean(hrf_index == CANONICAL_CANDIDATE)),
        np.unique(hrf_index[hrf_index != CANONICAL_CANDIDATE]).size, HRF_LIBRARY_SIZE,
        100.0 * float(np.mean(hrf_index == HRF_LIBRARY_SIZE - 1)),
    )
    return hrf_index.astype(np.int32)


def save_betas(result: SessionBetas, directory: str | Path) -> Path:
    """Write ``betas.nii.gz`` (mask space), ``trials.tsv`` and ``mask.nii.gz`` into ``directory``.

    With fractional ridge also ``fracridge_fractions.nii.gz``; without, a stale one from an
    earlier call on the same folder is removed, so the folder never pairs OLS betas with it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = result.betas.T[:, None, None, :]  # (V, 1, 1, N)
    image = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), np.eye(4))
    ridge = result.fracridge_fractions is not None
    image.header["descrip"] = b"rtdecoder single-trial betas, PSC, mask space" + (b", fracridge" if ridge else b"")
    nib.save(image, directory / BETAS_NAME)
    if ridge:
        fractions = np.asarray(result.fracridge_fractions, dtype=np.float32)[:, None, None]  # (V, 1, 1)
        image = nib.Nifti1Image(np.ascontiguousarray(fractions), np.eye(4))
        image.header["descrip"] = b"rtdecoder fracridge fraction per voxel, mask space"
        nib.save(image, directory / FRACTIONS_NAME)
    else:
        (directory / FRACTIONS_NAME).unlink(missing_ok=True)
    result.mask.to_nifti(directory / MASK_NAME)
    with open(directory / TRIALS_NAME, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(TRIALS_COLUMNS)
        for column, (trial, run) in enumerate(zip(result.trials, result.run_labels, strict=True)):
            writer.writerow([
                column, run, trial.trial_id, f"{trial.onset_s:.6g}", f"{trial.duration_s:.6g}",
                trial.stim_id, trial.stim_index, "true" if trial.is_test else "false",
            ])
    return directory


def load_betas(directory: str | Path) -> tuple[np.ndarray, list[dict[str, str]], VoxelMask]:
    """Read what :func:`save_betas` wrote.

    Returns
    -------
    betas : ndarray of shape (n_trials, n_voxels), float32
    trials : list of dict
        The rows of ``trials.tsv`` (strings, keyed by :data:`TRIALS_COLUMNS`).
    mask : VoxelMask
    """
    directory = Path(directory)
    path = directory / BETAS_NAME
    try:
        data = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    except (OSError, nib.filebasedimages.ImageFileError) as err:
        raise BundleError(f"{path}: cannot read betas: {err}") from None
    mask = VoxelMask.from_nifti(directory / MASK_NAME)
    if data.ndim != 4 or data.shape[:3] != (mask.n_voxels, 1, 1):
        raise BundleError(f"{path}: expected shape ({mask.n_voxels}, 1, 1, n_trials) for the mask (got {data.shape})")
    with open(directory / TRIALS_NAME, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if len(rows) != data.shape[3]:
        raise BundleError(f"{directory / TRIALS_NAME}: {len(rows)} rows but {path} has {data.shape[3]} trials")
    return data[:, 0, 0, :].T.copy(), rows, mask


def load_fracridge_fractions(directory: str | Path) -> np.ndarray | None:
    """The per-voxel fractions :func:`save_betas` wrote with fractional ridge betas.

    Returns
    -------
    ndarray of shape (n_voxels,), float32, or None
        None when the folder holds OLS betas (no ``fracridge_fractions.nii.gz``).
    """
    directory = Path(directory)
    path = directory / FRACTIONS_NAME
    if not path.is_file():
        return None
    try:
        data = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    except (OSError, nib.filebasedimages.ImageFileError) as err:
        raise BundleError(f"{path}: cannot read fractions: {err}") from None
    n_voxels = VoxelMask.from_nifti(directory / MASK_NAME).n_voxels
    if data.shape != (n_voxels, 1, 1):
        raise BundleError(f"{path}: expected shape ({n_voxels}, 1, 1) for the mask (got {data.shape})")
    return data[:, 0, 0].copy()


def _correct_run(
    run: RunFolder, volumes: list[Volume], mask: VoxelMask, motion: MotionCorrector | None, bar,
    extra_ijk: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, float, np.ndarray | None]:
    """Corrected mask values (n_volumes, V), motion (n_volumes, 6), the TR (s), and the values
    (n_volumes, n_extra) of the reference-grid voxels ``extra_ijk`` (GLMdenoise's candidates, read
    at their corrected positions like the mask's; None without them); NaN rows for missing volumes."""
    if motion is not None:
        motion.reset()
    rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    extra_rows: dict[int, np.ndarray] = {}
    tr_s = None
    # A run stored in another voxel order than the reference (e.g. SPM-converted) is read through
    # a view in the reference's order, as the live FrontEnd does; another grid is an error.
    to_grid = VolumeReorienter(mask.shape, mask.affine, "the motion reference's grid")
    for volume in volumes:
        if tr_s is None:
            tr_s = float(volume.tr_s)
        data = np.ascontiguousarray(to_grid.data(volume), dtype=np.float32)
        if motion is not None:
            estimate = motion.estimate(data)
            values, params = motion.resample_mask(data, estimate.params, mask.ijk), estimate.params
            if extra_ijk is not None:
                extra_rows[volume.index] = motion.resample_mask(data, params, extra_ijk)
        else:
            values, params = mask.values(data), np.zeros(6)
            if extra_ijk is not None:
                extra_rows[volume.index] = data[tuple(extra_ijk.T)].astype(np.float32)
        rows[volume.index] = (values, params)
        bar.update(1)
    if tr_s is None or not tr_s > 0:
        raise VolumeError(f"{run.directory}: the volumes carry no repetition time; expected TR > 0 s")
    n_volumes = max(rows) + 1
    values = np.full((n_volumes, mask.n_voxels), np.nan, dtype=np.float32)
    params = np.full((n_volumes, 6), np.nan)
    for index, (v, p) in rows.items():
        values[index], params[index] = v, p
    extra = None
    if extra_ijk is not None:
        extra = np.full((n_volumes, extra_ijk.shape[0]), np.nan, dtype=np.float32)
        for index, v in extra_rows.items():
            extra[index] = v
    missing = n_volumes - len(rows)
    if missing:
        logger.warning("%s: %d of %d volumes missing; left out of the GLM", run.label, missing, n_volumes)
    return values, params, tr_s, extra


def _normalise_rows(normaliser: OnlineNormaliser, values: np.ndarray) -> np.ndarray:
    out = np.full_like(values, np.nan)
    for i, row in enumerate(values):
        if not np.isnan(row[0]):
            out[i] = normaliser.normalise(row)
    return out


def _fill_missing(rows: np.ndarray) -> np.ndarray:
    """Linear interpolation over NaN rows (first/last valid row held at the ends)."""
    missing = np.isnan(rows[:, 0])
    if not missing.any():
        return rows
    good = np.flatnonzero(~missing)
    filled = rows.copy()
    for column in range(rows.shape[1]):
        filled[missing, column] = np.interp(np.flatnonzero(missing), good, rows[good, column])
    return filled


def session_reference(
    session_dir: str | Path,
    reference: str | Path | None = None,
    select: Mapping[str, str | int] | None = None,
    default_tr_s: float | None = None,
) -> Volume:
    """The motion reference calibration of ``session_dir`` uses: ``reference``, or the first run's middle volume.

    Parameters
    ----------
    session_dir, select
        As in :func:`find_runs`.
    reference : str or Path, optional
        A volume file to use instead (:func:`choose_reference`).
    default_tr_s : float, optional
        The TR for volume files that carry none (:func:`read_run_volumes`).

    Returns
    -------
    Volume
    """
    return choose_reference(read_run_volumes(find_runs(session_dir, select)[0], default_tr_s), reference)


def choose_reference(first_run: Sequence[Volume], reference: str | Path | Volume | None = None) -> Volume:
    """The motion reference of a session: the given volume, else the middle volume of the first run.

    Parameters
    ----------
    first_run : sequence of Volume
        The first run's volumes in index order (:func:`read_run_volumes`).
    reference : str, Path or Volume, optional
        A volume file (NIfTI or DICOM) or volume on the session's grid, in any voxel order: it is
        brought into the session's order (so the bundle stays in the scanner's order).

    Returns
    -------
    Volume
        On the session's grid (the middle volume's affine), its ``source`` the file it came from.

    Raises
    ------
    VolumeError
        Naming the file and both grids when ``reference`` is not on the session's grid.
    """
    middle = first_run[len(first_run) // 2]
    if reference is None:
        return middle
    if isinstance(reference, Volume):
        data, affine, source = reference.data, reference.affine, str(reference.source or "<reference volume>")
    else:
        data, affine = read_volume_file(reference, "--reference")
        source = str(reference)
    data = reorient_to_grid(
        data, affine, middle.shape, middle.affine, f"{source}: --reference",
        f"the session's volumes ({middle.source})",
        hint="; the motion reference must be a volume of this session's grid (a mask drawn on another session's "
        "volume is registered with --mask-space)",
    )
    return dataclasses.replace(
        middle, data=np.ascontiguousarray(data, dtype=np.float32), source=Path(source), slice_times_s=None
    )


def _as_voxel_mask(mask: np.ndarray | VoxelMask | MaskSource | str | Path, reference: Volume) -> VoxelMask:
    """The mask on the reference grid; any other grid is an error naming both (or registered/resampled)."""
    affine = np.asarray(reference.affine, dtype=np.float64)
    target = f"the session's volumes (motion reference {reference.source})"
    if isinstance(mask, (MaskSource, str, Path)):
        return mask_to_reference(mask, reference.data, affine, target)
    if not isinstance(mask, VoxelMask):
        mask = VoxelMask(np.asarray(mask, dtype=bool), affine, source="<mask array>")
    return mask.on_grid(reference.shape, affine, target)


def _is_series(path: Path) -> bool:
    from rtdecoder.ingest.nifti import is_nifti, is_nifti_series

    return is_nifti(path) and is_nifti_series(path)
