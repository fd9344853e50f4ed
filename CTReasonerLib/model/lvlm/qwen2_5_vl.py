"""Qwen2.5-VL adapter: the real 3B model from a local folder, or the tiny model built from a small config.

Prompt layout (Qwen2.5-VL's chat template, rendered piece by piece so answer tokens can be labelled exactly;
training and generation tokenise the same pieces, so their ids agree):

    <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n
    <|im_start|>user\n<|vision_start|><|image_pad|>*n<|vision_end|>{query 1}<|im_end|>\n
    <|im_start|>assistant\n{answer 1}<|im_end|>\n   ... more turns ...
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from CTReasonerLib.model.lvlm.base import IGNORE_INDEX, Conversation, LVLMAdapter, check_model_folder
from CTReasonerLib.model.routing import add_routing_tokens

SYSTEM_PROMPT = "You are a helpful assistant."


class Qwen25VLAdapter(LVLMAdapter):
    backbone = "qwen2_5_vl"

    def __init__(self, model, processor, image_size: int):
        super().__init__(model, processor, image_size)
        ids = self.tokenizer.convert_tokens_to_ids
        self.image_token_id = ids("<|image_pad|>")
        self.vision_token_ids = [ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")]
        self._pieces = {name: self.encode_text(text) for name, text in {
            "system": f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n",
            "user": "<|im_start|>user\n",
            "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>",
            "end_user": "<|im_end|>\n", "assistant": "<|im_start|>assistant\n",
            "end_turn": "<|im_end|>", "newline": "\n"}.items()}
        self._merge = processor.image_processor.merge_size

    def image_inputs(self, images: Sequence[torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[int]]:
        size = self.image_size
        resized = [F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True,
                                 align_corners=False)[0].clamp(0, 1).cpu() for image in images]
        encoded = self.processor.image_processor(images=resized, do_resize=False, do_rescale=False,
                                                 return_tensors="pt")
        grid = encoded["image_grid_thw"]
        counts = (grid.prod(-1) // self._merge ** 2).tolist()
        return {"pixel_values": encoded["pixel_values"], "image_grid_thw": grid}, counts

    def conversation_ids(self, conversation: Conversation, num_image_tokens: int) -> Tuple[List[int], List[int]]:
        p = self._pieces
        ids: List[int] = list(p["system"])
        labels: List[int] = [IGNORE_INDEX] * len(ids)

        def add(piece: List[int], supervised: bool = False) -> None:
            ids.extend(piece)
            labels.extend(piece if supervised else [IGNORE_INDEX] * len(piece))

        for index, (query, answer) in enumerate(conversation.turns):
            add(p["user"])
            if index == 0:
                add(p["vision_start"] + [self.image_token_id] * num_image_tokens + p["vision_end"])
            add(self.encode_text(query) + p["end_user"] + p["assistant"])
            if answer is None:
                if index != len(conversation.turns) - 1:
                    raise ValueError("only the last turn of a conversation may lack an answer")
                break
            supervised = conversation.supervised(index)
            add(self.encode_text(answer) + p["end_turn"], supervised)
            add(p["newline"])
        return ids, labels

    def sequence_inputs(self, input_ids: torch.Tensor) -> Dict[str, torch.Tensor]:
        # Without mm_token_type_ids Qwen2.5-VL silently falls back to 1-D positions for the image tokens.
        return {"mm_token_type_ids": (input_ids == self.image_token_id).int()}

    def suppressed_token_ids(self) -> List[int]:
        return self.vision_token_ids + super().suppressed_token_ids()


def tiny_qwen_config(lvlm_config, tokenizer):
    """A small ``Qwen2_5_VLConfig`` (vocabulary = our tokenizer, padded to a multiple of 64 like the real one)."""
    from transformers import Qwen2_5_VLConfig

    c = lvlm_config
    head_dim = c.tiny_hidden_size // c.tiny_heads
    half = head_dim // 2
    temporal = half - 2 * (3 * half // 8)
    mrope_section = [temporal, 3 * half // 8, 3 * half // 8]  # sums to head_dim / 2, as Qwen's [16, 24, 24]
    ids = tokenizer.convert_tokens_to_ids
    vocab = -(-len(tokenizer) // 64) * 64
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=c.tiny_hidden_size, intermediate_size=c.tiny_intermediate_size,
            num_hidden_layers=c.tiny_layers, num_attention_heads=c.tiny_heads, num_key_value_heads=c.tiny_kv_heads,
            max_position_embeddings=2048, rope_parameters={"rope_type": "default", "mrope_section": mrope_section,
                                                           "rope_theta": 10000.0},
            bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(
            depth=c.tiny_vision_depth, hidden_size=c.tiny_vision_hidden_size,
            intermediate_size=c.tiny_vision_intermediate_size, num_heads=c.tiny_vision_heads,
            out_hidden_size=c.tiny_hidden_size, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
            window_size=c.image_size, fullatt_block_indexes=[c.tiny_vision_depth - 1]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True)


def build_processor(tokenizer, image_size: int):
    """Qwen2_5_VLProcessor around our tokenizer; it requires a video processor object even for images."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    pixels = image_size * image_size
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels),
                               tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor())


def build_tiny_qwen(lvlm_config, corpus: Optional[Iterable[str]] = None, seed: int = 0) -> Qwen25VLAdapter:
    """Random-init tiny Qwen2.5-VL with our BPE tokenizer trained on ``corpus`` (routing tokens included)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from CTReasonerLib.model.lvlm.tiny_tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(corpus, vocab_size=lvlm_config.tokenizer_vocab_size)
    add_routing_tokens(tokenizer)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen_config(lvlm_config, tokenizer))
    add_routing_tokens(tokenizer, model)
    return Qwen25VLAdapter(model.eval(), build_processor(tokenizer, lvlm_config.image_size), lvlm_config.image_size)


def load_qwen(lvlm_config, directory: Optional[str] = None, dtype: torch.dtype = torch.float32,
              is_trainable: bool = False) -> Qwen25VLAdapter:
    """Load from a local folder.

    directory: a saved adapter folder (tiny/full: the whole model; LoRA: the peft adapter over
    ``lvlm_config.path``), or None for the pristine base model at ``lvlm_config.path``.
    """
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    lora_checkpoint = directory is not None and os.path.isfile(os.path.join(directory, "adapter_config.json"))
    base_dir = lvlm_config.path if (directory is None or lora_checkpoint) else directory
    check_model_folder(base_dir, "Qwen2.5-VL model")
    processor = AutoProcessor.from_pretrained(directory or base_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir, dtype=dtype)
    add_routing_tokens(processor.tokenizer, model)
    adapter = Qwen25VLAdapter(model.eval(), processor, lvlm_config.image_size)
    if lora_checkpoint:
        from peft import PeftModel

        adapter.model = PeftModel.from_pretrained(model, directory, is_trainable=is_trainable)
        adapter.trainable_mode = "lora"
    return adapter
