"""Fractional ridge regression: ridge solutions at chosen fractions of the OLS solution's length.

Ridge regression shrinks least-squares coefficients with a penalty ``alpha``, but a given alpha
shrinks differently with every design and every target's scale, so a grid of alphas is hard to
choose. Fractional ridge (Rokem & Kay 2020, GigaScience 9:giaa133; used by GLMsingle, Prince et
al. 2022) asks instead for the fraction ``f`` of the OLS coefficients' L2 norm the solution should
keep: ``||b_alpha|| = f * ||b_ols||``, with ``f = 1`` the OLS solution and ``f -> 0`` everything
shrunk to zero. The same grid of fractions then means the same amount of shrinkage for every
target, and alpha is found per target.

Algorithm (one SVD of the design for all targets and fractions)::

    X = U diag(s) V'                      thin SVD; near-zero singular values are dropped
    c = U' y                              the target in the rotated space
    b_alpha = V diag(s / (s^2 + alpha)) c

``V`` is orthonormal, so ``||b_alpha||`` is the norm of ``s / (s^2 + alpha) * c``: the length of
every target's solution is computed for a dense logarithmic grid of alphas at the cost of one
matrix product, the alpha of each requested fraction is interpolated on that curve (linear in
log alpha; the curve falls monotonically from 1 at alpha = 0 towards 0), and the solution is
computed exactly at the interpolated alpha. The returned solution is an exact ridge solution;
its norm ratio differs from the requested fraction only by the interpolation error, below 1e-4
with :data:`LOG10_ALPHA_STEP` (Rokem & Kay's 0.2 decades would allow errors of a few 1e-3).

A design of deficient rank gives, at ``f = 1``, the minimum-norm least-squares solution (as
``np.linalg.lstsq``), and its ridge solutions live in the same row space.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Spacing of the alpha grid the norm curve is sampled on, decades.
LOG10_ALPHA_STEP = 0.02
# The grid starts where no fraction below 1 - 2e-6 can lie (the norm ratio is at least
# 1 - 2 alpha / s_min^2) and ends past the smallest requested fraction (the ratio is at most
# s_max^2 / (s_max^2 + alpha)), so every requested fraction is bracketed.
_LOW_ALPHA_PER_S2 = 1e-6
_HIGH_ALPHA_MARGIN = 10.0


def design_svd(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The thin SVD of a design that :func:`fracridge` uses, near-zero singular values dropped.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_regressors)

    Returns
    -------
    u : ndarray of shape (n_samples, k)
    s : ndarray of shape (k,)
        The singular values above numpy's rank tolerance (``s_max * max(X.shape) * eps``).
    vt : ndarray of shape (k, n_regressors)
    """
    X = _check_design(X)
    u, s, vt = np.linalg.svd(X, full_matrices=False)
    # Smaller singular values are rounding noise; dropping them makes f = 1 the minimum-norm
    # least-squares solution.
    keep = s > s.max(initial=0.0) * max(X.shape) * np.finfo(np.float64).eps
    return u[:, keep], s[keep], vt[keep]


