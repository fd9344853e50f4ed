"""The MRML bridge on slicer-core's real scene: geometry, segments, ROIs, no-overwrite, undo, colour table.

Volumes here have oblique, flipped direction matrices and sit under a rotated+translated linear transform,
and every placement is checked independently of the bridge's own maths: segment voxels are located through
the segment's internal labelmap geometry and the segmentation's transform, ROIs through their world matrix.
"""
from __future__ import annotations

import csv
import math
import os

import numpy as np
import pytest

from slicer_fixtures import slicer_scene  # noqa: F401  (pytest fixture)

import slicer  # noqa: E402  (installed by slicer_fixtures)
import vtk  # noqa: E402

from CTReasonerLib.errors import CTReasonerError
from CTReasonerLib.organs import ORGANS, get_organ, slicer_terminology_string
from CTReasonerLib.results import BoxPrediction, ChatResult, CloserLookInfo, MaskPrediction
from CTReasonerLib.slicer import geometry, rois, segments, terminology
from CTReasonerLib.slicer.bridge import apply_results
from CTReasonerLib.slicer.undo import UndoStack

SHAPE_KJI = (6, 20, 24)


def rotation(axis, degrees):
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    x, y, z = axis
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    C = 1 - c
    return np.array([[c + x * x * C, x * y * C - z * s, x * z * C + y * s],
                     [y * x * C + z * s, c + y * y * C, y * z * C - x * s],
                     [z * x * C - y * s, z * y * C + x * s, c + z * z * C]])


def make_volume(name="ct", transformed=True):
    """A volume with an oblique LPS-flipped direction matrix, anisotropic spacing and (optionally) a parent transform."""
    directions = rotation([0.2, 0.3, 1.0], 25) @ np.diag([-1.0, -1.0, 1.0])
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = directions @ np.diag([0.8, 0.9, 2.5])
    ijk_to_ras[:3, 3] = [12.0, -30.0, 55.0]
    voxels = np.arange(np.prod(SHAPE_KJI), dtype=np.int16).reshape(SHAPE_KJI)
    volume = slicer.util.addVolumeFromArray(voxels, ijk_to_ras, name=name)
    if transformed:
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "tilt")
        to_parent = np.eye(4)
        to_parent[:3, :3] = rotation([1.0, -0.4, 0.2], 33)
        to_parent[:3, 3] = [40.0, 7.0, -12.0]
        transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(to_parent))
        volume.SetAndObserveTransformNodeID(transform.GetID())
    return volume


def world_ijk_of_segment_voxels(segmentation_node, segment_id, volume_node):
    """IJK (in the volume) of every voxel of a segment, located via the segment's own labelmap and transforms."""
    image = segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    label_value = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    dims = image.GetDimensions()
    extent = image.GetExtent()
    values = vtk.util.numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
    k, j, i = np.nonzero(values == label_value)
    index = np.stack([i + extent[0], j + extent[2], k + extent[4]], axis=1).astype(float)
    image_to_node = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(image_to_node)
    to_world = geometry.parent_to_world(segmentation_node) @ slicer.util.arrayFromVTKMatrix(image_to_node)
    world = index @ to_world[:3, :3].T + to_world[:3, 3]
    return geometry.world_to_ijk(volume_node, world)


def disc_mask(center_xy, radius, shape=SHAPE_KJI[1:]):
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return (cols - center_xy[0]) ** 2 + (rows - center_xy[1]) ** 2 <= radius ** 2


def chat(organ="liver", mask=None, boxes=(), closer_roi=None, round_=1):
    masks = [] if mask is None else [MaskPrediction(organ=organ, mask=mask, score=0.9, round=round_)]
    look = CloserLookInfo(ran=closer_roi is not None, roi_xyxy=None if closer_roi is None else np.array(closer_roi),
                          canonical_size=256, organ=organ)
    return ChatResult(text=f"The {organ} is the large homogeneous organ.", target_organ=organ, masks=masks,
                      boxes=[BoxPrediction(organ=organ, xyxy=np.array(b), score=s) for b, s in boxes],
                      closer_look=look)


PROVENANCE = segments.Provenance(query="segment the liver", model_id="CTReasoner-Tiny", reasoning="because")


# ------------------------------------------------------------------------------------------------ geometry


