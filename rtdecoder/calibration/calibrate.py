"""One-session calibration: betas -> z-score statistics -> fine-tuned model -> evaluation -> bundle.

:func:`calibrate` is what ``rtdecoder calibrate`` runs:

1. single-trial betas of the session (:func:`rtdecoder.calibration.betas.estimate_session_betas`), saved
   under ``<bundle>/betas/``;
2. test-image trials (``is_test`` in ``events.tsv``) are held out; per-voxel mean and standard
   deviation of the remaining (training) betas become the bundle's ``beta_mean``/``beta_std``,
   and every beta is z-scored with them (the live decoder does the same with live betas);
3. the pretrained shared model gets a fresh adapter for this subject's voxel count and the whole
   model is trained on the training trials (:func:`rtdecoder.calibration.train.finetune`); without a
   pretrained model it is trained from scratch with the same recipe;
4. held-out evaluation: repeats of a test image are averaged, then image and brain retrieval
   top-1 among 300 (or all held-out images when fewer; :func:`rtdecoder.decode.metrics.retrieval_top1`);
5. :meth:`SubjectBundle.save` writes everything the live decoder needs.

Image targets are the embedder's tokens of each trial's image: for the phantom world, its stimulus
bank (from the embedding cache); otherwise a folder of image files named ``<stim_id>.<ext>``.

Mask and reference: the mask must reach the motion reference's grid (the middle volume of the
first run, or ``reference``): given on that grid in any voxel order, drawn on another volume of the
subject and registered (:class:`~rtdecoder.preprocess.registration.MaskSource` with ``space``), or
resampled from another grid when asked. :func:`write_reference` writes the reference calibration
would use, before calibration, so that a mask can be drawn on it. The phantom subject's own mask
is only a default for sessions the phantom wrote (:func:`written_by_phantom`); for anything else
a missing mask is an error (:func:`missing_mask_message`).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rtdecoder.bundle import SubjectBundle
from rtdecoder.calibration.betas import SessionBetas, estimate_session_betas, save_betas
from rtdecoder.config import RTDecoderConfig
from rtdecoder.errors import BundleError, ConfigError
from rtdecoder.preprocess.mask import VoxelMask
from rtdecoder.preprocess.registration import MaskSource

logger = logging.getLogger(__name__)

RETRIEVAL_POOL = 300
RETRIEVAL_POOLS = 30
_MIN_STD = 1e-6
_IMAGE_SIZE_PX = 224
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# What the phantom's writers put in the files they export (rtdecoder.phantom.scanner and
# dicom_export); real scanners never do.
_PHANTOM_MARK = "rtdecoder phantom"


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
    mask : dict
        How the mask reached the reference grid (:attr:`VoxelMask.provenance`: method, file, and
        for a registered mask the transform in mm and degrees and the cost).
    """

    bundle_dir: Path
    evaluation: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    n_train_trials: int = 0
    mask: dict[str, Any] = field(default_factory=dict)


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
    mask: np.ndarray | VoxelMask | MaskSource | str | Path,
    pretrained_dir: str | Path | None = None,
    images_dir: str | Path | None = None,
    progress: bool = True,
    session: SessionBetas | None = None,
    bank_tokens: np.ndarray | None = None,
    embedding_name: str | None = None,
    reference: str | Path | None = None,
    select: dict[str, str] | None = None,
) -> CalibrationReport:
    """Calibrate one subject from one session and write its bundle.

    Parameters
    ----------
    config : RTDecoderConfig
    session_dir : str or Path
        Run folders as the scanner wrote them (see :mod:`rtdecoder.calibration.betas`).
    out_dir : str or Path
        The bundle folder.
    subject_id : str
        The adapter's name (e.g. ``"sub-08"``).
    mask : ndarray of bool, VoxelMask, MaskSource, str or Path
        The voxel mask: on the reference grid (any voxel order), or a
        :class:`~rtdecoder.preprocess.registration.MaskSource` to register or resample.
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
    reference : str or Path, optional
        The motion reference volume file, on the session's grid (any voxel order); default: the
        middle volume of the first run.

    Returns
    -------
    CalibrationReport
    """
    import torch

    from rtdecoder.calibration.train import SubjectDataset, finetune, train
    from rtdecoder.decode.model import MindEye2

    started = time.perf_counter()
    out_dir = Path(out_dir)
    seconds: dict[str, float] = {}
    if session is None:
        session = estimate_session_betas(session_dir, config, mask, progress=progress, reference=reference,
                                         select=select)
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
            "calibration_mask": session.mask.provenance,
            "calibration_reference": str(reference) if reference is not None else "middle volume of the first run",
        },
    )
    bundle.save(out_dir, model=model)
    logger.info("bundle written to %s (evaluation %s)", out_dir, evaluation)
    return CalibrationReport(out_dir, evaluation, seconds, int(train_rows.size), dict(session.mask.provenance))


