"""Tissue map -> CT: per-tissue HU, texture, scanner blur and noise."""
from __future__ import annotations

from typing import Tuple

import numpy as np
from scipy.ndimage import gaussian_filter

from .geometry import PhantomGrid, smooth_random_field
from .tissues import hu_lookup, texture_lookup

HU_MIN, HU_MAX = -1024, 3071


def render_ct(tissue: np.ndarray, grid: PhantomGrid, rng: np.random.Generator, phase: str, enhancement_gain: float,
              noise_std: float, psf_mm: float) -> np.ndarray:
    """(K, J, I) int16 HU from a (K, J, I) tissue-id map.

    Order matters: mean HU + texture, then the blur (the scanner's point spread plus the voxel's own extent,
    which gives partial volume at every boundary and correlates the fine texture), then white noise.
    """
    axes = grid.axis_coordinates()
    amplitude = texture_lookup(phase)[tissue]
    hu = hu_lookup(phase, enhancement_gain)[tissue]
    texture = smooth_random_field(rng, axes, (7.0, 7.0, 10.0))
    texture += rng.standard_normal(tissue.shape, dtype=np.float32)
    texture *= amplitude
    hu += texture
    hu += smooth_random_field(rng, axes, (150.0, 150.0, 200.0)) * np.float32(rng.uniform(2.0, 6.0))  # shading
    hu = gaussian_filter(hu, sigma=_blur_sigma_voxels(grid, psf_mm), truncate=3.0)
    noise = rng.standard_normal(tissue.shape, dtype=np.float32)
    noise *= np.float32(noise_std)
    hu += noise
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    return np.rint(hu).astype(np.int16)


def _blur_sigma_voxels(grid: PhantomGrid, psf_mm: float) -> Tuple[float, float, float]:
    """(k, j, i) Gaussian sigmas: the in-plane PSF plus a box of one voxel (variance 1/12), and the slice profile."""
    si, sj, sk = grid.spacing
    in_plane = [float(np.sqrt(1.0 / 12.0 + (psf_mm / s) ** 2)) for s in (sj, si)]
    return (float(np.sqrt(1.0 / 12.0 + 0.05)), in_plane[0], in_plane[1])
