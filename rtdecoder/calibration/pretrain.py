"""The pretrained shared model: multi-subject training on the phantom world's other subjects.

Data are NSD-style single-trial betas simulated directly (``phantom generate --level betas``:
:meth:`PhantomWorld.simulate_betas`), one subject id ``sub-NN`` per pretraining subject. Test-image
trials (the images shared by every subject) are left out, so the shared model never sees the
images a calibrated subject is evaluated on. Betas are z-scored per subject and session with that
session's statistics, as in the released NSD data.

The result is cached: ``out_dir/model`` with ``out_dir/pretrain.json`` recording a key of
everything it depends on (world, experiment, embedding, model and training sections, subjects,
sessions). Calling :func:`pretrain` again with the same key returns the cached folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtdecoder.config import RTDecoderConfig, TrainingConfig
from rtdecoder.errors import ConfigError

logger = logging.getLogger(__name__)

PRETRAIN_RECORD = "pretrain.json"
MODEL_DIR = "model"


def subject_id(index: int) -> str:
    """The id of phantom subject ``index`` (0-based), e.g. ``subject_id(7) == "sub-08"``."""
    return f"sub-{index + 1:02d}"


def subject_index(subject: str, n_subjects: int) -> int:
    """The 0-based phantom subject of an id like ``"sub-08"``.

    Raises
    ------
    ConfigError
        If the id is not ``sub-NN`` with ``1 <= NN <= n_subjects``.

    Examples
    --------
    >>> subject_index("sub-08", 8)
    7
    """
    number = subject.removeprefix("sub-")
    if not number.isdigit() or not 1 <= int(number) <= n_subjects:
        raise ConfigError(
            f"--subject-id: expected sub-01 .. sub-{n_subjects:02d} for a phantom subject "
            f"(phantom.n_subjects) (got {subject!r}); or pass --mask"
        )
    return int(number) - 1


@dataclass
class SimulatedSubjectBetas:
    """One subject's z-scored betas from direct simulation, with their images.

    Attributes
    ----------
    subject_id : str
    betas : ndarray of shape (n_trials, n_voxels), float32
        z-scored per session.
    stim_index : ndarray of shape (n_trials,), int64
    is_test : ndarray of shape (n_trials,), bool
    session : ndarray of shape (n_trials,), int64
    """

    subject_id: str
    betas: np.ndarray
    stim_index: np.ndarray
    is_test: np.ndarray
    session: np.ndarray


def simulated_subject_betas(
    world, index: int, sessions: Sequence[int], runs: Sequence[int] | None = None
) -> SimulatedSubjectBetas:
    """Direct-simulation betas of one phantom subject, z-scored per session over its training trials.

    Parameters
    ----------
    world : PhantomWorld
    index : int
        0-based subject.
    sessions : sequence of int
        0-based sessions.
    runs : sequence of int, optional
        0-based runs of each session; default all.
    """
    runs = list(range(world.config.experiment.runs_per_session)) if runs is None else list(runs)
    parts, stims, tests, session_of = [], [], [], []
    for session in sessions:
        session_betas, session_stims, session_tests = [], [], []
        for run in runs:
            simulated = world.simulate_betas(index, session, run)
            session_betas.append(simulated.betas)
            session_stims += [t.stim_index for t in simulated.trials]
            session_tests += [t.is_test for t in simulated.trials]
        betas = np.concatenate(session_betas)
        train = ~np.array(session_tests)
        mean = betas[train].mean(axis=0)
        std = np.maximum(betas[train].std(axis=0), 1e-6)
        parts.append(((betas - mean) / std).astype(np.float32))
        stims += session_stims
        tests += session_tests
        session_of += [session] * len(session_stims)
    return SimulatedSubjectBetas(
        subject_id(index), np.concatenate(parts), np.array(stims, dtype=np.int64),
        np.array(tests, dtype=bool), np.array(session_of, dtype=np.int64),
    )


def pretraining_recipe(config: RTDecoderConfig) -> TrainingConfig:
    """The training settings of pretraining: ``training`` with its pretraining epochs and batch."""
    training = config.training
    return training.model_copy(update={"epochs": training.pretrain_epochs, "batch_size": training.pretrain_batch_size})


def pretraining_key(
    config: RTDecoderConfig, subjects: Sequence[int], sessions: Sequence[int], runs: Sequence[int] | None = None
) -> str:
    """Hash of everything the pretrained model depends on (hex, 16 characters).

    Fine-tuning-only settings (calibration epochs and batch, ``finetune_shared_lr_scale``) and
    checkpoint frequency leave the key alone.
    """
    parts = {
        name: getattr(config, name).model_dump(mode="json")
        for name in ("phantom", "experiment", "scanner", "embedding", "model")
    }
    parts["training"] = pretraining_recipe(config).model_dump(
        mode="json", exclude={"pretrain_epochs", "pretrain_batch_size", "finetune_shared_lr_scale",
                              "checkpoint_every_epochs"},
    )
    parts["subjects"] = list(subjects)
    parts["sessions"] = list(sessions)
    parts["runs"] = None if runs is None else list(runs)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def pretrain(
    config: RTDecoderConfig,
    out_dir: str | Path,
    subjects: Sequence[int] = tuple(range(7)),
    sessions: Sequence[int] | None = None,
    world=None,
    progress: bool = True,
    runs: Sequence[int] | None = None,
) -> Path:
    """Train (or reuse) the shared model on phantom subjects; returns its model folder.

    Parameters
    ----------
    config : RTDecoderConfig
        The phantom world, experiment, embedding, ``model`` sizes and ``training`` recipe.
    out_dir : str or Path
        Cache folder: ``model/``, ``pretrain.json`` and the training checkpoint.
    subjects : sequence of int, default=(0, ..., 6)
        0-based pretraining subjects (the paper pretrains on 7 and calibrates the 8th).
    sessions : sequence of int, optional
        0-based sessions of each subject; default all.
    world : PhantomWorld, optional
        Reuse a world (its embeddings and subjects).
    progress : bool, default=True
    runs : sequence of int, optional
        0-based runs of each session; default all (fewer for a quick benchmark).

    Returns
    -------
    Path
        ``out_dir/model``, loadable with :meth:`MindEye2.from_pretrained`.
    """
    import torch

    from rtdecoder.calibration.train import SubjectDataset, train
    from rtdecoder.decode.model import MindEye2
    from rtdecoder.phantom.world import PhantomWorld

    out_dir = Path(out_dir)
    sessions = list(range(config.experiment.sessions_per_subject)) if sessions is None else list(sessions)
    subjects = list(subjects)
    if not subjects:
        raise ConfigError("pretrain: --subjects: expected at least one subject")
    key = pretraining_key(config, subjects, sessions, runs)
    record_path = out_dir / PRETRAIN_RECORD
    if record_path.is_file() and (out_dir / MODEL_DIR / "config.json").is_file():
        record = json.loads(record_path.read_text())
        if record.get("key") == key:
            logger.info("pretrained model %s is up to date (key %s); reusing it", out_dir / MODEL_DIR, key)
            return out_dir / MODEL_DIR
    world = world if world is not None else PhantomWorld(config, progress=progress)
    tokens = world.embedding.tokens
    started = time.perf_counter()
    datasets = {}
    for index in subjects:
        data = simulated_subject_betas(world, index, sessions, runs)
        keep = ~data.is_test
        datasets[data.subject_id] = SubjectDataset(
            data.subject_id, torch.from_numpy(data.betas[keep]),
            torch.from_numpy(np.asarray(tokens[data.stim_index[keep]], dtype=np.float32)),
            torch.from_numpy(data.stim_index[keep]),
        )
    simulate_s = time.perf_counter() - started
    torch.manual_seed(config.training.seed)
    model = MindEye2(config.model, {sid: ds.betas.shape[1] for sid, ds in datasets.items()})
    started = time.perf_counter()
    result = train(model, datasets, pretraining_recipe(config), out_dir, progress=progress)
    train_s = time.perf_counter() - started
    record = {
        "key": key,
        "subjects": [subject_id(i) for i in subjects],
        "sessions": sessions,
        "runs": None if runs is None else list(runs),
        "n_trials": {sid: len(ds) for sid, ds in datasets.items()},
        "epochs": result.epoch,
        "steps": result.global_step,
        "simulate_s": round(simulate_s, 1),
        "train_s": round(train_s, 1),
        "train_s_per_epoch": round(train_s / max(result.epoch, 1), 2),
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    logger.info("pretrained on %d subjects in %.0f s; model in %s", len(subjects), train_s, result.model_dir)
    return result.model_dir