def fracridge(
    X: np.ndarray,
    Y: np.ndarray,
    fractions: float | Sequence[float] | np.ndarray,
    svd: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Ridge coefficients whose L2 norms are given fractions of the OLS coefficients' norm.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_regressors)
        The design (for a GLM: volumes by regressors, in units per unit of coefficient). Regressors
        that should not be shrunk (drift, motion) are best projected out of ``X`` and ``Y`` first
        (Frisch-Waugh-Lovell), which leaves them unpenalised.
    Y : ndarray of shape (n_samples, n_targets) or (n_samples,)
        The data (for a GLM: volumes by voxels); each column is fitted on its own.
    fractions : float or sequence of float
        Wanted ``||b_alpha|| / ||b_ols||``, each in (0, 1]; 1 gives the OLS solution. Any order.
    svd : tuple (u, s, vt), optional
        :func:`design_svd` of this ``X``, when the same design is fitted to several batches of
        targets (the SVD is then not computed again).

    Returns
    -------
    coefficients : ndarray of shape (n_fractions, n_regressors, n_targets), float64
        The ridge solution of each fraction and target, in the units of ``Y`` per unit of ``X``
        (a 1-D ``Y`` drops the last axis).
    alphas : ndarray of shape (n_fractions, n_targets), float64
        The penalty each solution used, in units of ``X'X`` (0 for ``f = 1``, and for targets whose
        OLS solution is zero, where every alpha gives zero).

    Raises
    ------
    ValueError
        If ``X`` is not a finite 2-D array with at least one regressor, ``Y`` does not have
        ``n_samples`` finite rows, or a fraction is outside (0, 1].

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X, Y = rng.normal(size=(50, 5)), rng.normal(size=(50, 3))
    >>> b, alpha = fracridge(X, Y, [0.5, 1.0])
    >>> b.shape, alpha.shape
    ((2, 5, 3), (2, 3))
    >>> ratio = np.linalg.norm(b[0], axis=0) / np.linalg.norm(b[1], axis=0)
    >>> np.allclose(ratio, 0.5, atol=1e-3)
    True
    >>> np.allclose(b[1], np.linalg.lstsq(X, Y, rcond=None)[0])
    True
    """
    X, Y, wanted, one_target = _check_arguments(X, Y, fractions)
    n_regressors, n_targets = X.shape[1], Y.shape[1]
    u, s, vt = design_svd(X) if svd is None else svd
    k = s.shape[0]
    if u.shape != (X.shape[0], k) or vt.shape != (k, n_regressors) or s.ndim != 1:
        raise ValueError(
            f"fracridge: svd: expected design_svd(X) of this X {X.shape} (got u {u.shape}, s {s.shape}, "
            f"vt {vt.shape})"
        )
    coefficients = np.zeros((wanted.size, n_regressors, n_targets))
    alphas = np.zeros((wanted.size, n_targets))
    if s.size == 0 or n_targets == 0:
        return _shaped(coefficients, alphas, one_target)
    rotated = u.T @ Y  # (k, n_targets)
    ols = rotated / s[:, None]
    alphas[:] = _alphas_for_fractions(s, ols, wanted)
    # Exact ridge solutions at those alphas, rotated back: V diag(s / (s^2 + alpha)) U'y.
    shrink = s[None, :, None] / (s[None, :, None] ** 2 + alphas[:, None, :])  # (n_fractions, k, n_targets)
    coefficients = vt.T @ (shrink * rotated[None])  # (n_regressors, k) @ (n_fractions, k, n_targets)
    return _shaped(coefficients, alphas, one_target)


def norm_ratio_curve(s: np.ndarray, ols: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """``||b_alpha|| / ||b_ols||`` of each target at each alpha, in the rotated space.

    Parameters
    ----------
    s : ndarray of shape (k,)
        Non-zero singular values of the design.
    ols : ndarray of shape (k, n_targets)
        The OLS coefficients in the rotated space (``U'y / s``).
    alphas : ndarray of shape (n_alphas,)
        Penalties, >= 0.

    Returns
    -------
    ndarray of shape (n_alphas, n_targets)
        NaN for targets whose OLS solution is zero.
    """
    s2 = s**2
    shrink_sq = (s2[None, :] / (s2[None, :] + alphas[:, None])) ** 2  # (n_alphas, k)
    ols_sq = ols**2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sqrt(shrink_sq @ ols_sq / ols_sq.sum(axis=0))


def _alphas_for_fractions(s: np.ndarray, ols: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """The alpha of each wanted fraction and target, interpolated on a dense log grid."""
    s2_min, s2_max = float(s.min()) ** 2, float(s.max()) ** 2
    low = _LOW_ALPHA_PER_S2 * s2_min
    high = s2_max * _HIGH_ALPHA_MARGIN / float(wanted.min())
    n_grid = int(np.ceil(np.log10(high / low) / LOG10_ALPHA_STEP)) + 1
    grid = np.concatenate([[0.0], np.logspace(np.log10(low), np.log10(high), n_grid)])
    ratio = norm_ratio_curve(s, ols, grid)  # (n_grid + 1, n_targets), decreasing down the rows
    ratio[0] = 1.0  # alpha = 0 is the OLS solution itself; no rounding there
    zero = ~np.isfinite(ratio[1])
    ratio[:, zero] = 1.0
    log_grid = np.log(grid[1:])
    targets = np.arange(ols.shape[1])
    alphas = np.zeros((wanted.size, ols.shape[1]))
    for n, fraction in enumerate(wanted):
        if fraction == 1.0:
            continue
        # The wanted fraction lies between grid points hi - 1 (ratio >= f) and hi (ratio < f);
        # the grid ends below the smallest fraction, so hi is always inside it.
        hi = np.minimum((ratio >= fraction).sum(axis=0), grid.size - 1)
        lo = hi - 1
        r_lo, r_hi = ratio[lo, targets], ratio[hi, targets]
        step = np.where(r_lo > r_hi, r_lo - r_hi, 1.0)
        t = np.clip((r_lo - fraction) / step, 0.0, 1.0)
        # The first interval starts at alpha = 0, where the log is not defined: linear in alpha
        # there (the ratio is 1 - O(alpha) at small alpha, so linear is accurate).
        first = lo == 0
        log_alpha = (1.0 - t) * log_grid[np.maximum(lo - 1, 0)] + t * log_grid[hi - 1]
        alphas[n] = np.where(first, t * grid[1], np.exp(log_alpha))
    alphas[:, zero] = 0.0
    return alphas


def _check_design(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(
            f"fracridge: X: expected a design of shape (n_samples, n_regressors) with at least one "
            f"sample and one regressor (got shape {X.shape})"
        )
    if not np.all(np.isfinite(X)):
        raise ValueError(f"fracridge: X: expected finite values (got {int((~np.isfinite(X)).sum())} NaN or inf)")
    return X


def _check_arguments(
    X: np.ndarray, Y: np.ndarray, fractions: float | Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    X = _check_design(X)
    Y = np.asarray(Y, dtype=np.float64)
    one_target = Y.ndim == 1
    if one_target:
        Y = Y[:, None]
    if Y.ndim != 2 or Y.shape[0] != X.shape[0]:
        raise ValueError(
            f"fracridge: Y: expected shape ({X.shape[0]}, n_targets) or ({X.shape[0]},), one row per "
            f"row of X (got shape {np.shape(Y)})"
        )
    if not np.all(np.isfinite(Y)):
        raise ValueError(f"fracridge: Y: expected finite values (got {int((~np.isfinite(Y)).sum())} NaN or inf)")
    wanted = np.atleast_1d(np.asarray(fractions, dtype=np.float64))
    if wanted.ndim != 1 or wanted.size == 0:
        raise ValueError(f"fracridge: fractions: expected a number or a 1-D sequence of numbers (got {fractions!r})")
    bad = ~(np.isfinite(wanted) & (wanted > 0.0) & (wanted <= 1.0))
    if bad.any():
        raise ValueError(
            f"fracridge: fractions: expected values in (0, 1], 1 being the OLS solution "
            f"(got {wanted[bad].tolist()})"
        )
    return X, Y, wanted, one_target


def _shaped(coefficients: np.ndarray, alphas: np.ndarray, one_target: bool) -> tuple[np.ndarray, np.ndarray]:
    if one_target:
        return coefficients[..., 0], alphas[:, 0]
    return coefficients, alphas
