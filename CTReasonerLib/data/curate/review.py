"""Consistency review of appearance descriptions against the measured geometry (paper §4, second stage).

States: ``rejected`` (not a valid description: schema failure), ``flagged`` (valid but contradicting
the mask or image, or written by a fallback path), ``accepted``. Human reviewers work from
``ctreasoner review``'s report; the states travel with the records.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from ...organs import ORGAN_BY_KEY
from ..dataset import REVIEW_STATES
from .config import CurationConfig
from .describe import organ_laterality
from .measure import SIZE_CATEGORIES, OrganGeometry, size_category
from .schema import description_errors

ACCEPTED, FLAGGED, REJECTED = REVIEW_STATES
_SIZE_ORDER = [name for name, _ in SIZE_CATEGORIES]


def _side_reasons(desc: Dict[str, Any], geometry: OrganGeometry) -> List[str]:
    reasons = []
    said, offset, tol = desc["position"]["side"], geometry.right_offset_mm, geometry.midline_tolerance_mm
    where = (f"{abs(offset):.0f} mm to the patient's {'right' if offset > 0 else 'left'} of the body midline")
    if said == "midline" and abs(offset) > 2 * tol:
        reasons.append(f"position says midline but the centroid is {where}")
    elif said in ("right", "left"):
        signed = offset if said == "right" else -offset
        if signed < 0 and abs(offset) > 0.5 * tol:
            reasons.append(f"position says {said} but the centroid is {where}")
    said_ap, ap_offset = desc["position"]["anteroposterior"], geometry.anterior_offset_mm
    if said_ap in ("anterior", "posterior"):
        signed = ap_offset if said_ap == "anterior" else -ap_offset
        if signed < 0 and geometry.anteroposterior != "central":
            reasons.append(f"position says {said_ap} but the centroid is {geometry.anteroposterior}")
    return reasons


def _size_reasons(desc: Dict[str, Any], geometry: OrganGeometry) -> List[str]:
    reasons = []
    size = desc["size"]
    # Categories within 25% of the measured area are tolerated: category edges are arbitrary.
    plausible = {size_category(geometry.organ, geometry.area_cm2 * f) for f in (0.8, 1.0, 1.25)}
    if size["category"] not in plausible:
        reasons.append(f"size says {size['category']} but the area is {geometry.area_cm2:.2f} cm² "
                       f"({geometry.size_category} for a {ORGAN_BY_KEY[geometry.organ].name})")
    stated = float(size["area_cm2"])
    if abs(stated - geometry.area_cm2) > 0.25 * geometry.area_cm2 + 0.2:
        reasons.append(f"area says {stated:.2f} cm² but the mask measures {geometry.area_cm2:.2f} cm²")
    return reasons


def _intensity_reasons(desc: Dict[str, Any], geometry: OrganGeometry, config: CurationConfig) -> List[str]:
    reasons = []
    intensity = desc["intensity"]
    stated_mean = float(intensity["mean_hu"])
    if abs(stated_mean - geometry.mean_hu) > max(25.0, 2.0 * geometry.std_hu):
        reasons.append(f"mean HU says {stated_mean:.0f} but the mask measures {geometry.mean_hu:.0f}")
    difference = geometry.mean_hu - geometry.reference_hu
    density = intensity["density"]
    contradicts = ((density == "hyperdense" and difference < 0) or (density == "hypodense" and difference > 0)
                   or (density == "isodense" and abs(difference) > 2 * config.density_margin_hu))
    if contradicts:
        reasons.append(f"density says {density} but the mean {geometry.mean_hu:.0f} HU is {difference:+.0f} HU "
                       f"from the {geometry.reference} reference ({geometry.reference_hu:.0f} HU)")
    return reasons


def _adjacency_reasons(desc: Dict[str, Any], geometry: OrganGeometry, config: CurationConfig) -> List[str]:
    reasons = []
    tolerance = 2.0 * config.adjacency_mm
    for key in desc["adjacent_organs"]:
        if key == geometry.organ:
            reasons.append(f"adjacency lists the organ itself ({key})")
            continue
        distance = geometry.neighbour_distances_mm.get(key)
        if distance is None or distance > tolerance:
            reasons.append(f"adjacency lists {ORGAN_BY_KEY[key].name}, which is not within {tolerance:.0f} mm "
                           f"of the {ORGAN_BY_KEY[geometry.organ].name} on this slice")
    return reasons


def _shape_reasons(desc: Dict[str, Any], geometry: OrganGeometry) -> List[str]:
    said = desc["shape"]["category"]
    if said == "round" and geometry.aspect_ratio > 2.0:
        return [f"shape says round but the aspect ratio is {geometry.aspect_ratio:.1f}"]
    if said in ("elongated", "tubular") and geometry.aspect_ratio < 1.3:
        return [f"shape says {said} but the aspect ratio is only {geometry.aspect_ratio:.2f}"]
    return []


def _laterality_reasons(geometry: OrganGeometry) -> List[str]:
    """A paired organ seen on the opposite side means a flipped label map or a wrong ijk_to_ras."""
    expected = organ_laterality(geometry.organ)
    if expected != "none" and geometry.side not in (expected, "midline"):
        return [f"the {ORGAN_BY_KEY[geometry.organ].name} lies on the patient's {geometry.side}: "
                f"labels or orientation may be flipped"]
    return []


def review_description(description: Any, geometry: OrganGeometry,
                       config: Optional[CurationConfig] = None) -> Tuple[str, List[str]]:
    """(state, reasons) for one description of the organ measured in ``geometry``."""
    config = config or CurationConfig()
    errors = description_errors(description)
    if errors:
        return REJECTED, [f"schema: {e}" for e in errors]
    reasons: List[str] = []
    if description["organ"] != geometry.organ:
        reasons.append(f"describes {description['organ']} but the mask is {geometry.organ}")
    if description["laterality"] != organ_laterality(geometry.organ):
        reasons.append(f"laterality says {description['laterality']} for the {ORGAN_BY_KEY[geometry.organ].name}")
    if description["instance_count"] != geometry.instance_count:
        reasons.append(f"instance count says {description['instance_count']} but the mask has "
                       f"{geometry.instance_count} component(s)")
    reasons += _side_reasons(description, geometry)
    reasons += _size_reasons(description, geometry)
    reasons += _intensity_reasons(description, geometry, config)
    reasons += _adjacency_reasons(description, geometry, config)
    reasons += _shape_reasons(description, geometry)
    reasons += _laterality_reasons(geometry)
    return (FLAGGED if reasons else ACCEPTED), reasons
