"""CTReasonerPipeline on random-init tiny models: well-formed results for zero, one and several routing
tokens, absent targets, the closer look (generated and forced [CLOSER]), compound requests, the embedding
cache, interactive refinement, and the query helpers. Generation is steered with a logits processor
where a test needs particular tokens; everything after generation runs for real."""
from __future__ import annotations

import json
import numpy as np
import pytest
import torch

from fixtures_lvlm import script
from fixtures_model import disc_sample, tiny_model_config
from CTReasonerLib.errors import CTReasonerError
from CTReasonerLib.model.query import (find_organs, normalize_query, resolve_organ, says_not_visible,
                                       split_compound_query)
from CTReasonerLib.organs import get_organ
from CTReasonerLib.results import ChatResult, MaskPrediction


@pytest.fixture(scope="module")
def model():
    from CTReasonerLib.model.ctreasoner import CTReasonerModel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    return CTReasonerModel.build_tiny(tiny_model_config()).eval()


@pytest.fixture
def pipeline(model):
    from CTReasonerLib.model.inference import CTReasonerPipeline

    return CTReasonerPipeline(model, max_new_tokens=6)


@pytest.fixture
def slice_hu():
    return disc_sample("seg", size=90).image_hu[:, :70]  # not square: exercises the padding


def bright_round_one(pipeline, monkeypatch):
    """Round-1 masks become a disc (so a closer look has a region); later decodes run unchanged."""
    original = pipeline._decode
    calls = []

    def decode(features, prompts):
        logits, scores = original(features, prompts)
        if not calls:
            side = logits.shape[-1]
            yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
            disc = ((yy - side * 0.35) ** 2 + (xx - side * 0.45) ** 2) < (side * 0.12) ** 2
            logits = torch.where(disc, 8.0, -8.0).expand_as(logits).clone()
        calls.append(1)
        return logits, scores

    monkeypatch.setattr(pipeline, "_decode", decode)


def test_random_model_gives_a_well_formed_text_only_answer(pipeline, slice_hu):
    result = pipeline.chat(slice_hu, "Segment the liver.")
    assert isinstance(result, ChatResult) and isinstance(result.text, str)
    tokens = [t for t in result.routing_tokens if t in ("[SEG]", "[DET]")]
    assert len(result.masks) == tokens.count("[SEG]") and (tokens or not result.boxes)
    assert result.target_organ == "liver"  # from the query when the text names no organ
    assert {"prepare", "image_encoder", "generate", "heads", "total"} <= set(result.timings_ms)


def test_seg_token_gives_a_full_resolution_mask(pipeline, slice_hu, monkeypatch):
    script(pipeline, monkeypatch, "The spleen is here. [SEG]")
    result = pipeline.chat(slice_hu, "Segment the liver.", closer_look=False)
    assert result.routing_tokens == ["[SEG]"] and "[SEG]" not in result.text and "[SEG]" in result.raw_text
    assert result.target_organ == "spleen"  # the generated text wins over the query
    (mask,) = result.masks
    assert mask.mask.shape == slice_hu.shape and mask.mask.dtype == bool and mask.round == 1
    assert mask.probability.shape == slice_hu.shape and 0 <= mask.probability.min() <= mask.probability.max() <= 1
    assert np.array_equal(mask.mask, mask.probability > 0.5)
    side = pipeline.model.segmenter.low_res_mask_size
    assert mask.logits_lowres.shape == (1, side, side) and mask.organ == "spleen" and not result.absent


def test_several_tokens_are_all_handled(pipeline, slice_hu, monkeypatch):
    script(pipeline, monkeypatch, "The liver [SEG] and again [SEG] then boxes [DET]")
    result = pipeline.chat(slice_hu, "Segment the liver.", closer_look=False, score_threshold=0.0)
    assert result.routing_tokens == ["[SEG]", "[SEG]", "[DET]"] and len(result.masks) == 2
    queries = pipeline.config.detection.num_queries
    assert 0 < len(result.boxes) <= queries
    height, width = slice_hu.shape
    for box in result.boxes:
        x0, y0, x1, y1 = box.xyxy
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height and 0 <= box.score <= 1
    scores = [b.score for b in result.boxes]
    assert scores == sorted(scores, reverse=True)


def disc_masks(pipeline, monkeypatch):
    """Every mask decode returns a disc in its own frame (the slice, or a closer-look crop)."""
    original = pipeline._decode

    def decode(features, prompts):
        logits, scores = original(features, prompts)
        side = logits.shape[-1]
        yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        disc = ((yy - side * 0.35) ** 2 + (xx - side * 0.45) ** 2) < (side * 0.12) ** 2
        return torch.where(disc, 8.0, -8.0).expand_as(logits).clone(), scores

    monkeypatch.setattr(pipeline, "_decode", decode)


