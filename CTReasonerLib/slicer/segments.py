"""Organ segments of the per-volume CTReasoner segmentation node, written slice by slice without clobbering.

One ``vtkMRMLSegmentationNode`` per volume, named ``"<volume name> CTReasoner"``, with the volume as reference
geometry and the same parent transform, so a (K, J, I) array in the volume's voxel grid lands on the volume's
voxels (``slicer.util.updateSegmentBinaryLabelmapFromArray`` imports it in the volume's node coordinates).

Ownership rule: after every write we store a hash of the segment's voxels in the tag ``CTReasoner.contentHash``.
A segment without that tag, or whose voxels no longer match it, was made or edited by the user. Writing to
such a segment, or to a slice that already has content, is a *conflict*, settled by a :data:`ConflictPolicy`:
``"ask"`` raises :class:`SegmentConflict` (nothing is written), ``"new"`` adds ``"<organ> 2"``,
``"replace"`` replaces the requested slices of the existing segment (other slices are kept).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

import numpy as np

from ..errors import CTReasonerError
from ..organs import Organ
from .geometry import volume_shape_kji
from .terminology import ORGAN_TAG, apply_organ_identity

SEGMENTATION_NAME_SUFFIX = " CTReasoner"
VOLUME_ATTRIBUTE = "CTReasoner.volumeID"      # on the segmentation node: the volume it belongs to

TAG_QUERY = "CTReasoner.query"
TAG_MODEL_ID = "CTReasoner.modelId"
TAG_REASONING = "CTReasoner.reasoning"
TAG_TIMESTAMP = "CTReasoner.timestamp"
TAG_CONTENT_HASH = "CTReasoner.contentHash"
TAG_SLICES = "CTReasoner.slices"
PROVENANCE_TAGS = (TAG_QUERY, TAG_MODEL_ID, TAG_REASONING, TAG_TIMESTAMP, TAG_SLICES)

CONFLICT_POLICIES = ("ask", "new", "replace")


@dataclass
class Provenance:
    """What produced a segment edit; stored in segment tags."""
    query: str
    model_id: str = ""
    reasoning: str = ""
    timestamp: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))


@dataclass
class Conflict:
    organ: str
    segment_id: str
    segment_name: str
    reason: str


class SegmentConflict(CTReasonerError):
    """A write would change a segment the user made or edited, or a slice that already has content."""

    def __init__(self, conflicts: List[Conflict]):
        details = "; ".join(f"'{c.segment_name}' {c.reason}" for c in conflicts)
        super().__init__(f"not overwriting existing segments: {details}",
                         "choose 'new' to add a new segment or 'replace' to replace these slices")
        self.conflicts = conflicts


def check_policy(policy: str) -> str:
    if policy not in CONFLICT_POLICIES:
        raise CTReasonerError(f"unknown conflict policy {policy!r}", f"use one of {', '.join(CONFLICT_POLICIES)}")
    return policy


# --------------------------------------------------------------------------------------- segmentation node


def find_segmentation_node(volume_node):
    """The CTReasoner segmentation node of ``volume_node``, or None."""
    scene = volume_node.GetScene()
    for node in scene.GetNodesByClass("vtkMRMLSegmentationNode"):
        if node.GetAttribute(VOLUME_ATTRIBUTE) == volume_node.GetID():
            return node
    return None


def segmentation_node_for_volume(volume_node):
    """The volume's CTReasoner segmentation node, created on first use (reference geometry = the volume)."""
    node = find_segmentation_node(volume_node)
    if node is None:
        node = volume_node.GetScene().AddNewNodeByClass(
            "vtkMRMLSegmentationNode", volume_node.GetName() + SEGMENTATION_NAME_SUFFIX)
        node.SetAttribute(VOLUME_ATTRIBUTE, volume_node.GetID())
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    # The array import below is in the volume's node coordinates; both nodes must share the transform.
    if node.GetTransformNodeID() != volume_node.GetTransformNodeID():
        node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    return node


def get_tag(segment, name: str, default: str = "") -> str:
    import vtk
    value = vtk.reference("")
    return str(value) if segment.GetTag(name, value) else default


