"""The LVLM adapter interface: what the rest of CTReasoner needs from a vision-language backbone.

A backbone (Qwen2.5-VL, Janus, ...) is one subclass of :class:`LVLMAdapter` that knows three things:
how to turn images into the model's vision inputs, how to lay out a conversation as token ids (its chat
format), and which per-sequence tensors its forward needs besides ``input_ids``. Batching, the forward
pass, greedy generation with the KV cache, reading routing-token states, what trains (full / LoRA / frozen)
and saving are shared here.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from CTReasonerLib.errors import ModelError
from CTReasonerLib.model.routing import ROUTING_TOKENS, generation_token_states, routing_token_states

IGNORE_INDEX = -100


@dataclass
class Conversation:
    """One LVLM sequence: an image attached to the first user turn, then the dialogue turns.

    image: (3, H, W) float in [0, 1] (any size; the adapter resizes it to the LVLM image size).
    turns: [(query, answer)]; the answer of the last turn may be None: the sequence then ends with the
        assistant prompt, ready for generation.
    supervised_turns: indices of the turns whose answers carry the LM loss and whose routing tokens are
        read; None = the last turn only (earlier turns are dialogue history).
    """
    image: torch.Tensor
    turns: List[Tuple[str, Optional[str]]]
    supervised_turns: Optional[Sequence[int]] = None

    def supervised(self, turn_index: int) -> bool:
        wanted = self.supervised_turns if self.supervised_turns is not None else [len(self.turns) - 1]
        return turn_index in wanted


@dataclass
class LVLMBatch:
    """Right-padded token ids for B conversations plus their vision inputs.

    input_ids, attention_mask, labels: (B, T); labels hold the ids of supervised answer tokens and -100 elsewhere.
    image_inputs: backbone-specific vision tensors (e.g. Qwen's pixel_values (P, C*t*p*p), image_grid_thw (B, 3)).
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    image_inputs: Dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device, dtype: Optional[torch.dtype] = None) -> "LVLMBatch":
        """On ``device``; floating vision tensors also cast to ``dtype`` (the model's, e.g. bf16 on CUDA)."""
        images = {k: v.to(device, dtype) if (dtype is not None and v.is_floating_point()) else v.to(device)
                  for k, v in self.image_inputs.items()}
        return LVLMBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), images)

    @property
    def answer_ids(self) -> torch.Tensor:
        """(B, T) input ids inside supervised answers, -1 elsewhere: where routing-token states are read."""
        return self.input_ids.masked_fill(self.labels == IGNORE_INDEX, -1)


@dataclass
class Generation:
    """Greedy generation for one prompt.

    new_ids: (L,) generated ids without the final end-of-turn token.
    step_hidden_states: generate()'s per-step hidden states (step 0 = the prompt).
    forced_ids: (F,) answer ids that were fed, not generated (``generate(answer_prefix=...)``); they end
        ``prompt.input_ids`` and come before ``new_ids`` in the answer.
    """
    prompt: LVLMBatch
    new_ids: torch.Tensor
    step_hidden_states: Tuple
    forced_ids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @property
    def answer_ids(self) -> torch.Tensor:
        """(F + L,) the whole answer: forced prefix, then generated ids."""
        return torch.cat([self.forced_ids.to(self.new_ids.device), self.new_ids])


