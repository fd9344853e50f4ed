"""The tissue map being painted, and boxed views of it with their deformed coordinates."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from .geometry import PhantomGrid
from .shapes import tube_segment
from .tissues import TISSUE_IDS


@dataclass
class Region:
    """A box of the canvas: coordinate views X, Y, Z and the tissue view ``tissue`` (all (k, j, i))."""
    X: np.ndarray
    Y: np.ndarray
    Z: np.ndarray
    tissue: np.ndarray
    canvas: "TissueCanvas"
    box: Tuple[slice, slice, slice]

    def tube(self, points, radii, metric: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
        """Normalised squared distance (<= 1 inside) to a polyline tube with radii (N,) at its points (N, 3).

        Each segment is evaluated only inside its own bounding box, so long winding tubes stay cheap.
        """
        points = np.asarray(points, dtype=np.float64)
        radii = np.asarray(radii, dtype=np.float64)
        q = np.full(self.tissue.shape, np.inf, dtype=np.float32)
        pad = np.array([float(radii.max()) / np.sqrt(m) if m > 0 else np.inf for m in metric])
        for n in range(len(points) - 1):
            low = np.minimum(points[n], points[n + 1]) - pad
            high = np.maximum(points[n], points[n + 1]) + pad
            local = self.canvas.local_box(self.box, low, high)
            if local is None:
                continue
            seg = tube_segment(self.X[local], self.Y[local], self.Z[local], points[n], points[n + 1],
                               radii[n], radii[n + 1], metric)
            np.minimum(q[local], seg, out=q[local])
        return q

    def paint(self, mask: np.ndarray, tissue_name: str, allowed: Optional[np.ndarray] = None) -> None:
        """Set ``tissue_name`` where ``mask``; with ``allowed`` (a tissue-id -> bool table) only over those."""
        if allowed is not None:
            mask = mask & allowed[self.tissue]
        self.tissue[mask] = TISSUE_IDS[tissue_name]


class TissueCanvas:
    """Tissue ids on the phantom grid, painted in priority order (later paint wins).

    ``X, Y, Z`` (K, J, I) are the *nominal anatomical* coordinates of each voxel (mm of a reference patient,
    R/A/S axes): its RAS position plus the smooth deformation, mapped through the patient's scale and offset
    (``ras = nominal * scale + offset``). Every shape is bent by the same field, so the CT and the label map
    stay consistent.
    """

    def __init__(self, grid: PhantomGrid, X: np.ndarray, Y: np.ndarray, Z: np.ndarray, max_displacement: float,
                 scale: Sequence[float], offset: Sequence[float]):
        self.grid = grid
        self.X, self.Y, self.Z = X, Y, Z
        self.margin = float(max_displacement) + 1.0
        self.scale = np.asarray(scale, dtype=np.float64)
        self.offset = np.asarray(offset, dtype=np.float64)
        self.tissue = np.zeros(grid.shape_kji, dtype=np.uint8)

    def region(self, low: Sequence[float], high: Sequence[float]) -> Optional[Region]:
        """The voxels that can hold anatomy inside the nominal box [low, high] (None when it is off the grid)."""
        box = self._box(low, high)
        if any(s.stop <= s.start for s in box):
            return None
        return Region(self.X[box], self.Y[box], self.Z[box], self.tissue[box], self, box)

    def local_box(self, outer: Tuple[slice, slice, slice], low, high) -> Optional[Tuple[slice, slice, slice]]:
        """The part of the nominal box [low, high] inside the box ``outer``, in ``outer``'s own indices."""
        inner = self._box(low, high)
        local = tuple(slice(max(i.start, o.start) - o.start, min(i.stop, o.stop) - o.start)
                      for i, o in zip(inner, outer))
        return None if any(s.stop <= s.start for s in local) else local

    def _box(self, low, high) -> Tuple[slice, slice, slice]:
        m = self.margin
        low = np.clip(np.asarray(low, dtype=np.float64), -1e6, 1e6)
        high = np.clip(np.asarray(high, dtype=np.float64), -1e6, 1e6)
        corners = np.stack([low * self.scale + self.offset, high * self.scale + self.offset])
        return self.grid.index_box(corners.min(axis=0) - m, corners.max(axis=0) + m)

    def region_around(self, points: np.ndarray, radius: float) -> Optional[Region]:
        """The region bounding ``points`` (N, 3) padded by ``radius`` mm."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        return self.region(points.min(axis=0) - radius, points.max(axis=0) + radius)
