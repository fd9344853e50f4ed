"""segment-anything (SAM v1) behind the :class:`Segmenter` interface, built from ``segment_anything.modeling``.

Real variants (ViT-B/L/H) load the official ``.pth`` files; ``tiny`` is a small ViT trained by
``ctreasoner train`` for the CPU default. Checkpoints are read with ``map_location="cpu"``:
``sam_model_registry`` calls ``torch.load`` without it and fails on CPU-only machines.
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Optional, Tuple

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from CTReasonerLib.errors import ConfigError, InputFileError, ModelError
from CTReasonerLib.model.segmenter.base import ImageFeatures, Segmenter, SegmenterConfig

#: encoder shapes of the official checkpoints (segment_anything/build_sam.py); all at 1024 px, patch 16
SAM_VIT_PRESETS = {
    "vit_b": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12, encoder_global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16, encoder_global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16, encoder_global_attn_indexes=(7, 15, 23, 31)),
}
SAM_VARIANTS = ("tiny",) + tuple(SAM_VIT_PRESETS)

# SAM normalises 0-255 RGB with ImageNet statistics; our [0, 1] windowed channels are scaled by 255 first.
_PIXEL_SCALE = 255.0


def sam_config(variant: str = "tiny", **overrides) -> SegmenterConfig:
    """A :class:`SegmenterConfig` for a SAM variant; ``overrides`` replace any field."""
    if variant not in SAM_VARIANTS:
        raise ConfigError(f"unknown SAM variant {variant!r}", f"choose one of {', '.join(SAM_VARIANTS)}")
    config = SegmenterConfig(type="sam", variant=variant)
    if variant != "tiny":
        config = replace(config, image_size=1024, patch_size=16, encoder_window_size=14, **SAM_VIT_PRESETS[variant])
    return replace(config, **overrides)


def build_sam_model(config: SegmenterConfig) -> Sam:
    """A randomly initialised ``segment_anything.modeling.Sam`` shaped by ``config`` (as build_sam.py does)."""
    if config.image_size % config.patch_size:
        raise ConfigError(
            f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}",
            "pick an image size divisible by the patch size",
        )
    prompt_embed_dim = 256
    embedding_side = config.image_size // config.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.encoder_embed_dim,
            depth=config.encoder_depth,
            num_heads=config.encoder_num_heads,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(config.encoder_global_attn_indexes),
            window_size=config.encoder_window_size,
            out_chans=prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim,
            image_embedding_size=(embedding_side, embedding_side),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_embed_dim, mlp_dim=2048, num_heads=8),
            transformer_dim=prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def load_sam_checkpoint(sam: Sam, path) -> None:
    """Load an official SAM ``.pth`` (or a saved ``SamSegmenter`` state dict) into ``sam``, CPU-safely."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"SAM checkpoint not found: {path}", "pass the path of a sam_vit_*.pth file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or non-torch file
        raise InputFileError(f"cannot read SAM checkpoint {path}: {exc}", "check that the file is a complete .pth") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    state = {key.removeprefix("sam."): value for key, value in state.items()}
    try:
        sam.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(
            f"SAM checkpoint {path.name} does not fit the configured model",
            "check segmenter variant and image_size/patch_size (official checkpoints: 1024 px, patch 16); "
            f"details: {str(exc).splitlines()[0]}",
        ) from exc


class SamSegmenter(Segmenter):
    """A ``segment_anything.modeling.Sam`` used through :class:`Segmenter`.

    The routing-token embeddings are extra sparse tokens appended to those SAM's prompt encoder makes
    from clicks and boxes, so the same decoder serves text-driven masks and their interactive refinement.
    """

    def __init__(self, config: SegmenterConfig, sam: Optional[Sam] = None):
        super().__init__()
        self.config = config
        self.sam = sam if sam is not None else build_sam_model(config)
        self.image_size = config.image_size
        if config.freeze_image_encoder:
            self.image_encoder.requires_grad_(False)

    @property
    def image_encoder(self) -> ImageEncoderViT:
        return self.sam.image_encoder

    @property
    def prompt_encoder(self) -> PromptEncoder:
        return self.sam.prompt_encoder

    @property
    def mask_decoder(self) -> MaskDecoder:
        return self.sam.mask_decoder

    def encode(self, images: torch.Tensor) -> ImageFeatures:
        self._check_images(images)
        pixels = (images * _PIXEL_SCALE - self.sam.pixel_mean) / self.sam.pixel_std
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_image_encoder):
            embeddings = self.image_encoder(pixels)
        return ImageFeatures(embeddings, None, self.image_size)

    def _decode_prompts(self, features, prompt_embeddings, image_index, points, boxes, mask_inputs,
                        multimask_output) -> Tuple[torch.Tensor, torch.Tensor]:
        n = image_index.shape[0]
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_inputs)
        sparse = sparse.expand(n, -1, -1)
        sparse = self._append_custom_tokens(sparse, prompt_embeddings)
        # SAM's MaskDecoder broadcasts ONE image over all prompts (repeat_interleave) and adds the dense
        # prompt to it. Folding each prompt's own image embedding into the dense term and passing a single
        # zero image gives the same sum, so prompts over many images decode in one unmodified call.
        dense = dense + features.image_embeddings[image_index]
        zero_image = dense.new_zeros((1,) + dense.shape[1:])
        return self.mask_decoder(
            image_embeddings=zero_image,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )


def build_sam_segmenter(
    variant: str = "tiny",
    checkpoint=None,
    image_size: Optional[int] = None,
    device=None,
    **overrides,
) -> SamSegmenter:
    """Build a SAM segmenter; ``checkpoint`` is loaded on the CPU, then the model moves to ``device``.

    ``image_size`` defaults to 1024 for the ViT variants and 256 for tiny; other ``SegmenterConfig``
    fields (e.g. ``patch_size``, ``freeze_image_encoder``) may be given as keywords.
    """
    if image_size is not None:
        overrides["image_size"] = image_size
    config = sam_config(variant, checkpoint=str(checkpoint) if checkpoint else None, **overrides)
    return build_segmenter_from_config(config, device=device)


def build_segmenter_from_config(config: SegmenterConfig, device=None) -> SamSegmenter:
    """Build the SAM segmenter ``config`` describes, loading ``config.checkpoint`` if set."""
    sam = build_sam_model(config)
    if config.checkpoint:
        load_sam_checkpoint(sam, config.checkpoint)
    segmenter = SamSegmenter(config, sam)
    return segmenter if device is None else segmenter.to(device)
