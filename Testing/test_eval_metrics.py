"""Evaluation: Dice/HD95/NSD on hand-made masks, empty-mask rules, AP@0.1 on hand-made boxes, mask->box,
the per-record scoring of chat results, and the Markdown/JSON report."""
from __future__ import annotations

from types import SimpleNamespace

import json
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import pytest
from scipy import ndimage

from CTReasonerLib.eval.detection import ScoredBox, average_precision, mask_to_boxes
from CTReasonerLib.eval.evaluate import EvalSettings, evaluate, routing_correct
from CTReasonerLib.eval.metrics import SegmentationMetrics, max_distance_mm
from CTReasonerLib.eval.report import render_report, write_report
from CTReasonerLib.organs import ORGANS
from CTReasonerLib.results import BoxPrediction, ChatResult, CloserLookInfo, MaskPrediction

ORGAN_KEYS = [organ.key for organ in ORGANS]


def _square(top: int, left: int, size: int = 20, shape=(64, 64)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top:top + size, left:left + size] = True
    return mask


@pytest.fixture(scope="module")
def metrics() -> SegmentationMetrics:
    return SegmentationMetrics(nsd_tolerance_mm=2.0)


# -------------------------------------------------------------------------------------------- segmentation
def test_offset_squares_have_known_dice_hd95_nsd(metrics):
    """20x20 squares 3 px apart along the columns at 2 mm: Dice 17/20, HD95 3 px = 6 mm."""
    scores = metrics(_square(20, 20), _square(20, 23), (2.0, 2.0))
    assert scores.dice == pytest.approx(0.85, abs=1e-6)
    assert scores.hd95_mm == pytest.approx(6.0)
    assert 0.0 < scores.nsd < 1.0  # the shifted left/right edges are 6 mm off, beyond the 2 mm tolerance
    assert SegmentationMetrics(nsd_tolerance_mm=6.0)(_square(20, 20), _square(20, 23), (2.0, 2.0)).nsd == pytest.approx(1.0)


def test_spacing_is_row_then_column(metrics):
    column_shift = metrics(_square(20, 20), _square(20, 23), (1.0, 2.0))
    row_shift = metrics(_square(20, 20), _square(23, 20), (1.0, 2.0))
    assert column_shift.hd95_mm == pytest.approx(6.0)
    assert row_shift.hd95_mm == pytest.approx(3.0)


def test_empty_masks_are_decided_explicitly(metrics):
    empty = np.zeros((64, 64), dtype=bool)
    missed = metrics(empty, _square(10, 10), (0.5, 1.0))
    assert (missed.dice, missed.nsd, missed.prediction_empty, missed.both_empty) == (0.0, 0.0, True, False)
    assert missed.hd95_mm == pytest.approx(math.hypot(64 * 0.5, 64 * 1.0)) == max_distance_mm((64, 64), (0.5, 1.0))
    hallucinated = metrics(_square(10, 10), empty, (1.0, 1.0))
    assert (hallucinated.dice, hallucinated.target_empty) == (0.0, True)
    assert math.isfinite(hallucinated.hd95_mm)
    nothing = metrics(empty, empty, (1.0, 1.0))
    assert (nothing.dice, nothing.hd95_mm, nothing.both_empty) == (1.0, 0.0, True)
    with pytest.raises(ValueError):
        metrics(empty, np.zeros((32, 64), dtype=bool), (1.0, 1.0))


