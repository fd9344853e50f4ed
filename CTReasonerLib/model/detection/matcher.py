"""Hungarian matching of box queries to ground-truth boxes (DETR's HungarianMatcher, objectness variant)."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou


class HungarianMatcher(nn.Module):
    """Cost = cost_class * (-p_object) + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU(xyxy)).

    With one class ("the requested organ") the class cost is minus the objectness probability.
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        super().__init__()
        if cost_class == cost_bbox == cost_giou == 0:
            raise ValueError("all matching costs are zero")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """outputs: pred_logits (N, Q), pred_boxes (N, Q, 4) cxcywh; targets: N dicts with boxes (M_i, 4) cxcywh.

        Returns N pairs (query indices, target indices), each (min(Q, M_i),) long, on the CPU.
        """
        probabilities = outputs["pred_logits"].float().sigmoid().cpu()
        pred_boxes = outputs["pred_boxes"].float().cpu()
        matches = []
        for prob, boxes, target in zip(probabilities, pred_boxes, targets):
            target_boxes = target["boxes"].float().cpu()
            if target_boxes.numel() == 0:
                empty = torch.empty(0, dtype=torch.long)
                matches.append((empty, empty))
                continue
            cost = (
                self.cost_bbox * torch.cdist(boxes, target_boxes, p=1)
                - self.cost_class * prob[:, None]
                - self.cost_giou * generalized_box_iou(
                    box_convert(boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy")
                )
            )
            query_index, target_index = linear_sum_assignment(cost.numpy())
            matches.append((torch.as_tensor(query_index, dtype=torch.long), torch.as_tensor(target_index, dtype=torch.long)))
        return matches
