"""Choose ``pixel_mask_weight``: mean Dice of a model's segmentation answers at several blending weights.

Each segmentation record is asked once per weight, with a closer look and both rounds' masks kept, and scored for
both ``closer_look.keep`` rules. The weight changes more than the blend: round 2 crops around round 1's blended
mask, so every weight is a run of the pipeline as a user gets it. Weight 0 is the model without the prior. Choose
on validation subjects, not on the ones you report.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..errors import CTReasonerError
from ..model.inference import round_one_rated_higher
from ..organs import get_organ
from .evaluate import final_masks, union_mask

DEFAULT_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
KEEP_RULES = ("last", "better")


def dice(prediction: np.ndarray, target: np.ndarray) -> float:
    """Dice of two boolean (H, W) masks, monai's; 1 when both are empty (the evaluation's convention)."""
    from monai.metrics import compute_dice

    y_pred, y = (torch.from_numpy(np.asarray(mask, dtype=bool))[None, None].float() for mask in (prediction, target))
    return float(compute_dice(y_pred, y, include_background=True, ignore_empty=False))


def _record_scores(pipeline, sample, weights: Sequence[float]) -> Dict[str, List[float]]:
    """{keep rule: [Dice at each weight]} for one segmentation record (the pipeline's ``closer_look.keep`` must be
    "last", so that both rounds' masks come back)."""
    history = [(turn["query"], turn["answer"]) for turn in getattr(sample, "history", ())]
    target = np.asarray(sample.mask, dtype=bool)
    scores: Dict[str, List[float]] = {rule: [] for rule in KEEP_RULES}
    for weight in weights:
        pipeline.config.pixel_mask_weight = weight or None
        result = pipeline.chat(sample.image_hu, sample.turns[0]["query"], history, closer_look=True,
                               neighbours_hu=getattr(sample, "neighbours_hu", None))
        first, second = final_masks(result, 1), final_masks(result, 2)
        kept = {"last": second or first,
                "better": first if round_one_rated_higher([m.score for m in first], [m.score for m in second])
                          else (second or first)}
        for rule, masks in kept.items():
            scores[rule].append(dice(union_mask(masks, target.shape)[0], target))
    return scores


def sweep_pixel_mask_weight(pipeline, samples: Sequence, weights: Sequence[float] = DEFAULT_WEIGHTS,
                            progress: bool = True) -> Dict[str, Any]:
    """Per-organ and mean Dice of the segmentation records in ``samples`` at each weight and keep rule:
    {"table": {rule: [row per weight]}, "per_organ": {rule: {organ: [Dice per weight]}}, "best": ...}.

    The pipeline's own ``pixel_mask_weight`` and ``closer_look.keep`` are set aside while it runs. It costs one
    chat turn per record and weight.
    """
    if pipeline.model.pixel_presence_net is None:
        raise CTReasonerError("this model has no pixel network to blend into its masks",
                              "add one with `ctreasoner fit-presence MODEL DATASET --head pixels`")
    weights = [float(w) for w in weights]
    if not weights or any(not 0.0 <= w < 1.0 for w in weights):
        raise CTReasonerError(f"blending weights must lie in [0, 1), got {weights}", "e.g. --weights 0 0.2 0.4")
    seg = [s for s in samples if s.task == "seg"]
    if not seg:
        raise CTReasonerError("no segmentation records to score", "use a curated dataset split with seg records")
    config = pipeline.config
    saved = config.pixel_mask_weight, config.closer_look.keep
    config.pixel_mask_weight, config.closer_look.keep = None, "last"
    per_organ: Dict[str, Dict[str, List[List[float]]]] = {}
    try:
        for sample in tqdm(seg, desc="sweep", unit="record", disable=not progress):
            for rule, values in _record_scores(pipeline, sample, weights).items():
                per_organ.setdefault(sample.organ, {r: [] for r in KEEP_RULES})[rule].append(values)
    finally:
        config.pixel_mask_weight, config.closer_look.keep = saved
    organ_table = {rule: {organ: [float(v) for v in np.mean(rules[rule], axis=0)] for organ, rules in per_organ.items()}
                   for rule in KEEP_RULES}
    table = {}
    for rule, organ_means in organ_table.items():
        means = np.mean(list(organ_means.values()), axis=0)
        worst = [min(organ_means, key=lambda organ: organ_means[organ][i]) for i in range(len(weights))]
        table[rule] = [{"weight": w, "mean_dice": float(means[i]), "worst_organ": worst[i],
                        "worst_dice": organ_means[worst[i]][i]} for i, w in enumerate(weights)]
    best_rule, best = max(((rule, row) for rule in KEEP_RULES for row in table[rule]), key=lambda item: item[1]["mean_dice"])
    return {"records": len(seg), "organs": len(per_organ), "weights": weights, "table": table, "per_organ": organ_table,
            "best": {"closer_look_keep": best_rule, "pixel_mask_weight": best["weight"], "mean_dice": best["mean_dice"]}}


def render_sweep(result: Dict[str, Any]) -> str:
    """The sweep as a Markdown table."""
    lines = [f"Pixel mask weight sweep: {result['records']} segmentation records, {result['organs']} organs "
             "(mean Dice over organs; weight 0 = no pixel prior)", "",
             "| weight | " + " | ".join(f"keep {rule}: mean Dice | worst organ" for rule in KEEP_RULES) + " |",
             "|---|" + "---|---|" * len(KEEP_RULES)]
    for i, weight in enumerate(result["weights"]):
        cells = [f"{row['mean_dice']:.4f} | {get_organ(row['worst_organ']).name} {row['worst_dice']:.3f}"
                 for row in (result["table"][rule][i] for rule in KEEP_RULES)]
        lines.append(f"| {weight:g} | " + " | ".join(cells) + " |")
    best = result["best"]
    lines += ["", f"Best: pixel_mask_weight {best['pixel_mask_weight']:g} with closer_look.keep "
                  f"{best['closer_look_keep']} (mean Dice {best['mean_dice']:.4f}).", "",
              f"Dice per organ with closer_look.keep {best['closer_look_keep']}:", "",
              "| organ | " + " | ".join(f"{weight:g}" for weight in result["weights"]) + " |",
              "|---|" + "---|" * len(result["weights"])]
    organs = result["per_organ"][best["closer_look_keep"]]
    for organ in sorted(organs, key=lambda key: get_organ(key).label):
        lines.append(f"| {get_organ(organ).name} | " + " | ".join(f"{value:.3f}" for value in organs[organ]) + " |")
    return "\n".join(lines) + "\n"
