"""Run a model over a curated dataset split and score everything the paper's tables report.

Each sample is one (slice, organ, task) record. The model sees the record's first query after the
record's dialogue history, if any (an earlier chat about another organ), through the same
``CTReasonerPipeline.chat`` that users get:

* ``seg`` records: the final mask (after the closer look) is scored with Dice, HD95 and NSD; with the
  closer-look ablation the round-1 mask of the same query is scored too (Table 4). The mask's
  components also give mask-derived boxes for Table 7.
* ``det`` records: every returned box (with its score) enters that organ's AP@0.1 ranking (Table 1).
* ``absent`` records: correct when the model routes nowhere and returns no mask pixels and no box.
  Their queries (seg- or det-phrased) are also negatives for the detection/mask-box APs.

Routing accuracy is strict: a seg query must emit [SEG] and not [DET], a det query [DET] and not
[SEG], an absent target neither.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from CTReasonerLib.model.routing import DET_TOKEN, SEG_TOKEN
from CTReasonerLib.organs import ORGANS
from CTReasonerLib.results import ChatResult

from .detection import PAPER_IOU_THRESHOLD, ScoredBox, average_precision, mask_to_boxes
from .metrics import DEFAULT_NSD_TOLERANCE_MM, SegmentationMetrics, SegmentationScores

logger = logging.getLogger(__name__)

SMALLEST_ORGAN_COUNT = 4
GATE_OFF = "off"                        # evaluate_model(presence_gate=GATE_OFF): the model's gate switched off
ORGAN_ORDER = [o.key for o in ORGANS]   # label order = the paper's Table 1 column order


@dataclass
class SampleOutcome:
    """What the model did on one record, and how it scored."""
    id: str
    organ: str
    task: str
    query_task: str
    routing_tokens: List[str]
    routing_correct: bool
    absent_correct: Optional[bool] = None                 # absent records only
    scores: Optional[Dict[str, float]] = None             # final mask (seg records)
    scores_round1: Optional[Dict[str, float]] = None      # round-1 mask (seg records, ablation)
    closer_look_ran: bool = False
    presence_overruled: bool = False                      # the model's presence gate overruled a routed answer
    presence_rescued: bool = False                        # a "not visible" answer was decoded again as visible
    presence: Optional[float] = None                      # presence head's probability (when a presence check ran)
    target_area_mm2: float = 0.0
    gt_boxes: List[List[float]] = field(default_factory=list)
    boxes: List[Tuple[List[float], float]] = field(default_factory=list)            # the boxes a user gets
    detection_branch_boxes: List[Tuple[List[float], float]] = field(default_factory=list)  # [DET] head alone
    mask_boxes_area: List[Tuple[List[float], float]] = field(default_factory=list)
    mask_boxes_max_prob: List[Tuple[List[float], float]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class EvalSettings:
    closer_ablation: bool = True
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM
    iou_threshold: float = PAPER_IOU_THRESHOLD
    mask_threshold: float = 0.5
    #: AP ranks every query box scoring at least this (COCO-style: the precision-recall curve is not cut
    #: at the display threshold). Absent-target accuracy still counts only boxes a user would be shown
    #: (``detection.score_threshold`` of the model).
    ap_score_floor: float = 0.05


def final_masks(result: ChatResult, round_: Optional[int] = None):
    """The masks of one round (default: the last round the result has)."""
    if not result.masks:
        return []
    wanted = max(m.round for m in result.masks) if round_ is None else round_
    return [m for m in result.masks if m.round == wanted]


def union_mask(masks, shape) -> Tuple[np.ndarray, np.ndarray]:
    """(H, W) bool union and (H, W) float32 max-probability of several masks (zeros when none)."""
    mask = np.zeros(shape, dtype=bool)
    probability = np.zeros(shape, dtype=np.float32)
    for prediction in masks:
        mask |= prediction.mask
        prob = prediction.probability if prediction.probability is not None else prediction.mask.astype(np.float32)
        probability = np.maximum(probability, prob)
    return mask, probability


def routing_correct(task: str, query_task: str, tokens: Sequence[str]) -> bool:
    seg, det = SEG_TOKEN in tokens, DET_TOKEN in tokens
    if task == "absent":
        return not seg and not det
    return (seg and not det) if query_task == "seg" else (det and not seg)


def evaluate_sample(pipeline, sample, metrics: SegmentationMetrics, settings: EvalSettings) -> SampleOutcome:
    """Run the chat turn(s) for one record and score them."""
    start = time.perf_counter()
    image = sample.image_hu
    neighbours = getattr(sample, "neighbours_hu", None)
    query = sample.turns[0]["query"]
    history = [(turn["query"], turn["answer"]) for turn in getattr(sample, "history", ())]
    # Absent targets phrased as seg queries get the same request: the model must not know the answer.
    want_closer = sample.query_task == "seg"
    result = pipeline.chat(image, query, history, closer_look=want_closer, score_threshold=settings.ap_score_floor,
                           neighbours_hu=neighbours)
    shown_boxes = [b for b in result.boxes if b.score >= pipeline.config.detection.score_threshold]
    outcome = SampleOutcome(id=sample.id, organ=sample.organ, task=sample.task, query_task=sample.query_task,
                            routing_tokens=list(result.routing_tokens),
                            routing_correct=routing_correct(sample.task, sample.query_task, result.routing_tokens),
                            closer_look_ran=bool(result.closer_look.ran),
                            presence_overruled=bool(getattr(result, "presence_overruled", False)),
                            presence_rescued=bool(getattr(result, "presence_rescued", False)),
                            presence=getattr(result, "presence", None),
                            gt_boxes=np.asarray(sample.boxes, dtype=float).reshape(-1, 4).tolist())
    shape = image.shape
    mask, probability = union_mask(final_masks(result), shape)
    if sample.task == "absent":
        outcome.absent_correct = outcome.routing_correct and not mask.any() and not shown_boxes
    if sample.task == "seg":
        target = sample.mask
        outcome.target_area_mm2 = float(target.sum() * np.prod(sample.spacing))
        outcome.scores = asdict(metrics(mask, target, tuple(sample.spacing)))
        if settings.closer_ablation:
            if result.closer_look.ran:  # the round-1 mask of the same turn, or the same turn without round 2
                round1 = final_masks(result, 1) or final_masks(pipeline.chat(image, query, history, closer_look=False,
                                                                               neighbours_hu=neighbours))
            else:
                round1 = final_masks(result)
            round1_mask, _ = union_mask(round1, shape)
            outcome.scores_round1 = asdict(metrics(round1_mask, target, tuple(sample.spacing)))
    if sample.task == "seg" or (sample.task == "absent" and sample.query_task == "seg"):
        outcome.mask_boxes_area = mask_to_boxes(probability, settings.mask_threshold, "area")
        outcome.mask_boxes_max_prob = mask_to_boxes(probability, settings.mask_threshold, "max_prob")
    if sample.task == "det" or (sample.task == "absent" and sample.query_task == "det"):
        outcome.boxes = _scored_boxes(result.boxes)
        outcome.detection_branch_boxes = outcome.boxes
        if pipeline.config.detection.box_source != "detection" and result.boxes:
            # fused boxes: the detection branch alone, for Table 7 (same greedy answer, no mask pass)
            branch = pipeline.chat(image, query, history, closer_look=False, score_threshold=settings.ap_score_floor,
                                   return_probabilities=False, box_source="detection", neighbours_hu=neighbours)
            outcome.detection_branch_boxes = _scored_boxes(branch.boxes)
    outcome.seconds = time.perf_counter() - start
    return outcome


def _scored_boxes(boxes) -> List[Tuple[List[float], float]]:
    return [(np.asarray(b.xyxy, dtype=float).tolist(), float(b.score)) for b in boxes]


def evaluate(pipeline, samples: Sequence, settings: Optional[EvalSettings] = None, progress: bool = True,
             ) -> Tuple[Dict[str, Any], List[SampleOutcome]]:
    """Evaluate ``pipeline`` on ``samples``; returns (summary of every table, per-sample outcomes)."""
    from tqdm.auto import tqdm

    settings = settings or EvalSettings()
    metrics = SegmentationMetrics(settings.nsd_tolerance_mm)
    outcomes = [evaluate_sample(pipeline, sample, metrics, settings)
                for sample in tqdm(samples, desc="eval", unit="sample", disable=not progress)]
    summary = summarize(outcomes, settings)
    summary["box_source"] = pipeline.config.detection.box_source
    return summary, outcomes


def stratified_subset(records: Sequence[Dict[str, Any]], limit: Optional[int]) -> List[int]:
    """Indices of at most ``limit`` records spread evenly over (organ, task) groups, in dataset order.

    Groups take turns, each contributing its records at evenly spaced positions, so a small limit still
    covers every organ and task and the choice does not depend on any random state.
    """
    if limit is None or limit >= len(records):
        return list(range(len(records)))
    groups: Dict[Tuple[str, str], List[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault((record["organ"], record["task"]), []).append(index)
    task_order = {"seg": 0, "det": 1, "absent": 2}
    ordered = sorted(groups, key=lambda key: (ORGAN_ORDER.index(key[0]) if key[0] in ORGAN_ORDER else len(ORGAN_ORDER),
                                              task_order.get(key[1], 3)))
    quota = {key: 0 for key in groups}
    remaining = limit
    while remaining:
        open_groups = [key for key in ordered if quota[key] < len(groups[key])]
        if remaining < len(open_groups):  # last round: groups spread over organs and tasks
            open_groups = [open_groups[i] for i in np.linspace(0, len(open_groups) - 1, remaining).round().astype(int)]
        for key in open_groups:
            quota[key] += 1
        remaining -= len(open_groups)
    chosen = []
    for key, members in groups.items():
        positions = np.linspace(0, len(members) - 1, quota[key]).round().astype(int) if quota[key] else []
        chosen += [members[p] for p in np.unique(positions)]
    return sorted(chosen)


def load_samples(dataset_dir: str, split: str = "test", limit: Optional[int] = None) -> Tuple[List, int]:
    """(samples, records in the split): at most ``limit`` records of a curated dataset's split, spread evenly
    over organs and tasks (``stratified_subset``). ``split`` "all": every split in order (held-out phantom
    sets, whose subjects were never trained on)."""
    from CTReasonerLib.data.dataset import SPLITS, CuratedDataset

    splits = SPLITS if split == "all" else (split,)
    datasets = [CuratedDataset(dataset_dir, name) for name in splits]
    records = [(dataset, index) for dataset in datasets for index in range(len(dataset))]
    indices = stratified_subset([dataset.records[index] for dataset, index in records], limit)
    return [records[i][0][records[i][1]] for i in indices], len(records)


def evaluate_model(model_dir: str, dataset_dir: str, split: str = "test", out_dir: Optional[str] = None,
                   settings: Optional[EvalSettings] = None, limit: Optional[int] = None, device: str = "auto",
                   progress: bool = True, presence_gate: Union[None, float, str] = None,
                   presence_rescue: Union[None, float, str] = None,
                   pixel_mask_weight: Union[None, float, str] = None, presence_context: bool = True):
    """Load a model folder, evaluate it on a dataset split, write the report; returns (summary, paths).

    ``presence_gate``, ``presence_rescue`` and ``pixel_mask_weight`` override the model's settings of those
    names for this run: a value, or ``GATE_OFF`` (switched off); None keeps the model's. ``presence_context``
    False switches the model's context decision off (its pixel network's presence is then the top-k score).
    """
    from CTReasonerLib.model.ctreasoner import CTReasonerModel
    from CTReasonerLib.model.inference import CTReasonerPipeline

    from .report import write_report

    samples, records_in_split = load_samples(dataset_dir, split, limit)
    model = CTReasonerModel.from_pretrained(model_dir, device=device).eval()
    overrides = {name: None if value == GATE_OFF else float(value)
                 for name, value in (("presence_gate", presence_gate), ("presence_rescue", presence_rescue),
                                     ("pixel_mask_weight", pixel_mask_weight))
                 if value is not None}
    if not presence_context:
        overrides["presence_context"] = None
    if overrides:
        set_inference_settings(model, **overrides)
    settings = settings or EvalSettings()
    summary, outcomes = evaluate(CTReasonerPipeline(model), samples, settings, progress)
    summary["run"] = {"model": str(model_dir), "dataset": str(dataset_dir), "split": split,
                      "presence_gate": model.config.presence_gate, "presence_from": model.config.presence_from,
                      "presence_rescue": model.config.presence_rescue,
                      "closer_look_keep": model.config.closer_look.keep,
                      "pixel_mask_weight": model.config.pixel_mask_weight,
                      "presence_context": model.config.presence_context is not None,
                      "records_in_split": records_in_split, "records_evaluated": len(samples)}
    paths = write_report(out_dir, summary, [asdict(o) for o in outcomes]) if out_dir else {}
    return summary, paths


def set_inference_settings(model, **settings: Optional[float]) -> None:
    """Give ``model`` other ``presence_gate`` / ``presence_rescue`` / ``pixel_mask_weight`` values, or switch
    ``presence_context`` off (None: off), checked as its config checks them."""
    model.config = model.config.updated(settings)


def validation_dice(model, samples: Sequence) -> Dict[str, float]:
    """The trainer's periodic validation: mean final Dice over the seg records, and routing accuracy."""
    from CTReasonerLib.model.inference import CTReasonerPipeline

    settings = EvalSettings(closer_ablation=False)
    metrics = SegmentationMetrics(settings.nsd_tolerance_mm)
    pipeline = CTReasonerPipeline(model)
    outcomes = [evaluate_sample(pipeline, s, metrics, settings) for s in samples]
    dice = [o.scores["dice"] for o in outcomes if o.scores is not None]
    return {"val_dice": _mean(dice), "val_routing": _mean([float(o.routing_correct) for o in outcomes]),
            "val_samples": float(len(outcomes))}