@pytest.mark.parametrize("transformed", [False, True])
def test_mask_lands_on_slice_k_at_the_right_voxels(slicer_scene, transformed):
    volume = make_volume(transformed=transformed)
    mask = disc_mask((7, 12), 4)
    mask[2, 20] = True                                  # an asymmetric pixel catches flipped axes
    applied = apply_results(volume, {3: chat(mask=mask)}, PROVENANCE, policy="ask")

    seg_node = slicer_scene.GetNodeByID(applied.segmentation_node_id)
    segment_id = applied.segment_ids["liver"]
    ijk = world_ijk_of_segment_voxels(seg_node, segment_id, volume)
    assert np.allclose(ijk, np.round(ijk), atol=1e-4)
    found = {tuple(int(v) for v in np.round(p)) for p in ijk}
    expected = {(int(i), int(j), 3) for j, i in zip(*np.nonzero(mask))}
    assert found == expected
    assert seg_node.GetName() == "ct CTReasoner"
    assert seg_node.GetTransformNodeID() == volume.GetTransformNodeID()


def test_second_slice_keeps_the_first(slicer_scene):
    volume = make_volume()
    apply_results(volume, {2: chat(mask=disc_mask((10, 10), 3))}, PROVENANCE)
    apply_results(volume, {3: chat(mask=disc_mask((11, 9), 2))}, PROVENANCE)
    seg_node = segments.find_segmentation_node(volume)
    (segment_id,) = segments.organ_segment_ids(seg_node, get_organ("liver"))
    array = segments.read_segment_array(seg_node, segment_id, volume)
    assert np.array_equal(array[2], disc_mask((10, 10), 3))
    assert np.array_equal(array[3], disc_mask((11, 9), 2))
    assert array[[0, 1, 4, 5]].sum() == 0


def test_segment_identity_terminology_and_provenance(slicer_scene):
    volume = make_volume()
    applied = apply_results(volume, {1: chat("left adrenal gland", disc_mask((5, 5), 2))}, PROVENANCE)
    seg_node = slicer_scene.GetNodeByID(applied.segmentation_node_id)
    segment = seg_node.GetSegmentation().GetSegment(applied.segment_ids["left_adrenal_gland"])
    organ = get_organ("left_adrenal_gland")
    assert segment.GetName() == "left adrenal gland"
    assert np.allclose(segment.GetColor(), np.array(organ.color) / 255.0)
    assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated()
    assert segments.get_tag(segment, segment.GetTerminologyEntryTagName()) == slicer_terminology_string(organ)
    assert segments.get_tag(segment, segments.TAG_QUERY) == "segment the liver"
    assert segments.get_tag(segment, segments.TAG_MODEL_ID) == "CTReasoner-Tiny"
    assert segments.get_tag(segment, segments.TAG_REASONING) == "because"
    assert segments.get_tag(segment, segments.TAG_TIMESTAMP) == PROVENANCE.timestamp
    assert segments.get_tag(segment, segments.TAG_SLICES) == "1"


def test_wrong_mask_shape_is_refused_before_writing(slicer_scene):
    volume = make_volume()
    with pytest.raises(CTReasonerError, match="pixel frame"):
        apply_results(volume, {1: chat(mask=np.ones((24, 20), bool))}, PROVENANCE)
    assert segments.find_segmentation_node(volume) is None or \
        segments.find_segmentation_node(volume).GetSegmentation().GetNumberOfSegments() == 0


def aligned_slice_node(volume, k, tilt_degrees=0.0):
    """A Red slice node whose plane is the volume's slice k (in world), optionally tilted about the view's x axis."""
    ijk_to_world = geometry.volume_ijk_to_world(volume)
    axes = ijk_to_world[:3, :3] / np.linalg.norm(ijk_to_world[:3, :3], axis=0)
    axes = axes @ rotation([1, 0, 0], tilt_degrees)
    slice_to_ras = np.eye(4)
    slice_to_ras[:3, :3] = axes
    slice_to_ras[:3, 3] = geometry.ijk_to_world(volume, [11.5, 9.0, k + 0.3])
    node = slicer.vtkMRMLSliceNode()
    node.SetName("Red")
    node.GetSliceToRAS().DeepCopy(slicer.util.vtkMatrixFromArray(slice_to_ras))
    return node


def test_current_slice_from_an_aligned_red_view(slicer_scene):
    volume = make_volume()
    assert geometry.slice_index_from_slice_node(volume, aligned_slice_node(volume, 4)) == 4
    assert geometry.slice_index_from_slice_node(volume, aligned_slice_node(volume, 0)) == 0