def test_fused_boxes_rank_the_organs_mask_components_before_the_detection_head(pipeline, slice_hu, monkeypatch):
    from torchvision.ops import box_iou

    disc_masks(pipeline, monkeypatch)
    script(pipeline, monkeypatch, "The liver [DET]", "The liver [DET]", "The liver [SEG]", "Zooming in. [CLOSER]")
    alone = pipeline.chat(slice_hu, "Where is the liver?", score_threshold=0.0, box_source="detection")
    fused = pipeline.chat(slice_hu, "Where is the liver?", score_threshold=0.0, box_source="fused")
    assert alone.boxes and {b.source for b in alone.boxes} == {"detection"}
    assert fused.routing_tokens == ["[DET]"] and not fused.masks  # the mask pass only places boxes
    assert [b.source for b in fused.boxes][:1] == ["mask"] and "mask_boxes" in fused.timings_ms
    from_mask = [b for b in fused.boxes if b.source == "mask"]
    from_head = [b for b in fused.boxes if b.source == "detection"]
    assert fused.boxes == from_mask + from_head  # every mask box outranks the head's (scores x 0.5 <= 0.5)
    weight = pipeline.config.detection.fusion_detection_weight
    head_scores = {tuple(np.round(b.xyxy, 3)): b.score for b in alone.boxes}
    for box in from_head:
        assert box.score == pytest.approx(weight * head_scores[tuple(np.round(box.xyxy, 3))], rel=1e-6)
    # a head box left out overlaps a kept box that outranks it (a mask box, or a better head box) by IoU > 0.5
    kept_head = {tuple(np.round(f.xyxy, 3)) for f in from_head}
    for box in alone.boxes:
        if tuple(np.round(box.xyxy, 3)) in kept_head:
            continue
        better = [b.xyxy for b in fused.boxes if b.source == "mask" or b.score > weight * box.score]
        overlap = box_iou(torch.as_tensor(np.asarray(box.xyxy, np.float64)[None]),
                          torch.as_tensor(np.array(better, dtype=np.float64)))
        assert overlap.max() > pipeline.config.detection.fusion_iou
    x0, y0, x1, y1 = from_mask[0].xyxy
    assert 0 <= x0 < x1 <= slice_hu.shape[1] and 0 <= y0 < y1 <= slice_hu.shape[0] and from_mask[0].score > 0.99


def test_fused_boxes_keep_the_detection_boxes_when_the_mask_pass_finds_nothing(pipeline, slice_hu, monkeypatch):
    script(pipeline, monkeypatch, "The liver [DET]", "The liver [DET]", "The liver is not visible on this slice.")
    alone = pipeline.chat(slice_hu, "Where is the liver?", score_threshold=0.0, box_source="detection")
    fused = pipeline.chat(slice_hu, "Where is the liver?", score_threshold=0.0, box_source="fused")
    assert [(b.xyxy.tolist(), b.score, b.source) for b in fused.boxes] == \
        [(b.xyxy.tolist(), b.score, b.source) for b in alone.boxes]


def test_box_source_is_checked(pipeline):
    from CTReasonerLib.errors import ConfigError
    from CTReasonerLib.model.detection import DetectionHeadConfig

    with pytest.raises(CTReasonerError, match="box_source must be one of"):
        pipeline.chat(np.zeros((8, 8)), "Where is the liver?", box_source="boxes")
    with pytest.raises(ConfigError, match="box_source"):
        DetectionHeadConfig.from_dict({"box_source": "mask"})
    with pytest.raises(ConfigError, match="does not name the organ"):
        DetectionHeadConfig(fusion_query="Segment it.")


def test_presence_gate_overrules_a_routed_answer_below_it(pipeline, slice_hu, monkeypatch):
    from CTReasonerLib.model.lvlm import Conversation

    monkeypatch.setattr(pipeline.config, "presence_gate", 1.0)  # every probability is below it
    script(pipeline, monkeypatch, "The liver [SEG]", "The liver [SEG]", "The liver is not visible on this slice.",
           "The liver [SEG]")
    result = pipeline.chat(slice_hu, "Segment the liver.", closer_look=True)
    assert result.presence_overruled and result.absent and not result.masks and not result.boxes
    assert result.routing_tokens == [] and not result.closer_look.ran
    assert result.text.startswith("The liver is not visible on this slice. (Presence check ")
    assert "overruled" in result.text and result.target_organ == "liver"
    # the history keeps the plain answer, the form the model was trained on
    assert result.turns == [("Segment the liver.", "The liver is not visible on this slice.")]
    # the probability is the head on the prompt's image-token states (a teacher-forced forward agrees)
    lvlm, model = pipeline.model.lvlm, pipeline.model
    image, _, _ = model.slice_input(slice_hu)
    batch = lvlm.batch([Conversation(image, [("Segment the liver.", None)])])
    with torch.no_grad():
        _, hidden = lvlm(batch)
        expected = torch.sigmoid(model.presence_head(hidden.float(), batch.input_ids == lvlm.image_token_id))[0, 5]
    assert result.presence == pytest.approx(float(expected), abs=1e-4)  # liver = label 6

    monkeypatch.setattr(pipeline.config, "presence_gate", 0.0)   # nothing is below it
    kept = pipeline.chat(slice_hu, "Segment the liver.", closer_look=False)
    assert not kept.presence_overruled and kept.masks and kept.presence == pytest.approx(result.presence, abs=1e-4)
    assert pipeline.chat(slice_hu, "Segment the liver.").presence is None  # an absent answer is not checked
    monkeypatch.setattr(pipeline.config, "presence_gate", None)
    assert pipeline.chat(slice_hu, "Segment the liver.", closer_look=False).presence is None


