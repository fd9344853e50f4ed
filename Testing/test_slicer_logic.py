"""The scene logic (what CTReasoner.CTReasonerLogic runs) on slicer-core's real MRML scene, without Qt.

The backend here is :class:`ThresholdBackend`: an in-process stand-in with the client's method signatures
that really computes its answers from the pixels it is sent (an organ = a HU range, as on our phantoms).
So a wrong slice, a transposed image or a misplaced click gives a wrong mask and fails the test.
The real client/server pair is tested by the service suite; here the subject is the scene side.
"""
from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest

from slicer_fixtures import slicer_scene  # noqa: F401  (pytest fixture)

import slicer  # noqa: E402

from CTReasonerLib.client.client import PropagationReply, RefineReply, SliceReply
from CTReasonerLib.client.geometry import SliceGeometry
from CTReasonerLib.errors import ConfigError, CTReasonerError
from CTReasonerLib.organs import ORGANS, get_organ
from CTReasonerLib.results import BoxPrediction, ChatResult, CloserLookInfo, MaskPrediction
from CTReasonerLib.slicer import segments
from CTReasonerLib.slicer.jobs import JobCancelled
from CTReasonerLib.slicer.logic import SceneLogic, describe_backend
from test_slicer_bridge import make_volume, rotation

HU_RANGES = {"liver": (80, 120), "spleen": (180, 220)}


