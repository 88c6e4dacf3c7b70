"""Layer-wise learning-rate decay for fine-tuning (BEiT, Bao et al. ICLR 2022, Sec. 2.5 / MAE;
the FD official ``optimizer.py``): with ``L`` blocks, a parameter of layer ``i`` trains at

    lr * decay ** (L + 1 - i),   i = 0 for the embeddings, 1..L for the blocks, L + 1 for the head

(the final norm, ``fc_norm`` and the classifier share the head's id ``L + 1``).

The parameter groups themselves come from timm's ``param_groups_layer_decay``; what this module
adds is the layer id of a parameter for *any* backbone, given through a ``group_matcher`` so
timm's function can use it. Hand-written because timm's own per-model matchers put the final
norm of a [CLS]-pooled model one group above the head (``norm`` at ordinal 99999, the head at
"unmatched" = one more), so the head would get ``decay ** 0`` and the norm ``decay ** 1`` instead
of both ``decay ** 0``; and because non-timm backbones (open_clip ``resblocks.N``, HF ``layers.N``
/ ``layer.N``, torchvision-style ResNets ``layerK.N``) have no matcher at all.

Blocks are found by name (:func:`find_blocks`): the most numerous family of modules named
``...blocks.N``, ``...resblocks.N``, ``...layers.N``, ``...layer.N``, ``...stages.N`` or
``...layerK.N`` (ResNet stages flattened in order). A parameter inside block ``j`` gets id
``j + 1``; outside the blocks, embedding-like names (``cls_token``, ``pos_embed``,
``patch_embed``, ``embeddings``, ``conv1``/``bn1`` stems, ``ln_pre``, ...) get 0, head-like names
(``head``, ``fc_norm``, ``norm``, ``ln_post``, ``proj``, ...) get ``L + 1``; anything else gets 0
before the first block, the id of the preceding block between blocks (e.g. Swin's downsampling)
and ``L + 1`` after the last one.
"""
from __future__ import annotations

import re
from typing import Callable, Collection, Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["find_blocks", "layer_ids", "param_groups_layer_decay", "set_drop_path", "LayerIdMatcher"]

_BLOCK_PATTERNS = (
    re.compile(r"^(?:.*\.)?(?:blocks|resblocks|layers|layer|stages)\.(\d+)$"),
    re.compile(r"^(?:.*\.)?layer(\d+)\.(\d+)$"),  # ResNet: layer1.0 ... layer4.2
)
_EMBED_WORDS = {
    "cls_token", "class_embedding", "pos_embed", "positional_embedding", "position_embedding",
    "position_embeddings", "patch_embed", "patch_embedding", "patch_embeddings", "embeddings", "embed",
    "conv1", "bn1", "stem", "ln_pre", "pre_layrnorm", "reg_token", "register_tokens", "mask_token",
    "rel_pos_bias", "dist_token", "conv_stem", "bn_stem",
}
_HEAD_WORDS = {
    "head", "fc", "classifier", "linear", "fc_norm", "norm", "ln_post", "post_layernorm", "layernorm",
    "proj", "pooler", "attn_pool", "head_drop", "final_layer_norm", "norm_pre",
}


def _block_key(name: str) -> Tuple[int, ...] | None:
    for i, pat in enumerate(_BLOCK_PATTERNS):
        m = pat.match(name)
        if m:
            return (i,) + tuple(int(g) for g in m.groups())
    return None


def find_blocks(model: nn.Module) -> List[str]:
    """Names of the model's transformer / residual blocks, in depth order.

    Every module whose name ends in a block pattern (see module docstring) is a candidate; the
    candidates are grouped by their name with the indices blanked (``blocks.#``,
    ``layers.#.blocks.#``, ``layer#.#``), and the largest group wins (ties: the one met first),
    ordered by its indices. Returns [] when no block family is found."""
    families: Dict[str, List[Tuple[Tuple[int, ...], str]]] = {}
    order: List[str] = []
    for name, _ in model.named_modules():
        if not name:
            continue
        key = _block_key(name)
        if key is None:
            continue
        fam = re.sub(r"\d+", "#", name)
        if fam not in families:
            families[fam] = []
            order.append(fam)
        nums = tuple(int(x) for x in re.findall(r"\d+", name))
        families[fam].append((nums, name))
    if not families:
        return []
    best = max(order, key=lambda f: (len(families[f]), -order.index(f)))
    return [n for _, n in sorted(families[best])]


def layer_ids(model: nn.Module, blocks: Sequence[str] | None = None) -> Tuple[Dict[str, int], int]:
    """``({parameter name: layer id}, L)`` for every parameter (see module docstring)."""
    blocks = list(find_blocks(model) if blocks is None else blocks)
    L = len(blocks)
    block_of = {b: j + 1 for j, b in enumerate(blocks)}
    ids: Dict[str, int] = {}
    last_block_seen = 0
    for name, _ in model.named_parameters():
        lid = None
        for b, j in block_of.items():
            if name.startswith(b + "."):
                lid = j
                break
        if lid is not None:
            last_block_seen = max(last_block_seen, lid)
            ids[name] = lid
            continue
        words = set(name.split(".")[:-1]) | {name.split(".")[-1]}
        if words & _EMBED_WORDS:
            ids[name] = 0
        elif words & _HEAD_WORDS:
            ids[name] = L + 1
        elif last_block_seen == 0:
            ids[name] = 0
        elif last_block_seen < L:
            ids[name] = last_block_seen
        else:
            ids[name] = L + 1
    return ids, L


