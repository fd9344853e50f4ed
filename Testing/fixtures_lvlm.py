"""Shared tiny-LVLM fixtures for the language-side tests (test_lvlm, test_routing, test_model, test_inference)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_LVLM_OVERRIDES = dict(tiny_hidden_size=64, tiny_layers=2, tiny_heads=4, tiny_kv_heads=2,
                           tiny_intermediate_size=128, tiny_vision_depth=1, tiny_vision_hidden_size=64,
                           tiny_vision_heads=2, tiny_vision_intermediate_size=128, tokenizer_vocab_size=400)


def tiny_lvlm_config(**overrides):
    from CTReasonerLib.model.config import LVLMConfig

    return LVLMConfig(**{**TINY_LVLM_OVERRIDES, **overrides})


@pytest.fixture(scope="session")
def tiny_qwen():
    """A random-init tiny Qwen2.5-VL adapter (fp32, CPU). Tests must not modify it."""
    import torch

    from CTReasonerLib.model.lvlm import build_lvlm

    torch.set_num_threads(1)
    return build_lvlm(tiny_lvlm_config())


class ForceTokens:
    """Logits processor forcing ``ids[k]`` at generation step k (then free decoding)."""

    def __init__(self, prompt_length: int, ids):
        self.prompt_length = prompt_length
        self.ids = list(ids)

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        if step < len(self.ids):
            scores = scores.clone()
            scores[:] = float("-inf")
            scores[:, self.ids[step]] = 0.0
        return scores


def script(pipeline, monkeypatch, *answers):
    """Make the next generate() calls produce ``answers`` (text with routing tokens; None = free decoding).
    Returns the list of the ``answer_prefix`` texts those calls get, filled as they run."""
    import torch
    from transformers import LogitsProcessorList

    lvlm = pipeline.model.lvlm
    original = lvlm.generate
    queue = list(answers)
    prefixes = []

    def generate(prompt, max_new_tokens=64, logits_processor=None, answer_prefix=()):
        answer = queue.pop(0) if queue else None
        prefixes.append(lvlm.decode(torch.tensor(list(answer_prefix), dtype=torch.long)))
        if answer is None:
            return original(prompt, max_new_tokens=max_new_tokens, logits_processor=logits_processor,
                            answer_prefix=answer_prefix)
        ids = []   # a scripted answer continues after a forced answer_prefix
        for piece in answer.replace("]", "]\0").replace("[", "\0[").split("\0"):
            ids += [lvlm.routing_token_ids[piece]] if piece in lvlm.routing_token_ids else lvlm.encode_text(piece)
        ids.append(lvlm.end_of_turn_id)
        forced = LogitsProcessorList([ForceTokens(prompt.input_ids.shape[1] + len(answer_prefix), ids)])
        return original(prompt, max_new_tokens=len(answer_prefix) + len(ids), logits_processor=forced,
                        answer_prefix=answer_prefix)

    monkeypatch.setattr(lvlm, "generate", generate)
    return prefixes