def test_presence_gate_reads_the_head_presence_from_names(pipeline, slice_hu, monkeypatch):
    model = pipeline.model
    image, _, _ = model.slice_input(slice_hu)
    with torch.no_grad():
        embedding = model.segmenter.encode(image[None]).image_embeddings
        image_probability = float(torch.sigmoid(model.image_presence_head(embedding))[0, 5])   # liver = label 6
    monkeypatch.setattr(pipeline.config, "presence_gate", 0.0)
    script(pipeline, monkeypatch, *["The liver [SEG]"] * 7)   # one answer per chat below
    lvlm_probability = pipeline.chat(slice_hu, "Segment the liver.", closer_look=False).presence
    monkeypatch.setattr(pipeline.config, "presence_from", "image")
    assert pipeline.chat(slice_hu, "Segment the liver.", closer_look=False).presence == pytest.approx(image_probability, abs=1e-4)
    for both in ("both", "lvlm+image", "image+lvlm"):   # "both": the older name
        monkeypatch.setattr(pipeline.config, "presence_from", both)
        presence = pipeline.chat(slice_hu, "Segment the liver.", closer_look=False).presence
        assert presence == pytest.approx((image_probability * lvlm_probability) ** 0.5, abs=1e-4)
    # the image head alone decides: a head sure the liver is absent overrules the routed answer
    monkeypatch.setattr(pipeline.config, "presence_from", "image")
    monkeypatch.setattr(pipeline.config, "presence_gate", 0.5)
    with torch.no_grad():
        bias = model.image_presence_head.evidence[-1].bias
        saved = bias.clone()
        bias.fill_(-30.0)
    try:
        result = pipeline.chat(slice_hu, "Segment the liver.", closer_look=False)
        assert result.presence_overruled and not result.masks and result.presence < 1e-6
        assert result.timings_ms["presence"] >= 0.0   # the check is its own timed stage
        with torch.no_grad():
            bias.fill_(30.0)
        result = pipeline.chat(slice_hu, "Segment the liver.", closer_look=False)
        assert not result.presence_overruled and result.masks and result.presence > 0.999
    finally:
        with torch.no_grad():
            bias.copy_(saved)


def test_generation_continues_after_a_forced_answer_prefix(pipeline, slice_hu):
    lvlm = pipeline.model.lvlm
    prepared = pipeline._prepare(slice_hu)
    free = pipeline._generate(prepared.image, [("Segment the liver.", None)])
    assert len(free.new_ids) >= 3
    prefix = [int(i) for i in free.new_ids[:2]]
    continued = pipeline._generate(prepared.image, [("Segment the liver.", None)], answer_prefix=prefix)
    # greedy decoding: feeding the first two tokens and generating the rest gives the same answer
    assert continued.forced_ids.tolist() == prefix
    assert continued.new_ids.tolist() == free.new_ids[2:].tolist()
    assert continued.answer_ids.tolist() == free.new_ids.tolist()
    assert lvlm.decode(continued.answer_ids) == lvlm.decode(free.new_ids)


def test_presence_rescue_decodes_a_not_visible_answer_again(pipeline, slice_hu, monkeypatch):
    lvlm = pipeline.model.lvlm
    monkeypatch.setattr(pipeline.config, "presence_from", "image")
    monkeypatch.setattr(pipeline.config, "presence_gate", 0.15)
    monkeypatch.setattr(pipeline.config, "presence_rescue", 0.5)
    bias = pipeline.model.image_presence_head.evidence[-1].bias
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            bias.fill_(30.0)    # the image head is sure every organ is present
        prefixes = script(pipeline, monkeypatch, "The liver is not visible on this slice.", " in the right abdomen. [SEG]")
        result = pipeline.chat(slice_hu, "Segment the liver.", closer_look=False)
        assert prefixes == ["", "The liver is seen"]
        assert result.presence_rescued and not result.presence_overruled and not result.absent
        assert result.routing_tokens == ["[SEG]"] and len(result.masks) == 1 and result.presence > 0.999
        assert result.raw_text.startswith("The liver is seen") and "decoded again" in result.text
        assert result.history_turns("Segment the liver.")[0][1].startswith("The liver is seen")

        # a refusal that names another organ: the rescue answers the question's organ
        prefixes = script(pipeline, monkeypatch, "The spleen is not visible on this slice.", " here. [SEG]")
        result = pipeline.chat(slice_hu, "Segment the liver.", closer_look=False)
        assert prefixes == ["", "The liver is seen"] and result.presence_rescued and result.target_organ == "liver"

        # the model still will not route after the forced opening: its first answer stands
        prefixes = script(pipeline, monkeypatch, "The liver is not visible on this slice.", " not visible on this slice.")
        result = pipeline.chat(slice_hu, "Segment the liver.", closer_look=False)
        assert len(prefixes) == 2 and not result.presence_rescued and result.absent and not result.masks
        assert result.raw_text == "The liver is not visible on this slice."

        # a head sure the organ is absent: no second decode
        with torch.no_grad():
            bias.fill_(-30.0)
        prefixes = script(pipeline, monkeypatch, "The liver is not visible on this slice.")
        result = pipeline.chat(slice_hu, "Segment the liver.", closer_look=False)
        assert prefixes == [""] and result.absent and not result.presence_rescued and result.presence < 1e-6

        # rescue off: a "not visible" answer is not checked at all
        monkeypatch.setattr(pipeline.config, "presence_rescue", None)
        script(pipeline, monkeypatch, "The liver is not visible on this slice.")
        result = pipeline.chat(slice_hu, "Segment the liver.", closer_look=False)
        assert result.absent and result.presence is None and not result.presence_rescued
    finally:
        with torch.no_grad():
            bias.copy_(saved)