class ThresholdBackend:
    """Answers like the server does, from the pixels it received: organ mask = pixels in the organ's HU range."""

    def __init__(self, neighbour_distance_mm=None):
        self.server_info = {"protocol_version": "1.1", "server_version": "0.1.0",
                            "model": {"name": "threshold-test-backend", "device": "cpu", "dtype": "float32"}}
        self.neighbour_distance_mm = neighbour_distance_mm   # as the client reads it from the server's model
        self.images, self.geometries, self.volumes, self.neighbours = {}, {}, {}, {}
        self.calls, self.cancelled = [], []
        self.closed = False

    # -- uploads
    def set_image(self, hu_slice, ijk_to_ras=None, k=0, window=None, job_id=None, timeout=None, neighbours=None):
        image_id = f"img{len(self.images)}"
        self.images[image_id] = np.array(hu_slice)
        self.neighbours[image_id] = None if neighbours is None else np.array(neighbours)
        self.geometries[image_id] = SliceGeometry(ijk_to_ras, k, hu_slice.shape)
        self.calls.append(("set_image", k))
        return image_id

    def set_volume(self, hu_volume, ijk_to_ras=None, window=None, job_id=None, timeout=None):
        volume_id = f"vol{len(self.volumes)}"
        self.volumes[volume_id] = np.array(hu_volume)
        self.calls.append(("set_volume", hu_volume.shape))
        return volume_id

    # -- model methods
    @staticmethod
    def _organ(message):
        for organ in ORGANS:
            if organ.name in message:
                return organ
        return None

    @staticmethod
    def _mask(pixels, organ_name):
        lo, hi = HU_RANGES.get(organ_name, (1e9, 1e9))
        return (pixels >= lo) & (pixels <= hi)

    @staticmethod
    def _box(mask):
        rows, cols = np.nonzero(mask)
        return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=float)

    def chat(self, image_id, message, history=(), closer_look=None, job_id=None, on_progress=None, timeout=None,
             **options):
        self.calls.append(("chat", image_id, message, len(history)))
        organ = self._organ(message)
        if organ is None:
            return SliceReply(image_id, self.geometries[image_id], ChatResult(text="Which organ do you mean?"))
        mask = self._mask(self.images[image_id], organ.name)
        result = ChatResult(text=f"The {organ.name} is the homogeneous region of {mask.sum()} pixels.",
                            target_organ=organ.name, absent=not mask.any())
        if mask.any():
            result.masks.append(MaskPrediction(organ.name, mask, 0.9, round=1))
            if "detect" in message:
                result.boxes.append(BoxPrediction(organ.name, self._box(mask), 0.87))
            if closer_look:
                result.masks.append(MaskPrediction(organ.name, mask, 0.95, round=2))
                result.closer_look = CloserLookInfo(True, self._box(mask), 256, organ.name)
        return SliceReply(image_id, self.geometries[image_id], result)

    def closer_look(self, image_id, roi_xyxy=None, organ=None, query=None, job_id=None, timeout=None):
        self.calls.append(("closer_look", image_id, roi_xyxy, organ))
        mask = self._mask(self.images[image_id], organ)
        roi = np.array(roi_xyxy if roi_xyxy is not None else self._box(mask), dtype=float)
        inside = np.zeros_like(mask)
        inside[int(roi[1]):int(roi[3]), int(roi[0]):int(roi[2])] = True
        result = ChatResult(text=f"Closer look at the {organ}.", target_organ=organ,
                            masks=[MaskPrediction(organ, mask & inside, 0.97, round=2)],
                            closer_look=CloserLookInfo(True, roi, 256, organ))
        return SliceReply(image_id, self.geometries[image_id], result)

    def refine(self, image_id, points=(), labels=(), box=None, use_previous_mask=False, organ=None,
               job_id=None, timeout=None, **options):
        self.calls.append(("refine", image_id, [list(p) for p in points], list(labels), box))
        mask = self._mask(self.images[image_id], organ)
        rows, cols = np.mgrid[: mask.shape[0], : mask.shape[1]]
        for (x, y), label in zip(points, labels):
            disc = (cols - x) ** 2 + (rows - y) ** 2 <= 1.5 ** 2
            mask = (mask | disc) if label == 1 else (mask & ~disc)
        return RefineReply(image_id, self.geometries[image_id], MaskPrediction(organ, mask, 0.9))

    def propagate(self, volume_id, seed_k, organ=None, seed_mask=None, query=None, direction="both",
                  slice_range=None, strategy="requery", on_progress=None, job_id=None, timeout=None):
        volume = self.volumes[volume_id]
        self.calls.append(("propagate", seed_k, organ, direction, slice_range, int(np.asarray(seed_mask).sum())))
        lo, hi = slice_range or (0, volume.shape[0] - 1)
        if direction == "up":
            lo = seed_k
        elif direction == "down":
            hi = seed_k
        ks = [k for k in range(lo, hi + 1) if k != seed_k]
        masks = {}
        for index, k in enumerate(ks):
            mask = self._mask(volume[k], organ)
            if mask.any():
                masks[k] = mask
            if on_progress:
                on_progress(index + 1, len(ks), f"slice {k}")
        return PropagationReply(volume_id, organ, masks, {k: 0.9 for k in masks}, np.eye(4), "done")

    def cancel(self, job_id):
        self.cancelled.append(job_id)
        return True

    def close(self, shutdown_server=True):
        self.closed = True


def phantom_volume(transformed=True, name="ct"):
    """make_volume's oblique, transformed grid holding a 'liver' (100 HU) on slices 1..4 and a 'spleen' on 3."""
    volume = make_volume(name=name, transformed=transformed)
    array = np.full((6, 20, 24), -900, np.int16)
    rows, cols = np.mgrid[:20, :24]
    for k, radius in zip(range(1, 5), (3, 5, 6, 4)):
        array[k][(cols - 8) ** 2 + (rows - 9) ** 2 <= radius ** 2] = 100
    array[3, 14:18, 17:22] = 200
    slicer.util.updateVolumeFromArray(volume, array)
    return volume, array


@pytest.fixture
def logic():
    backend = ThresholdBackend()
    return SceneLogic(client=backend), backend


def segment_array(volume, organ="liver", index=-1):
    seg_node = segments.find_segmentation_node(volume)
    segment_id = segments.organ_segment_ids(seg_node, get_organ(organ))[index]
    return segments.read_segment_array(seg_node, segment_id, volume)


