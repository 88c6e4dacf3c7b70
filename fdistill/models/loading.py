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


class HeadAdapter(StudentAdapter):
    """A multi-teacher student seen through one teacher's head (:mod:`fdistill.multi`): tokens =
    ``head(student tokens)``, mapped back to that teacher's own feature space by the inverse of
    its target normalisation where it has one (``stats``, ``phi_s``, ``none``), else left in the
    normalised space (``standardize``, ``l2``). RADIO's "adaptor" view: CLIP-like or DINO-like
    features from the one network."""

    def __init__(self, student: FDStudent, head: nn.Module, *, head_name: str, name: str, trained_prefix: bool = True,
                 teacher_info: Optional[Dict[str, Any]] = None, config: Optional[Dict[str, Any]] = None):
        super().__init__(student, name=f"{name}[{head_name}]", teacher_info=teacher_info, config=config)
        self.head, self.head_name = head, head_name
        # a teacher without a [CLS] target (a CNN, or targets: spatial) never trained the head's
        # [CLS] output: it is left out, so pooled features are the mean patch token
        self.trained_prefix = bool(trained_prefix)
        self.num_prefix_tokens = 1 if self.trained_prefix else 0
        for p in head.parameters():
            p.requires_grad_(False)
        self.embed_dim = int(head.norm.dim)
        self.teacher_space = head.norm_kind in ("stats", "phi_s", "none")

    def _forward_tokens(self, x: torch.Tensor) -> TeacherTokens:
        y = self.head(self.model.forward_tokens(x))  # (B, 1+N, C_teacher), the normalised target space
        if self.teacher_space:
            y = self.head.norm.inverse(y)
        return TeacherTokens(y[:, :1] if self.trained_prefix else None, y[:, 1:], tuple(self.model.grid_size))


def _head_of(ckpt: Dict[str, Any], head: str, student_dim: int, name: str):
    """``(module, trained_prefix)``: the trained head ``head`` (with its fitted normaliser) of a
    multi-teacher checkpoint, and whether its [CLS] output was trained."""
    from ..multi.distiller import TeacherHead

    teachers = {t.get("name"): t for t in (ckpt.get("teacher") or {}).get("teachers") or []}
    if not teachers:
        raise TeacherError(f"{name} is a single-teacher run: it has no heads (head={head!r} needs a run with teachers:)")
    if head not in teachers:
        raise TeacherError(f"{name} has no head {head!r}; its heads are {sorted(teachers)}")
    t = teachers[head]
    module = TeacherHead(student_dim, int(t["embed_dim"]), kind=t.get("head", "linear"),
                         norm=t.get("norm", "standardize"))
    prefix = f"{head}."
    state = {k[len(prefix):]: v for k, v in ckpt["model"]["projector"].items() if k.startswith(prefix)}
    module.load_state_dict(state)
    cls_target = t.get("cls_target") or ("teacher" if int(t.get("num_prefix_tokens", 1)) > 0 else "none")
    trained_prefix = t.get("targets", "full") != "spatial" and cls_target != "none"
    return module.eval(), trained_prefix


def student_from_checkpoint(ckpt: Dict[str, Any], *, name: str, head: Optional[str] = None) -> StudentAdapter:
    """Rebuild the student (and projector) of an fdistill distillation checkpoint dict
    (the FD ViT, or a ``timm:`` student such as Swin), drop path off; with ``head``, the student
    seen through that teacher's head of a multi-teacher run (:class:`HeadAdapter`)."""
    from ..engine.export import rebuild_student
    from .projector import TokenProjector

    if ckpt.get("format") != "fdistill-checkpoint":
        raise TeacherError(f"{name} is not an fdistill distillation checkpoint")
    student = rebuild_student(ckpt)
    if head is not None:
        module, trained_prefix = _head_of(ckpt, head, student.embed_dim, name)
        return HeadAdapter(student, module, head_name=head, name=name, trained_prefix=trained_prefix,
                           teacher_info=ckpt.get("teacher"), config=ckpt.get("config"))
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
        head = kwargs.pop("head", None)
        if kwargs:
            raise TeacherError(f"{spec_s} describes itself; it takes no keyword arguments but head= "
                               f"(got {sorted(kwargs)})")
        adapter = _load_path(path, head=head)
    else:
        if ":" not in spec_s:
            raise TeacherError(
                f"{spec_s!r} is neither an existing path (run folder, checkpoint, export) nor a model spec "
                "like 'timm:<name>', 'open_clip:<arch>/<tag>', 'hf:<repo>', 'python:<file>:<factory>'")
        adapter = create_teacher(spec_s, **kwargs)
    return adapter if frozen else adapter.unfreeze()


def _load_path(path: Path, head: Optional[str] = None) -> Teacher:
    from ..engine.checkpoint import latest_valid_checkpoint, load_checkpoint

    if head is not None and not (path.is_dir() and not (path / "config.json").is_file()) and \
            path.suffix not in (".pt", ".pth", ".ckpt"):
        raise TeacherError(f"head={head!r} needs a multi-teacher run folder or checkpoint, not {path}")
    if path.is_dir() and (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
        if "architecture" in cfg:  # a timm-format export
            from ..teachers.timm_teacher import create_timm_teacher

            return create_timm_teacher(f"local-dir:{path.resolve()}", pretrained=True, dynamic_img_size=False)
    if path.is_dir():
        ckpt_path = latest_valid_checkpoint(path, task="distill")
        if ckpt_path is None:
            raise TeacherError(f"{path} holds no valid fdistill checkpoint (looked in {path}/checkpoints)")
        return student_from_checkpoint(load_checkpoint(ckpt_path, task="distill"), name=str(ckpt_path), head=head)
    if path.suffix in (".pt", ".pth", ".ckpt"):
        return student_from_checkpoint(load_checkpoint(path, task="distill"), name=str(path), head=head)
    raise TeacherError(f"don't know how to load {path}: expected a run folder, a .pt checkpoint or an export folder")
