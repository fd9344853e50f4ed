"""Detection outputs -> scored boxes in slice pixels."""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch
from torchvision.ops import box_convert

from CTReasonerLib.model.image_processing import ResizeToSquare


@torch.no_grad()
def postprocess_detections(
    outputs: Dict[str, torch.Tensor],
    transforms: Sequence[ResizeToSquare],
    score_threshold: float = 0.5,
) -> List[Dict[str, np.ndarray]]:
    """Keep every query scoring >= ``score_threshold`` (a split organ gives several boxes), best first.

    outputs: pred_logits (N, Q), pred_boxes (N, Q, 4) normalised cxcywh of the model square.
    transforms: one ResizeToSquare per prompt (the slice each [DET] token looked at).
    Returns N dicts: boxes (K, 4) float32 edge xyxy in original slice pixels, clipped (boxes wholly in the padding dropped); scores (K,) float32.
    """
    scores = outputs["pred_logits"].float().sigmoid()
    if len(transforms) != scores.shape[0]:
        raise ValueError(f"{scores.shape[0]} predictions but {len(transforms)} transforms")
    results = []
    for prompt_scores, prompt_boxes, transform in zip(scores, outputs["pred_boxes"].float(), transforms):
        keep = torch.nonzero(prompt_scores >= score_threshold).squeeze(1)
        keep = keep[prompt_scores[keep].argsort(descending=True)]
        model_xyxy = box_convert(prompt_boxes[keep], "cxcywh", "xyxy") * transform.image_size
        boxes = transform.boxes_from_model(model_xyxy)
        # a box entirely in the square's padding clips to zero area: it is not on the slice
        on_slice = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        results.append({
            "boxes": boxes[on_slice].cpu().numpy().astype(np.float32),
            "scores": prompt_scores[keep][on_slice].cpu().numpy().astype(np.float32),
        })
    return results