def test_process_one_slice_sends_that_slice_and_writes_its_answer(slicer_scene, logic):
    logic, backend = logic
    volume, array = phantom_volume()
    outcome = logic.process(volume, "segment the liver", sliceIndex=2, closerLook=False)
    (sent,) = backend.images.values()
    assert np.array_equal(sent, array[2])                          # the right slice, not transposed
    written = segment_array(volume)
    assert np.array_equal(written[2], array[2] == 100) and written.sum() == (array[2] == 100).sum()
    assert outcome.text.startswith("The liver is the homogeneous region")
    segment = segments.find_segmentation_node(volume).GetSegmentation().GetSegment(outcome.segment_ids["liver"])
    assert segments.get_tag(segment, segments.TAG_MODEL_ID) == "threshold-test-backend"
    assert segments.get_tag(segment, segments.TAG_QUERY) == "segment the liver"


def test_process_without_slice_finds_every_slice_with_the_organ(slicer_scene, logic):
    logic, backend = logic
    volume, array = phantom_volume()
    progress = []
    outcome = logic.process(volume, "segment the liver", sliceIndex=None, closerLook=True,
                            progressCallback=lambda done, total, message: progress.append((done, total)))
    assert outcome.slices == [1, 2, 3, 4]
    assert progress == [(i, 6) for i in range(1, 7)]
    assert np.array_equal(segment_array(volume), (array == 100).astype(np.uint8))
    assert "Found on 4 of 6 slices (1-4)" in outcome.text
    names = [slicer_scene.GetNodeByID(i).GetName() for i in outcome.applied.closer_look_roi_ids]
    assert names == [f"liver closer look (slice {k})" for k in (1, 2, 3, 4)]


def _sent_neighbours(backend, k):
    """The neighbours sent with each upload of slice k, oldest first."""
    return [backend.neighbours[i] for i, geometry in backend.geometries.items() if geometry.k == k]


def test_uploads_carry_each_slices_neighbours_from_the_whole_volume(slicer_scene):
    # 6 mm over the K spacing of 2.5 mm: 2 slices off. The volume is oblique and transformed: K's column in world
    # has norm 2.5 but an S entry of 2.1 mm, which would give 3 slices.
    logic = SceneLogic(client=ThresholdBackend(neighbour_distance_mm=6.0))
    backend = logic.client
    volume, array = phantom_volume()
    logic.process(volume, "segment the liver", sliceIndex=0, closerLook=False)   # one-slice snapshots
    logic.process(volume, "segment the liver", sliceIndex=5, closerLook=False)
    assert np.array_equal(_sent_neighbours(backend, 0)[0], array[[0, 2]])        # clamped below the first
    assert np.array_equal(_sent_neighbours(backend, 5)[0], array[[3, 5]])        # and above the last
    logic.process(volume, "segment the spleen", sliceIndex=None, closerLook=False)   # a whole-volume snapshot
    for k in range(6):
        for sent in _sent_neighbours(backend, k):
            assert np.array_equal(sent, array[[max(k - 2, 0), min(k + 2, 5)]]), k
    assert [c[1] for c in backend.calls if c[0] == "set_image"] == [0, 5, 1, 2, 3, 4]   # 0 and 5 from the cache
    logic.closerLook(volume, sliceIndex=3, organ="spleen")
    logic.refine(volume, includePointsNode=place_points(volume, "p", [(8, 9, 3)]), sliceIndex=3, organ="spleen")
    assert len(_sent_neighbours(backend, 3)) == 1       # the same image (and id) as the chat's, with its neighbours


def test_no_neighbours_are_sent_when_the_model_reads_none(slicer_scene, logic):
    logic, backend = logic
    volume, array = phantom_volume()
    logic.process(volume, "segment the liver", sliceIndex=2, closerLook=False)
    logic.process(volume, "segment the liver", sliceIndex=None, closerLook=False, conflictPolicy="replace")
    assert set(backend.neighbours.values()) == {None} and len(backend.neighbours) == 6
    backend.neighbour_distance_mm = 2.5       # e.g. reconnected to a model that reads them: one slice off
    logic.process(volume, "segment the spleen", sliceIndex=2, closerLook=False)
    first, second = _sent_neighbours(backend, 2)       # not the upload cached without them
    assert first is None and np.array_equal(second, array[[1, 3]])


