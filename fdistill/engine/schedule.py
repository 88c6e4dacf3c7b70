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


SCHEDULES = ("cosine", "poly", "onecycle", "step")


def create_schedule(optimizer: torch.optim.Optimizer, kind: str, *, peak_lr: float, total_steps: int,
                    warmup_steps: int, warmup_lr: float, min_lr: float = 0.0, power: float = 1.0,
                    milestones=(), decay_rate: float = 0.1):
    """A per-step timm scheduler of the dense recipes (``.step_update(step)`` before each update),
    all with a linear warm-up from ``warmup_lr`` over ``warmup_steps``:

    - ``cosine``: :func:`create_warmup_cosine`;
    - ``poly``: ``lr = min_lr + (peak - min_lr) * (1 - t / T) ** power`` after the warm-up
      (mmsegmentation's ``PolyLR``, BEiT's ADE20K recipe: power 1.0);
    - ``onecycle``: GLPDepth's NYUv2 schedule, up to the peak over the first half of the steps
      (``warmup_steps`` when > 0) and cosine down to ``min_lr`` over the rest;
    - ``step``: x ``decay_rate`` at each optimizer step in ``milestones`` (Mask R-CNN 1x: epochs 8
      and 11, converted to steps by the caller).
    """
    from timm.scheduler import MultiStepLRScheduler, PolyLRScheduler

    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if kind == "onecycle" and warmup_steps <= 0:
        warmup_steps = total_steps // 2
    if kind in ("cosine", "onecycle"):
        return create_warmup_cosine(optimizer, peak_lr=peak_lr, total_steps=total_steps, warmup_steps=warmup_steps,
                                    warmup_lr=warmup_lr, min_lr=min_lr)
    warmup_steps = max(0, min(int(warmup_steps), int(total_steps)))
    for g in optimizer.param_groups:
        g["lr"] = peak_lr
        g["initial_lr"] = peak_lr
    if kind == "poly":
        return PolyLRScheduler(optimizer, t_initial=max(1, int(total_steps) - warmup_steps), power=power,
                               lr_min=min_lr, warmup_t=warmup_steps, warmup_lr_init=warmup_lr, warmup_prefix=True,
                               cycle_limit=1, t_in_epochs=False)
    # timm's convention: milestone m applies from t == m - 1; here the update at step m is the first decayed
    return MultiStepLRScheduler(optimizer, decay_t=sorted(int(m) + 1 for m in milestones), decay_rate=decay_rate,
                                warmup_t=warmup_steps, warmup_lr_init=warmup_lr, warmup_prefix=False,
                                t_in_epochs=False)