def test_presence_gate_config_is_checked():
    from CTReasonerLib.errors import ConfigError
    from CTReasonerLib.model.config import CTReasonerConfig

    with pytest.raises(ConfigError, match=r"presence_gate must be a probability"):
        CTReasonerConfig.from_dict({"presence_gate": 1.5, "loss": {"presence": 1.0}})
    with pytest.raises(ConfigError, match=r"loss.presence > 0"):
        CTReasonerConfig.from_dict({"presence_gate": 0.25})
    assert CTReasonerConfig.from_dict({"presence_gate": 0.25, "loss": {"presence": 1.0}}).presence_gate == 0.25
    for wrong in ("text", "image+text", "image+image", "", "+"):
        with pytest.raises(ConfigError, match=r"presence_from must name one or more of"):
            CTReasonerConfig.from_dict({"presence_from": wrong})
    assert CTReasonerConfig.from_dict({"presence_from": "lvlm+image"}).presence_from == "lvlm+image"
    with pytest.raises(ConfigError, match=r"no pixel_presence network"):
        CTReasonerConfig.from_dict({"presence_from": "image+pixels"})
    with_pixels = CTReasonerConfig.from_dict({"presence_from": "pixels", "pixel_presence": {"top_k": 2}})
    assert (with_pixels.pixel_presence.top_k, with_pixels.pixel_presence.image_size) == (2, 128)
    assert CTReasonerConfig.from_dict(json.loads(json.dumps(with_pixels.to_dict()))) == with_pixels   # JSON round trip
    with pytest.raises(ConfigError, match=r"pixel_presence.image_size must be a multiple of 16"):
        CTReasonerConfig.from_dict({"pixel_presence": {"image_size": 100}})
    with pytest.raises(ConfigError, match=r"unknown model config key\(s\) pixel_presence.depth"):
        CTReasonerConfig.from_dict({"pixel_presence": {"depth": 3}})
    assert CTReasonerConfig().presence_from == "lvlm"   # folders saved before the image head read the LVLM head
    with pytest.raises(ConfigError, match=r"presence_rescue must be a probability"):
        CTReasonerConfig.from_dict({"presence_rescue": -0.5, "loss": {"presence": 1.0}})
    with pytest.raises(ConfigError, match=r"presence_rescue needs a presence head"):
        CTReasonerConfig.from_dict({"presence_rescue": 0.5})
    with pytest.raises(ConfigError, match=r"must be >= presence_gate"):
        CTReasonerConfig.from_dict({"presence_gate": 0.6, "presence_rescue": 0.5, "loss": {"presence": 1.0}})
    with pytest.raises(ConfigError, match=r"visible_answer_prefix must not be empty"):
        CTReasonerConfig.from_dict({"presence_rescue": 0.5, "visible_answer_prefix": " ", "loss": {"presence": 1.0}})
    for bad in ("The {organ} is seen", "The {} is seen", "The {name is seen"):
        with pytest.raises(ConfigError, match=r"may use only the field \{name\}"):
            CTReasonerConfig.from_dict({"visible_answer_prefix": bad})
    assert CTReasonerConfig().presence_rescue is None     # folders saved before the rescue keep their answers


def test_absent_target_gets_no_mask(pipeline, slice_hu, monkeypatch):
    script(pipeline, monkeypatch, "The gallbladder is not visible on this slice.")
    result = pipeline.chat(slice_hu, "Segment the gallbladder.", closer_look=True)
    assert result.absent and not result.masks and not result.boxes and not result.closer_look.ran
    assert result.target_organ == "gallbladder"