# ----------------------------------------------------------------------------------------------- detection
def test_average_precision_on_hand_made_boxes():
    gt = {"a": np.array([[0, 0, 10, 10]]), "b": np.array([[20, 20, 30, 30]]), "c": np.zeros((0, 4))}
    perfect = [ScoredBox("a", [0, 0, 10, 10], 0.9), ScoredBox("b", [21, 21, 30, 30], 0.8)]
    assert average_precision(perfect, gt) == pytest.approx(1.0)
    # One of two organs missed: recall stops at 0.5 with precision 1.
    assert average_precision(perfect[:1], gt) == pytest.approx(0.5)
    # A false positive (on the empty slice c) ranked above both hits: precision 1/2 at recall 0.5, 2/3 at 1.0.
    with_fp = perfect + [ScoredBox("c", [0, 0, 5, 5], 0.95)]
    assert average_precision(with_fp, gt) == pytest.approx(2 / 3)
    # Ranked below both hits, it costs nothing.
    assert average_precision(perfect + [ScoredBox("c", [0, 0, 5, 5], 0.1)], gt) == pytest.approx(1.0)
    # A duplicate of an already-claimed box is a false positive.
    duplicate = [perfect[0], ScoredBox("a", [0, 0, 10, 10], 0.85), perfect[1]]
    assert average_precision(duplicate, gt) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert math.isnan(average_precision(perfect, {"c": np.zeros((0, 4))}))
    assert average_precision([], gt) == 0.0


def test_iou_threshold_is_point_one():
    gt = {"a": np.array([[0, 0, 10, 10]])}
    loose = ScoredBox("a", [0, 0, 10, 14], 0.9)        # IoU 100/140 = 0.71
    sliver = ScoredBox("a", [0, 0, 10, 1.5], 0.9)      # IoU 15/100 = 0.15 >= 0.1
    miss = ScoredBox("a", [0, 0, 10, 0.5], 0.9)        # IoU 5/100 = 0.05 < 0.1
    assert average_precision([loose], gt) == 1.0
    assert average_precision([sliver], gt) == 1.0
    assert average_precision([miss], gt) == 0.0
    assert average_precision([loose], gt, iou_threshold=0.75) == 0.0


def test_mask_to_boxes_confidences():
    probability = np.zeros((40, 40), dtype=np.float32)
    probability[2:12, 2:12] = 0.7     # 100 px
    probability[20:25, 30:35] = 0.6   # 25 px
    probability[21, 31] = 0.95
    by_area = mask_to_boxes(probability, 0.5, "area")
    assert [box for box, _ in by_area] == [[2, 2, 12, 12], [30, 20, 35, 25]]
    assert [score for _, score in by_area] == pytest.approx([0.8, 0.2])
    by_prob = mask_to_boxes(probability, 0.5, "max_prob")
    assert [score for _, score in by_prob] == pytest.approx([0.7, 0.95])
    assert mask_to_boxes(np.zeros((8, 8)), 0.5) == []
    with pytest.raises(ValueError):
        mask_to_boxes(probability, 0.5, "size")


def test_routing_is_strict():
    assert routing_correct("seg", "seg", ["[SEG]", "[CLOSER]"])
    assert not routing_correct("seg", "seg", ["[SEG]", "[DET]"])
    assert routing_correct("det", "det", ["[DET]"])
    assert not routing_correct("det", "det", [])
    assert routing_correct("absent", "seg", [])
    assert not routing_correct("absent", "det", ["[DET]"])


# ------------------------------------------------------------------------------------ evaluate + report
@dataclass
class FakeSample:
    """The fields of ``CuratedDataset`` samples that evaluation reads."""
    id: str
    organ: str
    task: str
    query_task: str
    image_hu: np.ndarray
    mask: np.ndarray
    boxes: np.ndarray
    spacing: np.ndarray = field(default_factory=lambda: np.array([1.0, 1.0]))
    turns: List[Dict[str, str]] = field(default_factory=list)
    history: List[Dict[str, str]] = field(default_factory=list)
    neighbours_hu: Optional[np.ndarray] = None


