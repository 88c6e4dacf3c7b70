"""Per-step learning rate: linear warm-up, then half-cosine to a floor (official FD schedule).

timm's :class:`~timm.scheduler.CosineLRScheduler` with ``t_in_epochs=False`` and
``warmup_prefix=True`` is exactly the official ``lr_scheduler.py`` set-up; it is stepped
with the optimizer-step index *before* each update, so step ``s`` uses::

    s <  W:  lr = warmup_lr + s * (peak - warmup_lr) / W
    s >= W:  lr = min_lr + (peak - min_lr) * (1 + cos(pi * (s - W) / (T - W))) / 2

with ``W`` warm-up steps and ``T`` total steps; from ``T`` on the rate stays at ``min_lr``.
"""
from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler


def create_warmup_cosine(optimizer: torch.optim.Optimizer, *, peak_lr: float, total_steps: int,
                         warmup_steps: int, warmup_lr: float, min_lr: float) -> CosineLRScheduler:
    """A per-step warm-up + cosine scheduler; call ``.step_update(step)`` before each update."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps = max(0, min(int(warmup_steps), int(total_steps)))
    for g in optimizer.param_groups:  # timm reads the peak from the groups' initial lr
        g["lr"] = peak_lr
        g["initial_lr"] = peak_lr
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, int(total_steps) - warmup_steps),
        lr_min=min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=warmup_lr,
        warmup_prefix=True,
        cycle_limit=1,
        t_in_epochs=False,
    )
