"""Tissue classes of the phantom: the organ label each one carries and its HU in each contrast phase.

The generator paints a *tissue* map first; the CT is a lookup of this table and the label map is a lookup of
``Tissue.label``, so the two always agree voxel for voxel. Several tissues can carry one organ label (the
stomach wall, its fluid and its gas are all "stomach", as in BTCV); most tissues carry no label at all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np

from ...organs import ORGAN_BY_KEY

CONTRAST_PHASES = ("non_contrast", "arterial", "portal_venous")


@dataclass(frozen=True)
class Tissue:
    tissue_id: int
    name: str
    label: int                         # organ label value (organs.py), 0 = not labelled
    hu: Tuple[float, float, float]     # mean HU in (non-contrast, arterial, portal-venous)
    texture: Tuple[float, float, float]  # HU amplitude of the tissue's own fine texture, per phase


def _organ(key: str) -> int:
    return ORGAN_BY_KEY[key].label


# Values are typical adult abdominal CT figures (unenhanced parenchyma 30-60 HU, aorta ~300 HU arterial /
# ~160 HU portal-venous, the spleen mottled in the arterial phase, the renal cortex before the medulla).
_TABLE = [
    # id, name, label, HU (NC, ART, PV), texture (NC, ART, PV)
    (0, "air", 0, (-1000, -1000, -1000), (0, 0, 0)),
    (1, "spleen", _organ("spleen"), (48, 125, 120), (5, 28, 6)),
    (2, "right_kidney_cortex", _organ("right_kidney"), (32, 190, 165), (4, 8, 6)),
    (3, "left_kidney_cortex", _organ("left_kidney"), (32, 190, 165), (4, 8, 6)),
    (4, "gallbladder_bile", _organ("gallbladder"), (10, 12, 14), (2, 2, 2)),
    (5, "esophagus", _organ("esophagus"), (40, 72, 85), (5, 6, 6)),
    (6, "liver", _organ("liver"), (58, 78, 118), (5, 6, 6)),
    (7, "stomach_wall", _organ("stomach"), (40, 95, 100), (5, 8, 8)),
    (8, "aorta", _organ("aorta"), (42, 320, 165), (3, 8, 5)),
    (9, "inferior_vena_cava", _organ("inferior_vena_cava"), (40, 95, 140), (3, 18, 5)),
    (10, "portal_splenic_veins", _organ("portal_splenic_veins"), (40, 130, 180), (3, 8, 5)),
    (11, "pancreas", _organ("pancreas"), (42, 118, 98), (9, 12, 11)),
    (12, "right_adrenal_gland", _organ("right_adrenal_gland"), (30, 68, 72), (4, 5, 5)),
    (13, "left_adrenal_gland", _organ("left_adrenal_gland"), (30, 68, 72), (4, 5, 5)),
    (14, "duodenum_wall", _organ("duodenum"), (40, 90, 100), (5, 8, 8)),
    (15, "right_kidney_medulla", _organ("right_kidney"), (30, 85, 150), (4, 6, 6)),
    (16, "left_kidney_medulla", _organ("left_kidney"), (30, 85, 150), (4, 6, 6)),
    (17, "stomach_content", _organ("stomach"), (18, 18, 18), (12, 12, 12)),
    (18, "stomach_gas", _organ("stomach"), (-960, -960, -960), (15, 15, 15)),
    (19, "duodenum_content", _organ("duodenum"), (14, 14, 14), (8, 8, 8)),
    (20, "duodenum_gas", _organ("duodenum"), (-950, -950, -950), (15, 15, 15)),
    (21, "hepatic_vein", _organ("liver"), (38, 80, 140), (3, 6, 5)),
    (30, "skin", 0, (30, 40, 45), (4, 4, 4)),
    (31, "subcutaneous_fat", 0, (-105, -105, -105), (10, 10, 10)),
    (32, "muscle", 0, (50, 56, 62), (6, 6, 6)),
    (33, "visceral_fat", 0, (-95, -95, -95), (12, 12, 12)),
    (34, "lung", 0, (-860, -860, -860), (35, 35, 35)),
    (35, "heart", 0, (40, 260, 150), (6, 20, 8)),
    (36, "cortical_bone", 0, (800, 800, 800), (60, 60, 60)),
    (37, "trabecular_bone", 0, (210, 210, 210), (35, 35, 35)),
    (38, "spinal_canal", 0, (15, 15, 15), (4, 4, 4)),
    (39, "rib", 0, (560, 560, 560), (60, 60, 60)),
    (40, "costal_cartilage", 0, (120, 120, 120), (15, 15, 15)),
    (41, "bowel_wall", 0, (40, 85, 95), (6, 8, 8)),
    (42, "bowel_content", 0, (22, 22, 22), (25, 25, 25)),
    (43, "bowel_gas", 0, (-950, -950, -950), (20, 20, 20)),
    (44, "artery", 0, (42, 300, 160), (3, 8, 5)),
    (45, "systemic_vein", 0, (40, 80, 135), (3, 15, 5)),
    (46, "mesenteric_vein", 0, (40, 120, 175), (3, 8, 5)),
    (47, "renal_sinus_fat", 0, (-80, -80, -80), (10, 10, 10)),
    (48, "intervertebral_disc", 0, (85, 85, 85), (8, 8, 8)),
    (49, "psoas", 0, (50, 56, 62), (6, 6, 6)),
    (50, "mediastinal_fat", 0, (-95, -95, -95), (10, 10, 10)),
    (51, "table_foam", 0, (-880, -880, -880), (20, 20, 20)),
    (52, "table_shell", 0, (250, 250, 250), (30, 30, 30)),
]

TISSUES: Dict[str, Tissue] = {row[1]: Tissue(*row) for row in _TABLE}
TISSUE_IDS: Dict[str, int] = {name: t.tissue_id for name, t in TISSUES.items()}
NUM_TISSUE_IDS = max(t.tissue_id for t in TISSUES.values()) + 1


def _lookup(values: Dict[int, float], dtype) -> np.ndarray:
    table = np.zeros(NUM_TISSUE_IDS, dtype=dtype)
    for tissue_id, value in values.items():
        table[tissue_id] = value
    return table


def label_lookup() -> np.ndarray:
    """(NUM_TISSUE_IDS,) uint8: tissue id -> organ label."""
    return _lookup({t.tissue_id: t.label for t in TISSUES.values()}, np.uint8)


def hu_lookup(phase: str, enhancement_gain: float = 1.0) -> np.ndarray:
    """(NUM_TISSUE_IDS,) float32: tissue id -> mean HU; ``enhancement_gain`` scales the contrast uptake."""
    p = CONTRAST_PHASES.index(phase)
    return _lookup({t.tissue_id: t.hu[0] + (t.hu[p] - t.hu[0]) * enhancement_gain for t in TISSUES.values()},
                   np.float32)


def texture_lookup(phase: str) -> np.ndarray:
    """(NUM_TISSUE_IDS,) float32: tissue id -> texture amplitude (HU)."""
    p = CONTRAST_PHASES.index(phase)
    return _lookup({t.tissue_id: t.texture[p] for t in TISSUES.values()}, np.float32)


def tissue_mask_lookup(*names: str) -> np.ndarray:
    """(NUM_TISSUE_IDS,) bool: True for the named tissues (used to say where a shape may be painted)."""
    return _lookup({TISSUE_IDS[n]: True for n in names}, bool)


def organ_tissue_names() -> Tuple[str, ...]:
    """Names of every tissue that carries an organ label."""
    return tuple(t.name for t in TISSUES.values() if t.label)


# Where shapes may be painted (later paint wins only over these tissues).
ABDOMINAL_SPACE = tissue_mask_lookup("visceral_fat", "bowel_wall", "bowel_content", "bowel_gas", "renal_sinus_fat",
                                     *organ_tissue_names())
THORACIC_SPACE = ABDOMINAL_SPACE | tissue_mask_lookup("lung", "mediastinal_fat", "heart")
VISCERAL_FAT_ONLY = tissue_mask_lookup("visceral_fat")
OUTSIDE_ORGANS = tissue_mask_lookup("visceral_fat", "bowel_wall", "bowel_content", "bowel_gas", "renal_sinus_fat")
