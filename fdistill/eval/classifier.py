"""Image classifiers for fine-tuning, built from any model :func:`fdistill.models.loading.load_model`
returns, and rebuilt from a fine-tuning output folder (:func:`load_classifier`).

Three constructions (:func:`build_classifier`):

* **FD student** (:class:`~fdistill.models.loading.StudentBackbone`): rebuilt as a timm ``Beit``
  with a *per-layer* relative position bias and mean pooling, as the official FD fine-tuning
  configs do (``USE_RPB: True, USE_SHARED_RPB: False, USE_MEAN_POOLING: True``). The shared table
  is copied into every block's ``attn.relative_position_bias_table`` (official
  ``utils.remap_pretrained_keys_vit``), which leaves the token outputs unchanged; the final
  ``norm`` becomes an identity and a fresh ``fc_norm`` follows the pooling (as the official
  loader, which drops the pre-trained final norm when mean pooling). Drop path is the recipe's.
* **timm teacher**: the timm model itself, ``reset_classifier(num_classes, global_pool)``, the new
  head initialised small (std 2e-5, as MAE), drop path set on its blocks.
* **anything else** (open_clip, HF, ``python:`` models): :class:`Classifier`, a head over
  the backbone's token map: mean of the patch tokens -> LayerNorm (``avg``) or the first
  prefix token (``token``) -> Linear. Layer decay still works on it (blocks are found by
  parameter name, :mod:`fdistill.eval.layer_decay`); drop path only where its blocks have
  timm-style ``drop_path`` slots.

A fine-tuning output folder holds ``classifier.json`` (how to rebuild the network, classes,
input mean/std/size) and ``model_best.safetensors`` / ``model_last.safetensors``.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..backbone import GLOBAL_POOLS, Backbone, TokenMap, pool_tokens
from ..errors import TeacherError
from ..weights import WeightsError, load_state_dict_file
from .layer_decay import set_drop_path

log = logging.getLogger(__name__)

__all__ = ["beit_from_student", "Classifier", "AdapterClassifier", "build_classifier", "save_classifier_spec",
           "load_classifier", "LoadedClassifier", "CLASSIFIER_FORMAT", "rebuild_classifier"]

CLASSIFIER_FORMAT = "fdistill-classifier"
#: teacher-factory keywords that do not change a timm network's architecture
_TIMM_TEACHER_ONLY = ("pretrained", "checkpoint", "after_norm", "mean", "std", "dynamic_img_size")


class LoadedClassifier(NamedTuple):
    """A rebuilt classifier: ``model`` maps images normalised with ``mean``/``std`` (size
    ``img_size``) to (B, len(classes)) logits; ``info`` is the folder's ``classifier.json``."""

    model: nn.Module
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    classes: List[str]
    img_size: Tuple[int, int]
    info: Dict[str, Any]


def _init_head(head: nn.Module) -> None:
    """MAE / BEiT fine-tuning head init: tiny weights (trunc-normal std 2e-5), zero bias."""
    from timm.layers import trunc_normal_

    if isinstance(head, nn.Linear):
        trunc_normal_(head.weight, std=2e-5)
        if head.bias is not None:
            nn.init.zeros_(head.bias)


