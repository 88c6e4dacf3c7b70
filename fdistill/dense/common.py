"""What the three dense fine-tuning commands share around :class:`fdistill.engine.trainer.Trainer`:
AdamW over layer-decay groups of the backbone (BEiT Sec. 2.5; the decoder at the full rate), the
recipe's per-step schedule, the loader and resumable sampler, the run folder's lock and log, and
best / last weights. A dense task (:mod:`~fdistill.dense.segment`, ...) supplies only its model,
loss and evaluation, as every task of the engine does.
"""
from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .backbone import backbone_blocks

log = logging.getLogger(__name__)

__all__ = ["build_dense_optimizer", "build_dense_schedule", "train_dense", "BestTracker", "run_folder",
           "plot_dense_curves", "recipe_config", "peak_memory"]

#: recipe entries that may differ between a checkpoint and the resumed run
RESUME_SAFE = ("epochs", "max_steps", "eval_interval", "log_interval", "num_workers", "figure_images")


def build_dense_optimizer(model: nn.Module, optim) -> torch.optim.Optimizer:
    """timm AdamW over :func:`~fdistill.eval.layer_decay.param_groups_layer_decay` groups: the
    backbone's blocks (found on ``model.backbone`` alone) decay with depth, the decoder trains at
    ``optim.lr``; no weight decay on norms, biases, position embeddings (and relative-position
    tables unless ``optim.decay_rel_pos_bias``)."""
    from timm.optim import create_optimizer_v2

    from ..engine.optim import no_weight_decay_patterns
    from ..eval.layer_decay import param_groups_layer_decay

    nwd = no_weight_decay_patterns(model, decay_rel_pos_bias=optim.decay_rel_pos_bias)
    groups = param_groups_layer_decay(model, layer_decay=optim.layer_decay, weight_decay=optim.weight_decay,
                                      no_weight_decay=nwd, blocks=backbone_blocks(model))
    return create_optimizer_v2(groups, opt="adamw", lr=optim.lr, weight_decay=optim.weight_decay,
                               betas=tuple(optim.betas), eps=optim.eps)


def build_dense_schedule(optimizer, optim, *, total_steps: int, steps_per_epoch: int):
    """The recipe's schedule (:func:`fdistill.engine.schedule.create_schedule`); ``step``
    milestones are given in epochs."""
    from ..engine.schedule import create_schedule

    milestones = [int(round(m * steps_per_epoch)) for m in optim.milestones]
    return create_schedule(optimizer, optim.schedule, peak_lr=optim.lr, total_steps=total_steps,
                           warmup_steps=optim.warmup_steps, warmup_lr=optim.warmup_lr, min_lr=optim.min_lr,
                           power=optim.power, milestones=milestones)


@contextmanager
def run_folder(out: Path, env):
    """One run per output folder (a second is refused); every library's INFO lines go to run.log."""
    from ..engine.lock import hold_run_lock
    from ..logs import run_log_file

    with hold_run_lock(out, env), run_log_file(out, env.is_main):
        yield


class BestTracker:
    """Best and last weights of a dense task: ``model_last.safetensors`` after every evaluation,
    ``model_best.safetensors`` when ``key`` improves (``higher`` or lower is better), one line per
    evaluation in ``log.jsonl``. Its state goes into the engine's checkpoint."""

    def __init__(self, out: Path, key: str, *, higher: bool, env):
        self.out, self.key, self.higher, self.env = out, key, higher, env
        self.best: Optional[Dict[str, Any]] = None

    def update(self, model: nn.Module, record: Dict[str, Any]) -> None:
        from ..weights import save_model_weights

        value = record[self.key]
        better = self.best is None or (value > self.best[self.key] if self.higher else value < self.best[self.key])
        if better:
            self.best = dict(record)
        if self.env.is_main:
            save_model_weights(model, self.out / "model_last.safetensors")
            if better:
                save_model_weights(model, self.out / "model_best.safetensors")
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def state_dict(self) -> Dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best = state.get("best")


def sync_batch_norm(model: nn.Module, env) -> nn.Module:
    """Under DDP on GPUs, the dense heads' BatchNorm layers (BEiT's pyramid neck, UPerNet's
    convolutions) become ``SyncBatchNorm``: statistics over the global batch, as mmseg's
    ``SyncBN`` in the paper's setting (torch's SyncBatchNorm runs on GPUs only; on CPU each
    process keeps its own statistics)."""
    if env.distributed and env.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def check_batch_norm_batch(model: nn.Module, batch_size: int, env, what: str) -> None:
    """A BatchNorm over a 1 x 1 map (UPerNet's global pyramid pooling) cannot train on one
    image: with fewer than 2 images per statistics group, one clear error before any data is read
    (torch's own is a ValueError deep in the first forward)."""
    from ..data import DataError

    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    synced = any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    group = batch_size * (env.world_size if synced else 1)
    if has_bn and group < 2:
        raise DataError(f"{what} has batch norm (over 1x1 maps in the pyramid pooling), which needs at least 2 "
                        f"images per process to train; data.batch_size={batch_size} (several GPUs pool their "
                        "statistics with SyncBatchNorm)")


def check_datasets(datasets: Sequence[Any], env, *, progress: bool = True) -> None:
    """Run each dataset's ``check(indices)`` (the folder datasets': label ranges, bit depths,
    sizes; see :mod:`fdistill.data.segmentation`, :mod:`~fdistill.data.depth`,
    :mod:`~fdistill.data.coco`) before training, each rank over its share of the files; the
    first problem any rank finds is raised on every rank as one :class:`~fdistill.data.DataError`."""
    from ..data import DataError
    from ..engine.distributed import gather_objects

    problem = None
    for ds in datasets:
        check = getattr(ds, "check", None)
        if check is None:
            continue
        try:
            check(range(env.rank, len(ds), env.world_size), progress=progress and env.is_main)
        except DataError as e:
            problem = str(e)
            break
    problems = gather_objects(problem, env) if env.distributed else [problem]
    first = next((p for p in problems if p), None)
    if first:
        raise DataError(first)


