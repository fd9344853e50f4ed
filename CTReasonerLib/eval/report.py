"""Markdown report and JSON of an evaluation, in the layout of the paper's Tables 1, 4 and 7.

Numbers in the Markdown are percentages with two decimals (as the paper prints them), HD95 in mm;
the JSON keeps fractions. The paper's own rows are printed under ours, labelled as reported in the
paper, so that a run of the 3B model on BTCV++ can be compared column by column.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from CTReasonerLib.organs import ORGANS, get_organ

REPORT_FILE = "eval_report.md"
RESULTS_FILE = "eval_results.json"
SAMPLES_FILE = "eval_samples.jsonl"

#: The report's words for each of evaluate.ROUTING_ERROR_CAUSES.
ROUTING_ERROR_TEXT = {
    "absent_passed_gate": "absent target routed; the presence gate let it through (probability at or above the gate)",
    "absent_rescued": "absent target routed by the presence rescue",
    "absent_routed_ungated": "absent target routed; no presence gate ran",
    "present_overruled": "present target overruled by the presence gate",
    "present_not_visible": "present target answered \"not visible\" (no rescue, or the rescue did not route)",
    "present_other_task": "present target routed to the other task's token, or to both",
}

TABLE7_ORGANS = ("portal_splenic_veins", "right_adrenal_gland", "left_adrenal_gland", "duodenum")

# Reported in the paper (BTCV++ test split), in Table 1 column order, for side-by-side reading.
PAPER_TABLE1_DICE = {
    "Ours (Qwen2.5VL-3B), paper": [91.55, 87.04, 89.41, 77.69, 81.58, 92.55, 88.00, 77.49, 78.41, 72.30, 79.63,
                                   71.55, 71.55, 80.37, 81.37],
    "Ours (Janus-1B), paper": [93.39, 84.67, 89.84, 77.22, 73.55, 95.24, 82.93, 85.54, 85.79, 70.60, 73.63, 61.16,
                               58.58, 65.38, 78.39],
}
PAPER_TABLE1_MAP = {
    "Ours (Qwen2.5VL-3B), paper": [100.00, 100.00, 100.00, 82.00, 100.00, 97.48, 98.51, 100.00, 100.00, 65.50,
                                   79.52, 91.09, 91.32, 85.59, 92.21],
    "Ours (Janus-1B), paper": [94.93, 88.95, 96.16, 85.96, 95.22, 92.63, 86.18, 99.11, 99.80, 65.04, 85.25, 89.61,
                               88.26, 82.88, 89.28],
}
PAPER_TABLE4 = [("w/ Qwen2.5VL-3B, paper", 80.24, 6.79), ("w/ Qwen2.5VL-3B + closer look, paper", 81.37, 5.64)]
PAPER_TABLE7 = [("Detection branch, paper", [65.50, 91.09, 91.32, 85.59]),
                ("Mask→Box (area conf.), paper", [55.10, 89.74, 89.46, 66.38]),
                ("Mask→Box (max-prob conf.), paper", [53.13, 90.07, 88.22, 62.46])]


def percent(value: Optional[float]) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100.0 * value:.2f}"


def _gate(value: Optional[float]) -> str:
    return "off" if value is None else f"{value:g}"


def millimetres(value: Optional[float]) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def _organ_row(label: str, per_organ: Dict[str, Dict[str, float]], metric: str, mean: Optional[float],
               fmt=percent) -> List[str]:
    return [label] + [fmt(per_organ.get(o.key, {}).get(metric)) for o in ORGANS] + [fmt(mean)]


def render_report(summary: Dict[str, Any], title: str = "CTReasoner evaluation") -> str:
    """The Markdown report of ``evaluate``'s summary (plus the optional ``summary["run"]`` header)."""
    header = ["Method"] + [o.abbreviation for o in ORGANS] + ["Mean"]
    lines = [f"# {title}", ""]
    run = summary.get("run", {})
    settings = summary["settings"]
    counts = summary["counts"]
    lines += [f"- Model: `{run.get('model', '?')}`", f"- Dataset: `{run.get('dataset', '?')}`, split `{run.get('split', '?')}`",
              f"- Records: {counts['seg']} segmentation, {counts['det']} detection, {counts['absent']} absent-target",
              f"- HD95 in mm (a missed organ scores the slice diagonal); NSD tolerance {settings['nsd_tolerance_mm']:g} mm; "
              f"AP at IoU {settings['iou_threshold']:g} over every box scoring >= {settings.get('ap_score_floor', 0.0):g}; "
              f"masks thresholded at {settings['mask_threshold']:g}; boxes: `{summary.get('box_source', 'detection')}`"
              + (f"; presence gate {_gate(run['presence_gate'])}" if "presence_gate" in run else "")
              + (f" on presence from `{run['presence_from']}`" if run.get("presence_gate") is not None
                 and "presence_from" in run else "")
              + (" (the pixel network's read by the context decision over the slice and its neighbours)"
                 if run.get("presence_context") else "")
              + (f"; presence rescue {run['presence_rescue']:g}" if run.get("presence_rescue") is not None else "")
              + (f"; closer look keeps the `{run['closer_look_keep']}` round" if "closer_look_keep" in run else "")
              + (f"; masks blend in the pixel network's organ map at weight {run['pixel_mask_weight']:g}"
                 if run.get("pixel_mask_weight") is not None else ""),
              f"- Time: {summary['timing']['seconds_total']:.1f} s ({summary['timing']['seconds_per_sample']:.3f} s per record)",
              ""]

    seg, det = summary["segmentation"], summary["detection"]
    lines += ["## Table 1 layout: segmentation (Dice %) and detection (mAP@0.1 %) per organ", ""]
    lines += ["Segmentation, Dice (%):", ""]
    lines += _table(header, [_organ_row("This model", seg["per_organ"], "dice", seg["mean"]["dice"])] +
                    [[name] + [f"{v:.2f}" for v in values] for name, values in PAPER_TABLE1_DICE.items()])
    lines += ["Detection, mAP@0.1 (%):", ""]
    lines += _table(header, [_organ_row("This model", det["per_organ"], "ap", det["map"])] +
                    [[name] + [f"{v:.2f}" for v in values] for name, values in PAPER_TABLE1_MAP.items()])
    lines += ["Segmentation detail of this model (HD95 in mm, NSD %, records per organ):", ""]
    lines += _table(["Measure"] + header[1:], [
        _organ_row("Dice (%)", seg["per_organ"], "dice", seg["mean"]["dice"]),
        _organ_row("HD95 (mm)", seg["per_organ"], "hd95_mm", seg["mean"]["hd95_mm"], millimetres),
        _organ_row("NSD (%)", seg["per_organ"], "nsd", seg["mean"]["nsd"]),
        ["records"] + [str(seg["per_organ"].get(o.key, {}).get("n", 0)) for o in ORGANS] + [""],
    ])

    closer = summary.get("closer_look")
    lines += ["## Table 4 layout: closer-look ablation", ""]
    if closer is None:
        lines += ["Not run (`--no-closer-ablation`).", ""]
    else:
        lines += _table(["Architecture", "Average Dice ↑", "Average HD95 (mm) ↓"], [
            ["This model, without closer look", percent(closer["without"]["dice"]), millimetres(closer["without"]["hd95_mm"])],
            ["This model, with closer look", percent(closer["with"]["dice"]), millimetres(closer["with"]["hd95_mm"])],
        ] + [[name, f"{dice:.2f}", f"{hd:.2f}"] for name, dice, hd in PAPER_TABLE4])
        if run.get("closer_look_keep") == "better":
            lines += ["With closer look: the mask the turn ends with. This model keeps round 1's mask where its IoU "
                      "head rates it above round 2's (`closer_look.keep = better`); the paper always keeps round 2's.", ""]
        lines += [f"The {len(closer['smallest_organs'])} smallest organs (by mean target area on these slices), Dice (%):", ""]
        rows = [[get_organ(k).abbreviation, percent(closer["per_organ_without"][k]["dice"]),
                 percent(closer["per_organ_with"][k]["dice"]),
                 f"{100 * (closer['per_organ_with'][k]['dice'] - closer['per_organ_without'][k]['dice']):+.2f}"]
                for k in closer["smallest_organs"]]
        rows.append(["Mean", percent(closer["smallest_dice_without"]), percent(closer["smallest_dice_with"]),
                     f"{100 * closer['smallest_dice_gain']:+.2f}"])
        lines += _table(["Organ", "Without closer look", "With closer look", "Gain (points)"], rows)
        lines += [f"A closer look ran on {percent(closer['ran_fraction'])} % of the segmentation records.", ""]

    routing, absent = summary["routing"], summary["absent"]
    lines += ["## Routing and absent targets", ""]
    lines += _table(["Measure", "Value (%)", "Records"], [
        ["Routing accuracy (all records)", percent(routing["accuracy"]), routing["n"]],
        ["  segmentation queries → [SEG]", percent(routing["by_task"]["seg"]), counts["seg"]],
        ["  detection queries → [DET]", percent(routing["by_task"]["det"]), counts["det"]],
        ["  absent targets → no routing token", percent(routing["by_task"]["absent"]), counts["absent"]],
        ["Absent-target accuracy (no token, no mask, no box)", percent(absent["accuracy"]), absent["n"]],
        ["False 'absent' on present targets", percent(absent["false_absent_rate"]), absent["n_present"]],
    ])
    errors = routing.get("errors") or {}
    if any(errors.values()):
        lines += [f"Why the {sum(errors.values())} wrong routing answers were wrong:", ""]
        lines += _table(["Cause", "Records"], [[ROUTING_ERROR_TEXT[cause], count]
                                               for cause, count in errors.items() if count])
    overruled = absent.get("overruled_absent", 0) + absent.get("overruled_present", 0)
    if overruled:
        lines += [f"The model's presence gate overruled {overruled} routed answers: {absent['overruled_absent']} on "
                  f"absent targets (now right), {absent['overruled_present']} on present targets (now wrong).", ""]
    rescued = absent.get("rescued_absent", 0) + absent.get("rescued_present", 0)
    if rescued:
        lines += [f"The presence rescue decoded {rescued} \"not visible\" answers again as visible: "
                  f"{absent['rescued_present']} on present targets (now routed), {absent['rescued_absent']} on absent "
                  "targets (now wrong).", ""]
    if absent.get("presence_sweep"):
        lines += ["Had the presence gate been another value (exact, from this run's presence probabilities; "
                  "`presence_gate` in the model's ctreasoner_config.json):", ""]
        lines += _table(["Presence gate", "Absent-target accuracy (%)", "False 'absent' on present targets (%)"],
                        [[f"{row['gate']:.2f}", percent(row["absent_accuracy"]), percent(row["false_absent_rate"])]
                         for row in absent["presence_sweep"]])

    lines += ["## Table 7 layout: detection branch vs mask-derived boxes (mAP@0.1 %)", ""]
    boxes, branch = summary["mask_to_box"], summary.get("detection_branch", det)
    box_source = summary.get("box_source", "detection")
    rows = [["Detection branch"] + [percent(branch["per_organ"].get(k, {}).get("ap")) for k in TABLE7_ORGANS]
            + [percent(branch["map"])],
            ["Mask→Box (area conf.)"] + [percent(boxes["area"]["per_organ"].get(k, {}).get("ap")) for k in TABLE7_ORGANS]
            + [percent(boxes["area"]["map"])],
            ["Mask→Box (max-prob conf.)"] + [percent(boxes["max_prob"]["per_organ"].get(k, {}).get("ap")) for k in TABLE7_ORGANS]
            + [percent(boxes["max_prob"]["map"])]]
    if box_source != "detection":
        rows.append([f"Shipped boxes (box_source = {box_source})"]
                    + [percent(det["per_organ"].get(k, {}).get("ap")) for k in TABLE7_ORGANS] + [percent(det["map"])])
    rows += [[name] + [f"{v:.2f}" for v in values] + ["–"] for name, values in PAPER_TABLE7]
    lines += _table(["Method"] + [get_organ(k).abbreviation for k in TABLE7_ORGANS] + ["Mean, all organs"], rows)
    lines += ["Mask→Box boxes are the connected components of the final mask of each segmentation query; "
              "area conf. = the component's share of the mask's pixels, max-prob conf. = the highest mask "
              "probability inside it."]
    if box_source != "detection":
        lines += [f"Shipped boxes are what a detection query returns with `detection.box_source = {box_source}`: "
                  "the same organ is also segmented (with a closer look), its mask's boxes (max-prob conf.) rank "
                  "first, and the detection branch's boxes, scores times `detection.fusion_detection_weight`, fill "
                  "in where they overlap none of them. Table 1's detection row scores these boxes."]
    lines += [""]
    return "\n".join(lines)


def jsonable(value: Any) -> Any:
    """NaN/inf -> None (JSON has neither), tuples -> lists, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_report(out_dir: str, summary: Dict[str, Any], sample_rows: Sequence[Dict[str, Any]] = (),
                 title: str = "CTReasoner evaluation") -> Dict[str, Path]:
    """Write ``eval_report.md``, ``eval_results.json`` and (per record) ``eval_samples.jsonl``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report": out / REPORT_FILE, "results": out / RESULTS_FILE, "samples": out / SAMPLES_FILE}
    paths["report"].write_text(render_report(summary, title), encoding="utf-8")
    paths["results"].write_text(json.dumps(jsonable(summary), indent=2), encoding="utf-8")
    with open(paths["samples"], "w", encoding="utf-8") as handle:
        for row in sample_rows:
            handle.write(json.dumps(jsonable(row)) + "\n")
    return paths
