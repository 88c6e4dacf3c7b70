"""A feature-distillation run, top to bottom: ``distill(cfg)``.

    set-up      process group, device, precision, seeds, run folder, resume checkpoint
    build       teacher + student + projector (FeatureDistiller), data, AdamW, schedule
    restore     weights, optimizer, scaler, data position and every RNG of the checkpoint
    loop        for each optimizer step: lr <- schedule(step); accum_steps micro-batches of
                forward (autocast) + backward (DDP syncs on the last); unscale, clip, skip the
                update on a non-finite gradient norm; log every log_interval steps (the only
                host syncs); checkpoint every ckpt_interval steps, on SIGTERM/SIGUSR1, at the end

The run folder (``train.output``) holds ``config.yaml`` (the resolved config),
``metrics.jsonl`` (one JSON object per log interval) and ``checkpoints/ckpt_<step>.pt``.

Exact resume: the data order and views are a pure function of (seed, epoch, index) and the
loader starts at any sample (``fdistill.data``); the checkpoint carries the optimizer, scaler,
every RNG state of every rank and the step, from which epoch and position follow. So a run
stopped at step k and resumed ends with the same weights as one that never stopped
(``tests/test_engine_resume.py`` checks with ``torch.equal`` on CPU).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from ..config import ConfigError, diff_configs, save_yaml, to_dict
from ..config.distill import (RESUME_SAFE_KEYS, DistillConfig, build_batch_view, build_dataset, build_distiller,
                              build_loader, build_optimizer, build_scheduler, resolve_lr, resolve_precision,
                              student_args_of)
from .checkpoint import (checkpoint_path, clean_partial_writes, find_resume_checkpoint, list_checkpoints,
                         load_checkpoint, prune_checkpoints, save_checkpoint, FORMAT, VERSION)
from .distributed import (DistEnv, any_rank, barrier, broadcast_object, gather_objects, init_distributed, shutdown,
                          unwrap, wrap_ddp)
from .errors import RunError
from .metrics import RunLog, StepMetrics
from .rng import capture_rng_state, restore_rng_state, seed_everything
from .signals import StopRequest
from .step import TrainStep

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
            on_step: Optional[Callable[[int], None]] = None) -> RunResult:
    """Run feature distillation as ``cfg`` says (see module docstring).

    Args:
        cfg: the resolved config (``build_config(DistillConfig, path, overrides)``).
        resume: ``auto`` (the newest valid checkpoint in ``cfg.train.output``, if any), ``none``
            (start fresh; refused if the folder already holds checkpoints), or a checkpoint
            file / run folder to continue from.
        on_step: called with the step number after every optimizer step (on every rank).

    Raises:
        RunError: incompatible/unreadable checkpoint, too many non-finite losses in a row.
        ConfigError, DataError, TeacherError: bad config, data or teacher, before any compute.
    """
    env = init_distributed(cfg.train.device)
    threads = torch.get_num_threads()
    if env.device.type == "cpu" and cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    try:
        return _run(cfg, env, resume, on_step)
    finally:
        torch.set_num_threads(threads)
        shutdown(env)


# -- set-up helpers ---------------------------------------------------------------------------------
def check_resume_compatible(saved: Dict[str, Any], current: Dict[str, Any], where: str = "checkpoint") -> None:
    """Refuse a checkpoint whose config differs in keys that change the model, data or
    optimisation (anything not in :data:`RESUME_SAFE_KEYS`)."""
    diffs = [d for d in diff_configs(saved, current)
             if not any(d.split(":")[0] == k or d.startswith(k + ".") for k in RESUME_SAFE_KEYS)]
    if diffs:
        raise RunError(f"{where} was written by an incompatible config; these keys differ "
                       f"(checkpoint != now): " + "; ".join(diffs)
                       + ". Resume with the original values, or start a new run (--output DIR / --resume none).")


def _resolve_resume(resume: str, run_dir: Path, env: DistEnv):
    """(path, checkpoint dict) to resume from, or (None, None)."""
    if resume == "none":
        if env.is_main and list_checkpoints(run_dir):
            raise RunError(f"{run_dir} already holds checkpoints and --resume none was given: use another "
                           "--output folder, or --resume auto to continue that run")
        return None, None
    if resume == "auto":
        path, ckpt = find_resume_checkpoint(run_dir) if env.is_main else (None, None)
        path = broadcast_object(None if path is None else str(path), env)
        if path is None:
            return None, None
        # rank 0 verified the file; the others read the same one
        return Path(path), ckpt if ckpt is not None else load_checkpoint(path, verify=False)
    p = Path(resume).expanduser()
    if p.is_dir():
        found, ckpt = find_resume_checkpoint(p)
        if found is None:
            raise RunError(f"--resume {p}: no valid checkpoint in {p}")
        return found, ckpt
    return p, load_checkpoint(p)


def _teacher_info(cfg: DistillConfig, teacher) -> Dict[str, Any]:
    # provenance: which weights the teacher carries and their licence, which the student inherits
    # (plain strings / None, so the checkpoint still loads with weights_only=True)
    prov = dict(getattr(teacher, "provenance", None) or {})
    provenance = {"spec": str(prov.get("spec") or cfg.teacher.spec),
                  "weights": None if prov.get("weights") is None else str(prov["weights"]),
                  "license": str(prov.get("license") or "unknown"),
                  "license_source": None if prov.get("license_source") is None else str(prov["license_source"])}
    return {"spec": cfg.teacher.spec, "kwargs": dict(cfg.teacher.kwargs), "after_norm": cfg.teacher.after_norm,
            "embed_dim": int(teacher.embed_dim), "num_prefix_tokens": int(teacher.num_prefix_tokens),
            "provenance": provenance}


# -- the run -------------------------------------------------------------------------------------
def _run(cfg: DistillConfig, env: DistEnv, resume: str, on_step) -> RunResult:
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
    ckpt_path, ckpt = _resolve_resume(resume, run_dir, env)
    cfg_dict = to_dict(cfg)
    if ckpt is not None:
        check_resume_compatible(ckpt["config"], cfg_dict, where=str(ckpt_path))
    if env.is_main:
        save_yaml(cfg, run_dir / "config.yaml")

    # data: the epoch length fixes the schedule
    dataset = build_dataset(cfg)
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
    total_steps = min(schedule_steps, tc.max_steps) if tc.max_steps else schedule_steps

    # model, optimizer, schedule, loss scaler
    distiller = build_distiller(cfg, device=device, precision=precision)
    distiller.train()
    seed_everything(tc.seed + env.rank)  # as the official code: each rank its own drop-path/mask stream
    optimizer = build_optimizer(cfg, distiller.branch, total_batch=total_batch)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch=steps_per_epoch, total_batch=total_batch)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    step = 0
    rng_states = None
    if ckpt is not None:
        step = _restore(ckpt, distiller, optimizer, scaler, env, total_batch)
        rng_states = ckpt.get("rng", {}).get("per_rank")
        if rng_states is not None and len(rng_states) != env.world_size:
            log.warning("checkpoint has RNG states of %d processes, this run has %d: drop-path/mask draws will "
                        "differ from the original run's", len(rng_states), env.world_size)
            rng_states = None
    last_ckpt = ckpt_path
    del ckpt

    distiller.branch = wrap_ddp(distiller.branch, env)  # only student + projector; never the teacher
    train_step = TrainStep(distiller, optimizer, precision=precision, clip_grad=oc.clip_grad,
                           accum_steps=oc.accum_steps, compile=tc.compile, scaler=scaler)

    runlog = RunLog(run_dir, enabled=env.is_main, total_steps=total_steps, start_step=step,
                    tensorboard=tc.tensorboard)
    if env.is_main:
        lr0 = resolve_lr(oc, total_batch)[0]
        runlog.message(
            f"fdistill distill: {cfg.teacher.spec} -> {cfg.student.arch} | {env.world_size} process(es) on "
            f"{device.type}, {precision} | global batch {total_batch}, peak lr {lr0:.3g} | {steps_per_epoch} steps/epoch, "
            f"{total_steps} steps" + (f" | resumed from {ckpt_path} at step {step}" if ckpt_path else ""))
    metrics = StepMetrics(device)
    record: Dict[str, Any] = {"loss": math.nan}
    stopped_by = None

    def save(at_step: int) -> Path:
        rngs = gather_objects(capture_rng_state(), env)
        path = checkpoint_path(run_dir, at_step)
        if env.is_main:
            obj = {
                "format": FORMAT, "version": VERSION, "config": cfg_dict, "student_args": student_args_of(cfg),
                "model": {"student": distiller.student.state_dict(), "projector": distiller.projector.state_dict()},
                "teacher": _teacher_info(cfg, distiller.teacher),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": {"per_rank": rngs},
                "progress": {"step": at_step, "epoch": at_step // steps_per_epoch,
                             "step_in_epoch": at_step % steps_per_epoch,
                             "samples_in_epoch": (at_step % steps_per_epoch) * oc.accum_steps * cfg.data.batch_size
                             * env.world_size,
                             "samples": at_step * total_batch, "world_size": env.world_size,
                             "total_batch": total_batch, "steps_per_epoch": steps_per_epoch,
                             "total_steps": total_steps},
            }
            save_checkpoint(path, obj)
            prune_checkpoints(run_dir, tc.keep_last)
        barrier(env)
        return path

    def check_nonfinite() -> None:
        streak = metrics.current_streak()
        if streak >= tc.max_nonfinite:
            raise RunError(
                f"{streak} optimizer steps in a row had a non-finite loss or gradient (train.max_nonfinite="
                f"{tc.max_nonfinite}); stopped at step {step}. The last good checkpoint is "
                f"{last_ckpt or 'none'}; lower the learning rate, use precision=fp32/bf16, or check the data.")

    # -- the loop ---------------------------------------------------------------------------------
    with StopRequest() as stop:
        epoch = step // steps_per_epoch
        while step < total_steps:
            first = step % steps_per_epoch
            loader.set_epoch(epoch, start_index=first * oc.accum_steps * cfg.data.batch_size)
            batches = iter(loader)
            if rng_states is not None:  # after the iterator exists: nothing may draw in between
                restore_rng_state(rng_states[env.rank])
                rng_states = None
            for _ in range(first, steps_per_epoch):
                if step >= total_steps:
                    break
                micro_batches = _take(batches, oc.accum_steps)
                if micro_batches is None:  # a shard stream that ran short of its declared length
                    log.warning("epoch %d ended after fewer batches than data.samples_per_epoch implies", epoch)
                    break
                scheduler.step_update(step)  # lr of this update (host-side arithmetic)
                images = [to_images(b) for b in micro_batches]  # (B, 3, H, W) uint8 on the device
                outs, grad_norm, ok = train_step(images)
                for out in outs:
                    metrics.add_micro(out)
                images_n = sum(x.shape[0] for x in images)
                skipped = sum(b.get("skipped", 0) for b in micro_batches)
                step += 1
                metrics.add_step(grad_norm, ok, images_n, skipped)
                runlog.advance()
                if on_step is not None:
                    on_step(step)

                stopping = any_rank(stop.requested, env)
                if step % tc.log_interval == 0 or step == total_steps or stopping:
                    record = {"step": step, "epoch": round(step / steps_per_epoch, 4),
                              "lr": optimizer.param_groups[0]["lr"], "samples": step * total_batch,
                              **metrics.collect(env)}
                    runlog.write(record)
                    if record["nonfinite_streak"] >= tc.max_nonfinite:
                        check_nonfinite()
                if step % tc.ckpt_interval == 0 or step == total_steps or stopping:
                    check_nonfinite()
                    last_ckpt = save(step)
                if stopping:
                    stopped_by = stop.signame or "a stop request"
                    break
            if stopped_by:
                break
            epoch += 1

    elapsed = time.perf_counter() - t_start
    if env.is_main:
        if stopped_by:
            runlog.message(f"stopped by {stopped_by} at step {step}/{total_steps}; checkpoint {last_ckpt}. "
                           f"Run the same command again to resume.")
        runlog.message(f"done: step {step}/{total_steps}, loss {record.get('loss', math.nan):.4f}, "
                       f"{elapsed / 60:.1f} min, checkpoint {last_ckpt}, run folder {run_dir}")
    runlog.close()
    return RunResult(run_dir=run_dir, step=step, total_steps=total_steps, checkpoint=last_ckpt,
                     loss=float(record.get("loss", math.nan)), stopped_by=stopped_by, elapsed_s=elapsed)


def _take(batches, n: int):
    """The next ``n`` batches of an iterator, or None if it ends first."""
    out = []
    for _ in range(n):
        try:
            out.append(next(batches))
        except StopIteration:
            return None
    return out


def _restore(ckpt: Dict[str, Any], distiller, optimizer, scaler, env: DistEnv, total_batch: int) -> int:
    """Load a checkpoint's state into freshly built objects; returns the step to continue from."""
    from ..weights import WeightsError, load_into

    prog = ckpt["progress"]
    if int(prog.get("total_batch", total_batch)) != total_batch:
        raise RunError(
            f"the checkpoint was written with a global batch of {prog['total_batch']} images per step "
            f"({prog.get('world_size')} process(es)); this run has {total_batch} ({env.world_size} process(es)). "
            "Resume with the same data.batch_size x processes x optim.accum_steps.")
    try:
        load_into(unwrap(distiller.student), ckpt["model"]["student"], what="student")
        load_into(unwrap(distiller.projector), ckpt["model"]["projector"], what="projector")
    except WeightsError as e:
        raise RunError(f"checkpoint weights do not fit the model: {e}") from e
    optimizer.load_state_dict(ckpt["optimizer"])
    # the schedule is a function of the step and the *current* config (train.epochs may grow on
    # resume), so the scheduler's saved state is informational and not loaded
    if scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    return int(prog["step"])