# --------------------------------------------------------------------------------------- voxels


def read_segment_array(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """(K, J, I) uint8 voxels of one segment on the volume's grid (a copy)."""
    import slicer.util
    array = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume_node)
    return (np.asarray(array) > 0).astype(np.uint8)


def content_hash(array_kji: np.ndarray) -> str:
    return hashlib.sha1(np.packbits(np.asarray(array_kji) > 0).tobytes()).hexdigest()


def write_segment_array(segmentation_node, segment_id: str, volume_node, array_kji: np.ndarray) -> None:
    """Set a segment's voxels from a (K, J, I) array on the volume's grid and record the ownership hash."""
    import slicer.util
    array_kji = (np.asarray(array_kji) > 0).astype(np.uint8)
    expected = volume_shape_kji(volume_node)
    if array_kji.shape != expected:
        raise CTReasonerError(f"segment array shape {array_kji.shape} does not match the volume {expected}")
    slicer.util.updateSegmentBinaryLabelmapFromArray(array_kji, segmentation_node, segment_id, volume_node)
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    segment.SetTag(TAG_CONTENT_HASH, content_hash(array_kji))


def edited_by_user(segment, array_kji: np.ndarray) -> bool:
    """True when the segment was not written by CTReasoner or changed since CTReasoner last wrote it."""
    stored = get_tag(segment, TAG_CONTENT_HASH)
    return not stored or stored != content_hash(array_kji)


# --------------------------------------------------------------------------------------- organ segments


def organ_segment_ids(segmentation_node, organ: Organ) -> List[str]:
    """Segments holding ``organ`` (by the organ tag, else by name), oldest first."""
    segmentation = segmentation_node.GetSegmentation()
    found = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        tagged = get_tag(segment, ORGAN_TAG)
        if tagged == organ.key or (not tagged and _is_organ_segment_name(segment.GetName(), organ)):
            found.append(segmentation.GetNthSegmentID(index))
    return found


def _is_organ_segment_name(name: str, organ: Organ) -> bool:
    """``"liver"`` or ``"liver 2"``: a segment the user may have made for this organ by hand."""
    suffix = name[len(organ.name):]
    return name == organ.name or (name.startswith(organ.name + " ") and suffix.strip().isdigit())


def _unused_segment_name(segmentation_node, organ: Organ) -> str:
    segmentation = segmentation_node.GetSegmentation()
    names = {segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())}
    if organ.name not in names:
        return organ.name
    number = 2
    while f"{organ.name} {number}" in names:
        number += 1
    return f"{organ.name} {number}"


def add_organ_segment(segmentation_node, organ: Organ) -> str:
    """A new empty segment for ``organ`` (``"liver"``, else ``"liver 2"``, ...); returns its id."""
    name = _unused_segment_name(segmentation_node, organ)
    segment_id = segmentation_node.GetSegmentation().AddEmptySegment("", name, [c / 255.0 for c in organ.color])
    apply_organ_identity(segmentation_node.GetSegmentation().GetSegment(segment_id), organ, name)
    return segment_id


def set_provenance(segment, provenance: Provenance, slices: List[int]) -> None:
    segment.SetTag(TAG_QUERY, provenance.query)
    segment.SetTag(TAG_MODEL_ID, provenance.model_id)
    segment.SetTag(TAG_REASONING, provenance.reasoning)
    segment.SetTag(TAG_TIMESTAMP, provenance.timestamp)
    previous = get_tag(segment, TAG_SLICES)
    written = sorted(set(slices) | {int(s) for s in previous.split(",") if s.strip().isdigit()})
    segment.SetTag(TAG_SLICES, ",".join(str(s) for s in written))


