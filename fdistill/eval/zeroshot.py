"""Zero-shot classification with a CLIP text tower (paper Table 1's "zero-shot" column: the FD
student keeps most of the CLIP teacher's zero-shot accuracy, 68.6 -> 68.0 on ImageNet for ViT-B/16).

Class embeddings (CLIP, Radford et al. 2021, Sec. 3.1.4): every class name goes into every
prompt template, through the text tower; the embeddings are L2-normalised, averaged per class
and normalised again -> a (D, C) classifier. An image embedding, normalised, scores every
class by cosine similarity; top-1 / top-5 follow.

Models:

* a CLIP model with its text tower: ``open_clip:`` and ``hf:`` (full ``CLIPModel``) backbones give
  ``encode_text`` / ``encode_image`` / ``embed_tokens`` themselves;
* a timm CLIP image tower (``timm:vit_base_patch16_clip_quickgelu_224.openai``) with its projection head:
  the image embedding is the tower's own ``forward_head``; the text tower must come from
  ``text_model`` (e.g. ``open_clip:ViT-B-16/openai``);
* an **FD student distilled from a CLIP teacher**: the student's tokens go through the FD
  projector, which predicts the teacher's *normalised* tokens (LayerNorm without affine per
  token, the FD target, paper Sec. 3.1). The per-token mean and standard deviation that this
  normalisation removed are not predicted, so they are put back with the teacher's own
  statistics measured on the evaluation images (the dataset average of the [CLS] token's
  channel mean and std, and of the patch tokens'; no labels are used). The de-normalised map
  then goes through the *teacher's* pooling and visual projection (``embed_tokens``), and is
  scored against the same text embeddings. The teacher is evaluated in the same pass, so both
  numbers come side by side.
"""
from __future__ import annotations

import logging
import re
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbone import Backbone, TokenMap
from ..errors import TeacherError
from ..precision import autocast
from .data import model_inputs
from .knn import topk_accuracy

log = logging.getLogger(__name__)

__all__ = ["SIMPLE_TEMPLATES", "load_templates", "resolve_classnames", "text_classifier", "ClipView",
           "clip_view", "zero_shot", "zero_shot_student", "denormalize_tokens"]

#: a short built-in template set (ours): cheap to encode, a few points below the 80 OpenAI prompts
SIMPLE_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a close-up photo of a {}.",
    "a drawing of a {}.",
    "a rendering of a {}.",
)
_WNID = re.compile(r"^n\d{8}$")