# ----------------------------------------------------------------------------------------------- summary
def summarize(outcomes: Sequence[SampleOutcome], settings: EvalSettings) -> Dict[str, Any]:
    """Every number of the report, as plain JSON-able values (fractions, not percentages)."""
    seg = [o for o in outcomes if o.task == "seg"]
    summary: Dict[str, Any] = {
        "settings": asdict(settings),
        "counts": {task: sum(o.task == task for o in outcomes) for task in ("seg", "det", "absent")},
        "segmentation": _segmentation_table(seg, "scores"),
        "detection": _ap_table(outcomes, "boxes", ("det",), settings.iou_threshold),
        "detection_branch": _ap_table(outcomes, "detection_branch_boxes", ("det",), settings.iou_threshold),
        "mask_to_box": {
            "area": _ap_table(outcomes, "mask_boxes_area", ("seg",), settings.iou_threshold),
            "max_prob": _ap_table(outcomes, "mask_boxes_max_prob", ("seg",), settings.iou_threshold),
        },
        "routing": _routing(outcomes),
        "absent": _absent(outcomes),
        "closer_look": _closer_look(seg) if settings.closer_ablation else None,
        "timing": {"seconds_total": float(sum(o.seconds for o in outcomes)),
                   "seconds_per_sample": _mean([o.seconds for o in outcomes])},
    }
    return summary


