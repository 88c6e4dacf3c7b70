"""Pixels -> model inputs, the one place the package does it: a loader's images (uint8 0..255
or floats in [0, 1], (B, 3, H, W)) scaled to [0, 1] and standardised with a model's own mean
and std (every teacher, student and classifier normalises with its own statistics). This module
imports nothing from the rest of the package."""
from __future__ import annotations

import torch

__all__ = ["to_float_images", "normalize_images"]


def to_float_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 (0..255) or float images -> float in [0, 1] scale."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def normalize_images(images: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> ``(x - mean) / std``, in the images' dtype; ``mean`` / ``std``:
    three numbers or a tensor that views as (1, 3, 1, 1) (e.g. a module's buffer: no copy)."""
    mean_t = torch.as_tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)  # (1, 3, 1, 1)
    std_t = torch.as_tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t
