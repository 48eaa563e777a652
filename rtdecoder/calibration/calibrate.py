"""One-session calibration: betas -> z-score statistics -> fine-tuned model -> evaluation -> bundle.

:func:`calibrate` is what ``rtdecoder calibrate`` runs:

1. single-trial betas of the session (:func:`rtdecoder.calibration.betas.estimate_session_betas`), saved
   under ``<bundle>/betas/``;
2. test-image trials (``is_test`` in ``events.tsv``) are held out; per-voxel mean and standard
   deviation of the remaining (training) betas become the bundle's ``beta_mean``/``beta_std``,
   and every beta is z-scored with them (the live decoder does the same with live betas);
3. the pretrained shared model gets a fresh adapter for this subject's voxel count and the whole
   model is trained on the training trials (:func:`rtdecoder.calibration.train.finetune`); without a
   pretrained model it is trained from scratch with the same recipe. With ``training.ensemble_size``
   N > 1 this is done N times, with seeds ``training.seed`` .. ``training.seed + N - 1``, and the
   bundle holds the :class:`~rtdecoder.decode.ensemble.ModelEnsemble` of them;
4. held-out evaluation (of the ensemble, and of each member under ``members``): repeats of a
   test image (trials with the same ``stim_id``) are averaged, then image and brain retrieval top-1
   among 300 (or all held-out images when fewer;
   :func:`rtdecoder.decode.metrics.retrieval_top1`); when the config names the live decoder's
   candidates (``candidates.images_dir`` or ``candidates.embeddings_file``), also the rank of each
   held-out image among all of them (:func:`candidate_evaluation`). Retrieval ranks as the live
   decoder will: with ``candidates.hubness_k`` above 0 by CSLS against the hubness reference (the
   model's predictions of the training trials and the training images' tokens;
   :mod:`rtdecoder.decode.hubness`), the plain-cosine figures beside them under ``cosine``;
5. :meth:`SubjectBundle.save` writes everything the live decoder needs.

Trials are identified by their ``stim_id`` (events.tsv's ``stim_id``, or the stem of its
``stim_file``). Image targets are the embedder's tokens of each trial's image, looked up by that
id in ``images``: a folder of image files named ``<stim_id>.<ext>`` (only the session's images are
embedded, cached by the files' content) or an embeddings file (:mod:`rtdecoder.embedding.cache`).
There is no default: the command line passes the phantom world's stimulus bank
(:class:`~rtdecoder.embedding.cache.ImageTokens`) for sessions the phantom wrote, and nothing here
knows about the simulator. ``stim_index`` (a row of the phantom bank) is read only with
``bank_tokens`` given as a bare array.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rtdecoder.bundle import SubjectBundle
from rtdecoder.calibration.betas import SessionBetas, estimate_session_betas, save_betas
from rtdecoder.calibration.voxel_selection import AUTO_MASK, RELIABILITY_FILE, select_reliable_voxels
from rtdecoder.config import RTDecoderConfig
from rtdecoder.embedding.base import Embedder
from rtdecoder.embedding.cache import ImageTokens, load_image_tokens
from rtdecoder.errors import BundleError, ConfigError
from rtdecoder.preprocess.mask import VoxelMask
from rtdecoder.preprocess.registration import MaskSource

if TYPE_CHECKING:
    from rtdecoder.decode.hubness import HubnessReference

logger = logging.getLogger(__name__)

RETRIEVAL_POOL = 300
RETRIEVAL_POOLS = 30
_MIN_STD = 1e-6
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


def average_repeats(betas: np.ndarray, stim_ids: np.ndarray | list) -> tuple[np.ndarray, np.ndarray]:
    """Mean beta of each image over its repeats (:func:`rtdecoder.decode.metrics.mean_over_repeats`).

    Parameters
    ----------
    betas : ndarray of shape (n_trials, n_voxels)
    stim_ids : sequence of shape (n_trials,)
        The image of each trial: its ``stim_id`` (any sortable keys work, e.g. phantom bank rows).

    Returns
    -------
    images : ndarray of shape (n_images,)
        The distinct ids, sorted.
    mean_betas : ndarray of shape (n_images, n_voxels), float32

    Examples
    --------
    >>> images, mean = average_repeats(np.array([[1.0], [3.0], [5.0]]), ["st-7", "st-2", "st-7"])
    >>> images.tolist(), mean.ravel().tolist()
    (['st-2', 'st-7'], [3.0, 3.0])
    """
    from rtdecoder.decode.metrics import mean_over_repeats

    return mean_over_repeats(betas, stim_ids)


def predict_clip_tokens(model: Any, subject_id: str, betas: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The retrieval head's tokens for z-scored betas, shape (n, T, D), float32 (eval mode)."""
    import torch

    model.eval()
    parameter = next(model.parameters(), None) if hasattr(model, "parameters") else None
    device = parameter.device if parameter is not None else torch.device("cpu")  # where the model's weights are
    out = []
    with torch.no_grad():
        for start in range(0, len(betas), batch_size):
            x = torch.as_tensor(np.asarray(betas[start : start + batch_size]), dtype=torch.float32, device=device)
            out.append(model({subject_id: x}).clip_tokens.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.n_tokens, model.config.token_dim), np.float32)