def test_tilted_or_outside_red_view_is_refused(slicer_scene):
    volume = make_volume()
    with pytest.raises(geometry.SliceGeometryError, match="not aligned with the axial"):
        geometry.slice_index_from_slice_node(volume, aligned_slice_node(volume, 3, tilt_degrees=20))
    with pytest.raises(geometry.SliceGeometryError, match="outside"):
        geometry.slice_index_from_slice_node(volume, aligned_slice_node(volume, 9))


def test_non_linear_parent_transform_is_refused(slicer_scene):
    volume = make_volume(transformed=False)
    grid = slicer_scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    volume.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(geometry.SliceGeometryError, match="non-linear"):
        geometry.volume_ijk_to_world(volume)


# ------------------------------------------------------------------------------------------------ ROIs


def roi_object_coordinates(roi, world_points):
    to_world = roi.GetObjectToWorldMatrix()
    to_object = np.linalg.inv(slicer.util.arrayFromVTKMatrix(to_world))
    return world_points @ to_object[:3, :3].T + to_object[:3, 3]


def test_box_roi_covers_exactly_the_box_pixels(slicer_scene):
    volume = make_volume()
    xyxy = (4, 6, 13, 11)
    applied = apply_results(volume, {2: chat("left adrenal gland", boxes=[(xyxy, 0.93)])}, PROVENANCE)
    (roi_id,) = applied.box_roi_ids
    roi = slicer_scene.GetNodeByID(roi_id)
    assert roi.GetName() == "left adrenal gland box 1 (0.93)"
    half = np.asarray(roi.GetSize()) / 2
    # pixel corners of the box on slice 2 (continuous IJK) are on the ROI boundary, pixel centres inside
    corners = np.array([[x, y, z] for x in (3.5, 12.5) for y in (5.5, 10.5) for z in (1.5, 2.5)])
    local = roi_object_coordinates(roi, geometry.ijk_to_world(volume, corners))
    assert np.allclose(np.abs(local), half, atol=1e-6)
    centres = np.array([[x, y, 2] for x in range(4, 13) for y in range(6, 11)], dtype=float)
    assert (np.abs(roi_object_coordinates(roi, geometry.ijk_to_world(volume, centres))) < half).all()
    outside = np.array([[3, 8, 2], [13, 8, 2], [8, 5, 2], [8, 11, 2], [8, 8, 1], [8, 8, 3]], dtype=float)
    local_out = np.abs(roi_object_coordinates(roi, geometry.ijk_to_world(volume, outside)))
    assert (local_out > half).any(axis=1).all()
    assert rois.roi_pixel_box(volume, roi, 2).tolist() == list(xyxy)


def test_closer_look_roi_and_box_numbering(slicer_scene):
    volume = make_volume()
    result = chat("pancreas", mask=disc_mask((9, 9), 3), boxes=[((2, 2, 6, 6), 0.5), ((8, 8, 12, 14), 0.71)],
                  closer_roi=(3, 3, 15, 15), round_=2)
    result.boxes[1].source = "mask"  # a fused box (detection.box_source "fused")
    applied = apply_results(volume, {1: result}, PROVENANCE)
    names = [slicer_scene.GetNodeByID(i).GetName() for i in applied.box_roi_ids]
    assert names == ["pancreas box 1 (0.50)", "pancreas box 2 (0.71)"]
    assert [slicer_scene.GetNodeByID(i).GetAttribute(rois.ATTR_BOX_SOURCE) for i in applied.box_roi_ids] == \
        ["detection", "mask"]
    (look_id,) = applied.closer_look_roi_ids
    look = slicer_scene.GetNodeByID(look_id)
    assert look.GetName() == "pancreas closer look (slice 1)"
    assert rois.roi_pixel_box(volume, look, 1).tolist() == [3, 3, 15, 15]


def test_round_two_mask_wins_over_round_one(slicer_scene):
    volume = make_volume()
    result = chat(mask=disc_mask((10, 10), 5))
    result.masks.append(MaskPrediction(organ="liver", mask=disc_mask((10, 10), 2), round=2))
    applied = apply_results(volume, {2: result}, PROVENANCE)
    array = segments.read_segment_array(segments.find_segmentation_node(volume), applied.segment_ids["liver"], volume)
    assert np.array_equal(array[2], disc_mask((10, 10), 2))


# ------------------------------------------------------------------------------------------------ no overwrite


