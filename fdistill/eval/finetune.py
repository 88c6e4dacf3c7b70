"""End-to-end fine-tuning for image classification, BEiT / MAE / official-FD style (paper Sec. 4.1,
Table 1: the same recipe for the teacher and its distilled student).

Everything that the field's libraries do comes from timm: AdamW (``create_optimizer_v2``) over
layer-decay parameter groups (``param_groups_layer_decay``, :mod:`fdistill.eval.layer_decay`),
warm-up + cosine per step (``CosineLRScheduler``, as the official ``lr_scheduler.py``),
mixup / cutmix with label smoothing (``Mixup`` + ``SoftTargetCrossEntropy``), RandAugment and
random erasing (``create_transform``, :mod:`fdistill.eval.data`), EMA (``ModelEmaV3``). This
module is only the loop around them: mixed precision, gradient clipping, evaluation (top-1 /
top-5) after every ``eval_interval`` epochs, best and last weights, and resumable checkpoints.

Output folder::

    classifier.json              how to rebuild the network (fdistill.eval.load_classifier)
    model_best.safetensors       weights with the best validation top-1 (model or EMA)
    model_last.safetensors       weights after the last evaluation
    checkpoints/ckpt_<step>.pt   full training state, the engine's one format (atomic, newest kept)
    metrics.jsonl                training records (loss, lr, gradient norm, skipped steps, img/s)
    log.jsonl                    one line per evaluation
    metrics.json                 written by the command layer

Resuming (``resume="auto"`` or a path) restores model, optimizer, loss scaler, EMA, RNG states,
the step counter and the sampler position, so a run stopped mid-epoch (``max_steps``, SIGTERM /
SIGUSR1) continues with exactly the batches it had not seen. The learning-rate schedule is a
function of the step and the current ``epochs``/``max_steps``, so those two may change on resume;
any other recipe change is refused.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbone import Backbone

from ..weights import save_model_weights
from .classifier import build_classifier, save_classifier_spec
from ..precision import PRECISIONS, autocast
from .data import dataset_classes, model_inputs
from .layer_decay import param_groups_layer_decay
from ..engine.trainer import Task

log = logging.getLogger(__name__)

__all__ = ["finetune", "evaluate_classifier", "FinetuneTask", "RESUME_SAFE"]

#: recipe entries that may differ between a checkpoint and the resumed run
RESUME_SAFE = ("epochs", "max_steps", "eval_interval", "log_interval", "num_workers")


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader, *, mean: Sequence[float], std: Sequence[float],
                        device: torch.device, precision: str = "fp32", env=None, progress: bool = False,
                        desc: str = "eval") -> Dict[str, float]:
    """Top-1 / top-5 (percent) and mean cross-entropy of ``model`` over ``loader`` (images in [0, 1]
    or uint8, normalised here with ``mean``/``std``). Counts are summed on the device and
    all-reduced over ranks: one host sync at the end."""
    from tqdm.auto import tqdm

    was = model.training
    model.eval()
    stats, ncls = None, 0
    for images, y in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False, dynamic_ncols=True):
        x = model_inputs(images, mean, std, device)
        y = torch.as_tensor(y).to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(x)
        logits = logits.float()
        ncls = logits.shape[1]
        top = logits.topk(min(5, ncls), dim=1).indices
        hit = top.eq(y.view(-1, 1))
        s = torch.stack([hit[:, :1].any(1).sum().float(), hit.any(1).sum().float(),
                         F.cross_entropy(logits, y, reduction="sum"), torch.tensor(float(y.numel()), device=device)])
        stats = s if stats is None else stats + s
    if stats is None:
        stats = torch.zeros(4, device=device)
    if env is not None and env.distributed:
        from ..engine.distributed import all_reduce_sum_

        all_reduce_sum_(stats, env)
    c1, c5, loss, n = stats.tolist()
    model.train(was)
    n = max(n, 1.0)
    out = {"top1": 100.0 * c1 / n, "loss": loss / n, "n": int(n)}
    if ncls >= 5:  # top-5 of fewer than 5 classes would always be 100%
        out["top5"] = 100.0 * c5 / n
    return out


class _ClassifierLoss(nn.Module):
    """The fine-tuning loss of a batch ``(images, labels)``: mixup / cutmix (timm ``Mixup``), the
    classifier under the step's autocast, the criterion in fp32 outside it."""

    def __init__(self, model: nn.Module, criterion: nn.Module, mixup_fn=None):
        super().__init__()
        self.model, self.criterion, self.mixup_fn = model, criterion, mixup_fn

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        images, y = batch
        device = next(self.model.parameters()).device
        x = images.to(device, non_blocking=True).float()  # (B, 3, H, W), normalised by the transform
        y = torch.as_tensor(y).to(device, non_blocking=True)
        if self.mixup_fn is not None:
            x, y = self.mixup_fn(x, y)
        logits = self.model(x)  # (B, num_classes)
        with torch.autocast(device.type, enabled=False):
            loss = self.criterion(logits.float(), y)
        return {"loss": loss}


