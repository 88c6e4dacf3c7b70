"""``load_model(spec)``: any model fdistill can load, behind the teacher-adapter interface.

Evaluation and diagnostics take "a model" in one of these forms:

* a teacher spec: ``timm:...``, ``open_clip:...``, ``hf:...``, ``python:...``;
* a distillation run folder (its newest valid checkpoint) or a checkpoint file: the FD student;
* an exported student folder (``config.json`` + ``model.safetensors``, see ``fdistill export``).

All come back as a :class:`~fdistill.teachers.Teacher` adapter (``forward_tokens``, mean/std,
grid, prefix tokens), frozen unless ``frozen=False``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from ..teachers.base import Teacher, TeacherError, TeacherTokens
from .student import FDStudent


class StudentAdapter(Teacher):
    """An FD student seen through the adapter interface ([CLS] + patch tokens after the norm).

    ``projector`` (the FD projector, or None) and ``teacher_info`` (the teacher's spec and kwargs
    from the run) ride along for evaluations that need them, e.g. student zero-shot."""

    def __init__(self, student: FDStudent, *, name: str, projector: Optional[nn.Module] = None,
                 teacher_info: Optional[Dict[str, Any]] = None, config: Optional[Dict[str, Any]] = None):
        super().__init__(
            student, name=name, embed_dim=student.embed_dim, patch_size=student.patch_size,
            num_prefix_tokens=1, mean=student.mean, std=student.std, img_size=student.img_size,
        )
        self.projector = projector
        if projector is not None:
            for p in projector.parameters():
                p.requires_grad_(False)
        self.teacher_info = dict(teacher_info or {})
        self.config = dict(config or {})

    def _forward_tokens(self, x: torch.Tensor) -> TeacherTokens:
        t = self.model.forward_tokens(x)  # (B, 1+N, C)
        return TeacherTokens(t[:, :1], t[:, 1:], tuple(self.model.grid_size))


def student_from_checkpoint(ckpt: Dict[str, Any], *, name: str) -> StudentAdapter:
    """Rebuild the student (and projector) of an fdistill distillation checkpoint dict
    (the FD ViT, or a ``timm:`` student such as Swin), drop path off."""
    from ..engine.export import rebuild_student
    from .projector import TokenProjector

    if ckpt.get("format") != "fdistill-checkpoint":
        raise TeacherError(f"{name} is not an fdistill distillation checkpoint")
    student = rebuild_student(ckpt)
    proj = None
    if "weight" in ckpt["model"].get("projector", {}):  # FD's one projector (a multi-teacher run has heads)
        w = ckpt["model"]["projector"]["weight"]
        proj = TokenProjector(w.shape[1], w.shape[0])
        proj.load_state_dict(ckpt["model"]["projector"])
    return StudentAdapter(student, name=name, projector=proj, teacher_info=ckpt.get("teacher"),
                          config=ckpt.get("config"))


def load_model(spec: str | Path, *, frozen: bool = True, **kwargs) -> Teacher:
    """Load any model fdistill knows as an adapter (see module docstring).

    ``kwargs`` go to the teacher factory for teacher specs (e.g. ``weights=``, ``checkpoint=``,
    ``pretrained=``); they are rejected for runs and exports, which describe themselves."""
    from ..teachers import create_teacher

    spec_s = str(spec)
    path = Path(spec_s).expanduser()
    if path.exists():
        if kwargs:
            raise TeacherError(f"{spec_s} describes itself; it takes no keyword arguments (got {sorted(kwargs)})")
        adapter = _load_path(path)
    else:
        if ":" not in spec_s:
            raise TeacherError(
                f"{spec_s!r} is neither an existing path (run folder, checkpoint, export) nor a model spec "
                "like 'timm:<name>', 'open_clip:<arch>/<tag>', 'hf:<repo>', 'python:<file>:<factory>'")
        adapter = create_teacher(spec_s, **kwargs)
    return adapter if frozen else adapter.unfreeze()


def _load_path(path: Path) -> Teacher:
    from ..engine.checkpoint import latest_valid_checkpoint, load_checkpoint

    if path.is_dir() and (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
        if "architecture" in cfg:  # a timm-format export
            from ..teachers.timm_teacher import create_timm_teacher

            return create_timm_teacher(f"local-dir:{path.resolve()}", pretrained=True, dynamic_img_size=False)
    if path.is_dir():
        ckpt_path = latest_valid_checkpoint(path, task="distill")
        if ckpt_path is None:
            raise TeacherError(f"{path} holds no valid fdistill checkpoint (looked in {path}/checkpoints)")
        return student_from_checkpoint(load_checkpoint(ckpt_path, task="distill"), name=str(ckpt_path))
    if path.suffix in (".pt", ".pth", ".ckpt"):
        return student_from_checkpoint(load_checkpoint(path, task="distill"), name=str(path))
    raise TeacherError(f"don't know how to load {path}: expected a run folder, a .pt checkpoint or an export folder")