def user_liver_segment(volume, slices=(2,)):
    seg_node = segments.segmentation_node_for_volume(volume)
    segment_id = seg_node.GetSegmentation().AddEmptySegment("", "liver", (1, 0, 0))
    array = np.zeros(SHAPE_KJI, np.uint8)
    for k in slices:
        array[k] = disc_mask((12, 10), 6)
    slicer.util.updateSegmentBinaryLabelmapFromArray(array, seg_node, segment_id, volume)
    return seg_node, segment_id, array


def test_user_segment_is_never_silently_overwritten(slicer_scene):
    volume = make_volume()
    seg_node, user_id, user_array = user_liver_segment(volume)
    with pytest.raises(segments.SegmentConflict, match="made or edited by the user"):
        apply_results(volume, {3: chat(mask=disc_mask((5, 5), 2))}, PROVENANCE, policy="ask")
    assert seg_node.GetSegmentation().GetNumberOfSegments() == 1
    assert np.array_equal(segments.read_segment_array(seg_node, user_id, volume), user_array)

    applied = apply_results(volume, {2: chat(mask=disc_mask((5, 5), 2))}, PROVENANCE, policy="new")
    new_segment = seg_node.GetSegmentation().GetSegment(applied.segment_ids["liver"])
    assert new_segment.GetName() == "liver 2"
    assert np.array_equal(segments.read_segment_array(seg_node, user_id, volume), user_array)


def test_replace_changes_only_the_answered_slice(slicer_scene):
    volume = make_volume()
    seg_node, user_id, user_array = user_liver_segment(volume, slices=(2, 3))
    apply_results(volume, {3: chat(mask=disc_mask((5, 5), 2))}, PROVENANCE, policy="replace")
    array = segments.read_segment_array(seg_node, user_id, volume)
    assert np.array_equal(array[2], user_array[2])
    assert np.array_equal(array[3], disc_mask((5, 5), 2))


def test_edit_after_our_write_makes_it_the_users(slicer_scene):
    volume = make_volume()
    applied = apply_results(volume, {2: chat(mask=disc_mask((10, 10), 3))}, PROVENANCE)
    seg_node = segments.find_segmentation_node(volume)
    # a fresh slice of our own unedited segment is no conflict
    apply_results(volume, {4: chat(mask=disc_mask((10, 10), 3))}, PROVENANCE, policy="ask")
    # the same slice again is
    with pytest.raises(segments.SegmentConflict, match=r"content on slice\(s\) \[2\]"):
        apply_results(volume, {2: chat(mask=disc_mask((3, 3), 1))}, PROVENANCE, policy="ask")
    # and after a user edit (e.g. Segment Editor paint) anything is
    array = segments.read_segment_array(seg_node, applied.segment_ids["liver"], volume)
    array[5, 0, 0] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(array, seg_node, applied.segment_ids["liver"], volume)
    with pytest.raises(segments.SegmentConflict, match="edited by the user"):
        apply_results(volume, {1: chat(mask=disc_mask((3, 3), 1))}, PROVENANCE, policy="ask")


def test_ask_checks_every_organ_before_writing_any(slicer_scene):
    volume = make_volume()
    user_liver_segment(volume)
    result = chat("spleen", mask=disc_mask((4, 4), 2))
    result.masks.append(MaskPrediction(organ="liver", mask=disc_mask((9, 9), 2)))
    with pytest.raises(segments.SegmentConflict):
        apply_results(volume, {2: result}, PROVENANCE, policy="ask")
    seg_node = segments.find_segmentation_node(volume)
    assert segments.organ_segment_ids(seg_node, get_organ("spleen")) == []


def test_fill_empty_only_keeps_occupied_slices(slicer_scene):
    volume = make_volume()
    seg_node, user_id, user_array = user_liver_segment(volume, slices=(2,))
    results = {k: chat(mask=disc_mask((6, 6), 2)) for k in (1, 2, 3)}
    apply_results(volume, results, PROVENANCE, policy="ask", target_segment_ids={"liver": user_id},
                  fill_empty_only=True)
    array = segments.read_segment_array(seg_node, user_id, volume)
    assert np.array_equal(array[2], user_array[2])
    assert np.array_equal(array[1], disc_mask((6, 6), 2)) and np.array_equal(array[3], disc_mask((6, 6), 2))


# ------------------------------------------------------------------------------------------------ undo


