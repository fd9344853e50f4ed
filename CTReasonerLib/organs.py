"""The 14 BTCV++ organs: label values, names, colours, synonyms and Slicer terminology.

Standard library only, so that Slicer, the client and the backend share one table.
Label values follow BTCV (1..14, with the duodenum added as 14 as in BTCV++).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple


@dataclass(frozen=True)
class Organ:
    label: int                     # value in a label map
    key: str                       # machine name, snake_case
    name: str                      # display name, used as the segment name
    abbreviation: str              # as in the paper's tables
    color: Tuple[int, int, int]    # RGB 0..255 (Slicer GenericAnatomyColors where it has one)
    snomed_type: Tuple[str, str]   # (code, meaning) for the Slicer terminology "type"
    snomed_modifier: Optional[Tuple[str, str]] = None  # laterality modifier
    synonyms: Tuple[str, ...] = field(default_factory=tuple)
    function: str = ""             # what the organ does, for implicit queries

_RIGHT = ("24028007", "Right")
_LEFT = ("7771000", "Left")

ORGANS: List[Organ] = [
    Organ(1, "spleen", "spleen", "Spl", (157, 108, 162), ("78961009", "Spleen"),
          synonyms=("spleen", "splenic parenchyma"),
          function="filters blood and recycles old red blood cells"),
    Organ(2, "right_kidney", "right kidney", "RKid", (185, 102, 83), ("64033007", "Kidney"), _RIGHT,
          synonyms=("right kidney", "kidney on the right", "right renal"),
          function="filters blood to make urine, on the patient's right"),
    Organ(3, "left_kidney", "left kidney", "LKid", (185, 102, 83), ("64033007", "Kidney"), _LEFT,
          synonyms=("left kidney", "kidney on the left", "left renal"),
          function="filters blood to make urine, on the patient's left"),
    Organ(4, "gallbladder", "gallbladder", "Gall", (139, 150, 98), ("28231008", "Gallbladder"),
          synonyms=("gallbladder", "gall bladder"),
          function="stores and concentrates bile"),
    Organ(5, "esophagus", "esophagus", "Eso", (211, 171, 143), ("32849002", "Esophagus"),
          synonyms=("esophagus", "oesophagus", "gullet"),
          function="carries swallowed food from the throat to the stomach"),
    Organ(6, "liver", "liver", "Liv", (221, 130, 101), ("10200004", "Liver"),
          synonyms=("liver", "hepatic parenchyma"),
          function="produces bile and detoxifies the blood"),
    Organ(7, "stomach", "stomach", "Sto", (240, 170, 200), ("69695003", "Stomach"),
          synonyms=("stomach", "gastric"),
          function="holds and digests food with acid"),
    Organ(8, "aorta", "aorta", "Aor", (224, 97, 76), ("15825003", "Aorta"),
          synonyms=("aorta", "abdominal aorta"),
          function="carries oxygenated blood from the heart to the body"),
    Organ(9, "inferior_vena_cava", "inferior vena cava", "IVC", (0, 151, 206), ("64131007", "Inferior vena cava"),
          synonyms=("inferior vena cava", "IVC", "postcava", "vena cava"),
          function="returns blood from the lower body to the heart"),
    Organ(10, "portal_splenic_veins", "portal and splenic veins", "PSV", (0, 112, 165), ("32764006", "Portal vein"),
          synonyms=("portal and splenic veins", "portal vein", "splenic vein", "portal & splenic veins"),
          function="drains blood from the gut and spleen to the liver"),
    Organ(11, "pancreas", "pancreas", "Pan", (249, 180, 111), ("15776009", "Pancreas"),
          synonyms=("pancreas", "pancreatic"),
          function="makes insulin and digestive enzymes"),
    Organ(12, "right_adrenal_gland", "right adrenal gland", "RAG", (244, 217, 154), ("23451007", "Adrenal gland"), _RIGHT,
          synonyms=("right adrenal gland", "right adrenal", "right suprarenal gland"),
          function="makes stress hormones, sitting on top of the right kidney"),
    Organ(13, "left_adrenal_gland", "left adrenal gland", "LAG", (226, 202, 134), ("23451007", "Adrenal gland"), _LEFT,
          synonyms=("left adrenal gland", "left adrenal", "left suprarenal gland"),
          function="makes stress hormones, sitting on top of the left kidney"),
    Organ(14, "duodenum", "duodenum", "Duo", (255, 253, 229), ("38848004", "Duodenum"),
          synonyms=("duodenum", "duodenal"),
          function="first part of the small bowel, receiving food from the stomach"),
]

ORGAN_BY_KEY: Dict[str, Organ] = {o.key: o for o in ORGANS}
ORGAN_BY_LABEL: Dict[int, Organ] = {o.label: o for o in ORGANS}
ORGAN_BY_NAME: Dict[str, Organ] = {o.name: o for o in ORGANS}
NUM_ORGANS = len(ORGANS)

# Slicer terminology context (SNOMED CT "Anatomical Structure" category).
TERMINOLOGY_CATEGORY = ("123037004", "Anatomical Structure")


def get_organ(identifier) -> Organ:
    """Resolve an organ from its label value, key, display name, abbreviation or a synonym.

    Raises KeyError with the list of known organs when nothing matches.
    """
    if isinstance(identifier, Organ):
        return identifier
    if isinstance(identifier, int):
        if identifier in ORGAN_BY_LABEL:
            return ORGAN_BY_LABEL[identifier]
    else:
        text = str(identifier).strip().lower().replace("-", " ")
        for organ in ORGANS:
            candidates = {organ.key.replace("_", " "), organ.name, organ.abbreviation.lower()}
            candidates.update(s.lower() for s in organ.synonyms)
            if text in candidates or text.replace(" ", "_") == organ.key:
                return organ
    known = ", ".join(o.name for o in ORGANS)
    raise KeyError(f"unknown organ {identifier!r}; known organs: {known}")


def slicer_terminology_string(organ: Organ) -> str:
    """Slicer's terminology entry string (``SetTag(GetTerminologyEntryTagName(), ...)``)."""
    cat_code, cat_meaning = TERMINOLOGY_CATEGORY
    type_code, type_meaning = organ.snomed_type
    mod = organ.snomed_modifier
    mod_part = f"SCT^{mod[0]}^{mod[1]}" if mod else "^^"
    return (f"Segmentation category and type - 3D Slicer General Anatomy list~"
            f"SCT^{cat_code}^{cat_meaning}~SCT^{type_code}^{type_meaning}~{mod_part}~"
            f"Anatomic codes - DICOM master list~^^~^^")
