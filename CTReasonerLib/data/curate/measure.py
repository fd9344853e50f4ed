"""Geometry and intensity of one organ on one axial slice, in patient terms.

These measurements are the ground truth that descriptions are written from (``describe``) and checked
against (``review``). Sides come from RAS coordinates through the volume's ``ijk_to_ras``, never from
pixel columns: with the usual LPS acquisition, column 0 is the patient's right, but flipped or rotated
volumes exist and only the matrix knows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from ...organs import ORGAN_BY_KEY, ORGAN_BY_LABEL
from .config import CurationConfig
from .prompts import OrganPrompts

# Typical largest axial cross-section of each organ in an adult (cm²); size categories are relative to it,
# so "large" means large *for that organ*.
REFERENCE_AREA_CM2: Dict[str, float] = {
    "spleen": 50.0, "right_kidney": 28.0, "left_kidney": 28.0, "gallbladder": 10.0, "esophagus": 3.0,
    "liver": 200.0, "stomach": 90.0, "aorta": 5.0, "inferior_vena_cava": 5.0, "portal_splenic_veins": 4.0,
    "pancreas": 20.0, "right_adrenal_gland": 2.0, "left_adrenal_gland": 2.0, "duodenum": 12.0,
}
# Upper bounds of area / reference area for each size category (the last is open-ended).
SIZE_CATEGORIES: Tuple[Tuple[str, float], ...] = (("tiny", 0.10), ("small", 0.35), ("medium", 0.90), ("large", np.inf))
BODY_THRESHOLD_HU = -300.0
GAS_THRESHOLD_HU = -300.0
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass
class SliceContext:
    """Per-slice quantities shared by every organ on it."""
    image_hu: np.ndarray        # (H, W) float32
    labels: np.ndarray          # (H, W) int
    slice_index: int            # k in the volume
    ijk_to_ras: np.ndarray      # (4, 4)
    spacing_rc: Tuple[float, float]  # (row mm, column mm) = (spacing J, spacing I)
    gradient_hu_per_mm: np.ndarray   # (H, W) float32
    body_center_ras: np.ndarray      # (3,)
    body_extent_ras: np.ndarray      # (3,) span of the body along R, A, S in mm
    liver_mean_hu: Optional[float]


@dataclass
class OrganGeometry:
    organ: str
    area_px: int
    area_cm2: float
    transverse_mm: float            # extent along the patient's right-left axis
    anteroposterior_mm: float
    instance_count: int
    centroid_ras: List[float]
    right_offset_mm: float          # centroid minus body centre along R (positive = patient's right)
    anterior_offset_mm: float
    side: str                       # right | left | midline
    anteroposterior: str            # anterior | posterior | central
    midline_tolerance_mm: float
    aspect_ratio: float
    eccentricity: float
    solidity: float
    minor_axis_mm: float
    shape: str
    size_category: str
    reference_area_cm2: float
    mean_hu: float
    std_hu: float
    reference: str                  # liver | soft tissue
    reference_hu: float
    density: str                    # hypodense | isodense | hyperdense
    gas_fraction: float
    boundary_gradient: float        # mean HU/mm on the mask border
    boundary: str
    texture: str
    neighbour_distances_mm: Dict[str, float] = field(default_factory=dict)  # organs within 3x adjacency_mm

    def neighbours(self, within_mm: float) -> List[str]:
        return [k for k, d in sorted(self.neighbour_distances_mm.items(), key=lambda kv: kv[1]) if d <= within_mm]


def pixel_to_ras(ijk_to_ras: np.ndarray, cols: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """(N, 3) RAS of pixel centres (column i, row j) on slice k."""
    ijk = np.stack([cols, rows, np.full_like(cols, k)], axis=1).astype(np.float64)
    return ijk @ ijk_to_ras[:3, :3].T + ijk_to_ras[:3, 3]


def build_slice_context(image_hu: np.ndarray, labels: np.ndarray, slice_index: int, ijk_to_ras: np.ndarray,
                        spacing_ijk) -> SliceContext:
    image = image_hu.astype(np.float32)
    spacing_rc = (float(spacing_ijk[1]), float(spacing_ijk[0]))
    # Light smoothing keeps noise from reading as boundary contrast.
    smooth = ndimage.gaussian_filter(image, sigma=1.0)
    grad_rows, grad_cols = np.gradient(smooth, *spacing_rc)
    body = image > BODY_THRESHOLD_HU
    components, count = ndimage.label(body)
    if count:
        body = components == (np.argmax(np.bincount(components.ravel())[1:]) + 1)
    else:  # no tissue at all (e.g. a synthetic all-air image): measure against the whole field of view
        body = np.ones_like(body)
    rows, cols = np.nonzero(body)
    body_ras = pixel_to_ras(ijk_to_ras, cols, rows, slice_index)
    liver = labels == ORGAN_BY_KEY["liver"].label
    return SliceContext(
        image_hu=image, labels=labels, slice_index=int(slice_index), ijk_to_ras=np.asarray(ijk_to_ras, float),
        spacing_rc=spacing_rc, gradient_hu_per_mm=np.hypot(grad_rows, grad_cols).astype(np.float32),
        body_center_ras=body_ras.mean(axis=0), body_extent_ras=np.ptp(body_ras, axis=0),
        liver_mean_hu=float(image[liver].mean()) if liver.any() else None,
    )


def _shape_measures(component: np.ndarray, spacing_rc) -> Tuple[float, float, float, float, bool]:
    """aspect ratio, eccentricity, solidity, minor axis (mm) and whether the centroid is on the component."""
    rows, cols = np.nonzero(component)
    points = np.stack([cols * spacing_rc[1], rows * spacing_rc[0]], axis=1)
    pixel_area = spacing_rc[0] * spacing_rc[1]
    # A pixel's own second moment (d²/12 per axis) keeps one-pixel-wide strips from having zero width.
    cov = np.cov(points.T) if len(points) > 1 else np.zeros((2, 2))
    cov = cov + np.diag([spacing_rc[1] ** 2, spacing_rc[0] ** 2]) / 12.0
    minor, major = np.sort(np.linalg.eigvalsh(cov))
    aspect = float(np.sqrt(major / minor))
    eccentricity = float(np.sqrt(max(0.0, 1.0 - minor / major)))
    # The hull only needs each row's outermost pixels; their four corners bound every pixel of the row.
    first = np.argmax(component, axis=1)
    last = component.shape[1] - 1 - np.argmax(component[:, ::-1], axis=1)
    occupied = component.any(axis=1)
    e_rows = np.concatenate([np.flatnonzero(occupied)] * 2)
    e_cols = np.concatenate([first[occupied], last[occupied]])
    half_r, half_c = spacing_rc[0] / 2, spacing_rc[1] / 2
    corners = np.concatenate([np.stack([e_cols * spacing_rc[1] + dc, e_rows * spacing_rc[0] + dr], axis=1)
                              for dr in (-half_r, half_r) for dc in (-half_c, half_c)])
    try:
        hull_area = ConvexHull(corners).volume
    except QhullError:
        hull_area = len(rows) * pixel_area
    solidity = float(min(1.0, len(rows) * pixel_area / hull_area))
    cy, cx = rows.mean(), cols.mean()
    centroid_inside = bool(component[int(round(cy)), int(round(cx))])
    return aspect, eccentricity, solidity, float(4.0 * np.sqrt(minor)), centroid_inside


def classify_shape(aspect: float, solidity: float, minor_axis_mm: float, centroid_inside: bool) -> str:
    if solidity < 0.75 and not centroid_inside:
        return "crescent"
    if solidity < 0.80:
        return "irregular"
    if aspect >= 4.0 and minor_axis_mm < 15.0:
        return "tubular"
    if aspect >= 1.8:
        return "elongated"
    if aspect >= 1.25:
        return "oval"
    return "round"


def size_category(organ: str, area_cm2: float) -> str:
    fraction = area_cm2 / REFERENCE_AREA_CM2[organ]
    return next(name for name, upper in SIZE_CATEGORIES if fraction < upper)


def density_category(mean_hu: float, reference_hu: float, margin_hu: float) -> str:
    if mean_hu > reference_hu + margin_hu:
        return "hyperdense"
    if mean_hu < reference_hu - margin_hu:
        return "hypodense"
    return "isodense"


def _neighbour_distances(mask: np.ndarray, labels: np.ndarray, own_label: int, spacing_rc, reach_mm: float):
    """Smallest pixel-centre distance (mm) from the mask to every other organ within ``reach_mm``."""
    margin = int(np.ceil(reach_mm / min(spacing_rc))) + 1
    rows, cols = np.nonzero(mask)
    r0, r1 = max(0, rows.min() - margin), min(mask.shape[0], rows.max() + margin + 1)
    c0, c1 = max(0, cols.min() - margin), min(mask.shape[1], cols.max() + margin + 1)
    crop_labels = labels[r0:r1, c0:c1]
    distance = ndimage.distance_transform_edt(~mask[r0:r1, c0:c1], sampling=spacing_rc)
    result: Dict[str, float] = {}
    for value in np.unique(crop_labels):
        if value == 0 or value == own_label:
            continue
        nearest = float(distance[crop_labels == value].min())
        if nearest <= reach_mm:
            result[ORGAN_BY_LABEL[int(value)].key] = round(nearest, 2)
    return result


def _bounding_window(mask: np.ndarray, margin: int) -> Tuple[slice, slice]:
    rows, cols = np.nonzero(np.any(mask, axis=1))[0], np.nonzero(np.any(mask, axis=0))[0]
    return (slice(max(0, rows[0] - margin), min(mask.shape[0], rows[-1] + margin + 1)),
            slice(max(0, cols[0] - margin), min(mask.shape[1], cols[-1] + margin + 1)))


def measure_organ(context: SliceContext, organ_key: str, prompts: OrganPrompts, config: CurationConfig) -> OrganGeometry:
    organ = ORGAN_BY_KEY[organ_key]
    full_mask = context.labels == organ.label
    # Work on the organ's bounding window (one pixel of margin keeps erosion identical to the full slice).
    window = _bounding_window(full_mask, margin=1)
    mask, image = full_mask[window], context.image_hu[window]
    rows, cols = np.nonzero(mask)
    row_mm, col_mm = context.spacing_rc
    area_cm2 = len(rows) * row_mm * col_mm / 100.0

    ras = pixel_to_ras(context.ijk_to_ras, cols + window[1].start, rows + window[0].start, context.slice_index)
    centroid = ras.mean(axis=0)
    pixel_span = np.abs(context.ijk_to_ras[:3, :2]).sum(axis=1)  # RAS extent of one pixel
    transverse, anteroposterior = np.ptp(ras[:, :2], axis=0) + pixel_span[:2]
    offset = centroid - context.body_center_ras
    tol_r, tol_a = config.midline_fraction * context.body_extent_ras[:2]
    side = "right" if offset[0] > tol_r else "left" if offset[0] < -tol_r else "midline"
    ap = "anterior" if offset[1] > tol_a else "posterior" if offset[1] < -tol_a else "central"

    components, _ = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    largest = components == (np.argmax(np.bincount(components.ravel())[1:]) + 1)
    aspect, eccentricity, solidity, minor_axis, centroid_inside = _shape_measures(largest, context.spacing_rc)

    eroded = ndimage.binary_erosion(mask)
    interior = eroded if np.count_nonzero(eroded) >= 4 else mask
    values = image[interior]
    mean_hu, std_hu = float(values.mean()), float(values.std())
    if organ.key != "liver" and context.liver_mean_hu is not None:
        reference, reference_hu = "liver", context.liver_mean_hu
    else:
        reference, reference_hu = "soft tissue", config.soft_tissue_reference_hu
    border = mask & ~eroded
    gradient = float(context.gradient_hu_per_mm[window][border].mean())
    boundary = ("well defined" if gradient >= config.boundary_well_defined else
                "moderately defined" if gradient >= config.boundary_moderately_defined else "poorly defined")
    texture = ("homogeneous" if std_hu < config.texture_homogeneous_std else
               "heterogeneous" if std_hu >= config.texture_heterogeneous_std else "mildly heterogeneous")

    return OrganGeometry(
        organ=organ.key, area_px=int(len(rows)), area_cm2=round(area_cm2, 3),
        transverse_mm=round(float(transverse), 1), anteroposterior_mm=round(float(anteroposterior), 1),
        instance_count=len(prompts.boxes), centroid_ras=[round(float(v), 2) for v in centroid],
        right_offset_mm=round(float(offset[0]), 2), anterior_offset_mm=round(float(offset[1]), 2),
        side=side, anteroposterior=ap, midline_tolerance_mm=round(float(tol_r), 2),
        aspect_ratio=round(aspect, 3), eccentricity=round(eccentricity, 3), solidity=round(solidity, 3),
        minor_axis_mm=round(minor_axis, 2), shape=classify_shape(aspect, solidity, minor_axis, centroid_inside),
        size_category=size_category(organ.key, area_cm2), reference_area_cm2=REFERENCE_AREA_CM2[organ.key],
        mean_hu=round(mean_hu, 1), std_hu=round(std_hu, 1), reference=reference,
        reference_hu=round(float(reference_hu), 1),
        density=density_category(mean_hu, reference_hu, config.density_margin_hu),
        gas_fraction=round(float(np.mean(image[mask] < GAS_THRESHOLD_HU)), 3),
        boundary_gradient=round(gradient, 2), boundary=boundary, texture=texture,
        neighbour_distances_mm=_neighbour_distances(full_mask, context.labels, organ.label, context.spacing_rc,
                                                    3.0 * config.adjacency_mm),
    )
