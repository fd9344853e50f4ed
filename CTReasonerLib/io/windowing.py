"""Hounsfield-unit windowing: named presets and custom level/width, mapped to float32 in [0, 1].

Preset values are the usual radiology display windows (Radiopaedia "Windowing (CT)"; abdomen as used by most
abdominal CT segmentation work): abdomen W400/L40, liver W150/L30, lung W1500/L-600, bone W1800/L400,
soft tissue (mediastinum) W350/L50.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Union

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class WindowPreset:
    name: str
    level: float   # HU at the middle of the window
    width: float   # HU span mapped to [0, 1]

    @property
    def low(self) -> float:
        return self.level - self.width / 2.0

    @property
    def high(self) -> float:
        return self.level + self.width / 2.0


WINDOW_PRESETS: Dict[str, WindowPreset] = {
    preset.name: preset
    for preset in (
        WindowPreset("abdomen", level=40.0, width=400.0),
        WindowPreset("liver", level=30.0, width=150.0),
        WindowPreset("lung", level=-600.0, width=1500.0),
        WindowPreset("bone", level=400.0, width=1800.0),
        WindowPreset("soft_tissue", level=50.0, width=350.0),
    )
}


def get_window(name: str) -> WindowPreset:
    """The preset called ``name`` (case, spaces and hyphens ignored: "Soft tissue" == "soft_tissue")."""
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    if key not in WINDOW_PRESETS:
        raise ConfigError(f"unknown window preset {name!r}",
                          f"use one of {', '.join(WINDOW_PRESETS)} or a custom level and width")
    return WINDOW_PRESETS[key]


def apply_window(hu: np.ndarray, preset_or_level: Union[str, WindowPreset, float],
                 width: Optional[float] = None) -> np.ndarray:
    """Map HU to float32 in [0, 1]: ``low = level - width/2`` -> 0, ``high = level + width/2`` -> 1, clipped.

    ``preset_or_level`` is a preset name, a WindowPreset, or a level in HU (then ``width`` is required).
    The output has the input's shape.
    """
    if isinstance(preset_or_level, WindowPreset):
        window = preset_or_level
    elif isinstance(preset_or_level, str):
        window = get_window(preset_or_level)
    else:
        if width is None:
            raise ConfigError(f"a window level ({preset_or_level}) needs a width",
                              "pass width=..., or a preset name such as 'abdomen'")
        window = WindowPreset("custom", level=float(preset_or_level), width=float(width))
    if isinstance(preset_or_level, (str, WindowPreset)) and width is not None:
        raise ConfigError("a window preset already fixes the width", "pass a level in HU to use a custom width")
    if not window.width > 0:
        raise ConfigError(f"window width must be positive, got {window.width}", "use a width such as 400 HU")
    scaled = (np.asarray(hu, dtype=np.float32) - np.float32(window.low)) / np.float32(window.width)
    return np.clip(scaled, 0.0, 1.0, out=scaled)
