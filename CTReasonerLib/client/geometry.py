"""Where a slice sits in 3D: what the client needs to place decoded masks and boxes in the scene (numpy only)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

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
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

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
