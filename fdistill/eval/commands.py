"""The evaluation commands as library functions: load a model, build the datasets a config asks
for, call the evaluation, write ``metrics.json`` and return the metrics. The CLI
(``fdistill finetune | linprobe | knn | zeroshot | segprobe``) only parses arguments and calls these; configs
are read through the ``build_*`` functions of :mod:`fdistill.config.finetune`.

``compare(command, models, ...)`` runs one recipe over several models (e.g. a CLIP teacher and
its FD student, the comparison of paper Table 1) and writes ``compare.json``.

Every ``metrics.json`` holds ``command``, ``model`` (+ ``model_kwargs``), ``train``/``val``,
``top1`` (+ ``top5`` with 5 or more classes), the command's details, the full resolved ``config``,
the device and the wall time.
"""
from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from ..backbone import Backbone
from ..config import to_dict
from ..engine.rng import seed_everything
from ..errors import TeacherError, UsageError


log = logging.getLogger(__name__)

__all__ = ["run_finetune", "run_linprobe", "run_knn", "run_zeroshot", "run_segprobe", "compare", "format_table",
           "write_json", "load_eval_model", "COMMANDS"]


# -- helpers -----------------------------------------------------------------------------------------
def write_json(obj: Dict[str, Any], path: str | os.PathLike) -> Path:
    """Atomic JSON write (:mod:`fdistill.io`)."""
    from ..io import atomic_write_json

    return atomic_write_json(path, obj)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def format_table(rows: Sequence[Dict[str, Any]], columns: Sequence[str], *, first: str = "model") -> str:
    """A plain-text table: one row per dict, ``first`` then ``columns``; floats with 2 decimals."""
    cols = [first] + [c for c in columns if c != first]
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    out = [line(cols), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _feature_precision(precision: str, device: torch.device) -> str:
    """The resolved precision of frozen-feature extraction (``auto``: fp32 on CPU)."""
    from ..precision import resolve_precision

    return resolve_precision(precision, device.type)


def _device(name: str) -> torch.device:
    from ..device import resolve_device

    return resolve_device(name)


def load_eval_model(model: str, model_kwargs: Optional[Dict[str, Any]] = None) -> Backbone:
    """``load_model`` with a clear error for keyword arguments the model's factory does not take."""
    from ..models.loading import load_model

    try:
        return load_model(model, **dict(model_kwargs or {}))
    except TypeError as e:
        raise TeacherError(f"{model}: {e} (check --model-kwargs)") from e


def _val_spec(train: str, val: Optional[str]) -> str:
    """The evaluation set: ``val``, else the ``val`` split of ``train`` (a named dataset, or a
    folder with ``train/`` and ``val/``). A bare training folder without ``val/`` is refused
    rather than silently evaluated on its own images."""
    if val:
        return val
    p = Path(str(train)).expanduser()
    if p.exists() and not (p / "val").is_dir():
        from ..data import DataError

        raise DataError(f"{train} has no val/ sub-folder: give the evaluation images with --val PATH")
    return train


def _img_size(cfg_size: Optional[int], backbone: Backbone):
    return cfg_size if cfg_size is not None else tuple(backbone.img_size)


def _eval_tf(size, crop_pct, interpolation):
    from ..data import eval_transform

    return eval_transform(size, crop_pct=crop_pct, interpolation=interpolation)


def _record(command: str, model: str, model_kwargs, train, val, cfg, device, t0, **res) -> Dict[str, Any]:
    from .. import __version__

    out = dict(command=command, model=str(model), model_kwargs=dict(model_kwargs or {}), train=train, val=val)
    out.update(res)
    out.update(config=to_dict(cfg), device=str(device), time_s=round(time.time() - t0, 2),
               fdistill_version=__version__)
    return out


def _finish(metrics: Dict[str, Any], output: Optional[str], columns: Sequence[str], echo: bool) -> Dict[str, Any]:
    if output:
        metrics["metrics_file"] = str(write_json(metrics, Path(output) / "metrics.json"))
    if echo:
        print(format_table([dict(metrics, model=metrics["model"])], columns))
    return metrics


# -- fine-tuning --------------------------------------------------------------------------------------
def run_finetune(cfg, *, model: str, model_kwargs=None, train: str, val: Optional[str] = None,
                 output: str, resume: Optional[str] = "auto", echo: bool = True) -> Dict[str, Any]:
    """``fdistill finetune``: fine-tune ``model`` on ``train``, evaluate on ``val`` (default: the
    ``val`` split of ``train``). Multi-GPU under ``torchrun`` (one process per GPU)."""
    from .builders import build_finetune_recipe, build_train_transform_args
    from ..engine.distributed import init_distributed, shutdown
    from .data import load_dataset, train_transform
    from .finetune import finetune

    t0 = time.time()
    val = _val_spec(train, val)
    env = init_distributed(cfg.device)
    try:
        # torch seeds its generator from the OS at start-up: without this, a randomly initialised
        # model (pretrained: false, baselines, tests) differs from process to process
        seed_everything(cfg.seed)
        backbone = load_eval_model(model, model_kwargs)
        size = _img_size(cfg.data.img_size, backbone)
        tf = train_transform(size, mean=backbone.mean, std=backbone.std, **build_train_transform_args(cfg))
        train_ds = load_dataset(train, "train", tf, download=cfg.data.download)
        val_ds = load_dataset(val, "val", _eval_tf(size, cfg.data.crop_pct, cfg.data.interpolation),
                              download=cfg.data.download)
        recipe = build_finetune_recipe(cfg, world_size=env.world_size, device_type=env.device.type)
        res = finetune(backbone, train_ds, val_ds, output_dir=output, resume=resume, device=env.device, env=env,
                       source={"spec": str(model), "kwargs": dict(model_kwargs or {})}, **recipe)
    finally:
        shutdown(env)
    metrics = _record("finetune", model, model_kwargs, train, val, cfg, env.device, t0, **res)
    if not env.is_main:
        return metrics
    return _finish(metrics, output, ["top1", "top5", "best_epoch", "steps"], echo)


# -- linear probe -------------------------------------------------------------------------------------
def run_linprobe(cfg, *, model: str, model_kwargs=None, train: str, val: Optional[str] = None,
                 output: Optional[str] = None, echo: bool = True) -> Dict[str, Any]:
    """``fdistill linprobe``: MAE linear probe (``mode: standard``) or the fast sweep (``mode: fast``)."""
    from .builders import build_linprobe_recipe, build_sweep_recipe
    from ..data import distill_transform
    from .data import load_dataset, make_loader
    from .features import extract_features
    from .linear_probe import available_features, linear_probe, linear_probe_sweep

    t0 = time.time()
    val = _val_spec(train, val)
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    backbone = load_eval_model(model, model_kwargs)
    size = _img_size(cfg.data.img_size, backbone)
    eval_tf = _eval_tf(size, cfg.data.crop_pct, cfg.data.interpolation)
    val_ds = load_dataset(val, "val", eval_tf, download=cfg.data.download)
    if cfg.mode == "standard":  # on the training engine: checkpoints in OUTPUT, resume, torchrun
        from ..engine.distributed import init_distributed, shutdown

        train_tf = distill_transform(size, interpolation=cfg.data.interpolation) if cfg.augment else eval_tf
        train_ds = load_dataset(train, "train", train_tf, download=cfg.data.download)
        env = init_distributed(cfg.device)
        try:
            res = linear_probe(backbone, train_ds, val_ds, device=env.device, env=env, output_dir=output,
                               **build_linprobe_recipe(cfg, world_size=env.world_size, device_type=env.device.type))
        finally:
            shutdown(env)
        if not env.is_main:
            return _record("linprobe", model, model_kwargs, train, val, cfg, env.device, t0, mode=cfg.mode, **res)
    else:
        train_ds = load_dataset(train, "train", eval_tf, download=cfg.data.download)
        feats = available_features(backbone, cfg.sweep.features)
        prec = _feature_precision(cfg.precision, device)
        kw = dict(features=feats, device=device, precision=prec,
                  store_device=device if device.type == "cuda" else None)
        mk = lambda ds: make_loader(ds, batch_size=cfg.data.batch_size, shuffle=False,
                                    num_workers=cfg.data.num_workers, device=device)
        ftr = extract_features(backbone, mk(train_ds), desc="features train", **kw)
        fva = extract_features(backbone, mk(val_ds), desc="features val", **kw)
        res = linear_probe_sweep(ftr, fva, device=device, **build_sweep_recipe(cfg))
    metrics = _record("linprobe", model, model_kwargs, train, val, cfg, device, t0, mode=cfg.mode, **res)
    cols = ["top1", "top5", "feature", "lr"]
    out = _finish(metrics, output, cols, echo)
    if echo and cfg.mode == "fast":
        print(format_table(res["grid"], ["lr", "top1", "top5"], first="feature"))
    return out


# -- k-NN ---------------------------------------------------------------------------------------------
def run_knn(cfg, *, model: str, model_kwargs=None, train: str, val: Optional[str] = None,
            output: Optional[str] = None, echo: bool = True) -> Dict[str, Any]:
    """``fdistill knn``: weighted k-NN (DINO) on frozen features; ``top1``/``top5`` at the first k."""
    from .builders import build_knn_recipe
    from .data import load_dataset, make_loader
    from .features import extract_features
    from .knn import knn_scores, topk_accuracy
    from .linear_probe import available_features

    t0 = time.time()
    val = _val_spec(train, val)
    device = _device(cfg.device)
    seed_everything(getattr(cfg, "seed", 0))  # randomly initialised models are reproducible
    backbone = load_eval_model(model, model_kwargs)
    size = _img_size(cfg.data.img_size, backbone)
    tf = _eval_tf(size, cfg.data.crop_pct, cfg.data.interpolation)
    train_ds = load_dataset(train, "train", tf, download=cfg.data.download)
    val_ds = load_dataset(val, "val", tf, download=cfg.data.download)
    feature = available_features(backbone, [cfg.feature])[0]
    prec = _feature_precision(cfg.precision, device)
    store = device if device.type == "cuda" else None
    mk = lambda ds: make_loader(ds, batch_size=cfg.data.batch_size, shuffle=False, num_workers=cfg.data.num_workers,
                                device=device)
    ftr = extract_features(backbone, mk(train_ds), features=[feature], device=device, precision=prec,
                           store_device=store, desc="features train")
    fva = extract_features(backbone, mk(val_ds), features=[feature], device=device, precision=prec,
                           store_device=store, desc="features val")
    rec = build_knn_recipe(cfg)
    C = len(ftr.classes) or int(ftr.labels.max()) + 1
    by_k = {}
    for k in rec["ks"]:
        s = knn_scores(ftr.feats[feature].to(device), ftr.labels, fva.feats[feature].to(device), k=k, T=rec["T"],
                       num_classes=C)
        by_k[str(k)] = topk_accuracy(s, fva.labels)
    first = by_k[str(rec["ks"][0])]
    metrics = _record("knn", model, model_kwargs, train, val, cfg, device, t0, **first,
                      k=rec["ks"][0], temperature=rec["T"], feature=feature, by_k=by_k,
                      train_images=len(ftr), val_images=len(fva))
    return _finish(metrics, output, ["top1", "top5", "k", "feature"], echo)


# -- zero-shot ------------------------------------------------------------------------------------------
def _teacher_of(student, cfg, info: Optional[Dict[str, Any]] = None) -> Backbone:
    """The teacher ``cfg.teacher`` names, else the one the run recorded (``info``: one head's
    teacher of a multi-teacher run)."""
    from ..teachers import create_teacher

    if cfg.teacher:
        return create_teacher(cfg.teacher, **dict(cfg.teacher_kwargs))
    info = dict(info if info is not None else (student.teacher_info or {}))
    if not info.get("spec"):
        raise TeacherError(f"{student.name} does not record its teacher; give it with --teacher SPEC")
    kw = dict(info.get("kwargs") or {})
    from ..teachers.trust import check_recorded_spec

    check_recorded_spec(info["spec"], kw, where=f"{student.name}'s checkpoint")
    if info.get("after_norm") is False:
        kw["after_norm"] = False
    return create_teacher(info["spec"], **kw)


def run_zeroshot(cfg, *, model: str, model_kwargs=None, val: str, output: Optional[str] = None,
                 echo: bool = True, train: Optional[str] = None) -> Dict[str, Any]:
    """``fdistill zeroshot``: CLIP zero-shot on ``val``; for an FD student, the student through its
    projector and the teacher's projection, with the teacher side by side."""
    from .builders import build_zeroshot_recipe
    from ..models.loading import HeadAdapter, StudentBackbone
    from ..teachers import create_teacher
    from .data import dataset_classes, load_dataset, make_loader
    from .zeroshot import head_clip_view, load_templates, resolve_classnames, zero_shot, zero_shot_student

    t0 = time.time()
    device = _device(cfg.device)
    seed_everything(getattr(cfg, "seed", 0))  # randomly initialised models are reproducible
    backbone = load_eval_model(model, model_kwargs)
    rec = build_zeroshot_recipe(cfg)
    templates = load_templates(rec["templates"])
    text_model = create_teacher(cfg.text_model, **dict(cfg.text_model_kwargs)) if cfg.text_model else None
    precision = "bf16" if device.type == "cuda" and cfg.precision in ("auto", "bf16") else \
        ("fp16" if cfg.precision == "fp16" else "fp32")
    mk = lambda ds: make_loader(ds, batch_size=cfg.data.batch_size, shuffle=False, num_workers=cfg.data.num_workers,
                                device=device)
    ds_for = lambda m: load_dataset(val, "val", _eval_tf(_img_size(cfg.data.img_size, m), cfg.data.crop_pct,
                                                         cfg.data.interpolation), download=cfg.data.download)
    if isinstance(backbone, HeadAdapter):  # a multi-teacher student through its CLIP head, the teacher beside it
        teacher = _teacher_of(backbone, cfg, info=backbone.head_info)
        s_ds, t_ds = ds_for(backbone), ds_for(teacher)
        classnames = resolve_classnames(dataset_classes(t_ds), rec["classnames"])
        kw = dict(classnames=classnames, templates=templates, text_model=text_model, device=device,
                  precision=precision)
        student = zero_shot(backbone, mk(s_ds), view=head_clip_view(backbone, teacher.to(device).eval(),
                                                                   text_model), **kw)
        teach = zero_shot(teacher, mk(t_ds), **kw)
        res = dict(top1=student["top1"], top5=student.get("top5"), teacher_top1=teach["top1"],
                   teacher_top5=teach.get("top5"), head=backbone.head_name, templates=len(templates),
                   num_classes=len(classnames))
        cols = ["top1", "top5", "teacher_top1", "teacher_top5"]
    elif isinstance(backbone, StudentBackbone):
        teacher = _teacher_of(backbone, cfg)
        dcfg = (backbone.config or {}).get("distill", {})
        norm, cls_target = dcfg.get("norm", "standardize"), dcfg.get("cls_target", "auto")
        if cls_target in ("gap", "none"):
            raise TeacherError(f"{model}: the student's [CLS] was not distilled from the teacher's [CLS] "
                               f"(distill.cls_target={cls_target}); its zero-shot would be meaningless")
        s_ds, t_ds = ds_for(backbone), ds_for(teacher)
        classnames = resolve_classnames(dataset_classes(t_ds), rec["classnames"])
        t_loader = mk(t_ds)
        s_loader = t_loader if _img_size(cfg.data.img_size, backbone) == _img_size(cfg.data.img_size, teacher) \
            else mk(s_ds)
        r = zero_shot_student(backbone, teacher, t_loader, s_loader, classnames=classnames, templates=templates,
                              norm=norm, text_model=text_model, device=device, precision=precision)
        res = dict(top1=r["student"]["top1"], student=r["student"], teacher=r["teacher"],
                   teacher_top1=r["teacher"]["top1"], denormalization=r["stats"], templates=len(templates),
                   num_classes=len(classnames))
        if "top5" in r["student"]:
            res.update(top5=r["student"]["top5"], teacher_top5=r["teacher"]["top5"])
        cols = ["top1", "top5", "teacher_top1", "teacher_top5"]
    else:
        v_ds = ds_for(backbone)
        classnames = resolve_classnames(dataset_classes(v_ds), rec["classnames"])
        res = zero_shot(backbone, mk(v_ds), classnames=classnames, templates=templates, text_model=text_model,
                        device=device, precision=precision)
        res.pop("model", None)
        cols = ["top1", "top5"]
    metrics = _record("zeroshot", model, model_kwargs, None, val, cfg, device, t0, **res)
    return _finish(metrics, output, cols, echo)


# -- dense: linear segmentation probe ----------------------------------------------------------------------
def run_segprobe(cfg, *, model: str, model_kwargs=None, train: str, val: Optional[str] = None,
                 output: Optional[str] = None, echo: bool = True) -> Dict[str, Any]:
    """``fdistill segprobe``: DINOv2-style linear semantic segmentation on the frozen token map;
    ``miou`` / ``aacc`` / ``macc`` on ``val`` (default: the ``val`` split of ``train``); with
    ``output``, ``predictions.png`` shows a few validation images, label maps and predictions."""
    from .builders import build_segprobe_data_args, build_segprobe_recipe
    from ..data.segmentation import build_segmentation_dataset
    from ..engine.distributed import init_distributed, shutdown
    from .segmentation import seg_linear_probe

    t0 = time.time()
    val = val or train  # a folder's / synthetic's own val split
    torch.manual_seed(cfg.seed)  # randomly initialised models (tests, baselines) are reproducible
    backbone = load_eval_model(model, model_kwargs)
    size = _img_size(cfg.data.img_size, backbone)
    if not backbone.accepts_size(size):  # before any data is read: e.g. a fixed-size CLIP and a 512 px recipe
        raise TeacherError(f"{model} takes {backbone.img_size[0]}x{backbone.img_size[1]} inputs only, but the recipe "
                           f"asks for {size}; set data.img_size={backbone.img_size[0]} (or null: the model's own size)")
    data_args = build_segprobe_data_args(cfg)
    train_ds = build_segmentation_dataset(train, "train", size, train=True, **data_args)
    val_ds = build_segmentation_dataset(val, "val", size, train=False, **data_args)
    figure = Path(output) / "predictions.png" if output else None
    env = init_distributed(cfg.device)  # on the training engine: checkpoints in OUTPUT, resume, torchrun
    try:
        res = seg_linear_probe(backbone, train_ds, val_ds, device=env.device, env=env, output_dir=output, figure=figure,
                               **build_segprobe_recipe(cfg, device_type=env.device.type))
    finally:
        shutdown(env)
    metrics = _record("segprobe", model, model_kwargs, train, val, cfg, env.device, t0, **res)
    if not env.is_main:
        return metrics
    return _finish(metrics, output, ["miou", "aacc", "macc", "steps"], echo)


def run_segment(cfg, **kwargs) -> Dict[str, Any]:
    """``fdistill segment``: :func:`fdistill.dense.commands.run_segment` (UPerNet fine-tuning)."""
    from ..dense.commands import run_segment as run

    return run(cfg, **kwargs)


def run_depth(cfg, **kwargs) -> Dict[str, Any]:
    """``fdistill depth``: :func:`fdistill.dense.commands.run_depth` (DPT depth fine-tuning)."""
    from ..dense.commands import run_depth as run

    return run(cfg, **kwargs)


def run_detect(cfg, **kwargs) -> Dict[str, Any]:
    """``fdistill detect``: :func:`fdistill.dense.commands.run_detect` (Mask R-CNN fine-tuning)."""
    from ..dense.commands import run_detect as run

    return run(cfg, **kwargs)


COMMANDS: Dict[str, Callable[..., Dict[str, Any]]] = {
    "finetune": run_finetune, "linprobe": run_linprobe, "knn": run_knn, "zeroshot": run_zeroshot,
    "segprobe": run_segprobe, "segment": run_segment, "depth": run_depth, "detect": run_detect,
}
#: commands that train into an output folder (``--compare`` gives each model a sub-folder)
TRAINING_COMMANDS = ("finetune", "segment", "depth", "detect")
_COLUMNS = {"finetune": ["top1", "top5", "best_epoch"], "linprobe": ["top1", "top5", "feature"],
            "knn": ["top1", "top5", "k"], "zeroshot": ["top1", "top5", "teacher_top1", "teacher_top5"],
            "segprobe": ["miou", "aacc", "macc"], "segment": ["miou", "aacc", "macc", "best_epoch"],
            "depth": ["rmse", "abs_rel", "log10", "d1", "best_epoch"],
            "detect": ["ap_box", "ap_mask", "ap50_box", "best_epoch"]}


def _slug(spec: str, i: int) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(spec)).name if os.path.exists(str(spec)) else str(spec))
    return f"{i}_{s.strip('_')[:60]}"


