"""Our own small byte-level BPE tokenizer for the tiny (trained-from-scratch) LVLM.

It carries Qwen2.5-VL's chat and vision special tokens under the same names, so the Qwen adapter, its
processor and its prompt format work unchanged; only the vocabulary is small (~2-4k), learned from the
dataset's own queries and answers. Byte-level BPE still encodes any text, so unseen words never fail.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

#: Qwen2.5-VL's special tokens the adapter relies on (chat turns, vision span, image/video placeholders).
QWEN_SPECIAL_TOKENS: List[str] = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]
CHAT_ROLE_WORDS = ["system\n", "user\n", "assistant\n", "You are a helpful assistant.", "<|User|>: ", "<|Assistant|>: "]


def default_corpus() -> List[str]:
    """Organ names, synonyms and functions: enough to train a usable vocabulary when no dataset text is given."""
    from CTReasonerLib.organs import ORGANS

    lines = []
    for organ in ORGANS:
        lines.append(f"Segment the {organ.name}. The {organ.name} is visible. It {organ.function}.")
        lines.append(f"Detect the {organ.name}. The {organ.name} is not visible in this slice.")
        lines.extend(f"Where is the {synonym}?" for synonym in organ.synonyms)
    return lines


def build_tiny_tokenizer(corpus: Optional[Iterable[str]] = None, vocab_size: int = 2048,
                         special_tokens: Sequence[str] = tuple(QWEN_SPECIAL_TOKENS), **token_roles):
    """Train a byte-level BPE on ``corpus`` (default :func:`default_corpus`) and wrap it as a transformers tokenizer.

    special_tokens: the backbone's chat/vision tokens (default Qwen2.5-VL's); token_roles: tokenizer
    attributes such as ``eos_token`` (default: eos ``<|im_end|>`` and pad ``<|endoftext|>`` like Qwen2.5-VL)
    and named extras (``extra_special_tokens={"image_token": ...}`` for Janus).
    The routing tokens are added later by :func:`CTReasonerLib.model.routing.add_routing_tokens`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(corpus) if corpus is not None else default_corpus()
    texts = texts + CHAT_ROLE_WORDS
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    roles = token_roles or {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    return PreTrainedTokenizerFast(tokenizer_object=bpe, model_max_length=4096, **roles)
