"""A feature-distillation run, top to bottom: ``distill(cfg)``.

    set-up      process group, device, precision, seeds, run folder, resume checkpoint (checked
                against the config before anything expensive is built)
    build       teacher + student + projector (FeatureDistiller), data, AdamW, schedule
    loop        :class:`DistillTask` on the shared :class:`~fdistill.engine.trainer.Trainer`: for
                each optimizer step lr <- schedule(step); accum_steps micro-batches of forward
                (autocast) + backward (DDP syncs on the last); unscale, clip, skip the update on
                a non-finite gradient norm; log every log_interval steps (the only host syncs);
                checkpoint every ckpt_interval steps, on SIGTERM/SIGUSR1, at the end

The run folder (``train.output``) holds ``config.yaml`` (the resolved config),
``metrics.jsonl`` (one JSON object per log interval) and ``checkpoints/ckpt_<step>.pt``.

Exact resume: the data order and views are a pure function of (seed, epoch, index) and the
loader starts at any sample (``fdistill.data``); the checkpoint carries the optimizer, scaler,
every RNG state of every rank, the step and the samples of the epoch consumed by all ranks
together. So a run stopped at step k and resumed ends with the same weights as one that never
stopped (``tests/test_engine_distill.py`` checks with ``torch.equal`` on CPU).

Resume on another number of processes: allowed at the same global batch (``data.batch_size x
processes x optim.accum_steps``; the per-process batch and the accumulation may change). The
epoch position is re-split over the new ranks (the sampler's global positions,
:mod:`fdistill.data.sampler`), so every later step takes the same set of samples, with the same
views, as the original run would have; per-rank generators that cannot map 1:1 are re-derived
from (seed, step, rank) (:func:`fdistill.engine.resume.rederived_seed`). Tar-shard streams refuse another layout mid-epoch
(:func:`fdistill.data.shards.check_resume_layout`). Checked in ``tests/test_resume_world_size.py``.
"""
from __future__ import annotations


import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from ..config import ConfigError, save_yaml, to_dict
from ..config.distill import (RESUME_GLOBAL_BATCH_KEYS, RESUME_SAFE_KEYS, DistillConfig, resolve_lr, student_args_of,
                              teachers_description)
from ..data.errors import DataError
from ..data.shards import WebShardDataset, check_resume_layout
from ..logs import run_log_file
from ..precision import resolve_precision
from .builders import (build_batch_view, build_dataset, build_distiller, build_loader, build_optimizer,
                       build_scheduler)
from .checkpoint import clean_partial_writes
from .distributed import DistEnv, barrier, init_distributed, shutdown
from .errors import RunError
from .lock import hold_run_lock
from .resume import find_checked_resume, saved_layout, saved_position
from .rng import seed_everything
from .trainer import Task, Trainer, TrainerConfig

log = logging.getLogger(__name__)

@dataclass
class RunResult:
    """What a finished (or pre-empted) run leaves behind."""

    run_dir: Path
    step: int  # optimizer steps done
    total_steps: int
    checkpoint: Optional[Path]  # the last checkpoint written or resumed from
    loss: float  # mean loss of the last log interval (nan if none)
    stopped_by: Optional[str] = None  # signal name when pre-empted
    elapsed_s: float = 0.0

    @property
    def complete(self) -> bool:
        return self.step >= self.total_steps


def distill(cfg: DistillConfig, *, resume: str = "auto",
            on_step: Optional[Callable[[int], None]] = None,
            on_batch: Optional[Callable[[int, dict], None]] = None) -> RunResult:
    """Run feature distillation as ``cfg`` says (see module docstring).

    Args:
        cfg: the resolved config (``build_config(DistillConfig, path, overrides)``).
        resume: ``auto`` (the newest valid checkpoint in ``cfg.train.output``, if any), ``none``
            (start fresh; refused if the folder already holds checkpoints), or a checkpoint
            file / run folder to continue from.
        on_step: called with the step number after every optimizer step (on every rank).
        on_batch: a debug hook, called on every rank with ``(step, batch)`` for each micro-batch
            the loop takes from the loader, before its forward; ``step`` is the number of the
            optimizer step it belongs to (1-based, as in ``on_step`` and the metrics);
            ``batch["indices"]`` holds its dataset indices (-1 for tar shards).

    Raises:
        RunError: incompatible/unreadable checkpoint, too many non-finite losses in a row.
        ConfigError, DataError, TeacherError: bad config, data or teacher, before any compute.
    """
    env = init_distributed(cfg.train.device)
    threads = torch.get_num_threads()
    if env.device.type == "cpu" and cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    try:
        # one run per output folder; its run.log gets every library's INFO lines (fdistill.logs)
        with hold_run_lock(cfg.train.output, env), run_log_file(Path(cfg.train.output).expanduser(), env.is_main):
            return _run(cfg, env, resume, on_step, on_batch)
    finally:
        torch.set_num_threads(threads)
        shutdown(env)