# -- FD student -> timm Beit with per-layer relative position bias ---------------------------------
def beit_from_student(student: nn.Module, *, num_classes: int, global_pool: str = "avg",
                      drop_path_rate: float = 0.1) -> Tuple[nn.Module, Dict[str, Any]]:
    """The FD student as a timm ``Beit`` classifier with per-layer relative position bias.

    Args:
        student: an :class:`~fdistill.models.student.FDStudent` (from ``create_student`` or a run).
        num_classes: classifier outputs (0: no head, features only).
        global_pool: ``avg`` (official FD fine-tuning: mean of the patch tokens, final norm
            replaced by a fresh ``fc_norm``) or ``token`` ([CLS] after the student's final norm).
        drop_path_rate: stochastic depth of the last block (linear from 0).

    Returns:
        ``(model, beit_kwargs)``: ``timm.models.beit.Beit(**beit_kwargs)`` rebuilds the network.
        Its blocks compute exactly the student's token map: ``model.forward_features(x)`` equals
        the student's tokens before its final norm (``avg``) or after it (``token``).
    """
    from timm.models.beit import Beit

    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
    args = dict(student.timm_model_args()) if hasattr(student, "timm_model_args") else {}
    if not args:
        raise TeacherError("the student carries no architecture arguments (build it with create_student)")
    args.update(num_classes=int(num_classes), global_pool=global_pool, drop_path_rate=float(drop_path_rate),
                use_rel_pos_bias=True, use_shared_rel_pos_bias=False)
    args = {k: (list(v) if isinstance(v, tuple) else v) for k, v in args.items()}
    model = Beit(**args)

    sd = {k: v for k, v in student.state_dict().items()
          if k != "mask_token" and not k.startswith("rel_pos_bias.")}
    L = len(model.blocks)
    shared = getattr(student, "rel_pos_bias", None)
    for i in range(L):
        key = f"blocks.{i}.attn.relative_position_bias_table"
        if shared is not None:  # official remap: the shared table into every layer
            sd[key] = shared.relative_position_bias_table.detach().clone()
        elif key not in sd:  # 'ape' student: a zero bias adds nothing
            sd[key] = torch.zeros_like(model.state_dict()[key])
    if global_pool == "avg":
        sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    own = model.state_dict()
    unexpected = sorted(k for k in sd if k not in own)
    shapes = [k for k in sd if k in own and own[k].shape != sd[k].shape]
    if unexpected or shapes:
        raise WeightsError(f"student weights do not fit the fine-tuning Beit: unexpected {unexpected[:8]}, "
                           f"shape mismatch {shapes[:8]}")
    missing = [k for k in own if k not in sd]
    fresh = ("head.", "fc_norm.")
    bad = [k for k in missing if not (k.startswith(fresh) or k.endswith("relative_position_index"))]
    if bad:
        raise WeightsError(f"the student lacks weights the fine-tuning Beit needs: {bad[:8]}")
    model.load_state_dict(sd, strict=False)
    _init_head(model.head)
    model.mean, model.std = tuple(student.mean), tuple(student.std)
    return model, args


# -- the one classifier over a backbone --------------------------------------------------------------
class Classifier(nn.Module):
    """A linear classifier over any :class:`~fdistill.backbone.Backbone`'s token map, in timm's
    contract: ``forward_features`` (B, P+N, C) token map -> ``forward_head``: pooled feature
    (``avg`` = mean of the patch tokens, ``token`` = first prefix token) -> ``fc_norm`` -> ``head``.

    Fine-tuning builds it with ``fc_norm=True`` (a LayerNorm after mean pooling, BEiT/MAE) and a
    fresh head (std 2e-5, as MAE); the loss landscape with ``fc_norm=False`` and the linear head
    it fitted on the frozen features. Input: images normalised with ``backbone.mean``/``std``."""

    def __init__(self, backbone: Backbone, num_classes: int, global_pool: str = "avg", *, fc_norm: bool = True,
                 head: Optional[nn.Linear] = None):
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
        if global_pool == "token" and backbone.num_prefix_tokens == 0:
            raise TeacherError(f"{backbone.name} has no prefix token; use global_pool=avg")
        self.backbone = backbone
        self.global_pool = global_pool
        self.num_classes = int(num_classes)
        use_norm = fc_norm and global_pool == "avg"
        self.fc_norm = nn.LayerNorm(backbone.embed_dim, eps=1e-6) if use_norm else nn.Identity()
        if head is None:
            head = nn.Linear(backbone.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
            _init_head(head)
        self.head = head

    def pool(self, tokens: TokenMap) -> torch.Tensor:
        """(B, C) feature of a token map, after ``fc_norm``."""
        return self.fc_norm(pool_tokens(tokens, self.global_pool))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)  # (B, P+N, C)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, P+N, C) token map -> (B, num_classes) logits, or the (B, C) feature with ``pre_logits``."""
        f = self.pool(TokenMap.from_full(x, self.backbone.num_prefix_tokens))
        return f if pre_logits else self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # forward_tokens, not forward_features: the split token map, without concatenating it first
        return self.head(self.pool(self.backbone.forward_tokens(x)))  # (B, num_classes)


