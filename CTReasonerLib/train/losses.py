"""Perception losses: masks (BCE + Dice) and boxes (Hungarian-matched L1 + GIoU, BCE objectness).

Each function returns its terms unweighted; the trainer applies lambda_seg / lambda_det. When a batch has
nothing to supervise, every term is an exact zero that is still connected to the head's outputs, so
each trainable head takes part in every step and DDP / ZeRO never wait for a missing gradient.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torchvision.ops import box_convert, generalized_box_iou_loss

from CTReasonerLib.model.detection.matcher import HungarianMatcher

#: masks are supervised at no more than this side: SAM's low-res logits (256 at 1024 px) or the tiny 128
MAX_MASK_LOSS_SIDE = 256

# smooth 1 (as SAM's training recipe) rather than monai's 1e-5: an empty target then costs about the
# predicted foreground area instead of a constant ~1 no prediction can reduce.
_dice = DiceLoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0, reduction="mean")


def _zero_like_graph(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float().sum() * 0.0


def mask_loss(logits: torch.Tensor, targets: torch.Tensor, iou_scores: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """BCE and soft Dice of (N, 1, h, w) logits against (N, 1, H, W) binary or soft targets, in fp32.

    Targets are area-averaged to the logits' size (logits above ``MAX_MASK_LOSS_SIDE`` are first
    resized down), so the loss is computed at low resolution whatever the slice size.
    iou_scores: optional (N, 1) predictions of the decoder's IoU head; adds "iou", the MSE to the real IoU
        of the thresholded mask (SAM's recipe). It gives masks a calibrated score and keeps the IoU head
        in the graph (DDP requires every trainable parameter to get a gradient).
    Returns {"bce", "dice"[, "iou"]} scalars; all are connected zeros when N == 0.
    """
    if logits.dim() != 4 or targets.dim() != 4 or logits.shape[:2] != targets.shape[:2]:
        raise ValueError(f"logits (N, 1, h, w) and targets (N, 1, H, W) must agree, got {tuple(logits.shape)} and {tuple(targets.shape)}")
    if logits.shape[0] == 0:
        zero = _zero_like_graph(logits)
        terms = {"bce": zero, "dice": zero.clone()}
        if iou_scores is not None:
            terms["iou"] = _zero_like_graph(iou_scores)
        return terms
    logits = logits.float()
    if max(logits.shape[-2:]) > MAX_MASK_LOSS_SIDE:
        side = (min(logits.shape[-2], MAX_MASK_LOSS_SIDE), min(logits.shape[-1], MAX_MASK_LOSS_SIDE))
        logits = F.interpolate(logits, size=side, mode="bilinear", align_corners=False)
    targets = targets.to(device=logits.device, dtype=torch.float32)
    if targets.shape[-2:] != logits.shape[-2:]:
        shrinking = targets.shape[-2] >= logits.shape[-2] and targets.shape[-1] >= logits.shape[-1]
        targets = F.interpolate(targets, size=logits.shape[-2:], mode="area" if shrinking else "bilinear")
    terms = {
        "bce": F.binary_cross_entropy_with_logits(logits, targets),
        "dice": _dice(logits, targets),
    }
    if iou_scores is not None:
        with torch.no_grad():
            predicted, truth = logits > 0, targets > 0.5
            intersection = (predicted & truth).flatten(1).sum(1).float()
            union = (predicted | truth).flatten(1).sum(1).float()
            actual_iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))
        terms["iou"] = F.mse_loss(iou_scores.float().reshape(-1), actual_iou)
    return terms


def detection_loss(
    outputs: Dict[str, torch.Tensor],
    targets: List[Dict[str, torch.Tensor]],
    matcher: Optional[HungarianMatcher] = None,
) -> Dict[str, torch.Tensor]:
    """Set loss of the detection head (DETR recipe with a single "object" class).

    outputs: pred_logits (N, Q), pred_boxes (N, Q, 4) sigmoid cxcywh; targets: N dicts, boxes (M_i, 4)
    normalised cxcywh (M_i may be 0: every query is then a negative).
    L1 and GIoU are summed over matched pairs, objectness BCE over all N*Q queries (unmatched = 0);
    all three are divided by the number of target boxes (at least 1).
    """
    pred_logits = outputs["pred_logits"].float()
    pred_boxes = outputs["pred_boxes"].float()
    if len(targets) != pred_logits.shape[0]:
        raise ValueError(f"{pred_logits.shape[0]} predictions but {len(targets)} target entries")
    if pred_logits.shape[0] == 0:
        zero = _zero_like_graph(pred_logits) + _zero_like_graph(pred_boxes)
        return {"l1": zero, "giou": zero.clone(), "objectness": zero.clone()}
    matcher = matcher or HungarianMatcher()
    matches = matcher({"pred_logits": pred_logits, "pred_boxes": pred_boxes}, targets)

    prompt_index = torch.cat([torch.full_like(query, i) for i, (query, _) in enumerate(matches)]).to(pred_boxes.device)
    query_index = torch.cat([query for query, _ in matches]).to(pred_boxes.device)
    matched_targets = torch.cat(
        [target["boxes"].to(pred_boxes)[target_index.to(pred_boxes.device)] for target, (_, target_index) in zip(targets, matches)]
    )
    num_boxes = max(sum(int(target["boxes"].shape[0]) for target in targets), 1)

    objectness_target = torch.zeros_like(pred_logits)
    objectness_target[prompt_index, query_index] = 1.0
    objectness = F.binary_cross_entropy_with_logits(pred_logits, objectness_target, reduction="sum") / num_boxes

    if query_index.numel() == 0:
        zero = _zero_like_graph(pred_boxes)
        return {"l1": zero, "giou": zero.clone(), "objectness": objectness}
    matched_boxes = pred_boxes[prompt_index, query_index]
    l1 = F.l1_loss(matched_boxes, matched_targets, reduction="sum") / num_boxes
    giou = generalized_box_iou_loss(
        box_convert(matched_boxes, "cxcywh", "xyxy"), box_convert(matched_targets, "cxcywh", "xyxy"), reduction="sum"
    ) / num_boxes
    return {"l1": l1, "giou": giou, "objectness": objectness}