def _segmentation_table(seg: Sequence[SampleOutcome], key: str) -> Dict[str, Any]:
    """Per-organ mean Dice/HD95/NSD over records whose target is present, and their means over organs."""
    per_organ = {}
    for organ in ORGAN_ORDER:
        rows = [getattr(o, key) for o in seg if o.organ == organ and getattr(o, key) is not None
                and not (SegmentationScores(**getattr(o, key)).both_empty)]
        if rows:
            per_organ[organ] = {"dice": _mean([r["dice"] for r in rows]), "hd95_mm": _mean([r["hd95_mm"] for r in rows]),
                                "nsd": _mean([r["nsd"] for r in rows]), "n": len(rows)}
    mean = {metric: _mean([v[metric] for v in per_organ.values()]) for metric in ("dice", "hd95_mm", "nsd")}
    return {"per_organ": per_organ, "mean": mean}


def _ap_table(outcomes: Sequence[SampleOutcome], key: str, tasks: Sequence[str], iou_threshold: float) -> Dict[str, Any]:
    """AP per organ over the records of ``tasks`` (ground truth) plus absent records phrased the same way."""
    per_organ = {}
    for organ in ORGAN_ORDER:
        rows = [o for o in outcomes if o.organ == organ and
                (o.task in tasks or (o.task == "absent" and o.query_task in tasks))]
        if not any(o.task in tasks for o in rows):
            continue
        predictions = [ScoredBox(o.id, box, score) for o in rows for box, score in getattr(o, key)]
        ground_truth = {o.id: np.asarray(o.gt_boxes, dtype=float).reshape(-1, 4) for o in rows}
        ap = average_precision(predictions, ground_truth, iou_threshold)
        per_organ[organ] = {"ap": ap, "n_gt": int(sum(len(g) for g in ground_truth.values())),
                            "n_pred": len(predictions), "n_slices": len(rows)}
    return {"per_organ": per_organ, "map": _mean([v["ap"] for v in per_organ.values()])}


