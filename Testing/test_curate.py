"""Curation pipeline: slice selection, prompts, descriptions, schema, review, Q&A, splits, LLM writer, CLI."""
from __future__ import annotations

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest

from CTReasonerLib.cli import main as cli_main
from CTReasonerLib.data.curate.config import SMALL_ORGANS, CurationConfig
from CTReasonerLib.data.curate.describe import describe_organ
from CTReasonerLib.data.curate.llm_writer import LLMDescriptionWriter, LLMWriterConfig, extract_json_object
from CTReasonerLib.data.curate.measure import build_slice_context, measure_organ
from CTReasonerLib.data.curate.pipeline import curate_dataset, curate_volume, split_subjects
from CTReasonerLib.data.curate.prompts import center_point, component_boxes, organ_prompts
from CTReasonerLib.data.curate.qa import ROUTING_TOKENS, routing_token_of
from CTReasonerLib.data.curate.review import review_description
from CTReasonerLib.data.curate.schema import description_errors, record_errors
from CTReasonerLib.data.curate.selection import label_iou, select_slices
from CTReasonerLib.data.curate.sources import load_mapping
from CTReasonerLib.data.curate.sources import VolumeSource
from CTReasonerLib.errors import ConfigError
from CTReasonerLib.organs import get_organ
from fixtures_curate import make_synthetic_pair

LIVER, SPLEEN = get_organ("liver").label, get_organ("spleen").label
RIGHT_ADRENAL = get_organ("right_adrenal_gland").label


def _disc(shape, center, radius):
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius ** 2


# ---------------------------------------------------------------- slice selection

def _growing_liver_volume():
    """Slices 0-2 background; liver 3..20 with radius 20 -> 24 -> 20.5 (peak at 11); 21-23 background."""
    labels = np.zeros((24, 80, 80), dtype=np.uint8)
    for k in range(3, 21):
        radius = 20 + (k - 3) * 0.5 if k <= 11 else 24 - (k - 11) * 0.5
        labels[k][_disc(labels.shape[1:], (40, 40), radius)] = LIVER
    return labels


def test_redundancy_filter_keeps_onset_peak_offset_and_drops_redundant_neighbours():
    labels = _growing_liver_volume()
    config = CurationConfig(max_gap_slices=100)
    selection = select_slices(labels, config)
    assert {3, 11, 20} <= set(selection.retained)                    # onset, peak, offset
    assert not set(selection.retained) & {0, 1, 2, 21, 22, 23}      # background only
    assert selection.dropped_background == 6
    assert selection.dropped_redundant > 0
    # every dropped foreground slice really is redundant with the retained slice before it
    for k in range(3, 21):
        if k in selection.retained:
            continue
        previous = max(r for r in selection.retained if r < k)
        assert label_iou(labels[k], labels[previous]) >= 0.75
    # consecutive retained slices are not all neighbours (something was filtered)
    assert len(selection.retained) < 18


def test_redundancy_filter_max_gap_bounds_skips():
    labels = _growing_liver_volume()
    selection = select_slices(labels, CurationConfig(max_gap_slices=2))
    gaps = np.diff(selection.retained)
    assert gaps.max() <= 3


