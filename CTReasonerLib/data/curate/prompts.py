"""Visual prompts of one organ on one slice: a box per connected component and a center point.

Pixel conventions (shared by records, the reader and the model): x = column, y = row; boxes are
``[x0, y0, x1, y1]`` with exclusive maxima (``mask[y0:y1, x0:x1]`` holds the component); the center is a
point ``[x, y]`` that always lies on the mask (``mask[round(y), round(x)]`` is True).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
from scipy import ndimage


@dataclass
class OrganPrompts:
    boxes: List[List[int]]          # one [x0, y0, x1, y1] per component, largest first
    component_areas: List[int]      # pixels of each boxed component, same order
    center: Tuple[float, float]     # (x, y) on the mask
    area_px: int                    # all pixels of the organ on the slice


def component_boxes(mask: np.ndarray, min_component_area_px: int) -> Tuple[List[List[int]], List[int]]:
    """Boxes of the 8-connected components of ``mask`` (H, W) bool, largest first.

    Components below ``min_component_area_px`` get no box, except that the largest one always does,
    so every non-empty mask has at least one box.
    """
    components, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return [], []
    areas = np.bincount(components.ravel(), minlength=count + 1)[1:]
    slices = ndimage.find_objects(components)
    order = np.argsort(-areas, kind="stable")
    boxes, kept_areas = [], []
    for rank, index in enumerate(order):
        if rank > 0 and areas[index] < min_component_area_px:
            continue
        rows, cols = slices[index]
        boxes.append([int(cols.start), int(rows.start), int(cols.stop), int(rows.stop)])
        kept_areas.append(int(areas[index]))
    return boxes, kept_areas


def center_point(mask: np.ndarray) -> Tuple[float, float]:
    """(x, y) centroid of ``mask``; for masks whose centroid falls outside them (crescents, split organs)
    the nearest mask pixel instead, so that a point prompt always hits the organ."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("center_point of an empty mask")
    y, x = float(rows.mean()), float(cols.mean())
    if mask[int(round(y)), int(round(x))]:
        return round(x, 2), round(y, 2)
    nearest = int(np.argmin((rows - y) ** 2 + (cols - x) ** 2))
    return float(cols[nearest]), float(rows[nearest])


def organ_prompts(mask: np.ndarray, min_component_area_px: int) -> OrganPrompts:
    """Prompts of a non-empty (H, W) bool mask, computed on its bounding crop for speed."""
    rows, cols = np.nonzero(np.any(mask, axis=1))[0], np.nonzero(np.any(mask, axis=0))[0]
    if rows.size == 0:
        raise ValueError("organ_prompts of an empty mask")
    r0, c0 = int(rows[0]), int(cols[0])
    crop = mask[r0: int(rows[-1]) + 1, c0: int(cols[-1]) + 1]
    boxes, areas = component_boxes(crop, min_component_area_px)
    x, y = center_point(crop)
    return OrganPrompts(boxes=[[b[0] + c0, b[1] + r0, b[2] + c0, b[3] + r0] for b in boxes], component_areas=areas,
                        center=(round(x + c0, 2), round(y + r0, 2)), area_px=int(np.count_nonzero(crop)))
