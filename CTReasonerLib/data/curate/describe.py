"""The offline appearance writer: a structured JSON description rendered from measured geometry."""
from __future__ import annotations

from typing import Any, Dict

from ...organs import ORGAN_BY_KEY
from .config import CurationConfig
from .measure import OrganGeometry
from .schema import DESCRIPTION_SCHEMA_VERSION


def organ_laterality(organ_key: str) -> str:
    modifier = ORGAN_BY_KEY[organ_key].snomed_modifier
    return modifier[1].lower() if modifier else "none"


def describe_organ(geometry: OrganGeometry, config: CurationConfig) -> Dict[str, Any]:
    """A description that satisfies ``schema.DESCRIPTION_SCHEMA`` and agrees with ``geometry``."""
    return {
        "schema_version": DESCRIPTION_SCHEMA_VERSION,
        "organ": geometry.organ,
        "visible": True,
        "instance_count": geometry.instance_count,
        "laterality": organ_laterality(geometry.organ),
        "shape": {"category": geometry.shape, "aspect_ratio": geometry.aspect_ratio,
                  "solidity": geometry.solidity, "eccentricity": geometry.eccentricity},
        "size": {"category": geometry.size_category, "area_cm2": round(geometry.area_cm2, 2),
                 "transverse_mm": geometry.transverse_mm, "anteroposterior_mm": geometry.anteroposterior_mm},
        "position": {"side": geometry.side, "anteroposterior": geometry.anteroposterior,
                     "centroid_ras": geometry.centroid_ras},
        "intensity": {"mean_hu": geometry.mean_hu, "std_hu": geometry.std_hu, "density": geometry.density,
                      "reference": geometry.reference, "reference_hu": geometry.reference_hu,
                      "contains_gas": geometry.gas_fraction >= 0.05},
        "boundary": {"clarity": geometry.boundary, "gradient_hu_per_mm": geometry.boundary_gradient},
        "texture": {"category": geometry.texture},
        "adjacent_organs": geometry.neighbours(config.adjacency_mm),
        "source": "geometry",
    }
