"""The one precision resolver and autocast of every loop (issue 12: it was resolved in five
places). ``auto`` is bf16 autocast on a GPU that supports it (fp16 on one that does not), fp32 on
CPU; ``fp16`` also needs a loss scaler, which the training step adds. Imports nothing from the
rest of the package except its errors."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .errors import ConfigError

__all__ = ["PRECISIONS", "AUTOCAST_DTYPES", "resolve_precision", "autocast", "amp_dtype"]

#: the precisions a loop runs in, once ``auto`` is resolved
PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device_type: str) -> str:
    """``auto`` -> ``bf16`` on a CUDA device that supports it (``fp16`` otherwise), ``fp32`` on
    CPU; an explicit choice is checked (bf16 on a GPU without it is an error)."""
    if precision == "auto":
        if device_type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {['auto', *PRECISIONS]}, got {precision!r}")
    if precision == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision=bf16 but this GPU has no bf16 support; use fp16 or fp32")
    return precision


def amp_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of a resolved precision (None for fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return AUTOCAST_DTYPES.get(precision)


def autocast(device: str | torch.device, precision: str):
    """``torch.autocast`` for a resolved ``precision`` on ``device``; a no-op context for fp32."""
    dt = amp_dtype(precision)
    if dt is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dt)
