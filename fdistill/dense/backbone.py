"""The trainable backbone inside a dense model, from any model fdistill loads, built the way
classification fine-tuning builds it (:func:`fdistill.eval.classifier.build_classifier`), so the
teacher and its FD student enter every benchmark through one code path:

- **FD student**: a timm ``Beit`` with the shared relative position bias copied into every block
  (official ``remap_pretrained_keys_vit``); the same conversion as classification fine-tuning.
- **timm teacher** (CLIP, DINO, DeiT, MAE, Swin, ...): the timm network itself, trainable, drop
  path set on its blocks.
- **anything else** with ``forward_intermediates`` (open_clip visual towers): the adapter,
  unfrozen. Models without it are refused (:class:`~fdistill.dense.pyramid.DenseError`) before
  any data is read.

Fixed-size networks are set to the dense input size with timm's ``set_input_size`` (position
embeddings and relative-position tables resampled: BEiT's dense fine-tuning does the same).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

from .pyramid import DenseError, _module

log = logging.getLogger(__name__)

__all__ = ["dense_backbone", "backbone_blocks"]


def _grid_ok(net: nn.Module, size: Tuple[int, int]) -> None:
    pe = getattr(net, "patch_embed", None)
    patch = getattr(pe, "patch_size", None)
    if patch is None:
        return
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    if size[0] % ph or size[1] % pw:
        raise DenseError(f"a {size[0]}x{size[1]} input is not a whole number of {ph}x{pw} patches; "
                         f"choose data.crop_size as a multiple of {ph}")


def dense_backbone(adapter, *, img_size: Optional[Sequence[int]], drop_path_rate: float = 0.0
                   ) -> Tuple[nn.Module, Dict[str, Any]]:
    """``(backbone, info)``: a trainable network with ``forward_intermediates`` that takes
    ``img_size`` inputs (normalised with ``adapter.mean``/``adapter.std``; None: left at its own
    size, for a detector body that resizes its position embeddings itself), and what it is
    (``kind``: ``beit`` | ``timm`` | ``adapter``)."""
    from ..eval.classifier import build_classifier

    model, spec = build_classifier(adapter, 0, global_pool="avg", drop_path_rate=drop_path_rate)
    net = model.backbone if spec["kind"] == "adapter" else model
    inner = _module(net)
    if not hasattr(inner, "forward_intermediates"):
        raise DenseError(f"{adapter.name}: {type(inner).__name__} has no forward_intermediates (timm's contract "
                         "for intermediate feature maps), so no dense head can be put on it; use a timm, open_clip "
                         "or fdistill student backbone, or give a python: model that implements it")
    if img_size is None:
        for p in net.parameters():
            p.requires_grad_(True)
        return net.train(), {"kind": spec["kind"], "img_size": None, "mean": list(adapter.mean),
                             "std": list(adapter.std)}
    size = (int(img_size[0]), int(img_size[1]))
    _grid_ok(inner, size)
    dynamic = bool(getattr(getattr(inner, "patch_embed", None), "dynamic_img_pad", False)) or bool(
        getattr(inner, "dynamic_img_size", False))
    pe = getattr(inner, "patch_embed", None)
    own = tuple(getattr(pe, "img_size", None) or ()) if pe is not None else ()
    if own and tuple(own) != size and not dynamic:
        if not hasattr(inner, "set_input_size"):
            raise DenseError(f"{adapter.name} takes {own[0]}x{own[1]} inputs only and cannot be resized; "
                             f"set data.crop_size={own[0]}")
        inner.set_input_size(img_size=size)  # pos embed / rel-pos tables resampled (timm)
        log.info("%s: input size set to %dx%d", adapter.name, *size)
    for p in net.parameters():
        p.requires_grad_(True)
    return net.train(), {"kind": spec["kind"], "img_size": list(size), "mean": list(adapter.mean),
                         "std": list(adapter.std)}


def backbone_blocks(model: nn.Module, prefix: str = "backbone") -> List[str]:
    """The backbone's block names inside a dense model (``prefix.blocks.N``...), for layer decay:
    found on the backbone alone, so a decoder's own numbered modules never compete."""
    from ..eval.layer_decay import find_blocks

    sub = model.get_submodule(prefix)
    return [f"{prefix}.{b}" for b in find_blocks(sub)]
