"""Write whole simulated sessions to disk, without real-time pacing (``rtdecoder phantom generate``).

Layout under the output folder (BIDS-like; subject, session and run numbers are 1-based)::

    config.json                                   the resolved configuration
    sub-01/truth/sub-01_mask-visual.nii.gz        visual-cortex mask (uint8), subject grid
    sub-01/truth/sub-01_reference.nii.gz          noise-free head at rest (float32)
    sub-01/truth/sub-01_truth.json                voxel count, HRF library, parameter names
    sub-01/ses-01/func/sub-01_ses-01_task-phantom_run-01_events.tsv
    level "volumes":
    sub-01/ses-01/func/sub-01_ses-01_task-phantom_run-01_bold.nii.gz   int16, (nx, ny, nz, n_vol)
    sub-01/ses-01/func/sub-01_ses-01_task-phantom_run-01_bold.json     RepetitionTime, SliceTiming
    sub-01/ses-01/truth/sub-01_ses-01_task-phantom_run-01_truth.npz    true_betas, latents, motion,
                                                                       hrfs, hrf_index, trial_id
    level "betas": a pretraining dataset (format of rtdecoder.calibration.dataset), plus truth
    dataset.json                                  {"format": "rtdecoder-betas/1", ...}
    sub-01/betas.safetensors                      "betas" (n_trials, n_voxels), float32, every
                                                  session and run written, in that order
    sub-01/trials.tsv                             stim_id, session, run (1-based), is_test,
                                                  trial_id, stim_index
    sub-01/mask.nii.gz                            the visual mask (the betas' voxels, C order)
    stimuli/<stim_id>.png, stimuli/stimuli.tsv    the stimuli the trials show
    embeddings.safetensors                        their tokens (when the world's embedder is known)
    sub-01/ses-01/betas/sub-01_ses-01_task-phantom_run-01_betas.npz    betas, true_betas, latents,
                                                                       trial_id, stim_index, is_test

``rtdecoder pretrain --data OUT`` reads the betas level as any lab's betas. Volumes are stored as
int16 scanner units (rounded; values stay below 2000). Every file is a function of the
configuration alone: the same seed writes byte-identical files.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from rtdecoder.calibration.dataset import (
    EMBEDDINGS_FILE,
    STIMULI_DIR,
    SubjectBetas,
    write_dataset_json,
    write_subject_betas,
)
from rtdecoder.config import RTDecoderConfig, save_config
from rtdecoder.embedding.cache import write_embeddings_file
from rtdecoder.errors import ConfigError
from rtdecoder.glm.events import write_events_tsv
from rtdecoder.phantom.stimuli import export_stimuli
from rtdecoder.phantom.subjects import HRF_PARAMETERS, MOTION_PARAMETERS, PhantomSubject, SimulatedBetas, SimulatedRun
from rtdecoder.phantom.world import PhantomWorld, simulate_subject_betas
from rtdecoder.preprocess.mask import VoxelMask

logger = logging.getLogger(__name__)

TASK_NAME = "phantom"
LEVELS = ("volumes", "betas")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def run_stem(subject: int, session: int, run: int) -> str:
    """BIDS file-name stem of a run from 0-based numbers.

    Examples
    --------
    >>> run_stem(0, 1, 11)
    'sub-01_ses-02_task-phantom_run-12'
    """
    return f"sub-{subject + 1:02d}_ses-{session + 1:02d}_task-{TASK_NAME}_run-{run + 1:02d}"


def parse_index_list(text: str, count: int, name: str) -> list[int]:
    """Parse ``"0,2"``, ``"0-11"``, ``"all"`` (or mixtures like ``"0,3-5"``) into indices.

    Parameters
    ----------
    text : str
        The option's value.
    count : int
        Indices must lie in ``0..count-1``.
    name : str
        The option, for error messages (``"--runs"``).

    Returns
    -------
    list of int
        Sorted, without duplicates.

    Raises
    ------
    ConfigError
        If a part is not an integer or range, or is out of bounds.

    Examples
    --------
    >>> parse_index_list("0,3-5", 12, "--runs")
    [0, 3, 4, 5]
    """
    if text.strip() == "all":
        return list(range(count))
    chosen: set[int] = set()
    for part in text.split(","):
        bounds = part.strip().split("-")
        try:
            low, high = (int(bounds[0]), int(bounds[-1])) if len(bounds) <= 2 else (None, None)
        except ValueError:
            low = high = None
        if low is None or high is None or low > high:
            raise ConfigError(f"{name}: expected indices like 0,2 or 0-11 or all (got {text!r})")
        if low < 0 or high >= count:
            raise ConfigError(f"{name}: expected indices in 0..{count - 1} (got {part.strip()!r})")
        chosen.update(range(low, high + 1))
    return sorted(chosen)


def generate(config: RTDecoderConfig, out_dir: str | Path, subjects: Sequence[int],
             sessions: Sequence[int], runs: Sequence[int], level: str = "volumes",
             world: PhantomWorld | None = None, progress: bool = True) -> list[Path]:
    """Simulate runs and write them with their ground truth.

    Parameters
    ----------
    config : RTDecoderConfig
        The world and the experiment.
    out_dir : str or Path
        Created if needed; files are overwritten.
    subjects, sessions, runs : sequence of int
        0-based numbers; every combination is written.
    level : {"volumes", "betas"}
        ``"volumes"``: 4D NIfTI per run with its truth. ``"betas"``: NSD-style single-trial
        betas (no volumes) as a pretraining dataset (:mod:`rtdecoder.calibration.dataset`): each
        subject's ``betas.safetensors`` + ``trials.tsv`` + ``mask.nii.gz``, the stimulus images and
        embeddings, and each run's ``_betas.npz`` with its truth.
    world : PhantomWorld, optional
        Reuse an existing world (its embeddings and subjects); default a new one.
    progress : bool, default=True
        Show a tqdm bar over runs.

    Returns
    -------
    list of Path
        The files written, in order.
    """
    from tqdm.auto import tqdm

    if level not in LEVELS:
        raise ConfigError(f"--level: expected one of {', '.join(LEVELS)} (got {level!r})")
    exp = config.experiment
    _check_indices(subjects, config.phantom.n_subjects, "--subjects", "phantom.n_subjects")
    _check_indices(sessions, exp.sessions_per_subject, "--sessions", "experiment.sessions_per_subject")
    _check_indices(runs, exp.runs_per_session, "--runs", "experiment.runs_per_session")
    world = world if world is not None else PhantomWorld(config, progress=progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.json")
    written = [out / "config.json"]
    jobs = [(s, ses, r) for s in subjects for ses in sessions for r in runs]
    truth_written: set[int] = set()
    bar = tqdm(total=len(jobs), desc=f"phantom {level}", unit="run", disable=not progress)
    for subject_index, session, run in jobs:
        subject = world.subject(subject_index)
        if subject_index not in truth_written:
            written += write_subject_truth(subject, out)
            truth_written.add(subject_index)
        stem = run_stem(subject_index, session, run)
        func = out / f"sub-{subject_index + 1:02d}" / f"ses-{session + 1:02d}" / "func"
        func.mkdir(parents=True, exist_ok=True)
        events_path = func / f"{stem}_events.tsv"
        write_events_tsv(subject.schedule.run(session, run), events_path)
        written.append(events_path)
        if level == "volumes":
            simulated = subject.simulate_run(session, run, world.pooled)
            written += write_run(simulated, func, stem, func.parent)
            bar.update(1)
    if level == "betas":
        written += write_betas_dataset(world, out, subjects, sessions, runs, bar)
    bar.close()
    logger.info("wrote %d files under %s", len(written), out)
    return written


def write_betas_dataset(world: PhantomWorld, out_dir: str | Path, subjects: Sequence[int],
                        sessions: Sequence[int], runs: Sequence[int], bar=None) -> list[Path]:
    """Write simulated betas as a pretraining dataset (:mod:`rtdecoder.calibration.dataset`) with their truth.

    Parameters
    ----------
    world : PhantomWorld
    out_dir : str or Path
        The dataset root.
    subjects, sessions, runs : sequence of int
        0-based; each subject's files hold every listed session and run (trials labelled 1-based).
    bar : tqdm, optional
        Advanced by each subject's runs once they are simulated.

    Returns
    -------
    list of Path
        Per subject its ``betas.safetensors``, ``trials.tsv``, ``mask.nii.gz`` and runs'
        ``_betas.npz``; then the stimuli's ``stimuli.tsv`` (beside their PNGs), the embeddings
        file (when the world knows its embedder) and ``dataset.json``.
    """
    out = Path(out_dir)
    written: list[Path] = []
    shown: set[int] = set()
    for subject_index in subjects:
        subject = world.subject(subject_index)
        betas, simulated = simulate_subject_betas(world, subject_index, sessions, runs)
        for k, run_betas in enumerate(simulated):
            session, run = sessions[k // len(runs)], runs[k % len(runs)]
            stem = run_stem(subject_index, session, run)
            path = out / f"sub-{subject_index + 1:02d}" / f"ses-{session + 1:02d}" / "betas" / f"{stem}_betas.npz"
            written.append(_write_betas(run_betas, path))
            shown.update(t.stim_index for t in run_betas.trials)
        if bar is not None:
            bar.update(len(simulated))
        written += _write_subject(out / betas.subject_id, betas, simulated,
                                  VoxelMask(subject.mask, subject.affine, source=f"phantom {betas.subject_id} mask"))
    written.append(export_stimuli(world.bank, out / STIMULI_DIR, indices=sorted(shown)))
    if world.embedding_name is not None:
        written.append(write_embeddings_file(out / EMBEDDINGS_FILE, world.bank.ids, world.embedding.tokens,
                                             world.embedding_name, pooled=world.embedding.pooled))
    written.append(write_dataset_json(out, producer="rtdecoder phantom generate --level betas",
                                      units="betas: least-squares single-trial estimates, percent signal change"))
    return written


def write_run(simulated: SimulatedRun, func_dir: Path, stem: str, session_dir: Path) -> list[Path]:
    """Write a simulated run's NIfTI, JSON sidecar and ground-truth ``.npz``.

    Returns
    -------
    list of Path
        ``[bold.nii.gz, bold.json, truth.npz]``.
    """
    n_slices = simulated.volumes.shape[2]
    data = np.clip(np.rint(simulated.volumes), -32768, 32767).astype(np.int16)
    image = nib.Nifti1Image(data, simulated.affine)
    header = image.header
    header.set_xyzt_units("mm", "sec")
    header.set_zooms((*np.sqrt((simulated.affine[:3, :3] ** 2).sum(axis=0)), simulated.tr_s))
    header.set_dim_info(slice=2)
    header.set_slice_duration(simulated.tr_s / n_slices)
    header.set_slice_times(list(simulated.slice_times_s))
    image.set_sform(simulated.affine, code="scanner")
    image.set_qform(simulated.affine, code="scanner")
    bold = func_dir / f"{stem}_bold.nii.gz"
    image.to_filename(bold)
    sidecar = func_dir / f"{stem}_bold.json"
    sidecar.write_text(json.dumps({
        "TaskName": TASK_NAME,
        "RepetitionTime": simulated.tr_s,
        "SliceTiming": [round(float(t), 6) for t in simulated.slice_times_s],
        "SliceEncodingDirection": "k",
        "Units": "scanner units (simulated EPI intensity)",
    }, indent=2) + "\n")
    truth_dir = session_dir / "truth"
    truth_dir.mkdir(parents=True, exist_ok=True)
    truth = truth_dir / f"{stem}_truth.npz"
    write_npz(truth, {
        "true_betas": simulated.true_betas,
        "latents": simulated.latents,
        "motion": simulated.motion,
        "motion_parameters": np.array(MOTION_PARAMETERS),
        "hrfs": simulated.hrfs,
        "hrf_parameters": np.array(HRF_PARAMETERS),
        "hrf_index": simulated.hrf_index,
        "trial_id": np.array([t.trial_id for t in simulated.trials]),
        "stim_index": np.array([t.stim_index for t in simulated.trials]),
    })
    return [bold, sidecar, truth]


def write_subject_truth(subject: PhantomSubject, out_dir: Path) -> list[Path]:
    """Write a subject's visual mask, reference volume and summary JSON under ``sub-XX/truth``."""
    truth = Path(out_dir) / f"sub-{subject.index + 1:02d}" / "truth"
    truth.mkdir(parents=True, exist_ok=True)
    stem = f"sub-{subject.index + 1:02d}"
    mask = truth / f"{stem}_mask-visual.nii.gz"
    nib.Nifti1Image(subject.mask.astype(np.uint8), subject.affine).to_filename(mask)
    reference = truth / f"{stem}_reference.nii.gz"
    nib.Nifti1Image(subject.reference_volume.astype(np.float32), subject.affine).to_filename(reference)
    summary = truth / f"{stem}_truth.json"
    summary.write_text(json.dumps({
        "n_voxels": subject.n_voxels,
        "voxel_order": "C order of the nonzero voxels of the mask",
        "hrf_parameters": list(HRF_PARAMETERS),
        "hrf_library": np.round(subject.hrf_library, 6).tolist(),
        "estimation_noise_std_psc": round(subject.estimation_noise_std_psc, 6),
        "motion_parameters": list(MOTION_PARAMETERS),
    }, indent=2) + "\n")
    return [mask, reference, summary]


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays as an ``.npz`` readable by ``numpy.load``, byte-identical for equal inputs.

    ``numpy.savez`` stamps the current time into the archive; this writes a fixed date.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())


