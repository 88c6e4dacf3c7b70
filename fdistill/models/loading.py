"""``load_model(spec)``: any model fdistill can load, behind one interface
(:class:`~fdistill.backbone.Backbone`).

Evaluation and diagnostics take "a model" in one of these forms:

* a teacher spec: ``timm:...``, ``open_clip:...``, ``hf:...``, ``python:...``;
* a distillation run folder (its newest valid checkpoint) or a checkpoint file: the FD student;
* an exported student folder (``config.json`` + ``model.safetensors``, see ``fdistill export``).

All come back as a :class:`~fdistill.backbone.Backbone` (``forward_tokens``, ``forward_features``,
mean/std, grid, prefix tokens), frozen unless ``frozen=False``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from ..backbone import Backbone, TokenMap, to_2tuple
from ..errors import TeacherError

from .student import FDStudent


class StudentBackbone(Backbone):
    """An FD student seen through the backbone interface ([CLS] + patch tokens after the norm).

    ``projector`` (the FD projector, or None) and ``teacher_info`` (the teacher's spec and kwargs
    from the run) ride along for evaluations that need them, e.g. student zero-shot."""

    def __init__(self, student: FDStudent, *, name: str, projector: Optional[nn.Module] = None,
                 teacher_info: Optional[Dict[str, Any]] = None, config: Optional[Dict[str, Any]] = None):
        super().__init__(
            student, name=name, embed_dim=student.embed_dim, patch_size=student.patch_size,
            num_prefix_tokens=1, mean=student.mean, std=student.std, img_size=student.img_size,
            # other sizes (multiples of the patch) through the shared table / a resampled embedding
            dynamic_img_size=hasattr(student, "input_grid") and getattr(student, "pos_embed_type", "rpb") != "rpb",
        )
        self.projector = projector
        if projector is not None:
            for p in projector.parameters():
                p.requires_grad_(False)
        self.teacher_info = dict(teacher_info or {})
        self.config = dict(config or {})

    def accepts_size(self, img_size) -> bool:
        if not self.dynamic_img_size:
            return super().accepts_size(img_size)
        try:
            self.model.input_grid(to_2tuple(img_size))
        except ValueError:
            return False
        return True

    def _forward_tokens(self, x: torch.Tensor) -> TokenMap:
        t = self.model.forward_tokens(x)  # (B, 1+N, C)
        grid = self.model.input_grid(x.shape[-2:]) if self.dynamic_img_size else self.model.grid_size
        return TokenMap(t[:, :1], t[:, 1:], tuple(grid))


#: the older name of :class:`StudentBackbone`, kept for code that imports it
StudentAdapter = StudentBackbone


class HeadAdapter(Backbone):
    """A multi-teacher student (any backbone of it: the run's :class:`StudentBackbone`, or its timm
    export) seen through one teacher's head (:mod:`fdistill.multi`): tokens = ``head(the base's
    [CLS] + patch tokens)``, mapped back to that teacher's own feature space by the inverse of its
    target normalisation where it has one (``stats``, ``phi_s``, ``none``), else left in the
    normalised space (``standardize``, ``l2``). RADIO's "adaptor" view: CLIP-like or DINO-like
    features from the one network. ``head_info``: the run's record of that teacher (``spec``,
    ``kwargs``, ``norm``, ``targets``, ...), e.g. for zero-shot through a CLIP head."""

    def __init__(self, base: Backbone, head: nn.Module, *, head_name: str, trained_prefix: bool = True,
                 head_info: Optional[Dict[str, Any]] = None):
        super().__init__(base.model, name=f"{base.name}[{head_name}]", embed_dim=int(head.norm.dim),
                         patch_size=base.patch_size, num_prefix_tokens=1 if trained_prefix else 0, mean=base.mean,
                         std=base.std, img_size=base.img_size, dynamic_img_size=base.dynamic_img_size)
        self.base, self.head, self.head_name = base, head, head_name
        for p in head.parameters():
            p.requires_grad_(False)
        self.head_info = dict(head_info or {})
        # a teacher without a [CLS] target (a CNN, or targets: spatial) never trained the head's
        # [CLS] output: it is left out, so pooled features are the mean patch token
        self.trained_prefix = bool(trained_prefix)
        self.teacher_space = head.norm_kind in ("stats", "phi_s", "none")

    def _forward_tokens(self, x: torch.Tensor) -> TokenMap:
        t = self.base.forward_tokens(x)
        tokens = torch.cat((t.prefix[:, :1], t.patches), dim=1)  # (B, 1+N, C_student)
        y = self.head(tokens)  # (B, 1+N, C_teacher), the normalised target space
        if self.teacher_space:
            y = self.head.norm.inverse(y)
        return TokenMap(y[:, :1] if self.trained_prefix else None, y[:, 1:], tuple(t.grid))


def with_head(base: Backbone, teachers: Any, heads_state: Dict[str, torch.Tensor], head: str, *, name: str) -> HeadAdapter:
    """``base`` (a multi-teacher student's backbone) through ``head``: its record in ``teachers``
    (the run's ``teacher.teachers`` list) and its trained weights + statistics in ``heads_state``
    (the checkpoint's ``projector`` part, or an export's ``heads.safetensors``)."""
    from ..multi.distiller import TeacherHead

    by_name = {t.get("name"): t for t in (teachers or [])}
    if not by_name:
        raise TeacherError(f"{name} is a single-teacher run: it has no heads (head={head!r} needs a run with teachers:)")
    if head not in by_name:
        raise TeacherError(f"{name} has no head {head!r}; its heads are {sorted(by_name)}")
    t = by_name[head]
    module = TeacherHead(base.embed_dim, int(t["embed_dim"]), kind=t.get("head", "linear"),
                         norm=t.get("norm", "standardize"))
    prefix = f"{head}."
    module.load_state_dict({k[len(prefix):]: v for k, v in heads_state.items() if k.startswith(prefix)})
    cls_target = t.get("cls_target") or ("teacher" if int(t.get("num_prefix_tokens", 1)) > 0 else "none")
    trained_prefix = t.get("targets", "full") != "spatial" and cls_target != "none"
    return HeadAdapter(base, module.eval(), head_name=head, trained_prefix=trained_prefix, head_info=t)


def student_from_checkpoint(ckpt: Dict[str, Any], *, name: str, head: Optional[str] = None) -> StudentBackbone:
    """Rebuild the student (and projector) of an fdistill distillation checkpoint dict
    (the FD ViT, or a ``timm:`` student such as Swin), drop path off; with ``head``, the student
    seen through that teacher's head of a multi-teacher run (:class:`HeadAdapter`)."""
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
    backbone = StudentBackbone(student, name=name, projector=proj, teacher_info=ckpt.get("teacher"),
                             config=ckpt.get("config"))
    if head is not None:
        return with_head(backbone, (ckpt.get("teacher") or {}).get("teachers"), ckpt["model"].get("projector", {}),
                         head, name=name)
    return backbone


def load_model(spec: str | Path, *, frozen: bool = True, **kwargs) -> Backbone:
    """Load any model fdistill knows as a backbone (see module docstring).

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
        backbone = _load_path(path, head=head)
    else:
        if ":" not in spec_s:
            raise TeacherError(
                f"{spec_s!r} is neither an existing path (run folder, checkpoint, export) nor a model spec "
                "like 'timm:<name>', 'open_clip:<arch>/<tag>', 'hf:<repo>', 'python:<file>:<factory>'")
        backbone = create_teacher(spec_s, **kwargs)
    return backbone if frozen else backbone.unfreeze()


def _load_path(path: Path, head: Optional[str] = None) -> Backbone:
    from ..engine.checkpoint import latest_valid_checkpoint, load_checkpoint

    if path.is_dir() and (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
        if "architecture" in cfg:  # a timm-format export
            from ..teachers.timm_teacher import create_timm_teacher

            base = create_timm_teacher(f"local-dir:{path.resolve()}", pretrained=True, dynamic_img_size=False)
            if head is None:
                return base
            return _export_head(path, base, head)
    if path.is_dir():
        ckpt_path = latest_valid_checkpoint(path, task="distill")
        if ckpt_path is None:
            raise TeacherError(f"{path} holds no valid fdistill checkpoint (looked in {path}/checkpoints)")
        return student_from_checkpoint(load_checkpoint(ckpt_path, task="distill"), name=str(ckpt_path), head=head)
    if path.suffix in (".pt", ".pth", ".ckpt"):
        return student_from_checkpoint(load_checkpoint(path, task="distill"), name=str(path), head=head)
    raise TeacherError(f"don't know how to load {path}: expected a run folder, a .pt checkpoint or an export folder")


def _export_head(path: Path, base: Backbone, head: str) -> HeadAdapter:
    """A timm export of a multi-teacher student (``fdistill export``) through one of its heads
    (``heads.safetensors`` + the teachers recorded in ``fdistill_export.json``)."""
    from safetensors.torch import load_file

    info_file, heads_file = path / "fdistill_export.json", path / "heads.safetensors"
    if not heads_file.is_file() or not info_file.is_file():
        raise TeacherError(f"{path} has no heads.safetensors: it is not the export of a multi-teacher run "
                           f"(head={head!r})")
    info = json.loads(info_file.read_text())
    return with_head(base, (info.get("teacher") or {}).get("teachers"), load_file(str(heads_file)), head,
                     name=str(path))
