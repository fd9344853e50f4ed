"""Volume-wise axial slice selection (paper §4): keep onset, peak and offset slices of every organ, drop
background-only slices and slices redundant with the last retained one, protect small/complex organs.

A slice is *redundant* with the last retained slice when the multi-label foreground agrees (label IoU
>= ``redundancy_iou``: pixels carrying the same organ label over pixels labelled in either slice) and the
foreground area barely changes (< ``redundancy_area_change``). Large organs dominate that whole-slice
measure, so each protected organ is also compared on its own; a protected organ that moved, grew or shrank
keeps the slice even when the rest of the slice is redundant.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np

from ...organs import get_organ
from .config import CurationConfig


@dataclass
class SliceSelection:
    retained: List[int]                 # ascending slice indices k
    anchors: Dict[int, List[str]]       # k -> why it is mandatory ("onset:liver", "peak:spleen", ...)
    dropped_background: int
    dropped_redundant: int


def label_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Multi-label IoU of two (H, W) label slices: same-label pixels over pixels labelled in either."""
    union = np.count_nonzero((a > 0) | (b > 0))
    if union == 0:
        return 1.0
    return np.count_nonzero((a == b) & (a > 0)) / union


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def relative_change(area_a: int, area_b: int) -> float:
    largest = max(area_a, area_b)
    return 0.0 if largest == 0 else abs(area_a - area_b) / largest


def organ_anchor_slices(labels: np.ndarray, organ_labels: Sequence[int], min_area_px: int) -> Dict[int, List[str]]:
    """Onset, peak (largest area) and offset slice of every organ present. labels: (K, H, W)."""
    areas = np.stack([np.count_nonzero(labels == value, axis=(1, 2)) for value in organ_labels])  # (n_organs, K)
    anchors: Dict[int, List[str]] = {}
    for value, organ_areas in zip(organ_labels, areas):
        present = np.flatnonzero(organ_areas >= min_area_px)
        if present.size == 0:
            continue
        key = get_organ(int(value)).key
        for tag, k in (("onset", present[0]), ("peak", int(np.argmax(organ_areas))), ("offset", present[-1])):
            anchors.setdefault(int(k), []).append(f"{tag}:{key}")
    return anchors


def _protected_organ_changed(current: np.ndarray, retained: np.ndarray, protected_labels: Sequence[int],
                             config: CurationConfig) -> bool:
    for value in protected_labels:
        now, before = current == value, retained == value
        area_now, area_before = np.count_nonzero(now), np.count_nonzero(before)
        if area_now == 0 and area_before == 0:
            continue
        if (mask_iou(now, before) < config.protected_iou
                or relative_change(area_now, area_before) >= config.protected_area_change):
            return True
    return False


def select_slices(labels: np.ndarray, config: CurationConfig) -> SliceSelection:
    """Choose the informative axial slices of one label volume.

    labels: (K, H, W) integer organ labels (organs.py values, 0 = background), K the axial axis.
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be (K, H, W), got shape {labels.shape}")
    organ_labels = [int(v) for v in np.unique(labels) if v != 0]
    protected_labels = [get_organ(key).label for key in config.protected_organs]
    protected_labels = [v for v in protected_labels if v in organ_labels]
    anchors = organ_anchor_slices(labels, organ_labels, config.min_organ_area_px)

    foreground_area = np.count_nonzero(labels, axis=(1, 2))
    retained: List[int] = []
    dropped_background = dropped_redundant = 0
    skipped_in_a_row = 0
    for k in range(labels.shape[0]):
        if foreground_area[k] < config.min_foreground_px and k not in anchors:
            dropped_background += 1
            continue
        keep = k in anchors or not retained or skipped_in_a_row >= config.max_gap_slices
        if not keep:
            last = labels[retained[-1]]
            redundant = (label_iou(labels[k], last) >= config.redundancy_iou
                         and relative_change(int(foreground_area[k]), int(foreground_area[retained[-1]]))
                         < config.redundancy_area_change)
            keep = not redundant or _protected_organ_changed(labels[k], last, protected_labels, config)
        if keep:
            retained.append(k)
            skipped_in_a_row = 0
        else:
            dropped_redundant += 1
            skipped_in_a_row += 1
    return SliceSelection(retained, anchors, dropped_background, dropped_redundant)
