"""Detection metrics: average precision at IoU 0.1 (the paper's mAP@0.1) and mask-derived boxes (Table 7).

AP of one organ, VOC/COCO style: every predicted box of that organ over the whole test set is ranked
by score; going down the ranking, a box is a true positive when its best-overlapping ground-truth box
*on the same slice* has IoU >= the threshold and has not been claimed by a higher-scored box, else a
false positive. AP is the area under the precision-recall curve with all-point interpolation
(precision made monotonically non-increasing). mAP@0.1 averages the per-organ APs.

Boxes are xyxy in pixels (x = column), with exclusive maxima as in the dataset records.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Hashable, List, Sequence, Tuple

import numpy as np
import torch

from CTReasonerLib.model.detection.box_fusion import MASK_BOX_CONFIDENCES, mask_to_boxes  # noqa: F401 (re-exported)

PAPER_IOU_THRESHOLD = 0.1


@dataclass
class ScoredBox:
    """One predicted box on the slice ``image_id``."""
    image_id: Hashable
    xyxy: Sequence[float]
    score: float


def average_precision(predictions: Sequence[ScoredBox], ground_truth: Dict[Hashable, np.ndarray],
                      iou_threshold: float = PAPER_IOU_THRESHOLD) -> float:
    """All-point interpolated AP of ``predictions`` against ``ground_truth`` {image_id: (N, 4) xyxy}.

    Slices with no ground-truth box belong in ``ground_truth`` with an empty array (or may be left
    out): boxes predicted there are false positives. Returns NaN when there is no ground-truth box at
    all (AP is undefined; the organ is then left out of the mean).
    """
    from torchvision.ops import box_iou

    total_gt = sum(len(np.asarray(b).reshape(-1, 4)) for b in ground_truth.values())
    if total_gt == 0:
        return float("nan")
    gt = {key: torch.as_tensor(np.asarray(b, dtype=np.float64).reshape(-1, 4)) for key, b in ground_truth.items()}
    claimed = {key: np.zeros(len(b), dtype=bool) for key, b in gt.items()}
    order = sorted(range(len(predictions)), key=lambda i: -float(predictions[i].score))
    true_positive = np.zeros(len(order))
    for rank, index in enumerate(order):
        box = predictions[index]
        boxes = gt.get(box.image_id)
        if boxes is None or len(boxes) == 0:
            continue
        ious = box_iou(torch.as_tensor(np.asarray(box.xyxy, dtype=np.float64).reshape(1, 4)), boxes)[0].numpy()
        best = int(np.argmax(ious))
        if ious[best] >= iou_threshold and not claimed[box.image_id][best]:
            claimed[box.image_id][best] = True
            true_positive[rank] = 1.0
    if not len(order):
        return 0.0
    cumulative_tp = np.cumsum(true_positive)
    recall = cumulative_tp / total_gt
    precision = cumulative_tp / np.arange(1, len(order) + 1)
    return _interpolated_area(recall, precision)


def _interpolated_area(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope (VOC 2010+ all-point interpolation)."""
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.nonzero(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))
