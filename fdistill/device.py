"""The one device resolver of every command (issue 12: it was picked in three places)."""
from __future__ import annotations

from typing import Optional

import torch

from .errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(device: Optional[str | torch.device] = "auto") -> torch.device:
    """``auto`` / None -> the GPU when CUDA is available, else the CPU; ``cuda``, ``cuda:N``,
    ``cpu`` as given. Asking for CUDA on a machine without it is an error that says so."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {device!r} is not a device (auto, cpu, cuda, cuda:N): {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but no CUDA device is available on this machine (use device=cpu)")
    return dev
