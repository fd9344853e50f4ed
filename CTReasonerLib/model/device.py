"""The one place that chooses the device and the floating-point dtype.

CUDA when asked for (or available with ``"auto"``), in bf16; otherwise the CPU in fp32, because bf16 matmuls
on this CPU are slower than fp32 for small models and fp32 keeps the tiny model's tests exact.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from CTReasonerLib.errors import ConfigError


def select_device(preference: Union[str, torch.device, None] = "auto") -> torch.device:
    """``"auto"``/None -> cuda if available else cpu; ``"cpu"``, ``"cuda"``, ``"cuda:1"`` are taken as asked.

    Asking for CUDA on a machine without it is a :class:`ConfigError`, not a silent fallback.
    """
    if preference is None or str(preference) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {preference!r} was requested but CUDA is not available",
                          "use --device cpu (or auto)")
    return device


def select_dtype(device: torch.device, preference: Optional[str] = None) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU, unless ``preference`` ("float32"|"bfloat16"|"float16") says otherwise."""
    if preference:
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[preference]
        except KeyError:
            raise ConfigError(f"unknown dtype {preference!r}", "use float32, bfloat16 or float16") from None
    return torch.bfloat16 if device.type == "cuda" else torch.float32
