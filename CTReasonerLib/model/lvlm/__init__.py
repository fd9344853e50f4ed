"""LVLM backbones behind one adapter interface (``base.LVLMAdapter``); a new backbone is one new module
plus one entry in :data:`BUILDERS`.
"""
from __future__ import annotations

from typing import Iterable, Optional

from CTReasonerLib.errors import ConfigError
from CTReasonerLib.model.lvlm.base import Conversation, Generation, LVLMAdapter, LVLMBatch


def _qwen():
    from CTReasonerLib.model.lvlm import qwen2_5_vl
    return qwen2_5_vl.build_tiny_qwen, qwen2_5_vl.load_qwen


def _janus():
    from CTReasonerLib.model.lvlm import janus
    return janus.build_tiny_janus, janus.load_janus


#: backbone name -> () -> (build_tiny(lvlm_config, corpus, seed), load(lvlm_config, directory, dtype, is_trainable))
BUILDERS = {"qwen2_5_vl": _qwen, "janus": _janus}


def _builders(backbone: str):
    if backbone not in BUILDERS:
        raise ConfigError(f"unknown LVLM backbone {backbone!r}", f"use one of {sorted(BUILDERS)}")
    return BUILDERS[backbone]()


def build_lvlm(lvlm_config, corpus: Optional[Iterable[str]] = None, seed: int = 0, dtype=None) -> LVLMAdapter:
    """Tiny random-init backbone when ``lvlm_config.path`` is None, else the pretrained one from that folder."""
    build_tiny, load = _builders(lvlm_config.backbone)
    if lvlm_config.path is None:
        return build_tiny(lvlm_config, corpus, seed)
    return load(lvlm_config, None, dtype)


def load_lvlm(lvlm_config, directory: str, dtype=None, is_trainable: bool = False) -> LVLMAdapter:
    """Reload an adapter written by ``LVLMAdapter.save_pretrained(directory)``."""
    _, load = _builders(lvlm_config.backbone)
    return load(lvlm_config, directory, dtype, is_trainable)


__all__ = ["Conversation", "Generation", "LVLMAdapter", "LVLMBatch", "build_lvlm", "load_lvlm"]