def _routing(outcomes: Sequence[SampleOutcome]) -> Dict[str, Any]:
    by_task = {task: _mean([float(o.routing_correct) for o in outcomes if o.task == task])
               for task in ("seg", "det", "absent")}
    errors = {cause: 0 for cause in ROUTING_ERROR_CAUSES}
    for outcome in outcomes:
        if not outcome.routing_correct:
            errors[routing_error_cause(outcome)] += 1
    return {"accuracy": _mean([float(o.routing_correct) for o in outcomes]), "n": len(outcomes), "by_task": by_task,
            "errors": errors}


#: Why a routing answer was wrong; the report explains each.
ROUTING_ERROR_CAUSES = ("absent_passed_gate", "absent_rescued", "absent_routed_ungated",
                        "present_overruled", "present_not_visible", "present_other_task")


def routing_error_cause(outcome: SampleOutcome) -> str:
    """Which of ``ROUTING_ERROR_CAUSES`` explains a wrong routing answer (``outcome.routing_correct`` False)."""
    if outcome.task == "absent":
        if outcome.presence_rescued:
            return "absent_rescued"
        return "absent_passed_gate" if outcome.presence is not None else "absent_routed_ungated"
    if outcome.presence_overruled:
        return "present_overruled"
    return "present_not_visible" if _routed_nowhere(outcome) else "present_other_task"