def find_conflict(volume_node, organ: Organ, slices: List[int]) -> Optional[Conflict]:
    """Why writing ``slices`` into ``organ``'s newest segment would overwrite someone's work, or None."""
    segmentation_node = find_segmentation_node(volume_node)
    existing = organ_segment_ids(segmentation_node, organ) if segmentation_node is not None else []
    if not existing:
        return None
    segment_id = existing[-1]
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    current = read_segment_array(segmentation_node, segment_id, volume_node)
    occupied = [int(k) for k in slices if current[k].any()]
    if edited_by_user(segment, current):
        reason = "was made or edited by the user"
    elif occupied:
        reason = f"already has content on slice(s) {occupied}"
    else:
        return None
    return Conflict(organ.name, segment_id, segment.GetName(), reason)


@dataclass
class SliceWrite:
    """What :func:`write_organ_slices` did: the segment, whether it was created, and each slice's previous voxels."""
    segmentation_node_id: str
    segment_id: str
    created: bool
    slices_before: Dict[int, np.ndarray]        # k -> (J, I) bool, for undo
    tags_before: Dict[str, str]
    slices_written: List[int]


def write_organ_slices(volume_node, organ: Organ, slice_masks: Mapping[int, np.ndarray], provenance: Provenance,
                       policy: str = "ask", segment_id: Optional[str] = None,
                       fill_empty_only: bool = False) -> Optional[SliceWrite]:
    """Write 2D masks (slice pixel frame, (J, I)) at their slices of ``organ``'s segment.

    segment_id: write to this segment (an explicit target, e.g. a refinement); otherwise the organ's newest
        segment, subject to ``policy`` when it conflicts.
    fill_empty_only: write only slices that are empty in the target segment (3D propagation); never a conflict.
    Returns None when there was nothing to write.
    """
    check_policy(policy)
    k_dim, j_dim, i_dim = volume_shape_kji(volume_node)
    masks = {}
    for k, mask in slice_masks.items():
        mask = np.asarray(mask)
        if mask.shape != (j_dim, i_dim):
            raise CTReasonerError(f"{organ.name} mask for slice {k} has shape {mask.shape}, "
                                  f"but the volume's slices are {(j_dim, i_dim)} (rows, columns)",
                                  "the backend must answer in the pixel frame of the slice it was sent")
        if not 0 <= int(k) < k_dim:
            raise CTReasonerError(f"slice {k} is outside the volume (0..{k_dim - 1})")
        masks[int(k)] = mask > 0
    if not masks:
        return None

    segmentation_node = segmentation_node_for_volume(volume_node)
    segmentation = segmentation_node.GetSegmentation()
    created = False
    if segment_id is None:
        existing = organ_segment_ids(segmentation_node, organ)
        segment_id = existing[-1] if existing else None
        conflict = None if fill_empty_only else find_conflict(volume_node, organ, sorted(masks))
        if conflict is not None and policy == "ask":
            raise SegmentConflict([conflict])
        if conflict is not None and policy == "new":
            segment_id = None
    elif segmentation.GetSegment(segment_id) is None:
        raise CTReasonerError(f"segment {segment_id!r} no longer exists", "run the query again")
    if segment_id is None:
        segment_id = add_organ_segment(segmentation_node, organ)
        created = True

    segment = segmentation.GetSegment(segment_id)
    current = read_segment_array(segmentation_node, segment_id, volume_node)
    if fill_empty_only:
        masks = {k: m for k, m in masks.items() if not current[k].any()}
    tags_before = {tag: get_tag(segment, tag) for tag in PROVENANCE_TAGS + (TAG_CONTENT_HASH,)}
    slices_before = {k: current[k].astype(bool) for k in masks}
    updated = current.copy()
    for k, mask in masks.items():
        updated[k] = mask
    write_segment_array(segmentation_node, segment_id, volume_node, updated)
    set_provenance(segment, provenance, sorted(masks))
    return SliceWrite(segmentation_node.GetID(), segment_id, created, slices_before, tags_before, sorted(masks))


def organ_slices_with_content(volume_node, segment_id: str) -> List[int]:
    """Slices (K) where the segment has voxels."""
    segmentation_node = find_segmentation_node(volume_node)
    array = read_segment_array(segmentation_node, segment_id, volume_node)
    return [int(k) for k in np.nonzero(array.reshape(array.shape[0], -1).any(axis=1))[0]]