class ScriptedPipeline:
    """Answers each query from its sample: round 1 = the target eroded by 2 px, the closer look = the target.

    Detection returns the true boxes scored ``det_score``, and for absent targets one stray box scored
    ``absent_box_score`` (as a DETR head's unmatched queries do); both are cut at the caller's
    ``score_threshold``. ``wrong_routing`` ids get [DET] for a seg query.
    """

    def __init__(self, samples, wrong_routing=(), det_score=0.9, absent_box_score=0.2, box_source="detection",
                 overrule_absent=False):
        self.overrule_absent = overrule_absent  # absent answers come from the presence gate
        # box_source "fused": the shipped boxes are right, the detection branch alone misses every other organ
        self.config = SimpleNamespace(detection=SimpleNamespace(score_threshold=0.5, box_source=box_source))
        self.by_query = {s.turns[0]["query"]: s for s in samples}
        self.wrong_routing = set(wrong_routing)
        self.det_score, self.absent_box_score = det_score, absent_box_score
        self.calls = []
        self.score_thresholds = set()

    def chat(self, image_hu, query, history, closer_look=False, score_threshold=None, return_probabilities=True,
             box_source=None, neighbours_hu=None) -> ChatResult:
        sample = self.by_query[query]
        assert history == [(turn["query"], turn["answer"]) for turn in sample.history]  # the record's dialogue
        # the record's neighbouring slices reach the model on every call, or none when the dataset has none
        assert (neighbours_hu is None) == (sample.neighbours_hu is None)
        assert neighbours_hu is None or np.array_equal(neighbours_hu, sample.neighbours_hu)
        self.calls.append((sample.id, closer_look))
        self.score_thresholds.add(score_threshold)
        threshold = self.config.detection.score_threshold if score_threshold is None else score_threshold
        if sample.task == "absent":
            stray = [BoxPrediction(sample.organ, np.array([1, 1, 5, 5]), self.absent_box_score)]
            return ChatResult(text="not visible", absent=True, presence_overruled=self.overrule_absent,
                              boxes=[b for b in stray if b.score >= threshold])
        if sample.task == "det":
            source = box_source or self.config.detection.box_source
            branch_misses = source == "detection" and self.config.detection.box_source == "fused" \
                and ORGAN_KEYS.index(sample.organ) % 2
            boxes = [BoxPrediction(sample.organ, b + 30 * branch_misses, self.det_score) for b in sample.boxes]
            return ChatResult(text="found", routing_tokens=["[DET]"], boxes=[b for b in boxes if b.score >= threshold])
        eroded = ndimage.binary_erosion(sample.mask, iterations=2)
        masks = [MaskPrediction(sample.organ, eroded, probability=eroded.astype(np.float32), round=1)]
        tokens = ["[DET]"] if sample.id in self.wrong_routing else ["[SEG]"]
        info = CloserLookInfo(ran=False)
        if closer_look:
            masks.append(MaskPrediction(sample.organ, sample.mask, probability=sample.mask * 0.8, round=2))
            tokens.append("[CLOSER]")
            info = CloserLookInfo(ran=True, roi_xyxy=np.array([0, 0, 64, 64]), canonical_size=64)
        return ChatResult(text="here", routing_tokens=tokens, masks=masks, closer_look=info)


def _scenario():
    samples = []
    image = np.zeros((64, 64), dtype=np.int16)
    for index, organ in enumerate(ORGANS):
        size = 6 + 2 * index  # organ 1 is the smallest
        mask = _square(10, 10, size)
        box = np.array([[10, 10, 10 + size, 10 + size]], dtype=np.float32)
        earlier = [{"query": "Segment the aorta.", "answer": "The aorta is here. [SEG]"}] if index % 2 else []
        # odd organs come from a dataset that stores the slices either side, even ones from one that does not
        neighbours = np.full((2, 64, 64), index, dtype=np.int16) if index % 2 else None
        for task in ("seg", "det"):
            samples.append(FakeSample(f"{organ.key}_{task}", organ.key, task, task, image, mask, box,
                                      turns=[{"query": f"{task} {organ.name}"}], history=earlier,
                                      neighbours_hu=neighbours))
        samples.append(FakeSample(f"{organ.key}_absent", organ.key, "absent", "det", image,
                                  np.zeros((64, 64), dtype=bool), np.zeros((0, 4), np.float32),
                                  turns=[{"query": f"where is the {organ.name}?"}]))
    return samples


