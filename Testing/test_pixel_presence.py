"""PixelPresenceNet: shapes, the top-k presence score, training targets in the network's frame."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from CTReasonerLib.errors import ConfigError
from CTReasonerLib.model.image_processing import ResizeToSquare
from CTReasonerLib.model.pixel_presence import PixelPresenceConfig, PixelPresenceNet, build_pixel_presence
from CTReasonerLib.organs import NUM_ORGANS

SMALL = PixelPresenceConfig(image_size=32, features=(4, 4, 8, 8, 8, 4), top_k=3)


def test_presence_is_the_mean_of_each_organs_top_k_pixel_probabilities():
    torch.manual_seed(0)
    net = PixelPresenceNet(SMALL).eval()
    images = torch.rand(2, 3, 64, 64)           # model frame, resized to the net's 32
    with torch.no_grad():
        logits = net(images)
        presence = net.presence(images)
    assert logits.shape == (2, NUM_ORGANS + 1, 32, 32)
    assert presence.shape == (2, NUM_ORGANS)
    probabilities = torch.softmax(logits, 1)[:, 1:].flatten(2)
    expected = probabilities.sort(dim=-1, descending=True).values[..., :3].mean(-1)
    assert torch.allclose(presence, expected, atol=1e-6)
    assert bool(((presence >= 0) & (presence <= 1)).all())


def test_targets_are_class_fractions_in_the_network_frame_with_background_padding():
    net = PixelPresenceNet(SMALL)
    labels = np.zeros((40, 64), dtype=np.uint8)  # not square: the model frame pads it
    labels[10:30, 20:40] = 6                     # liver
    labels[0:2, 0:2] = 99                        # not an organ of this model: background
    transform = ResizeToSquare((40, 64), 64)
    targets = net.targets(labels, transform)
    assert targets.shape == (NUM_ORGANS + 1, 32, 32)
    assert torch.allclose(targets.sum(0), torch.ones(32, 32), atol=1e-5)
    liver = targets[6]
    assert float(liver.sum()) == pytest.approx(20 * 20 / 4, rel=1e-4)   # 400 pixels at half the side
    assert float(targets[1:].sum()) == pytest.approx(float(liver.sum()), rel=1e-4)


def test_built_network_is_frozen_and_config_is_checked():
    net = build_pixel_presence(SMALL)
    assert not any(p.requires_grad for p in net.parameters())
    assert PixelPresenceConfig(features=[8, 16, 32, 64, 128, 8]).features == (8, 16, 32, 64, 128, 8)
    for wrong, message in [({"image_size": 40}, "multiple of 16"), ({"features": (8, 16)}, "6 positive"),
                           ({"top_k": 0}, "top_k must be >= 1")]:
        with pytest.raises(ConfigError, match=message):
            PixelPresenceConfig(**wrong).validate()


# ------------------------------------------------------------------ the slices either side

WITH_NEIGHBOURS = PixelPresenceConfig(image_size=32, features=(4, 4, 8, 8, 8, 4), top_k=3, neighbours=True)


def test_a_widened_network_computes_what_the_narrow_one_did_until_it_trains():
    from CTReasonerLib.model.pixel_presence import widen_to_neighbours

    torch.manual_seed(1)
    narrow, wide = PixelPresenceNet(SMALL).eval(), PixelPresenceNet(WITH_NEIGHBOURS).eval()
    wide.load_state_dict(widen_to_neighbours(narrow.state_dict()))
    images, neighbours = torch.rand(2, 3, 32, 32), torch.rand(2, 2, 3, 32, 32)
    with torch.no_grad():
        expected = narrow.presence(narrow.inputs(images, neighbours))      # a narrow network ignores neighbours
        assert torch.allclose(wide.presence(wide.inputs(images, neighbours)), expected, atol=1e-6)
        wide.unet.conv_0.conv_0.conv.weight[:, 3:] += 0.5                   # once its neighbour weights move ...
        assert not torch.allclose(wide.presence(wide.inputs(images, neighbours)), expected, atol=1e-3)
    assert wide.unet.conv_0.conv_0.conv.weight.shape[1] == WITH_NEIGHBOURS.in_channels == 9


def test_network_inputs_stack_the_neighbours_after_the_slice_and_stand_the_slice_in_for_missing_ones():
    net = PixelPresenceNet(WITH_NEIGHBOURS)
    images, neighbours = torch.rand(2, 3, 16, 16), torch.rand(2, 2, 3, 16, 16)
    stacked = net.inputs(images, neighbours)
    assert stacked.shape == (2, 9, 16, 16)
    assert torch.equal(stacked[:, :3], images) and torch.equal(stacked[:, 3:6], neighbours[:, 0])
    assert torch.equal(stacked[:, 6:], neighbours[:, 1])
    alone = net.inputs(images)
    assert all(torch.equal(alone[:, start:start + 3], images) for start in (0, 3, 6))
    with pytest.raises(ValueError, match="do not match"):
        net.inputs(images, torch.rand(2, 1, 3, 16, 16))
    with pytest.raises(ConfigError, match="neighbour_distance_mm must be positive"):
        PixelPresenceConfig(neighbour_distance_mm=0).validate()


def test_training_swaps_or_drops_the_neighbours_as_told(monkeypatch):
    from CTReasonerLib.train import pixel_presence_fit

    batch = torch.cat([torch.full((4, 3, 2, 2), value) for value in (0.0, 1.0, 2.0)], dim=1)   # slice, below, above
    monkeypatch.setattr(pixel_presence_fit, "NEIGHBOUR_SWAP", 1.0)
    monkeypatch.setattr(pixel_presence_fit, "NEIGHBOUR_DROP", 0.0)
    swapped = pixel_presence_fit.augment_neighbours(batch)
    assert swapped[:, 3:6].eq(2.0).all() and swapped[:, 6:].eq(1.0).all() and swapped[:, :3].eq(0.0).all()
    monkeypatch.setattr(pixel_presence_fit, "NEIGHBOUR_DROP", 1.0)
    assert pixel_presence_fit.augment_neighbours(batch).eq(0.0).all()
    monkeypatch.setattr(pixel_presence_fit, "NEIGHBOUR_SWAP", 0.0)
    monkeypatch.setattr(pixel_presence_fit, "NEIGHBOUR_DROP", 0.0)
    assert torch.equal(pixel_presence_fit.augment_neighbours(batch), batch)