class LayerIdMatcher(nn.Module):
    """A view of ``model`` for timm's ``param_groups_layer_decay``: the same parameter names, and a
    ``group_matcher`` that returns the layer ids of :func:`layer_ids`."""

    def __init__(self, model: nn.Module, blocks: Sequence[str] | None = None):
        super().__init__()
        self.inner = [model]  # a list, so the model is not registered (names keep no prefix)
        self.ids, self.num_blocks = layer_ids(model, blocks)

    def named_parameters(self, *args, **kwargs) -> Iterator[Tuple[str, nn.Parameter]]:
        return self.inner[0].named_parameters(*args, **kwargs)

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        return lambda name: self.ids[name]


def param_groups_layer_decay(
    model: nn.Module,
    *,
    layer_decay: float,
    weight_decay: float,
    no_weight_decay: Collection[str] = (),
    blocks: Sequence[str] | None = None,
) -> List[dict]:
    """timm ``param_groups_layer_decay`` groups (``lr_scale`` = decay ** (L + 1 - id),
    ``weight_decay`` 0 for 1-d parameters, biases and ``no_weight_decay`` names) with the layer ids
    of :func:`layer_ids`. ``model.no_weight_decay()`` is added when the model has it."""
    from timm.optim import param_groups_layer_decay as timm_groups

    view = LayerIdMatcher(model, blocks)
    L = view.num_blocks
    nwd = set(no_weight_decay)
    if hasattr(model, "no_weight_decay"):
        nwd |= set(model.no_weight_decay())
    groups = timm_groups(view, weight_decay=weight_decay, no_weight_decay_list=tuple(nwd),
                         layer_decay=layer_decay)
    # timm numbers layers from the lowest id present; with no head or no embedding parameters
    # (frozen, absent) its scales would shift, so recompute them from our ids
    name_of = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        lid = view.ids[name_of[id(g["params"][0])]]
        g["lr_scale"] = float(layer_decay ** (L + 1 - lid))
        g["layer_id"] = lid
    return groups


def set_drop_path(model: nn.Module, rate: float, blocks: Sequence[str] | None = None) -> int:
    """Stochastic depth rising linearly from 0 (first block) to ``rate`` (last block), as timm /
    BEiT build it, set on an existing model: every ``drop_path``, ``drop_path1``,
    ``drop_path2`` attribute of a block becomes a timm ``DropPath`` (or ``nn.Identity`` at 0);
    open_clip blocks get one after their ``ls_1``/``ls_2`` (:func:`_set_layer_scale_drop_path`).
    Returns how many blocks were changed (0: the architecture has no drop-path slots)."""
    from timm.layers import DropPath

    names = list(find_blocks(model) if blocks is None else blocks)
    mods = dict(model.named_modules())
    n = len(names)
    changed = 0
    for j, b in enumerate(names):
        blk = mods[b]
        p = float(rate) * j / max(n - 1, 1)
        hit = False
        for attr in ("drop_path", "drop_path1", "drop_path2"):
            if isinstance(getattr(blk, attr, None), nn.Module):
                setattr(blk, attr, DropPath(p) if p > 0 else nn.Identity())
                hit = True
        if not hit:
            hit = _set_layer_scale_drop_path(blk, p, DropPath)
        changed += hit
    return changed


def _apply_drop_path(module: nn.Module, args, output):
    """Forward hook: the residual branch's output through the module's own ``drop_path`` child
    (a module-level function, so ``copy.deepcopy`` (EMA) and pickling keep working)."""
    return module.drop_path(output)


def _set_layer_scale_drop_path(blk: nn.Module, p: float, drop_path_cls) -> bool:
    """open_clip's ``ResidualAttentionBlock`` has no drop-path slot: its residual branches end in
    ``ls_1``/``ls_2`` (LayerScale or Identity), ``x + ls_1(attn(ln_1(x)))``. A ``DropPath`` after
    them is exactly timm's ``x + drop_path(ls(attn(norm(x))))``. It is added as a parameter-free
    child of the ``ls`` module and applied by a forward hook, so the state dict keeps open_clip's
    key names (fine-tuned weights load back into open_clip unchanged)."""
    targets = [getattr(blk, a) for a in ("ls_1", "ls_2") if isinstance(getattr(blk, a, None), nn.Module)]
    if len(targets) != 2:
        return False
    for ls in targets:
        ls.drop_path = drop_path_cls(p) if p > 0 else nn.Identity()
        if _apply_drop_path not in ls._forward_hooks.values():
            ls.register_forward_hook(_apply_drop_path)
    return True


def lr_scales(optimizer: torch.optim.Optimizer) -> List[float]:
    """The ``lr_scale`` of every parameter group (1.0 where absent)."""
    return [float(g.get("lr_scale", 1.0)) for g in optimizer.param_groups]
