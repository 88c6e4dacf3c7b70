"""``fdistill info``: what a config will build and what one step costs, before running it.

Parameters are counted on the built models; FLOPs per image are counted by
:class:`torch.utils.flop_counter.FlopCounterMode` on one image (matmuls, convolutions and
attention, as multiply-adds x 2). One training image costs a teacher forward plus a student +
projector forward and backward (backward ~ 2x forward): ``teacher + 3 x (student + projector)``.

Each teacher's forward is also run here, on a batch of ``min(8, data.batch_size)`` copies of one
random image, as the distiller runs it (its :class:`~fdistill.distiller.TeacherTargets`, under
inference mode, fp32 on CPU): milliseconds per image (median of 3 after a warm-up) and the peak
tensor memory of one call -- the most bytes allocated above the start while it runs (its
activations, resized input and output; not its weights), measured by
:func:`fdistill.engine.memory.peak_allocated_bytes`.

The teacher is described by :func:`teacher_report` (data; :func:`describe_run` prints it): the
activation and norm layers it is built with (class names, e.g. ``QuickGELU`` for OpenAI CLIP
weights -- a ``GELU`` build of those weights gives other tokens), its token grid at the size the
distiller feeds it, prefix tokens, the grid alignment with the student, and its provenance
(weights and licence, which the student inherits).
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch
import yaml

from ..config import to_dict
from ..config.distill import DistillConfig, data_img_size, resolve_lr
from ..models.inspection import layer_types
from .builders import build_distiller


def count_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def forward_flops(fn, *args) -> int:
    """FLOPs of ``fn(*args)`` (2 per multiply-add), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn(*args)
    return int(counter.get_total_flops())


def _types_text(types: Dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in types.items()) if types else "none found (functional?)"


def teacher_report(distiller) -> Dict[str, Any]:
    """What the distiller's teacher (or one :class:`~fdistill.distiller.TeacherTargets`) is: ``spec``, ``activation`` / ``norm`` (class name -> count,
    see :func:`layer_types`), ``input_size`` (what the distiller feeds it), ``grid`` (its token grid
    there), ``prefix_tokens``, ``patch_size``, ``embed_dim``, ``alignment`` (how the grid meets
    the student's: ``mode`` none / resize / interpolate and the distiller's description),
    ``weights``, ``license`` and ``license_source`` (its provenance)."""
    tt = getattr(distiller, "targets", distiller)  # a FeatureDistiller's TeacherTargets, or one itself
    t = tt.teacher
    size = tuple(tt.teacher_img_size)
    grid = tuple(t.grid_size(size))
    prov = dict(getattr(t, "provenance", None) or {})
    return {
        "spec": prov.get("spec") or t.name,
        "activation": layer_types(t.model, "activation"),
        "norm": layer_types(t.model, "norm"),
        "input_size": list(size), "grid": list(grid),
        "prefix_tokens": int(t.num_prefix_tokens), "patch_size": t.patch_size, "embed_dim": int(t.embed_dim),
        "alignment": {"mode": tt.align, "student_grid": list(tt.student_grid),
                      "description": tt.describe_alignment()},
        "weights": prov.get("weights"), "license": prov.get("license", "unknown"),
        "license_source": prov.get("license_source"),
    }


def teacher_report_lines(rep: Dict[str, Any]) -> List[str]:
    """:func:`teacher_report` as aligned text lines."""
    from ..teachers.provenance import is_non_commercial

    lic = rep["license"] + (f" (from {rep['license_source']})" if rep.get("license_source") else "")
    lines = [
        "# teacher",
        f"spec        {rep['spec']}",
        f"activation  {_types_text(rep['activation'])}",
        f"norm        {_types_text(rep['norm'])}",
        f"tokens      {rep['prefix_tokens']} prefix + {rep['grid'][0]}x{rep['grid'][1]} grid at input "
        f"{rep['input_size'][0]}x{rep['input_size'][1]} (patch {rep['patch_size']}, width {rep['embed_dim']})",
        f"alignment   {rep['alignment']['mode']}: {rep['alignment']['description']}",
        f"weights     {rep['weights'] if rep['weights'] is not None else 'none (random init)'}",
        f"license     {lic}",
    ]
    if is_non_commercial(rep["license"]):
        lines.append("            NON-COMMERCIAL: a student distilled from these weights inherits the licence")
    return lines