# -- set-up helpers ---------------------------------------------------------------------------------
def _teacher_info(cfg: DistillConfig, distiller) -> Dict[str, Any]:
    """What the checkpoint records of the teacher; with ``teachers:``, the first teacher's
    fields at the top (what single-teacher readers use) and every teacher under ``teachers``."""
    if not cfg.teachers:
        return _one_teacher_info(cfg.teacher, distiller.teacher)
    infos = [dict(_one_teacher_info(t, distiller.targets[t.name].teacher), name=t.name, weight=t.weight,
                  norm=t.norm, targets=t.targets, head=t.head, cls_target=distiller.targets[t.name].cls_target)
             for t in cfg.teachers]
    return dict(infos[0], teachers=infos)


def _one_teacher_info(tc, teacher) -> Dict[str, Any]:
    # provenance: which weights the teacher carries and their licence, which the student inherits
    # (plain strings / None, so the checkpoint still loads with weights_only=True)
    prov = dict(getattr(teacher, "provenance", None) or {})
    provenance = {"spec": str(prov.get("spec") or tc.spec),
                  "weights": None if prov.get("weights") is None else str(prov["weights"]),
                  "license": str(prov.get("license") or "unknown"),
                  "license_source": None if prov.get("license_source") is None else str(prov["license_source"])}
    return {"spec": tc.spec, "kwargs": dict(tc.kwargs), "after_norm": tc.after_norm,
            "embed_dim": int(teacher.embed_dim), "num_prefix_tokens": int(teacher.num_prefix_tokens),
            "provenance": provenance}


