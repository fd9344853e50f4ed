"""Undo for model edits: one entry per text answer, closer look, refinement or propagation.

An entry keeps, for each segment it touched, the previous voxels of only the slices it wrote (a few (J, I)
bool arrays, not whole volumes) and the previous provenance tags; a segment the edit created is removed on
undo. ROIs the edit created are removed too. The stack is bounded so long sessions don't grow memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from .segments import SliceWrite, read_segment_array, write_segment_array

DEFAULT_MAX_DEPTH = 30


@dataclass
class UndoEntry:
    """Everything one model edit changed in the scene."""
    label: str                                   # shown to the user, e.g. "segment the liver (slice 12)"
    volume_node_id: str
    slice_writes: List[SliceWrite] = field(default_factory=list)
    created_node_ids: List[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.slice_writes and not self.created_node_ids


class UndoStack:
    """Last-in first-out model edits of one scene."""

    def __init__(self, max_depth: int = DEFAULT_MAX_DEPTH):
        self.max_depth = max_depth
        self._entries: List[UndoEntry] = []

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, entry: UndoEntry) -> None:
        if entry.empty:
            return
        self._entries.append(entry)
        del self._entries[:-self.max_depth]

    def peek(self) -> Optional[UndoEntry]:
        return self._entries[-1] if self._entries else None

    def clear(self) -> None:
        self._entries.clear()

    def undo(self, scene) -> Optional[UndoEntry]:
        """Restore the scene as it was before the last edit; returns that entry (None if nothing to undo).

        Nodes or segments the user deleted since are skipped: there is nothing left to restore there.
        """
        if not self._entries:
            return None
        entry = self._entries.pop()
        volume_node = scene.GetNodeByID(entry.volume_node_id)
        for write in reversed(entry.slice_writes):
            _restore_slice_write(scene, volume_node, write)
        for node_id in entry.created_node_ids:
            node = scene.GetNodeByID(node_id)
            if node is not None:
                scene.RemoveNode(node)
        return entry


def _restore_slice_write(scene, volume_node, write: SliceWrite) -> None:
    segmentation_node = scene.GetNodeByID(write.segmentation_node_id)
    if segmentation_node is None or volume_node is None:
        return
    segmentation = segmentation_node.GetSegmentation()
    segment = segmentation.GetSegment(write.segment_id)
    if segment is None:
        return
    if write.created:
        segmentation.RemoveSegment(write.segment_id)
        return
    array = read_segment_array(segmentation_node, write.segment_id, volume_node)
    for k, before in write.slices_before.items():
        array[k] = before
    write_segment_array(segmentation_node, write.segment_id, volume_node, array)
    # Restoring the old hash too keeps a user-edited segment marked as the user's (no hash, or a stale one).
    for tag, value in write.tags_before.items():
        if value:
            segment.SetTag(tag, value)
        else:
            segment.RemoveTag(tag)
