"""Context presence: whether an organ is on a slice, decided from the slice and the slices either side.

The pixel network (``model/pixel_presence.py``) scores each slice by the mean of an organ's ``top_k`` most
probable pixels. Its errors sit where an organ starts or stops along the body axis. There a sliver of a few
pixels counts as present, and the slice just past the organ's end, where partial volume still leaves a faint
trace, counts as absent. One slice's score cannot tell the two apart. How the organ runs on in the slices
either side can: whether it is large there or gone on both sides, and how much of it the slice itself shows.

This module turns the network's probability maps of the slice and of each neighbour, read on its own (a lone
slice), into seven numbers per organ (``CONTEXT_FEATURES``). A logistic decision per organ then gives the
presence probability:

    p(organ) = sigmoid(weights[organ] . features[organ] + bias[organ])

The neighbours enter as the larger and the smaller of the two values, so the decision does not depend on
which way the volume runs in K. A lone slice stands in for its own neighbours. The weights are fitted by
``ctreasoner fit-presence --head context`` (``train/context_presence_fit.py``) on subjects the pixel network
did not train on. The model config's ``presence_context`` holds them, and the presence gate then reads this
probability in place of the plain top-k score.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from CTReasonerLib.organs import NUM_ORGANS

#: the numbers the decision reads per organ, in the order of each row of ``ContextPresenceConfig.weights``.
#: "top_k": logit of the mean of the organ's top-k pixel probabilities (the plain presence score); "top_1": logit
#: of its most probable pixel; "area": log(1 + the sum of its pixel probabilities, in network pixels).
CONTEXT_FEATURES = ("slice_top_k", "slice_top_1", "slice_area",
                    "neighbour_top_k_high", "neighbour_top_k_low", "neighbour_area_high", "neighbour_area_low")

#: probabilities are clamped to [EPS, 1 - EPS] before the logit, so that a certain pixel stays a finite number
EPS = 1e-4


@dataclass
class ContextPresenceConfig:
    """weights: (NUM_ORGANS, len(CONTEXT_FEATURES)), one row per organ in label order.
    bias: (NUM_ORGANS,)."""
    weights: List[List[float]] = field(default_factory=list)
    bias: List[float] = field(default_factory=list)

    def problems(self) -> List[str]:
        """What is wrong with these settings (empty when nothing is)."""
        width = len(CONTEXT_FEATURES)
        rows_ok = (len(self.weights) == NUM_ORGANS
                   and all(isinstance(row, (list, tuple)) and len(row) == width for row in self.weights))
        problems = []
        if not rows_ok:
            problems.append(f"presence_context.weights must be {NUM_ORGANS} rows of {width} numbers "
                            f"(one per organ, in the order {', '.join(CONTEXT_FEATURES)})")
        if len(self.bias) != NUM_ORGANS:
            problems.append(f"presence_context.bias must hold {NUM_ORGANS} numbers, got {len(self.bias)}")
        numbers = [value for row in self.weights if isinstance(row, (list, tuple)) for value in row] + list(self.bias)
        if not all(isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
                   and abs(value) != float("inf") for value in numbers):
            problems.append("presence_context.weights and .bias must be finite numbers")
        return problems


def organ_evidence(probabilities: torch.Tensor, top_k: int) -> torch.Tensor:
    """(B, NUM_ORGANS + 1, s, s) pixel-network class probabilities (0 = background) -> (B, NUM_ORGANS, 3):
    the mean of each organ's ``top_k`` most probable pixels, its most probable pixel, and the sum of its
    probabilities."""
    organs = probabilities[:, 1:].flatten(2).float()
    top = organs.topk(min(top_k, organs.shape[-1]), dim=-1).values
    return torch.stack([top.mean(-1), top[..., 0], organs.sum(-1)], dim=-1)


def context_features(slice_evidence: torch.Tensor, below_evidence: torch.Tensor,
                     above_evidence: torch.Tensor) -> torch.Tensor:
    """``organ_evidence`` of a slice and of its neighbours, each (B, NUM_ORGANS, 3) -> (B, NUM_ORGANS,
    len(CONTEXT_FEATURES)) decision inputs."""
    def logit(p):
        return torch.logit(p.clamp(EPS, 1 - EPS))

    high, low = torch.maximum(below_evidence, above_evidence), torch.minimum(below_evidence, above_evidence)
    return torch.stack([logit(slice_evidence[..., 0]), logit(slice_evidence[..., 1]), torch.log1p(slice_evidence[..., 2]),
                        logit(high[..., 0]), logit(low[..., 0]), torch.log1p(high[..., 2]), torch.log1p(low[..., 2])],
                       dim=-1)


def slice_context_features(slice_probabilities: torch.Tensor, neighbour_probabilities: Optional[torch.Tensor],
                           top_k: int) -> torch.Tensor:
    """The pixel network's (NUM_ORGANS + 1, s, s) probabilities of a slice (read with its neighbours) and
    (2, NUM_ORGANS + 1, s, s) of its neighbours, each read alone (None for a lone slice, which then stands in
    for them) -> (NUM_ORGANS, len(CONTEXT_FEATURES))."""
    evidence = organ_evidence(slice_probabilities[None], top_k)
    if neighbour_probabilities is None:
        return context_features(evidence, evidence, evidence)[0]
    neighbours = organ_evidence(neighbour_probabilities, top_k)
    return context_features(evidence, neighbours[:1], neighbours[1:])[0]


def context_presence(config: ContextPresenceConfig, features: torch.Tensor) -> torch.Tensor:
    """(B, NUM_ORGANS, len(CONTEXT_FEATURES)) ``context_features`` -> (B, NUM_ORGANS) presence probabilities."""
    weights = torch.tensor(config.weights, dtype=features.dtype, device=features.device)
    bias = torch.tensor(config.bias, dtype=features.dtype, device=features.device)
    return torch.sigmoid((features * weights).sum(-1) + bias)