def test_detection_query_draws_named_box_rois(slicer_scene, logic):
    logic, _ = logic
    volume, _ = phantom_volume()
    outcome = logic.process(volume, "detect the spleen", sliceIndex=3, closerLook=False)
    (roi_id,) = outcome.applied.box_roi_ids
    assert slicer_scene.GetNodeByID(roi_id).GetName() == "spleen box 1 (0.87)"
    from CTReasonerLib.slicer.rois import roi_pixel_box
    assert roi_pixel_box(volume, slicer_scene.GetNodeByID(roi_id), 3).tolist() == [17, 14, 22, 18]


def test_conflict_asks_then_new_segment_then_undo(slicer_scene, logic):
    logic, _ = logic
    volume, array = phantom_volume()
    logic.process(volume, "segment the liver", sliceIndex=2, closerLook=False)
    with pytest.raises(segments.SegmentConflict):
        logic.process(volume, "segment the liver", sliceIndex=2, closerLook=False)
    assert logic.pendingConflict is not None
    outcome = logic.resolveConflict("new")
    seg_node = segments.find_segmentation_node(volume)
    assert seg_node.GetSegmentation().GetSegment(outcome.segment_ids["liver"]).GetName() == "liver 2"
    assert logic.undo() == "segment the liver (slice 2)"
    assert seg_node.GetSegmentation().GetNumberOfSegments() == 1
    assert logic.undo() == "segment the liver (slice 2)"
    assert seg_node.GetSegmentation().GetNumberOfSegments() == 0
    assert logic.undo() is None


def place_points(volume, name, ijk_points):
    from CTReasonerLib.slicer.geometry import ijk_to_world
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for ijk in ijk_points:
        node.AddControlPointWorld(*ijk_to_world(volume, ijk))
    return node


def test_refine_click_lands_on_the_clicked_pixel_through_transforms(slicer_scene, logic):
    logic, backend = logic
    volume, array = phantom_volume(transformed=True)
    logic.process(volume, "segment the liver", sliceIndex=2, closerLook=False)
    before = segment_array(volume)
    exclude = place_points(volume, "exclude", [(8, 9, 2)])             # organ centre on slice 2
    include = place_points(volume, "include", [(20, 3, 2), (1, 1, 4)])  # the second is on another slice
    outcome = logic.refine(volume, includePointsNode=include, excludePointsNode=exclude, sliceIndex=2)
    call = [c for c in backend.calls if c[0] == "refine"][-1]
    assert np.allclose(call[2], [[20, 3], [8, 9]], atol=1e-6) and call[3] == [1, 0]
    after = segment_array(volume)
    assert after[2, 9, 8] == 0 and after[2, 3, 20] == 1 and before[2, 9, 8] == 1
    assert outcome.kind == "refine" and segments.find_segmentation_node(volume).GetSegmentation().GetNumberOfSegments() == 1
    logic.undo()
    assert np.array_equal(segment_array(volume), before)


def test_refine_without_prompts_or_organ_is_refused(slicer_scene, logic):
    logic, _ = logic
    volume, _ = phantom_volume()
    with pytest.raises(CTReasonerError, match="needs an organ"):
        logic.refine(volume, sliceIndex=2)
    logic.process(volume, "segment the liver", sliceIndex=2, closerLook=False)
    with pytest.raises(CTReasonerError, match="no points or box on slice 2"):
        logic.refine(volume, includePointsNode=place_points(volume, "p", [(8, 9, 4)]), sliceIndex=2)


