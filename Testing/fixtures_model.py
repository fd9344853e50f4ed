"""Tiny CTReasoner models and hand-made samples for test_model / test_inference (no dataset on disk needed)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from fixtures_lvlm import TINY_LVLM_OVERRIDES


def tiny_model_config(**lvlm_overrides):
    from CTReasonerLib.model.config import CTReasonerConfig

    return CTReasonerConfig.from_dict({
        "lvlm": {**TINY_LVLM_OVERRIDES, **lvlm_overrides},
        "segmenter": {"image_size": 64, "patch_size": 8, "encoder_embed_dim": 32, "encoder_depth": 1,
                      "encoder_num_heads": 2, "encoder_global_attn_indexes": [0], "encoder_window_size": 4},
        "detection": {"num_queries": 4, "num_layers": 1, "feedforward_dim": 64},
    })


def disc_sample(task: str, organ: str = "liver", centre=(40, 30), radius: int = 12, closer: bool = False,
                size: int = 96, split: bool = False, history=()):
    """A slice with a bright disc (two with ``split``) standing for ``organ``; turns like the curated data's."""
    yy, xx = np.mgrid[:size, :size]
    mask = (yy - centre[1]) ** 2 + (xx - centre[0]) ** 2 <= radius ** 2
    if split:
        mask |= (yy - (size - centre[1])) ** 2 + (xx - (size - centre[0])) ** 2 <= (radius // 2) ** 2
    image = np.full((size, size), -100, np.int16)
    image[mask] = 150
    present = task != "absent"
    boxes = []
    if task == "det":
        from scipy import ndimage

        parts, count = ndimage.label(mask)
        for index in range(1, count + 1):
            ys, xs = np.nonzero(parts == index)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    if not present:
        mask = np.zeros_like(mask)
    name = organ.replace("_", " ")
    answer = {"seg": f"The {name} is a bright round region. [SEG]", "det": f"The {name} is here. [DET]",
              "absent": f"The {name} is not visible on this slice."}[task]
    query = {"seg": f"Segment the {name}.", "det": f"Detect the {name}.", "absent": f"Segment the {name}."}[task]
    turns = [{"query": query, "answer": answer}]
    if closer:
        turns.append({"query": f"Have a closer look at the {name}.",
                      "answer": f"Zooming in on the {name}. [CLOSER]"})
    from CTReasonerLib.organs import ORGAN_BY_KEY

    labels = mask.astype(np.uint8) * ORGAN_BY_KEY[organ].label
    return SimpleNamespace(image_hu=image, mask=mask, labels=labels, boxes=np.array(boxes, np.float32).reshape(-1, 4),
                           turns=turns, task=task, present=present, organ=organ, history=list(history))
