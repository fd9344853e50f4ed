"""The context presence decision: its features, its config checks and its per-organ fit."""
from __future__ import annotations

import math

import pytest
import torch

from CTReasonerLib.errors import ConfigError
from CTReasonerLib.model.config import CTReasonerConfig
from CTReasonerLib.model.context_presence import (CONTEXT_FEATURES, EPS, ContextPresenceConfig, context_features,
                                                  context_presence, organ_evidence, slice_context_features)
from CTReasonerLib.organs import NUM_ORGANS
from CTReasonerLib.train.context_presence_fit import ContextRows, decision_bce, fit_decision, plain_bce


def _map(organ_pixels):
    """(NUM_ORGANS + 1, 8, 8) probabilities: background everywhere but {label: [(pixel index, probability)]}."""
    probabilities = torch.zeros(NUM_ORGANS + 1, 64)
    probabilities[0] = 1.0
    for label, pixels in organ_pixels.items():
        for index, p in pixels:
            probabilities[label, index] = p
            probabilities[0, index] -= p
    return probabilities.view(NUM_ORGANS + 1, 8, 8)


def test_evidence_is_top_k_mean_best_pixel_and_summed_probability_per_organ():
    probabilities = _map({1: [(0, 0.9), (1, 0.5), (2, 0.3)], 3: [(10, 0.2)]})
    evidence = organ_evidence(probabilities[None], top_k=2)[0]
    assert evidence.shape == (NUM_ORGANS, 3)
    assert evidence[0].tolist() == pytest.approx([0.7, 0.9, 1.7])
    assert evidence[2].tolist() == pytest.approx([0.1, 0.2, 0.2])
    assert evidence[1].tolist() == pytest.approx([0.0, 0.0, 0.0])


def test_features_do_not_depend_on_which_way_the_volume_runs_and_a_lone_slice_stands_in_for_its_neighbours():
    slice_, below, above = (_map({1: [(0, p)], 2: [(5, q)]}) for p, q in ((0.6, 0.1), (0.95, 0.0), (0.0, 0.4)))
    forward = slice_context_features(slice_, torch.stack([below, above]), top_k=1)
    backward = slice_context_features(slice_, torch.stack([above, below]), top_k=1)
    assert forward.shape == (NUM_ORGANS, len(CONTEXT_FEATURES))
    assert torch.equal(forward, backward)
    # organ 1: the high neighbour is the slice below (0.95), the low one the slice above (0.0, clamped)
    assert forward[0, CONTEXT_FEATURES.index("neighbour_top_k_high")] == pytest.approx(math.log(0.95 / 0.05), rel=1e-4)
    assert forward[0, CONTEXT_FEATURES.index("neighbour_top_k_low")] == pytest.approx(math.log(EPS / (1 - EPS)), rel=1e-4)
    assert forward[0, CONTEXT_FEATURES.index("slice_area")] == pytest.approx(math.log1p(0.6), rel=1e-5)
    lone = slice_context_features(slice_, None, top_k=1)
    assert torch.equal(lone, slice_context_features(slice_, torch.stack([slice_, slice_]), top_k=1))
    assert not torch.equal(lone, forward)


def test_decision_is_a_logistic_per_organ():
    weights = [[0.0] * len(CONTEXT_FEATURES) for _ in range(NUM_ORGANS)]
    weights[0][0], weights[1][0] = 1.0, -1.0
    config = ContextPresenceConfig(weights=weights, bias=[0.5] * NUM_ORGANS)
    features = torch.zeros(1, NUM_ORGANS, len(CONTEXT_FEATURES))
    features[..., 0] = 2.0
    presence = context_presence(config, features)[0]
    assert presence[0] == pytest.approx(torch.sigmoid(torch.tensor(2.5)).item())
    assert presence[1] == pytest.approx(torch.sigmoid(torch.tensor(-1.5)).item())
    assert presence[2] == pytest.approx(torch.sigmoid(torch.tensor(0.5)).item())


def test_config_is_checked_for_shape_values_and_the_pixel_network_it_needs():
    good = ContextPresenceConfig(weights=[[0.0] * len(CONTEXT_FEATURES)] * NUM_ORGANS, bias=[0.0] * NUM_ORGANS)
    assert good.problems() == []
    assert "14 rows of 7" in " ".join(ContextPresenceConfig(weights=[[0.0] * 3] * NUM_ORGANS, bias=good.bias).problems())
    assert "bias must hold" in " ".join(ContextPresenceConfig(weights=good.weights, bias=[0.0]).problems())
    assert "finite" in " ".join(ContextPresenceConfig(weights=good.weights, bias=[float("nan")] * NUM_ORGANS).problems())
    with pytest.raises(ConfigError, match="reads neighbouring slices"):
        CTReasonerConfig.from_dict({"presence_context": {"weights": good.weights, "bias": good.bias}})
    with pytest.raises(ConfigError, match="does not read"):
        CTReasonerConfig.from_dict({"pixel_presence": {"neighbours": True}, "presence_from": "lvlm",
                                    "presence_context": {"weights": good.weights, "bias": good.bias}})
    config = CTReasonerConfig.from_dict({"pixel_presence": {"neighbours": True}, "presence_from": "pixels",
                                         "presence_context": {"weights": good.weights, "bias": good.bias}})
    assert CTReasonerConfig.from_dict(config.to_dict()).presence_context == good
    assert config.updated({"presence_context": None}).presence_context is None     # an override switches it off


def test_fit_learns_each_organs_own_direction_and_beats_the_plain_score():
    """Organ 0 is present when the slice scores high, organ 1 when its neighbours are empty: one shared decision
    cannot get both, the per-organ fit must."""
    generator = torch.Generator().manual_seed(0)
    n = 400
    features = torch.randn(2 * n, len(CONTEXT_FEATURES), generator=generator)
    organ = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
    low_neighbour = features[:, CONTEXT_FEATURES.index("neighbour_top_k_low")]
    present = torch.where(organ == 0, features[:, 0] > 0, low_neighbour < 0).float()
    rows = ContextRows(features, organ, present)
    config = fit_decision(rows)
    assert len(config.weights) == NUM_ORGANS and len(config.bias) == NUM_ORGANS
    assert config.weights[0][0] > 1.0 and config.weights[1][CONTEXT_FEATURES.index("neighbour_top_k_low")] < -1.0
    scores = context_presence(config, features[:, None, :].expand(-1, NUM_ORGANS, -1))[torch.arange(2 * n), organ]
    assert float(((scores > 0.5).float() == present).float().mean()) > 0.95
    assert decision_bce(config, rows) < 0.2 < plain_bce(rows)
