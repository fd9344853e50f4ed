"""Fit the context presence decision (``model/context_presence.py``) on a curated dataset.

Each distinct slice is read by the model's pixel network four times: with its neighbours, each neighbour on
its own, and the slice on its own. That gives every organ two rows of ``CONTEXT_FEATURES``, one as a volume
gives them and one as a lone slice gives them. The target of a row is the organ's presence under the
dataset's own rule (``presence_targets``: present from ``min_organ_area_px``; slivers below it are left out).
Only the rows where the question is open are kept: the organ is present, or the network gives it some
probability (``HARD_EXAMPLE_SCORE``) on the slice or on a neighbour. Far from an organ the decision is easy,
and those rows would swamp the few that matter.

The decision is a logistic regression per organ, with weights pulled towards one shared set:

    weights[organ] = shared + deviation[organ],   bias[organ] = shared_bias + deviation_bias[organ]

It is fitted with L-BFGS on the BCE plus ``l2`` times the squared weights (``shared_bias`` is not penalised).
Organs with few hard rows stay near the shared decision, and the others get their own.

Fit it on subjects the pixel network did not train on. On its training slices the network is surer than it
will be on a new patient, and the decision would learn to trust it too much:

    fit = fit_context_presence(model, "outputs/calibration", split="train", heldout_split=None)
    model.config.presence_context = fit.config
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from CTReasonerLib.errors import ConfigError
from CTReasonerLib.model.context_presence import (CONTEXT_FEATURES, ContextPresenceConfig, context_presence,
                                                  organ_evidence, slice_context_features)
from CTReasonerLib.organs import NUM_ORGANS
from CTReasonerLib.train.pixel_presence_fit import dataset_presence_rule, network_input, presence_targets
from CTReasonerLib.train.presence_fit import distinct_slice_samples, iter_dataset_slices

logger = logging.getLogger(__name__)

#: a row whose organ is absent is kept when the network's top-k score of it reaches this on the slice or a
#: neighbour
HARD_EXAMPLE_SCORE = 0.01
#: L2 penalty of the fit (per weight, against a mean BCE)
DEFAULT_L2 = 1e-3


@dataclass
class ContextRows:
    """features (N, len(CONTEXT_FEATURES)); organ (N,) label - 1; present (N,) 0/1 floats."""
    features: torch.Tensor
    organ: torch.Tensor
    present: torch.Tensor


@dataclass
class ContextFit:
    """What a fit did: the decision, the slices and rows it used, and the BCE of the plain top-k score and of the
    fitted decision on them (and on ``heldout`` rows when a split was given)."""
    config: ContextPresenceConfig
    train_slices: int
    rows: int
    plain_bce: float
    decision_bce: float
    heldout_slices: int = 0
    heldout_bce: Optional[float] = None
    heldout_plain_bce: Optional[float] = None


@torch.no_grad()  # not inference_mode: the fit takes gradients through these rows
def context_rows(model, dataset_root: str, split: str, max_slices: Optional[int] = None, seed: int = 0,
                 progress: bool = True) -> Tuple[ContextRows, int]:
    """(the hard rows of ``split``, volume and lone forms, the number of slices read)."""
    from tqdm.auto import tqdm

    net = model.pixel_presence_net
    if net is None:
        raise ConfigError("this model has no pixel network for the context decision to read",
                          "fit one first: ctreasoner fit-presence MODEL DATASET --head pixels")
    if not net.config.neighbours:
        raise ConfigError("the model's pixel network does not read neighbouring slices",
                          "widen it first: ctreasoner fit-presence MODEL DATASET --head pixels --continue --neighbours")
    rule = dataset_presence_rule(dataset_root)
    samples = distinct_slice_samples(dataset_root, split, max_slices, seed)
    features, organs, targets = [], [], []
    for hu, labels, neighbours in tqdm(iter_dataset_slices(samples, neighbours=True, root=dataset_root),
                                       total=len(samples), desc="reading slices", unit="slice", disable=not progress):
        inputs = torch.stack([network_input(model, net, hu, neighbours)[0], network_input(model, net, neighbours[0])[0],
                              network_input(model, net, neighbours[1])[0], network_input(model, net, hu)[0]])
        probabilities = net.probabilities(inputs.to(model.device)).float().cpu()
        in_volume = slice_context_features(probabilities[0], probabilities[1:3], net.config.top_k)
        lone = slice_context_features(probabilities[3], None, net.config.top_k)
        truth = presence_targets(labels, *rule)
        top_k_scores = organ_evidence(probabilities[:3], net.config.top_k)[..., 0]     # slice, below, above
        open_question = (truth == 1) | ((truth == 0) & (top_k_scores.amax(0) >= HARD_EXAMPLE_SCORE))
        for form in (in_volume, lone):
            features.append(form[open_question])
            organs.append(torch.nonzero(open_question)[:, 0])
            targets.append(truth[open_question])
    if not features or not sum(len(chunk) for chunk in features):
        raise ConfigError(f"split '{split}' of {dataset_root} has no slice where an organ's presence is in question",
                          "fit on a dataset with organs on its slices (ctreasoner curate)")
    return ContextRows(torch.cat(features), torch.cat(organs), torch.cat(targets)), len(samples)


def decision_bce(config: ContextPresenceConfig, rows: ContextRows) -> float:
    """Mean BCE of ``config``'s decision on ``rows``."""
    scores = context_presence(config, rows.features[:, None, :].expand(-1, NUM_ORGANS, -1))
    picked = scores[torch.arange(len(rows.organ)), rows.organ]
    return float(F.binary_cross_entropy(picked.clamp(1e-6, 1 - 1e-6).double(), rows.present.double()))


