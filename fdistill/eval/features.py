"""Frozen-feature extraction shared by k-NN and the linear probes.

A model is any backbone (:class:`~fdistill.backbone.Backbone`): its ``forward_tokens`` output gives

* ``cls``: the first prefix token ([CLS]) of the output token map;
* ``avg``: the mean of the output patch tokens;
* ``last<n>``: the [CLS] (mean patch token for models without prefix tokens) of each of the
  last ``n`` blocks, concatenated (DINO's linear evaluation, ``n_last_blocks=4``). timm models
  (and the FD student) give their intermediates through timm's ``forward_intermediates``
  (``norm=True``: each passes through the final norm, as DINO does); other models through
  forward hooks on their blocks (found by name, :func:`fdistill.eval.layer_decay.find_blocks`),
  each block's tokens layer-normalised without affine parameters (their own final norm is not
  known in general).

Extraction is streamed over a DataLoader with a tqdm bar; features are float32.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbone import Backbone, pool_tokens  # pool_tokens: defined beside TokenMap, part of this API too
from ..errors import TeacherError
from ..precision import autocast
from .data import model_inputs
from .layer_decay import find_blocks

__all__ = ["FeatureSet", "extract_features", "pool_tokens", "default_pool", "BlockTaps",
           "intermediate_pooled", "parse_feature_names", "batch_features"]


@dataclass
class FeatureSet:
    """Features of a dataset: ``feats[name]`` (N, D_name) float32, ``labels`` (N,) long."""

    feats: Dict[str, torch.Tensor]
    labels: torch.Tensor
    classes: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device) -> "FeatureSet":
        return FeatureSet({k: v.to(device) for k, v in self.feats.items()}, self.labels.to(device), self.classes)


def default_pool(backbone: Backbone) -> str:
    """``cls`` for models with a prefix token, else ``avg``."""
    return "cls" if backbone.num_prefix_tokens > 0 else "avg"


def parse_feature_names(names: Sequence[str]) -> Tuple[List[str], int]:
    """Split feature names into token pools and the largest ``last<n>`` (0 if none)."""
    pools, n = [], 0
    for name in names:
        m = re.fullmatch(r"last(\d+)", name)
        if m:
            n = max(n, int(m.group(1)))
            if int(m.group(1)) < 1:
                raise ValueError(f"{name}: n must be >= 1")
        elif name in ("cls", "avg", "cls+avg"):
            pools.append(name)
        else:
            raise ValueError(f"unknown feature {name!r}; expected cls, avg, cls+avg or last<n>")
    return pools, n


# -- intermediate blocks ---------------------------------------------------------------------------
def _uses_timm_intermediates(backbone: Backbone) -> bool:
    m = backbone.model
    return hasattr(m, "forward_intermediates") and hasattr(m, "blocks") and hasattr(m, "patch_embed")


class BlockTaps:
    """Forward hooks that keep the outputs of a model's last ``n`` blocks (see module docstring).

    Use as a context manager around one forward pass; ``pooled(B, P)`` then gives the per-block
    (B, C) features, shallowest first."""

    def __init__(self, model: nn.Module, n: int):
        names = find_blocks(model)
        if not names:
            raise TeacherError(f"cannot find the blocks of {type(model).__name__} to tap the last {n} of them")
        if n > len(names):
            raise TeacherError(f"asked for the last {n} blocks, but {type(model).__name__} has {len(names)}")
        mods = dict(model.named_modules())
        self.modules = [mods[b] for b in names[-n:]]
        self.outputs: List[torch.Tensor] = []
        self._handles = []

    def __enter__(self) -> "BlockTaps":
        self.outputs = [None] * len(self.modules)

        def hook(i):
            def fn(_m, _inp, out):
                self.outputs[i] = out[0] if isinstance(out, (tuple, list)) else out
            return fn

        self._handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(self.modules)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def pooled(self, batch: int, num_prefix_tokens: int) -> List[torch.Tensor]:
        out = []
        for t in self.outputs:
            if t is None:
                raise TeacherError("a tapped block did not run during the forward pass")
            if t.dim() == 4:  # (B, C, H, W) convolutional stage
                out.append(t.float().mean(dim=(2, 3)))
                continue
            if t.dim() != 3:
                raise TeacherError(f"cannot pool a block output of shape {tuple(t.shape)}")
            if t.shape[0] != batch and t.shape[1] == batch:  # (T, B, C) sequence-first
                t = t.transpose(0, 1)
            t = F.layer_norm(t.float(), t.shape[-1:])
            out.append(t[:, 0] if num_prefix_tokens > 0 else t.mean(dim=1))
        return out


def intermediate_pooled(backbone: Backbone, x: torch.Tensor, n: int) -> List[torch.Tensor]:
    """Per-block (B, C) features of the last ``n`` blocks for normalised images ``x`` (through
    timm's ``forward_intermediates`` where the model has it, else :class:`BlockTaps`)."""
    P = backbone.num_prefix_tokens
    if _uses_timm_intermediates(backbone):
        outs = backbone.model.forward_intermediates(
            x, indices=n, norm=True, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=P > 0)
        res = []
        for o in outs:
            if P > 0:
                patches, prefix = o
                res.append(prefix[:, 0].float())
            else:
                res.append(o.float().mean(dim=1))
        return res
    with BlockTaps(backbone.model, n) as taps:
        backbone.forward_tokens(x)
    return taps.pooled(x.shape[0], P)


# -- extraction ----------------------------------------------------------------------------------------
def batch_features(backbone: Backbone, x: torch.Tensor, features: Sequence[str]) -> Dict[str, torch.Tensor]:
    """``{name: (B, D) float32}`` for normalised images ``x`` (names as in the module docstring)."""
    pools, n_last = parse_feature_names(features)
    out: Dict[str, torch.Tensor] = {}
    if pools:
        tokens = backbone.forward_tokens(x)
        for p in pools:
            out[p] = pool_tokens(tokens, p).float()
    if n_last:
        per_block = intermediate_pooled(backbone, x, n_last)
        for name in features:
            m = re.fullmatch(r"last(\d+)", name)
            if m:
                out[name] = torch.cat(per_block[-int(m.group(1)):], dim=1).float()
    return out


@torch.no_grad()
def extract_features(
    backbone: Backbone,
    loader,
    *,
    features: Sequence[str] = ("cls",),
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    store_device: Optional[str | torch.device] = None,
    desc: str = "features",
    progress: bool = True,
) -> FeatureSet:
    """Features of every image of ``loader`` (batches of (images in [0, 1] or uint8, labels)).

    Args:
        backbone: the model (frozen; put on ``device`` here).
        features: names among ``cls``, ``avg``, ``cls+avg``, ``last<n>`` (module docstring).
        precision: a resolved precision (``fp32``, ``bf16``, ``fp16``;
            :func:`fdistill.precision.resolve_precision`), run under the one autocast.
        store_device: where the features are kept (default: CPU).
    """
    from tqdm.auto import tqdm

    parse_feature_names(features)  # fail early on a bad name
    device = torch.device(device)
    store = torch.device(store_device) if store_device is not None else torch.device("cpu")
    backbone = backbone.to(device).eval()
    buf: Dict[str, List[torch.Tensor]] = {name: [] for name in features}
    labels: List[torch.Tensor] = []
    for images, y in tqdm(loader, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True):
        x = model_inputs(images, backbone.mean, backbone.std, device)
        with autocast(device, precision):
            out = batch_features(backbone, x, features)
        for name, f in out.items():
            buf[name].append(f.to(store, non_blocking=True))
        labels.append(torch.as_tensor(y).to(store, non_blocking=True))
    if not labels:
        raise TeacherError("the data loader gave no batches")
    from .data import dataset_classes

    classes = dataset_classes(loader.dataset) if hasattr(loader, "dataset") else []
    return FeatureSet({k: torch.cat(v) for k, v in buf.items()}, torch.cat(labels).long(), classes)
