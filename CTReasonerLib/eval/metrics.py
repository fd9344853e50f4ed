"""Per-slice segmentation metrics: Dice, HD95 in mm and NSD (normalised surface Dice), via monai.

All masks are 2D (H, W) bool arrays of one organ on one slice; ``spacing`` is (row mm, column mm),
as ``CuratedDataset`` samples give it. monai computes on (B=1, C=1, H, W) tensors.

Empty masks are decided here, not left to monai (which returns NaN or inf for them):

| prediction | target | Dice | HD95 | NSD | counted in organ means |
|---|---|---|---|---|---|
| empty | empty | 1 | 0 | 1 | no (``both_empty``; absent targets are scored by absent-target accuracy) |
| empty | non-empty | 0 | ``max_distance_mm`` | 0 | yes |
| non-empty | empty | 0 | ``max_distance_mm`` | 0 | yes |

``max_distance_mm`` is the slice's diagonal in mm: no boundary distance on the slice can exceed it,
so a missed organ scores as the worst possible HD95 rather than a NaN that would vanish from a mean.
"""
from __future__ import annotations

import warnings

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
import torch

DEFAULT_NSD_TOLERANCE_MM = 2.0  # about two pixels at BTCV's 0.6-1.0 mm in-plane spacing


@dataclass
class SegmentationScores:
    """Scores of one predicted mask against its target."""
    dice: float
    hd95_mm: float
    nsd: float
    prediction_empty: bool
    target_empty: bool

    @property
    def both_empty(self) -> bool:
        return self.prediction_empty and self.target_empty


def max_distance_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The slice diagonal in mm: the HD95 given to a missed (or hallucinated) organ."""
    return float(np.hypot(shape[0] * spacing[0], shape[1] * spacing[1]))


class SegmentationMetrics:
    """Dice, HD95 (mm) and NSD at ``nsd_tolerance_mm`` for single 2D masks."""

    def __init__(self, nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM):
        from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric

        self.nsd_tolerance_mm = float(nsd_tolerance_mm)
        self._dice = DiceMetric(include_background=True, reduction="none")
        self._hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
        self._nsd = SurfaceDiceMetric(class_thresholds=[self.nsd_tolerance_mm], include_background=True,
                                      reduction="none")

    def __call__(self, prediction: np.ndarray, target: np.ndarray, spacing: Tuple[float, float]) -> SegmentationScores:
        prediction = np.asarray(prediction, dtype=bool)
        target = np.asarray(target, dtype=bool)
        if prediction.shape != target.shape or prediction.ndim != 2:
            raise ValueError(f"prediction {prediction.shape} and target {target.shape} must be the same 2D shape")
        pred_empty, target_empty = not prediction.any(), not target.any()
        if pred_empty and target_empty:
            return SegmentationScores(1.0, 0.0, 1.0, True, True)
        if pred_empty or target_empty:
            return SegmentationScores(0.0, max_distance_mm(target.shape, spacing), 0.0, pred_empty, target_empty)
        y_pred = torch.from_numpy(prediction)[None, None].float()
        y = torch.from_numpy(target)[None, None].float()
        spacing = [float(s) for s in spacing]
        dice = float(self._dice(y_pred, y).item())
        with warnings.catch_warnings():
            # monai 1.6 warns about an argument its own surface-distance code still passes internally
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            hd95 = float(self._hd95(y_pred, y, spacing=spacing).item())
            nsd = float(self._nsd(y_pred, y, spacing=spacing).item())
        for metric in (self._dice, self._hd95, self._nsd):
            metric.reset()  # monai metrics also buffer every call for aggregate(); we keep our own records
        return SegmentationScores(dice, hd95, nsd, False, False)