def train_dense(task, cfg, *, optimizer_model: nn.Module, train_ds, output_dir: Path, recipe: Dict[str, Any],
                env, resume: Optional[str], collate_fn: Optional[Callable] = None,
                on_step: Optional[Callable[[int], bool]] = None, progress: bool = True):
    """Train ``task`` on ``train_ds`` with the recipe ``cfg`` (a dense config) on the engine;
    returns ``(TrainResult, steps_per_epoch)``. Starting over clears what an earlier run left in
    the folder (its weights, logs and checkpoints), resuming keeps them."""
    from ..data import DataError, ResumableDistributedSampler
    from ..engine.trainer import Trainer, TrainerConfig
    from ..eval.data import make_loader

    bs = cfg.data.batch_size
    if len(train_ds) < bs * env.world_size:
        raise DataError(f"the training set has {len(train_ds)} images, fewer than one global batch "
                        f"({bs} x {env.world_size}); lower data.batch_size")
    sampler = ResumableDistributedSampler(len(train_ds), num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                          seed=cfg.seed, drop_last=True)
    loader = make_loader(train_ds, batch_size=bs, shuffle=False, sampler=sampler, num_workers=cfg.data.num_workers,
                         drop_last=True, seed=cfg.seed, device=env.device, collate_fn=collate_fn)
    steps_per_epoch = sampler.num_samples // bs
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.epochs * steps_per_epoch, cfg.max_steps)
    epochs = cfg.epochs if cfg.max_steps is None else min(cfg.epochs, math.ceil(total / steps_per_epoch))
    optimizer = build_dense_optimizer(optimizer_model, cfg.optim)
    scheduler = build_dense_schedule(optimizer, cfg.optim, total_steps=total, steps_per_epoch=steps_per_epoch)
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(task, optimizer=optimizer, scheduler=scheduler, loader=loader, sampler=sampler,
                      output_dir=output_dir, recipe=recipe, resume_safe=RESUME_SAFE, env=env, on_step=on_step,
                      config=TrainerConfig(epochs=epochs, steps_per_epoch=steps_per_epoch, total_steps=total,
                                           batch_size=bs, precision=recipe["precision"], clip_grad=cfg.optim.clip_grad,
                                           eval_interval=cfg.eval_interval, log_interval=cfg.log_interval,
                                           ckpt_interval=cfg.ckpt_interval, keep_last=cfg.keep_last,
                                           max_nonfinite=cfg.max_nonfinite, tensorboard=cfg.tensorboard,
                                           progress=progress))
    if trainer.resume(resume) is None:  # starting over: nothing of an earlier run may mix in
        trainer.start_over(("log.jsonl", "model_best.safetensors", "model_last.safetensors", "curves.png"))
    return trainer.fit(), steps_per_epoch


def plot_dense_curves(out: Path, history: Sequence[Dict[str, Any]], key: str, title: str) -> Optional[Path]:
    """``out/curves.png``: the training loss (``metrics.jsonl``) and the validation ``key`` per
    evaluation, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_path, read_jsonl

    recs: List[Dict[str, Any]] = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
    recs = [r for r in recs if "loss" in r and "step" in r]
    if not recs and not history:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].plot([r["step"] for r in recs], [r["loss"] for r in recs], marker=".")
    axes[0].set(xlabel="step", ylabel="training loss", title="training loss")
    axes[1].plot([h["step"] for h in history], [h[key] for h in history], marker="o")
    axes[1].set(xlabel="step", ylabel=key, title=f"validation {key}")
    for a in axes:
        a.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = out / "curves.png"
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def run_metrics(result, steps_per_epoch: int, env, *, train_ds, val_ds, info: Dict[str, Any], precision: str,
                device: torch.device) -> Dict[str, Any]:
    """What every dense command's ``metrics.json`` says of its run (beside the task's scores):
    steps, whether it stopped early, throughput, data sizes, the backbone, precision, memory."""
    return {"steps": result.step, "total_steps": result.total_steps,
            "epochs_done": result.step / max(steps_per_epoch, 1), "stopped_early": result.stopped_by is not None,
            "images_per_s": result.images_seen * env.world_size / result.train_time_s,
            "train_images": len(train_ds), "val_images": len(val_ds), "backbone": info["kind"],
            "precision": precision, **peak_memory(device)}


def display_name(adapter, source: Optional[Dict[str, Any]]) -> str:
    """The model's name for figure titles: its spec, shortened to its last 45 characters."""
    name = str((source or {}).get("spec") or adapter.name)
    return name if len(name) <= 48 else "..." + name[-45:]


def recipe_config(cfg) -> Dict[str, Any]:
    """The recipe as recorded in the checkpoint (a resume with another is refused), without what
    may change on resume (recorded at the top level) or does not touch the weights."""
    from ..config import to_dict

    d = to_dict(cfg)
    for k in ("epochs", "max_steps", "eval_interval", "log_interval", "figure_images", "device"):
        d.pop(k, None)  # recorded at the top level (resume-safe) or irrelevant to the weights
    d.get("data", {}).pop("num_workers", None)
    return d


def peak_memory(device: torch.device) -> Dict[str, Any]:
    """Peak memory of the run: the accelerator's allocator, or this process's resident set on CPU."""
    if device.type == "cuda":
        return {"peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)}
    try:
        import resource

        return {"peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    except (ImportError, OSError):  # pragma: no cover
        return {}