def _absent(outcomes: Sequence[SampleOutcome]) -> Dict[str, Any]:
    absent = [o for o in outcomes if o.task == "absent"]
    present = [o for o in outcomes if o.task != "absent"]
    # A present target answered with neither token nor output is the opposite error.
    false_absent = [float(_routed_nowhere(o)) for o in present]
    return {"accuracy": _mean([float(o.absent_correct) for o in absent]), "n": len(absent),
            "false_absent_rate": _mean(false_absent), "n_present": len(present),
            "overruled_absent": sum(o.presence_overruled for o in absent),
            "overruled_present": sum(o.presence_overruled for o in present),
            "rescued_absent": sum(o.presence_rescued for o in absent),
            "rescued_present": sum(o.presence_rescued for o in present),
            "presence_sweep": presence_gate_sweep(outcomes)}


PRESENCE_SWEEP_GATES = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def presence_gate_sweep(outcomes: Sequence[SampleOutcome], gates: Sequence[float] = PRESENCE_SWEEP_GATES,
                        ) -> List[Dict[str, float]]:
    """Absent-target accuracy and false-'absent' rate had the presence gate been each of ``gates``.

    Exact, not estimated, from one run with any gate on: every routed answer then carries its presence
    probability, an overruled answer is the fixed no-token, no-output answer, and an answer the gate lets
    through is the routed one. So a record whose probability is below the gate is answered 'absent', one
    at or above it keeps its routed answer (wrong for an absent target, not 'absent' for a present one),
    and answers that routed nowhere keep their outcome (the gate never sees them; with ``presence_rescue``
    on they may carry a probability). Rescues are held as run. Empty when the run recorded no
    probabilities for routed answers (no gate). Run ``ctreasoner eval --presence-gate 0`` to sweep a model
    without changing any answer.
    """
    if not any(_gated(o) for o in outcomes):
        return []
    absent = [o for o in outcomes if o.task == "absent"]
    present = [o for o in outcomes if o.task != "absent"]
    rows = []
    for gate in gates:
        right = [o.presence < gate if _gated(o) else o.absent_correct for o in absent]
        wrong = [o.presence < gate if _gated(o) else _routed_nowhere(o) for o in present]
        rows.append({"gate": gate, "absent_accuracy": _mean([float(x) for x in right]),
                     "false_absent_rate": _mean([float(x) for x in wrong])})
    return rows


def _gated(outcome: SampleOutcome) -> bool:
    """Did the presence gate see this answer: a routed (or overruled) one with a probability?"""
    return outcome.presence is not None and (outcome.presence_overruled or not _routed_nowhere(outcome))


def _routed_nowhere(outcome: SampleOutcome) -> bool:
    return not (SEG_TOKEN in outcome.routing_tokens or DET_TOKEN in outcome.routing_tokens)


def _closer_look(seg: Sequence[SampleOutcome]) -> Dict[str, Any]:
    """Table 4 (average Dice/HD95 without vs with the closer look) and the smallest organs' Dice."""
    without = _segmentation_table(seg, "scores_round1")
    with_ = _segmentation_table(seg, "scores")
    areas = {organ: _mean([o.target_area_mm2 for o in seg if o.organ == organ and o.target_area_mm2 > 0])
             for organ in ORGAN_ORDER}
    measured = [organ for organ in ORGAN_ORDER if organ in with_["per_organ"] and organ in without["per_organ"]]
    smallest = sorted(measured, key=lambda organ: areas[organ])[:SMALLEST_ORGAN_COUNT]
    small_without = _mean([without["per_organ"][k]["dice"] for k in smallest])
    small_with = _mean([with_["per_organ"][k]["dice"] for k in smallest])
    return {
        "without": without["mean"], "with": with_["mean"],
        "per_organ_without": without["per_organ"], "per_organ_with": with_["per_organ"],
        "smallest_organs": smallest, "smallest_mean_area_mm2": {k: areas[k] for k in smallest},
        "smallest_dice_without": small_without, "smallest_dice_with": small_with,
        "smallest_dice_gain": small_with - small_without,
        "ran_fraction": _mean([float(o.closer_look_ran) for o in seg]),
    }


def _mean(values: Sequence[float]) -> float:
    values = [float(v) for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")