def test_evaluate_scores_every_table_and_the_report_renders(tmp_path):
    samples = _scenario()
    pipeline = ScriptedPipeline(samples, wrong_routing={"liver_seg"})
    summary, outcomes = evaluate(pipeline, samples, EvalSettings(closer_ablation=True), progress=False)
    assert summary["counts"] == {"seg": 14, "det": 14, "absent": 14}
    seg = summary["segmentation"]
    assert seg["mean"]["dice"] == pytest.approx(1.0) and seg["per_organ"]["spleen"]["n"] == 1
    closer = summary["closer_look"]
    assert closer["with"]["dice"] == pytest.approx(1.0)
    assert closer["without"]["dice"] < 0.9 and closer["without"]["hd95_mm"] > closer["with"]["hd95_mm"]
    assert closer["smallest_organs"] == ["spleen", "right_kidney", "left_kidney", "gallbladder"]
    assert closer["smallest_dice_gain"] > 0.2
    assert summary["detection"]["map"] == pytest.approx(1.0)
    assert summary["mask_to_box"]["area"]["map"] == pytest.approx(1.0)
    assert summary["routing"]["accuracy"] == pytest.approx(41 / 42)
    assert summary["routing"]["by_task"]["seg"] == pytest.approx(13 / 14)
    assert summary["absent"]["accuracy"] == 1.0
    # Seg queries ask for the closer look; the ablation reuses the round-1 mask of the same turn.
    assert sorted(c for i, c in pipeline.calls if i.endswith("_seg")) == [True] * 14

    summary["run"] = {"model": "scripted", "dataset": "hand-made", "split": "test"}
    rows = [o.__dict__ for o in outcomes]
    paths = write_report(str(tmp_path), summary, rows)
    report = paths["report"].read_text()
    for heading in ("Table 1 layout", "Table 4 layout", "Table 7 layout", "Routing and absent targets"):
        assert heading in report
    assert "| Method | Spl | RKid | LKid | Gall | Eso | Liv | Sto | Aor | IVC | PSV | Pan | RAG | LAG | Duo | Mean |" in report
    assert "| This model | 100.00 |" in report
    assert "| Method | PSV | RAG | LAG | Duo | Mean, all organs |" in report
    saved = json.loads(paths["results"].read_text())
    assert saved["detection"]["per_organ"]["duodenum"]["ap"] == pytest.approx(1.0)
    assert len(paths["samples"].read_text().splitlines()) == 42
    assert "closer look keeps" not in report and "IoU head rates" not in report
    summary["run"]["closer_look_keep"] = "better"
    report = render_report(summary)
    assert "closer look keeps the `better` round" in report and "`closer_look.keep = better`" in report
    assert "presence from" not in report and "pixel network" not in report
    summary["run"]["pixel_mask_weight"] = 0.35
    assert "masks blend in the pixel network's organ map at weight 0.35" in render_report(summary)
    summary["run"].update(presence_gate=0.15, presence_from="image")
    assert "presence gate 0.15 on presence from `image`" in render_report(summary)
    assert "context decision" not in render_report(summary)
    summary["run"].update(presence_from="pixels", presence_context=True)
    assert "from `pixels` (the pixel network's read by the context decision" in render_report(summary)


def test_ap_ranks_boxes_below_the_display_threshold_but_absent_targets_count_only_shown_boxes():
    samples = _scenario()
    low = ScriptedPipeline(samples, det_score=0.3)
    summary, _ = evaluate(low, samples, EvalSettings(closer_ablation=False), progress=False)
    assert low.score_thresholds == {EvalSettings().ap_score_floor}
    assert summary["detection"]["map"] == pytest.approx(1.0)      # a 0.3-scored true box still ranks
    assert summary["absent"]["accuracy"] == 1.0                    # the 0.2 stray box is never shown
    shown = ScriptedPipeline(samples, absent_box_score=0.6)
    summary, _ = evaluate(shown, samples, EvalSettings(closer_ablation=False), progress=False)
    assert summary["absent"]["accuracy"] == 0.0                    # a box a user would see is an error


