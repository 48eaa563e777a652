"""One-session calibration: betas -> z-score statistics -> fine-tuned model -> evaluation -> bundle.

:func:`calibrate` is what ``rtdecoder calibrate`` runs:

1. single-trial betas of the session (:func:`calibration.betas.estimate_session_betas`), saved
   under ``<bundle>/betas/``;
2. test-image trials (``is_test`` in ``events.tsv``) are held out; per-voxel mean and standard
   deviation of the remaining (training) betas become the bundle's ``beta_mean``/``beta_std``,
   and every beta is z-scored with them (the live decoder does the same with live betas);
3. the pretrained shared model gets a fresh adapter for this subject's voxel count and the whole
   model is trained on the training trials (:func:`calibration.train.finetune`); without a
   pretrained model it is trained from scratch with the same recipe;
4. held-out evaluation: repeats of a test image are averaged, then image and brain retrieval
   top-1 among 300 (or all held-out images when fewer; :func:`rtdecoder.decode.metrics.retrieval_top1`);
5. :meth:`SubjectBundle.save` writes everything the live decoder needs.

Image targets are the embedder's tokens of each trial's image: for the phantom world, its stimulus
bank (from the embedding cache); otherwise a folder of image files named ``<stim_id>.<ext>``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration.betas import SessionBetas, estimate_session_betas, save_betas
from calibration.bundle import SubjectBundle
from rtdecoder.config import RTDecoderConfig
from rtdecoder.errors import BundleError, ConfigError

logger = logging.getLogger(__name__)

RETRIEVAL_POOL = 300
RETRIEVAL_POOLS = 30
_MIN_STD = 1e-6
_IMAGE_SIZE_PX = 224
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class CalibrationReport:
    """What :func:`calibrate` did.

    Attributes
    ----------
    bundle_dir : Path
    evaluation : dict
        ``image_top1``, ``brain_top1`` (fractions), ``pool_size``, ``n_test_images``, ...
    seconds : dict of str to float
        Wall time of ``betas``, ``training`` and ``total``.
    n_train_trials : int
    """

    bundle_dir: Path
    evaluation: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    n_train_trials: int = 0


def zscore_stats(betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel mean and standard deviation (``ddof=0``) of training betas.

    Parameters
    ----------
    betas : ndarray of shape (n_trials, n_voxels)

    Returns
    -------
    mean, std : ndarray of shape (n_voxels,), float32
        ``std`` is floored at 1e-6 so that constant voxels z-score to 0, not to inf.

    Examples
    --------
    >>> mean, std = zscore_stats(np.array([[1.0, 2.0], [3.0, 2.0]]))
    >>> mean.tolist(), std.tolist()
    ([2.0, 2.0], [1.0, 9.999999974752427e-07])
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 2 or betas.shape[0] < 2:
        raise ConfigError(f"zscore_stats: betas: expected shape (n_trials >= 2, n_voxels) (got {betas.shape})")
    return betas.mean(axis=0).astype(np.float32), np.maximum(betas.std(axis=0), _MIN_STD).astype(np.float32)


def average_repeats(betas: np.ndarray, stim_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean beta of each image over its repeats.

    Parameters
    ----------
    betas : ndarray of shape (n_trials, n_voxels)
    stim_index : ndarray of shape (n_trials,), int

    Returns
    -------
    images : ndarray of shape (n_images,), int64
        Sorted stimulus indices.
    mean_betas : ndarray of shape (n_images, n_voxels), float32

    Examples
    --------
    >>> images, mean = average_repeats(np.array([[1.0], [3.0], [5.0]]), np.array([7, 2, 7]))
    >>> images.tolist(), mean.ravel().tolist()
    ([2, 7], [3.0, 3.0])
    """
    images, inverse = np.unique(np.asarray(stim_index), return_inverse=True)
    sums = np.zeros((images.size, betas.shape[1]))
    np.add.at(sums, inverse, betas)
    counts = np.bincount(inverse, minlength=images.size)[:, None]
    return images.astype(np.int64), (sums / counts).astype(np.float32)


def predict_clip_tokens(model: Any, subject_id: str, betas: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The retrieval head's tokens for z-scored betas, shape (n, T, D), float32 (eval mode)."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(betas), batch_size):
            x = torch.as_tensor(betas[start : start + batch_size], dtype=torch.float32)
            out.append(model({subject_id: x}).clip_tokens.float().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.n_tokens, model.config.token_dim), np.float32)