#: the older name of :class:`Classifier`, kept for code that imports it
AdapterClassifier = Classifier


# -- one entry point -------------------------------------------------------------------------------------
def build_classifier(
    backbone: Backbone,
    num_classes: int,
    *,
    global_pool: str = "avg",
    drop_path_rate: float = 0.1,
    source: Optional[Dict[str, Any]] = None,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """A trainable classifier for ``backbone`` (see module docstring) and the ``spec`` dict that
    :func:`rebuild_classifier` needs.

    Args:
        backbone: from ``load_model`` (frozen or not; the classifier is trainable).
        num_classes: number of classes.
        global_pool: ``avg`` (mean of patch tokens) or ``token`` ([CLS]).
        drop_path_rate: stochastic depth of the last block.
        source: ``{"spec": ..., "kwargs": {...}}`` the backbone was loaded with (needed to rebuild
            timm and generic classifiers later).
    """
    from ..models.loading import StudentBackbone

    source = dict(source or {})
    base = dict(num_classes=int(num_classes), global_pool=global_pool, mean=list(backbone.mean),
                std=list(backbone.std), img_size=list(backbone.img_size), source=source)
    if isinstance(backbone, StudentBackbone) and hasattr(backbone.model, "timm_model_args"):
        model, args = beit_from_student(backbone.model, num_classes=num_classes, global_pool=global_pool,
                                        drop_path_rate=drop_path_rate)
        return model, dict(base, kind="beit", args=args)
    timm_name, model = _timm_backbone(backbone)
    if timm_name is not None:
        for p in model.parameters():
            p.requires_grad_(True)
        pool = "token" if global_pool == "token" else "avg"
        if pool == "token" and backbone.num_prefix_tokens == 0:
            raise TeacherError(f"{backbone.name} has no class token; use global_pool=avg")
        model.reset_classifier(int(num_classes), pool)
        _init_head(model.get_classifier())
        if drop_path_rate > 0 and set_drop_path(model, drop_path_rate) == 0:
            log.warning("%s has no drop-path slots; drop_path_rate=%s is ignored", backbone.name, drop_path_rate)
        kwargs = {k: v for k, v in dict(source.get("kwargs") or {}).items() if k not in _TIMM_TEACHER_ONLY}
        return model.train(), dict(base, kind="timm", name=timm_name, model_kwargs=kwargs,
                                   dynamic_img_size=bool(backbone.dynamic_img_size), model_args=_timm_model_args(model))
    backbone.unfreeze()
    model = Classifier(backbone, num_classes, global_pool)
    if drop_path_rate > 0 and set_drop_path(backbone.model, drop_path_rate) == 0:
        log.warning("%s has no timm-style drop-path slots; drop_path_rate=%s is ignored", backbone.name,
                    drop_path_rate)
    return model.train(), dict(base, kind="adapter")


def _timm_backbone(backbone: Backbone) -> Tuple[Optional[str], Optional[nn.Module]]:
    """(timm model name, timm model) of a ``timm:`` teacher or of an FD student that is a timm
    backbone (``student.arch: timm:<model>``, e.g. a Swin); (None, None) otherwise."""
    from ..teachers.timm_teacher import TimmTeacher

    if isinstance(backbone, TimmTeacher) and backbone.name.startswith("timm:"):
        return backbone.name[len("timm:"):], backbone.model
    inner = getattr(backbone, "model", None)
    if hasattr(inner, "timm_model") and str(getattr(inner, "name", "")).startswith("timm:"):
        return inner.name[len("timm:"):], inner.timm_model()
    return None, None


def _timm_model_args(model: nn.Module) -> Optional[Dict[str, Any]]:
    """The ``create_model`` arguments timm recorded for this model (sizes, pooling, norm placement,
    classes), JSON-safe; None where this timm version does not record them."""
    try:
        from timm.models._input import get_model_args
    except ImportError:  # pragma: no cover - older timm
        return None
    args = get_model_args(model)
    return json.loads(json.dumps(args, default=list)) if args else None


def rebuild_classifier(spec: Dict[str, Any], *, trust_recorded_spec: bool = False) -> nn.Module:
    """The (untrained) network a ``classifier.json`` spec describes; load its weights after."""
    kind = spec.get("kind")
    n, pool = int(spec["num_classes"]), spec["global_pool"]
    if kind == "beit":
        from timm.models.beit import Beit

        return Beit(**spec["args"])
    if kind == "timm":
        import timm

        if spec.get("model_args"):  # timm's own record of how the network was built
            return timm.create_model(spec["name"], pretrained=False, **spec["model_args"])
        extra = dict(dynamic_img_size=True) if spec.get("dynamic_img_size") else {}
        try:
            model = timm.create_model(spec["name"], pretrained=False, **spec.get("model_kwargs", {}), **extra)
        except TypeError:
            model = timm.create_model(spec["name"], pretrained=False, **spec.get("model_kwargs", {}))
        model.reset_classifier(n, "token" if pool == "token" else "avg")
        return model
    if kind == "adapter":
        from ..models.loading import load_model

        src = spec.get("source") or {}
        if not src.get("spec"):
            raise WeightsError("classifier.json does not say which model the classifier was built on")
        from ..teachers.trust import check_recorded_spec

        check_recorded_spec(src["spec"], src.get("kwargs"), where="classifier.json", trusted=trust_recorded_spec)
        backbone = load_model(src["spec"], frozen=False, **(src.get("kwargs") or {}))
        return Classifier(backbone, n, pool)
    raise WeightsError(f"unknown classifier kind {kind!r} in classifier.json")


def save_classifier_spec(spec: Dict[str, Any], classes: Sequence[str], out_dir: str | os.PathLike) -> Path:
    """Write ``classifier.json`` atomically."""
    from ..io import atomic_write_text

    data = dict(format=CLASSIFIER_FORMAT, version=1, classes=list(classes), **spec)
    return atomic_write_text(Path(out_dir) / "classifier.json", json.dumps(data, indent=2))


def load_classifier(path: str | os.PathLike, *, which: str = "best", device: str | torch.device = "cpu",
                    trust_recorded_spec: bool = False) -> LoadedClassifier:
    """Rebuild a fine-tuned classifier from a ``fdistill finetune`` output folder.

    Args:
        path: the output folder, or one of its ``model_*.safetensors`` files.
        which: ``best`` (highest validation top-1; falls back to ``last``) or ``last``.
        trust_recorded_spec: build a recorded backbone spec that runs code (``python:``,
            ``trust_remote_code``); refused otherwise (:mod:`fdistill.teachers.trust`).

    Returns:
        :class:`LoadedClassifier` ``(model, mean, std, classes, img_size, info)``, the model in
        eval mode: images normalised with ``mean``/``std`` -> logits.
    """
    p = Path(path).expanduser()
    if p.is_file():
        folder, weights = p.parent, p
    else:
        folder = p
        if not (folder / "classifier.json").is_file():
            raise WeightsError(f"{folder} is not a fine-tuning output folder (no classifier.json)")
        order = ["model_best.safetensors", "model_last.safetensors"] if which == "best" else ["model_last.safetensors"]
        weights = next((folder / w for w in order if (folder / w).is_file()), None)
        if weights is None:
            raise WeightsError(f"{folder} holds no {' or '.join(order)} (fine-tuning not finished an epoch?)")
    spec_path = folder / "classifier.json"
    if not spec_path.is_file():
        raise WeightsError(f"{spec_path} not found next to {weights.name}")
    try:
        info = json.loads(spec_path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{spec_path} is not valid JSON: {e}") from e
    if info.get("format") != CLASSIFIER_FORMAT:
        raise WeightsError(f"{spec_path} is not an fdistill classifier description")
    model = rebuild_classifier(info, trust_recorded_spec=trust_recorded_spec)
    from ..weights import load_into

    load_into(model, load_state_dict_file(weights), what=f"classifier {info.get('kind')} from {weights}")
    model.to(device).eval()
    return LoadedClassifier(model, tuple(info["mean"]), tuple(info["std"]), list(info.get("classes") or []),
                            tuple(info["img_size"]), info)
