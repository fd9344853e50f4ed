"""Routing tokens: one id each, embeddings only ever grow, and the "state at the token" convention holds
between generation and a teacher-forced forward."""
from __future__ import annotations

import pytest
import torch

from fixtures_lvlm import ForceTokens, tiny_qwen  # noqa: F401  (fixture)
from CTReasonerLib.model.routing import ROUTING_TOKENS, add_routing_tokens, routing_token_states


def _tokenizer():
    from CTReasonerLib.model.lvlm.tiny_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer(["segment the liver", "detect the spleen"], vocab_size=300)


class _Embedded(torch.nn.Module):
    """The two methods ``add_routing_tokens`` needs from a transformers model."""

    def __init__(self, rows: int):
        super().__init__()
        self.embed = torch.nn.Embedding(rows, 8)

    def get_input_embeddings(self):
        return self.embed

    def resize_token_embeddings(self, rows, mean_resizing=True):
        old = self.embed
        self.embed = torch.nn.Embedding(rows, 8)
        self.embed.weight.data[:old.num_embeddings] = old.weight.data[:rows]
        return self.embed


def test_each_routing_token_is_one_id_and_adding_is_idempotent():
    tokenizer = _tokenizer()
    ids = add_routing_tokens(tokenizer)
    assert sorted(ids) == sorted(ROUTING_TOKENS) and len(set(ids.values())) == 3
    for token, token_id in ids.items():
        assert tokenizer.encode(f"the liver {token} is", add_special_tokens=False).count(token_id) == 1
    size = len(tokenizer)
    assert add_routing_tokens(tokenizer) == ids and len(tokenizer) == size


def test_padded_vocabulary_is_never_shrunk():
    tokenizer = _tokenizer()
    padded = _Embedded(len(tokenizer) + 100)  # like Qwen2.5-VL's 151936 rows for ~151665 tokens
    kept = padded.embed.weight.detach().clone()
    add_routing_tokens(tokenizer, padded)
    assert padded.embed.num_embeddings == kept.shape[0]
    assert torch.equal(padded.embed.weight, kept)


def test_embeddings_grow_exactly_when_needed():
    tokenizer = _tokenizer()
    small = _Embedded(len(tokenizer))
    ids = add_routing_tokens(tokenizer, small)
    assert small.embed.num_embeddings == max(ids.values()) + 1 == len(tokenizer)


def test_routing_token_states_picks_every_occurrence_in_order():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    ids = torch.tensor([[1, 9, 2, 9, 0], [9, 0, 0, 0, -1]])
    states, rows = routing_token_states(hidden, ids, 9)
    assert rows.tolist() == [0, 0, 1]
    assert torch.equal(states, torch.stack([hidden[0, 1], hidden[0, 3], hidden[1, 0]]))
    empty, empty_rows = routing_token_states(hidden, ids, 7)
    assert empty.shape == (0, 3) and empty_rows.numel() == 0
    with pytest.raises(ValueError):
        routing_token_states(hidden, ids[:, :4], 9)


def _forced_generation(adapter, forced, max_new_tokens):
    from transformers import LogitsProcessorList

    from CTReasonerLib.model.lvlm import Conversation

    prompt = adapter.batch([Conversation(torch.rand(3, 96, 96), [("Segment the liver.", None)])])
    processor = LogitsProcessorList([ForceTokens(prompt.input_ids.shape[1], forced)])
    return adapter.generate(prompt, max_new_tokens=max_new_tokens, logits_processor=processor)


def _teacher_forced_states(adapter, generation, token):
    from CTReasonerLib.model.lvlm import LVLMBatch

    prompt = generation.prompt
    ids = torch.cat([prompt.input_ids, generation.new_ids[None], torch.tensor([[adapter.end_of_turn_id]])], dim=1)
    labels = ids.clone()
    labels[:, :prompt.input_ids.shape[1]] = -100
    batch = LVLMBatch(ids, torch.ones_like(ids), labels, prompt.image_inputs)
    with torch.no_grad():
        _, hidden = adapter(batch)
    return adapter.routing_states(hidden, batch, token)[0]


@pytest.mark.parametrize("routing_last", [False, True], ids=["state-from-generation", "last-token-fallback"])
def test_generation_states_equal_teacher_forced_states(tiny_qwen, routing_last):
    adapter = tiny_qwen
    seg, det = adapter.routing_token_ids["[SEG]"], adapter.routing_token_ids["[DET]"]
    word = adapter.encode_text("liver")[0]
    forced = [word, seg, word, det] + ([] if routing_last else [word, adapter.end_of_turn_id])
    generation = _forced_generation(adapter, forced, max_new_tokens=len(forced))
    assert generation.new_ids.tolist() == [i for i in forced if i != adapter.end_of_turn_id]
    for token in ("[SEG]", "[DET]"):
        generated = adapter.generated_routing_states(generation, token)
        teacher = _teacher_forced_states(adapter, generation, token)
        assert generated.shape == teacher.shape == (1, adapter.hidden_size)
        torch.testing.assert_close(generated, teacher, atol=1e-4, rtol=1e-4)
    assert adapter.generated_routing_states(generation, "[CLOSER]").shape == (0, adapter.hidden_size)