def write_reference(
    session_dir: str | Path, out_path: str | Path, reference: str | Path | None = None,
    select: dict[str, str] | None = None,
) -> Path:
    """Write the motion reference calibration would use, before calibrating (to draw a mask on).

    Parameters
    ----------
    session_dir : str or Path
        The calibration session (:func:`rtdecoder.calibration.betas.find_runs`).
    out_path : str or Path
        The NIfTI file to write (``.nii`` or ``.nii.gz``), float32, in the session's voxel order.
    reference : str or Path, optional
        A volume file to use instead of the default (the middle volume of the first run).

    Returns
    -------
    Path
        ``out_path``.
    """
    import nibabel as nib

    from rtdecoder.calibration.betas import choose_reference, find_runs, read_run_volumes

    out_path = Path(out_path)
    if not out_path.name.lower().endswith((".nii", ".nii.gz")):
        raise BundleError(f"{out_path}: --write-reference: expected a .nii or .nii.gz file name")
    volume = choose_reference(read_run_volumes(find_runs(session_dir, select)[0]), reference)
    image = nib.Nifti1Image(np.asarray(volume.data, dtype=np.float32), volume.affine)
    image.set_qform(volume.affine, code=1)
    image.set_sform(volume.affine, code=1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, out_path)
    logger.info("motion reference %s written to %s", volume.source, out_path)
    return out_path


def written_by_phantom(session_dir: str | Path) -> bool:
    """Whether the session's volumes were written by the rtdecoder phantom (so its mask applies).

    True when the first run's first volume file says so, as only the phantom's writers mark it:
    a NIfTI's sidecar ``Manufacturer`` or a DICOM's ``InstitutionName`` is ``"rtdecoder phantom"``;
    or when the session lies in a ``rtdecoder phantom generate`` tree (inside a ``sub-XX`` folder
    whose ``truth/sub-XX_mask-visual.nii.gz`` is the phantom's ground-truth mask).

    Parameters
    ----------
    session_dir : str or Path

    Returns
    -------
    bool
    """
    import json

    from rtdecoder.calibration.betas import find_runs

    runs = find_runs(session_dir)
    first = runs[0].volume_paths[0]
    name = first.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        stem = first.name[: -len(".nii.gz")] if name.endswith(".nii.gz") else first.name[: -len(".nii")]
        try:
            if json.loads(first.with_name(stem + ".json").read_text()).get("Manufacturer") == _PHANTOM_MARK:
                return True
        except (OSError, ValueError, AttributeError):
            pass
    else:
        import pydicom

        try:
            header = pydicom.dcmread(first, stop_before_pixels=True)
            if str(getattr(header, "InstitutionName", "")) == _PHANTOM_MARK:
                return True
        except (OSError, ValueError, pydicom.errors.InvalidDicomError):
            pass
    session_dir = Path(session_dir).resolve()
    for folder in [session_dir, *session_dir.parents][:4]:
        if folder.name.startswith("sub-") and (folder / "truth" / f"{folder.name}_mask-visual.nii.gz").is_file():
            return True
    return False


def missing_mask_message(session_dir: str | Path) -> str:
    """The error for a calibration of real data without ``--mask``: why, and how to make a mask."""
    return (
        f"{session_dir}: --mask: required (the session's volumes were not written by the rtdecoder phantom, so the "
        "phantom subject's mask does not apply). Make a 0/1 NIfTI mask of the voxels to decode: draw it on the "
        f"reference calibration will use, written by 'rtdecoder calibrate --session {session_dir} --write-reference "
        "reference.nii.gz', and pass --mask MASK.nii.gz; or pass a mask drawn on another volume of the subject with "
        "--mask-space THAT_VOLUME (it is registered); or compute a brain mask of the reference with "
        "nilearn.masking.compute_epi_mask and save it as NIfTI"
    )


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
