"""Models for the diagnostics: anything ``load_model`` loads, plus fine-tuned classifier folders.

A :class:`DiagnosticModel` is a record, not a wrapper: a model's label and spec, its
:class:`~fdistill.backbone.Backbone` (token geometry, mean/std, ``forward_tokens``), and, for a
fine-tuning output folder, the classifier that runs (normalised images -> logits). A timm or
BEiT classifier gets its backbone as a :class:`~fdistill.teachers.timm_teacher.TimmTeacher`
over the same network (shared weights), so its geometry is found the way any timm model's is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..backbone import Backbone, to_2tuple
from ..errors import TeacherError
from ..images import to_float_images

Size2 = Tuple[int, int]


@dataclass
class DiagnosticModel:
    """One model under diagnosis (see module docstring). ``img_size``: the input size it is
    diagnosed at; ``grid``: its patch-token grid there."""

    label: str
    spec: str
    backbone: Backbone
    img_size: Size2
    grid: Optional[Size2]
    classifier: Optional[nn.Module] = None
    classes: List[str] = field(default_factory=list)

    @property
    def module(self) -> nn.Module:
        """Everything that runs (attention is captured inside it; moved to the device)."""
        return self.classifier if self.classifier is not None else self.backbone

    @property
    def kind(self) -> str:
        return "classifier" if self.classifier is not None else "adapter"

    @property
    def mean(self) -> Tuple[float, ...]:
        return self.backbone.mean

    @property
    def std(self) -> Tuple[float, ...]:
        return self.backbone.std

    @property
    def patch_size(self) -> Optional[int]:
        return self.backbone.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return self.backbone.num_prefix_tokens

    def run(self, images: torch.Tensor):
        """(B, 3, H, W) normalised images -> the network's output (tokens or logits)."""
        if self.classifier is not None:
            return self.classifier(images)
        return self.backbone.forward_tokens(images)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] images -> normalised with the model's mean/std (float32)."""
        return self.backbone.normalize(to_float_images(images))

    def to(self, device) -> "DiagnosticModel":
        self.module.to(device)
        return self

    def describe(self) -> Dict[str, Any]:
        return dict(label=self.label, spec=self.spec, kind=self.kind, img_size=list(self.img_size),
                    patch_size=self.patch_size, num_prefix_tokens=self.num_prefix_tokens,
                    grid=None if self.grid is None else list(self.grid))


def _is_classifier_path(path: Path) -> bool:
    if path.is_dir():
        return (path / "classifier.json").is_file()
    return path.suffix == ".safetensors" and (path.parent / "classifier.json").is_file()


def _classifier_backbone(model: nn.Module, spec: str, mean, std) -> Backbone:
    """The backbone inside a rebuilt classifier: a :class:`~fdistill.eval.classifier.Classifier`'s
    own, or a timm classifier seen as a timm backbone (the same network, its weights shared)."""
    inner = next((m for m in model.modules() if isinstance(m, Backbone)), None)
    if inner is not None:
        return inner
    from ..teachers.timm_teacher import TimmTeacher

    return TimmTeacher(model, name=str(spec), mean=tuple(mean), std=tuple(std))


def load_diagnostic_model(spec: str, *, kwargs: Optional[Dict[str, Any]] = None, label: Optional[str] = None,
                          device: str | torch.device = "cpu") -> DiagnosticModel:
    """Load ``spec`` (teacher spec, run folder / checkpoint, export folder, or a fine-tuning
    output folder with ``classifier.json``) for the diagnostics, frozen and in eval mode."""
    from ..models.loading import load_model

    kwargs = dict(kwargs or {})
    path = Path(str(spec)).expanduser()
    if path.exists() and _is_classifier_path(path):
        if kwargs:
            raise TeacherError(f"{spec} describes itself; it takes no keyword arguments (got {sorted(kwargs)})")
        from ..eval.classifier import load_classifier

        lc = load_classifier(path, device=device)
        model = lc.model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        img_size = to_2tuple(lc.img_size)
        backbone = _classifier_backbone(model, spec, lc.mean, lc.std)
        return DiagnosticModel(label=label or _short_label(str(spec)), spec=str(spec), backbone=backbone,
                               img_size=img_size, grid=_grid_or_none(backbone, img_size), classifier=model,
                               classes=list(lc.classes))
    backbone = load_model(str(spec), frozen=True, **kwargs)
    backbone.to(device)
    return DiagnosticModel(label=label or _short_label(str(spec)), spec=str(spec), backbone=backbone,
                           img_size=tuple(backbone.img_size), grid=backbone.grid_size(backbone.img_size))


def _grid_or_none(backbone: Backbone, img_size: Size2) -> Optional[Size2]:
    """The token grid at ``img_size``; None for a network whose output is not a token map or a
    spatial map (a classifier whose trunk gives pooled features only)."""
    try:
        return backbone.grid_size(img_size)
    except TeacherError:
        return None


def _short_label(spec: str) -> str:
    """A readable figure label: the spec, or a path's last two components."""
    p = Path(spec)
    if p.exists():
        parts = p.resolve().parts
        return "/".join(parts[-2:]) if len(parts) >= 2 else spec
    return spec
