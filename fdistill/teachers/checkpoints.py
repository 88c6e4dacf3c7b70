"""Teacher weights from the checkpoint files their authors publish, loaded into a timm model.

Each Table-1 teacher of the paper comes as a file of its own layout:

========================  ==============================================================
OpenAI / open_clip CLIP   a flat state dict of the whole CLIP (``visual.*`` + text tower)
DINO                      a flat ViT state dict, no head (``dino_vitbase16_pretrain.pth``)
DeiT                      ``{"model": {... "head.weight"}}`` (``deit_base_patch16_224-*.pth``)
MAE                       ``{"model": {...}}``, encoder only (``mae_pretrain_vit_base.pth``)
EsViT Swin-B              ``{"student": ..., "teacher": {"backbone.*", "head.*"}}``, the original
                          Swin layout (a stage's downsampling at its end)
========================  ==============================================================

:func:`read_teacher_state_dict` unwraps the container (``checkpoint_key``, else ``teacher`` and
then the usual entries), strips wrapper prefixes (``module.``, ``_orig_mod.``, and ``backbone.``,
dropping what is outside the backbone, e.g. a DINO/EsViT projection head); :func:`load_into_timm_model` then applies the architecture's own
timm ``checkpoint_filter_fn`` (OpenAI CLIP -> timm ViT, original Swin -> timm Swin, position
embedding resizing), treats the classifier as optional (a teacher's tokens come from ``forward_features``) and loads
strictly: any other
missing or unexpected key is an error that names them. Written here because timm's
``pretrained_cfg_overlay=dict(file=...)`` path knows neither the DINO-style containers nor the
``backbone.`` prefix, and fails on a backbone-only file for a model with a classifier.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn as nn

from .base import TeacherError

#: buffers some layouts save that timm rebuilds (never parameters)
REBUILT_BUFFERS = ("relative_position_index", "attn_mask", "relative_coords_table")


def read_teacher_state_dict(path: str | Path, checkpoint_key: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The backbone's tensors of a published checkpoint file, read by
    :func:`fdistill.weights.load_state_dict_file` (safetensors, or ``weights_only=True``; containers
    unwrapped, ``teacher`` first; ``module.`` stripped), then ``_orig_mod.`` and the
    ``backbone.`` wrapper removed."""
    from ..weights import WeightsError, load_state_dict_file

    try:
        sd = load_state_dict_file(path, key=checkpoint_key, prefer=("teacher",))
    except WeightsError as e:
        raise TeacherError(f"{e} (pass checkpoint_key=... for the entry that holds the weights)") from None
    if sd and all(k.startswith("_orig_mod.") for k in sd):  # a torch.compile'd model's state dict
        sd = {k[len("_orig_mod."):]: v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):  # DINO/EsViT MultiCropWrapper: keep the backbone only
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def load_into_timm_model(model: nn.Module, state_dict: Dict[str, torch.Tensor], *, source: str) -> None:
    """Convert ``state_dict`` with the timm architecture's filter and load it into ``model``
    (strict, apart from a classifier the model does not have and rebuilt buffers)."""
    module = sys.modules.get(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    sd = dict(state_dict)
    if filter_fn is not None:
        try:
            sd = filter_fn(sd, model)
        except Exception as e:  # noqa: BLE001 - a layout timm's converter does not understand
            raise TeacherError(f"{source}: timm's {module.__name__}.checkpoint_filter_fn could not convert the "
                               f"checkpoint: {type(e).__name__}: {e}") from e
    own = model.state_dict()
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    classifiers = ((classifier,) if isinstance(classifier, str) else tuple(classifier)) + ("head",)

    def is_classifier(k: str) -> bool:
        return any(k == c or k.startswith(c + ".") for c in classifiers)

    # a teacher's tokens come from forward_features: its classifier is optional on both sides (a
    # backbone-only file for a model with a head; a classifier of another class count is dropped)
    sd = {k: v for k, v in sd.items() if not k.endswith(REBUILT_BUFFERS)
          and not (is_classifier(k) and (k not in own or tuple(v.shape) != tuple(own[k].shape)))}
    missing = [k for k in own if k not in sd and not k.endswith(REBUILT_BUFFERS) and not is_classifier(k)]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise TeacherError(
            f"{source}: the checkpoint does not fit {type(model).__name__}: "
            + (f"missing {len(missing)} keys (e.g. {missing[:4]})" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {len(unexpected)} keys (e.g. {unexpected[:4]})" if unexpected else "")
            + " -- check the model name and its kwargs (depth, width, window_size) or pass checkpoint_key=")
    bad = [k for k, v in sd.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise TeacherError(f"{source}: {len(bad)} tensors have other shapes than the model's, e.g. {k}: "
                           f"{tuple(sd[k].shape)} vs {tuple(own[k].shape)}")
    model.load_state_dict(sd, strict=False)
