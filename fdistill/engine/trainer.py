"""The training loop that tasks share: ``Trainer(task, ...).fit()``.

A *task* (:class:`Task`) supplies only what differs between commands: the model, the loss of a
batch (a module, so DDP and ``torch.compile`` see one forward), what to evaluate and any state
of its own (best score, history). The trainer owns the rest, the same for every command:

- the step (:class:`~fdistill.engine.step.TrainStep`: autocast, fp16 loss scaling, gradient
  accumulation, clipping, an update skipped on a non-finite gradient norm);
- the schedule (``scheduler.step_update(step)`` before each update: a function of the step);
- ``torchrun``/DDP (every rank stops at the same step: :func:`~fdistill.engine.distributed.any_rank`);
- the progress bar, ``metrics.jsonl`` and TensorBoard (:class:`~fdistill.engine.metrics.RunLog`);
- checkpoints ``checkpoints/ckpt_<step>.pt`` in the one format (:mod:`fdistill.engine.checkpoint`:
  atomic, CRC-checked, the newest loadable one found on resume, ``keep_last`` retained);
- SIGTERM/SIGUSR1 (:class:`~fdistill.engine.signals.StopRequest`: checkpoint at the next step
  boundary, also while blocked waiting for data);
- exact resume: model, optimizer, scaler, EMA, the task's state, every rank's RNG and the
  sampler position (a stopped and resumed run ends with the same weights as one that was not);
- the non-finite policy: a step whose loss or gradient is not finite is skipped and counted;
  ``max_nonfinite`` in a row stop the run with an error naming the last good checkpoint;
- periodic evaluation (every ``eval_interval`` epochs and at the end) with the EMA (timm's
  ``ModelEmaV3``) evaluated beside the model.

The shape is MAE's ``engine_finetune.py`` and DINOv2's ``do_train`` with a periodic
checkpointer, written once here because neither is a library. FD's own loop
(:mod:`fdistill.engine.distill`) shares the step, metrics, checkpoint and signal modules; it is
the next to become a task of this trainer.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .checkpoint import (FORMAT, VERSION, checkpoint_path, find_resume_checkpoint, list_checkpoints, load_checkpoint,
                         prune_checkpoints, save_checkpoint)
from .distributed import DistEnv, any_rank, any_ranks, barrier, gather_objects, unwrap, wrap_ddp
from .errors import RunError
from .metrics import NonFiniteGuard, RunLog, StepMetrics
from .rng import capture_rng_state, restore_rng_state
from .signals import StopRequest, StopWhileWaiting
from .step import TrainStep

log = logging.getLogger(__name__)

__all__ = ["Task", "TrainerConfig", "Trainer", "TrainResult"]


class Task:
    """What a command supplies to :class:`Trainer`.

    Attributes:
        name: the command (``finetune``, ...): the progress bar's label and the checkpoint's ``task``.
        model: the trained network (DDP wraps it; its ``state_dict`` is checkpointed).
    """

    name: str = "task"
    model: nn.Module

    def loss_module(self, model: nn.Module) -> nn.Module:
        """A module whose ``forward(batch)`` returns ``{"loss": 0-dim tensor, ...}``, calling
        ``model`` (the DDP-wrapped network) inside."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, ema: Optional[nn.Module], epoch: int, step: int) -> Optional[Dict[str, Any]]:
        """Evaluate after epoch ``epoch`` (0-based) at ``step``; the record is returned by
        :meth:`Trainer.fit` in ``history`` (None: this task does not evaluate)."""
        return None

    def state_dict(self) -> Dict[str, Any]:
        """The task's own state to checkpoint (tensors, numbers, strings, lists, dicts only)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


@dataclass
class TrainerConfig:
    """The loop's settings (each command's recipe maps onto these)."""

    epochs: int
    steps_per_epoch: int
    total_steps: int
    batch_size: int  # per process
    precision: str = "fp32"
    clip_grad: float = 0.0
    accum_steps: int = 1
    eval_interval: int = 1
    log_interval: int = 50
    ckpt_interval: Optional[int] = None  # None: at epoch ends only
    keep_last: int = 2
    max_nonfinite: int = 20
    ema_decay: Optional[float] = None
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self):
        for k in ("epochs", "batch_size", "accum_steps", "eval_interval", "log_interval", "keep_last", "max_nonfinite"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.steps_per_epoch < 1 or self.total_steps < 0:
            raise ValueError(f"steps_per_epoch must be >= 1 and total_steps >= 0, got "
                             f"{self.steps_per_epoch}, {self.total_steps}")
        if self.ckpt_interval is not None and self.ckpt_interval < 1:
            raise ValueError(f"ckpt_interval must be >= 1, got {self.ckpt_interval}")


@dataclass
class TrainResult:
    step: int
    total_steps: int
    history: List[Dict[str, Any]]
    checkpoint: Optional[Path]
    stopped_by: Optional[str]
    images_seen: int
    train_time_s: float  # without evaluations
    last_record: Dict[str, Any]  # the last metrics.jsonl record of this run ({} if it trained nothing)


class Trainer:
    """Runs a :class:`Task` (see the module docstring for what it owns).

    Args:
        task: the command's model, loss and evaluation.
        optimizer: over ``task.model``'s parameters; ``scheduler``: a timm scheduler
            (``step_update(step)``).
        loader, sampler: the training batches (per process) and their
            :class:`~fdistill.data.ResumableDistributedSampler` (``set_epoch``/``set_start``).
        output_dir: the run folder (``checkpoints/``, ``metrics.jsonl``).
        config: :class:`TrainerConfig`.
        recipe: the run's settings, recorded in the checkpoint; a resume with other values is
            refused except for the keys in ``resume_safe``.
        env: the process group (:class:`~fdistill.engine.distributed.DistEnv`).
        on_step: called with the step after each update; True stops the run like SIGTERM.
    """

    def __init__(self, task: Task, *, optimizer: torch.optim.Optimizer, scheduler, loader, sampler,
                 output_dir, config: TrainerConfig, recipe: Dict[str, Any], resume_safe: Sequence[str] = (),
                 env: Optional[DistEnv] = None, on_step: Optional[Callable[[int], bool]] = None):
        self.task, self.optimizer, self.scheduler = task, optimizer, scheduler
        self.loader, self.sampler, self.cfg = loader, sampler, config
        self.out = Path(output_dir)
        self.recipe, self.resume_safe = dict(recipe), tuple(resume_safe)
        self.env = env or DistEnv()
        self.on_step = on_step
        self.device = next(task.model.parameters()).device
        self.ema = None
        if config.ema_decay is not None:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(task.model, decay=config.ema_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.history: List[Dict[str, Any]] = []
        self.last_checkpoint: Optional[Path] = None
        self.eval_time = 0.0

    # -- checkpoints ------------------------------------------------------------------------------------
    def resume(self, resume: Optional[str]) -> Optional[Path]:
        """``"auto"``: continue from the newest loadable checkpoint of the run folder if any; a
        path: from that file; None: start over. Returns the checkpoint resumed from."""
        name = self.task.name
        if resume is None:
            return None
        if resume == "auto":
            path, ck = find_resume_checkpoint(self.out, task=name)
            if path is None:
                found = list_checkpoints(self.out)
                if found:  # starting over would delete them: refuse, naming them
                    raise RunError(f"{len(found)} checkpoint(s) in {found[0].parent} but none loads as a "
                                   f"`fdistill {name}` checkpoint (see the warnings above); move them away to "
                                   "start over, or pass a checkpoint to resume from")
                return None
        else:
            path = Path(resume)
            ck = load_checkpoint(path, task=name)
        diff = self._recipe_diff(ck["config"])
        if diff:
            raise RunError(f"{path} was written with another recipe or dataset ({'; '.join(diff[:6])}); "
                           "use another --output or resume=None to start over")
        self.task.model.load_state_dict(ck["model"]["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.scaler.is_enabled() and ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        if self.ema is not None and ck.get("ema") is not None:
            self.ema.load_state_dict(ck["ema"])
        self.task.load_state_dict(ck.get("task_state") or {})
        prog = ck["progress"]
        self.step, self.epoch, self.step_in_epoch = int(prog["step"]), int(prog["epoch"]), int(prog["step_in_epoch"])
        self.history = list(ck.get("history", []))
        rngs = ck["rng"]["per_rank"]
        restore_rng_state(rngs[min(self.env.rank, len(rngs) - 1)])
        self.last_checkpoint = path
        log.info("resumed from %s at step %d", path, self.step)
        return path

    def _recipe_diff(self, old: Dict[str, Any]) -> List[str]:
        import json

        from ..config import diff_configs

        o = {k: v for k, v in old.items() if k not in self.resume_safe}
        n = {k: v for k, v in self.recipe.items() if k not in self.resume_safe}
        return diff_configs(json.loads(json.dumps(o)), json.loads(json.dumps(n)))

    def save(self) -> Path:
        """Checkpoint the state after ``self.step`` (a collective: every rank calls it)."""
        rngs = gather_objects(capture_rng_state(), self.env)
        path = checkpoint_path(self.out, self.step)
        cfg = self.cfg
        if self.env.is_main:
            epoch, in_epoch = ((self.epoch + 1, 0) if self.step_in_epoch >= cfg.steps_per_epoch
                               else (self.epoch, self.step_in_epoch))
            total_batch = cfg.batch_size * cfg.accum_steps * self.env.world_size
            save_checkpoint(path, {
                "format": FORMAT, "version": VERSION, "task": self.task.name, "config": self.recipe,
                "model": {"model": unwrap(self.task.model).state_dict()},
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": {"per_rank": rngs},
                "task_state": self.task.state_dict(), "history": self.history,
                "progress": {"step": self.step, "epoch": epoch, "step_in_epoch": in_epoch,
                             "samples": self.step * total_batch, "world_size": self.env.world_size,
                             "batch_size": cfg.batch_size, "accum_steps": cfg.accum_steps,
                             "total_batch": total_batch, "steps_per_epoch": cfg.steps_per_epoch,
                             "total_steps": cfg.total_steps},
            })
            prune_checkpoints(self.out, cfg.keep_last, protect=path)
        barrier(self.env)
        self.last_checkpoint = path
        return path

    # -- evaluation -------------------------------------------------------------------------------------
    def _evaluate(self, model: nn.Module, epoch: int) -> None:
        t0 = time.time()
        rec = self.task.evaluate(unwrap(model), self.ema.module if self.ema is not None else None, epoch, self.step)
        if rec is not None:
            self.history.append(rec)
        self.eval_time += time.time() - t0

    # -- the loop ---------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg, env = self.cfg, self.env
        model = wrap_ddp(self.task.model, env)
        step_fn = TrainStep(self.task.loss_module(model), self.optimizer, precision=cfg.precision,
                            clip_grad=cfg.clip_grad, accum_steps=cfg.accum_steps, scaler=self.scaler,
                            params=list(self.task.model.parameters()), sync_module=model)
        runlog = RunLog(self.out, enabled=env.is_main, total_steps=cfg.total_steps, start_step=self.step,
                        tensorboard=cfg.tensorboard, desc=self.task.name, progress=cfg.progress)
        metrics = StepMetrics(self.device, parts=())
        stopped_by: Optional[str] = None
        record: Dict[str, Any] = {}
        trained_any = False
        images_seen = 0
        t_start = time.time()
        self.eval_time = 0.0

        nonfinite = NonFiniteGuard(metrics, cfg.max_nonfinite, option="max_nonfinite", start_step=self.step)
        try:
            with StopRequest() as stop:
                while self.step < cfg.total_steps and self.epoch < cfg.epochs:
                    if any_rank(stop.requested, env):  # a signal between epochs (or during evaluation)
                        stopped_by = stop.signame or "a stop request"
                        self.save()
                        break
                    first = self.step_in_epoch
                    self.sampler.set_epoch(self.epoch)
                    self.sampler.set_start(first * cfg.batch_size * cfg.accum_steps)
                    model.train()
                    runlog.set_description(f"{self.task.name} {self.epoch + 1}/{cfg.epochs}")
                    batches = iter(self.loader)
                    # loading in this process draws the augmentations from the global generators: a
                    # stop in the middle of a batch must not leave them half-advanced in the checkpoint
                    in_process = int(getattr(self.loader, "num_workers", 0)) == 0
                    while self.step_in_epoch < cfg.steps_per_epoch and self.step < cfg.total_steps:
                        rng_before = capture_rng_state() if in_process else None
                        try:  # a stop arriving while this blocks on data is honoured at once
                            with stop.interruptible():
                                micro = [next(batches) for _ in range(cfg.accum_steps)]
                            interrupted = False
                        except StopWhileWaiting:
                            micro, interrupted = None, True
                            if rng_before is not None:
                                restore_rng_state(rng_before)  # as if the batch had never been started
                        except StopIteration:
                            micro, interrupted = None, False
                        stop_now, exhausted = any_ranks([interrupted, micro is None and not interrupted], env)
                        if stop_now:  # nothing of this step was done: the checkpoint is at the current step
                            stopped_by = stop.signame or "a stop request"
                            break
                        if exhausted:
                            raise RunError(f"the loader ended after {self.step_in_epoch} of {cfg.steps_per_epoch} "
                                           f"steps of epoch {self.epoch}")
                        self.scheduler.step_update(self.step)  # the lr of this update
                        outs, grad_norm, ok = step_fn(micro)
                        for o in outs:
                            metrics.add_micro(o)
                        n_images = sum(_batch_size(b) for b in micro)
                        images_seen += n_images
                        self.step += 1
                        self.step_in_epoch += 1
                        trained_any = True
                        metrics.add_step(grad_norm, ok, n_images)
                        if self.ema is not None:
                            self.ema.update(unwrap(model), step=self.step)
                        nonfinite.after_step(self.step, self.last_checkpoint)
                        runlog.advance()
                        if self.on_step is not None and self.on_step(self.step):
                            stop.request("on_step")
                        stopping = any_rank(stop.requested, env)
                        epoch_end = self.step_in_epoch >= cfg.steps_per_epoch
                        if self.step % cfg.log_interval == 0 or epoch_end or self.step == cfg.total_steps or stopping:
                            record = {"step": self.step, "epoch": round(self.step / cfg.steps_per_epoch, 4),
                                      "lr": self.optimizer.param_groups[-1]["lr"], **metrics.collect(env)}
                            runlog.write(record)
                            if record["nonfinite_streak"] >= cfg.max_nonfinite:
                                nonfinite.check(self.step, self.last_checkpoint)
                        if stopping:
                            stopped_by = stop.signame or "a stop request"
                            break
                        if (cfg.ckpt_interval and self.step % cfg.ckpt_interval == 0 and not epoch_end
                                and self.step < cfg.total_steps):
                            nonfinite.check(self.step, self.last_checkpoint)
                            self.save()  # mid-epoch (the epoch's end writes its own)
                    epoch_done = self.step_in_epoch >= cfg.steps_per_epoch
                    if stopped_by and not epoch_done:
                        nonfinite.check(self.step, self.last_checkpoint)
                        self.save()
                        break
                    last = self.epoch + 1 == cfg.epochs or self.step >= cfg.total_steps
                    if not epoch_done or (self.epoch + 1) % cfg.eval_interval == 0 or last:
                        self._evaluate(model, self.epoch)  # (not epoch_done: max_steps reached mid-epoch)
                    nonfinite.check(self.step, self.last_checkpoint)
                    self.save()
                    if epoch_done:
                        self.epoch, self.step_in_epoch = self.epoch + 1, 0
                    if stopped_by:
                        break
                if not trained_any and not self.history and not stopped_by:  # nothing left to train
                    self._evaluate(model, max(self.step // cfg.steps_per_epoch - 1, 0))
                    self.save()
        finally:
            runlog.close()
        if stopped_by and env.is_main:
            log.warning("stopped by %s at step %d/%d; checkpoint %s. Run the same command again to resume.",
                        stopped_by, self.step, cfg.total_steps, self.last_checkpoint)
        return TrainResult(step=self.step, total_steps=cfg.total_steps, history=self.history,
                           checkpoint=self.last_checkpoint, stopped_by=stopped_by, images_seen=images_seen,
                           train_time_s=max(time.time() - t_start - self.eval_time, 1e-9), last_record=record)


def _batch_size(batch) -> int:
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    return int(x.shape[0]) if hasattr(x, "shape") else len(x)