def _fit_target_norms(cfg: DistillConfig, distiller, dataset, to_images, env: DistEnv) -> None:
    """Before a fresh multi-teacher run: the ``stats`` / ``phi_s`` normalisers are fitted on the
    teachers' tokens of ``multi.stats_images`` training images (their own pass over the data, in
    a fixed order; the statistics go into the checkpoint's heads, so a resume does not redo this)."""
    if not cfg.teachers or not distiller.norms_to_fit():
        return
    from ..data import DataError

    loader = build_loader(cfg, dataset, num_replicas=env.world_size, rank=env.rank,
                          pin_memory=env.device.type == "cuda")
    loader.set_epoch(0, start_index=0)
    per_rank = max(1, -(-cfg.multi.stats_images // env.world_size))
    with torch.autocast(env.device.type, enabled=False):
        seen = distiller.fit_target_norms((to_images(b) for b in loader), max_images=per_rank, env=env)
    if not seen:
        raise DataError("the statistics pass saw no images")
    if env.is_main:
        log.info("target statistics fitted: %s", ", ".join(f"{n} ({k} tokens)" for n, k in seen.items()))


class DistillTask(Task):
    """Feature distillation as a :class:`~fdistill.engine.trainer.Trainer` task: the trained
    module is the distiller's branch (student + projector; DDP wraps only it, never the teacher),
    the loss is the distiller's forward on the batch's images."""

    name = "distill"

    def __init__(self, cfg: DistillConfig, distiller, to_images, *, precision: str, total_batch: int):
        self.cfg, self.distiller, self.to_images = cfg, distiller, to_images
        self.precision, self.total_batch = precision, total_batch
        self.model = distiller.branch
        # a multi-teacher run reports each teacher's loss (its [CLS] / patch split is per teacher, not one)
        self.metric_parts = () if cfg.teachers else ("loss_prefix", "loss_patch")
        self.metric_extra = (tuple(f"loss_{t.name}" for t in cfg.teachers)
                             + (("resolution_px",) if cfg.teachers and cfg.multi.resolution_fraction > 0 else ()))

    def loss_module(self, model):
        self.distiller.branch = model  # the DDP-wrapped branch inside the distiller's forward
        return self.distiller

    def prepare(self, batch):
        return self.to_images(batch)  # (B, 3, H, W) uint8 on the device

    def checkpoint_parts(self):
        return self.distiller.checkpoint_parts()

    def checkpoint_extra(self):
        return {"student_args": student_args_of(self.cfg), "teacher": _teacher_info(self.cfg, self.distiller)}

    def progress_extra(self):
        return {"num_workers": self.cfg.data.num_workers}  # the recipe's value (shard resumes compare it)

    def grad_norm_params(self):
        return None  # the optimizer's order (decay, then no-decay parameters), as the official code

    def empty_epoch_error(self, epoch: int) -> str:
        c = self.cfg.data
        return (f"epoch {epoch} yielded no batch of {c.batch_size} on some process: the data holds fewer samples "
                f"than data.samples_per_epoch={c.samples_per_epoch} implies, or fewer than one batch per process "
                f"and loader worker; check data.path, data.samples_per_epoch, batch size")

    def describe(self, trainer) -> str:
        cfg, env = self.cfg, trainer.env
        lr0 = resolve_lr(cfg.optim, self.total_batch)[0]
        resumed = f" | resumed from {trainer.last_checkpoint} at step {trainer.step}" if trainer.last_checkpoint else ""
        return (f"fdistill distill: {teachers_description(cfg)} -> {cfg.student.arch} | {env.world_size} process(es) "
                f"on {env.device.type}, {self.precision} | global batch {self.total_batch}, peak lr {lr0:.3g} | "
                f"{trainer.cfg.steps_per_epoch} steps/epoch, {trainer.cfg.total_steps} steps{resumed}")


# -- the run -------------------------------------------------------------------------------------
def _run(cfg: DistillConfig, env: DistEnv, resume: str, on_step, on_batch=None) -> RunResult:
    t_start = time.perf_counter()
    tc, oc = cfg.train, cfg.optim
    device = env.device
    precision = resolve_precision(tc.precision, device.type)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (the fp32 recipe) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest conv kernels once
    seed_everything(tc.seed)  # the same initial weights on every rank (a random-init teacher included)
    run_dir = Path(tc.output).expanduser()
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_partial_writes(run_dir)
    barrier(env)

    # resume target: checked against the config before anything expensive is built
    cfg_dict = to_dict(cfg)
    # the global batch too: data.batch_size/optim.accum_steps may follow the world size
    ckpt_path, ckpt = find_checked_resume(resume, run_dir, env, task="distill", recipe=cfg_dict,
                                          safe_keys=RESUME_SAFE_KEYS, batch_keys=RESUME_GLOBAL_BATCH_KEYS)
    layout = saved_layout(ckpt) if ckpt is not None else None
    if env.is_main:
        save_yaml(cfg, run_dir / "config.yaml")

    # data: the epoch length fixes the schedule
    dataset = build_dataset(cfg)
    if ckpt is not None and isinstance(dataset, WebShardDataset):  # shard streams: same layout mid-epoch
        try:
            saved_epoch, saved_consumed = saved_position(ckpt)
            check_resume_layout({k: layout[k] for k in ("world_size", "num_workers", "batch_size")},
                                {"world_size": env.world_size, "num_workers": cfg.data.num_workers,
                                 "batch_size": cfg.data.batch_size},
                                samples_in_epoch=saved_consumed, epoch=saved_epoch)
        except DataError as e:
            raise RunError(f"{ckpt_path}: {e}") from e
    loader = build_loader(cfg, dataset, num_replicas=env.world_size, rank=env.rank,
                          pin_memory=device.type == "cuda")
    to_images = build_batch_view(cfg, device)  # batch -> uint8 (B, 3, H, W) on the device
    micro_per_epoch = loader.batches_per_epoch
    if micro_per_epoch is None:  # a shard stream: its length is declared
        if not cfg.data.samples_per_epoch:
            raise ConfigError("tar-shard data has no known length: set data.samples_per_epoch (images per epoch)")
        micro_per_epoch = cfg.data.samples_per_epoch // env.world_size // cfg.data.batch_size
    steps_per_epoch = micro_per_epoch // oc.accum_steps
    if steps_per_epoch < 1:
        raise ConfigError(f"an epoch holds {micro_per_epoch} batches of {cfg.data.batch_size} per process, fewer "
                          f"than optim.accum_steps={oc.accum_steps}: use more data or smaller batches")
    total_batch = cfg.data.batch_size * env.world_size * oc.accum_steps
    schedule_steps = max(1, int(round(tc.epochs * steps_per_epoch)))
    total_steps = min(schedule_steps, tc.max_steps) if tc.max_steps is not None else schedule_steps

    # model, optimizer, schedule
    distiller = build_distiller(cfg, device=device, precision=precision)
    distiller.train()
    seed_everything(tc.seed + env.rank)  # as the official code: each rank its own drop-path/mask stream
    optimizer = build_optimizer(cfg, distiller.branch, total_batch=total_batch)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch=steps_per_epoch, total_batch=total_batch)

    # the loop: the shared engine (step, logging, checkpoints, signals, exact resume)
    task = DistillTask(cfg, distiller, to_images, precision=precision, total_batch=total_batch)
    trainer = Trainer(
        task, optimizer=optimizer, scheduler=scheduler, loader=loader, sampler=None, output_dir=run_dir,
        recipe=cfg_dict, resume_safe=RESUME_SAFE_KEYS, resume_batch_keys=RESUME_GLOBAL_BATCH_KEYS, env=env,
        on_step=on_step, on_batch=on_batch,
        config=TrainerConfig(epochs=None, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                             batch_size=cfg.data.batch_size, precision=precision, clip_grad=oc.clip_grad,
                             accum_steps=oc.accum_steps, log_interval=tc.log_interval, ckpt_interval=tc.ckpt_interval,
                             keep_last=tc.keep_last, max_nonfinite=tc.max_nonfinite,
                             nonfinite_option="train.max_nonfinite", tensorboard=tc.tensorboard,
                             compile=tc.compile, per_epoch=False, short_epochs=True, seed=tc.seed))
    if ckpt is not None:
        trainer.restore(ckpt_path, ckpt)
    else:
        _fit_target_norms(cfg, distiller, dataset, to_images, env)
    del ckpt
    result = trainer.fit()
    return RunResult(run_dir=run_dir, step=result.step, total_steps=total_steps, checkpoint=result.checkpoint,
                     loss=float(result.last_record.get("loss", math.nan)), stopped_by=result.stopped_by,
                     elapsed_s=time.perf_counter() - t_start)
