"""Retrieval accuracy as the field reports it (docs/mindeye2.md, "Evaluation").

Image retrieval: for each trial, is its own image the most similar (cosine between flattened,
L2-normalised predicted tokens and true image tokens) among a pool of candidates? Brain
retrieval: for each image, is its own trial the most similar prediction? Pools of 300 drawn at
random, top-1 averaged over pools; chance is ``1 / pool``. With hubness penalties
(:mod:`rtdecoder.decode.hubness`) the scores are CSLS instead of plain cosines.

Trials are matched to images by ``stim_id``: :func:`mean_over_repeats` averages the repeats of
each image, :func:`candidate_ranks` ranks each image among a whole candidate set (the live
decoder's view: rank 1 is a top-1 hit, ``(N + 1) / 2`` chance on average).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
    image_penalty: np.ndarray | None = None,
    query_penalty: np.ndarray | None = None,
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
    image_penalty : array of shape (N,), optional
        Hubness penalty of each target image (:meth:`HubnessReference.image_penalty`), subtracted
        from its cosines; ``None``: none.
    query_penalty : array of shape (N,), optional
        Hubness penalty of each prediction (:meth:`HubnessReference.query_penalty`).

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
    image_penalty = _penalty(image_penalty, n, "image_penalty")
    query_penalty = _penalty(query_penalty, n, "query_penalty")
    rng = np.random.default_rng(seed)
    image_hits, brain_hits = [], []
    for _ in range(n_pools):
        idx = torch.from_numpy(rng.choice(n, size=pool_size, replace=False))
        sim = p[idx] @ t[idx].T  # (pool, pool): rows trials, columns images
        sim = sim - image_penalty[idx][None, :] - query_penalty[idx][:, None]
        truth = torch.arange(pool_size)
        image_hits.append((sim.argmax(dim=1) == truth).float().mean().item())
        brain_hits.append((sim.argmax(dim=0) == truth).float().mean().item())
    return RetrievalScores(float(np.mean(image_hits)), float(np.mean(brain_hits)), pool_size, n_pools)


def _penalty(values: np.ndarray | None, n: int, name: str) -> torch.Tensor:
    """A per-row hubness penalty as a float32 tensor of shape (n,); zeros for ``None``."""
    if values is None:
        return torch.zeros(n)
    penalty = torch.as_tensor(np.asarray(values, dtype=np.float32))
    if penalty.shape != (n,):
        raise ConfigError(f"retrieval: {name}: expected shape ({n},) (got {tuple(penalty.shape)})")
    return penalty


def mean_over_repeats(values: np.ndarray, stim_ids: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of each image's trials (its repeats), images identified by ``stim_id``.

    Parameters
    ----------
    values : ndarray of shape (n_trials, ...)
        E.g. betas (n_trials, n_voxels) or predicted tokens (n_trials, T, D).
    stim_ids : sequence of shape (n_trials,)
        The image of each trial: ``stim_id`` strings (any sortable keys work, e.g. ints).

    Returns
    -------
    images : ndarray of shape (n_images,)
        The distinct ids, sorted.
    means : ndarray of shape (n_images, ...), float32
        Row ``i`` is the mean over the trials of ``images[i]``.

    Examples
    --------
    >>> images, means = mean_over_repeats(np.array([[1.0], [3.0], [5.0]]), ["b", "a", "b"])
    >>> images.tolist(), means.ravel().tolist()
    (['a', 'b'], [3.0, 3.0])
    """
    values = np.asarray(values, dtype=np.float64)
    keys = np.asarray(stim_ids)
    if keys.shape != (len(values),):
        raise ConfigError(f"mean_over_repeats: stim_ids: expected shape ({len(values)},) (got {keys.shape})")
    images, inverse = np.unique(keys, return_inverse=True)
    sums = np.zeros((images.size, *values.shape[1:]))
    np.add.at(sums, inverse.reshape(-1), values)
    counts = np.bincount(inverse.reshape(-1), minlength=images.size).reshape(-1, *([1] * (values.ndim - 1)))
    return images, (sums / counts).astype(np.float32)


def candidate_ranks(
    predicted: torch.Tensor | np.ndarray,
    candidates: np.ndarray,
    true_rows: Sequence[int] | np.ndarray,
    block_bytes: int = 256 << 20,
    image_penalty: np.ndarray | None = None,
) -> np.ndarray:
    """1-based rank of each query's own image among all candidates, by cosine of flattened tokens
    (less each candidate's hubness penalty, when given: CSLS).

    Parameters
    ----------
    predicted : array of shape (n, T, D)
        Predicted retrieval tokens, one row per query (e.g. a held-out image, repeats averaged).
    candidates : array of shape (N, T, D)
        Candidate tokens; may be a memory map: it is read ``block_bytes`` of float32 at a time.
    true_rows : sequence of int, shape (n,)
        Row in ``candidates`` of each query's own image.
    block_bytes : int, default=256 MiB
        Memory for one block of candidates as float32 (bounds memory for any N).
    image_penalty : array of shape (N,), optional
        Each candidate's hubness penalty (:meth:`HubnessReference.image_penalty`).

    Returns
    -------
    ndarray of shape (n,), int64
        1 + the number of candidates scoring strictly higher than the query's own image.

    Examples
    --------
    >>> tokens = np.eye(4, dtype=np.float32)[:, None, :]
    >>> candidate_ranks(tokens[[2, 0]] + 0.1, tokens, [2, 1]).tolist()
    [1, 2]
    """
    query = torch.nn.functional.normalize(torch.as_tensor(predicted, dtype=torch.float32).flatten(1), dim=1)
    rows = torch.as_tensor(np.asarray(true_rows, dtype=np.int64))
    n_candidates = len(candidates)
    if len(rows) != len(query) or (len(rows) and (rows.min() < 0 or rows.max() >= n_candidates)):
        raise ConfigError(f"candidate_ranks: true_rows: expected {len(query)} rows in 0..{n_candidates - 1}")
    flat_dim = int(np.prod(candidates.shape[1:]))
    if flat_dim != query.shape[1]:
        raise ConfigError(f"candidate_ranks: candidates: expected {query.shape[1]} values per row (got {flat_dim})")
    own_unit = torch.nn.functional.normalize(
        torch.as_tensor(np.asarray(candidates[rows.numpy()], dtype=np.float32)).reshape(len(rows), -1), dim=1
    )
    penalty = _penalty(image_penalty, n_candidates, "image_penalty")
    own = (query * own_unit).sum(dim=1) - penalty[rows]  # (n,)
    higher = torch.zeros(len(query), dtype=torch.int64)
    step = max(1, block_bytes // (4 * flat_dim))
    for start in range(0, n_candidates, step):
        block = torch.as_tensor(np.asarray(candidates[start : start + step], dtype=np.float32))
        similarity = query @ torch.nn.functional.normalize(block.reshape(len(block), -1), dim=1).T  # (n, block)
        similarity = similarity - penalty[start : start + len(block)][None, :]
        # the own image never outranks itself, whatever the rounding of this block's product
        similarity[rows[:, None] == torch.arange(start, start + len(block))[None, :]] = -torch.inf
        higher += (similarity > own[:, None]).sum(dim=1)
    return (higher + 1).numpy()
