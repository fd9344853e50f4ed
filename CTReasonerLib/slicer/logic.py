"""CTReasoner's scene logic without any GUI: chat, closer look, refinement, 3D propagation, undo, batch.

``CTReasoner.CTReasonerLogic`` (the Slicer module) is this class plus Slicer's ``ScriptedLoadableModuleLogic``;
it works the same from the Python console, from ``Slicer --no-main-window --python-script`` and in pytest on
slicer-core. The backend client is injected (``SceneLogic(client=...)``) or made by :meth:`connect`.

Every request is a :class:`~CTReasonerLib.slicer.jobs.SceneJob` (prepare on the main thread, compute on a
worker, apply on the main thread). The blocking methods (``process``, ``closerLook``, ``refine``,
``propagate``) run a job in a row; the Widget starts the same jobs in the background.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..client.geometry import ijk_spacing, neighbour_offset, neighbour_slices
from ..errors import ConfigError, CTReasonerError
from ..organs import Organ, get_organ
from ..results import ChatResult, MaskPrediction
from . import geometry
from .bridge import AppliedResult, apply_results, resolve_organ
from .jobs import JobContext, ProgressCallback, SceneJob
from .rois import roi_pixel_box
from .segments import (CONFLICT_POLICIES, VOLUME_ATTRIBUTE, Provenance, SegmentConflict, check_policy,
                       find_segmentation_node, organ_segment_ids, read_segment_array)
from .undo import UndoStack

log = logging.getLogger(__name__)

DEFAULT_WINDOW = (40.0, 400.0)                   # (center, width) HU: soft-tissue abdomen
PROPAGATION_DIRECTIONS = ("up", "down", "both")  # up = towards higher slice numbers (K+)
CONNECTION_MODES = ("local", "ssh", "url")


@dataclass
class Outcome:
    """What one request did, for the transcript and for scripts."""
    kind: str
    volume_node_id: str
    text: str                                        # assistant message (reasoning in full)
    slices: List[int] = field(default_factory=list)
    results: Dict[int, ChatResult] = field(default_factory=dict)
    applied: Optional[AppliedResult] = None

    @property
    def segment_ids(self) -> Dict[str, str]:
        return dict(self.applied.segment_ids) if self.applied else {}

    @property
    def roi_node_ids(self) -> List[str]:
        return (self.applied.box_roi_ids + self.applied.closer_look_roi_ids) if self.applied else []


@dataclass
class Conversation:
    """Per-volume chat state."""
    history: List[Tuple[str, str]] = field(default_factory=list)     # (user, assistant)
    last_slice: Optional[int] = None
    last_organ: Optional[str] = None                                 # organ key
    segment_ids: Dict[str, str] = field(default_factory=dict)        # organ key -> newest segment written


@dataclass
class _VolumeSnapshot:
    """Scene data a worker needs, copied on the main thread.

    array_kji: (K, J, I) the whole volume, or (1, J, I) only the slice asked about.
    neighbour_offset: slices between a slice and each neighbour the backend's model reads; None: it reads none.
    slice_neighbours: (2, J, I) the neighbours of a one-slice snapshot's slice, taken from the whole volume.
    """
    node_id: str
    name: str
    array_kji: np.ndarray
    ijk_to_world: np.ndarray
    window: Tuple[float, float]
    modified_time: int
    neighbour_offset: Optional[int] = None
    slice_neighbours: Optional[np.ndarray] = None

    def neighbours(self, k: int) -> Optional[np.ndarray]:
        """(2, J, I) HU of the slices ``neighbour_offset`` below and above slice ``k``, clamped to the volume
        (what the model was trained and evaluated with), or None when the model reads no neighbours."""
        if self.neighbour_offset is None:
            return None
        if self.slice_neighbours is not None:
            return self.slice_neighbours
        return neighbour_slices(self.array_kji, k, self.neighbour_offset)


def model_id_from_info(info: Dict[str, Any]) -> str:
    """A short model identifier from the server's ``initialize`` answer (tolerant of missing fields)."""
    model = info.get("model") if isinstance(info, dict) else None
    if isinstance(model, dict):
        for key in ("name", "id", "model_id", "path", "backbone"):
            if model.get(key):
                return str(model[key])
    return str(model or "") or "unknown model"


