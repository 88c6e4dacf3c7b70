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

Every training command is a task of it: distillation (:class:`~fdistill.engine.distill.DistillTask`:
step intervals, no epoch-end evaluation, tar-shard epochs that may end short, resume on another
number of processes at the same global batch), fine-tuning, the probes, dense fine-tuning and
CLIP pre-training. The shape is MAE's ``engine_finetune.py`` and DINOv2's ``do_train`` with a
periodic checkpointer, written once here because neither is a library.

A new task supplies ``name``, ``model``, ``loss_module(model)`` and, where it differs from the
defaults, ``prepare`` (batch -> the loss module's input), ``evaluate``, ``checkpoint_parts``
/ ``checkpoint_extra`` and its own ``state_dict``.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..data.sampler import split_position
from .checkpoint import (FORMAT, VERSION, checkpoint_path, list_checkpoints, prune_checkpoints, save_checkpoint,
                         set_aside_later_checkpoints)
from .distributed import DistEnv, any_rank, any_ranks, barrier, gather_objects, unwrap, wrap_ddp
from .errors import RunError
from .metrics import NonFiniteGuard, RunLog, StepMetrics
from .resume import find_checked_resume, rederived_seed, resume_position
from .rng import capture_rng_state, restore_rng_state, seed_everything
from .signals import StopRequest, StopWhileWaiting
from .step import TrainStep

log = logging.getLogger(__name__)

__all__ = ["Task", "TrainerConfig", "Trainer", "TrainResult"]


class Task:
    """What a command supplies to :class:`Trainer`.

    Attributes:
        name: the command (``finetune``, ...): the progress bar's label and the checkpoint's ``task``.
        model: the trained network (DDP wraps it; its ``state_dict`` is checkpointed).
        metric_parts, metric_extra: keys of the loss module's output logged beside ``loss``
            (:class:`~fdistill.engine.metrics.StepMetrics`).
    """

    name: str = "task"
    model: nn.Module
    metric_parts: Tuple[str, ...] = ()
    metric_extra: Tuple[str, ...] = ()

    def loss_module(self, model: nn.Module) -> nn.Module:
        """A module whose ``forward(batch)`` returns ``{"loss": 0-dim tensor, ...}``, calling
        ``model`` (the DDP-wrapped network) inside."""
        raise NotImplementedError

    def prepare(self, batch):
        """A loader batch -> what the loss module takes (e.g. moved to the device)."""
        return batch

    def evaluate(self, model: nn.Module, ema: Optional[nn.Module], epoch: int, step: int) -> Optional[Dict[str, Any]]:
        """Evaluate after epoch ``epoch`` (0-based) at ``step``; the record is returned by
        :meth:`Trainer.fit` in ``history`` (None: this task does not evaluate)."""
        return None

    def checkpoint_parts(self) -> Dict[str, nn.Module]:
        """The modules a checkpoint stores under ``model.<part>`` (and a resume loads)."""
        return {"model": self.model}

    def checkpoint_extra(self) -> Dict[str, Any]:
        """More top-level checkpoint entries (what the task's readers need, e.g. the student's
        arguments); plain data only, so the file loads with ``weights_only=True``."""
        return {}

    def progress_extra(self) -> Dict[str, Any]:
        """More entries of the checkpoint's ``progress`` (e.g. the loader workers of the recipe)."""
        return {}

    def grad_norm_params(self) -> Optional[List[torch.Tensor]]:
        """The parameters whose gradient norm is clipped, in summation order (None: the optimizer's)."""
        return list(self.model.parameters())

    def empty_epoch_error(self, epoch: int) -> Optional[str]:
        """The error when epoch ``epoch`` yields no batch at all (None: the trainer's own)."""
        return None

    def describe(self, trainer: "Trainer") -> Optional[str]:
        """A line printed when the run starts (None: none)."""
        return None

    def state_dict(self) -> Dict[str, Any]:
        """The task's own state to checkpoint (tensors, numbers, strings, lists, dicts only)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


@dataclass
class TrainerConfig:
    """The loop's settings (each command's recipe maps onto these).

    ``per_epoch``: evaluate, log and checkpoint at every epoch's end (fine-tuning, probes);
    False: by step intervals only (distillation, whose epochs are just passes over the data).
    ``short_epochs``: an epoch whose loader ends early (a tar-shard stream short of its declared
    length) is ended with a warning instead of an error. ``epochs=None``: as many epochs as
    ``total_steps`` needs."""

    epochs: Optional[int]
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
    nonfinite_option: str = "max_nonfinite"  # the recipe key named in the error
    ema_decay: Optional[float] = None
    tensorboard: bool = False
    progress: bool = True
    compile: bool = False
    per_epoch: bool = True
    short_epochs: bool = False
    seed: int = 0  # re-derives the generators of a resume on another number of processes

    def __post_init__(self):
        for k in ("batch_size", "accum_steps", "eval_interval", "log_interval", "keep_last", "max_nonfinite"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.epochs is not None and int(self.epochs) < 1:
            raise ValueError(f"epochs must be >= 1 or None, got {self.epochs}")
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
            :class:`~fdistill.data.ResumableDistributedSampler` (``set_epoch``/``set_start``);
            ``sampler=None``: the loader itself has ``set_epoch(epoch, start_index=)``
            (:class:`~fdistill.data.loader.DistillDataLoader`).
        output_dir: the run folder (``checkpoints/``, ``metrics.jsonl``); None: a task that keeps
            no run folder (no checkpoint, no file, no resume: e.g. a sweep over cached features).
        config: :class:`TrainerConfig`.
        recipe: the run's settings, recorded in the checkpoint; a resume with other values is
            refused except for the keys in ``resume_safe`` (:func:`~fdistill.engine.resume.check_resume_compatible`).
        resume_batch_keys: the recipe keys of the global batch (per-process batch, accumulation);
            given, a resume on another number of processes at the same global batch is allowed
            (the epoch position re-split over the ranks); empty: the same number of processes only.
        env: the process group (:class:`~fdistill.engine.distributed.DistEnv`).
        on_step: called with the step after each update; True stops the run like SIGTERM.
        on_batch: a debug hook, called with ``(step, batch)`` for each micro-batch before its
            forward (``step``: 1-based, as in ``on_step`` and the metrics).
    """

    def __init__(self, task: Task, *, optimizer: torch.optim.Optimizer, scheduler, loader, sampler,
                 output_dir, config: TrainerConfig, recipe: Dict[str, Any], resume_safe: Sequence[str] = (),
                 resume_batch_keys: Sequence[str] = (), env: Optional[DistEnv] = None,
                 on_step: Optional[Callable[[int], Optional[bool]]] = None,
                 on_batch: Optional[Callable[[int, Any], None]] = None):
        self.task, self.optimizer, self.scheduler = task, optimizer, scheduler
        self.loader, self.sampler, self.cfg = loader, sampler, config
        self.out = None if output_dir is None else Path(output_dir)
        self.recipe, self.resume_safe, self.resume_batch_keys = dict(recipe), tuple(resume_safe), tuple(resume_batch_keys)
        self.env = env or DistEnv()
        self.on_step, self.on_batch = on_step, on_batch
        self.device = next(task.model.parameters()).device
        self.ema = None
        if config.ema_decay is not None:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(task.model, decay=config.ema_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.total_batch = config.batch_size * config.accum_steps * self.env.world_size
        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.history: List[Dict[str, Any]] = []
        self.last_checkpoint: Optional[Path] = None
        self.eval_time = 0.0
        self._rank_start: Optional[int] = None  # this rank's start in the resumed epoch
        self._rng_state = None  # restored once the resumed epoch's iterator exists
        self._rng_seed: Optional[int] = None  # instead, when the saved states do not map 1:1 to the ranks

    # -- checkpoints ------------------------------------------------------------------------------------
    def find_resume(self, resume: Optional[str]) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
        """The checkpoint ``resume`` names (see :func:`~fdistill.engine.resume.resolve_resume`),
        checked against this run's recipe; ``(None, None)`` to start over."""
        if resume is None or (resume == "none" and self.out is None):
            return None, None
        if self.out is None:
            raise ValueError("a Trainer without output_dir keeps no checkpoints to resume from")
        return find_checked_resume(resume, self.out, self.env, task=self.task.name, recipe=self.recipe,
                                   safe_keys=self.resume_safe, batch_keys=self.resume_batch_keys)

    def resume(self, resume: Optional[str]) -> Optional[Path]:
        """None: start over; ``"none"``: start over, refused if the run folder holds checkpoints;
        ``"auto"``: continue from the newest loadable checkpoint of the run folder if any; a file
        or run folder: from that checkpoint. Returns the checkpoint resumed from."""
        path, ck = self.find_resume(resume)
        if ck is not None:
            self.restore(path, ck)
        return path

    def start_over(self, files: Sequence[str] = ()) -> None:
        """Remove an earlier run's checkpoints, ``metrics.jsonl`` and the task's ``files`` from
        the run folder (rank 0), so nothing of it mixes into a run that starts from step 0."""
        if self.out is None or not self.env.is_main:
            return
        for f in ("metrics.jsonl", *files):
            (self.out / f).unlink(missing_ok=True)
        for p in list_checkpoints(self.out):
            p.unlink()

    def restore(self, path: Path, ck: Dict[str, Any]) -> None:
        """Load a (checked, :meth:`find_resume`) checkpoint into the freshly built task and loop."""
        from ..weights import WeightsError, load_into

        try:
            for part, module in self.task.checkpoint_parts().items():
                if part not in ck["model"]:
                    raise WeightsError(f"the checkpoint has no {part!r} part (it holds {sorted(ck['model'])})")
                load_into(unwrap(module), ck["model"][part], what=part)
        except WeightsError as e:
            raise RunError(f"checkpoint weights do not fit the model: {e}") from e
        self.optimizer.load_state_dict(ck["optimizer"])
        # the schedule is a function of the step and the *current* recipe (more epochs on resume):
        # its saved state is informational and not loaded
        if self.scaler.is_enabled() and ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        if self.ema is not None and ck.get("ema") is not None:
            self.ema.load_state_dict(ck["ema"])
        self.task.load_state_dict(ck.get("task_state") or {})
        self.history = list(ck.get("history", []))
        self.step = int(ck["progress"]["step"])
        if self.env.is_main:  # a later branch (corrupt newest file skipped, or an explicit older resume)
            set_aside_later_checkpoints(self.out, self.step)
        self.epoch, self._rank_start, self.step_in_epoch = resume_position(
            ck, step=self.step, steps_per_epoch=self.cfg.steps_per_epoch, total_batch=self.total_batch,
            world_size=self.env.world_size, batch_size=self.cfg.batch_size)
        rngs = ck["rng"]["per_rank"]
        if len(rngs) == self.env.world_size:
            self._rng_state = rngs[self.env.rank]
        else:
            self._rng_seed = rederived_seed(self.cfg.seed, self.step, self.env.rank)
            if self.env.is_main:
                log.warning("checkpoint has the RNG states of %d process(es), this run has %d: each rank's generators "
                            "are re-seeded from (seed, step %d, rank); the data is the same, random draws of the "
                            "model (drop path, masks) differ from the original run's", len(rngs),
                            self.env.world_size, self.step)
        self.last_checkpoint = path
        log.info("resumed from %s at step %d", path, self.step)

    def save(self) -> Optional[Path]:
        """Checkpoint the state after ``self.step`` (a collective: every rank calls it); None
        without a run folder."""
        if self.out is None:
            return None
        rngs = gather_objects(capture_rng_state(), self.env)
        path = checkpoint_path(self.out, self.step)
        cfg = self.cfg
        if self.env.is_main:
            # where the next step starts (a finished epoch is saved as the start of the next one;
            # explicit, as a short shard epoch ends before steps_per_epoch)
            epoch, in_epoch = ((self.epoch + 1, 0) if self.step_in_epoch >= cfg.steps_per_epoch
                               else (self.epoch, self.step_in_epoch))
            save_checkpoint(path, {
                "format": FORMAT, "version": VERSION, "task": self.task.name, "config": self.recipe,
                **self.task.checkpoint_extra(),
                "model": {k: unwrap(m).state_dict() for k, m in self.task.checkpoint_parts().items()},
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": {"per_rank": rngs},
                "task_state": self.task.state_dict(), "history": self.history,
                "progress": {"step": self.step, "epoch": epoch, "step_in_epoch": in_epoch,
                             # consumed by all ranks together: a resume on another world size re-splits it
                             "samples_in_epoch": in_epoch * self.total_batch,
                             "samples": self.step * self.total_batch, "world_size": self.env.world_size,
                             "batch_size": cfg.batch_size, "accum_steps": cfg.accum_steps,
                             "num_workers": int(getattr(self.loader, "num_workers", 0) or 0),
                             "total_batch": self.total_batch, "steps_per_epoch": cfg.steps_per_epoch,
                             "total_steps": cfg.total_steps, **self.task.progress_extra()},
            })
            prune_checkpoints(self.out, cfg.keep_last, protect=path)  # never what this run just wrote
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
    def _start_epoch(self):
        """Position the data at this epoch's next sample (this rank's share of what all ranks
        consumed) and return its iterator; a resume's generators are restored after the
        iterator exists, so nothing draws from them in between."""
        cfg, env = self.cfg, self.env
        start = (self._rank_start if self._rank_start is not None else
                 split_position(self.step_in_epoch * self.total_batch, env.world_size, cfg.batch_size))
        self._rank_start = None
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)
            self.sampler.set_start(start)
        else:
            self.loader.set_epoch(self.epoch, start_index=start)
        batches = iter(self.loader)
        if self._rng_state is not None:
            restore_rng_state(self._rng_state)
        elif self._rng_seed is not None:
            seed_everything(self._rng_seed)
        self._rng_state = self._rng_seed = None
        return batches

    def fit(self) -> TrainResult:
        cfg, env, task = self.cfg, self.env, self.task
        model = wrap_ddp(task.model, env)
        step_fn = TrainStep(task.loss_module(model), self.optimizer, precision=cfg.precision,
                            clip_grad=cfg.clip_grad, accum_steps=cfg.accum_steps, scaler=self.scaler,
                            params=self.task.grad_norm_params(), sync_module=model, compile=cfg.compile)
        runlog = RunLog(self.out, enabled=env.is_main, total_steps=cfg.total_steps, start_step=self.step,
                        tensorboard=cfg.tensorboard, desc=task.name, progress=cfg.progress)
        line = self.task.describe(self)
        if line:
            runlog.message(line)
        metrics = StepMetrics(self.device, parts=task.metric_parts, extra=task.metric_extra)
        stopped_by: Optional[str] = None
        record: Dict[str, Any] = {}
        trained_any = False
        images_seen = 0
        t_start = time.time()
        self.eval_time = 0.0

        nonfinite = NonFiniteGuard(metrics, cfg.max_nonfinite, option=cfg.nonfinite_option, start_step=self.step)
        prepare = self.task.prepare
        try:
            with StopRequest() as stop:
                while self.step < cfg.total_steps and (cfg.epochs is None or self.epoch < cfg.epochs):
                    if any_rank(stop.requested, env):  # a signal between epochs (or during evaluation)
                        stopped_by = stop.signame or "a stop request"
                        self.save()
                        break
                    first = self.step_in_epoch
                    model.train()
                    runlog.set_description(task.name if cfg.epochs is None else
                                           f"{task.name} {self.epoch + 1}/{cfg.epochs}")
                    batches = self._start_epoch()
                    # loading in this process draws the augmentations from the global generators: a
                    # stop in the middle of a batch must not leave them half-advanced in the checkpoint
                    in_process = int(getattr(self.loader, "num_workers", 0)) == 0
                    short = False
                    while self.step_in_epoch < cfg.steps_per_epoch and self.step < cfg.total_steps:
                        rng_before = capture_rng_state() if in_process else None
                        try:  # a stop arriving while this blocks on data (a stalled file system) is honoured at once
                            with stop.interruptible():
                                micro = _take(batches, cfg.accum_steps)
                            interrupted = False
                        except StopWhileWaiting:
                            micro, interrupted = None, True
                            if rng_before is not None:
                                restore_rng_state(rng_before)  # as if the batch had never been started
                        # every rank learns whether any was stopped while waiting, or ran out of data
                        # (a shard stream short of its declared length): all end the epoch at once
                        stop_now, exhausted = any_ranks([interrupted, micro is None and not interrupted], env)
                        if stop_now:  # nothing of this step was done: the checkpoint is at the current step
                            stopped_by = stop.signame or "a stop request"
                            break
                        if exhausted:
                            empty = self.task.empty_epoch_error(self.epoch) if self.step_in_epoch == first == 0 else None
                            if empty:
                                raise RunError(empty)
                            if not cfg.short_epochs or self.step_in_epoch == first == 0:
                                raise RunError(f"the loader ended after {self.step_in_epoch} of {cfg.steps_per_epoch} "
                                               f"steps of epoch {self.epoch} (batches of {cfg.batch_size} per "
                                               f"process): the data holds fewer samples than the epoch needs")
                            if env.is_main:
                                log.warning("epoch %d ended after %d of %d steps (the data is shorter than declared); "
                                            "the next epoch starts at its beginning", self.epoch,
                                            self.step_in_epoch, cfg.steps_per_epoch)
                            short = True
                            break
                        self.scheduler.step_update(self.step)  # the lr of this update
                        if self.on_batch is not None:
                            for b in micro:
                                self.on_batch(self.step + 1, b)
                        skipped = sum(int(b.get("skipped", 0)) for b in micro if isinstance(b, dict))
                        micro = [prepare(b) for b in micro]
                        outs, grad_norm, ok = step_fn(micro)
                        for o in outs:
                            metrics.add_micro(o)
                        n_images = sum(_batch_size(b) for b in micro)
                        images_seen += n_images
                        self.step += 1
                        self.step_in_epoch += 1
                        trained_any = True
                        metrics.add_step(grad_norm, ok, n_images, skipped)
                        if self.ema is not None:
                            self.ema.update(unwrap(model), step=self.step)
                        nonfinite.after_step(self.step, self.last_checkpoint)
                        runlog.advance()
                        if self.on_step is not None and self.on_step(self.step):
                            stop.request("on_step")
                        stopping = any_rank(stop.requested, env)
                        epoch_end = self.step_in_epoch >= cfg.steps_per_epoch
                        if (self.step % cfg.log_interval == 0 or (epoch_end and cfg.per_epoch)
                                or self.step == cfg.total_steps or stopping):
                            record = {"step": self.step, "epoch": round(self.step / cfg.steps_per_epoch, 4),
                                      "lr": self.optimizer.param_groups[-1]["lr"],
                                      "samples": self.step * self.total_batch, **metrics.collect(env)}
                            runlog.write(record)
                            if record["nonfinite_streak"] >= cfg.max_nonfinite:
                                nonfinite.check(self.step, self.last_checkpoint)
                        if stopping:
                            stopped_by = stop.signame or "a stop request"
                            break
                        if (cfg.ckpt_interval and self.step % cfg.ckpt_interval == 0 and self.step < cfg.total_steps
                                and not (epoch_end and cfg.per_epoch)):
                            nonfinite.check(self.step, self.last_checkpoint)
                            self.save()  # mid-epoch (a per-epoch task's epoch end writes its own)
                    if short:
                        self.epoch, self.step_in_epoch = self.epoch + 1, 0
                        continue
                    epoch_done = self.step_in_epoch >= cfg.steps_per_epoch
                    if stopped_by and not epoch_done:
                        nonfinite.check(self.step, self.last_checkpoint)
                        self.save()
                        break
                    last = self.epoch + 1 == cfg.epochs or self.step >= cfg.total_steps
                    if cfg.per_epoch or last or stopped_by:
                        if cfg.per_epoch and (not epoch_done or (self.epoch + 1) % cfg.eval_interval == 0) or last:
                            self._evaluate(model, self.epoch)  # (not epoch_done: max_steps reached mid-epoch)
                        nonfinite.check(self.step, self.last_checkpoint)
                        self.save()
                    if epoch_done:
                        self.epoch, self.step_in_epoch = self.epoch + 1, 0
                    if stopped_by:
                        break
                if not trained_any and not self.history and not stopped_by:  # nothing left to train
                    self._evaluate(model, max(self.step // cfg.steps_per_epoch - 1, 0))
                    if self.last_checkpoint is None:  # e.g. max_steps=0: the initial model
                        self.save()
            elapsed = time.time() - t_start
            if env.is_main:
                if stopped_by:
                    runlog.message(f"stopped by {stopped_by} at step {self.step}/{cfg.total_steps}; checkpoint "
                                   f"{self.last_checkpoint}. Run the same command again to resume.")
                loss = record.get("loss", math.nan)
                if self.out is not None:
                    runlog.message(f"done: step {self.step}/{cfg.total_steps}, loss {loss:.4f}, {elapsed / 60:.1f} "
                                   f"min, checkpoint {self.last_checkpoint}, run folder {self.out}")
                elif cfg.progress:  # a folder-less task (a sweep of cached features) has no checkpoint to name
                    runlog.message(f"done: step {self.step}/{cfg.total_steps}, loss {loss:.4f}, {elapsed / 60:.1f} min")
        finally:
            runlog.close()
        return TrainResult(step=self.step, total_steps=cfg.total_steps, history=self.history,
                           checkpoint=self.last_checkpoint, stopped_by=stopped_by, images_seen=images_seen,
                           train_time_s=max(time.time() - t_start - self.eval_time, 1e-9), last_record=record)


def _take(batches, n: int):
    """The next ``n`` batches of an iterator, or None if it ends first."""
    out = []
    for _ in range(n):
        try:
            out.append(next(batches))
        except StopIteration:
            return None
    return out


def _batch_size(batch) -> int:
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    if isinstance(x, dict):
        x = next(iter(x.values()))
    return int(x.shape[0]) if hasattr(x, "shape") else len(x)