def retrieval_evaluation(
    predicted: np.ndarray, targets: np.ndarray, seed: int = 0, pool_size: int = RETRIEVAL_POOL,
    hubness: HubnessReference | None = None,
) -> dict[str, Any]:
    """Image and brain retrieval top-1 among 300 candidates (all when fewer), as a JSON-ready dict.

    Parameters
    ----------
    predicted, targets : ndarray of shape (n_images, T, D)
        Predicted retrieval tokens (repeats averaged before prediction) and true image tokens.
    seed : int, default=0
        Seed of the random pools.
    pool_size : int, default=300
        Candidates per random pool (``RETRIEVAL_POOLS`` pools); all images when fewer.
    hubness : HubnessReference, optional
        Scores by CSLS against it (:mod:`rtdecoder.decode.hubness`); ``None``: plain cosine.
    """
    from rtdecoder.decode.hubness import scoring_name
    from rtdecoder.decode.metrics import retrieval_top1

    if len(predicted) < 2:
        return {"n_test_images": int(len(predicted)), "note": "fewer than 2 held-out images; not evaluated"}
    penalties = {} if hubness is None else {"image_penalty": hubness.image_penalty(targets),
                                            "query_penalty": hubness.query_penalty(predicted)}
    scores = retrieval_top1(predicted, targets, pool_size, RETRIEVAL_POOLS, seed=seed, **penalties)
    return {
        "scores": scoring_name(hubness),
        "image_top1": round(scores.image, 4),
        "brain_top1": round(scores.brain, 4),
        "pool_size": scores.pool_size,
        "n_pools": scores.n_pools,
        "chance": round(1.0 / scores.pool_size, 4),
        "n_test_images": int(len(predicted)),
    }


def candidate_evaluation(
    predicted: np.ndarray, stim_ids: list[str], candidates: ImageTokens, hubness: HubnessReference | None = None
) -> dict[str, Any]:
    """How the live decoder would rank held-out images: each one's rank among all candidates.

    Parameters
    ----------
    predicted : ndarray of shape (n_images, T, D)
        Predicted retrieval tokens of the held-out images (repeats averaged).
    stim_ids : list of str
        Their ids, row for row; images that are not candidates are not ranked.
    candidates : ImageTokens
        The live decoder's candidates (``candidates.images_dir`` or ``candidates.embeddings_file``).
    hubness : HubnessReference, optional
        Ranks by CSLS against it, as the live decoder does (``None``: plain cosine).

    Returns
    -------
    dict
        ``n_candidates``, ``n_ranked`` (held-out images among them), ``top1`` and ``top5``
        (fractions), ``median_rank`` and ``chance_median_rank`` (``(N + 1) / 2``), ``source``;
        or a ``note`` when no held-out image is a candidate.
    """
    from rtdecoder.decode.metrics import candidate_ranks

    present = [row for row, stim_id in enumerate(stim_ids) if stim_id in candidates]
    result: dict[str, Any] = {"n_candidates": len(candidates), "source": candidates.source}
    if not present:
        return result | {"note": "no held-out image is among the candidates; not ranked"}
    ranks = candidate_ranks(predicted[present], candidates.tokens, candidates.rows([stim_ids[r] for r in present]),
                            image_penalty=None if hubness is None else hubness.image_penalty(candidates.tokens))
    return result | {
        "n_ranked": len(present),
        "top1": round(float(np.mean(ranks == 1)), 4),
        "top5": round(float(np.mean(ranks <= 5)), 4),
        "median_rank": float(np.median(ranks)),
        "chance_median_rank": (len(candidates) + 1) / 2,
    }


