"""The in-memory volume: voxels plus Slicer-style geometry.

Conventions (the same as Slicer's ``vtkMRMLScalarVolumeNode`` and ``slicer.util.arrayFromVolume``):

* ``array`` is indexed ``[k, j, i]`` (slice, row, column), shape (K, J, I).
* ``spacing`` is (si, sj, sk) in mm along I, J, K.
* ``origin`` is the RAS position (mm) of voxel (i, j, k) = (0, 0, 0).
* ``directions`` is a 3x3 matrix whose *columns* are the unit RAS directions of the I, J, K axes.
* ``ijk_to_ras = [[directions @ diag(spacing), origin], [0, 0, 0, 1]]``.

Files on disk are LPS (ITK, NIfTI via ITK, DICOM); readers convert to RAS by flipping the first two rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Optional

import numpy as np

# ITK/DICOM/NRRD physical space is LPS, Slicer's is RAS: the first two axes change sign (the matrix is its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class Volume:
    array: np.ndarray                      # (K, J, I)
    spacing: np.ndarray                    # (3,) mm, IJK order
    origin: np.ndarray                     # (3,) RAS mm
    directions: np.ndarray = field(default_factory=lambda: np.eye(3))   # (3, 3), columns = IJK axes in RAS
    name: str = "volume"
    metadata: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.spacing = np.asarray(self.spacing, dtype=np.float64).reshape(3)
        self.origin = np.asarray(self.origin, dtype=np.float64).reshape(3)
        self.directions = np.asarray(self.directions, dtype=np.float64).reshape(3, 3)

    @property
    def shape_ijk(self):
        k, j, i = self.array.shape
        return (i, j, k)

    @property
    def ijk_to_ras(self) -> np.ndarray:
        """(4, 4) homogeneous matrix mapping (i, j, k, 1) to (R, A, S, 1)."""
        m = np.eye(4)
        m[:3, :3] = self.directions @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    @property
    def ras_to_ijk(self) -> np.ndarray:
        return np.linalg.inv(self.ijk_to_ras)

    def with_array(self, array: np.ndarray, name: Optional[str] = None) -> "Volume":
        """A volume on the same grid holding other voxels (e.g. a label map)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match volume shape {self.array.shape}")
        return replace(self, array=array, name=name or self.name, metadata=dict(self.metadata))


def ijk_to_ras_points(ijk_to_ras: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Map (N, 3) IJK points to (N, 3) RAS points."""
    ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
    return ijk @ ijk_to_ras[:3, :3].T + ijk_to_ras[:3, 3]


def ras_to_ijk_points(ijk_to_ras: np.ndarray, ras: np.ndarray) -> np.ndarray:
    """Map (N, 3) RAS points to (N, 3) continuous IJK points."""
    inv = np.linalg.inv(ijk_to_ras)
    ras = np.atleast_2d(np.asarray(ras, dtype=np.float64))
    return ras @ inv[:3, :3].T + inv[:3, 3]
