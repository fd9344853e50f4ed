"""Slice and box geometry between a volume node's voxel grid and the scene (world RAS).

Every function here takes the volume's parent transform into account, so a result computed in the
*slice pixel frame* (``mask[row=j, col=i]`` of slice ``k``; boxes ``xyxy`` with ``x=i``, ``y=j``) lands on the
same voxels whatever the volume's direction matrix and transform. Non-linear parent transforms are refused:
a slice of a warped volume is not a plane, so a 2D result cannot be placed without resampling.

Conventions: ``ijk_to_local`` maps (i, j, k, 1) to the volume node's own RAS (before its parent transform);
``ijk_to_world`` maps to world RAS (after it). Arrays are (K, J, I) like ``slicer.util.arrayFromVolume``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

from ..errors import CTReasonerError
from ..results import box_extent_ijk

# The Red view may tilt by at most this many voxels (in K) across the volume's in-plane extent.
MAX_SLICE_TILT_VOXELS = 0.5


class SliceGeometryError(CTReasonerError):
    """The current view or a volume's transform does not allow a slice-based request."""


def vtk_matrix_to_numpy(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def volume_ijk_to_local(volume_node) -> np.ndarray:
    """(4, 4) IJK -> the volume node's local RAS (its own origin, spacing and directions)."""
    import vtk
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return vtk_matrix_to_numpy(matrix)


def parent_to_world(node) -> np.ndarray:
    """(4, 4) the node's local RAS -> world RAS through its (linear) parent transforms; identity if none."""
    transform_node = node.GetParentTransformNode()
    if transform_node is None:
        return np.eye(4)
    if not transform_node.IsTransformToWorldLinear():
        raise SliceGeometryError(
            f"'{node.GetName()}' is under the non-linear transform '{transform_node.GetName()}'",
            "harden the transform on the volume (Transforms module > Harden) and try again")
    import vtk
    matrix = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(matrix)
    return vtk_matrix_to_numpy(matrix)


def volume_ijk_to_world(volume_node) -> np.ndarray:
    """(4, 4) IJK -> world RAS, including every parent transform."""
    return parent_to_world(volume_node) @ volume_ijk_to_local(volume_node)


def volume_shape_kji(volume_node) -> Tuple[int, int, int]:
    image = volume_node.GetImageData()
    if image is None:
        raise CTReasonerError(f"volume '{volume_node.GetName()}' has no voxels", "load the image again")
    i, j, k = image.GetDimensions()
    return (k, j, i)


def _transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    points = np.atleast_2d(np.asarray(points, dtype=np.float64))
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def world_to_ijk(volume_node, ras_world: Sequence[float]) -> np.ndarray:
    """Continuous IJK of world RAS point(s): (3,) -> (3,), (N, 3) -> (N, 3)."""
    ras = np.asarray(ras_world, dtype=np.float64)
    ijk = _transform_points(np.linalg.inv(volume_ijk_to_world(volume_node)), ras)
    return ijk if ras.ndim == 2 else ijk[0]


def ijk_to_world(volume_node, ijk: Sequence[float]) -> np.ndarray:
    """World RAS of (continuous) IJK point(s): (3,) -> (3,), (N, 3) -> (N, 3)."""
    ijk = np.asarray(ijk, dtype=np.float64)
    ras = _transform_points(volume_ijk_to_world(volume_node), ijk)
    return ras if ijk.ndim == 2 else ras[0]


def check_slice_index(volume_node, k: int) -> int:
    num_slices = volume_shape_kji(volume_node)[0]
    if not 0 <= int(k) < num_slices:
        raise SliceGeometryError(f"slice {k} is outside volume '{volume_node.GetName()}' (slices 0..{num_slices - 1})",
                                 "pick a slice inside the volume")
    return int(k)


def slice_index_from_slice_node(volume_node, slice_node) -> int:
    """The volume's K index shown in a slice view (e.g. Red), or a :class:`SliceGeometryError`.

    The view plane is mapped into the volume's IJK (through parent transforms). It must be a plane of
    constant K: tilting it by more than ``MAX_SLICE_TILT_VOXELS`` across the volume is refused, because a
    2D answer on a tilted view would not belong to one slice of the volume.
    """
    slice_to_ras = vtk_matrix_to_numpy(slice_node.GetSliceToRAS())
    world_to_ijk_matrix = np.linalg.inv(volume_ijk_to_world(volume_node))
    k_dim, j_dim, i_dim = volume_shape_kji(volume_node)
    spacing = np.linalg.norm(volume_ijk_to_world(volume_node)[:3, :3], axis=0)
    extent_mm = max(i_dim * spacing[0], j_dim * spacing[1])
    for axis in (0, 1):                               # the two in-plane directions of the view
        direction = slice_to_ras[:3, axis] / np.linalg.norm(slice_to_ras[:3, axis])
        k_per_mm = abs((world_to_ijk_matrix[:3, :3] @ direction)[2])
        if k_per_mm * extent_mm > MAX_SLICE_TILT_VOXELS:
            view = slice_node.GetName() or "slice"
            raise SliceGeometryError(
                f"the {view} view is not aligned with the axial (K) axis of '{volume_node.GetName()}' "
                f"(it crosses {k_per_mm * extent_mm:.1f} slices across the image)",
                "reset the view to the volume's axial plane (slice view menu > Reset field of view / "
                "'Rotate to volume plane') or pass sliceIndex explicitly")
    k_continuous = _transform_points(world_to_ijk_matrix, slice_to_ras[:3, 3])[0, 2]
    k = int(np.floor(k_continuous + 0.5))
    if not 0 <= k < k_dim:
        raise SliceGeometryError(
            f"the {slice_node.GetName() or 'slice'} view is outside '{volume_node.GetName()}' "
            f"(slice {k_continuous:.1f} of 0..{k_dim - 1})", "scroll the view into the volume")
    return k


@dataclass
class OrientedBox:
    """A box aligned to the volume's IJK axes, in the volume node's *local* RAS.

    center: (3,) local RAS mm; size: (3,) mm along I, J, K; axes: (3, 3) columns = unit local-RAS directions of I, J, K.
    Place an ROI with these under the volume's parent transform and it covers the same voxels as the volume.
    """
    center: np.ndarray
    size: np.ndarray
    axes: np.ndarray

    def object_to_node(self) -> np.ndarray:
        matrix = np.eye(4)
        matrix[:3, :3] = self.axes
        matrix[:3, 3] = self.center
        return matrix


def pixel_box_to_oriented_box(volume_node, k: int, xyxy: Sequence[float], num_slices: int = 1) -> OrientedBox:
    """The box covering pixels ``xyxy`` (x=i, y=j, inclusive-exclusive) of slice ``k``, ``num_slices`` thick.

    Pixel ``(i, j)`` spans ``[i - 0.5, i + 0.5]`` in continuous IJK, so the box's IJK extent is
    ``[x0 - 0.5, x1 - 0.5]`` x ``[y0 - 0.5, y1 - 0.5]`` x ``[k - 0.5, k + num_slices - 0.5]``.
    """
    try:
        center_ijk, size_ijk = box_extent_ijk(xyxy, k, num_slices)
    except ValueError:
        raise CTReasonerError(f"empty box {list(np.asarray(xyxy).tolist())}", "boxes need x1 > x0 and y1 > y0")
    ijk_to_local = volume_ijk_to_local(volume_node)
    spacing = np.linalg.norm(ijk_to_local[:3, :3], axis=0)
    size = size_ijk * spacing
    axes = ijk_to_local[:3, :3] / spacing
    return OrientedBox(center=_transform_points(ijk_to_local, center_ijk)[0], size=size, axes=axes)


def mask_box_xyxy(mask_2d: np.ndarray, margin: int = 0) -> np.ndarray:
    """Tight ``xyxy`` box (inclusive-exclusive, x=column) of a (H, W) mask, grown by ``margin`` and clamped."""
    rows, cols = np.nonzero(mask_2d)
    if rows.size == 0:
        raise CTReasonerError("the mask is empty, so it has no box", "segment the organ first")
    h, w = mask_2d.shape
    return np.array([max(cols.min() - margin, 0), max(rows.min() - margin, 0),
                     min(cols.max() + 1 + margin, w), min(rows.max() + 1 + margin, h)], dtype=np.int64)


def world_points_to_pixels(volume_node, k: int, ras_points: np.ndarray) -> np.ndarray:
    """(N, 3) world RAS -> (N, 2) pixel ``(x=i, y=j)`` on slice ``k``; refuses points off that slice."""
    ras_points = np.atleast_2d(np.asarray(ras_points, dtype=np.float64))
    if ras_points.shape[0] == 0:
        return np.zeros((0, 2), dtype=np.float64)
    ijk = world_to_ijk(volume_node, ras_points)
    off = np.abs(ijk[:, 2] - k) > 0.5 + 1e-6
    if off.any():
        raise SliceGeometryError(
            f"{int(off.sum())} point(s) are not on slice {k} (they lie on slices "
            f"{sorted(set(np.round(ijk[off, 2]).astype(int).tolist()))})",
            "place the points on the slice you are refining, or remove the others")
    return ijk[:, :2]
