"""LVLM adapters at tiny size: tokenizer, prompt layout and labels, Qwen2.5-VL vision inputs, generation
constraints, LoRA targets, save/reload, and the Janus backbone."""
from __future__ import annotations

import pytest
import torch

from fixtures_lvlm import tiny_lvlm_config, tiny_qwen  # noqa: F401  (fixture)
from CTReasonerLib.errors import ModelError
from CTReasonerLib.model.lvlm import Conversation, build_lvlm, load_lvlm


def _image():
    return torch.rand(3, 80, 80, generator=torch.Generator().manual_seed(0))


def test_tiny_tokenizer_keeps_qwen_special_tokens_and_encodes_any_text(tiny_qwen):
    tokenizer = tiny_qwen.tokenizer
    for token in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "[SEG]"):
        assert tokenizer.encode(token, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(token)]
    text = "Zygomatic ünïcode 123 [SEG]"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    rows = tiny_qwen.model.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and rows >= len(tokenizer)  # padded like the real model


def test_labels_cover_only_the_supervised_answer(tiny_qwen):
    adapter = tiny_qwen
    conversation = Conversation(_image(), [("Segment the liver.", "The liver is here. [SEG]"),
                                           ("Have a closer look.", "Zooming in. [CLOSER]")])
    batch = adapter.batch([conversation, Conversation(_image(), [("Detect the spleen.", "Spleen [DET]")])])
    first = batch.labels[0][batch.labels[0] != -100]
    assert adapter.tokenizer.decode(first) == "Zooming in. [CLOSER]<|im_end|>"
    second = batch.labels[1][batch.labels[1] != -100]
    assert adapter.tokenizer.decode(second) == "Spleen [DET]<|im_end|>"
    assert batch.attention_mask[1].sum() < batch.attention_mask[0].sum()  # right padding
    assert (batch.answer_ids[0] == adapter.routing_token_ids["[SEG]"]).sum() == 0  # history is not read


def test_image_tokens_and_mm_token_type_ids(tiny_qwen):
    adapter = tiny_qwen
    batch = adapter.batch([Conversation(_image(), [("Segment the liver.", None)])])
    tokens_per_side = adapter.image_size // 14 // 2
    assert (batch.input_ids == adapter.image_token_id).sum() == tokens_per_side ** 2
    extra = adapter.sequence_inputs(batch.input_ids)["mm_token_type_ids"]
    assert torch.equal(extra.bool(), batch.input_ids == adapter.image_token_id)
    # the 3-D (temporal, height, width) positions really are used: dropping the ids changes the states
    with torch.no_grad():
        _, hidden = adapter(batch)
        plain = adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              **batch.image_inputs, output_hidden_states=True).hidden_states[-1]
    assert not torch.allclose(hidden, plain, atol=1e-5)


def test_generation_never_emits_vision_or_padding_ids(tiny_qwen):
    adapter = tiny_qwen
    suppressed = set(adapter.suppressed_token_ids())
    assert set(adapter.vision_token_ids) <= suppressed
    assert len(adapter.tokenizer) in suppressed and max(adapter.routing_token_ids.values()) not in suppressed
    generation = adapter.generate(adapter.batch([Conversation(_image(), [("Segment the liver.", None)])]), 12)
    assert not suppressed & set(generation.new_ids.tolist())
    assert len(generation.step_hidden_states) >= len(generation.new_ids)  # KV-cache steps, one per token


def test_save_and_reload_give_identical_outputs(tiny_qwen, tmp_path):
    batch = tiny_qwen.batch([Conversation(_image(), [("Segment the liver.", "Liver [SEG]")])])
    tiny_qwen.save_pretrained(str(tmp_path))
    reloaded = load_lvlm(tiny_lvlm_config(), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(tiny_qwen(batch)[1], reloaded(batch)[1])
    assert reloaded.routing_token_ids == tiny_qwen.routing_token_ids


def test_lora_targets_only_language_model_attention_and_routing_rows():
    adapter = build_lvlm(tiny_lvlm_config(trainable="lora"))
    adapter.configure_training("lora", tiny_lvlm_config().lora)
    trainable = [name for name, p in adapter.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if "lora_" in n]
    assert lora and all(".language_model." in n and n.split(".")[-4] in ("q_proj", "k_proj", "v_proj", "o_proj")
                        for n in lora)
    others = [n for n in trainable if "lora_" not in n]
    assert others and all("trainable_tokens" in n for n in others)
    rows = adapter.model.get_input_embeddings().token_adapter.token_indices["default"]
    assert sorted(rows) == sorted(adapter.routing_token_ids.values())


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        build_lvlm(tiny_lvlm_config(path=str(tmp_path / "nowhere")))


def test_janus_tiny_forward_generation_states_and_reload(tmp_path):
    adapter = build_lvlm(tiny_lvlm_config(backbone="janus", image_size=64))
    conversation = Conversation(_image(), [("Segment the liver.", "The liver. [SEG]")])
    batch = adapter.batch([conversation])
    assert (batch.input_ids == adapter.image_token_id).sum() == (64 // 16) ** 2
    with torch.no_grad():
        logits, hidden = adapter(batch)
    states, rows = adapter.routing_states(hidden, batch, "[SEG]")
    assert states.shape == (1, adapter.hidden_size) and rows.tolist() == [0]
    assert logits.shape[-1] == adapter.model.get_input_embeddings().weight.shape[0]
    prompt = adapter.batch([Conversation(_image(), [("Segment the liver.", None)])])
    generation = adapter.generate(prompt, 5)
    assert 0 < len(generation.new_ids) <= 5
    # a forced answer opening (the presence rescue's): greedy decoding fed its own first token continues the same
    continued = adapter.generate(prompt, 5, answer_prefix=generation.new_ids[:1].tolist())
    assert continued.answer_ids.tolist() == generation.new_ids.tolist()
    adapter.save_pretrained(str(tmp_path))
    reloaded = load_lvlm(tiny_lvlm_config(backbone="janus", image_size=64), str(tmp_path))
    as_base = build_lvlm(tiny_lvlm_config(backbone="janus", path=str(tmp_path)))  # a local "converted" folder
    with torch.no_grad():
        assert torch.equal(reloaded(batch)[1], hidden) and torch.equal(as_base(batch)[1], hidden)