def _fmt(n: float, unit: str = "") -> str:
    for k, s in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= k:
            return f"{n / k:.2f} {s}{unit}"
    return f"{n:.0f} {unit}"


def describe_run(cfg: DistillConfig, *, processes: Sequence[int] = (1, 8, 16)) -> str:
    """A text report: resolved config, teacher/student/projector sizes and FLOPs, each teacher's
    measured forward time and peak memory (see the module doc), token grids and how they are
    aligned, global batch and learning rate for a few process counts."""
    d = build_distiller(cfg, device=torch.device("cpu"), precision="fp32").eval()
    if cfg.teachers:
        return _describe_multi(cfg, d, processes)
    t, s, proj = d.teacher, d.student, d.projector
    img = data_img_size(cfg)
    x = torch.rand(1, 3, img, img)
    from ..distiller import normalize_images

    t_in = torch.nn.functional.interpolate(x, size=d.teacher_img_size, mode="bilinear") \
        if tuple(x.shape[-2:]) != tuple(d.teacher_img_size) else x
    t_flops = forward_flops(lambda z: t.forward_tokens(normalize_images(z, t.mean, t.std)), t_in)
    s_tokens = s.forward_tokens(normalize_images(x, s.mean, s.std))
    s_flops = forward_flops(lambda z: s.forward_tokens(normalize_images(z, s.mean, s.std)), x)
    p_flops = forward_flops(proj, s_tokens)
    train_flops = t_flops + 3 * (s_flops + p_flops)

    lines: List[str] = ["# resolved config", yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(), ""]
    lines += [
        "# models",
        f"teacher   {cfg.teacher.spec}: {_fmt(count_params(t), 'params')}, width {t.embed_dim}, "
        f"{t.num_prefix_tokens} prefix token(s), patch {t.patch_size}, frozen; {_fmt(t_flops, 'FLOPs')}/image forward "
        f"({_teacher_cost(d.targets, x, min(8, cfg.data.batch_size))})",
        f"student   {cfg.student.arch}: {_fmt(count_params(s), 'params')}, width {s.embed_dim}, "
        f"grid {s.grid_size[0]}x{s.grid_size[1]}, drop path {cfg.student.drop_path_rate}; "
        f"{_fmt(s_flops, 'FLOPs')}/image forward",
        f"projector {s.embed_dim} -> {t.embed_dim} per token: {_fmt(count_params(proj), 'params')}",
        f"alignment {d.describe_alignment()}",
        f"[CLS]     target: {d.cls_target}; loss: norm={d.norm}, beta={d.beta}, cls_weight={d.cls_weight}, "
        f"granularity={d.granularity}" + (f", mask {d.mask_ratio:.0%} {d.mask_type}" if d.mask_ratio else ""),
        f"cost      {_fmt(train_flops, 'FLOPs')} per training image (teacher fwd + 3 x student/projector fwd)",
        "",
        *teacher_report_lines(teacher_report(d)),
        "",
        "# optimisation (global batch = data.batch_size x processes x optim.accum_steps)",
    ]
    return "\n".join(lines + _optimisation_lines(cfg, processes))


def _optimisation_lines(cfg: DistillConfig, processes: Sequence[int]) -> List[str]:
    lines = []
    for n in processes:
        tb = cfg.data.batch_size * n * cfg.optim.accum_steps
        lr, wlr, mlr = resolve_lr(cfg.optim, tb)
        lines.append(f"{n:>3} process(es): global batch {tb:>5}, peak lr {lr:.3g} (warm-up from {wlr:.3g}, "
                     f"cosine to {mlr:.3g})")
    lines.append(f"schedule: {cfg.train.epochs:g} epochs, {cfg.optim.warmup_epochs:g} warm-up; "
                 f"precision {cfg.train.precision}; compile {cfg.train.compile}")
    return lines


