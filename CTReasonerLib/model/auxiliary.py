"""Auxiliary training heads: dense supervision that the paper's one-prompt-one-mask losses leave unused.

A curated slice carries the labels of every organ on it, but a [SEG] query supervises one organ and an
absent-target query one bit of presence. Two small heads read the whole label map at every step:

* ``DenseOrganHead``: image embedding -> per-pixel organ classes. It trains the segmenter's image
  encoder on all organs of a slice per encoder pass, the role SAM's pretraining plays for real-scale
  encoders (a randomly initialised tiny encoder has no such start).
* ``PresenceHead``: the LVLM's last-layer states at the image tokens -> which organs are on the slice.
  It teaches the vision path the fact an absent-target answer depends on; the answer's first token
  reads those positions through attention.

Both are weighted by ``loss.seg_dense`` and ``loss.presence`` (0 = off); the dense head never runs at
inference. A third head, ``ImagePresenceHead``, reads the segmenter's image embedding instead of the
LVLM. It can train with the model or afterwards on frozen features (``ctreasoner fit-presence``). The
presence gate (``presence_gate``, ``presence_from`` in the model config) reads the presence heads at
inference, to overrule an answer that routes to an organ the heads say is not on the slice.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from CTReasonerLib.organs import NUM_ORGANS


class DenseOrganHead(nn.Module):
    """(B, dim, h, w) image embedding -> (B, NUM_ORGANS + 1, 4h, 4w) class logits (0 = background),
    upscaled like SAM's mask decoder (two stride-2 transposed convolutions)."""

    def __init__(self, dim: int = 256, num_classes: int = NUM_ORGANS + 1):
        super().__init__()
        self.num_classes = num_classes
        self.layers = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2), LayerNorm2d(dim // 4), nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2), nn.GELU(),
            nn.Conv2d(dim // 8, num_classes, kernel_size=1))

    def forward(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(image_embeddings)


class PresenceHead(nn.Module):
    """Mean LVLM state over each row's image tokens (B, D) -> (B, NUM_ORGANS) presence logits."""

    def __init__(self, hidden_size: int, num_organs: int = NUM_ORGANS):
        super().__init__()
        self.linear = nn.Linear(hidden_size, num_organs)

    def forward(self, hidden_states: torch.Tensor, image_token_mask: torch.Tensor) -> torch.Tensor:
        """hidden_states (B, T, D); image_token_mask (B, T) bool. Rows without image tokens pool to 0."""
        weights = image_token_mask.to(hidden_states.dtype).unsqueeze(-1)
        pooled = (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.linear(pooled.to(self.linear.weight.dtype))


class ImagePresenceHead(nn.Module):
    """(B, dim, h, w) segmenter image embedding -> (B, NUM_ORGANS) presence logits.

    A per-organ evidence map pooled by log-mean-exp, a smooth maximum: one confident region is enough
    for "present", as it should be for an organ that shows a few pixels at the edge of its extent.
    """

    def __init__(self, dim: int = 256, hidden: int = 64, num_organs: int = NUM_ORGANS):
        super().__init__()
        self.evidence = nn.Sequential(
            nn.Conv2d(dim, hidden, kernel_size=3, padding=1), nn.GELU(),
            nn.Conv2d(hidden, hidden, kernel_size=3, padding=1), nn.GELU(),
            nn.Conv2d(hidden, num_organs, kernel_size=1))

    def forward(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        evidence = self.evidence(image_embeddings.to(self.evidence[0].weight.dtype)).flatten(2)
        return torch.logsumexp(evidence, dim=-1) - math.log(evidence.shape[-1])


def organ_label_channels(labels: np.ndarray, num_classes: int = NUM_ORGANS + 1) -> torch.Tensor:
    """(H, W) integer organ labels -> (num_classes, H, W) float one-hot; labels outside [0, num_classes)
    count as background (a dataset's extra structures are not organs of this model)."""
    labels = torch.as_tensor(np.asarray(labels).astype(np.int64))
    labels = torch.where((labels >= 0) & (labels < num_classes), labels, torch.zeros_like(labels))
    return F.one_hot(labels, num_classes).permute(2, 0, 1).float()


def organ_presence(labels: np.ndarray, num_organs: int = NUM_ORGANS) -> torch.Tensor:
    """(H, W) organ labels -> (num_organs,) float, 1 where organ label k + 1 has a pixel."""
    present = np.zeros(num_organs, dtype=np.float32)
    found = np.unique(np.asarray(labels))
    found = found[(found >= 1) & (found <= num_organs)].astype(np.int64)
    present[found - 1] = 1.0
    return torch.from_numpy(present)


def dense_organ_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft-target cross-entropy of (U, C, s, s) logits against (U, C, S, S) class fractions (the
    labelled images only); a connected zero when U == 0."""
    if logits.shape[0] == 0:
        return logits.float().sum() * 0.0
    targets = targets.to(logits.device, torch.float32)
    if targets.shape[-2:] != logits.shape[-2:]:
        targets = F.interpolate(targets, size=logits.shape[-2:], mode="area")
    return F.cross_entropy(logits.float(), targets)


def presence_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """BCE of (B, K) presence logits against (B, K) 0/1 targets over rows with ``valid`` (B,) True."""
    if not bool(valid.any()):
        return logits.float().sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[valid].float(), targets[valid].float())