def test_fused_boxes_are_scored_as_shipped_and_the_detection_branch_alone_for_table_7():
    samples = _scenario()
    summary, outcomes = evaluate(ScriptedPipeline(samples, box_source="fused"), samples,
                                 EvalSettings(closer_ablation=False), progress=False)
    assert summary["box_source"] == "fused"
    assert summary["detection"]["map"] == pytest.approx(1.0)
    assert summary["detection_branch"]["map"] == pytest.approx(0.5)
    report = render_report(summary)
    assert "| Detection branch |" in report and "| Shipped boxes (box_source = fused) |" in report
    plain, _ = evaluate(ScriptedPipeline(samples), samples, EvalSettings(closer_ablation=False), progress=False)
    assert plain["detection_branch"] == plain["detection"] and "Shipped boxes" not in render_report(plain)


def test_presence_gate_overrules_are_counted_and_reported():
    samples = _scenario()
    summary, outcomes = evaluate(ScriptedPipeline(samples, overrule_absent=True), samples,
                                 EvalSettings(closer_ablation=False), progress=False)
    assert summary["absent"]["overruled_absent"] == 14 and summary["absent"]["overruled_present"] == 0
    assert sum(o.presence_overruled for o in outcomes) == 14
    assert "presence gate overruled 14 routed answers: 14 on absent targets" in render_report(summary)
    plain, _ = evaluate(ScriptedPipeline(samples), samples, EvalSettings(closer_ablation=False), progress=False)
    assert "presence gate" not in render_report(plain)


def test_report_without_ablation_and_with_missing_organs():
    samples = [s for s in _scenario() if s.organ in ("liver", "spleen")]
    summary, _ = evaluate(ScriptedPipeline(samples), samples, EvalSettings(closer_ablation=False), progress=False)
    assert summary["closer_look"] is None
    report = render_report(summary)
    assert "Not run (`--no-closer-ablation`)" in report
    assert "| This model | 100.00 | – |" in report  # spleen scored, right kidney absent from the split
    assert json.dumps(summary["segmentation"]["per_organ"])  # plain JSON types


def test_stratified_subset_covers_organs_and_tasks():
    from CTReasonerLib.eval.evaluate import stratified_subset

    records = [{"organ": organ.key, "task": task} for _ in range(5) for organ in ORGANS for task in ("seg", "det")]
    records += [{"organ": "liver", "task": "absent"}] * 3
    chosen = stratified_subset(records, 31)
    assert len(chosen) == len(set(chosen)) == 31 and chosen == sorted(chosen)
    picked = [records[i] for i in chosen]
    assert {r["organ"] for r in picked} == {o.key for o in ORGANS}
    assert {r["task"] for r in picked} == {"seg", "det", "absent"}
    few = [records[i] for i in stratified_subset(records, 6)]
    assert len({r["organ"] for r in few}) >= 5  # spread over organs, not the first organs only
    assert stratified_subset(records, None) == list(range(len(records)))
    assert stratified_subset(records, 10_000) == list(range(len(records)))


def _gated(task, presence, tokens, absent_correct=None):
    from CTReasonerLib.eval.evaluate import SampleOutcome
    return SampleOutcome(id=f"{task}-{presence}", organ="liver", task=task, query_task="seg",
                         routing_tokens=tokens, routing_correct=False, absent_correct=absent_correct,
                         presence=presence, presence_overruled=presence is not None and not tokens)


