"""The patient-level random choices: size, fat, diaphragm height, and where the scan starts and ends.

All anatomy is written in the *nominal* frame of a reference adult (mm; R, A, S axes; S = 0 near the renal
hilum, the spine on the midline). A patient is that frame scaled and shifted, plus the body-wall layers
whose thickness does not scale with the skeleton (fat is habitus, not size).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

from .config import PhantomConfig

# Nominal levels (S, mm) the scan range is planned on.
RIGHT_KIDNEY_LOWER_POLE = -80.0
DOME_NOMINAL = 150.0


@dataclass(frozen=True)
class Habitus:
    scale: Tuple[float, float, float]        # nominal -> RAS scale per axis
    offset: Tuple[float, float, float]       # nominal -> RAS offset (mm)
    cavity: Tuple[float, float, float]       # abdominal cavity half-axes (lateral, anterior, posterior), nominal mm
    wall: Tuple[float, float, float]         # muscle wall thickness (lateral, anterior, posterior), nominal mm
    fat: Tuple[float, float, float]          # subcutaneous fat thickness (lateral, anterior, posterior), nominal mm
    skin: float                              # skin thickness, nominal mm
    dome_right: float                        # top of the right hemidiaphragm, nominal S
    dome_left: float                         # top of the left hemidiaphragm, nominal S

    def to_ras(self, point) -> np.ndarray:
        return np.asarray(point, dtype=np.float64) * np.asarray(self.scale) + np.asarray(self.offset)

    @property
    def body_half_width_mm(self) -> float:
        return (self.cavity[0] + self.wall[0] + self.fat[0] + self.skin) * self.scale[0]

    @property
    def body_half_depth_mm(self) -> Tuple[float, float]:
        """(anterior, posterior) distance from the body centre to the skin, RAS mm."""
        return tuple((self.cavity[n] + self.wall[n] + self.fat[n] + self.skin) * self.scale[1] for n in (1, 2))


def sample_habitus(rng: np.random.Generator, config: PhantomConfig) -> Habitus:
    size = rng.uniform(*config.body_scale_range)
    scale = (size * rng.uniform(0.97, 1.03), size * rng.uniform(0.97, 1.03), rng.uniform(0.9, 1.1))
    cavity = (132.0 * rng.uniform(0.95, 1.05), 100.0 * rng.uniform(0.93, 1.07), 88.0 * rng.uniform(0.97, 1.03))
    wall = (rng.uniform(9, 14), rng.uniform(9, 14), rng.uniform(30, 38))
    fat_mm = rng.uniform(*config.fat_thickness_range)
    fat = tuple(fat_mm * rng.uniform(lo, hi) / scale[0] for lo, hi in ((0.8, 1.2), (0.85, 1.35), (0.4, 0.8)))
    dome_right = DOME_NOMINAL + rng.normal(0, 6)
    return Habitus(scale=scale, offset=(rng.normal(0, 6), rng.normal(0, 6), rng.normal(0, 10)),
                   cavity=cavity, wall=wall, fat=fat, skin=2.5 / scale[0],
                   dome_right=dome_right, dome_left=dome_right - rng.uniform(5, 18))