@pytest.mark.parametrize("query, expected", [
    ("Segment the brain.", "No answer. This model knows 14 abdominal structures"),
    ("Hello.", "No answer. This model knows 14 abdominal structures"),
    ("Segmentez le foie du patient.", "No answer. This model knows 14 abdominal structures"),
    ("Tell me about the pancreas.", "No answer about the pancreas"),
])
def test_an_empty_answer_tells_the_user_what_to_ask(pipeline, slice_hu, monkeypatch, query, expected):
    script(pipeline, monkeypatch, "")
    result = pipeline.chat(slice_hu, query)
    assert result.raw_text == "" and not result.routing_tokens and not result.masks and not result.absent
    assert result.text.startswith(expected), result.text
    assert result.turns == [(query, "")]  # the note is for the user; the history keeps what the model said
    if "abdominal structures" in expected:
        assert "spleen" in result.text and "duodenum" in result.text


@pytest.mark.parametrize("round_two", ["Zooming in. [CLOSER]", "Zooming in."], ids=["generated", "forced"])
def test_closer_look_crops_the_round_one_mask_and_pastes_back(pipeline, slice_hu, monkeypatch, round_two):
    script(pipeline, monkeypatch, "The liver is here. [SEG]", round_two)
    bright_round_one(pipeline, monkeypatch)
    result = pipeline.chat(slice_hu, "Segment the liver.", closer_look=True)
    info = result.closer_look
    assert info.ran and info.token_generated == ("[CLOSER]" in round_two)
    assert info.canonical_size == pipeline.config.canonical_size and info.organ == "liver"
    assert result.routing_tokens == ["[SEG]", "[CLOSER]"]
    assert [m.round for m in result.masks] == [1, 2]
    first, second = result.masks
    x0, y0, x1, y1 = info.roi_xyxy
    assert 0 <= x0 < x1 <= slice_hu.shape[1] and 0 <= y0 < y1 <= slice_hu.shape[0]
    ys, xs = np.nonzero(first.mask)  # the ROI holds the whole round-1 mask
    assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
    outside = np.ones_like(first.mask)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(second.mask[outside], first.mask[outside])  # pasted only inside the ROI
    assert "Zooming in." in result.text


def rate_rounds(pipeline, monkeypatch, *scores):
    """The segmenter's IoU head rates the next decodes ``scores`` (round 1, round 2, ...)."""
    original = pipeline._decode
    queue = list(scores)

    def decode(features, prompts):
        logits, rated = original(features, prompts)
        return logits, [queue.pop(0)] * len(rated) if queue else rated

    monkeypatch.setattr(pipeline, "_decode", decode)


@pytest.mark.parametrize("keep, scores, kept_round", [
    ("last", (0.9, 0.2), 2),     # the paper: round 2 always replaces round 1
    ("better", (0.9, 0.2), 1),   # round 1 rated higher: its mask stays final, round 2's is dropped
    ("better", (0.4, 0.7), 2),
    ("better", (0.5, 0.5), 2),   # a tie goes to the closer look
])
def test_closer_look_keeps_the_round_the_config_asks_for(pipeline, slice_hu, monkeypatch, keep, scores, kept_round):
    monkeypatch.setattr(pipeline.config.closer_look, "keep", keep)
    script(pipeline, monkeypatch, "The liver is here. [SEG]", "Zooming in. [CLOSER]")
    bright_round_one(pipeline, monkeypatch)
    rate_rounds(pipeline, monkeypatch, *scores)
    result = pipeline.chat(slice_hu, "Segment the liver.", closer_look=True)
    assert result.closer_look.ran and result.closer_look.kept_round == kept_round
    assert [m.round for m in result.masks] == [1, 2][:kept_round]
    assert [m.score for m in result.masks] == pytest.approx(list(scores[:kept_round]))
    assert result.routing_tokens == ["[SEG]", "[CLOSER]"] and "Zooming in." in result.text


def test_a_closer_look_the_user_asks_for_always_ends_with_round_two(pipeline, slice_hu, monkeypatch):
    monkeypatch.setattr(pipeline.config.closer_look, "keep", "better")
    script(pipeline, monkeypatch, "The liver [SEG]", "Zooming in. [CLOSER]")
    bright_round_one(pipeline, monkeypatch)
    rate_rounds(pipeline, monkeypatch, 0.9, 0.2)
    result = pipeline.chat(slice_hu, "Have a closer look at the liver.", [("Segment the liver.", "The liver [SEG]")])
    assert result.closer_look.ran and result.closer_look.kept_round == 2 and result.masks[-1].round == 2


@pytest.fixture(scope="module")
def pixel_model():
    """The tiny model with a (random) pixel network, whose organ map the masks can blend in."""
    from CTReasonerLib.model.ctreasoner import CTReasonerModel
    from CTReasonerLib.model.pixel_presence import PixelPresenceConfig

    torch.manual_seed(0)
    config = tiny_model_config()
    config.pixel_presence = PixelPresenceConfig(image_size=32, features=(4, 4, 8, 8, 8, 4), top_k=3)
    return CTReasonerModel.build_tiny(config).eval()


def _logit(probability: np.ndarray) -> np.ndarray:
    probability = probability.astype(np.float64)
    return np.log(probability / (1.0 - probability))


