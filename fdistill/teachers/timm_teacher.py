"""``timm:<model name>`` teachers: any timm image model (ViT/CLIP/DINO/DeiT/MAE/EVA, Swin/SwinV2,
ConvNets). ViTs give prefix + patch tokens; NHWC (Swin) and NCHW (CNN) maps become patch tokens."""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn

from .base import Teacher, TeacherError, TokenMap, tokens_from_map
from .offline import prefer_offline_when_unreachable, pretrained_error

log = logging.getLogger(__name__)


class TimmTeacher(Teacher):
    """Adapter for a timm model. ``after_norm=False`` takes the last block's tokens before the
    final norm (via timm's ``forward_intermediates``)."""

    def __init__(self, model: nn.Module, *, name: str, after_norm: bool = True, dynamic_img_size: bool = False,
                 mean=None, std=None):
        from timm.data import resolve_data_config

        cfg = resolve_data_config(model=model)
        img_size = tuple(cfg["input_size"][-2:])
        if hasattr(model, "patch_embed") and getattr(model.patch_embed, "img_size", None) is not None:
            img_size = tuple(model.patch_embed.img_size)
        P = int(getattr(model, "num_prefix_tokens", 0) or 0) if f_is_tokens(model) else 0
        info = getattr(model, "feature_info", None)
        stride = None
        if info:
            last = info[-1] if isinstance(info, list) else info.info[-1]
            stride = int(last.get("reduction")) if last.get("reduction") else None
        if stride is None and hasattr(model, "patch_embed"):
            stride = int(model.patch_embed.patch_size[0])
        self.after_norm = bool(after_norm)
        self.output_fmt = getattr(model, "output_fmt", None)
        super().__init__(
            model, name=name, embed_dim=int(model.num_features), patch_size=stride, num_prefix_tokens=P,
            mean=mean or cfg["mean"], std=std or cfg["std"], img_size=img_size,
            dynamic_img_size=dynamic_img_size,
        )

    def _forward_tokens(self, x: torch.Tensor) -> TokenMap:
        m, P = self.model, self.num_prefix_tokens
        if self.after_norm:
            f = m.forward_features(x)
        else:
            if not hasattr(m, "forward_intermediates"):
                raise TeacherError(f"{self.name}: after_norm=False needs timm's forward_intermediates")
            kw = dict(indices=1, norm=False, intermediates_only=True)
            if f_is_tokens(m):
                out = m.forward_intermediates(x, return_prefix_tokens=P > 0, output_fmt="NLC", **kw)[-1]
                if P > 0:
                    patches, prefix = out
                    return TokenMap(prefix, patches, self._vit_grid(x))
                return TokenMap(None, out, self._vit_grid(x))
            f = m.forward_intermediates(x, **kw)[-1]  # NCHW
            tokens, grid = tokens_from_map(f, "NCHW")
            return TokenMap(None, tokens, grid)
        if f.dim() == 4:
            tokens, grid = tokens_from_map(f, self.output_fmt or "NCHW")
            return TokenMap(None, tokens, grid)
        if f.dim() != 3:
            raise TeacherError(f"{self.name}: forward_features gave shape {tuple(f.shape)}; expected tokens or a map")
        prefix = f[:, :P] if P > 0 else None
        return TokenMap(prefix, f[:, P:], self._vit_grid(x))

    def _vit_grid(self, x: torch.Tensor):
        pe = self.model.patch_embed
        if hasattr(pe, "dynamic_feat_size"):
            return tuple(pe.dynamic_feat_size(x.shape[-2:]))
        ps = pe.patch_size
        return (x.shape[-2] // ps[0], x.shape[-1] // ps[1])


def f_is_tokens(model: nn.Module) -> bool:
    """ViT-like timm models (token output with a patch_embed) as opposed to spatial maps."""
    return hasattr(model, "patch_embed") and hasattr(model, "blocks") and getattr(model, "output_fmt", "NLC") != "NHWC"


def create_timm_teacher(
    name: str,
    *,
    pretrained: bool = True,
    checkpoint: Optional[str] = None,
    after_norm: bool = True,
    img_size: Optional[int] = None,
    dynamic_img_size: Optional[bool] = None,
    mean: Optional[tuple] = None,
    std: Optional[tuple] = None,
    allow_activation_mismatch: bool = False,
    checkpoint_key: Optional[str] = None,
    license: Optional[str] = None,
    **model_kwargs,
) -> TimmTeacher:
    """Build a frozen timm teacher.

    Args:
        name: a timm model name, optionally with a pretrained tag (``vit_base_patch16_clip_quickgelu_224.openai``).
        pretrained: load the tag's weights from the Hugging Face cache / hub.
        checkpoint: a local weight file (safetensors or a PyTorch file, loaded with
            ``weights_only=True``) used instead of the hub, in the layout its authors publish
            (OpenAI/open_clip CLIP, DINO, DeiT, MAE, EsViT, timm; see :mod:`fdistill.teachers.checkpoints`);
            timm's own key conversion applies.
        checkpoint_key: the entry of the file that holds the weights (e.g. ``teacher``), if
            not the first of ``state_dict`` / ``model`` / ``teacher`` / ``module``.
        after_norm: target after the final norm (the official configs' ``PRED_FEAT_AFTERNORM``).
        img_size: input size if different from the model's default.
        dynamic_img_size: let a ViT take other input sizes (needed to align grids by resizing);
            by default turned on where the architecture supports it.
        mean, std: override the input normalisation of the model's pretrained config.
        allow_activation_mismatch: build a model whose activation differs from the one its
            weights were trained with (see :func:`check_native_activation`) with a warning
            instead of an error.
        license: the licence of the weights, when you know it better than timm (e.g. for a
            local ``checkpoint``); recorded in ``teacher.provenance`` (see :func:`timm_provenance`).
        model_kwargs: passed to ``timm.create_model`` (e.g. ``depth=2`` for tiny test models).
    """
    import timm

    kwargs = dict(model_kwargs)
    if img_size is not None:
        kwargs["img_size"] = img_size
    state_dict = None
    if checkpoint:  # read first: a bad file fails before any model is built
        from .checkpoints import read_teacher_state_dict

        try:
            state_dict = read_teacher_state_dict(checkpoint, checkpoint_key)
        except TeacherError as e:
            raise TeacherError(f"timm:{name}: {e}") from None
        pretrained = False  # the weights come from the file, not the hub

    def build(dyn: bool):
        extra = dict(dynamic_img_size=True) if dyn else {}
        return timm.create_model(name, pretrained=pretrained, **kwargs, **extra)

    want_dyn = True if dynamic_img_size is None else bool(dynamic_img_size)
    if pretrained and not checkpoint:
        prefer_offline_when_unreachable()
    try:
        try:
            model, dyn = build(want_dyn), want_dyn
        except TypeError:
            if dynamic_img_size:  # asked for explicitly
                raise TeacherError(f"timm:{name} does not support dynamic_img_size")
            model, dyn = build(False), False
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise TeacherError(f"timm has no model named {name!r} (see timm.list_models())") from e
        if pretrained and not checkpoint:
            raise pretrained_error(f"timm:{name}", e, "checkpoint=PATH") from e
        raise
    except Exception as e:  # hub / network errors come in many types
        if pretrained and not checkpoint:
            raise pretrained_error(f"timm:{name}", e, "checkpoint=PATH") from e
        raise
    if state_dict is not None:
        from .checkpoints import load_into_timm_model

        load_into_timm_model(model, state_dict, source=f"timm:{name} from {checkpoint}")
    check_native_activation(name, model, weights_loaded=bool(pretrained) or state_dict is not None,
                            allow=allow_activation_mismatch)
    if not hasattr(model, "patch_embed"):
        dyn = True  # fully convolutional: any input size works
    teacher = TimmTeacher(model, name=f"timm:{name}", after_norm=after_norm, dynamic_img_size=dyn,
                          mean=mean, std=std)
    teacher.provenance = timm_provenance(name, model, loaded=bool(pretrained) or bool(checkpoint),
                                         checkpoint=checkpoint, license=license)
    return teacher


def check_native_activation(name: str, model: nn.Module, *, weights_loaded: bool, allow: bool = False) -> None:
    """Refuse a timm model whose weights were trained with another activation than it is built with.

    OpenAI's CLIP towers were trained with QuickGELU, ``x * sigmoid(1.702 x)``; timm's plain
    ``vit_*_clip_224.openai`` models build GELU and say so only in ``pretrained_cfg['notes']``
    ("natively QuickGELU, use quickgelu model variant for original results"). With those weights
    the tokens are not CLIP's, so a distillation target would silently be another network's. With
    weights loaded this is an error naming the ``*_clip_quickgelu_*`` variant (``allow=True``:
    a warning); a randomly initialised model only gets a warning (its activation is just a choice).
    """
    notes = " ".join(getattr(model, "pretrained_cfg", {}).get("notes", ()) or ())
    if "quickgelu" not in notes.lower():
        return
    from ..models.inspection import layer_types

    acts = set(layer_types(model, "activation"))
    if acts == {"QuickGELU"} or not acts:
        return
    arch, _, tag = name.partition(".")
    fixed = arch.replace("_clip_", "_clip_quickgelu_", 1) if "_clip_quickgelu_" not in arch else arch
    fixed = f"{fixed}.{tag}" if tag else fixed
    msg = (f"timm:{name} is built with {'/'.join(sorted(acts))} but its weights were trained with QuickGELU "
           f"(timm: {notes!r}), so its tokens would not be the original model's; use timm:{fixed} "
           "(or open_clip:<arch>/openai)")
    if weights_loaded and not allow:
        raise TeacherError(msg + ", or pass allow_activation_mismatch=True to build it anyway")
    log.warning("%s", msg)


def timm_provenance(name: str, model: nn.Module, *, loaded: bool, checkpoint: Optional[str] = None,
                    license: Optional[str] = None) -> dict:
    """``teacher.provenance`` of a timm teacher (see :func:`fdistill.teachers.provenance.make_provenance`).

    weights: the pretrained tag (``openai``, ``augreg_in21k_ft_in1k``...), the local checkpoint's
    file name, or the folder / repo of a ``local-dir:`` / ``hf-hub:`` name; ``None`` when randomly
    initialised. license: ``license=`` if given, else timm's
    ``pretrained_cfg['license']`` -- for a local checkpoint only when the model name names a tag
    (``arch.tag``: the file is taken to hold that tag's weights), "unknown" otherwise."""
    from pathlib import Path

    from .provenance import make_provenance

    spec = f"timm:{name}"
    if not loaded:
        return make_provenance(spec, weights=None)
    pcfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if checkpoint:
        weights = Path(checkpoint).name
        stated = pcfg.get("license") if "." in name else None
        where = f"timm pretrained_cfg of tag {pcfg.get('tag')!r} (local file)"
    elif name.startswith(("local-dir:", "hf-hub:")):  # e.g. an fdistill export: its folder / repo
        where_from = name.split(":", 1)[1]
        weights = Path(where_from).name if name.startswith("local-dir:") else where_from
        stated, where = pcfg.get("license"), "timm pretrained_cfg (config.json)"
    else:
        weights = pcfg.get("tag") or pcfg.get("hf_hub_id") or name
        stated, where = pcfg.get("license"), "timm pretrained_cfg"
    if license:
        return make_provenance(spec, weights=weights, license=license, license_source="user (license=)")
    return make_provenance(spec, weights=weights, license=stated, license_source=where)