@torch.no_grad()
def _forward_ms(fn, x: torch.Tensor, batch: int) -> float:
    """Milliseconds per image of ``fn`` on a batch of ``batch`` copies of ``x`` (one warm-up
    call, then the median of 3): what each teacher costs per step, on this machine."""
    import statistics
    import time

    xb = x.expand(batch, -1, -1, -1).contiguous()
    fn(xb)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn(xb)
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times) / batch


@torch.no_grad()
def _forward_peak_bytes(fn, x: torch.Tensor, batch: int) -> int:
    """Peak bytes allocated above the start while ``fn`` runs once on a batch of ``batch``
    copies of ``x`` (:func:`~fdistill.engine.memory.peak_allocated_bytes`; the batch itself is
    made before, so it is not counted)."""
    from .memory import peak_allocated_bytes

    xb = x.expand(batch, -1, -1, -1).contiguous()
    return peak_allocated_bytes(lambda: fn(xb), xb.device)


def _teacher_cost(tt, x: torch.Tensor, batch: int) -> str:
    """What one teacher's forward costs here, as the distiller runs it (``tt``: its
    :class:`~fdistill.distiller.TeacherTargets`) on a batch of ``batch`` copies of ``x``: time per
    image and the peak memory above the start of one batch."""
    ms = _forward_ms(lambda z: tt(z), x, batch)
    peak = _forward_peak_bytes(lambda z: tt(z), x, batch)
    return (f"{ms:.1f} ms/image here, fp32 {x.device.type.upper()}; "
            f"peak {peak / 2 ** 20:.1f} MiB allocated above start on a batch of {batch}")


def _describe_multi(cfg: DistillConfig, d, processes: Sequence[int]) -> str:
    """:func:`describe_run` of a ``teachers:`` run: each teacher with its head, target and FLOPs."""
    from ..distiller import normalize_images

    s = d.student
    img = data_img_size(cfg)
    x = torch.rand(1, 3, img, img)
    s_tokens = s.forward_tokens(normalize_images(x, s.mean, s.std))
    s_flops = forward_flops(lambda z: s.forward_tokens(normalize_images(z, s.mean, s.std)), x)
    lines: List[str] = ["# resolved config", yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(), "",
                        "# models",
                        f"student   {cfg.student.arch}: {_fmt(count_params(s), 'params')}, width {s.embed_dim}, "
                        f"grid {s.grid_size[0]}x{s.grid_size[1]}, drop path {cfg.student.drop_path_rate}; "
                        f"{_fmt(s_flops, 'FLOPs')}/image forward"]
    total = 3 * s_flops
    reports = []
    for entry in cfg.teachers:
        tt, head = d.targets[entry.name], d.projector[entry.name]
        t = tt.teacher
        t_in = torch.nn.functional.interpolate(x, size=tt.teacher_img_size, mode="bilinear") \
            if tuple(x.shape[-2:]) != tuple(tt.teacher_img_size) else x
        t_flops = forward_flops(lambda z: t.forward_tokens(normalize_images(z, t.mean, t.std)), t_in)
        h_flops = forward_flops(head, s_tokens)
        total += t_flops + 3 * h_flops
        cost = _teacher_cost(tt, x, min(8, cfg.data.batch_size))
        lines.append(f"teacher {entry.name}: {entry.spec}: {_fmt(count_params(t), 'params')}, width {t.embed_dim}, "
                     f"weight {entry.weight:g}, targets {entry.targets}, norm {entry.norm}, loss {entry.loss}; "
                     f"{_fmt(t_flops, 'FLOPs')}/image forward ({cost}); head {entry.head} "
                     f"{s.embed_dim} -> {t.embed_dim}: {_fmt(count_params(head), 'params')}")
        reports.append((entry.name, teacher_report(tt)))
    lines.append(f"cost      {_fmt(total, 'FLOPs')} per training image (every teacher fwd + 3 x student/heads fwd)")
    for name, rep in reports:
        lines += ["", *[ln.replace("# teacher", f"# teacher {name}") for ln in teacher_report_lines(rep)]]
    lines += ["", "# optimisation (global batch = data.batch_size x processes x optim.accum_steps)"]
    return "\n".join(lines + _optimisation_lines(cfg, processes))

