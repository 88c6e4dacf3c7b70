"""AdamW for the student + projector, without weight decay where it does harm.

No weight decay on biases and normalisation weights (every tensor with ndim <= 1), on position
embeddings, and on the [CLS] and mask tokens -- the official FD ``get_pretrain_param_groups``
rule, which reads each model's ``no_weight_decay()`` (the official ViT's is
``{'pos_embed', 'cls_token'}``). The official optimizer *does* decay the (2-d) shared
relative-position-bias table, so ``decay_rel_pos_bias=True`` (the default) does too; ``False``
exempts it, as timm's Beit ``no_weight_decay()`` and BEiT's fine-tuning do. The grouping itself is
timm's :func:`~timm.optim.param_groups_weight_decay`; here we only collect the exclusions of
*every* sub-module (the student sits under ``student.`` in the trainable branch, so its own
``no_weight_decay()`` names need that prefix).
"""
from __future__ import annotations

import logging
from typing import List, Optional, Set

import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay

log = logging.getLogger(__name__)

#: excluded whatever a model's ``no_weight_decay()`` says (patterns over full parameter names)
ALWAYS_NO_DECAY = ("*pos_embed", "*cls_token", "*mask_token", "*absolute_pos_embed", "*logit_scale")
RPB_TABLE = "relative_position_bias_table"


def no_weight_decay_patterns(model: nn.Module, *, decay_rel_pos_bias: bool = True) -> Set[str]:
    """Name patterns (fnmatch) of parameters that get no weight decay, from every sub-module's
    ``no_weight_decay()`` / ``no_weight_decay_keywords()`` plus :data:`ALWAYS_NO_DECAY`;
    relative-position-bias tables are removed from the set when ``decay_rel_pos_bias`` (official
    FD) and added to it otherwise."""
    pats = set(ALWAYS_NO_DECAY)
    for prefix, mod in model.named_modules():
        pre = f"{prefix}." if prefix else ""
        if hasattr(mod, "no_weight_decay") and callable(mod.no_weight_decay):
            pats |= {pre + n for n in mod.no_weight_decay()}
        if hasattr(mod, "no_weight_decay_keywords") and callable(mod.no_weight_decay_keywords):
            pats |= {f"{pre}*{k}*" for k in mod.no_weight_decay_keywords()}
    if decay_rel_pos_bias:
        pats = {p for p in pats if RPB_TABLE not in p}
    else:
        pats.add(f"*{RPB_TABLE}")
    return pats


def fused_available(params: List[torch.Tensor]) -> bool:
    """Whether torch has a fused AdamW kernel for these parameters' device and dtype."""
    try:
        torch.optim.AdamW([torch.zeros(1, device=params[0].device, dtype=params[0].dtype, requires_grad=True)],
                          fused=True)
        return True
    except (RuntimeError, ValueError, TypeError):
        return False


def create_adamw(model: nn.Module, *, lr: float, weight_decay: float = 0.05, betas=(0.9, 0.999), eps: float = 1e-8,
                 fused: Optional[bool] = None, decay_rel_pos_bias: bool = True) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters in two groups (decay / no decay; see the
    module docstring for ``decay_rel_pos_bias``).

    ``fused=None`` uses the fused kernel where torch has one (CUDA and CPU float tensors): one
    kernel per step instead of a loop, and it can skip a step on a device-side flag
    (``optimizer.found_inf``) without a host sync, which the training loop uses for non-finite
    losses."""
    nwd = no_weight_decay_patterns(model, decay_rel_pos_bias=decay_rel_pos_bias)
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=nwd)
    groups = [g for g in groups if g["params"]]
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("no trainable parameters")
    if fused is None:
        fused = fused_available(params)
    opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                            fused=True if fused else None)
    n_no = sum(p.numel() for g in groups if g["weight_decay"] == 0 for p in g["params"])
    log.debug("AdamW(lr=%g, wd=%g, fused=%s): %d tensors, %d params without weight decay", lr, weight_decay, fused,
              len(params), n_no)
    return opt