def test_closer_look_on_a_user_roi_replaces_that_slice_and_draws_the_roi(slicer_scene, logic):
    logic, backend = logic
    volume, array = phantom_volume()
    logic.process(volume, "segment the liver", sliceIndex=3, closerLook=False)
    from CTReasonerLib.slicer.rois import add_box_roi
    user_roi = add_box_roi(volume, get_organ("liver"), 3, (2, 2, 9, 16), 1.0)   # covers the left part only
    outcome = logic.closerLook(volume, sliceIndex=3, roiNode=user_roi)
    assert [c for c in backend.calls if c[0] == "closer_look"][-1][2:] == ([2, 2, 9, 16], "liver")
    written = segment_array(volume)
    expected = (array[3] == 100)
    expected[:, 9:] = False
    assert np.array_equal(written[3], expected)
    assert len(outcome.applied.closer_look_roi_ids) == 1


def test_propagate_fills_empty_slices_only(slicer_scene, logic):
    logic, backend = logic
    volume, array = phantom_volume()
    logic.process(volume, "segment the liver", sliceIndex=2, closerLook=False)
    # the user paints slice 4 by hand: propagation must keep it
    seg_node = segments.find_segmentation_node(volume)
    segment_id = segments.organ_segment_ids(seg_node, get_organ("liver"))[0]
    painted = segment_array(volume)
    painted[4, 0:2, 0:2] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(painted, seg_node, segment_id, volume)
    progress = []
    outcome = logic.propagate(volume, organ="liver", direction="both", seedSlice=2,
                              progressCallback=lambda d, t, m: progress.append(d))
    assert outcome.slices == [1, 3]
    result = segment_array(volume)
    assert np.array_equal(result[1], array[1] == 100) and np.array_equal(result[3], array[3] == 100)
    assert np.array_equal(result[4], painted[4])
    assert progress == [1, 2, 3, 4, 5]
    assert "kept 1 slice(s)" in outcome.text
    propagate_call = [c for c in backend.calls if c[0] == "propagate"][-1]
    assert propagate_call[1:5] == (2, "liver", "both", None) and propagate_call[5] == (array[2] == 100).sum()

    up = logic.propagate(volume, organ="liver", direction="up", seedSlice=2, sliceRange=(0, 5))
    assert up.slices == []                       # 3 and 4 already have content; 5 has no liver


def test_propagate_checks_its_arguments(slicer_scene, logic):
    logic, _ = logic
    volume, _ = phantom_volume()
    with pytest.raises(ConfigError, match="unknown direction"):
        logic.propagate(volume, organ="liver", direction="sideways", seedSlice=2)
    with pytest.raises(CTReasonerError, match="no liver segment"):
        logic.propagate(volume, organ="liver", seedSlice=2)
    logic.process(volume, "segment the liver", sliceIndex=2, closerLook=False)
    with pytest.raises(CTReasonerError, match="empty on seed slice 0"):
        logic.propagate(volume, organ="liver", seedSlice=0)
    with pytest.raises(ConfigError, match="contain seed"):
        logic.propagate(volume, organ="liver", seedSlice=2, sliceRange=(3, 5))


def test_background_job_and_cancel_write_nothing_until_finished(slicer_scene, logic):
    logic, backend = logic
    volume, array = phantom_volume()
    job = logic.startJob(logic.chatJob(volume, "segment the liver", sliceIndex=2, closerLook=False))
    job.future.result(timeout=30)
    assert job.done() and segments.find_segmentation_node(volume) is None   # the worker never touches MRML
    outcome = job.finish()
    assert outcome.slices == [2]

    cancel_job = logic.chatJob(volume, "segment the spleen", sliceIndex=None)
    cancel_job.context.progress_callback = lambda done, total, message: logic.cancelJob(cancel_job)
    logic.startJob(cancel_job)
    with pytest.raises(JobCancelled):
        cancel_job.finish()
    assert len([c for c in backend.calls if c[0] == "chat" and "spleen" in c[2]]) == 1
    assert backend.cancelled                                        # the server was asked to drop the job
    assert segments.organ_segment_ids(segments.find_segmentation_node(volume), get_organ("spleen")) == []


