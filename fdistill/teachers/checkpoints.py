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

:func:`read_teacher_state_dict` unwraps the container (``checkpoint_key``, else the first of
``state_dict`` / ``model`` / ``teacher`` / ``module`` that holds a dict), strips wrapper prefixes
(``module.``, ``_orig_mod.``, and ``backbone.``, dropping what is outside the backbone, e.g. a
DINO/EsViT projection head); :func:`load_into_timm_model` then applies the architecture's own
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

CONTAINER_KEYS = ("state_dict", "model", "teacher", "module")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: buffers some layouts save that timm rebuilds (never parameters)
REBUILT_BUFFERS = ("relative_position_index", "attn_mask", "relative_coords_table")


def read_teacher_state_dict(path: str | Path, checkpoint_key: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The backbone's tensors of a published checkpoint file (safetensors, or a PyTorch file read
    with ``weights_only=True``), container and wrapper prefixes removed."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise TeacherError(f"checkpoint file not found: {path}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(p))
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch / safetensors raise many kinds
        raise TeacherError(f"cannot read checkpoint {p}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    if checkpoint_key is not None:
        if not isinstance(obj, dict) or checkpoint_key not in obj:
            keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
            raise TeacherError(f"checkpoint {p} has no {checkpoint_key!r} entry (it has {keys})")
        obj = obj[checkpoint_key]
    else:
        for k in CONTAINER_KEYS:
            if isinstance(obj, dict) and isinstance(obj.get(k), dict):
                obj = obj[k]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TeacherError(f"checkpoint {p} does not hold a state dict of tensors (pass checkpoint_key=...)")
    sd = dict(obj)
    for pre in WRAPPER_PREFIXES:
        if all(k.startswith(pre) for k in sd):
            sd = {k[len(pre):]: v for k, v in sd.items()}
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
