"""The pretrained shared model: multi-subject training on any subjects' single-trial betas.

Data come from a :class:`~rtdecoder.calibration.dataset.BetasSource`: a dataset folder in the
on-disk format of :mod:`rtdecoder.calibration.dataset` (``rtdecoder pretrain --data DIR``: NSD's
betas, a lab's earlier subjects, or what ``rtdecoder phantom generate --level betas`` wrote), a
:class:`~rtdecoder.calibration.dataset.BetasDataset` in memory, or a producer that simulates them
(the phantom world's ``PhantomWorld.pretraining_source``; the simulator is never imported here).
Every subject gets its own adapter. Test-image trials (``is_test``) are left out, so the shared
model never sees the images a calibrated subject is evaluated on; betas are z-scored per subject
and session with the statistics of that session's training trials, as in the released NSD data
(:func:`~rtdecoder.calibration.dataset.zscore_per_session`).

The result is cached: ``out_dir/model`` with ``out_dir/pretrain.json`` recording a key of
everything it depends on: the data's fingerprint (a content hash of the dataset's files; for the
phantom, the world's parameters, of which its betas are a pure function) and the embedding, model
and training sections. Calling :func:`pretrain` again with the same key returns the cached folder
without reading the betas.

Distributed: under ``torchrun`` every process runs :func:`pretrain` (each loads the data) and
:func:`rtdecoder.calibration.train.train` splits every batch between them; the first process writes
the model and ``pretrain.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from rtdecoder.calibration.dataset import (
    BetasDataset,
    BetasFolder,
    BetasSource,
    stimulus_embeddings,
    subject_id,
    training_betas,
)
from rtdecoder.config import RTDecoderConfig, TrainingConfig
from rtdecoder.errors import ConfigError

logger = logging.getLogger(__name__)

PRETRAIN_RECORD = "pretrain.json"
MODEL_DIR = "model"
DEFAULT_PHANTOM_SUBJECTS = tuple(range(7))  # the paper pretrains on 7 subjects and calibrates the 8th
__all__ = ["pretrain", "pretraining_key", "pretraining_recipe", "subject_id", "subject_index"]


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


def pretraining_recipe(config: RTDecoderConfig) -> TrainingConfig:
    """The training settings of pretraining: ``training`` with its pretraining epochs and batch."""
    training = config.training
    return training.model_copy(update={"epochs": training.pretrain_epochs, "batch_size": training.pretrain_batch_size})


def pretraining_key(config: RTDecoderConfig, data_fingerprint: str) -> str:
    """Hash of everything the pretrained model depends on (hex, 16 characters).

    Parameters
    ----------
    config : RTDecoderConfig
        Its ``embedding``, ``model`` and ``training`` sections count. Fine-tuning-only settings
        (calibration epochs and batch, ``finetune_shared_lr_scale``, ``ensemble_size``, the live
        betas' ``live_beta_*``) and checkpoint frequency leave the key alone.
    data_fingerprint : str
        :meth:`BetasSource.fingerprint` of the data (its content and the selection).
    """
    parts = {name: getattr(config, name).model_dump(mode="json") for name in ("embedding", "model")}
    parts["training"] = pretraining_recipe(config).model_dump(
        mode="json", exclude={"pretrain_epochs", "pretrain_batch_size", "finetune_shared_lr_scale",
                              "ensemble_size", "checkpoint_every_epochs", "live_beta_fraction",
                              "live_beta_max_after_onset_s"},
    )
    parts["data"] = data_fingerprint
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def pretrain(
    config: RTDecoderConfig,
    out_dir: str | Path,
    subjects: Sequence[int] | None = None,
    sessions: Sequence[int] | None = None,
    world=None,
    progress: bool = True,
    runs: Sequence[int] | None = None,
    *,
    data: str | Path | BetasSource | None = None,
    device: str = "cpu",
) -> Path:
    """Train (or reuse) the shared model; returns its model folder.

    Give either ``data`` or a phantom ``world`` (then ``subjects``, ``sessions`` and ``runs``
    choose its simulated betas).

    Parameters
    ----------
    config : RTDecoderConfig
        ``embedding``, ``model`` sizes and ``training`` recipe (and, for a world, the world).
    out_dir : str or Path
        Cache folder: ``model/``, ``pretrain.json`` and the training checkpoint.
    subjects : sequence of int, optional
        World only: 0-based pretraining subjects; default 0..6.
    sessions : sequence of int, optional
        World only: 0-based sessions of each subject; default all.
    world : PhantomWorld, optional
        A simulated world; its ``pretraining_source(subjects, sessions, runs)`` gives the data.
    progress : bool, default=True
    runs : sequence of int, optional
        World only: 0-based runs of each session; default all (fewer for a quick benchmark).
    data : str, Path or BetasSource, optional
        A dataset folder (:class:`~rtdecoder.calibration.dataset.BetasFolder`; all its subjects
        and sessions), or any source (a ``BetasFolder`` with a selection, a ``BetasDataset``).
    device : str, default="cpu"
        Torch device; ``"cuda"`` under ``torchrun`` means each process's ``cuda:LOCAL_RANK``.

    Returns
    -------
    Path
        ``out_dir/model``, loadable with :meth:`MindEye2.from_pretrained`.

    Raises
    ------
    ConfigError
        If neither or both of ``data`` and ``world`` are given, or a world's selection with ``data``.
    BundleError
        If the data are malformed (see :mod:`rtdecoder.calibration.dataset`).
    """
    out_dir = Path(out_dir)
    source = _source(data, world, subjects, sessions, runs)
    key = pretraining_key(config, source.fingerprint())
    record_path = out_dir / PRETRAIN_RECORD
    if record_path.is_file() and (out_dir / MODEL_DIR / "config.json").is_file():
        record = json.loads(record_path.read_text())
        if record.get("key") == key:
            logger.info("pretrained model %s is up to date (key %s); reusing it", out_dir / MODEL_DIR, key)
            return out_dir / MODEL_DIR
    started = time.perf_counter()
    dataset = source.load(progress=progress)
    datasets, summary = _training_datasets(dataset, config, progress)
    load_s = time.perf_counter() - started

    import torch

    from rtdecoder.calibration.train import train
    from rtdecoder.decode.model import MindEye2

    torch.manual_seed(config.training.seed)
    model = MindEye2(config.model, {sid: ds.betas.shape[1] for sid, ds in datasets.items()})
    started = time.perf_counter()
    result = train(model, datasets, pretraining_recipe(config), out_dir, progress=progress, device=_device(device))
    train_s = time.perf_counter() - started
    record = {
        "key": key,
        "data": source.describe(),
        "subjects": list(datasets),
        **summary,
        "runs": None if runs is None else list(runs),
        "n_trials": {sid: len(ds) for sid, ds in datasets.items()},
        "epochs": result.epoch,
        "steps": result.global_step,
        "load_s": round(load_s, 1),
        "train_s": round(train_s, 1),
        "train_s_per_epoch": round(train_s / max(result.epoch, 1), 2),
    }
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one process writes
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    logger.info("pretrained on %d subjects in %.0f s; model in %s", len(datasets), train_s, result.model_dir)
    return result.model_dir


def _source(data, world, subjects, sessions, runs) -> BetasSource:
    if data is not None:
        if world is not None or subjects is not None or sessions is not None or runs is not None:
            raise ConfigError(
                "pretrain: data: give the subjects and sessions to the data source (BetasFolder(root, subjects, "
                "sessions)), not as a phantom world's subjects/sessions/runs"
            )
        return BetasFolder(data) if isinstance(data, (str, Path)) else data
    if world is None:
        raise ConfigError("pretrain: expected data (a betas dataset folder: --data DIR) or a phantom world")
    subjects = list(DEFAULT_PHANTOM_SUBJECTS if subjects is None else subjects)
    if not subjects:
        raise ConfigError("pretrain: --subjects: expected at least one subject")
    return world.pretraining_source(subjects, sessions, runs)


def _training_datasets(dataset: BetasDataset, config: RTDecoderConfig, progress: bool) -> tuple[dict, dict]:
    """Each subject's z-scored training trials with their image tokens, and what was left out."""
    from rtdecoder.calibration.train import SubjectDataset

    trials = {sid: training_betas(subject) for sid, subject in dataset.subjects.items()}
    needed = sorted({s for t in trials.values() for s in t.stim_id.tolist()})
    embeddings = stimulus_embeddings(dataset, config, needed, progress=progress)
    datasets = {}
    for sid, t in trials.items():
        rows = embeddings.rows(t.stim_id.tolist())
        datasets[sid] = SubjectDataset(sid, t.betas, embeddings.take(rows), rows)
    summary = {
        "sessions": {sid: t.sessions for sid, t in trials.items()},
        "n_test_trials_left_out": {sid: t.n_test for sid, t in trials.items()},
        "n_nonfinite_trials_left_out": {sid: t.n_nonfinite for sid, t in trials.items()},
        "embedder": embeddings.embedding_name or None,
    }
    return datasets, summary


def _device(device: str) -> str:
    """``cuda`` under torchrun is each process's own GPU."""
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device