def stimulus_tokens(
    config: RTDecoderConfig,
    stim_ids: list[str],
    images: str | Path | ImageTokens,
    embedder: Embedder | Callable[[], Embedder] | None = None,
    progress: bool = True,
) -> ImageTokens:
    """Image tokens of the listed stimuli, by stim_id, checked against the config's model.

    Parameters
    ----------
    config : RTDecoderConfig
        ``model`` (the token shape the tokens must have), ``embedding`` (the embedder of a folder,
        its ``cache_dir``) and ``candidates.embed_batch_size``.
    stim_ids : list of str
        The images needed (e.g. every distinct stim_id of a session).
    images : str, Path or ImageTokens
        A folder of ``<stim_id>.<ext>`` image files (only the listed ones are embedded, cached by
        content), an embeddings file, or tokens already at hand (e.g. the phantom bank's).
    embedder : Embedder or callable returning one, optional
        For a folder (a callable is called only then); default
        :func:`~rtdecoder.embedding.base.make_embedder` of ``config.embedding``.
    progress : bool, default=True

    Returns
    -------
    ImageTokens
        Holding at least ``stim_ids``.

    Raises
    ------
    BundleError
        If an image is missing (naming the folder or file and the stim_id) or the tokens do not fit
        the model (naming the field).
    """
    from rtdecoder.embedding.base import make_embedder

    token_shape = (config.model.n_tokens, config.model.token_dim)
    if isinstance(images, ImageTokens):
        images.check(token_shape=token_shape, expected_by="the config's model")
        images.rows(stim_ids)
        return images
    return load_image_tokens(
        images, embedder if embedder is not None else (lambda: make_embedder(config.embedding)),
        config.embedding.cache_dir, ids=stim_ids, batch_size=config.candidates.embed_batch_size, progress=progress,
        token_shape=token_shape, expected_by="the config's model",
    )