def _write_subject(directory: Path, betas: SubjectBetas, simulated: list[SimulatedBetas],
                   mask: VoxelMask) -> list[Path]:
    trials = [t for s in simulated for t in s.trials]
    return write_subject_betas(
        directory, betas.betas, betas.stim_id.tolist(), betas.session.tolist(), betas.run.tolist(),
        betas.is_test.tolist(), extra_columns={"trial_id": [t.trial_id for t in trials],
                                               "stim_index": [t.stim_index for t in trials]},
        mask=mask,
    )


def _write_betas(simulated: SimulatedBetas, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_npz(path, {
        "betas": simulated.betas,
        "true_betas": simulated.true_betas,
        "latents": simulated.latents,
        "trial_id": np.array([t.trial_id for t in simulated.trials]),
        "stim_index": np.array([t.stim_index for t in simulated.trials]),
        "stim_id": np.array([t.stim_id for t in simulated.trials]),
        "is_test": np.array([t.is_test for t in simulated.trials]),
    })
    return path


def _check_indices(indices: Sequence[int], count: int, option: str, field: str) -> None:
    bad = [i for i in indices if not 0 <= i < count]
    if bad or not indices:
        raise ConfigError(f"{option}: expected indices in 0..{count - 1} ({field}) (got {list(indices)})")
