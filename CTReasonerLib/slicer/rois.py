"""Box ROIs: detected boxes and closer-look regions as ``vtkMRMLMarkupsROINode``s aligned to the volume.

An ROI is placed under the volume's parent transform, with its axes along the volume's I, J, K directions and
one slice thick, so it covers exactly the box's pixels on that slice in every view. Attributes on the node
record the organ, slice, score and kind so the Logic can find and save them.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from ..errors import CTReasonerError
from ..organs import Organ
from .geometry import pixel_box_to_oriented_box, vtk_matrix_to_numpy, volume_shape_kji, world_to_ijk

ATTR_VOLUME = "CTReasoner.volumeID"
ATTR_ORGAN = "CTReasoner.organ"
ATTR_SLICE = "CTReasoner.slice"
ATTR_SCORE = "CTReasoner.score"
ATTR_KIND = "CTReasoner.kind"
ATTR_BOX_SOURCE = "CTReasoner.boxSource"          # "detection" (the [DET] head) or "mask" (fused boxes)
KIND_BOX = "box"
KIND_CLOSER_LOOK = "closerLook"
CLOSER_LOOK_COLOR = (1.0, 0.85, 0.0)


def _place_roi(volume_node, name: str, k: int, xyxy: Sequence[float], color) -> object:
    import vtk
    import slicer.util
    box = pixel_box_to_oriented_box(volume_node, k, xyxy)
    roi = volume_node.GetScene().AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    roi.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    matrix = vtk.vtkMatrix4x4()
    slicer.util.updateVTKMatrixFromArray(matrix, box.object_to_node())
    roi.SetAndObserveObjectToNodeMatrix(matrix)
    roi.SetSize(*box.size)
    roi.CreateDefaultDisplayNodes()
    roi.GetDisplayNode().SetSelectedColor(*color)
    roi.GetDisplayNode().SetColor(*color)
    roi.SetAttribute(ATTR_VOLUME, volume_node.GetID())
    roi.SetAttribute(ATTR_SLICE, str(int(k)))
    return roi


def roi_nodes_for_volume(volume_node, kind: Optional[str] = None, organ: Optional[Organ] = None) -> List[object]:
    """ROIs CTReasoner made for this volume, optionally of one kind and organ, in creation order."""
    found = []
    for roi in volume_node.GetScene().GetNodesByClass("vtkMRMLMarkupsROINode"):
        if roi.GetAttribute(ATTR_VOLUME) != volume_node.GetID():
            continue
        if kind is not None and roi.GetAttribute(ATTR_KIND) != kind:
            continue
        if organ is not None and roi.GetAttribute(ATTR_ORGAN) != organ.key:
            continue
        found.append(roi)
    return found


def add_box_roi(volume_node, organ: Organ, k: int, xyxy: Sequence[float], score: float, source: str = "detection"):
    """An ROI named ``"<organ> box N (score)"`` (N counts this organ's boxes on the volume) over the box's pixels;
    ``source`` (``BoxPrediction.source``) is kept as an attribute."""
    number = len(roi_nodes_for_volume(volume_node, KIND_BOX, organ)) + 1
    roi = _place_roi(volume_node, f"{organ.name} box {number} ({score:.2f})", k, xyxy,
                     tuple(c / 255.0 for c in organ.color))
    roi.SetAttribute(ATTR_KIND, KIND_BOX)
    roi.SetAttribute(ATTR_ORGAN, organ.key)
    roi.SetAttribute(ATTR_SCORE, f"{float(score):.4f}")
    roi.SetAttribute(ATTR_BOX_SOURCE, source)
    return roi


def add_closer_look_roi(volume_node, organ: Optional[Organ], k: int, xyxy: Sequence[float]):
    """The region a closer look examined, so the user sees what the model zoomed into."""
    label = organ.name if organ is not None else "region"
    roi = _place_roi(volume_node, f"{label} closer look (slice {int(k)})", k, xyxy, CLOSER_LOOK_COLOR)
    roi.SetAttribute(ATTR_KIND, KIND_CLOSER_LOOK)
    if organ is not None:
        roi.SetAttribute(ATTR_ORGAN, organ.key)
    return roi


def roi_pixel_box(volume_node, roi_node, k: int) -> np.ndarray:
    """``xyxy`` pixel box (inclusive-exclusive, clamped) of slice ``k`` covered by a user-drawn ROI, in any orientation.

    The ROI's eight corners are mapped to the volume's IJK (through both nodes' transforms); the box is
    their I/J extent, rounded to the pixels whose centres lie inside.
    """
    size = np.asarray(roi_node.GetSize(), dtype=np.float64)
    object_to_world = vtk_matrix_to_numpy(roi_node.GetObjectToWorldMatrix())
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
    corners_object = signs * size / 2.0
    corners_world = corners_object @ object_to_world[:3, :3].T + object_to_world[:3, 3]
    ijk = world_to_ijk(volume_node, corners_world)
    _, j_dim, i_dim = volume_shape_kji(volume_node)
    x0 = int(np.clip(np.ceil(ijk[:, 0].min() - 1e-6), 0, i_dim))
    y0 = int(np.clip(np.ceil(ijk[:, 1].min() - 1e-6), 0, j_dim))
    x1 = int(np.clip(np.floor(ijk[:, 0].max() + 1e-6) + 1, 0, i_dim))
    y1 = int(np.clip(np.floor(ijk[:, 1].max() + 1e-6) + 1, 0, j_dim))
    if x1 <= x0 or y1 <= y0:
        raise CTReasonerError(f"ROI '{roi_node.GetName()}' does not cover any pixel of slice {k}",
                              "draw the ROI over the organ on the current slice")
    if not (ijk[:, 2].min() - 0.5 <= k <= ijk[:, 2].max() + 0.5):
        raise CTReasonerError(f"ROI '{roi_node.GetName()}' does not reach slice {k}",
                              "move the ROI to the current slice or make it thicker")
    return np.array([x0, y0, x1, y1], dtype=np.int64)
