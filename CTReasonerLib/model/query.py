"""Reading organs and intents out of text: the query a user typed and the answer the model generated.

Standard library only. Organ mentions come from ``organs.py`` (names, synonyms, and the function phrases the
curated implicit queries use); plurals of paired organs ("kidneys", "adrenal glands") and a side-less
"kidney"/"adrenal" mean both sides. Compound requests ("segment the liver and detect the adrenal glands")
are split into one sub-query per organ, phrased like the training queries, so each runs as its own turn.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Tuple

from CTReasonerLib.organs import ORGANS

_PAIRS = {
    "kidney": ("right_kidney", "left_kidney"),
    "adrenal": ("right_adrenal_gland", "left_adrenal_gland"),
}
_PAIR_PHRASES = {
    "kidney": ("kidneys", "kidney", "renal"),
    "adrenal": ("adrenal glands", "adrenal gland", "adrenals", "adrenal", "suprarenal glands", "suprarenal gland"),
}
SEG_WORDS = ("segment", "delineate", "outline", "mask", "highlight", "contour", "segmentation", "draw the border")
DET_WORDS = ("detect", "box", "locate", "find", "where", "localize", "localise", "bounding")
CLOSER_WORDS = ("closer look", "zoom", "look closer", "more carefully", "refine", "closer")
NOT_VISIBLE = re.compile(r"\b(not visible|not present|not seen|cannot find|can't find|cannot see|no \w+(?: \w+)? on this"
                         r"|absent|not on this slice)\b")
_SEPARATORS = re.compile(r"\s*(?:,\s*(?:and\s+)?(?:then\s+)?|;\s*|\s+and\s+(?:then\s+)?|\s+then\s+|\s+as well as\s+)\s*")


@dataclass(frozen=True)
class SubQuery:
    """One organ's part of a request: the text to ask, the organ key, and "seg" or "det"."""
    text: str
    organ: Optional[str]
    task: str


@lru_cache(maxsize=1)
def _patterns() -> List[Tuple[re.Pattern, Tuple[str, ...]]]:
    """(compiled pattern, organ keys), longest phrase first so "right kidney" wins over "kidney"."""
    phrases = {}
    for organ in ORGANS:
        for phrase in (organ.name, organ.key.replace("_", " "), *organ.synonyms):
            phrases[phrase.lower()] = (organ.key,)
        if organ.function:
            phrases[organ.function.lower()] = (organ.key,)
    for pair, words in _PAIR_PHRASES.items():
        for word in words:
            phrases.setdefault(word, _PAIRS[pair])
    ordered = sorted(phrases.items(), key=lambda item: -len(item[0]))
    return [(re.compile(r"\b" + re.escape(phrase) + r"\b"), keys) for phrase, keys in ordered]


def organ_mentions(text: str) -> List[Tuple[int, int, Tuple[str, ...]]]:
    """Non-overlapping organ mentions in ``text``: (start, end, organ keys), in reading order."""
    lowered = text.lower()
    taken = [False] * len(lowered)
    found = []
    for pattern, keys in _patterns():
        for match in pattern.finditer(lowered):
            if not any(taken[match.start():match.end()]):
                taken[match.start():match.end()] = [True] * (match.end() - match.start())
                found.append((match.start(), match.end(), keys))
    return sorted(found)


def find_organs(text: str) -> List[str]:
    """Organ keys mentioned in ``text``, in order of first mention, without repeats."""
    keys: List[str] = []
    for _, _, mentioned in organ_mentions(text):
        keys.extend(k for k in mentioned if k not in keys)
    return keys


def resolve_organ(text: str) -> Optional[str]:
    """The first organ ``text`` names (key), or None."""
    organs = find_organs(text)
    return organs[0] if organs else None


def query_task(text: str) -> Optional[str]:
    """"seg" or "det" from the wording (whichever cue comes first), None when neither is asked."""
    lowered = text.lower()
    cues = [(lowered.find(w), "seg") for w in SEG_WORDS] + [(lowered.find(w), "det") for w in DET_WORDS]
    cues = [(position, task) for position, task in cues if position >= 0]
    return min(cues)[1] if cues else None


def is_closer_request(text: str) -> bool:
    """The user asks for a closer look (zoom / refine)."""
    lowered = text.lower()
    return any(word in lowered for word in CLOSER_WORDS)


def says_not_visible(text: str) -> bool:
    """The answer states that the target is not on the slice."""
    return bool(NOT_VISIBLE.search(text.lower()))


def normalize_query(text: str) -> str:
    """A typed question in the written form of the training queries: whitespace collapsed, a capital first
    letter, a closing full stop when it has no closing punctuation ("segment the pancreas" ->
    "Segment the pancreas."). A small model reads "segment ..." and "Segment ..." as different
    words, and after dialogue history it can route the lower-case form to the wrong task."""
    text = " ".join(text.split())
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".?!" else text + "."


def split_compound_query(query: str) -> List[SubQuery]:
    """One :class:`SubQuery` per organ of a compound request; a single-organ query comes back unchanged.

    Parts are split at commas, "and", "then", ";" outside organ names ("portal and splenic veins" stays
    whole); a part without its own verb keeps the previous part's task ("segment the liver and the
    spleen"). Sub-queries are phrased "Segment the {name}." / "Detect the {name}." like the training data.
    """
    from CTReasonerLib.organs import get_organ

    mentions = organ_mentions(query)
    organs = [k for _, _, keys in mentions for k in keys]
    if len(organs) <= 1:
        return [SubQuery(query, organs[0] if organs else None, query_task(query) or "seg")]
    inside = lambda position: any(start <= position < end for start, end, _ in mentions)  # noqa: E731
    parts, start = [], 0
    for match in _SEPARATORS.finditer(query):
        if not inside(match.start()) and not inside(match.end() - 1):
            parts.append(query[start:match.start()])
            start = match.end()
    parts.append(query[start:])
    result: List[SubQuery] = []
    task = query_task(query) or "seg"
    for part in parts:
        task = query_task(part) or task
        for key in find_organs(part):
            verb = "Segment" if task == "seg" else "Detect"
            result.append(SubQuery(f"{verb} the {get_organ(key).name}.", key, task))
    return result