def load_templates(which: str | Sequence[str] = "openai") -> List[str]:
    """``openai`` (the 80 ImageNet prompts, ``openai_imagenet_templates.txt``), ``simple``
    (:data:`SIMPLE_TEMPLATES`), a text file (one template per line, ``{}`` for the class name,
    ``#`` comments), or a list of templates."""
    if not isinstance(which, str):
        out = list(which)
    elif which == "simple":
        out = list(SIMPLE_TEMPLATES)
    else:
        if which == "openai":
            text = resources.files("fdistill.eval").joinpath("openai_imagenet_templates.txt").read_text()
        else:
            p = Path(which).expanduser()
            if not p.is_file():
                raise TeacherError(f"templates must be 'openai', 'simple' or a text file; {which!r} is none of these")
            text = p.read_text()
        out = [l.strip() for l in text.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    bad = [t for t in out if "{}" not in t]
    if not out or bad:
        raise TeacherError(f"every template needs a '{{}}' for the class name; bad: {bad[:3] or 'none given'}")
    return out


def resolve_classnames(classes: Sequence[str], classnames_file: Optional[str] = None) -> List[str]:
    """Readable class names: from ``classnames_file`` (one per line, dataset class order) if given;
    ImageNet-1k synset folders (``n01440764`` ...) become open_clip's ImageNet class names;
    otherwise the folder names with ``_`` as spaces."""
    if classnames_file:
        p = Path(classnames_file).expanduser()
        if not p.is_file():
            raise TeacherError(f"class-names file not found: {p}")
        names = [l.strip() for l in p.read_text().splitlines() if l.strip()]
        if len(names) != len(classes):
            raise TeacherError(f"{p} has {len(names)} names for {len(classes)} classes")
        return names
    if len(classes) == 1000 and all(_WNID.match(c) for c in classes):
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    return [c.replace("_", " ") for c in classes]


@torch.no_grad()
def text_classifier(encode_text: Callable[[List[str]], torch.Tensor], classnames: Sequence[str],
                    templates: Sequence[str], *, batch_classes: int = 32, progress: bool = False) -> torch.Tensor:
    """(D, C) zero-shot weights: per class, the normalised mean of the normalised embeddings of
    every template filled with the class name (CLIP's prompt ensembling)."""
    from tqdm.auto import tqdm

    cols = []
    starts = range(0, len(classnames), batch_classes)
    for s in tqdm(starts, desc="text", unit="batch", disable=not progress, leave=False):
        chunk = classnames[s:s + batch_classes]
        texts = [t.replace("{}", c) for c in chunk for t in templates]
        emb = F.normalize(encode_text(texts).float(), dim=-1)  # (n_c * T, D)
        emb = emb.view(len(chunk), len(templates), -1).mean(dim=1)  # (n_c, D)
        cols.append(F.normalize(emb, dim=-1))
    return torch.cat(cols).T.contiguous()  # (D, C)


class ClipView:
    """What zero-shot needs from a model: ``encode_text(texts)``, ``embed_tokens(tokens)`` (an
    after-norm token map -> image embedding) and ``encode_image(x)`` (normalised images ->
    image embedding)."""

    def __init__(self, backbone: Backbone, encode_text, embed_tokens, encode_image):
        self.backbone, self.encode_text, self.embed_tokens, self.encode_image = backbone, encode_text, embed_tokens, encode_image


def clip_view(backbone: Backbone, text_model: Optional[Backbone] = None) -> ClipView:
    """The :class:`ClipView` of a backbone (see module docstring for what is supported)."""
    from ..teachers.timm_teacher import TimmTeacher

    if isinstance(backbone, TimmTeacher):
        m = backbone.model
        if not backbone.after_norm:
            raise TeacherError(f"{backbone.name}: zero-shot needs the tokens after the final norm (after_norm=True)")
        head = m.get_classifier() if hasattr(m, "get_classifier") else None
        if head is None or isinstance(head, nn.Identity):
            raise TeacherError(f"{backbone.name} has no image projection head (a CLIP tower loaded with num_classes=0?)")

        def embed_tokens(tokens: TokenMap) -> torch.Tensor:
            return m.forward_head(tokens.full())  # pooling + fc_norm + projection, the tower's own

        def encode_image(x: torch.Tensor) -> torch.Tensor:
            return m.forward_head(m.forward_features(x))
    elif hasattr(backbone, "embed_tokens") and hasattr(backbone, "encode_image"):
        if not getattr(backbone, "after_norm", True):
            raise TeacherError(f"{backbone.name}: zero-shot needs the tokens after the final norm (after_norm=True)")
        embed_tokens, encode_image = backbone.embed_tokens, backbone.encode_image
    else:
        raise TeacherError(f"{backbone.name} is not a CLIP image tower (open_clip:, hf: CLIPModel, or a timm CLIP "
                           "tower with its projection head)")
    if text_model is not None:
        encode_text = text_model.encode_text
    elif hasattr(backbone, "encode_text") and getattr(backbone, "clip_model", True) is not None:
        encode_text = backbone.encode_text
    else:
        raise TeacherError(f"{backbone.name} has no text tower: give one with --text-model open_clip:<arch>/<tag>")
    return ClipView(backbone, encode_text, embed_tokens, encode_image)


def head_clip_view(backbone: Backbone, teacher: Backbone, text_model: Optional[Backbone] = None) -> ClipView:
    """The :class:`ClipView` of a multi-teacher student through its CLIP head
    (:class:`~fdistill.models.loading.HeadAdapter`): its tokens, back in the CLIP teacher's space
    (an invertible head normalisation: ``phi_s``, ``stats``, ``none``), embedded by the teacher's
    own pooling + projection, and the teacher's (or ``text_model``'s) text tower -- the student is
    then a zero-shot classifier (RADIO's adaptors)."""
    if not getattr(backbone, "teacher_space", False):
        raise TeacherError(f"{backbone.name}: the head's normalisation ({getattr(backbone.head, 'norm_kind', '?')}) "
                           "cannot be inverted, so its outputs are not in the teacher's space; zero-shot through a "
                           "head needs teachers[].norm phi_s or stats")
    if not getattr(backbone, "trained_prefix", True):
        raise TeacherError(f"{backbone.name}: the head's [CLS] output was never trained (no [CLS] target); zero-shot "
                           "needs the teacher's [CLS] distilled (targets full or summary)")
    if backbone.embed_dim != teacher.embed_dim:
        raise TeacherError(f"{backbone.name} gives {backbone.embed_dim}-d tokens but {teacher.name} has "
                           f"{teacher.embed_dim}: is this the teacher of that head?")
    tv = clip_view(teacher, text_model)
    return ClipView(backbone, tv.encode_text, tv.embed_tokens, lambda x: tv.embed_tokens(backbone.forward_tokens(x)))


def _text_weights(view: ClipView, classnames, templates, device, progress) -> torch.Tensor:
    w = text_classifier(lambda t: view.encode_text(t), classnames, templates, progress=progress)
    return w.to(device)


@torch.no_grad()
def zero_shot(
    backbone: Backbone,
    loader,
    *,
    classnames: Sequence[str],
    templates: Sequence[str],
    text_model: Optional[Backbone] = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    progress: bool = True,
    view: Optional[ClipView] = None,
) -> Dict[str, Any]:
    """Zero-shot top-1 / top-5 of a CLIP model on ``loader`` (images in [0, 1] / uint8 at the
    model's input size, labels in ``classnames`` order); ``view`` (e.g. :func:`head_clip_view`)
    instead of the adapter's own :func:`clip_view`."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    backbone = backbone.to(device).eval()
    if text_model is not None:
        text_model = text_model.to(device).eval()
    view = view if view is not None else clip_view(backbone, text_model)
    W = _text_weights(view, list(classnames), templates, device, progress)  # (D, C)
    scores, labels = [], []
    for images, y in tqdm(loader, desc="zero-shot", unit="batch", disable=not progress, dynamic_ncols=True):
        x = model_inputs(images, backbone.mean, backbone.std, device)
        with autocast(device, precision):
            emb = view.encode_image(x)
        scores.append(F.normalize(emb.float(), dim=-1) @ W)
        labels.append(torch.as_tensor(y).to(device))
    res = topk_accuracy(torch.cat(scores), torch.cat(labels))
    return dict(res, model=backbone.name, templates=len(templates), num_classes=len(classnames))


def denormalize_tokens(pred: torch.Tensor, norm: str, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Undo the FD target normalisation on projected student tokens (..., C): ``standardize`` ->
    ``pred * std + mean`` (per-token scalars); ``l2`` -> ``pred * std`` (``std`` = mean token norm);
    ``none`` -> unchanged."""
    if norm == "standardize":
        return pred * std + mean
    if norm == "l2":
        return pred * std
    if norm == "none":
        return pred
    raise ValueError(f"unknown FD target norm {norm!r}")


def _token_stats(t: torch.Tensor, norm: str) -> torch.Tensor:
    """(B, T, C) teacher tokens -> (2,) sums over images of [mean over tokens of the channel mean,
    of the channel std] (standardize) or of the token L2 norm (l2)."""
    t = t.float()
    if norm == "l2":
        n = t.norm(dim=-1).mean(dim=1)  # (B,)
        return torch.stack([torch.zeros(()).to(n), n.sum()])
    return torch.stack([t.mean(dim=-1).mean(dim=1).sum(), t.std(dim=-1, unbiased=False).mean(dim=1).sum()])


@torch.no_grad()
def zero_shot_student(
    student,
    teacher: Backbone,
    teacher_loader,
    student_loader,
    *,
    classnames: Sequence[str],
    templates: Sequence[str],
    norm: str = "standardize",
    text_model: Optional[Backbone] = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    progress: bool = True,
) -> Dict[str, Any]:
    """Zero-shot of an FD student through its projector and its CLIP teacher's projection, with
    the teacher evaluated side by side (module docstring).

    Args:
        student: a :class:`~fdistill.models.loading.StudentBackbone` with its ``projector``.
        teacher: the CLIP teacher it was distilled from (after-norm tokens).
        teacher_loader, student_loader: the same images in the same order, each at its model's
            input size (they may be the same loader).
        norm: the FD target normalisation of the run (``distill.norm``).

    Returns:
        ``{"student": {top1, top5}, "teacher": {top1, top5}, "stats": {...}}``.
    """
    from tqdm.auto import tqdm

    if getattr(student, "projector", None) is None:
        raise TeacherError(f"{student.name} has no FD projector; student zero-shot needs a distillation checkpoint")
    device = torch.device(device)
    student, teacher = student.to(device).eval(), teacher.to(device).eval()
    if text_model is not None:
        text_model = text_model.to(device).eval()
    view = clip_view(teacher, text_model)
    W = _text_weights(view, list(classnames), templates, device, progress)  # (D, C)
    proj = student.projector.to(device).eval()
    if proj.out_features != teacher.embed_dim:
        raise TeacherError(f"the student's projector predicts {proj.out_features}-d tokens but {teacher.name} has "
                           f"{teacher.embed_dim}: is this the teacher it was distilled from?")
    t_scores, labels = [], []
    pred_cls, pred_patch = [], []
    stats = torch.zeros(2, 2, device=device)  # rows: [CLS], patches; cols: mean, std (or norm)
    n = 0
    loaders = zip(teacher_loader, student_loader) if student_loader is not teacher_loader else \
        ((b, b) for b in teacher_loader)
    total = len(teacher_loader) if hasattr(teacher_loader, "__len__") else None
    for (ti, y), (si, y2) in tqdm(loaders, desc="zero-shot", unit="batch", total=total, disable=not progress,
                                  dynamic_ncols=True):
        y = torch.as_tensor(y).to(device)
        xt = model_inputs(ti, teacher.mean, teacher.std, device)
        xs = model_inputs(si, student.mean, student.std, device)
        with autocast(device, precision):
            tt = teacher.forward_tokens(xt)
            if tt.prefix is None:
                raise TeacherError(f"{teacher.name} has no [CLS] token; student zero-shot needs a CLIP ViT teacher")
            t_emb = view.embed_tokens(tt)
            s_tok = proj(student.forward_tokens(xs).full())  # (B, 1+N, C_t): predicted normalised teacher tokens
        t_scores.append(F.normalize(t_emb.float(), dim=-1) @ W)
        stats[0] += _token_stats(tt.prefix[:, :1], norm)
        stats[1] += _token_stats(tt.patches, norm)
        pred_cls.append(s_tok[:, 0].float())
        pred_patch.append(s_tok[:, 1:].float().mean(dim=1))  # pooling is linear: the mean token suffices
        labels.append(y)
        n += y.shape[0]
    stats /= max(n, 1)
    labels = torch.cat(labels)
    cls_hat = denormalize_tokens(torch.cat(pred_cls), norm, stats[0, 0], stats[0, 1])  # (M, C_t)
    patch_hat = denormalize_tokens(torch.cat(pred_patch), norm, stats[1, 0], stats[1, 1])
    s_scores = []
    for i in range(0, cls_hat.shape[0], 1024):
        tok = TokenMap(cls_hat[i:i + 1024, None], patch_hat[i:i + 1024, None], (1, 1))
        s_scores.append(F.normalize(view.embed_tokens(tok).float(), dim=-1) @ W)
    return {
        "student": dict(topk_accuracy(torch.cat(s_scores), labels), model=student.name),
        "teacher": dict(topk_accuracy(torch.cat(t_scores), labels), model=teacher.name),
        "stats": {"norm": norm, "cls_mean": float(stats[0, 0]), "cls_std": float(stats[0, 1]),
                  "patch_mean": float(stats[1, 0]), "patch_std": float(stats[1, 1]), "images": n},
        "templates": len(templates), "num_classes": len(classnames),
    }
