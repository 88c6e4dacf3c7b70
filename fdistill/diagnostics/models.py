"""Models for the diagnostics: anything ``load_model`` loads, plus fine-tuned classifier folders.

A :class:`DiagnosticModel` gives each diagnostic what it needs, whatever the model is:

* ``run(images)``: normalised images through the network (attention is captured while it runs);
* the token geometry (patch size, prefix tokens, grid) for distances and maps;
* ``classifier`` (normalised images -> logits) when the model is a fine-tuned classifier;
  otherwise ``adapter`` (a :class:`~fdistill.teachers.Teacher`) for a linear head to be fitted.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..images import normalize_images, to_float_images
from ..teachers.base import Teacher, TeacherError, to_2tuple

Size2 = Tuple[int, int]


@dataclass
class DiagnosticModel:
    """One model under diagnosis (see module docstring)."""

    label: str
    spec: str
    module: nn.Module  # everything that runs (moved to the device)
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    img_size: Size2
    patch_size: Optional[int]
    num_prefix_tokens: int
    grid: Optional[Size2]
    adapter: Optional[Teacher] = None
    classifier: Optional[nn.Module] = None
    classes: List[str] = field(default_factory=list)
    kind: str = "adapter"  # "adapter" | "classifier"

    def run(self, images: torch.Tensor):
        """(B, 3, H, W) normalised images -> the network's output (tokens or logits)."""
        if self.classifier is not None:
            return self.classifier(images)
        return self.adapter.forward_tokens(images)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] images -> normalised with the model's mean/std (float32)."""
        return normalize_images(to_float_images(images), self.mean, self.std)

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


def _timm_geometry(model: nn.Module, img_size: Size2) -> Tuple[Optional[int], int, Optional[Size2]]:
    """(patch size, prefix tokens, grid) of a timm ViT-like classifier (ViT, BEiT, EVA)."""
    pe = getattr(model, "patch_embed", None)
    if pe is None or not hasattr(pe, "patch_size"):
        return None, 0, None
    ps = to_2tuple(pe.patch_size)
    if hasattr(pe, "dynamic_feat_size"):
        grid = tuple(pe.dynamic_feat_size(img_size))
    else:
        grid = (img_size[0] // ps[0], img_size[1] // ps[1])
    prefix = getattr(model, "num_prefix_tokens", None)
    if prefix is None:
        prefix = int(getattr(model, "cls_token", None) is not None)
    return ps[0], int(prefix), grid


def _find_adapter(module: nn.Module) -> Optional[Teacher]:
    return next((m for m in module.modules() if isinstance(m, Teacher)), None)


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
        inner = _find_adapter(model)
        if inner is not None:
            ps, prefix, grid = inner.patch_size, inner.num_prefix_tokens, inner.grid_size(img_size)
        else:
            ps, prefix, grid = _timm_geometry(model, img_size)
        return DiagnosticModel(label=label or _short_label(str(spec)), spec=str(spec), module=model,
                               mean=tuple(lc.mean), std=tuple(lc.std), img_size=img_size, patch_size=ps,
                               num_prefix_tokens=prefix, grid=grid, classifier=model, adapter=inner,
                               classes=list(lc.classes), kind="classifier")
    adapter = load_model(str(spec), frozen=True, **kwargs)
    adapter.to(device)
    grid = adapter.grid_size(adapter.img_size)
    return DiagnosticModel(label=label or _short_label(str(spec)), spec=str(spec), module=adapter,
                           mean=tuple(adapter.mean), std=tuple(adapter.std), img_size=tuple(adapter.img_size),
                           patch_size=adapter.patch_size, num_prefix_tokens=adapter.num_prefix_tokens, grid=grid,
                           adapter=adapter, kind="adapter")


def _short_label(spec: str) -> str:
    """A readable figure label: the spec, or a path's last two components."""
    p = Path(spec)
    if p.exists():
        parts = p.resolve().parts
        return "/".join(parts[-2:]) if len(parts) >= 2 else spec
    return spec


def parse_model_kwargs(text: Optional[str]) -> Dict[str, Any]:
    """``--model-kwargs`` JSON object -> dict (clear error for anything else)."""
    if not text:
        return {}
    try:
        val = json.loads(text)
    except json.JSONDecodeError as e:
        raise TeacherError(f"--model-kwargs must be a JSON object, e.g. '{{\"pretrained\": false}}': {e}") from None
    if not isinstance(val, dict):
        raise TeacherError(f"--model-kwargs must be a JSON object, got {type(val).__name__}")
    return val
