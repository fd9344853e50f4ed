"""Curation of (CT, label map) pairs into a BTCV++-style dataset (paper §4).

Stages, one module each: slice selection (``selection``), visual prompts (``prompts``), geometric and
intensity measurements (``measure``), structured appearance descriptions (``describe``, ``schema``,
optional ``llm_writer``), consistency review (``review``), question-answer generation (``qa``), and the
orchestration that writes the dataset folder (``pipeline``). Inputs are located by ``sources``.
"""
from .config import CurationConfig

__all__ = ["CurationConfig"]
