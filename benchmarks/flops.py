"""Analytic FLOP counts of a feature-distillation training step.

Only matrix multiplications are counted (patch-embedding convolution, linear layers, the two
attention products), 2 FLOPs per multiply-add -- the convention of model-FLOPs utilisation
(Chowdhery et al. 2022, PaLM, App. B) and of ``torch.utils.flop_counter.FlopCounterMode``.
Normalisations, activations, softmax, residual adds and the optimizer are left out: they are
memory-bound and a few per cent of the arithmetic.

One FD step per image (paper Fig. 2) =
    teacher forward (no backward: it is frozen)
  + student forward + backward (backward = 2x forward: gradients w.r.t. inputs and weights;
    the patch embedding's input is the image, which needs no gradient, so its backward is 1x)
  + projector forward + backward (3x its forward).

With several teachers (:class:`fdistill.multi.MultiTeacherDistiller`, FD's linear head per
teacher) the step is every teacher's forward + the student forward/backward once + every head's
forward and backward: :func:`fd_multi_step_flops`.

Activation checkpointing recomputes the student's forward: that is extra hardware work, not
model work, so it is not counted (MFU stays comparable with and without it).
"""
from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Mapping, Optional, Sequence

import torch.nn as nn

__all__ = ["ViTDims", "vit_dims", "vit_forward_flops", "fd_step_flops", "fd_multi_step_flops"]


@dataclass(frozen=True)
class ViTDims:
    """The sizes that fix a plain ViT's matmul FLOPs.

    embed_dim: C (residual width); attn_dim: A = heads x head dim (= C in standard ViTs);
    mlp_hidden: M (= mlp_ratio x C); depth: L; patch_size: p; in_chans: image channels;
    num_prefix_tokens: [CLS] / register tokens; num_patches: N at the model's input size.
    """

    embed_dim: int
    attn_dim: int
    mlp_hidden: int
    depth: int
    patch_size: int
    in_chans: int
    num_prefix_tokens: int
    num_patches: int

    def as_dict(self) -> dict:
        return asdict(self)


