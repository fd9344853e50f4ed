"""The sampled voxel grid of one phantom, and smooth random fields on it.

The grid is the one a Slicer user gets from an LPS-acquired axial CT: columns run from the patient's right to
left, rows from anterior to posterior, slices from inferior to superior, so ``directions`` is diag(-1, -1, 1)
in RAS and the array is indexed [k, j, i].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

DIRECTIONS_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class PhantomGrid:
    shape_ijk: Tuple[int, int, int]
    spacing: Tuple[float, float, float]   # mm along I, J, K
    origin: Tuple[float, float, float]    # RAS of voxel (0, 0, 0)

    @property
    def shape_kji(self) -> Tuple[int, int, int]:
        return self.shape_ijk[2], self.shape_ijk[1], self.shape_ijk[0]

    def axis_coordinates(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """R of each column (I,), A of each row (J,), S of each slice (K,), float32 mm."""
        return tuple((self.origin[a] + DIRECTIONS_RAS[a, a] * self.spacing[a] * np.arange(self.shape_ijk[a]))
                     .astype(np.float32) for a in range(3))

    def index_box(self, low_ras, high_ras) -> Tuple[slice, slice, slice]:
        """Slices (k, j, i) of the voxels whose centres may lie in the RAS box [low, high]."""
        out = []
        for a in (2, 1, 0):
            step = DIRECTIONS_RAS[a, a] * self.spacing[a]
            ends = sorted(((low_ras[a] - self.origin[a]) / step, (high_ras[a] - self.origin[a]) / step))
            start = int(np.clip(np.floor(ends[0]), 0, self.shape_ijk[a]))
            stop = int(np.clip(np.ceil(ends[1]) + 1, 0, self.shape_ijk[a]))
            out.append(slice(start, stop))
        return tuple(out)


def _interpolation_matrix(coords: np.ndarray, correlation_mm: float) -> np.ndarray:
    """(n, m) Gaussian weights from m control points to n positions, rows of unit norm (unit output variance)."""
    step = 0.5 * correlation_mm
    control = np.arange(coords.min() - 2 * step, coords.max() + 2 * step + 1e-6, step)
    weights = np.exp(-0.5 * ((coords[:, None] - control[None, :]) / step) ** 2)
    return (weights / np.sqrt((weights ** 2).sum(axis=1, keepdims=True))).astype(np.float32)


def smooth_random_field(rng: np.random.Generator, axes: Tuple[np.ndarray, np.ndarray, np.ndarray],
                        correlation_mm: Tuple[float, float, float]) -> np.ndarray:
    """A (K, J, I) float32 field of unit variance, smooth over ``correlation_mm`` (along R, A, S).

    Random values on a coarse control lattice are spread by separable Gaussian weights: three small matrix
    products instead of an interpolation of every voxel.
    """
    wi, wj, wk = (_interpolation_matrix(c, s) for c, s in zip(axes, correlation_mm))
    control = rng.standard_normal((wk.shape[1], wj.shape[1], wi.shape[1]), dtype=np.float32)
    field = np.matmul(wj, control @ wi.T)                                      # (Kc, J, I)
    kc, j, i = field.shape
    return (wk @ field.reshape(kc, j * i)).reshape(wk.shape[0], j, i)
