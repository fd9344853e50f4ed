"""The segmenter interface (the paper's shared encoder E and segmentation branch S) and its embedding cache.

A segmenter works in the *model frame*: a square of ``image_size`` pixels made by
:class:`CTReasonerLib.model.image_processing.ResizeToSquare`. ``encode`` runs the (expensive) image
encoder once per image; ``decode`` runs the (cheap) mask decoder for any number of prompts over any
number of encoded images in one call.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from CTReasonerLib.errors import ConfigError


@dataclass
class ImageFeatures:
    """Encoder output for a batch of B images.

    image_embeddings: (B, 256, h, w), h = w = image_size / encoder stride.
    high_res_features: SAM2 only, the finer FPN levels [(B, 32, 4h, 4w), (B, 64, 2h, 2w)]; None for SAM.
    input_size: S, the side of the model-frame square the features were computed from.
    """
    image_embeddings: torch.Tensor
    high_res_features: Optional[List[torch.Tensor]]
    input_size: int

    @property
    def batch_size(self) -> int:
        return self.image_embeddings.shape[0]

    def select(self, image_index: torch.Tensor) -> "ImageFeatures":
        """Features of the images ``image_index`` (K,) long, in that order (repeats allowed)."""
        high = None if self.high_res_features is None else [f[image_index] for f in self.high_res_features]
        return ImageFeatures(self.image_embeddings[image_index], high, self.input_size)

    def detach(self) -> "ImageFeatures":
        high = None if self.high_res_features is None else [f.detach() for f in self.high_res_features]
        return ImageFeatures(self.image_embeddings.detach(), high, self.input_size)

    def to(self, device=None, dtype=None) -> "ImageFeatures":
        high = None if self.high_res_features is None else [f.to(device=device, dtype=dtype) for f in self.high_res_features]
        return ImageFeatures(self.image_embeddings.to(device=device, dtype=dtype), high, self.input_size)

    @property
    def nbytes(self) -> int:
        tensors = [self.image_embeddings] + list(self.high_res_features or [])
        return sum(t.numel() * t.element_size() for t in tensors)

    @staticmethod
    def cat(features: Sequence["ImageFeatures"]) -> "ImageFeatures":
        """Stack per-image features (e.g. from the cache) into one batch, in order."""
        if not features:
            raise ValueError("ImageFeatures.cat needs at least one element")
        sizes = {f.input_size for f in features}
        if len(sizes) != 1:
            raise ValueError(f"cannot batch features computed at different input sizes {sorted(sizes)}")
        embeddings = torch.cat([f.image_embeddings for f in features])
        high = None
        if features[0].high_res_features is not None:
            high = [torch.cat(level) for level in zip(*(f.high_res_features for f in features))]
        return ImageFeatures(embeddings, high, features[0].input_size)


class Segmenter(nn.Module):
    """A promptable mask predictor: image encoder + prompt encoder + mask decoder.

    Subclasses expose ``image_encoder``, ``prompt_encoder`` and ``mask_decoder`` modules so that the
    trainer can freeze or train each part.
    """

    #: side S of the square model-frame input
    image_size: int
    #: channel width of the prompt tokens the decoder accepts (256 for SAM and SAM2)
    prompt_dim: int = 256

    def encode(self, images: torch.Tensor) -> ImageFeatures:
        """Run the image encoder.

        images: (B, 3, S, S) float in [0, 1] (model frame, see ``image_processing``); the segmenter
        applies its own pixel normalisation.
        """
        raise NotImplementedError

    def decode(
        self,
        features: ImageFeatures,
        prompt_embeddings: Optional[torch.Tensor],
        image_index: torch.Tensor,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        boxes: Optional[torch.Tensor] = None,
        mask_inputs: Optional[torch.Tensor] = None,
        multimask_output: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Predict N masks in one decoder call.

        features: encoder output for B images.
        prompt_embeddings: (N, k, 256) custom sparse tokens (the projected routing-token states), or None.
            They are concatenated after the tokens the prompt encoder makes from ``points``/``boxes``.
        image_index: (N,) long, which of the B images each prompt belongs to.
        points: optional (coords (N, P, 2) model-frame xy pixel indices, labels (N, P)):
            1 foreground, 0 background, -1 padding (prompts with fewer clicks pad with -1).
        boxes: optional (N, 4) xyxy in model-frame pixels.
        mask_inputs: optional (N, 1, 4h, 4w) low-res logits of an earlier prediction (SAM: 256x256 at 1024).
        Returns (low_res_logits (N, M, 4h, 4w), iou_scores (N, M)); M = 1, or 3 with ``multimask_output``.
        N = 0 is allowed (empty outputs, still connected to the decoder's parameters).
        """
        n = _check_decode_inputs(features, prompt_embeddings, image_index, points, boxes, mask_inputs)
        if n == 0:
            return self._decode_no_prompts(features, prompt_embeddings, multimask_output)
        return self._decode_prompts(features, prompt_embeddings, image_index, points, boxes, mask_inputs,
                                    multimask_output)

    def _decode_prompts(self, features, prompt_embeddings, image_index, points, boxes, mask_inputs,
                        multimask_output) -> Tuple[torch.Tensor, torch.Tensor]:
        """``decode`` for N >= 1 validated prompts: the segmenter-specific prompt encoding and decoder call."""
        raise NotImplementedError

    @staticmethod
    def _append_custom_tokens(sparse: torch.Tensor, prompt_embeddings: Optional[torch.Tensor]) -> torch.Tensor:
        """(N, t, 256) prompt-encoder tokens followed by the (N, k, 256) routing-token embeddings, if any."""
        if prompt_embeddings is None:
            return sparse
        return torch.cat([sparse, prompt_embeddings.to(sparse.dtype)], dim=1)

    @property
    def low_res_mask_size(self) -> int:
        """Side of the logits ``decode`` returns (4x the image-embedding side)."""
        return 4 * self.prompt_encoder.image_embedding_size[0]

    def _check_images(self, images: torch.Tensor) -> None:
        """``encode`` takes (B, 3, S, S) model-frame images."""
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images must be (B, 3, {self.image_size}, {self.image_size}), got {tuple(images.shape)}")

    def _decode_no_prompts(
        self, features: ImageFeatures, prompt_embeddings: Optional[torch.Tensor], multimask_output: bool
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``decode`` for N = 0: SAM's decoders cannot reshape an empty batch, so one blank prompt is decoded
        and none of it returned. The empty result still reaches every decoder parameter (and the empty
        ``prompt_embeddings``' graph), so a batch without this task gives DDP a zero gradient, not none."""
        width = 0 if prompt_embeddings is None else prompt_embeddings.shape[1]
        blank = features.image_embeddings.new_zeros(1, width, self.prompt_dim)
        prompts = blank if prompt_embeddings is None else torch.cat([prompt_embeddings.to(blank.dtype), blank])
        index = torch.zeros(1, dtype=torch.long, device=blank.device)
        low_res_logits, iou_scores = self.decode(features, prompts, index, multimask_output=multimask_output)
        return low_res_logits[:0], iou_scores[:0]

    def forward(self, images: torch.Tensor, prompt_embeddings: torch.Tensor, image_index: torch.Tensor, **prompts):
        return self.decode(self.encode(images), prompt_embeddings, image_index, **prompts)


def _check_decode_inputs(
    features: ImageFeatures,
    prompt_embeddings: Optional[torch.Tensor],
    image_index: torch.Tensor,
    points,
    boxes,
    mask_inputs,
) -> int:
    """Validate shapes shared by every segmenter; returns N, the number of prompts."""
    if image_index.dim() != 1:
        raise ValueError(f"image_index must be (N,), got {tuple(image_index.shape)}")
    n = image_index.shape[0]
    if n and int(image_index.max()) >= features.batch_size:
        raise ValueError(f"image_index refers to image {int(image_index.max())} but only {features.batch_size} were encoded")
    if prompt_embeddings is not None and (prompt_embeddings.dim() != 3 or prompt_embeddings.shape[0] != n):
        raise ValueError(f"prompt_embeddings must be (N={n}, k, 256), got {tuple(prompt_embeddings.shape)}")
    if points is not None and (points[0].shape[0] != n or points[1].shape[:2] != points[0].shape[:2]):
        raise ValueError("points must be (coords (N, P, 2), labels (N, P)) with N matching image_index")
    if boxes is not None and tuple(boxes.shape) != (n, 4):
        raise ValueError(f"boxes must be (N={n}, 4), got {tuple(boxes.shape)}")
    if mask_inputs is not None and (mask_inputs.dim() != 4 or mask_inputs.shape[0] != n):
        raise ValueError(f"mask_inputs must be (N={n}, 1, h, w), got {tuple(mask_inputs.shape)}")
    return n


class EmbeddingCache:
    """LRU cache of per-image :class:`ImageFeatures`, bounded by the bytes the tensors hold.

    Keys come from :meth:`key_for`, a content hash of the model-frame input plus anything else that
    changes the features (model identity, window). Thread-safe, so the server may share one instance.
    """

    def __init__(self, max_bytes: int = 512 * 2**20):
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = int(max_bytes)
        self._entries: "OrderedDict[str, ImageFeatures]" = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key_for(image, *extra) -> str:
        """SHA-1 of an array's bytes, shape and dtype, plus ``extra`` (str-able tags such as a model id)."""
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        digest = hashlib.sha1(np.ascontiguousarray(array).tobytes())
        digest.update(repr((array.shape, str(array.dtype), extra)).encode())
        return digest.hexdigest()

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> Optional[ImageFeatures]:
        with self._lock:
            features = self._entries.get(key)
            if features is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return features

    def put(self, key: str, features: ImageFeatures) -> None:
        """Store detached features of ONE image; evicts least recently used entries to fit ``max_bytes``.

        An entry larger than the whole cache is not stored.
        """
        if features.batch_size != 1:
            raise ValueError(f"cache entries hold one image, got a batch of {features.batch_size}")
        features = features.detach()
        size = features.nbytes
        with self._lock:
            if key in self._entries:
                self._nbytes -= self._entries.pop(key).nbytes
            if size > self.max_bytes:
                return
            while self._entries and self._nbytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._nbytes -= evicted.nbytes
            self._entries[key] = features
            self._nbytes += size

    def get_or_compute(self, key: str, compute: Callable[[], ImageFeatures]) -> ImageFeatures:
        features = self.get(key)
        if features is None:
            features = compute().detach()
            self.put(key, features)
        return features

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._nbytes = 0


@dataclass
class SegmenterConfig:
    """Which segmenter to build and how.

    type: "sam" (segment-anything) or "sam2".
    variant: SAM "tiny" | "vit_b" | "vit_l" | "vit_h"; SAM2 "hiera_t" | "hiera_s" | "hiera_b+" | "hiera_l".
    image_size: side S of the square model input (official SAM/SAM2 checkpoints: 1024).
    patch_size, encoder_*: SAM ViT shape; the real variants take theirs from ``SAM_VIT_PRESETS``.
        The image embedding is (S / patch_size)^2 and masks come out at 4x that side, so the tiny default
        (256 px, patch 8) gives 128x128 masks: a 64x64 output caps the adrenals near Dice 0.56.
    checkpoint: optional weights file (.pth state dict; SAM2: {"model": state dict}).
    freeze_image_encoder: no gradients through the image encoder (it then runs under ``no_grad``).
    sam2_config: SAM2 Hydra config name inside the sam2 package.
    """
    type: str = "sam"
    variant: str = "tiny"
    image_size: int = 256
    patch_size: int = 8
    encoder_embed_dim: int = 192
    encoder_depth: int = 4
    encoder_num_heads: int = 3
    encoder_global_attn_indexes: Tuple[int, ...] = (1, 3)
    encoder_window_size: int = 8
    checkpoint: Optional[str] = None
    freeze_image_encoder: bool = False
    sam2_config: Optional[str] = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "SegmenterConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown segmenter config keys {unknown}", f"valid keys: {sorted(known)}")
        data = dict(data)
        if "encoder_global_attn_indexes" in data:
            data["encoder_global_attn_indexes"] = tuple(data["encoder_global_attn_indexes"])
        return cls(**data)
