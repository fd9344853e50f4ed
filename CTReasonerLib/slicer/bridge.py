"""ChatResult -> scene: organ segments at the right slices, box ROIs and the closer-look ROI, as one undoable edit.

Results are in the slice pixel frame of the slice that was sent (``mask[row=j, col=i]`` of slice ``k``;
boxes ``xyxy`` with ``x=i``, ``y=j``), so the slice index is all the bridge needs besides the volume node.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

import numpy as np

from ..errors import CTReasonerError
from ..organs import Organ, get_organ
from ..results import ChatResult, MaskPrediction
from .rois import add_box_roi, add_closer_look_roi
from .segments import (Provenance, SegmentConflict, check_policy, find_conflict, segmentation_node_for_volume,
                       write_organ_slices)
from .undo import UndoEntry


@dataclass
class AppliedResult:
    """What one model edit put in the scene (node and segment ids), plus its undo entry."""
    volume_node_id: str
    segmentation_node_id: Optional[str] = None
    segment_ids: Dict[str, str] = field(default_factory=dict)      # organ key -> segment id
    box_roi_ids: List[str] = field(default_factory=list)
    closer_look_roi_ids: List[str] = field(default_factory=list)
    undo_entry: Optional[UndoEntry] = None


def resolve_organ(name: str) -> Organ:
    try:
        return get_organ(name)
    except KeyError as exc:
        raise CTReasonerError(f"the backend answered with an unknown organ {name!r}",
                              "update the CTReasoner extension and backend to the same version") from exc


def final_masks(result: ChatResult) -> Dict[str, MaskPrediction]:
    """One mask per organ: the closer-look (round 2) mask when there is one, else round 1."""
    chosen: Dict[str, MaskPrediction] = {}
    for prediction in result.masks:
        key = resolve_organ(prediction.organ).key
        if key not in chosen or prediction.round > chosen[key].round:
            chosen[key] = prediction
    return chosen


def apply_results(volume_node, results_by_slice: Mapping[int, ChatResult], provenance: Provenance,
                  policy: str = "ask", label: str = "", draw_boxes: bool = True,
                  draw_closer_look: bool = True, target_segment_ids: Optional[Mapping[str, str]] = None,
                  fill_empty_only: bool = False) -> AppliedResult:
    """Write chat results of one or more slices of ``volume_node`` as one edit.

    results_by_slice: {k: ChatResult computed on slice k}.
    policy: conflict policy (see ``segments``); with "ask", every organ is checked before anything is
        written, so a :class:`SegmentConflict` leaves the scene untouched.
    target_segment_ids: {organ key: segment id} to write into explicitly (refinement of a known segment).
    """
    check_policy(policy)
    target_segment_ids = dict(target_segment_ids or {})
    masks_by_organ: Dict[str, Dict[int, np.ndarray]] = {}
    for k, result in results_by_slice.items():
        for key, prediction in final_masks(result).items():
            masks_by_organ.setdefault(key, {})[int(k)] = prediction.mask

    if policy == "ask" and not fill_empty_only:
        conflicts = [find_conflict(volume_node, get_organ(key), sorted(slices))
                     for key, slices in masks_by_organ.items() if key not in target_segment_ids]
        conflicts = [c for c in conflicts if c is not None]
        if conflicts:
            raise SegmentConflict(conflicts)

    applied = AppliedResult(volume_node_id=volume_node.GetID())
    entry = UndoEntry(label=label or provenance.query, volume_node_id=volume_node.GetID())
    if masks_by_organ:
        applied.segmentation_node_id = segmentation_node_for_volume(volume_node).GetID()
    for key, slice_masks in masks_by_organ.items():
        write = write_organ_slices(volume_node, get_organ(key), slice_masks, provenance, policy,
                                   segment_id=target_segment_ids.get(key), fill_empty_only=fill_empty_only)
        if write is not None:
            entry.slice_writes.append(write)
            applied.segment_ids[key] = write.segment_id

    for k, result in results_by_slice.items():
        if draw_boxes:
            for box in result.boxes:
                roi = add_box_roi(volume_node, resolve_organ(box.organ), int(k), box.xyxy, box.score, box.source)
                applied.box_roi_ids.append(roi.GetID())
        look = result.closer_look
        if draw_closer_look and look.ran and look.roi_xyxy is not None:
            organ = resolve_organ(look.organ) if look.organ else None
            roi = add_closer_look_roi(volume_node, organ, int(k), look.roi_xyxy)
            applied.closer_look_roi_ids.append(roi.GetID())
    entry.created_node_ids = applied.box_roi_ids + applied.closer_look_roi_ids
    applied.undo_entry = entry
    return applied
