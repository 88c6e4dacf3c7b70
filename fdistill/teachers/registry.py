"""``create_teacher(spec)``: the spec's prefix picks the adapter."""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Tuple

import torch

from .base import Teacher, TeacherError

#: prefix -> (module, factory function); imported lazily so that unused libraries cost nothing
TEACHER_SOURCES: Dict[str, Tuple[str, str]] = {
    "timm": ("fdistill.teachers.timm_teacher", "create_timm_teacher"),
    "open_clip": ("fdistill.teachers.open_clip_teacher", "create_open_clip_teacher"),
    "hf": ("fdistill.teachers.hf_teacher", "create_hf_teacher"),
    "python": ("fdistill.teachers.python_teacher", "create_python_teacher"),
}
_CUSTOM: Dict[str, Callable[..., Teacher]] = {}


def register_teacher_source(prefix: str, factory: Callable[..., Teacher]) -> None:
    """Add a spec prefix: ``factory(rest_of_spec, **kwargs)`` must return a :class:`Teacher`."""
    _CUSTOM[prefix] = factory


def create_teacher(spec: str, **kwargs) -> Teacher:
    """Build a frozen teacher from a spec string, e.g. ``timm:vit_base_patch16_clip_quickgelu_224.openai``,
    ``open_clip:ViT-B-16/openai``, ``hf:openai/clip-vit-base-patch16``,
    ``python:my_models.py:build_resnet`` (with ``weights=PATH``, ``feature_module=...``)."""
    if isinstance(spec, Teacher):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise TeacherError(
            f"teacher spec {spec!r} must look like '<source>:<name>' with source one of "
            f"{sorted(set(TEACHER_SOURCES) | set(_CUSTOM))}"
        )
    prefix, rest = spec.split(":", 1)
    if prefix in _CUSTOM:
        return _CUSTOM[prefix](rest, **kwargs)
    if prefix not in TEACHER_SOURCES:
        raise TeacherError(
            f"unknown teacher source {prefix!r} in spec {spec!r}; known: {sorted(set(TEACHER_SOURCES) | set(_CUSTOM))}"
        )
    if not rest:
        raise TeacherError(f"teacher spec {spec!r} names no model after '{prefix}:'")
    module, fn = TEACHER_SOURCES[prefix]
    try:
        factory = getattr(importlib.import_module(module), fn)
    except ImportError as e:
        raise TeacherError(f"teacher source {prefix!r} needs a library that is not installed: {e}") from e
    teacher = factory(rest, **kwargs)
    check_finite_weights(teacher, spec)
    return teacher


def check_finite_weights(teacher: Teacher, spec: str) -> None:
    """Refuse a model whose weights hold NaN or Inf: every feature would be non-finite, and a
    distillation run would stop after ``train.max_nonfinite`` steps with a message blaming the
    learning rate. (A corrupted checkpoint or an exported diverged run.)"""
    module = getattr(teacher, "model", teacher)
    if not isinstance(module, torch.nn.Module):
        return
    bad = [n for n, t in list(module.named_parameters()) + list(module.named_buffers())
           if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all())]  # meta: no values
    if bad:
        raise TeacherError(f"the weights of {spec!r} hold non-finite values (NaN/Inf) in {len(bad)} tensor(s), e.g. "
                           f"{', '.join(bad[:3])}: the checkpoint is corrupt or comes from a diverged run")