def test_undo_restores_segments_and_removes_rois_edit_by_edit(slicer_scene):
    volume = make_volume()
    stack = UndoStack()
    seg_node, user_id, user_array = user_liver_segment(volume, slices=(2,))
    first = apply_results(volume, {2: chat(mask=disc_mask((5, 5), 2), boxes=[((1, 1, 4, 4), 0.8)])},
                          PROVENANCE, policy="replace")
    stack.push(first.undo_entry)
    second = apply_results(volume, {2: chat(mask=disc_mask((15, 15), 3))}, PROVENANCE, policy="new")
    stack.push(second.undo_entry)
    assert seg_node.GetSegmentation().GetNumberOfSegments() == 2

    stack.undo(slicer_scene)                                  # the "liver 2" segment goes away
    assert seg_node.GetSegmentation().GetNumberOfSegments() == 1
    assert np.array_equal(segments.read_segment_array(seg_node, user_id, volume)[2], disc_mask((5, 5), 2))

    stack.undo(slicer_scene)                                  # the user's slice and status come back
    assert np.array_equal(segments.read_segment_array(seg_node, user_id, volume), user_array)
    assert slicer_scene.GetNodeByID(first.box_roi_ids[0]) is None
    segment = seg_node.GetSegmentation().GetSegment(user_id)
    assert segments.get_tag(segment, segments.TAG_QUERY) == ""
    assert segments.edited_by_user(segment, user_array)
    assert stack.undo(slicer_scene) is None


def test_undo_stack_is_bounded(slicer_scene):
    volume = make_volume()
    stack = UndoStack(max_depth=2)
    for k in range(4):
        stack.push(apply_results(volume, {k: chat(mask=disc_mask((5, 5), 1))}, PROVENANCE).undo_entry)
    assert len(stack) == 2


# ------------------------------------------------------------------------------------------------ files


def test_seg_nrrd_and_roi_json_round_trip(slicer_scene, tmp_path):
    volume = make_volume(transformed=False)
    mask = disc_mask((8, 9), 3)
    applied = apply_results(volume, {3: chat("spleen", mask, boxes=[((2, 3, 9, 12), 0.66)])}, PROVENANCE)
    seg_node = slicer_scene.GetNodeByID(applied.segmentation_node_id)
    roi = slicer_scene.GetNodeByID(applied.box_roi_ids[0])
    seg_path, roi_path = str(tmp_path / "ct.seg.nrrd"), str(tmp_path / "ct_boxes.mrk.json")
    assert slicer.util.saveNode(seg_node, seg_path)
    assert slicer.util.saveNode(roi, roi_path)

    loaded_seg = slicer.util.loadSegmentation(seg_path)
    loaded_id = loaded_seg.GetSegmentation().GetSegmentIdBySegmentName("spleen")
    assert np.array_equal(segments.read_segment_array(loaded_seg, loaded_id, volume)[3], mask)
    loaded_segment = loaded_seg.GetSegmentation().GetSegment(loaded_id)
    assert segments.get_tag(loaded_segment, segments.TAG_QUERY) == "segment the liver"
    loaded_roi = slicer.util.loadMarkups(roi_path)
    assert loaded_roi.IsA("vtkMRMLMarkupsROINode")
    assert np.allclose(loaded_roi.GetSize(), roi.GetSize()) and np.allclose(loaded_roi.GetCenter(), roi.GetCenter())
    assert rois.roi_pixel_box(volume, loaded_roi, 3).tolist() == [2, 3, 9, 12]


def test_shipped_color_table_matches_the_organ_table(slicer_scene, tmp_path):
    regenerated = terminology.write_organ_color_table(slicer_scene, str(tmp_path / "organs.csv"))
    with open(regenerated) as fresh, open(terminology.COLOR_TABLE_FILE) as shipped:
        assert fresh.read() == shipped.read(), "stale: python -m CTReasonerLib.slicer.terminology"
    with open(terminology.COLOR_TABLE_FILE) as handle:
        rows = {int(r["LabelValue"]): r for r in csv.DictReader(handle)}
    for organ in ORGANS:
        row = rows[organ.label]
        assert row["Name"] == organ.name
        assert (int(row["Color_R"]), int(row["Color_G"]), int(row["Color_B"])) == organ.color
        assert row["Type_CodeValue"] == organ.snomed_type[0]
    table = slicer.vtkMRMLColorTableNode()
    slicer_scene.AddNode(table)
    storage = slicer.vtkMRMLColorTableStorageNode()
    slicer_scene.AddNode(storage)
    storage.SetFileName(terminology.COLOR_TABLE_FILE)
    assert storage.ReadData(table)
    assert table.GetColorName(13) == "left adrenal gland"
    assert "7771000" in table.GetTerminologyAsString(13)
    assert os.path.basename(terminology.COLOR_TABLE_FILE) == "CTReasonerOrgans.csv"
