"""CTReasonerModel: config round trip, collate, training steps that overfit, every head in every step,
and save_pretrained / from_pretrained equality."""
from __future__ import annotations

import pytest
import torch

from fixtures_model import disc_sample, tiny_model_config
from CTReasonerLib.errors import ConfigError
from CTReasonerLib.model.config import CTReasonerConfig
from CTReasonerLib.model.ctreasoner import CTReasonerModel, dataset_corpus


@pytest.fixture(scope="module")
def samples():
    return [disc_sample("seg", closer=True), disc_sample("det", split=True), disc_sample("absent", "spleen")]


def _model(samples, **lvlm):
    torch.manual_seed(0)
    return CTReasonerModel.build_tiny(tiny_model_config(**lvlm), corpus=dataset_corpus(samples))


def test_config_round_trip_and_validation():
    config = tiny_model_config()
    assert CTReasonerConfig.from_dict(config.to_dict()) == config
    assert CTReasonerConfig().loss.seg == CTReasonerConfig().loss.det == 1.0  # paper: "all equally"
    with pytest.raises(ConfigError, match="unknown model config key"):
        CTReasonerConfig.from_dict({"lvlm": {"hiden_size": 3}})
    with pytest.raises(ConfigError, match="multiple of 28"):
        CTReasonerConfig.from_dict({"lvlm": {"image_size": 100}})


def test_collate_builds_round_two_rows_and_dedupes_images(samples):
    model = _model(samples)
    batch = model.collate(samples + [disc_sample("det", split=True)])
    # 4 round-1 rows + 1 closer-look row; identical slices (the two det ones; the seg and the absent one,
    # which differ only in their question) share one encoded image
    assert batch.is_round2.tolist() == [False, False, False, False, True]
    assert batch.images.shape[0] == 3
    assert batch.sequence_image[1] == batch.sequence_image[3] and batch.sequence_image[0] == batch.sequence_image[2]
    assert batch.sequence_image[4] not in batch.sequence_image[:4]  # the crop is a new image
    assert batch.mask_targets[0].sum() > 0 and batch.mask_targets[2].sum() == 0
    assert len(batch.box_targets[1]) == 2 and len(batch.box_targets[0]) == 0  # a split organ gives 2 boxes
    # the crop's target fills more of the frame than the round-1 target: the zoom is real
    assert batch.mask_targets[4].mean() > 2 * batch.mask_targets[0].mean()


def test_history_is_context_and_only_the_last_question_is_supervised(samples):
    model = _model(samples)
    history = [{"query": "Segment the spleen.", "answer": "The spleen is here. [SEG]"},
               {"query": "Have a closer look.", "answer": "Zooming in. [CLOSER]"}]
    alone, followup = disc_sample("det"), disc_sample("det", history=history)
    batch = model.collate([alone, followup])
    lvlm, ids = batch.lvlm, model.lvlm.routing_token_ids
    assert batch.lvlm.attention_mask[1].sum() > batch.lvlm.attention_mask[0].sum()  # the history is in the prompt
    for token, expected in (("[DET]", 1), ("[SEG]", 0), ("[CLOSER]", 0)):
        assert [(lvlm.answer_ids[row] == ids[token]).sum().item() for row in (0, 1)] == [expected, expected]
    supervised = [lvlm.labels[row][lvlm.labels[row] != -100].tolist() for row in (0, 1)]
    assert supervised[0] == supervised[1]  # the same answer is learned, with or without the history
    assert batch.is_round2.tolist() == [False, False]


def test_closer_look_crops_are_capped_per_batch(samples):
    model = _model(samples)
    closer = [disc_sample("seg", centre=(30 + i, 40), closer=True) for i in range(3)]
    assert int(model.collate(closer).is_round2.sum()) == 3
    model.config.closer_look.train_crops_per_batch = 1
    capped = model.collate(closer)
    assert int(capped.is_round2.sum()) == 1 and capped.images.shape[0] == 3 + 1


