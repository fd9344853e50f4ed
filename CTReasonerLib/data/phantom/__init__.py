"""Procedural abdominal CT phantoms with 14-organ label maps (see docs/phantoms.md).

``generate_phantom(seed, config)`` returns (ct, labels) ``Volume`` objects on one grid.
"""
from .config import PhantomConfig
from .generator import generate_phantom
from .tissues import CONTRAST_PHASES

__all__ = ["PhantomConfig", "generate_phantom", "CONTRAST_PHASES"]