def test_protected_small_organ_keeps_slices_the_rest_would_drop():
    labels = np.zeros((16, 80, 80), dtype=np.uint8)
    for k in range(16):
        labels[k][_disc(labels.shape[1:], (40, 30), 18)] = LIVER
        labels[k][_disc(labels.shape[1:], (20, 60 - (k // 2) * 3), 2.5)] = RIGHT_ADRENAL  # moves every 2 slices
    protected = select_slices(labels, CurationConfig(max_gap_slices=100))
    unprotected = select_slices(labels, CurationConfig(max_gap_slices=100, protected_organs=()))
    assert len(unprotected.retained) < len(protected.retained)
    # each new adrenal position is represented when protected
    positions = {k // 2 for k in protected.retained}
    assert positions == set(range(8))


# ---------------------------------------------------------------- prompts

def test_component_boxes_one_per_component_exclusive_max_and_speck_ignored():
    mask = np.zeros((40, 60), dtype=bool)
    mask[5:15, 10:20] = True          # 100 px
    mask[25:30, 40:52] = True         # 60 px
    mask[35, 2] = True                # 1 px speck
    boxes, areas = component_boxes(mask, min_component_area_px=8)
    assert boxes == [[10, 5, 20, 15], [40, 25, 52, 30]]
    assert areas == [100, 60]
    for x0, y0, x1, y1 in boxes:
        assert mask[y0:y1, x0:x1].any() and mask[y0, x0] and mask[y1 - 1, x1 - 1]


def test_tiny_organ_still_gets_a_box_and_center_hits_the_mask():
    mask = np.zeros((20, 20), dtype=bool)
    mask[3, 4] = mask[3, 5] = True
    prompts = organ_prompts(mask, min_component_area_px=8)
    assert prompts.boxes == [[4, 3, 6, 4]]
    x, y = prompts.center
    assert mask[int(round(y)), int(round(x))]


def test_center_point_of_a_ring_lies_on_the_mask():
    ring = _disc((50, 50), (25, 25), 15) & ~_disc((50, 50), (25, 25), 10)
    x, y = center_point(ring)
    assert ring[int(round(y)), int(round(x))]
    assert (x, y) != (25.0, 25.0)


# ---------------------------------------------------------------- measurement and descriptions

@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic_pair(shape=(40, 96, 96), seed=0)


def _geometry(ct, labels, k, organ_key, config=None):
    config = config or CurationConfig()
    context = build_slice_context(ct.array[k], labels[k], k, ct.ijk_to_ras, ct.spacing)
    prompts = organ_prompts(labels[k] == get_organ(organ_key).label, config.min_component_area_px)
    return measure_organ(context, organ_key, prompts, config)


def test_sides_come_from_ras_not_pixel_columns(synthetic):
    ct, labels = synthetic
    k = 22
    assert _geometry(ct, labels, k, "liver").side == "right"        # low columns on an LPS grid
    assert _geometry(ct, labels, k, "spleen").side == "left"
    # the same pixels on a grid whose columns run to the patient's right: sides swap
    flipped = ct.with_array(ct.array)
    flipped.directions = np.diag([1.0, -1.0, 1.0])
    assert _geometry(flipped, labels, k, "liver").side == "left"
    assert _geometry(flipped, labels, k, "spleen").side == "right"


def test_description_is_schema_valid_and_accepted(synthetic):
    ct, labels = synthetic
    config = CurationConfig()
    for organ in ("liver", "spleen", "aorta", "stomach"):
        geometry = _geometry(ct, labels, 22, organ)
        description = describe_organ(geometry, config)
        assert description_errors(description) == []
        assert review_description(description, geometry, config) == ("accepted", [])
    liver = describe_organ(_geometry(ct, labels, 22, "liver"), config)
    spleen = describe_organ(_geometry(ct, labels, 22, "spleen"), config)
    assert liver["intensity"]["reference"] == "soft tissue" and spleen["intensity"]["reference"] == "liver"
    assert liver["size"]["area_cm2"] > spleen["size"]["area_cm2"] > 0
    assert spleen["intensity"]["density"] == "hyperdense"   # 115 HU against the 100 HU liver


def test_schema_rejects_invalid_descriptions(synthetic):
    ct, labels = synthetic
    geometry = _geometry(ct, labels, 22, "spleen")
    valid = describe_organ(geometry, CurationConfig())
    missing = copy.deepcopy(valid)
    del missing["shape"]
    bad_enum = copy.deepcopy(valid)
    bad_enum["size"]["category"] = "huge"
    unknown_neighbour = copy.deepcopy(valid)
    unknown_neighbour["adjacent_organs"] = ["heart"]
    for broken in (missing, bad_enum, unknown_neighbour, "not an object"):
        assert description_errors(broken)
        state, reasons = review_description(broken, geometry)
        assert state == "rejected" and reasons and reasons[0].startswith("schema:")


@pytest.mark.parametrize("plant, expected", [
    (lambda d: d["position"].update(side="right"), "position says right"),
    (lambda d: d["size"].update(category="large"), "size says large"),
    (lambda d: d.update(adjacent_organs=["esophagus"]), "adjacency lists esophagus"),
    (lambda d: d["intensity"].update(density="hyperdense"), "density says hyperdense"),
    (lambda d: d.update(instance_count=3), "instance count says 3"),
    (lambda d: d["intensity"].update(mean_hu=-400.0), "mean HU says -400"),
])
def test_review_catches_planted_wrong_descriptions(synthetic, plant, expected):
    ct, labels = synthetic
    geometry = _geometry(ct, labels, 22, "left_adrenal_gland")
    description = describe_organ(geometry, CurationConfig())
    # 60 HU adrenal against the 100 HU liver, far from the esophagus
    assert geometry.side == "left" and geometry.size_category in ("tiny", "small")
    assert geometry.density == "hypodense" and "esophagus" not in geometry.neighbour_distances_mm
    assert review_description(description, geometry)[0] == "accepted"
    plant(description)
    state, reasons = review_description(description, geometry)
    assert state == "flagged"
    assert any(expected in r for r in reasons), reasons


def test_review_flags_paired_organ_on_the_wrong_side(synthetic):
    ct, labels = synthetic
    mirrored = ct.with_array(ct.array)
    mirrored.directions = np.diag([1.0, -1.0, 1.0])   # a left-right flip the label map does not know about
    geometry = _geometry(mirrored, labels, 14, "right_kidney")
    state, reasons = review_description(describe_organ(geometry, CurationConfig()), geometry)
    assert state == "flagged" and any("flipped" in r for r in reasons)


# ---------------------------------------------------------------- Q&A records

@pytest.fixture(scope="module")
def curated(synthetic):
    ct, labels = synthetic
    return curate_volume("syn", ct, labels, CurationConfig(seed=3))


def test_each_retained_slice_keeps_the_slices_about_3_mm_either_side(curated, synthetic):
    from CTReasonerLib.data.curate.pipeline import to_hu_int16

    ct, _ = synthetic                                          # 4 mm slices: the next slice on each side
    arrays = curated.arrays
    assert arrays["neighbours"].shape == (len(arrays["slice_indices"]), 2) + arrays["image"].shape[1:]
    assert arrays["neighbours"].dtype == np.int16
    last = ct.array.shape[0] - 1
    for pos, k in enumerate(arrays["slice_indices"]):
        assert np.array_equal(arrays["neighbours"][pos, 0], to_hu_int16(ct.array[max(k - 1, 0)]))
        assert np.array_equal(arrays["neighbours"][pos, 1], to_hu_int16(ct.array[min(k + 1, last)]))
    thin_ct, thin_labels = make_synthetic_pair(shape=(24, 48, 48), spacing=(1.5, 1.5, 1.0), seed=1)
    thin = curate_volume("thin", thin_ct, thin_labels, CurationConfig(seed=3)).arrays   # 1 mm: 3 slices away
    for pos, k in enumerate(thin["slice_indices"]):
        assert np.array_equal(thin["neighbours"][pos, 1], to_hu_int16(thin_ct.array[min(k + 3, 23)]))


def test_records_are_schema_valid_and_routing_tokens_are_exact(curated):
    from CTReasonerLib.model.config import CTReasonerConfig

    assert curated.records
    visible_openings = set()
    for record in curated.records:
        assert record_errors(record) == []
        name = get_organ(record["organ"]).name
        first = record["turns"][0]["answer"]
        assert name in first, first
        if record["task"] == "absent":
            assert not any(t in first for t in ROUTING_TOKENS)
            assert "not visible" in first or "no " in first or "cannot find" in first
            assert record["boxes"] == [] and record["center"] is None and not record["present"]
            assert len(record["turns"]) == 1
        else:
            expected = "[SEG]" if record["task"] == "seg" else "[DET]"
            assert first.endswith(" " + expected) and sum(first.count(t) for t in ROUTING_TOKENS) == 1
            assert record["boxes"] and record["present"]
            visible_openings.add(first.startswith(CTReasonerConfig().visible_answer_prefix.format(name=name)))
        if len(record["turns"]) == 2:
            assert record["task"] == "seg"
            second = record["turns"][1]["answer"]
            assert routing_token_of(second) == "[CLOSER]" and sum(second.count(t) for t in ROUTING_TOKENS) == 1
    # the presence rescue forces the model config's visible_answer_prefix: one of the openings trained on
    assert True in visible_openings


def test_absent_questions_only_for_organs_missing_from_the_slice(curated):
    arrays = curated.arrays
    absent = [r for r in curated.records if r["task"] == "absent"]
    assert 0.08 <= len(absent) / len(curated.records) <= 0.25
    for record in absent:
        assert not (arrays["labels"][record["slice_pos"]] == record["label"]).any()


def test_small_organs_always_get_a_closer_look_and_others_sometimes(curated):
    seg = [r for r in curated.records if r["task"] == "seg"]
    small = [r for r in seg if r["organ"] in SMALL_ORGANS]
    other = [r for r in seg if r["organ"] not in SMALL_ORGANS]
    assert small and all(len(r["turns"]) == 2 for r in small)
    share = sum(len(r["turns"]) == 2 for r in other) / len(other)
    assert 0.3 <= share <= 0.7


def test_some_questions_follow_a_dialogue_about_another_organ(curated):
    followups = [r for r in curated.records if r.get("history")]
    assert 0.15 <= len(followups) / len(curated.records) <= 0.45
    for record in followups:
        # a real dialogue of the same slice about another organ, and not itself a follow-up (no nesting)
        sources = [r for r in curated.records if r["slice_index"] == record["slice_index"]
                   and json.dumps(r["turns"]) == json.dumps(record["history"])]
        assert sources and all(r["organ"] != record["organ"] for r in sources)
    assert any(len(r["history"]) == 2 for r in followups)  # some come after a closer look
    assert any(r["task"] == "absent" for r in followups) and any(r["task"] == "seg" for r in followups)


def test_queries_vary_and_include_implicit_phrasings(curated):
    queries = [r["turns"][0]["query"] for r in curated.records]
    assert len(set(q.split(" the ")[0] for q in queries)) >= 6
    implicit = [r for r in curated.records if r["implicit"]]
    assert implicit
    for record in implicit:
        assert get_organ(record["organ"]).function in record["turns"][0]["query"]


def test_multi_instance_organ_gets_one_box_per_part_and_the_count_in_the_answer():
    ct, labels = make_synthetic_pair(shape=(24, 96, 96), seed=1)
    duodenum = get_organ("duodenum").label
    labels[labels == duodenum] = 0
    labels[:, 70:78, 20:28] = duodenum
    labels[:, 70:78, 60:68] = duodenum
    result = curate_volume("split", ct, labels, CurationConfig())
    det = [r for r in result.records if r["organ"] == "duodenum" and r["task"] == "det"]
    assert det
    for record in det:
        assert len(record["boxes"]) == 2 and record["description"]["instance_count"] == 2
        assert "2 separate parts of the duodenum" in record["turns"][0]["answer"]


# ---------------------------------------------------------------- dataset, determinism, splits

def _sources(n, shape=(14, 48, 48)):
    return [VolumeSource(f"s{i:02d}", *make_synthetic_pair(shape=shape, spacing=(2.0, 2.0, 5.0), seed=i))
            for i in range(n)]


def _read_folder(root: Path):
    records = {p.name: p.read_text() for p in sorted((root / "records").glob("*.jsonl"))}
    slices = {}
    for path in sorted((root / "slices").glob("*.npz")):
        with np.load(path) as npz:
            slices[path.name] = {k: npz[k].copy() for k in npz.files}
    return records, slices, (root / "splits.json").read_text()


def test_same_seed_gives_identical_dataset_and_another_seed_differs(tmp_path):
    sources = _sources(2)
    curate_dataset(sources, tmp_path / "a", CurationConfig(seed=5), workers=2, progress=False)
    curate_dataset(sources, tmp_path / "b", CurationConfig(seed=5), workers=1, progress=False)
    curate_dataset(sources, tmp_path / "c", CurationConfig(seed=6), workers=1, progress=False)
    records_a, slices_a, splits_a = _read_folder(tmp_path / "a")
    records_b, slices_b, splits_b = _read_folder(tmp_path / "b")
    records_c, _, _ = _read_folder(tmp_path / "c")
    assert records_a == records_b and splits_a == splits_b
    assert slices_a.keys() == slices_b.keys()
    for name in slices_a:
        for key in slices_a[name]:
            np.testing.assert_array_equal(slices_a[name][key], slices_b[name][key])
    assert records_a != records_c


def test_subject_level_splits_have_no_leakage(tmp_path):
    splits = split_subjects([f"s{i}" for i in range(20)], (0.7, 0.15, 0.15), seed=0)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [14, 3, 3]
    members = splits["train"] + splits["val"] + splits["test"]
    assert sorted(members) == sorted(f"s{i}" for i in range(20)) and len(set(members)) == 20
    assert split_subjects([f"s{i}" for i in range(20)], (0.7, 0.15, 0.15), seed=1) != splits
    two = split_subjects(["a", "b"], (0.7, 0.15, 0.15), seed=0)
    assert len(two["train"]) == 1 and len(two["test"]) == 1

    summary = curate_dataset(_sources(5), tmp_path / "ds", CurationConfig(), workers=1, progress=False)
    seen = {}
    for split in ("train", "val", "test"):
        for line in (tmp_path / "ds" / "records" / f"{split}.jsonl").read_text().splitlines():
            subject = json.loads(line)["subject"]
            assert subject in summary.splits[split]
            seen.setdefault(subject, set()).add(split)
    assert all(len(s) == 1 for s in seen.values()) and len(seen) == 5


def test_output_folder_is_protected(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a CTReasoner dataset"):
        curate_dataset(_sources(1), tmp_path / "other", CurationConfig(), workers=1, progress=False)
    curate_dataset(_sources(1), tmp_path / "ds", CurationConfig(), workers=1, progress=False)
    with pytest.raises(ConfigError, match="--overwrite"):
        curate_dataset(_sources(1), tmp_path / "ds", CurationConfig(), workers=1, progress=False)
    curate_dataset(_sources(1), tmp_path / "ds", CurationConfig(), workers=1, progress=False, overwrite=True)


def test_mappings_remap_source_labels():
    btcv, amos, totalseg = load_mapping("btcv"), load_mapping("amos"), load_mapping("totalsegmentator")
    assert btcv.remap(np.array([0, 1, 10, 13, 14, 99])).tolist() == [0, 1, 10, 13, 14, 0]
    assert amos.remap(np.array([9, 10, 13, 14])).tolist() == [9, 11, 14, 0]
    assert "portal_splenic_veins" not in amos.annotated_organs
    assert totalseg.remap(np.array([5, 52, 63, 64, 19])).tolist() == [6, 8, 9, 10, 14]
    assert totalseg.files["kidney_right"] == "right_kidney"
    with pytest.raises(ConfigError, match="neither a shipped mapping"):
        load_mapping("nonexistent_mapping")


# ---------------------------------------------------------------- LLM writer (local HTTP round trip)

class _CannedHandler(BaseHTTPRequestHandler):
    reply: dict = {}
    requests: list = []

    def do_POST(self):  # noqa: N802 (http.server API)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, dict(self.headers), body))
        payload = json.dumps(type(self).reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture()
def canned_server():
    server = HTTPServer(("127.0.0.1", 0), _CannedHandler)
    _CannedHandler.requests = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _chat_reply(content: str) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": content}}]}


def test_llm_writer_round_trip_uses_a_valid_reply(synthetic, canned_server, monkeypatch):
    server, url = canned_server
    ct, labels = synthetic
    geometry = _geometry(ct, labels, 22, "spleen")
    canned = describe_organ(geometry, CurationConfig())
    canned.pop("source")
    _CannedHandler.reply = _chat_reply("Here you go:\n```json\n" + json.dumps(canned) + "\n```")
    monkeypatch.setenv("TEST_LLM_KEY", "secret-key")
    writer = LLMDescriptionWriter(LLMWriterConfig(url=url, model="canned", api_key_env="TEST_LLM_KEY"))
    prompts = organ_prompts(labels[22] == SPLEEN, 8)
    description, problem = writer.describe(ct.array[22], "spleen", prompts, (1.5, 1.5))
    assert problem is None and description["source"] == "llm" and description["organ"] == "spleen"
    path, headers, body = _CannedHandler.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer secret-key"
    content = body["messages"][0]["content"]
    assert content[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert json.dumps(prompts.boxes) in content[0]["text"]


def test_llm_writer_invalid_reply_falls_back_and_flags(tmp_path, canned_server):
    _, url = canned_server
    _CannedHandler.reply = _chat_reply('{"organ": "spleen", "shape": "blobby"}')
    writer = LLMDescriptionWriter(LLMWriterConfig(url=url, model="canned"))
    summary = curate_dataset(_sources(1, shape=(16, 48, 48)), tmp_path / "ds", CurationConfig(), workers=1,
                             writer=writer, progress=False)
    records = [json.loads(line) for split in ("train", "val", "test")
               for line in (tmp_path / "ds" / "records" / f"{split}.jsonl").read_text().splitlines()]
    present = [r for r in records if r["present"]]
    assert present and all(r["review"]["state"] == "flagged" for r in present)
    assert all("LLM writer failed" in r["review"]["reasons"][0] for r in present)
    assert all(r["description"]["source"] == "geometry" for r in present)
    assert summary.counts["review"]["flagged"] == len(present)


def test_llm_writer_unreachable_endpoint_reports_the_problem():
    writer = LLMDescriptionWriter(LLMWriterConfig(url="http://127.0.0.1:9/v1", model="x", timeout_s=2))
    mask = _disc((32, 32), (16, 16), 5)
    description, problem = writer.describe(np.zeros((32, 32), np.int16), "spleen", organ_prompts(mask, 8), (1, 1))
    assert description is None and "cannot reach" in problem


def test_llm_config_errors_and_json_extraction(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ConfigError, match="NO_SUCH_KEY_VAR"):
        LLMWriterConfig(url="http://localhost:1/v1", model="m", api_key_env="NO_SUCH_KEY_VAR")
    with pytest.raises(ConfigError, match="not an http"):
        LLMWriterConfig(url="localhost:1", model="m")
    assert LLMWriterConfig(url="http://h:1", model="m").endpoint == "http://h:1/v1/chat/completions"
    assert extract_json_object('text {"a": 1} more') == {"a": 1}


# ---------------------------------------------------------------- commands

def _write_pair(folder: Path, stem_image: str, stem_label: str, seed: int, source_labels=None):
    from CTReasonerLib.io.writers import write_labelmap, write_volume

    ct, labels = make_synthetic_pair(shape=(16, 48, 48), spacing=(2.0, 2.0, 5.0), seed=seed)
    write_volume(ct, folder / "images" / f"{stem_image}.nii.gz")
    write_labelmap(ct.with_array(labels if source_labels is None else source_labels(labels)),
                   folder / "labels" / f"{stem_label}.nii.gz")


def test_cli_curate_files_with_btcv_mapping_and_review_report(tmp_path, capsys):
    for seed in range(3):
        _write_pair(tmp_path, f"img{seed + 1:04d}", f"label{seed + 1:04d}", seed)
    out = tmp_path / "ds"
    code = cli_main(["curate", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"),
                     "--mapping", "btcv", "--out", str(out), "--workers", "1", "--no-progress"])
    assert code == 0
    info = json.loads((out / "dataset.json").read_text())
    assert info["counts"]["subjects"] == 3 and sorted(info["subjects"]) == ["img0001", "img0002", "img0003"]
    # plant a wrong side in one record, recheck, and find it in the report
    path = next(p for p in (out / "records").glob("*.jsonl") if p.read_text().strip())
    lines = path.read_text().splitlines()
    index, record = next((i, json.loads(l)) for i, l in enumerate(lines) if json.loads(l)["organ"] == "liver")
    record["description"]["position"]["side"] = "left"
    lines[index] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")
    assert cli_main(["review", str(out), "--recheck", "--quiet"]) == 0
    report = (out / "review_report.md").read_text()
    assert record["id"] in report and "position says left" in report
    assert "accepted->flagged 1" in capsys.readouterr().out


def test_cli_curate_totalsegmentator_layout(tmp_path):
    from CTReasonerLib.io.writers import write_labelmap, write_volume

    for subject in ("s0001", "s0002"):
        ct, labels = make_synthetic_pair(shape=(16, 48, 48), spacing=(2.0, 2.0, 5.0), seed=int(subject[-1]))
        write_volume(ct, tmp_path / "ts" / subject / "ct.nii.gz")
        for stem, key in (("liver", "liver"), ("spleen", "spleen"), ("kidney_right", "right_kidney")):
            mask = (labels == get_organ(key).label).astype(np.uint8)
            write_labelmap(ct.with_array(mask), tmp_path / "ts" / subject / "segmentations" / f"{stem}.nii.gz")
    out = tmp_path / "ds"
    assert cli_main(["curate", "--images", str(tmp_path / "ts"), "--mapping", "totalsegmentator", "--out", str(out),
                     "--workers", "1", "--no-progress"]) == 0
    records = [json.loads(l) for s in ("train", "val", "test") for l in (out / "records" / f"{s}.jsonl").read_text().splitlines()]
    assert {r["organ"] for r in records if r["present"]} == {"liver", "spleen", "right_kidney"}


def test_cli_curate_errors_are_clear(tmp_path, capsys):
    _write_pair(tmp_path, "case_a", "case_a", 0)
    (tmp_path / "images" / "case_b.nii.gz").write_bytes((tmp_path / "images" / "case_a.nii.gz").read_bytes())
    code = cli_main(["curate", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"),
                     "--out", str(tmp_path / "ds")])
    assert code == 2 and "no label map found for image(s): case_b" in capsys.readouterr().err
    assert cli_main(["curate", "--out", str(tmp_path / "ds")]) == 2
    assert "no input given" in capsys.readouterr().err
    assert cli_main(["curate", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"),
                     "--mapping", "nope", "--out", str(tmp_path / "ds")]) == 2
    assert "label mapping 'nope'" in capsys.readouterr().err


def test_cli_curate_two_tiny_phantoms(tmp_path, capsys):
    from CTReasonerLib.data.dataset import CuratedDataset

    out = tmp_path / "ds"
    code = cli_main(["curate", "--phantoms", "2", "--phantom-shape", "96", "96", "24", "--seed", "0",
                     "--out", str(out), "--workers", "2", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    info = json.loads((out / "dataset.json").read_text())
    assert sorted(info["subjects"]) == ["phantom0000", "phantom0001"] and info["source"].startswith("phantoms")
    samples = [s for split in ("train", "test") for s in CuratedDataset(out, split)]
    assert {s.task for s in samples} == {"seg", "det", "absent"}
    # follow-up questions reach the dataset loader, and dataset.json counts them
    assert info["counts"]["followup"] == sum(bool(s.history) for s in samples) + sum(
        bool(s.history) for s in CuratedDataset(out, "val")) > 0
    # the phantom puts the liver on the patient's right and the spleen on the left (RAS through ijk_to_ras)
    sides = {(s.organ, s.description["position"]["side"]) for s in samples if s.present and s.organ in ("liver", "spleen")}
    assert ("liver", "right") in sides and ("spleen", "left") in sides
    assert ("liver", "left") not in sides and ("spleen", "right") not in sides


def test_volume_not_stored_axially_is_reoriented_and_keeps_patient_sides():
    ct, labels = make_synthetic_pair(shape=(20, 64, 64), seed=2)
    # the same voxels stored with the head-foot axis as I (array axes reversed, geometry to match)
    sagittal = ct.with_array(ct.array)
    sagittal.array = np.ascontiguousarray(np.transpose(ct.array, (2, 1, 0)))
    sagittal.spacing, sagittal.directions = ct.spacing[[2, 1, 0]], ct.directions[:, [2, 1, 0]]
    axial = curate_volume("a", ct, labels, CurationConfig())
    resliced = curate_volume("a", sagittal, np.ascontiguousarray(np.transpose(labels, (2, 1, 0))), CurationConfig())
    summary = lambda result: sorted((r["slice_index"], r["organ"], r["description"]["position"]["side"])  # noqa: E731
                                    for r in result.records if r["task"] == "seg")
    assert summary(axial) == summary(resliced)