def test_presence_gate_sweep_is_exact_from_one_gated_run():
    from CTReasonerLib.eval.evaluate import presence_gate_sweep
    # A run at gate 0.2: one answer of each kind was overruled (no tokens), one passed, one never routed.
    outcomes = [_gated("absent", 0.1, [], absent_correct=True),          # overruled: right
                _gated("absent", 0.3, ["[SEG]"], absent_correct=False),  # passed: wrong
                _gated("absent", None, [], absent_correct=True),         # answered absent by the LVLM
                _gated("seg", 0.15, []),                                  # overruled: a false 'absent'
                _gated("seg", 0.9, ["[SEG]"]),
                _gated("seg", None, [])]                                  # the LVLM's own false 'absent'
    rows = {row["gate"]: row for row in presence_gate_sweep(outcomes, gates=(0.05, 0.2, 0.35, 0.95))}
    assert rows[0.05]["absent_accuracy"] == pytest.approx(1 / 3)       # un-overruled: the routed answer stands
    assert rows[0.05]["false_absent_rate"] == pytest.approx(1 / 3)
    assert rows[0.2]["absent_accuracy"] == pytest.approx(2 / 3)        # the run as it was
    assert rows[0.2]["false_absent_rate"] == pytest.approx(2 / 3)
    assert rows[0.35]["absent_accuracy"] == 1.0 and rows[0.35]["false_absent_rate"] == pytest.approx(2 / 3)
    assert rows[0.95]["false_absent_rate"] == 1.0
    assert presence_gate_sweep([_gated("seg", None, ["[SEG]"])]) == []  # no gate, no probabilities
    # presence_rescue checked a "not visible" answer (a probability, no token, not overruled): the gate never
    # saw it, so every gate keeps it as run; a rescued answer routes and is swept like any routed one
    checked = _gated("seg", 0.3, [])
    checked.presence_overruled = False
    rescued = _gated("seg", 0.6, ["[SEG]"])
    rescued.presence_rescued = True
    rows = presence_gate_sweep(outcomes + [checked, rescued], gates=(0.05, 0.5, 0.7))
    assert [row["false_absent_rate"] for row in rows] == pytest.approx([2 / 5, 3 / 5, 4 / 5])
    assert presence_gate_sweep([checked]) == []


def test_routing_errors_are_counted_by_cause_and_reported():
    from CTReasonerLib.eval.evaluate import ROUTING_ERROR_CAUSES, SampleOutcome, _routing
    from CTReasonerLib.eval.report import ROUTING_ERROR_TEXT

    def outcome(task, tokens, correct, presence=None, overruled=False, rescued=False, query_task="seg"):
        return SampleOutcome(id=f"{task}-{len(tokens)}-{presence}", organ="liver", task=task, query_task=query_task,
                             routing_tokens=tokens, routing_correct=correct, presence=presence,
                             presence_overruled=overruled, presence_rescued=rescued)

    outcomes = [outcome("seg", ["[SEG]"], True, presence=0.9),
                outcome("absent", ["[SEG]"], False, presence=0.7),                 # the gate let it through
                outcome("absent", ["[SEG]"], False, presence=0.7),
                outcome("absent", ["[DET]"], False, presence=0.6, rescued=True),    # the rescue routed it
                outcome("absent", ["[DET]"], False),                                # no gate at all
                outcome("seg", [], False, presence=0.1, overruled=True),
                outcome("det", [], False, query_task="det"),                        # the LM's own "not visible"
                outcome("det", ["[SEG]"], False, query_task="det")]                 # the wrong task's token
    routing = _routing(outcomes)
    assert routing["errors"] == {"absent_passed_gate": 2, "absent_rescued": 1, "absent_routed_ungated": 1,
                                 "present_overruled": 1, "present_not_visible": 1, "present_other_task": 1}
    assert set(ROUTING_ERROR_TEXT) == set(ROUTING_ERROR_CAUSES)
    samples = _scenario()
    summary, _ = evaluate(ScriptedPipeline(samples), samples, EvalSettings(closer_ablation=False), progress=False)
    assert "wrong routing answers were wrong" not in render_report(summary)   # every answer routed right
    summary["routing"]["errors"] = routing["errors"]
    report = render_report(summary)
    assert "Why the 7 wrong routing answers were wrong:" in report
    assert f"| {ROUTING_ERROR_TEXT['absent_passed_gate']} | 2 |" in report