def test_current_slice_from_the_red_view(slicer_scene, logic):
    logic, _ = logic
    volume, _ = phantom_volume()
    from test_slicer_bridge import aligned_slice_node
    with pytest.raises(CTReasonerError, match="no Red slice view"):
        logic.currentSliceIndex(volume)
    red = aligned_slice_node(volume, 3)
    red.SetLayoutName("Red")
    red.SetSingletonTag("Red")
    slicer_scene.AddNode(red)
    assert logic.currentSliceIndex(volume) == 3
    outcome = logic.refine(volume, includePointsNode=place_points(volume, "p", [(8, 9, 3)]), organ="liver")
    assert outcome.slices == [3]


def test_history_and_clear_chat(slicer_scene, logic):
    logic, backend = logic
    volume, _ = phantom_volume()
    logic.process(volume, "segment the liver", sliceIndex=2, closerLook=False)
    logic.process(volume, "segment the spleen", sliceIndex=3, closerLook=False)
    assert [c[3] for c in backend.calls if c[0] == "chat"] == [0, 1]
    assert logic.conversation(volume).history[0][0] == "segment the liver"
    logic.clearChat(volume)
    logic.process(volume, "what is this?", sliceIndex=1)
    assert [c[3] for c in backend.calls if c[0] == "chat"][-1] == 0


def test_clear_errors_for_bad_requests(slicer_scene):
    volume, _ = phantom_volume()
    logic = SceneLogic()
    with pytest.raises(CTReasonerError, match="not connected"):
        logic.process(volume, "segment the liver", sliceIndex=1)
    with pytest.raises(ConfigError, match="unknown backend mode"):
        logic.connect(mode="carrier-pigeon")
    with pytest.raises(ConfigError, match="needs a host"):
        logic.connect(mode="ssh")
    logic.setClient(ThresholdBackend())
    with pytest.raises(CTReasonerError, match="message is empty"):
        logic.process(volume, "  ", sliceIndex=1)
    with pytest.raises(CTReasonerError, match="outside volume"):
        logic.process(volume, "segment the liver", sliceIndex=6)
    assert "threshold-test-backend" in logic.backendDescription() and "device cpu" in logic.backendDescription()
    assert describe_backend({}) == "not connected"


def write_volume_file(volume, path):
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    slicer.mrmlScene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.WriteData(volume)
    slicer.mrmlScene.RemoveNode(storage)
    return str(path)


def test_process_volumes_saves_results_and_survives_a_bad_volume(slicer_scene, logic, tmp_path):
    logic, _ = logic
    volume_a, array = phantom_volume(transformed=False, name="patient A")
    path_b = write_volume_file(phantom_volume(transformed=False, name="b")[0], tmp_path / "patient_b.nrrd")
    progress = []
    summary = logic.processVolumes([volume_a, str(tmp_path / "missing.nrrd"), path_b],
                                   ["segment the liver", "detect the spleen"], str(tmp_path / "out"),
                                   progressCallback=lambda d, t, m: progress.append((d, t)), sliceIndex=None,
                                   closerLook=False)
    assert [s.status for s in summary] == ["ok", "failed", "ok"]
    assert "does not exist" in summary[1].error
    assert summary[0].slices == {"segment the liver": [1, 2, 3, 4], "detect the spleen": [3]}
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert slicer_scene.GetFirstNodeByName("patient_b") is None          # loaded here, removed after saving
    recorded = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["status"] for r in recorded] == ["ok", "failed", "ok"]

    seg_path = os.path.join(str(tmp_path / "out"), "patient A", "patient A.seg.nrrd")
    roi_path = os.path.join(str(tmp_path / "out"), "patient A", "patient A - spleen box 1 (0.87).mrk.json")
    assert sorted(summary[0].outputs) == sorted([seg_path, roi_path])
    loaded = slicer.util.loadSegmentation(seg_path)
    liver_id = loaded.GetSegmentation().GetSegmentIdBySegmentName("liver")
    assert np.array_equal(segments.read_segment_array(loaded, liver_id, volume_a), (array == 100).astype(np.uint8))
    roi = slicer.util.loadMarkups(roi_path)
    from CTReasonerLib.slicer.rois import roi_pixel_box
    assert roi_pixel_box(volume_a, roi, 3).tolist() == [17, 14, 22, 18]
