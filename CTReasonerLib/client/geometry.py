"""Where a slice sits in 3D: what the client needs to place decoded masks and boxes in the scene (numpy only)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..errors import ConfigError
from .encoding import PayloadError


@dataclass
class SliceGeometry:
    """Geometry of one axial slice ``k`` of a volume.

    ijk_to_ras: (4, 4) the volume's IJK->RAS matrix (Slicer convention, see CTReasonerLib.io.volume).
    k: slice index along IJK k.
    shape: (H, W) = (rows j, columns i) of the slice.
    Pixel (x, y) of a mask/box is IJK (i=x, j=y, k).
    """
    ijk_to_ras: np.ndarray
    k: int
    shape: Tuple[int, int]

    def __post_init__(self):
        self.ijk_to_ras = np.asarray(self.ijk_to_ras, dtype=np.float64).reshape(4, 4)
        self.k = int(self.k)
        self.shape = (int(self.shape[0]), int(self.shape[1]))

    @property
    def spacing(self) -> np.ndarray:
        """(3,) mm along I, J, K (column norms of the matrix)."""
        return ijk_spacing(self.ijk_to_ras)

    def pixel_to_ras(self, xy: np.ndarray) -> np.ndarray:
        """(N, 2) pixel (x, y) -> (N, 3) RAS mm on this slice."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        ijk1 = np.column_stack([xy, np.full(len(xy), self.k, dtype=np.float64), np.ones(len(xy))])
        return (ijk1 @ self.ijk_to_ras.T)[:, :3]

    def to_wire(self) -> Dict[str, Any]:
        return {"ijk_to_ras": self.ijk_to_ras.tolist(), "k": self.k, "spacing": self.spacing.tolist()}

    @classmethod
    def from_wire(cls, payload: Optional[Dict[str, Any]], shape: Tuple[int, int]) -> "SliceGeometry":
        """Validated geometry from a request; a missing geometry means identity at k=0."""
        if payload is None:
            return cls(np.eye(4), 0, shape)
        if not isinstance(payload, dict):
            raise PayloadError(f"geometry must be an object, got {type(payload).__name__}")
        matrix = np.asarray(payload.get("ijk_to_ras", np.eye(4).tolist()), dtype=np.float64)
        if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
            raise PayloadError(f"geometry.ijk_to_ras must be a finite 4x4 matrix, got shape {list(matrix.shape)}")
        if abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
            raise PayloadError("geometry.ijk_to_ras is singular (zero spacing or degenerate directions)")
        k = payload.get("k", 0)
        if not isinstance(k, int) or isinstance(k, bool):
            raise PayloadError(f"geometry.k must be an integer slice index, got {k!r}")
        return cls(matrix, k, shape)


def ijk_spacing(ijk_to_ras: np.ndarray) -> np.ndarray:
    """(3,) mm along I, J, K of a volume with this (4, 4) IJK -> RAS matrix: the norms of its columns."""
    return np.linalg.norm(np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3], axis=0)


# The slices either side that the pixel network reads live here rather than in CTReasonerLib.io.slices (which
# re-exports them) because the Slicer side ships this package without CTReasonerLib.io.

#: how far either side of a slice its neighbours are taken, in mm (the phantoms' slices are 2.5-4 mm apart)
NEIGHBOUR_DISTANCE_MM = 3.0


def neighbour_offset(slice_spacing_mm: float, distance_mm: float = NEIGHBOUR_DISTANCE_MM) -> int:
    """Slices between a slice and each neighbour: the nearest whole number to ``distance_mm`` / spacing, at
    least 1 (a 0.6 mm series looks 5 slices away, a 3 mm one 1, so the neighbours sit about as far off)."""
    spacing = abs(float(slice_spacing_mm))
    if not spacing > 0 or not np.isfinite(spacing):
        raise ConfigError(f"the slice spacing must be a positive number of mm, got {slice_spacing_mm}",
                          "fix the volume's spacing")
    return max(1, int(round(float(distance_mm) / spacing)))


def neighbour_slices(array_kji: np.ndarray, k: int, offset: int) -> np.ndarray:
    """(K, J, I) voxels, slice ``k`` -> (2, J, I): slices ``k - offset`` and ``k + offset``, each clamped to
    the volume (at its first and last slice a neighbour is the slice itself, which the network reads as
    "nothing known on that side": it is trained with such copies)."""
    last = array_kji.shape[0] - 1
    if not 0 <= int(k) <= last:
        raise ValueError(f"slice index {k} is outside 0..{last}")
    return np.stack([array_kji[max(int(k) - offset, 0)], array_kji[min(int(k) + offset, last)]])
