"""PixelPresenceNet: organ presence read from a small per-pixel organ segmentation of the slice.

The presence gate needs to know whether an organ's tissue is on a slice. ``ImagePresenceHead`` reads the
segmenter's image embedding (8-pixel patches with global attention in the tiny model) and learns, above
all, *at which level* an organ usually appears: on the slices just past an organ's extent it says
"present" with confidence although none of its tissue is there. A pixel-level network cannot answer
that way: it is trained to label every pixel (monai's ``BasicUNet``, Dice + cross-entropy against the
slice's organ label map), and an organ counts as present only where it finds pixels of it. Its score is
the mean of the ``top_k`` highest probabilities of that organ on the slice.

It runs on the model-frame image (the segmenter's input, (B, 3, S, S) in [0, 1]), resized to its own
``image_size``. With ``neighbours`` it also sees the slices about ``neighbour_distance_mm`` below and above
(``CTReasonerLib.io.slices.neighbour_slices``), stacked after the slice's own channels: at the first or last
slice of an organ partial volume leaves a faint trace that one slice cannot tell from a stray pixel, while
the organ next door can. Without neighbours (a lone slice) the slice stands in for them, as in training.
It trains apart from the rest of the model (``ctreasoner fit-presence --head pixels``,
``train/pixel_presence_fit.py``) and is frozen in ``ctreasoner train``; ``presence_from`` "pixels" or
"image+pixels" makes the gate read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from CTReasonerLib.errors import ConfigError
from CTReasonerLib.io.slices import NEIGHBOUR_DISTANCE_MM
from CTReasonerLib.model.auxiliary import organ_label_channels
from CTReasonerLib.organs import NUM_ORGANS


#: the state-dict key of the first convolution, the only weights whose shape depends on the input channels
FIRST_CONV_WEIGHT = "unet.conv_0.conv_0.conv.weight"


@dataclass
class PixelPresenceConfig:
    """image_size: side the network sees (the model-frame image is area-resized to it).
    features: ``BasicUNet`` channels, five encoder levels plus the last decoder level.
    top_k: how many of an organ's most probable pixels its presence score averages.
    neighbours: whether the network also sees the slices either side (9 input channels instead of 3).
    neighbour_distance_mm: how far off those slices are taken (``neighbour_offset``)."""
    image_size: int = 128
    features: Tuple[int, ...] = (8, 16, 32, 64, 128, 8)
    top_k: int = 4
    neighbours: bool = False
    neighbour_distance_mm: float = NEIGHBOUR_DISTANCE_MM

    @property
    def in_channels(self) -> int:
        return 3 * (3 if self.neighbours else 1)

    def __post_init__(self):
        self.features = tuple(int(value) for value in self.features)

    def problems(self) -> List[str]:
        """What is wrong with these settings (empty when nothing is)."""
        problems = []
        if self.image_size < 16 or self.image_size % 16:
            problems.append(f"pixel_presence.image_size must be a multiple of 16 (four 2x poolings), got {self.image_size}")
        if len(self.features) != 6 or min(self.features) < 1:
            problems.append(f"pixel_presence.features must be 6 positive channel counts, got {list(self.features)}")
        if self.top_k < 1:
            problems.append(f"pixel_presence.top_k must be >= 1, got {self.top_k}")
        if not self.neighbour_distance_mm > 0:
            problems.append(f"pixel_presence.neighbour_distance_mm must be positive, got {self.neighbour_distance_mm}")
        return problems

    def validate(self) -> "PixelPresenceConfig":
        problems = self.problems()
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems), "fix the pixel_presence section")
        return self


class PixelPresenceNet(nn.Module):
    """(B, C, S, S) network inputs (``inputs``: C = 3, or 9 with neighbours) -> (B, NUM_ORGANS + 1, s, s) organ
    logits (0 = background), s = image_size."""

    def __init__(self, config: PixelPresenceConfig, num_organs: int = NUM_ORGANS):
        super().__init__()
        from monai.networks.nets import BasicUNet

        self.config = config.validate()
        self.num_organs = num_organs
        self.unet = BasicUNet(spatial_dims=2, in_channels=config.in_channels, out_channels=num_organs + 1,
                              features=config.features)

    def inputs(self, images: torch.Tensor, neighbours: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 3, S, S) model-frame images and (B, 2, 3, S, S) of their neighbours (below, above) or None ->
        (B, C, S, S) network inputs. A network without neighbours ignores them; one with them takes the slice
        itself for missing ones."""
        if not self.config.neighbours:
            return images
        if neighbours is None:
            neighbours = images[:, None].expand(-1, 2, -1, -1, -1)
        if neighbours.shape[1:] != (2,) + tuple(images.shape[1:]):
            raise ValueError(f"neighbours of shape {tuple(neighbours.shape)} do not match images {tuple(images.shape)}")
        return torch.cat([images, neighbours.flatten(1, 2).to(images)], dim=1)

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, C, s, s), area-averaged when shrinking (images and class fractions alike)."""
        size = self.config.image_size
        if tuple(images.shape[-2:]) == (size, size):
            return images
        mode = "area" if images.shape[-1] > size else "bilinear"
        return F.interpolate(images, size=(size, size), mode=mode, **({} if mode == "area" else {"align_corners": False}))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        weight = self.unet.final_conv.weight
        return self.unet(self.resize(images.to(weight.dtype)))

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) ``inputs`` -> (B, NUM_ORGANS + 1, s, s) per-pixel class probabilities (0 = background)."""
        return torch.softmax(self(images).float(), dim=1)

    def presence(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) ``inputs`` -> (B, NUM_ORGANS) presence probabilities: the mean of each organ's top-k pixel
        probabilities."""
        return self.presence_from_probabilities(self.probabilities(images))

    def presence_from_probabilities(self, probabilities: torch.Tensor) -> torch.Tensor:
        """(B, NUM_ORGANS + 1, s, s) from ``probabilities`` -> (B, NUM_ORGANS) presence probabilities."""
        organs = probabilities[:, 1:].flatten(2)
        top_k = min(self.config.top_k, organs.shape[-1])
        return organs.topk(top_k, dim=-1).values.mean(-1)

    def targets(self, labels, transform) -> torch.Tensor:
        """(H, W) organ labels of an original slice and its ``ResizeToSquare`` -> (NUM_ORGANS + 1, s, s)
        class fractions in the network's frame (what the loss compares the softmax with)."""
        channels = self.resize(transform.masks(organ_label_channels(labels, self.num_organs + 1))[None])[0]
        # the padding of a non-square slice is background too
        channels[0] = (1.0 - channels[1:].sum(0)).clamp(min=0.0)
        return channels


def widen_to_neighbours(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The weights of a network without neighbours -> those of one with them that computes the same function
    (the neighbours' input weights start at zero), so that ``fit-presence --continue --neighbours`` starts from
    what the network already knows."""
    widened = dict(state_dict)
    weight = widened[FIRST_CONV_WEIGHT]
    widened[FIRST_CONV_WEIGHT] = torch.cat([weight, torch.zeros_like(weight), torch.zeros_like(weight)], dim=1)
    return widened


def blend_mask_logits(mask_logits, organ_logits, weight: float):
    """``pixel_mask_weight`` w: (1 - w) * a segmenter's mask logits + w * the pixel network's logits for the
    organ (same shape, tensors or arrays): a weighted product of the two models' odds."""
    return (1.0 - weight) * mask_logits + weight * organ_logits


def build_pixel_presence(config: PixelPresenceConfig) -> PixelPresenceNet:
    """A new network, frozen: only ``ctreasoner fit-presence --head pixels`` trains it."""
    net = PixelPresenceNet(config)
    net.requires_grad_(False)
    return net