def describe_backend(info: Dict[str, Any]) -> str:
    """One line for the status label: model, device and versions."""
    if not info:
        return "not connected"
    model = info.get("model") if isinstance(info.get("model"), dict) else {}
    parts = [model_id_from_info(info)]
    for key in ("backbone", "segmenter", "device", "dtype"):
        if model.get(key):
            parts.append(f"{key} {model[key]}")
    if info.get("server_version"):
        parts.append(f"server {info['server_version']}")
    if info.get("protocol_version"):
        parts.append(f"protocol {info['protocol_version']}")
    return ", ".join(parts)


def check_local_backend(python_executable: str, model_path: str = "") -> None:
    """Refuse a local backend that cannot start, before trying, with the fix."""
    import os
    if not python_executable:
        raise ConfigError("no backend Python is set",
                          "choose the python of an environment with the CTReasoner backend, "
                          "or use 'Set up local backend'")
    if not (os.path.isfile(python_executable) and os.access(python_executable, os.X_OK)):
        raise ConfigError(f"the backend Python {python_executable} does not exist or is not executable",
                          "choose the python inside your backend environment (bin/python, or Scripts\\python.exe "
                          "on Windows), or use 'Set up local backend'")
    if model_path and not os.path.isdir(model_path):
        raise ConfigError(f"the model folder {model_path} does not exist",
                          "choose a model folder (with config.json), or leave it empty for the default model")


def organ_found(result: ChatResult) -> bool:
    """Whether a slice's answer contains the organ: a non-empty mask or a box, and not declared absent."""
    if result.absent:
        return False
    return any(np.asarray(m.mask).any() for m in result.masks) or bool(result.boxes)