class LVLMAdapter(nn.Module):
    """Wraps a transformers vision-language model and its tokenizer/processor.

    ``model`` is the transformers model (a ``PeftModel`` around it once LoRA is applied); ``processor``
    the object that prepares images (and holds the tokenizer). Subclasses set ``backbone``.
    """

    backbone: str = ""

    def __init__(self, model: nn.Module, processor, image_size: int):
        super().__init__()
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_size = int(image_size)
        self.routing_token_ids: Dict[str, int] = {t: self.tokenizer.convert_tokens_to_ids(t) for t in ROUTING_TOKENS}
        self.trainable_mode = "frozen"

    # ---- backbone-specific -------------------------------------------------------------------
    def image_inputs(self, images: Sequence[torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[int]]:
        """Vision tensors for B images ((3, H, W) in [0, 1]) and the number of placeholder tokens each needs."""
        raise NotImplementedError

    def conversation_ids(self, conversation: Conversation, num_image_tokens: int) -> Tuple[List[int], List[int]]:
        """Token ids of one conversation in the backbone's chat format, and labels (-100 outside supervised answers)."""
        raise NotImplementedError

    def sequence_inputs(self, input_ids: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Extra per-token tensors the forward needs (Qwen2.5-VL: ``mm_token_type_ids``)."""
        return {}

    def suppressed_token_ids(self) -> List[int]:
        """Ids generation must never produce: vision placeholders and padded vocabulary rows."""
        rows = self.model.get_input_embeddings().weight.shape[0]
        return list(range(len(self.tokenizer), rows))

    @property
    def end_of_turn_id(self) -> int:
        return self.tokenizer.eos_token_id

    # ---- shared ------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def encode_text(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def batch(self, conversations: Sequence[Conversation]) -> LVLMBatch:
        """Tokenise and right-pad B conversations; one vision input per conversation."""
        if not conversations:
            raise ValueError("batch() needs at least one conversation")
        image_inputs, image_token_counts = self.image_inputs([c.image for c in conversations])
        encoded = [self.conversation_ids(c, n) for c, n in zip(conversations, image_token_counts)]
        length = max(len(ids) for ids, _ in encoded)
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
        labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for row, (ids, row_labels) in enumerate(encoded):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, :len(ids)] = torch.tensor(row_labels)
            attention_mask[row, :len(ids)] = 1
        return LVLMBatch(input_ids, attention_mask, labels, image_inputs)

    def forward(self, batch: LVLMBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced forward. Returns (logits (B, T, V), last-layer hidden states (B, T, D))."""
        batch = batch.to(self.device, self.dtype)
        outputs = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             **batch.image_inputs, **self.sequence_inputs(batch.input_ids),
                             output_hidden_states=True, use_cache=False)
        return outputs.logits, outputs.hidden_states[-1]

    def routing_states(self, hidden_states: torch.Tensor, batch: LVLMBatch,
                       token: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """States (N, D) and row index (N,) of ``token`` inside the supervised answers of ``batch``."""
        return routing_token_states(hidden_states, batch.answer_ids.to(hidden_states.device),
                                    self.routing_token_ids[token])

    @torch.no_grad()
    def generate(self, prompt: LVLMBatch, max_new_tokens: int = 64, logits_processor=None,
                 answer_prefix: Sequence[int] = ()) -> Generation:
        """Greedy decoding with the KV cache for ONE prompt (B = 1) ending with the assistant prompt.

        logits_processor: optional transformers ``LogitsProcessorList`` (e.g. to force tokens in tests).
        answer_prefix: token ids the answer must start with; they are appended to the prompt and the model
            continues after them (``Generation.forced_ids``); they count towards ``max_new_tokens``.
        """
        if prompt.input_ids.shape[0] != 1:
            raise ValueError(f"generate() takes one prompt at a time, got {prompt.input_ids.shape[0]}")
        forced = torch.tensor(list(answer_prefix), dtype=torch.long)
        if len(forced):
            ids = torch.cat([prompt.input_ids, forced[None].to(prompt.input_ids.device)], dim=1)
            prompt = LVLMBatch(ids, torch.ones_like(ids), torch.cat([prompt.labels, forced[None].to(ids.device)], dim=1),
                               prompt.image_inputs)
        prompt = prompt.to(self.device, self.dtype)
        output = self.model.generate(
            input_ids=prompt.input_ids, attention_mask=prompt.attention_mask,
            **prompt.image_inputs, **self.sequence_inputs(prompt.input_ids),
            max_new_tokens=max(1, max_new_tokens - len(forced)), do_sample=False, num_beams=1,
            eos_token_id=self.end_of_turn_id, pad_token_id=self.tokenizer.pad_token_id,
            suppress_tokens=self.suppressed_token_ids(), logits_processor=logits_processor,
            return_dict_in_generate=True, output_hidden_states=True)
        new_ids = output.sequences[0, prompt.input_ids.shape[1]:]
        ended = (new_ids == self.end_of_turn_id).nonzero(as_tuple=True)[0]
        if len(ended):
            new_ids = new_ids[:int(ended[0])]
        return Generation(prompt, new_ids, output.hidden_states, forced)

    def generated_routing_states(self, generation: Generation, token: str) -> torch.Tensor:
        """States (N, D) of every ``token`` the model generated, in order.

        Read from generation's own hidden states; a token in the last generated position (generation
        stopped by ``max_new_tokens`` right after it) gets its state from one teacher-forced forward over
        prompt + generated ids, which is the same state (see Testing/test_routing.py).
        """
        token_id = self.routing_token_ids[token]
        positions, states = generation_token_states(generation.step_hidden_states, generation.new_ids, token_id)
        if len(states) == len(positions):
            return torch.stack(states) if states else torch.zeros(0, self.hidden_size, device=self.device)
        prompt = generation.prompt
        ids = torch.cat([prompt.input_ids, generation.new_ids[None].to(prompt.input_ids.device)], dim=1)
        full = LVLMBatch(ids, torch.ones_like(ids), torch.full_like(ids, IGNORE_INDEX), prompt.image_inputs)
        _, hidden = self.forward(full)
        start = prompt.input_ids.shape[1]
        return hidden[0, [start + j for j in positions]]

    def decode(self, ids: torch.Tensor) -> str:
        """Text of generated ids, routing tokens kept, other special tokens dropped."""
        keep = set(self.routing_token_ids.values())
        special = set(self.tokenizer.all_special_ids) - keep
        return self.tokenizer.decode([int(i) for i in ids if int(i) not in special])

    # ---- what trains -------------------------------------------------------------------------
    def configure_training(self, mode: str, lora=None) -> None:
        """``"full"``: every LVLM weight trains (the tiny model starts from random init, so LoRA alone
        could not teach it language); ``"lora"``: peft LoRA on the language model's attention projections
        plus the routing-token rows via ``trainable_token_indices`` (``modules_to_save`` would untie the
        tied embedding of the 3B model); ``"frozen"``: nothing trains.
        """
        if mode == "full":
            self.model.requires_grad_(True)
        elif mode == "frozen":
            self.model.requires_grad_(False)
        elif mode == "lora":
            from peft import get_peft_model

            if not hasattr(self.model, "peft_config"):
                self.model = get_peft_model(self.model, self.lora_config(lora))
        else:
            raise ValueError(f"unknown LVLM training mode {mode!r} (full | lora | frozen)")
        self.trainable_mode = mode

    def lora_config(self, lora):
        from peft import LoraConfig

        return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules,
                          trainable_token_indices={"embed_tokens": sorted(self.routing_token_ids.values())})

    # ---- persistence -------------------------------------------------------------------------
    def save_pretrained(self, directory: str) -> None:
        """Full / frozen: the whole model + processor under ``directory``. LoRA: the peft adapter only
        (the base model is the user's folder, recorded in the CTReasoner config)."""
        os.makedirs(directory, exist_ok=True)
        self.processor.save_pretrained(directory)
        self.model.save_pretrained(directory)
        with open(os.path.join(directory, "ctreasoner_lvlm.json"), "w") as handle:
            json.dump({"backbone": self.backbone, "image_size": self.image_size, "trainable": self.trainable_mode},
                      handle, indent=2)


def check_model_folder(path: str, what: str) -> None:
    """A clear error when a user-supplied model folder is missing (weights are never downloaded)."""
    if not path or not os.path.isdir(path):
        raise ModelError(f"{what} folder not found: {path!r}",
                         "pass a local folder holding config.json and the weights (nothing is downloaded)")
