"""Janus adapter (``JanusForConditionalGeneration``): a tiny random-init build for tests, or a local converted
folder (e.g. Janus-1.3B converted with transformers' ``convert_janus_weights_to_hf``).

Only Janus's *understanding* path is used (SigLIP-style encoder + aligner -> Llama); its VQ image generator
is built because the class requires it, kept minimal at tiny size, and never trained or called.

Prompt layout (DeepSeek-VL/Janus SFT format, rendered piece by piece like the Qwen adapter):

    <bos>{system}\n\n<|User|>: <begin_of_image><image_placeholder>*n<end_of_image>\n{query 1}\n\n<|Assistant|>: {answer 1}<eos>
    \n\n<|User|>: {query 2}\n\n<|Assistant|>: ...
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from CTReasonerLib.errors import ConfigError
from CTReasonerLib.model.lvlm.base import IGNORE_INDEX, Conversation, LVLMAdapter, check_model_folder
from CTReasonerLib.model.routing import add_routing_tokens

SYSTEM_PROMPT = "You are a helpful language and vision assistant."
JANUS_SPECIAL_TOKENS = ["<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", "<｜▁pad▁｜>", "<image_placeholder>",
                        "<begin_of_image>", "<end_of_image>", "<|User|>", "<|Assistant|>"]
TINY_PATCH_SIZE = 16


class JanusAdapter(LVLMAdapter):
    backbone = "janus"

    def __init__(self, model, processor, image_size: int):
        super().__init__(model, processor, image_size)
        tokenizer = self.tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
        self.vision_token_ids = [tokenizer.convert_tokens_to_ids(t) for t in
                                 (processor.image_token, processor.image_start_token, processor.image_end_token)]
        self._pieces = {name: self.encode_text(text) for name, text in {
            "system": f"{SYSTEM_PROMPT}\n\n", "user": "<|User|>: ", "end_user": "\n\n",
            "assistant": "<|Assistant|>: ", "image_start": processor.image_start_token,
            "image_end": processor.image_end_token + "\n", "between_turns": "\n\n"}.items()}

    def image_inputs(self, images: Sequence[torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[int]]:
        size = self.image_size
        resized = [F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True,
                                 align_corners=False)[0].clamp(0, 1).cpu() for image in images]
        encoded = self.processor.image_processor(images=resized, do_resize=False, do_rescale=False, do_pad=False,
                                                 return_tensors="pt")
        return {"pixel_values": encoded["pixel_values"]}, [self.processor.num_image_tokens] * len(images)

    def conversation_ids(self, conversation: Conversation, num_image_tokens: int) -> Tuple[List[int], List[int]]:
        p = self._pieces
        ids: List[int] = [self.tokenizer.bos_token_id] + list(p["system"])
        labels: List[int] = [IGNORE_INDEX] * len(ids)

        def add(piece: List[int], supervised: bool = False) -> None:
            ids.extend(piece)
            labels.extend(piece if supervised else [IGNORE_INDEX] * len(piece))

        for index, (query, answer) in enumerate(conversation.turns):
            if index:
                add(p["between_turns"])
            add(p["user"])
            if index == 0:
                add(p["image_start"] + [self.image_token_id] * num_image_tokens + p["image_end"])
            add(self.encode_text(query) + p["end_user"] + p["assistant"])
            if answer is None:
                if index != len(conversation.turns) - 1:
                    raise ValueError("only the last turn of a conversation may lack an answer")
                break
            add(self.encode_text(answer) + [self.end_of_turn_id], conversation.supervised(index))
        return ids, labels

    def suppressed_token_ids(self) -> List[int]:
        return self.vision_token_ids + super().suppressed_token_ids()


def tiny_janus_config(lvlm_config, tokenizer):
    """A small ``JanusConfig``: Llama text model, SigLIP-style encoder at ``image_size``, a minimal VQ model."""
    from transformers import JanusConfig

    c = lvlm_config
    if c.image_size % TINY_PATCH_SIZE:
        raise ConfigError(f"lvlm.image_size must be a multiple of {TINY_PATCH_SIZE} for tiny Janus, got {c.image_size}")
    ids = tokenizer.convert_tokens_to_ids
    hidden = c.tiny_hidden_size
    return JanusConfig(
        text_config=dict(model_type="llama", vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=hidden,
                         intermediate_size=c.tiny_intermediate_size, num_hidden_layers=c.tiny_layers,
                         num_attention_heads=c.tiny_heads, num_key_value_heads=c.tiny_kv_heads,
                         max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=c.tiny_vision_hidden_size, num_hidden_layers=c.tiny_vision_depth,
                           num_attention_heads=c.tiny_vision_heads, image_size=c.image_size,
                           patch_size=TINY_PATCH_SIZE, mlp_ratio=c.tiny_vision_intermediate_size / c.tiny_vision_hidden_size,
                           projection_dim=hidden, num_image_tokens=(c.image_size // TINY_PATCH_SIZE) ** 2),
        vq_config=dict(embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32,
                       channel_multiplier=[1, 1], num_res_blocks=1, num_patches=4,
                       projection_dim=hidden, image_token_embed_dim=hidden),
        image_token_id=ids("<image_placeholder>"), tie_word_embeddings=True)


def build_tiny_janus(lvlm_config, corpus: Optional[Iterable[str]] = None, seed: int = 0) -> JanusAdapter:
    from transformers import JanusForConditionalGeneration, JanusImageProcessor, JanusProcessor

    from CTReasonerLib.model.lvlm.tiny_tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(
        corpus, vocab_size=lvlm_config.tokenizer_vocab_size, special_tokens=JANUS_SPECIAL_TOKENS,
        eos_token=JANUS_SPECIAL_TOKENS[0], bos_token=JANUS_SPECIAL_TOKENS[1], pad_token=JANUS_SPECIAL_TOKENS[2],
        extra_special_tokens={"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>",
                              "eoi_token": "<end_of_image>"})
    add_routing_tokens(tokenizer)
    torch.manual_seed(seed)
    config = tiny_janus_config(lvlm_config, tokenizer)
    model = JanusForConditionalGeneration(config)
    add_routing_tokens(tokenizer, model)
    size = lvlm_config.image_size
    processor = JanusProcessor(image_processor=JanusImageProcessor(size={"height": size, "width": size}),
                               tokenizer=tokenizer, num_image_tokens=config.vision_config.num_image_tokens)
    return JanusAdapter(model.eval(), processor, size)


def load_janus(lvlm_config, directory: Optional[str] = None, dtype: torch.dtype = torch.float32,
               is_trainable: bool = False) -> JanusAdapter:
    """Load a converted Janus folder (``lvlm_config.path``) or a saved adapter folder (see ``load_qwen``).

    The image size is the checkpoint's own (384 for Janus-1.3B); ``lvlm_config.image_size`` only sizes tiny builds.
    """
    from transformers import AutoProcessor, JanusForConditionalGeneration

    lora_checkpoint = directory is not None and os.path.isfile(os.path.join(directory, "adapter_config.json"))
    base_dir = lvlm_config.path if (directory is None or lora_checkpoint) else directory
    check_model_folder(base_dir, "Janus model")
    processor = AutoProcessor.from_pretrained(directory or base_dir)
    model = JanusForConditionalGeneration.from_pretrained(base_dir, dtype=dtype)
    add_routing_tokens(processor.tokenizer, model)
    adapter = JanusAdapter(model.eval(), processor, model.config.vision_config.image_size)
    if lora_checkpoint:
        from peft import PeftModel

        adapter.model = PeftModel.from_pretrained(model, directory, is_trainable=is_trainable)
        adapter.trainable_mode = "lora"
    return adapter
