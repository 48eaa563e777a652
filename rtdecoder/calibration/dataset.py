"""Single-trial betas on disk for pretraining: the format, its reader and writers, per-session z-scoring.

Any lab's betas (NSD's, its own earlier subjects', the phantom's) pretrain the shared model once
they are in this layout (format ``rtdecoder-betas/1``)::

    DATA/
      dataset.json                  optional: {"format": "rtdecoder-betas/1", ...}
      sub-01/                       one folder per subject; its name is the subject's adapter id
        betas.safetensors           tensor "betas", float32, shape (n_trials, n_voxels)
        trials.tsv                  one row per betas row: stim_id, session, run[, is_test, ...]
        mask.nii.gz                 optional: the 0/1 voxel mask (its voxel count is checked)
      sub-02/ ...
      embeddings.safetensors        the stimuli's image tokens: an embeddings file (tensor "tokens",
                                    (n_images, n_tokens, token_dim); metadata "ids", "embedder"),
                                    rtdecoder.embedding.cache.write_embeddings_file
      stimuli/<stim_id>.png         and/or the stimulus images (.png, .jpg, ...), embedded on use

Betas are what a GLM estimated (e.g. GLMsingle ``betas_fithrf``, percent signal change), *not*
z-scored: the project z-scores them per subject and session (:func:`zscore_per_session`), with the
statistics of that session's training trials, as the released NSD data are. Voxels are the same
for every row of a subject (one mask, one voxel order); subjects may have different voxel counts.

A subject folder may instead hold ``betas.nii.gz`` + ``mask.nii.gz`` + ``trials.tsv`` exactly as
:func:`rtdecoder.calibration.betas.save_betas` writes them (``rtdecoder calibrate``'s
``<bundle>/betas/``), so an earlier calibrated subject is copied in as it is; its ``trials.tsv``
may lack ``session`` (then all its trials are session 1).

``trials.tsv`` columns (tab-separated, header row; other columns are ignored):

==========  ===============================================================================
stim_id     the image's id: a row of ``embeddings.safetensors`` or ``stimuli/<stim_id>.png``
session     integer (``3`` or ``ses-03``); trials of one session share z-score statistics
run         run label within the session (kept for bookkeeping)
is_test     optional, ``true``/``false`` (or 1/0); test-image trials are never trained on
==========  ===============================================================================

Image tokens: ``embeddings.safetensors`` (memory-mapped; only the rows used are read) is used when
its ``embedder`` (an :attr:`~rtdecoder.embedding.base.Embedder.name`) is the configured embedder's
and its tokens have the config's ``model.n_tokens`` x ``model.token_dim``; otherwise the images in
``stimuli/`` are embedded with the configured embedder (cached in ``embedding.cache_dir``, see
:mod:`rtdecoder.embedding.cache`).

Errors are :class:`~rtdecoder.errors.BundleError` naming the file, the field and what was expected.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from rtdecoder.embedding.cache import ImageTokens, load_image_tokens, read_embeddings_file
from rtdecoder.embedding.images import IMAGE_SUFFIXES
from rtdecoder.errors import BundleError, ConfigError

if TYPE_CHECKING:
    from rtdecoder.config import RTDecoderConfig
    from rtdecoder.preprocess.mask import VoxelMask

logger = logging.getLogger(__name__)

FORMAT = "rtdecoder-betas/1"
EMBEDDINGS_FORMAT = "rtdecoder-embeddings/1"
DATASET_JSON = "dataset.json"
BETAS_SAFETENSORS = "betas.safetensors"
BETAS_NIFTI = "betas.nii.gz"  # rtdecoder.calibration.betas.BETAS_NAME
TRIALS_TSV = "trials.tsv"
MASK_NIFTI = "mask.nii.gz"
EMBEDDINGS_FILE = "embeddings.safetensors"
STIMULI_DIR = "stimuli"
REQUIRED_COLUMNS = ("stim_id", "session", "run")
MIN_STD = 1e-6  # as rtdecoder.calibration.calibrate.zscore_stats: a constant voxel z-scores to 0
_TRUE = {"true", "1", "yes", "test"}
_FALSE = {"false", "0", "no", "train", ""}


def subject_id(index: int) -> str:
    """The folder name (and adapter id) of 0-based subject ``index``, e.g. ``subject_id(7) == "sub-08"``."""
    return f"sub-{index + 1:02d}"


@dataclass
class SubjectBetas:
    """One subject's single-trial betas as estimated (not z-scored), with each trial's labels.

    Attributes
    ----------
    subject_id : str
        Adapter id (the subject's folder name).
    betas : ndarray of shape (n_trials, n_voxels), float32
        GLM estimates (e.g. percent signal change); rows with a NaN are left out of training.
    stim_id : ndarray of shape (n_trials,), str
    session : ndarray of shape (n_trials,), int64
    run : ndarray of shape (n_trials,), str
    is_test : ndarray of shape (n_trials,), bool
    source : str
        Where the betas came from, named in messages.
    """

    subject_id: str
    betas: np.ndarray
    stim_id: np.ndarray
    session: np.ndarray
    run: np.ndarray
    is_test: np.ndarray
    source: str = "memory"

    def __post_init__(self) -> None:
        self.betas = np.asarray(self.betas)
        if self.betas.ndim != 2 or not np.issubdtype(self.betas.dtype, np.floating):
            raise BundleError(
                f"{self.source}: betas: expected a float array of shape (n_trials, n_voxels) "
                f"(got {self.betas.dtype} {self.betas.shape})"
            )
        self.betas = self.betas.astype(np.float32, copy=False)
        self.stim_id = np.asarray(self.stim_id, dtype=str)
        self.session = np.asarray(self.session, dtype=np.int64)
        self.run = np.asarray(self.run, dtype=str)
        self.is_test = np.asarray(self.is_test, dtype=bool)
        n = self.betas.shape[0]
        for name in ("stim_id", "session", "run", "is_test"):
            if getattr(self, name).shape != (n,):
                raise BundleError(
                    f"{self.source}: {name}: expected one per trial, shape ({n},) (got {getattr(self, name).shape})"
                )

    @property
    def n_voxels(self) -> int:
        """Columns of :attr:`betas`."""
        return int(self.betas.shape[1])

    def __len__(self) -> int:
        return int(self.betas.shape[0])


class BetasSource(Protocol):
    """Pretraining data: a cheap fingerprint for the cache key, and the data itself on demand."""

    def fingerprint(self) -> str:
        """Hex digest that changes whenever the data would (content, selection)."""
        ...

    def load(self, progress: bool = True) -> BetasDataset:
        """The betas and the stimuli's tokens (or images)."""
        ...

    def describe(self) -> str:
        """One line naming the data, for logs and ``pretrain.json``."""
        ...


@dataclass
class BetasDataset:
    """Betas of several subjects and what their stimuli look like, in memory (a :class:`BetasSource`).

    Attributes
    ----------
    subjects : dict of str to SubjectBetas
        In pretraining order.
    embeddings : ImageTokens, optional
        Tokens handed over in memory, already in the configured embedding space (only their
        shape is checked).
    embeddings_file : Path, optional
        An embeddings file, used when its embedder is the configured one.
    stimuli_dir : Path, optional
        ``<stim_id>.<ext>`` images, embedded with the configured embedder when neither of the
        above has the tokens.
    name : str
        Named in logs and ``pretrain.json``.
    """

    subjects: dict[str, SubjectBetas]
    embeddings: ImageTokens | None = None
    embeddings_file: Path | None = None
    stimuli_dir: Path | None = None
    name: str = "in-memory betas"
    _digest: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.subjects:
            raise BundleError(f"{self.name}: subjects: expected at least one subject (got none)")
        if self.embeddings is None and self.embeddings_file is None and self.stimuli_dir is None:
            raise BundleError(
                f"{self.name}: expected the stimuli's tokens ({EMBEDDINGS_FILE}) or images ({STIMULI_DIR}/)"
            )

    def fingerprint(self) -> str:
        """SHA-256 of the arrays, the stimuli's tokens and the stimulus images (computed once)."""
        if self._digest is None:
            sha = hashlib.sha256(FORMAT.encode())
            for sid, s in self.subjects.items():
                sha.update(f"\n{sid}\t{s.betas.shape}\n".encode())
                for array in (s.betas, s.session, s.is_test):
                    sha.update(np.ascontiguousarray(array).tobytes())
                sha.update("\t".join(s.stim_id.tolist()).encode())
                sha.update("\t".join(s.run.tolist()).encode())
            if self.embeddings is not None:
                sha.update(f"\n{self.embeddings.embedding_name}\n{self.embeddings.ids}\n".encode())
                for _, block in self.embeddings.chunks():
                    sha.update(block.tobytes())
            if self.embeddings_file is not None:
                sha.update(f"{EMBEDDINGS_FILE}\t{_file_sha256(self.embeddings_file)}\n".encode())
            if self.stimuli_dir is not None:
                sha.update(_folder_digest(self.stimuli_dir).encode())
            self._digest = sha.hexdigest()
        return self._digest

    def load(self, progress: bool = True) -> BetasDataset:
        """Itself (already in memory)."""
        return self

    def describe(self) -> str:
        """The dataset's name."""
        return self.name


class BetasFolder:
    """A dataset folder in the on-disk format (a :class:`BetasSource`); nothing heavy is read until :meth:`load`.

    Parameters
    ----------
    root : str or Path
        The ``DATA`` folder.
    subjects : sequence of str, optional
        Subject folder names (``["sub-01", "sub-02"]``); default every ``sub-*`` folder with betas.
    sessions : sequence of int, optional
        Sessions (the ``session`` numbers of ``trials.tsv``) to take; default all.

    Raises
    ------
    BundleError
        If the folder, a named subject or any subject's betas are missing.
    """

    def __init__(
        self, root: str | Path, subjects: Sequence[str] | None = None, sessions: Sequence[int] | None = None
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise BundleError(f"{self.root}: --data: no such folder (expected a betas dataset folder with sub-XX/)")
        _check_dataset_json(self.root)
        found = [p.name for p in sorted(self.root.glob("sub-*")) if p.is_dir() and _betas_file(p, strict=False)]
        if subjects is None:
            if not found:
                raise BundleError(
                    f"{self.root}: no subject folders with betas (expected sub-XX/{BETAS_SAFETENSORS} "
                    f"and sub-XX/{TRIALS_TSV})"
                )
            subjects = found
        missing = [s for s in subjects if s not in found]
        if missing:
            raise BundleError(
                f"{self.root}: --subjects: no subject folder with betas for {', '.join(missing)} "
                f"(have {', '.join(found) or 'none'})"
            )
        if len(set(subjects)) != len(subjects):
            raise ConfigError(f"--subjects: expected each subject once (got {', '.join(subjects)})")
        self.subjects = list(subjects)
        self.sessions = None if sessions is None else sorted({int(s) for s in sessions})
        self._digest: str | None = None

    def fingerprint(self) -> str:
        """SHA-256 over the content of every file used (betas, trials, masks, tokens, images) and the selection.

        Reads every byte once (NSD-sized betas: seconds per GB), but parses nothing.
        """
        if self._digest is None:
            sha = hashlib.sha256(f"{FORMAT}\nsessions={self.sessions}\n".encode())
            for sid in self.subjects:
                directory = self.root / sid
                for path in (_betas_file(directory), directory / TRIALS_TSV, directory / MASK_NIFTI):
                    if path.is_file():
                        sha.update(f"{sid}/{path.name}\t{_file_sha256(path)}\n".encode())
            if (self.root / EMBEDDINGS_FILE).is_file():
                sha.update(f"{EMBEDDINGS_FILE}\t{_file_sha256(self.root / EMBEDDINGS_FILE)}\n".encode())
            if (self.root / STIMULI_DIR).is_dir():
                sha.update(_folder_digest(self.root / STIMULI_DIR).encode())
            self._digest = sha.hexdigest()
        return self._digest

    def load(self, progress: bool = True) -> BetasDataset:
        """Read the selected subjects and the embeddings file (when present); see :func:`read_betas_dataset`."""
        subjects = {}
        for sid in self.subjects:
            subject = read_subject_betas(self.root / sid)
            if self.sessions is not None:
                subject = _select_sessions(subject, self.sessions)
            subjects[sid] = subject
        embeddings_file = self.root / EMBEDDINGS_FILE
        stimuli = self.root / STIMULI_DIR
        if not embeddings_file.is_file() and not stimuli.is_dir():
            raise BundleError(
                f"{self.root}: expected the stimuli's tokens ({EMBEDDINGS_FILE}: tensor 'tokens', metadata 'ids' "
                f"and 'embedder') or images ({STIMULI_DIR}/<stim_id>.png); found neither"
            )
        return BetasDataset(
            subjects, None, embeddings_file if embeddings_file.is_file() else None,
            stimuli if stimuli.is_dir() else None, name=str(self.root),
        )

    def describe(self) -> str:
        """``DATA (sub-01, sub-02; sessions ...)``."""
        sessions = "all sessions" if self.sessions is None else f"sessions {self.sessions}"
        return f"{self.root} ({', '.join(self.subjects)}; {sessions})"


def read_betas_dataset(
    root: str | Path, subjects: Sequence[str] | None = None, sessions: Sequence[int] | None = None
) -> BetasDataset:
    """Read a dataset folder (the module docstring's format).

    Parameters
    ----------
    root : str or Path
    subjects : sequence of str, optional
        Subject folder names; default all.
    sessions : sequence of int, optional
        ``session`` numbers to keep; default all.

    Returns
    -------
    BetasDataset
        Betas as stored (not z-scored); ``embeddings_file`` when ``embeddings.safetensors``
        exists, ``stimuli_dir`` when ``stimuli/`` does.

    Raises
    ------
    BundleError
        Naming the file, the field and what was expected.
    """
    return BetasFolder(root, subjects, sessions).load()


def read_subject_betas(directory: str | Path) -> SubjectBetas:
    """Read one subject folder: ``betas.safetensors`` (or ``betas.nii.gz`` + ``mask.nii.gz``) and ``trials.tsv``.

    Returns
    -------
    SubjectBetas
        ``subject_id`` is the folder's name.
    """
    directory = Path(directory)
    path = _betas_file(directory)
    trials_path = directory / TRIALS_TSV
    if not trials_path.is_file():
        raise BundleError(
            f"{trials_path}: no trials table (expected {TRIALS_TSV} with columns {', '.join(REQUIRED_COLUMNS)}"
            "[, is_test], one row per trial of the betas)"
        )
    if path.name == BETAS_NIFTI:
        betas, rows = _read_nifti_betas(directory)
        default_session = "1"  # a calibration session folder: one session
    else:
        betas = _read_safetensors_betas(path)
        rows = _read_rows(trials_path)
        default_session = None
        if (directory / MASK_NIFTI).is_file():
            from rtdecoder.preprocess.mask import VoxelMask

            n_mask = VoxelMask.from_nifti(directory / MASK_NIFTI).n_voxels
            if n_mask != betas.shape[1]:
                raise BundleError(
                    f"{directory / MASK_NIFTI}: {n_mask} voxels, but {path} has {betas.shape[1]} (columns of betas)"
                )
    if len(rows) != len(betas):
        raise BundleError(f"{trials_path}: {len(rows)} rows, but {path} has {len(betas)} trials (rows of betas)")
    columns = set(rows[0]) if rows else set()
    required = [c for c in REQUIRED_COLUMNS if not (c == "session" and default_session)]
    missing = [c for c in required if c not in columns]
    if missing:
        raise BundleError(
            f"{trials_path}: missing column(s) {', '.join(missing)} (expected {', '.join(REQUIRED_COLUMNS)}; "
            f"optional is_test)"
        )
    stim_id, session, run, is_test = [], [], [], []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        stim = (row.get("stim_id") or "").strip()
        if not stim or stim == "n/a":
            raise BundleError(f"{trials_path}: line {line}: stim_id: expected the trial's image id (got {stim!r})")
        stim_id.append(stim)
        session.append(_parse_session(row.get("session") or default_session or "", trials_path, line))
        run.append((row.get("run") or "").strip())
        is_test.append(_parse_bool(row.get("is_test", "false"), trials_path, line))
    return SubjectBetas(directory.name, betas, stim_id, session, run, is_test, source=str(path))


def write_subject_betas(
    directory: str | Path,
    betas: np.ndarray,
    stim_id: Sequence[str],
    session: Sequence[int],
    run: Sequence[str | int],
    is_test: Sequence[bool] | None = None,
    extra_columns: Mapping[str, Sequence] | None = None,
    mask: VoxelMask | None = None,
) -> list[Path]:
    """Write one subject folder: ``betas.safetensors``, ``trials.tsv`` and optionally ``mask.nii.gz``.

    Parameters
    ----------
    directory : str or Path
        ``DATA/sub-XX``; created if needed.
    betas : ndarray of shape (n_trials, n_voxels)
        As estimated (not z-scored); stored as float32.
    stim_id, session, run : sequence, one per trial
    is_test : sequence of bool, optional
        Default all False.
    extra_columns : mapping of str to sequence, optional
        More ``trials.tsv`` columns (e.g. ``trial_id``), one value per trial.
    mask : VoxelMask, optional
        Written as ``mask.nii.gz``; its voxel count must equal ``n_voxels``.

    Returns
    -------
    list of Path
        The files written.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    betas = np.ascontiguousarray(betas, dtype=np.float32)
    n = len(betas)
    is_test = [False] * n if is_test is None else list(is_test)
    columns = {"stim_id": list(stim_id), "session": list(session), "run": list(run), "is_test": is_test}
    columns.update({k: list(v) for k, v in (extra_columns or {}).items()})
    bad = [name for name, values in columns.items() if len(values) != n]
    if betas.ndim != 2 or bad:
        raise BundleError(
            f"{directory}: expected betas (n_trials, n_voxels) and one {', '.join(bad) or 'value'} per trial "
            f"(got betas {betas.shape})"
        )
    if mask is not None and mask.n_voxels != betas.shape[1]:
        raise BundleError(f"{directory}: mask has {mask.n_voxels} voxels, betas {betas.shape[1]} columns")
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"betas": betas}, str(directory / BETAS_SAFETENSORS), metadata={"format": FORMAT})
    with open(directory / TRIALS_TSV, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(columns)
        for i in range(n):
            writer.writerow([_cell(values[i]) for values in columns.values()])
    written = [directory / BETAS_SAFETENSORS, directory / TRIALS_TSV]
    if mask is not None:
        mask.to_nifti(directory / MASK_NIFTI)
        written.append(directory / MASK_NIFTI)
    return written


def write_dataset_json(root: str | Path, **fields: object) -> Path:
    """Write ``dataset.json`` with the format name and any JSON-ready ``fields`` (producer, units...)."""
    path = Path(root) / DATASET_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": FORMAT, **fields}, indent=2) + "\n")
    return path


def zscore_per_session(betas: np.ndarray, session: np.ndarray, use: np.ndarray, where: str = "betas") -> np.ndarray:
    """z-score each session's betas with the per-voxel mean and std of that session's ``use`` rows.

    Parameters
    ----------
    betas : ndarray of shape (n_trials, n_voxels)
    session : ndarray of shape (n_trials,), int
    use : ndarray of shape (n_trials,), bool
        Rows the statistics come from (training trials with finite betas); other rows are
        z-scored with them too.
    where : str, default="betas"
        Named in errors (the subject).

    Returns
    -------
    ndarray of shape (n_trials, n_voxels), float32
        ``std`` (``ddof=0``) is floored at 1e-6, so a constant voxel becomes 0.

    Raises
    ------
    BundleError
        If a session has fewer than 2 ``use`` rows.

    Examples
    --------
    >>> z = zscore_per_session(np.array([[1.0], [3.0], [10.0], [30.0]]), np.array([1, 1, 2, 2]), np.ones(4, bool))
    >>> z.ravel().tolist()
    [-1.0, 1.0, -1.0, 1.0]
    """
    out = np.empty(betas.shape, dtype=np.float32)
    for label in np.unique(session):
        rows = session == label
        stats = betas[rows & use].astype(np.float64)
        if len(stats) < 2:
            raise BundleError(
                f"{where}: session {int(label)}: expected at least 2 training trials with finite betas for its "
                f"z-score statistics (got {len(stats)})"
            )
        mean, std = stats.mean(axis=0), np.maximum(stats.std(axis=0), MIN_STD)
        out[rows] = ((betas[rows] - mean) / std).astype(np.float32)
    return out


@dataclass
class TrainingBetas:
    """One subject's pretraining trials: z-scored per session, test-image and non-finite trials left out.

    Attributes
    ----------
    subject_id : str
    betas : ndarray of shape (n_train, n_voxels), float32
    stim_id : ndarray of shape (n_train,), str
    n_test : int
        Test-image trials left out.
    n_nonfinite : int
        Training trials left out for a NaN or inf beta.
    sessions : list of int
    """

    subject_id: str
    betas: np.ndarray
    stim_id: np.ndarray
    n_test: int
    n_nonfinite: int
    sessions: list[int]


def training_betas(subject: SubjectBetas) -> TrainingBetas:
    """The trials pretraining uses, z-scored per session with their session's training statistics."""
    finite = np.isfinite(subject.betas).all(axis=1)
    use = finite & ~subject.is_test
    if not use.any():
        raise BundleError(f"{subject.source}: no training trials (every trial is_test or has a non-finite beta)")
    z = zscore_per_session(subject.betas, subject.session, use, subject.source)
    n_nonfinite = int(np.sum(~finite & ~subject.is_test))
    if n_nonfinite:
        logger.warning("%s: %d training trials with non-finite betas left out", subject.source, n_nonfinite)
    return TrainingBetas(
        subject.subject_id, z[use], subject.stim_id[use], int(subject.is_test.sum()), n_nonfinite,
        sorted(int(s) for s in np.unique(subject.session)),
    )


def test_trial_betas(subject: SubjectBetas) -> tuple[np.ndarray, np.ndarray]:
    """A subject's test-image trials with finite betas, z-scored as :func:`training_betas` z-scores its
    training trials (per session, with that session's training statistics), not averaged.

    Returns
    -------
    betas : ndarray of shape (n_test, n_voxels), float32
    stim_id : ndarray of shape (n_test,), str
    """
    finite = np.isfinite(subject.betas).all(axis=1)
    z = zscore_per_session(subject.betas, subject.session, finite & ~subject.is_test, subject.source)
    test = finite & subject.is_test
    return z[test], subject.stim_id[test]


def stimulus_embeddings(
    dataset: BetasDataset, config: RTDecoderConfig, stim_ids: Sequence[str], progress: bool = True
) -> ImageTokens:
    """Tokens of the listed stimuli in the configured embedding space.

    In order: the dataset's in-memory tokens; its embeddings file, when made by the configured
    embedder with the config's token shape; its images, embedded with the configured embedder
    (cached in ``embedding.cache_dir``).

    Parameters
    ----------
    dataset : BetasDataset
    config : RTDecoderConfig
        ``embedding`` (model, cache) and ``model`` (``n_tokens``, ``token_dim``).
    stim_ids : sequence of str
        Every stimulus needed.
    progress : bool, default=True

    Returns
    -------
    ImageTokens
        Holding every id of ``stim_ids``.

    Raises
    ------
    BundleError
        If no source has them all in the configured embedding space (the message names the file
        and the field: ``embedder``, ``tokens`` or the missing ids).
    """
    from rtdecoder.embedding.base import make_embedder

    token_shape = (config.model.n_tokens, config.model.token_dim)
    stim_ids = list(stim_ids)
    expected_by = "this config (embedding, model.n_tokens/token_dim)"
    problems = []
    if dataset.embeddings is not None:
        try:
            dataset.embeddings.check(None, token_shape, expected_by)
            dataset.embeddings.rows(stim_ids)
            return dataset.embeddings
        except BundleError as err:
            problems.append(str(err))
    embedder = None
    if dataset.embeddings_file is not None:
        embedder = make_embedder(config.embedding)
        try:
            found = read_embeddings_file(dataset.embeddings_file)
            found.check(embedder.name, token_shape, expected_by)
            found.rows(stim_ids)
            return found
        except BundleError as err:
            problems.append(str(err))
    if dataset.stimuli_dir is None:
        raise BundleError(f"{problems[-1]}; recompute the tokens, or add {STIMULI_DIR}/<stim_id>.png images")
    for problem in problems:
        logger.info("%s; embedding the images of %s instead", problem, dataset.stimuli_dir)
    return load_image_tokens(
        dataset.stimuli_dir, embedder or (lambda: make_embedder(config.embedding)), config.embedding.cache_dir,
        ids=stim_ids, progress=progress, token_shape=token_shape, expected_by=expected_by,
    )


def parse_number_list(text: str, option: str) -> list[int] | None:
    """Parse ``"all"`` (None), ``"3"``, ``"1,3-5"`` into sorted integers.

    Examples
    --------
    >>> parse_number_list("1,3-5", "--sessions")
    [1, 3, 4, 5]
    """
    if text.strip() == "all":
        return None
    chosen: set[int] = set()
    for part in text.split(","):
        low, sep, high = part.strip().partition("-")
        try:
            a, b = int(low), int(high if sep else low)
        except ValueError:
            raise ConfigError(f"{option}: expected numbers like 1,3 or 1-4 or all (got {text!r})") from None
        if a > b:
            raise ConfigError(f"{option}: expected a rising range like 1-4 (got {part.strip()!r})")
        chosen.update(range(a, b + 1))
    return sorted(chosen)


def _select_sessions(subject: SubjectBetas, sessions: Sequence[int]) -> SubjectBetas:
    keep = np.isin(subject.session, list(sessions))
    if not keep.any():
        raise BundleError(
            f"{subject.source}: --sessions: none of {list(sessions)} among this subject's sessions "
            f"{sorted(int(s) for s in np.unique(subject.session))}"
        )
    absent = sorted(set(sessions) - {int(s) for s in np.unique(subject.session)})
    if absent:
        logger.warning("%s: sessions %s not in the data; taking the others", subject.subject_id, absent)
    return SubjectBetas(
        subject.subject_id, subject.betas[keep], subject.stim_id[keep], subject.session[keep],
        subject.run[keep], subject.is_test[keep], subject.source,
    )


def _check_dataset_json(root: Path) -> None:
    path = root / DATASET_JSON
    if not path.is_file():
        return
    try:
        found = json.loads(path.read_text()).get("format")
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        raise BundleError(f"{path}: cannot read it as a JSON object ({err})") from None
    if found != FORMAT:
        raise BundleError(f"{path}: format: expected {FORMAT!r} (got {found!r})")


def _betas_file(directory: Path, strict: bool = True) -> Path | None:
    candidates = [directory / name for name in (BETAS_SAFETENSORS, BETAS_NIFTI) if (directory / name).is_file()]
    if len(candidates) == 1:
        return candidates[0]
    if not strict:
        return None if not candidates else candidates[0]
    if candidates:
        raise BundleError(f"{directory}: both {BETAS_SAFETENSORS} and {BETAS_NIFTI}; expected one betas file")
    raise BundleError(
        f"{directory}: no betas (expected {BETAS_SAFETENSORS} with tensor 'betas' (n_trials, n_voxels), or "
        f"{BETAS_NIFTI} + {MASK_NIFTI} as rtdecoder calibrate writes)"
    )


def _read_safetensors_betas(path: Path) -> np.ndarray:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            names = list(handle.keys())
            if "betas" not in names:
                raise BundleError(f"{path}: expected a tensor named 'betas' (got {names})")
            betas = handle.get_tensor("betas")
    except BundleError:
        raise
    except Exception as err:  # safetensors raises several unrelated types for a bad file
        raise BundleError(f"{path}: cannot read safetensors file: {err}") from None
    if betas.ndim != 2:
        raise BundleError(f"{path}: betas: expected shape (n_trials, n_voxels) (got {betas.shape})")
    if not np.issubdtype(betas.dtype, np.floating):
        raise BundleError(
            f"{path}: betas: expected float32 (got {betas.dtype}; NSD's int16 betas are percent signal change x 300: "
            "divide by 300 first)"
        )
    return betas.astype(np.float32, copy=False)


def _read_nifti_betas(directory: Path) -> tuple[np.ndarray, list[dict[str, str]]]:
    from rtdecoder.calibration.betas import load_betas

    if not (directory / MASK_NIFTI).is_file():
        raise BundleError(f"{directory / MASK_NIFTI}: missing (expected beside {BETAS_NIFTI}, which is in mask space)")
    betas, rows, _ = load_betas(directory)
    return betas, rows


def _read_rows(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise BundleError(f"{path}: cannot read the trials table: {err}") from None


def _parse_session(text: str, path: Path, line: int) -> int:
    value = text.strip().removeprefix("ses-")
    if not value.lstrip("-").isdigit():
        raise BundleError(f"{path}: line {line}: session: expected an integer like 3 or ses-03 (got {text!r})")
    return int(value)


def _parse_bool(text: str | None, path: Path, line: int) -> bool:
    value = (text or "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE or value == "n/a":
        return False
    raise BundleError(f"{path}: line {line}: is_test: expected true or false (got {text!r})")


def _cell(value: object) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    return str(value)


def _file_sha256(path: Path, chunk_bytes: int = 1 << 24) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            sha.update(chunk)
    return sha.hexdigest()


def _folder_digest(directory: Path) -> str:
    """SHA-256 over the names and contents of a folder's image files."""
    sha = hashlib.sha256()
    for path in sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        sha.update(f"{path.name}\t{_file_sha256(path)}\n".encode())
    return sha.hexdigest()
