"""``CTReasonerConfig``: everything needed to rebuild a CTReasoner model, saved as ``ctreasoner_config.json``.

Sections: ``lvlm`` (backbone, local folder or tiny dims, LVLM image size, what trains, LoRA),
``segmenter`` (:class:`SegmenterConfig`), ``detection``, ``closer_look``, ``loss`` (the paper's eq. 10
weights: "all equally", so every weight is 1). ``from_dict`` accepts partial nested mappings (training
config overrides) on top of the defaults and rejects unknown keys.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from CTReasonerLib.errors import ConfigError, InputFileError
from CTReasonerLib.model.segmenter.base import SegmenterConfig

CONFIG_NAME = "ctreasoner_config.json"
LVLM_BACKBONES = ("qwen2_5_vl", "janus")
LVLM_TRAINABLE = ("full", "lora", "frozen")


@dataclass
class LoraSettings:
    """peft LoRA on the language model's attention projections (paper §5.1: r=8, alpha=16, dropout 0.05)."""
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"


@dataclass
class LVLMConfig:
    """The vision-language backbone.

    path: local model folder (real Qwen2.5-VL-3B-Instruct / converted Janus); None builds the tiny model
        from the ``tiny_*`` sizes below with our own tokenizer (vocabulary ``tokenizer_vocab_size``).
    image_size: side of the square the LVLM sees, separate from the segmenter's (a multiple of 28 for Qwen).
    trainable: "full" for the tiny model, which starts from random weights and must learn language from
        scratch (LoRA's rank-8 updates on attention alone cannot); "lora" for pretrained backbones;
        "frozen" to train only the heads.
    dtype: None = bf16 on CUDA, fp32 on CPU (see ``model/device.py``).
    """
    backbone: str = "qwen2_5_vl"
    path: Optional[str] = None
    image_size: int = 112
    trainable: str = "full"
    dtype: Optional[str] = None
    max_new_tokens: int = 96
    tokenizer_vocab_size: int = 2048
    tiny_hidden_size: int = 192
    tiny_layers: int = 3
    tiny_heads: int = 4
    tiny_kv_heads: int = 2
    tiny_intermediate_size: int = 512
    tiny_vision_depth: int = 2
    tiny_vision_hidden_size: int = 128
    tiny_vision_heads: int = 4
    tiny_vision_intermediate_size: int = 256
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class DetectionConfig:
    """DETR-style box head: Q learnable queries, boxes kept above ``score_threshold`` at inference."""
    num_queries: int = 8
    score_threshold: float = 0.5


@dataclass
class CloserLookConfig:
    """Round 2 (paper §3.2): ROI = mask box * ``margin`` (squared, clamped), resized to ``canonical_size``.

    canonical_size: None = the segmenter's image size. jitter: relative shift/scale noise of the
    ground-truth ROI during training, so round 2 learns from imperfect round-1 boxes.
    min_roi: smallest ROI side in source pixels (tiny masks are not zoomed beyond this).
    """
    margin: float = 2.0
    canonical_size: Optional[int] = None
    jitter: float = 0.15
    min_roi: int = 24
    query: str = "Can you have a closer look?"


@dataclass
class LossWeights:
    """Eq. 10 weights and the parts of the seg/det losses ("all equally", paper §5.1)."""
    lm: float = 1.0
    seg: float = 1.0
    det: float = 1.0
    seg_bce: float = 1.0
    seg_dice: float = 1.0
    det_l1: float = 1.0
    det_giou: float = 1.0
    det_objectness: float = 1.0


@dataclass
class CTReasonerConfig:
    lvlm: LVLMConfig = field(default_factory=LVLMConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    closer_look: CloserLookConfig = field(default_factory=CloserLookConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    projector_dim: int = 256
    model_type: str = "ctreasoner"

    @property
    def is_tiny(self) -> bool:
        return self.lvlm.path is None

    @property
    def canonical_size(self) -> int:
        return self.closer_look.canonical_size or self.segmenter.image_size

    def validate(self) -> "CTReasonerConfig":
        problems = []
        if self.lvlm.backbone not in LVLM_BACKBONES:
            problems.append(f"lvlm.backbone must be one of {LVLM_BACKBONES}, got {self.lvlm.backbone!r}")
        if self.lvlm.trainable not in LVLM_TRAINABLE:
            problems.append(f"lvlm.trainable must be one of {LVLM_TRAINABLE}, got {self.lvlm.trainable!r}")
        if self.lvlm.backbone == "qwen2_5_vl" and self.lvlm.image_size % 28:
            problems.append(f"lvlm.image_size must be a multiple of 28 for Qwen2.5-VL, got {self.lvlm.image_size}")
        if self.closer_look.margin < 1:
            problems.append("closer_look.margin must be >= 1 (the ROI must contain the mask)")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems), "fix the model section of the config")
        return self

    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        data["segmenter"] = self.segmenter.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "CTReasonerConfig":
        data = dict(data or {})
        segmenter = SegmenterConfig.from_dict({**SegmenterConfig().to_dict(), **data.pop("segmenter", {})})
        config = _merge(cls(segmenter=segmenter), data, "")
        return config.validate()

    def save(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        with open(path, "w") as handle:
            json.dump(self.to_dict(), handle, indent=2)
        return path

    @classmethod
    def load(cls, directory: str) -> "CTReasonerConfig":
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise InputFileError(f"{directory} is not a CTReasoner model folder (no {CONFIG_NAME})",
                                 "pass a folder written by `ctreasoner train` or `ctreasoner merge`")
        with open(path) as handle:
            return cls.from_dict(json.load(handle))


def _merge(instance, data: Dict[str, Any], prefix: str):
    """Copy of dataclass ``instance`` with the (possibly partial, nested) mapping ``data`` applied."""
    known = {f.name: f for f in dataclasses.fields(instance)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown model config key(s) {', '.join(prefix + k for k in unknown)}",
                          f"known keys: {', '.join(sorted(known))}")
    values = {}
    for name, value in data.items():
        current = getattr(instance, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"model config section {prefix + name} must be a mapping")
            value = _merge(current, value, f"{prefix}{name}.")
        values[name] = value
    return dataclasses.replace(instance, **values)