class SceneLogic:
    """Chat-driven segmentation on MRML volumes. Methods use Slicer's camelCase, as scripted modules do."""

    def __init__(self, client=None, conflictPolicy: str = "ask", maxUndo: int = 30):
        self._client = client
        self.conflictPolicy = check_policy(conflictPolicy)
        self.undoStack = UndoStack(maxUndo)
        self.conversations: Dict[str, Conversation] = {}
        self.pendingConflict: Optional[SceneJob] = None
        self.propagationStrategy = "requery"
        self._uploads: Dict[Tuple, str] = {}
        self._uploads_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctreasoner-logic")

    # ------------------------------------------------------------------------------------------ backend

    @property
    def client(self):
        if self._client is None:
            raise CTReasonerError("not connected to a CTReasoner backend",
                                  "start one in the Backend section, or call logic.connect(mode='local', ...)")
        return self._client

    @property
    def connected(self) -> bool:
        return self._client is not None and bool(getattr(self._client, "server_info", None))

    def setClient(self, client) -> None:
        """Use an already connected client (closing the previous one)."""
        self.disconnect()
        self._client = client

    def connect(self, mode: str = "local", pythonExecutable: Optional[str] = None, modelPath: Optional[str] = None,
                device: str = "auto", host: Optional[str] = None,
                remoteCommand: str = "ctreasoner serve --stdio", url: Optional[str] = None,
                token: Optional[str] = None, tokenFile: Optional[str] = None, **clientOptions) -> Dict[str, Any]:
        """Start or reach a backend and shake hands; returns the server's description.

        mode "local": ``pythonExecutable`` of the backend environment, ``modelPath``, ``device``;
        "ssh": ``host`` (and ``remoteCommand``); "url": ``url`` plus ``token`` or ``tokenFile``.
        """
        from ..client.client import CTReasonerClient
        if mode == "local":
            if pythonExecutable:
                check_local_backend(pythonExecutable, modelPath or "")
            client = CTReasonerClient.local(python=pythonExecutable or None, model=modelPath or None,
                                            device=device or "auto", **clientOptions)
        elif mode == "ssh":
            if not host:
                raise ConfigError("SSH mode needs a host", "enter user@host in the Backend section")
            client = CTReasonerClient.ssh(host, remoteCommand or "ctreasoner serve --stdio", **clientOptions)
        elif mode == "url":
            if not url:
                raise ConfigError("URL mode needs the server URL", "enter e.g. http://127.0.0.1:8765")
            client = CTReasonerClient.http(url, token=token or None, token_file=tokenFile or None, **clientOptions)
        else:
            raise ConfigError(f"unknown backend mode {mode!r}", f"use one of {', '.join(CONNECTION_MODES)}")
        try:
            info = client.connect()
        except BaseException:
            client.close(shutdown_server=False)
            raise
        self.setClient(client)
        return info

    def disconnect(self) -> None:
        client, self._client = self._client, None
        with self._uploads_lock:
            self._uploads.clear()
        if client is not None:
            client.close()

    def backendDescription(self) -> str:
        return describe_backend(getattr(self._client, "server_info", {}) or {})

    # ------------------------------------------------------------------------------------------ scene reads

    def currentSliceIndex(self, volumeNode, sliceNode=None) -> int:
        """Slice K of ``volumeNode`` shown in the Red view (or ``sliceNode``); refuses views not aligned with K."""
        if sliceNode is None:
            sliceNode = volumeNode.GetScene().GetNodeByID("vtkMRMLSliceNodeRed")
            if sliceNode is None:
                raise CTReasonerError("there is no Red slice view to read the current slice from",
                                      "pass sliceIndex explicitly")
        return geometry.slice_index_from_slice_node(volumeNode, sliceNode)

    def conversation(self, volumeNode) -> Conversation:
        return self.conversations.setdefault(volumeNode.GetID(), Conversation())

    def _snapshot(self, volumeNode, whole_volume: bool, k: Optional[int] = None) -> _VolumeSnapshot:
        import slicer.util
        if volumeNode is None or not volumeNode.IsA("vtkMRMLScalarVolumeNode") or volumeNode.IsA(
                "vtkMRMLLabelMapVolumeNode"):
            raise CTReasonerError("select a CT volume first", "load a CT and pick it in the volume selector")
        if volumeNode.GetImageData() is None:
            raise CTReasonerError(f"volume '{volumeNode.GetName()}' has no voxels", "load the image again")
        voxels = slicer.util.arrayFromVolume(volumeNode)
        if voxels.ndim != 3:
            raise CTReasonerError(f"volume '{volumeNode.GetName()}' is not a single-channel 3D image",
                                  "use a scalar CT volume")
        array = np.array(voxels if whole_volume else voxels[k:k + 1], copy=True)
        display = volumeNode.GetDisplayNode()
        window = DEFAULT_WINDOW
        if display is not None and display.IsA("vtkMRMLScalarVolumeDisplayNode") and display.GetWindow() > 0:
            window = (float(display.GetLevel()), float(display.GetWindow()))
        ijk_to_world = geometry.volume_ijk_to_world(volumeNode)
        offset = self._neighbour_offset(ijk_to_world)
        # a one-slice snapshot still needs its neighbours from the whole volume (neighbour_slices copies them)
        slice_neighbours = None if whole_volume or offset is None else neighbour_slices(voxels, k, offset)
        return _VolumeSnapshot(volumeNode.GetID(), volumeNode.GetName(), array, ijk_to_world, window,
                               int(volumeNode.GetImageData().GetMTime()), offset, slice_neighbours)

    def _neighbour_offset(self, ijk_to_world: np.ndarray) -> Optional[int]:
        """Slices between a slice and each neighbour the backend's model reads (its advertised distance over the
        volume's slice spacing), or None when it reads none: then nothing extra is copied or sent."""
        distance = getattr(self._client, "neighbour_distance_mm", None)
        if distance is None:
            return None
        return neighbour_offset(ijk_spacing(ijk_to_world)[2], distance)

    def _volume_node(self, node_id: str):
        import slicer
        node = slicer.mrmlScene.GetNodeByID(node_id)
        if node is None:
            raise CTReasonerError("the volume was removed from the scene before the answer arrived",
                                  "load it again and repeat the request")
        return node

    def _provenance(self, query: str, reasoning: str) -> Provenance:
        return Provenance(query=query, model_id=model_id_from_info(getattr(self._client, "server_info", {}) or {}),
                          reasoning=reasoning)

    # ------------------------------------------------------------------------------------------ uploads (worker)

    def _upload_slice(self, snapshot: _VolumeSnapshot, k: int, row: int, context: JobContext) -> str:
        # the same slice sent with other (or no) neighbours is another image on the server
        key = ("slice", snapshot.node_id, snapshot.modified_time, int(k), snapshot.neighbour_offset)
        with self._uploads_lock:
            if key in self._uploads:
                return self._uploads[key]
        image_id = self.client.set_image(snapshot.array_kji[row], ijk_to_ras=snapshot.ijk_to_world, k=int(k),
                                         window=snapshot.window, job_id=context.new_server_job_id(),
                                         neighbours=snapshot.neighbours(int(k)))
        with self._uploads_lock:
            self._uploads[key] = image_id
        return image_id

    def _upload_volume(self, snapshot: _VolumeSnapshot, context: JobContext) -> str:
        key = ("volume", snapshot.node_id, snapshot.modified_time)
        with self._uploads_lock:
            if key in self._uploads:
                return self._uploads[key]
        volume_id = self.client.set_volume(snapshot.array_kji, ijk_to_ras=snapshot.ijk_to_world,
                                           window=snapshot.window, job_id=context.new_server_job_id())
        with self._uploads_lock:
            self._uploads[key] = volume_id
        return volume_id

    # ------------------------------------------------------------------------------------------ apply (main thread)

    def _apply(self, job: SceneJob, volume_node_id: str, results: Dict[int, ChatResult], provenance: Provenance,
               policy: Optional[str], text: str, target_organs: Sequence[str] = (),
               fill_empty_only: bool = False, draw_boxes: bool = True) -> Outcome:
        """Write results as one undoable edit and update the conversation; keeps the job when it must ask."""
        volume_node = self._volume_node(volume_node_id)
        conversation = self.conversation(volume_node)
        targets = {}
        segmentation_node = find_segmentation_node(volume_node)
        for key in target_organs:
            segment_id = conversation.segment_ids.get(key)
            if segmentation_node is not None and segment_id and \
                    segmentation_node.GetSegmentation().GetSegment(segment_id) is not None:
                targets[key] = segment_id
        try:
            applied = apply_results(volume_node, results, provenance, check_policy(policy or self.conflictPolicy),
                                    label=job.label, target_segment_ids=targets, fill_empty_only=fill_empty_only,
                                    draw_boxes=draw_boxes)
        except SegmentConflict:
            self.pendingConflict = job
            raise
        self.pendingConflict = None
        self.undoStack.push(applied.undo_entry)
        conversation.segment_ids.update(applied.segment_ids)
        if results:
            conversation.last_slice = sorted(results)[len(results) // 2]
        organs = list(applied.segment_ids) or [resolve_organ(b.organ).key for r in results.values() for b in r.boxes]
        if organs:
            conversation.last_organ = organs[0]
        return Outcome(job.kind, volume_node_id, text, sorted(results), dict(results), applied)

    def resolveConflict(self, policy: str) -> Outcome:
        """Apply the answer that stopped on a conflict, as a new segment ("new") or over it ("replace")."""
        if policy not in CONFLICT_POLICIES or policy == "ask":
            raise ConfigError(f"resolve a conflict with 'new' or 'replace', not {policy!r}")
        job, self.pendingConflict = self.pendingConflict, None
        if job is None:
            raise CTReasonerError("there is no answer waiting for a decision")
        return job.apply(job.computed, policy)

    def discardPending(self) -> None:
        self.pendingConflict = None

    # ------------------------------------------------------------------------------------------ chat

    def chatJob(self, volumeNode, query: str, sliceIndex: Optional[int] = None, closerLook: Optional[bool] = True,
                progressCallback: Optional[ProgressCallback] = None) -> SceneJob:
        """A chat request on one slice, or (``sliceIndex=None``) on every slice where the organ is found.

        With ``sliceIndex=None`` the query is asked on each slice in turn and the slices whose answer holds
        the organ (a mask or a box, not declared absent) are kept; the others are dropped.
        """
        query = (query or "").strip()
        if not query:
            raise CTReasonerError("the message is empty", "type a question or instruction, e.g. 'segment the liver'")
        scan = sliceIndex is None
        if not scan:
            sliceIndex = geometry.check_slice_index(volumeNode, sliceIndex)
        snapshot = self._snapshot(volumeNode, whole_volume=scan, k=sliceIndex)
        slices = list(range(snapshot.array_kji.shape[0])) if scan else [sliceIndex]
        history = list(self.conversation(volumeNode).history)
        label = f"{query} ({'all slices' if scan else f'slice {sliceIndex}'})"

        def compute(context: JobContext):
            results: Dict[int, ChatResult] = {}
            for index, k in enumerate(slices):
                context.check_cancelled(label)
                image_id = self._upload_slice(snapshot, k, index if scan else 0, context)
                reply = self.client.chat(image_id, query, history=history, closer_look=closerLook,
                                         job_id=context.new_server_job_id())
                if not scan or organ_found(reply.result):
                    results[k] = reply.result
                context.report(index + 1, len(slices), f"slice {k}")
            return results

        def apply(results: Dict[int, ChatResult], policy: Optional[str]) -> Outcome:
            text = _answer_text(results, query, scan, len(slices))
            outcome = self._apply(job, snapshot.node_id, results, self._provenance(query, text), policy, text)
            # The model reads its own words back (routing tokens included), as in training, not the summary.
            self.conversation(self._volume_node(snapshot.node_id)).history.extend(
                _model_turns(results, query) or [(query, text)])
            return outcome

        job = SceneJob("chat", snapshot.node_id, label, compute, apply)
        job.context.progress_callback = progressCallback
        return job

    def process(self, volumeNode, query: str, sliceIndex: Optional[int] = None, closerLook: Optional[bool] = True,
                progressCallback: Optional[ProgressCallback] = None, conflictPolicy: Optional[str] = None) -> Outcome:
        """Ask ``query`` about ``volumeNode`` and put the answer in the scene (blocking).

        sliceIndex: a slice K, or None for every slice that contains the organ (found by asking each slice).
        closerLook: True/False forces the closer look on/off; None lets the model decide.
        """
        return self.chatJob(volumeNode, query, sliceIndex, closerLook, progressCallback).run(conflictPolicy)

    # ------------------------------------------------------------------------------------------ closer look

    def closerLookJob(self, volumeNode, sliceIndex: Optional[int] = None, roiNode=None,
                      organ: Optional[str] = None) -> SceneJob:
        """Re-segment at higher resolution inside ``roiNode`` or around the last answer's mask."""
        conversation = self.conversation(volumeNode)
        k = self._request_slice(volumeNode, sliceIndex, conversation)
        organ_obj = self._request_organ(organ, conversation, required=roiNode is None, action="a closer look")
        roi_xyxy = roi_pixel_box(volumeNode, roiNode, k) if roiNode is not None else None
        snapshot = self._snapshot(volumeNode, whole_volume=False, k=k)
        label = f"closer look at {organ_obj.name if organ_obj else 'the ROI'} (slice {k})"

        def compute(context: JobContext):
            image_id = self._upload_slice(snapshot, k, 0, context)
            reply = self.client.closer_look(image_id, roi_xyxy=None if roi_xyxy is None else roi_xyxy.tolist(),
                                            organ=organ_obj.name if organ_obj else None,
                                            job_id=context.new_server_job_id())
            context.report(1, 1, label)
            return {k: reply.result}

        def apply(results: Dict[int, ChatResult], policy: Optional[str]) -> Outcome:
            text = results[k].text or label
            return self._apply(job, snapshot.node_id, results, self._provenance(label, text), policy, text,
                               target_organs=[o.key for o in [organ_obj] if o is not None])

        job = SceneJob("closerLook", snapshot.node_id, label, compute, apply)
        return job

    def closerLook(self, volumeNode, sliceIndex: Optional[int] = None, roiNode=None, organ: Optional[str] = None,
                   conflictPolicy: Optional[str] = None) -> Outcome:
        return self.closerLookJob(volumeNode, sliceIndex, roiNode, organ).run(conflictPolicy)

    # ------------------------------------------------------------------------------------------ refine

    def refineJob(self, volumeNode, includePointsNode=None, excludePointsNode=None, roiNode=None,
                  sliceIndex: Optional[int] = None, organ: Optional[str] = None,
                  usePreviousMask: bool = True) -> SceneJob:
        """Correct the organ's mask on one slice with include/exclude clicks and/or a box ROI.

        Only points on that slice are used (points on other slices belong to other refinements).
        The result replaces that slice of the organ's current segment, as one undoable edit.
        """
        conversation = self.conversation(volumeNode)
        k = self._request_slice(volumeNode, sliceIndex, conversation)
        organ_obj = self._request_organ(organ, conversation, required=True, action="refinement")
        points, labels = [], []
        for node, label_value in ((includePointsNode, 1), (excludePointsNode, 0)):
            for xy in _points_on_slice(volumeNode, node, k):
                points.append(xy.tolist())
                labels.append(label_value)
        box = roi_pixel_box(volumeNode, roiNode, k) if roiNode is not None else None
        if not points and box is None:
            raise CTReasonerError(f"no points or box on slice {k} to refine with",
                                  "place include/exclude points or draw a box on the current slice")
        snapshot = self._snapshot(volumeNode, whole_volume=False, k=k)
        label = f"refine {organ_obj.name} (slice {k}, {len(points)} point(s){', box' if box is not None else ''})"

        def compute(context: JobContext):
            image_id = self._upload_slice(snapshot, k, 0, context)
            reply = self.client.refine(image_id, points=points, labels=labels,
                                       box=None if box is None else box.tolist(),
                                       use_previous_mask=usePreviousMask, organ=organ_obj.name,
                                       job_id=context.new_server_job_id())
            context.report(1, 1, label)
            return {k: ChatResult(text=label, target_organ=organ_obj.name,
                                  masks=[MaskPrediction(organ=organ_obj.name, mask=reply.mask.mask,
                                                        score=reply.mask.score, round=reply.mask.round)])}

        def apply(results: Dict[int, ChatResult], policy: Optional[str]) -> Outcome:
            return self._apply(job, snapshot.node_id, results, self._provenance(label, label), policy, label,
                               target_organs=[organ_obj.key])

        job = SceneJob("refine", snapshot.node_id, label, compute, apply)
        return job

    def refine(self, volumeNode, includePointsNode=None, excludePointsNode=None, roiNode=None,
               sliceIndex: Optional[int] = None, organ: Optional[str] = None, usePreviousMask: bool = True,
               conflictPolicy: Optional[str] = None) -> Outcome:
        return self.refineJob(volumeNode, includePointsNode, excludePointsNode, roiNode, sliceIndex, organ,
                              usePreviousMask).run(conflictPolicy)

    # ------------------------------------------------------------------------------------------ propagate

    def propagateJob(self, volumeNode, organ: Optional[str] = None, direction: str = "both",
                     sliceRange: Optional[Tuple[int, int]] = None, seedSlice: Optional[int] = None,
                     progressCallback: Optional[ProgressCallback] = None) -> SceneJob:
        """Spread the organ's mask from a seed slice through the volume (up = higher K, down = lower K).

        Only slices that are empty in the organ's segment are filled: propagation never overwrites.
        """
        if direction not in PROPAGATION_DIRECTIONS:
            raise ConfigError(f"unknown direction {direction!r}", f"use one of {', '.join(PROPAGATION_DIRECTIONS)}")
        conversation = self.conversation(volumeNode)
        organ_obj = self._request_organ(organ, conversation, required=True, action="3D propagation")
        seed = self._request_slice(volumeNode, seedSlice, conversation)
        segment_id = self._organ_segment(volumeNode, organ_obj, conversation)
        seed_mask = read_segment_array(find_segmentation_node(volumeNode), segment_id, volumeNode)[seed].astype(bool)
        if not seed_mask.any():
            raise CTReasonerError(f"the {organ_obj.name} segment is empty on seed slice {seed}",
                                  "segment the organ on this slice first, or scroll to a slice where it is")
        num_slices = geometry.volume_shape_kji(volumeNode)[0]
        if sliceRange is not None:
            lo, hi = sorted(int(v) for v in sliceRange)
            if lo < 0 or hi >= num_slices or not lo <= seed <= hi:
                raise ConfigError(f"slice range {lo}..{hi} must lie in 0..{num_slices - 1} and contain seed {seed}")
            sliceRange = (lo, hi)
        snapshot = self._snapshot(volumeNode, whole_volume=True)
        label = f"propagate {organ_obj.name} {direction} from slice {seed}"

        def compute(context: JobContext):
            volume_id = self._upload_volume(snapshot, context)
            context.check_cancelled(label)
            reply = self.client.propagate(volume_id, seed, organ=organ_obj.name, seed_mask=seed_mask,
                                          direction=direction, slice_range=sliceRange,
                                          strategy=self.propagationStrategy, on_progress=context.report,
                                          job_id=context.new_server_job_id())
            context.check_cancelled(label)
            return {int(k): ChatResult(text=label, target_organ=organ_obj.name,
                                       masks=[MaskPrediction(organ=organ_obj.name, mask=mask)])
                    for k, mask in reply.masks.items() if int(k) != seed and np.asarray(mask).any()}

        def apply(results: Dict[int, ChatResult], policy: Optional[str]) -> Outcome:
            self.conversation(self._volume_node(snapshot.node_id)).segment_ids[organ_obj.key] = segment_id
            outcome = self._apply(job, snapshot.node_id, results, self._provenance(label, label), policy, "",
                                  target_organs=[organ_obj.key], fill_empty_only=True)
            written = [k for w in outcome.applied.undo_entry.slice_writes for k in w.slices_written]
            kept = sorted(set(results) - set(written))
            outcome.text = (f"Propagated the {organ_obj.name} to {len(written)} slice(s)"
                            + (f" ({min(written)}-{max(written)})" if written else "")
                            + (f"; kept {len(kept)} slice(s) that already had content" if kept else "") + ".")
            outcome.slices = written
            self.conversation(self._volume_node(snapshot.node_id)).last_slice = seed
            return outcome

        job = SceneJob("propagate", snapshot.node_id, label, compute, apply)
        job.context.progress_callback = progressCallback
        return job

    def propagate(self, volumeNode, organ: Optional[str] = None, direction: str = "both",
                  sliceRange: Optional[Tuple[int, int]] = None, seedSlice: Optional[int] = None,
                  progressCallback: Optional[ProgressCallback] = None) -> Outcome:
        return self.propagateJob(volumeNode, organ, direction, sliceRange, seedSlice, progressCallback).run()

    # ------------------------------------------------------------------------------------------ undo, chat state

    def undo(self) -> Optional[str]:
        """Undo the last model edit (text, closer look, refinement or propagation); returns its label."""
        import slicer
        entry = self.undoStack.undo(slicer.mrmlScene)
        return entry.label if entry is not None else None

    def clearChat(self, volumeNode=None) -> None:
        """Forget the dialogue (of one volume, or all); segments and ROIs stay in the scene."""
        if volumeNode is None:
            self.conversations.clear()
        else:
            self.conversations.pop(volumeNode.GetID(), None)
        self.pendingConflict = None

    # ------------------------------------------------------------------------------------------ background

    def startJob(self, job: SceneJob) -> SceneJob:
        """Run a job's backend part on the logic's worker thread; poll ``job.done()``, then ``job.finish()``."""
        return job.start(self._executor)

    def cancelJob(self, job: SceneJob) -> None:
        job.cancel(self._client)

    # ------------------------------------------------------------------------------------------ batch

    def processVolumes(self, nodesOrPaths, queries, outputFolder: str,
                       progressCallback: Optional[ProgressCallback] = None, sliceIndex: Optional[int] = None,
                       closerLook: Optional[bool] = True):
        """Run ``queries`` on many volumes and save ``.seg.nrrd`` + ``.mrk.json`` per volume (see ``batch``)."""
        from .batch import process_volumes
        return process_volumes(self, nodesOrPaths, queries, outputFolder, progressCallback, sliceIndex, closerLook)

    # ------------------------------------------------------------------------------------------ transcript links

    def linkTarget(self, kind: str, nodeId: str, segmentId: Optional[str] = None):
        """(node, world RAS centre) of a transcript link: a segment's voxel centroid, or an ROI's centre.

        Raises when the node or segment was deleted since the answer, so the Widget can say so.
        """
        import slicer
        node = slicer.mrmlScene.GetNodeByID(nodeId)
        if node is None:
            raise CTReasonerError("that item was deleted from the scene")
        if kind == "segment":
            volume_node = slicer.mrmlScene.GetNodeByID(node.GetAttribute(VOLUME_ATTRIBUTE) or "")
            if volume_node is None or node.GetSegmentation().GetSegment(segmentId) is None:
                raise CTReasonerError("that segment (or its volume) was deleted")
            voxels = np.argwhere(read_segment_array(node, segmentId, volume_node))
            if voxels.size == 0:
                raise CTReasonerError("that segment is empty now")
            return node, geometry.ijk_to_world(volume_node, voxels.mean(axis=0)[::-1])
        center = np.zeros(3)
        node.GetCenterWorld(center)
        return node, center

    # ------------------------------------------------------------------------------------------ helpers

    def _request_slice(self, volumeNode, sliceIndex: Optional[int], conversation: Conversation) -> int:
        if sliceIndex is not None:
            return geometry.check_slice_index(volumeNode, sliceIndex)
        try:
            return self.currentSliceIndex(volumeNode)
        except CTReasonerError:
            if conversation.last_slice is None:
                raise
            return conversation.last_slice

    def _request_organ(self, organ: Optional[str], conversation: Conversation, required: bool,
                       action: str) -> Optional[Organ]:
        if organ:
            try:
                return get_organ(organ)
            except KeyError as exc:
                raise CTReasonerError(str(exc.args[0]), "pick one of the listed organs") from None
        if conversation.last_organ:
            return get_organ(conversation.last_organ)
        if required:
            raise CTReasonerError(f"{action} needs an organ, and there is no previous answer on this volume",
                                  "ask a question first (e.g. 'segment the liver') or pick the organ")
        return None

    def _organ_segment(self, volumeNode, organ: Organ, conversation: Conversation) -> str:
        segmentation_node = find_segmentation_node(volumeNode)
        existing = organ_segment_ids(segmentation_node, organ) if segmentation_node is not None else []
        remembered = conversation.segment_ids.get(organ.key)
        if remembered in existing:
            return remembered
        if existing:
            return existing[-1]
        raise CTReasonerError(f"there is no {organ.name} segment on '{volumeNode.GetName()}' to propagate",
                              f"segment the {organ.name} on one slice first")


def _points_on_slice(volume_node, points_node, k: int) -> List[np.ndarray]:
    """Pixel (x, y) of the defined control points of ``points_node`` lying on slice ``k``."""
    if points_node is None:
        return []
    pixels = []
    for index in range(points_node.GetNumberOfControlPoints()):
        if not points_node.GetNthControlPointPositionStatus(index) == points_node.PositionDefined:
            continue
        world = np.zeros(3)
        points_node.GetNthControlPointPositionWorld(index, world)
        ijk = geometry.world_to_ijk(volume_node, world)
        if abs(ijk[2] - k) <= 0.5:
            pixels.append(ijk[:2])
    return pixels


def _answer_text(results: Dict[int, ChatResult], query: str, scanned: bool, num_slices: int) -> str:
    """The assistant's message: the reasoning in full, plus where the organ was found when scanning."""
    if not results:
        return (f"Nothing was found for '{query}' on any of the {num_slices} slices." if scanned
                else "No answer.")
    if not scanned:
        return next(iter(results.values())).text
    best = _best_slice(results)
    slices = sorted(results)
    return (f"{results[best].text}\n\nFound on {len(slices)} of {num_slices} slices "
            f"({slices[0]}-{slices[-1]}); reasoning shown for slice {best}.")


def _best_slice(results: Dict[int, ChatResult]) -> int:
    """The slice with the largest answer; it carries the most telling reasoning."""
    return max(results, key=lambda k: sum(int(np.asarray(m.mask).sum()) for m in results[k].masks))


def _model_turns(results: Dict[int, ChatResult], query: str) -> List[Tuple[str, str]]:
    """What the model said for the turn (its own turns, routing tokens included), for the dialogue history."""
    return results[_best_slice(results)].history_turns(query) if results else []
