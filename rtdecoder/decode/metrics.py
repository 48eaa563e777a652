"""Retrieval accuracy as the field reports it (docs/mindeye2.md, "Evaluation").

Image retrieval: for each trial, is its own image the most similar (cosine between flattened,
L2-normalised predicted tokens and true image tokens) among a pool of candidates? Brain
retrieval: for each image, is its own trial the most similar prediction? Pools of 300 drawn at
random, top-1 averaged over pools; chance is ``1 / pool``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rtdecoder.errors import ConfigError


@dataclass(frozen=True)
class RetrievalScores:
    """Top-1 retrieval accuracies in [0, 1].

    Attributes
    ----------
    image : float
        Brain -> image (is the trial's image the best match among the pool's images).
    brain : float
        Image -> brain (is the image's trial the best match among the pool's predictions).
    pool_size : int
        Candidates per pool (chance level is ``1 / pool_size``).
    n_pools : int
        Pools averaged.
    """

    image: float
    brain: float
    pool_size: int
    n_pools: int


def retrieval_top1(
    predicted: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    pool_size: int = 300,
    n_pools: int = 30,
    seed: int = 0,
) -> RetrievalScores:
    """Image and brain retrieval top-1 over random pools.

    Parameters
    ----------
    predicted : array of shape (N, T, D) or (N, K)
        Retrieval tokens predicted from N test trials (averaged repeats, if any).
    target : array of the same shape
        The true image tokens of those trials' images, row for row.
    pool_size : int, default=300
        Candidates per pool; when ``N <= pool_size`` the single pool is all N trials.
    n_pools : int, default=30
        Random pools drawn without replacement (1 when the pool is all trials).
    seed : int, default=0

    Returns
    -------
    RetrievalScores

    Examples
    --------
    >>> x = torch.randn(20, 4, 8)
    >>> scores = retrieval_top1(x, x, pool_size=10, n_pools=3)
    >>> scores.image, scores.brain
    (1.0, 1.0)
    """
    p = torch.as_tensor(predicted, dtype=torch.float32)
    t = torch.as_tensor(target, dtype=torch.float32)
    if p.shape != t.shape or p.ndim < 2:
        raise ConfigError(
            f"retrieval: predicted and target: expected equal shapes (N, ...) "
            f"(got {tuple(p.shape)} and {tuple(t.shape)})"
        )
    if pool_size < 2 or n_pools < 1:
        raise ConfigError(
            f"retrieval: expected pool_size >= 2 and n_pools >= 1 (got {pool_size}, {n_pools})"
        )
    n = p.shape[0]
    p = torch.nn.functional.normalize(p.flatten(1), dim=-1)
    t = torch.nn.functional.normalize(t.flatten(1), dim=-1)
    if n <= pool_size:
        pool_size, n_pools = n, 1
    rng = np.random.default_rng(seed)
    image_hits, brain_hits = [], []
    for _ in range(n_pools):
        idx = torch.from_numpy(rng.choice(n, size=pool_size, replace=False))
        sim = p[idx] @ t[idx].T  # (pool, pool): rows trials, columns images
        truth = torch.arange(pool_size)
        image_hits.append((sim.argmax(dim=1) == truth).float().mean().item())
        brain_hits.append((sim.argmax(dim=0) == truth).float().mean().item())
    return RetrievalScores(float(np.mean(image_hits)), float(np.mean(brain_hits)), pool_size, n_pools)