def test_report_counts_rescued_answers():
    samples = _scenario()
    summary, _ = evaluate(ScriptedPipeline(samples), samples, EvalSettings(closer_ablation=False), progress=False)
    assert "presence rescue" not in render_report(summary)
    summary["absent"].update(rescued_present=3, rescued_absent=1)
    assert ('The presence rescue decoded 4 "not visible" answers again as visible: 3 on present targets '
            '(now routed), 1 on absent targets (now wrong).') in render_report(summary)
    summary["run"] = {"presence_gate": 0.15, "presence_from": "image", "presence_rescue": 0.5}
    assert "presence gate 0.15 on presence from `image`; presence rescue 0.5" in render_report(summary)


def test_presence_gate_sweep_is_reported():
    samples = _scenario()
    summary, _ = evaluate(ScriptedPipeline(samples, overrule_absent=True), samples,
                          EvalSettings(closer_ablation=False), progress=False)
    assert summary["absent"]["presence_sweep"] == []          # the scripted answers carry no probabilities
    summary["absent"]["presence_sweep"] = [{"gate": 0.25, "absent_accuracy": 0.8, "false_absent_rate": 0.05}]
    assert "| 0.25 | 80.00 | 5.00 |" in render_report(summary)


def test_inference_setting_overrides_are_checked():
    from types import SimpleNamespace
    from CTReasonerLib.commands.evaluate import _probability_or_off, _weight_or_off
    from CTReasonerLib.errors import ConfigError
    from CTReasonerLib.eval.evaluate import GATE_OFF, set_inference_settings
    from CTReasonerLib.model.config import CTReasonerConfig

    assert _probability_or_off(None, "--presence-gate") is None
    assert _probability_or_off("OFF", "--presence-gate") == GATE_OFF and _probability_or_off("0.3", "--x") == 0.3
    for bad in ("1.5", "-0.1", "half", "nan"):
        with pytest.raises(ConfigError, match="--presence-rescue"):
            _probability_or_off(bad, "--presence-rescue")
    for bad in ("1", "1.5", "x"):
        with pytest.raises(ConfigError, match=r"--pixel-mask-weight must be"):
            _weight_or_off(bad)
    assert _weight_or_off("0.35") == 0.35 and _weight_or_off("off") == GATE_OFF and _weight_or_off(None) is None
    model = SimpleNamespace(config=CTReasonerConfig.from_dict({"loss": {"presence": 1.0}}))
    set_inference_settings(model, presence_gate=0.3)
    assert model.config.presence_gate == 0.3
    set_inference_settings(model, presence_rescue=0.6)
    assert (model.config.presence_gate, model.config.presence_rescue) == (0.3, 0.6)
    with pytest.raises(ConfigError, match="must be >= presence_gate"):
        set_inference_settings(model, presence_rescue=0.2)            # below the gate: a rescued answer would fail it
    set_inference_settings(model, presence_gate=None, presence_rescue=None)
    assert model.config.presence_gate is None and model.config.presence_rescue is None
    with_pixels = SimpleNamespace(config=CTReasonerConfig.from_dict({"pixel_presence": {}, "pixel_mask_weight": 0.35}))
    set_inference_settings(with_pixels, pixel_mask_weight=None)
    assert with_pixels.config.pixel_mask_weight is None
    set_inference_settings(with_pixels, pixel_mask_weight=0.5)
    assert with_pixels.config.pixel_mask_weight == 0.5
    with pytest.raises(ConfigError, match=r"pixel_mask_weight must be a weight in \[0, 1\)"):
        set_inference_settings(with_pixels, pixel_mask_weight=1.0)
    with pytest.raises(ConfigError, match="pixel_mask_weight needs the model's pixel_presence network"):
        set_inference_settings(SimpleNamespace(config=CTReasonerConfig()), pixel_mask_weight=0.3)
    headless = SimpleNamespace(config=CTReasonerConfig())     # no presence head trained
    for setting in ("presence_gate", "presence_rescue"):
        with pytest.raises(ConfigError, match="presence head"):
            set_inference_settings(headless, **{setting: 0.3})
