"""The hubness reference of a calibration: what CSLS retrieval is measured against.

The reference (:class:`~rtdecoder.decode.hubness.HubnessReference`) is the calibrated model's
predictions of the calibration session's training trials (not ``is_test``, finite betas), z-scored
with the bundle's statistics, and the tokens of those trials' images. :func:`calibrate` builds it
from the betas at hand to score its held-out images (:func:`reference_from_betas`); ``rtdecoder
run`` and ``rtdecoder evaluate`` rebuild the same from the bundle's ``betas/`` folder
(:func:`bundle_hubness_reference`), so that the bundle holds no extra copy of the predictions
(about 0.5 GB for the phantom preset's 2,000 training trials at 49 x 1,280 values each).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from rtdecoder.bundle import SubjectBundle
from rtdecoder.decode.hubness import HubnessReference
from rtdecoder.embedding.cache import ImageTokens

logger = logging.getLogger(__name__)


def reference_from_betas(
    model: Any,
    subject_id: str,
    z_betas: np.ndarray,
    is_training: np.ndarray,
    image_tokens: np.ndarray | None,
    k: int,
) -> HubnessReference | None:
    """The reference from z-scored betas of a calibration session.

    Parameters
    ----------
    model : MindEye2 or ModelEnsemble
    subject_id : str
        The adapter.
    z_betas : ndarray of shape (n_trials, n_voxels)
        Every trial's betas, z-scored with the bundle's statistics.
    is_training : ndarray of bool, shape (n_trials,)
        The training trials (not ``is_test``, finite betas).
    image_tokens : ndarray of shape (n_images, T, D) or None
        The training images' tokens, one row per image (the query side's reference).
    k : int
        ``candidates.hubness_k``; 0 returns ``None``.

    Returns
    -------
    HubnessReference or None
    """
    from rtdecoder.calibration.calibrate import predict_clip_tokens

    if k == 0 or not np.any(is_training):
        return None
    predictions = predict_clip_tokens(model, subject_id, z_betas[is_training])
    return HubnessReference.from_predictions(predictions, image_tokens, k)


def bundle_hubness_reference(
    bundle: SubjectBundle, model: Any, k: int, image_tokens: ImageTokens | None = None
) -> HubnessReference | None:
    """The reference of a saved bundle, from its calibration betas (``betas/``).

    Parameters
    ----------
    bundle : SubjectBundle
    model : MindEye2 or ModelEnsemble
        The bundle's model (``bundle.load_model()``).
    k : int
        ``candidates.hubness_k``; 0 returns ``None`` (plain cosine).
    image_tokens : ImageTokens, optional
        Tokens by stim_id: the training images among them are the query side's reference (brain
        retrieval); without them only the candidate side is corrected, which is all that ranking
        the candidates of one trial needs.

    Returns
    -------
    HubnessReference or None
        ``None`` when ``k`` is 0, or (logged) when the bundle holds no calibration betas or no
        training trial: retrieval is then plain cosine.
    """
    from rtdecoder.calibration.betas import load_betas

    if k == 0:
        return None
    betas_dir = bundle.directory / "betas" if bundle.directory is not None else None
    if betas_dir is None or not (betas_dir / "trials.tsv").is_file():
        logger.warning("bundle %s has no calibration betas (betas/trials.tsv): retrieval ranks by plain cosine, "
                       "without hubness correction", bundle.directory)
        return None
    betas, trials, _ = load_betas(betas_dir)
    is_training = np.array([row.get("is_test") != "true" for row in trials]) & np.all(np.isfinite(betas), axis=1)
    if not is_training.any():
        logger.warning("bundle %s: no training trial in betas/: retrieval ranks by plain cosine", bundle.directory)
        return None
    images = None
    if image_tokens is not None:
        ids = sorted({row["stim_id"] for row, keep in zip(trials, is_training, strict=True)
                      if keep and row.get("stim_id") and row["stim_id"] in image_tokens})
        images = image_tokens.tokens_of(ids) if ids else None
    z = (betas - bundle.beta_mean) / bundle.beta_std
    return reference_from_betas(model, bundle.subject_id, z, is_training, images, k)

