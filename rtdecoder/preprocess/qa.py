"""Quality figures of a run as it is acquired: the running temporal SNR of the mask voxels.

The front end hands the GLM percent signal change of a fixed per-voxel baseline ``b``:
``p = 100 * (v / b - 1)``. A voxel's raw mean and standard deviation over time are then
``b * (1 + mean(p) / 100)`` and ``b * std(p) / 100``, so its tSNR, mean / std of the raw signal,
is ``(100 + mean(p)) / std(p)`` whatever ``b`` is: it is computed from the values the GLM already
has, without the raw volumes.
"""

from __future__ import annotations

import numpy as np

from rtdecoder.errors import VolumeError


class RunningTSNR:
    """Per-voxel running tSNR (Welford's mean and variance), summarised as the median over voxels.

    Parameters
    ----------
    n_voxels : int
        Length of each vector of percent-signal-change values.
    min_volumes : int, default=3
        No figure until this many volumes (two samples give a meaningless std).

    Examples
    --------
    >>> tsnr = RunningTSNR(2)
    >>> for p in ([1.0, -2.0], [-1.0, 2.0], [1.0, -2.0], [-1.0, 2.0]):
    ...     value = tsnr.update(np.array(p))
    >>> round(value, 1)
    65.0
    """

    def __init__(self, n_voxels: int, min_volumes: int = 3) -> None:
        if n_voxels < 1:
            raise VolumeError(f"n_voxels: expected a positive count (got {n_voxels})")
        self.n_voxels = int(n_voxels)
        self.min_volumes = max(2, int(min_volumes))
        self.n_volumes_ = 0
        self._mean = np.zeros(self.n_voxels)
        self._m2 = np.zeros(self.n_voxels)

    def update(self, psc: np.ndarray) -> float | None:
        """Add one volume's values (shape (n_voxels,), percent signal change); returns :meth:`value`."""
        psc = np.asarray(psc, dtype=np.float64)
        if psc.shape != (self.n_voxels,):
            raise VolumeError(f"psc: expected shape ({self.n_voxels},) (got {psc.shape})")
        self.n_volumes_ += 1
        delta = psc - self._mean
        self._mean += delta / self.n_volumes_
        self._m2 += delta * (psc - self._mean)
        return self.value()

    def value(self) -> float | None:
        """Median tSNR over voxels so far, or ``None`` before ``min_volumes`` volumes."""
        if self.n_volumes_ < self.min_volumes:
            return None
        std = np.sqrt(self._m2 / (self.n_volumes_ - 1))
        with np.errstate(divide="ignore", invalid="ignore"):
            tsnr = (100.0 + self._mean) / std
        finite = tsnr[np.isfinite(tsnr)]
        return float(np.median(finite)) if finite.size else None