def vit_dims(model: nn.Module) -> ViTDims:
    """Read :class:`ViTDims` from a timm ViT / BEiT (``VisionTransformer``, ``Beit``, the FD
    student), or from a teacher adapter wrapping one (``.model``)."""
    m = model
    if not hasattr(m, "blocks") and hasattr(m, "model"):
        m = m.model
    if not (hasattr(m, "patch_embed") and hasattr(m, "blocks")):
        raise ValueError(f"{type(model).__name__} is not a ViT (needs patch_embed and blocks)")
    proj = m.patch_embed.proj
    if not isinstance(proj, nn.Conv2d) or proj.kernel_size != proj.stride:
        raise ValueError("patch embedding is not a non-overlapping convolution")
    blk = m.blocks[0]
    qkv_out = blk.attn.qkv.out_features
    grid = m.patch_embed.grid_size
    return ViTDims(
        embed_dim=int(proj.out_channels),
        attn_dim=int(qkv_out // 3),
        mlp_hidden=int(blk.mlp.fc1.out_features),
        depth=len(m.blocks),
        patch_size=int(proj.kernel_size[0]),
        in_chans=int(proj.in_channels),
        num_prefix_tokens=int(getattr(m, "num_prefix_tokens", 1)),
        num_patches=int(grid[0] * grid[1]),
    )


def vit_forward_flops(d: ViTDims, *, num_patches: Optional[int] = None, encoder_patches: Optional[int] = None,
                      block_keep: Optional[Sequence[float]] = None) -> float:
    """Matmul FLOPs of one image's forward pass through a ViT (up to the final norm, no head).

    With N patches cut from the image and T = P + N' tokens in the encoder (N' = N, or the
    visible patches when masked tokens are dropped, MAE-style), C = embed_dim, A = attn_dim,
    M = mlp_hidden, p = patch_size, L = depth::

        patch embedding   2 * N * (in_chans * p^2) * C
        per block         2*T*C*3A  (qkv)  +  2*T*T*A  (q k^T)  +  2*T*T*A  (attn v)
                        + 2*T*A*C   (proj) +  2*T*C*M  (fc1)    +  2*T*M*C  (fc2)

    For a standard ViT (A = C, M = 4C) a block is 24*T*C^2 + 4*T^2*C; with the patch
    embedding, ViT-S/16 at 224 is 9.20 GFLOPs and ViT-B/16 35.13 GFLOPs per image (4.6 and
    17.6 GMACs, the numbers timm lists).

    Args:
        d: the network's sizes (:func:`vit_dims`).
        num_patches: N (default ``d.num_patches``).
        encoder_patches: N' (default N).
        block_keep: per block, the fraction of samples whose residual branches are computed
            (``1 - drop_path`` where dropped samples are skipped, as the FD student does on
            CPU): the expected work then, not the model's FLOPs. Default: all (an int result).
    """
    n = d.num_patches if num_patches is None else int(num_patches)
    n_enc = n if encoder_patches is None else int(encoder_patches)
    T = d.num_prefix_tokens + n_enc
    C, A, M = d.embed_dim, d.attn_dim, d.mlp_hidden
    patch_embed = 2 * n * d.in_chans * d.patch_size ** 2 * C
    block = 2 * T * C * 3 * A + 4 * T * T * A + 2 * T * A * C + 4 * T * C * M
    if block_keep is None:
        return patch_embed + d.depth * block
    if len(block_keep) != d.depth:
        raise ValueError(f"block_keep has {len(block_keep)} values for {d.depth} blocks")
    return patch_embed + block * float(sum(block_keep))


def patch_embed_flops(d: ViTDims, num_patches: Optional[int] = None) -> int:
    n = d.num_patches if num_patches is None else int(num_patches)
    return 2 * n * d.in_chans * d.patch_size ** 2 * d.embed_dim


def fd_step_flops(teacher: ViTDims, student: ViTDims, *, target_dim: Optional[int] = None,
                  student_visible: Optional[int] = None, cls_token: bool = True,
                  student_block_keep: Optional[Sequence[float]] = None) -> dict:
    """Matmul FLOPs of one FD training step, per image, split by part.

    Args:
        teacher, student: sizes of both networks (grids assumed aligned: same N).
        target_dim: the projector's output width (default the teacher's ``embed_dim``).
        student_visible: patches the student's encoder keeps when masked tokens are dropped
            (default: all).
        cls_token: whether the student's [CLS] goes through the projector (always, in FD: the
            projector maps the whole token map).
        student_block_keep: see :func:`vit_forward_flops` (expected hardware work instead of
            model FLOPs).

    Returns:
        dict with ``teacher_fwd``, ``student_fwd``, ``student_bwd``, ``projector`` (fwd + bwd)
        and ``total``.
    """
    ct = teacher.embed_dim if target_dim is None else int(target_dim)
    t_fwd = vit_forward_flops(teacher)
    s_fwd = vit_forward_flops(student, encoder_patches=student_visible, block_keep=student_block_keep)
    # backward: 2x the forward, except the patch embedding (no gradient for the image): 1x
    s_bwd = 2 * s_fwd - patch_embed_flops(student)
    n_tok = (student.num_patches if student_visible is None else int(student_visible)) + (1 if cls_token else 0)
    proj = 3 * (2 * n_tok * student.embed_dim * ct)
    return {"teacher_fwd": t_fwd, "student_fwd": s_fwd, "student_bwd": s_bwd, "projector": proj,
            "total": t_fwd + s_fwd + s_bwd + proj}


def fd_multi_step_flops(teachers: Mapping[str, ViTDims], student: ViTDims, *,
                        target_dims: Optional[Mapping[str, int]] = None, student_visible: Optional[int] = None,
                        cls_token: bool = True, student_block_keep: Optional[Sequence[float]] = None) -> dict:
    """Matmul FLOPs of one several-teacher FD step, per image, split by part: every teacher's
    forward, the student's forward and backward (once: it runs once for all heads), and every
    linear head's forward + backward (3x its forward, as FD's projector).

    Args:
        teachers: name -> sizes, in the distiller's order (grids assumed aligned with the student's).
        target_dims: name -> that head's output width (default each teacher's ``embed_dim``).
        student_visible, cls_token, student_block_keep: as :func:`fd_step_flops`.

    Returns:
        dict with ``teacher_fwd`` and ``projector`` (sums over the teachers),
        ``teacher_fwd_each`` and ``projector_each`` (name -> FLOPs), ``student_fwd``,
        ``student_bwd`` and ``total``. With one teacher it equals :func:`fd_step_flops`.
    """
    if not teachers:
        raise ValueError("fd_multi_step_flops needs at least one teacher")
    target_dims = dict(target_dims or {})
    parts = {name: fd_step_flops(t, student, target_dim=target_dims.get(name), student_visible=student_visible,
                                 cls_token=cls_token, student_block_keep=student_block_keep)
             for name, t in teachers.items()}
    first = next(iter(parts.values()))
    t_each = {name: p["teacher_fwd"] for name, p in parts.items()}
    h_each = {name: p["projector"] for name, p in parts.items()}
    s_fwd, s_bwd = first["student_fwd"], first["student_bwd"]
    return {"teacher_fwd": sum(t_each.values()), "student_fwd": s_fwd, "student_bwd": s_bwd,
            "projector": sum(h_each.values()), "teacher_fwd_each": t_each, "projector_each": h_each,
            "total": sum(t_each.values()) + s_fwd + s_bwd + sum(h_each.values())}
