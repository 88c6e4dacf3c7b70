"""Multi-resolution training (AM-RADIO v2.5, Heinrich et al. 2024, arXiv 2412.07679, Sec. 4).

A student distilled at one input size changes "mode" at another: its features at a higher
resolution stop resembling those at the training size (RADIO v2.5's Fig. 2). RADIO v2.5 trains
the student at a low and a high resolution at once. Here a fraction of the training steps shows
the student the same augmented view at another size (every image of a step the same size, so
the batch stays one tensor); the teachers keep their own input size, and their token maps are
resampled to the student's grid of that step (bilinear, as FD's grid alignment).

Which size a step uses is a pure function of ``(seed, step)`` (:meth:`ResolutionSchedule.size_at`):
every rank of a DDP run draws the same size without communicating, and a resumed run continues
the same sequence, because the step count is a buffer saved with the checkpoint.
"""
from __future__ import annotations

import random
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["ResolutionSchedule"]


class ResolutionSchedule(nn.Module):
    """The student's input size at each training step.

    Args:
        base: the student's own input size (pixels, square).
        sizes: the other sizes (each a multiple of the patch size; checked by the student).
        fraction: the fraction of steps at one of ``sizes`` (drawn uniformly among them); the
            rest run at ``base``.
        seed: the draw's seed (the run's seed).
    """

    def __init__(self, base: int, sizes: Sequence[int], fraction: float, seed: int = 0):
        super().__init__()
        sizes = [int(s) for s in sizes]
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"resolution fraction must be in [0, 1], got {fraction}")
        if float(fraction) > 0 and not sizes:
            raise ValueError("a resolution fraction > 0 needs at least one other size")
        if any(s <= 0 for s in sizes):
            raise ValueError(f"resolutions must be positive, got {sizes}")
        self.base, self.sizes, self.fraction, self.seed = int(base), sizes, float(fraction), int(seed)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # training steps drawn so far
        self._host_step: Optional[int] = None  # read from the buffer once (after a resume), then kept here

    def size_at(self, step: int) -> int:
        """The input size of training step ``step`` (0-based)."""
        if not self.sizes or self.fraction == 0.0:
            return self.base
        r = random.Random(self.seed * 1_000_003 + int(step))  # its own stream: no global RNG consumed
        if r.random() >= self.fraction:
            return self.base
        return self.sizes[r.randrange(len(self.sizes))]

    def next_size(self) -> Tuple[int, int]:
        """The size of the next training step, advancing the count (no device sync once read)."""
        if self._host_step is None:
            self._host_step = int(self.step)
        size = self.size_at(self._host_step)
        self._host_step += 1
        self.step.fill_(self._host_step)
        return size, size

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host_step = None  # a loaded count is re-read on the next step

    def extra_repr(self) -> str:
        return f"base={self.base}, sizes={self.sizes}, fraction={self.fraction}"
