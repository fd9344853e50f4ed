"""The detection branch D: Q learnable box queries conditioned on the projected [DET] state and the image."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from torch import nn

from CTReasonerLib.errors import ConfigError
from CTReasonerLib.model.segmenter.base import ImageFeatures


BOX_SOURCES = ("detection", "fused")


@dataclass
class DetectionHeadConfig:
    """num_queries Q box hypotheses per [DET] token; dim must equal the image-embedding width (256)."""
    num_queries: int = 10
    dim: int = 256
    num_layers: int = 2
    num_heads: int = 8
    feedforward_dim: int = 1024
    score_threshold: float = 0.5
    #: initial objectness probability, so that the many unmatched queries do not dominate early BCE
    prior_probability: float = 0.1
    #: where the boxes of an answered [DET] come from at inference. "detection": this head alone (the
    #: paper). "fused": the pipeline also asks ``fusion_query`` about the same organ (one more generation,
    #: with a closer look), ranks the boxes of that mask's connected components first (confidence = their
    #: highest probability) and adds this head's boxes, scores times ``fusion_detection_weight``, where
    #: they overlap no kept box by more than ``fusion_iou`` (``box_fusion.fuse_boxes``). For models whose
    #: masks locate better than this head (the evaluation report's Table 7).
    box_source: str = "detection"
    fusion_query: str = "Segment the {name}."
    fusion_detection_weight: float = 0.5
    fusion_iou: float = 0.5

    def __post_init__(self):
        if self.box_source not in BOX_SOURCES:
            raise ConfigError(f"detection.box_source must be one of {BOX_SOURCES}, got {self.box_source!r}",
                              'use "detection" (the paper) or "fused" (see DetectionHeadConfig)')
        if "{name}" not in self.fusion_query:
            raise ConfigError(f"detection.fusion_query {self.fusion_query!r} does not name the organ",
                              'put "{name}" where the organ goes, e.g. "Segment the {name}."')

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DetectionHeadConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown detection head config keys {unknown}", f"valid keys: {sorted(known)}")
        return cls(**data)


class DetectionHead(nn.Module):
    """DETR-style decoder: queries = learnable box embeddings + the [DET] embedding, cross-attending to the
    flattened image embedding (with SAM's random-Fourier positional encoding added to it).

    forward(features, det_embeddings (N, dim), image_index (N,)) ->
        {"pred_logits": (N, Q) objectness logits, "pred_boxes": (N, Q, 4) sigmoid cxcywh in [0, 1] of the model square}
    """

    def __init__(self, config: DetectionHeadConfig = DetectionHeadConfig()):
        super().__init__()
        self.config = config
        self.query_embed = nn.Embedding(config.num_queries, config.dim)
        self.position_encoding = PositionEmbeddingRandom(config.dim // 2)
        layer = nn.TransformerDecoderLayer(
            d_model=config.dim,
            nhead=config.num_heads,
            dim_feedforward=config.feedforward_dim,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        self.decoder = nn.TransformerDecoder(layer, num_layers=config.num_layers, norm=nn.LayerNorm(config.dim))
        self.objectness = nn.Linear(config.dim, 1)
        self.box = MLP(config.dim, config.dim, 4, 3, sigmoid_output=True)
        nn.init.constant_(self.objectness.bias, -math.log((1 - config.prior_probability) / config.prior_probability))

    def forward(self, features: ImageFeatures, det_embeddings: torch.Tensor, image_index: torch.Tensor) -> dict:
        if det_embeddings.dim() != 2 or det_embeddings.shape[0] != image_index.shape[0]:
            raise ValueError(f"det_embeddings must be (N, {self.config.dim}) matching image_index, got {tuple(det_embeddings.shape)}")
        embeddings = features.image_embeddings
        height, width = embeddings.shape[-2:]
        position = self.position_encoding((height, width)).to(embeddings.dtype)   # (dim, h, w)
        # memory: (B, h*w, dim), shared by every prompt of the same image
        memory = (embeddings + position).flatten(2).transpose(1, 2)[image_index]
        queries = self.query_embed.weight.unsqueeze(0) + det_embeddings.to(memory.dtype).unsqueeze(1)
        hidden = self.decoder(queries, memory)
        return {"pred_logits": self.objectness(hidden).squeeze(-1), "pred_boxes": self.box(hidden)}