def test_pixel_mask_weight_blends_the_pixel_networks_organ_logit_into_every_shown_mask(pixel_model, slice_hu, monkeypatch):
    from CTReasonerLib.model.image_processing import mask_to_original
    from CTReasonerLib.model.inference import CTReasonerPipeline

    pipeline = CTReasonerPipeline(pixel_model, max_new_tokens=6)
    monkeypatch.setattr(pipeline.config.closer_look, "keep", "last")
    script(pipeline, monkeypatch, "The spleen is here. [SEG]", "Zooming in. [CLOSER]",
           "The spleen is here. [SEG]", "Zooming in. [CLOSER]")
    bright_round_one(pipeline, monkeypatch)
    plain = pipeline.chat(slice_hu, "Segment the liver.", closer_look=True, return_probabilities=True)
    monkeypatch.setattr(pipeline.config, "pixel_mask_weight", 0.4)
    bright_round_one(pipeline, monkeypatch)
    blended = pipeline.chat(slice_hu, "Segment the liver.", closer_look=True, return_probabilities=True)
    assert [m.round for m in blended.masks] == [m.round for m in plain.masks] == [1, 2]
    image, _, _ = pixel_model.slice_input(slice_hu)
    with torch.no_grad():
        spleen = pixel_model.pixel_presence_net.probabilities(image[None])[0, get_organ("spleen").label]   # the answer's organ
    organ_logit = mask_to_original(torch.logit(spleen, eps=1e-6)[None, None], slice_hu.shape)[0].double().numpy()
    # a weak prior leaves round 1's mask, hence the crop, as it was; so round 2's logits can be compared too
    assert blended.closer_look.roi_xyxy.tolist() == plain.closer_look.roi_xyxy.tolist()
    for before, after in zip(plain.masks, blended.masks):
        expected = 0.6 * _logit(before.probability) + 0.4 * organ_logit
        moderate = np.abs(expected) < 8     # where float32 probabilities still resolve the logit
        assert moderate.mean() > 0.5
        assert np.allclose(_logit(after.probability)[moderate], expected[moderate], atol=2e-3)
        assert np.array_equal(after.mask, after.probability > 0.5)


def test_closer_look_crops_around_the_round_one_mask_the_user_sees(pixel_model, slice_hu, monkeypatch):
    """With the pixel prior, round 2's ROI follows round 1's blended mask; where that is empty, the segmenter's."""
    from CTReasonerLib.model.closer_look import roi_from_mask
    from CTReasonerLib.model.inference import CTReasonerPipeline

    pipeline = CTReasonerPipeline(pixel_model, max_new_tokens=6)
    square = np.zeros(slice_hu.shape, bool)
    square[55:70, 40:58] = True            # away from bright_round_one's disc
    organ_map = {"logits": torch.from_numpy(np.where(square, 20.0, -20.0)).float()}
    monkeypatch.setattr(pipeline, "_pixel_organ_logits", lambda prepared, label: organ_map["logits"])
    closer = pipeline.config.closer_look

    def ask(weight):
        monkeypatch.setattr(pipeline.config, "pixel_mask_weight", weight)
        script(pipeline, monkeypatch, "The liver is here. [SEG]", "Zooming in. [CLOSER]")
        bright_round_one(pipeline, monkeypatch)
        return pipeline.chat(slice_hu, "Segment the liver.", closer_look=True)

    plain = ask(None)
    disc = plain.masks[0].mask
    assert disc.any() and not (disc & square).any()
    assert plain.closer_look.roi_xyxy.tolist() == roi_from_mask(disc, closer.margin, closer.min_roi).tolist()
    blended = ask(0.6)
    assert np.array_equal(blended.masks[0].mask, square)          # what round 1 shows: the prior's square
    assert blended.closer_look.roi_xyxy.tolist() == roi_from_mask(square, closer.margin, closer.min_roi).tolist()
    organ_map["logits"] = torch.full(slice_hu.shape, -20.0)      # the blend shows nothing: the segmenter's mask guides
    empty = ask(0.6)
    assert not empty.masks[0].mask.any()
    assert empty.closer_look.roi_xyxy.tolist() == plain.closer_look.roi_xyxy.tolist()


