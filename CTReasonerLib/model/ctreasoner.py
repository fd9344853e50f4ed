"""CTReasonerModel: the LVLM (reasoning, routing tokens) joined to the perception heads (paper §3).

    routing-token state (D) --projector + token-type offset--> prompt (256)
        [SEG]    -> segmenter.decode on the slice's features            (eq. 4)
        [DET]    -> DetectionHead on the slice's features               (eq. 5)
        [CLOSER] -> segmenter.decode on the zoomed crop's features      (eq. 6)

Training (eq. 7-10) runs one LVLM forward over every sequence of the batch: each sample's round-1
conversation and, for samples with a closer-look turn, a round-2 conversation whose image is the crop
around the ground-truth ROI (jittered) and whose history is the round-1 turn. One segmenter ``encode``
runs over the batch's unique images (slices shared by several samples are encoded once, crops are new
images) and one ``decode`` over all mask prompts.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from CTReasonerLib.errors import InputFileError
from CTReasonerLib.model.auxiliary import (DenseOrganHead, ImagePresenceHead, PresenceHead, dense_organ_loss, organ_label_channels,
                                           organ_presence, presence_loss)
from CTReasonerLib.model.closer_look import crop_and_resize, roi_from_mask
from CTReasonerLib.model.config import CTReasonerConfig, presence_sources
from CTReasonerLib.model.detection import DetectionHead, HungarianMatcher
from CTReasonerLib.model.image_processing import ResizeToSquare, slice_to_channels
from CTReasonerLib.model.lvlm import Conversation, LVLMAdapter, LVLMBatch, build_lvlm, load_lvlm
from CTReasonerLib.model.pixel_presence import build_pixel_presence
from CTReasonerLib.model.projector import build_projector
from CTReasonerLib.model.routing import ROUTING_TOKENS
from CTReasonerLib.organs import NUM_ORGANS
from CTReasonerLib.model.segmenter import Segmenter, build_segmenter

LVLM_FOLDER = "lvlm"
PERCEPTION_WEIGHTS = "perception.safetensors"
IGNORE_INDEX = -100
#: training-only heads; folders saved before they existed load with them freshly initialised
AUXILIARY_HEADS = ("dense_head.", "presence_head.", "image_presence_head.")
#: side of the stored dense organ targets (the dense head's output is 4x the embedding side, e.g. 128)
DENSE_TARGET_SIDE = 256


@dataclass
class TrainingBatch:
    """What ``collate`` makes of a list of dataset samples (B sequences, U unique segmenter images).

    lvlm: the tokenised conversations (round-1 rows, then round-2 rows).
    images: (U, 3, S, S) segmenter inputs in [0, 1]; sequence_image: (B,) long, the image of each row.
    mask_targets: (B, 1, S, S) float targets in the row image's frame (zeros where the row has no mask).
    box_targets: B tensors (M_i, 4) normalised cxcywh (empty unless the row is a detection sample).
    click_points: (B, 1, 2) a model-frame point inside the target (for the interactive-refinement loss).
    boxes_xyxy: (B, 4) model-frame ground-truth boxes of the target (jittered), for the same loss.
    is_round2: (B,) bool.
    organ_targets: (U, NUM_ORGANS + 1, s, s) class fractions of each image (s = min(S, 256)), for the dense
        auxiliary loss; organ_valid (U,) bool says which images have them (round-1 slices with labels).
    presence_targets: (B, NUM_ORGANS) 0/1, the organs on each row's slice; presence_valid (B,) bool.
    """
    lvlm: LVLMBatch
    images: torch.Tensor
    sequence_image: torch.Tensor
    mask_targets: torch.Tensor
    box_targets: List[torch.Tensor]
    click_points: torch.Tensor
    boxes_xyxy: torch.Tensor
    is_round2: torch.Tensor
    organ_targets: torch.Tensor
    organ_valid: torch.Tensor
    presence_targets: torch.Tensor
    presence_valid: torch.Tensor

    def to(self, device) -> "TrainingBatch":
        return TrainingBatch(self.lvlm.to(device), self.images.to(device), self.sequence_image.to(device),
                             self.mask_targets.to(device), [b.to(device) for b in self.box_targets],
                             self.click_points.to(device), self.boxes_xyxy.to(device), self.is_round2.to(device),
                             self.organ_targets.to(device), self.organ_valid.to(device),
                             self.presence_targets.to(device), self.presence_valid.to(device))


@dataclass
class _Row:
    """One sequence of a training batch before tensors are stacked."""
    conversation: Conversation
    image_key: str
    image: torch.Tensor
    mask: torch.Tensor = None                     # (S, S) float or None
    boxes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4))
    round2: bool = False
    labels: Optional[np.ndarray] = None            # (H, W) organ labels of a round-1 slice, when known
    transform: Optional[ResizeToSquare] = None


class CTReasonerModel(nn.Module):
    """LVLM adapter + shared projector (with a learned per-token-type offset) + segmenter + detection head."""

    def __init__(self, config: CTReasonerConfig, lvlm: LVLMAdapter, segmenter: Segmenter, detection_head: DetectionHead):
        super().__init__()
        self.config = config
        self.lvlm = lvlm
        self.segmenter = segmenter
        self.detection_head = detection_head
        # One projector for all routing tokens, plus a learned offset per token type, so [SEG] and
        # [CLOSER] prompts live in the same decoder space while staying distinguishable.
        self.projector = build_projector(lvlm.hidden_size, config.projector_dim)
        self.token_type_embedding = nn.Embedding(len(ROUTING_TOKENS), config.projector_dim)
        nn.init.zeros_(self.token_type_embedding.weight)
        self.dense_head = DenseOrganHead(segmenter.prompt_dim)
        self.presence_head = PresenceHead(lvlm.hidden_size)
        self.image_presence_head = ImagePresenceHead(segmenter.prompt_dim)
        # fitted on its own (ctreasoner fit-presence --head pixels) and frozen here
        self.pixel_presence_net = build_pixel_presence(config.pixel_presence) if config.pixel_presence else None
        self.matcher = HungarianMatcher()

    # ---- construction and persistence --------------------------------------------------------
    @classmethod
    def build(cls, config: CTReasonerConfig, corpus: Optional[Iterable[str]] = None, seed: int = 0,
              dtype: Optional[torch.dtype] = None) -> "CTReasonerModel":
        """A new model: tiny LVLM from scratch (``config.lvlm.path`` None) or a local pretrained one, new heads.

        corpus: texts for the tiny tokenizer (the training set's queries and answers, see
        :func:`dataset_corpus`); ignored for pretrained backbones.
        """
        config.validate()
        lvlm = build_lvlm(config.lvlm, corpus=corpus, seed=seed, dtype=dtype)
        lvlm.configure_training(config.lvlm.trainable, config.lvlm.lora)
        torch.manual_seed(seed)
        model = cls(config, lvlm, build_segmenter(config.segmenter), DetectionHead(config.detection))
        return model

    @classmethod
    def build_tiny(cls, config: Optional[CTReasonerConfig] = None, corpus: Optional[Iterable[str]] = None,
                   seed: int = 0) -> "CTReasonerModel":
        config = config or CTReasonerConfig()
        if not config.is_tiny:
            config = replace(config, lvlm=replace(config.lvlm, path=None))
        return cls.build(config, corpus=corpus, seed=seed)

    def save_pretrained(self, directory: str) -> None:
        """config json + ``lvlm/`` (tokenizer/processor; whole model, or the LoRA adapter) + perception weights."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        self.config.save(directory)
        self.lvlm.save_pretrained(os.path.join(directory, LVLM_FOLDER))
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.perception_state_dict().items()}
        save_file(state, os.path.join(directory, PERCEPTION_WEIGHTS), metadata={"format": "pt"})

    def perception_state_dict(self) -> Dict[str, torch.Tensor]:
        """Every non-LVLM weight, except a frozen image encoder that comes from the segmenter checkpoint file."""
        skip_encoder = bool(self.config.segmenter.checkpoint) and self.config.segmenter.freeze_image_encoder
        return {name: tensor for name, tensor in self.state_dict().items()
                if not name.startswith("lvlm.") and not (skip_encoder and ".image_encoder." in f".{name}")}

    @classmethod
    def from_pretrained(cls, directory: str, device=None, dtype: Optional[torch.dtype] = None,
                        trainable: bool = False) -> "CTReasonerModel":
        """Reload a folder written by :meth:`save_pretrained` (LoRA checkpoints reload over the base folder
        recorded in the config). ``trainable`` keeps LoRA weights trainable (resume / fine-tune)."""
        from safetensors.torch import load_file

        from CTReasonerLib.model.device import select_device, select_dtype

        config = CTReasonerConfig.load(directory)
        device = select_device(device)
        dtype = dtype or select_dtype(device, config.lvlm.dtype)
        weights = os.path.join(directory, PERCEPTION_WEIGHTS)
        if not os.path.isfile(weights):
            raise InputFileError(f"{directory} has no {PERCEPTION_WEIGHTS}", "the model folder is incomplete; re-save it")
        lvlm = load_lvlm(config.lvlm, os.path.join(directory, LVLM_FOLDER), dtype=dtype, is_trainable=trainable)
        if trainable and config.lvlm.trainable != "lora":
            lvlm.configure_training(config.lvlm.trainable, config.lvlm.lora)
        model = cls(config, lvlm, build_segmenter(config.segmenter), DetectionHead(config.detection))
        missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
        expected_missing = set(model.state_dict()) - set(model.perception_state_dict())
        expected_missing |= {name for name in missing if name.startswith(AUXILIARY_HEADS)}
        if unexpected or set(missing) - expected_missing:
            raise InputFileError(f"{weights} does not match the model config "
                                 f"(missing {sorted(set(missing) - expected_missing)[:5]}, unexpected {unexpected[:5]})",
                                 "the folder mixes files of different models; re-save it")
        return model.to(device).train(trainable)

    def merge_lora(self) -> None:
        """Fold a LoRA adapter into the LVLM weights (for ``ctreasoner merge``: a standalone model folder)."""
        if self.lvlm.trainable_mode == "lora":
            self.lvlm.model = self.lvlm.model.merge_and_unload()
            self.lvlm.trainable_mode = "frozen"

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        return self.token_type_embedding.weight.device

    # ---- prompts ------------------------------------------------------------------------------
    def routing_prompts(self, states: torch.Tensor, token: str) -> torch.Tensor:
        """(N, D) routing-token states -> (N, 256) prompts for the perception heads."""
        weight = self.token_type_embedding.weight
        return self.projector(states.to(weight.dtype)) + weight[ROUTING_TOKENS.index(token)]

    def slice_input(self, image_hu: np.ndarray):
        """(H, W) HU -> ((3, S, S) segmenter/LVLM input, the transform back, (3, H, W) windowed channels)."""
        channels = torch.from_numpy(slice_to_channels(image_hu))
        transform = ResizeToSquare(tuple(channels.shape[-2:]), self.config.segmenter.image_size)
        return transform.image(channels), transform, channels

    def neighbour_input(self, neighbours_hu) -> torch.Tensor:
        """(2, H, W) HU of the slices either side -> (2, 3, S, S) model-frame images (the pixel network's context)."""
        return torch.stack([self.slice_input(np.asarray(hu))[0] for hu in neighbours_hu])

    # ---- training -----------------------------------------------------------------------------
    def collate(self, samples: Sequence) -> TrainingBatch:
        """Dataset samples (``CTReasonerLib.data.dataset.Sample``) -> one :class:`TrainingBatch` (CPU tensors)."""
        size = self.config.segmenter.image_size
        canonical = self.config.canonical_size
        closer = self.config.closer_look
        rows: List[_Row] = []
        round2: List[_Row] = []
        for sample in samples:
            hu = np.asarray(sample.image_hu)
            key = hashlib.sha1(np.ascontiguousarray(hu).tobytes()).hexdigest()
            image, transform, channels = self.slice_input(hu)
            turns = [(t["query"], t["answer"]) for t in sample.turns]
            history = [(t["query"], t["answer"]) for t in getattr(sample, "history", ())]
            row = _Row(Conversation(image, history + turns[:1], supervised_turns=[len(history)]), key, image,
                       labels=getattr(sample, "labels", None), transform=transform)
            if sample.task == "seg":
                row.mask = transform.masks(sample.mask)[0]
            elif sample.task == "det" and len(sample.boxes):
                boxes = transform.boxes_to_model(torch.as_tensor(np.asarray(sample.boxes), dtype=torch.float32)) / size
                row.boxes = _xyxy_to_cxcywh(boxes.clamp(0, 1))
            rows.append(row)
            crop_cap = closer.train_crops_per_batch
            if len(turns) > 1 and sample.present and (crop_cap is None or len(round2) < crop_cap):
                roi = roi_from_mask(sample.mask, margin=closer.margin, min_size_px=closer.min_roi, jitter=closer.jitter)
                crop = crop_and_resize(channels, roi, canonical)
                target = crop_and_resize(sample.mask, roi, canonical)[0]
                round2.append(_Row(Conversation(crop, turns[:2]), f"{key}:{roi.tolist()}", crop, mask=target,
                                   round2=True))
        rows += round2
        if canonical != size and round2:
            raise ValueError("closer_look.canonical_size must equal the segmenter image size for batched training")

        unique: Dict[str, int] = {}
        images, organ_rows = [], []
        for row in rows:
            if row.image_key not in unique:
                unique[row.image_key] = len(images)
                images.append(row.image)
                organ_rows.append(row)
        organ_targets, organ_valid = _dense_organ_targets(organ_rows, min(size, DENSE_TARGET_SIDE))
        presence = [organ_presence(row.labels) if row.labels is not None else None for row in rows]
        masks = torch.stack([row.mask if row.mask is not None else torch.zeros(size, size) for row in rows])
        clicks, boxes = zip(*(_interactive_prompts(row.mask, size) for row in rows))
        return TrainingBatch(
            lvlm=self.lvlm.batch([row.conversation for row in rows]),
            images=torch.stack(images),
            sequence_image=torch.tensor([unique[row.image_key] for row in rows]),
            mask_targets=masks[:, None],
            box_targets=[row.boxes for row in rows],
            click_points=torch.stack(clicks),
            boxes_xyxy=torch.stack(boxes),
            is_round2=torch.tensor([row.round2 for row in rows]),
            organ_targets=organ_targets,
            organ_valid=organ_valid,
            presence_targets=torch.stack([p if p is not None else torch.zeros(NUM_ORGANS) for p in presence]),
            presence_valid=torch.tensor([p is not None for p in presence]))

    def training_step(self, batch: TrainingBatch) -> Dict[str, torch.Tensor]:
        """Eq. 10: LM cross-entropy + λseg (BCE + Dice, both rounds) + λdet (L1 + GIoU + objectness),
        plus two terms beyond the paper: SAM's IoU-prediction MSE (inside λseg) and λinteractive · the
        refinement path's BCE + Dice. Returns {"loss": total, <each term, detached>}."""
        from CTReasonerLib.train.losses import detection_loss, mask_loss

        weights = self.config.loss
        batch = batch.to(self.device)
        logits, hidden = self.lvlm(batch.lvlm)
        lm = _lm_loss(logits, batch.lvlm.labels, decision_token_weights(
            batch.lvlm.labels, self.lvlm.routing_token_ids.values(), self.config.loss.lm_decision,
            self.config.loss.lm_decision_span))

        features = self.segmenter.encode(batch.images.to(self.token_type_embedding.weight.dtype))
        # [SEG] (round 1) and [CLOSER] (round 2) prompts decode together; each row's target is in its own frame.
        seg_prompts, seg_rows = [], []
        for token in ("[SEG]", "[CLOSER]"):
            states, rows = self.lvlm.routing_states(hidden, batch.lvlm, token)
            seg_prompts.append(self.routing_prompts(states, token))
            seg_rows.append(rows)
        seg_prompts, seg_rows = torch.cat(seg_prompts), torch.cat(seg_rows)
        seg_weight = 1.0 if len(seg_rows) else 0.0
        seg_prompts, seg_rows = _keep_graph_alive(seg_prompts, seg_rows, self.routing_prompts(hidden[:1, 0], "[SEG]"))
        low_res, iou = self.segmenter.decode(features, seg_prompts[:, None], batch.sequence_image[seg_rows])
        seg = mask_loss(low_res, batch.mask_targets[seg_rows])
        seg["iou"] = _iou_prediction_loss(low_res, iou, batch.mask_targets[seg_rows])
        seg = {k: v * seg_weight for k, v in seg.items()}

        det_states, det_rows = self.lvlm.routing_states(hidden, batch.lvlm, "[DET]")
        det_weight = 1.0 if len(det_rows) else 0.0
        det_prompts, det_rows = _keep_graph_alive(self.routing_prompts(det_states, "[DET]"), det_rows,
                                                  self.routing_prompts(hidden[:1, 0], "[DET]"))
        outputs = self.detection_head(features, det_prompts, batch.sequence_image[det_rows])
        det = {k: v * det_weight for k, v in
               detection_loss(outputs, [{"boxes": batch.box_targets[int(r)]} for r in det_rows], self.matcher).items()}

        interactive = self._interactive_loss(features, batch, low_res.detach(), seg_rows, seg_weight)
        if weights.seg_dense:
            labelled = batch.organ_valid
            dense = dense_organ_loss(self.dense_head(features.image_embeddings[labelled]), batch.organ_targets[labelled])
        else:
            dense = _idle_head_loss(self.dense_head)
        presence = self._presence_loss(hidden, features, batch) if weights.presence else \
            _idle_head_loss(self.presence_head) + _idle_head_loss(self.image_presence_head)
        total = (weights.lm * lm
                 + weights.seg * (weights.seg_bce * seg["bce"] + weights.seg_dice * seg["dice"]
                                  + weights.seg_iou * seg["iou"])
                 + weights.det * (weights.det_l1 * det["l1"] + weights.det_giou * det["giou"]
                                  + weights.det_objectness * det["objectness"])
                 + weights.interactive * interactive
                 + weights.seg_dense * dense + weights.presence * presence)
        return {"loss": total, "lm": lm.detach(), "seg_bce": seg["bce"].detach(), "seg_dice": seg["dice"].detach(),
                "seg_iou": seg["iou"].detach(),
                "det_l1": det["l1"].detach(), "det_giou": det["giou"].detach(),
                "det_objectness": det["objectness"].detach(), "interactive": interactive.detach(),
                "seg_dense": dense.detach(), "presence": presence.detach()}

    def _presence_loss(self, hidden: torch.Tensor, features, batch: TrainingBatch) -> torch.Tensor:
        """BCE of the presence heads ``config.presence_from`` names; an unused head gets a connected zero."""
        sources = presence_sources(self.config.presence_from)
        if "lvlm" in sources:
            image_tokens = batch.lvlm.input_ids == self.lvlm.image_token_id
            lvlm = presence_loss(self.presence_head(hidden, image_tokens), batch.presence_targets, batch.presence_valid)
        else:
            lvlm = _idle_head_loss(self.presence_head)
        if "image" in sources:
            logits = self.image_presence_head(features.image_embeddings[batch.sequence_image])
            image = presence_loss(logits, batch.presence_targets, batch.presence_valid)
        else:
            image = _idle_head_loss(self.image_presence_head)
        return lvlm + image

    def _interactive_loss(self, features, batch: TrainingBatch, round1_logits: torch.Tensor,
                          seg_rows: torch.Tensor, weight: float) -> torch.Tensor:
        """SAM-style refinement without routing tokens, on the same masks: (click + box) and
        (click + the detached first prediction as mask prompt), so every prompt-encoder part trains."""
        from CTReasonerLib.train.losses import mask_loss

        if self.config.loss.interactive == 0:
            return round1_logits.new_zeros(())
        image_index = batch.sequence_image[seg_rows]
        labels = torch.ones(len(seg_rows), 1, device=self.device)
        points = (batch.click_points[seg_rows], labels)
        with_box, _ = self.segmenter.decode(features, None, image_index, points=points, boxes=batch.boxes_xyxy[seg_rows])
        with_mask, _ = self.segmenter.decode(features, None, image_index, points=points, mask_inputs=round1_logits)
        targets = batch.mask_targets[seg_rows]
        total = sum(sum(mask_loss(logits, targets).values()) for logits in (with_box, with_mask))
        return total * weight / 2

    # ---- inference helpers (used by CTReasonerPipeline) ----------------------------------------
    @torch.no_grad()
    def decode_masks(self, features, prompts: torch.Tensor, image_index: torch.Tensor):
        """(N, 256) prompts -> (low-res logits (N, 1, s, s), iou (N, 1))."""
        return self.segmenter.decode(features, prompts[:, None], image_index)


