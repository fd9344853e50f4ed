"""The projector from the language model's hidden size to the perception heads' 256-d prompt space."""
from __future__ import annotations

from torch import nn


def build_projector(hidden_size: int, out_dim: int = 256) -> nn.Sequential:
    """2-layer MLP (Linear, GELU, Linear): (..., hidden_size) routing-token states -> (..., out_dim)."""
    return nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, out_dim))
