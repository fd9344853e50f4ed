"""Every threshold of the curation pipeline in one dataclass, stored in ``dataset.json`` for provenance."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Tuple

from ...errors import ConfigError
from ...io.slices import NEIGHBOUR_DISTANCE_MM

# Small or thin structures whose appearance changes quickly between slices; the paper protects them
# from the redundancy filter and the closer look matters most for them.
SMALL_ORGANS: Tuple[str, ...] = (
    "right_adrenal_gland", "left_adrenal_gland", "portal_splenic_veins", "esophagus", "gallbladder",
)
PROTECTED_ORGANS: Tuple[str, ...] = SMALL_ORGANS + ("duodenum",)


@dataclass
class CurationConfig:
    # --- slice selection (selection.py) ---
    redundancy_iou: float = 0.75            # label IoU with the last retained slice at or above which a slice may be dropped
    redundancy_area_change: float = 0.15    # ... and relative foreground area change below which it is "negligible"
    protected_organs: Tuple[str, ...] = PROTECTED_ORGANS
    protected_iou: float = 0.60             # a protected organ below this IoU with the last retained slice keeps the slice
    protected_area_change: float = 0.30     # ... or with an area change at or above this
    max_gap_slices: int = 4                 # never skip more than this many foreground slices in a row
    min_foreground_px: int = 20             # fewer labelled pixels than this counts as background-only

    # the slices stored either side of each retained one (for the pixel network's context), about this far off
    neighbour_distance_mm: float = NEIGHBOUR_DISTANCE_MM

    # --- visual prompts (prompts.py) ---
    min_component_area_px: int = 8          # smaller connected components get no box of their own
    min_organ_area_px: int = 4              # an organ with fewer pixels on a slice is treated as absent there

    # --- descriptions (measure.py, describe.py) ---
    adjacency_mm: float = 4.0               # organs closer than this are listed as neighbours
    midline_fraction: float = 0.04          # |offset from body centre| below this fraction of body width = midline
    density_margin_hu: float = 15.0         # mean HU within this of the reference = isodense
    soft_tissue_reference_hu: float = 50.0  # reference when the liver is not on the slice
    boundary_well_defined: float = 40.0     # mean boundary gradient (HU/mm) at or above = well defined
    boundary_moderately_defined: float = 15.0
    texture_homogeneous_std: float = 14.0   # HU std inside the eroded mask below = homogeneous
    texture_heterogeneous_std: float = 28.0  # ... at or above = heterogeneous, in between = mildly heterogeneous

    # --- question-answer generation (qa.py) ---
    absent_fraction: float = 0.15           # share of records that ask about an organ not on the slice
    implicit_fraction: float = 0.25         # share of seg/det queries phrased by function instead of name
    closer_look_fraction: float = 0.5       # share of seg records (non-small organs) with a closer-look second turn
    synonym_fraction: float = 0.2           # share of explicit queries that use a synonym of the organ name
    followup_fraction: float = 0.3          # share of records asked after an earlier dialogue about another organ

    # --- splits (pipeline.py) ---
    split_fractions: Tuple[float, float, float] = (0.70, 0.15, 0.15)
    seed: int = 0

    def __post_init__(self):
        self.protected_organs = tuple(self.protected_organs)
        self.split_fractions = tuple(float(f) for f in self.split_fractions)
        if len(self.split_fractions) != 3 or any(f < 0 for f in self.split_fractions) or sum(self.split_fractions) <= 0:
            raise ConfigError(f"split fractions must be three non-negative numbers, got {self.split_fractions}",
                              "use e.g. 0.7 0.15 0.15 (train val test)")
        for name in ("redundancy_iou", "protected_iou", "absent_fraction", "implicit_fraction",
                     "closer_look_fraction", "synonym_fraction", "followup_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1], got {value}")
        if self.absent_fraction >= 1.0:
            raise ConfigError("absent_fraction must be below 1")
        if not self.neighbour_distance_mm > 0:
            raise ConfigError(f"neighbour_distance_mm must be positive, got {self.neighbour_distance_mm}")
        if self.max_gap_slices < 1:
            raise ConfigError(f"max_gap_slices must be at least 1, got {self.max_gap_slices}")

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        data["protected_organs"] = list(self.protected_organs)
        data["split_fractions"] = list(self.split_fractions)
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "CurationConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown curation settings: {', '.join(unknown)}",
                              f"known settings: {', '.join(sorted(known))}")
        return cls(**data)