def decision_token_weights(labels: torch.Tensor, routing_token_ids: Iterable[int], weight: float,
                           span: int = 1) -> Optional[torch.Tensor]:
    """(B, T) LM-loss weights: ``weight`` at the first ``span`` tokens of every supervised answer span
    (where the model commits to "present" or "absent") and at routing tokens, 1 elsewhere; None when
    ``weight`` is 1."""
    if weight == 1.0:
        return None
    supervised = labels != IGNORE_INDEX
    first = supervised.clone()
    first[:, 1:] &= ~supervised[:, :-1]
    positions = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    span_start = torch.cummax(torch.where(first, positions, torch.zeros_like(positions)), dim=1).values
    leading = supervised & (positions - span_start < span)
    routing = torch.isin(labels, torch.tensor(sorted(routing_token_ids), device=labels.device))
    return torch.where(leading | routing, float(weight), 1.0)


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor, token_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Token cross-entropy over supervised answer tokens (next-token shift), in fp32.

    token_weights: optional (B, T) weights aligned with ``labels``; the loss is then their weighted mean.
    """
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:].to(logits.device)
    if (targets != IGNORE_INDEX).sum() == 0:
        return shifted.sum() * 0.0
    if token_weights is None:
        return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    per_token = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="none")
    weights = token_weights[:, 1:].reshape(-1).to(per_token) * (targets.reshape(-1) != IGNORE_INDEX)
    return (per_token * weights).sum() / weights.sum()


def _iou_prediction_loss(logits: torch.Tensor, predicted_iou: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """MSE between SAM's predicted IoU and the IoU the mask really has (SAM's recipe): it makes the
    ``score`` of a mask meaningful and lets the IoU head train with the rest."""
    with torch.no_grad():
        targets = F.interpolate(targets.float(), size=logits.shape[-2:], mode="area") > 0.5
        predicted = logits > 0
        union = (predicted | targets).flatten(1).sum(1).clamp(min=1)
        actual = (predicted & targets).flatten(1).sum(1) / union
    return F.mse_loss(predicted_iou[:, 0].float(), actual.float())


def _keep_graph_alive(prompts: torch.Tensor, rows: torch.Tensor, dummy_prompt: torch.Tensor):
    """When a batch has no token of a kind, decode one dummy prompt (its loss is weighted 0) so the head
    still takes part in the step (DDP / ZeRO wait for every trainable parameter's gradient)."""
    if len(rows):
        return prompts, rows
    return dummy_prompt, torch.zeros(1, dtype=torch.long, device=dummy_prompt.device)


def _idle_head_loss(head: nn.Module) -> torch.Tensor:
    """A zero connected to every parameter of a head whose loss weight is 0: nothing is computed, and
    DDP / ZeRO still see a gradient for each trainable parameter."""
    return sum(parameter.sum() * 0.0 for parameter in head.parameters())


def _dense_organ_targets(rows: Sequence[_Row], side: int):
    """Per unique image: (NUM_ORGANS + 1, side, side) class fractions in the model frame, and whether
    it has them (round-1 slices with a label map; crops and unlabelled samples do not)."""
    targets = torch.zeros(len(rows), NUM_ORGANS + 1, side, side)
    valid = torch.zeros(len(rows), dtype=torch.bool)
    for index, row in enumerate(rows):
        if row.labels is None:   # crops and unlabelled samples
            continue
        channels = row.transform.masks(organ_label_channels(row.labels))
        targets[index] = F.interpolate(channels[None], size=(side, side), mode="area")[0]
        valid[index] = True
    return targets, valid


def _xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_convert

    return box_convert(boxes, "xyxy", "cxcywh")


def _interactive_prompts(mask: Optional[torch.Tensor], size: int):
    """A random click inside the (soft) target and its box grown by up to 10%, model-frame; zeros without a mask."""
    if mask is None or not bool((mask > 0.5).any()):
        return torch.zeros(1, 2), torch.tensor([0.0, 0.0, float(size), float(size)])
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    pick = int(torch.randint(len(xs), (1,)))
    click = torch.tensor([[float(xs[pick]), float(ys[pick])]])
    box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    extent = (box[2:] - box[:2]).max()
    box = box + (torch.rand(4) * 2 - 1) * 0.1 * extent
    return click, box.clamp(0, size)


def dataset_corpus(samples: Iterable) -> List[str]:
    """Every query and answer of a dataset: the text the tiny tokenizer is trained on."""
    return [text for sample in samples for turn in sample.turns for text in (turn["query"], turn["answer"])]