def compare(command: str, cfg, *, models: Sequence[str], model_kwargs: Optional[Sequence[Optional[dict]]] = None,
            output: Optional[str] = None, echo: bool = True, **kwargs) -> Dict[str, Any]:
    """Run ``command`` with one recipe for every model; print them side by side; write each
    model's ``metrics.json`` under ``output/<i>_<name>/`` and all of them in ``output/compare.json``."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; expected one of {sorted(COMMANDS)}")
    if command in TRAINING_COMMANDS and not output:
        raise UsageError(f"{command} --compare needs --output (each model trains into its own sub-folder)")
    kws = list(model_kwargs or [None] * len(models))
    if len(kws) != len(models):
        raise UsageError(f"{len(models)} models but {len(kws)} --model-kwargs")
    results = []
    for i, (m, kw) in enumerate(zip(models, kws)):
        sub = str(Path(output) / _slug(m, i)) if output else None
        log.info("[%d/%d] %s %s", i + 1, len(models), command, m)
        results.append(COMMANDS[command](cfg, model=m, model_kwargs=kw, output=sub, echo=False, **kwargs))
    table = format_table(results, _COLUMNS[command])
    combined = {"command": command, "models": list(map(str, models)), "results": results, "table": table}
    if output:
        combined["compare_file"] = str(write_json(combined, Path(output) / "compare.json"))
    if echo:
        print(table)
    return combined
