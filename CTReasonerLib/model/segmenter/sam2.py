"""SAM2 (image mode) behind the :class:`Segmenter` interface.

The model is built by ``sam2.build_sam.build_sam2`` from a packaged Hydra config plus an optional
checkpoint. Encoding follows ``SAM2ImagePredictor.set_image_batch``; decoding calls
``sam_mask_decoder`` with the per-prompt image embeddings and FPN ``high_res_features``.
Importing ``sam2`` initialises a global Hydra instance, so it is imported only when a SAM2 model is built.
The video-memory modules of ``SAM2Base`` are unused here and frozen, so DDP sees no parameter without a gradient.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Tuple

import torch
from torch import nn

from CTReasonerLib.errors import ConfigError, InputFileError, ModelError
from CTReasonerLib.model.segmenter.base import ImageFeatures, Segmenter, SegmenterConfig

SAM2_CONFIGS = {
    "hiera_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "hiera_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "hiera_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "hiera_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
}
# SAM2Transforms: ToTensor (0-1) then ImageNet normalisation
_PIXEL_MEAN = (0.485, 0.456, 0.406)
_PIXEL_STD = (0.229, 0.224, 0.225)


def sam2_config(variant: str = "hiera_t", **overrides) -> SegmenterConfig:
    """A :class:`SegmenterConfig` for a SAM2.1 variant (1024 px unless overridden)."""
    if variant not in SAM2_CONFIGS:
        raise ConfigError(f"unknown SAM2 variant {variant!r}", f"choose one of {', '.join(SAM2_CONFIGS)}")
    config = SegmenterConfig(type="sam2", variant=variant, image_size=1024, patch_size=16, sam2_config=SAM2_CONFIGS[variant])
    return replace(config, **overrides)


def build_sam2_model(config: SegmenterConfig, device="cpu") -> nn.Module:
    """``SAM2Base`` from ``config.sam2_config`` at ``config.image_size``, with ``config.checkpoint`` if set.

    ``device`` is explicit because ``build_sam2`` defaults to CUDA. The stability-based multimask fallback
    (``apply_postprocessing``) is off: masks conditioned on routing tokens must come from the single-mask
    token in training and inference alike.
    """
    from sam2.build_sam import build_sam2

    if config.image_size % 32:
        raise ConfigError(f"SAM2 image_size {config.image_size} is not a multiple of 32", "use e.g. 256, 512 or 1024")
    checkpoint = None
    if config.checkpoint:
        checkpoint = Path(config.checkpoint)
        if not checkpoint.is_file():
            raise InputFileError(f"SAM2 checkpoint not found: {checkpoint}", "pass the path of a sam2.1_hiera_*.pt file")
    try:
        return build_sam2(
            config.sam2_config or SAM2_CONFIGS[config.variant],
            ckpt_path=str(checkpoint) if checkpoint else None,
            device=str(device),
            mode="eval",
            apply_postprocessing=False,
            hydra_overrides_extra=[f"++model.image_size={config.image_size}"],
        )
    except RuntimeError as exc:
        raise ModelError(
            f"SAM2 checkpoint {checkpoint} does not fit config {config.sam2_config}",
            f"use the checkpoint of the same variant; details: {str(exc).splitlines()[0]}",
        ) from exc


class Sam2Segmenter(Segmenter):
    """A ``sam2.modeling.sam2_base.SAM2Base`` used through :class:`Segmenter` (single images, no memory)."""

    def __init__(self, config: SegmenterConfig, model: nn.Module):
        super().__init__()
        self.config = config
        self.model = model
        self.image_size = config.image_size
        self.register_buffer("pixel_mean", torch.tensor(_PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(_PIXEL_STD).view(-1, 1, 1), persistent=False)
        used = {"image_encoder", "sam_prompt_encoder", "sam_mask_decoder"}
        for name, module in model.named_children():
            if name not in used:
                module.requires_grad_(False)
        for name, param in model.named_parameters(recurse=False):
            param.requires_grad_(False)  # no_mem_embed & co: learned constants of the video model
        if getattr(self.mask_decoder, "pred_obj_scores", False):
            self.mask_decoder.obj_score_token.requires_grad_(False)
            self.mask_decoder.pred_obj_score_head.requires_grad_(False)
        if config.freeze_image_encoder:
            self.image_encoder.requires_grad_(False)
            # forward_image applies these decoder convolutions to the FPN levels: they belong to the encoder pass
            for name in ("conv_s0", "conv_s1"):
                if hasattr(self.mask_decoder, name):
                    getattr(self.mask_decoder, name).requires_grad_(False)

    @property
    def image_encoder(self) -> nn.Module:
        return self.model.image_encoder

    @property
    def prompt_encoder(self) -> nn.Module:
        return self.model.sam_prompt_encoder

    @property
    def mask_decoder(self) -> nn.Module:
        return self.model.sam_mask_decoder

    def encode(self, images: torch.Tensor) -> ImageFeatures:
        self._check_images(images)
        pixels = (images - self.pixel_mean) / self.pixel_std
        batch = images.shape[0]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_image_encoder):
            backbone_out = self.model.forward_image(pixels)
            _, vision_feats, _, feat_sizes = self.model._prepare_backbone_features(backbone_out)
            if self.model.directly_add_no_mem_embed:
                vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
            # (HW, B, C) sequences -> (B, C, H, W) maps, finest first
            maps = [f.permute(1, 2, 0).reshape(batch, -1, h, w) for f, (h, w) in zip(vision_feats, feat_sizes)]
        return ImageFeatures(maps[-1], maps[:-1], self.image_size)

    def _decode_prompts(self, features, prompt_embeddings, image_index, points, boxes, mask_inputs,
                        multimask_output) -> Tuple[torch.Tensor, torch.Tensor]:
        n = image_index.shape[0]
        device = features.image_embeddings.device
        if points is None:
            # SAM2 without clicks: one empty point labelled -1 (SAM2Base._forward_sam_heads)
            coords = torch.zeros(n, 1, 2, device=device)
            labels = -torch.ones(n, 1, dtype=torch.int32, device=device)
        else:
            coords, labels = points[0].float(), points[1].int()
        if boxes is not None:
            # SAM2 embeds a box as two corner points labelled 2 and 3, placed before the clicks
            box_labels = torch.tensor([[2, 3]], dtype=torch.int32, device=device).expand(n, -1)
            coords = torch.cat([boxes.reshape(n, 2, 2).float(), coords], dim=1)
            labels = torch.cat([box_labels, labels], dim=1)
        sparse, dense = self.prompt_encoder(points=(coords, labels), boxes=None, masks=mask_inputs)
        sparse = self._append_custom_tokens(sparse, prompt_embeddings)
        selected = features.select(image_index)
        low_res_logits, iou_scores, _, _ = self.mask_decoder(
            image_embeddings=selected.image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            repeat_image=False,
            high_res_features=selected.high_res_features,
        )
        return low_res_logits, iou_scores


def build_sam2_segmenter(variant: str = "hiera_t", checkpoint=None, image_size: int = 1024, device="cpu", **overrides) -> Sam2Segmenter:
    """Build a SAM2 segmenter on ``device`` (default CPU; sam2's own default would be CUDA)."""
    config = sam2_config(variant, checkpoint=str(checkpoint) if checkpoint else None, image_size=image_size, **overrides)
    return build_segmenter_from_config(config, device=device)


def build_segmenter_from_config(config: SegmenterConfig, device="cpu") -> Sam2Segmenter:
    return Sam2Segmenter(config, build_sam2_model(config, device=device or "cpu")).to(device or "cpu")
