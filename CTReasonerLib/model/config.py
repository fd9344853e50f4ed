"""``CTReasonerConfig``: everything needed to rebuild a CTReasoner model, saved as ``ctreasoner_config.json``.

Sections: ``lvlm`` (backbone, local folder or tiny dims, LVLM image size, what trains, LoRA),
``segmenter`` (:class:`SegmenterConfig`), ``detection`` (:class:`DetectionHeadConfig`), ``closer_look``, ``loss`` (the paper's eq. 10
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
from CTReasonerLib.model.detection.head import DetectionHeadConfig
from CTReasonerLib.model.context_presence import ContextPresenceConfig
from CTReasonerLib.model.pixel_presence import PixelPresenceConfig
from CTReasonerLib.model.segmenter.base import SegmenterConfig

CONFIG_NAME = "ctreasoner_config.json"
LVLM_BACKBONES = ("qwen2_5_vl", "janus")
LVLM_TRAINABLE = ("full", "lora", "frozen")
CLOSER_LOOK_KEEP = ("last", "better")
#: where the presence gate can read organ presence; CTReasonerConfig.presence_from joins one or more with "+"
PRESENCE_SOURCES = ("lvlm", "image", "pixels")
#: older spelling of "lvlm+image", still read from saved folders
_PRESENCE_ALIASES = {"both": "lvlm+image"}


def presence_sources(presence_from: str) -> Tuple[str, ...]:
    """``presence_from`` -> the sources it names, e.g. "image+pixels" -> ("image", "pixels"). Raises
    ``ConfigError`` for an unknown or repeated source."""
    names = tuple(_PRESENCE_ALIASES.get(presence_from, presence_from).split("+")) if isinstance(presence_from, str) else ()
    if not names or any(name not in PRESENCE_SOURCES for name in names) or len(set(names)) != len(names):
        raise ConfigError(f"presence_from must name one or more of {PRESENCE_SOURCES} joined by '+' "
                          f"(e.g. 'image+pixels'), got {presence_from!r}")
    return names


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
    image_size: int = 168
    trainable: str = "full"
    dtype: Optional[str] = None
    max_new_tokens: int = 160
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
class CloserLookConfig:
    """Round 2 (paper §3.2): ROI around the mask (``closer_look.roi_from_mask``), resized to ``canonical_size``.

    margin: grows the mask's box by this fraction of its larger extent on every side (0.5: a square of
        twice the extent). canonical_size: None = the segmenter's image size. jitter: relative shift/scale
        noise of the ground-truth ROI during training, so round 2 learns from imperfect round-1 boxes.
    min_roi: smallest ROI side in slice pixels (tiny masks are not zoomed beyond this).
    query: the round-2 question asked when the caller requests a closer look without wording one.
    keep: which mask a closer look the model chose itself ends with. "last" (the paper): round 2's.
        "better": the round whose mask the segmenter's IoU head rates higher. A closer look asked for in
        words ("have a closer look") or on a region (``CTReasonerPipeline.closer_look``) always ends with round 2.
    """
    margin: float = 0.5
    canonical_size: Optional[int] = None
    jitter: float = 0.15
    min_roi: int = 32
    query: str = "Have a closer look at the {name}."
    keep: str = "last"
    #: training only: at most this many round-2 crops per batch (None: every closer-look sample). Each
    #: crop is a new image for the encoder, so on a CPU the cap keeps round 2 from dominating a step.
    train_crops_per_batch: Optional[int] = None


@dataclass
class LossWeights:
    """Eq. 10 weights and the parts of the seg/det losses ("all equally", paper §5.1)."""
    lm: float = 1.0
    #: relative weight, inside the LM loss, of the tokens that decide what happens: the first
    #: ``lm_decision_span`` tokens of every supervised answer (where it commits to present or absent) and
    #: the routing tokens. 1 = the paper's plain token mean.
    lm_decision: float = 1.0
    #: how many leading answer tokens ``lm_decision`` covers. Answers name the organ before they say
    #: whether it is visible ("The left adrenal gland is not visible..."), so the commitment comes a few
    #: tokens in, after the name.
    lm_decision_span: int = 1
    seg: float = 1.0
    det: float = 1.0
    seg_bce: float = 1.0
    seg_dice: float = 1.0
    #: SAM's IoU-prediction head (MSE to the real IoU); not in the paper, it makes mask scores meaningful
    seg_iou: float = 1.0
    det_l1: float = 1.0
    det_giou: float = 1.0
    det_objectness: float = 1.0
    #: SAM-style interactive refinement (clicks, box, previous mask; no routing token) that trains the
    #: prompt-encoder path the service's ``refine`` uses. Not in the paper; 0 disables it.
    interactive: float = 1.0
    #: auxiliary dense organ classification of the image embedding (``model/auxiliary.py``); not in the
    #: paper, 0 disables it. It stands in for the encoder pretraining a from-scratch tiny SAM lacks.
    seg_dense: float = 0.0
    #: auxiliary multi-label organ presence: the presence heads ``presence_from`` names; 0 disables it.
    presence: float = 0.0


def _is_probability(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


@dataclass
class CTReasonerConfig:
    lvlm: LVLMConfig = field(default_factory=LVLMConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    detection: DetectionHeadConfig = field(default_factory=DetectionHeadConfig)
    closer_look: CloserLookConfig = field(default_factory=CloserLookConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    projector_dim: int = 256
    #: inference: when set, a [SEG]/[DET] answer about an organ the presence head (``model/auxiliary.py``)
    #: gives a probability below this is answered "not visible" instead (``ChatResult.presence_overruled``).
    #: Needs a presence head trained with ``loss.presence > 0``. None = the LVLM's answer stands (the paper).
    presence_gate: Optional[float] = None
    #: which presence heads the gate reads: "lvlm" (the LVLM's image-token states), "image" (the segmenter's
    #: image embedding; ``ctreasoner fit-presence`` trains it on frozen features), "pixels" (``pixel_presence``'s
    #: network, ``fit-presence --head pixels``), or several joined by "+" (the geometric mean of their
    #: probabilities, e.g. "image+pixels"); "both" is the older name of "lvlm+image".
    presence_from: str = "lvlm"
    #: the pixel-level presence network (``model/pixel_presence.py``); None = the model has none.
    pixel_presence: Optional[PixelPresenceConfig] = None
    #: the context decision (``model/context_presence.py``, ``fit-presence --head context``): the pixel network's
    #: presence read from the slice and from each neighbour on its own, instead of the slice's top-k score alone.
    #: None = the top-k score. Needs a ``pixel_presence`` network that reads neighbours.
    presence_context: Optional[ContextPresenceConfig] = None
    #: inference: weight w of the pixel network's organ map in the masks a chat answer shows (both rounds of a
    #: closer look, and the masks fused boxes come from): logits = (1 - w) * segmenter + w * pixel network, a
    #: weighted product of the two models' odds. None = the segmenter's mask alone (the paper). Needs
    #: ``pixel_presence``. Clicks and boxes (``refine``) always get the segmenter's own mask.
    pixel_mask_weight: Optional[float] = None
    #: inference: when set, an answer that the organ is not visible is decoded again, forced to start with
    #: ``visible_answer_prefix``, when the presence head gives that organ at least this probability; the model
    #: then writes its own description and routing token (``ChatResult.presence_rescued``). Must be >=
    #: ``presence_gate``. Needs a presence head trained with ``loss.presence > 0``. None = no second decode.
    presence_rescue: Optional[float] = None
    #: how answers about a visible organ begin in the training data (``data/curate/qa.py``: "The {name} is seen
    #: ..."); ``{name}`` is the organ's display name. A model trained on other answers sets its own opening.
    visible_answer_prefix: str = "The {name} is seen"
    #: inference: how many earlier dialogue turns the LVLM sees (the most recent ones); None = all. A model
    #: trained on short dialogues (a curated follow-up has at most two earlier turns) loses the thread after more.
    max_history_turns: Optional[int] = None
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
        if self.closer_look.margin < 0:
            problems.append("closer_look.margin must be >= 0 (the ROI must contain the mask)")
        if self.closer_look.keep not in CLOSER_LOOK_KEEP:
            problems.append(f"closer_look.keep must be one of {CLOSER_LOOK_KEEP}, got {self.closer_look.keep!r}")
        if self.loss.lm_decision_span < 1:
            problems.append(f"loss.lm_decision_span must be >= 1, got {self.loss.lm_decision_span}")
        try:
            sources = presence_sources(self.presence_from)
        except ConfigError as error:
            problems.append(error.message)
            sources = None
        if sources is not None and "pixels" in sources and self.pixel_presence is None:
            problems.append("presence_from reads 'pixels' but the model has no pixel_presence network "
                            "(ctreasoner fit-presence --head pixels adds one)")
        if self.pixel_presence is not None:
            problems += self.pixel_presence.problems()
        if self.presence_context is not None:
            problems += self.presence_context.problems()
            if self.pixel_presence is None or not self.pixel_presence.neighbours:
                problems.append("presence_context needs a pixel_presence network that reads neighbouring slices "
                                "(ctreasoner fit-presence --head pixels --neighbours adds one)")
            if sources is not None and "pixels" not in sources:
                problems.append("presence_context refines the pixel network's presence, which presence_from "
                                f"{self.presence_from!r} does not read (add 'pixels')")
        if self.pixel_mask_weight is not None:
            if not _is_probability(self.pixel_mask_weight) or self.pixel_mask_weight == 1:
                problems.append(f"pixel_mask_weight must be a weight in [0, 1) or null, got {self.pixel_mask_weight!r}")
            elif self.pixel_presence is None:
                problems.append("pixel_mask_weight needs the model's pixel_presence network "
                                "(ctreasoner fit-presence --head pixels adds one)")
        for name in ("presence_gate", "presence_rescue"):
            value = getattr(self, name)
            if value is None:
                continue
            if not _is_probability(value):
                problems.append(f"{name} must be a probability in [0, 1] or null, got {value!r}")
            elif not self.loss.presence:
                problems.append(f"{name} needs a presence head trained with loss.presence > 0")
        if self.presence_rescue is not None:
            if (_is_probability(self.presence_gate) and _is_probability(self.presence_rescue)
                    and self.presence_rescue < self.presence_gate):
                problems.append(f"presence_rescue ({self.presence_rescue}) must be >= presence_gate "
                                f"({self.presence_gate}): a rescued answer would fail the gate")
            if not self.visible_answer_prefix.strip():
                problems.append("visible_answer_prefix must not be empty when presence_rescue is set")
        history = self.max_history_turns
        if history is not None and (isinstance(history, bool) or not isinstance(history, int) or history < 0):
            problems.append(f"max_history_turns must be a whole number >= 0 or null, got {history!r}")
        try:
            self.visible_answer_prefix.format(name="liver")
        except (KeyError, IndexError, ValueError) as error:
            problems.append(f"visible_answer_prefix {self.visible_answer_prefix!r} may use only the field {{name}} "
                            f"({type(error).__name__}: {error})")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems), "fix the model section of the config")
        return self

    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        data["segmenter"] = self.segmenter.to_dict()
        data["detection"] = self.detection.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "CTReasonerConfig":
        data = dict(data or {})
        segmenter = SegmenterConfig.from_dict({**SegmenterConfig().to_dict(), **data.pop("segmenter", {})})
        detection = DetectionHeadConfig.from_dict({**DetectionHeadConfig().to_dict(), **data.pop("detection", {})})
        config = _merge(cls(segmenter=segmenter, detection=detection), data, "")
        return config.validate()

    def updated(self, overrides: Dict[str, Any]) -> "CTReasonerConfig":
        """A copy with the (possibly partial, nested) mapping ``overrides`` applied and validated."""
        return _merge(self, dict(overrides or {}), "").validate()

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


#: config sections that may be absent (None): a mapping given for one starts from its defaults
_OPTIONAL_SECTIONS = {"pixel_presence": PixelPresenceConfig, "presence_context": ContextPresenceConfig}


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
        if current is None and name in _OPTIONAL_SECTIONS and value is not None:
            current = _OPTIONAL_SECTIONS[name]()
        if value is None and name in _OPTIONAL_SECTIONS:
            values[name] = None  # an optional section switched off
            continue
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"model config section {prefix + name} must be a mapping")
            value = _merge(current, value, f"{prefix}{name}.")
        values[name] = value
    return dataclasses.replace(instance, **values)
