"""Boxes from a mask, and the fusion of two box sources (``DetectionHeadConfig.box_source = "fused"``).

A mask's 8-connected components give one box each (the paper's Table 7 "Mask→Box"). On the small embedded
model these boxes beat the detection branch; ``fuse_boxes`` keeps them first and adds the detection
branch's boxes only where they find something the mask missed.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch
from torchvision.ops import nms

MASK_BOX_CONFIDENCES = ("area", "max_prob")

ScoredXYXY = Tuple[Sequence[float], float]


def mask_to_boxes(probability: np.ndarray, threshold: float = 0.5, confidence: str = "area",
                  ) -> List[Tuple[List[int], float]]:
    """Boxes of the 8-connected components of ``probability >= threshold`` with a confidence each (Table 7).

    confidence: ``"area"`` = the component's share of the thresholded mask's pixels (the largest
    component of a clean mask scores near 1, stray specks near 0); ``"max_prob"`` = the highest
    probability inside the component.
    probability: (H, W) float in [0, 1] (a binary mask works for "area").
    Returns [([x0, y0, x1, y1], confidence)], largest component first.
    """
    from scipy import ndimage

    if confidence not in MASK_BOX_CONFIDENCES:
        raise ValueError(f"confidence must be one of {MASK_BOX_CONFIDENCES}, got {confidence!r}")
    probability = np.asarray(probability, dtype=np.float32)
    components, count = ndimage.label(probability >= threshold, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return []
    labels = np.arange(1, count + 1)
    areas = np.bincount(components.ravel(), minlength=count + 1)[1:]
    if confidence == "area":
        scores = areas / areas.sum()
    else:
        scores = np.asarray(ndimage.maximum(probability, components, labels), dtype=np.float64)
    extents = ndimage.find_objects(components)
    boxes = []
    for index in np.argsort(-areas, kind="stable"):
        rows, cols = extents[index]
        boxes.append(([int(cols.start), int(rows.start), int(cols.stop), int(rows.stop)], float(scores[index])))
    return boxes


def fuse_boxes(primary: Sequence[ScoredXYXY], secondary: Sequence[ScoredXYXY], secondary_weight: float = 0.5,
               iou_threshold: float = 0.5) -> List[Tuple[int, int]]:
    """Non-maximum suppression over two scored box lists, the secondary's scores scaled by ``secondary_weight``.

    primary, secondary: [(xyxy (4,), score)]. Returns [(source, index)] best first, source 0 = primary,
    1 = secondary; a box overlapping a higher-scored kept box with IoU > ``iou_threshold`` is dropped.
    """
    entries = [(0, i, float(score)) for i, (_, score) in enumerate(primary)]
    entries += [(1, i, float(score) * secondary_weight) for i, (_, score) in enumerate(secondary)]
    if not entries:
        return []
    boxes = [primary[i][0] if source == 0 else secondary[i][0] for source, i, _ in entries]
    kept = nms(torch.as_tensor(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)),
               torch.as_tensor([score for _, _, score in entries], dtype=torch.float64), iou_threshold)
    return [(entries[k][0], entries[k][1]) for k in kept.tolist()]
