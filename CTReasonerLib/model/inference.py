"""CTReasonerPipeline: one chat turn on a CT slice -> :class:`CTReasonerLib.results.ChatResult` (paper §3.4).

    slice (HU) --windows, square--> segmenter features (cached per image content) and the LVLM image
    query + history --LVLM generate (KV cache on)--> text with routing tokens
    [SEG]    -> mask (full resolution, probabilities)
    [DET]    -> boxes above the score threshold (several per organ when it is split); with
                detection.box_source "fused" also the boxes of the same organ's mask, ranked first
    closer look (the model's [CLOSER], the user's request, or ``closer_look=True``):
        ROI from the round-1 mask (or best box) -> crop, resize to the canonical size -> round 2 with the
        closer-look question on the crop -> [CLOSER] state -> mask on the crop -> pasted back over round 1.

Routing-token states come from generation's own hidden states (see ``model/routing.py``). If round 2
does not generate ``[CLOSER]`` although a closer look was asked for, the state is taken from a
teacher-forced forward with ``[CLOSER]`` appended to what it did generate, and the result says so
(``CloserLookInfo.token_generated`` is False): the mask is still produced, never silently faked.
"""
from __future__ import annotations

import contextlib
import functools
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from CTReasonerLib.errors import CTReasonerError, InputFileError
from CTReasonerLib.model.closer_look import crop_and_resize, paste_back, roi_from_mask
from CTReasonerLib.model.detection import postprocess_detections
from CTReasonerLib.model.detection.head import BOX_SOURCES
from CTReasonerLib.model.detection.box_fusion import fuse_boxes, mask_to_boxes
from CTReasonerLib.model.image_processing import ResizeToSquare
from CTReasonerLib.model.config import presence_sources
from CTReasonerLib.model.context_presence import context_presence, slice_context_features
from CTReasonerLib.model.lvlm import Conversation, LVLMBatch
from CTReasonerLib.model.pixel_presence import blend_mask_logits
from CTReasonerLib.model.query import (is_closer_request, normalize_query, resolve_organ, says_not_visible,
                                       split_compound_query)
from CTReasonerLib.model.routing import CLOSER_TOKEN, DET_TOKEN, ROUTING_TOKENS, SEG_TOKEN
from CTReasonerLib.model.segmenter import EmbeddingCache
from CTReasonerLib.organs import ORGANS, get_organ
from CTReasonerLib.results import BoxPrediction, ChatResult, CloserLookInfo, MaskPrediction

#: logit used for the padding of the model square when a full-resolution mask goes back to the model frame
_OUTSIDE_LOGIT = -20.0


@dataclass
class _Slice:
    """One prepared image: segmenter/LVLM input (3, S, S), its transform, windowed channels, cache key, and
    the pixel network's (NUM_ORGANS + 1, s, s) class probabilities once a presence check or mask has needed them,
    and its (H, W) logits per organ label once a mask has been blended with them."""
    image: torch.Tensor
    transform: ResizeToSquare
    channels: torch.Tensor
    key: str
    neighbours: Optional[torch.Tensor] = None   # (2, 3, S, S) the slices either side, for the pixel network
    pixel_probabilities: Optional[torch.Tensor] = None
    pixel_presence: Optional[torch.Tensor] = None  # (NUM_ORGANS,) what the presence check reads of the pixel network
    pixel_organ_logits: Dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Round:
    """One generated answer and what its routing tokens produced (full-resolution logits per mask)."""
    raw_text: str
    tokens: List[str]
    organ: Optional[str]
    mask_logits: List[torch.Tensor] = field(default_factory=list)     # (H, W) each
    mask_scores: List[float] = field(default_factory=list)
    boxes: List[BoxPrediction] = field(default_factory=list)