def retrieval_evaluation(predicted: np.ndarray, targets: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Image and brain retrieval top-1 among 300 candidates (all when fewer), as a JSON-ready dict.

    Parameters
    ----------
    predicted, targets : ndarray of shape (n_images, T, D)
        Predicted retrieval tokens (repeats averaged before prediction) and true image tokens.
    seed : int, default=0
        Seed of the random pools.
    """
    from rtdecoder.decode.metrics import retrieval_top1

    if len(predicted) < 2:
        return {"n_test_images": int(len(predicted)), "note": "fewer than 2 held-out images; not evaluated"}
    scores = retrieval_top1(predicted, targets, RETRIEVAL_POOL, RETRIEVAL_POOLS, seed=seed)
    return {
        "image_top1": round(scores.image, 4),
        "brain_top1": round(scores.brain, 4),
        "pool_size": scores.pool_size,
        "n_pools": scores.n_pools,
        "chance": round(1.0 / scores.pool_size, 4),
        "n_test_images": int(len(predicted)),
    }


def stimulus_tokens(
    config: RTDecoderConfig, stim_index: np.ndarray, stim_ids: list[str], images_dir: str | Path | None
) -> tuple[np.ndarray, str]:
    """Image tokens of each listed stimulus and the embedder's name.

    Parameters
    ----------
    config : RTDecoderConfig
        ``embedding`` (and ``phantom`` for the phantom bank).
    stim_index, stim_ids : the stimuli, row for row
    images_dir : str or Path or None
        A folder of ``<stim_id>.<ext>`` image files; ``None`` uses the phantom world's bank.

    Returns
    -------
    tokens : ndarray of shape (n, T, D), float32
    embedding_name : str
    """
    from rtdecoder.embedding.base import make_embedder

    embedder = make_embedder(config.embedding)
    if images_dir is None:
        from rtdecoder.phantom.world import PhantomWorld

        tokens = PhantomWorld(config, progress=False).embedding.tokens
        if np.max(stim_index, initial=0) >= len(tokens):
            raise ConfigError(
                f"events.tsv: stim_index: expected rows of the phantom bank (< phantom.n_stimuli = "
                f"{len(tokens)}) (got {int(np.max(stim_index))}); pass --images for other stimuli"
            )
        return np.asarray(tokens[np.asarray(stim_index)], dtype=np.float32), embedder.name
    images = np.stack([_read_image(Path(images_dir), stim_id) for stim_id in stim_ids])
    tokens = np.concatenate([embedder.embed(images[i : i + 32]).tokens for i in range(0, len(images), 32)])
    return tokens.astype(np.float32), embedder.name


def calibrate(
    config: RTDecoderConfig,
    session_dir: str | Path,
    out_dir: str | Path,
    subject_id: str,
    mask: np.ndarray | str | Path,
    pretrained_dir: str | Path | None = None,
    images_dir: str | Path | None = None,
    progress: bool = True,
    session: SessionBetas | None = None,
    bank_tokens: np.ndarray | None = None,
    embedding_name: str | None = None,
) -> CalibrationReport:
    """Calibrate one subject from one session and write its bundle.

    Parameters
    ----------
    config : RTDecoderConfig
    session_dir : str or Path
        Run folders as the scanner wrote them (see :mod:`calibration.betas`).
    out_dir : str or Path
        The bundle folder.
    subject_id : str
        The adapter's name (e.g. ``"sub-08"``).
    mask : ndarray of bool, str or Path
        The voxel mask on the reference grid.
    pretrained_dir : str or Path, optional
        A :meth:`MindEye2.save_pretrained` folder (e.g. from ``rtdecoder pretrain``); ``None``
        trains from scratch.
    images_dir : str or Path, optional
        Stimulus image files (see :func:`stimulus_tokens`); ``None``: the phantom bank.
    progress : bool, default=True
        Progress bars for volumes and training.
    session : SessionBetas, optional
        Betas already estimated from ``session_dir`` (skips step 1).
    bank_tokens : ndarray of shape (n_stimuli, T, D), optional
        Tokens of the whole stimulus bank, indexed by ``stim_index`` (skips the embedder);
        give ``embedding_name`` with it.
    embedding_name : str, optional
        The name of the embedder that made ``bank_tokens``.

    Returns
    -------
    CalibrationReport
    """
    import torch

    from calibration.train import SubjectDataset, finetune, train
    from rtdecoder.decode.model import MindEye2

    started = time.perf_counter()
    out_dir = Path(out_dir)
    seconds: dict[str, float] = {}
    if session is None:
        session = estimate_session_betas(session_dir, config, mask, progress=progress)
    save_betas(session, out_dir / "betas")
    seconds["betas"] = time.perf_counter() - started

    finite = np.all(np.isfinite(session.betas), axis=1)
    train_rows = np.flatnonzero(finite & ~session.is_test)
    test_rows = np.flatnonzero(finite & session.is_test)
    if train_rows.size < config.training.batch_size:
        raise BundleError(
            f"{session_dir}: expected at least training.batch_size = {config.training.batch_size} "
            f"estimable non-test trials (got {train_rows.size})"
        )
    beta_mean, beta_std = zscore_stats(session.betas[train_rows])
    z = (session.betas - beta_mean) / beta_std
    stim_ids = [t.stim_id for t in session.trials]
    if images_dir is None and np.any(session.stim_index < 0):
        raise BundleError(
            f"{session_dir}: events.tsv: stim_index: expected a stimulus-bank row for every trial "
            "(or pass --images with stim_id columns)"
        )
    if images_dir is not None and any(not s for s in stim_ids):
        raise BundleError(f"{session_dir}: events.tsv: stim_id: expected the image name of every trial for --images")
    if bank_tokens is not None:
        tokens = np.asarray(bank_tokens[session.stim_index], dtype=np.float32)
        embedding_name = embedding_name or ""
    else:
        tokens, embedding_name = stimulus_tokens(config, session.stim_index, stim_ids, images_dir)

    dataset = SubjectDataset(
        subject_id, torch.from_numpy(z[train_rows]), torch.from_numpy(tokens[train_rows]),
        torch.from_numpy(session.stim_index[train_rows]),
    )
    train_started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rtdecoder-calibrate-") as work:
        if pretrained_dir is not None:
            _check_pretrained(Path(pretrained_dir), config)
            model, _ = finetune(pretrained_dir, dataset, config.training, work, progress=progress)
        else:
            torch.manual_seed(config.training.seed)
            model = MindEye2(config.model, {subject_id: session.mask.n_voxels})
            train(model, {subject_id: dataset}, config.training, work, progress=progress)
    seconds["training"] = time.perf_counter() - train_started

    evaluation: dict[str, Any] = {"n_train_trials": int(train_rows.size)}
    if test_rows.size:
        images, mean_z = average_repeats(z[test_rows], session.stim_index[test_rows])
        first_row = {int(s): int(r) for r, s in zip(test_rows[::-1], session.stim_index[test_rows][::-1], strict=True)}
        targets = tokens[[first_row[int(s)] for s in images]]
        evaluation.update(retrieval_evaluation(predict_clip_tokens(model, subject_id, mean_z), targets))
        evaluation["n_test_trials"] = int(test_rows.size)
    else:
        evaluation["note"] = "no test-image trials in the session; not evaluated"
    seconds["total"] = time.perf_counter() - started

    bundle = SubjectBundle(
        subject_id=subject_id,
        config=config,
        mask=session.mask.grid,
        affine=session.mask.affine,
        reference=session.reference,
        signal_mean=session.signal_mean,
        beta_mean=beta_mean,
        beta_std=beta_std,
        hrf_index=session.hrf_index,
        embedding_name=embedding_name,
        evaluation=evaluation,
        metadata={
            "calibration_session": str(session_dir),
            "calibration_runs": sorted(set(session.run_labels)),
            "calibration_pretrained": str(pretrained_dir) if pretrained_dir is not None else None,
            "calibration_seconds": {k: round(v, 1) for k, v in seconds.items()},
            "calibration_tr_s": session.tr_s,
        },
    )
    bundle.save(out_dir, model=model)
    logger.info("bundle written to %s (evaluation %s)", out_dir, evaluation)
    return CalibrationReport(out_dir, evaluation, seconds, int(train_rows.size))


def _check_pretrained(pretrained_dir: Path, config: RTDecoderConfig) -> None:
    import json

    path = pretrained_dir / "config.json"
    try:
        saved = json.loads(path.read_text()).get("model", {})
    except (OSError, json.JSONDecodeError) as err:
        raise BundleError(f"{path}: --pretrained: cannot read the model config: {err}") from None
    expected = config.model.model_dump(mode="json")
    different = sorted(k for k in expected if saved.get(k) != expected[k])
    if different:
        raise BundleError(
            f"{path}: model: {', '.join(different)} differ from the config's model section; "
            "pretrain with the same config (rtdecoder pretrain) or calibrate with the config it used"
        )


def _read_image(images_dir: Path, stim_id: str) -> np.ndarray:
    from PIL import Image

    for suffix in _IMAGE_SUFFIXES:
        path = images_dir / f"{stim_id}{suffix}"
        if path.is_file():
            with Image.open(path) as image:
                # one size so the images stack; both embedders take 224 px inputs
                image = image.convert("RGB").resize((_IMAGE_SIZE_PX, _IMAGE_SIZE_PX), Image.BICUBIC)
                return np.asarray(image, dtype=np.uint8)
    raise BundleError(
        f"{images_dir}: --images: no image file for stim_id {stim_id!r} (expected {stim_id}.png, .jpg, ...)"
    )