def test_pixel_mask_weight_leaves_clicks_and_unnamed_organs_to_the_segmenter(pixel_model, slice_hu, monkeypatch):
    from CTReasonerLib.model.inference import CTReasonerPipeline

    pipeline = CTReasonerPipeline(pixel_model, max_new_tokens=6)
    clicks = dict(points=np.array([[30.0, 40.0]]), labels=np.array([1]), organ="liver")
    plain = pipeline.refine(slice_hu, **clicks)
    script(pipeline, monkeypatch, "Here it is. [SEG]", "Here it is. [SEG]")
    unnamed = pipeline.chat(slice_hu, "Segment this.", closer_look=False, return_probabilities=True)
    monkeypatch.setattr(pipeline.config, "pixel_mask_weight", 0.4)
    assert np.array_equal(pipeline.refine(slice_hu, **clicks).probability, plain.probability)
    still = pipeline.chat(slice_hu, "Segment this.", closer_look=False, return_probabilities=True)
    assert unnamed.target_organ is None and np.array_equal(still.masks[0].probability, unnamed.masks[0].probability)
    # a Closer look on a user's own segment: a name outside the model's organs keeps the segmenter's mask
    region = np.zeros(slice_hu.shape, bool)
    region[20:50, 15:45] = True
    closer = pipeline.closer_look(slice_hu, mask=region, organ="tumour")
    monkeypatch.setattr(pipeline.config, "pixel_mask_weight", None)
    assert np.array_equal(pipeline.closer_look(slice_hu, mask=region, organ="tumour").masks[0].probability,
                          closer.masks[0].probability)
    plain_liver = pipeline.closer_look(slice_hu, mask=region, organ="liver").masks[0].probability
    monkeypatch.setattr(pipeline.config, "pixel_mask_weight", 0.4)
    assert not np.array_equal(pipeline.closer_look(slice_hu, mask=region, organ="liver").masks[0].probability, plain_liver)


def test_pixel_mask_weight_is_checked():
    from CTReasonerLib.errors import ConfigError
    from CTReasonerLib.model.config import CTReasonerConfig

    with pytest.raises(ConfigError, match=r"pixel_mask_weight needs the model's pixel_presence network"):
        CTReasonerConfig.from_dict({"pixel_mask_weight": 0.3})
    for wrong in (1.0, -0.1, "half", True):
        with pytest.raises(ConfigError, match=r"pixel_mask_weight must be a weight in \[0, 1\)"):
            CTReasonerConfig.from_dict({"pixel_mask_weight": wrong, "pixel_presence": {}})
    assert CTReasonerConfig.from_dict({"pixel_mask_weight": 0.3, "pixel_presence": {}}).pixel_mask_weight == 0.3
    assert CTReasonerConfig().pixel_mask_weight is None   # folders saved before it show the segmenter's mask


def test_closer_look_keep_is_checked():
    from CTReasonerLib.errors import ConfigError
    from CTReasonerLib.model.config import CTReasonerConfig

    with pytest.raises(ConfigError, match=r"closer_look.keep must be one of \('last', 'better'\)"):
        CTReasonerConfig.from_dict({"closer_look": {"keep": "best"}})
    assert CTReasonerConfig().closer_look.keep == "last"


def test_closer_look_follows_the_users_request_in_a_follow_up_turn(pipeline, slice_hu, monkeypatch):
    script(pipeline, monkeypatch, "The liver [SEG]", "Zooming in. [CLOSER]")
    bright_round_one(pipeline, monkeypatch)
    history = [("Segment the liver.", "The liver is large.")]
    result = pipeline.chat(slice_hu, "Can you have a closer look?", history)
    assert result.closer_look.ran and result.target_organ == "liver"


def test_the_lvlm_sees_the_last_max_history_turns(pipeline, slice_hu, monkeypatch):
    lvlm = pipeline.model.lvlm
    seen = []
    batch = lvlm.batch
    monkeypatch.setattr(lvlm, "batch", lambda conversations: seen.append(conversations[0].turns) or batch(conversations))
    history = [("Segment the spleen.", "The spleen [SEG]"), ("Detect the left kidney.", "The left kidney [DET]"),
               ("Segment the aorta.", "The aorta [SEG]")]
    for keep, expected in ((None, history), (1, history[-1:]), (0, []), (5, history)):
        monkeypatch.setattr(pipeline.config, "max_history_turns", keep)
        seen.clear()
        script(pipeline, monkeypatch, "The liver is not visible on this slice.")
        pipeline.chat(slice_hu, "Segment the liver.", history, closer_look=False)
        assert seen[0] == expected + [("Segment the liver.", None)], keep
    # "have a closer look" still finds the turn it refers to when the LVLM sees no history
    monkeypatch.setattr(pipeline.config, "max_history_turns", 0)
    seen.clear()
    script(pipeline, monkeypatch, "The aorta [SEG]", "Zooming in. [CLOSER]")
    bright_round_one(pipeline, monkeypatch)
    result = pipeline.chat(slice_hu, "Can you have a closer look?", history)
    assert seen[0] == [("Segment the aorta.", None)] and result.closer_look.ran and result.target_organ == "aorta"


def test_max_history_turns_is_checked():
    from CTReasonerLib.errors import ConfigError
    from CTReasonerLib.model.config import CTReasonerConfig

    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match=r"max_history_turns must be a whole number >= 0 or null"):
            CTReasonerConfig.from_dict({"max_history_turns": bad})
    assert CTReasonerConfig().max_history_turns is None      # folders saved before it keep the whole dialogue
    assert CTReasonerConfig.from_dict({"max_history_turns": 0}).max_history_turns == 0


