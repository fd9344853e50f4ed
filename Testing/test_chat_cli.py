"""``ctreasoner chat``: outputs loaded with slicer-core's real loaders land on the right voxels; clean errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fixtures_headless import LabelPipeline, oblique_directions, tiny_model_dir, write_phantom  # noqa: F401

from CTReasonerLib.cli import main
from CTReasonerLib.errors import ConfigError
from CTReasonerLib.headless.outputs import box_names, chat_to_files
from CTReasonerLib.headless.volume_chat import ChatTurn, load_pipeline, parse_slices
from CTReasonerLib.io.slices import extract_axial_slice
from CTReasonerLib.organs import get_organ

slicer = pytest.importorskip("slicer")
from slicer_fixtures import slicer_scene  # noqa: E402,F401
from test_slicer_files import _inside_roi  # noqa: E402

QUERY = "segment the liver and detect the adrenal glands"


def _load_in_slicer(ct_path: Path, outputs):
    """The CT, the segmentation and the ROIs as Slicer loads them (slicer.util, real storage nodes)."""
    volume_node = slicer.util.loadVolume(str(ct_path))
    segmentation_node = slicer.util.loadSegmentation(str(outputs.segmentation))
    slicer.util.loadMarkups(str(outputs.boxes))
    rois = {node.GetName(): node for node in slicer.util.getNodesByClass("vtkMRMLMarkupsROINode")}
    return volume_node, segmentation_node, rois


def _segment_array(segmentation_node, organ_key: str, volume_node) -> np.ndarray:
    segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(get_organ(organ_key).name)
    assert segment_id, f"no segment named {get_organ(organ_key).name}"
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume_node).astype(bool)


def _in_slicer_grid(mask_kji: np.ndarray, volume, volume_node) -> np.ndarray:
    """``mask_kji`` on our volume's grid re-indexed into the grid Slicer loaded the same file on, through RAS.

    Slicer may index the same voxels differently (it flips K of a left-handed NRRD), so voxels are compared
    by their RAS position, which is what must agree.
    """
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(matrix)
    ras_to_slicer_ijk = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    ours_to_slicer = ras_to_slicer_ijk @ volume.ijk_to_ras
    assert np.allclose(ours_to_slicer, np.round(ours_to_slicer), atol=1e-4), "the grids must share voxels"
    k, j, i = np.nonzero(mask_kji)
    i2, j2, k2, _ = np.round(ours_to_slicer @ np.stack([i, j, k, np.ones_like(i)])).astype(int)
    moved = np.zeros(slicer.util.arrayFromVolume(volume_node).shape, bool)
    moved[k2, j2, i2] = True
    return moved


def _assert_roi_covers_box(node, axial_slice, xyxy):
    """Box pixel centres (edge xyxy: pixels x0..x1-1) are inside the ROI; the ring around it and slice k+1 not."""
    x0, y0, x1, y1 = (int(v) for v in xyxy)
    xs, ys = np.meshgrid(np.arange(x0 - 1, x1 + 1), np.arange(y0 - 1, y1 + 1))
    pixels = np.c_[xs.ravel(), ys.ravel()]
    in_box = (pixels[:, 0] >= x0) & (pixels[:, 0] < x1) & (pixels[:, 1] >= y0) & (pixels[:, 1] < y1)
    assert np.array_equal(_inside_roi(node, axial_slice.pixel_to_ras(pixels)), in_box)
    above = axial_slice.pixel_to_ras(pixels[in_box]) + axial_slice.ijk_to_ras[:3, 2]
    assert not _inside_roi(node, above).any()


@pytest.mark.parametrize("grid", ["phantom_lps", "oblique", "stored_sagittally"])
def test_outputs_land_on_slice_k_at_the_pipeline_voxels_in_slicer(tmp_path, slicer_scene, grid):
    from CTReasonerLib.io.slices import reorient_axial

    ct_path, ct, labels = write_phantom(tmp_path / "in", directions=oblique_directions() if grid == "oblique" else None,
                                        sagittal=grid == "stored_sagittally")
    # chat works on axial slices: a sagittally stored file is read with its axes permuted (exact, same voxels)
    ct, labels = reorient_axial(ct), reorient_axial(labels)
    liver_slices = np.nonzero((labels.array == get_organ("liver").label).any(axis=(1, 2)))[0]
    adrenal = (labels.array == get_organ("right_adrenal_gland").label).any(axis=(1, 2))
    k = int(np.nonzero(adrenal & np.isin(np.arange(len(adrenal)), liver_slices))[0][0])
    pipeline = LabelPipeline(ct, labels)
    run = chat_to_files(str(ct_path), pipeline, [ChatTurn(QUERY)], f"{k}:{k + 2}", tmp_path / "out")

    volume_node, segmentation_node, rois = _load_in_slicer(ct_path, run.outputs)
    liver = _segment_array(segmentation_node, "liver", volume_node)
    expected = np.zeros(ct.array.shape, bool)
    for slice_k in (k, k + 1):
        expected[slice_k] = pipeline.chat(ct.array[slice_k], "segment the liver").masks[0].mask
    assert expected[k].any() and np.array_equal(liver, _in_slicer_grid(expected, ct, volume_node))
    assert segmentation_node.GetSegmentation().GetSegment("liver").GetColor() == pytest.approx(
        np.array(get_organ("liver").color) / 255.0)

    boxes = [(slice_k, box) for slice_k in (k, k + 1)
             for box in pipeline.chat(ct.array[slice_k], "detect the adrenal glands").boxes]
    assert boxes and len(rois) == len(boxes)
    for name, (slice_k, box) in zip(box_names(boxes), boxes):
        assert "score 0.800" in rois[name].GetNthControlPointDescription(0)
        _assert_roi_covers_box(rois[name], extract_axial_slice(ct, slice_k), box.xyxy)

    transcript = json.loads(run.outputs.transcript.read_text())
    turn = transcript["slices"][0]["turns"][0]
    assert transcript["turns"][0]["query"] == QUERY and transcript["slices"][0]["k"] == k
    assert turn["routing_tokens"] == ["[SEG]", "[DET]", "[DET]"] and turn["target_organ"] == "liver"
    assert {"read_volume", "chat", "write_outputs"} <= set(transcript["timings_s"])
    from PIL import Image

    overlay = np.asarray(Image.open(run.outputs.overlay).convert("RGB"))
    assert (np.abs(overlay.astype(int) - get_organ("liver").color).sum(axis=2) == 0).any()   # outline colour


def test_cli_chat_with_a_tiny_model_writes_what_the_pipeline_answers(tmp_path, slicer_scene, tiny_model_dir, capsys):
    ct_path, ct, _ = write_phantom(tmp_path / "in", directions=oblique_directions())
    out = tmp_path / "out"
    code = main(["chat", str(ct_path), QUERY, "--slice", "5", "--model", str(tiny_model_dir), "--out", str(out),
                 "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0 and str(out) in printed and "phantom_3.seg.nrrd" in printed
    name = "phantom_3"
    transcript = json.loads((out / "transcript.json").read_text())
    assert [s["k"] for s in transcript["slices"]] == [5] and transcript["model"] == tiny_model_dir.name
    assert {"load_model", "read_volume", "chat", "write_outputs"} <= set(transcript["timings_s"])

    direct = load_pipeline(str(tiny_model_dir), "cpu").chat(ct.array[5], QUERY)
    assert transcript["slices"][0]["turns"][0]["raw_text"] == direct.raw_text
    volume_node = slicer.util.loadVolume(str(ct_path))
    segmentation_node = slicer.util.loadSegmentation(str(out / f"{name}.seg.nrrd"))
    for prediction in direct.masks:      # a random model may segment nothing; then the file has no segments
        expected = np.zeros(ct.array.shape, bool)
        expected[5] = prediction.mask
        written = _segment_array(segmentation_node, prediction.organ, volume_node)
        assert np.array_equal(written, _in_slicer_grid(expected, ct, volume_node))
    assert segmentation_node.GetSegmentation().GetNumberOfSegments() == len({m.organ for m in direct.masks})
    boxes = json.loads((out / f"{name}_boxes.mrk.json").read_text())["markups"]
    assert len(boxes) == len(direct.boxes)
    assert (out / f"{name}_overlay.png").stat().st_size > 0


def test_parse_slices_default_ranges_lists_and_refusals():
    assert parse_slices(None, 9) == [4]
    assert parse_slices("all", 3) == [0, 1, 2]
    assert parse_slices("2:5", 9) == [2, 3, 4] and parse_slices("0:9:4", 9) == [0, 4, 8]
    assert parse_slices("7:", 9) == [7, 8] and parse_slices("8,1,1", 9) == [1, 8]
    for bad, message in (("9", "outside"), ("3:12", "outside"), ("5:5", "no slices"), ("a:b", "cannot read"),
                         ("-1", "outside"), ("1:4:0", "cannot read")):
        with pytest.raises(ConfigError, match=message):
            parse_slices(bad, 9)


def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    return err


def test_chat_refuses_bad_input_with_clean_messages(tmp_path, capsys):
    ct_path, _, _ = write_phantom(tmp_path / "in")
    labels_path = tmp_path / "in" / "phantom_3_labels.nrrd"
    missing_model = str(tmp_path / "no_model")
    assert "no such file" in _error(capsys, ["chat", str(tmp_path / "nope.nrrd"), "segment the liver"])
    assert "label map" in _error(capsys, ["chat", str(labels_path), "segment the liver", "--model", missing_model])
    assert "outside the volume" in _error(capsys, ["chat", str(ct_path), "segment the liver", "--slice", "10"])
    assert "query is empty" in _error(capsys, ["chat", str(ct_path), "  "])
    assert "does not exist" in _error(capsys, ["chat", str(ct_path), "segment the liver", "--model", missing_model])
    corrupt = tmp_path / "corrupt_model"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    err = _error(capsys, ["chat", str(ct_path), "segment the liver", "--model", str(corrupt), "--device", "cpu"])
    assert str(corrupt) in err and "hint:" in err


def test_missing_bundled_model_names_the_training_command(tmp_path, monkeypatch, capsys):
    from CTReasonerLib.headless import volume_chat

    monkeypatch.setattr(volume_chat, "DEFAULT_MODEL_DIR", str(tmp_path / "Models" / "CTReasoner-Tiny"))
    ct_path, _, _ = write_phantom(tmp_path / "in")
    err = _error(capsys, ["chat", str(ct_path), "segment the liver"])
    assert "CTReasoner-Tiny is missing" in err and "ctreasoner train configs/tiny_cpu.yaml" in err
    err = _error(capsys, ["demo", "--out", str(tmp_path / "demo")])
    assert "CTReasoner-Tiny is missing" in err and not (tmp_path / "demo" / "transcript.json").exists()


def test_demo_writes_slicer_outputs_for_the_generated_sample(tmp_path, tiny_model_dir, capsys):
    from CTReasonerLib.io.readers import read_volume

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--model", str(tiny_model_dir), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "Dice against the phantom's labels" in printed and str(out) in printed
    sample = read_volume(out / "ctreasoner_sample.nrrd")
    transcript = json.loads((out / "transcript.json").read_text())
    assert [t["closer_look"] for t in transcript["turns"]] == [None, True]
    slices = [s["k"] for s in transcript["slices"]]
    assert len(slices) == 3 and all(0 <= k < sample.array.shape[0] for k in slices)
    for name in ("ctreasoner_sample.seg.nrrd", "ctreasoner_sample_boxes.mrk.json", "ctreasoner_sample_overlay.png"):
        assert (out / name).stat().st_size > 0


def test_demo_slices_show_the_demo_organs():
    from CTReasonerLib.commands.demo import DEMO_ORGANS, informative_slices
    from CTReasonerLib.data.phantom import PhantomConfig, generate_phantom

    _, labels = generate_phantom(7, PhantomConfig(shape=(64, 64, 24)))
    chosen = informative_slices(labels.array, 3)
    assert len(chosen) == 3 and np.all(np.diff(chosen) > 1)
    wanted = [get_organ(key).label for key in DEMO_ORGANS]
    best = max(np.isin(wanted, np.unique(labels.array[k])).sum() for k in range(labels.array.shape[0]))
    assert max(np.isin(wanted, np.unique(labels.array[k])).sum() for k in chosen) == best