def test_auxiliary_heads_read_the_whole_label_map(samples):
    from CTReasonerLib.organs import ORGAN_BY_KEY

    torch.set_num_threads(1)
    model = _model(samples)
    batch = model.collate(samples)
    # images: the seg/absent slice (shared), the det slice, the crop; round-1 slices carry class fractions
    assert batch.organ_valid.tolist() == [True, True, False]
    liver = ORGAN_BY_KEY["liver"].label
    seg_image = int(batch.sequence_image[0])
    fractions = batch.organ_targets[seg_image]
    torch.testing.assert_close(fractions.sum(0), torch.ones_like(fractions[0]))
    assert 0.03 < float(fractions[liver].mean()) < 0.2 and float(fractions[ORGAN_BY_KEY["spleen"].label].sum()) == 0
    assert batch.presence_valid.tolist() == [True, True, True, False]
    assert batch.presence_targets[0, liver - 1] == 1 and batch.presence_targets[0].sum() == 1
    assert batch.presence_targets[2].sum() == 0

    model.config.loss.seg_dense = model.config.loss.presence = 1.0
    model.train()
    out = model.training_step(batch)
    assert out["seg_dense"] > 0 and out["presence"] > 0
    out["loss"].backward()
    for part in (model.dense_head, model.presence_head, model.segmenter.image_encoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    first = (float(out["seg_dense"]), float(out["presence"]))
    for _ in range(10):
        optimizer.step()
        optimizer.zero_grad()
        out = model.training_step(batch)
        out["loss"].backward()
    assert float(out["seg_dense"]) < first[0] and float(out["presence"]) < first[1]

    # presence_from = "both": the image presence head trains in the same loss, from the segmenter's embedding
    model.config.presence_from = "both"
    optimizer.zero_grad()
    model.training_step(batch)["loss"].backward()
    for part in (model.image_presence_head, model.presence_head):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    model.config.presence_from = "lvlm"
    optimizer.zero_grad()
    model.training_step(batch)["loss"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.image_presence_head.parameters())


def test_folders_saved_before_the_auxiliary_heads_still_load(samples, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _model(samples)
    model.save_pretrained(str(tmp_path))
    weights = tmp_path / "perception.safetensors"
    old = {k: v for k, v in load_file(str(weights)).items() if not k.startswith(("dense_head.", "presence_head.", "image_presence_head."))}
    save_file(old, str(weights))
    reloaded = CTReasonerModel.from_pretrained(str(tmp_path), device="cpu")
    torch.testing.assert_close(reloaded.projector[0].weight, model.projector[0].weight)
    del old["projector.0.weight"]
    save_file(old, str(weights))
    with pytest.raises(Exception, match="does not match the model config"):
        CTReasonerModel.from_pretrained(str(tmp_path), device="cpu")


def test_decision_tokens_weigh_more_in_the_lm_loss():
    from CTReasonerLib.model.ctreasoner import IGNORE_INDEX, _lm_loss, decision_token_weights

    ignore = IGNORE_INDEX
    labels = torch.tensor([[ignore, ignore, 5, 6, 7, 99, ignore],     # answer "5 6 7 [SEG]"
                           [ignore, 8, 9, ignore, 10, 11, ignore]])   # two supervised spans, no routing token
    weights = decision_token_weights(labels, [99], 4.0)
    expected = torch.ones(2, 7)
    expected[0, 2] = expected[0, 5] = expected[1, 1] = expected[1, 4] = 4.0
    torch.testing.assert_close(weights, expected)
    assert decision_token_weights(labels, [99], 1.0) is None
    wide = decision_token_weights(labels, [99], 4.0, span=2)
    expected[0, 3] = expected[1, 2] = expected[1, 5] = 4.0  # the second token of each span too
    torch.testing.assert_close(wide, expected)

    torch.manual_seed(0)
    logits = torch.randn(2, 7, 120)
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 120), labels[:, 1:].reshape(-1),
                                                  ignore_index=ignore, reduction="none").reshape(2, 6)
    valid = labels[:, 1:] != ignore
    w = weights[:, 1:] * valid
    torch.testing.assert_close(_lm_loss(logits, labels, weights), (per_token * w).sum() / w.sum())
    torch.testing.assert_close(_lm_loss(logits, labels), per_token[valid].mean())


def test_training_step_overfits_and_every_head_gets_gradients(samples):
    torch.set_num_threads(1)
    model = _model(samples)
    model.train()
    batch = model.collate(samples)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        out = model.training_step(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        if not losses:
            starved = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            assert not starved, starved[:5]
        optimizer.step()
        losses.append({k: float(v.detach()) for k, v in out.items()})
    assert losses[-1]["loss"] < 0.8 * losses[0]["loss"]
    for term in ("lm", "seg_dice", "det_l1"):
        assert losses[-1][term] < losses[0][term], term


def test_heads_take_part_without_their_task(samples):
    model = _model(samples)
    out = model.training_step(model.collate([samples[2]]))  # absent only: no [SEG], no [DET]
    out["loss"].backward()
    assert float(out["seg_bce"]) == 0.0 and float(out["det_l1"]) == 0.0
    assert model.detection_head.query_embed.weight.grad is not None
    assert model.segmenter.mask_decoder.iou_token.weight.grad is not None


def test_save_and_reload_into_a_fresh_model_gives_identical_outputs(samples, tmp_path):
    model = _model(samples).eval()
    batch = model.collate(samples[:2])
    torch.manual_seed(1)
    with torch.no_grad():
        before = {k: float(v) for k, v in model.training_step(batch).items()}
    model.save_pretrained(str(tmp_path))
    reloaded = CTReasonerModel.from_pretrained(str(tmp_path), device="cpu")
    assert reloaded.config == model.config and not reloaded.training
    torch.manual_seed(1)
    with torch.no_grad():
        after = {k: float(v) for k, v in reloaded.training_step(batch).items()}
    assert after == before


def test_lora_checkpoint_stores_only_the_adapter_and_reloads_over_the_base(samples, tmp_path):
    base = _model(samples)
    base_dir = tmp_path / "base"
    base.lvlm.save_pretrained(str(base_dir))
    config = tiny_model_config(path=str(base_dir), trainable="lora")
    model = CTReasonerModel.build(config)
    lora_names = [n for n, p in model.lvlm.named_parameters() if p.requires_grad]
    assert lora_names and all("lora_" in n or "trainable_tokens" in n for n in lora_names)
    with torch.no_grad():  # make the adapter non-trivial
        for name, parameter in model.lvlm.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                parameter.normal_(0, 0.05)
    model.save_pretrained(str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt" / "lvlm" / "model.safetensors").exists()
    assert (tmp_path / "ckpt" / "lvlm" / "adapter_model.safetensors").exists()
    reloaded = CTReasonerModel.from_pretrained(str(tmp_path / "ckpt"), device="cpu")
    batch = model.collate(samples[:1]).lvlm
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.lvlm(batch)[1], reloaded.lvlm(batch)[1])