def _inference(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with torch.no_grad():
            return method(self, *args, **kwargs)
    return wrapper


class CTReasonerPipeline:
    """Inference over a :class:`CTReasonerModel` (any scale); thread-compatible, one call at a time."""

    def __init__(self, model, embedding_cache: Optional[EmbeddingCache] = None, max_new_tokens: Optional[int] = None):
        self.model = model.eval()
        self.config = model.config
        self.cache = embedding_cache if embedding_cache is not None else EmbeddingCache()
        self.max_new_tokens = max_new_tokens or self.config.lvlm.max_new_tokens
        self._model_tag = f"ctreasoner-{id(model)}"
        self._transforms: "OrderedDict[str, ResizeToSquare]" = OrderedDict()

    @property
    def neighbour_distance_mm(self) -> Optional[float]:
        """How far either side of a slice the model wants its neighbours (``chat(neighbours_hu=...)``), in mm;
        None when its pixel network does not read them (sending them then changes nothing)."""
        net = self.model.pixel_presence_net
        return net.config.neighbour_distance_mm if net is not None and net.config.neighbours else None

    def _perception_precision(self):
        """Autocast for the perception heads when the model runs in bf16/fp16: segment-anything's positional
        encodings multiply fp32 coordinates by their (cast) buffers, which fails in a plain bf16 model.
        (The LVLM runs without it: autocast slows token-by-token decoding.)"""
        dtype = self.model.token_type_embedding.weight.dtype
        if dtype in (torch.bfloat16, torch.float16):
            return torch.autocast(self.model.device.type, dtype=dtype)
        return contextlib.nullcontext()

    @classmethod
    def from_pretrained(cls, directory: str, device="auto", dtype=None, **kwargs) -> "CTReasonerPipeline":
        from CTReasonerLib.model.ctreasoner import CTReasonerModel

        return cls(CTReasonerModel.from_pretrained(directory, device=device, dtype=dtype), **kwargs)

    # ---- images ---------------------------------------------------------------------------------
    def _prepare(self, image_hu, neighbours_hu=None) -> _Slice:
        hu = np.asarray(image_hu)
        if hu.ndim != 2 or min(hu.shape) < 2:
            raise InputFileError(f"expected one 2-D CT slice (H, W), got an array of shape {hu.shape}",
                                 "send a single axial slice in HU")
        if not np.isfinite(hu).all():
            raise InputFileError("the slice holds NaN or infinite values", "send finite HU values")
        image, transform, channels = self.model.slice_input(hu)
        key = EmbeddingCache.key_for(hu, self._model_tag)
        self._transforms[key] = transform
        while len(self._transforms) > 256:
            self._transforms.popitem(last=False)
        return _Slice(image, transform, channels, key, neighbours=self._neighbour_input(hu, neighbours_hu))

    def _neighbour_input(self, hu: np.ndarray, neighbours_hu) -> Optional[torch.Tensor]:
        """(2, H, W) HU of the slices either side -> (2, 3, S, S), when the pixel network reads them (None otherwise)."""
        if neighbours_hu is None:
            return None
        neighbours = np.asarray(neighbours_hu)
        if neighbours.shape != (2,) + hu.shape:
            raise InputFileError(f"the neighbouring slices have shape {neighbours.shape}; a slice of shape {hu.shape} "
                                 f"needs {(2,) + hu.shape} (the slice below, then the one above)",
                                 "send both neighbours at the slice's size, or none")
        if not np.isfinite(neighbours).all():
            raise InputFileError("the neighbouring slices hold NaN or infinite values", "send finite HU values")
        net = self.model.pixel_presence_net
        if net is None or not net.config.neighbours:
            return None
        return self.model.neighbour_input(neighbours)

    def _features(self, key: str, image: torch.Tensor):
        parameter = self.model.token_type_embedding.weight

        def encode():
            with self._perception_precision():
                return self.model.segmenter.encode(image[None].to(parameter.device, parameter.dtype))
        return self.cache.get_or_compute(key, encode)

    @_inference
    def encode_image(self, image_hu) -> bool:
        """Put the slice's encoder output in the cache. Returns True when it was already there."""
        prepared = self._prepare(image_hu)
        cached = prepared.key in self.cache
        self._features(prepared.key, prepared.image)
        return cached

    # ---- chat -----------------------------------------------------------------------------------
    @_inference
    def chat(self, image_hu, query: str, history: Sequence[Tuple[str, str]] = (), closer_look: Optional[bool] = None,
             score_threshold: Optional[float] = None, return_probabilities: bool = True,
             box_source: Optional[str] = None, neighbours_hu=None) -> ChatResult:
        """One chat turn. ``closer_look``: True always runs round 2 on a segmented target, False never,
        None follows the model's [CLOSER] token or a request in ``query`` ("have a closer look").
        ``history``: the earlier (question, answer) turns, oldest first; after each turn append
        ``result.history_turns(query)`` (the model's own single-organ turns) to continue the dialogue. The
        LVLM sees the last ``max_history_turns`` of them (model config); "have a closer look" reads the last.
        ``box_source``: "detection" or "fused" for this turn's [DET] boxes; None = the model's
        ``detection.box_source`` (see :class:`DetectionHeadConfig`).
        ``neighbours_hu``: (2, H, W) HU of the slices about ``pixel_presence.neighbour_distance_mm`` below and above
        (``CTReasonerLib.io.slices.neighbour_slices``), for a pixel network that reads them; without them it
        takes the slice itself in their place."""
        if not isinstance(query, str) or not query.strip():
            raise CTReasonerError("the question is empty", "type what you want to know about the slice")
        box_source = box_source or self.config.detection.box_source
        if box_source not in BOX_SOURCES:
            raise CTReasonerError(f"box_source must be one of {BOX_SOURCES}, got {box_source!r}",
                                  'pass "detection" (the [DET] head alone) or "fused", or leave it out')
        history = [(normalize_query(asked), answer) for asked, answer in _checked_history(history)]
        timings: Dict[str, float] = {}
        with _timed(timings, "total"):
            with _timed(timings, "prepare"):
                prepared = self._prepare(image_hu, neighbours_hu)
            with _timed(timings, "image_encoder"):
                features = self._features(prepared.key, prepared.image)
            questions = [normalize_query(sub.text) for sub in split_compound_query(query)]
            results = [self._chat_one(prepared, features, question, history, closer_look, score_threshold,
                                      return_probabilities, box_source, timings) for question in questions]
        result = results[0] if len(results) == 1 else _merge(results)
        result.turns = [(question, part.raw_text) for question, part in zip(questions, results)]
        result.timings_ms = timings
        return result

    def _chat_one(self, prepared: _Slice, features, query: str, history: List[Tuple[str, str]],
                  closer_look: Optional[bool], score_threshold: Optional[float], probabilities: bool,
                  box_source: str, timings: Dict[str, float]) -> ChatResult:
        round1_query, round1_history, closer_query = query, history, None
        if closer_look is not False and is_closer_request(query) and history and resolve_organ(query) in (None, resolve_organ(history[-1][0])):
            # "have a closer look" after an earlier turn: redo that turn's round 1 (its features are cached),
            # then answer this question as round 2.
            round1_query, round1_history, closer_query = history[-1][0], history[:-1], query
        round1_history = self._recent(round1_history)
        turns = round1_history + [(round1_query, None)]
        with _timed(timings, "generate"):
            generation = self._generate(prepared.image, turns)
        routed = self._routes(generation)
        with _timed(timings, "presence"):
            presence, checked_organ = self._presence(generation, prepared, features, round1_query, routed)
        gate, rescue = self.config.presence_gate, self.config.presence_rescue
        overruled = routed and presence is not None and gate is not None and presence < gate
        rescued, prefix = False, ()
        if not routed and presence is not None and rescue is not None and presence >= rescue:
            with _timed(timings, "rescue"):
                name = _organ_name(checked_organ)
                prefix = self.model.lvlm.encode_text(self.config.visible_answer_prefix.format(name=name))
                retry = self._generate(prepared.image, turns, answer_prefix=prefix)
            if self._routes(retry):  # otherwise the model still would not route: its first answer stands
                generation, rescued = retry, True
            else:
                prefix = ()
        with _timed(timings, "heads"):
            if overruled:
                first = _Round(f"The {_organ_name(checked_organ)} is not visible on this slice.", [], checked_organ)
            else:
                first = self._heads(generation, prepared, features, round1_query, score_threshold)
        if DET_TOKEN in first.tokens and first.organ and box_source == "fused":
            with _timed(timings, "mask_boxes"):
                first.boxes = self._fused_boxes(prepared, features, round1_history, first, score_threshold, prefix)
        masks = [self._mask_prediction(first.organ, self._with_pixel_map(prepared, first.organ, logits), score,
                                       prepared.transform, 1, probabilities)
                 for logits, score in zip(first.mask_logits, first.mask_scores)]
        tokens = list(first.tokens)
        wants_closer = closer_look if closer_look is not None else (CLOSER_TOKEN in first.tokens or closer_query is not None)
        info = CloserLookInfo(ran=False)
        text = _strip_routing(first.raw_text)
        if not text and not first.tokens:
            text = _no_answer_note(round1_query)
        if overruled:  # shown to the user; the history keeps the plain answer (the form the model was trained on)
            text += (f" (Presence check {presence:.2f}, below the model's gate of {gate:.2f}: "
                     "its answer that the organ is visible was overruled.)")
        if rescued:
            text += (f" (Presence check {presence:.2f}, at or above the model's rescue threshold of {rescue:.2f}: "
                     "its first answer, that the organ is not visible, was decoded again.)")
        if wants_closer and (first.mask_logits or first.boxes):
            with _timed(timings, "closer_look"):
                question = closer_query or self.config.closer_look.query.format(name=_organ_name(first.organ))
                second, info = self._closer_round(prepared, first, round1_query, question)
            tokens += second.tokens
            text = f"{text} {_strip_routing(second.raw_text)}".strip()
            if closer_query is None and self._round_one_rated_higher(first, second):
                info.kept_round = 1
            else:
                masks += [self._mask_prediction(first.organ, self._with_pixel_map(prepared, first.organ, logits), score,
                                                prepared.transform, 2, probabilities)
                          for logits, score in zip(second.mask_logits, second.mask_scores)]
            first.raw_text = f"{first.raw_text} {second.raw_text}"
        absent = not (set(first.tokens) & {SEG_TOKEN, DET_TOKEN}) and says_not_visible(first.raw_text)
        return ChatResult(text=text, raw_text=first.raw_text, routing_tokens=tokens, target_organ=first.organ,
                          absent=absent, masks=masks, boxes=first.boxes, closer_look=info, presence=presence,
                          presence_overruled=overruled, presence_rescued=rescued)

    def _round_one_rated_higher(self, first: _Round, second: _Round) -> bool:
        """``closer_look.keep = "better"``: does the segmenter's IoU head rate round 1's mask above round 2's?"""
        return self.config.closer_look.keep == "better" and round_one_rated_higher(first.mask_scores, second.mask_scores)

    def _recent(self, history: List[Tuple[str, str]]) -> List[Tuple[str, str]]:
        """The earlier turns the LVLM sees: the last ``max_history_turns`` (all when None)."""
        keep = self.config.max_history_turns
        if keep is None:
            return history
        return history[-keep:] if keep else []

    def _routes(self, generation) -> bool:
        """Does the answer carry a [SEG] or [DET] token?"""
        ids = self.model.lvlm.routing_token_ids
        return bool({int(ids[SEG_TOKEN]), int(ids[DET_TOKEN])} & {int(i) for i in generation.new_ids})

    def _presence(self, generation, prepared: _Slice, features, query: str, routed: bool) -> Tuple[Optional[float], Optional[str]]:
        """(probability, organ key) of the organ a presence check reads, when one applies: a [SEG]/[DET]
        answer under ``presence_gate`` (the organ the answer is about), or a "not visible" answer under
        ``presence_rescue`` (the organ the question asks about; see ``_checked_organ``). (None, None)
        otherwise, or when no organ is named.
        ``presence_from`` names the heads: the LVLM's last-layer states at the prompt's image tokens
        (generation step 0), the segmenter's image embedding, the pixel-level network on the model-frame
        image; with several, the geometric mean of their probabilities. ``routed``:
        ``self._routes(generation)``, which the caller has already worked out."""
        lvlm = self.model.lvlm
        text = lvlm.decode(generation.new_ids)
        checked = (self.config.presence_gate is not None if routed
                   else self.config.presence_rescue is not None and says_not_visible(text))
        organ = _checked_organ(text, query, routed) if checked else None
        if organ is None:
            return None, None
        index = get_organ(organ).label - 1
        probabilities = []
        for source in presence_sources(self.config.presence_from):
            if source == "lvlm":
                hidden = generation.step_hidden_states[0][-1]
                image_tokens = (generation.prompt.input_ids == lvlm.image_token_id).to(hidden.device)
                probabilities.append(torch.sigmoid(self.model.presence_head(hidden.float(), image_tokens)[0, index]))
            elif source == "image":
                probabilities.append(torch.sigmoid(self.model.image_presence_head(features.image_embeddings.float())[0, index]))
            else:
                probabilities.append(self._pixel_presence(prepared)[index])
        return float(torch.stack(probabilities).prod() ** (1.0 / len(probabilities))), organ

    def _pixel_probabilities(self, prepared: _Slice) -> torch.Tensor:
        """The pixel network's (NUM_ORGANS + 1, s, s) map of ``prepared``, computed once per image however
        many questions and masks a turn holds."""
        if prepared.pixel_probabilities is None:
            net = self.model.pixel_presence_net
            image = prepared.image[None].to(self.model.device)
            neighbours = None if prepared.neighbours is None else prepared.neighbours[None].to(image.device)
            prepared.pixel_probabilities = net.probabilities(net.inputs(image, neighbours))[0]
        return prepared.pixel_probabilities

    def _pixel_presence(self, prepared: _Slice) -> torch.Tensor:
        """(NUM_ORGANS,) presence probabilities of the pixel network on ``prepared``: the context decision over the
        slice and its neighbours when the model has one (``presence_context``), else the slice's top-k score."""
        if prepared.pixel_presence is None:
            net = self.model.pixel_presence_net
            probabilities = self._pixel_probabilities(prepared)
            context = self.config.presence_context
            if context is None:
                prepared.pixel_presence = net.presence_from_probabilities(probabilities[None])[0]
            else:
                # each neighbour read on its own: the decision was fitted on those maps
                neighbours = (None if prepared.neighbours is None else
                              net.probabilities(net.inputs(prepared.neighbours.to(self.model.device))))
                features = slice_context_features(probabilities, neighbours, net.config.top_k)
                prepared.pixel_presence = context_presence(context, features[None])[0]
        return prepared.pixel_presence

    def _pixel_organ_logits(self, prepared: _Slice, label: int) -> torch.Tensor:
        """(H, W) logits of the pixel network for the organ of ``label`` on the slice (upsampled once per slice:
        both rounds' masks and the closer look's crop blend the same map)."""
        if label not in prepared.pixel_organ_logits:
            probability = self._pixel_probabilities(prepared)[label].float()
            # eps bounds the network's say where it is certain (|logit| <= 13.8)
            prepared.pixel_organ_logits[label] = prepared.transform.mask_to_original(
                torch.logit(probability, eps=1e-6)[None, None])[0]
        return prepared.pixel_organ_logits[label]

    def _with_pixel_map(self, prepared: _Slice, organ: Optional[str], logits: torch.Tensor) -> torch.Tensor:
        """(H, W) mask logits blended with the pixel network's for ``organ`` (``pixel_mask_weight``); unchanged
        without the setting or an organ of the model's (a Closer look on a user's own segment may name anything)."""
        weight = self.config.pixel_mask_weight
        if weight is None or organ is None or self.model.pixel_presence_net is None:
            return logits
        try:
            label = get_organ(organ).label
        except KeyError:
            return logits
        return blend_mask_logits(logits, self._pixel_organ_logits(prepared, label).to(logits), weight)

    @_inference
    def pixel_organ_logits(self, image_hu, organ: str, neighbours_hu=None) -> np.ndarray:
        """(H, W) float32 logits of the model's pixel network for ``organ`` on a slice (what
        ``pixel_mask_weight`` blends into masks), ``neighbours_hu`` as in ``chat``. Raises when the model has no
        pixel network."""
        if self.model.pixel_presence_net is None:
            raise CTReasonerError("this model has no pixel network",
                                  "add one with `ctreasoner fit-presence MODEL DATASET --head pixels`")
        try:
            label = get_organ(organ).label
        except KeyError as error:
            raise CTReasonerError(error.args[0], "name one of the organs listed") from None
        return self._pixel_organ_logits(self._prepare(image_hu, neighbours_hu), label).cpu().numpy()

    def _generate(self, image: torch.Tensor, turns: List[Tuple[str, Optional[str]]], answer_prefix: Sequence[int] = ()):
        lvlm = self.model.lvlm
        return lvlm.generate(lvlm.batch([Conversation(image, turns)]), max_new_tokens=self.max_new_tokens,
                             answer_prefix=answer_prefix)

    def _heads(self, generation, prepared: _Slice, features, query: str, score_threshold: Optional[float]) -> _Round:
        """Run the heads the generated routing tokens ask for, on ``features`` (one image)."""
        lvlm = self.model.lvlm
        raw_text = lvlm.decode(generation.answer_ids)
        id_to_token = {i: t for t, i in lvlm.routing_token_ids.items()}
        tokens = [id_to_token[int(i)] for i in generation.new_ids if int(i) in id_to_token]
        result = _Round(raw_text, tokens, _answer_organ(raw_text, query))
        seg_states = lvlm.generated_routing_states(generation, SEG_TOKEN)
        if len(seg_states):
            logits, scores = self._decode(features, self.model.routing_prompts(seg_states, SEG_TOKEN))
            result.mask_logits = list(prepared.transform.mask_to_original(logits))
            result.mask_scores = scores
        det_states = lvlm.generated_routing_states(generation, DET_TOKEN)
        if len(det_states):
            prompts = self.model.routing_prompts(det_states, DET_TOKEN)
            with self._perception_precision():
                outputs = self.model.detection_head(features, prompts, torch.zeros(len(prompts), dtype=torch.long,
                                                                                    device=prompts.device))
            threshold = self.config.detection.score_threshold if score_threshold is None else score_threshold
            for found in postprocess_detections(outputs, [prepared.transform] * len(prompts), threshold):
                result.boxes += [BoxPrediction(result.organ or "", box, float(score))
                                 for box, score in zip(found["boxes"], found["scores"])]
        return result

    def _fused_boxes(self, prepared: _Slice, features, history: List[Tuple[str, Optional[str]]], located: _Round,
                     score_threshold: Optional[float], answer_prefix: Sequence[int] = ()) -> List[BoxPrediction]:
        """``detection.box_source = "fused"``: segment the organ ``located`` found (with a closer look), then
        rank its mask's component boxes before the detection head's (``box_fusion.fuse_boxes``). When that
        segmentation answers "not visible", the detection boxes stand as they are. ``answer_prefix``: the
        forced opening of a rescued answer (``presence_rescue``), forced on the segmentation answer too."""
        detection, name = self.config.detection, _organ_name(located.organ)
        question = detection.fusion_query.format(name=name)
        segmented = self._heads(self._generate(prepared.image, history + [(question, None)], answer_prefix),
                                prepared, features, question, None)
        if not segmented.mask_logits:
            return located.boxes
        closer, _ = self._closer_round(prepared, segmented, question, self.config.closer_look.query.format(name=name))
        logits = self._with_pixel_map(prepared, located.organ, (closer.mask_logits or segmented.mask_logits)[0].float())
        probability = torch.sigmoid(logits).cpu().numpy()
        from_mask = mask_to_boxes(probability, 0.5, "max_prob")
        weight = detection.fusion_detection_weight
        order = fuse_boxes(from_mask, [(b.xyxy, b.score) for b in located.boxes], weight, detection.fusion_iou)
        threshold = detection.score_threshold if score_threshold is None else score_threshold
        boxes = [BoxPrediction(located.organ, np.asarray(from_mask[i][0], dtype=np.float32), from_mask[i][1], "mask")
                 if source == 0 else BoxPrediction(located.boxes[i].organ, located.boxes[i].xyxy,
                                                   located.boxes[i].score * weight, "detection")
                 for source, i in order]
        return [box for box in boxes if box.score >= threshold]

    def _decode(self, features, prompts: torch.Tensor) -> Tuple[torch.Tensor, List[float]]:
        image_index = torch.zeros(len(prompts), dtype=torch.long, device=prompts.device)
        with self._perception_precision():
            logits, iou = self.model.segmenter.decode(features, prompts[:, None], image_index)
        return logits.float(), [float(v) for v in iou[:, 0]]

    def _closer_round(self, prepared: _Slice, first: _Round, round1_query: str, question: str,
                      roi: Optional[np.ndarray] = None) -> Tuple[_Round, CloserLookInfo]:
        """Round 2 on the ROI around the first round-1 mask as shown (with the pixel prior blended in), the
        segmenter's own mask where that is empty, its best box where both are, or an explicit ``roi``."""
        closer = self.config.closer_look
        height, width = prepared.transform.original_hw
        background = first.mask_logits[0] if first.mask_logits else torch.full((height, width), _OUTSIDE_LOGIT)
        if roi is None:
            region = background > 0
            if first.mask_logits:
                # the crop follows the mask a user sees as round 1: with the prior, that mask is the better guide
                shown = self._with_pixel_map(prepared, first.organ, background.float()) > 0
                region = shown if bool(shown.any()) else region
            if not bool(region.any()) and first.boxes:  # no (or an empty) mask: the best box guides round 2
                region = _box_mask(first.boxes[0].xyxy, (height, width))
            roi = roi_from_mask(region.cpu().numpy(), margin=closer.margin, min_size_px=closer.min_roi)
        if roi is None:  # an empty round-1 mask: nothing to look closer at
            return _Round("", [], first.organ), CloserLookInfo(ran=False, organ=first.organ)
        canonical = self.config.canonical_size
        crop = crop_and_resize(prepared.channels, roi, canonical)
        crop_features = self._features(f"{prepared.key}:roi{[int(v) for v in roi]}:{canonical}", crop)
        turns = [(round1_query, first.raw_text), (question, None)]
        generation = self._generate(crop, turns)
        lvlm = self.model.lvlm
        raw_text = lvlm.decode(generation.new_ids)
        states = lvlm.generated_routing_states(generation, CLOSER_TOKEN)
        generated = len(states) > 0
        if not generated:
            states = self._forced_closer_state(generation)
        logits, scores = self._decode(crop_features, self.model.routing_prompts(states[:1], CLOSER_TOKEN))
        pasted = paste_back(logits[0, 0], roi, (height, width), background=background)
        id_to_token = {i: t for t, i in lvlm.routing_token_ids.items()}
        tokens = [id_to_token[int(i)] for i in generation.new_ids if int(i) in id_to_token]
        second = _Round(raw_text, tokens if generated else tokens + [CLOSER_TOKEN], first.organ, [pasted], scores)
        info = CloserLookInfo(ran=True, roi_xyxy=np.asarray(roi, dtype=np.int64), canonical_size=canonical,
                              organ=first.organ, token_generated=generated)
        return second, info

    def _forced_closer_state(self, generation) -> torch.Tensor:
        """State at a [CLOSER] appended to the round-2 answer (teacher-forced), when generation skipped it."""
        lvlm = self.model.lvlm
        prompt = generation.prompt
        closer_id = torch.tensor([[lvlm.routing_token_ids[CLOSER_TOKEN]]], device=prompt.input_ids.device)
        ids = torch.cat([prompt.input_ids, generation.new_ids[None].to(prompt.input_ids.device), closer_id], dim=1)
        labels = torch.full_like(ids, -100)
        labels[0, -1] = closer_id[0, 0]
        batch = LVLMBatch(ids, torch.ones_like(ids), labels, prompt.image_inputs)
        _, hidden = lvlm(batch)
        return lvlm.routing_states(hidden, batch, CLOSER_TOKEN)[0]

    def _mask_prediction(self, organ: Optional[str], logits: torch.Tensor, score: float, transform: ResizeToSquare,
                         round_: int, probabilities: bool) -> MaskPrediction:
        logits = logits.float().cpu()
        probability = torch.sigmoid(logits)
        return MaskPrediction(organ=organ or "", mask=(logits > 0).numpy(), score=score,
                              probability=probability.numpy() if probabilities else None, round=round_,
                              logits_lowres=self._to_model_frame(logits, transform).numpy())

    def _to_model_frame(self, logits: torch.Tensor, transform: ResizeToSquare) -> torch.Tensor:
        """(H, W) full-resolution logits -> (1, s, s) low-res logits of the model square (SAM's mask prompt)."""
        height, width = transform.original_hw
        side = transform.padded_side
        padded = F.pad(logits[None, None], (0, side - width, 0, side - height), value=_OUTSIDE_LOGIT)
        low = self.model.segmenter.low_res_mask_size
        return F.interpolate(padded, size=(low, low), mode="bilinear", align_corners=False, antialias=True)[0]

    # ---- interactive ----------------------------------------------------------------------------
    @_inference
    def refine(self, image_hu, points: Optional[np.ndarray] = None, labels: Optional[np.ndarray] = None,
               box: Optional[np.ndarray] = None, mask_logits: Optional[np.ndarray] = None,
               prompt_embedding: Optional[np.ndarray] = None, organ: str = "") -> MaskPrediction:
        """Refine a mask with SAM's prompt encoder on the cached embedding.

        points: (P, 2) slice pixel-centre (x, y); labels: (P,) 1 foreground / 0 background.
        box: (4,) slice xyxy. mask_logits: (1, s, s) or (s, s) an earlier ``MaskPrediction.logits_lowres``.
        prompt_embedding: optional (k, 256) routing prompt to keep the text conditioning.
        """
        prepared = self._prepare(image_hu)
        features = self._features(prepared.key, prepared.image)
        device = self.model.device
        transform = prepared.transform
        point_prompt = box_prompt = mask_prompt = None
        if points is not None and len(points):
            points = np.asarray(points, dtype=np.float32).reshape(-1, 2)
            labels = np.ones(len(points)) if labels is None else np.asarray(labels).reshape(-1)
            if len(labels) != len(points):
                raise CTReasonerError(f"{len(points)} points but {len(labels)} labels", "send one label per point")
            coords = transform.to_model_coords(torch.from_numpy(points)).to(device)
            point_prompt = (coords[None], torch.as_tensor(labels, dtype=torch.long, device=device)[None])
        if box is not None:
            box_prompt = transform.boxes_to_model(torch.as_tensor(np.asarray(box, np.float32).reshape(1, 4))).to(device)
        if mask_logits is not None:
            low = self.model.segmenter.low_res_mask_size
            mask_prompt = torch.as_tensor(np.asarray(mask_logits, np.float32)).reshape(1, 1, *np.shape(mask_logits)[-2:])
            mask_prompt = F.interpolate(mask_prompt, size=(low, low), mode="bilinear", align_corners=False).to(device)
        embedding = None
        if prompt_embedding is not None:
            embedding = torch.as_tensor(np.asarray(prompt_embedding, np.float32)).reshape(1, -1, 256).to(device)
        if point_prompt is None and box_prompt is None and mask_prompt is None and embedding is None:
            raise CTReasonerError("refine needs at least one prompt", "send clicks, a box or a previous mask")
        with self._perception_precision():
            logits, iou = self.model.segmenter.decode(features, embedding, torch.zeros(1, dtype=torch.long, device=device),
                                                      points=point_prompt, boxes=box_prompt, mask_inputs=mask_prompt)
        full = transform.mask_to_original(logits.float())[0]
        return self._mask_prediction(organ, full, float(iou[0, 0]), transform, 1, True)

    @_inference
    def closer_look(self, image_hu, roi_xyxy: Optional[np.ndarray] = None, mask: Optional[np.ndarray] = None,
                    organ: Optional[str] = None, query: Optional[str] = None, neighbours_hu=None) -> ChatResult:
        """Round 2 on its own: on ``roi_xyxy``, or on the ROI around ``mask`` (an earlier result), for ``organ``
        (``neighbours_hu`` as in ``chat``)."""
        timings: Dict[str, float] = {}
        with _timed(timings, "total"):
            prepared = self._prepare(image_hu, neighbours_hu)
            height, width = prepared.transform.original_hw
            if roi_xyxy is None and (mask is None or not np.asarray(mask).any()):
                raise CTReasonerError("a closer look needs a region", "segment the organ first or draw an ROI")
            name = _organ_name(organ)
            question = query or self.config.closer_look.query.format(name=name)
            background = torch.full((height, width), _OUTSIDE_LOGIT)
            if mask is not None:
                background = torch.where(torch.as_tensor(np.asarray(mask, bool)), 5.0, _OUTSIDE_LOGIT)
            roi = None
            if roi_xyxy is not None:
                roi = np.clip(np.asarray(roi_xyxy, dtype=np.int64).reshape(4), 0, [width, height, width, height])
                if roi[2] <= roi[0] or roi[3] <= roi[1]:
                    raise CTReasonerError(f"the ROI {roi.tolist()} is empty inside the slice", "draw the ROI on the slice")
            first = _Round(f"The {name} {SEG_TOKEN}", [SEG_TOKEN], organ, [background], [1.0])
            with _timed(timings, "closer_look"):
                second, info = self._closer_round(prepared, first, f"Segment the {name}.", question, roi)
            masks = [self._mask_prediction(organ, self._with_pixel_map(prepared, organ, logits), score,
                                           prepared.transform, 2, True)
                     for logits, score in zip(second.mask_logits, second.mask_scores)]
        return ChatResult(text=_strip_routing(second.raw_text), raw_text=second.raw_text, routing_tokens=second.tokens,
                          target_organ=organ, masks=masks, closer_look=info, timings_ms=timings)


def round_one_rated_higher(first_scores: Sequence[float], second_scores: Sequence[float]) -> bool:
    """The ``closer_look.keep = "better"`` rule: round 1's first mask has the higher IoU-head score (a tie goes
    to the closer look)."""
    return bool(first_scores) and bool(second_scores) and first_scores[0] > second_scores[0]


def _organ_name(organ: Optional[str]) -> str:
    try:
        return get_organ(organ).name if organ else "target"
    except KeyError:
        return str(organ)


def _answer_organ(raw_text: str, query: str) -> Optional[str]:
    """The organ an answer is about: the one it names, else the one the question names."""
    return resolve_organ(_strip_routing(raw_text)) or resolve_organ(query)


def _checked_organ(raw_text: str, query: str, routed: bool) -> Optional[str]:
    """The organ a presence check reads: for a routed answer the one it is about (the gate overrules what
    the heads would draw); for a "not visible" answer the one the question asks about (a rescue must answer
    the question, even when the model's refusal named another organ)."""
    return _answer_organ(raw_text, query) if routed else resolve_organ(query) or _answer_organ(raw_text, query)


def _no_answer_note(query: str) -> str:
    """Shown (never added to the history) when the model answers a question with nothing at all: usually a
    structure outside its 14 organs, or a request it cannot parse."""
    organ = resolve_organ(query)
    if organ is None:
        known = ", ".join(entry.name for entry in ORGANS)
        return (f"No answer. This model knows {len(ORGANS)} abdominal structures ({known}); ask about one of them, "
                "e.g. \"Segment the liver.\"")
    name = _organ_name(organ)
    return (f"No answer about the {name}: the request was not understood. Ask for a mask (\"Segment the {name}.\") "
            f"or a location (\"Where is the {name}?\").")


def _strip_routing(text: str) -> str:
    for token in ROUTING_TOKENS:
        text = text.replace(token, "")
    return " ".join(text.split())


def _box_mask(xyxy, hw: Tuple[int, int]) -> torch.Tensor:
    mask = torch.zeros(hw, dtype=torch.bool)
    x0, y0, x1, y1 = (int(round(float(v))) for v in xyxy)
    mask[max(y0, 0):max(y1, y0 + 1), max(x0, 0):max(x1, x0 + 1)] = True
    return mask


def _checked_history(history) -> List[Tuple[str, str]]:
    """``history`` as (question, answer) string pairs, or a clear error naming the bad entry."""
    if not isinstance(history, (list, tuple)):
        raise CTReasonerError(f"the history must be a list of (question, answer) pairs, got {type(history).__name__}",
                              "pass the earlier turns, e.g. history += result.history_turns(question)")
    for index, turn in enumerate(history):
        if not (isinstance(turn, (tuple, list)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise CTReasonerError(f"history[{index}] is not a (question, answer) pair of strings: {turn!r:.80}",
                                  "pass the earlier turns, e.g. history += result.history_turns(question)")
    return [(question, answer) for question, answer in history]


def _merge(results: List[ChatResult]) -> ChatResult:
    """One result for a compound request: texts joined, masks and boxes of every part."""
    ran = [r.closer_look for r in results if r.closer_look.ran]
    return ChatResult(
        presence_overruled=any(r.presence_overruled for r in results),
        text=" ".join(r.text for r in results), raw_text=" ".join(r.raw_text for r in results),
        routing_tokens=[t for r in results for t in r.routing_tokens], target_organ=results[0].target_organ,
        absent=all(r.absent for r in results), masks=[m for r in results for m in r.masks],
        boxes=[b for r in results for b in r.boxes], closer_look=ran[0] if ran else CloserLookInfo(ran=False))


@contextmanager
def _timed(timings: Dict[str, float], stage: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - start) * 1000.0