def calibrate(
    config: RTDecoderConfig,
    session_dir: str | Path,
    out_dir: str | Path,
    subject_id: str,
    mask: np.ndarray | VoxelMask | MaskSource | str | Path,
    pretrained_dir: str | Path | None = None,
    images: str | Path | ImageTokens | None = None,
    progress: bool = True,
    session: SessionBetas | None = None,
    bank_tokens: np.ndarray | None = None,
    embedding_name: str | None = None,
    reference: str | Path | None = None,
    select: dict[str, str] | None = None,
    embedder: Embedder | None = None,
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
        :class:`~rtdecoder.preprocess.registration.MaskSource` to register or resample; or
        ``"auto"``: the ``voxel_selection.n_voxels`` most reliable voxels of the session's EPI brain
        mask (:mod:`rtdecoder.calibration.voxel_selection`; their scores are saved in the bundle).
    pretrained_dir : str or Path, optional
        A :meth:`MindEye2.save_pretrained` folder (e.g. from ``rtdecoder pretrain``); ``None``
        trains from scratch.
    images : str, Path or ImageTokens
        The session's images, found by each trial's ``stim_id`` (see :func:`stimulus_tokens`): a
        folder of ``<stim_id>.<ext>`` files, an embeddings file, or tokens at hand (the command
        line passes the phantom bank's for sessions the phantom wrote). Required unless
        ``bank_tokens`` is given.
    progress : bool, default=True
        Progress bars for volumes, embedding and training.
    session : SessionBetas, optional
        Betas already estimated from ``session_dir`` (skips step 1).
    bank_tokens : ndarray of shape (n_stimuli, T, D), optional
        A bare array of a stimulus bank's tokens, row ``stim_index`` for each trial (the phantom's
        convenience; prefer ``images`` with ids); give ``embedding_name`` with it.
    embedding_name : str, optional
        The name of the embedder that made ``bank_tokens``.
    reference : str or Path, optional
        The motion reference volume file, on the session's grid (any voxel order); default: the
        middle volume of the first run.
    select : dict of str to str, optional
        BIDS entity values the runs must have (:func:`rtdecoder.calibration.betas.find_runs`).
    embedder : Embedder, optional
        Embeds folders of images (``images``, ``candidates.images_dir``); default the one
        ``config.embedding`` describes, built when first needed.

    Returns
    -------
    CalibrationReport

    Raises
    ------
    BundleError
        If no images are given, no trial names its image, an image is missing, the tokens do not
        fit the model, or there are too few training trials.
    """
    import torch

    from rtdecoder.calibration.train import SubjectDataset
    from rtdecoder.decode.ensemble import ModelEnsemble

    started = time.perf_counter()
    out_dir = Path(out_dir)
    seconds: dict[str, float] = {}
    if (images is None) == (bank_tokens is None):
        raise BundleError(
            f"{session_dir}: calibrate: images: expected the session's images (--images): a folder of "
            "<stim_id>.png/.jpg files or an embeddings file of them" + (" (not both images and bank_tokens)"
                                                                        if images is not None else "")
        )
    selection = None
    if isinstance(mask, str) and mask == AUTO_MASK:
        if session is not None:
            raise BundleError(f"{session_dir}: calibrate: mask 'auto' chooses the voxels the betas are estimated on; "
                              "expected no precomputed session with it")
        selection = select_reliable_voxels(session_dir, config, progress=progress, reference=reference,
                                           select=select)
        mask = selection.mask
    if session is None:
        session = estimate_session_betas(session_dir, config, mask, progress=progress, reference=reference,
                                         select=select)
    save_betas(session, out_dir / "betas")
    seconds["betas"] = time.perf_counter() - started

    models: list[Embedder] = [embedder] if embedder is not None else []

    def folder_embedder() -> Embedder:
        # one model for the session's images and the candidates, built only if a folder needs it
        if not models:
            from rtdecoder.embedding.base import make_embedder

            models.append(make_embedder(config.embedding))
        return models[0]

    candidates_source = config.candidates.embeddings_file or config.candidates.images_dir
    candidates: ImageTokens | None = None
    if candidates_source and isinstance(images, (str, Path)) and _same_path(images, candidates_source):
        # The session's images are the live candidates: embed (or read) the whole set once, for both.
        images = candidates = _load_candidates(config, candidates_source, None, folder_embedder, progress)
    keys, has_image, tokens, stimuli = _trial_tokens(
        config, session, session_dir, images, bank_tokens, folder_embedder, progress
    )
    embedding_name = stimuli.embedding_name if stimuli is not None else (embedding_name or "")
    if candidates_source and candidates is None:  # before training: a wrong candidate set fails before the long part
        candidates = _load_candidates(config, candidates_source, embedding_name, folder_embedder, progress)

    finite = np.all(np.isfinite(session.betas), axis=1)
    train_rows = np.flatnonzero(finite & ~session.is_test & has_image)
    test_rows = np.flatnonzero(finite & session.is_test & has_image)
    if train_rows.size < config.training.batch_size:
        raise BundleError(
            f"{session_dir}: expected at least training.batch_size = {config.training.batch_size} "
            f"estimable non-test trials with an image (got {train_rows.size})"
        )
    beta_mean, beta_std = zscore_stats(session.betas[train_rows])
    z = (session.betas - beta_mean) / beta_std
    _, image_codes = np.unique(keys, return_inverse=True)

    # What the live session will use; the model, evaluation and metadata are filled in once known.
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
        glmdenoise=session.glmdenoise,
        embedding_name=embedding_name,
    )
    live: dict[str, torch.Tensor] = {}
    if config.training.live_beta_fraction > 0:
        live_started = time.perf_counter()
        live_z, live_rows = live_training_betas(config, bundle, session, session_dir, train_rows, select=select,
                                                progress=progress)
        live = {"live_betas": torch.from_numpy(live_z), "live_rows": torch.from_numpy(live_rows)}
        seconds["live_betas"] = time.perf_counter() - live_started
    dataset = SubjectDataset(
        subject_id, torch.from_numpy(z[train_rows]), torch.from_numpy(tokens[train_rows]),
        torch.from_numpy(image_codes[train_rows].astype(np.int64)), **live,
    )
    train_started = time.perf_counter()
    if pretrained_dir is not None:
        _check_pretrained(Path(pretrained_dir), config)
    model = train_models(config, dataset, session.mask.n_voxels, pretrained_dir, progress)
    seconds["training"] = time.perf_counter() - train_started

    evaluation: dict[str, Any] = {"n_train_trials": int(train_rows.size)}
    if live:
        evaluation["n_live_training_betas"] = int(live["live_rows"].numel())
    if int((~has_image).sum()):
        evaluation["n_trials_without_image"] = int((~has_image).sum())
    if test_rows.size:
        image_ids, mean_z = average_repeats(z[test_rows], keys[test_rows])
        first_row: dict[str, int] = {}
        for row in test_rows:
            first_row.setdefault(str(keys[row]), int(row))
        targets = tokens[[first_row[str(image_id)] for image_id in image_ids]]
        predicted = predict_clip_tokens(model, subject_id, mean_z)
        hubness = calibration_hubness_reference(config, model, subject_id, z, session, keys, tokens, has_image)
        evaluation.update(retrieval_evaluation(predicted, targets, hubness=hubness))
        if hubness is not None:
            evaluation["cosine"] = retrieval_evaluation(predicted, targets)
        evaluation["n_test_trials"] = int(test_rows.size)
        if isinstance(model, ModelEnsemble):
            evaluation["members"] = [
                {"seed": config.training.seed + i, **retrieval_evaluation(
                    predict_clip_tokens(m, subject_id, mean_z), targets,
                    hubness=calibration_hubness_reference(config, m, subject_id, z, session, keys, tokens, has_image))}
                for i, m in enumerate(model.members)
            ]
        if candidates is not None:
            evaluation["candidates"] = candidate_evaluation(predicted, [str(i) for i in image_ids], candidates, hubness)
    else:
        evaluation["note"] = "no test-image trials in the session; not evaluated"
    seconds["total"] = time.perf_counter() - started

    bundle.evaluation = evaluation
    bundle.metadata = {
        "calibration_session": str(session_dir),
        "calibration_runs": sorted(set(session.run_labels)),
        "calibration_pretrained": str(pretrained_dir) if pretrained_dir is not None else None,
        "calibration_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "calibration_tr_s": session.tr_s,
        "calibration_mask": session.mask.provenance,
        "calibration_reference": str(reference) if reference is not None else "middle volume of the first run",
        "calibration_images": stimuli.source if stimuli is not None else "bank_tokens (rows by stim_index)",
    }
    bundle.save(out_dir, model=model)
    if selection is not None:
        selection.save_reliability(out_dir / RELIABILITY_FILE)
    logger.info("bundle written to %s (evaluation %s)", out_dir, evaluation)
    return CalibrationReport(out_dir, evaluation, seconds, int(train_rows.size), dict(session.mask.provenance))


def calibration_hubness_reference(
    config: RTDecoderConfig, model: Any, subject_id: str, z: np.ndarray, session: SessionBetas, keys: np.ndarray,
    tokens: np.ndarray, has_image: np.ndarray,
) -> HubnessReference | None:
    """The hubness reference the live decoder will rebuild from the saved bundle
    (:mod:`rtdecoder.calibration.hubness_reference`); ``None`` when ``candidates.hubness_k`` is 0."""
    from rtdecoder.calibration.hubness_reference import reference_from_betas

    is_training = ~session.is_test & np.all(np.isfinite(session.betas), axis=1)
    rows = np.flatnonzero(is_training & has_image)
    _, first = np.unique(keys[rows], return_index=True)  # one row per training image
    return reference_from_betas(model, subject_id, z, is_training, tokens[rows[first]] if rows.size else None,
                                config.candidates.hubness_k)


def live_training_betas(
    config: RTDecoderConfig,
    bundle: SubjectBundle,
    session: SessionBetas,
    session_dir: str | Path,
    train_rows: np.ndarray,
    select: dict[str, str] | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The training trials' live betas: the calibration session replayed through the live front end.

    A live session decodes each trial first from a beta released ``glm.beta_wait_s`` after its onset
    and then from refinements, which are noisier than the whole-run betas a model is trained on.
    Here the session goes through the front end ``run`` would build from this calibration's bundle
    (its reference, ``signal_mean``, HRFs and GLMdenoise components;
    :func:`rtdecoder.calibration.evaluate.replay_session`), and every first release and refinement
    of a training trial up to ``training.live_beta_max_after_onset_s`` after its onset is kept,
    z-scored with the bundle's ``beta_mean`` / ``beta_std``, as the live decoder z-scores it.

    Parameters
    ----------
    config : RTDecoderConfig
    bundle : SubjectBundle
        The calibration's bundle, model or not: its geometry and z-score statistics.
    session : SessionBetas
        The session's offline betas (its trials).
    session_dir : str or Path
        The same session's runs.
    train_rows : ndarray of int, shape (N,)
        The training trials (rows of ``session.betas``), in dataset order.
    select : dict of str to str, optional
        BIDS entity values the runs must have.
    progress : bool, default=False

    Returns
    -------
    live_z : ndarray of shape (M, n_voxels), float32
        z-scored live betas (none, with a warning, when no training trial has one in time).
    live_rows : ndarray of shape (M,), int64
        The dataset row (index into ``train_rows``) of each.
    """
    from rtdecoder.calibration.evaluate import LiveBeta, replay_session

    row_of = {(session.run_labels[row], session.trials[row].trial_id): i for i, row in enumerate(train_rows)}
    kept: list[np.ndarray] = []
    rows: list[int] = []
    latest_s = config.training.live_beta_max_after_onset_s

    def take(beta: LiveBeta) -> None:
        row = row_of.get((beta.run, beta.trial_id))
        if (row is not None and beta.kind != "final" and beta.after_onset_s <= latest_s and beta.beta is not None
                and np.all(np.isfinite(beta.beta))):
            kept.append(((beta.beta - bundle.beta_mean) / bundle.beta_std).astype(np.float32))
            rows.append(row)

    replay_session(config, bundle, session_dir, take, select=select, progress=progress)
    if not rows:
        # Training on the final betas alone is still a sound calibration: say so, and go on.
        logger.warning(
            "%s: training.live_beta_fraction: the live front end released no beta of a training trial within "
            "training.live_beta_max_after_onset_s = %s s of its onset; training on final betas only (raise it to "
            "use later refinements)", session_dir, latest_s,
        )
        return np.zeros((0, session.betas.shape[1]), np.float32), np.zeros(0, np.int64)
    logger.info("live betas: %d of %d training trials, %d betas", len(set(rows)), len(train_rows), len(rows))
    return np.stack(kept), np.asarray(rows, dtype=np.int64)


def train_models(
    config: RTDecoderConfig, dataset: Any, n_voxels: int, pretrained_dir: str | Path | None = None,
    progress: bool = True,
) -> Any:
    """Train the subject's model ``training.ensemble_size`` times, with seeds ``training.seed``, +1, ...

    Parameters
    ----------
    config : RTDecoderConfig
        ``training`` is the recipe; ``model`` the sizes of a model trained from scratch.
    dataset : SubjectDataset
        The subject's z-scored training betas and their image tokens.
    n_voxels : int
        The adapter's inputs (the mask's voxel count).
    pretrained_dir : str or Path, optional
        Fine-tune this pretrained model (:func:`~rtdecoder.calibration.train.finetune`); ``None``
        trains from scratch.
    progress : bool, default=True

    Returns
    -------
    MindEye2 or ModelEnsemble
        One model, or the ensemble of ``ensemble_size`` (> 1) of them in seed order.
    """
    import torch

    from rtdecoder.calibration.train import finetune, train
    from rtdecoder.decode.ensemble import as_model
    from rtdecoder.decode.model import MindEye2

    members = []
    for index in range(config.training.ensemble_size):
        recipe = config.training.model_copy(update={"seed": config.training.seed + index})
        if config.training.ensemble_size > 1:
            logger.info("training model %d of %d (seed %d)", index + 1, config.training.ensemble_size, recipe.seed)
        with tempfile.TemporaryDirectory(prefix="rtdecoder-calibrate-") as work:
            if pretrained_dir is not None:
                model, _ = finetune(pretrained_dir, dataset, recipe, work, progress=progress)
            else:
                torch.manual_seed(recipe.seed)
                model = MindEye2(config.model, {dataset.subject_id: n_voxels})
                train(model, {dataset.subject_id: dataset}, recipe, work, progress=progress)
        members.append(model)
    return as_model(members)


def _trial_tokens(
    config: RTDecoderConfig,
    session: SessionBetas,
    session_dir: str | Path,
    images: str | Path | ImageTokens | None,
    bank_tokens: np.ndarray | None,
    folder_embedder: Any,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, ImageTokens | None]:
    """Each trial's image key (its stim_id), whether it has an image, its image's tokens, and their source.

    Returns ``keys`` (n_trials,) str, ``has_image`` (n_trials,) bool, ``tokens`` (n_trials, T, D)
    float32 (zeros for trials without an image) and the :class:`ImageTokens` they came from
    (``None`` for a bare ``bank_tokens`` array).
    """
    trials = session.trials
    token_shape = (config.model.n_tokens, config.model.token_dim)
    tokens = np.zeros((len(trials), *token_shape), dtype=np.float32)
    if images is None:
        # The phantom's bare bank array: rows by stim_index; trials still grouped by stim_id when they have one.
        stim_index = session.stim_index
        has_image = stim_index >= 0
        if not has_image.any():
            raise BundleError(f"{session_dir}: events.tsv: stim_index: expected stimulus-bank rows with bank_tokens "
                              "(pass images with ids for trials named by stim_id)")
        if int(stim_index.max()) >= len(bank_tokens):
            raise BundleError(f"{session_dir}: events.tsv: stim_index: expected rows of bank_tokens "
                              f"(< {len(bank_tokens)}) (got {int(stim_index.max())})")
        if tuple(bank_tokens.shape[1:]) != token_shape:
            raise BundleError(f"bank_tokens: tokens: expected shape (n, {token_shape[0]}, {token_shape[1]}) for "
                              f"the config's model (got {tuple(bank_tokens.shape)})")
        keys = np.array([t.stim_id or (f"#{t.stim_index}" if t.stim_index >= 0 else "") for t in trials])
        tokens[has_image] = np.asarray(bank_tokens[stim_index[has_image]], dtype=np.float32)
        return keys, has_image, tokens, None
    keys = np.array([t.stim_id or "" for t in trials])
    has_image = keys != ""
    if not has_image.any():
        raise BundleError(
            f"{session_dir}: events.tsv: stim_id: expected the image of each trial (a stim_id or stim_file column "
            "naming the image file); no trial has one"
        )
    if not has_image.all():
        logger.warning("%s: %d of %d trials name no image (no stim_id); left out of training and evaluation",
                       session_dir, int((~has_image).sum()), len(trials))
    needed = sorted(set(keys[has_image].tolist()))
    stimuli = stimulus_tokens(config, needed, images, folder_embedder, progress)
    tokens[has_image] = stimuli.tokens_of(keys[has_image].tolist())
    return keys, has_image, tokens, stimuli


def _load_candidates(
    config: RTDecoderConfig, source: str, embedding_name: str | None, folder_embedder: Any, progress: bool
) -> ImageTokens:
    """The live decoder's candidates the config names, checked against the session's tokens."""
    return load_image_tokens(
        source, folder_embedder, config.embedding.cache_dir, batch_size=config.candidates.embed_batch_size,
        progress=progress, embedding_name=embedding_name or None,
        token_shape=(config.model.n_tokens, config.model.token_dim), expected_by="the session's image tokens",
    )


def _same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


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

    from rtdecoder.calibration.betas import session_reference

    out_path = Path(out_path)
    if not out_path.name.lower().endswith((".nii", ".nii.gz")):
        raise BundleError(f"{out_path}: --write-reference: expected a .nii or .nii.gz file name")
    volume = session_reference(session_dir, reference, select)
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
        "--mask-space THAT_VOLUME (it is registered); or let calibration choose the voxels with --mask auto (the "
        "voxel_selection.n_voxels most reliable voxels of the reference's EPI brain mask, by the session's repeated "
        "images)"
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