def plain_bce(rows: ContextRows) -> float:
    """Mean BCE of the plain top-k score (what the gate reads without the context decision) on ``rows``."""
    top_k = torch.sigmoid(rows.features[:, CONTEXT_FEATURES.index("slice_top_k")])
    return float(F.binary_cross_entropy(top_k.clamp(1e-6, 1 - 1e-6).double(), rows.present.double()))


def fit_decision(rows: ContextRows, l2: float = DEFAULT_L2) -> ContextPresenceConfig:
    """The per-organ logistic decision of ``rows`` (see the module docstring)."""
    x, y = rows.features.double(), rows.present.double()
    width = x.shape[1]
    shared = torch.zeros(width + 1, dtype=torch.float64, requires_grad=True)
    deviation = torch.zeros(NUM_ORGANS, width + 1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([shared, deviation], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        weights = shared[:width] + deviation[rows.organ, :width]
        bias = shared[width] + deviation[rows.organ, width]
        loss = (F.binary_cross_entropy_with_logits((x * weights).sum(-1) + bias, y)
                + l2 * ((shared[:width] ** 2).sum() + (deviation ** 2).sum()))
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        weights = shared[:width][None] + deviation[:, :width]
        bias = shared[width] + deviation[:, width]
    return ContextPresenceConfig(weights=[[round(float(v), 6) for v in row] for row in weights],
                                 bias=[round(float(v), 6) for v in bias])


def fit_context_presence(model, dataset_root: str, split: str = "train", heldout_split: Optional[str] = None,
                         l2: float = DEFAULT_L2, max_slices: Optional[int] = None, seed: int = 0,
                         progress: bool = True) -> ContextFit:
    """Fit the context decision on ``split`` of ``dataset_root`` (the model is not changed; set
    ``model.config.presence_context = fit.config`` to use it)."""
    if not l2 >= 0:
        raise ConfigError(f"the L2 penalty must be >= 0, got {l2}")
    rows, slices = context_rows(model, dataset_root, split, max_slices, seed, progress)
    logger.info("context presence: %d rows from %d slices (%.0f%% present)", len(rows.present), slices,
                100 * float(rows.present.mean()))
    config = fit_decision(rows, l2)
    fit = ContextFit(config, slices, len(rows.present), plain_bce(rows), decision_bce(config, rows))
    if heldout_split is not None:
        heldout, fit.heldout_slices = context_rows(model, dataset_root, heldout_split, progress=progress)
        fit.heldout_bce, fit.heldout_plain_bce = decision_bce(config, heldout), plain_bce(heldout)
    return fit