def test_explicit_roi_closer_look(pipeline, slice_hu, monkeypatch):
    script(pipeline, monkeypatch, "Zooming in on the liver. [CLOSER]")
    result = pipeline.closer_look(slice_hu, roi_xyxy=np.array([10, 5, 50, 45]), organ="liver")
    assert result.closer_look.ran and result.closer_look.roi_xyxy.tolist() == [10, 5, 50, 45]
    assert len(result.masks) == 1 and result.masks[0].round == 2 and result.masks[0].mask.shape == slice_hu.shape
    with pytest.raises(CTReasonerError, match="needs a region"):
        pipeline.closer_look(slice_hu)


def test_compound_request_runs_one_turn_per_organ(pipeline, slice_hu, monkeypatch):
    script(pipeline, monkeypatch, "The liver [SEG]", "The right kidney [DET]", "The left kidney [DET]")
    result = pipeline.chat(slice_hu, "segment the liver and detect the kidneys", closer_look=False,
                           score_threshold=0.0)
    assert result.routing_tokens == ["[SEG]", "[DET]", "[DET]"]
    assert [m.organ for m in result.masks] == ["liver"]
    assert {b.organ for b in result.boxes} == {"right_kidney", "left_kidney"}
    # the dialogue history keeps one single-organ turn per part, each with the model's own answer
    assert result.history_turns("segment the liver and detect the kidneys") == [
        ("Segment the liver.", "The liver [SEG]"), ("Detect the right kidney.", "The right kidney [DET]"),
        ("Detect the left kidney.", "The left kidney [DET]")]


def test_typed_questions_reach_the_model_in_the_training_form(pipeline, slice_hu, monkeypatch):
    seen = []
    original = pipeline._generate
    monkeypatch.setattr(pipeline, "_generate", lambda image, turns: seen.append(turns) or original(image, turns))
    script(pipeline, monkeypatch, "The liver [SEG]")
    result = pipeline.chat(slice_hu, "  segment   the liver ", [("detect the spleen", "The spleen [DET]")],
                           closer_look=False)
    assert seen[0] == [("Detect the spleen.", "The spleen [DET]"), ("Segment the liver.", None)]
    assert result.history_turns("segment the liver") == [("Segment the liver.", "The liver [SEG]")]


def test_image_embedding_is_cached_per_slice(pipeline, slice_hu):
    assert pipeline.encode_image(slice_hu) is False
    assert pipeline.encode_image(slice_hu) is True
    hits = pipeline.cache.hits
    pipeline.chat(slice_hu, "Detect the liver.", closer_look=False)
    assert pipeline.cache.hits == hits + 1
    assert pipeline.encode_image(slice_hu + 1) is False


def test_refine_with_clicks_box_and_previous_mask(pipeline, slice_hu):
    first = pipeline.refine(slice_hu, points=np.array([[30.0, 20.0]]), labels=np.array([1]), organ="liver")
    assert isinstance(first, MaskPrediction) and first.mask.shape == slice_hu.shape and first.organ == "liver"
    second = pipeline.refine(slice_hu, points=np.array([[30.0, 20.0], [5.0, 5.0]]), labels=np.array([1, 0]),
                             box=np.array([10, 5, 50, 40]), mask_logits=first.logits_lowres)
    assert second.mask.shape == slice_hu.shape and np.isfinite(second.score)
    with pytest.raises(CTReasonerError):
        pipeline.refine(slice_hu)


def test_bad_inputs_are_clear_errors(pipeline):
    with pytest.raises(CTReasonerError, match="2-D"):
        pipeline.chat(np.zeros((2, 8, 8)), "Segment the liver.")
    with pytest.raises(CTReasonerError, match="empty"):
        pipeline.chat(np.zeros((8, 8)), "  ")
    with pytest.raises(CTReasonerError, match=r"history\[1\] is not a \(question, answer\) pair"):
        pipeline.chat(np.zeros((8, 8)), "Segment the liver.", [("Detect the spleen.", "Here. [DET]"), ("only one",)])
    with pytest.raises(CTReasonerError, match="list of"):
        pipeline.chat(np.zeros((8, 8)), "Segment the liver.", "Detect the spleen.")


def test_query_helpers():
    assert find_organs("segment the kidneys") == ["right_kidney", "left_kidney"]
    assert resolve_organ("The right kidney borders the liver.") == "right_kidney"
    assert resolve_organ("Segment the organ with this role: stores and concentrates bile.") == "gallbladder"
    assert [s.text for s in split_compound_query("segment the liver and detect the adrenal glands")] == [
        "Segment the liver.", "Detect the right adrenal gland.", "Detect the left adrenal gland."]
    assert [s.task for s in split_compound_query("segment the liver, the spleen then box the stomach")] == [
        "seg", "seg", "det"]
    single = "Where is the portal and splenic veins?"
    assert split_compound_query(single)[0].text == single and len(split_compound_query(single)) == 1
    assert says_not_visible("I cannot find the left adrenal gland on this slice.")
    assert normalize_query(" segment  the liver ") == "Segment the liver."
    assert normalize_query("where is the spleen?") == "Where is the spleen?"
    assert normalize_query("") == ""
    assert not says_not_visible("The liver is visible and large.")
