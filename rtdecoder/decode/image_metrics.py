"""Image-quality metrics of reconstructions: two-way identification, PixCorr and SSIM.

Definitions follow the MindEye2 evaluation (docs/mindeye2.md, "Evaluation"):

- Two-way identification (chance 50%): for reconstruction j, the share of other images i with
  ``corr(feat(real_i), feat(rec_j)) < corr(feat(real_j), feat(rec_j))``, averaged over j. Here
  the features are EfficientNet-Lite0's pooled features (the phantom embedder), not AlexNet /
  Inception / CLIP, which cannot be downloaded here; numbers are comparable between our
  generators, not with the paper's table.
- PixCorr: Pearson correlation over all pixels, both images resized to 425 px.
- SSIM: grey images at 425 px, Gaussian window sigma 1.5, data range 1.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rtdecoder.errors import DecoderError

EVAL_SIZE_PX = 425


def _check_pair(real: np.ndarray, recon: np.ndarray) -> None:
    for name, images in (("real", real), ("recon", recon)):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DecoderError(
                f"image metrics: {name}: expected uint8 (N, H, W, 3) (got {images.dtype} {images.shape})"
            )
    if len(real) != len(recon):
        raise DecoderError(f"image metrics: recon: expected {len(real)} images like real (got {len(recon)})")


def resize_float(images: np.ndarray, size_px: int = EVAL_SIZE_PX) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, size_px, size_px, 3) in [0, 1], bilinear, antialiased."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(
        x, size=(size_px, size_px), mode="bilinear", antialias=True, align_corners=False
    )
    return x.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def two_way_identification(real_features: np.ndarray, recon_features: np.ndarray) -> float:
    """Two-way identification accuracy from features (chance 0.5).

    Parameters
    ----------
    real_features, recon_features : numpy.ndarray of shape (N, F)
        Features of the real images and of their reconstructions, row j for image j.

    Returns
    -------
    float
        Mean over j of the share of i != j with corr(real_i, rec_j) < corr(real_j, rec_j).

    Examples
    --------
    >>> f = np.eye(4)
    >>> two_way_identification(f, f)
    1.0
    """
    if real_features.shape != recon_features.shape or real_features.ndim != 2 or len(real_features) < 2:
        raise DecoderError(
            f"two-way identification: features: expected two (N, F) arrays of the same shape, N >= 2 "
            f"(got {real_features.shape} and {recon_features.shape})"
        )
    n = len(real_features)
    corr = np.corrcoef(real_features.astype(np.float64), recon_features.astype(np.float64))[n:, :n]  # (rec j, real i)
    own = np.diag(corr)[:, None]
    wins = (corr < own).sum(axis=1)
    return float(np.mean(wins / (n - 1)))


def pixcorr(real: np.ndarray, recon: np.ndarray) -> float:
    """Mean Pearson correlation over pixels at 425 px of uint8 (N, H, W, 3) image pairs."""
    _check_pair(real, recon)
    a = resize_float(real).reshape(len(real), -1)
    b = resize_float(recon).reshape(len(recon), -1)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean((a * b).sum(axis=1) / np.maximum(denom, 1e-12)))


def ssim(real: np.ndarray, recon: np.ndarray) -> float:
    """Mean SSIM of grey 425 px versions of uint8 (N, H, W, 3) image pairs (Gaussian sigma 1.5)."""
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity

    _check_pair(real, recon)
    a, b = resize_float(real), resize_float(recon)
    values = [
        structural_similarity(rgb2gray(x), rgb2gray(y), gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=1.0)
        for x, y in zip(a, b, strict=True)
    ]
    return float(np.mean(values))


def reconstruction_metrics(
    real: np.ndarray, recon: np.ndarray, features: Callable[[np.ndarray], np.ndarray]
) -> dict[str, float]:
    """Two-way identification, PixCorr and SSIM for paired uint8 images.

    Parameters
    ----------
    real, recon : numpy.ndarray of uint8, shape (N, H, W, 3)
        Sizes may differ between the two; both are resized as each metric needs.
    features : callable
        uint8 (N, H, W, 3) -> (N, F) features; e.g.
        ``lambda im: embedder.embed(im).pooled`` with the EfficientNet-Lite0 embedder.

    Returns
    -------
    dict with ``two_way``, ``pixcorr``, ``ssim``.
    """
    _check_pair(real, recon)
    return {
        "two_way": two_way_identification(np.asarray(features(real)), np.asarray(features(recon))),
        "pixcorr": pixcorr(real, recon),
        "ssim": ssim(real, recon),
    }
