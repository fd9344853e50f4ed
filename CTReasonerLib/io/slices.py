"""Axial slices with their geometry, so that 2D results go back into the 3D volume exactly.

A slice is ``volume.array[k]``: pixels (rows, cols) = (J, I), HU. Pixel coordinates follow image/torchvision
convention: ``x`` = column = I index, ``y`` = row = J index; a pixel's centre sits at integer (x, y), as voxel
centres sit at integer IJK in Slicer. ``pixel_spacing`` is (between rows, between columns) = (sj, si) mm,
the DICOM PixelSpacing order.

Axial slicing assumes K is the voxel axis closest to superior (S), as in almost every CT. ``axial_axis`` finds
that axis; when it is I or J (e.g. a volume resliced sagittally) ``extract_axial_slice`` refuses with a clear
error and ``reorient_axial`` permutes the voxel axes (no resampling, exact geometry) so that K is axial.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence, Tuple

import numpy as np

from ..errors import ConfigError
from ..client.geometry import NEIGHBOUR_DISTANCE_MM, neighbour_offset, neighbour_slices  # noqa: F401 (re-exported)
from .volume import Volume, ijk_to_ras_points, ras_to_ijk_points

AXIS_NAMES = "IJK"


@dataclass
class AxialSlice:
    pixels: np.ndarray         # (J, I) HU (the volume's dtype)
    k: int                     # slice index in the volume
    ijk_to_ras: np.ndarray     # (4, 4) the volume's IJK -> RAS matrix
    pixel_spacing: np.ndarray  # (2,) mm: (between rows = sj, between columns = si)
    slice_spacing: float       # sk, mm between slices

    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(self.pixels.shape)

    def pixel_to_ras(self, xy: np.ndarray) -> np.ndarray:
        """(N, 2) pixel coordinates (x = column = I, y = row = J) on this slice -> (N, 3) RAS mm."""
        xy = np.atleast_2d(np.asarray(xy, dtype=np.float64))
        ijk = np.column_stack([xy[:, 0], xy[:, 1], np.full(len(xy), float(self.k))])
        return ijk_to_ras_points(self.ijk_to_ras, ijk)

    def ras_to_pixel(self, ras: np.ndarray) -> np.ndarray:
        """(N, 3) RAS mm -> (N, 3) continuous (x, y, k): x = I, y = J, and the (fractional) slice index."""
        return ras_to_ijk_points(self.ijk_to_ras, ras)


def axial_axis(volume: Volume) -> int:
    """The IJK axis (0 = I, 1 = J, 2 = K) whose direction is closest to superior-inferior."""
    return int(np.argmax(np.abs(volume.directions[2, :])))


def _require_axial_k(volume: Volume) -> None:
    axis = axial_axis(volume)
    if axis != 2:
        raise ConfigError(
            f"volume '{volume.name}' is not stored as axial slices: its {AXIS_NAMES[axis]} axis, not K, "
            "runs head-to-foot",
            "reorient it first with CTReasonerLib.io.slices.reorient_axial(volume)")


def reorient_axial(volume: Volume) -> Volume:
    """The same voxels with the IJK axes permuted so that K is the axis closest to S (no resampling).

    Spacing and direction columns are permuted with the array axes, so every voxel keeps its RAS position.
    A volume already axial in K is returned unchanged.
    """
    axis = axial_axis(volume)
    if axis == 2:
        return volume
    # Move the S-most axis to K; keep the other two in their order as I, J.
    order_ijk = [a for a in range(3) if a != axis] + [axis]   # new IJK axis n comes from old axis order_ijk[n]
    array_axes = [2 - a for a in reversed(order_ijk)]          # array is (K, J, I): array axis of IJK axis a is 2 - a
    return replace(volume,
                   array=np.ascontiguousarray(np.transpose(volume.array, array_axes)),
                   spacing=volume.spacing[order_ijk],
                   directions=volume.directions[:, order_ijk],
                   metadata=dict(volume.metadata))


def extract_axial_slice(volume: Volume, k: int) -> AxialSlice:
    """Slice ``k`` of a volume whose K axis is axial (see ``axial_axis``); pixels are a view, not a copy."""
    _require_axial_k(volume)
    num_slices = volume.array.shape[0]
    if not 0 <= int(k) < num_slices:
        raise ConfigError(f"slice index {k} is outside volume '{volume.name}' (0..{num_slices - 1})",
                          "choose a slice index inside the volume")
    k = int(k)
    return AxialSlice(
        pixels=volume.array[k],
        k=k,
        ijk_to_ras=volume.ijk_to_ras,
        pixel_spacing=np.array([volume.spacing[1], volume.spacing[0]]),
        slice_spacing=float(volume.spacing[2]),
    )


def place_slice_mask(mask2d: np.ndarray, k: int, volume_shape: Sequence[int]) -> np.ndarray:
    """Put a (J, I) mask of slice ``k`` into an all-False (K, J, I) bool volume."""
    mask2d = np.asarray(mask2d)
    volume_shape = tuple(int(n) for n in volume_shape)
    if len(volume_shape) != 3 or mask2d.shape != volume_shape[1:]:
        raise ValueError(f"mask shape {mask2d.shape} does not match slices of a volume of shape {volume_shape}")
    if not 0 <= int(k) < volume_shape[0]:
        raise ValueError(f"slice index {k} is outside 0..{volume_shape[0] - 1}")
    volume_mask = np.zeros(volume_shape, dtype=bool)
    volume_mask[int(k)] = mask2d.astype(bool)
    return volume_mask

