"""Structured results of one chat turn, shared by the model, the server, the client and the Slicer bridge.

numpy only: Slicer imports this module. All coordinates are in the *slice pixel frame* of the image
that was sent: ``x`` is the column (IJK i), ``y`` is the row (IJK j); masks are indexed ``[row, col]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np


@dataclass
class MaskPrediction:
    """One organ mask on one slice.

    mask: (H, W) bool, full resolution of the input slice.
    probability: (H, W) float32 in [0, 1] or None when not requested.
    logits_lowres: (1, h, w) float32 SAM low-res logits, kept server-side for refinement (never sent).
    """
    organ: str
    mask: np.ndarray
    score: float = 1.0
    probability: Optional[np.ndarray] = None
    round: int = 1                      # 1 = first pass, 2 = closer look
    logits_lowres: Optional[np.ndarray] = None


@dataclass
class BoxPrediction:
    """One detected box, ``xyxy`` in pixels (x0, y0, x1, y1), inclusive-exclusive like numpy slices.

    source: "detection" (the [DET] box head) or "mask" (a connected component of the organ's mask, when
    the model's ``detection.box_source`` is "fused").
    """
    organ: str
    xyxy: np.ndarray
    score: float
    source: str = "detection"


@dataclass
class CloserLookInfo:
    """What a closer look examined: ``roi_xyxy`` in slice pixels and the canonical size it was resized to.

    token_generated: False when round 2 did not generate ``[CLOSER]`` and its state was taken from a
    teacher-forced ``[CLOSER]`` appended to the answer instead (the mask is then still round 2's).
    kept_round: the round whose mask the result carries as final: 2, or 1 when the model's
    ``closer_look.keep = "better"`` found round 1's mask rated higher (round 2's mask is then dropped).
    """
    ran: bool
    roi_xyxy: Optional[np.ndarray] = None
    canonical_size: int = 0
    organ: Optional[str] = None
    token_generated: bool = True
    kept_round: int = 2


@dataclass
class ChatResult:
    """Everything one chat turn produced."""
    text: str                                   # reasoning text shown to the user (routing tokens removed)
    raw_text: str = ""                          # generated text with routing tokens
    routing_tokens: List[str] = field(default_factory=list)   # e.g. ["[SEG]", "[CLOSER]"]
    target_organ: Optional[str] = None          # organ the query was resolved to, None if unresolved
    absent: bool = False                        # the model answered that the target is not visible
    masks: List[MaskPrediction] = field(default_factory=list)
    boxes: List[BoxPrediction] = field(default_factory=list)
    closer_look: CloserLookInfo = field(default_factory=lambda: CloserLookInfo(ran=False))
    timings_ms: Dict[str, float] = field(default_factory=dict)
    #: (question, raw answer) of every turn the model ran: one per organ of a compound request
    turns: List[Tuple[str, str]] = field(default_factory=list)
    #: the presence head's probability that the target organ is on the slice, when the model's
    #: ``presence_gate`` or ``presence_rescue`` checked this answer (None otherwise); ``presence_overruled``:
    #: the model's [SEG]/[DET] answer was replaced by "not visible" because that probability fell below the
    #: gate; ``presence_rescued``: its "not visible" answer was decoded again as visible because the
    #: probability reached ``presence_rescue``
    presence: Optional[float] = None
    presence_overruled: bool = False
    presence_rescued: bool = False

    def history_turns(self, query: str) -> List[Tuple[str, str]]:
        """What the dialogue history keeps of this turn: the model's own single-organ turns, the form it
        was trained on, rather than one compound question with several answers run together."""
        return [tuple(turn) for turn in self.turns] or [(query, self.raw_text or self.text)]


def box_extent_ijk(xyxy, k: float, num_slices: int = 1):
    """Continuous IJK centre and size (in voxels) of the region a pixel box covers on slice ``k``.

    Pixel centres sit on integer IJK coordinates, so pixel ``(i, j)`` spans ``[i - 0.5, i + 0.5]`` and a box
    with exclusive maxima covers ``[x0 - 0.5, x1 - 0.5] x [y0 - 0.5, y1 - 0.5] x [k - 0.5, k + num_slices - 0.5]``.
    Returns ``(center (3,), size (3,))``; raises ValueError for an empty box.
    """
    x0, y0, x1, y1 = (float(v) for v in np.asarray(xyxy, dtype=np.float64).reshape(4))
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"box {[x0, y0, x1, y1]} is not (x0, y0, x1, y1) with x1 > x0 and y1 > y0")
    center = np.array([(x0 + x1 - 1.0) / 2.0, (y0 + y1 - 1.0) / 2.0, k + (num_slices - 1) / 2.0])
    size = np.array([x1 - x0, y1 - y0, float(num_slices)])
    return center, size
