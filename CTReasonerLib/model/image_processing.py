"""From a CT slice in HU to the segmenter's square input, and back.

Channels. SAM's encoder takes 3 channels; we give it three CT windows of the same slice
(``MODEL_WINDOWS``: abdomen W400/L40, liver W150/L30 for low-contrast soft tissue, bone W1800/L400),
each mapped to [0, 1] by ``CTReasonerLib.io.windowing``. The segmenter then applies its own pixel
normalisation (SAM: x*255 with ImageNet mean/std on the 0-255 scale; SAM2: ImageNet mean/std on 0-1),
so pretrained encoders see the intensity statistics they were trained with.

Geometry. A (H, W) slice is padded at the bottom and right to an L x L square, L = max(H, W), with 0
(below every window, i.e. air), then resized to S x S (S = segmenter image size): ``scale = S / L``.
Two coordinate conventions are used, both with x = column and y = row:

* edge coordinates (boxes, slice bounds): pixel i covers [i, i+1); a numpy slice ``a[y0:y1, x0:x1]`` is the
  box (x0, y0, x1, y1). Model = original * scale, exactly.
* pixel-centre coordinates (clicks): pixel i is at integer i (``CTReasonerLib.io.slices``; SAM adds 0.5 to
  points itself). Model = (original + 0.5) * scale - 0.5, exactly the same place as in edge coordinates.

Masks: model-frame logits of any side s cover the whole padded square; ``mask_to_original`` resizes them
to L x L and crops the top-left H x W, which inverts the padding and resizing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from CTReasonerLib.io.windowing import apply_window

Window = Union[str, Tuple[float, float]]

#: the three windows stacked as the encoder's input channels, in this order
MODEL_WINDOWS: Tuple[str, ...] = ("abdomen", "liver", "bone")


def hu_to_unit(hu, window: Window = "abdomen") -> np.ndarray:
    """HU -> float32 in [0, 1] through a window preset name or a (level, width) pair in HU."""
    if isinstance(window, str):
        return apply_window(hu, window)
    level, width = window
    return apply_window(hu, float(level), float(width))


def slice_to_channels(hu, windows: Sequence[Window] = MODEL_WINDOWS) -> np.ndarray:
    """(H, W) HU slice -> (len(windows), H, W) float32 in [0, 1], one window per channel."""
    hu = np.asarray(hu)
    if hu.ndim != 2:
        raise ValueError(f"expected one (H, W) slice, got shape {hu.shape}")
    return np.stack([hu_to_unit(hu, window) for window in windows])


def as_float_tensor(image) -> torch.Tensor:
    """numpy array or tensor (any dtype, bool included) -> float32 tensor, sharing memory where possible."""
    tensor = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(image))
    return tensor.float()


def resize_bilinear(batch: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (N, C, h, w) with half-pixel centres, antialiased when shrinking."""
    if tuple(batch.shape[-2:]) == tuple(size):
        return batch
    shrinking = size[0] < batch.shape[-2] or size[1] < batch.shape[-1]
    return F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


def mask_to_original(logits: torch.Tensor, original_hw: Tuple[int, int]) -> torch.Tensor:
    """Model-frame logits (N, 1, s, s) or (N, s, s) -> (N, H, W) logits on the original slice.

    The s x s grid covers the padded L x L square (L = max(H, W)) whatever the model size was,
    so the inverse needs only ``original_hw``.
    """
    if logits.dim() == 3:
        logits = logits.unsqueeze(1)
    if logits.dim() != 4 or logits.shape[1] != 1 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"expected square logits (N, 1, s, s), got {tuple(logits.shape)}")
    height, width = original_hw
    side = max(height, width)
    return resize_bilinear(logits.float(), (side, side))[:, 0, :height, :width]


@dataclass(frozen=True)
class ResizeToSquare:
    """The pad-then-resize mapping between one (H, W) slice and the S x S model frame (see module doc)."""

    original_hw: Tuple[int, int]
    image_size: int

    def __post_init__(self):
        if min(self.original_hw) <= 0 or self.image_size <= 0:
            raise ValueError(f"invalid sizes: slice {self.original_hw}, model {self.image_size}")

    @property
    def padded_side(self) -> int:
        return max(self.original_hw)

    @property
    def scale(self) -> float:
        """Model pixels per original pixel."""
        return self.image_size / self.padded_side

    def image(self, image) -> torch.Tensor:
        """(H, W) or (C, H, W) array/tensor in [0, 1] -> (C, S, S) float32 model input (C = 1 for 2-D input)."""
        tensor = as_float_tensor(image)
        if tensor.dim() == 2:
            tensor = tensor.unsqueeze(0)
        if tuple(tensor.shape[-2:]) != tuple(self.original_hw):
            raise ValueError(f"image is {tuple(tensor.shape[-2:])}, this transform is for {self.original_hw}")
        return self._pad_resize(tensor.unsqueeze(0))[0]

    def masks(self, masks) -> torch.Tensor:
        """(N, H, W) or (H, W) binary masks -> (N, S, S) float32 in [0, 1] (area-weighted at the edges)."""
        tensor = as_float_tensor(masks)
        if tensor.dim() == 2:
            tensor = tensor.unsqueeze(0)
        return self._pad_resize(tensor.unsqueeze(1))[:, 0]

    def _pad_resize(self, batch: torch.Tensor) -> torch.Tensor:
        height, width = self.original_hw
        side = self.padded_side
        batch = F.pad(batch, (0, side - width, 0, side - height), value=0.0)
        return resize_bilinear(batch, (self.image_size, self.image_size))

    def mask_to_original(self, logits: torch.Tensor) -> torch.Tensor:
        """Model-frame logits (N, 1, s, s) -> (N, H, W) logits on this slice."""
        return mask_to_original(logits, self.original_hw)

    def to_model_coords(self, points_xy):
        """(..., 2) pixel-centre (x, y) on the slice -> model frame (same type: tensor or array)."""
        return (points_xy + 0.5) * self.scale - 0.5

    def from_model_coords(self, points_xy):
        """(..., 2) model-frame pixel-centre (x, y) -> slice coordinates; inverse of ``to_model_coords``."""
        return (points_xy + 0.5) / self.scale - 0.5

    def boxes_to_model(self, boxes_xyxy):
        """(..., 4) edge-coordinate xyxy on the slice -> model frame."""
        return boxes_xyxy * self.scale

    def boxes_from_model(self, boxes_xyxy, clip: bool = True):
        """(..., 4) model-frame edge xyxy -> slice xyxy; ``clip`` limits them to the slice (padding removed)."""
        boxes = boxes_xyxy / self.scale
        if clip:
            height, width = self.original_hw
            if isinstance(boxes, torch.Tensor):
                boxes = torch.minimum(boxes.clamp(min=0), boxes.new_tensor([width, height, width, height]))
            else:
                boxes = np.clip(boxes, 0, np.array([width, height, width, height], dtype=boxes.dtype))
        return boxes


def prepare_slice(hu, image_size: int, windows: Sequence[Window] = MODEL_WINDOWS) -> Tuple[torch.Tensor, ResizeToSquare]:
    """(H, W) HU slice -> ((3, S, S) model input in [0, 1], the transform that maps results back)."""
    channels = slice_to_channels(hu, windows)
    transform = ResizeToSquare(tuple(channels.shape[-2:]), image_size)
    return transform.image(channels), transform
