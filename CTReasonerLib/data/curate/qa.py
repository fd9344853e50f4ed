"""Question-answer generation: one record per (slice, organ, task), with varied, seeded phrasings.

Answers carry the appearance reasoning (rendered from the description) followed by the routing token the
model must emit: ``[SEG]`` for segmentation, ``[DET]`` for detection, ``[CLOSER]`` for the closer-look
second turn; answers about an organ that is not on the slice carry no token. Every answer names the
organ, because inference resolves the target from the generated text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ...organs import ORGAN_BY_KEY
from .config import SMALL_ORGANS, CurationConfig
from .prompts import OrganPrompts

SEG_TOKEN, DET_TOKEN, CLOSER_TOKEN = "[SEG]", "[DET]", "[CLOSER]"
ROUTING_TOKENS = (SEG_TOKEN, DET_TOKEN, CLOSER_TOKEN)

SEG_QUERIES = (
    "Segment the {name}.",
    "Please delineate the {name} on this slice.",
    "Can you outline the {name}?",
    "Show me the {name} mask.",
    "Create a segmentation of the {name} on this CT slice.",
    "Highlight the {name}.",
)
DET_QUERIES = (
    "Where is the {name}?",
    "Detect the {name}.",
    "Find the {name} and draw a box around it.",
    "Locate the {name} on this CT slice.",
    "Put a bounding box on the {name}.",
)
# Colon forms, because organ functions are a mix of verb phrases and noun phrases.
IMPLICIT_SEG_QUERIES = (
    "Segment the organ with this role: {function}.",
    "Please outline the structure described as follows: {function}.",
    "Which organ is this: {function}? Segment it.",
)
IMPLICIT_DET_QUERIES = (
    "Locate the organ with this role: {function}.",
    "Draw a box around the structure described as follows: {function}.",
    "Where is the organ that fits this description: {function}?",
)
CLOSER_QUERIES = (
    "Have a closer look at the {name}.",
    "Zoom in and refine the {name} mask.",
    "Look more carefully at the {name} boundary.",
    "Can you take a closer look and refine it?",
)
CLOSER_ANSWERS = (
    "Zooming in on the {name} to refine its {boundary} boundary. {token}",
    "Taking a closer look at the {name} region and refining the mask. {token}",
    "I will crop around the {name} and refine its outline. {token}",
)
ABSENT_ANSWERS = (
    "The {name} is not visible on this slice.",
    "There is no {name} on this slice; it is not visible at this level.",
    "I cannot find the {name} on this slice, so there is nothing to {verb}.",
)


@dataclass
class PresentOrgan:
    key: str
    prompts: OrganPrompts
    description: Dict[str, Any]
    review_state: str
    review_reasons: List[str]


def _position_phrase(side: str, anteroposterior: str) -> str:
    if side == "midline":
        return "near the midline" if anteroposterior == "central" else f"{anteroposterior}ly near the midline"
    if anteroposterior == "central":
        return f"on the patient's {side} side"
    return f"in the {side} {anteroposterior} abdomen"


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _join(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def render_reasoning(description: Dict[str, Any], rng: np.random.Generator) -> str:
    """1-3 sentences on shape, size, position, density and neighbours; starts by naming the organ."""
    name = ORGAN_BY_KEY[description["organ"]].name
    shape, size, position = description["shape"], description["size"], description["position"]
    intensity, boundary, texture = description["intensity"], description["boundary"], description["texture"]
    count = description["instance_count"]
    where = _position_phrase(position["side"], position["anteroposterior"])
    extent = ""
    if "transverse_mm" in size and "anteroposterior_mm" in size:
        extent = f" ({size['transverse_mm']:.0f} × {size['anteroposterior_mm']:.0f} mm)"
    parts = f" in {count} separate parts" if count > 1 else ""
    first = rng.choice([
        f"The {name} appears{parts} as {_article(size['category'])} {size['category']}, {shape['category']}, "
        f"{texture['category']} structure "
        f"{where}, about {size['area_cm2']:.1f} cm²{extent}.",
        f"The {name} is seen{parts} {where} as {_article(shape['category'])} {shape['category']} "
        f"{size['category']} region of about "
        f"{size['area_cm2']:.1f} cm²{extent} with {texture['category']} texture.",
    ])
    reference = "the liver" if intensity.get("reference") == "liver" else "soft tissue"
    density = (f"It is {intensity['density']} relative to {reference} (mean {intensity['mean_hu']:.0f} HU)"
               f"{' and contains gas' if intensity.get('contains_gas') else ''}, with a {boundary['clarity']} border.")
    neighbours = [ORGAN_BY_KEY[k].name for k in description["adjacent_organs"]]
    context = (rng.choice([f"It borders the {_join(neighbours)}.", f"Neighbouring organs: the {_join(neighbours)}."])
               if neighbours else "It does not touch other labelled organs on this slice.")
    return " ".join([first, density, context])


def _organ_mention(organ_key: str, config: CurationConfig, rng: np.random.Generator) -> str:
    organ = ORGAN_BY_KEY[organ_key]
    # Adjectival synonyms ("gastric", "right renal") do not read as a target on their own.
    nouns = [s for s in organ.synonyms if s.lower() != organ.name and not s.endswith(("ic", "al"))]
    if nouns and rng.random() < config.synonym_fraction:
        return str(rng.choice(nouns))
    return organ.name


def _query(organ_key: str, task: str, implicit: bool, config: CurationConfig, rng: np.random.Generator) -> str:
    if implicit:
        templates = IMPLICIT_SEG_QUERIES if task == "seg" else IMPLICIT_DET_QUERIES
        return str(rng.choice(templates)).format(function=ORGAN_BY_KEY[organ_key].function)
    templates = SEG_QUERIES if task == "seg" else DET_QUERIES
    return str(rng.choice(templates)).format(name=_organ_mention(organ_key, config, rng))


def _base_record(subject: str, slice_index: int, slice_pos: int, organ_key: str, task: str) -> Dict[str, Any]:
    return {"id": f"{subject}_k{slice_index:04d}_{organ_key}_{task}", "subject": subject,
            "slice_index": int(slice_index), "slice_pos": int(slice_pos), "organ": organ_key,
            "label": ORGAN_BY_KEY[organ_key].label, "task": task}


def present_records(subject: str, slice_index: int, slice_pos: int, organ: PresentOrgan,
                    config: CurationConfig, rng: np.random.Generator) -> List[Dict[str, Any]]:
    """A segmentation and a detection record for an organ on the slice."""
    name = ORGAN_BY_KEY[organ.key].name
    records = []
    for task, token in (("seg", SEG_TOKEN), ("det", DET_TOKEN)):
        implicit = bool(rng.random() < config.implicit_fraction)
        reasoning = render_reasoning(organ.description, rng)
        if task == "det" and len(organ.prompts.boxes) > 1:
            reasoning = f"I found {len(organ.prompts.boxes)} separate parts of the {name} on this slice. " + reasoning
        turns = [{"query": _query(organ.key, task, implicit, config, rng), "answer": f"{reasoning} {token}"}]
        if task == "seg" and (organ.key in SMALL_ORGANS or rng.random() < config.closer_look_fraction):
            turns.append({
                "query": str(rng.choice(CLOSER_QUERIES)).format(name=name),
                "answer": str(rng.choice(CLOSER_ANSWERS)).format(
                    name=name, boundary=organ.description["boundary"]["clarity"], token=CLOSER_TOKEN),
            })
        record = _base_record(subject, slice_index, slice_pos, organ.key, task)
        record.update({
            "query_task": task, "implicit": implicit, "present": True, "turns": turns,
            "boxes": [list(b) for b in organ.prompts.boxes], "center": list(organ.prompts.center),
            "description": organ.description,
            "review": {"state": organ.review_state, "reasons": list(organ.review_reasons)},
        })
        records.append(record)
    return records


def absent_record(subject: str, slice_index: int, slice_pos: int, organ_key: str, config: CurationConfig,
                  rng: np.random.Generator) -> Dict[str, Any]:
    """A question about an organ that is not on the slice; the answer says so and routes nowhere."""
    query_task = "seg" if rng.random() < 0.5 else "det"
    implicit = bool(rng.random() < config.implicit_fraction)
    answer = str(rng.choice(ABSENT_ANSWERS)).format(name=ORGAN_BY_KEY[organ_key].name,
                                                     verb="segment" if query_task == "seg" else "locate")
    record = _base_record(subject, slice_index, slice_pos, organ_key, "absent")
    record.update({
        "query_task": query_task, "implicit": implicit, "present": False,
        "turns": [{"query": _query(organ_key, query_task, implicit, config, rng), "answer": answer}],
        "boxes": [], "center": None, "description": None, "review": {"state": "accepted", "reasons": []},
    })
    return record


def slice_records(subject: str, slice_index: int, slice_pos: int, present: Sequence[PresentOrgan],
                  absent_candidates: Sequence[str], config: CurationConfig,
                  rng: np.random.Generator) -> List[Dict[str, Any]]:
    """All records of one slice: seg + det per present organ, then absent-target questions sized so that
    they make up about ``config.absent_fraction`` of the records."""
    records: List[Dict[str, Any]] = []
    for organ in present:
        records += present_records(subject, slice_index, slice_pos, organ, config, rng)
    expected = config.absent_fraction / (1.0 - config.absent_fraction) * len(records)
    count = min(len(absent_candidates), int(expected) + int(rng.random() < expected - int(expected)))
    if count:
        chosen = rng.choice(len(absent_candidates), size=count, replace=False)
        for index in sorted(chosen):
            records.append(absent_record(subject, slice_index, slice_pos, absent_candidates[index], config, rng))
    add_followup_history(records, config, rng)
    return records


def add_followup_history(records: List[Dict[str, Any]], config: CurationConfig, rng: np.random.Generator) -> None:
    """Give ``config.followup_fraction`` of a slice's records a ``history``: the whole dialogue of another
    record of the same slice about a different organ, as if the user had asked that first.

    Without these a model only ever sees a second turn that is a closer look, and reads any new question
    after history as one. The dialogue is copied before the history is attached, so histories never nest.
    """
    dialogues = [[dict(turn) for turn in record["turns"]] for record in records]
    for record in records:
        if rng.random() >= config.followup_fraction:
            continue
        others = [i for i, other in enumerate(records) if other["organ"] != record["organ"]]
        if others:
            record["history"] = dialogues[others[int(rng.integers(len(others)))]]


def routing_token_of(answer: str) -> Optional[str]:
    """The routing token an answer ends with, or None."""
    return next((t for t in ROUTING_TOKENS if answer.rstrip().endswith(t)), None)
