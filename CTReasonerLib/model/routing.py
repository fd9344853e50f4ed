"""Task-routing tokens ``[SEG]``, ``[DET]``, ``[CLOSER]`` (paper eq. 2-3, 6) and the "state at the token" convention.

Convention (used by training and inference alike): the embedding of a routing token is the LVLM's
last-layer hidden state at the position that *holds* the token (``input_ids == token_id``). During
generation that state only exists once the token has been fed back, i.e. ``hidden_states[j + 1][-1][:, -1]``
for the j-th new token; :func:`generation_token_states` reads it from there.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

SEG_TOKEN = "[SEG]"
DET_TOKEN = "[DET]"
CLOSER_TOKEN = "[CLOSER]"
ROUTING_TOKENS: Tuple[str, ...] = (SEG_TOKEN, DET_TOKEN, CLOSER_TOKEN)


def add_routing_tokens(tokenizer, model=None) -> Dict[str, int]:
    """Register the routing tokens as special tokens and make sure ``model`` has embedding rows for them.

    The embedding matrix only ever grows: Qwen2.5-VL pads its vocabulary (151936 rows for ~151665 tokens),
    and ``resize_token_embeddings(len(tokenizer))`` would *shrink* it and drop trained rows.
    Returns {token: id}. Raises if a token does not encode to exactly one id (it would then have no single
    position whose state we could read).
    """
    missing = [t for t in ROUTING_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    token_ids = {}
    for token in ROUTING_TOKENS:
        encoded = tokenizer.encode(token, add_special_tokens=False)
        token_id = tokenizer.convert_tokens_to_ids(token)
        if encoded != [token_id]:
            raise ValueError(f"routing token {token} encodes to {encoded}, expected the single id {token_id}")
        token_ids[token] = token_id
    if model is not None:
        rows = model.get_input_embeddings().weight.shape[0]
        needed = max(token_ids.values()) + 1
        if needed > rows:
            model.resize_token_embeddings(needed, mean_resizing=True)
    return token_ids


def routing_token_states(hidden_states: torch.Tensor, input_ids: torch.Tensor,
                         token_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """States at every occurrence of ``token_id``.

    hidden_states: (B, T, D) last-layer states; input_ids: (B, T) (mask positions you want ignored with -1).
    Returns (states (N, D), batch_index (N,) long), occurrences ordered by (row, position).
    """
    if hidden_states.shape[:2] != input_ids.shape:
        raise ValueError(f"hidden_states {tuple(hidden_states.shape)} and input_ids {tuple(input_ids.shape)} disagree")
    batch_index, positions = (input_ids == token_id).nonzero(as_tuple=True)
    return hidden_states[batch_index, positions], batch_index


def generation_token_states(step_hidden_states: Sequence[Sequence[torch.Tensor]], new_token_ids: torch.Tensor,
                            token_id: int) -> Tuple[List[int], List[torch.Tensor]]:
    """States of a generated routing token read from ``generate(..., output_hidden_states=True)``.

    step_hidden_states: the ``hidden_states`` of a generate output for ONE sequence (batch 1): one tuple of
    per-layer tensors per step. new_token_ids: (L,) the generated ids. Returns (positions j in the generated
    ids, states (D,) for those j whose state exists); a token in the last position has no state here
    (it was never fed back) and is returned in positions without a state: the caller runs a teacher-forced
    forward for it.
    """
    positions = (new_token_ids == token_id).nonzero(as_tuple=True)[0].tolist()
    states = [step_hidden_states[j + 1][-1][0, -1] for j in positions if j + 1 < len(step_hidden_states)]
    return positions, states
