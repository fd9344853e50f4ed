"""JSON schemas of the appearance description and of a dataset record (documented in docs/dataset.md).

The same description schema validates the offline writer, the optional LLM writer and human edits.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Dict, List

from ...organs import ORGANS

DESCRIPTION_SCHEMA_VERSION = 1
ORGAN_KEYS = [o.key for o in ORGANS]
SHAPES = ["round", "oval", "elongated", "tubular", "crescent", "irregular"]
SIZES = ["tiny", "small", "medium", "large"]
SIDES = ["right", "left", "midline"]
ANTEROPOSTERIOR = ["anterior", "posterior", "central"]
DENSITIES = ["hypodense", "isodense", "hyperdense"]
BOUNDARIES = ["well defined", "moderately defined", "poorly defined"]
TEXTURES = ["homogeneous", "mildly heterogeneous", "heterogeneous"]
LATERALITIES = ["right", "left", "none"]

_NUMBER = {"type": "number"}
_NON_NEGATIVE = {"type": "number", "minimum": 0}

DESCRIPTION_SCHEMA: Dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "CTReasoner organ appearance description",
    "type": "object",
    "required": ["organ", "visible", "instance_count", "laterality", "shape", "size", "position", "intensity",
                 "boundary", "texture", "adjacent_organs"],
    "properties": {
        "schema_version": {"const": DESCRIPTION_SCHEMA_VERSION},
        "organ": {"enum": ORGAN_KEYS},
        "visible": {"const": True},
        "instance_count": {"type": "integer", "minimum": 1},
        "laterality": {"enum": LATERALITIES},
        "shape": {"type": "object", "required": ["category"], "properties": {
            "category": {"enum": SHAPES}, "aspect_ratio": {"type": "number", "minimum": 1},
            "solidity": {"type": "number", "minimum": 0, "maximum": 1},
            "eccentricity": {"type": "number", "minimum": 0, "maximum": 1}}},
        "size": {"type": "object", "required": ["category", "area_cm2"], "properties": {
            "category": {"enum": SIZES}, "area_cm2": {"type": "number", "exclusiveMinimum": 0},
            "transverse_mm": _NON_NEGATIVE, "anteroposterior_mm": _NON_NEGATIVE}},
        "position": {"type": "object", "required": ["side", "anteroposterior"], "properties": {
            "side": {"enum": SIDES}, "anteroposterior": {"enum": ANTEROPOSTERIOR},
            "centroid_ras": {"type": "array", "items": _NUMBER, "minItems": 3, "maxItems": 3}}},
        "intensity": {"type": "object", "required": ["mean_hu", "density"], "properties": {
            "mean_hu": {"type": "number", "minimum": -1024, "maximum": 3071},
            "std_hu": _NON_NEGATIVE, "density": {"enum": DENSITIES},
            "reference": {"enum": ["liver", "soft tissue"]}, "reference_hu": _NUMBER,
            "contains_gas": {"type": "boolean"}}},
        "boundary": {"type": "object", "required": ["clarity"], "properties": {
            "clarity": {"enum": BOUNDARIES}, "gradient_hu_per_mm": _NON_NEGATIVE}},
        "texture": {"type": "object", "required": ["category"], "properties": {"category": {"enum": TEXTURES}}},
        "adjacent_organs": {"type": "array", "items": {"enum": ORGAN_KEYS}, "uniqueItems": True},
        "source": {"enum": ["geometry", "llm", "human"]},
    },
}

_TURN = {"type": "object", "required": ["query", "answer"],
         "properties": {"query": {"type": "string", "minLength": 1}, "answer": {"type": "string", "minLength": 1}}}
_BOX = {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4}

RECORD_SCHEMA: Dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "CTReasoner dataset record (one slice, one organ, one task)",
    "type": "object",
    "required": ["id", "subject", "slice_index", "slice_pos", "organ", "label", "task", "query_task", "implicit",
                 "present", "turns", "boxes", "center", "description", "review"],
    "properties": {
        "id": {"type": "string"}, "subject": {"type": "string"},
        "slice_index": {"type": "integer", "minimum": 0}, "slice_pos": {"type": "integer", "minimum": 0},
        "organ": {"enum": ORGAN_KEYS}, "label": {"type": "integer", "minimum": 1, "maximum": len(ORGANS)},
        "task": {"enum": ["seg", "det", "absent"]}, "query_task": {"enum": ["seg", "det"]},
        "implicit": {"type": "boolean"}, "present": {"type": "boolean"},
        "turns": {"type": "array", "items": _TURN, "minItems": 1, "maxItems": 2},
        # Optional: earlier turns of the same chat about other organs on this slice (context, not supervised).
        "history": {"type": "array", "items": _TURN, "maxItems": 4},
        "boxes": {"type": "array", "items": _BOX},
        "center": {"oneOf": [{"type": "null"}, {"type": "array", "items": _NUMBER, "minItems": 2, "maxItems": 2}]},
        "description": {"oneOf": [{"type": "null"}, {"type": "object"}]},
        "review": {"type": "object", "required": ["state", "reasons"], "properties": {
            "state": {"enum": ["accepted", "flagged", "rejected"]},
            "reasons": {"type": "array", "items": {"type": "string"}}}},
    },
}


@lru_cache(maxsize=None)
def _validator(name: str):
    import jsonschema

    schema = {"description": DESCRIPTION_SCHEMA, "record": RECORD_SCHEMA}[name]
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _errors(name: str, instance: Any) -> List[str]:
    validator = _validator(name)
    return [f"{'/'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
            for error in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))]


def description_errors(description: Any) -> List[str]:
    """Schema violations of an appearance description (empty when valid)."""
    return _errors("description", description)


def record_errors(record: Any) -> List[str]:
    """Schema violations of a dataset record (empty when valid)."""
    return _errors("record", record)