class FinetuneTask(Task):
    """Fine-tuning as a task of :class:`fdistill.engine.trainer.Trainer`: the classifier, its loss,
    the top-1/top-5 evaluation of the model (and EMA), best and last weights, ``log.jsonl``."""

    name = "finetune"

    def __init__(self, model: nn.Module, criterion: nn.Module, mixup_fn, *, spec, classes, val_loader,
                 mean, std, precision: str, env, out: Path):
        self.model, self.criterion, self.mixup_fn = model, criterion, mixup_fn
        self.spec, self.classes, self.val_loader = spec, classes, val_loader
        self.mean, self.std, self.precision, self.env, self.out = mean, std, precision, env, out
        self.device = next(model.parameters()).device
        self.best: Optional[Dict[str, Any]] = None

    def loss_module(self, model: nn.Module) -> nn.Module:
        return _ClassifierLoss(model, self.criterion, self.mixup_fn)

    def evaluate(self, model: nn.Module, ema: Optional[nn.Module], epoch: int, step: int) -> Dict[str, Any]:
        kw = dict(mean=self.mean, std=self.std, device=self.device, precision=self.precision, env=self.env)
        res = {"epoch": epoch + 1, "step": step, "model": evaluate_classifier(model, self.val_loader, desc="eval", **kw)}
        if ema is not None:
            res["ema"] = evaluate_classifier(ema, self.val_loader, desc="eval ema", **kw)
        which = max(("model", "ema") if ema is not None else ("model",), key=lambda w: res[w]["top1"])
        if self.env.is_main:
            save_model_weights(model, self.out / "model_last.safetensors")
            if self.best is None or res[which]["top1"] > self.best["top1"]:
                self.best = dict(res[which], epoch=epoch + 1, weights=which)
                save_model_weights(model if which == "model" else ema, self.out / "model_best.safetensors")
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(res) + "\n")
        log.info("epoch %d: top1 %.2f%s (best %.2f)", epoch + 1, res["model"]["top1"],
                 f", ema {res['ema']['top1']:.2f}" if ema is not None else "",
                 self.best["top1"] if self.best else float("nan"))
        return res

    def state_dict(self) -> Dict[str, Any]:
        return {"best": self.best, "classifier": self.spec, "num_classes": len(self.classes)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best = state.get("best")


def finetune(
    backbone: Backbone,
    train_ds,
    val_ds,
    *,
    output_dir: str | os.PathLike,
    global_pool: str = "avg",
    drop_path_rate: float = 0.3,
    epochs: int = 100,
    warmup_epochs: float = 20.0,
    max_steps: Optional[int] = None,
    batch_size: int = 128,
    num_workers: int = 8,
    lr: float = 1.25e-3 * 128 / 512,
    warmup_lr: float = 2.5e-7 * 128 / 512,
    min_lr: float = 2.5e-7 * 128 / 512,
    weight_decay: float = 0.05,
    layer_decay: float = 0.6,
    decay_rel_pos_bias: bool = True,
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    clip_grad: float = 5.0,
    mixup: Optional[Dict[str, Any]] = None,
    label_smoothing: float = 0.1,
    ema_decay: Optional[float] = None,
    precision: str = "fp32",
    eval_interval: int = 1,
    log_interval: int = 50,
    ckpt_interval: Optional[int] = None,
    keep_last: int = 2,
    max_nonfinite: int = 20,
    tensorboard: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    resume: Optional[str] = "auto",
    source: Optional[Dict[str, Any]] = None,
    env=None,
    progress: bool = True,
    on_step: Optional[Callable[[int], bool]] = None,
) -> Dict[str, Any]:
    """Fine-tune ``backbone`` as an image classifier; returns the metrics.

    Args:
        backbone: the pre-trained model (from :func:`fdistill.models.loading.load_model`); the
            classifier is built by :func:`fdistill.eval.classifier.build_classifier`.
        train_ds: labelled dataset of *normalised* augmented images (the model's mean/std; see
            :func:`fdistill.eval.data.train_transform`), with ``classes``.
        val_ds: labelled dataset of images in [0, 1] / uint8 (e.g. ``fdistill.data.eval_transform``)
            with the same classes.
        output_dir: where weights, checkpoints and logs go (module docstring).
        global_pool, drop_path_rate: classifier head pooling and stochastic depth.
        epochs, warmup_epochs: schedule length (per-step warm-up + cosine).
        max_steps: stop after this many optimizer steps (the schedule then spans them).
        batch_size: images per process per step.
        lr, warmup_lr, min_lr: peak, warm-up start and final learning rates (already scaled to
            the global batch); each layer's group multiplies them by its ``lr_scale``.
        weight_decay, layer_decay, betas, eps: AdamW + layer-wise lr decay.
        decay_rel_pos_bias: weight decay on relative-position-bias tables (official FD: yes).
        clip_grad: max gradient norm (0: off).
        mixup: keyword arguments of timm ``Mixup`` (``mixup_alpha``, ``cutmix_alpha``, ``prob``,
            ``switch_prob``, ``mode``) or None; label smoothing goes inside it when set.
        label_smoothing: label smoothing of the cross-entropy.
        ema_decay: keep a timm ``ModelEmaV3`` with this decay and evaluate it too (None: off).
        precision: ``fp32`` | ``bf16`` | ``fp16`` (autocast; fp16 with a loss scaler).
        eval_interval, log_interval: epochs between evaluations, steps between progress updates.
        ckpt_interval: steps between extra mid-epoch checkpoints (None: at epoch ends only).
        keep_last: checkpoints kept in ``output_dir/checkpoints`` (the newest).
        max_nonfinite: a step with a non-finite loss or gradient is skipped; this many in a row
            stop the run with an error (the engine's policy, the same as distillation's).
        tensorboard: also write the training records to ``output_dir/tensorboard``.
        resume: ``"auto"`` (continue from the newest loadable ``output_dir/checkpoints/ckpt_*.pt``
            when present), a checkpoint path, or None (start over, overwriting).
        source: ``{"spec", "kwargs"}`` the backbone was loaded with (recorded for rebuilding).
        env: a :class:`fdistill.engine.distributed.DistEnv` for ``torchrun`` runs (default: one process).
        on_step: called with the step number after every optimizer step; returning True stops the
            run like SIGTERM does (checkpoint, return with ``stopped_early``).

    Returns:
        ``top1``/``top5``: the best evaluation (the official logs' "max accuracy"), ``best_epoch``,
        ``best_weights`` (``model`` or ``ema``), ``last`` (last evaluation), ``ema_last``, ``steps``,
        ``epochs_done``, ``images_per_s``.
    """
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    from ..data import DataError, ResumableDistributedSampler
    from ..engine.distributed import DistEnv
    from ..engine.lock import hold_run_lock
    from ..engine.optim import no_weight_decay_patterns
    from ..engine.rng import seed_everything
    from ..engine.trainer import Trainer, TrainerConfig
    from ..logs import run_log_file

    device = torch.device(device)
    env = env or DistEnv(device=device)
    out = Path(output_dir)
    # one run per output folder (a second one is refused); run.log gets every library's INFO lines
    with hold_run_lock(out, env), run_log_file(out, env.is_main):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        recipe = dict(model=(source or {}).get("spec") or backbone.name, global_pool=global_pool, drop_path_rate=drop_path_rate, epochs=epochs, warmup_epochs=warmup_epochs,
                      max_steps=max_steps, batch_size=batch_size, world_size=env.world_size, num_workers=num_workers,
                      lr=lr, warmup_lr=warmup_lr, min_lr=min_lr, weight_decay=weight_decay, layer_decay=layer_decay,
                      decay_rel_pos_bias=decay_rel_pos_bias, betas=list(betas), eps=eps, clip_grad=clip_grad,
                      mixup=mixup, label_smoothing=label_smoothing,
                      ema_decay=ema_decay, precision=precision, eval_interval=eval_interval, log_interval=log_interval,
                      seed=seed, train_images=len(train_ds), num_classes=len(dataset_classes(train_ds)))

        # -- data ---------------------------------------------------------------------------------------
        classes = dataset_classes(train_ds)
        if not classes:
            raise DataError("the training set has no classes")
        if dataset_classes(val_ds) != classes:
            raise DataError(f"train and val classes differ: {classes[:5]}... vs {dataset_classes(val_ds)[:5]}...")
        num_classes = len(classes)
        if mixup and batch_size % 2:
            raise DataError(f"mixup/cutmix needs an even batch size, got {batch_size}")
        if len(train_ds) < batch_size * env.world_size:
            raise DataError(f"the training set has {len(train_ds)} images, fewer than one global batch "
                            f"({batch_size} x {env.world_size}); lower data.batch_size")
        seed_everything(seed + env.rank)
        sampler = ResumableDistributedSampler(len(train_ds), num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                              seed=seed, drop_last=True)
        from .data import make_loader

        train_loader = make_loader(train_ds, batch_size=batch_size, shuffle=False, sampler=sampler,
                                   num_workers=num_workers, drop_last=True, seed=seed, device=device)
        val_sub = val_ds if not env.distributed else torch.utils.data.Subset(val_ds, range(env.rank, len(val_ds), env.world_size))
        val_loader = make_loader(val_sub, batch_size=batch_size, shuffle=False, num_workers=num_workers, device=device)
        steps_per_epoch = sampler.num_samples // batch_size
        total_steps = epochs * steps_per_epoch if max_steps is None else min(epochs * steps_per_epoch, int(max_steps))
        warmup_steps = min(int(round(warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))

        # -- model, optimizer, schedule -------------------------------------------------------------------
        model, spec = build_classifier(backbone, num_classes, global_pool=global_pool, drop_path_rate=drop_path_rate,
                                       source=source)
        model = model.to(device)
        if spec["kind"] == "adapter" and not (source or {}).get("spec"):
            log.warning("no source spec given: load_classifier will not be able to rebuild this %s classifier "
                        "(pass source={'spec': ..., 'kwargs': ...})", backbone.name)
        nwd = no_weight_decay_patterns(model, decay_rel_pos_bias=decay_rel_pos_bias)
        groups = param_groups_layer_decay(model, layer_decay=layer_decay, weight_decay=weight_decay, no_weight_decay=nwd)
        optimizer = create_optimizer_v2(groups, opt="adamw", lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)
        scheduler = CosineLRScheduler(optimizer, t_initial=max(total_steps - warmup_steps, 1), lr_min=min_lr,
                                      warmup_lr_init=warmup_lr, warmup_t=warmup_steps, warmup_prefix=True,
                                      cycle_limit=1, t_in_epochs=False)
        mixup_fn = None
        if mixup:
            mixup_fn = Mixup(**mixup, label_smoothing=label_smoothing, num_classes=num_classes)
            criterion = SoftTargetCrossEntropy()
        elif label_smoothing > 0:
            criterion = LabelSmoothingCrossEntropy(smoothing=label_smoothing)
        else:
            criterion = nn.CrossEntropyLoss()

        # -- the loop: the shared engine ------------------------------------------------------------------
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
        task = FinetuneTask(model, criterion, mixup_fn, spec=spec, classes=classes, val_loader=val_loader,
                            mean=backbone.mean, std=backbone.std, precision=precision, env=env, out=out)
        trainer = Trainer(task, optimizer=optimizer, scheduler=scheduler, loader=train_loader, sampler=sampler,
                          output_dir=out, recipe=recipe, resume_safe=RESUME_SAFE, env=env, on_step=on_step,
                          config=TrainerConfig(epochs=epochs, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                                               batch_size=batch_size, precision=precision, clip_grad=clip_grad,
                                               eval_interval=eval_interval, log_interval=log_interval,
                                               ckpt_interval=ckpt_interval, keep_last=keep_last,
                                               max_nonfinite=max_nonfinite, ema_decay=ema_decay,
                                               tensorboard=tensorboard, progress=progress))
        if trainer.resume(resume) is None:  # starting over: nothing of an earlier run in this folder may mix in
            trainer.start_over(("log.jsonl", "model_best.safetensors", "model_last.safetensors"))
        if env.is_main:
            save_classifier_spec(spec, classes, out)
        result = trainer.fit()
        history, best, step = result.history, task.best, result.step
        stopped = result.stopped_by is not None
        elapsed = result.train_time_s  # training throughput, evaluations excluded
        images_seen = result.images_seen
        last = history[-1] if history else {}
        metrics = {
            "top1": best["top1"] if best else None,
            **({"top5": best["top5"]} if best and "top5" in best else {}),
            "best_epoch": best["epoch"] if best else None, "best_weights": best["weights"] if best else None,
            "last": last.get("model"), "ema_last": last.get("ema"), "steps": step, "total_steps": total_steps,
            "epochs_done": step / max(steps_per_epoch, 1), "steps_per_epoch": steps_per_epoch,
            "images_per_s": images_seen * env.world_size / elapsed, "num_classes": num_classes,
            "train_images": len(train_ds), "val_images": len(val_ds), "stopped_early": stopped,
            "classifier": spec["kind"], "recipe": recipe,
        }
        return metrics
