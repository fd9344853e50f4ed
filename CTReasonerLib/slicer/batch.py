"""Many volumes from the Python console: queries -> ``.seg.nrrd`` and ``.mrk.json`` files per volume.

Output layout (one folder per volume, so ROI files of different volumes never mix)::

    OUTPUT/<volume>/<volume>.seg.nrrd             segments named and coloured per organ, provenance in tags
    OUTPUT/<volume>/<volume> - <roi name>.mrk.json  one ROI per file, saved by Slicer's ROI JSON storage node
    OUTPUT/summary.json                           one record per volume: status, outputs, slices, error

A failing volume (unreadable file, backend error, ...) is recorded in the summary and the batch goes on.
Answers never replace anything: each volume gets its own segmentation, and repeated organs go to new segments.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Union

from ..errors import CTReasonerError
from .rois import roi_nodes_for_volume
from .segments import find_segmentation_node

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


@dataclass
class VolumeSummary:
    input: str
    volume: str = ""
    status: str = "pending"                                  # "ok" or "failed"
    outputs: List[str] = field(default_factory=list)
    slices: Dict[str, List[int]] = field(default_factory=dict)  # query -> slices with an answer
    error: str = ""
    seconds: float = 0.0


def safe_file_name(name: str) -> str:
    """A file name from a node name: path separators and odd characters become '_'."""
    cleaned = re.sub(r"[^\w.\-() ]+", "_", name).strip(" .")
    return cleaned or "volume"


def write_node(node, path: str) -> str:
    """Save a node through its own default storage node (for ROIs: ``vtkMRMLMarkupsROIJsonStorageNode``,
    which keeps centre, size and orientation; a generic markups JSON writer would drop them)."""
    storage = node.GetStorageNode()
    if storage is None:
        node.AddDefaultStorageNode()
        storage = node.GetStorageNode()
    storage.SetFileName(path)
    if not storage.WriteData(node):
        raise CTReasonerError(f"could not write {path}", "check that the output folder is writable")
    return path


def save_volume_outputs(volume_node, output_folder: str) -> List[str]:
    """Write the volume's CTReasoner segmentation and ROIs into ``output_folder/<volume>/``; returns the paths."""
    stem = safe_file_name(volume_node.GetName())
    folder = os.path.join(output_folder, stem)
    os.makedirs(folder, exist_ok=True)
    paths = []
    segmentation_node = find_segmentation_node(volume_node)
    if segmentation_node is not None and segmentation_node.GetSegmentation().GetNumberOfSegments() > 0:
        paths.append(write_node(segmentation_node, os.path.join(folder, stem + ".seg.nrrd")))
    for roi in roi_nodes_for_volume(volume_node):
        paths.append(write_node(roi, os.path.join(folder, f"{stem} - {safe_file_name(roi.GetName())}.mrk.json")))
    return paths


def _load_input(item) -> tuple:
    """(volume node, loaded_here) for a node or a file path."""
    if isinstance(item, (str, os.PathLike)):
        import slicer.util
        path = os.fspath(item)
        if not os.path.exists(path):
            raise CTReasonerError(f"{path} does not exist", "check the path")
        try:
            node = slicer.util.loadVolume(path)
        except RuntimeError as exc:
            raise CTReasonerError(f"Slicer could not read {path}: {exc}", "is it a CT volume file?") from None
        if node is None:
            raise CTReasonerError(f"Slicer could not read {path}", "is it a CT volume file?")
        return node, True
    if item is None or not hasattr(item, "GetImageData"):
        raise CTReasonerError(f"{item!r} is neither a volume node nor a file path")
    return item, False


def process_volumes(logic, nodes_or_paths: Sequence[Union[str, object]], queries: Union[str, Sequence[str]],
                    output_folder: str, progress_callback=None, slice_index: Optional[int] = None,
                    closer_look: Optional[bool] = True) -> List[VolumeSummary]:
    """Run every query on every volume with ``logic.process`` and save the results; returns one summary each.

    progress_callback(done, total, message) is called after each volume. Volumes loaded here from paths are
    removed from the scene again (with their results) once saved, so long batches don't fill memory.
    """
    queries = [queries] if isinstance(queries, str) else list(queries)
    if not queries:
        raise CTReasonerError("no queries given", "pass e.g. ['segment the liver']")
    os.makedirs(output_folder, exist_ok=True)
    summaries: List[VolumeSummary] = []
    items = list(nodes_or_paths)
    for index, item in enumerate(items):
        summary = VolumeSummary(input=os.fspath(item) if isinstance(item, (str, os.PathLike)) else item.GetName())
        started = time.monotonic()
        node, loaded_here = None, False
        try:
            node, loaded_here = _load_input(item)
            summary.volume = node.GetName()
            for query in queries:
                outcome = logic.process(node, query, sliceIndex=slice_index, closerLook=closer_look,
                                        conflictPolicy="new")
                summary.slices[query] = list(outcome.slices)
            summary.outputs = save_volume_outputs(node, output_folder)
            summary.status = "ok"
        except Exception as exc:  # one bad volume must not stop the batch; the summary says why
            summary.status = "failed"
            summary.error = str(exc) if isinstance(exc, CTReasonerError) else f"{type(exc).__name__}: {exc}"
            log.warning("%s failed: %s", summary.input, summary.error)
        finally:
            summary.seconds = round(time.monotonic() - started, 3)
            if loaded_here and node is not None:
                _remove_volume_and_results(node)
        summaries.append(summary)
        if progress_callback is not None:
            progress_callback(index + 1, len(items), f"{summary.input}: {summary.status}")
    with open(os.path.join(output_folder, SUMMARY_FILE), "w", encoding="utf-8") as handle:
        json.dump([asdict(s) for s in summaries], handle, indent=2)
    return summaries


def _remove_volume_and_results(volume_node) -> None:
    scene = volume_node.GetScene()
    for roi in roi_nodes_for_volume(volume_node):
        scene.RemoveNode(roi)
    segmentation_node = find_segmentation_node(volume_node)
    if segmentation_node is not None:
        scene.RemoveNode(segmentation_node)
    scene.RemoveNode(volume_node)
